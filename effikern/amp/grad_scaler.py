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

Disabled (``enabled=False``, e.g. bf16 autocast, which needs no loss scaling): ``scale`` and ``update`` do nothing
as torch's, but ``unscale_(optimizer, max_norm=c)`` still clips as ``torch.nn.utils.clip_grad_norm_(max_norm=c)``
would, on the same read-only pass with nothing to unscale or check: the clip is folded into the next
``scaler.step`` of a folding optimizer (as enabled, the step must go through the scaler; ``update`` drops a clip
that no step took), multiplied into the grads at once for others. A disabled scaler never skips a step: as with
clip_grad_norm_, a non-finite norm makes the coefficient 0 (inf norm) or nan, and the grads are multiplied by it.

The documented fallback: float64 gradients (or any dtype the fused pass does not take) and norm types other than
2 and inf go through torch's own foreach kernels, the way torch's GradScaler + clip_grad_norm_ do: the grads are
unscaled in place (effikern's kernel for float32/float16/bfloat16, ``torch._amp_foreach_non_finite_check_and_unscale_``
for the rest), their norm is ``torch._foreach_norm``'s (float16/bfloat16 grads measured in float32), and the clip
is folded into a folding optimizer's step or multiplied in place (float64 grads: always in place, in float64).
Still no host sync; the cost is torch's (G read and written by the unscale, read by the norm). It applies to the
whole optimizer's grads when one of them or the norm type calls for it.
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

    Gradients may be fp32, fp16 or bf16 on the fused pass (torch's unscale_ refuses fp16 gradients; this one takes
    them); float64 ones take the fallback on torch's kernels (module docstring).

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
        # Disabled scaler only: the clip coefficient unscale_(max_norm) owes a folding optimizer's next step, by
        # id(optimizer) (an enabled scaler keeps it in _per_optimizer_states, which torch creates only when enabled).
        self._disabled_factors: Dict[int, torch.Tensor] = {}

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

        Returns the total norm of the unscaled gradients (0-dim float32 device tensor, float64 when a gradient is
        float64; non-finite when a grad is) when ``max_norm`` is given (``max_norm=math.inf`` computes the norm
        without clipping), else None. ``norm_type``: any p > 0 or math.inf, as torch.nn.utils.clip_grad_norm_.
        With a finite ``max_norm`` and an effikern or torch fused optimizer, 1/scale and the clip are folded
        into the next ``step`` and the grads in memory are left untouched (still scaled); with other
        optimizers the grads are unscaled and clipped in place (one multiply after the read-only pass).
        Without ``max_norm`` (or with max_norm=inf) the grads are unscaled in place, as torch's unscale_.
        float64 grads and norm types other than 2 and inf take the fallback (module docstring): unscaled in place
        first, as torch does, then measured; the clip is folded or multiplied in as above.

        Disabled scaler: nothing to unscale or check, and without ``max_norm`` a no-op (as torch's); with it, the
        norm and clip of ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)`` (the grads' values it
        leaves, folded into the next ``step`` of a folding optimizer) and never a skipped step.

        Raises RuntimeError when called twice for an optimizer before ``update()`` or after ``step()``, as torch
        (disabled: twice with ``max_norm`` before ``step()`` or ``update()``); ValueError for a max_norm <= 0 or a
        norm_type that is not > 0.
        """
        if max_norm is not None:
            _check_clip_args(max_norm, norm_type)
            norm_type = float(norm_type)
        if not self._enabled:
            return None if max_norm is None else self._clip_unscaled(optimizer, max_norm, norm_type)
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
        """The one pass over the optimizer's grads; records found_inf and the factor the step owes."""
        grads = _grads_by_device(optimizer, coalesce_all=max_norm is not None)
        inv_scale = self._scale.double().reciprocal().float()
        measured = None if max_norm is None else float(norm_type)
        found, norm, written = _check_and_measure(grads, inv_scale, write_back, measured, self._scale.device)
        if not found and (self.process_group is not None or self._reduce_norm):
            # No grads on this rank (e.g. it holds no shard): it must still join the collectives, with nothing found.
            # A single-process scaler records nothing, and step() raises as torch's does.
            found[self._scale.device] = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        found, norm = self._reduce(found, norm, measured, self._scale.device)
        state["found_inf_per_device"] = found
        # What the optimizer must still multiply the grads by: 1/scale when they were only read, and the clip.
        state["grad_factor"] = _settle(optimizer, grads, None if written else inv_scale, norm, max_norm)
        return norm

    def _clip_unscaled(self, optimizer, max_norm: float, norm_type: float) -> torch.Tensor:
        """unscale_(max_norm) of a disabled scaler: clip_grad_norm_'s norm and coefficient on the enabled scaler's
        pass with nothing to unscale; the coefficient is owed to the next step of a folding optimizer."""
        key = id(optimizer)
        if key in self._disabled_factors:
            # A second clip would measure the grads without the first one applied (it is still owed to the step).
            raise RuntimeError("unscale_(max_norm=...) has already been called on this optimizer since the last "
                               "step() or update().")
        grads = _grads_by_device(optimizer, coalesce_all=True)
        # clip_grad_norm_ returns the norm on the first grad's device; with none, the first param's.
        device = next(iter(grads)) if grads else next(p.device for g in optimizer.param_groups for p in g["params"])
        _, norm, _ = _check_and_measure(grads, None, False, norm_type, device)
        if self._reduce_norm:  # shards: every rank clips with the global norm (found_inf is not used)
            _, norm = self._reduce({device: torch.zeros((), dtype=torch.float32, device=device)}, norm, norm_type,
                                   device)
        factor = _settle(optimizer, grads, None, norm, max_norm)
        if factor is not None:
            self._disabled_factors[key] = factor
        return norm

    def _reduce(self, found: Dict[torch.device, torch.Tensor], norm, norm_type, device):
        """Combines found_inf (and, for shards, the norm) across ranks, onto ``device``; a no-op without a process
        group."""
        if self.process_group is None and not self._reduce_norm:
            return found, norm
        import torch.distributed as dist

        combined = sum(_to(f, device) for f in found.values())
        shard_norm = self._reduce_norm and norm is not None
        # One buffer, one collective; float64 when the norm is (float64 grads), where found_inf is still exact.
        dtype = norm.dtype if shard_norm else torch.float32
        if shard_norm and norm_type == math.inf:
            # Both maxima: one all_reduce of [found_inf, norm].
            buf = torch.stack([combined.to(dtype), norm.to(dtype)])
            dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.process_group)
            return {device: buf[0].to(torch.float32, copy=True)}, buf[1].clone()
        # Sums: [found_inf, norm^p]; found_inf is clamped back to {0, 1} (torch's fused kernels test == 1).
        parts = [combined.to(dtype)] + ([norm.to(dtype) ** norm_type] if shard_norm else [])
        buf = torch.stack(parts)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
        found = {device: torch.clamp(buf[0].float(), max=1.0)}
        if not shard_norm:
            return found, norm
        return found, (buf[1].sqrt() if norm_type == 2.0 else buf[1] ** (1.0 / norm_type))

    # --- step -----------------------------------------------------------------------------------------------

    def step(self, optimizer, *args, **kwargs):
        """Runs ``optimizer.step(*args, **kwargs)`` unless the gradients hold inf/nan (torch's semantics).

        effikern.optim and torch fused optimizers get the scale (and clip) as device tensors and skip on the
        device: no host sync. Others: one sync to decide, as torch. Returns optimizer.step's return value.
        """
        if not self._enabled:
            factor = self._disabled_factors.pop(id(optimizer), None)
            if factor is None:
                return optimizer.step(*args, **kwargs)
            if args or "closure" in kwargs:
                # The closure recomputes the grads inside step: the clip belongs to the grads unscale_ measured,
                # so it goes into them now, where clip_grad_norm_ would have put it.
                _multiply_(_grads_by_device(optimizer), factor)
                return optimizer.step(*args, **kwargs)
            return _folded_step(optimizer, factor, None, args, kwargs)
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
            retval = _folded_step(optimizer, factor, found_inf, args, kwargs)
        state["stage"] = OptState.STEPPED
        return retval

    # --- update ---------------------------------------------------------------------------------------------

    def update(self, new_scale=None) -> None:
        """torch's update: back off after an overflow (after ``hysteresis`` consecutive ones), grow after
        ``growth_interval`` clean steps, or set ``new_scale``; all on the device."""
        if not self._enabled:
            self._disabled_factors.clear()  # a clip nobody stepped with must not reach a later step
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
        state["_disabled_factors"] = {}  # keyed by id(optimizer): meaningless in another process
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
    # p > 0 only (torch also takes 0 and -inf): the shards' norm is reduced as (sum of norm^p)^(1/p), or a max.
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
        raise ValueError(f"norm_type must be a number > 0 or math.inf, got {norm_type!r}")


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
            if not grad.is_floating_point():
                raise TypeError(f"effikern.amp.GradScaler: the gradient of param {i} (counting over the param "
                                f"groups) must be a floating-point tensor, got {grad.dtype}")
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


