"""Kernel-level tests of the fused GradScaler / optimizer kernels (kernels/amp.py, csrc/cuda/amp_*):
the interface of docs/amp_kernels.md against plain-torch float64 references of its math.

Triton tests run on CPU tensors through the interpreter (tiny tensors; the CPU config uses 32-element chunks
and 8-element blocks, so a 70-element tensor spans three chunks and ends in a masked tail) and on the GPU when
there is one; the host-built tensor table is checked for 10,000+ tensors without running them. Tests marked
`gpu` need CUDA: large tensor sets (both the Triton and the CUDA kernels of effikern._C), no host syncs. The
CUDA launchers' table walk is checked on the host by compiling amp_kernels.cu with nvcc (no GPU needed).
"""

import math

import pytest
import torch

from oracle import assert_matches

triton = pytest.importorskip("triton")
amp = pytest.importorskip("effikern.kernels.amp")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Sizes that cover empty, 1 element, odd lengths, exact chunk multiples (32) and several chunks plus a tail.
SIZES = [0, 1, 7, 13, 32, 70, 127, 5, 64, 3]


def _grads(n, dtype=None, scale=1000.0):
    """n gradients cycling through SIZES and (without dtype) through all three dtypes, values ~ +-scale."""
    out = []
    for i in range(n):
        dt = dtype or DTYPES[i % 3]
        out.append((torch.randn(SIZES[i % len(SIZES)], device=DEVICE) * scale).to(dt))
    return out


def _norm64(values, norm_type):
    flat = torch.cat([v.reshape(-1) for v in values]) if values else torch.zeros(0, dtype=torch.float64)
    if norm_type == 0.0 or flat.numel() == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    return flat.norm() if norm_type == 2.0 else flat.abs().max()


# ---------------------------------------------------------------------------------------------------------
# unscale_check_norm
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("n_tensors", [1, 3, 40])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 0.0])
def test_unscale_check_norm_matches_reference(n_tensors, norm_type):
    grads = _grads(n_tensors)
    before = [g.clone() for g in grads]
    inv_scale = torch.tensor(1.0 / 1024, device=DEVICE)
    found_inf = torch.zeros((), device=DEVICE)
    write_back = n_tensors != 3  # both modes across the parametrization
    norm = amp.unscale_check_norm(grads, inv_scale, found_inf, norm_type, write_back)

    scaled32 = [g.float() * inv_scale for g in before]  # the spec: fp32 math, rounded to the grad's dtype
    for g, b, s in zip(grads, before, scaled32):
        assert torch.equal(g, s.to(g.dtype) if write_back else b)
    assert found_inf.item() == 0.0
    assert norm.dtype == torch.float32 and norm.numel() == 1
    truth = _norm64([s.double() for s in scaled32], norm_type)
    torch.testing.assert_close(norm.double().cpu(), truth.cpu(), rtol=2e-6, atol=1e-30)


@pytest.mark.triton
# each dtype meets each place and each value
@pytest.mark.parametrize("dtype, where, bad", [
    (dtype, where, (math.inf, -math.inf, math.nan)[(i + j) % 3])
    for i, dtype in enumerate(DTYPES) for j, where in enumerate(["first", "middle", "last"])])
def test_nonfinite_sets_found_inf_and_norm(dtype, where, bad):
    grads = _grads(9, dtype)
    index = {"first": 1, "middle": 5, "last": 8}[where]  # grads[0] is empty
    grads[index].view(-1)[-1] = bad
    found_inf = torch.zeros((), device=DEVICE)
    for norm_type in (2.0, math.inf):
        norm = amp.unscale_check_norm([g.clone() for g in grads], torch.tensor(0.5, device=DEVICE), found_inf,
                                      norm_type, True)
        assert found_inf.item() == 1.0
        assert not torch.isfinite(norm).item()
        if math.isnan(bad):
            assert torch.isnan(norm).item()  # torch's norms keep NaN as NaN; so do these
        found_inf.zero_()


