"""Fused depthwise-separable conv against the two-conv PyTorch block.

Shapes (C, H=W, k, stride -> Cout) from MobileNetV2, EfficientNet-B0 and ConvNeXt-T, padding k//2.
CPU: ``torch`` (eager, oneDNN) vs ``cpp``. GPU: eager (cudnn.benchmark on), ``torch.compile`` of the same
block, and the ``triton`` and ``cuda`` backends.
"""

import functools

import torch

import effikern
from effikern.ops import dwsep as dwsep_op

from .runner import Case

FAMILY = "dwsep"

SHAPES = {
    "mbv2": [(32, 112, 3, 1, 16), (96, 112, 3, 2, 24), (144, 56, 3, 1, 24), (192, 28, 3, 1, 32),
             (384, 14, 3, 1, 64), (960, 7, 3, 1, 160)],
    "effb0": [(240, 28, 5, 1, 40), (672, 14, 5, 1, 112), (1152, 7, 5, 1, 192)],
    "convnext": [(96, 56, 7, 1, 384), (192, 28, 7, 1, 768), (384, 14, 7, 1, 1536)],
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
ACTIVATION = "relu6"  # MobileNetV2's; every activation costs the same few flops per element


def _matrix(device, quick):
    """(batch, dtype, layout, mode) combinations to run on this device."""
    modes = ("fwd", "fwd+bwd")
    if device.type == "cpu":
        batches, dtypes = ((8,), ("fp32",)) if quick else ((1, 8), ("fp32", "bf16", "fp16"))
        layouts = ("nchw", "nhwc")
    else:
        batches = (64,) if quick else (1, 64)
        dtypes, layouts = (("fp16",), ("nhwc",)) if quick else (tuple(DTYPES), tuple(LAYOUTS))
    return [(n, d, l, m) for n in batches for d in dtypes for l in layouts for m in modes]


def _traffic_and_flops(n, c, hw, k, s, cout, esize, mode):
    ho = (hw + 2 * (k // 2) - k) // s + 1
    x, y = n * c * hw * hw, n * cout * ho * ho
    weights = c * k * k + c + cout * c + cout
    depthwise, pointwise = 2 * n * ho * ho * c * k * k, 2 * n * ho * ho * c * cout
    if mode == "fwd":
        return esize * (x + y + weights), depthwise + pointwise
    # fwd reads x, writes y; bwd reads x and grad_y, writes grad_x and the weight grads.
    return esize * (3 * x + 2 * y + 3 * weights), 3 * (depthwise + pointwise)


def _candidates(device):
    if device.type == "cpu":
        return {"torch": "torch", "cpp": "cpp"}, "torch"
    return {"eager": "torch", "compile": "torch", "triton": "triton", "cuda": "cuda"}, "eager"


# The summary's groups: the GPU goal is a geomean over the MobileNetV2 and EfficientNet shapes at N=64, so
# ConvNeXt's GEMM-heavy blocks and each batch size are summarized apart.
GOAL_NETS = ("mbv2", "effb0")


def _group(net, n):
    return f"N={n} " + ("MobileNetV2+EfficientNet" if net in GOAL_NETS else "ConvNeXt")


def _make_case(device, net, shape, n, dtype_name, layout_name, mode):
    c, hw, k, s, cout = shape
    dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout_name]
    nbytes, flops = _traffic_and_flops(n, c, hw, k, s, cout, torch.finfo(dtype).bits // 8, mode)
    labels, baseline = _candidates(device)

    def build():
        torch.backends.cudnn.benchmark = True
        x = torch.randn(n, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
        params = [
            torch.randn(c, 1, k, k, device=device, dtype=dtype) / k,
            torch.randn(c, device=device, dtype=dtype) * 0.1,
            torch.randn(cout, c, 1, 1, device=device, dtype=dtype) / c**0.5,
            torch.randn(cout, device=device, dtype=dtype) * 0.1,
        ]
        grad_inputs = [x] + params
        if mode == "fwd+bwd":
            for t in grad_inputs:
                t.requires_grad_()
        compiled = _compiled_reference() if "compile" in labels else None
        out = {}
        for label, backend in labels.items():
            if label in (baseline, "compile"):
                # What a user runs today: the plain two-conv block (autograd keeps the intermediate).
                ref = compiled if label == "compile" else dwsep_op.reference
                fwd = functools.partial(ref, x, *params, s, k // 2, 1, ACTIVATION, None)
            elif why := effikern.backends.unavailable_reason(backend, device.type):
                out[label] = f"unavailable: {why}"
                continue
            else:
                fwd = functools.partial(effikern.functional.dwsep_conv2d, x, *params, stride=s, padding=k // 2,
                                        activation=ACTIVATION)
            step = fwd if mode == "fwd" else _with_backward(fwd, grad_inputs)
            out[label] = step if label in (baseline, "compile") else _under_backend(backend, step)
        return out

    return Case(op="dwsep_conv2d", shape=f"N{n} {c}x{hw} k{k} s{s}->{cout}", dtype=dtype_name,
                layout=layout_name, mode=mode, bytes=nbytes, flops=flops, baseline=baseline, build=build,
                group=_group(net, n))


def _compiled_reference():
    # One compiled graph per shape (dynamic=False: a dynamic-shape kernel would be slower than what a user
    # with fixed shapes gets), and room for every case's recompile: past dynamo's default limit of 8 it would
    # silently fall back to eager and the "compile" rows would be eager's.
    import torch._dynamo

    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)
    return torch.compile(dwsep_op.reference, dynamic=False)


def _under_backend(backend, step):
    # The whole step, backward included, runs under the chosen backend.
    def run():
        with effikern.set_backend(backend):
            return step()

    return run


def _with_backward(fwd, inputs):
    grad = {}

    def step():
        y = fwd()
        if "g" not in grad:  # one fixed random upstream gradient, made once
            grad["g"] = torch.randn_like(y)
        return torch.autograd.grad(y, inputs, grad["g"])

    return step


def cases(device, quick=True):
    """Every (shape, batch, dtype, layout, mode) case for this device."""
    shapes = [(net, shape) for net, family in SHAPES.items() for shape in family]
    return [_make_case(device, net, shape, n, d, l, m)
            for (n, d, l, m) in _matrix(device, quick) for net, shape in shapes]
