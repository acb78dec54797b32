"""effikern.amp.GradScaler against torch.amp.GradScaler on the same training runs, step by step.

Runs: a small MLP, scaled losses, inf or nan injected into a gradient on some steps (forced overflow). With
the same (non-fused) torch optimizer the two scalers must give bit-identical parameters and scale
trajectories; with effikern's fused optimizers (scale folded into the update) the parameters match within fp32
rounding and the scale trajectory and skipped steps are identical.
"""

import functools
import math
import pickle

import pytest
import torch

import effikern
from effikern.amp import GradScaler
from backend_util import skip_unavailable

BACKENDS = ["torch", "cpp"]
OVERFLOW = {3: math.inf, 4: -math.inf, 9: math.nan}  # step -> value injected into a gradient


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _train(scaler, make_opt, steps=14, clip=None, overflow=OVERFLOW, torch_clip=False, seed=0, norm_type=2.0,
           dtype=torch.float32):
    """Returns (scales after each update, skipped-step flags, final params, clip norms)."""
    model = _model(seed).to(dtype)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    scales, skipped, norms = [], [], []
    for i in range(steps):
        x = torch.randn(5, 8, generator=gen).to(dtype)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        scaler.scale(model(x).pow(2).sum()).backward()
        if i in overflow:
            model[2].weight.grad[1, 3] = overflow[i]
        if clip is not None:
            if torch_clip:
                scaler.unscale_(opt)
                norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip, norm_type, foreach=True))
            else:
                norms.append(scaler.unscale_(opt, max_norm=clip, norm_type=norm_type))
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        skipped.append(all(torch.equal(b, p) for b, p in zip(before, model.parameters())))
    return scales, skipped, [p.detach() for p in model.parameters()], norms


def _scalers(**kw):
    kw = dict(init_scale=2.0**12, growth_interval=3, **kw)
    return torch.amp.GradScaler("cpu", **kw), GradScaler("cpu", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_same_optimizer_is_bit_identical(backend, opt):
    skip_unavailable(backend, "cpu")
    make = (lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)) if opt == "sgd" else \
        (lambda p: torch.optim.Adam(p, lr=0.01))
    theirs_scaler, ours_scaler = _scalers()
    theirs = _train(theirs_scaler, make)
    with effikern.set_backend(backend):
        ours = _train(ours_scaler, make)
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1] and sum(ours[1]) == len(OVERFLOW)
    for a, b in zip(ours[2], theirs[2]):
        assert torch.equal(a, b)