@pytest.mark.triton
def test_found_inf_is_never_reset_and_empty_lists():
    found_inf = torch.ones((), device=DEVICE)
    norm = amp.unscale_check_norm(_grads(4), torch.tensor(1.0, device=DEVICE), found_inf, 2.0, False)
    assert found_inf.item() == 1.0 and torch.isfinite(norm).item()
    for grads in ([], [torch.zeros(0, device=DEVICE)]):
        found_inf.zero_()
        norm = amp.unscale_check_norm(grads, torch.tensor(1.0, device=DEVICE), found_inf, 2.0, True)
        assert norm.item() == 0.0 and found_inf.item() == 0.0


@pytest.mark.triton
def test_unaligned_views_and_table_cache():
    """Views at odd offsets go to the scalar (unaligned) launch; a new list with the same shapes at other
    addresses must not reuse the first list's table."""
    base = torch.randn(200, device=DEVICE, dtype=torch.float16)
    grads = [base[1:71], base[100:133], torch.randn(45, device=DEVICE, dtype=torch.float16)]
    for attempt in range(3):
        if attempt == 2:
            grads = [g.clone() * 3 for g in grads]
        before = [g.clone() for g in grads]
        found_inf = torch.zeros((), device=DEVICE)
        norm = amp.unscale_check_norm(grads, torch.tensor(0.25, device=DEVICE), found_inf, 2.0, True)
        for g, b in zip(grads, before):
            assert torch.equal(g, (b.float() * 0.25).half())
        truth = _norm64([b.double() * 0.25 for b in before], 2.0)
        torch.testing.assert_close(norm.double().cpu(), truth.cpu(), rtol=2e-6, atol=0)


@pytest.mark.triton
def test_table_layout_for_many_tensors():
    """The host-built table for 10,000+ tensors (too many to run through the interpreter): every non-empty
    tensor's chunks, in order, with its address and numel; empty tensors get none; groups by dtype and
    alignment; and the cache returns the same table for the same addresses only."""
    base = torch.zeros(64, dtype=torch.float16)
    tensors = [torch.zeros(n % 97, dtype=DTYPES[n % 3]) for n in range(10_500)] + [base[1:40], base[40:]]
    chunk = 32
    groups, total = amp._groups([tensors], torch.device("cpu"), chunk, ["grads"])
    assert total == sum(-(-t.numel() // chunk) for t in tensors)
    seen = {}
    for g in groups:
        table = g.table.tolist()
        n, c = g.n_tensors, g.n_chunks
        addrs, numels, owner, starts = table[:n], table[n:2 * n], table[2 * n:2 * n + c], table[2 * n + c:]
        assert len(starts) == c and all(a % 16 == 0 for a in addrs) == g.aligned
        for k in range(c):
            seen.setdefault((addrs[owner[k]], numels[owner[k]], g.example.dtype), []).append(starts[k])
    expected = {(t.data_ptr(), t.numel(), t.dtype): list(range(0, t.numel(), chunk))
                for t in tensors if t.numel()}
    assert seen == expected
    assert amp._groups([tensors], torch.device("cpu"), chunk, ["grads"])[0] is groups
    moved = tensors[:-1] + [tensors[-1].clone()]
    assert amp._groups([moved], torch.device("cpu"), chunk, ["grads"])[0] is not groups


# ---------------------------------------------------------------------------------------------------------
# Optimizers: float64 references of the spec math
# ---------------------------------------------------------------------------------------------------------


def _adamw_reference(p, g, m, v, step, lr, beta1, beta2, eps, wd, maximize, factor, compute=torch.float64):
    """One AdamW step in `compute` precision; returns (p, m, v) in `compute`."""
    p, g, m, v = (x.to(compute) for x in (p, g, m, v))
    g = g * factor
    if maximize:
        g = -g
    t = step + 1
    p = p * (1 - lr * wd)
    m = m + (1 - beta1) * (g - m)
    v = v * beta2 + (1 - beta2) * g * g
    p = p - (lr / (1 - beta1**t)) * m / (v.sqrt() / math.sqrt(1 - beta2**t) + eps)
    return p, m, v


def _sgd_reference(p, g, buf, step, lr, momentum, dampening, nesterov, wd, maximize, factor,
                   compute=torch.float64):
    p, g = p.to(compute), g.to(compute) * factor
    if maximize:
        g = -g
    if wd:
        g = g + wd * p
    if momentum:
        buf = g if step == 0 else momentum * buf.to(compute) + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


def _opt_tensors(dtypes_sizes, n_lists):
    return [[torch.randn(n, device=DEVICE).to(dt) for dt, n in dtypes_sizes] for _ in range(n_lists)]


MIXED = [(torch.float32, 70), (torch.float16, 13), (torch.bfloat16, 1), (torch.float32, 0),
         (torch.float16, 64)]


def _check_close(name, out, ref64, ref_lowp):
    if out.numel():
        assert_matches(name, out, ref64.to(out.device), ref_lowp.to(out.dtype))


@pytest.mark.triton
@pytest.mark.parametrize("step0, maximize, wd, use_factor", [
    (0.0, False, 0.0, False),   # first step, plain Adam
    (5.0, True, 0.1, True),     # later step, maximize, decoupled weight decay, scaled gradient
    (0.0, False, 0.01, True),
    (999.0, False, 0.0, False),  # t = 1000: bias corrections from ten bits of the step
])
def test_fused_adamw_matches_reference(step0, maximize, wd, use_factor):
    params, grads, exp_avgs, exp_avg_sqs = _opt_tensors(MIXED, 4)
    exp_avg_sqs = [v.abs() for v in exp_avg_sqs]
    if step0 == 0:
        exp_avgs = [torch.zeros_like(m) for m in exp_avgs]
        exp_avg_sqs = [torch.zeros_like(v) for v in exp_avg_sqs]
    originals = [[t.clone() for t in lst] for lst in (params, grads, exp_avgs, exp_avg_sqs)]
    step = torch.tensor(step0, device=DEVICE)
    factor = torch.tensor(0.125, device=DEVICE) if use_factor else None
    hyper = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, wd=wd, maximize=maximize)
    amp.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, hyper["lr"], hyper["beta1"], hyper["beta2"],
                     hyper["eps"], wd, maximize, factor, torch.zeros((), device=DEVICE))
    assert step.item() == step0 + 1
    f = 0.125 if use_factor else 1.0
    for i, (p0, g0, m0, v0) in enumerate(zip(*originals)):
        assert torch.equal(grads[i], g0)  # grads are only read
        ref64 = _adamw_reference(p0, g0, m0, v0, step0, *hyper.values(), f)
        ref32 = _adamw_reference(p0, g0, m0, v0, step0, *hyper.values(), f, compute=torch.float32)
        for name, out, r64, r32 in zip(("param", "exp_avg", "exp_avg_sq"), (params[i], exp_avgs[i],
                                       exp_avg_sqs[i]), ref64, ref32):
            _check_close(f"{name}[{i}] {p0.dtype}", out, r64, r32)
        if p0.dtype == torch.float32 and p0.numel():
            # the update itself, not hidden behind |p|
            _check_close(f"delta[{i}]", params[i] - p0, ref64[0] - p0.double(), ref32[0] - p0)


