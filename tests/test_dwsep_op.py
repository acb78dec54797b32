"""torch.ops.effikern.dwsep_conv2d on every backend against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

import effikern
from effikern.ops import dwsep as dwsep_op
from backend_util import device_for, skip_unavailable, tf32_flags
from oracle import assert_matches, condition, rel_err

F_DWSEP = effikern.functional.dwsep_conv2d
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CL = torch.channels_last
NCHW = torch.contiguous_format

# (N, C, H, W, (kh, kw), stride, padding, dilation, Cout, activation, dw_bias, pw_bias, residual, layout)
CONFIGS = {
    "c3_k3_relu": (2, 3, 7, 7, (3, 3), 1, 1, 1, 5, "relu", True, True, False, NCHW),
    "c17_k5_s2_silu_res": (1, 17, 13, 13, (5, 5), 2, 2, 1, 8, "silu", False, True, True, CL),
    "rect_gelu": (2, 16, 9, 11, (3, 5), (1, 2), (0, 3), (2, 1), 7, "gelu", True, False, False, NCHW),
    "k7_hardswish_res": (1, 8, 17, 17, (7, 7), 1, 3, 1, 16, "hardswish", True, True, True, CL),
    "cout1_relu6": (3, 20, 7, 7, (3, 3), 1, 1, 1, 1, "relu6", True, True, False, CL),
    "k1_none": (1, 5, 4, 4, (1, 1), 1, 0, 1, 3, "none", False, False, False, NCHW),
    "pad_over_kernel": (1, 6, 5, 5, (3, 3), 3, 4, 1, 4, "relu", True, True, False, CL),
    # Stride 4 over k3 reads no input row or column past 10 (past 14 at 18x18): their gradient must still be zero.
    # 18x18 NCHW runs the planar kernels (10x10 NCHW goes through the channels_last ones).
    "unread_edges": (1, 6, 10, 10, (3, 3), 4, 0, 1, 4, "relu", True, True, False, CL),
    "unread_edges_nchw": (1, 6, 18, 18, (3, 3), 4, 0, 1, 4, "relu", True, True, False, NCHW),
}
# Larger cases: too slow for the Triton interpreter, run on torch/cpp (and on GPU).
BIG_CONFIGS = {
    "c130_h13": (2, 130, 13, 13, (3, 3), 1, 1, 1, 33, "relu6", True, True, True, CL),
    "c130_h17_nchw": (2, 130, 17, 17, (5, 5), 2, 2, 1, 64, "silu", True, True, False, NCHW),
    # Several tiles per image whatever the thread count (cpp: ~512 pixels a tile at 64 channels), so the rows that
    # neighbouring tiles share (grad_x's halo rows) are exercised in both layouts and at stride 2.
    "c64_h48_k5_tiles": (1, 64, 48, 48, (5, 5), 1, 2, 1, 16, "relu", True, True, False, CL),
    "c64_h96_s2_tiles_nchw": (1, 64, 96, 96, (3, 3), 2, 1, 1, 16, "relu6", True, True, True, NCHW),
    # x past 16 MiB in every dtype: the cpp channels_last staging prefetches the next input row (streamed inputs).
    "c32_h520_s2_streamed": (1, 32, 520, 520, (3, 3), 2, 1, 1, 8, "relu6", True, True, False, CL),
}


def _backends():
    params = [pytest.param("torch"), pytest.param("cpp")]
    params.append(pytest.param("triton", marks=pytest.mark.triton))
    params.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return params


def _make(cfg, dtype, device, layout=None):
    n, c, h, w, k, s, p, d, cout, act, has_dwb, has_pwb, has_res, fmt = cfg
    fmt = layout or fmt
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=device).contiguous(memory_format=fmt)
    dw_w = torch.randn(c, 1, *k, dtype=torch.float64, device=device) / (k[0] * k[1]) ** 0.5
    dw_b = torch.randn(c, dtype=torch.float64, device=device) if has_dwb else None
    pw_w = torch.randn(cout, c, 1, 1, dtype=torch.float64, device=device) / c**0.5
    pw_b = torch.randn(cout, dtype=torch.float64, device=device) if has_pwb else None
    args = dict(stride=s, padding=p, dilation=d, activation=act)
    ho = (h + 2 * _pair(p)[0] - _pair(d)[0] * (k[0] - 1) - 1) // _pair(s)[0] + 1
    wo = (w + 2 * _pair(p)[1] - _pair(d)[1] * (k[1] - 1) - 1) // _pair(s)[1] + 1
    res = torch.randn(n, cout, ho, wo, dtype=torch.float64, device=device).contiguous(memory_format=fmt) \
        if has_res else None
    tensors = [x, dw_w, dw_b, pw_w, pw_b, res]
    low = [None if t is None else t.to(dtype).contiguous(memory_format=_fmt_of(t)) for t in tensors]
    return tensors, low, args, fmt


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def _fmt_of(t):
    return CL if t.dim() == 4 and not t.is_contiguous() else NCHW


def _ref(tensors, args):
    x, dw_w, dw_b, pw_w, pw_b, res = tensors
    return dwsep_op.reference(x, dw_w, dw_b, pw_w, pw_b, args["stride"], args["padding"], args["dilation"],
                              args["activation"], res)


def _run(backend, low, args):
    x, dw_w, dw_b, pw_w, pw_b, res = low
    with effikern.set_backend(backend):
        return F_DWSEP(x, dw_w, dw_b, pw_w, pw_b, residual=res, **args)


def _check_forward_and_backward(backend, cfg, dtype, layout=None):
    device = device_for(backend)
    if backend != "auto":  # auto always runs something
        skip_unavailable(backend, device)
    tensors, low, args, fmt = _make(cfg, dtype, device, layout)
    names = ["x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "residual"]
    for group in (tensors, low):
        for t in group:
            if t is not None:
                t.requires_grad_()
    truth = _ref(tensors, args)
    torch_out = _ref(low, args)  # PyTorch's own path in the kernel's dtype: the error budget
    out = _run(backend, low, args)
    assert_matches("y", out, truth, torch_out)
    if out.shape[1] > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=fmt), "output must keep x's memory format"
    g = torch.randn_like(truth)
    present = [(n, i) for n, i in zip(names, range(6)) if tensors[i] is not None]
    truth_g = torch.autograd.grad(truth, [tensors[i] for _, i in present], g, retain_graph=True)
    torch_g = torch.autograd.grad(torch_out, [low[i] for _, i in present], g.to(dtype))
    with effikern.set_backend(backend):
        out_g = torch.autograd.grad(out, [low[i] for _, i in present], g.to(dtype))
    # The bias gradients are plain sums of the upstream gradient: the same gradient taken with |g| is the sum
    # of the magnitudes of their terms, which sets how much a different summation order may lose to cancellation.
    abs_g = torch.autograd.grad(truth, [tensors[i] for _, i in present], g.abs())
    for (name, _), o, t, b, a in zip(present, out_g, truth_g, torch_g, abs_g):
        cond = condition(a, t) if name.endswith("bias") else 1.0
        assert_matches(f"grad {name}", o, t, b, cond=cond)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=str)
@pytest.mark.parametrize("backend", _backends())
def test_matches_reference(backend, cfg, dtype):
    _check_forward_and_backward(backend, CONFIGS[cfg], dtype)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("layout", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cfg", ["c3_k3_relu", "c17_k5_s2_silu_res"], ids=str)
@pytest.mark.parametrize("backend", _backends())
def test_both_layouts(backend, cfg, layout):
    _check_forward_and_backward(backend, CONFIGS[cfg], torch.float32, layout)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cfg", list(BIG_CONFIGS), ids=str)
@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("cuda", marks=pytest.mark.gpu),
                                     pytest.param("triton", marks=pytest.mark.gpu)])
def test_larger_shapes(backend, cfg, dtype):
    _check_forward_and_backward(backend, BIG_CONFIGS[cfg], dtype)


@pytest.mark.gpu
def test_triton_fp32_with_tf32_on():
    """With cuDNN's TF32 flag on (PyTorch's default) the fp32 Triton kernels multiply in TF32, as cuDNN would:
    every output and gradient within TF32's accuracy (10-bit mantissa operands, fp32 sums) of float64. The other
    GPU tests run with TF32 off (conftest) so that they can hold the kernels to fp32's bound."""
    skip_unavailable("triton", "cuda")
    tensors, low, args, _ = _make(CONFIGS["c17_k5_s2_silu_res"], torch.float32, "cuda", None)
    for t in tensors + low:
        if t is not None:
            t.requires_grad_()
    with tf32_flags(True), effikern.set_backend("triton"):
        out = _run("triton", low, args)
        g = torch.randn_like(out)
        out_g = torch.autograd.grad(out, [t for t in low if t is not None], g)
    truth = _ref(tensors, args)
    truth_g = torch.autograd.grad(truth, [t for t in tensors if t is not None], g.double())
    for name, o, t in zip(["y"] + [f"grad {i}" for i in range(len(out_g))], (out,) + out_g, (truth,) + truth_g):
        assert rel_err(o, t) <= 4e-3, f"{name}: rel err {rel_err(o, t):.2e} exceeds TF32's"


