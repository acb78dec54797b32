"""Random pruned weights in every sparse format, and the check of sparse_linear against float64, for the sparse
tests."""

import torch
import torch.nn.functional as F
from oracle import assert_matches, condition

import effikern
from effikern.sparse import SparseWeight, from_dense


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


def check_all(backend, sw, dense, x, bias, gy):
    """Forward, grad_x, grad_values and grad_bias of ``backend`` vs float64 truth, PyTorch's own error as budget."""
    dtype = x.dtype
    values = sw.values.detach().clone().requires_grad_()
    sw.values = values
    xr = x.detach().clone().requires_grad_()
    br = None if bias is None else bias.detach().clone().requires_grad_()
    with effikern.set_backend(backend):
        y = effikern.functional.sparse_linear(xr, sw, br)
        y.backward(gy)
    # truth: float64 on the rounded inputs; torch's own: F.linear on the masked dense weight in the low dtype
    w_low = dense.to(dtype).detach().requires_grad_()
    x_low = x.detach().clone().requires_grad_()
    b_low = None if bias is None else bias.detach().clone().requires_grad_()
    y_torch = F.linear(x_low, w_low, b_low)
    y_torch.backward(gy)
    truth = F.linear(x.double(), dense, None if bias is None else bias.double())
    assert_matches("y", y, truth, y_torch)
    g64 = gy.double()
    assert_matches("grad_x", xr.grad, g64 @ dense, x_low.grad)
    full = g64.reshape(-1, sw.out_features).t() @ x.double().reshape(-1, sw.in_features)
    kept = sw.mask()
    # grad_values in the dense layout: zero off the pattern, the full gradient on it
    got = torch.zeros_like(full).masked_scatter(kept, kept_values(sw, values.grad))
    torch_own = torch.where(kept, w_low.grad, 0).to(dtype)
    assert_matches("grad_weight", got.to(dtype), torch.where(kept, full, 0), torch_own)
    if bias is not None:
        cond = condition(g64.abs().reshape(-1, sw.out_features).sum(0), g64.reshape(-1, sw.out_features).sum(0))
        assert_matches("grad_bias", br.grad, g64.reshape(-1, sw.out_features).sum(0), b_low.grad, cond=cond)


def kept_values(sw, grad_values):
    """The gradient of the stored values at the kept positions, in the dense row-major order of the mask."""
    from effikern.sparse import SparseWeight

    g = SparseWeight(sw.format, sw.shape, grad_values.double(), sw.crow, sw.col, sw.row, sw.t_crow, sw.t_row,
                     sw.t_perm, sw.value_mask, sw.block_size)
    dense = g.to_dense()
    stored_off = ~sw.mask() & (dense != 0)
    assert not stored_off.any(), "grad_values is nonzero at a stored but pruned position"
    return dense[sw.mask()]


def with_arrays(sw, validate, **arrays):
    """A SparseWeight sharing sw's values with some index arrays replaced (as a hand-built or loaded weight, or a
    caller of the raw op, could hand them over); ``validate``: check them on construction."""
    a = dict(sw.arrays(), **arrays)
    return SparseWeight(sw.format, sw.shape, sw.values, a["crow"], a["col"], a["row"], a["t_crow"], a["t_row"],
                        a["t_perm"], sw.value_mask, sw.block_size, validate=validate)