@pytest.mark.triton
@pytest.mark.parametrize("momentum, dampening, nesterov, wd, maximize, step0, use_factor", [
    (0.0, 0.0, False, 0.0, False, 0.0, False),   # plain SGD, no buffers
    (0.9, 0.0, False, 0.0, False, 0.0, True),    # first step: buf = g
    (0.9, 0.1, False, 1e-2, True, 3.0, True),    # dampening, weight decay, maximize
    (0.9, 0.0, True, 1e-2, False, 3.0, False),   # nesterov
])
def test_fused_sgd_matches_reference(momentum, dampening, nesterov, wd, maximize, step0, use_factor):
    params, grads, bufs = _opt_tensors(MIXED, 3)
    if step0 == 0:
        bufs = [torch.full_like(b, float("nan")) for b in bufs]  # never read on the first step
    originals = [[t.clone() for t in lst] for lst in (params, grads, bufs)]
    step = torch.tensor(step0, device=DEVICE)
    factor = torch.tensor(0.5, device=DEVICE) if use_factor else None
    amp.fused_sgd_(params, grads, bufs if momentum else [], step, 0.1, momentum, dampening, nesterov, wd,
                   maximize, factor, None)
    assert step.item() == step0 + 1
    f = 0.5 if use_factor else 1.0
    for i, (p0, g0, b0) in enumerate(zip(*originals)):
        assert torch.equal(grads[i], g0)
        args = (step0, 0.1, momentum, dampening, nesterov, wd, maximize, f)
        p64, b64 = _sgd_reference(p0, g0, b0, *args)
        p32, b32 = _sgd_reference(p0, g0, b0, *args, compute=torch.float32)
        _check_close(f"param[{i}] {p0.dtype}", params[i], p64, p32)
        if momentum:
            _check_close(f"buf[{i}]", bufs[i], b64, b32)


