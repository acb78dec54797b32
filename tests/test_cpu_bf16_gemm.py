"""The AVX512-BF16 GEMM of the C++ kernels (csrc/cpu/bf16_gemm.h), directly and through the bf16 dwsep forward and
channels_last backward."""

import os
import subprocess
import sys

import pytest
import torch

from backend_util import skip_unavailable


def _bf16_dot_available():
    skip_unavailable("cpp", "cpu")
    from effikern import _C

    if not _C.build_info()["cpu_bf16_dot"]:
        pytest.skip("this CPU has no AVX512-BF16")
    return _C


# (M, K, N): tails of the 12-row register block and the 16/32-column vectors, odd K (zero-padded pair), K past one
# 128-pair block (C accumulated across K blocks), and an empty K.
SHAPES = [(1, 1, 1), (3, 5, 7), (12, 2, 16), (13, 33, 17), (25, 256, 32), (100, 257, 33), (7, 300, 48),
          (30, 771, 70), (40, 0, 5), (0, 8, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_matmul_of_rounded_operands(shape):
    C_ = _bf16_dot_available()
    m, k, n = shape
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = C_.bf16_gemm_for_test(a, b)
    # Products of bf16 values are exact in fp32, so the only error is fp32 summation: bound it by K ulps of the
    # sum of magnitudes.
    a16, b16 = a.bfloat16().double(), b.bfloat16().double()
    truth = a16 @ b16
    budget = (a16.abs() @ b16.abs()) * max(k, 1) * 2.0**-24 + 1e-30
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert ((out.double() - truth).abs() <= budget).all()


@pytest.mark.parametrize("shape", [(13, 33, 17), (30, 771, 70), (40, 0, 5)], ids=lambda s: "x".join(map(str, s)))
def test_accumulates_into_c(shape):
    """C += A B (the dwsep backward's weight-gradient partials): every K block adds to what C held."""
    C_ = _bf16_dot_available()
    m, k, n = shape
    a, b, c0 = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
    out = C_.bf16_gemm_for_test(a, b, c0)
    a16, b16 = a.bfloat16().double(), b.bfloat16().double()
    truth = c0.double() + a16 @ b16
    budget = (c0.double().abs() + a16.abs() @ b16.abs()) * (max(k, 1) + 1) * 2.0**-24 + 1e-30
    assert ((out.double() - truth).abs() <= budget).all()


def test_rounds_to_nearest_even():
    C_ = _bf16_dot_available()
    # 1 + 2^-8 lies halfway between bf16 1 and 1 + 2^-7: ties go to the even one, 1. 1 + 3 * 2^-8 goes up to 1 + 2^-6.
    a = torch.tensor([[1 + 2.0**-8, 1 + 3 * 2.0**-8]])
    b = torch.tensor([[1.0], [0.0]])
    assert C_.bf16_gemm_for_test(a, b).item() == 1.0
    b = torch.tensor([[0.0], [1.0]])
    assert C_.bf16_gemm_for_test(a, b).item() == 1 + 2.0**-6


_FP32_PATH_SCRIPT = r"""
import torch, effikern
from effikern import _C
from effikern.ops import dwsep as dwsep_op
assert not _C.build_info()["cpu_bf16_dot"]
torch.manual_seed(0)
for fmt in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(2, 24, 20, 20).contiguous(memory_format=fmt)
    dw, pw = torch.randn(24, 1, 3, 3) / 3, torch.randn(40, 24, 1, 1) / 24**0.5
    truth = dwsep_op.reference(x.double(), dw.double(), None, pw.double(), None, 1, 1, 1, "relu", None)
    with effikern.set_backend("cpp"):
        y = effikern.functional.dwsep_conv2d(x.bfloat16(), dw.bfloat16(), None, pw.bfloat16(), None, padding=1,
                                             activation="relu")
    torch.testing.assert_close(y.double(), truth, rtol=3e-2, atol=3e-2)
print("ok")
"""


def test_bf16_dwsep_without_the_dot_product():
    """EFFIKERN_CPU_ISA=avx512 turns the bf16 GEMM off: the bf16 dwsep forward then runs its fp32 GEMM, still right."""
    _bf16_dot_available()
    env = dict(os.environ, EFFIKERN_CPU_ISA="avx512")
    done = subprocess.run([sys.executable, "-c", _FP32_PATH_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_bf16_dwsep_forward_wide_pointwise(layout):
    """A pointwise weight packed by several threads in 64-column ranges (Cout = 200: four ranges, the last partial),
    with an odd C (a zero-padded K pair) and a residual through the GEMM's epilogue, against float64."""
    _bf16_dot_available()
    import effikern
    from effikern.ops import dwsep as dwsep_op

    x = torch.randn(2, 37, 17, 17).contiguous(memory_format=layout)
    dw, db = torch.randn(37, 1, 3, 3) / 3, torch.randn(37)
    pw, pb = torch.randn(200, 37, 1, 1) / 37**0.5, torch.randn(200)
    res = torch.randn(2, 200, 17, 17).contiguous(memory_format=layout)
    low = [t.bfloat16().contiguous(memory_format=layout) if t.dim() == 4 else t.bfloat16()
           for t in (x, dw, db, pw, pb, res)]
    truth = dwsep_op.reference(*[t.double() for t in low[:5]], 1, 1, 1, "silu", low[5].double())
    torch_bf16 = dwsep_op.reference(*low[:5], 1, 1, 1, "silu", low[5]).double()
    with effikern.set_backend("cpp"):
        y = effikern.functional.dwsep_conv2d(*low[:5], padding=1, activation="silu", residual=low[5])
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=layout)
    # No worse than twice PyTorch's own bf16 error against the same float64 truth.
    err, budget = (y.double() - truth).norm(), (torch_bf16 - truth).norm()
    assert err <= 2 * budget + 1e-6, (err.item(), budget.item())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw_small", "nhwc"])
def test_bf16_dwsep_backward_on_the_bf16_gemm(layout):
    """The channels_last backward's GEMMs in bf16 (NCHW images up to 14x14 run through it too): an odd Cout (G's
    rows padded to a K pair), 66 row pairs of W packed by three threads' ranges, an odd C and tiles of odd pixel
    counts (K of the weight gradient padded). Every gradient within twice PyTorch's own bf16 error of float64."""
    _bf16_dot_available()
    import effikern
    from effikern.ops import dwsep as dwsep_op

    torch.manual_seed(0)
    x = torch.randn(3, 37, 13, 13).contiguous(memory_format=layout)
    dw, db = torch.randn(37, 1, 3, 3) / 3, torch.randn(37)
    pw, pb = torch.randn(131, 37, 1, 1) / 37**0.5, torch.randn(131)
    low = [t.bfloat16().contiguous(memory_format=layout) if t.dim() == 4 else t.bfloat16() for t in (x, dw, db, pw, pb)]
    g = torch.randn(3, 131, 13, 13).bfloat16().contiguous(memory_format=layout)

    def grads(tensors, backend=None):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        if backend is None:
            y = dwsep_op.reference(*leaves, [1, 1], [1, 1], [1, 1], "relu6", None)
            return torch.autograd.grad(y, leaves, g.to(y.dtype))
        with effikern.set_backend(backend):  # backward too: the backend is chosen when each pass runs
            y = effikern.functional.dwsep_conv2d(*leaves, padding=1, activation="relu6")
            return torch.autograd.grad(y, leaves, g)

    truth = grads([t.double() for t in low])
    torch_bf16 = grads(low)
    ours = grads(low, "cpp")
    for name, o, t, b in zip(["x", "dw_weight", "dw_bias", "pw_weight", "pw_bias"], ours, truth, torch_bf16):
        assert o.dtype == torch.bfloat16
        err, budget = (o.double() - t).norm(), (b.double() - t).norm()
        assert err <= 2 * budget + 1e-6, (name, err.item(), budget.item())
