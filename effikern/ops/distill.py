"""``torch.ops.effikern.distillation_loss``: knowledge-distillation loss per token, with its gradient.

Per token i, with p = softmax(teacher_i / T) and q = softmax(student_i / T):

    loss_i = w_soft * T^2 * KL(p || q) + w_hard * CE(student_i, target_i)
    grad_i = d loss_i / d student_i = w_soft * T * (q - p) + w_hard * (softmax(student_i) - onehot(target_i))

(w_soft, w_hard) = (alpha, 1 - alpha) with a target and (1, 0) without one. CE uses the untempered student
logits. Tokens whose target is ``ignore_index`` get loss 0 and gradient 0. The teacher gets no gradient.

Shapes: student, teacher [..., V] (same shape, dtype and device); target [...] int64 or None.
Returns (loss [...] float32 (float64 for float64 logits), grad [..., V] in the logits' dtype, or an empty [0]
tensor when ``compute_grad`` is False). The reduction over tokens (mean over counted tokens, sum, none) is
``effikern.functional.distillation_loss``'s, done on these per-token losses.

Why the gradient comes out of the forward: a row's loss and its gradient need the same softmax statistics, so
the cpp and triton kernels compute both in one visit to the row (a statistics pass, then a pass that writes the
gradient): the logits are not read again in backward, and no [tokens, vocab] float32 intermediate exists (the
``torch`` reference does keep some). The gradient is saved for backward, which scales it by grad_loss per token
(``distillation_loss_backward``): one elementwise pass at memory bandwidth, the same PyTorch call on every
backend. By default it is not done in place on the saved gradient, which would give wrong gradients to a second
backward (retain_graph=True); the price is one more [tokens, vocab] buffer in the logits' dtype during backward.
With ``inplace_backward=True`` the saved gradient is scaled in place (``distillation_loss_backward_``) and handed
on as the student's gradient: the step then holds one [tokens, vocab] buffer at its peak, and a second backward
through the same graph raises instead of computing from the already-scaled buffer.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _ext, backends
from . import _checks, _eager
from ._device import on_device_of

OP = "distillation_loss"
REDUCTIONS = ("mean", "sum", "none")
_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_ALL_FLOAT = _HALF_AND_FLOAT + (torch.float64,)


def check_options(temperature, alpha, ignore_index, reduction="none", inplace_backward=False):
    """Validates the scalar options shared by the op, the function and the module."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float in [0, 1], got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_inplace_backward(inplace_backward)


def check_inplace_backward(inplace_backward):
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {inplace_backward!r}")


def check_args(student, teacher, target, temperature, alpha, ignore_index):
    """Validates every argument of the op; returns (tokens M, vocab V)."""
    _checks.tensor(student, "student_logits")
    _checks.tensor(teacher, "teacher_logits")
    if student.dim() < 1:
        raise ValueError("student_logits must have shape [..., V], got a 0-D tensor")
    _checks.floating(student, "student_logits", _ALL_FLOAT)
    _checks.same_dtype_device(student, "student_logits", teacher_logits=teacher)
    _checks.shape(teacher, "teacher_logits", student.shape, "the shape of student_logits")
    vocab = student.shape[-1]
    if vocab < 1:
        raise ValueError(f"student_logits must have at least one class (V >= 1), got shape "
                         f"{tuple(student.shape)}")
    if target is not None:
        _checks.tensor(target, "target")
        if target.dtype != torch.int64:
            raise TypeError(f"target must hold int64 class indices, got dtype {str(target.dtype)[6:]}")
        _checks.shape(target, "target", student.shape[:-1], "student_logits' shape without the class dim")
        if target.device != student.device:
            raise ValueError(f"target must be on the device of student_logits ({student.device}), "
                             f"got {target.device}")
    check_options(temperature, alpha, ignore_index)
    return student.numel() // vocab, vocab


def check_target_values(target, vocab, ignore_index):
    # Data-dependent, so not in check_args (the fake function cannot see values); on CPU it costs one pass
    # over M ints. On CUDA it would cost a host sync every step: there the kernels write a NaN loss instead.
    if target is None or target.device.type != "cpu":
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bad.any():
        value = target[bad][0].item()
        raise ValueError(f"target must hold class indices in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {value}")


def weights(target, alpha) -> Tuple[float, float]:
    """(w_soft, w_hard): (alpha, 1 - alpha) with a target, (1, 0) without (the loss is then T^2 * KL)."""
    return (float(alpha), 1.0 - float(alpha)) if target is not None else (1.0, 0.0)