@pytest.mark.triton
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_found_inf_skips_the_whole_update(optimizer):
    params, grads, m, v = _opt_tensors(MIXED, 4)
    before = [[t.clone() for t in lst] for lst in (params, m, v)]
    step = torch.tensor(2.0, device=DEVICE)
    found_inf = torch.ones((), device=DEVICE)
    if optimizer == "adamw":
        amp.fused_adamw_(params, grads, m, [x.abs() for x in v], step, 0.1, 0.9, 0.999, 1e-8, 0.0, False,
                         None, found_inf)
    else:
        amp.fused_sgd_(params, grads, m, step, 0.1, 0.9, 0.0, False, 0.0, False, None, found_inf)
    assert step.item() == 2.0
    for lst, lst0 in zip((params, m), before[:2]):
        for t, t0 in zip(lst, lst0):
            assert torch.equal(t, t0)


@pytest.mark.triton
def test_adamw_several_steps_match_torch_adamw():
    """Three steps against torch.optim.AdamW itself (fp32), the skip in the middle leaving it untouched."""
    p_ref = [torch.randn(n, device=DEVICE) for n in (33, 1, 64)]
    p = [x.clone() for x in p_ref]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    step = torch.zeros((), device=DEVICE)
    opt = torch.optim.AdamW([torch.nn.Parameter(x) for x in p_ref], lr=0.01, weight_decay=0.05)
    for it in range(3):
        grads = [torch.randn_like(x) for x in p]
        for param, g in zip(opt.param_groups[0]["params"], grads):
            param.grad = g.clone()
        opt.step()
        amp.fused_adamw_(p, grads, m, v, step, 0.01, 0.9, 0.999, 1e-8, 0.05, False, None,
                         torch.zeros((), device=DEVICE))
    assert step.item() == 3.0
    for ours, theirs in zip(p, opt.param_groups[0]["params"]):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.triton
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_fused_optimizers_load_lr_from_a_tensor(lr_dtype):
    """lr_tensor replaces lr (passed as 0.0) in every use, AdamW's decay included, and the kernels load it when
    they run: a value written into the same tensor between calls (what an LR scheduler does) is what the next
    call uses, although the tensor table is cached."""
    lr_t = torch.zeros((1,), dtype=lr_dtype, device=DEVICE)
    params, grads, exp_avgs, exp_avg_sqs = _opt_tensors(MIXED, 4)
    exp_avg_sqs = [v.abs() for v in exp_avg_sqs]
    sgd_params, bufs = [p.clone() for p in params], [m.clone() for m in exp_avgs]
    step_a, step_s = torch.tensor(3.0, device=DEVICE), torch.tensor(3.0, device=DEVICE)
    for k, value in enumerate((0.05, 0.2)):
        lr_t.fill_(value)
        lr = lr_t.item()  # the tensor's own value (rounded to fp32 for a float32 tensor)
        originals = [[t.clone() for t in lst] for lst in (params, exp_avgs, exp_avg_sqs, sgd_params, bufs)]
        amp.fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, step_a, 0.0, 0.9, 0.999, 1e-8, 0.1, False, None,
                         torch.zeros((), device=DEVICE), lr_tensor=lr_t)
        amp.fused_sgd_(sgd_params, grads, bufs, step_s, 0.0, 0.9, 0.1, False, 0.01, True, None, None,
                       lr_tensor=lr_t)
        assert step_a.item() == step_s.item() == 4.0 + k
        for i, (p0, m0, v0, sp0, b0) in enumerate(zip(*originals)):
            g0 = grads[i]
            hyper = (3.0 + k, lr, 0.9, 0.999, 1e-8, 0.1, False, 1.0)
            ref64 = _adamw_reference(p0, g0, m0, v0, *hyper)
            ref32 = _adamw_reference(p0, g0, m0, v0, *hyper, compute=torch.float32)
            for name, out, r64, r32 in zip(("param", "exp_avg", "exp_avg_sq"),
                                           (params[i], exp_avgs[i], exp_avg_sqs[i]), ref64, ref32):
                _check_close(f"{name}[{i}] {p0.dtype} lr {value}", out, r64, r32)
            args = (3.0 + k, lr, 0.9, 0.1, False, 0.01, True, 1.0)
            p64, b64 = _sgd_reference(sp0, g0, b0, *args)
            p32, b32 = _sgd_reference(sp0, g0, b0, *args, compute=torch.float32)
            _check_close(f"sgd param[{i}] {p0.dtype} lr {value}", sgd_params[i], p64, p32)
            _check_close(f"sgd buf[{i}] {p0.dtype}", bufs[i], b64, b32)


