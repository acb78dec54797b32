"""effikern.optim.SGD: torch.optim.SGD's update as one fused multi-tensor kernel, loss-scaling aware."""

import torch

from ..ops import amp as _amp_ops
from . import _fused


class SGD(_fused.FusedOptimizer):
    """Drop-in for ``torch.optim.SGD`` (momentum, dampening, nesterov, weight_decay, maximize), updating each
    group with ``effikern::fused_sgd_``.

    State: ``momentum_buffer`` (the param's dtype; allocated at the first step when momentum != 0) as torch,
    plus a ``step`` count (device tensor) of the updates since the state started: 0 means the buffer is not
    initialised yet, so the first update sets it to the gradient as torch does, decided on the device. A param
    that gets its buffer after earlier steps (momentum switched on later, a loaded state without one) starts
    again at 0. Loading a torch SGD state_dict (no ``step``) counts a param with a momentum buffer as stepped
    once. Takes ``grad_scale``/``found_inf`` from a grad scaler like effikern.optim.AdamW (no host sync).
    lr is a float or a 1-element float32/float64 tensor read on the device at each step, as in
    effikern.optim.AdamW.

    torch's other flags: differentiable only at its default (False; ValueError otherwise, here and in a loaded
    state_dict); foreach and fused at any value (they pick torch's implementation; this one is both).
    """

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        _fused.check_lr(lr)
        if not 0.0 <= momentum:
            raise ValueError(f"momentum must be >= 0, got {momentum!r}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires a momentum > 0 and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, differentiable=differentiable)
        super().__init__(params, defaults)

    def _new_state(self, group, p):
        if float(group["momentum"]) == 0.0:
            return {}
        return {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _starts(self, group, p):
        # torch's first momentum update of a param sets buf = g, whatever steps came before; the kernel does
        # that where step == 0 (on the device). So a param that stepped without a buffer (momentum switched on
        # later, a loaded state without one) starts again: a zero buffer and a count of 0. Keeping its count
        # gave buf = (1 - dampening) * g.
        state = self.state[p]
        return len(state) == 0 or (float(group["momentum"]) != 0.0 and state.get("momentum_buffer") is None)

    def _update(self, group, params, grad_factor, found_inf):
        momentum = float(group["momentum"])
        bufs = [] if momentum == 0.0 else [self.state[p]["momentum_buffer"] for p in params]
        lr, lr_tensor = _fused.lr_args(group["lr"], params[0].device)
        _amp_ops.fused_sgd_eager(
            [p.detach() for p in params], [p.grad for p in params], bufs, self.state[params[0]]["step"],
            lr, momentum, float(group["dampening"]), bool(group["nesterov"]),
            float(group["weight_decay"]), bool(group["maximize"]), grad_factor, found_inf, lr_tensor)

    def state_dict(self):
        """torch's layout, loadable by torch.optim.SGD too: a momentum buffer whose step count is still 0 (allocated
        for a step the grad scaler skipped on the device) is left out, as torch, which skips on the host, never
        allocated it; torch would read a zero buffer as a started one (buf = momentum * 0 + (1 - dampening) * g
        instead of buf = g). Reads those counts: a host sync, at save time only."""
        out = super().state_dict()
        unstarted = {k for k, v in out["state"].items() if "momentum_buffer" in v and float(v["step"]) == 0.0}
        out["state"] = {k: ({n: t for n, t in v.items() if n != "momentum_buffer"} if k in unstarted else v)
                        for k, v in out["state"].items()}
        return out

    def _complete_loaded_state(self):
        # A torch SGD state_dict has no step: a param with a momentum buffer has been stepped at least once.
        for state in self.state.values():
            if "step" not in state:
                buf = state.get("momentum_buffer")
                state["step"] = torch.tensor(0.0 if buf is None else 1.0)
