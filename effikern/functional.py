"""Functional API: plain functions over tensors, each backed by a ``torch.ops.effikern`` op."""

from typing import Optional, Union

import torch

from .ops import _autocast, _checks, _eager
from .ops import distill as _distill_ops
from .ops import dwsep as _dwsep_ops
from .ops import sparse as _sparse_ops
from .ops.activation import activation_name

IntOrPair = Union[int, tuple]


def dwsep_conv2d(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    pw_weight: torch.Tensor,
    pw_bias: Optional[torch.Tensor],
    stride: IntOrPair = 1,
    padding: Union[IntOrPair, str] = 0,
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
        stride, dilation: int or (h, w) pair, as in ``F.conv2d``.
        padding: int, (h, w) pair, ``"valid"`` or ``"same"``, as in ``F.conv2d`` (zero padding). ``"same"`` needs
            stride 1, and an even dilation*(k-1) per dimension: ``F.conv2d`` pads an odd total one pixel more at the
            bottom/right, which this op does not (ValueError; pad x with ``F.pad`` first).
        activation: None, "relu", "relu6", "silu", "gelu" (exact erf form) or "hardswish".
        residual: [N, Cout, Ho, Wo] or None, added after the pointwise bias (MobileNetV2's skip).

    Returns:
        [N, Cout, Ho, Wo] in x's dtype and memory format. Under ``torch.autocast`` every input is cast to the
        autocast dtype first (as ``F.conv2d`` is) and the result is in that dtype.
    """
    _checks.tensor(x, "x")  # before anything reads its device
    dtype = _autocast.autocast_dtype([x])
    if dtype is not None:
        x, dw_weight, dw_bias, pw_weight, pw_bias, residual = _autocast.cast(
            [x, dw_weight, dw_bias, pw_weight, pw_bias, residual], dtype)
    with _autocast.off_if(dtype, x):
        args = (x, dw_weight, dw_bias, pw_weight, pw_bias, list(_checks.pair(stride, "stride", 1)),
                list(_dwsep_ops.padding_for(padding, dw_weight, stride, dilation)),
                list(_checks.pair(dilation, "dilation", 1)),
                activation_name(activation), residual)
        if _dwsep_ops.auto_runs_eager(*args):
            _dwsep_ops.check_args(*args)  # the op's errors, then PyTorch's own autograd (see auto_runs_eager)
            return _dwsep_ops.reference(*args)
        if _eager.must_dispatch([x, dw_weight, dw_bias, pw_weight, pw_bias, residual], autograd=False):
            return torch.ops.effikern.dwsep_conv2d(*args)
        return _dwsep_ops.EagerDwsepConv2d.apply(*args)  # the op without the dispatcher's cost (see there)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Knowledge-distillation loss, fused: the student's gradient is computed with the loss, in one kernel.

    With a target, per token::

        loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, target)

    i.e. ``alpha * T**2 * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
    + (1 - alpha) * F.cross_entropy(s, target)`` for 2-D logits and ``reduction="mean"``. CE uses the
    untempered student logits. Without a target (``target=None``) the loss is ``T^2 * KL`` alone and ``alpha``
    is ignored (there is no hard term to weigh it against), and every token counts.

    Tokens whose target is ``ignore_index`` count in neither term. Gradients flow to ``student_logits`` only;
    ``teacher_logits`` never gets one, whether or not it requires grad.

    Args:
        student_logits: [..., V]; float32, float16 or bfloat16 (float64 on the torch and cpp backends).
        teacher_logits: [..., V], same shape, dtype and device as ``student_logits``.
        target: [...] int64 class indices in [0, V) or ``ignore_index``; or None (the default).
        temperature: T > 0, softens both distributions of the soft term. Default 1.0 (no softening).
        alpha: in [0, 1], the soft term's weight. Default 0.5.
        ignore_index: target value of tokens that do not count. Default -100, as ``F.cross_entropy``.
        reduction: "mean" (over counted tokens; 0, with zero gradient, when none counts; the default), "sum", or
            "none".
        inplace_backward: True: backward scales the [..., V] gradient the forward kernel saved in place and hands
            that buffer on as the student's gradient, rather than writing a scaled copy: peak memory is one [..., V]
            buffer in the logits' dtype less (it halves the loss's own peak). The graph can then be backpropagated
            once: a second backward (retain_graph=True) raises. No effect where ``auto`` runs the eager formula
            (see ``effikern info``), whose backward is autograd's. Default False.

    Returns:
        float32 (float64 for float64 logits): a scalar, or [...] per token for "none" (ignored tokens 0).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ('mean', 'sum', 'none'), got {reduction!r}")
    _distill_ops.check_inplace_backward(inplace_backward)  # checked here: the eager path below skips the op
    # The kernels write the student's gradient only when backward can ask for it.
    compute_grad = torch.is_grad_enabled() and bool(getattr(student_logits, "requires_grad", False))
    if isinstance(teacher_logits, torch.Tensor):
        teacher_logits = teacher_logits.detach()  # the teacher is a fixed target, never trained by this loss
    if isinstance(student_logits, torch.Tensor) and _distill_ops.auto_runs_eager(student_logits):
        # The op's errors, then the eager formula (see auto_runs_eager): nothing faster was measured here.
        _, vocab = _distill_ops.check_args(student_logits, teacher_logits, target, temperature, alpha, ignore_index)
        _distill_ops.check_target_values(target, vocab, ignore_index)
        loss = _distill_ops.eager_per_token(student_logits, teacher_logits, target, temperature, alpha, ignore_index)
    else:
        loss, _ = torch.ops.effikern.distillation_loss(
            student_logits, teacher_logits, target, temperature, alpha, ignore_index, compute_grad,
            inplace_backward,
        )
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    # Both terms are averaged over the same count: the tokens that are not ignored (every token without a
    # target). Clamped to 1 so that a batch with none gives 0 and a zero gradient, not 0/0.
    count = loss.numel() if target is None else (target != ignore_index).sum()
    return total / (count.clamp(min=1) if isinstance(count, torch.Tensor) else max(count, 1))


def sparse_linear(x: torch.Tensor, sparse_weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x @ W.T + bias`` with W a pruned weight held sparse (skips the pruned work).

    Args:
        x: [..., in_features]; float32, float16 or bfloat16 (float64 on the torch and cpp backends); the sparse
            weight's dtype and device.
        sparse_weight: an :class:`effikern.sparse.SparseWeight` [out_features, in_features] ("unstructured",
            "block" or "2:4"), e.g. from ``effikern.sparse.from_dense(weight, mask, format)``.
        bias: [out_features] or None.

    Returns:
        [..., out_features] in x's dtype. Gradients flow to x, ``sparse_weight.values`` (at the kept positions
        only) and bias. Under ``torch.autocast``, x, the weight values and bias are cast to the autocast dtype
        first (as ``F.linear`` is) and the result is in that dtype.
    """
    from .sparse import SparseWeight

    if not isinstance(sparse_weight, SparseWeight):
        raise TypeError(f"sparse_weight must be an effikern.sparse.SparseWeight (effikern.sparse.from_dense), got "
                        f"{type(sparse_weight).__name__}")
    _checks.tensor(x, "x")
    w = sparse_weight
    values = w.values
    dtype = _autocast.autocast_dtype([x])
    if dtype is not None:
        x, values, bias = _autocast.cast([x, values, bias], dtype)
    with _autocast.off_if(dtype, x):
        args = (x, values, w.crow, w.col, w.row, w.t_crow, w.t_row, w.t_perm, w.value_mask, bias, w.format,
                w.out_features, w.in_features)
        if _eager.must_dispatch([x, values, bias], autograd=False):
            return torch.ops.effikern.sparse_linear(*args)
        return _sparse_ops.EagerSparseLinear.apply(*args)  # the op without the dispatcher's cost (see there)
