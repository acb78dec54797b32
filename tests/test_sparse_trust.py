"""The raw sparse ops check the contents of index arrays they did not build (effikern/sparse/checks.py) before any
kernel trusts them, once per set of arrays: a hand-made crow past the stored entries, an offset past the last panel,
a duplicated entry, a wrong row or a transposed view of other entries gives a ValueError naming the array, on every
backend, instead of an out-of-bounds access or a silently wrong gradient."""

import functools

import pytest
import torch
from backend_util import device_for, skip_unavailable
from sparse_util import with_arrays

import effikern
from effikern.ops import sparse as sparse_ops
from effikern.sparse import from_dense

BACKENDS = ["torch", "cpp", pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.gpu)]


def _weight(fmt="unstructured", device="cpu"):
    """6 x 300 at ~50%: two column panels (the second 44 columns wide), so offsets can point past the weight."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 300, generator=g)
    mask = torch.rand(6, 300, generator=g) > 0.5
    if fmt == "block":
        return from_dense(w, None, "block", (2, 4)).to(device)
    return from_dense(w, mask, fmt).to(device)


def _forward(sw, x):
    a = sw.arrays()
    return torch.ops.effikern.sparse_linear(x, sw.values, a["crow"], a["col"], a["row"], a["t_crow"], a["t_row"],
                                            a["t_perm"], sw.value_mask, None, sw.format, *sw.shape)


def _grad_input(sw, gy):
    a = sw.arrays()
    return torch.ops.effikern.sparse_linear_grad_input(gy, sw.values, a["crow"], a["col"], a["t_crow"], a["t_row"],
                                                       a["t_perm"], sw.format, *sw.shape)


def _grad_values(sw, gy, x):
    a = sw.arrays()
    return torch.ops.effikern.sparse_linear_grad_values(gy, x, a["crow"], a["row"], a["col"], sw.value_mask,
                                                        list(sw.values.shape), sw.format)


def _replaced(sw, **arrays):
    return with_arrays(sw, False, **arrays)  # unchecked: the op must catch them


def _refuses(cases):
    """cases: (run, weight, match): run(weight) raises a ValueError matching match."""
    for run, weight, match in cases:
        with pytest.raises(ValueError, match=match):
            run(weight)


def _first_two_in_one_segment(ptr):
    """Index of the first entry whose segment holds at least two entries."""
    counts = ptr[1:].long() - ptr[:-1].long()
    return int(ptr[int((counts >= 2).nonzero()[0])])


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_refuses_bad_forward_arrays(backend):
    device = device_for(backend)
    skip_unavailable(backend, device)
    sw = _weight(device=device)
    x = torch.randn(3, 300, device=device)
    crow = sw.crow.clone()
    crow[-1] = 10**6
    col = sw.col.clone()
    col[int(sw.crow[1])] = 250  # row 0's second panel holds 44 columns
    dup = sw.col.clone()
    i = _first_two_in_one_segment(sw.crow)
    dup[i + 1] = dup[i]
    block = _weight("block", device)
    bad = block.col.clone()
    bad[0] = 75  # the grid is 3 x 75 blocks
    forward = functools.partial(_forward, x=x)
    with effikern.set_backend(backend):
        forward(sw)  # the arrays as built pass
        _refuses([
            (forward, _replaced(sw, crow=crow), "crow must start at 0, never decrease and end at"),
            (forward, _replaced(sw, col=col), "col holds an offset past the end of its panel"),
            (forward, _replaced(sw, col=dup), "col must be strictly increasing within each segment"),
            (forward, _replaced(block, col=bad), r"col must hold block indices in \[0, 75\)"),
        ])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["unstructured", "block"])
def test_backward_refuses_bad_training_arrays(backend, fmt):
    device = device_for(backend)
    skip_unavailable(backend, device)
    sw = _weight(fmt, device)
    x = torch.randn(3, 300, device=device)
    gy = torch.randn(3, 6, device=device)
    row = sw.row.clone()
    row[0] += 1
    repeated = sw.t_perm.clone()
    repeated[1] = repeated[0]
    swapped = sw.t_perm.clone()
    swapped[[0, -1]] = swapped[[-1, 0]]  # still a permutation, but entry 0 now sits where entry -1 does
    t_row = sw.t_row.clone()
    t_row[-1] = 255 if fmt != "block" else 10**6
    grad_input = functools.partial(_grad_input, gy=gy)
    grad_values = functools.partial(_grad_values, gy=gy, x=x)
    with effikern.set_backend(backend):
        grad_input(sw), grad_values(sw)  # the arrays as built pass
        _refuses([
            (grad_values, _replaced(sw, row=row), "row must hold each stored entry's"),
            (grad_input, _replaced(sw, t_perm=repeated), "t_perm must be a permutation"),
            (grad_input, _replaced(sw, t_perm=swapped),
             "the transposed view .* must describe the entries of crow and col"),
            (grad_input, _replaced(sw, t_row=t_row), "t_row"),
        ])


def test_checked_once_until_changed_in_place(monkeypatch):
    """The check runs the first time a set of arrays is seen, not every call; an in-place change to an array (or to
    a view of it) bumps its version counter, and the next call checks again."""
    calls = []
    real = sparse_ops.check_index_arrays
    monkeypatch.setattr(sparse_ops, "check_index_arrays", lambda *a, **k: calls.append(1) or real(*a, **k))
    sw = _weight()
    x = torch.randn(2, 300)
    with effikern.set_backend("cpp"):
        for _ in range(3):
            _forward(sw, x)
        assert len(calls) == 1
        sw.crow[1:].view(-1)[-1] = 10**6  # through a view
        with pytest.raises(ValueError, match="crow must start at 0"):
            _forward(sw, x)
        assert len(calls) == 2


def test_inference_tensors_are_checked_every_call(monkeypatch):
    calls = []
    real = sparse_ops.check_index_arrays
    monkeypatch.setattr(sparse_ops, "check_index_arrays", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.inference_mode():
        sw = _weight()
        x = torch.randn(2, 300)
        with effikern.set_backend("cpp"):
            _forward(sw, x), _forward(sw, x)
    assert len(calls) == 2


def test_sparse_weight_validate_checks_the_training_arrays():
    sw = _weight()
    row = sw.row.clone()
    row[-1] = 0
    with pytest.raises(ValueError, match="row must hold"):
        _replaced(sw, row=row).validate()
    with pytest.raises(ValueError, match="t_perm must be a permutation"):
        _replaced(sw, t_perm=torch.zeros_like(sw.t_perm)).validate()
    sw.drop_training_arrays().validate()  # dropped arrays are not checked


@pytest.mark.parametrize("fmt", ["unstructured", "2:4", "block"])
@pytest.mark.parametrize("shape,kept", [((300, 520), 0.3), ((257, 4), 0.5), ((1, 8), 1.0), ((5, 12), 0.0)])
def test_weights_built_here_pass(fmt, shape, kept):
    """No false alarm: several panels in both views (300 x 520: 3 column panels, 2 row panels in the transposed
    view), a single row, an all-pruned weight; and a corrupted transposed view of the same weight is caught."""
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) < kept
    if fmt == "2:4":
        mask = mask.reshape(shape[0], -1, 4)
        mask[..., 2:] = False
        mask = mask.reshape(shape)
    sw = from_dense(torch.randn(shape, generator=g), mask, fmt, (4, 8) if fmt == "block" else None)
    sw.validate()
    if sw.nnz and sw.values.shape[0] > 1:
        swapped = sw.t_perm.clone()
        swapped[[0, -1]] = swapped[[-1, 0]]
        with pytest.raises(ValueError, match="transposed view"):
            _replaced(sw, t_perm=swapped).validate()


def test_two_of_four_keeps_at_most_two_per_group():
    """A "2:4" weight with 3 entries in a group of 4 would be silently cut to 2 by torch's semi-structured kernel
    (the CUDA fp16/bf16 forward): refused, while the same arrays pass as "unstructured"."""
    w = torch.zeros(2, 8)
    w[1, 4:7] = 1.0  # row 1, inputs 4..6: three of one group
    sw = from_dense(w)
    sw.validate()
    sw.format = "2:4"
    with pytest.raises(ValueError, match="3 or more entries in one group of 4"):
        sw.validate()
    with pytest.raises(ValueError, match="3 or more entries in one group of 4"), effikern.set_backend("cpp"):
        _forward(sw, torch.randn(1, 8))


@pytest.mark.gpu
def test_cuda_graph_capture_needs_a_warm_up():
    """Checking fresh arrays reads values back to the host, which capture forbids: a clear error naming the fix,
    and after one warm-up call the capture runs (only a dictionary lookup) and replays correctly."""
    device = device_for("cuda")
    skip_unavailable("cuda", device)
    sw = _weight(device=device)
    x = torch.randn(3, 300, device=device)
    graph = torch.cuda.CUDAGraph()
    with effikern.set_backend("cuda"):
        with pytest.raises(RuntimeError, match="warm-up"), torch.cuda.graph(graph):
            _forward(sw, x)
        expected = _forward(sw, x)  # the warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = _forward(sw, x)
    graph.replay()
    torch.testing.assert_close(y, expected)
