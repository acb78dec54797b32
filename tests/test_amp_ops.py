"""torch.ops.effikern.unscale_check_norm / fused_adamw_ / fused_sgd_ on every backend.

Truth: float64 math of the contract (effikern/ops/amp.py). Written gradients must equal the fp32 product
rounded to the grad's dtype within one ulp (every backend does one fp32 multiply and one rounding); norms are
fp32 accumulations, compared to the float64 norm within a few fp32 ulps per summed term.
"""

import contextlib
import math
from unittest import mock

import pytest
import torch

import effikern
from effikern import _auto
from effikern.ops import amp as amp_ops
from effikern.ops import amp_torch_fused
from backend_util import device_for, skip_unavailable

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = math.inf
# ulp at 1.0 of each dtype, the tolerance of one rounding
ULP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def _backends():
    return [pytest.param("torch"), pytest.param("cpp"), pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.gpu)]


BACKENDS = _backends()
# The ops under auto where no effikern kernel is measured faster: PyTorch's fused and foreach kernels
# (ops/amp_torch_fused.py), run here on CPU by making auto prefer torch for every op.
FALLBACK = "auto-torch-fused"
UPDATE_BACKENDS = BACKENDS + [pytest.param(FALLBACK)]


def _setup(backend):
    if backend == FALLBACK:
        if not amp_torch_fused.available("fused_adamw"):
            pytest.skip("this torch has no torch._fused_adamw_")
        return "cpu"
    device = device_for(backend)
    skip_unavailable(backend, device)
    return device


@contextlib.contextmanager
def _running_on(backend):
    """The backend choice of a test: ``backend`` itself, or auto with nothing measured faster than torch."""
    if backend != FALLBACK:
        with effikern.set_backend(backend):
            yield
        return
    with effikern.set_backend("auto"), mock.patch.object(_auto, "preference", lambda *a, **k: ("torch",)):
        yield


def _sizes(backend, many):
    # The Triton interpreter is slow: tiny sets there; the cpp backend also gets sets that span many pieces
    # and threads (> 65,536 elements in all, one tensor of several 16K-element pieces).
    if not many:
        return [0, 1, 7, 13 * 11]
    if backend == "triton" and not torch.cuda.is_available():
        return [3, 0, 1, 33, 70, 5] * 3
    return [1, 0, 5, 70001, 127, 16384, 16385, 3] + [i % 97 for i in range(120)]


def _grads(sizes, dtypes, device, scale=512.0):
    return [(torch.randn(n, dtype=torch.float64) * scale).to(dtypes[i % len(dtypes)]).to(device)
            for i, n in enumerate(sizes)]


def _cat(tensors):
    return torch.cat([t.flatten() for t in tensors]) if tensors else torch.zeros(0)


def _truth_norm(grads, inv, norm_type):
    flat = torch.cat([g.double().flatten() * inv for g in grads] + [torch.zeros(0, dtype=torch.float64)])
    if norm_type == 0.0:
        return 0.0
    if flat.numel() == 0:
        return 0.0
    return torch.linalg.vector_norm(flat, norm_type).item()


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float16], [torch.bfloat16], DTYPES],
                         ids=["fp32", "fp16", "bf16", "mixed"])
