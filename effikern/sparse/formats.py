"""Sparse weight formats for ``effikern.functional.sparse_linear``, and the converters that build them.

A :class:`SparseWeight` holds a pruned weight W [N = out_features, K = in_features] as the arrays of the kernel
interface shared by every backend (cpp, triton, cuda; docs/sparse_kernels.md); every index array is contiguous:

- ``"unstructured"`` (panelled CSR): the columns are cut into panels of ``PANEL`` (256), so an entry's column
  within its panel fits one byte. With P = ``n_panels(K)`` panels, a row's entries are grouped into P segments,
  segment s = row * P + panel: ``values [nnz]``, ``crow [N*P + 1]`` (int32, entries of segment s are
  crow[s]..crow[s+1]; row n is crow[n*P]..crow[(n+1)*P]), ``col [nnz]`` (uint8, the column minus panel * 256,
  sorted in each row). For training on the torch, triton and cuda backends (cpp's CSR backward needs only the
  forward arrays): ``row [nnz]`` (int32, the segment s of each entry, so row = s // P and
  column = (s % P) * 256 + col) and the same layout transposed, ``t_crow [K*Pn + 1]`` (Pn = ``n_panels(N)``),
  ``t_row [nnz]`` (uint8, the row minus its panel * 256), ``t_perm [nnz]`` (int32, index into values).
  Why: a 4-byte column index cost as much as an fp32 value (and twice an fp16 one), so CSR held as many bytes
  as the dense weight at 50% sparsity; the forward at few tokens streams exactly these bytes from memory.
  One byte per index plus 4 bytes per 256 columns of a row: 5 B per kept fp32 weight instead of 8.
- ``"block"`` (BSR, blocks (BR, BC)): W zero-padded to [Np, Kp] (multiples of the block); ``values [nnzb, BR, BC]``,
  and int32 ``crow [Np/BR + 1]``, ``col [nnzb]``, ``row [nnzb]``, ``t_crow [Kp/BC + 1]``, ``t_row``, ``t_perm [nnzb]``.
- ``"2:4"``: at most 2 kept weights in every group of 4 along K (K % 4 == 0), held as the CSR above (a group
  with fewer kept weights stores fewer entries), so every backend's CSR kernels run it; on CUDA the forward goes
  through torch's semi-structured (2:4) kernels where the GPU, dtype and shape allow (``effikern/ops/sparse.py``).

``value_mask`` (bool, values' shape, or None when every stored value is kept) marks stored positions that the mask
prunes: the zeros inside a stored block. Their gradient is zeroed, so
fine-tuning never grows the pattern.

The converters round-trip exactly: ``from_dense(w, mask, fmt).to_dense() == w * mask``, bit for bit.
"""

import math
from typing import Dict, Optional, Tuple

import torch

FORMATS = ("unstructured", "block", "2:4")
# Columns per panel of the CSR formats: an entry's offset within its panel is one uint8.
PANEL = 256
# Arrays needed by backward only, and not by cpp's CSR backward; inference may leave them empty
# (see SparseWeight.drop_training_arrays).
TRAINING_ARRAYS = ("row", "t_crow", "t_row", "t_perm")
INDEX_ARRAYS = ("crow", "col") + TRAINING_ARRAYS


def offset_dtype(fmt: str) -> torch.dtype:
    """dtype of col and t_row: block indices are int32, CSR ones uint8 offsets within a panel (the other index
    arrays are int32 in every format)."""
    return torch.int32 if fmt == "block" else torch.uint8


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).contiguous()


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """[n] counts -> [n + 1] int32 prefix sums starting at 0."""
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    out[1:] = torch.cumsum(counts, 0)
    return _int32(out)


def n_panels(width: int) -> int:
    """Panels of PANEL columns covering ``width`` columns (at least 1)."""
    return max(1, math.ceil(width / PANEL))


def _panelled(major: torch.Tensor, minor: torch.Tensor, n_major: int, n_minor: int):
    """Entries sorted by (major, minor) -> (segment pointers [n_major * P + 1] int32, minor offsets uint8,
    segment of each entry int32), P = n_panels(n_minor)."""
    p = n_panels(n_minor)
    seg = major.long() * p + torch.div(minor.long(), PANEL, rounding_mode="floor")
    ptr = _offsets(torch.bincount(seg, minlength=n_major * p))
    return ptr, (minor.long() % PANEL).to(torch.uint8).contiguous(), _int32(seg)


