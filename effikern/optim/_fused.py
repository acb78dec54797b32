"""What effikern's fused optimizers share: the base class (:class:`FusedOptimizer`), the loss-scaling hooks, the
shared step counters, state loading.

Loss scaling (no host sync): before ``step()`` a grad scaler may set, as device tensors,
- ``optimizer.grad_scale``: gradients are divided by it (torch's protocol for ``fused=True`` optimizers, so
  ``torch.amp.GradScaler`` drives these optimizers too);
- ``optimizer._grad_factor``: gradients are multiplied by it (what ``effikern.amp.GradScaler`` sets: 1/scale
  times the clip coefficient, computed once);
- ``optimizer.found_inf``: when nonzero the update is skipped on the device (params, states and step
  unchanged).

Step counters: ``state[p]["step"]`` is a float32 0-dim tensor on p's device, as torch's capturable optimizers
keep it, but params of one group that started together share ONE tensor object, so a group is one kernel call
with one counter read on the device. torch increments only the steps of params that have a gradient; when a
param without a gradient shares a counter with params that have one, it gets its own copy first (a device
copy, no sync), so the counts stay exactly torch's. A subclass may restart a param's state (SGD: a param
that gets its first momentum buffer after earlier steps): a new state and a count of 0, like a fresh one.

Learning rate: a group's ``lr`` is a float or, as torch's fused and capturable optimizers take it, a
1-element float32/float64 tensor. A float is passed to the kernels by value, so a captured CUDA graph replays
the lr it was captured with; a tensor goes to the ops as ``lr_tensor`` and is read on the device when the
update runs, so what an LR scheduler writes into it (torch's schedulers ``fill_`` a tensor lr in place)
reaches the next step and every replay of a captured one. It is never read on the host, except a CPU tensor
for params on an accelerator, which torch's fused optimizers also treat as a plain number (a host read of
host memory, not a device sync; such an lr is frozen in a captured graph), or an accelerator's tensor for CPU
params. In state_dict it stays a tensor, as in torch's; load_state_dict gives the group a copy (torch
deep-copies loaded groups), so a graph captured before loading still reads the old tensor: capture after.

torch's flags: those that choose torch's implementation (foreach, fused, capturable) are accepted and not
kept, since effikern's one implementation is all three; those effikern cannot honour (``_REFUSED``:
differentiable, AdamW's amsgrad) raise ValueError at any value but torch's default, in the constructor,
``add_param_group`` and ``load_state_dict``, rather than running as something else.
"""

import numbers
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch

from ..ops import amp as _amp_ops


