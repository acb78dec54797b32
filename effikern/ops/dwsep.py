"""``torch.ops.effikern.dwsep_conv2d``: fused depthwise-separable convolution.

    y = pw(act(dw(x) + dw_bias)) + pw_bias [+ residual]

Shapes: x [N, C, H, W] (NCHW or channels_last); dw_weight [C, 1, kh, kw]; dw_bias [C] or None;
pw_weight [Cout, C, 1, 1]; pw_bias [Cout] or None; residual [N, Cout, Ho, Wo] or None;
y [N, Cout, Ho, Wo] in x's memory format, with Ho = (H + 2*ph - dh*(kh-1) - 1) // sh + 1 (likewise Wo).

Layers (DESIGN.md): kernels in csrc/cpu, csrc/cuda and kernels/dwsep.py; this file holds the op schema,
the argument checks (once, here), the fake function for torch.compile, autograd, and the backend table.
Backward recomputes the depthwise output from x instead of saving it: it saves N*C*Ho*Wo activations.
"""

import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _ext, backends
from . import _checks, _eager
from ._device import on_device_of
from .activation import CODES, activation_backward, apply_activation

OP = "dwsep_conv2d"
_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_ALL_FLOAT = _HALF_AND_FLOAT + (torch.float64,)


# Stride, padding and dilation above this are refused: the kernels' index arithmetic (H + 2 * padding, ...) is
# 64-bit, and no real convolution comes near it.
_MAX_GEOMETRY = 2**31 - 1