@pytest.mark.parametrize("many", [False, True], ids=["few", "many"])
@pytest.mark.parametrize("write_back", [True, False], ids=["write", "readonly"])
def test_unscale_check_norm_values(backend, dtypes, many, write_back):
    device = _setup(backend)
    grads = _grads(_sizes(backend, many), dtypes, device)
    before = [g.clone() for g in grads]
    inv = 1.0 / 512.0 * 3.0  # not a power of two: the rounding of the product shows
    inv_t = torch.tensor([inv], dtype=torch.float32, device=device)
    for norm_type in (2.0, INF, 0.0):
        grads = [g.clone() for g in before]
        found = torch.zeros(1, device=device)
        with _running_on(backend):
            norm = torch.ops.effikern.unscale_check_norm(grads, inv_t, found, norm_type, write_back)
        assert norm.shape == () and norm.dtype == torch.float32
        assert found.item() == 0.0
        # With write-back the norm is of what the gradients hold afterwards (the products rounded to their dtypes).
        if write_back:
            truth = _truth_norm([(b.float() * inv_t).to(b.dtype) for b in before], 1.0, norm_type)
        else:
            truth = _truth_norm(before, float(inv_t), norm_type)
        n_terms = max(1, sum(g.numel() for g in grads))
        tol = 4 * ULP[torch.float32] * (math.sqrt(n_terms) if norm_type == 2.0 else 1.0)
        if write_back:  # stored values within one rounding of the truth's (the Triton interpreter truncates bf16)
            tol = max(tol, max(ULP[d] for d in dtypes))
        assert abs(norm.item() - truth) <= tol * abs(truth) + 1e-30, (norm_type, norm.item(), truth)
        for dtype in dtypes:  # one comparison per dtype over the concatenated tensors (fast on 100s)
            got = _cat([g for g in grads if g.dtype == dtype])
            was = _cat([b for b in before if b.dtype == dtype])
            want = (was.float() * inv_t).to(dtype) if write_back else was
            torch.testing.assert_close(got, want, rtol=ULP[dtype], atol=0)


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", [INF, -INF, math.nan], ids=["inf", "-inf", "nan"])
def test_nonfinite_is_found(backend, dtype, where, bad):
    device = _setup(backend)
    grads = _grads([5, 0, 33, 1, 17], [dtype], device)
    index = {"first": 0, "middle": 2, "last": 4}[where]
    grads[index].view(-1)[-1] = bad
    found = torch.zeros((), device=device)
    inv = torch.full((), 0.25, device=device)
    with _running_on(backend):
        for norm_type in (2.0, INF):
            norm = torch.ops.effikern.unscale_check_norm(grads, inv, found, norm_type, False)
            assert found.item() == 1.0
            assert not math.isfinite(norm.item())


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_found_inf_is_never_reset_and_empty_lists(backend):
    device = _setup(backend)
    found = torch.ones(1, device=device)
    inv = torch.ones(1, device=device)
    with _running_on(backend):
        norm = torch.ops.effikern.unscale_check_norm(_grads([4, 9], DTYPES, device), inv, found, 2.0, True)
        assert found.item() == 1.0 and math.isfinite(norm.item())
        for grads in ([], [torch.zeros(0, device=device)]):
            found.zero_()
            norm = torch.ops.effikern.unscale_check_norm(grads, inv, found, INF, True)
            assert norm.item() == 0.0 and found.item() == 0.0


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_non_contiguous_grads_are_written_back(backend):
    device = _setup(backend)
    base = torch.randn(9, 14, device=device).half()
    grads = [base.t(), base[:, ::2], torch.randn(6, device=device)]
    assert not grads[0].is_contiguous() and not grads[1].is_contiguous()
    before = [g.clone() for g in grads]
    found = torch.zeros((), device=device)
    inv = torch.full((), 0.5, device=device)
    with _running_on(backend):
        norm = torch.ops.effikern.unscale_check_norm(grads[1:], inv, found, 2.0, True)
    torch.testing.assert_close(grads[1], (before[1].float() * 0.5).half(), rtol=0, atol=0)
    torch.testing.assert_close(grads[2], before[2] * 0.5, rtol=0, atol=0)
    truth = _truth_norm(before[1:], 0.5, 2.0)
    assert abs(norm.item() - truth) <= 1e-5 * truth


def test_errors_name_the_argument():
    g = [torch.randn(3)]
    one, found = torch.ones(()), torch.zeros(())
    op = torch.ops.effikern.unscale_check_norm
    with pytest.raises(TypeError, match=r"grads\[0\] must have dtype"):
        op([torch.randn(3, dtype=torch.float64)], one, found, 2.0, True)
    with pytest.raises(ValueError, match="inv_scale must be a float32 tensor with 1 element"):
        op(g, torch.ones(2), found, 2.0, True)
    with pytest.raises(ValueError, match="found_inf must be a float32"):
        op(g, one, torch.zeros((), dtype=torch.float64), 2.0, True)
    with pytest.raises(ValueError, match="norm_type must be"):
        op(g, one, found, 1.0, True)
    with pytest.raises(ValueError, match="exp_avgs must have one tensor per tensor of params"):
        torch.ops.effikern.fused_adamw_(g, g, [], [], torch.zeros(()), 1e-3, 0.9, 0.999, 1e-8, 0.0, False,
                                        None, None)
    with pytest.raises(ValueError, match=r"beta2 must be in"):
        torch.ops.effikern.fused_adamw_(g, g, g, g, torch.zeros(()), 1e-3, 0.9, 1.5, 1e-8, 0.0, False, None,
                                        None)
    with pytest.raises(ValueError, match="momentum_buffers must be empty"):
        torch.ops.effikern.fused_sgd_(g, g, g, torch.zeros(()), 0.1, 0.0, 0.0, False, 0.0, False, None, None)
    with pytest.raises(ValueError, match="nesterov needs momentum"):
        torch.ops.effikern.fused_sgd_(g, g, [], torch.zeros(()), 0.1, 0.0, 0.0, True, 0.0, False, None, None)


def test_backend_unavailable_fails_only_when_asked():
    g = [torch.randn(3)]
    with effikern.set_backend("cuda"):
        with pytest.raises(effikern.BackendUnavailableError):
            torch.ops.effikern.unscale_check_norm(g, torch.ones(()), torch.zeros(()), 2.0, False)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    skip_unavailable(backend, "cpu")
    with effikern.set_backend(backend):
        _opcheck_all()


def _opcheck_all():
    g = [torch.randn(5), torch.randn(3, 4).half()]
    torch.library.opcheck(torch.ops.effikern.unscale_check_norm.default,
                          (g, torch.ones(()), torch.zeros(()), 2.0, True))
    p = [torch.randn(4)]
    torch.library.opcheck(torch.ops.effikern.fused_adamw_.default,
                          (p, [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)], torch.zeros(()), 1e-3,
                           0.9, 0.999, 1e-8, 0.01, False, torch.full((), 0.5), torch.zeros(())))
    torch.library.opcheck(torch.ops.effikern.fused_sgd_.default,
                          (p, [torch.randn(4)], [torch.zeros(4)], torch.zeros(()), 0.1, 0.9, 0.0, True, 0.0,
                           False, None, None))
    # a tensor lr (lr_tensor): schema, fake function and every dispatch path take it too
    torch.library.opcheck(torch.ops.effikern.fused_adamw_.default,
                          (p, [torch.randn(4)], [torch.zeros(4)], [torch.zeros(4)], torch.zeros(()), 0.0,
                           0.9, 0.999, 1e-8, 0.01, False, None, torch.zeros(()), torch.full((), 1e-3)))
    torch.library.opcheck(torch.ops.effikern.fused_sgd_.default,
                          (p, [torch.randn(4)], [torch.zeros(4)], torch.zeros(()), 0.0, 0.9, 0.0, False, 0.0,
                           False, None, None, torch.full((1,), 0.1, dtype=torch.float64)))


