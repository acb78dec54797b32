"""csrc/cpu/scratch.h: large scratch blocks are kept between kernel calls (instead of going back to the OS and
coming back as fresh pages), reused, capped, and released on request."""

import torch

import effikern
from backend_util import skip_unavailable


def test_large_scratch_is_kept_reused_and_released():
    skip_unavailable("cpp", "cpu")
    ext = effikern._ext.require()
    x = torch.randn(1, 384, 14, 14).contiguous(memory_format=torch.channels_last)
    dw_w, dw_b, pw_w = torch.randn(384, 1, 7, 7), torch.randn(384), torch.randn(1536, 384, 1, 1)
    gy = torch.randn(1, 1536, 14, 14).contiguous(memory_format=torch.channels_last)

    def backward():
        return ext.dwsep_bwd_cpu(gy, x, dw_w, dw_b, pw_w, [1, 1], [3, 3], [1, 1], 0)

    ext.scratch_cache_release()
    assert ext.scratch_cache_held_bytes() == 0
    first = backward()
    held = ext.scratch_cache_held_bytes()
    assert held >= 384 * 1536 * 4  # at least the pointwise weight-gradient partial (2.4 MB) came back
    second = backward()  # on reused, uninitialized blocks: the partials must still start at zero
    assert ext.scratch_cache_held_bytes() == held
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ext.scratch_cache_release()
    assert ext.scratch_cache_held_bytes() == 0