# ---------------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.triton
def test_bad_inputs_raise_clear_errors():
    one = torch.ones((), device=DEVICE)
    three = [torch.ones(3, device=DEVICE)]
    with pytest.raises(ValueError, match="norm_type"):
        amp.unscale_check_norm(three, one, torch.zeros((), device=DEVICE), 1.0, False)
    with pytest.raises(TypeError, match=r"grads\[0\]"):
        amp.unscale_check_norm([three[0].int()], one, one.clone(), 2.0, False)
    with pytest.raises(ValueError, match="contiguous"):
        amp.unscale_check_norm([torch.ones(4, 4, device=DEVICE).t()], one, one.clone(), 2.0, False)
    with pytest.raises(ValueError, match="inv_scale"):
        amp.unscale_check_norm(three, torch.ones(2, device=DEVICE), one.clone(), 2.0, False)
    p = [torch.ones(3, device=DEVICE)]
    with pytest.raises(ValueError, match="grads"):
        amp.fused_adamw_(p, [], p, p, one.clone(), 0.1, 0.9, 0.999, 1e-8, 0, False, None, None)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]"):
        amp.fused_adamw_(p, p, [torch.ones(3, dtype=torch.float16, device=DEVICE)], p, one.clone(), 0.1, 0.9,
                         0.999, 1e-8, 0, False, None, None)
    with pytest.raises(ValueError, match="momentum_buffers"):
        amp.fused_sgd_(p, p, p, one.clone(), 0.1, 0.0, 0.0, False, 0.0, False, None, None)
    for bad in (torch.ones(2, device=DEVICE), torch.ones((), dtype=torch.float16, device=DEVICE)):
        with pytest.raises(ValueError, match="lr_tensor: expected None or a float32/float64 tensor"):
            amp.fused_adamw_(p, p, [torch.zeros(3, device=DEVICE)], [torch.zeros(3, device=DEVICE)], one.clone(),
                             0.0, 0.9, 0.999, 1e-8, 0, False, None, None, lr_tensor=bad)
        with pytest.raises(ValueError, match="lr_tensor: expected None or a float32/float64 tensor"):
            amp.fused_sgd_(p, p, [], one.clone(), 0.0, 0.0, 0.0, False, 0.0, False, None, None, lr_tensor=bad)


# ---------------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------------


def _cuda_ext():
    try:
        from effikern import _C
    except ImportError:
        pytest.skip("effikern._C is not built")
    if not hasattr(_C, "amp_unscale_check_norm_cuda"):
        pytest.skip("effikern._C was built without the CUDA amp kernels")
    return _C


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _large_grads(dtype):
    """~300 tensors from 0 to 1M elements, with views at odd offsets (the unaligned / scalar path)."""
    sizes = [0, 1, 3, 4097, 65536, 65537, 1 << 20] + [int(x) for x in torch.randint(1, 30000, (290,))]
    grads = [torch.randn(n, device="cuda", dtype=dtype) * 100 for n in sizes]
    big = torch.randn(100003, device="cuda", dtype=dtype)
    return grads + [big[1:50001], big[50001:]]


def _backends():
    return [pytest.param("triton", marks=pytest.mark.gpu), pytest.param("cuda", marks=pytest.mark.gpu)]


