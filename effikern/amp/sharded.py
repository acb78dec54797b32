"""effikern.amp.ShardedGradScaler: the fused GradScaler for sharded gradients (FSDP, ZeRO)."""

import torch
import torch.distributed as dist

from .grad_scaler import GradScaler


class ShardedGradScaler(GradScaler):
    """Like ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` (same constructor order), on
    effikern's fused pass.

    Each rank checks and measures its own gradient shards in one pass; then ONE all_reduce combines
    [found_inf, norm^p] (sum, then the p-th root; found_inf clamped back to 1) or [found_inf, norm] (max, for the
    inf-norm), so every rank skips the same steps and clips with the global norm. A rank holding no shard takes
    part with zeros. No host sync is added: the collective runs on tensors (asynchronous on NCCL). Disabled, the
    scaler still reduces the norm for ``unscale_(optimizer, max_norm)``: every rank clips with the global norm.
    """

    _reduce_norm = True

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, backoff_factor: float = 0.5,
                 growth_factor: float = 2.0, growth_interval: int = 2000, enabled: bool = True,
                 process_group=dist.group.WORLD, *, hysteresis: int = 1):
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor,
                         backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled,
                         hysteresis=hysteresis, process_group=process_group)

    def scale(self, outputs):
        """As torch's ShardedGradScaler: the scaled outputs keep their dtype (an fp16 loss stays fp16)."""
        scaled = super().scale(outputs)
        if not self._enabled:
            return scaled
        if isinstance(outputs, torch.Tensor):
            return scaled.type(outputs.dtype)
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(s.type(o.dtype) for s, o in zip(scaled, outputs))
        return scaled