@pytest.mark.parametrize("legacy_read_raises", [False, True])
def test_triton_dot_precision_follows_either_tf32_api(legacy_read_raises):
    """The Triton dots take TF32 from the flag the replaced PyTorch op obeys (cuDNN's for dwsep, cuBLAS's for
    sparse), read through the legacy allow_tf32 or, once torch refuses that read because the newer fp32_precision
    API set a flag, through fp32_precision (a launch used to raise then)."""
    pytest.importorskip("triton")
    from effikern.kernels import dwsep as dwsep_kernels
    from effikern.kernels import sparse as sparse_kernels

    x = torch.ones(1)
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    try:
        if legacy_read_raises:
            conv.fp32_precision, matmul.fp32_precision = "ieee", "tf32"
        else:
            conv.fp32_precision = matmul.fp32_precision = "none"
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True
        assert dwsep_kernels._dot_args(x)["DOT_PREC"] == "ieee"
        assert sparse_kernels._dot_args(x)["DOT_PREC"] == "tf32"
    finally:
        conv.fp32_precision, matmul.fp32_precision = "none", "none"
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
        conv.fp32_precision, matmul.fp32_precision = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("activation", ["relu", "relu6", "hardswish"])
@pytest.mark.parametrize("backend", _backends())
def test_derivative_at_the_kinks_follows_torch(backend, activation, dtype):
    """z exactly on -3, 0, 3 and 6, where relu, relu6 and hardswish have a one-sided derivative: every backend
    must take the side torch's autograd takes (hardswish'(-3) = 0 and hardswish'(3) = 1 since torch 2.7)."""
    device = device_for(backend)
    skip_unavailable(backend, device)
    kinks = torch.tensor([-3.0, 0.0, 3.0, 6.0], dtype=dtype, device=device)
    x = kinks[torch.randint(0, 4, (2, 16, 5, 5), device=device)].requires_grad_()
    dw_w = torch.ones(16, 1, 1, 1, dtype=dtype, device=device)  # z == x exactly: a 1x1 depthwise of weight 1
    pw_w = torch.randn(8, 16, 1, 1, dtype=dtype, device=device)
    g = torch.randn(2, 8, 5, 5, dtype=dtype, device=device)
    def ref_grad(*ts):
        y = dwsep_op.reference(ts[0], ts[1], None, ts[2], None, 1, 0, 1, activation, None)
        return torch.autograd.grad(y, ts[0], ts[3])[0]

    truth = ref_grad(*(t.detach().double().requires_grad_(t is x) for t in (x, dw_w, pw_w, g)))
    with effikern.set_backend(backend):
        got = torch.autograd.grad(F_DWSEP(x, dw_w, None, pw_w, None, activation=activation), x, g)[0]
    # A kernel taking the other side at -3 or 3 is off by 0.5 * |pw^T g| on a quarter of the elements.
    assert_matches("grad x at kinks", got, truth, ref_grad(x, dw_w, pw_w, g))


