"""Kernel-level tests of the Triton sparse kernels (kernels/sparse.py) against a float64 dense reference.

The BSR/CSR arrays are built here from a random dense weight and mask, straight from the interface spec
(crow/col/row/values plus the transposed view), independently of effikern.sparse's converters, so a kernel
bug and a converter bug cannot cancel. Without a GPU the kernels run in the Triton interpreter on tiny shapes;
the `gpu` tests rerun them (and the CUDA extension's kernels, when built) at realistic shapes.
"""

import pytest
import torch
import torch.nn.functional as F

from oracle import assert_matches

ks = pytest.importorskip("effikern.kernels.sparse", reason="triton is not installed")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# Arrays of the spec, built from a dense masked weight
# ----------------------------------------------------------------------------------------------


def _i32(t):
    return t.to(torch.int32).contiguous()


def _ptr(counts):
    """Row pointer [len(counts) + 1] of a compressed format: 0 then the running sum of counts."""
    return _i32(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))


def make_bsr(weight, block_mask, BR, BC):
    """weight [N, K] (already zero off the mask) and block_mask [Np/BR, Kp/BC] bool ->
    dict of the spec's BSR arrays. A block is stored iff its mask entry is set, even if its values are
    zero."""
    N, K = weight.shape
    nbr, nbc = block_mask.shape
    padded = weight.new_zeros(nbr * BR, nbc * BC)
    padded[:N, :K] = weight
    blocks = padded.reshape(nbr, BR, nbc, BC).permute(0, 2, 1, 3)  # [block row, block col, BR, BC]
    row, col = block_mask.nonzero(as_tuple=True)  # row-major: sorted by row, then col
    by_col = torch.argsort(col * nbr + row)  # block-column-major order
    return dict(crow=_ptr(block_mask.sum(1)), col=_i32(col), row=_i32(row),
                values=blocks[row, col].contiguous(),
                t_crow=_ptr(block_mask.sum(0)), t_row=_i32(row[by_col]), t_perm=_i32(by_col))


PANEL = 256  # columns per panel of the CSR format (docs/sparse_kernels.md)


