"""The accuracy rule every kernel test uses (DESIGN.md, after flash-attention's).

The truth is the reference computed in float64. A kernel passes when its relative error against the truth
is at most twice the error PyTorch's own path makes in the kernel's dtype on the same inputs, plus a small
floor (so a problem PyTorch happens to compute exactly still leaves room for a different summation order).
"""

import torch

# Floors, relative L2: a few ulps of the dtype; far below any real indexing or math bug (errors of O(1)).
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, truth: torch.Tensor) -> float:
    """||out - truth|| / ||truth|| in float64 (0 when both are empty or zero)."""
    out, truth = out.double(), truth.double()
    denom = truth.norm().item()
    diff = (out - truth).norm().item()
    return diff / denom if denom > 0 else diff


def assert_matches(name: str, out: torch.Tensor, truth: torch.Tensor, torch_out: torch.Tensor, seed=None):
    """``out``: the kernel's result; ``truth``: float64 reference; ``torch_out``: PyTorch's own result in the
    kernel's dtype on the same inputs."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != expected {tuple(truth.shape)}"
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype} != {torch_out.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an unwritten element?) seed={seed}"
    err, base = rel_err(out, truth), rel_err(torch_out, truth)
    bound = 2 * base + FLOOR[out.dtype]
    assert err <= bound, f"{name}: rel err {err:.3e} > bound {bound:.3e} (torch's own: {base:.3e}) seed={seed}"
