"""Functional API: plain functions over tensors, each backed by a ``torch.ops.effikern`` op."""

from typing import Optional, Union

import torch

from .ops import _checks
from .ops.activation import activation_name

IntOrPair = Union[int, tuple]


def dwsep_conv2d(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    pw_weight: torch.Tensor,
    pw_bias: Optional[torch.Tensor],
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused depthwise-separable convolution: ``pw(act(dw(x) + dw_bias)) + pw_bias [+ residual]``.

    Equivalent to ``F.conv2d(act(F.conv2d(x, dw_weight, dw_bias, stride, padding, dilation, groups=C)),
    pw_weight, pw_bias) + residual``, computed in one kernel without writing the depthwise output.

    Args:
        x: [N, C, H, W], NCHW or channels_last; float32, float16 or bfloat16 (float64 on torch/cpp).
        dw_weight: [C, 1, kh, kw]. dw_bias: [C] or None.
        pw_weight: [Cout, C, 1, 1]. pw_bias: [Cout] or None.
        stride, padding, dilation: int or (h, w) pair, as in ``F.conv2d`` (zero padding).
        activation: None, "relu", "relu6", "silu", "gelu" (exact erf form) or "hardswish".
        residual: [N, Cout, Ho, Wo] or None, added after the pointwise bias (MobileNetV2's skip).

    Returns:
        [N, Cout, Ho, Wo] in x's dtype and memory format.
    """
    return torch.ops.effikern.dwsep_conv2d(
        x, dw_weight, dw_bias, pw_weight, pw_bias,
        list(_checks.pair(stride, "stride", 1)), list(_checks.pair(padding, "padding", 0)),
        list(_checks.pair(dilation, "dilation", 1)), activation_name(activation), residual,
    )