@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "silu", "gelu", "hardswish"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend, activation):
    """Exact gradients in float64: the reference and the C++ kernel."""
    skip_unavailable(backend, "cpu")
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    dw_w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    dw_b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    pw_w = torch.randn(3, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    pw_b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    # Keep z away from the activations' kinks (0, +-3, 6), where finite differences are not derivatives.
    with torch.no_grad():
        dw_b += 0.05

    def f(*inputs):
        with effikern.set_backend(backend):
            return F_DWSEP(*inputs[:5], stride=(2, 1), padding=1, dilation=(1, 2), activation=activation,
                           residual=inputs[5])

    assert torch.autograd.gradcheck(f, (x, dw_w, dw_b, pw_w, pw_b, res), eps=1e-6, atol=1e-5, nondet_tol=1e-9)


# Backwards the cpp kernel runs as channel slices, one per thread, on 2 and 3 threads (backward_channel_groups in
# csrc/cpu/dwsep_cpu.cpp): one small image has too few tiles per phase (a 7x7 kernel needs 6-row tiles).
SLICED_CONFIGS = {
    # 40 channels: slices of 16 and 24 (whole 16-channel vectors); channels_last kernels.
    "n1_c40_h14_k7_cl": (1, 40, 14, 14, (7, 7), 1, 3, 1, 24, "gelu", True, True, True, CL),
    # 16x16 NCHW runs the planar kernels; 48 channels are three slices on three threads.
    "n1_c48_h16_k7_nchw": (1, 48, 16, 16, (7, 7), 1, 3, 1, 20, "relu6", False, True, False, NCHW),
    # A small NCHW image goes through the channels_last kernels; 33 channels: slices of 16 and 17.
    "n1_c33_h7_k5_nchw": (1, 33, 7, 7, (5, 5), 1, 2, 1, 12, "silu", True, False, False, NCHW),
}


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("cfg", list(SLICED_CONFIGS), ids=str)
def test_cpp_backward_in_channel_slices(cfg, dtype, threads):
    skip_unavailable("cpp", "cpu")
    config = SLICED_CONFIGS[cfg]
    _, low, args, _ = _make(config, dtype, "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        groups = effikern._ext.require().dwsep_bwd_channel_groups_for_test(
            low[0], low[1], low[3], _pair(args["stride"]), _pair(args["padding"]), _pair(args["dilation"]), threads)
        assert groups > 1, "the config no longer exercises the channel-slice backward"
        _check_forward_and_backward("cpp", config, dtype)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_empty_batch(backend):
    skip_unavailable(backend, "cpu")
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    dw_w = torch.randn(4, 1, 3, 3, requires_grad=True)
    pw_w = torch.randn(6, 4, 1, 1, requires_grad=True)
    with effikern.set_backend(backend):
        y = F_DWSEP(x, dw_w, None, pw_w, None, padding=1)
        assert y.shape == (0, 6, 8, 8)
        y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(dw_w.grad, torch.zeros_like(dw_w))


def _valid_args():
    return [torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(4), torch.randn(6, 4, 1, 1),
            torch.randn(6)]


@pytest.mark.parametrize("mutate, kwargs, match", [
    (lambda a: a.__setitem__(0, torch.randn(4, 8, 8)), {}, r"x must be a 4-D tensor.*\(4, 8, 8\)"),
    # A valid depthwise weight for another channel count: either may be wrong, so both are named.
    (lambda a: a.__setitem__(1, torch.randn(8, 1, 3, 3)), {},
     r"x's channel count does not match dw_weight's: x has C=4 \(shape \(2, 4, 8, 8\)\), dw_weight has C=8"),
    (lambda a: a.__setitem__(0, torch.randn(2, 5, 8, 8)), {}, r"x's channel count .* x has C=5 .* dw_weight has C=4"),
    (lambda a: a.__setitem__(1, torch.randn(0, 1, 3, 3)), {}, r"dw_weight must have shape \[C=4, 1, kh, kw\]"),
    (lambda a: a.__setitem__(1, torch.randn(4, 2, 3, 3)), {}, r"depth multiplier 1"),
    (lambda a: a.__setitem__(3, torch.randn(6, 5, 1, 1)), {}, r"pw_weight must have shape \(6, 4, 1, 1\)"),
    (lambda a: a.__setitem__(3, torch.randn(6, 4, 3, 3)), {}, r"pw_weight must have shape"),
    (lambda a: a.__setitem__(2, torch.randn(5)), {}, r"dw_bias must have shape \(4,\)"),
    (lambda a: a.__setitem__(4, torch.randn(4)), {}, r"pw_bias must have shape \(6,\)"),
    (lambda a: a.__setitem__(1, torch.randn(4, 1, 3, 3, dtype=torch.float64)), {}, r"dw_weight must have the dtype"),
    (lambda a: a.__setitem__(0, torch.randint(0, 3, (2, 4, 8, 8))), {}, r"x must have dtype"),
    (lambda a: a.__setitem__(1, torch.randn(4, 1, 11, 11)), {}, r"larger than the padded input"),
    (lambda a: a.__setitem__(0, torch.randn(2, 4, 0, 8)), {"padding": 1}, r"x must have an image of at least 1x1"),
    (lambda a: a.__setitem__(0, [[1.0]]), {}, r"x must be a torch.Tensor, got list"),
    (lambda a: None, {"stride": 0}, r"stride must be >= 1"),
    (lambda a: None, {"padding": 2**62}, r"padding must be <= 2147483647"),
    (lambda a: None, {"padding": (1, 2, 3)}, r"padding must be an int or a pair"),
    (lambda a: None, {"padding": "full"}, r"padding must be an int, a pair of ints, 'valid' or 'same', got 'full'"),
    (lambda a: None, {"padding": "same", "stride": 2}, r"padding='same' needs stride 1"),
    # F.conv2d pads an odd total one pixel more at the bottom/right, which the op's symmetric padding cannot.
    (lambda a: a.__setitem__(1, torch.randn(4, 1, 4, 4)), {"padding": "same"},
     r"padding='same' needs an even dilation\*\(kernel-1\) .* \(3, 3\) pixels"),
    (lambda a: None, {"padding": "same", "dilation": (1, 3)}, None),  # (2, 6): even, so fine
    (lambda a: a.__setitem__(1, torch.randn(4, 1, 0, 3)), {"padding": "same"}, r"dw_weight must have a kernel of at"),
    (lambda a: a.__setitem__(1, torch.randn(4, 3, 3)), {"padding": "same"}, r"dw_weight must be a 4-D tensor"),
    (lambda a: None, {"activation": "tanh"}, r"activation must be None or one of"),
    (lambda a: None, {"residual": torch.randn(2, 6, 7, 7)}, r"residual must have shape \(2, 6, 6, 6\)"),
])
def test_bad_input_names_the_argument(mutate, kwargs, match):
    args = _valid_args()
    mutate(args)
    if match is None:  # a valid call among the invalid ones: the checks must not refuse too much
        F_DWSEP(*args, **kwargs)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        F_DWSEP(*args, **kwargs)


@pytest.mark.gpu
def test_device_mismatch_is_an_error():
    args = _valid_args()
    args[0] = args[0].cuda()
    with pytest.raises(ValueError, match=r"dw_weight must be on the device of x"):
        F_DWSEP(*args)


_TENSOR_ARGS = ["x", "dw_weight", "dw_bias", "pw_weight", "pw_bias", "residual"]


@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
@pytest.mark.parametrize("name", _TENSOR_ARGS)
def test_device_mismatch_meta(backend, name):
    """Without a GPU the meta device stands in for a second device: each tensor argument on it is refused, by the
    functional form (eager paths) and by the registered op (whose meta kernel is the fake function)."""
    args = _valid_args() + [torch.randn(2, 6, 6, 6)]
    index = _TENSOR_ARGS.index(name)
    args[index] = args[index].to("meta")
    # x on meta makes every other tensor the odd one out: the first checked is dw_weight.
    match = r"dw_weight must be on the device of x \(meta\), got cpu" if name == "x" else \
        rf"{name} must be on the device of x \(cpu\), got meta"
    with effikern.set_backend(backend):
        with pytest.raises(ValueError, match=match):
            F_DWSEP(*args[:5], residual=args[5])
        with pytest.raises(ValueError, match=match):
            torch.ops.effikern.dwsep_conv2d(*args[:5], [1, 1], [0, 0], [1, 1], "none", args[5])


# (C, kernel, dilation, padding): odd kernels, an even kernel at an even dilation*(k-1), rectangular ones.
SAME_VALID = [
    (4, (3, 3), (1, 1), "same"),
    (3, (5, 3), (1, 1), "same"),
    (3, (3, 5), (3, 1), "same"),
    (5, (4, 4), (2, 2), "same"),
    (2, (1, 1), (1, 1), "same"),
    (4, (3, 3), (1, 1), "valid"),
    (3, (2, 5), (3, 1), "valid"),
]


@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
@pytest.mark.parametrize("c, kernel, dilation, padding", SAME_VALID, ids=str)
def test_string_padding_matches_f_conv2d(backend, c, kernel, dilation, padding):
    """padding="same" and "valid" as F.conv2d takes them: output and gradients of the two-conv F.conv2d form."""
    if backend != "auto":
        skip_unavailable(backend, "cpu")
    x = torch.randn(2, c, 9, 8, dtype=torch.float64, requires_grad=True)
    dw_w = torch.randn(c, 1, *kernel, dtype=torch.float64, requires_grad=True)
    dw_b, pw_b = torch.randn(c, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    pw_w = torch.randn(6, c, 1, 1, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(F.silu(F.conv2d(x, dw_w, dw_b, 1, padding, dilation, groups=c)), pw_w, pw_b)
    with effikern.set_backend(backend):
        y = F_DWSEP(x, dw_w, dw_b, pw_w, pw_b, padding=padding, dilation=dilation, activation="silu")
        g = torch.randn_like(expected)
        grads = torch.autograd.grad(y, (x, dw_w, pw_w), g)
    if padding == "same":
        assert y.shape[2:] == x.shape[2:]
    torch.testing.assert_close(y, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (x, dw_w, pw_w), g)):
        torch.testing.assert_close(got, want)


def test_explicit_backend_that_cannot_run_raises():
    args = _valid_args()
    with effikern.set_backend("cuda"), pytest.raises(effikern.BackendUnavailableError, match="cuda"):
        F_DWSEP(*args)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    skip_unavailable(backend, "cpu")
    x = torch.randn(2, 5, 7, 6, requires_grad=True)
    dw_w = torch.randn(5, 1, 3, 3, requires_grad=True)
    pw_w = torch.randn(4, 5, 1, 1, requires_grad=True)
    pw_b = torch.randn(4, requires_grad=True)
    res = torch.randn(2, 4, 4, 3)
    with effikern.set_backend(backend):
        for xx in (x, x.detach().contiguous(memory_format=CL).requires_grad_()):
            torch.library.opcheck(torch.ops.effikern.dwsep_conv2d,
                                  (xx, dw_w, None, pw_w, pw_b, [2, 2], [1, 1], [1, 1], "silu", res))
        g = torch.randn(2, 4, 4, 3)
        torch.library.opcheck(torch.ops.effikern.dwsep_conv2d_backward,
                              (g, x.detach(), dw_w.detach(), None, pw_w.detach(), [2, 2], [1, 1], [1, 1], "silu"))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_compile_fullgraph(backend):
    skip_unavailable(backend, "cpu")
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=CL)
    w = [torch.randn(6, 1, 3, 3), torch.randn(6), torch.randn(8, 6, 1, 1), torch.randn(8)]

    def f(x):
        return F_DWSEP(x, *w, stride=1, padding=1, activation="gelu") * 2

    with effikern.set_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.parametrize("cfg", ["c17_k5_s2_silu_res", "rect_gelu"])
def test_eager_path_is_the_op_without_the_dispatcher(cfg):
    """functional.dwsep_conv2d in plain eager mode runs ops.dwsep.EagerDwsepConv2d (the op's implementation and
    gradients without the dispatcher's autograd layer): bit for bit the registered op's output and gradients, the
    residual's included."""
    skip_unavailable("cpp", "cpu")
    tensors, low, args, _ = _make(CONFIGS[cfg], torch.float32, "cpu")
    leaves = [t.requires_grad_() if t is not None else None for t in low]
    x, dw_w, dw_b, pw_w, pw_b, res = leaves
    present = [t for t in leaves if t is not None]
    with effikern.set_backend("cpp"):
        y = _run("cpp", leaves, args)
        assert type(y.grad_fn).__name__ == "EagerDwsepConv2dBackward"
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, present, g, retain_graph=True)
        op_args = (x, dw_w, dw_b, pw_w, pw_b, list(_pair(args["stride"])), list(_pair(args["padding"])),
                   list(_pair(args["dilation"])), args["activation"], res)
        y_op = torch.ops.effikern.dwsep_conv2d(*op_args)
        grads_op = torch.autograd.grad(y_op, present, g)
        # create_graph=True: a gradient with a graph, as the op gives (test_double_backward_goes_through_the_reference)
        (g_x,) = torch.autograd.grad(y, [x], g.clone().requires_grad_(), create_graph=True)
        assert g_x.requires_grad
    assert torch.equal(y, y_op)
    for a, b in zip(grads, grads_op):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("avx512_auto_table")
