"""Fused multi-tensor optimizers that take loss scaling on the device: ``AdamW`` and ``SGD``.

Each matches its torch.optim counterpart numerically and takes the ``grad_scale``/``found_inf`` tensors a grad
scaler sets (torch's ``fused=True`` protocol), so ``effikern.amp.GradScaler`` or ``torch.amp.GradScaler``
drives a scaled step with no host sync and no separate unscale pass.
"""

from .adamw import AdamW
from .sgd import SGD

__all__ = ["AdamW", "SGD"]
