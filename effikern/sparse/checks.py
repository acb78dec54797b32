"""Content checks of a sparse weight's index arrays: what every backend's kernels trust.

The kernels index memory with these arrays (a pointer past the end, an offset past the last panel or a block index
past the grid reads or writes out of bounds), and a duplicated or out-of-order entry, or a transposed view that
describes other entries than the forward arrays, gives a silently wrong product or gradient. So before any kernel
runs on arrays it did not build, :func:`check_index_arrays` proves, in O(nnz) tensor ops on the arrays' device:

- each pointer array (``crow``, ``t_crow``) has one entry per segment plus one, starts at 0, never decreases and
  ends at the number of stored entries;
- each entry's index lies inside the weight (a CSR offset inside its panel's columns, a block index inside the
  block grid), strictly increasing within its segment (sorted, no duplicates);
- ``row`` is each entry's segment (CSR) or block row (block), as the forward arrays say;
- ``t_perm`` is a permutation of the entries and the transposed view (``t_crow``, ``t_row``) puts entry
  ``t_perm[i]`` at the same (row, column) as the forward arrays do.

Arrays absent from the call (``None``) or dropped (empty: :meth:`SparseWeight.drop_training_arrays`) are skipped.
Reads a few scalars back to the host (a device sync on CUDA); the op layer runs it once per set of arrays
(``effikern/ops/sparse.py``).
"""

import math
from typing import Optional, Tuple

import torch

from .formats import PANEL, n_panels, segment_coordinates


def check_index_arrays(fmt: str, shape: Tuple[int, int], nnz: int, block_size: Optional[Tuple[int, int]],
                       crow: torch.Tensor, col: torch.Tensor, row: Optional[torch.Tensor] = None,
                       t_crow: Optional[torch.Tensor] = None, t_row: Optional[torch.Tensor] = None,
                       t_perm: Optional[torch.Tensor] = None) -> None:
    """Raises ValueError naming the first array that breaks the module docstring's rules.

    fmt: "unstructured", "2:4" (panelled CSR) or "block"; shape (N, K) of the weight; nnz stored entries (blocks
    for "block"); block_size (BR, BC) for "block". crow/col are the forward arrays, the others the training ones.
    """
    n, k = shape
    if fmt == "block":
        br, bc = block_size
        major, minor = math.ceil(n / br), math.ceil(k / bc)  # the block grid
        segments, t_segments = major, minor
    else:
        major, minor = n, k
        segments, t_segments = n * n_panels(k), k * n_panels(n)
    seg = _check_compressed("crow", crow, "col", col, nnz, segments, fmt, minor)
    if row is not None and row.numel():
        _check_length("row", row, nnz)
        if bool((row.long() != seg).any()):
            what = "block row" if fmt == "block" else "segment (row * panels + panel)"
            raise ValueError(f"row must hold each stored entry's {what}, as crow and col give it")
    dropped = all(t is None or t.numel() == 0 for t in (t_crow, t_row, t_perm))
    if t_crow is None or t_row is None or t_perm is None or dropped:
        return
    t_seg = _check_compressed("t_crow", t_crow, "t_row", t_row, nnz, t_segments, fmt, major)
    _check_length("t_perm", t_perm, nnz)
    perm = t_perm.long()
    if nnz and (int(perm.min()) < 0 or int(perm.max()) >= nnz
                or bool((torch.bincount(perm, minlength=nnz) != 1).any())):
        raise ValueError(f"t_perm must be a permutation of the {nnz} stored entries")
    fwd_major, fwd_minor = _coordinates(fmt, seg, col, minor)
    t_minor, t_major = _coordinates(fmt, t_seg, t_row, major)
    if bool((fwd_major[perm] != t_major).any()) or bool((fwd_minor[perm] != t_minor).any()):
        raise ValueError("the transposed view (t_crow, t_row, t_perm) must describe the entries of crow and col")


def _check_length(name: str, t: torch.Tensor, length: int) -> None:
    if t.dim() != 1 or t.numel() != length:
        raise ValueError(f"{name} must be 1-D with {length} entries, got shape {tuple(t.shape)}")


def _check_compressed(ptr_name: str, ptr: torch.Tensor, idx_name: str, idx: torch.Tensor, nnz: int,
                      segments: int, fmt: str, minor: int) -> torch.Tensor:
    """Checks one compressed view (pointers + per-entry minor index); returns each entry's segment (int64)."""
    _check_length(ptr_name, ptr, segments + 1)
    _check_length(idx_name, idx, nnz)
    p = ptr.long()
    if int(p[0]) != 0 or int(p[-1]) != nnz or bool((p[1:] < p[:-1]).any()):
        raise ValueError(f"{ptr_name} must start at 0, never decrease and end at the {nnz} stored entries")
    seg = torch.repeat_interleave(torch.arange(segments, device=ptr.device), p[1:] - p[:-1], output_size=nnz)
    if nnz == 0:
        return seg
    i = idx.long()
    if fmt == "block":
        if int(i.min()) < 0 or int(i.max()) >= minor:
            raise ValueError(f"{idx_name} must hold block indices in [0, {minor}), got [{int(i.min())}, "
                             f"{int(i.max())}]")
    elif bool((_coordinates(fmt, seg, idx, minor)[1] >= minor).any()):
        raise ValueError(f"{idx_name} holds an offset past the end of its panel ({minor} columns in panels of "
                         f"{PANEL})")
    if nnz > 1 and bool(((seg[1:] == seg[:-1]) & (i[1:] <= i[:-1])).any()):
        raise ValueError(f"{idx_name} must be strictly increasing within each segment of {ptr_name} (sorted, no "
                         f"duplicate entries)")
    return seg


def _coordinates(fmt: str, seg: torch.Tensor, idx: torch.Tensor, minor: int):
    """(major, minor) int64 of each entry: for CSR from its segment and panel offset, for block (block row, block
    column) directly."""
    return (seg, idx.long()) if fmt == "block" else segment_coordinates(seg, idx, minor)
