"""effikern.optim.AdamW: torch.optim.AdamW's update as one fused multi-tensor kernel, loss-scaling aware."""

import torch

from ..ops import amp as _amp_ops
from . import _fused


class AdamW(_fused.FusedOptimizer):
    """Drop-in for ``torch.optim.AdamW`` (no amsgrad), updating each group with ``effikern::fused_adamw_``.

    Same math, state keys (``step``, ``exp_avg``, ``exp_avg_sq``) and state_dict layout as torch's AdamW;
    states have the param's dtype. Takes ``grad_scale``/``found_inf`` set by a grad scaler (torch's or
    effikern's): the scale is folded into the update and an overflow step is skipped on the device, so a
    scaled step needs no host sync and no separate unscale pass. Step counters are device tensors (see
    effikern.optim._fused).

    Args: params, lr, betas (beta1, beta2), eps, weight_decay (decoupled, as torch), maximize. lr is a float
    or, as torch's fused/capturable AdamW takes it, a 1-element float32/float64 tensor, read on the device at
    each step (never on the host): an LR scheduler's in-place change reaches the next step, also in a captured
    CUDA graph, where a float lr stays the value captured (effikern.optim._fused).
    torch's other flags, for configs written for torch: amsgrad and differentiable only at their default
    (False; ValueError otherwise, here and in a loaded state_dict); foreach, capturable and fused at any value
    (they pick torch's implementation; this one is multi-tensor, fused and capturable).
    """

    _REFUSED = {"amsgrad": False, "differentiable": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        _fused.check_lr(lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be a pair of floats in [0, 1), got {betas!r}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, maximize=maximize,
                        amsgrad=amsgrad, differentiable=differentiable)  # kept as torch's groups keep them
        super().__init__(params, defaults)

    def _new_state(self, group, p):
        return {"exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}

    def _update(self, group, params, grad_factor, found_inf):
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        lr, lr_tensor = _fused.lr_args(group["lr"], params[0].device)
        _amp_ops.fused_adamw_eager(
            [p.detach() for p in params], [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], states[0]["step"], lr, float(beta1), float(beta2),
            float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"]), grad_factor,
            found_inf, lr_tensor)