def check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation, residual):
    """Validates every argument of the op; returns the output shape (N, Cout, Ho, Wo)."""
    _checks.tensor(x, "x", 4)
    _checks.floating(x, "x", _ALL_FLOAT)
    n, c, h, w = x.shape
    if c == 0:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if h == 0 or w == 0:  # as F.conv2d: only the batch may be empty
        raise ValueError(f"x must have an image of at least 1x1 (H, W >= 1), got shape {tuple(x.shape)}")
    _checks.tensor(dw_weight, "dw_weight", 4)
    _checks.tensor(pw_weight, "pw_weight", 4)
    if dw_weight.shape[1] == 1 and dw_weight.shape[0] not in (0, c):
        # A valid depthwise weight for another channel count: either tensor may be the wrong one (a module fed the
        # wrong input, most often), so the message names both rather than blaming the weight.
        raise ValueError(
            f"x's channel count does not match dw_weight's: x has C={c} (shape {tuple(x.shape)}), dw_weight has "
            f"C={dw_weight.shape[0]} (shape {tuple(dw_weight.shape)}); the depthwise weight of x [N, C, H, W] is "
            f"[C, 1, kh, kw]"
        )
    if dw_weight.shape[1] != 1 or dw_weight.shape[0] != c:
        raise ValueError(
            f"dw_weight must have shape [C={c}, 1, kh, kw] (depthwise, depth multiplier 1), "
            f"got {tuple(dw_weight.shape)}"
        )
    kh, kw = dw_weight.shape[2:]
    if kh < 1 or kw < 1:
        raise ValueError(f"dw_weight must have a kernel of at least 1x1, got {tuple(dw_weight.shape)}")
    cout = pw_weight.shape[0]
    if cout < 1:
        raise ValueError(f"pw_weight must have at least one output channel, got {tuple(pw_weight.shape)}")
    _checks.shape(pw_weight, "pw_weight", (cout, c, 1, 1), f"[Cout, C={c}, 1, 1]")
    if dw_bias is not None:
        _checks.tensor(dw_bias, "dw_bias")
        _checks.shape(dw_bias, "dw_bias", (c,), f"[C={c}]")
    if pw_bias is not None:
        _checks.tensor(pw_bias, "pw_bias")
        _checks.shape(pw_bias, "pw_bias", (cout,), f"[Cout={cout}]")
    _checks.same_dtype_device(x, "x", dw_weight=dw_weight, dw_bias=dw_bias, pw_weight=pw_weight,
                              pw_bias=pw_bias, residual=residual)
    sh, sw = _checks.pair(stride, "stride", 1, _MAX_GEOMETRY)
    ph, pw = _checks.pair(padding, "padding", 0, _MAX_GEOMETRY)
    dh, dw = _checks.pair(dilation, "dilation", 1, _MAX_GEOMETRY)
    if activation not in CODES:
        raise ValueError(f"activation must be one of {sorted(CODES)}, got {activation!r}")
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if span_h > h + 2 * ph or span_w > w + 2 * pw:
        raise ValueError(
            f"dw_weight's kernel spans {span_h}x{span_w} (kernel {kh}x{kw}, dilation {(dh, dw)}), larger than "
            f"the padded input {h + 2 * ph}x{w + 2 * pw} (x {h}x{w}, padding {(ph, pw)})"
        )
    out = (n, cout, (h + 2 * ph - span_h) // sh + 1, (w + 2 * pw - span_w) // sw + 1)
    if residual is not None:
        _checks.tensor(residual, "residual", 4)
        _checks.shape(residual, "residual", out, "the output's shape [N, Cout, Ho, Wo]")
    return out


def conv_padding(padding, kernel_size: Tuple[int, int], stride, dilation, name: str) -> Tuple[int, int]:
    """``F.conv2d``'s padding (int, (h, w), ``"valid"`` or ``"same"``) as the symmetric (ph, pw) pair the op takes.

    ``kernel_size``: (kh, kw), each >= 1. ``"valid"`` is (0, 0). ``"same"`` needs stride 1 (as in ``F.conv2d``) and
    pads dilation*(k-1) in total per dimension; ``F.conv2d`` puts an odd total's extra pixel at the bottom/right,
    which the op's symmetric padding cannot express, so an odd total is refused rather than giving an output of
    another size. Errors name ``name``.
    """
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if _checks.pair(stride, "stride", 1) != (1, 1):
            raise ValueError(f"{name}='same' needs stride 1, as in F.conv2d; got stride {stride}")
        dilation = _checks.pair(dilation, "dilation", 1)
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        if any(t % 2 for t in totals):
            raise ValueError(
                f"{name}='same' needs an even dilation*(kernel-1) in each dimension, which pads both sides equally; "
                f"got kernel {tuple(kernel_size)}, dilation {dilation}: {tuple(totals)} pixels, which F.conv2d "
                "splits unevenly (the extra one bottom/right); pad x with F.pad first and give integer padding"
            )
        return totals[0] // 2, totals[1] // 2
    if isinstance(padding, str):
        raise ValueError(f"{name} must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    return _checks.pair(padding, name, 0)


def padding_for(padding, dw_weight, stride, dilation) -> Tuple[int, int]:
    """The functional form's ``padding`` argument as (ph, pw), reading ``"same"``'s kernel size off ``dw_weight``."""
    if not isinstance(padding, str):
        return _checks.pair(padding, "padding", 0)
    _checks.tensor(dw_weight, "dw_weight", 4)
    kernel = tuple(dw_weight.shape[2:])
    if min(kernel) < 1:
        raise ValueError(f"dw_weight must have a kernel of at least 1x1, got {tuple(dw_weight.shape)}")
    return conv_padding(padding, kernel, stride, dilation, "padding")


def reference(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation, residual):
    """The ``torch`` backend: two ``F.conv2d`` calls. ``activation`` is a name from CODES."""
    z = F.conv2d(x, dw_weight, dw_bias, stride, padding, dilation, groups=x.shape[1])
    y = F.conv2d(apply_activation(z, activation), pw_weight, pw_bias)
    return y if residual is None else y + residual


def reference_backward(grad_y, x, dw_weight, dw_bias, pw_weight, stride, padding, dilation, activation):
    """Gradients of :func:`reference`: (grad_x, grad_dw_w, grad_dw_b, grad_pw_w, grad_pw_b).

    Written out with torch's own backward ops rather than autograd, which does not run inside a custom op: one
    ``convolution_backward`` per convolution (input, weight and bias gradients together), the calls autograd makes
    for the unfused pair of ``nn.Conv2d`` (instead of einsums and separate input/weight gradient calls).
    """
    c = x.shape[1]
    z = F.conv2d(x, dw_weight, dw_bias, stride, padding, dilation, groups=c)
    a = apply_activation(z, activation)
    grad_a, grad_pw, grad_pw_b = torch.ops.aten.convolution_backward(
        grad_y, a, pw_weight, [pw_weight.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True])
    grad_z = activation_backward(grad_a, z, activation)
    grad_x, grad_dw, grad_dw_b = torch.ops.aten.convolution_backward(
        grad_z, x, dw_weight, [c], list(stride), list(padding), list(dilation), False, [0, 0], c, [True, True, True])
    return grad_x, grad_dw, grad_dw_b, grad_pw, grad_pw_b


# --- backends -----------------------------------------------------------------------------------------
# Each loader returns a callable with the kernel contract: (x, dw_w, dw_b, pw_w, pw_b, stride, padding,
# dilation, activation_code, residual) -> y, and the backward one with the matching arguments.

def _cuda_stream_args(x):
    # The CUDA glue in csrc/cuda takes the raw stream from here rather than from c10/cuda headers, which
    # lets it compile (and be compile-checked) against the CPU torch wheel on CI.
    return torch.cuda.current_stream(x.device).cuda_stream


def _load_torch():
    names = {v: k for k, v in CODES.items()}

    def fwd(x, dw_w, dw_b, pw_w, pw_b, stride, padding, dilation, act, residual):
        return reference(x, dw_w, dw_b, pw_w, pw_b, stride, padding, dilation, names[act], residual)

    def bwd(g, x, dw_w, dw_b, pw_w, stride, padding, dilation, act):
        return reference_backward(g, x, dw_w, dw_b, pw_w, stride, padding, dilation, names[act])

    return fwd, bwd


def _load_cpp():
    ext = _ext.require("cpu")
    return ext.dwsep_fwd_cpu, ext.dwsep_bwd_cpu


def _load_cuda():
    ext = _ext.require("cuda")

    def fwd(x, *args):
        with torch.cuda.device(x.device):
            return ext.dwsep_fwd_cuda(x, *args, _cuda_stream_args(x))

    def bwd(g, x, *args):
        with torch.cuda.device(x.device):
            return ext.dwsep_bwd_cuda(g, x, *args, _cuda_stream_args(x))

    return fwd, bwd


def _load_triton():
    from ..kernels import dwsep as kernels

    return on_device_of(kernels.dwsep_fwd_triton), on_device_of(kernels.dwsep_bwd_triton)


backends.register(OP, "torch", ("cpu", "cuda"), _ALL_FLOAT, _load_torch)
backends.register(OP, "cpp", ("cpu",), _ALL_FLOAT, _load_cpp)
backends.register(OP, "triton", ("cpu", "cuda"), _HALF_AND_FLOAT, _load_triton)
backends.register(OP, "cuda", ("cuda",), _HALF_AND_FLOAT, _load_cuda)


# --- the ops --------------------------------------------------------------------------------------------

def _empty(shape, like, fmt):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _conv(
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    pw_weight: torch.Tensor,
    pw_bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    activation: str,
    residual: Optional[torch.Tensor],
) -> torch.Tensor:
    """The fused op; see the module docstring. Prefer ``effikern.functional.dwsep_conv2d``."""
    out_shape = check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation,
                           residual)
    fmt = _checks.memory_format_of(x)
    # Resolved first: a chosen backend that cannot run this call says so, for an empty batch too.
    _, (fwd, _) = backends.resolve(OP, x, _forward_case(out_shape))
    if x.shape[0] == 0:
        return _empty(out_shape, x, fmt)
    y = fwd(
        x.contiguous(memory_format=fmt), dw_weight.contiguous(), _contig(dw_bias), pw_weight.contiguous(),
        _contig(pw_bias), list(stride), list(padding), list(dilation), CODES[activation],
        None if residual is None else residual.contiguous(memory_format=fmt),
    )
    # Backends return y in x's layout; this is a no-op then, and pins the layout the fake function promises.
    return y.contiguous(memory_format=fmt)


dwsep_conv2d = torch.library.custom_op("effikern::dwsep_conv2d", _conv, mutates_args=())


def auto_runs_eager(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation,
                    residual) -> bool:
    """Whether this call (the op's arguments) should run as plain eager PyTorch: under ``auto`` when both passes
    would pick the ``torch`` backend for its shape classes (a device, dtype and shape where no kernel was
    measured faster: bf16 on CPU at stride 1 with kernels below 5x5, any GPU for now), and not while tracing. The
    op's ``torch`` backend recomputes dw(x) in backward, as the fused kernels do to save memory; autograd over the
    two convolutions saves it instead, which is what the unfused nn.Conv2d pair costs. Hand runs of the bf16
    MobileNet example (CPU, 2 threads, three each; not in a results file): through the op 730-850 images/s,
    eager 880-960, the PyTorch baseline 900-1050. Raises the op's argument errors when it has to look at shapes."""
    if not isinstance(x, torch.Tensor) or backends.get_backend() != "auto" or _eager.tracing():
        return False
    device, dtype = x.device.type, x.dtype
    picks = {backends.choose(OP, device, dtype, case) for case in (None,) + SHAPE_CASES}
    if picks != {"torch"} and "torch" in picks:  # it depends on the shape classes of this call
        out_shape = check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation,
                               residual)
        picks = {backends.choose(OP, device, dtype, _forward_case(out_shape)),
                 backends.choose(OP, device, dtype, _backward_case(dw_weight, stride))}
    return picks == {"torch"}


