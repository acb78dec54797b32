"""effikern.amp.GradScaler: torch.amp.GradScaler with one fused gradient pass and no host sync.

A drop-in subclass of ``torch.amp.GradScaler``: same constructor, methods, state_dict (loadable by torch's
scaler and back) and the same results on the same run. What changes is how a step touches the gradients.

What one step reads and writes (G = all gradient bytes; "pass" = one multi-tensor kernel):

- ``scaler.step(opt)`` with effikern.optim.AdamW/SGD or a torch ``fused=True`` optimizer, no unscale_:
  the scaler pass only READS G (inf/nan check, ``write_back=False``); the optimizer reads G once more with
  1/scale folded in. G read twice, never written by the scaler. Zero host syncs (the skip is on the device).
  (torch's fused kernels also write the unscaled gradient back; effikern's leave G as it was.)
- ``scaler.unscale_(opt, max_norm=c)`` then ``step``, same optimizers: one pass READS G (check + norm); the
  clip coefficient min(1, c / (norm + 1e-6)) times 1/scale is folded into the optimizer's gradient factor, so
  the optimizer's read is the only other touch of G: G read twice, never written. Zero host syncs. The grads
  in memory are then left as they were (scaled): the clipped, unscaled gradient exists only inside the update.
- ``scaler.unscale_(opt)`` without max_norm: torch's contract, one pass reads G and writes G/scale.
- Any other optimizer: with ``max_norm`` a read-only pass (check + norm) then one foreach multiply by
  clip/scale (read + write G), so G ends unscaled and clipped as with torch; without, one pass that reads and
  writes G. ``step`` reads found_inf on the host (one sync, as torch).

torch's own path for comparison: unscale (read + write G), ``clip_grad_norm_`` (norm: read G; clip: read +
write G), a sync in step, then the optimizer.

Beyond torch: ``unscale_(optimizer, max_norm=None, norm_type=2.0)`` returns the total norm (device tensor) and
clips; ``hysteresis`` tolerates that many consecutive overflow steps before backing off (Megatron/DeepSpeed
style; the steps are still skipped); ``process_group`` all-reduces found_inf so every DDP rank skips the same
steps (ShardedGradScaler also reduces the norm over shards).
"""

import math
from collections import defaultdict
from typing import Dict, List, Optional

import torch
from torch.amp.grad_scaler import OptState

from ..ops import amp as amp_ops

_CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: max_norm / (norm + 1e-6)


def _fold_kind(optimizer) -> Optional[str]:
    """'effikern' / 'torch_fused' when the optimizer takes the scale on the device, else None."""
    from ..optim import SGD, AdamW  # here, not at the top: effikern.optim need not load with effikern.amp

    if isinstance(optimizer, (AdamW, SGD)):
        return "effikern"
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        return "torch_fused"
    return None


