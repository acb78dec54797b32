"""Drop-in ``nn.Module``s backed by effikern's fused ops."""

from .dwsep import DepthwiseSeparableConv2d

__all__ = ["DepthwiseSeparableConv2d"]
