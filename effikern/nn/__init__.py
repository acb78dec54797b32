"""Drop-in ``nn.Module``s backed by effikern's fused ops."""

from .dwsep import DepthwiseSeparableConv2d
from .sparse import SparseConv2d1x1, SparseLinear

__all__ = ["DepthwiseSeparableConv2d", "SparseConv2d1x1", "SparseLinear"]
