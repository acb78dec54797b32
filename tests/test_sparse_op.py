"""torch.ops.effikern.sparse_linear on every backend and format against the float64 dense masked matmul."""

import pytest
import torch
import torch.nn.functional as F
from backend_util import device_for, skip_unavailable
from oracle import assert_matches
from sparse_util import check_all, random_weight

import effikern

FORMATS = ["unstructured", "block", "2:4"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _backends():
    return ["torch", "cpp", pytest.param("triton", marks=pytest.mark.triton),
            pytest.param("cuda", marks=pytest.mark.gpu)]


def _run(backend, fmt, dtype, n, k, lead, sparsity, block=(4, 8), inner=0.0, with_bias=True):
    device = device_for(backend)
    skip_unavailable(backend, device)
    sw, dense = random_weight(fmt, n, k, sparsity, dtype, device, block, inner)
    x = torch.randn(*lead, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    gy = torch.randn(*lead, n, device=device).to(dtype)
    check_all(backend, sw, dense, x, bias, gy)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
# one token (gather path), 3 (gather), 3-D with 70 tokens (packed path, two chunks); several sparsities
@pytest.mark.parametrize("sparsity,lead", [(0.9, (1,)), (0.5, (3,)), (0.7, (2, 5, 7))])
def test_matches_reference(backend, fmt, dtype, sparsity, lead):
    _run(backend, fmt, dtype, 37, 40, lead, sparsity, block=(8, 16), inner=0.2)


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_matches_reference(fmt):
    _run("triton", fmt, torch.float32, 20, 24, (2, 3), 0.6, block=(16, 16))


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["unstructured", "2:4"])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 35)])  # gather path, and packed path with two token chunks
def test_csr_panels(backend, fmt, dtype, lead):
    """520 inputs and 300 outputs: 3 column panels of 256 (the last holding 8 columns, often none kept at 90%) and 2
    row panels in the transposed view, so every kernel walks several segments per row, empty ones included."""
    _run(backend, fmt, dtype, 300, 520, lead, 0.9)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_packed_forward_row_tiles(threads, dtype):
    """The packed forward stages output rows 16 at a time (csrc/cpu/sparse_row_stage.h): 70 tokens are two token
    chunks (64 + 6) and 300 rows are 18 full tiles and one of 12, so one thread crosses a chunk with a part-full tile
    and three threads start and end their ranges mid-tile."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _run("cpp", "unstructured", dtype, 300, 520, (70,), 0.9)
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [65536, 65537])
@pytest.mark.parametrize("tokens", [1, 4])
def test_cpp_gather_path_wide_rows(dtype, k, tokens):
    """Rows of short segments are expanded to uint16 columns (csrc/cpu/sparse_row_columns.h) up to 65536 inputs
    (columns 0..65535), and walked panel by panel beyond that. 7 rows at 10% (~26-entry segments: two 16-wide
    expansions each) and a last row kept whole, whose last segments end at the end of the offsets array (the
    expansion must not read past it); on average 54 entries per panel, so an AVX2 CPU takes the flat walk at 65536
    (flat_walk(): <= 64), for 1 token gathered and 4 packed."""
    n = 8
    w = torch.randn(n, k, dtype=torch.float64).to(dtype)
    mask = torch.rand(n, k) < 0.1
    mask[-1] = True
    sw = effikern.sparse.from_dense(w, mask, "unstructured")
    x = torch.randn(tokens, k).to(dtype)
    check_all("cpp", sw, w.double() * mask, x, torch.randn(n).to(dtype), torch.randn(tokens, n).to(dtype))


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("fmt", ["unstructured", "2:4"])
@pytest.mark.parametrize("lead", [(1,), (3,)])
def test_triton_csr_panels(fmt, lead):
    _run("triton", fmt, torch.float32, 300, 520, lead, 0.9)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", ["unstructured", "block"])
def test_odd_shapes(backend, fmt):
    """in=13, out=7, one token; blocks that straddle both edges."""
    _run(backend, fmt, torch.float32, 7, 13, (1,), 0.5, block=(4, 4))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", FORMATS)
def test_strided_bias_and_input(backend, fmt):
    """A bias that is a strided view (column 0 of a matrix) and a transposed x: the kernels read bias[o] and x's
    rows at stride 1, so the op must hand them contiguous copies (a strided bias once added the wrong values)."""
    device = device_for(backend)
    skip_unavailable(backend, device)
    sw, dense = random_weight(fmt, 24, 32, 0.5, torch.float32, device, (8, 8), 0.0)
    bias_matrix = torch.randn(24, 3, device=device, requires_grad=True)
    x = torch.randn(32, 5, device=device).t().requires_grad_()
    bias = bias_matrix[:, 0]
    assert not bias.is_contiguous() and not x.is_contiguous()
    with effikern.set_backend(backend):
        y = effikern.functional.sparse_linear(x, sw, bias)
        y.backward(torch.ones_like(y))
    truth = F.linear(x.detach().double(), dense, bias.detach().double())
    assert_matches("y", y, truth, F.linear(x.detach(), dense.float(), bias.detach()))
    assert torch.equal(bias_matrix.grad[:, 0], torch.full((24,), 5.0, device=device))
    assert torch.equal(bias_matrix.grad[:, 1:], torch.zeros(24, 2, device=device))
    assert_matches("grad_x", x.grad, torch.ones(5, 24, dtype=torch.float64, device=device) @ dense,
                   torch.ones(5, 24, device=device) @ dense.float())


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("sparsity", [0.0, 1.0])  # fully dense, and all-zero weight (nothing stored)
def test_all_kept_and_all_pruned(backend, fmt, sparsity):
    _run(backend, fmt, torch.float32, 16, 32, (2, 3), sparsity, block=(16, 16))


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (5, 3)])
def test_cpp_block_sizes(block):
    _run("cpp", "block", torch.float32, 70, 130, (9,), 0.6, block=block, inner=0.1)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_gradcheck_float64(backend, fmt):
    skip_unavailable(backend, "cpu")
    sw, _ = random_weight(fmt, 6, 8, 0.5, torch.float64, "cpu", block=(4, 4))
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    values = sw.values.clone().requires_grad_()
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        # Stored-but-pruned positions (value_mask False) get no gradient by design: take them out of the function
        # too, so the numerical gradient agrees there.
        if sw.value_mask is not None:
            values = torch.where(sw.value_mask, values, 0.0)
        return torch.ops.effikern.sparse_linear(x, values, sw.crow, sw.col, sw.row, sw.t_crow, sw.t_row, sw.t_perm,
                                                sw.value_mask, bias, fmt, 6, 8)

    with effikern.set_backend(backend):
        assert torch.autograd.gradcheck(f, (x, values, bias))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_eager_path_is_the_op_without_the_dispatcher(backend, fmt):
    """functional.sparse_linear in plain eager mode runs ops.sparse.EagerSparseLinear (the op's implementation and
    gradients without the dispatcher's autograd layer): the same output and gradients as the registered op, bit for
    bit; under a dispatch mode it goes through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    skip_unavailable(backend, "cpu")
    sw, _ = random_weight(fmt, 12, 40, 0.5, torch.float32, "cpu", block=(4, 8), inner=0.2)
    sw.values.requires_grad_()
    x = torch.randn(2, 3, 40, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    gy = torch.randn(2, 3, 12)
    with effikern.set_backend(backend):
        y = effikern.functional.sparse_linear(x, sw, bias)
        assert type(y.grad_fn).__name__ == "EagerSparseLinearBackward"
        grads = torch.autograd.grad(y, [x, sw.values, bias], gy, retain_graph=True)
        # create_graph=True: a gradient with a graph (test_double_backward_goes_through_the_reference)
        g_x, = torch.autograd.grad(y, [x], gy.clone().requires_grad_(), create_graph=True)
        assert g_x.requires_grad
        y_op = torch.ops.effikern.sparse_linear(x, sw.values, sw.crow, sw.col, sw.row, sw.t_crow, sw.t_row, sw.t_perm,
                                                sw.value_mask, bias, fmt, 12, 40)
        grads_op = torch.autograd.grad(y_op, [x, sw.values, bias], gy)
    assert torch.equal(y, y_op)
    for g, g_op in zip(grads, grads_op):
        assert torch.equal(g, g_op)

    class Seen(TorchDispatchMode):
        ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Seen.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    with Seen(), effikern.set_backend(backend):
        effikern.functional.sparse_linear(x, sw, bias)
    assert any("effikern.sparse_linear" in name for name in Seen.ops), Seen.ops


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    sw, _ = random_weight(fmt, 12, 16, 0.5, torch.float32, "cpu", block=(4, 8), inner=0.2)
    x = torch.randn(3, 16, requires_grad=True)
    values = sw.values.clone().requires_grad_()
    args = (x, values, sw.crow, sw.col, sw.row, sw.t_crow, sw.t_row, sw.t_perm, sw.value_mask,
            torch.randn(12, requires_grad=True), fmt, 12, 16)
    torch.library.opcheck(torch.ops.effikern.sparse_linear, args)
    gy = torch.randn(3, 12)
    torch.library.opcheck(torch.ops.effikern.sparse_linear_grad_input,
                          (gy, sw.values, sw.crow, sw.col, sw.t_crow, sw.t_row, sw.t_perm, fmt, 12, 16))
    torch.library.opcheck(torch.ops.effikern.sparse_linear_grad_values,
                          (gy, x.detach(), sw.crow, sw.row, sw.col, sw.value_mask, list(sw.values.shape), fmt))


@pytest.mark.parametrize("fmt", ["unstructured", "2:4"])
def test_cpp_csr_trains_without_the_training_arrays(fmt):
    """cpp computes the CSR gradients from the forward arrays alone: a weight whose training arrays were dropped
    (inference memory) still trains on the CPU, with the same gradients."""
    device = device_for("cpp")
    skip_unavailable("cpp", device)
    sw, dense = random_weight(fmt, 300, 520, 0.9, torch.float32, device)
    sw.drop_training_arrays()
    assert sw.t_perm.numel() == sw.row.numel() == 0
    check_all("cpp", sw, dense, torch.randn(2, 35, 520), torch.randn(300), torch.randn(2, 35, 300))


def test_training_arrays_dropped_fail_clearly():
    sw, _ = random_weight("unstructured", 8, 8, 0.5, torch.float32, "cpu")
    sw.drop_training_arrays()
    sw.values.requires_grad_()
    with effikern.set_backend("torch"):
        y = effikern.functional.sparse_linear(torch.randn(2, 8), sw)
        with pytest.raises(RuntimeError, match="training arrays"):
            y.sum().backward()


def test_cuda_kernels_run_on_their_tensors_device(monkeypatch):
    """The cuda backend's kernels run with their tensors' device current and that device's stream (the glue refuses
    tensors on cuda:1 while cuda:0 is current); checked without a GPU through stand-ins for the extension and CUDA."""
    import contextlib
    import types

    from effikern import _ext
    from effikern.ops import sparse as sparse_ops

    seen = []

    @contextlib.contextmanager
    def device(d):
        seen.append(("enter", d))
        yield
        seen.append(("exit", d))

    ext = types.SimpleNamespace(sparse_csr_fwd_cuda=lambda *args: seen.append(("kernel", args[-1])))
    monkeypatch.setattr(_ext, "require", lambda kind: ext)
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d: types.SimpleNamespace(cuda_stream=f"stream of {d}"))
    x = types.SimpleNamespace(device=torch.device("cuda", 1))
    sparse_ops._load_cuda().csr_fwd(x, None, None, None, None, 8, 8)
    cuda1 = torch.device("cuda", 1)
    assert seen == [("enter", cuda1), ("kernel", "stream of cuda:1"), ("exit", cuda1)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.triton), "cuda"])