class GradScaler(torch.amp.GradScaler):
    """Loss scaler for mixed-precision training; see the module docstring for what a step costs.

    Gradients may be fp32, fp16 or bf16 (torch's unscale_ refuses fp16 gradients; this one takes them).

    Args (torch's): device, init_scale, growth_factor, backoff_factor, growth_interval, enabled.
    Extra: hysteresis (int >= 1, default 1 = torch's behaviour): consecutive overflow steps tolerated before
    the scale backs off; a clean step restores the allowance. process_group: all-reduce found_inf over it
    (DDP: every rank skips the same steps); None = no communication.
    """

    _reduce_norm = False  # ShardedGradScaler: grads are shards, so the norm is reduced across ranks too

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True, *,
                 hysteresis: int = 1, process_group=None):
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor,
                         backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)
        if isinstance(hysteresis, bool) or not isinstance(hysteresis, int) or hysteresis < 1:
            raise ValueError(f"hysteresis must be an int >= 1, got {hysteresis!r}")
        self._hysteresis = hysteresis
        self._init_hysteresis_tracker = hysteresis
        self._hysteresis_tracker: Optional[torch.Tensor] = None
        self.process_group = process_group

    def _optimizer_state(self, optimizer) -> dict:
        """This step's state for ``optimizer``, created on first use. An explicit insert, not the defaultdict's
        factory: under torch.compile, Dynamo dropped the entry the factory created inside the compiled step, and
        update() then found no inf checks recorded."""
        key = id(optimizer)
        if key not in self._per_optimizer_states:
            self._per_optimizer_states[key] = _fresh_state()
        return self._per_optimizer_states[key]

    # --- unscale --------------------------------------------------------------------------------------------

    def unscale_(self, optimizer, max_norm: Optional[float] = None, norm_type: float = 2.0):
        """Unscales the optimizer's gradients, checks them for inf/nan and, with ``max_norm``, computes their
        total norm and clips -- all in one pass, without a host sync.

        Returns the total norm of the unscaled gradients (0-dim float32 device tensor, non-finite when a grad
        is) when ``max_norm`` is given (``max_norm=math.inf`` computes the norm without clipping), else None.
        With a finite ``max_norm`` and an effikern or torch fused optimizer, 1/scale and the clip are folded
        into the next ``step`` and the grads in memory are left untouched (still scaled); with other
        optimizers the grads are unscaled and clipped in place (one multiply after the read-only pass).
        Without ``max_norm`` (or with max_norm=inf) the grads are unscaled in place, as torch's unscale_.
        Raises RuntimeError when called twice for an optimizer
        before ``update()`` or after ``step()``, as torch.
        """
        if max_norm is not None:
            _check_clip_args(max_norm, norm_type)
        if not self._enabled:
            if max_norm is None:
                return None
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=True)
        self._check_scale_growth_tracker("unscale_")
        state = self._optimizer_state(optimizer)
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last "
                               "update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        # With a finite max_norm the pass only reads: the grads get 1/scale and the clip together afterwards,
        # in the optimizer (folding) or in one multiply (others) -- never a write here and another there.
        clipping = max_norm is not None and math.isfinite(max_norm)
        norm = self._unscale_check(optimizer, state, write_back=not clipping, max_norm=max_norm,
                                   norm_type=norm_type)
        state["stage"] = OptState.UNSCALED
        return norm

    def _unscale_check(self, optimizer, state, write_back: bool, max_norm=None, norm_type=2.0):
        """The one fused pass over the optimizer's grads; records found_inf and the factor the step owes."""
        grads = _grads_by_device(optimizer, coalesce_all=max_norm is not None)
        inv_scale = self._scale.double().reciprocal().float()
        want = float(norm_type) if max_norm is not None else 0.0
        found: Dict[torch.device, torch.Tensor] = {}
        norms: List[torch.Tensor] = []
        for device, gs in grads.items():
            found[device] = torch.zeros((), dtype=torch.float32, device=device)
            norm_d = amp_ops.unscale_check_norm_eager(gs, _to(inv_scale, device), found[device], want,
                                                           write_back)
            norms.append(norm_d.to(self._scale.device))
        if not found and (self.process_group is not None or self._reduce_norm):
            # No grads on this rank (e.g. it holds no shard): it must still join the collectives, with nothing found.
            # A single-process scaler records nothing, and step() raises as torch's does.
            found[self._scale.device] = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        norm = None
        if max_norm is not None:
            norm = _combine_norms(norms, want, self._scale.device)
        found, norm = self._reduce(found, norm, want)
        state["found_inf_per_device"] = found
        # What the optimizer must still multiply the grads by: 1/scale when they were only read, and the clip.
        factor = None if write_back else inv_scale
        if max_norm is not None and math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm + _CLIP_EPS), max=1.0)
            factor = coef if factor is None else factor * coef
            if _fold_kind(optimizer) is None:
                # The clip's multiply goes through the same fused kernel (no norm; its inf check is redundant and
                # goes to a scratch flag): torch._foreach_mul_ took 3.0 ms for 1000 x 4096 bf16 grads on 2 CPU
                # threads, the kernel 0.8 ms.
                for device, gs in grads.items():
                    scratch = torch.zeros((), dtype=torch.float32, device=device)
                    amp_ops.unscale_check_norm_eager(gs, _to(factor, device), scratch, 0.0, True)
                factor = None
        state["grad_factor"] = factor
        return norm

    def _reduce(self, found: Dict[torch.device, torch.Tensor], norm, norm_type):
        """Combines found_inf (and, for shards, the norm) across ranks; a no-op without a process group."""
        if self.process_group is None and not self._reduce_norm:
            return found, norm
        import torch.distributed as dist

        combined = sum(_to(f, self._scale.device) for f in found.values())
        shard_norm = self._reduce_norm and norm is not None
        if shard_norm and norm_type == math.inf:
            # Both maxima: one all_reduce of [found_inf, norm].
            buf = torch.stack([combined.float(), norm.float()])
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.process_group)
            return {self._scale.device: buf[0].clone()}, buf[1].clone()
        # Sums: [found_inf, norm^2]; found_inf is clamped back to {0, 1} (torch's fused kernels test == 1).
        parts = [combined.float()] + ([norm.float() ** 2] if shard_norm else [])
        buf = torch.stack(parts)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
        found = {self._scale.device: torch.clamp(buf[0], max=1.0)}
        return found, (buf[1].sqrt() if shard_norm else norm)

    # --- step -----------------------------------------------------------------------------------------------

    def step(self, optimizer, *args, **kwargs):
        """Runs ``optimizer.step(*args, **kwargs)`` unless the gradients hold inf/nan (torch's semantics).

        effikern.optim and torch fused optimizers get the scale (and clip) as device tensors and skip on the
        device: no host sync. Others: one sync to decide, as torch. Returns optimizer.step's return value.
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        state = self._optimizer_state(optimizer)
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        kind = _fold_kind(optimizer)
        if state["stage"] is OptState.READY:
            self._unscale_check(optimizer, state, write_back=kind is None)
        if not state["found_inf_per_device"]:
            raise AssertionError("No inf checks were recorded for this optimizer.")  # torch's words
        # Clamped to 1, on the device: torch's fused kernels skip only when found_inf == 1, so a sum of 2.0
        # (an overflow on each of two devices) would have them apply the inf/nan grads.
        found_inf = sum(_to(f, self._scale.device) for f in state["found_inf_per_device"].values())
        found_inf = torch.clamp(found_inf, max=1.0)
        factor = state.get("grad_factor")
        if kind is None:
            retval = optimizer.step(*args, **kwargs) if not found_inf.item() else None
        else:
            if kind == "effikern":
                optimizer._grad_factor = factor
            else:  # torch fused: it divides by grad_scale
                optimizer.grad_scale = None if factor is None else factor.double().reciprocal().float()
            optimizer.found_inf = found_inf
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                for attr in ("_grad_factor", "grad_scale", "found_inf"):
                    if attr in optimizer.__dict__:
                        delattr(optimizer, attr)
        state["stage"] = OptState.STEPPED
        return retval

    # --- update ---------------------------------------------------------------------------------------------

    def update(self, new_scale=None) -> None:
        """torch's update: back off after an overflow (after ``hysteresis`` consecutive ones), grow after
        ``growth_interval`` clean steps, or set ``new_scale``; all on the device."""
        if not self._enabled:
            return
        scale, growth = self._check_scale_growth_tracker("update")
        if new_scale is not None or self._hysteresis == 1:
            super().update(new_scale)  # torch's own kernel: identical trajectories by construction
            return
        found_infs = [_to(f, scale.device) for st in self._per_optimizer_states.values()
                      for f in st["found_inf_per_device"].values()]
        if not found_infs:
            raise AssertionError("No inf checks were recorded prior to update.")
        found = sum(found_infs).reshape(()) > 0
        if self._hysteresis_tracker is None:
            self._hysteresis_tracker = torch.full((), self._init_hysteresis_tracker, dtype=torch.int32,
                                                  device=scale.device)
        tracker = self._hysteresis_tracker
        left = torch.where(found, torch.clamp(tracker - 1, min=0), torch.full_like(tracker, self._hysteresis))
        backoff = found & (left == 0)
        successful = torch.where(found, torch.zeros_like(growth), growth + 1)
        grow = ~found & (successful == self._growth_interval)  # == as torch's kernel: interval 0 never grows
        grown = scale * self._growth_factor
        new = torch.where(backoff, scale * self._backoff_factor, scale)
        new = torch.where(grow & torch.isfinite(grown), grown, new)
        scale.copy_(new)
        growth.copy_(torch.where(grow, torch.zeros_like(successful), successful))
        tracker.copy_(left)
        self._per_optimizer_states = defaultdict(_fresh_state)

    # --- state ----------------------------------------------------------------------------------------------

    def get_hysteresis(self) -> int:
        """Consecutive overflow steps tolerated before a backoff (1: back off at once, as torch)."""
        return self._hysteresis

    def _get_hysteresis_tracker(self) -> int:
        if self._hysteresis_tracker is None:
            return self._init_hysteresis_tracker
        return int(self._hysteresis_tracker.item())

    def state_dict(self):
        """torch's five entries (loadable by torch.amp.GradScaler), plus the hysteresis ones when enabled."""
        out = super().state_dict()
        if self._enabled:
            out["hysteresis"] = self._hysteresis
            out["_hysteresis_tracker"] = self._get_hysteresis_tracker()
        return out

    def load_state_dict(self, state_dict) -> None:
        """Loads ours or torch's state_dict (a torch one leaves the hysteresis setting as constructed)."""
        super().load_state_dict(state_dict)
        if not self._enabled:
            return
        self._hysteresis = int(state_dict.get("hysteresis", self._hysteresis))
        tracker = int(state_dict.get("_hysteresis_tracker", self._hysteresis))
        self._init_hysteresis_tracker = tracker
        if self._hysteresis_tracker is not None:
            self._hysteresis_tracker.fill_(tracker)

    def __getstate__(self):
        state = super().__getstate__()
        if self._enabled:
            state["_init_hysteresis_tracker"] = self._get_hysteresis_tracker()
            state["_hysteresis_tracker"] = None
        return state