# --- fused updates against the float64 contract ---------------------------------------------------------

def _adamw_truth(p, g, m, v, step, lr, b1, b2, eps, wd, maximize, factor):
    p, g, m, v = p.double(), g.double() * factor, m.double(), v.double()
    g = -g if maximize else g
    t = step + 1
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - (lr / (1 - b1**t)) * m / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
    return p, m, v


def _state_lists(sizes, dtypes, device):
    params = _grads(sizes, dtypes, device, scale=1.0)
    grads = _grads(sizes, dtypes, device, scale=300.0)
    ms = _grads(sizes, dtypes, device, scale=0.1)
    vs = [(x.double() ** 2).to(x.dtype) for x in _grads(sizes, dtypes, device, scale=0.1)]
    return params, grads, ms, vs


def _low_precision_tol(dtype):
    # One update rounds p, m and v once each in the param's dtype; relative terms of a few ulps.
    return dict(rtol=4 * ULP[dtype], atol=4 * ULP[dtype])


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("dtypes", [[torch.float32], [torch.float16], [torch.bfloat16], DTYPES],
                         ids=["fp32", "fp16", "bf16", "mixed"])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_adamw_matches_contract(backend, dtypes, maximize):
    device = _setup(backend)
    sizes = _sizes(backend, True)[:40] if backend != "triton" else [3, 0, 1, 33, 70]
    params, grads, ms, vs = _state_lists(sizes, dtypes, device)
    before = [[t.clone() for t in lst] for lst in (params, grads, ms, vs)]
    step = torch.full((1,), 4.0, device=device)
    factor = torch.full((), 1 / 256, device=device)
    hyper = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-6, wd=0.1)
    with _running_on(backend):
        torch.ops.effikern.fused_adamw_(params, grads, ms, vs, step, hyper["lr"], hyper["b1"], hyper["b2"],
                                        hyper["eps"], hyper["wd"], maximize, factor,
                                        torch.zeros((), device=device))
    assert step.item() == 5.0
    for dtype in dtypes:  # per dtype, over the concatenated tensors
        pick = [i for i, p in enumerate(params) if p.dtype == dtype]
        p0, g0, m0, v0 = (_cat([lst[i] for i in pick]) for lst in before)
        tp, tm, tv = _adamw_truth(p0, g0, m0, v0, 4, **hyper, maximize=maximize, factor=1 / 256)
        tol = _low_precision_tol(dtype)
        torch.testing.assert_close(_cat([params[i] for i in pick]).double(), tp, **tol)
        torch.testing.assert_close(_cat([ms[i] for i in pick]).double(), tm, **tol)
        torch.testing.assert_close(_cat([vs[i] for i in pick]).double(), tv, **tol)
        assert torch.equal(_cat([grads[i] for i in pick]), g0)  # grads are only read


def _rounding_cases(dtype, n):
    """Grads whose products with the factors below land on every kind of value the store has to round: ties
    (with the factors 1.5 and 3; odd and even kept bits), values either side, overflow past the dtype's max,
    subnormals, +-0, +-inf and NaN."""
    gen = torch.Generator().manual_seed(7)
    bits = 8 if dtype == torch.bfloat16 else 11  # significant bits of the dtype
    mantissa = torch.randint(2 ** (bits - 1), 2**bits, (n,), generator=gen).double() / 2 ** (bits - 1)
    exponent = torch.randint(-12, 12, (n,), generator=gen).double()
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    g = (sign * mantissa * 2.0**exponent).to(dtype)
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).tiny
    special = torch.tensor([0.0, -0.0, INF, -INF, math.nan, big, -big, tiny / 4, -tiny / 8, tiny, 1.0, -1.0])
    g[: special.numel()] = special.to(dtype)
    return g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_adamw_rounds_like_torch(dtype):
    """With beta1 = beta2 = 0 the new exp_avg is the fp32 product grad * factor and the new exp_avg_sq its square,
    each rounded once to the dtype: the cpp kernel (one-pass vectors, portable tail) stores exactly the bits torch's
    conversion gives, round-to-nearest-even ties, overflow to inf and NaN included."""
    skip_unavailable("cpp", "cpu")
    n = 4096 + 13  # vectors of 16 and a tail
    g = _rounding_cases(dtype, n)
    # 1.5 and 3: g * 1.5 = g + g / 2 has one bit more than g, so a g with an odd last bit makes an exact tie
    for factor in (1.5, 3.0, 1 + 2**-8, 1 - 2**-12, 0.7371):
        f = torch.tensor(factor, dtype=torch.float32)
        product = g.float() * f
        kept = 16 if dtype == torch.bfloat16 else 13  # fp32 mantissa bits dropped by the rounding (normal range)
        dropped = product.view(torch.int32) & ((1 << kept) - 1)
        if factor in (1.5, 3.0):
            assert (dropped == 1 << (kept - 1)).sum() > 20, "the case set must hold ties"
        out = {}
        for backend in ("torch", "cpp"):
            p, m = torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)
            v = torch.full((n,), 0.5).to(dtype)
            with effikern.set_backend(backend):
                torch.ops.effikern.fused_adamw_([p], [g.clone()], [m], [v], torch.zeros(1), 1e-3, 0.0, 0.0, 1e-8,
                                                0.0, False, f, torch.zeros(()))
            out[backend] = (m, v)
        for got, want, name in zip(out["cpp"], out["torch"], ("exp_avg", "exp_avg_sq")):
            # bits equal; or both NaN; or zeros of either sign (a -0 grad's lerp gives +0 here, -0 in torch's lerp)
            same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan()) | \
                ((got == 0) & (want == 0))
            bad = (~same).nonzero().flatten()[:5]
            assert same.all(), (name, factor, bad.tolist(), got[bad].tolist(), want[bad].tolist())
        finite = product.isfinite()  # (an infinite product gives NaN in the lerp, in torch too)
        assert torch.equal(out["cpp"][0][finite], product[finite].to(dtype))  # exp_avg: the rounded product