def test_second_gpu_while_first_is_current(backend):
    """A weight and input on cuda:1 with cuda:0 current (a model moved without torch.cuda.set_device)."""
    skip_unavailable(backend, "cuda")
    sw, dense = random_weight("unstructured", 37, 40, 0.5, torch.float16, "cuda:1")
    x = torch.randn(3, 40, device="cuda:1").half()
    with torch.cuda.device(0), effikern.set_backend(backend):
        y = effikern.functional.sparse_linear(x, sw)
    assert y.device == x.device
    assert_matches("y", y, F.linear(x.double(), dense), F.linear(x, dense.half()))


class TestErrors:
    def _sw(self, fmt="unstructured"):
        return random_weight(fmt, 6, 8, 0.5, torch.float32, "cpu", block=(2, 4))[0]

    def test_wrong_in_features(self):
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 8\]"):
            effikern.functional.sparse_linear(torch.randn(2, 9), self._sw())

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="values must have the dtype of x"):
            effikern.functional.sparse_linear(torch.randn(2, 8, dtype=torch.float64), self._sw())

    def test_bias_shape(self):
        with pytest.raises(ValueError, match="bias must have shape"):
            effikern.functional.sparse_linear(torch.randn(2, 8), self._sw(), torch.randn(5))

    def test_unknown_format(self):
        sw = self._sw()
        sw.format = "csr"
        with pytest.raises(ValueError, match="format must be one of"):
            effikern.functional.sparse_linear(torch.randn(2, 8), sw)

    def test_format_does_not_fit_values(self):
        sw = self._sw()
        sw.format = "block"
        with pytest.raises(ValueError, match=r"values of the block format must be \[nnzb, BR, BC\]"):
            effikern.functional.sparse_linear(torch.randn(2, 8), sw)

    def test_index_dtype(self):
        sw = self._sw()
        sw.col = sw.col.int()
        with pytest.raises(TypeError, match="col must be a uint8 array of offsets within a panel, got torch.int32"):
            effikern.functional.sparse_linear(torch.randn(2, 8), sw)
        sw = self._sw()
        sw.crow = sw.crow.long()
        with pytest.raises(TypeError, match="crow must be an int32 index array, got torch.int64"):
            effikern.functional.sparse_linear(torch.randn(2, 8), sw)

    def test_not_a_sparse_weight(self):
        with pytest.raises(TypeError, match="SparseWeight"):
            effikern.functional.sparse_linear(torch.randn(2, 8), torch.randn(6, 8))

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="must be on the device of x"):
            effikern.functional.sparse_linear(torch.randn(2, 8, device="cuda"), self._sw())

    def test_device_mismatch_meta(self):
        # Without a GPU the meta device stands in for a second device.
        with pytest.raises(ValueError, match="must be on the device of x"):
            effikern.functional.sparse_linear(torch.randn(2, 8, device="meta"), self._sw())

    def test_backend_that_cannot_run(self):
        if torch.cuda.is_available():
            pytest.skip("the cuda backend can run here")
        with effikern.set_backend("cuda"), pytest.raises(effikern.BackendUnavailableError):
            effikern.functional.sparse_linear(torch.randn(2, 8), self._sw())


