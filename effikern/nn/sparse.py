"""``SparseLinear`` and ``SparseConv2d1x1``: pruned layers that skip the pruned work, and keep training sparse.

The stored values are the trainable ``nn.Parameter`` (``.values``); the pattern (index arrays, and the mask of stored
but pruned positions) is a set of buffers, so an optimizer step changes the kept weights only: their gradient is
computed at the kept positions alone (``effikern/ops/sparse.py``), and the pruned ones do not exist.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from .. import functional
from ..ops import _autocast
from ..sparse import formats
from ..sparse.formats import INDEX_ARRAYS, SparseWeight

_STATE = INDEX_ARRAYS + ("value_mask",)
# Block sizes "auto" tries, largest first: a bigger block means fewer indices and a larger dense micro-kernel.
_AUTO_BLOCKS = ((64, 64), (32, 32), (16, 16))


def pruned_weight_and_mask(module: nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(dense weight, mask or None) of a layer: weight_orig and weight_mask of a ``torch.nn.utils.prune``d layer,
    else its weight (whose zeros are then the pruned positions)."""
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        return module.weight_orig.detach(), module.weight_mask.detach()
    return module.weight.detach(), None


def choose_format(weight: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[str, Optional[Tuple[int, int]]]:
    """``format="auto"``: the format that represents the mask exactly and runs fastest.

    A mask made of whole blocks (of 64, 32 or 16) -> "block" with the largest such block: 4 B per weight
    instead of 8 (value + column index) and a dense inner loop. A 2:4 mask on CUDA -> "2:4" (PyTorch's
    semi-structured kernel). Anything else -> "unstructured".
    """
    kept = (weight != 0) if mask is None else (mask != 0)
    if bool(kept.any()) and not bool(kept.all()):
        for block in _AUTO_BLOCKS:
            if kept.shape[0] >= block[0] and kept.shape[1] >= block[1] and formats.is_block(kept, block):
                return "block", block
    if weight.device.type == "cuda" and formats.is_2of4(kept):
        return "2:4", None
    return "unstructured", None


class _SparseMatmul(nn.Module):
    """Shared state and conversions of the sparse layers: ``values`` (Parameter), the pattern buffers, ``bias``."""

    def __init__(self, sparse_weight: SparseWeight, bias: Optional[torch.Tensor] = None,
                 values_requires_grad: bool = True):
        super().__init__()
        if not isinstance(sparse_weight, SparseWeight):
            raise TypeError(f"sparse_weight must be an effikern.sparse.SparseWeight, "
                            f"got {type(sparse_weight).__name__}")
        sw = sparse_weight
        self.format = sw.format
        self.out_features, self.in_features = sw.shape
        self.block_size = sw.block_size
        self.values = nn.Parameter(sw.values.detach().clone(), requires_grad=values_requires_grad)
        for name in _STATE:
            self.register_buffer(name, getattr(sw, name))
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            # A Parameter is shared (from_linear / from_conv and optimize(): an optimizer built over the dense
            # layer keeps training it, a frozen one stays frozen); a plain tensor is copied.
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("bias", None)

    @property
    def sparse_weight(self) -> SparseWeight:
        """The current weight as a SparseWeight (sharing this module's tensors)."""
        return SparseWeight(self.format, (self.out_features, self.in_features), self.values, self.crow, self.col,
                            self.row, self.t_crow, self.t_row, self.t_perm, self.value_mask, self.block_size,
                            validate=False)  # checked when built or loaded

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight [out_features, in_features] (pruned positions 0)."""
        return self.sparse_weight.to_dense().detach()

    def memory_report(self):
        """Bytes held by the weight (values, indices, value mask, total) and by the dense weight it replaces."""
        return self.sparse_weight.memory_report()

    def for_inference(self):
        """Frees the arrays only backward needs (row, transposed view); returns self. The cpp backend's CSR
        (unstructured, 2:4) backward does not need them, so such a layer still fine-tunes on the CPU."""
        for name in formats.TRAINING_ARRAYS:
            setattr(self, name, getattr(self, name).new_empty(0))
        return self

    def _matmul(self, x):
        if isinstance(x, torch.Tensor) and x.dtype != self.values.dtype and _autocast.autocast_dtype([x]) is None:
            # The op would name its own argument ("values"), which a module's user never passed.
            raise TypeError(f"{type(self).__name__} holds {_name(self.values.dtype)} weights and got a "
                            f"{_name(x.dtype)} input: convert one of them (module.to(dtype)) or run under "
                            f"torch.autocast")
        return functional.sparse_linear(x, self.sparse_weight, self.bias)

    def get_extra_state(self):
        return {"format": self.format, "shape": (self.out_features, self.in_features), "block_size": self.block_size}

    def set_extra_state(self, state):
        self.format = state["format"]
        self.out_features, self.in_features = state["shape"]
        self.block_size = None if state["block_size"] is None else tuple(state["block_size"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of another pattern has other nnz: take its array shapes (the pattern is part of the state).
        for name in _STATE + ("values",):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is None and current is not None and name == "value_mask":
                self.value_mask = None
            elif incoming is not None and (current is None or current.shape != incoming.shape):
                # The checkpoint's shapes; values keep this module's dtype (the copy below converts, as it does
                # when the shapes match), the index arrays the checkpoint's.
                dtype = self.values.dtype if name == "values" else incoming.dtype
                fresh = torch.empty_like(incoming, device=self.values.device, dtype=dtype)
                if name == "values":
                    self.values = nn.Parameter(fresh, requires_grad=self.values.requires_grad)
                else:
                    setattr(self, name, fresh)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A checkpoint's index arrays are checked before any kernel trusts them.
        if all(prefix + name in state_dict for name in ("values", "crow", "col")):
            self.sparse_weight.validate()

    def extra_repr(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format!r}{block}, "
                f"density={self.sparse_weight.density:.3f}, bias={self.bias is not None}")


def _trainable_weight(layer: nn.Module) -> bool:
    """Whether the dense layer's weight trains (weight_orig's flag when torch.nn.utils.prune holds it)."""
    return getattr(layer, "weight_orig", layer.weight).requires_grad


def _convert(weight, mask, format, block_size):
    if format == "auto":
        format, auto_block = choose_format(weight, mask)
        block_size = block_size or auto_block
    return formats.from_dense(weight, mask, format, block_size)


class SparseLinear(_SparseMatmul):
    """``nn.Linear`` with a pruned weight held sparse: y = x W^T + b over any leading dims of x [..., in_features].

    Build it with :meth:`from_linear`; ``.values`` holds the kept weights (trainable), ``.to_linear()`` gives back
    the dense layer.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "auto", block_size=None) -> "SparseLinear":
        """From an ``nn.Linear`` pruned with ``torch.nn.utils.prune`` (weight_orig * weight_mask) or holding zeros.

        format: "auto" (:func:`choose_format`), "block" (``block_size``, default (32, 32)), "2:4" or "unstructured".
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight, mask = pruned_weight_and_mask(linear)
        return cls(_convert(weight, mask, format, block_size), linear.bias, _trainable_weight(linear))

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear`` (pruned weights 0), on this module's device and dtype."""
        w = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                           dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x)