@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_cpp_sgd_steps_with_the_rounded_buffer_like_torch(dtype, nesterov):
    """SGD keeps the momentum buffer in the param's dtype and steps with the rounded value (torch.optim.SGD's
    behaviour). With momentum 0.5, lr 1 and no weight decay every fp32 operation is one exact-or-once-rounded step
    in both the cpp kernel and the reference, so both store the same bits in the buffer and the param; a kernel
    that stepped with the unrounded buffer would differ in the param."""
    skip_unavailable("cpp", "cpu")
    n = 4096 + 13
    g = _rounding_cases(dtype, n)
    gen = torch.Generator().manual_seed(3)
    buf0 = (torch.randn(n, generator=gen) * 3).to(dtype)
    p0 = (torch.randn(n, generator=gen) * 100).to(dtype)
    out = {}
    for backend in ("torch", "cpp"):
        p, buf = p0.clone(), buf0.clone()
        with effikern.set_backend(backend):
            torch.ops.effikern.fused_sgd_([p], [g.clone()], [buf], torch.ones(1), 1.0, 0.5, 0.0, nesterov, 0.0,
                                          False, torch.tensor(1.5), torch.zeros(()))
        out[backend] = (p, buf)
    for got, want, name in zip(out["cpp"], out["torch"], ("param", "momentum_buffer")):
        same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan()) | \
            ((got == 0) & (want == 0))
        bad = (~same).nonzero().flatten()[:5]
        assert same.all(), (name, bad.tolist(), got[bad].tolist(), want[bad].tolist())


def test_cpp_adamw_portable_build():
    """EFFIKERN_CPU_ISA=baseline takes the AVX2 one-pass AdamW and SGD (amp_update_simd.cpp) away: the portable
    code (amp_cpu.cpp), used on CPUs without AVX2 and for every tail, then passes the same contract and rounding
    tests."""
    import os
    import subprocess
    import sys

    skip_unavailable("cpp", "cpu")
    env = dict(os.environ, EFFIKERN_CPU_ISA="baseline")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "(cpp_ and like_torch) or (matches_contract and cpp)"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_fused_adamw_on_channels_last_and_mixed_layouts(backend):
    """A channels_last conv weight with its grad and state in the same layout (what autograd and the optimizers
    give it) updates in place through flat views; a param whose grad has another layout goes through the copies.
    Both give the contiguous result."""
    device = _setup(backend)
    cl = torch.channels_last
    shapes = [(8, 3, 3, 3), (16, 1, 5, 5), (6, 4, 2, 3)]
    params, grads, ms, vs = _state_lists([math.prod(s) for s in shapes], [torch.float32], device)
    params, grads, ms, vs = ([t.reshape(s) for t, s in zip(lst, shapes)] for lst in (params, grads, ms, vs))
    vs = [v.abs() for v in vs]
    expected = [[t.clone() for t in lst] for lst in (params, grads, ms, vs)]
    laid_out = [[t.contiguous(memory_format=cl) for t in lst] for lst in (params, grads, ms, vs)]
    laid_out[1][2] = grads[2].clone()  # param 2: channels_last, its grad contiguous -> copies
    work = amp_ops._Contiguous(*laid_out)
    assert work.copied == [2]
    assert all(work.lists[k][i].data_ptr() == laid_out[k][i].data_ptr() for k in range(4) for i in (0, 1))
    hyper = (1e-2, 0.9, 0.99, 1e-6, 0.1, False, torch.full((), 1 / 256, device=device), torch.zeros((), device=device))
    with _running_on(backend):
        torch.ops.effikern.fused_adamw_(*expected, torch.full((1,), 4.0, device=device), *hyper)
        torch.ops.effikern.fused_adamw_(*laid_out, torch.full((1,), 4.0, device=device), *hyper)
    for k in (0, 2, 3):
        for i in range(3):
            assert laid_out[k][i].is_contiguous(memory_format=cl)
            # the same math, but an element may fall in a vector body on one side and a scalar tail on the other
            torch.testing.assert_close(laid_out[k][i], expected[k][i], **_low_precision_tol(torch.float32))


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
def test_fused_updates_skip_on_found_inf(backend):
    device = _setup(backend)
    params, grads, ms, vs = _state_lists([5, 1, 70], DTYPES, device)
    grads[1].fill_(math.inf)
    before = [[t.clone() for t in lst] for lst in (params, ms, vs)]
    step = torch.zeros((), device=device)
    found = torch.ones((), device=device)
    with _running_on(backend):
        torch.ops.effikern.fused_adamw_(params, grads, ms, vs, step, 1e-2, 0.9, 0.99, 1e-8, 0.1, False, None,
                                        found)
        torch.ops.effikern.fused_sgd_(params, grads, ms, step, 1e-2, 0.9, 0.0, True, 0.1, False, None, found)
    assert step.item() == 0.0
    for now, was in zip((params, ms, vs), before):
        for a, b in zip(now, was):
            assert torch.equal(a, b)


