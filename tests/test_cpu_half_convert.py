"""csrc/cpu/half_convert.h: the fp16 <-> fp32 conversions shared by the cpp loss-scaling and distillation kernels."""

import pytest
import torch

from backend_util import skip_unavailable


@pytest.mark.parametrize("portable", [False, True], ids=["block", "portable"])
def test_cpp_half_conversions_match_torch(portable):
    """csrc/cpu/half_convert.h, the fp16 <-> fp32 conversions of the cpp fp16 kernels (this loss and the loss
    scaling), through the block functions (F16C where the CPU has it) and the portable scalar ones: to_float on every
    fp16 bit pattern, from_float on every fp16 value, the midpoints between neighbours (ties to even) and one float
    ulp either side of them, the overflow edge, and a million random float bit patterns, bit for bit against torch."""
    skip_unavailable("cpp", "cpu")
    from effikern import _C

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    halves = bits.view(torch.float16)
    ours = _C.half_to_float_for_test(bits, portable)
    nan = halves.isnan()
    assert torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan].view(torch.int32), halves[~nan].float().view(torch.int32))  # signed zeros too

    finite = halves[~nan & ~halves.isinf()].double().unique()  # sorted
    mids = ((finite[1:] + finite[:-1]) / 2).float()  # exact: 12 significant bits
    up, down = torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)
    edge = torch.tensor([65504.0, 65519.996, 65520.0, 65536.0, 1e10, float("inf"), -float("inf"), 2.0**-25,
                         2.0**-24, 3 * 2.0**-26, 2.0**-14 - 2.0**-25, 1e-30, 0.0, -0.0])
    random = torch.randint(-2**31, 2**31 - 1, (1_000_000,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([finite.float(), mids, up, down, edge, random])
    ours = _C.float_to_half_for_test(x, portable)
    ref = x.to(torch.float16)
    ref_nan = ref.isnan()
    assert torch.equal(ours.view(torch.float16).isnan(), ref_nan)
    assert torch.equal(ours[~ref_nan], ref[~ref_nan].view(torch.int16))