def segment_coordinates(seg: torch.Tensor, offset: torch.Tensor, n_minor: int):
    """(major, minor) int64 index of entries given their segment s = major * P + panel and their offset in the
    panel (P = n_panels(n_minor)): the decoding of the ``row`` training array."""
    p, seg = n_panels(n_minor), seg.long()
    return torch.div(seg, p, rounding_mode="floor"), (seg % p) * PANEL + offset.long()


def csr_coordinates(ptr: torch.Tensor, offset: torch.Tensor, n_major: int, n_minor: int):
    """(major, minor) int64 index of every entry of a panelled CSR (ptr [n_major * P + 1] running from 0 to nnz,
    offset [nnz] uint8)."""
    segments = torch.arange(n_major * n_panels(n_minor), device=ptr.device)
    # output_size: the segment counts sum to ptr[-1] - ptr[0] = nnz entries; without it repeat_interleave reads
    # the total back to the host, a device sync per call that also breaks CUDA-graph capture.
    seg = torch.repeat_interleave(segments, (ptr[1:] - ptr[:-1]).long(), output_size=offset.numel())
    return segment_coordinates(seg, offset, n_minor)


def _transposed_view(row: torch.Tensor, col: torch.Tensor, n_cols: int) -> Tuple[torch.Tensor, ...]:
    """Entries sorted by (col, row): (t_crow [n_cols + 1], t_row, t_perm) for entries given in (row, col) order."""
    order = torch.argsort(col.long() * (int(row.max()) + 1 if row.numel() else 1) + row.long(), stable=True)
    t_crow = _offsets(torch.bincount(col.long(), minlength=n_cols))
    return t_crow, _int32(row[order]), _int32(order)


