"""Loss modules backed by effikern's fused ops."""

from .distill import DistillationLoss

__all__ = ["DistillationLoss"]