def _unscale_fn(backend):
    if backend == "triton":
        return amp.unscale_check_norm
    ext = _cuda_ext()
    return lambda *args: ext.amp_unscale_check_norm_cuda(*args, _stream())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_unscale_check_norm_large(backend, dtype):
    fn = _unscale_fn(backend)
    grads = _large_grads(dtype)
    grads[150].view(-1)[3] = float("inf") if dtype != torch.float32 else float("nan")
    before = [g.clone() for g in grads]
    found_inf = torch.zeros((), device="cuda")
    inv = torch.tensor(1 / 64.0, device="cuda")
    norm = fn(grads, inv, found_inf, 2.0, True)
    assert found_inf.item() == 1.0 and not torch.isfinite(norm).item()
    before[150].zero_()
    for norm_type in (2.0, math.inf):
        found_inf.zero_()
        for g, b in zip(grads, before):
            g.copy_(b)  # in place: the odd-offset views stay views
        norm = fn(grads, inv, found_inf, norm_type, True)
        for w, b in zip(grads, before):
            assert torch.equal(w, (b.float() * inv).to(dtype))
        truth = _norm64([b.double() * inv.double() for b in before], norm_type)
        torch.testing.assert_close(norm.double(), truth.cuda(), rtol=1e-5, atol=0)
        assert found_inf.item() == 0.0


def _adamw_fn(backend):
    if backend == "triton":
        return amp.fused_adamw_
    ext = _cuda_ext()
    return lambda *args, lr_tensor=None: ext.amp_fused_adamw_cuda(*args, lr_tensor, _stream())


def _sgd_fn(backend):
    if backend == "triton":
        return amp.fused_sgd_
    ext = _cuda_ext()
    return lambda *args, lr_tensor=None: ext.amp_fused_sgd_cuda(*args, lr_tensor, _stream())


@pytest.mark.parametrize("backend", _backends())
def test_gpu_optimizers_large(backend):
    adamw, sgd = _adamw_fn(backend), _sgd_fn(backend)
    for dtype in DTYPES:
        p = _large_grads(dtype)
        g = [torch.randn_like(x) for x in p]
        m = [torch.randn_like(x) for x in p]
        v = [torch.rand_like(x) for x in p]
        orig = [[t.clone() for t in lst] for lst in (p, g, m, v)]
        step = torch.tensor(4.0, device="cuda")
        factor = torch.tensor(0.5, device="cuda")
        adamw(p, g, m, v, step, 0.05, 0.9, 0.999, 1e-8, 0.01, False, factor, torch.zeros((), device="cuda"))
        assert step.item() == 5.0
        for i in range(0, len(p), 37):
            ref64 = _adamw_reference(*(lst[i] for lst in orig), 4.0, 0.05, 0.9, 0.999, 1e-8, 0.01, False, 0.5)
            ref32 = _adamw_reference(*(lst[i] for lst in orig), 4.0, 0.05, 0.9, 0.999, 1e-8, 0.01, False, 0.5,
                                     compute=torch.float32)
            for out, r64, r32 in zip((p[i], m[i], v[i]), ref64, ref32):
                _check_close(f"adamw[{i}] {dtype}", out, r64, r32)
        p = [t.clone() for t in orig[0]]
        b = [t.clone() for t in orig[2]]
        sgd(p, g, b, step, 0.1, 0.9, 0.1, True, 0.01, True, factor, None)
        for i in range(0, len(p), 37):
            p64, b64 = _sgd_reference(orig[0][i], g[i], orig[2][i], 5.0, 0.1, 0.9, 0.1, True, 0.01, True, 0.5)
            p32, b32 = _sgd_reference(orig[0][i], g[i], orig[2][i], 5.0, 0.1, 0.9, 0.1, True, 0.01, True, 0.5,
                                      compute=torch.float32)
            _check_close(f"sgd[{i}] {dtype}", p[i], p64, p32)
            _check_close(f"sgd buf[{i}] {dtype}", b[i], b64, b32)


