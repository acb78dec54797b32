"""``DepthwiseSeparableConv2d`` (work in progress)."""

from torch import nn


class DepthwiseSeparableConv2d(nn.Module):
    """Placeholder; being written."""
