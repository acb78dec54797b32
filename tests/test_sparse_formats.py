"""effikern.sparse converters: exact round trips, the index arrays' invariants, memory held, clear errors."""

import pytest
import torch
from sparse_util import random_mask

from effikern.sparse import from_dense, is_2of4, is_block

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


@pytest.mark.parametrize("fmt", ["unstructured", "block"])
def test_index_arrays_follow_the_spec(fmt):
    """int32, sorted columns per row, and a transposed view that lists every entry once, sorted by row."""
    mask = random_mask(fmt, 21, 30, 0.6, block=(4, 8))
    sw = from_dense(torch.randn(21, 30), mask, fmt, (4, 8))
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


def test_block_padding_and_value_mask():
    mask = random_mask("block", 10, 13, 0.5, block=(4, 8), inner=0.25)
    sw = from_dense(torch.randn(10, 13), mask, "block", (4, 8))
    assert sw.values.shape[1:] == (4, 8) and sw.crow.numel() == 3 + 1 and sw.t_crow.numel() == 2 + 1
    assert sw.value_mask is not None and sw.value_mask.dtype == torch.bool
    assert torch.all(sw.values[~sw.value_mask] == 0)


def test_two_of_four_pads_groups_to_two():
    mask = random_mask("2:4", 6, 16, 0.0)
    sw = from_dense(torch.randn(6, 16), mask, "2:4")
    assert sw.nnz == 6 * 16 // 2
    assert torch.all(sw.crow[1:] - sw.crow[:-1] == 8)
    assert int(sw.value_mask.sum()) == int(mask.sum())


@pytest.mark.parametrize("fmt,sparsity,dtype", [("block", 0.5, torch.float32), ("block", 0.5, torch.bfloat16),
                                                ("unstructured", 0.6, torch.float32),
                                                ("unstructured", 0.7, torch.bfloat16)])
def test_inference_memory_below_dense(fmt, sparsity, dtype):
    """Values + crow + col (the inference arrays) take fewer bytes than the dense weight.

    Unstructured holds 4 + 2 (bf16) or 4 + 4 (fp32) bytes per kept weight, so it is below dense only past
    50% (fp32) / 67% (bf16) sparsity; block holds one index per block and is below dense at 50%.
    """
    w = torch.randn(256, 256).to(dtype)
    mask = random_mask(fmt, 256, 256, sparsity, block=(32, 32))
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