FUSED_PAIRS = {
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01), lambda p: effikern.optim.AdamW(p, lr=0.01)),
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
            lambda p: effikern.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "torch_fused_adamw": (lambda p: torch.optim.AdamW(p, lr=0.01),
                          lambda p: torch.optim.AdamW(p, lr=0.01, fused=True)),
    # a tensor lr (what a CUDA graph needs to follow an LR scheduler): the same skips and scale trajectory
    "adamw_tensor_lr": (lambda p: torch.optim.AdamW(p, lr=torch.tensor(0.01)),
                        lambda p: effikern.optim.AdamW(p, lr=torch.tensor(0.01))),
    "sgd_tensor_lr": (lambda p: torch.optim.SGD(p, lr=torch.tensor(0.02), momentum=0.9),
                      lambda p: effikern.optim.SGD(p, lr=torch.tensor(0.02), momentum=0.9)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", sorted(FUSED_PAIRS))
@pytest.mark.parametrize("clip", [None, 0.5, 100.0])
def test_folding_optimizers_match_torch(backend, pair, clip):
    skip_unavailable(backend, "cpu")
    make_torch, make_ours = FUSED_PAIRS[pair]
    theirs_scaler, ours_scaler = _scalers()
    theirs = _train(theirs_scaler, make_torch, clip=clip, torch_clip=True)
    with effikern.set_backend(backend):
        ours = _train(ours_scaler, make_ours, clip=clip)
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1] and sum(ours[1]) == len(OVERFLOW)
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[3], theirs[3]):  # the returned norm is clip_grad_norm_'s total norm
        if math.isfinite(b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
        else:
            assert not math.isfinite(a)


def test_readonly_pass_leaves_grads_and_unscale_writes_them():
    model = _model()
    opt = effikern.optim.AdamW(model.parameters(), lr=0.01)
    scaler = GradScaler("cpu", init_scale=64.0)
    scaler.scale(model(torch.randn(3, 8)).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)  # folds 1/scale into the update: the scaler pass only reads
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    scaler.update()
    opt.zero_grad()
    scaler.scale(model(torch.randn(3, 8)).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = scaler.unscale_(opt, max_norm=math.inf)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g / 64.0)
    truth = torch.linalg.vector_norm(torch.cat([g.flatten() / 64.0 for g in grads]))
    torch.testing.assert_close(norm, truth)


def test_hysteresis_tolerates_consecutive_overflows():
    scaler = GradScaler("cpu", init_scale=1024.0, growth_interval=100, hysteresis=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    p = opt.param_groups[0]["params"][0]
    trajectory = []
    for bad in [True, True, True, False, True, False, True, True]:
        scaler.scale(p.sum()).backward()
        if bad:
            p.grad[0] = math.inf
        scaler.step(opt)
        scaler.update()
        p.grad = None
        trajectory.append(scaler.get_scale())
    # 1st overflow tolerated, 2nd and 3rd (still consecutive) back off; a clean step restores the allowance.
    assert trajectory == [1024.0, 512.0, 256.0, 256.0, 256.0, 256.0, 256.0, 128.0]
    assert scaler.state_dict()["_hysteresis_tracker"] == 0


def test_state_dict_interchange_both_ways():
    theirs, ours = _scalers()
    _train(theirs, lambda p: torch.optim.SGD(p, lr=0.01), steps=5)
    ours.load_state_dict(theirs.state_dict())
    assert ours.get_scale() == theirs.get_scale()
    assert ours._get_growth_tracker() == theirs._get_growth_tracker()
    a = _train(theirs, lambda p: torch.optim.SGD(p, lr=0.01), steps=6, seed=3)
    b = _train(ours, lambda p: torch.optim.SGD(p, lr=0.01), steps=6, seed=3)
    assert a[0] == b[0]
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(ours.state_dict())
    assert back.state_dict() == {k: v for k, v in ours.state_dict().items() if k in back.state_dict()}
    assert set(ours.state_dict()) == set(theirs.state_dict()) | {"hysteresis", "_hysteresis_tracker"}
    clone = pickle.loads(pickle.dumps(ours))
    assert clone.get_scale() == ours.get_scale()


def test_update_new_scale_and_getters():
    scaler = GradScaler("cpu", init_scale=8.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=7)
    got = (scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval())
    assert got == (3.0, 0.25, 7)
    scaler.set_growth_factor(4.0)
    scaler.set_backoff_factor(0.5)
    scaler.set_growth_interval(2)
    assert scaler.state_dict()["growth_factor"] == 4.0 and scaler.is_enabled()
    scaler.scale(torch.ones(()))
    scaler.update(32.0)
    assert scaler.get_scale() == 32.0
    scaler.update(torch.tensor(16.0))
    assert scaler.get_scale() == 16.0


def test_disabled_is_a_passthrough():
    scaler = GradScaler("cpu", enabled=False)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(2, 8)).sum()
    assert scaler.scale(loss) is loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = scaler.unscale_(opt, max_norm=1e9)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 1.0 and scaler.state_dict() == {}


def test_errors():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu")
    with pytest.raises(AssertionError, match="scale"):
        scaler.step(opt)  # no scale() this iteration: as torch
    scaler.scale(model(torch.randn(2, 8)).sum()).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called since the last update"):
        scaler.step(opt)
    scaler.update()
    empty = torch.optim.SGD(model.parameters(), lr=0.1)
    empty.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match="no params"):
        scaler.unscale_(empty)
    for bad in (0.0, -1.0, True, "fro"):
        with pytest.raises(ValueError, match="norm_type must be a number > 0 or math.inf"):
            scaler.unscale_(opt, max_norm=1.0, norm_type=bad)
    with pytest.raises(ValueError, match="hysteresis"):
        GradScaler("cpu", hysteresis=0)
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: 0)