class SparseWeight:
    """A pruned dense weight [out_features, in_features] in one of ``FORMATS`` (module docstring for the arrays).

    Build it with :func:`from_dense`. ``values`` may be an ``nn.Parameter`` (``SparseLinear`` trains it).
    """

    def __init__(self, fmt: str, shape: Tuple[int, int], values: torch.Tensor, crow: torch.Tensor,
                 col: torch.Tensor, row: torch.Tensor, t_crow: torch.Tensor, t_row: torch.Tensor,
                 t_perm: torch.Tensor, value_mask: Optional[torch.Tensor] = None,
                 block_size: Optional[Tuple[int, int]] = None, validate: bool = True):
        """``validate``: check the index arrays' contents (:meth:`validate`; reads them on the host once). Off only
        where they come from a weight already checked or built here (from_dense, ``to``, a module's forward)."""
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.format = fmt
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_size = tuple(block_size) if fmt == "block" else None
        self.values = values
        self.crow, self.col, self.row = crow, col, row
        self.t_crow, self.t_row, self.t_perm = t_crow, t_row, t_perm
        self.value_mask = value_mask
        if validate:
            self.validate()

    def validate(self) -> "SparseWeight":
        """Checks what the kernels trust (``effikern/sparse/checks.py``): pointers that run from 0 to the stored
        entries without decreasing, every index inside the weight and sorted within its segment, and training arrays
        (when present) that describe the same entries. A hand-built weight that broke this made the C++ kernels read
        out of bounds. Raises ValueError naming the array; returns self."""
        from .checks import check_index_arrays  # checks imports this module's panel helpers

        nnz = self.values.shape[0] if self.values.dim() else 0
        for name, t in self.arrays().items():
            want = offset_dtype(self.format) if name in ("col", "t_row") else torch.int32
            if not isinstance(t, torch.Tensor) or t.dtype != want:
                raise ValueError(f"{name} must be a {want} tensor, got "
                                 f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        check_index_arrays(self.format, self.shape, nnz, self.block_size, self.crow, self.col, self.row,
                           self.t_crow, self.t_row, self.t_perm)
        return self

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        """Stored weights (blocks count whole)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """Kept weights over all weights (stored padding and in-block zeros of the mask do not count)."""
        kept = self.nnz if self.value_mask is None else int(self.value_mask.count_nonzero())
        return kept / max(1, self.shape[0] * self.shape[1])

    def has_training_arrays(self) -> bool:
        """Whether row and the transposed view are present (the torch, triton and cuda backends' backward needs
        them, and every backend's block backward; the cpp CSR backward does not)."""
        return self.values.numel() == 0 or self.t_perm.numel() == self.col.numel()

    def to(self, device=None, dtype=None) -> "SparseWeight":
        """A copy on ``device`` with values in ``dtype`` (index arrays keep their dtypes, value_mask bool)."""
        moved = {name: t.to(device) for name, t in self.arrays().items()}
        return SparseWeight(self.format, self.shape, self.values.detach().to(device=device, dtype=dtype), **moved,
                            value_mask=None if self.value_mask is None else self.value_mask.to(device),
                            block_size=self.block_size, validate=False)

    def drop_training_arrays(self) -> "SparseWeight":
        """Frees row and the transposed view: inference, and the cpp backend's CSR backward, need only values, crow
        and col. A backward that needs them (the torch, triton and cuda backends; block on any) then raises."""
        for name in TRAINING_ARRAYS:
            setattr(self, name, getattr(self, name).new_empty(0))
        return self

    def arrays(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in INDEX_ARRAYS}

    def to_dense(self) -> torch.Tensor:
        """The masked dense weight [N, K], differentiable with respect to ``values``."""
        return densify(self.format, self.values, self.crow, self.col, *self.shape)

    def mask(self) -> torch.Tensor:
        """Bool [N, K]: the kept positions."""
        kept = torch.ones_like(self.values, dtype=torch.bool) if self.value_mask is None else self.value_mask.bool()
        return densify(self.format, kept, self.crow, self.col, *self.shape)

    def memory_report(self) -> Dict[str, int]:
        """Bytes held: values, index arrays (inference: crow + col; training adds row and the transposed view),
        the value mask, their total, and the dense weight's bytes for comparison."""
        index = sum(t.numel() * t.element_size() for t in self.arrays().values())
        vmask = 0 if self.value_mask is None else self.value_mask.numel() * self.value_mask.element_size()
        values = self.values.numel() * self.values.element_size()
        dense = self.shape[0] * self.shape[1] * self.values.element_size()
        return {"values": values, "indices": index, "value_mask": vmask, "total": values + index + vmask,
                "dense": dense}

    def __repr__(self) -> str:
        block = f", block_size={self.block_size}" if self.block_size else ""
        return (f"SparseWeight({self.format!r}, shape={self.shape}{block}, density={self.density:.3f}, "
                f"dtype={self.values.dtype}, device={self.values.device})")


def densify(fmt: str, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Dense [n, k] from the forward arrays (values' dtype; differentiable in values)."""
    if fmt == "block":
        br, bc = values.shape[1], values.shape[2]
        nb, kb = crow.numel() - 1, math.ceil(k / bc) if bc else 0
        row = torch.repeat_interleave(torch.arange(nb, device=crow.device), (crow[1:] - crow[:-1]).long(),
                                      output_size=col.numel())  # no device sync (csr_coordinates)
        blocks = values.new_zeros(nb, kb, br, bc).index_put((row, col.long()), values)
        return blocks.permute(0, 2, 1, 3).reshape(nb * br, kb * bc)[:n, :k]
    return values.new_zeros(n, k).index_put(csr_coordinates(crow, col, n, k), values)


def _check_weight_mask(weight, mask):
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                         f"{type(weight).__name__ if not isinstance(weight, torch.Tensor) else tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if mask is None:
        return weight != 0
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(weight.shape):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor of the weight's shape {tuple(weight.shape)}, got {got}")
    return mask.to(device=weight.device) != 0


def to_unstructured(weight: torch.Tensor, mask: Optional[torch.Tensor] = None) -> SparseWeight:
    """Panelled CSR of ``weight * mask`` (mask None: the nonzeros of ``weight``); kept positions holding 0 are
    stored."""
    mask = _check_weight_mask(weight, mask)
    weight = weight.detach()
    n, k = weight.shape
    row, col = mask.nonzero(as_tuple=True)  # row-major: sorted by row, then column
    values = weight[row, col].contiguous()
    crow, col_offset, seg = _panelled(row, col, n, k)
    by_col = torch.argsort(col * n + row, stable=True)  # the entries in (column, row) order
    t_crow, t_row_offset, _ = _panelled(col[by_col], row[by_col], k, n)
    return SparseWeight("unstructured", (n, k), values, crow, col_offset, seg, t_crow, t_row_offset,
                        _int32(by_col), validate=False)


def to_2of4(weight: torch.Tensor, mask: Optional[torch.Tensor] = None) -> SparseWeight:
    """2:4 of ``weight * mask``: every group of 4 consecutive inputs keeps at most 2 (K % 4 == 0 required)."""
    mask = _check_weight_mask(weight, mask)
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"the 2:4 format needs in_features divisible by 4, got {k}")
    groups = mask.reshape(n, k // 4, 4)
    kept = groups.sum(-1)
    if (kept > 2).any():
        bad = (kept > 2).nonzero()[0].tolist()
        raise ValueError(f"the mask is not 2:4: row {bad[0]}, inputs {4 * bad[1]}..{4 * bad[1] + 3} keep "
                         f"{int(kept[bad[0], bad[1]])} of 4")
    sw = to_unstructured(weight, mask)
    sw.format = "2:4"
    return sw


def to_block(weight: torch.Tensor, mask: Optional[torch.Tensor] = None,
             block_size: Tuple[int, int] = (32, 32)) -> SparseWeight:
    """BSR of ``weight * mask``: the blocks holding any kept weight are stored whole (zero-padded at the edges)."""
    mask = _check_weight_mask(weight, mask)
    br, bc = block_size_pair(block_size)
    n, k = weight.shape
    nb, kb = math.ceil(n / br), math.ceil(k / bc)

    def tiles(t):  # [n, k] -> [nb, kb, br, bc], zero-padded
        padded = t.new_zeros(nb * br, kb * bc)
        padded[:n, :k] = t
        return padded.reshape(nb, br, kb, bc).permute(0, 2, 1, 3)

    mask_tiles = tiles(mask)
    row, col = mask_tiles.any(-1).any(-1).nonzero(as_tuple=True)
    values = tiles(weight.detach() * mask)[row, col].contiguous()
    block_mask = mask_tiles[row, col]
    t_crow, t_row, t_perm = _transposed_view(row, col, kb)
    sw = SparseWeight("block", (n, k), values, _offsets(torch.bincount(row, minlength=nb)), _int32(col),
                      _int32(row), t_crow, t_row, t_perm, block_size=(br, bc), validate=False)
    if not bool(block_mask.all()):
        sw.value_mask = block_mask.contiguous()
    return sw


def block_size_pair(block_size) -> Tuple[int, int]:
    """(rows, cols) from an int or a pair of ints >= 1; ValueError naming block_size otherwise."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_size)):
        raise ValueError(f"block_size must be an int or a pair of ints >= 1, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def is_2of4(mask: torch.Tensor) -> bool:
    """Whether a [N, K] bool mask keeps at most 2 of every 4 consecutive inputs."""
    n, k = mask.shape
    return k % 4 == 0 and bool((mask.reshape(n, k // 4, 4).sum(-1) <= 2).all())


def is_block(mask: torch.Tensor, block_size: Tuple[int, int]) -> bool:
    """Whether every block of the mask is either fully kept or fully pruned (edge blocks: their in-range part)."""
    br, bc = block_size_pair(block_size)
    n, k = mask.shape
    nb, kb = math.ceil(n / br), math.ceil(k / bc)
    padded = mask.new_zeros(nb * br, kb * bc)
    inside = mask.new_zeros(nb * br, kb * bc)
    padded[:n, :k], inside[:n, :k] = mask, True
    kept = padded.reshape(nb, br, kb, bc).sum((1, 3))
    size = inside.reshape(nb, br, kb, bc).sum((1, 3))
    return bool(((kept == 0) | (kept == size)).all())


def from_dense(weight: torch.Tensor, mask: Optional[torch.Tensor] = None, format: str = "unstructured",
               block_size: Optional[Tuple[int, int]] = None) -> SparseWeight:
    """Converts ``weight * mask`` [N, K] (mask None: the zeros of ``weight`` are the pruned positions).

    ``format``: "unstructured", "block" (``block_size``, default (32, 32)) or "2:4".
    """
    if format == "unstructured":
        return to_unstructured(weight, mask)
    if format == "block":
        return to_block(weight, mask, (32, 32) if block_size is None else block_size)
    if format == "2:4":
        return to_2of4(weight, mask)
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
