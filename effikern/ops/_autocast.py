"""Autocast for effikern's custom ops, the way PyTorch treats the ops they replace.

``torch.autocast`` rewrites only ops it knows; a custom op would see its inputs in mixed dtypes (bf16
activations from the previous conv, fp32 parameters) and refuse them. The convolution and matmul families
that ``dwsep_conv2d`` and ``sparse_linear`` replace run in the autocast dtype, so under autocast their
floating-point inputs are cast to it (a differentiable cast: gradients reach the fp32 parameters in fp32)
and the op runs with autocast off, as PyTorch's own lower-precision ops do.
"""

import contextlib
from typing import Optional, Sequence

import torch


def autocast_dtype(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[torch.dtype]:
    """The autocast dtype for the device of the first tensor, or None when autocast is off there."""
    # Only tensors say where autocast applies; anything else is left for the op's argument checks to name.
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return None
    device_type = first.device.type
    # Devices autocast does not know (meta, for shape-only calls) have no autocast state to ask about.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(tensors: Sequence[Optional[torch.Tensor]], dtype: torch.dtype):
    """Floating-point tensors cast to ``dtype``; float64 ones, non-floating ones and None unchanged, as autocast
    leaves float64 alone for the ops it casts to a lower precision."""
    return [t.to(dtype) if _castable(t) else t for t in tensors]


def _castable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def off_if(dtype: Optional[torch.dtype], x: torch.Tensor):
    """A context that turns autocast off on x's device when ``dtype`` says it was on (a no-op otherwise)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type, enabled=False)