# Output images this small or smaller form the "forward_small_image" class auto may route elsewhere (_auto.py).
SMALL_IMAGE_PIXELS = 14 * 14
# Strided calls and kernels at least this wide or tall form the "backward_strided_or_large_kernel" class: the
# backwards where PyTorch's depthwise kernels are at their slowest (_auto.py).
LARGE_KERNEL = 5
# Every shape class an auto entry may name (effikern/_auto.py _CASES).
SHAPE_CASES = ("forward_small_image", "backward_strided_or_large_kernel")


def _forward_case(out_shape) -> Optional[str]:
    return "forward_small_image" if out_shape[2] * out_shape[3] <= SMALL_IMAGE_PIXELS else None


def _backward_case(dw_weight, stride) -> Optional[str]:
    large = max(dw_weight.shape[2], dw_weight.shape[3]) >= LARGE_KERNEL
    return "backward_strided_or_large_kernel" if max(stride) > 1 or large else None


@dwsep_conv2d.register_fake
def _(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation, residual):
    out_shape = check_args(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation,
                           residual)
    return _empty(out_shape, x, _checks.memory_format_of(x))


def _contig(t):
    return None if t is None else t.contiguous()


def _conv_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: Optional[torch.Tensor],
    pw_weight: torch.Tensor,
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    activation: str,
    backend: str = "",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of dwsep_conv2d w.r.t. (x, dw_weight, dw_bias, pw_weight, pw_bias); recomputes dw(x).

    ``backend``: the backend choice to resolve under ("": the current one). Autograd passes the choice that was in
    force at the forward, because the backward may run on another thread (autograd's device threads for CUDA
    tensors) or after the ``with set_backend(...)`` block has ended, where the current choice is not the user's.

    grad_y: [N, Cout, Ho, Wo]. Returns grad_x [N, C, H, W] in x's layout, grad_dw_weight [C, 1, kh, kw],
    grad_dw_bias [C], grad_pw_weight [Cout, C, 1, 1], grad_pw_bias [Cout], all in x's dtype. The bias
    gradients are returned even when the bias is None (autograd drops them).
    """
    out_shape = check_args(x, dw_weight, dw_bias, pw_weight, None, stride, padding, dilation, activation, None)
    _checks.tensor(grad_y, "grad_y", 4)
    _checks.shape(grad_y, "grad_y", out_shape, "the output's shape")
    _checks.same_dtype_device(x, "x", grad_y=grad_y)
    fmt = _checks.memory_format_of(x)
    _, (_, bwd) = backends.resolve(OP, x, _backward_case(dw_weight, stride), backend)  # first, as in the forward
    if x.shape[0] == 0:
        return _zero_grads(x, dw_weight, pw_weight, fmt)
    grads = bwd(
        grad_y.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt), dw_weight.contiguous(),
        _contig(dw_bias), pw_weight.contiguous(), list(stride), list(padding), list(dilation), CODES[activation],
    )
    gx, gdw, gdwb, gpw, gpwb = grads
    return gx.contiguous(memory_format=fmt), gdw.contiguous(), gdwb.contiguous(), gpw.contiguous(), gpwb.contiguous()


dwsep_conv2d_backward = torch.library.custom_op("effikern::dwsep_conv2d_backward", _conv_backward, mutates_args=())


def _zero_grads(x, dw_weight, pw_weight, fmt):
    c, cout = dw_weight.shape[0], pw_weight.shape[0]
    return (
        torch.zeros(x.shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt),
        torch.zeros_like(dw_weight, memory_format=torch.contiguous_format),
        x.new_zeros(c),
        torch.zeros_like(pw_weight, memory_format=torch.contiguous_format),
        x.new_zeros(cout),
    )


@dwsep_conv2d_backward.register_fake
def _(grad_y, x, dw_weight, dw_bias, pw_weight, stride, padding, dilation, activation, backend=""):
    check_args(x, dw_weight, dw_bias, pw_weight, None, stride, padding, dilation, activation, None)
    fmt = _checks.memory_format_of(x)
    return (
        _empty(x.shape, x, fmt),
        _empty(dw_weight.shape, x, torch.contiguous_format),
        x.new_empty(dw_weight.shape[0]),
        _empty(pw_weight.shape, x, torch.contiguous_format),
        x.new_empty(pw_weight.shape[0]),
    )


def _setup_context(ctx, inputs, output):
    x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation, residual = inputs
    ctx.save_for_backward(x, dw_weight, dw_bias, pw_weight)
    ctx.conv_args = (list(stride), list(padding), list(dilation), activation)
    ctx.has_bias = (dw_bias is not None, pw_bias is not None)
    ctx.has_residual = residual is not None
    # The choice in force now, for the backward (see _conv_backward's ``backend``). Under torch.compile this runs
    # while tracing: the compiled backward keeps the choice made when it was compiled.
    ctx.backend = backends.get_backend()


def _gradients(ctx, grad_y, conv_backward):
    """Autograd's gradients for the op's 10 inputs, through ``conv_backward`` (the registered backward op, or its
    implementation on the eager path). With ``create_graph=True`` (grad mode on here) they are taken through the
    reference's differentiable PyTorch ops instead (:func:`_differentiable_gradients`)."""
    x, dw_weight, dw_bias, pw_weight = ctx.saved_tensors
    if torch.is_grad_enabled():
        gx, gdw, gdwb, gpw, gpwb = _differentiable_gradients(grad_y, x, dw_weight, dw_bias, pw_weight, *ctx.conv_args)
    else:
        gx, gdw, gdwb, gpw, gpwb = conv_backward(grad_y, x, dw_weight, dw_bias, pw_weight, *ctx.conv_args,
                                                 ctx.backend)
    has_dw_b, has_pw_b = ctx.has_bias
    return (
        gx, gdw, gdwb if has_dw_b else None, gpw, gpwb if has_pw_b else None,
        None, None, None, None, grad_y if ctx.has_residual else None,
    )