def reference(student, teacher, target, temperature, soft_weight, hard_weight, ignore_index, compute_grad):
    """The ``torch`` backend: the eager formula per token and its gradient written out.

    student, teacher: [M, V]; target: [M] or None. Math in float32 (float64 for float64 logits). Returns
    (loss [M], grad [M, V] in the logits' dtype or empty [0]); see the module docstring.
    """
    math_dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(math_dtype), teacher.to(math_dtype)
    log_q = F.log_softmax(s / temperature, dim=-1)
    p = F.softmax(t / temperature, dim=-1)
    loss = soft_weight * temperature**2 * F.kl_div(log_q, p, reduction="none").sum(-1)
    if target is not None:
        counted = target != ignore_index
        ce = F.cross_entropy(s, target, ignore_index=ignore_index, reduction="none")
        loss = torch.where(counted, loss + hard_weight * ce, 0.0)
    if not compute_grad:
        return loss, student.new_empty(0)
    grad = soft_weight * temperature * (log_q.exp() - p)
    if target is not None:
        # d CE / d s = softmax(s) - onehot(target); ignored rows are zeroed below, whatever index they carry.
        hard = F.softmax(s, dim=-1).scatter_add_(
            -1, target.clamp(0, s.shape[-1] - 1)[:, None], s.new_full((s.shape[0], 1), -1.0))
        grad = torch.where(counted[:, None], grad + hard_weight * hard, 0.0)
    return loss, grad.to(student.dtype)


def auto_runs_eager(student: torch.Tensor) -> bool:
    """Whether a call on ``student`` should run as the plain eager formula (:func:`eager_per_token`), autograd
    doing the backward: under ``auto`` where it would pick the ``torch`` backend (no kernel measured faster
    there: float64 on CPU, any GPU until one is lent), and not while tracing. The ``torch`` backend is the
    reference the kernels are tested against, not a fast path: it writes the gradient out in float32 and ran
    0.21-0.53x the eager formula in bf16 on CPU (benchmarks/results/kd-bf16/cpu-AMD-EPYC-2t.json)."""
    if backends.get_backend() != "auto" or _eager.tracing():
        return False
    return backends.choose(OP, student.device.type, student.dtype) == "torch"


def eager_per_token(student, teacher, target, temperature, alpha, ignore_index):
    """The per-token loss [...] as a user writes it today: PyTorch ops in the logits' dtype, autograd doing the
    backward (so it flows to ``student`` as it does through the op). Arguments as the op's, already checked.
    Returns float32 (float64 for float64 logits), as the op does; the row sums are accumulated in that dtype."""
    soft_weight, hard_weight = weights(target, alpha)
    log_q = F.log_softmax(student / temperature, dim=-1)
    p = F.softmax(teacher / temperature, dim=-1)
    loss_dtype = _loss_dtype(student)
    loss = (soft_weight * temperature**2) * F.kl_div(log_q, p, reduction="none").sum(-1, dtype=loss_dtype)
    if target is not None:
        vocab = student.shape[-1]
        ce = F.cross_entropy(student.reshape(-1, vocab), target.reshape(-1), ignore_index=ignore_index,
                             reduction="none").reshape(target.shape)
        loss = torch.where(target != ignore_index, loss + hard_weight * ce.to(loss_dtype), 0.0)
    return loss


# --- backends -----------------------------------------------------------------------------------------
# Each loader returns a callable with the kernel contract: (student [M, V], teacher [M, V], target [M] int64
# or None, temperature, soft_weight, hard_weight, ignore_index, compute_grad) -> (loss [M], grad [M, V] or
# [0]), inputs contiguous.

def _load_torch():
    return reference


def _load_cpp():
    return _ext.require("cpu").distill_fwd_cpu


def _load_triton():
    from ..kernels import distill as kernels

    return on_device_of(kernels.distill_fwd_triton)


backends.register(OP, "torch", ("cpu", "cuda"), _ALL_FLOAT, _load_torch)
backends.register(OP, "cpp", ("cpu",), _ALL_FLOAT, _load_cpp)
backends.register(OP, "triton", ("cpu", "cuda"), _HALF_AND_FLOAT, _load_triton)


# --- the ops --------------------------------------------------------------------------------------------

def _loss_dtype(student):
    return torch.float64 if student.dtype == torch.float64 else torch.float32


