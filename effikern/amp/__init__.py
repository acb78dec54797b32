"""Loss scaling for fp16 training: ``GradScaler`` (drop-in for ``torch.amp.GradScaler``) and
``ShardedGradScaler``, on one fused multi-tensor pass (unscale + inf/nan check + grad norm) with no host sync
when the optimizer takes the scale on the device (effikern.optim, torch ``fused=True``)."""

from .grad_scaler import GradScaler
from .sharded import ShardedGradScaler

__all__ = ["GradScaler", "ShardedGradScaler"]