@pytest.mark.parametrize("backend", _backends())
def test_gpu_no_host_sync(backend):
    """A scaled, clipped step issues no synchronizing CUDA call (the table is cached after the first call)."""
    fn, adamw = _unscale_fn(backend), _adamw_fn(backend)
    p = [torch.randn(n, device="cuda") for n in (1000, 17, 4096)]
    g = [torch.randn_like(x).half() for x in p]
    p16 = [x.half() for x in p]
    m = [torch.zeros_like(x) for x in p16]
    v = [torch.zeros_like(x) for x in p16]
    inv, found_inf, step = (torch.full((), v, device="cuda") for v in (1.0, 0.0, 0.0))
    fn(g, inv, found_inf, 2.0, False)
    adamw(p16, g, m, v, step, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, inv, found_inf)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norm = fn(g, inv, found_inf, 2.0, False)
        adamw(p16, g, m, v, step, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, inv / norm.clamp(min=1.0), found_inf)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert step.item() == 2.0


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_gpu_cuda_graph_replays_the_current_tensor_lr(backend, lr_dtype):
    """What a tensor lr is for: an AdamW and an SGD step captured in a CUDA graph, then a new lr written into the
    tensor (lr.fill_, what an LR scheduler does) and the graph replayed: the update uses the new lr. A float lr
    would replay the value it was captured with."""
    adamw, sgd = _adamw_fn(backend), _sgd_fn(backend)
    shapes = [(torch.float32, 70001), (torch.float16, 4097), (torch.bfloat16, 13), (torch.float32, 1)]
    p, g, m, v = _opt_tensors(shapes, 4)  # DEVICE is cuda here
    v = [x.abs() for x in v]
    sp, b = [x.clone() for x in p], [x.clone() for x in m]
    lr = torch.tensor(0.5, device="cuda", dtype=lr_dtype)
    step_a, step_s, found_inf = (torch.zeros((), device="cuda") for _ in range(3))

    def update():
        adamw(p, g, m, v, step_a, 0.0, 0.9, 0.999, 1e-8, 0.1, False, None, found_inf, lr_tensor=lr)
        sgd(sp, g, b, step_s, 0.0, 0.9, 0.0, True, 0.01, False, None, found_inf, lr_tensor=lr)

    start = [[t.clone() for t in lst] for lst in (p, m, v, sp, b)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        update()  # warm-up: compiles the kernels and caches the Triton tables, as capture needs
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        update()
    for lst, lst0 in zip((p, m, v, sp, b), start):
        for t, t0 in zip(lst, lst0):
            t.copy_(t0)
    step_a.fill_(3.0)
    step_s.fill_(3.0)
    lr.fill_(0.01)
    graph.replay()
    torch.cuda.synchronize()
    assert step_a.item() == step_s.item() == 4.0
    new_lr = lr.item()
    for i in range(len(shapes)):
        p0, m0, v0, sp0, b0 = (lst[i] for lst in start)
        hyper = (3.0, new_lr, 0.9, 0.999, 1e-8, 0.1, False, 1.0)
        ref64 = _adamw_reference(p0, g[i], m0, v0, *hyper)
        ref32 = _adamw_reference(p0, g[i], m0, v0, *hyper, compute=torch.float32)
        for name, out, r64, r32 in zip(("param", "exp_avg", "exp_avg_sq"), (p[i], m[i], v[i]), ref64, ref32):
            _check_close(f"replayed adamw {name}[{i}]", out, r64, r32)
        if p0.dtype == torch.float32:  # the update itself, not hidden behind |p|
            _check_close(f"replayed adamw delta[{i}]", p[i] - p0, ref64[0] - p0.double(), ref32[0] - p0)
        args = (3.0, new_lr, 0.9, 0.0, True, 0.01, False, 1.0)
        p64, b64 = _sgd_reference(sp0, g[i], b0, *args)
        p32, b32 = _sgd_reference(sp0, g[i], b0, *args, compute=torch.float32)
        _check_close(f"replayed sgd param[{i}]", sp[i], p64, p32)
        _check_close(f"replayed sgd buf[{i}]", b[i], b64, b32)


@pytest.mark.parametrize("backend", _backends())
def test_gpu_tensor_lr_no_host_sync(backend):
    """Steps with a tensor lr changed in place between them issue no synchronizing CUDA call: the lr is read by
    the kernels, never on the host."""
    adamw, sgd = _adamw_fn(backend), _sgd_fn(backend)
    p = [torch.randn(n, device="cuda") for n in (1000, 17, 4096)]
    g = [torch.randn_like(x) for x in p]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    sp, b = [x.clone() for x in p], [torch.zeros_like(x) for x in p]
    lr, found_inf, step_a, step_s = (torch.full((), x, device="cuda") for x in (1e-3, 0.0, 0.0, 0.0))
    adamw(p, g, m, v, step_a, 0.0, 0.9, 0.999, 1e-8, 0.01, False, None, found_inf, lr_tensor=lr)
    sgd(sp, g, b, step_s, 0.0, 0.9, 0.0, False, 0.0, False, None, found_inf, lr_tensor=lr)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for value in (5e-4, 2e-4):
            lr.fill_(value)
            adamw(p, g, m, v, step_a, 0.0, 0.9, 0.999, 1e-8, 0.01, False, None, found_inf, lr_tensor=lr)
            sgd(sp, g, b, step_s, 0.0, 0.9, 0.0, False, 0.0, False, None, found_inf, lr_tensor=lr)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert step_a.item() == step_s.item() == 3.0


# ---------------------------------------------------------------------------------------------------------
# CUDA host logic without a GPU: the multi-tensor-apply table walk
# ---------------------------------------------------------------------------------------------------------

# Includes amp_kernels.cu and drives its table walk with a recording "launch": every non-empty tensor's chunks
# must appear exactly once, in order, with the right pointers, numel and running chunk (norm partial) index,
# across tables cut by both capacities (384 tensors, 2048 chunks) and a tensor longer than a whole table.
_TABLE_WALK_HARNESS = r"""
#include "amp_kernels.cu"
#include <cstdio>
#include <vector>
using namespace effikern::cuda::amp;
int main() {
  std::vector<int64_t> numels;
  for (int i = 0; i < 5000; ++i) numels.push_back((i * 7919) % 23 == 0 ? 0 : 1 + (i * 104729) % 40000);
  numels[10] = 2049LL * 16384 + 5;  // longer than one table's 2048 chunks
  numels.push_back(1);
  const int n = static_cast<int>(numels.size());
  std::vector<void*> a(n), b(n);
  for (int i = 0; i < n; ++i) {
    a[i] = reinterpret_cast<void*>(static_cast<uintptr_t>(i + 1) << 20);
    b[i] = reinterpret_cast<void*>((static_cast<uintptr_t>(i + 1) << 20) + 8);
  }
  void* const* const lists[2] = {a.data(), b.data()};
  int64_t expect_partial = 0;
  size_t tensor = 0;
  int64_t chunk = 0;
  int launches = 0;
  bool ok = true;
  cudaError_t err = multi_tensor_apply<2>(lists, numels.data(), n, [&](const ChunkTable<2>& t, int n_chunks) {
    ++launches;
    if (t.first_chunk != expect_partial || n_chunks <= 0 || n_chunks > kMaxChunks) ok = false;
    for (int k = 0; k < n_chunks; ++k) {
      while (tensor < numels.size() && numels[tensor] == 0) ++tensor;
      const int s = t.chunk_slot[k];
      if (tensor >= numels.size() || t.ptr[0][s] != a[tensor] || t.ptr[1][s] != b[tensor] ||
          t.numel[s] != numels[tensor] || t.chunk_index[k] != chunk) {
        std::printf("mismatch at launch %d chunk %d (tensor %zu, chunk %lld)\n", launches, k, tensor,
                    (long long)chunk);
        ok = false;
        return cudaErrorInvalidValue;
      }
      if (++chunk * kChunk >= numels[tensor]) { ++tensor; chunk = 0; }
    }
    expect_partial += n_chunks;
    return cudaSuccess;
  });
  while (tensor < numels.size() && numels[tensor] == 0) ++tensor;
  const int64_t total = num_chunks(numels.data(), n);
  if (err != cudaSuccess || !ok || tensor != numels.size() || expect_partial != total) {
    std::printf("FAILED: err %d ok %d tensor %zu/%zu partials %lld/%lld\n", (int)err, (int)ok, tensor,
                numels.size(), (long long)expect_partial, (long long)total);
    return 1;
  }
  std::printf("OK %d launches %lld chunks\n", launches, (long long)expect_partial);
  return 0;
}
"""


def test_cuda_table_walk_covers_every_chunk_once(tmp_path):
    import os
    import shutil
    import subprocess

    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        pytest.skip("nvcc not found")
    src_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
    (tmp_path / "walk.cu").write_text(_TABLE_WALK_HARNESS)
    # sm_80 only, host code is what runs; no CUDA call is made, so no GPU (or driver) is needed.
    cmd = [nvcc, "-std=c++17", "-O1", "-arch=sm_80", "-I", src_dir, str(tmp_path / "walk.cu"), "-o",
           str(tmp_path / "walk")]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(tmp_path / "walk")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stdout + run.stderr
