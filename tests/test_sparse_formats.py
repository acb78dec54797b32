"""effikern.sparse converters: exact round trips, the index arrays' invariants, memory held, clear errors."""

import math

import pytest
import torch
from sparse_util import random_mask, with_arrays

from effikern.sparse import PANEL, csr_coordinates, from_dense, is_2of4, is_block, n_panels
from effikern.nn import SparseLinear
from effikern.sparse.formats import segment_coordinates

FORMATS = ["unstructured", "block", "2:4"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(fmt, sparsity, dtype):
    w = torch.randn(19, 24).to(dtype)
    mask = random_mask(fmt, 19, 24, sparsity, block=(4, 8), inner=0.3)
    sw = from_dense(w, mask, fmt, (4, 8))
    assert torch.equal(sw.to_dense(), w * mask)
    assert torch.equal(sw.mask(), mask)
    assert sw.values.dtype == dtype


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_with_zeros_is_its_own_mask(fmt):
    mask = random_mask(fmt, 8, 16, 0.6, block=(4, 4))
    w = torch.randn(8, 16) * mask
    sw = from_dense(w, None, fmt, (4, 4))
    assert torch.equal(sw.to_dense(), w)
    assert torch.equal(sw.mask(), w != 0)


def test_kept_zero_is_stored():
    """A position the mask keeps but whose weight is 0 is stored (the mask, not the value, is the pattern)."""
    w = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    sw = from_dense(w, torch.ones(2, 2), "unstructured")
    assert sw.nnz == 4 and torch.equal(sw.to_dense(), w)


def test_block_arrays_follow_the_spec():
    """int32, sorted block columns per block row, and a transposed view that lists every block once."""
    mask = random_mask("block", 21, 30, 0.6, block=(4, 8))
    sw = from_dense(torch.randn(21, 30), mask, "block", (4, 8))
    for name, t in sw.arrays().items():
        assert t.dtype == torch.int32 and t.is_contiguous(), name
    rows = sw.crow.numel() - 1
    for r in range(rows):
        cols = sw.col[sw.crow[r]:sw.crow[r + 1]]
        assert torch.all(cols[1:] > cols[:-1])
        assert torch.all(sw.row[sw.crow[r]:sw.crow[r + 1]] == r)
    assert torch.equal(torch.sort(sw.t_perm.long()).values, torch.arange(sw.values.shape[0]))
    for c in range(sw.t_crow.numel() - 1):
        entries = sw.t_perm[sw.t_crow[c]:sw.t_crow[c + 1]].long()
        assert torch.all(sw.col[entries] == c)
        assert torch.equal(sw.t_row[sw.t_crow[c]:sw.t_crow[c + 1]], sw.row[entries])
        assert torch.all(sw.t_row[sw.t_crow[c] + 1:sw.t_crow[c + 1]] > sw.t_row[sw.t_crow[c]:sw.t_crow[c + 1] - 1])


def _entries(ptr, offsets, n_major, n_minor):
    """(major, minor) of each entry of a panelled CSR, walked segment by segment as a kernel does."""
    p = math.ceil(n_minor / PANEL)
    out = []
    for major in range(n_major):
        for panel in range(p):
            s = major * p + panel
            out += [(major, panel * PANEL + int(offsets[e])) for e in range(int(ptr[s]), int(ptr[s + 1]))]
    return out


def test_csr_arrays_follow_the_spec():
    """Panelled CSR: int32 segment pointers, uint8 offsets, entries sorted by (row, column), row[] holding each
    entry's segment, and a transposed view listing every entry once sorted by (column, row). 300 x 600 spans
    3 column panels and 2 row panels, with a partial last panel in both."""
    n, k = 300, 600
    mask = random_mask("unstructured", n, k, 0.9)
    w = torch.randn(n, k)
    sw = from_dense(w, mask, "unstructured")
    p, pn = n_panels(k), n_panels(n)
    assert (p, pn) == (3, 2)
    dtypes = dict(crow=torch.int32, col=torch.uint8, row=torch.int32, t_crow=torch.int32, t_row=torch.uint8,
                  t_perm=torch.int32)
    for name, t in sw.arrays().items():
        assert t.dtype == dtypes[name] and t.is_contiguous(), name
    assert sw.crow.numel() == n * p + 1 and sw.t_crow.numel() == k * pn + 1
    entries = _entries(sw.crow, sw.col, n, k)
    assert entries == [tuple(rc) for rc in mask.nonzero().tolist()]  # every kept weight once, row-major
    seg = torch.tensor([r * p + c // PANEL for r, c in entries], dtype=torch.int32)
    assert torch.equal(sw.row, seg)
    assert torch.equal(sw.values, w[mask])
    by_col = _entries(sw.t_crow, sw.t_row, k, n)  # (column, row) pairs
    assert by_col == sorted((c, r) for r, c in entries)
    for (c, r), e in zip(by_col, sw.t_perm.tolist()):
        assert entries[e] == (r, c)


@pytest.mark.parametrize("sparsity", [0.0, 0.9, 1.0])  # every weight kept, empty segments, nothing stored
def test_csr_coordinates(sparsity):
    """csr_coordinates (repeat_interleave told its output size, nnz, so no device sync) lists every entry's
    (row, column) in storage order, for the forward arrays and the transposed view, exactly as when
    repeat_interleave counted the output itself; a pointer array that does not end at nnz is refused."""
    n, k = 300, 600
    mask = random_mask("unstructured", n, k, sparsity)
    sw = from_dense(torch.randn(n, k), mask, "unstructured")
    for ptr, offset, major, minor, order in ((sw.crow, sw.col, n, k, mask), (sw.t_crow, sw.t_row, k, n, mask.t())):
        coords = csr_coordinates(ptr, offset, major, minor)
        counted = torch.repeat_interleave(torch.arange(major * n_panels(minor)), (ptr[1:] - ptr[:-1]).long())
        for got, before in zip(coords, segment_coordinates(counted, offset, minor)):
            assert got.dtype == torch.int64 and torch.equal(got, before)
        assert torch.equal(torch.stack(coords, 1), order.nonzero())
    too_long = sw.crow.clone()
    too_long[-1] += 1
    with pytest.raises(RuntimeError):
        csr_coordinates(too_long, sw.col, n, k)


@pytest.mark.gpu
def test_csr_coordinates_do_not_sync():
    """On CUDA, csr_coordinates queues its work without waiting for the device (a sync per call breaks CUDA-graph
    capture): torch's sync debug mode turns any sync into an error."""
    n, k = 300, 600
    mask = random_mask("unstructured", n, k, 0.9)
    sw = from_dense(torch.randn(n, k), mask, "unstructured").to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows, cols = csr_coordinates(sw.crow, sw.col, n, k)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(torch.stack([rows, cols], 1).cpu(), mask.nonzero())


def test_block_padding_and_value_mask():
    mask = random_mask("block", 10, 13, 0.5, block=(4, 8), inner=0.25)
    sw = from_dense(torch.randn(10, 13), mask, "block", (4, 8))
    assert sw.values.shape[1:] == (4, 8) and sw.crow.numel() == 3 + 1 and sw.t_crow.numel() == 2 + 1
    assert sw.value_mask is not None and sw.value_mask.dtype == torch.bool
    assert torch.all(sw.values[~sw.value_mask] == 0)


def test_two_of_four_stores_the_kept_weights_only():
    """Groups keeping fewer than 2 store fewer entries: no padding, so no value mask is needed."""
    mask = random_mask("2:4", 6, 16, 0.0)
    sw = from_dense(torch.randn(6, 16), mask, "2:4")
    assert sw.nnz == int(mask.sum()) < 6 * 16 // 2
    assert sw.value_mask is None
    assert torch.equal(sw.crow[1:] - sw.crow[:-1], mask.sum(1).int())  # 16 columns: one panel, a segment is a row


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inference_memory_below_dense_at_half_sparsity(fmt, dtype):
    """Values + crow + col (the inference arrays) take fewer bytes than the dense weight at 50% sparsity.

    CSR and 2:4 hold a 1-byte offset per kept weight plus 4 bytes per 256 columns of a row: at 50%, fp16,
    1 + 0.5 + 0.016 bytes per weight against 2. Block holds one int32 per block.
    """
    w = torch.randn(256, 512).to(dtype)
    mask = random_mask(fmt, 256, 512, 0.5, block=(32, 32))
    report = from_dense(w, mask, fmt, (32, 32)).drop_training_arrays().memory_report()
    assert report["total"] < report["dense"], report


def test_predicates():
    assert is_2of4(random_mask("2:4", 4, 8, 0.0))
    assert not is_2of4(torch.ones(4, 8, dtype=torch.bool))
    assert is_block(random_mask("block", 10, 13, 0.5, block=(4, 8)), (4, 8))
    partial = torch.zeros(8, 8, dtype=torch.bool)
    partial[0, 0] = True  # one kept weight in a 4x4 block: not whole blocks
    assert not is_block(partial, (4, 4))


class TestErrors:
    def test_format(self):
        with pytest.raises(ValueError, match="format must be one of"):
            from_dense(torch.randn(4, 4), None, "csr")

    def test_mask_shape(self):
        with pytest.raises(ValueError, match="mask must be a tensor of the weight's shape"):
            from_dense(torch.randn(4, 4), torch.ones(4, 5))

    def test_weight_dims(self):
        with pytest.raises(ValueError, match="weight must be a 2-D tensor"):
            from_dense(torch.randn(4), None)

    def test_not_two_of_four(self):
        with pytest.raises(ValueError, match="the mask is not 2:4: row 0"):
            from_dense(torch.randn(2, 8), torch.ones(2, 8), "2:4")

    def test_two_of_four_width(self):
        with pytest.raises(ValueError, match="divisible by 4"):
            from_dense(torch.randn(2, 6), None, "2:4")

    def test_block_size(self):
        with pytest.raises(ValueError, match="block_size must be"):
            from_dense(torch.randn(4, 4), None, "block", (0, 4))


def _rebuilt(sw, **replace):
    return with_arrays(sw, True, **replace)


def test_hand_built_index_arrays_are_checked():
    """The C++ kernels trust the index arrays: a crow past the stored entries made them read out of bounds (a
    segfault). A SparseWeight built by hand, or loaded from a checkpoint, is checked first."""
    torch.manual_seed(0)
    sw = from_dense(torch.randn(6, 300), torch.rand(6, 300) > 0.5)  # two panels, the second 44 columns wide
    _rebuilt(sw)  # the arrays as built pass
    crow = sw.crow.clone()
    crow[-1] = 10**6
    with pytest.raises(ValueError, match="crow must start at 0, never decrease and end at"):
        _rebuilt(sw, crow=crow)
    col = sw.col.clone()
    last_panel = int(sw.crow[1])  # the first entry of row 0's second panel
    col[last_panel] = 250
    with pytest.raises(ValueError, match="col holds an offset past the end of its panel"):
        _rebuilt(sw, col=col)
    block = from_dense(torch.randn(8, 16), None, "block", (4, 4))
    bad = block.col.clone()
    bad[0] = 4
    with pytest.raises(ValueError, match=r"col must hold block indices in \[0, 4\)"):
        _rebuilt(block, col=bad)
    dense = torch.nn.Linear(300, 6)
    with torch.no_grad():
        dense.weight.mul_(torch.rand(6, 300) > 0.5)
    state = SparseLinear.from_linear(dense, format="unstructured").state_dict()
    state["crow"] = state["crow"].clone()
    state["crow"][-1] += 1
    with pytest.raises(ValueError, match="crow must start at 0"):
        SparseLinear.from_linear(dense, format="unstructured").load_state_dict(state)
