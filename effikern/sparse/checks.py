"""Content checks of a sparse weight's index arrays: what every backend's kernels trust.

The kernels index memory with these arrays (a pointer past the end, an offset past the last panel or a block index
past the grid reads or writes out of bounds), and a duplicated or out-of-order entry, or a transposed view that
describes other entries than the forward arrays, gives a silently wrong product or gradient. So before any kernel
runs on arrays it did not build, :func:`check_index_arrays` proves, in O(nnz) tensor ops on the arrays' device:

- each pointer array (``crow``, ``t_crow``) has one entry per segment plus one, starts at 0, never decreases and
  ends at the number of stored entries;
- each entry's index lies inside the weight (a CSR offset inside its panel's columns, a block index inside the
  block grid), strictly increasing within its segment (sorted, no duplicates);
- "2:4": at most 2 entries in every group of 4 inputs of a row;
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

from .formats import PANEL, n_panels


def check_index_arrays(fmt: str, shape: Tuple[int, int], nnz: int, block_size: Optional[Tuple[int, int]],
                       crow: torch.Tensor, col: torch.Tensor, row: Optional[torch.Tensor] = None,
                       t_crow: Optional[torch.Tensor] = None, t_row: Optional[torch.Tensor] = None,
                       t_perm: Optional[torch.Tensor] = None) -> None:
    """Raises ValueError naming the first array that breaks the module docstring's rules.

    fmt: "unstructured", "2:4" (panelled CSR) or "block"; shape (N, K) of the weight; nnz stored entries (blocks
    for "block"); block_size (BR, BC) for "block". crow/col are the forward arrays, the others the training ones.

    Cost: a few passes over nnz-long arrays and no per-entry division (a 50% 4096 x 4096 weight: 8.4M entries).
    Entries are compared through one int64 key per (row, column) position, built from per-segment values spread
    over the entries, instead of decoding each entry's segment into coordinates.
    """
    n, k = shape
    block = fmt == "block"
    if block:
        br, bc = block_size
        fwd = _View(math.ceil(n / br), math.ceil(k / bc), 1, block)  # the block grid
    else:
        fwd = _View(n, k, n_panels(k), block)
    trans = _View(fwd.minor, fwd.major, 1 if block else n_panels(n), block)
    seg = _check_compressed("crow", crow, "col", col, nnz, fwd)
    if fmt == "2:4" and nnz > 2:
        # Entries are in key order (segments in order, offsets increasing), and a key // 4 names its (row, group of
        # 4 inputs) since a row's key range is a multiple of 4 wide: a third entry of a group sits two places on.
        group = fwd.keys(seg, col) >> 2
        if bool((group[2:] == group[:-2]).any()):
            raise ValueError("col holds 3 or more entries in one group of 4 inputs of a row: the 2:4 format keeps "
                             "at most 2 (torch's semi-structured kernel would drop the rest)")
    if row is not None and row.numel():
        _check_length("row", row, nnz)
        if bool((row != seg).any()):
            what = "block row" if block else "segment (row * panels + panel)"
            raise ValueError(f"row must hold each stored entry's {what}, as crow and col give it")
    if t_crow is None or t_row is None or t_perm is None or t_crow.numel() == t_row.numel() == t_perm.numel() == 0:
        return  # not given, or dropped (SparseWeight.drop_training_arrays)
    t_seg = _check_compressed("t_crow", t_crow, "t_row", t_row, nnz, trans)
    _check_length("t_perm", t_perm, nnz)
    if nnz == 0:
        return
    if int(t_perm.min()) < 0 or int(t_perm.max()) >= nnz:
        raise ValueError(f"t_perm must be a permutation of the {nnz} stored entries, got indices outside [0, {nnz})")
    # The two views' keys of each entry must agree. Keys within a view are distinct (entries strictly increase
    # within a segment), so agreement also proves t_perm a permutation; bincount only names the fault.
    if bool((fwd.keys(seg, col).index_select(0, t_perm) != trans.transposed_keys(t_seg, t_row, fwd)).any()):
        if bool((torch.bincount(t_perm.long(), minlength=nnz) != 1).any()):
            raise ValueError(f"t_perm must be a permutation of the {nnz} stored entries")
        raise ValueError("the transposed view (t_crow, t_row, t_perm) must describe the entries of crow and col")


class _View:
    """One compressed view of a [major, minor] matrix. CSR: ``panels`` segments per major index, each entry's index
    an offset within its panel of PANEL minor indices. Block: one segment per major index (panels = 1), each entry's
    index the minor (block) index itself.

    Positions are compared through an int64 key, major * width + minor: for CSR width = panels * PANEL, so an entry's
    key is segment * PANEL + offset with no division; for block width = minor."""

    def __init__(self, major: int, minor: int, panels: int, block: bool):
        self.major, self.minor, self.panels, self.block = major, minor, panels, block
        self.segments = major * panels
        self.width = minor if block else panels * PANEL
        self._per_segment = minor if block else PANEL  # key units per segment

    def keys(self, seg: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """int64 [nnz]: the key of each entry, from its segment and index."""
        return seg.long() * self._per_segment + idx.long()

    def transposed_keys(self, t_seg: torch.Tensor, t_idx: torch.Tensor, fwd: "_View") -> torch.Tensor:
        """int64 [nnz]: the keys in ``fwd``'s key space of this view's entries (this view is fwd transposed: its
        entry at (major c, minor r) sits at (r, c) of fwd). The segment parts are computed per segment, a few
        entries, and gathered, so no entry is divided."""
        s = torch.arange(self.segments, device=t_seg.device)
        c = torch.div(s, self.panels, rounding_mode="floor")  # this view's major index of each segment
        r_first = (s % self.panels) * (1 if self.block else PANEL)  # the segment's first minor index
        return (r_first * fwd.width + c).index_select(0, t_seg) + t_idx.long() * fwd.width


def _check_length(name: str, t: torch.Tensor, length: int) -> None:
    if t.dim() != 1 or t.numel() != length:
        raise ValueError(f"{name} must be 1-D with {length} entries, got shape {tuple(t.shape)}")


def _check_compressed(ptr_name: str, ptr: torch.Tensor, idx_name: str, idx: torch.Tensor, nnz: int,
                      view: _View) -> torch.Tensor:
    """Checks one compressed view (pointers + per-entry minor index); returns each entry's segment (int32)."""
    _check_length(ptr_name, ptr, view.segments + 1)
    _check_length(idx_name, idx, nnz)
    counts = ptr[1:] - ptr[:-1]
    if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((counts < 0).any()):
        raise ValueError(f"{ptr_name} must start at 0, never decrease and end at the {nnz} stored entries")
    seg = torch.repeat_interleave(torch.arange(view.segments, device=ptr.device, dtype=torch.int32), counts,
                                  output_size=nnz)
    if nnz == 0:
        return seg
    if view.block:
        if int(idx.min()) < 0 or int(idx.max()) >= view.minor:
            raise ValueError(f"{idx_name} must hold block indices in [0, {view.minor}), got [{int(idx.min())}, "
                             f"{int(idx.max())}]")
    else:
        last_width = view.minor - (view.panels - 1) * PANEL  # the last panel of each major index may be narrower
        if last_width < PANEL:
            past = (idx >= last_width).nonzero().squeeze(1)  # candidates: legal anywhere but in a last panel
            if bool((seg.index_select(0, past) % view.panels == view.panels - 1).any()):
                raise ValueError(f"{idx_name} holds an offset past the end of its panel ({view.minor} columns in "
                                 f"panels of {PANEL})")
    if nnz > 1 and bool(((seg[1:] == seg[:-1]) & (idx[1:] <= idx[:-1])).any()):
        raise ValueError(f"{idx_name} must be strictly increasing within each segment of {ptr_name} (sorted, no "
                         f"duplicate entries)")
    return seg