@torch.library.custom_op("effikern::distillation_loss", mutates_args=())
def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    temperature: float,
    alpha: float,
    ignore_index: int,
    compute_grad: bool,
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and gradient (module docstring). Prefer ``effikern.functional.distillation_loss``.

    ``inplace_backward`` only changes the backward (module docstring); the forward ignores it."""
    tokens, vocab = check_args(student, teacher, target, temperature, alpha, ignore_index)
    check_target_values(target, vocab, ignore_index)
    lead = student.shape[:-1]
    _, fwd = backends.resolve(OP, student)  # first: a backend that cannot run this call says so, even for no tokens
    if tokens == 0:
        grad = student.new_empty(student.shape if compute_grad else (0,))
        return student.new_empty(lead, dtype=_loss_dtype(student)), grad
    soft_weight, hard_weight = weights(target, alpha)
    loss, grad = fwd(
        student.reshape(tokens, vocab).contiguous(), teacher.reshape(tokens, vocab).contiguous(),
        None if target is None else target.reshape(tokens).contiguous(),
        float(temperature), soft_weight, hard_weight, int(ignore_index), bool(compute_grad),
    )
    return loss.reshape(lead), grad.reshape(student.shape) if compute_grad else grad


@distillation_loss.register_fake
def _(student, teacher, target, temperature, alpha, ignore_index, compute_grad, inplace_backward=False):
    check_args(student, teacher, target, temperature, alpha, ignore_index)
    grad = student.new_empty(student.shape if compute_grad else (0,))
    return student.new_empty(student.shape[:-1], dtype=_loss_dtype(student)), grad


@torch.library.custom_op("effikern::distillation_loss_backward", mutates_args=())
def distillation_loss_backward(grad_loss: torch.Tensor, grad_student: torch.Tensor) -> torch.Tensor:
    """grad_student * grad_loss[..., None], in grad_student's dtype.

    grad_loss: [...] (float32/float64); grad_student: [..., V] from ``distillation_loss``. The product is
    taken in float32 and rounded once (``out=`` in the low dtype): neither a [..., V] float32 temporary (on CPU,
    row chunks bound PyTorch's: _row_chunks) nor a bf16-rounded scale, which would add an error of 2^-9 to every
    element.
    """
    _check_backward_args(grad_loss, grad_student)
    return _scale_rows(grad_loss, grad_student, _empty_output_like(grad_student))


@torch.library.custom_op("effikern::distillation_loss_backward_", mutates_args=("grad_student",))
def distillation_loss_backward_(grad_loss: torch.Tensor, grad_student: torch.Tensor) -> None:
    """grad_student *= grad_loss[..., None], in place, the product taken in float32 and rounded once.

    grad_loss: [...] (float32/float64); grad_student: [..., V] from ``distillation_loss``, overwritten.
    """
    _check_backward_args(grad_loss, grad_student)
    _scale_rows(grad_loss, grad_student, grad_student)


# On CPU, a product of half-precision and float32 tensors written to a half-precision output is computed into a
# float32 temporary the size of the output, then cast (TensorIterator's common-dtype output): 500 MiB at 1024 x
# 128256 bf16, more than the gradient itself (the step's peak was above the eager formula's). With the extension
# built, csrc/cpu/scale_rows_cpu.cpp scales the rows with no temporary at all. Without it, rows go in chunks of at
# most this many elements, which bounds each temporary at 16 MiB (measured: 47 MiB above the gradient at 256 x
# 128256 bf16, against 250 for one product; a process's first call can show more, while glibc's mmap threshold
# adapts). GPUs cast inside the kernel: one chunk.
_CPU_MIXED_CHUNK = 1 << 22


def _row_chunks(grad_student):
    """Slices over the rows of grad_student viewed as [tokens, V] (every leading dim flattened) that cover them:
    one slice on GPU and for float32/float64, chunks of at most _CPU_MIXED_CHUNK elements otherwise."""
    vocab = grad_student.shape[-1] if grad_student.dim() else 1
    rows = grad_student.numel() // max(vocab, 1)
    if grad_student.device.type != "cpu" or grad_student.dtype in (torch.float32, torch.float64) or rows == 0:
        return [slice(None)]
    step = max(_CPU_MIXED_CHUNK // max(vocab, 1), 1)
    return [slice(i, i + step) for i in range(0, rows, step)]


def _row_kernel(scale, grad_student):
    """The extension's scale_rows_cpu where it applies (CPU, fp16/bf16 gradient, float32 scale), else None."""
    if grad_student.device.type != "cpu" or grad_student.dtype not in (torch.float16, torch.bfloat16):
        return None
    if scale.dtype != torch.float32:  # a float64 scale makes torch's product float64: keep torch's bits
        return None
    ext = _ext.extension()
    return getattr(ext, "scale_rows_cpu", None) if ext is not None else None


def _scale_rows(grad_loss, grad_student, out):
    """out = grad_student * grad_loss[..., None], each product in float32 rounded once (torch.mul's bits); out may
    be grad_student itself. CPU half precision: the extension's kernel, else row chunks (_row_chunks). Gradients
    that are not contiguous (so not viewable as [tokens, V]) take one product.

    grad_loss is made contiguous first: it is tiny ([tokens]), and what autograd passes for a mean or sum reduction
    is an expanded (stride 0) tensor. Taken as a reason for the one-product path, that cost two float32 temporaries
    the size of the gradient: 250 MiB at 256 x 128256 bf16, four times the gradient."""
    if grad_student.dim() == 0 or not (grad_student.is_contiguous() and out.is_contiguous()):
        return torch.mul(grad_student, grad_loss.unsqueeze(-1), out=out)
    rows, vocab = math.prod(grad_student.shape[:-1]), grad_student.shape[-1]  # (view(-1, 0) is ambiguous)
    g, o, sc = grad_student.view(rows, vocab), out.view(rows, vocab), grad_loss.reshape(rows, 1).contiguous()
    kernel = _row_kernel(sc, grad_student)
    if kernel is not None:
        kernel(sc.reshape(-1), g, o)
        return out
    for chunk in _row_chunks(grad_student):
        torch.mul(g[chunk], sc[chunk], out=o[chunk])
    return out


@distillation_loss_backward_.register_fake
def _(grad_loss, grad_student):
    _check_backward_args(grad_loss, grad_student)


def _empty_output_like(t):
    """torch.empty_like(t); on CPU with the extension built, advised for huge pages (csrc/cpu/output_alloc.h): a
    fresh [tokens, V] gradient faulted in 4 KiB pages cost more than the multiply (1024 x 128256 bf16: 64k faults)."""
    ext = _ext.extension() if t.device.type == "cpu" else None
    return ext.empty_output_like(t) if ext is not None else torch.empty_like(t)


def _check_backward_args(grad_loss, grad_student):
    _checks.tensor(grad_loss, "grad_loss")
    _checks.tensor(grad_student, "grad_student")
    _checks.shape(grad_loss, "grad_loss", grad_student.shape[:-1],
                  "grad_student's shape without the class dim")


@distillation_loss_backward.register_fake
def _(grad_loss, grad_student):
    _check_backward_args(grad_loss, grad_student)
    return torch.empty_like(grad_student)


def _setup_context(ctx, inputs, output):
    student, _, _, _, _, _, compute_grad, _ = inputs
    _, grad = output
    ctx.mark_non_differentiable(grad)
    # The gradient output never gets a gradient; without this autograd would pass backward a zero-filled
    # [tokens, V] tensor for it: 31 MiB written (and peak memory up by as much) at 256 x 32000 fp32 per step.
    ctx.set_materialize_grads(False)
    ctx.compute_grad = compute_grad
    ctx.inplace_backward = inputs[7]
    ctx.scaled_in_place = False  # set by the first in-place backward: the saved gradient is spent
    ctx.save_for_backward(grad if compute_grad else None)


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None or not ctx.needs_input_grad[0]:  # no gradient reached the loss, or only the teacher
        # required grad (it gets none)
        return None, None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the saved gradient has no graph to differentiate again
        raise RuntimeError(
            "effikern.distillation_loss is not twice differentiable: the student's gradient is computed by the forward "
            "kernel and saved without a graph (saving the logits instead would double its memory), so a backward "
            "with create_graph=True (double backward, gradient penalties) cannot go through it; compute such a loss "
            "with PyTorch ops (F.kl_div of F.log_softmax and F.softmax, F.cross_entropy)"
        )
    if not ctx.compute_grad:
        raise RuntimeError("effikern.distillation_loss was called with compute_grad=False, so it kept no "
                           "gradient for student_logits; call it with compute_grad=True to backpropagate")
    if ctx.scaled_in_place:  # (checked before unpacking: autograd's version-counter error is vaguer)
        raise RuntimeError(
            "effikern.distillation_loss was called with inplace_backward=True, so its first backward scaled the saved "
            "student gradient in place and a second backward through the same graph (retain_graph=True) cannot "
            "reuse it; call it with inplace_backward=False (the default) to backpropagate more than once")
    (grad,) = ctx.saved_tensors
    # Traced (torch.compile, export, opcheck's fake and functional tensors), the in-place form would be
    # functionalized into a copy anyway, and aliasing the forward's output breaks AOTAutograd's partitioner.
    if not ctx.inplace_backward or torch.compiler.is_compiling() or type(grad) is not torch.Tensor:
        grad_student = torch.ops.effikern.distillation_loss_backward(grad_loss, grad)
        return grad_student, None, None, None, None, None, None, None
    ctx.scaled_in_place = True
    torch.ops.effikern.distillation_loss_backward_(grad_loss, grad)
    return grad, None, None, None, None, None, None, None


distillation_loss.register_autograd(_backward, setup_context=_setup_context)
