"""Under torch.autocast the fused ops behave as the PyTorch ops they replace: inputs in mixed dtypes (bf16
activations, fp32 parameters) are accepted, the result is in the autocast dtype, and gradients reach the fp32
parameters in fp32."""

import torch
import torch.nn.functional as F
from torch import nn

import effikern
from effikern.nn import DepthwiseSeparableConv2d, SparseLinear


def test_dwsep_module_under_cpu_autocast_matches_the_two_convs():
    block = DepthwiseSeparableConv2d(8, 16, 3, padding=1, activation="relu6")
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
        ref = block.pointwise(F.relu6(block.depthwise(x)))
    assert y.dtype == torch.bfloat16 == ref.dtype
    assert (y.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
    y.float().sum().backward()
    assert block.depthwise.weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_sparse_linear_under_cpu_autocast_matches_linear():
    linear = nn.Linear(32, 24)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight) < 0.7] = 0
    sparse = SparseLinear.from_linear(linear, format="unstructured")
    x = torch.randn(5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse(x)
        ref = linear(x)
    assert y.dtype == torch.bfloat16 == ref.dtype
    assert (y.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
    y.float().sum().backward()
    values = sparse.sparse_weight.values
    assert values.grad is not None and values.grad.dtype == values.dtype


def test_ops_outside_autocast_keep_refusing_mixed_dtypes():
    x = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
    try:
        effikern.functional.dwsep_conv2d(x, torch.randn(4, 1, 3, 3), None, torch.randn(6, 4, 1, 1), None)
    except TypeError as err:
        assert "dw_weight" in str(err)
    else:
        raise AssertionError("mixed dtypes outside autocast must raise")


def test_float64_is_left_alone_under_autocast_as_conv2d_is():
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    dw_w, pw_w = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(5, 4, 1, 1, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.conv2d(x, dw_w, None, 1, 1, 1, 4).dtype == torch.float64
        y = effikern.functional.dwsep_conv2d(x, dw_w, None, pw_w, None, padding=1)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, F.conv2d(F.conv2d(x, dw_w, None, 1, 1, 1, 4), pw_w))
