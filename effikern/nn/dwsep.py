"""``DepthwiseSeparableConv2d``: depthwise k×k conv -> [BatchNorm] -> activation -> pointwise 1×1, fused.

Shapes: x [N, C, H, W] (NCHW or channels_last) -> y [N, Cout, Ho, Wo] in x's memory format, with
Ho = (H + 2*ph - dh*(kh-1) - 1) // sh + 1 (likewise Wo), as for ``nn.Conv2d``.
"""

from typing import Optional, Tuple, Union

import torch
from torch import nn

from .. import functional
from ..ops import _checks
from ..ops import dwsep as dwsep_ops
from ..ops.activation import activation_name, apply_activation
from ._hooks import hooks, run_pruning_hooks


class DepthwiseSeparableConv2d(nn.Module):
    """Drop-in for ``Conv2d(C, C, k, groups=C)`` -> activation -> ``Conv2d(C, Cout, 1)``, run as one fused op.

    The two convolutions are kept as children ``depthwise`` and ``pointwise`` (holders of the parameters,
    never called on the fused path), so ``state_dict()`` has exactly the keys of the usual two-conv module
    (``depthwise.weight``, ``depthwise.bias``, ``pointwise.weight``, ``pointwise.bias``) and its checkpoints
    load with ``strict=True``. A module built by :meth:`from_modules` with a BatchNorm also has ``bn.*`` keys.

    Args:
        in_channels: C. out_channels: Cout.
        kernel_size, stride, dilation: int or (h, w), as for ``nn.Conv2d``.
        padding: int, (h, w), ``"valid"`` or ``"same"`` (stride 1, and only where ``"same"`` pads both
            sides equally: dilation*(k-1) even).
        bias: whether the convolutions have a bias: a bool for both, or a pair ``(dw_bias, pw_bias)``, e.g.
            ``(False, True)`` for MobileNet's bias-free depthwise conv; ``state_dict()`` has a ``*.bias`` key for
            each conv that has one, as the two-conv module would.
        activation: None, a name ("relu", "relu6", "silu", "gelu", "hardswish") or one of the modules
            ReLU, ReLU6, SiLU, GELU(approximate='none'), Hardswish, Identity. Kept as its name.
        device, dtype: for the parameters.

    ``forward(x, residual=None)``: x [N, C, H, W] -> [N, Cout, Ho, Wo]; residual [N, Cout, Ho, Wo] is
    added after the pointwise bias (MobileNetV2's skip connection), inside the fused op.
    """

    bn: Optional[nn.BatchNorm2d]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Union[int, Tuple[int, int], str] = 0,
        dilation=1,
        bias: Union[bool, Tuple[bool, bool]] = True,
        activation: Union[None, str, nn.Module] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        padding = conv_padding(padding, kernel_size, stride, dilation, "padding")
        dw_bias, pw_bias = _bias_pair(bias)
        factory = {"device": device, "dtype": dtype}
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, stride, padding, dilation,
                                   groups=in_channels, bias=dw_bias, **factory)
        # An empty slot between the two, so a bn from from_modules is listed in data order (repr, state_dict).
        self.register_module("bn", None)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=pw_bias, **factory)
        self.activation = activation_name(activation)

    @classmethod
    def from_modules(
        cls,
        depthwise_conv: nn.Conv2d,
        pointwise_conv: nn.Conv2d,
        activation: Union[None, str, nn.Module] = None,
        bn: Optional[nn.BatchNorm2d] = None,
    ) -> "DepthwiseSeparableConv2d":
        """Builds the fused module computing ``pointwise_conv(activation(bn(depthwise_conv(x))))``.

        The result SHARES the given layers' Parameter objects (and takes ``bn`` itself as its child, so its
        running statistics are the same tensors): an optimizer built over the old layers keeps updating the
        new module, no weights are copied, and training one trains the other. ``copy.deepcopy`` the layers
        first for an independent module. Forward hooks on the given layers would not run, so layers with
        hooks, or whose weight is computed (``torch.nn.utils.prune``, parametrizations), are refused.

        Args:
            depthwise_conv: ``nn.Conv2d`` with groups == in_channels == out_channels == C, zero padding.
            pointwise_conv: ``nn.Conv2d`` 1x1, in_channels == C, stride 1, padding 0, dilation 1, groups 1.
            activation: as for the constructor.
            bn: optional ``nn.BatchNorm2d(C)`` applied after the depthwise conv. While it uses running
                statistics (eval mode) it is folded into the depthwise weights; while it uses batch
                statistics (training, or ``track_running_stats=False``) forward runs unfused (see ``fused``).

        Raises:
            ValueError naming the argument that cannot be fused.
        """
        padding = _check_depthwise(depthwise_conv, "depthwise_conv")
        channels = depthwise_conv.in_channels
        _check_pointwise(pointwise_conv, depthwise_conv, "pointwise_conv")
        if bn is not None:
            _check_bn(bn, channels, "bn")
        if isinstance(activation, nn.Module):
            _check_plain(activation, "activation")
        dw = depthwise_conv
        # Built on the meta device: its own parameters are replaced at once, so none is allocated.
        module = cls(channels, pointwise_conv.out_channels, dw.kernel_size, dw.stride, padding, dw.dilation,
                     activation=activation, device="meta")
        _share_parameters(module.depthwise, dw)
        _share_parameters(module.pointwise, pointwise_conv)
        module.train(dw.training)  # before bn joins, so bn keeps its own mode
        module.bn = bn
        return module

    @property
    def fused(self) -> bool:
        """True when forward runs the one fused op; False while ``bn`` normalizes with batch statistics, or while a
        child has hooks (other than ``torch.nn.utils.prune``'s), which run only when the child itself is called."""
        return self._unfused_reason() is None

    def _unfused_reason(self) -> Optional[str]:
        for name in ("depthwise", "bn", "pointwise"):
            child = getattr(self, name)
            if child is not None and hooks(child, skip_pruning=True):
                return f"{name} has hooks, which run only when it is called"
        bn = self.bn
        if bn is None:
            return None
        # nn.BatchNorm2d's own rule for using batch statistics instead of running ones.
        if bn.running_mean is None:
            return "bn has no running statistics (track_running_stats=False)"
        if bn.training:
            return "bn is in training mode"
        return None

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [N, C, H, W], residual [N, Cout, Ho, Wo] or None -> [N, Cout, Ho, Wo] in x's memory format."""
        self._check_input(x)
        if not self.fused:
            return self._forward_unfused(x, residual)
        # The children are not called on the fused path, so their pruning hooks (torch.nn.utils.prune: weight =
        # weight_orig * weight_mask, recomputed before each call) are run here instead.
        run_pruning_hooks(self.depthwise)
        run_pruning_hooks(self.pointwise)
        dw_weight, dw_bias = self._depthwise_parameters()
        dw = self.depthwise
        return functional.dwsep_conv2d(
            x, dw_weight, dw_bias, self.pointwise.weight, self.pointwise.bias,
            dw.stride, dw.padding, dw.dilation, self.activation, residual,
        )

    def _check_input(self, x) -> None:
        """A wrong channel count is the input's fault, as nn.Conv2d says; the op alone cannot tell which of x and
        the weights is wrong. Other defects (not a tensor, not 4-D, ...) are left to the op's checks."""
        channels = self.depthwise.in_channels
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != channels:
            raise ValueError(
                f"{type(self).__name__}(in_channels={channels}) expected input x [N, C, H, W] to have {channels} "
                f"channels, but got {x.shape[1]} channels instead (shape {tuple(x.shape)})"
            )

    def _forward_unfused(self, x, residual):
        # Batch statistics need the whole depthwise output before normalizing it, which the fused
        # kernel never materializes; run the layers one by one, as the unfused model would.
        z = self.depthwise(x)
        if self.bn is not None:
            z = self.bn(z)
        y = self.pointwise(apply_activation(z, self.activation))
        return y if residual is None else y + residual

    def _depthwise_parameters(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Depthwise weight [C, 1, kh, kw] and bias [C] (or None), with an eval-mode ``bn`` folded in."""
        weight, bias = self.depthwise.weight, self.depthwise.bias
        if self.bn is None:
            return weight, bias
        return fold_batchnorm(weight, bias, self.bn)

    def extra_repr(self) -> str:
        reason = self._unfused_reason()
        if reason is not None:
            return f"activation={self.activation!r}, fused=False ({reason}: dw, bn, act, pw run one by one)"
        folded = " (bn folded into the depthwise weights)" if self.bn is not None else ""
        return f"activation={self.activation!r}, fused=True{folded}"


def _bias_pair(bias) -> Tuple[bool, bool]:
    """The constructor's ``bias``: a bool for both convolutions, or (dw_bias, pw_bias)."""
    if isinstance(bias, bool):
        return bias, bias
    if isinstance(bias, (tuple, list)) and len(bias) == 2 and all(isinstance(b, bool) for b in bias):
        return bias[0], bias[1]
    raise TypeError(f"bias must be a bool or a pair of bools (dw_bias, pw_bias), got {bias!r}")


def fold_batchnorm(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d):
    """Folds an eval-mode ``bn`` into the conv before it: returns (weight', bias').

    weight [C, 1, kh, kw], bias [C] or None. With s = gamma / sqrt(running_var + eps):
    weight' = weight * s, bias' = (bias - running_mean) * s + beta. Differentiable in every input, so
    fine-tuning with frozen statistics still trains gamma and beta.
    """
    # Fold in at least fp32 and round once at the end: BN kept in fp32 beside fp16 convs is common
    # (apex's keep_batchnorm_fp32), and rsqrt(var + eps) in fp16 keeps only ~3 digits.
    acc = torch.promote_types(weight.dtype, torch.float32)
    inv_std = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight.to(acc) * inv_std
    shifted = -bn.running_mean.to(acc) if bias is None else bias.to(acc) - bn.running_mean.to(acc)
    new_bias = shifted * scale if bn.bias is None else shifted * scale + bn.bias.to(acc)
    new_weight = weight.to(acc) * scale.reshape(-1, 1, 1, 1)
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def conv_padding(padding, kernel_size, stride, dilation, name: str) -> Tuple[int, int]:
    """``nn.Conv2d``'s padding as the symmetric (ph, pw) pair the fused op takes.

    ``"valid"`` is (0, 0). ``"same"`` (stride 1 only, as in Conv2d) pads dilation*(k-1) in total, the odd
    pixel at the bottom/right; only an even total is symmetric. ValueError naming ``name`` otherwise. The rule is
    the functional form's too (``effikern.ops.dwsep.conv_padding``).
    """
    if padding == "same":
        kernel_size = _checks.pair(kernel_size, "kernel_size", 1)
    return dwsep_ops.conv_padding(padding, kernel_size, stride, dilation, name)


# --- from_modules validation: every message names the argument ---------------------------------------------

def _check_plain(module: nn.Module, name: str) -> None:
    """The fused module reproduces only a layer's math: hooks would silently stop running."""
    if hooks(module):
        raise ValueError(f"{name} has forward/backward hooks, which the fused module would not run")


def _check_conv(conv, name: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"{name} must be an nn.Conv2d, got {type(conv).__name__}")
    for attr in ("weight", "bias"):  # checked before hooks: pruning adds a hook too, and this says more
        value = getattr(conv, attr)
        if value is not None and not isinstance(value, nn.Parameter):
            raise ValueError(
                f"{name}.{attr} is a computed tensor, not an nn.Parameter (pruning or a parametrization?); "
                "remove it first (torch.nn.utils.prune.remove / parametrize.remove_parametrizations)"
            )
    _check_plain(conv, name)


def _check_depthwise(conv, name: str) -> Tuple[int, int]:
    """Validates a depthwise conv; returns its padding as (ph, pw)."""
    _check_conv(conv, name)
    c = conv.in_channels
    if not conv.groups == c == conv.out_channels:
        raise ValueError(
            f"{name} must be depthwise (groups == in_channels == out_channels), got in_channels={c}, "
            f"out_channels={conv.out_channels}, groups={conv.groups}"
        )
    padding = conv_padding(conv.padding, conv.kernel_size, conv.stride, conv.dilation, f"{name}.padding")
    if conv.padding_mode != "zeros" and padding != (0, 0):
        raise ValueError(f"{name} must use padding_mode='zeros', got {conv.padding_mode!r}")
    return padding


def _check_pointwise(conv, depthwise: nn.Conv2d, name: str) -> None:
    _check_conv(conv, name)
    c = depthwise.in_channels
    padding = conv_padding(conv.padding, conv.kernel_size, conv.stride, conv.dilation, f"{name}.padding")
    got = {"kernel_size": conv.kernel_size, "stride": conv.stride, "padding": padding,
           "dilation": conv.dilation, "groups": conv.groups, "in_channels": conv.in_channels}
    want = {"kernel_size": (1, 1), "stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1,
            "in_channels": c}
    bad = [f"{key}={got[key]} (need {want[key]})" for key in want if got[key] != want[key]]
    if bad:
        raise ValueError(f"{name} must be a 1x1 pointwise conv over the depthwise conv's {c} channels: "
                         + ", ".join(bad))
    if conv.weight.dtype != depthwise.weight.dtype or conv.weight.device != depthwise.weight.device:
        raise ValueError(
            f"{name} must have the depthwise conv's dtype and device ({depthwise.weight.dtype}, "
            f"{depthwise.weight.device}), got ({conv.weight.dtype}, {conv.weight.device})"
        )


def _check_bn(bn, channels: int, name: str) -> None:
    if not isinstance(bn, nn.BatchNorm2d):
        raise ValueError(f"{name} must be None or an nn.BatchNorm2d, got {type(bn).__name__}")
    _check_plain(bn, name)
    if bn.num_features != channels:
        raise ValueError(f"{name} must have num_features == {channels} (the depthwise channels), "
                         f"got {bn.num_features}")


def _share_parameters(target: nn.Conv2d, source: nn.Conv2d) -> None:
    target.weight = source.weight
    target.bias = source.bias