_ISA_SCRIPT = """
import torch, effikern
from effikern.sparse import from_dense
torch.manual_seed(0)
# 45 inputs at 60%: one short segment per row (the AVX2 flat walk); 600 inputs at 20% kept: 3 panels of ~51 entries
# (flat) and at 70% kept (~180 entries: the segment walk). Tokens 1-3 gather, 9 and 40 pack.
for fmt, block, k, keep in (("unstructured", None, 45, 0.4), ("block", (8, 16), 45, 0.4), ("block", (5, 3), 45, 0.4),
                            ("unstructured", None, 600, 0.2), ("unstructured", None, 600, 0.7)):
    for m in (1, 2, 3, 9, 40):
        mask = torch.rand(37, k) < keep
        sw = from_dense(torch.randn(37, k), mask, fmt, block)
        x, gy, b = torch.randn(m, k), torch.randn(m, 37), torch.randn(37)
        out = {}
        for backend in ("torch", "cpp"):
            with effikern.set_backend(backend):
                y = effikern.functional.sparse_linear(x, sw, b)
                gx = torch.ops.effikern.sparse_linear_grad_input(gy, sw.values, sw.crow, sw.col, sw.t_crow, sw.t_row,
                                                                 sw.t_perm, fmt, 37, k)
                gv = torch.ops.effikern.sparse_linear_grad_values(gy, x, sw.crow, sw.row, sw.col, sw.value_mask,
                                                                  list(sw.values.shape), fmt)
            out[backend] = (y, gx, gv)
        for a, b_ in zip(out["torch"], out["cpp"]):
            torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpp_other_isa_builds(isa):
    """The AVX2 (8 lanes) and baseline (4 lanes) instantiations, forced with EFFIKERN_CPU_ISA, agree with torch, on
    both CSR row walks (flat and by segment) and both paths (gather and packed) that these ISAs pick; the value
    gradient's reductions (groups of 8 or 4 lanes, then 4, then single entries) with them."""
    import os
    import subprocess
    import sys

    skip_unavailable("cpp", "cpu")
    env = dict(os.environ, EFFIKERN_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


@pytest.mark.parametrize("path", ["functional", "op"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_double_backward_goes_through_the_reference(fmt, backend, path):
    """A gradient penalty (create_graph=True) through sparse_linear: its gradients must carry a graph, so the op takes
    them through the dense reference then; the kernels' gradients have none (the eager path once dropped the
    second-order terms silently). Checked against F.linear on the dense masked weight, in float64."""
    from effikern.sparse.formats import csr_coordinates

    skip_unavailable(backend, "cpu")
    sw, dense = random_weight(fmt, 12, 40, 0.5, torch.float64, "cpu", block=(4, 8), inner=0.2)
    values = sw.values.detach().clone().requires_grad_()
    sw.values = values
    x = torch.randn(2, 3, 40, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    w = dense.clone().requires_grad_()

    def penalized(f, params):
        (g_x,) = torch.autograd.grad(f(x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(f(x).sum() + g_x.square().sum(), [x, bias] + params)

    def fused(t):
        if path == "op":
            return torch.ops.effikern.sparse_linear(t, values, sw.crow, sw.col, sw.row, sw.t_crow, sw.t_row,
                                                    sw.t_perm, sw.value_mask, bias, fmt, 12, 40)
        return effikern.functional.sparse_linear(t, sw, bias)

    with effikern.set_backend(backend):
        g_x, g_b, g_values = penalized(fused, [values])
    e_x, e_b, e_w = penalized(lambda t: F.linear(t, w, bias), [w])
    torch.testing.assert_close(g_x, e_x)
    torch.testing.assert_close(g_b, e_b)
    if fmt != "block":  # one value per stored position: compare them where they sit in W
        rows, cols = csr_coordinates(sw.crow, sw.col, 12, 40)
        kept = sw.value_mask if sw.value_mask is not None else torch.ones_like(values, dtype=torch.bool)
        torch.testing.assert_close(g_values, torch.where(kept, e_w[rows, cols], 0))
