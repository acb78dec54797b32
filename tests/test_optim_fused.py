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