def _fused_takes(grads: Dict[torch.device, List[torch.Tensor]], norm_type: Optional[float]) -> bool:
    """Whether the fused pass takes these grads and norm type (None: no norm); else the fallback runs."""
    if norm_type is not None and norm_type not in (2.0, math.inf):
        return False
    return all(g.dtype in amp_ops.DTYPES for gs in grads.values() for g in gs)


def _check_and_measure(grads: Dict[torch.device, List[torch.Tensor]], inv_scale: Optional[torch.Tensor],
                       write_back: bool, norm_type: Optional[float], device: torch.device):
    """The pass over the grads: unscale (in place with ``write_back``) and inf/nan check, and their total norm.

    grads: by device (``_grads_by_device``); inv_scale: float32 0-dim, or None for a disabled scaler (nothing to
    unscale; found_inf is then meaningless). norm_type: p, or None for no norm. Returns (found_inf per device, 0-dim
    float32 tensors; the total norm of the unscaled grads on ``device`` or None; whether the grads were written,
    i.e. now hold grad * inv_scale). The fallback (``_fused_takes`` false) always writes when there is a scale:
    torch's sequence measures the grads it has unscaled in place.
    """
    found = {d: torch.zeros((), dtype=torch.float32, device=d) for d in grads}
    if _fused_takes(grads, norm_type):
        want = 0.0 if norm_type is None else norm_type
        norms = []
        for d, gs in grads.items():
            inv = torch.ones((), dtype=torch.float32, device=d) if inv_scale is None else _to(inv_scale, d)
            norm_d = amp_ops.unscale_check_norm_eager(gs, inv, found[d], want, write_back and inv_scale is not None)
            norms.append(norm_d.to(device))
        norm = None if norm_type is None else _combine_norms(norms, want, device)
        return found, norm, write_back and inv_scale is not None
    if inv_scale is not None:
        for d, gs in grads.items():
            _unscale_in_place(gs, _to(inv_scale, d), found[d])
    norm = None if norm_type is None else _foreach_total_norm(grads, norm_type, device)
    return found, norm, inv_scale is not None


