"""effikern.optim.AdamW / SGD against torch.optim.AdamW / SGD: same trajectories, state_dict interchange."""

import copy
import inspect

import pytest
import torch

import effikern
from backend_util import device_for, skip_unavailable

BACKENDS = [pytest.param("torch"), pytest.param("cpp"), pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.gpu)]


def _params(device, sizes=((7, 5), (5,), (1,), (0,), (3, 11))):
    return [torch.randn(*s, device=device) for s in sizes]


def _run(opt_cls, kwargs, init, device, steps=4, missing_grad_at=2, backend="torch"):
    """A few steps on fixed random grads; param 0 has no gradient at step ``missing_grad_at`` (its step count
    must then lag behind, as torch's)."""
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = opt_cls(params, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with effikern.set_backend(backend):
        for i in range(steps):
            for j, p in enumerate(params):
                p.grad = None if (i == missing_grad_at and j == 0) else \
                    torch.randn(p.shape, generator=gen).to(device)
            opt.step()
    return params, opt


ADAMW_CONFIGS = [dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
                 dict(lr=1e-2, weight_decay=0.0, maximize=True), dict(lr=1e-2, betas=(0.3, 0.9))]
SGD_CONFIGS = [dict(lr=0.1), dict(lr=0.05, momentum=0.9),
               dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1),
               dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True, weight_decay=0.01)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", ADAMW_CONFIGS)