def _sgd_truth(p, g, buf, first, lr, momentum, dampening, nesterov, wd, maximize, factor):
    p, g = p.double(), g.double() * factor
    g = -g if maximize else g
    g = g + wd * p
    if momentum:
        buf = g if first else momentum * buf.double() + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return p - lr * g, buf


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("dtypes", [[torch.float32], DTYPES], ids=["fp32", "mixed"])
@pytest.mark.parametrize("config", [(0.0, 0.0, False, 0.0, False), (0.9, 0.1, False, 0.01, False),
                                    (0.9, 0.0, True, 0.1, True)], ids=["plain", "momentum", "nesterov_max"])
def test_fused_sgd_matches_contract(backend, dtypes, config):
    device = _setup(backend)
    momentum, dampening, nesterov, wd, maximize = config
    sizes = [3, 0, 1, 33, 70] if backend == "triton" else _sizes(backend, True)[:30]
    params, grads, bufs, _ = _state_lists(sizes, dtypes, device)
    bufs = bufs if momentum else []
    for start in (0.0, 3.0):  # step 0: buffers uninitialised (buf = g); later: the momentum formula
        before = [[t.clone() for t in lst] for lst in (params, grads, bufs)]
        step = torch.full((), start, device=device)
        with _running_on(backend):
            torch.ops.effikern.fused_sgd_(params, grads, bufs, step, 0.05, momentum, dampening, nesterov, wd,
                                          maximize, torch.full((), 0.5, device=device), None)
        assert step.item() == start + 1
        for dtype in dtypes:  # per dtype, over the concatenated tensors
            pick = [i for i, p in enumerate(params) if p.dtype == dtype]
            b0 = _cat([before[2][i] for i in pick]) if momentum else None
            tp, tb = _sgd_truth(_cat([before[0][i] for i in pick]), _cat([before[1][i] for i in pick]), b0,
                                start == 0.0, 0.05, momentum, dampening, nesterov, wd, maximize, 0.5)
            tol = _low_precision_tol(dtype)
            torch.testing.assert_close(_cat([params[i] for i in pick]).double(), tp, **tol)
            if momentum:
                torch.testing.assert_close(_cat([bufs[i] for i in pick]).double(), tb, **tol)


# --- a tensor lr (lr_tensor): read when the update runs, so a scheduler reaches a captured CUDA graph -----------

@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lr_shape", [(), (1,)], ids=["0d", "1elem"])
def test_fused_updates_take_lr_from_a_tensor(backend, lr_dtype, lr_shape):
    """lr_tensor replaces lr (passed as 0.0 here, which would leave SGD's params unchanged) in every use of it,
    AdamW's decay p *= 1 - lr * weight_decay included, and its value is read when the op runs: the second call
    sees what was written into the same tensor in between, as an LR scheduler writes it."""
    device = _setup(backend)
    sizes = [3, 0, 1, 33, 70] if backend == "triton" else _sizes(backend, True)[:30]
    dtypes = [torch.float32, torch.float16]
    params, grads, ms, vs = _state_lists(sizes, dtypes, device)
    sgd_params, bufs = [p.clone() for p in params], [m.clone() for m in ms]
    lr_t = torch.zeros(lr_shape, dtype=lr_dtype, device=device)
    hyper = dict(b1=0.9, b2=0.99, eps=1e-6, wd=0.1)
    for start, value in ((4.0, 3e-2), (5.0, 0.2)):
        lr_t.fill_(value)
        lr = float(lr_t)  # the tensor's own value (3e-2 rounded to fp32 for a float32 tensor)
        before = [[t.clone() for t in lst] for lst in (params, grads, ms, vs, sgd_params, bufs)]
        step_a, step_s = torch.full((), start, device=device), torch.full((), start, device=device)
        with _running_on(backend):
            torch.ops.effikern.fused_adamw_(params, grads, ms, vs, step_a, 0.0, hyper["b1"], hyper["b2"],
                                            hyper["eps"], hyper["wd"], False, None, None, lr_t)
            torch.ops.effikern.fused_sgd_(sgd_params, grads, bufs, step_s, 0.0, 0.9, 0.0, True, 0.01, False,
                                          None, torch.zeros((), device=device), lr_t)
        assert step_a.item() == step_s.item() == start + 1
        for dtype in dtypes:  # per dtype, over the concatenated tensors
            pick = [i for i, p in enumerate(params) if p.dtype == dtype]
            p0, g0, m0, v0, sp0, b0 = (_cat([lst[i] for i in pick]) for lst in before)
            tol = _low_precision_tol(dtype)
            tp, tm, tv = _adamw_truth(p0, g0, m0, v0, start, lr, **hyper, maximize=False, factor=1.0)
            for got, want in ((params, tp), (ms, tm), (vs, tv)):
                torch.testing.assert_close(_cat([got[i] for i in pick]).double(), want, **tol)
            tsp, tb = _sgd_truth(sp0, g0, b0, False, lr, 0.9, 0.0, True, 0.01, False, 1.0)
            torch.testing.assert_close(_cat([sgd_params[i] for i in pick]).double(), tsp, **tol)
            torch.testing.assert_close(_cat([bufs[i] for i in pick]).double(), tb, **tol)