class SparseConv2d1x1(_SparseMatmul):
    """A pruned pointwise ``nn.Conv2d`` (1x1, stride 1, no padding, groups 1): x [N, C, H, W] -> [N, Cout, H, W].

    A 1x1 conv is a matmul over the channels of every pixel, so it runs ``sparse_linear`` on the channels-last view.
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, format: str = "auto", block_size=None) -> "SparseConv2d1x1":
        """From a pruned (or zero-holding) 1x1 ``nn.Conv2d``; format as in :meth:`SparseLinear.from_linear`."""
        why = pointwise_problem(conv)
        if why:
            raise ValueError(f"conv must be a plain pointwise nn.Conv2d: {why}")
        weight, mask = pruned_weight_and_mask(conv)
        weight = weight.reshape(weight.shape[0], weight.shape[1])
        mask = None if mask is None else mask.reshape(weight.shape)
        return cls(_convert(weight, mask, format, block_size), conv.bias, _trainable_weight(conv))

    def to_conv(self) -> nn.Conv2d:
        """An equivalent dense 1x1 ``nn.Conv2d``."""
        w = self.dense_weight()
        conv = nn.Conv2d(self.in_features, self.out_features, 1, bias=self.bias is not None, device=w.device,
                         dtype=w.dtype)
        with torch.no_grad():
            conv.weight.copy_(w[:, :, None, None])
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape [N, {self.in_features}, H, W], got {tuple(x.shape)}")
        y = self._matmul(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()


def pointwise_problem(conv) -> Optional[str]:
    """None if ``conv`` is a plain 1x1 conv that SparseConv2d1x1 can replace, else why not."""
    if not isinstance(conv, nn.Conv2d):
        return f"got {type(conv).__name__}"
    if conv.kernel_size != (1, 1):
        return f"kernel_size is {conv.kernel_size}, not (1, 1)"
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
        return f"stride {conv.stride}, dilation {conv.dilation}, groups {conv.groups} (need 1, 1, 1)"
    if conv.padding not in ((0, 0), "valid") and conv.padding != 0:
        return f"padding is {conv.padding}, not 0"
    return None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