def test_params_without_grads_and_inf_norm_clip():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = effikern.optim.SGD(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=16.0)
    scaler.scale(model(torch.randn(2, 8)).sum()).backward()
    grads = {n: p.grad.clone() / 16 for n, p in model.named_parameters() if p.grad is not None}
    norm = scaler.unscale_(opt, max_norm=1e-3, norm_type=math.inf)
    truth = max(g.abs().max() for g in grads.values())
    torch.testing.assert_close(norm, truth)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(opt)
    coef = 1e-3 / (truth + 1e-6)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p, before[n] - 0.1 * grads[n] * coef)
        else:
            assert torch.equal(p, before[n])


@pytest.mark.gpu
@pytest.mark.parametrize("make_opt", [lambda p: effikern.optim.AdamW(p, lr=1e-3),
                                      lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
                                      lambda p: effikern.optim.SGD(p, lr=1e-3, momentum=0.9),
                                      # a tensor lr is read by the kernels, never on the host
                                      lambda p: effikern.optim.AdamW(p, lr=torch.tensor(1e-3, device="cuda")),
                                      lambda p: effikern.optim.SGD(p, lr=torch.tensor(1e-3, device="cuda"),
                                                                   momentum=0.9)],
                         ids=["effikern_adamw", "torch_fused_adamw", "effikern_sgd", "effikern_adamw_tensor_lr",
                              "effikern_sgd_tensor_lr"])