def test_auto_on_pytorch_runs_eager_autograd():
    """Where auto picks PyTorch for both passes (bf16 on CPU at stride 1 with a 3x3 kernel), the call is plain
    eager PyTorch: the same result as the reference, autograd's own convolution backward (no recomputation of the
    depthwise output), and the op's argument errors."""
    import effikern
    from effikern.ops import dwsep as dwsep_ops

    x = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16, requires_grad=True)
    dw, pw = torch.randn(8, 1, 3, 3, dtype=torch.bfloat16), torch.randn(16, 8, 1, 1, dtype=torch.bfloat16)
    args = (x, dw, None, pw, None, [1, 1], [1, 1], [1, 1], "relu6", None)
    with effikern.set_backend("auto"):
        assert dwsep_ops.auto_runs_eager(*args)
        y = effikern.functional.dwsep_conv2d(x, dw, None, pw, None, padding=1, activation="relu6")
        assert "Convolution" in type(y.grad_fn).__name__
        with pytest.raises(ValueError, match="pw_weight"):
            effikern.functional.dwsep_conv2d(x, dw, None, pw[:, :4], None, padding=1)
    ref = dwsep_ops.reference(*args)
    assert torch.equal(y, ref)
    with effikern.set_backend("torch"):  # an explicit backend always goes through the op
        assert not dwsep_ops.auto_runs_eager(*args)
    as_fp32 = (x.detach().float(), dw.float(), None, pw.float(), None) + args[5:]
    assert not dwsep_ops.auto_runs_eager(*as_fp32)  # fp32 CPU: auto picks cpp


