"""Random pruned weights in every sparse format, for the sparse tests."""

import torch

from effikern.sparse import from_dense


def random_mask(fmt, n, k, sparsity, block=(4, 8), inner=0.0, generator=None):
    """A bool [n, k] mask: unstructured at ``sparsity``; 2:4 (random 2 of every 4; some groups keep fewer); or
    whole blocks pruned at ``sparsity`` with a fraction ``inner`` of the kept blocks' positions also pruned."""
    if fmt == "unstructured":
        return torch.rand(n, k) >= sparsity
    if fmt == "2:4":
        order = torch.rand(n, k // 4, 4).argsort(-1)
        mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True)
        mask[torch.rand(n, k // 4) < 0.1] = False  # groups with no kept weight: stored as padding
        mask[:, 0, :] = torch.tensor([True, False, False, False])  # a group with one kept weight
        return mask.reshape(n, k)
    br, bc = block
    nb, kb = -(-n // br), -(-k // bc)
    blocks = torch.rand(nb, kb) >= sparsity
    mask = blocks.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:n, :k]
    return mask & (torch.rand(n, k) >= inner)


def random_weight(fmt, n, k, sparsity, dtype, device, block=(4, 8), inner=0.0):
    """(SparseWeight in dtype on device, dense masked weight float64 of the rounded values)."""
    w = torch.randn(n, k, dtype=torch.float64).to(dtype)
    mask = random_mask(fmt, n, k, sparsity, block, inner)
    sw = from_dense(w, mask, fmt, block if fmt == "block" else None).to(device)
    return sw, (w.double() * mask).to(device)