def scaling_tensors(optimizer) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(grad_factor, found_inf) from the attributes a grad scaler set, or (None, None)."""
    factor = getattr(optimizer, "_grad_factor", None)
    grad_scale = getattr(optimizer, "grad_scale", None)
    if grad_scale is not None:
        # fp64 reciprocal as torch.amp.GradScaler does for its inv_scale: exact for power-of-two scales.
        inv = grad_scale.double().reciprocal().float().reshape(())
        factor = inv if factor is None else factor * inv
    found_inf = getattr(optimizer, "found_inf", None)
    return factor, (None if found_inf is None else found_inf.float().reshape(()))


def on(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


LR_DTYPES = (torch.float32, torch.float64)  # what the kernels read a tensor lr as


def check_lr(lr, where: str = "") -> None:
    """ValueError unless lr is a number >= 0 or a 1-element float32/float64 tensor holding one (the value of a
    tensor is read here: a host sync at setup only, as torch's constructors do)."""
    value = lr
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.dtype not in LR_DTYPES:
            raise ValueError(f"a tensor lr must be a float32 or float64 tensor with 1 element{where}, got "
                             f"dtype {str(lr.dtype).replace('torch.', '')} and shape {tuple(lr.shape)}")
        value = float(lr)
    if not isinstance(value, numbers.Real) or not 0.0 <= value:
        raise ValueError(f"lr must be a float >= 0 or a 1-element float32/float64 tensor{where}, got {lr!r}")


def lr_args(lr, device: torch.device) -> Tuple[float, Optional[torch.Tensor]]:
    """(lr, lr_tensor) for the update ops from a group's lr, for params on ``device`` (module docstring): a
    float by value; a tensor as lr_tensor on ``device`` (read there by the kernels), except where the tensor
    or the params are on the CPU and the other is not: read as a number then, as torch's fused optimizers read
    a CPU lr (a CPU kernel needs the value on the host anyway; a non-blocking copy could be read too early)."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    if lr.device != device and "cpu" in (lr.device.type, device.type):
        return float(lr), None
    return 0.0, on(lr, device)  # lr is ignored when lr_tensor is given


def check_params(optimizer, name: str) -> None:
    """Every param with a gradient, in every group, before any is updated: a bad one found mid-step had left the
    groups before it updated and the rest not."""
    # Every step, over every param: so the common case is three attribute reads per param, and the messages are
    # built only on failure (an f-string per param cost ~1 ms per step over 1000 params).
    for group in optimizer.param_groups:
        for p in group["params"]:
            grad = p.grad
            if grad is not None and (p.dtype not in _amp_ops.DTYPES or grad.dtype != p.dtype or grad.is_sparse):
                _refuse(optimizer, p, name)


def _refuse(optimizer, p, name: str) -> None:
    g, i = next((g, i) for g, group in enumerate(optimizer.param_groups)
                for i, q in enumerate(group["params"]) if q is p)
    where = f"param {i} of param group {g}"
    if p.dtype not in _amp_ops.DTYPES:
        raise TypeError(f"effikern.optim.{name}: {where} has dtype {p.dtype}; the fused kernels take float32, "
                        "float16 and bfloat16 (torch.optim handles the others)")
    if p.grad.is_sparse:
        raise RuntimeError(f"effikern.optim.{name} does not support sparse gradients ({where})")
    raise TypeError(f"effikern.optim.{name}: a gradient must have its param's dtype ({p.dtype}), "
                    f"got {p.grad.dtype} ({where})")


def step_groups(optimizer, group, new_state, starts) -> Dict[int, List[torch.Tensor]]:
    """Params of ``group`` that have a gradient, keyed by their shared step tensor (see the module docstring).

    ``starts(p)``: whether p's state starts (or restarts) at this step; ``new_state(p)`` then fills it
    (without "step"), and the params starting together on one device share a new count of 0.
    """
    params = [p for p in group["params"] if p.grad is not None]
    fresh = [p for p in params if starts(p)]
    by_device = defaultdict(list)
    for p in fresh:
        by_device[p.device].append(p)
    for device, members in by_device.items():
        step = torch.zeros((), dtype=torch.float32, device=device)
        for p in members:
            optimizer.state[p].update(new_state(p))
            optimizer.state[p]["step"] = step
    with_grad = {id(p) for p in params}
    sharing = defaultdict(list)
    for p in group["params"]:
        if "step" in optimizer.state.get(p, {}):
            sharing[id(optimizer.state[p]["step"])].append(p)
    groups = defaultdict(list)
    for members in sharing.values():
        if any(id(p) in with_grad for p in members):
            for p in members:
                if id(p) not in with_grad:
                    optimizer.state[p]["step"] = optimizer.state[p]["step"].clone()
        for p in members:
            if id(p) in with_grad:
                groups[id(optimizer.state[p]["step"])].append(p)
    return groups


def merge_steps(optimizer) -> None:
    """After load_state_dict: move each step to its param's device as float32, and let params of a group with
    equal counts share one tensor again. Reads each count once (a host sync, at load time only)."""
    for group in optimizer.param_groups:
        shared = {}
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "step" not in state:
                continue
            step = torch.as_tensor(state["step"], dtype=torch.float32).reshape(())
            key = (p.device, float(step))
            if key not in shared:
                shared[key] = step.to(p.device).clone()
            state["step"] = shared[key]


def unshared_state_dict(state_dict):
    """The optimizer's state_dict with one step tensor per param: torch's optimizers increment ``step`` in
    place per param, so a shared tensor loaded into them would count once per param sharing it."""
    state = {k: ({**v, "step": v["step"].clone()} if "step" in v else v)
             for k, v in state_dict["state"].items()}
    return {**state_dict, "state": state}


class FusedOptimizer(torch.optim.Optimizer):
    """The step loop of a fused optimizer; a subclass says how to start a param's state and how to update one
    set of params that share a step counter.

    ``step()`` reads the loss-scaling tensors a grad scaler set, checks the gradients, and calls
    ``_update(group, params, grad_factor, found_inf)`` once per shared step counter (``step_groups``), with the
    scaling tensors already on that counter's device. ``_new_state(group, p)`` returns a param's state without
    "step" the first time it has a gradient.
    """

    _step_supports_amp_scaling = True
    # torch flags this optimizer cannot honour -> the one value it accepts (torch's default; module doc).
    _REFUSED = {"differentiable": False}

    def _new_state(self, group, p) -> dict:
        raise NotImplementedError

    def _starts(self, group, p) -> bool:
        """Whether p's state starts at this step (``_new_state``, a count of 0): its first step with a grad."""
        return len(self.state[p]) == 0

    def _update(self, group, params, grad_factor, found_inf) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every param with a gradient; returns closure's loss when given one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        factor, found_inf = scaling_tensors(self)
        check_params(self, type(self).__name__)
        for group in self.param_groups:
            for members in step_groups(self, group, lambda p, group=group: self._new_state(group, p),
                                       lambda p, group=group: self._starts(group, p)).values():
                device = members[0].device
                self._update(group, members, on(factor, device), on(found_inf, device))
        return loss

    def state_dict(self):
        """torch's layout (loadable by torch.optim too); each param gets its own copy of its step count."""
        return unshared_state_dict(super().state_dict())

    def add_param_group(self, param_group):
        """torch's, refusing a group that sets a flag in ``_REFUSED`` or an lr the kernels cannot take (the
        constructor's groups come here)."""
        self._check_flags({**self.defaults, **param_group}, "")
        if "lr" in param_group:
            check_lr(param_group["lr"])
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict):
        """torch's (takes torch's state_dicts too; a tensor lr is loaded as a copy, as torch does); refuses
        one whose groups set a flag in ``_REFUSED`` or an lr the kernels cannot take, before anything is
        loaded."""
        for group in state_dict["param_groups"]:
            self._check_flags(group, " (set in a loaded param group)")
            if "lr" in group:
                check_lr(group["lr"], " (in a loaded param group)")
        super().load_state_dict(state_dict)
        self._complete_loaded_state()
        merge_steps(self)

    def _check_flags(self, group, where: str) -> None:
        name = type(self).__name__
        for flag, accepted in self._REFUSED.items():
            value = group.get(flag, accepted)  # a group from an older torch may lack the key: its default
            if value != accepted:
                raise ValueError(f"effikern.optim.{name} does not support {flag}={value!r}{where}, only "
                                 f"{flag}={accepted!r}; use torch.optim.{name} for it")

    def _complete_loaded_state(self) -> None:
        """Fills what a loaded state may lack (a torch state_dict's missing keys) before steps are merged."""