def test_lr_tensor_errors_name_the_argument():
    g = [torch.randn(3)]
    adamw = (torch.ops.effikern.fused_adamw_, (g, g, g, g, torch.zeros(()), 0.0, 0.9, 0.999, 1e-8, 0.0, False,
                                               None, None))
    sgd = (torch.ops.effikern.fused_sgd_, (g, g, [], torch.zeros(()), 0.0, 0.0, 0.0, False, 0.0, False, None,
                                           None))
    for op, args in (adamw, sgd):
        with pytest.raises(ValueError, match="lr_tensor must be a float32 or float64 tensor with 1 element, "
                                             "got dtype float16"):
            op(*args, torch.ones((), dtype=torch.float16))
        with pytest.raises(ValueError, match=r"lr_tensor must be .* got dtype float32 and shape \(2,\)"):
            op(*args, torch.ones(2))
        with pytest.raises(ValueError, match="lr_tensor must be on the tensors' device cpu, got meta"):
            op(*args, torch.ones((), device="meta"))


def test_auto_split_across_backends_counts_one_step():
    """Under auto, a mixed list may run on two backends (cpp for fp32, torch for fp16 AdamW on CPU): the
    shared step must still advance once, and each group must see the same count."""
    groups = amp_ops._split_by_backend("fused_adamw", torch.device("cpu"),
                                       [torch.zeros(1), torch.zeros(1, dtype=torch.float16)])
    if len(groups) < 2:
        pytest.skip("auto runs every dtype of fused_adamw on one backend here")
    params, grads, ms, vs = _state_lists([5, 7, 9, 3], [torch.float32, torch.float16], "cpu")
    before = [[t.clone() for t in lst] for lst in (params, grads, ms, vs)]
    step = torch.full((), 2.0)
    torch.ops.effikern.fused_adamw_(params, grads, ms, vs, step, 1e-2, 0.9, 0.99, 1e-6, 0.1, False, None, None)
    assert step.item() == 3.0
    for i, (p0, g0, m0, v0) in enumerate(zip(*before)):
        tp, _, _ = _adamw_truth(p0, g0, m0, v0, 2, 1e-2, 0.9, 0.99, 1e-6, 0.1, False, 1.0)
        torch.testing.assert_close(params[i].double(), tp, **_low_precision_tol(p0.dtype))


def test_scaled_step_compiles_without_graph_breaks():
    """The whole check-and-update (the op torch's GradScaler syncs the host for) traces into one graph:
    no .item(), no data-dependent Python branch."""
    params = [torch.randn(7), torch.randn(3, 5)]
    grads = [torch.randn_like(p) * 1024 for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]

    def check_and_step(params, grads, m, v, step, inv_scale, found_inf):
        norm = torch.ops.effikern.unscale_check_norm(grads, inv_scale, found_inf, 2.0, False)
        clip = (1.0 / (norm + 1e-6)).clamp(max=1.0)
        torch.ops.effikern.fused_adamw_(params, grads, m, v, step, 1e-3, 0.9, 0.999, 1e-8, 0.01, False,
                                        inv_scale * clip, found_inf)
        return norm

    expected = [p.clone() for p in params]
    em, ev = [t.clone() for t in m], [t.clone() for t in v]
    eager_norm = check_and_step(expected, grads, em, ev, torch.zeros(1), torch.full((1,), 1 / 1024), torch.zeros(1))
    compiled = torch.compile(check_and_step, fullgraph=True, backend="aot_eager")
    norm = compiled(params, grads, m, v, torch.zeros(1), torch.full((1,), 1 / 1024), torch.zeros(1))
    torch.testing.assert_close(norm, eager_norm)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p, e)