def test_no_host_sync_per_step(make_opt):
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model = model.cuda().half()
    opt = make_opt(model.parameters())
    scaler = GradScaler("cuda", init_scale=2.0**10)
    x = torch.randn(16, 64, device="cuda", dtype=torch.half)
    for i in range(4):  # step 0 allocates state; syncs are counted from step 1 on
        opt.zero_grad(set_to_none=False)
        loss = model(x).float().pow(2).mean()
        if i > 0:
            torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.scale(loss).backward()
            if i == 2:
                model[2].weight.grad[0, 0] = math.inf
            scaler.unscale_(opt, max_norm=1.0)
            scaler.step(opt)
            scaler.update()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert scaler.get_scale() == 2.0**9


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_scaled_step():
    model = torch.nn.Linear(32, 32).cuda()
    opt = effikern.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = GradScaler("cuda", init_scale=2.0**8)
    x = torch.randn(8, 32, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up on a side stream, as torch's graph docs ask
            opt.zero_grad(set_to_none=False)
            scaler.scale(model(x).pow(2).mean()).backward()
            scaler.step(opt)
            scaler.update()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
    before = model.weight.detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(before, model.weight)
    assert torch.isfinite(model.weight).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_with_a_plain_optimizer_matches_torch(backend):
    skip_unavailable(backend, "cpu")
    make = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
    theirs_scaler, ours_scaler = _scalers()
    theirs = _train(theirs_scaler, make, clip=0.5, torch_clip=True)
    with effikern.set_backend(backend):
        ours = _train(ours_scaler, make, clip=0.5)
    assert ours[0] == theirs[0] and ours[1] == theirs[1]
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_clip_with_a_folding_optimizer_only_reads_the_grads():
    model = _model()
    opt = effikern.optim.AdamW(model.parameters(), lr=0.01)
    scaler = GradScaler("cpu", init_scale=64.0)
    scaler.scale(model(torch.randn(3, 8)).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.unscale_(opt, max_norm=0.1)
    scaler.step(opt)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_host_reads_per_step():
    """Counted on CPU as calls that read a tensor's value on the host (each is a sync on a GPU)."""
    from effikern.benchmarks import bench_amp

    rows = {r["plan"]: r for r in bench_amp.report(quick=True)}
    assert rows["effikern GradScaler.unscale_(max_norm) + effikern AdamW"]["host_syncs_per_step"] == 0
    assert rows["effikern GradScaler.unscale_(max_norm) + torch AdamW(fused)"]["host_syncs_per_step"] == 0
    # the scaler's found_inf read, plus torch's non-capturable AdamW reading each CPU step count
    assert rows["effikern GradScaler.unscale_(max_norm) + torch AdamW(foreach)"]["host_syncs_per_step"] >= 1


def test_sharded_scale_keeps_the_loss_dtype():
    scaler = effikern.amp.ShardedGradScaler("cpu", init_scale=4.0)
    loss = torch.ones((), dtype=torch.float16)
    assert scaler.scale(loss).dtype == torch.float16 and scaler.scale(loss).item() == 4.0
    assert [t.dtype for t in scaler.scale([loss, loss.float()])] == [torch.float16, torch.float32]


@pytest.mark.parametrize("pair", sorted(FUSED_PAIRS))
def test_overflow_on_two_devices_skips_the_step(monkeypatch, pair):
    # found_inf is summed over the grads' devices; torch's fused kernels skip only when it is exactly 1.0, so
    # an overflow on two devices (2.0) made torch's fused AdamW apply the inf/nan grads. "Two devices" on CPU:
    # the grads split under two device keys (cpu and cpu:0), an overflow in each.
    real = effikern.amp.grad_scaler._grads_by_device

    def two_devices(optimizer, **kwargs):
        (grads,) = real(optimizer, **kwargs).values()
        return {torch.device("cpu"): grads[:2], torch.device("cpu", 0): grads[2:]}

    monkeypatch.setattr(effikern.amp.grad_scaler, "_grads_by_device", two_devices)
    model = _model()
    opt = FUSED_PAIRS[pair][1](model.parameters())
    scaler = GradScaler("cpu", init_scale=64.0)
    scaler.scale(model(torch.randn(3, 8)).sum()).backward()
    model[0].weight.grad[0, 0] = math.inf  # in grads[:2]
    model[2].weight.grad[1, 3] = math.nan  # in grads[2:]
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)
    assert scaler.get_scale() == 32.0


def test_sparse_grads_are_coalesced_for_the_norm():
    """Duplicate indices of an uncoalesced sparse grad are one entry of the gradient: the clip norm must count their
    sum, not each part (it said 3.0 for a grad whose norm is sqrt(15))."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    scaler = GradScaler("cpu", init_scale=4.0)
    scaler.scale(emb(torch.tensor([1, 2, 2])).sum()).backward()
    norm = scaler.unscale_(opt, max_norm=100.0)
    assert norm.item() == pytest.approx(math.sqrt(15.0))


def test_growth_follows_torch_with_hysteresis():
    """With hysteresis > 1 the scale update is effikern's own: it must grow exactly when torch's does (once the
    tracker reaches growth_interval, never with an interval of 0)."""
    for interval in (0, 1, 3):
        theirs, ours = (torch.amp.GradScaler("cpu", init_scale=64.0, growth_interval=interval),
                        GradScaler("cpu", init_scale=64.0, growth_interval=interval, hysteresis=2))
        for scaler in (theirs, ours):
            p = torch.nn.Parameter(torch.ones(2))
            opt = torch.optim.SGD([p], lr=0.1)
            scales = []
            for _ in range(4):
                opt.zero_grad()
                scaler.scale(p.sum()).backward()
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
            scaler.scales = scales
        assert ours.scales == theirs.scales, interval


def test_a_step_without_any_gradient_is_an_error_as_in_torch():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = GradScaler("cpu")
    scaler.scale(torch.tensor(1.0))
    with pytest.raises(AssertionError, match="No inf checks were recorded for this optimizer"):
        scaler.step(opt)


# The fallback on torch's kernels (float64 grads, norm types other than 2 and inf) against torch's GradScaler +
# clip_grad_norm_ on the same overflowing runs: a plain optimizer sees the same ops in the same order as torch's, so
# bit-identical parameters and norms; a folding one within rounding, with the same skipped steps and scales.
FALLBACK_CASES = {
    "fp32_p1": (torch.float32, 1.0), "fp32_p3": (torch.float32, 3.0),
    "fp64_p2": (torch.float64, 2.0), "fp64_pinf": (torch.float64, math.inf), "fp64_p1": (torch.float64, 1.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(FALLBACK_CASES))
def test_fallback_matches_torch_with_a_plain_optimizer(backend, case):
    skip_unavailable(backend, "cpu")
    dtype, norm_type = FALLBACK_CASES[case]
    make = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
    theirs_scaler, ours_scaler = _scalers()
    theirs = _train(theirs_scaler, make, clip=0.5, torch_clip=True, norm_type=norm_type, dtype=dtype)
    with effikern.set_backend(backend):
        ours = _train(ours_scaler, make, clip=0.5, norm_type=norm_type, dtype=dtype)
    assert ours[0] == theirs[0] and ours[1] == theirs[1] and sum(ours[1]) == len(OVERFLOW)
    for a, b in zip(ours[2], theirs[2]):
        assert a.dtype == dtype and torch.equal(a, b)
    for a, b in zip(ours[3], theirs[3]):
        assert a.dtype == b.dtype and torch.equal(a, b) or (not torch.isfinite(a) and not torch.isfinite(b))


@pytest.mark.parametrize("case", sorted(FALLBACK_CASES))
def test_fallback_matches_torch_with_a_folding_optimizer(case):
    dtype, norm_type = FALLBACK_CASES[case]
    # effikern's optimizers take float32/float16/bfloat16 params only; torch's fused AdamW takes float64 too.
    make_ours = effikern.optim.AdamW if dtype == torch.float32 else functools.partial(torch.optim.AdamW, fused=True)
    theirs_scaler, ours_scaler = _scalers()
    theirs = _train(theirs_scaler, lambda p: torch.optim.AdamW(p, lr=0.01), clip=0.5, torch_clip=True,
                    norm_type=norm_type, dtype=dtype)
    ours = _train(ours_scaler, lambda p: make_ours(p, lr=0.01), clip=0.5, norm_type=norm_type, dtype=dtype)
    assert ours[0] == theirs[0] and ours[1] == theirs[1] and sum(ours[1]) == len(OVERFLOW)
    # float64: torch's fused and foreach AdamW agree to ~1e-15, so this also sees a clip coefficient rounded to
    # float32 on its way into the step (float64 clips stay in place, in float64)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-15}
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(ours[3], theirs[3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)


def test_float64_gradients_without_a_clip_are_unscaled_as_torch():
    """step() alone (no unscale_) and unscale_() without max_norm: float64 grads are unscaled in place and checked
    by torch's kernel, the same skipped steps and parameters as torch's scaler."""
    make = lambda p: torch.optim.SGD(p, lr=0.05)  # noqa: E731
    for clip in (None, math.inf):
        theirs_scaler, ours_scaler = _scalers()
        # torch: unscale_, then clip_grad_norm_(max_norm=inf), a multiply by 1 where the norm is finite
        theirs = _train(theirs_scaler, make, clip=clip, torch_clip=True, dtype=torch.float64)
        ours = _train(ours_scaler, make, clip=clip, dtype=torch.float64)
        assert ours[0] == theirs[0] and ours[1] == theirs[1] and sum(ours[1]) == len(OVERFLOW)
        for a, b in zip(ours[2], theirs[2]):
            assert torch.equal(a, b)
        for a, b in zip(ours[3], theirs[3]):  # the norm (max_norm=inf) of the unscaled float64 grads
            assert a.dtype == torch.float64 and (torch.equal(a, b) or not torch.isfinite(b))


def test_mixed_float32_and_float64_grads_take_the_fallback_together():
    """One optimizer with float32 and float64 params: the whole set is unscaled (each by its kernel), then measured
    in float64, and clipped by that norm."""
    ours_params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))]
    grads = [torch.tensor([3.0, 0.0, 4.0]) * 8, torch.tensor([0.0, 12.0, 0.0, 0.0], dtype=torch.float64) * 8]
    for p, g in zip(ours_params, grads):
        p.grad = g.clone()
    opt = torch.optim.SGD(ours_params, lr=1.0)
    scaler = GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    norm = scaler.unscale_(opt, max_norm=6.5)
    assert norm.dtype == torch.float64 and norm.item() == 13.0
    scaler.step(opt)
    coef = 6.5 / (13.0 + 1e-6)
    torch.testing.assert_close(ours_params[0].detach(), -torch.tensor([3.0, 0.0, 4.0]) * coef)
    want = -torch.tensor([0.0, 12.0, 0.0, 0.0], dtype=torch.float64) * coef
    torch.testing.assert_close(ours_params[1].detach(), want)


def test_complex_gradients_are_refused_clearly():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = GradScaler("cpu")
    scaler.scale(torch.ones(()))
    p.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(TypeError, match="gradient of param 0 .* must be a floating-point tensor, got torch.complex64"):
        scaler.step(opt)


# A disabled scaler (bf16 autocast needs no loss scaling) still clips in unscale_(max_norm): clip_grad_norm_'s
# result on the read-only pass, folded into a folding optimizer's step; never a skipped step, so an inf gradient
# (the last step) gives clip_grad_norm_'s coefficient 0 and nan where the grad was inf, as torch.
DISABLED_PAIRS = {
    "effikern_adamw": (lambda p: torch.optim.AdamW(p, lr=0.01), lambda p: effikern.optim.AdamW(p, lr=0.01)),
    "torch_fused_adamw": (lambda p: torch.optim.AdamW(p, lr=0.01), lambda p: torch.optim.AdamW(p, lr=0.01, fused=True)),
    "sgd": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
}


def _clipped_run(make_opt, dtype, scaler=None, norm_type=2.0, steps=4):
    """``steps`` steps clipped to 0.3, an inf in a grad at the last: by ``scaler.unscale_(max_norm)`` or, without
    a scaler, by clip_grad_norm_. Returns (params, norms, whether each unscale_ left the grads as they were)."""
    model = _model().to(dtype)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    norms, untouched = [], []
    for i in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 8, generator=gen).to(dtype)).float().pow(2).sum().backward()
        if i == steps - 1:
            model[2].weight.grad[1, 3] = math.inf
        if scaler is None:
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3, norm_type, foreach=True))
            opt.step()
            continue
        grads = [p.grad.clone() for p in model.parameters()]
        norms.append(scaler.unscale_(opt, max_norm=0.3, norm_type=norm_type))
        untouched.append(all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters())))
        scaler.step(opt)
        scaler.update()
    return [p.detach() for p in model.parameters()], norms, untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pair", sorted(DISABLED_PAIRS))
def test_disabled_scaler_clips_as_clip_grad_norm(pair, dtype):
    make_torch, make_ours = DISABLED_PAIRS[pair]
    theirs = _clipped_run(make_torch, dtype)
    ours = _clipped_run(make_ours, dtype, GradScaler("cpu", enabled=False))
    # fp32: rounding apart (the clip folded into the update skips one rounding of the clipped grad). bf16: torch
    # measures each bf16 grad's norm in bf16 (ours in fp32: norms 0.1% apart), so params may round to the
    # neighbouring bf16 value: 1 ulp, 2^-9 below 0.5 (atol), relative above.
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 2e-3}
    for a, b in zip(ours[0], theirs[0]):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
    assert torch.isnan(ours[0][2][1, 3]) and torch.isfinite(ours[0][0]).all()  # stepped with coefficient 0
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b.float(), **tol)
    # Folding optimizers take the clip in their step (grads left as they were); others get it in place.
    assert ours[2] == [pair != "sgd"] * 4


def test_disabled_scaler_fallback_and_norm_only():
    """float64 grads / p = 3 on a disabled scaler: clip_grad_norm_'s results; max_norm=inf measures only."""
    make = DISABLED_PAIRS["sgd"][0]
    for dtype, norm_type in ((torch.float64, 2.0), (torch.float32, 3.0)):
        theirs = _clipped_run(make, dtype, norm_type=norm_type)
        ours = _clipped_run(make, dtype, GradScaler("cpu", enabled=False), norm_type=norm_type)
        for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
            torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-6, atol=1e-7)
    model = _model()
    model(torch.randn(2, 8)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt = effikern.optim.AdamW(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", enabled=False)
    norm = scaler.unscale_(opt, max_norm=math.inf)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
    assert scaler._disabled_factors == {}  # nothing owed to the step


def test_disabled_scaler_owes_the_clip_to_one_step_only():
    model = _model()
    opt = effikern.optim.AdamW(model.parameters(), lr=0.1)
    scaler = GradScaler("cpu", enabled=False)
    model(torch.randn(2, 8)).pow(2).sum().backward()
    scaler.unscale_(opt, max_norm=1e-3)
    with pytest.raises(RuntimeError, match=r"unscale_\(max_norm=...\) has already been called"):
        scaler.unscale_(opt, max_norm=1e-3)
    scaler.update()  # drops the clip nobody stepped with: the next step is unclipped
    truth = torch.optim.AdamW(_model().parameters(), lr=0.1)
    ref = truth.param_groups[0]["params"]
    for p, q in zip(ref, model.parameters()):
        p.grad = q.grad.clone()
    scaler.step(opt)
    truth.step()
    for p, q in zip(ref, model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    # With a closure (it may recompute the grads inside step) the clip goes into the grads before the step.
    scaler.unscale_(opt, max_norm=1e-3)
    clone = pickle.loads(pickle.dumps(scaler))
    assert clone._disabled_factors == {} and not clone.is_enabled()
    clipped = [p.grad * (1e-3 / (torch.linalg.vector_norm(torch.cat([g.grad.flatten() for g in ref])) + 1e-6))
               for p in ref]
    assert scaler.step(opt, lambda: 7.0) == 7.0
    for g, p in zip(clipped, model.parameters()):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("clip", [False, True], ids=["step", "unscale_clip_step"])
def test_training_step_compiles_with_the_scaler(clip):
    """A whole training step under torch.compile (scale, backward, [unscale_ + clip,] step, update), as torch's
    own GradScaler allows: the same parameters and scale as the same steps run eagerly, including a skipped step
    (an inf in the loss) that backs the scale off. (Dynamo once dropped the per-optimizer state that step() made,
    and update() raised 'No inf checks were recorded'.)"""

    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
        opt = effikern.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = GradScaler("cpu", init_scale=2.0**10)
        x = torch.randn(8, 16)

        def train_step(poison):
            opt.zero_grad()
            scaler.scale(model(x).pow(2).mean() * poison).backward()
            if clip:
                scaler.unscale_(opt, max_norm=0.5)
            scaler.step(opt)
            scaler.update()

        step = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        for poison in (1.0, float("inf"), 1.0):
            step(torch.tensor(poison))
        return [p.detach().clone() for p in model.parameters()], scaler.get_scale()

    eager_params, eager_scale = run(compiled=False)
    compiled_params, compiled_scale = run(compiled=True)
    assert eager_scale == compiled_scale == 2.0**9  # the inf step backed off once
    for a, b in zip(eager_params, compiled_params):
        torch.testing.assert_close(a, b)