def _panelled(mask):
    """mask [A, B] bool -> the panelled layout of its nonzeros in row-major order: (ptr [A*P + 1] int32 over
    the segments s = a*P + b // 256, offsets [nnz] uint8 = b % 256, segment [nnz] int32 of each entry),
    P = ceil(B / 256) (at least 1)."""
    A, B = mask.shape
    P = max(1, -(-B // PANEL))
    padded = mask.new_zeros(A, P * PANEL)
    padded[:, :B] = mask
    a, b = mask.nonzero(as_tuple=True)
    return (_ptr(padded.reshape(A * P, PANEL).sum(1)), (b % PANEL).to(torch.uint8).contiguous(),
            _i32(a * P + b // PANEL))


def make_csr(weight, mask):
    """weight [N, K], mask [N, K] bool -> dict of the spec's panelled CSR arrays (an entry per mask position,
    values in row-major order); the transposed view is the same layout built from mask^T, whose row-major
    order is the (column, row) order t_perm lists."""
    N, _ = mask.shape
    row, col = mask.nonzero(as_tuple=True)
    crow, col_offset, segment = _panelled(mask)
    t_crow, t_row_offset, _ = _panelled(mask.t())
    return dict(crow=crow, col=col_offset, row=segment, values=weight[row, col].contiguous(),
                t_crow=t_crow, t_row=t_row_offset, t_perm=_i32(torch.argsort(col * N + row)))


def random_block_problem(N, K, BR, BC, density, dtype, empty=True):
    """A weight whose kept entries form random (BR, BC) blocks; with `empty`, block row 1 and block column 0
    are forced empty (the kernels must still write those outputs)."""
    nbr, nbc = -(-N // BR), -(-K // BC)
    block_mask = torch.rand(nbr, nbc) < density
    if empty and nbr > 1 and nbc > 1:
        block_mask[1] = False
        block_mask[:, 0] = False
    mask = block_mask.repeat_interleave(BR, 0).repeat_interleave(BC, 1)[:N, :K]
    weight = (torch.randn(N, K) * mask).to(dtype)
    return weight, make_bsr(weight, block_mask, BR, BC)


def random_csr_problem(N, K, density, dtype, empty=True):
    """A random mask and the weight kept by it. With `empty`: row 2 and column 1 are empty, and where there
    are several panels the first half of the rows lose their second column panel (an empty segment between
    or after stored ones) and the first half of the columns their second row panel (the same in the
    transposed view)."""
    mask = torch.rand(N, K) < density
    if empty and N > 2 and K > 2:
        mask[2] = False
        mask[:, 1] = False
        mask[:N // 2, PANEL:2 * PANEL] = False
        mask[PANEL:2 * PANEL, :K // 2] = False
    weight = (torch.randn(N, K) * mask).to(dtype)
    return weight, mask, make_csr(weight, mask)


def to_dev(arrays):
    return {k: v.to(DEV) for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------------
# The three products against float64 truth and PyTorch's own result in the dtype (tests/oracle.py's rule)
# ----------------------------------------------------------------------------------------------


def check_forward(name, y, x, weight, bias):
    truth = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert_matches(name, y.cpu(), truth.cpu(), F.linear(x, weight, bias).cpu())


def check_grad_input(name, gx, gy, weight):
    assert_matches(name, gx.cpu(), (gy.double() @ weight.double()).cpu(), (gy @ weight).cpu())


def dense_grad_at(gy, x, fn):
    """The dense weight gradient gy^T @ x in float64 and in the dtype, each sampled by fn."""
    return fn(gy.double().t() @ x.double()), fn(gy.t() @ x)


def check_block_grad_values(name, gv, gy, x, arrays, BR, BC, shape):
    N, K = shape
    nbr, nbc = arrays["crow"].numel() - 1, arrays["t_crow"].numel() - 1

    def sample(g):
        padded = g.new_zeros(nbr * BR, nbc * BC)
        padded[:N, :K] = g
        blocks = padded.reshape(nbr, BR, nbc, BC).permute(0, 2, 1, 3)
        return blocks[arrays["row"].long(), arrays["col"].long()]

    truth, torch_out = dense_grad_at(gy, x, sample)
    assert gv.shape == arrays["values"].shape and gv.dtype == x.dtype
    if gv.numel():
        assert_matches(name, gv.cpu(), truth.cpu(), torch_out.cpu())


def check_csr_grad_values(name, gv, gy, x, mask):
    """gv holds the gradient of the entries in row-major order of mask (make_csr's values order)."""
    truth, torch_out = dense_grad_at(gy, x, lambda g: g[mask.to(g.device)])
    assert gv.shape == (int(mask.sum()),) and gv.dtype == x.dtype
    if gv.numel():
        assert_matches(name, gv.cpu(), truth.cpu(), torch_out.cpu())


def run_block_case(block, M, N, K, dtype, with_bias, density=0.5, empty=True):
    BR, BC = block
    weight, arrays = random_block_problem(N, K, BR, BC, density, dtype, empty)
    x, gy = torch.randn(M, K, dtype=dtype, device=DEV), torch.randn(M, N, dtype=dtype, device=DEV)
    bias = torch.randn(N, dtype=dtype, device=DEV) if with_bias else None
    weight, a = weight.to(DEV), to_dev(arrays)

    y = ks.bsr_fwd(x, a["crow"], a["col"], a["values"], bias, N, K)
    check_forward("bsr_fwd", y, x, weight, bias)
    gx = ks.bsr_grad_input(gy, a["t_crow"], a["t_row"], a["t_perm"], a["values"], N, K)
    check_grad_input("bsr_grad_input", gx, gy, weight)
    gv = ks.bsr_grad_values(gy, x, a["row"], a["col"], tuple(a["values"].shape))
    check_block_grad_values("bsr_grad_values", gv, gy, x, a, BR, BC, (N, K))


def run_csr_case(M, N, K, dtype, with_bias, density=0.3, empty=True):
    weight, mask, arrays = random_csr_problem(N, K, density, dtype, empty)
    x, gy = torch.randn(M, K, dtype=dtype, device=DEV), torch.randn(M, N, dtype=dtype, device=DEV)
    bias = torch.randn(N, dtype=dtype, device=DEV) if with_bias else None
    weight, a = weight.to(DEV), to_dev(arrays)

    y = ks.csr_fwd(x, a["crow"], a["col"], a["values"], bias, N, K)
    check_forward("csr_fwd", y, x, weight, bias)
    gx = ks.csr_grad_input(gy, a["t_crow"], a["t_row"], a["t_perm"], a["values"], N, K)
    check_grad_input("csr_grad_input", gx, gy, weight)
    gv = ks.csr_grad_values(gy, x, a["row"], a["col"])
    check_csr_grad_values("csr_grad_values", gv, gy, x, mask)


# ----------------------------------------------------------------------------------------------
# Interpreter-sized cases (also run on a GPU when there is one)
# ----------------------------------------------------------------------------------------------

# (block, M, N, K, dtype, bias): N and K are not multiples of the block (padding masked) except where noted.
BLOCK_CASES = [
    ((16, 16), 5, 37, 45, torch.float32, True),
    ((16, 16), 1, 40, 29, torch.float16, True),
    ((16, 16), 17, 33, 50, torch.bfloat16, False),
    ((32, 32), 17, 70, 75, torch.float32, False),
    ((32, 32), 5, 64, 64, torch.float16, True),  # multiples of the block: no padding
    ((32, 32), 1, 45, 70, torch.bfloat16, True),
    ((64, 64), 5, 100, 130, torch.float16, True),
    ((32, 16), 3, 50, 40, torch.float32, True),  # non-square block
    ((8, 4), 5, 20, 18, torch.float32, False),  # below tl.dot's 16: padded tiles
]


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("block, M, N, K, dtype, with_bias", BLOCK_CASES,
                         ids=lambda v: str(v).replace("torch.", "").replace(" ", ""))
def test_bsr_kernels_match_dense(block, M, N, K, dtype, with_bias):
    run_block_case(block, M, N, K, dtype, with_bias)


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("with_bias", [False, True])
def test_bsr_all_zero_weight(with_bias):
    """nnzb = 0: y is the bias (or 0), grad_input 0, grad_values an empty [0, BR, BC]."""
    run_block_case((16, 16), 5, 20, 30, torch.float32, with_bias, density=0.0)


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
def test_bsr_many_tokens_and_split_reduction():
    """130 tokens: several M tiles in the products, and (one stored block: block row 1 and block column 0 are
    forced empty) bsr_grad_values splits M over programs and sums fp32 partials."""
    run_block_case((32, 32), 130, 40, 50, torch.float16, True, density=1.0)


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
def test_bsr_fully_dense():
    run_block_case((16, 16), 17, 40, 35, torch.float16, True, density=1.0, empty=False)


CSR_CASES = [
    (1, 37, 45, torch.float32, True),
    (5, 40, 29, torch.float16, False),
    (17, 33, 50, torch.bfloat16, True),
    (70, 21, 26, torch.float32, False),  # more tokens than one program's 64
    (1, 7, 13, torch.bfloat16, True),  # the odd shape
]


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("M, N, K, dtype, with_bias", CSR_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_csr_kernels_match_dense(M, N, K, dtype, with_bias):
    run_csr_case(M, N, K, dtype, with_bias)


# (M, N, K, dtype, bias, density): several 256-wide panels along K (forward) and N (grad_input), each shape
# but one ending in a partial panel, with random_csr_problem's empty segments. Small: under the interpreter
# every program of grad_input (one per ROWS of the K columns) costs milliseconds.
CSR_PANEL_CASES = [
    (1, 300, 600, torch.float32, True, 0.1),  # P = 3 (88 columns in the last), Pn = 2 (44 rows): a step each
    (5, 257, 300, torch.float16, False, 0.1),  # last panels of 1 row and 44 columns
    (17, 300, 40, torch.bfloat16, True, 0.1),  # 32-token tile, a panel a step: grad_input loops Pn = 2 times
    (2, 260, 256, torch.float32, False, 0.2),  # K exactly one panel, N just over one
    (16, 3, 600, torch.float32, True, 0.1),  # 16 tokens: 2 panels a step, P = 3 needs a second, half-masked one
]


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("M, N, K, dtype, with_bias, density", CSR_PANEL_CASES,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_csr_kernels_several_panels(M, N, K, dtype, with_bias, density):
    run_csr_case(M, N, K, dtype, with_bias, density)


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("with_bias", [False, True])
def test_csr_all_zero_weight(with_bias):
    run_csr_case(5, 20, 30, torch.float16, with_bias, density=0.0)


@pytest.mark.triton
@pytest.mark.usefixtures("poisoned_outputs")
def test_csr_long_rows_span_several_chunks():
    """Segments longer than one BLOCK_NZ chunk (64 entries at one token and 3 panels): at 90% density each
    panel holds ~230 entries, so the entry loop runs several times per step."""
    run_csr_case(1, 5, 700, torch.float32, True, density=0.9, empty=False)


@pytest.mark.triton
def test_kernels_read_strided_inputs():
    """x and grad_y may arrive as non-contiguous views; the launchers pass strides."""
    N, K, M = 40, 45, 6
    weight, arrays = random_block_problem(N, K, 16, 16, 0.5, torch.float32)
    a, weight = to_dev(arrays), weight.to(DEV)
    x = torch.randn(K, M, device=DEV).t()
    gy = torch.randn(2 * M, N, device=DEV)[::2]
    y = ks.bsr_fwd(x, a["crow"], a["col"], a["values"], None, N, K)
    check_forward("bsr_fwd strided", y, x, weight, None)
    gv = ks.bsr_grad_values(gy, x, a["row"], a["col"], tuple(a["values"].shape))
    check_block_grad_values("bsr_grad_values strided", gv, gy, x, a, 16, 16, (N, K))
    wc, mask, c = random_csr_problem(N, K, 0.3, torch.float32)
    c, wc = to_dev(c), wc.to(DEV)
    check_grad_input("csr_grad_input strided", ks.csr_grad_input(gy, c["t_crow"], c["t_row"], c["t_perm"],
                                                                  c["values"], N, K), gy, wc)
    check_csr_grad_values("csr_grad_values strided", ks.csr_grad_values(gy, x, c["row"], c["col"]), gy, x,
                          mask)


def test_oracle_catches_a_misplaced_block():
    """The check is not vacuous: swapping two stored blocks' column indices makes the forward fail."""
    weight, arrays = random_block_problem(32, 48, 16, 16, 1.0, torch.float32, empty=False)
    col = arrays["col"].clone()
    col[0], col[1] = arrays["col"][1], arrays["col"][0]
    x = torch.randn(3, 48)
    truth = F.linear(x.double(), weight.double())
    wrong = torch.zeros(3, 32, dtype=torch.float64)
    # Apply the corrupted arrays with plain torch (no kernel needed to show the oracle's teeth).
    for br in range(2):
        for e in range(arrays["crow"][br], arrays["crow"][br + 1]):
            k0 = int(col[e]) * 16
            wrong[:, br * 16:(br + 1) * 16] += x[:, k0:k0 + 16].double() @ arrays["values"][e].double().t()
    with pytest.raises(AssertionError):
        assert_matches("corrupted", wrong.float(), truth, F.linear(x, weight))


# ----------------------------------------------------------------------------------------------
# GPU: realistic shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_bsr_kernels_gpu_shapes(block, dtype):
    run_block_case((block, block), 300, 770, 515, dtype, True, density=0.3)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 16, 64, 200])
def test_csr_kernels_gpu_shapes(M, dtype):
    run_csr_case(M, 770, 1030, dtype, True, density=0.1)


def _cuda_ext():
    """effikern._C when built with the sparse CUDA kernels, else skip."""
    C = pytest.importorskip("effikern._C")
    if not hasattr(C, "sparse_csr_fwd_cuda"):
        pytest.skip("effikern._C has no sparse CUDA kernels (built without CUDA)")
    return C


def run_cuda_csr_case(M, N, K, dtype):
    C = _cuda_ext()
    stream = torch.cuda.current_stream().cuda_stream
    weight, mask, arrays = random_csr_problem(N, K, 0.1, dtype)
    a, weight = to_dev(arrays), weight.to(DEV)
    x, gy = torch.randn(M, K, dtype=dtype, device=DEV), torch.randn(M, N, dtype=dtype, device=DEV)
    bias = torch.randn(N, dtype=dtype, device=DEV)
    for b in (bias, None):
        y = C.sparse_csr_fwd_cuda(x, a["crow"], a["col"], a["values"], b, N, K, stream)
        check_forward("cuda csr_fwd", y, x, weight, b)
    gx = C.sparse_csr_grad_input_cuda(gy, a["t_crow"], a["t_row"], a["t_perm"], a["values"], N, K, stream)
    check_grad_input("cuda csr_grad_input", gx, gy, weight)
    gv = C.sparse_csr_grad_values_cuda(gy, x, a["row"], a["col"], stream)
    check_csr_grad_values("cuda csr_grad_values", gv, gy, x, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 5, 16, 64, 100])
def test_cuda_csr_kernels(M, dtype):
    run_cuda_csr_case(M, 770, 1030, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_csr_kernels_global_gather(dtype):
    """Past 96 KiB of staged x (csr_mm_kernel's kCsrMaxSmem) the CSR products gather x from global memory
    (kSmem=false), which K=1030 never reaches: at 16 tokens (a 16-token chunk) the stage would hold 17 panels of
    256 inputs for the forward (K=4100) and 13 of outputs for grad_input (N=3100)."""
    M, N, K = 16, 3100, 4100
    size = torch.finfo(dtype).bits // 8
    for width in (K, N):  # the forward stages x [M, K], grad_input grad_y [M, N]
        assert -(-width // PANEL) * PANEL * M * size > 96 * 1024
    run_cuda_csr_case(M, N, K, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (32, 16), (8, 8), (128, 128)])
@pytest.mark.parametrize("M", [1, 300])
def test_cuda_bsr_kernels(M, block, dtype):
    C = _cuda_ext()
    stream = torch.cuda.current_stream().cuda_stream
    BR, BC = block
    N, K = 770, 515
    weight, arrays = random_block_problem(N, K, BR, BC, 0.3, dtype)
    a, weight = to_dev(arrays), weight.to(DEV)
    x, gy = torch.randn(M, K, dtype=dtype, device=DEV), torch.randn(M, N, dtype=dtype, device=DEV)
    bias = torch.randn(N, dtype=dtype, device=DEV)
    y = C.sparse_bsr_fwd_cuda(x, a["crow"], a["col"], a["values"], bias, N, K, stream)
    check_forward("cuda bsr_fwd", y, x, weight, bias)
    gx = C.sparse_bsr_grad_input_cuda(gy, a["t_crow"], a["t_row"], a["t_perm"], a["values"], N, K, stream)
    check_grad_input("cuda bsr_grad_input", gx, gy, weight)
    gv = C.sparse_bsr_grad_values_cuda(gy, x, a["row"], a["col"], list(a["values"].shape), stream)
    check_block_grad_values("cuda bsr_grad_values", gv, gy, x, a, BR, BC, (N, K))