def test_eager_entry_points_match_the_op_and_bump_versions():
    """GradScaler and effikern.optim call the ops' eager entry points (no dispatcher): same results as the
    registered op, and the written tensors' version counters move, as for any in-place op."""
    grads = [torch.randn(37), torch.randn(5, 3).to(torch.bfloat16)]
    copies = [g.clone() for g in grads]
    inv, found_a, found_b = torch.full((), 0.5), torch.zeros(()), torch.zeros(())
    versions = [g._version for g in grads]
    norm_a = amp_ops.unscale_check_norm_eager(grads, inv, found_a, 2.0, True)
    norm_b = torch.ops.effikern.unscale_check_norm(copies, inv, found_b, 2.0, True)
    assert torch.equal(norm_a, norm_b) and torch.equal(found_a, found_b)
    assert all(torch.equal(a, b) for a, b in zip(grads, copies))
    assert all(g._version > v for g, v in zip(grads, versions))

    param = torch.nn.Parameter(torch.randn(6))
    param.grad = torch.randn(6)
    opt = effikern.optim.AdamW([param], lr=0.1)
    before = param._version
    opt.step()
    assert param._version > before


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_overflow_of_the_written_back_product_is_found(backend, dtype):
    """A scale below 1 multiplies gradients up: written back, 10000 * 8 is inf in fp16. The
    pass checks what the gradient holds afterwards, so it must report the overflow; it once checked only the
    incoming gradient, and the optimizer then stepped on the inf."""
    device = _setup(backend)
    if backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the Triton interpreter truncates fp32 -> bf16: no finite product rounds up to inf there")
    # fp16: 10000 * 8 = 80000 > 65504. bf16: its max / 2 * 2.005 is finite in fp32 and rounds up to inf in bf16.
    x, factor = (1.0e4, 8.0) if dtype == torch.float16 else (torch.finfo(torch.bfloat16).max / 2, 2.005)
    grads = [torch.tensor([1.0, x], dtype=dtype, device=device), torch.ones(3, dtype=dtype, device=device)]
    inv = torch.full((), factor, device=device)
    # The auto fallback checks through a float32 2-norm, whose squares of bf16 values this large overflow: it counts
    # them as an overflow without write-back too (documented in ops/amp_torch_fused.py).
    huge_norm_counts = backend == FALLBACK and dtype == torch.bfloat16
    with _running_on(backend):
        for write_back, overflows in ((False, huge_norm_counts), (True, True)):
            found = torch.zeros((), device=device)
            g = [t.clone() for t in grads]
            norm = torch.ops.effikern.unscale_check_norm(g, inv, found, 2.0, write_back)
            assert found.item() == float(overflows)
            if write_back:
                assert math.isinf(g[0][1].item()) and norm.item() == INF  # torch's clip_grad_norm_ would say inf


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("bad, norm_is", [(INF, "inf"), (math.nan, "nan")])
def test_a_nonfinite_norm_is_inf_or_nan_as_torch_says(backend, bad, norm_is):
    """torch.linalg.vector_norm gives inf for inf values and nan where one is nan; so must every backend, for both
    norm types (the cpp kernel once said nan for both)."""
    device = _setup(backend)
    grads = _grads([5, 33, 17], [torch.float32], device)
    grads[1][4] = bad
    with _running_on(backend):
        for norm_type in (2.0, INF):
            norm = torch.ops.effikern.unscale_check_norm(grads, torch.full((), 0.25, device=device),
                                                         torch.zeros((), device=device), norm_type, False)
            assert (math.isinf(norm.item()) if norm_is == "inf" else math.isnan(norm.item())), (norm_type, norm)


def test_ten_thousand_tensors_on_cpp():
    """The issue's range is 1 to 10,000+ tensors: one call over 10,500 (sizes 0-6, mixed dtypes, one infinite) on the
    cpp backend against the reference, for the check+norm pass and for both fused optimizers. (The GPU test only
    builds the launch table for that many.)"""
    device = _setup("cpp")
    sizes = [i % 7 for i in range(10_500)]
    grads = _grads(sizes, DTYPES, device)
    inv = torch.full((), 0.25, device=device)
    norms = {}
    for backend in ("torch", "cpp"):
        found = torch.zeros((), device=device)
        work = [g.clone() for g in grads]
        with effikern.set_backend(backend):
            norms[backend] = torch.ops.effikern.unscale_check_norm(work, inv, found, 2.0, True).item()
        assert found.item() == 0.0
        norms[backend, "grads"] = work
    assert norms["cpp"] == pytest.approx(norms["torch"], rel=1e-5)
    for a, b in zip(norms["cpp", "grads"], norms["torch", "grads"]):
        torch.testing.assert_close(a, b, rtol=ULP[a.dtype], atol=0)
    grads[-1].view(-1)[-1] = INF  # the last tensor holds 6 elements (10,499 % 7)
    found = torch.zeros((), device=device)
    with effikern.set_backend("cpp"):
        torch.ops.effikern.unscale_check_norm(grads, inv, found, 0.0, False)
    assert found.item() == 1.0

    results, state = {}, _state_lists(sizes, DTYPES, device)
    for backend in ("torch", "cpp"):
        params, grads2, exp_avgs, exp_avg_sqs = [[t.clone() for t in lst] for lst in state]
        bufs = [b.clone() for b in exp_avgs]
        with effikern.set_backend(backend):
            torch.ops.effikern.fused_adamw_(params, grads2, exp_avgs, exp_avg_sqs, torch.zeros((), device=device),
                                            1e-3, 0.9, 0.999, 1e-8, 0.01, False, None, None)
            sgd_params = [p.clone() for p in params]
            torch.ops.effikern.fused_sgd_(sgd_params, grads2, bufs, torch.zeros((), device=device), 0.05, 0.9, 0.0,
                                          False, 0.0, False, None, None)
        results[backend] = (params, exp_avgs, exp_avg_sqs, sgd_params, bufs)
    for got, want in zip(results["cpp"], results["torch"]):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **_low_precision_tol(a.dtype))


# --- auto's fallback for the update ops: PyTorch's fused kernels (ops/amp_torch_fused.py) -------------------

def _counting(monkeypatch, name):
    """Wraps torch.<name> to count its calls."""
    calls = []
    real = getattr(torch, name)

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, name, counted)
    return calls


