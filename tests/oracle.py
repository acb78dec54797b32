"""The accuracy rule every kernel test uses (DESIGN.md, after flash-attention's).

The truth is the reference computed in float64. A kernel passes when its relative error against the truth
is at most twice the error PyTorch's own path makes in the kernel's dtype on the same inputs, plus a small
floor (so a problem PyTorch happens to compute exactly still leaves room for a different summation order).

A reduction whose terms cancel (a bias gradient is a plain sum of the upstream gradient) loses relative
accuracy in proportion to its condition number sum|terms| / |sum terms|, differently for each summation
order; ``cond`` scales the floor by it so an unlucky draw of random inputs does not fail a correct kernel.
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


def condition(abs_truth: torch.Tensor, truth: torch.Tensor, cap: float = 1e3) -> float:
    """||abs_truth|| / ||truth||, clipped to [1, cap]: ``abs_truth`` is the same float64 computation run on the
    magnitudes of its terms (e.g. a gradient taken with |grad_output|)."""
    denom = truth.double().norm().item()
    ratio = abs_truth.double().norm().item() / denom if denom > 0 else cap
    return min(max(ratio, 1.0), cap)


def assert_matches(name: str, out: torch.Tensor, truth: torch.Tensor, torch_out: torch.Tensor, seed=None,
                   cond: float = 1.0):
    """``out``: the kernel's result; ``truth``: float64 reference; ``torch_out``: PyTorch's own result in the
    kernel's dtype on the same inputs; ``cond``: the condition number of the computation (see above)."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != expected {tuple(truth.shape)}"
    assert out.dtype == torch_out.dtype, f"{name}: dtype {out.dtype} != {torch_out.dtype}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an unwritten element?) seed={seed}"
    err, base = rel_err(out, truth), rel_err(torch_out, truth)
    bound = 2 * base + FLOOR[out.dtype] * cond
    assert err <= bound, f"{name}: rel err {err:.3e} > bound {bound:.3e} (torch's own: {base:.3e}) seed={seed}"