@pytest.mark.usefixtures("avx512_auto_table")
@pytest.mark.parametrize("cfg", ["c17_k5_s2_silu_res", "k7_hardswish_res", "rect_gelu", "c3_k3_s2"])
def test_auto_runs_the_measured_bf16_backward_where_pytorch_is_slow(cfg):
    """bf16 on CPU, strided or with a kernel of 5 or more: auto keeps the forward on PyTorch and runs the backward
    in cpp (_auto._CASES: PyTorch's depthwise backward is at its slowest there), through the op, within the
    oracle's budget."""
    from effikern import backends

    skip_unavailable("cpp", "cpu")
    config = CONFIGS.get(cfg) or (2, 3, 8, 8, (3, 3), 2, 1, 1, 5, "relu6", True, True, False, NCHW)
    tensors, low, args, _ = _make(config, torch.bfloat16, "cpu")
    x, dw_w, dw_b, pw_w, pw_b, res = low
    op_args = (x, dw_w, dw_b, pw_w, pw_b, list(_pair(args["stride"])), list(_pair(args["padding"])),
               list(_pair(args["dilation"])), args["activation"], res)
    case = dwsep_op._backward_case(dw_w, op_args[5])
    with effikern.set_backend("auto"):
        assert case == "backward_strided_or_large_kernel"
        assert backends.choose("dwsep_conv2d", "cpu", torch.bfloat16, case) == "cpp"
        assert not dwsep_op.auto_runs_eager(*op_args)
        y = _run("auto", [x.detach().clone().requires_grad_(), dw_w, dw_b, pw_w, pw_b, res], args)
        assert type(y.grad_fn).__name__ == "EagerDwsepConv2dBackward"  # the op's eager path, not eager autograd
    _check_forward_and_backward("auto", config, torch.bfloat16)