def _unscale_in_place(grads: List[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
    """grads *= inv_scale with the inf/nan check, one device: effikern's kernel where it takes the dtype (it also
    catches an fp16 product that overflows), torch's check-and-unscale kernel for the rest, by dtype as torch."""
    by_dtype: Dict[torch.dtype, List[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_dtype[g.dtype].append(g)
    fused = [g for g in grads if g.dtype in amp_ops.DTYPES]
    if fused:
        amp_ops.unscale_check_norm_eager(fused, inv_scale, found_inf, 0.0, True)
    for dtype, same in by_dtype.items():
        if dtype not in amp_ops.DTYPES:
            torch._amp_foreach_non_finite_check_and_unscale_(same, found_inf, inv_scale)


def _foreach_total_norm(grads: Dict[torch.device, List[torch.Tensor]], norm_type: float,
                        device: torch.device) -> torch.Tensor:
    """torch.nn.utils.get_total_norm of the grads, on ``device``: torch._foreach_norm per tensor, then the norm of
    those. float16/bfloat16 grads are measured in float32 (torch's norm in their dtype overflows past 65504); empty
    grads are left out (they add nothing, and torch refuses the inf-norm of an empty tensor). 0-dim, float32, or
    float64 when a grad is."""
    norms = []
    for gs in grads.values():
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = defaultdict(list)
        for g in gs:
            if g.numel():
                by_dtype[g.dtype].append(g)
        for dtype, same in by_dtype.items():
            wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
            norms += [n.to(device) for n in torch._foreach_norm(same, norm_type, dtype=wide)]
    if not norms:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)  # stack promotes: float64 if one grad is


def _settle(optimizer, grads: Dict[torch.device, List[torch.Tensor]], factor: Optional[torch.Tensor],
            norm: Optional[torch.Tensor], max_norm: Optional[float]) -> Optional[torch.Tensor]:
    """What the optimizer's step must still multiply the grads by (None: nothing), given ``factor`` (what they owe
    already: 1/scale after a read-only pass, or None) and, for a finite ``max_norm``, clip_grad_norm_'s coefficient
    min(1, max_norm / (norm + 1e-6)). A folding optimizer takes a float32 factor in its step; otherwise it is
    multiplied into the grads here (a float64 one, from float64 grads, too: it keeps its precision there)."""
    if max_norm is not None and math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + _CLIP_EPS), max=1.0)
        factor = coef if factor is None else factor * coef
    if factor is None or (_fold_kind(optimizer) is not None and factor.dtype == torch.float32):
        return factor
    _multiply_(grads, factor)
    return None


def _multiply_(grads: Dict[torch.device, List[torch.Tensor]], factor: torch.Tensor) -> None:
    """grads *= factor (0-dim), in place, in fp32 math rounded to each grad's dtype (float64 ones in float64)."""
    for d, gs in grads.items():
        f = _to(factor, d)
        if f.dtype == torch.float32 and all(g.dtype in amp_ops.DTYPES for g in gs):
            # The fused kernel without a norm (its inf check goes to a scratch flag): torch._foreach_mul_ took
            # 3.0 ms for 1000 x 4096 bf16 grads on 2 CPU threads, the kernel 0.8 ms.
            scratch = torch.zeros((), dtype=torch.float32, device=d)
            amp_ops.unscale_check_norm_eager(gs, f, scratch, 0.0, True)
            continue
        by_dtype: Dict[torch.dtype, List[torch.Tensor]] = defaultdict(list)
        for g in gs:
            by_dtype[g.dtype].append(g)
        for same in by_dtype.values():
            torch._foreach_mul_(same, f)  # as clip_grad_norm_ does


def _folded_step(optimizer, factor: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], args, kwargs):
    """optimizer.step with the grad factor and found_inf handed over as device tensors (effikern's ``_grad_factor``
    or torch's fused-optimizer ``grad_scale``, its reciprocal); found_inf None: never skip."""
    if _fold_kind(optimizer) == "effikern":
        optimizer._grad_factor = factor
    else:  # torch fused: it divides by grad_scale
        optimizer.grad_scale = None if factor is None else factor.double().reciprocal().float()
    if found_inf is not None:
        optimizer.found_inf = found_inf
    try:
        return optimizer.step(*args, **kwargs)
    finally:
        for attr in ("_grad_factor", "grad_scale", "found_inf"):
            if attr in optimizer.__dict__:
                delattr(optimizer, attr)
