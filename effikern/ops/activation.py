"""The activations a fused kernel can apply, with the integer codes the kernels use.

The codes are part of the kernel ABI (csrc/, kernels/): 0 none, 1 relu, 2 relu6, 3 silu, 4 gelu (exact erf
form, ``F.gelu``'s default), 5 hardswish.
"""

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

CODES = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "gelu": 4, "hardswish": 5}

_FUNCTIONS = {
    "none": lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "hardswish": F.hardswish,
}

_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.Identity: "none"}


def activation_name(activation: Union[None, str, nn.Module]) -> str:
    """Normalizes None, a name or an activation module to one of ``CODES``; raises ValueError otherwise."""
    if activation is None:
        return "none"
    if isinstance(activation, str):
        name = activation.lower()
        if name in CODES:
            return name
        raise ValueError(f"activation must be None or one of {sorted(CODES)}, got {activation!r}")
    found = module_activation_name(activation)
    if found is None:
        raise ValueError(
            f"activation module {activation!r} cannot be fused: supported are ReLU, ReLU6, SiLU, "
            "GELU(approximate='none'), Hardswish and Identity"
        )
    return found


def module_activation_name(module: nn.Module) -> Optional[str]:
    """The fused-activation name equivalent to ``module``, or None when there is none. Exact types only: a subclass
    may override forward, so it proves nothing."""
    if type(module) is nn.GELU:
        return "gelu" if module.approximate == "none" else None
    if type(module) is nn.Hardtanh:
        return "relu6" if (module.min_val, module.max_val) == (0.0, 6.0) else None
    return _MODULES.get(type(module))


def apply_activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """The reference activation: the same torch function the fused kernels must match."""
    return _FUNCTIONS[name](z)


def activation_backward(grad: torch.Tensor, z: torch.Tensor, name: str) -> torch.Tensor:
    """grad * act'(z), through the aten backward ops autograd itself uses (so kinks follow torch's convention)."""
    aten = torch.ops.aten
    if name == "none":
        return grad
    if name == "relu":
        return aten.threshold_backward(grad, z, 0)
    if name == "relu6":
        return aten.hardtanh_backward(grad, z, 0.0, 6.0)
    if name == "silu":
        return aten.silu_backward(grad, z)
    if name == "gelu":
        return aten.gelu_backward(grad, z, approximate="none")
    return aten.hardswish_backward(grad, z)