@pytest.mark.parametrize("path", ["functional", "op"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_double_backward_goes_through_the_reference(backend, path):
    """A backward with create_graph=True (a gradient penalty) must give gradients that carry a graph: the kernels'
    do not, so the op's formula takes them through the reference's differentiable convolutions then. The eager
    path once returned the kernels' graph-less gradients and silently dropped the second-order terms."""
    skip_unavailable(backend, "cpu")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    dw_w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    dw_b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    pw_w = torch.randn(5, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    params = [dw_w, dw_b, pw_w]

    def fused(t):
        if path == "op":
            return torch.ops.effikern.dwsep_conv2d(t, dw_w, dw_b, pw_w, None, [1, 1], [1, 1], [1, 1], "silu", None)
        return F_DWSEP(t, dw_w, dw_b, pw_w, None, padding=1, activation="silu")

    def two_convs(t):
        z = torch.nn.functional.conv2d(t, dw_w, dw_b, 1, 1, 1, 4)
        return torch.nn.functional.conv2d(torch.nn.functional.silu(z), pw_w)

    def penalized_grads(f):
        (gx,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(f(x).sum() + gx.square().sum(), params)

    with effikern.set_backend(backend):
        got = penalized_grads(fused)
    for g, expected in zip(got, penalized_grads(two_convs)):
        torch.testing.assert_close(g, expected)