def test_auto_fallback_runs_torchs_fused_kernels_and_only_under_auto(monkeypatch):
    """Where auto keeps torch, the updates run on torch._fused_adamw_ / _fused_sgd_, not the reference; with
    set_backend("torch") they run the reference (no call to torch's kernels)."""
    _setup(FALLBACK)
    adamw_calls, sgd_calls = _counting(monkeypatch, "_fused_adamw_"), _counting(monkeypatch, "_fused_sgd_")
    params, grads, ms, vs = _state_lists([5, 70, 1], [torch.float32], "cpu")
    for backend, expected in ((FALLBACK, [3]), ("torch", [])):
        adamw_calls.clear(), sgd_calls.clear()
        with _running_on(backend):
            torch.ops.effikern.fused_adamw_(params, grads, ms, vs, torch.zeros(()), 1e-2, 0.9, 0.99, 1e-8, 0.1,
                                            False, torch.full((), 0.5), torch.zeros(()))
            torch.ops.effikern.fused_sgd_(params, grads, ms, torch.zeros(()), 1e-2, 0.9, 0.0, False, 0.0, False,
                                          None, None)
        assert adamw_calls == expected and sgd_calls == expected


def test_auto_fallback_unscales_without_the_reference(monkeypatch):
    """Under the fallback unscale_check_norm is a foreach multiply and norm; the reference (set_backend("torch"))
    is the one that calls torch's check kernel on float32 copies."""
    _setup(FALLBACK)
    reference_checks = _counting(monkeypatch, "_amp_foreach_non_finite_check_and_unscale_")
    for backend, expected in ((FALLBACK, []), ("torch", [2])):
        reference_checks.clear()
        with _running_on(backend):
            torch.ops.effikern.unscale_check_norm([torch.randn(5), torch.randn(70)], torch.full((), 0.5),
                                                  torch.zeros(()), 2.0, True)
        assert reference_checks == expected


def test_auto_fallback_chunks_the_gradient_copies(monkeypatch):
    """With a grad_factor the fallback copies the gradients (torch's kernels write the unscaled ones back) a chunk
    at a time: a small chunk limit gives several kernel calls and the same result as one."""
    _setup(FALLBACK)
    sizes = [300, 5, 1000, 0, 77]
    lists = _state_lists(sizes, [torch.float32], "cpu")
    one_call = [[t.clone() for t in lst] for lst in lists]
    grads_before = [g.clone() for g in lists[1]]
    args = (1e-2, 0.9, 0.99, 1e-8, 0.1, False, torch.full((), 1 / 64), torch.zeros(()))
    with _running_on(FALLBACK):
        torch.ops.effikern.fused_adamw_(*one_call, torch.zeros(()), *args)
        calls = _counting(monkeypatch, "_fused_adamw_")
        monkeypatch.setattr(amp_torch_fused, "CHUNK_BYTES", 1000 * 4)
        torch.ops.effikern.fused_adamw_(*lists, torch.zeros(()), *args)
    assert calls == [2, 2, 1]  # [300, 5], [1000, 0] (4,000 bytes: at the limit), [77]
    for got, want in zip(lists, one_call):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(lists[1], grads_before))  # the grads are only read


@pytest.mark.parametrize("dampening", [0.0, 0.1])
def test_auto_fallback_sgd_first_step_without_reading_the_count(monkeypatch, dampening):
    """Off the CPU the fallback cannot read ``step == 0`` on the host: it zeroes the (uninitialised: NaN here)
    buffers on the device and runs the later-step formula, exact for dampening 0; dampening != 0 runs the
    reference. Either way the first step sets buf = g."""
    _setup(FALLBACK)
    monkeypatch.setattr(amp_torch_fused, "reads_step_on_host", lambda device: False)
    calls = _counting(monkeypatch, "_fused_sgd_")
    params, grads, _, _ = _state_lists([5, 70, 1], [torch.float32], "cpu")
    bufs = [torch.full_like(p, math.nan) for p in params]
    before = [p.clone() for p in params]
    step = torch.zeros(())
    with _running_on(FALLBACK):
        torch.ops.effikern.fused_sgd_(params, grads, bufs, step, 0.05, 0.9, dampening, False, 0.01, False,
                                      torch.full((), 0.5), None)
    assert step.item() == 1.0
    assert len(calls) == (1 if dampening == 0.0 else 0)
    for p0, g, p, b in zip(before, grads, params, bufs):
        tp, tb = _sgd_truth(p0, g, None, True, 0.05, 0.9, dampening, False, 0.01, False, 0.5)
        torch.testing.assert_close(p.double(), tp, **_low_precision_tol(torch.float32))
        torch.testing.assert_close(b.double(), tb, **_low_precision_tol(torch.float32))


def test_auto_fallback_probes_torchs_cpu_half_sgd():
    """The probe of pytorch/pytorch#191763 answers for each half dtype, and fp16/bf16 SGD under the fallback is
    right whatever it answers (the contract tests above run it: 'mixed')."""
    _setup(FALLBACK)
    for dtype in (torch.float16, torch.bfloat16):
        works = amp_torch_fused.cpu_half_sgd_works(dtype)
        param = torch.zeros(64, dtype=dtype)
        torch._fused_sgd_([param], [torch.ones(64, dtype=dtype)], [], weight_decay=0.0, momentum=0.0, lr=1.0,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
        assert works == bool((param == -1).all())