def _fresh_state():
    return {"stage": OptState.READY, "found_inf_per_device": {}}


def _to(t: torch.Tensor, device) -> torch.Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


def _check_clip_args(max_norm, norm_type) -> None:
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a number > 0 (math.inf: norm only, no clipping), "
                         f"got {max_norm!r}")
    if float(norm_type) not in (2.0, math.inf):
        raise ValueError(f"norm_type must be 2.0 or inf, got {norm_type!r}")


def _grads_by_device(optimizer, coalesce_all: bool = False) -> Dict[torch.device, List[torch.Tensor]]:
    """The optimizer's gradients by device (a sparse one as its values). coalesce_all: coalesce every sparse grad,
    not only fp16 ones, because a norm over duplicate indices counted separately is not the grad's norm."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params:
        raise ValueError("the optimizer has no params: GradScaler has no gradients to unscale")
    out: Dict[torch.device, List[torch.Tensor]] = defaultdict(list)
    with torch.no_grad():
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            grad = p.grad
            if grad.dtype not in amp_ops.DTYPES:
                raise TypeError(f"effikern.amp.GradScaler: the gradient of param {i} (counting over the param "
                                f"groups) is {grad.dtype}; the fused pass takes float32, float16 and bfloat16 "
                                "(torch.amp.GradScaler handles the others)")
            if grad.is_sparse:
                # As torch: duplicate indices of a scaled fp16 sparse grad may overflow when summed, so check
                # the coalesced values (coalescing fp16 needs an fp32 detour).
                if grad.dtype is torch.float16:
                    p.grad = grad.float().coalesce().half()
                elif coalesce_all:
                    p.grad = grad.coalesce()
                grad = p.grad._values()
            out[grad.device].append(grad)
    return out


def _combine_norms(norms: List[torch.Tensor], norm_type: float, device) -> torch.Tensor:
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)