def _differentiable_gradients(grad_y, x, dw_weight, dw_bias, pw_weight, stride, padding, dilation, activation):
    """The op's gradients as a graph, for a backward with create_graph=True (double backward: gradient penalties,
    higher-order derivatives): autograd through :func:`reference` (two ``F.conv2d``), which PyTorch can
    differentiate again. The fused kernels' gradients carry no graph. Slower than the kernels, and only taken when
    asked for. Gradients for inputs that do not require grad are None."""
    inputs = [x, dw_weight, dw_bias, pw_weight]
    wanted = [t is not None and t.requires_grad for t in inputs]
    with torch.enable_grad():
        y = reference(x, dw_weight, dw_bias, pw_weight, None, stride, padding, dilation, activation, None)
        found = torch.autograd.grad(y, [t for t, w in zip(inputs, wanted) if w], grad_y, create_graph=True,
                                    allow_unused=True) if any(wanted) else ()
    found = iter(found)
    gx, gdw, gdwb, gpw = [next(found) if w else None for w in wanted]
    return gx, gdw, gdwb, gpw, grad_y.sum((0, 2, 3))


def _backward(ctx, grad_y):
    return _gradients(ctx, grad_y, torch.ops.effikern.dwsep_conv2d_backward)


dwsep_conv2d.register_autograd(_backward, setup_context=_setup_context)


# The op minus the dispatcher, for plain eager calls (``functional.dwsep_conv2d`` decides when): through the
# registered op a tiny block's forward + backward took ~310 us on CPU, for ~30 us of kernels, the custom op's Python
# autograd layer.
EagerDwsepConv2d = _eager.op_without_dispatcher(
    "EagerDwsepConv2d", _conv, _setup_context, functools.partial(_gradients, conv_backward=_conv_backward))
