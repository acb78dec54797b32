"""The AVX512-BF16 GEMM of the C++ kernels (csrc/cpu/bf16_gemm.h), directly and through the bf16 dwsep forward."""

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