def test_adamw_matches_torch(backend, kwargs):
    device = device_for(backend)
    skip_unavailable(backend, device)
    init = _params(device)
    ours, opt = _run(effikern.optim.AdamW, kwargs, init, device, backend=backend)
    theirs, topt = _run(torch.optim.AdamW, kwargs, init, device)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        if opt.state[a]:
            assert float(opt.state[a]["step"]) == float(topt.state[b]["step"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", SGD_CONFIGS)
def test_sgd_matches_torch(backend, kwargs):
    device = device_for(backend)
    skip_unavailable(backend, device)
    init = _params(device)
    ours, _ = _run(effikern.optim.SGD, kwargs, init, device, backend=backend)
    theirs, _ = _run(torch.optim.SGD, kwargs, init, device)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_steps_are_shared_device_tensors_and_split_when_a_grad_is_missing():
    params, opt = _run(effikern.optim.AdamW, dict(lr=1e-2), _params("cpu"), "cpu", steps=2, missing_grad_at=5)
    steps = [opt.state[p]["step"] for p in params]
    assert all(s is steps[0] for s in steps) and float(steps[0]) == 2.0
    params[0].grad = None
    for p in params[1:]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 2.0 and float(opt.state[params[1]]["step"]) == 3.0


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", [
    (effikern.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (effikern.optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
])
def test_state_dict_interchange_both_ways(ours_cls, torch_cls, kwargs):
    init = _params("cpu")
    # ours -> torch: continue two more steps in torch, compare with ours continuing.
    ours, opt = _run(ours_cls, kwargs, init, "cpu", steps=3)
    # deepcopy: what a checkpoint does (load_state_dict keeps references to same-device tensors, torch's too).
    sd = copy.deepcopy(opt.state_dict())
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    topt = torch_cls(twin, **kwargs)
    topt.load_state_dict(sd)
    theirs, topt2 = _run(torch_cls, kwargs, init, "cpu", steps=3)
    ours2 = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt2 = ours_cls(ours2, **kwargs)
    opt2.load_state_dict(copy.deepcopy(topt2.state_dict()))  # torch -> ours
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for group, o in ((ours, opt), (twin, topt), (theirs, topt2), (ours2, opt2)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            o.step()
    for a, b, c, d in zip(ours, twin, theirs, ours2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# --- a tensor lr: read on the device at each step, so an LR scheduler reaches a captured CUDA graph ---------------

TENSOR_LR_PAIRS = [(effikern.optim.AdamW, torch.optim.AdamW, dict(weight_decay=0.1)),
                   (effikern.optim.SGD, torch.optim.SGD, dict(momentum=0.9, dampening=0.2, weight_decay=0.01))]
SCHEDULERS = {"step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3),
              "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i) ** 2)}


def _run_scheduled(opt_cls, kwargs, init, device, lr, scheduler="step", steps=6, backend="torch"):
    """_run's steps with an LR scheduler stepped after each; returns (params, optimizer, scheduler)."""
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = opt_cls(params, lr=lr, **kwargs)
    sched = SCHEDULERS[scheduler](opt)
    gen = torch.Generator().manual_seed(1)
    with effikern.set_backend(backend):
        for i in range(steps):
            for j, p in enumerate(params):
                p.grad = None if (i == 2 and j == 0) else torch.randn(p.shape, generator=gen).to(device)
            opt.step()
            sched.step()
    return params, opt, sched


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", TENSOR_LR_PAIRS, ids=["adamw", "sgd"])
@pytest.mark.parametrize("scheduler,lr_shape", [("step", ()), ("lambda", (1,))])
def test_tensor_lr_with_a_scheduler_matches_torch(backend, ours_cls, torch_cls, kwargs, scheduler, lr_shape):
    # torch.optim with a tensor lr and the same scheduler: the scheduler fill_s the group's tensor in place (it
    # stays the tensor passed in) and every step must use the value it wrote.
    device = device_for(backend)
    skip_unavailable(backend, device)
    init = _params(device)
    lr = torch.full(lr_shape, 0.05, device=device)
    ours, opt, _ = _run_scheduled(ours_cls, kwargs, init, device, lr, scheduler, backend=backend)
    # fused=True: torch's implementation for a tensor lr on any device (its foreach AdamW refuses one on CUDA)
    theirs, topt, _ = _run_scheduled(torch_cls, {**kwargs, "fused": True}, init, device,
                                     torch.full(lr_shape, 0.05, device=device), scheduler)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == float(topt.param_groups[0]["lr"]) != 0.05
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", TENSOR_LR_PAIRS, ids=["adamw", "sgd"])
def test_tensor_lr_is_read_by_the_kernels_never_on_the_host(backend, ours_cls, torch_cls, kwargs, monkeypatch):
    # On a GPU a host read of the lr (float(lr), lr.item()) is a sync, and in a captured CUDA graph a frozen value:
    # the tensor must go to the kernels as it is. Here every host-read method of that one tensor raises, and the
    # value written into it in place between steps must still be what each step uses (against a float lr set
    # to the same values).
    skip_unavailable(backend, "cpu")
    init = _params("cpu")
    lr = torch.tensor(0.05)
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt, topt = ours_cls(ours, lr=lr, **kwargs), torch_cls(theirs, lr=0.05, **kwargs)
    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__", "__format__"):
        original = getattr(torch.Tensor, name)

        def guarded(self, *args, _name=name, _original=original, **kw):
            if self is lr:  # not an assert: pytest's explanation would print lr, through these very methods
                raise AssertionError(f"the tensor lr was read on the host ({_name})")
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, guarded)
    gen = torch.Generator().manual_seed(2)
    with effikern.set_backend(backend):
        for value in (0.05, 0.01, 0.2, 0.0):
            lr.fill_(value)
            topt.param_groups[0]["lr"] = value
            for a, b in zip(ours, theirs):
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
            opt.step()
            topt.step()
    monkeypatch.undo()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", TENSOR_LR_PAIRS, ids=["adamw", "sgd"])
def test_tensor_lr_state_dict_round_trips_like_torch(ours_cls, torch_cls, kwargs):
    # torch keeps a tensor lr in state_dict as a tensor, and load_state_dict gives the group a copy of it (the
    # loaded groups are deep-copied): ours does the same, both ways, and training continues identically.
    init = _params("cpu")
    ours, opt, _ = _run_scheduled(ours_cls, kwargs, init, "cpu", torch.tensor(0.1), steps=3)
    theirs, topt, _ = _run_scheduled(torch_cls, kwargs, init, "cpu", torch.tensor(0.1), steps=3)
    saved = {"ours": copy.deepcopy(opt.state_dict()), "torch": copy.deepcopy(topt.state_dict())}
    for sd in saved.values():
        for key in ("lr", "initial_lr"):  # initial_lr: the scheduler's
            assert isinstance(sd["param_groups"][0][key], torch.Tensor)
        assert float(sd["param_groups"][0]["lr"]) == float(torch.tensor(0.1) * 0.3)
    runs = [(ours, opt), (theirs, topt)]
    for cls, source, params in ((torch_cls, "ours", ours), (ours_cls, "torch", theirs), (ours_cls, "ours", ours)):
        twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
        loaded = cls(twin, lr=torch.tensor(1.0), **kwargs)
        sd = copy.deepcopy(saved[source])  # load_state_dict keeps references to the state's tensors (torch's too)
        loaded.load_state_dict(sd)
        lr = loaded.param_groups[0]["lr"]
        assert isinstance(lr, torch.Tensor) and lr is not sd["param_groups"][0]["lr"]
        assert float(lr) == float(sd["param_groups"][0]["lr"])
        runs.append((twin, loaded))
    gen = torch.Generator().manual_seed(7)
    for value in (0.02, 0.005):  # what a scheduler would write into each group's tensor
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for params, o in runs:
            o.param_groups[0]["lr"].fill_(value)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    for group in zip(*(params for params, _ in runs)):
        for other in group[1:]:
            torch.testing.assert_close(other, group[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours_cls", [effikern.optim.AdamW, effikern.optim.SGD])
def test_a_tensor_lr_the_kernels_cannot_take_is_refused(ours_cls):
    p = [torch.nn.Parameter(torch.randn(3))]
    for bad, match in ((torch.tensor([0.1, 0.2]), "1 element, got dtype float32 and shape \\(2,\\)"),
                       (torch.tensor(0.1, dtype=torch.float16), "float32 or float64 tensor with 1 element"),
                       (torch.tensor(1), "float32 or float64 tensor with 1 element, got dtype int64"),
                       (torch.tensor(-0.1), "lr must be a float >= 0 or a 1-element")):
        with pytest.raises(ValueError, match=match):
            ours_cls(p, lr=bad)
    opt = ours_cls(p, lr=torch.tensor([0.1], dtype=torch.float64))  # shape [1] and float64 are fine
    with pytest.raises(ValueError, match="1 element"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": torch.ones(2)})
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = torch.tensor(0.1, dtype=torch.float16)
    with pytest.raises(ValueError, match="in a loaded param group"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"].dtype == torch.float64  # refused before anything was loaded


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", TENSOR_LR_PAIRS, ids=["adamw", "sgd"])
def test_captured_step_follows_the_scheduler_on_gpu(backend, ours_cls, torch_cls, kwargs):
    # The case: opt.step() captured once in a CUDA graph and replayed every iteration while an LR
    # scheduler changes the tensor lr, against torch's fused optimizer run eagerly with the same scheduler.
    skip_unavailable(backend, "cuda")
    init = _params("cuda", sizes=((7, 5), (5,), (1,), (3, 11), (4097,)))
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = ours_cls(ours, lr=torch.tensor(0.05, device="cuda"), **kwargs)
    topt = torch_cls(theirs, lr=torch.tensor(0.05, device="cuda"), fused=True, **kwargs)
    sched, tsched = SCHEDULERS["step"](opt), SCHEDULERS["step"](topt)
    static_grads = [torch.zeros_like(p) for p in ours]  # what the graph reads: refilled before each replay
    for p, g in zip(ours, static_grads):
        p.grad = g
    gen = torch.Generator(device="cuda").manual_seed(3)

    def next_grads():
        grads = [torch.randn(p.shape, device="cuda", generator=gen) for p in ours]
        for g, new, p in zip(static_grads, grads, theirs):
            g.copy_(new)
            p.grad = new.clone()

    with effikern.set_backend(backend):
        # Warm-up (the first step allocates the state; the kernels compile), on a side stream as capture asks.
        next_grads()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.step()
        torch.cuda.current_stream().wait_stream(side)
        topt.step()
        sched.step()
        tsched.step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
        for _ in range(5):
            next_grads()
            graph.replay()
            topt.step()
            sched.step()
            tsched.step()
    torch.cuda.synchronize()
    assert float(opt.param_groups[0]["lr"]) == float(topt.param_groups[0]["lr"]) < 0.05 * 0.3
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="betas"):
        effikern.optim.AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        effikern.optim.SGD(p, lr=0.1, nesterov=True)
    opt = effikern.optim.SGD(p, lr=0.1)
    p[0].grad = torch.randn(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()



PAIRS = [(effikern.optim.AdamW, torch.optim.AdamW, dict(lr=0.05)),
         (effikern.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9))]


def _torch_flags(torch_cls):
    """torch's constructor flags (amsgrad and the keyword-only ones) with their default values."""
    args = inspect.signature(torch_cls.__init__).parameters.values()
    return {a.name: a.default for a in args if a.kind is a.KEYWORD_ONLY or a.name == "amsgrad"}


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", PAIRS)
def test_every_torch_flag_is_accepted_at_its_default(ours_cls, torch_cls, kwargs):
    # Drop-in: configs written for torch spell out its defaults (amsgrad=False, foreach=None, ...).
    flags = _torch_flags(torch_cls)
    assert {"maximize", "foreach", "differentiable", "fused"} <= set(flags)
    init = _params("cpu")
    ours, _ = _run(ours_cls, {**kwargs, **flags}, init, "cpu")
    theirs, _ = _run(torch_cls, kwargs, init, "cpu")
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


IMPLEMENTATION_FLAGS = [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)]


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs,flags",
                         [(*pair, f) for pair in PAIRS for f in IMPLEMENTATION_FLAGS]
                         + [(*PAIRS[0], dict(capturable=True))])  # torch's SGD has no capturable
def test_implementation_flags_are_accepted(ours_cls, torch_cls, kwargs, flags):
    # foreach / fused / capturable choose torch's implementation, not its math; effikern's one implementation
    # is multi-tensor, fused and capturable (device step counters): it takes them all, with torch's results.
    init = _params("cpu")
    ours, opt = _run(ours_cls, {**kwargs, **flags}, init, "cpu")
    theirs, _ = _run(torch_cls, kwargs, init, "cpu")
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Not kept in the group: torch, loading our state_dict, would read capturable=True and refuse CPU params.
    assert not set(flags) & set(opt.param_groups[0])


@pytest.mark.parametrize("ours_cls,flag", [(effikern.optim.AdamW, "amsgrad"),
                                           (effikern.optim.AdamW, "differentiable"),
                                           (effikern.optim.SGD, "differentiable")])
def test_unsupported_torch_flags_are_refused(ours_cls, flag):
    # amsgrad=True would run as plain AdamW and differentiable=True without autograd: refuse, never ignore.
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=f"{flag}=True"):
        ours_cls(p, lr=0.1, **{flag: True})
    with pytest.raises(ValueError, match=f"{flag}=True"):
        ours_cls([{"params": p, flag: True}], lr=0.1)
    opt = ours_cls(p, lr=0.1)
    with pytest.raises(ValueError, match=f"{flag}=True"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], flag: True})
    assert len(opt.param_groups) == 1


def test_an_amsgrad_state_dict_is_refused_at_load():
    # A torch AdamW(amsgrad=True) checkpoint used to load and then continue as plain AdamW.
    init = _params("cpu")
    theirs, topt = _run(torch.optim.AdamW, dict(lr=1e-2, amsgrad=True), init, "cpu", steps=2)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt = effikern.optim.AdamW(ours, lr=1e-2)
    with pytest.raises(ValueError, match="amsgrad=True"):
        opt.load_state_dict(copy.deepcopy(topt.state_dict()))
    assert not opt.state and opt.param_groups[0]["lr"] == 1e-2  # refused before anything was loaded


@pytest.mark.parametrize("how", ["switched_on", "loaded"])
def test_sgd_momentum_enabled_later_starts_from_the_gradient(how):
    # torch's first momentum update of a param sets buf = g, however many steps came before; a zero buffer
    # gave buf = (1 - dampening) * g. "loaded": our state_dict from momentum-free steps (a count, no buffer).
    init = _params("cpu")
    kwargs = dict(lr=0.05, dampening=0.3, weight_decay=0.01)
    ours, opt = _run(effikern.optim.SGD, kwargs, init, "cpu", steps=3)
    theirs, topt = _run(torch.optim.SGD, kwargs, init, "cpu", steps=3)
    if how == "loaded":
        sd = copy.deepcopy(opt.state_dict())
        ours = [torch.nn.Parameter(p.detach().clone()) for p in ours]
        opt = effikern.optim.SGD(ours, **kwargs)
        opt.load_state_dict(sd)
    for o in (opt, topt):
        o.param_groups[0]["momentum"] = 0.9
    gen = torch.Generator().manual_seed(5)
    for i in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for group, o in ((ours, opt), (theirs, topt)):
            for j, (p, g) in enumerate(zip(group, grads)):
                # param 0 has no grad at the first momentum step: its first momentum update comes later
                p.grad = None if (i == 0 and j == 0) else g.clone()
            o.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sgd_state_after_a_skipped_first_step_loads_into_torch():
    """A first step skipped on the device (found_inf) leaves a zero momentum buffer with a step count of 0: torch's
    SGD, which skips on the host and allocates nothing, would read that buffer as started (buf = 0.9 * 0 + 0.5 * g,
    not buf = g). The state_dict leaves such buffers out."""
    p = torch.nn.Parameter(torch.randn(4))
    ours = effikern.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    p.grad = torch.ones(4)
    ours.found_inf = torch.tensor(1.0)
    ours.step()
    del ours.found_inf
    start = p.detach().clone()
    theirs = torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.5)
    theirs.load_state_dict(ours.state_dict())
    theirs.step()
    fresh = torch.nn.Parameter(start.clone())
    fresh.grad = torch.ones(4)
    torch.optim.SGD([fresh], lr=0.1, momentum=0.9, dampening=0.5).step()
    torch.testing.assert_close(p.detach(), fresh.detach(), rtol=0, atol=0)
    assert "momentum_buffer" in ours.state[p]  # the optimizer's own state is untouched


@pytest.mark.parametrize("ours_cls", [effikern.optim.AdamW, effikern.optim.SGD])
def test_an_unsupported_dtype_is_refused_before_any_update(ours_cls):
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = ours_cls([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match="param 0 of param group 1 has dtype torch.float64"):
        opt.step()
    assert torch.equal(a.detach(), torch.ones(2)) and len(opt.state) == 0
