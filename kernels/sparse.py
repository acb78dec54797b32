"""Triton kernels of ``sparse_linear``: y = x @ W^T + b with a pruned weight W [N, K] stored sparse.

The interface (array names, shapes, padding) is docs/sparse_kernels.md; in short:

  BSR, block (BR, BC): crow [Np/BR + 1], col [nnzb], row [nnzb], values [nnzb, BR, BC]; the transposed view
       t_crow [Kp/BC + 1], t_row [nnzb], t_perm [nnzb] lists the blocks of each block column.
  CSR (panelled): columns cut into panels of 256, row n split into P = ceil(K/256) segments s = n*P + p;
       crow [N*P + 1] int32 segment pointers, col [nnz] uint8 (column - 256*p), row [nnz] int32 (segment s),
       values [nnz]; the transposed view t_crow [K*Pn + 1] (Pn = ceil(N/256)), t_row [nnz] uint8, t_perm [nnz]
       int32 is the same layout over W^T.

Two kernel shapes serve the four products:

* ``_bsr_mm_kernel``: out[m, o-block] = sum over the stored blocks e of the o-block of
  a[m, i-block(e)] @ B_e, with B_e a stored block or its transpose. Forward walks block rows (B_e = block^T),
  grad_input walks block columns through t_perm (B_e = block). One program per (M tile, output block): the
  loop visits only stored blocks, so an empty block row costs one store of zeros (or of the bias). tl.dot in
  x's dtype with an fp32 accumulator. Floor (H100: ~3 TB/s, ~990 TFLOP/s fp16 dense): 4096 tokens, 4096x4096,
  block 32 at 90% -> 2*M*nnz = 13.7 GFLOP (~14 us) and x + y + values = 70 MB (~23 us), so ~23 us against
  ~139 us for the dense matmul at peak. Not yet measured on a GPU.
* ``_csr_mm_kernel``: the same product for single entries, built for few tokens (decode, M <= 64): a program
  owns ROWS output columns and BLOCK_M tokens, walks their rows' segments (several panels per step) and reads
  each stored value once, gathering the matching x column (panel * 256 + uint8 offset) for all its tokens.
  That is memory-bound: the floor is the compulsory bytes nnz * (value + 1-byte offset) + 4 bytes per segment
  + M*K + M*N elements over ~3 TB/s (4096x4096 at 90%, fp16: 1.68M * 3 B + 65k * 4 B = 5.3 MB, ~1.8 us),
  against 33.5 MB (~11 us) for the dense weight. x is passed token-contiguous (``_token_major``) so one
  entry's gather of BLOCK_M tokens reads consecutive addresses. Checked in the interpreter and compiled for
  sm_90 without spills; its speed on a GPU is not yet measured.

and two for the sampled gradient of the stored values (an SDDMM, grad_W = gy^T @ x only where W is kept):

* ``_bsr_sddmm_kernel``: one program per (stored block, M split): gy[:, rows]^T @ x[:, cols] over its M range;
  fp32 partials per split are summed by the launcher (deterministic, no atomics).
* ``_csr_sddmm_kernel``: BLOCK_NZ entries per program, each the dot of a gy column with an x column over M
  (row and column recovered from the entry's segment and uint8 offset).

Block sizes: any BR, BC >= 1. tl.dot and tl.arange need powers of two >= 16, so tiles are padded to
BRP = max(16, next_pow2(BR)) (likewise BCP) and the padding masked: 16/32/64 blocks waste nothing.

Precision: loads are upcast to fp32 wherever arithmetic happens outside tl.dot (the interpreter computes
garbage in bf16); dot operands are rounded to x's dtype (exact for fp16/bf16 inputs). fp32 dots use TF32
exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set, as F.linear does.
"""

import functools

import torch
import triton
import triton.language as tl

from ._matmul import dot_args, interpreting, mma, tf32_allowed

# Columns per panel of the CSR format (docs/sparse_kernels.md): an entry stores only its column's offset
# within its panel, one uint8. A constexpr so the kernels can read it.
PANEL = tl.constexpr(256)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bsr_mm_kernel(
    a_ptr, ptr_ptr, idx_ptr, perm_ptr, v_ptr, bias_ptr, out_ptr,
    M, IN, OUT, n_out_blocks, sam, sai, som, soo,
    IB: tl.constexpr, OB: tl.constexpr, IBP: tl.constexpr, OBP: tl.constexpr,
    V_SI: tl.constexpr, V_SO: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """out[m, ob*OB + o] = sum_e sum_i a[m, idx[e]*IB + i] * V[blk(e)][i*V_SI + o*V_SO] (+ bias[ob*OB + o])
    over e in ptr[ob]..ptr[ob+1], blk(e) = perm[e] if HAS_PERM else e; a is [M, IN], out [M, OUT].
    Flat grid, output block fastest: the programs running together share one M tile of `a` while the (small)
    stored blocks stay in L2."""
    pid = tl.program_id(0)
    ob = pid % n_out_blocks
    pid_m = pid // n_out_blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_i = tl.arange(0, IBP)
    offs_o = tl.arange(0, OBP)
    m_mask = offs_m < M
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * sam
    # A stored block as the [IBP, OBP] right operand; the padding of a block smaller than 16 reads nothing.
    v_offs = offs_i[:, None] * V_SI + offs_o[None, :] * V_SO
    v_mask = (offs_i[:, None] < IB) & (offs_o[None, :] < OB)
    acc = tl.zeros([BLOCK_M, OBP], dtype=tl.float32)
    start = tl.load(ptr_ptr + ob)
    end = tl.load(ptr_ptr + ob + 1)
    for e in range(start, end):
        blk = e
        if HAS_PERM:
            blk = tl.load(perm_ptr + e)
        i = tl.load(idx_ptr + e) * IB + offs_i  # columns of `a`; the zero padding past IN is never read
        a = tl.load(a_rows + i.to(tl.int64)[None, :] * sai,
                    mask=m_mask[:, None] & ((offs_i < IB) & (i < IN))[None, :], other=0.0)
        v = tl.load(v_ptr + blk.to(tl.int64) * (IB * OB) + v_offs, mask=v_mask, other=0.0)
        acc = mma(acc, a, v, DOT_DTYPE, DOT_PREC, EMULATE)
    o = ob * OB + offs_o
    o_mask = (offs_o < OB) & (o < OUT)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * som + o[None, :] * soo,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & o_mask[None, :])


@triton.jit
def _bsr_sddmm_kernel(
    gy_ptr, x_ptr, row_ptr, col_ptr, out_ptr,
    M, N, K, nnzb, splits, sgm, sgn, sxm, sxk,
    BR: tl.constexpr, BC: tl.constexpr, BRP: tl.constexpr, BCP: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    """out[s, b] = sum over tokens m of split s of gy[m, row[b]*BR + r] * x[m, col[b]*BC + c], [BR, BC] per
    stored block b; split s takes the BLOCK_M chunks s, s + splits, ... Rows past N / columns past K
    (padding) come out 0."""
    pid = tl.program_id(0)
    b = pid % nnzb
    s = pid // nnzb
    offs_r = tl.arange(0, BRP)
    offs_c = tl.arange(0, BCP)
    offs_m = tl.arange(0, BLOCK_M)
    n = tl.load(row_ptr + b) * BR + offs_r
    k = tl.load(col_ptr + b) * BC + offs_c
    n_mask = (offs_r < BR) & (n < N)
    k_mask = (offs_c < BC) & (k < K)
    gy_cols = gy_ptr + n.to(tl.int64)[:, None] * sgn  # gy^T tile [BRP, BLOCK_M]
    x_cols = x_ptr + k.to(tl.int64)[None, :] * sxk  # x tile [BLOCK_M, BCP]
    acc = tl.zeros([BRP, BCP], dtype=tl.float32)
    for m0 in range(s * BLOCK_M, M, splits * BLOCK_M):
        m = m0 + offs_m
        mm = m < M
        g = tl.load(gy_cols + m.to(tl.int64)[None, :] * sgm, mask=n_mask[:, None] & mm[None, :], other=0.0)
        xv = tl.load(x_cols + m.to(tl.int64)[:, None] * sxm, mask=mm[:, None] & k_mask[None, :], other=0.0)
        acc = mma(acc, g, xv, DOT_DTYPE, DOT_PREC, EMULATE)
    out = out_ptr + (s.to(tl.int64) * nnzb + b) * (BR * BC)
    tl.store(out + offs_r[:, None] * BC + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_r[:, None] < BR) & (offs_c[None, :] < BC))


@triton.jit
def _csr_mm_kernel(
    a_ptr, ptr_ptr, idx_ptr, perm_ptr, v_ptr, bias_ptr, out_ptr,
    M, OUT, P, sam, sai, som, soo,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr, PANELS: tl.constexpr, BLOCK_NZ: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[m, o] = sum_p sum_{e in ptr[s]..ptr[s+1], s = o*P + p} V[perm[e] if HAS_PERM else e] *
    a[m, p*PANEL + idx[e]] (+ bias[o]) for ROWS consecutive o and BLOCK_M tokens per program: a panelled
    CSR (ptr [OUT*P + 1] int32, idx [nnz] uint8) whose row o is split into P segments, one per PANEL columns.

    Each step takes BLOCK_NZ entries from each of PANELS consecutive segments of each of the ROWS rows, as one
    [ROWS, PANELS*BLOCK_NZ, BLOCK_M] tile (lane t: entry slot t % BLOCK_NZ of panel t // BLOCK_NZ): all those
    gathers are in flight at once, where a loop over the segments would chain their latencies (a 4096-column
    row has 16 segments of ~26 entries at 90% sparsity). Products accumulate elementwise; one reduction after
    the loops. Flat grid, output rows fastest: a 2-D grid's axis 1 stops at 65535, which the token tiles
    pass at 4.2M tokens (a sparse 1x1 conv over 128 images at 224x224 has 6.4M pixels)."""
    n_o = tl.cdiv(OUT, ROWS)
    pid_o = tl.program_id(0) % n_o
    pid_m = tl.program_id(0) // n_o
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    o = pid_o * ROWS + tl.arange(0, ROWS)
    o_mask = o < OUT
    lane = tl.arange(0, PANELS * BLOCK_NZ)
    lane_panel = lane // BLOCK_NZ
    lane_slot = lane % BLOCK_NZ
    a_tok = a_ptr + offs_m.to(tl.int64)[None, None, :] * sam
    acc = tl.zeros([ROWS, PANELS * BLOCK_NZ, BLOCK_M], dtype=tl.float32)
    for p0 in range(0, P, PANELS):
        p = p0 + lane_panel
        # A segment of a row past OUT or of a panel past P reads an empty range (start = end = 0), never past
        # the end of ptr.
        seg_mask = o_mask[:, None] & (p < P)[None, :]  # [ROWS, PANELS*BLOCK_NZ]
        seg = o[:, None] * P + p[None, :]
        start = tl.load(ptr_ptr + seg, mask=seg_mask, other=0)
        length = tl.load(ptr_ptr + seg + 1, mask=seg_mask, other=0) - start
        panel_col = (p * PANEL)[None, :]
        for j in range(0, tl.max(tl.max(length, 1), 0), BLOCK_NZ):
            e_mask = (j + lane_slot)[None, :] < length
            e = start + j + lane_slot[None, :]
            # uint8 offsets widen before the add: 8-bit arithmetic would wrap at the panel's end.
            i = panel_col + tl.load(idx_ptr + e, mask=e_mask, other=0).to(tl.int32)
            if HAS_PERM:
                vi = tl.load(perm_ptr + e, mask=e_mask, other=0)
            else:
                vi = e
            v = tl.load(v_ptr + vi, mask=e_mask, other=0.0).to(tl.float32)
            xa = tl.load(a_tok + i.to(tl.int64)[:, :, None] * sai,
                         mask=e_mask[:, :, None] & m_mask[None, None, :], other=0.0)
            acc += v[:, :, None] * xa.to(tl.float32)
    out = tl.sum(acc, 1)  # [ROWS, BLOCK_M]
    if HAS_BIAS:
        out += tl.load(bias_ptr + o, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + offs_m.to(tl.int64)[None, :] * som + o.to(tl.int64)[:, None] * soo,
             out.to(out_ptr.dtype.element_ty), mask=o_mask[:, None] & m_mask[None, :])


@triton.jit
def _csr_sddmm_kernel(
    gy_ptr, x_ptr, row_ptr, col_ptr, out_ptr,
    nnz, M, P, sgm, sgn, sxm, sxk,
    BLOCK_NZ: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """out[e] = sum_m gy[m, s // P] * x[m, (s % P)*PANEL + col[e]] with s = row[e] (int32, the segment of
    entry e) and col [nnz] uint8, for BLOCK_NZ entries per program."""
    e = tl.program_id(0) * BLOCK_NZ + tl.arange(0, BLOCK_NZ)
    e_mask = e < nnz
    s = tl.load(row_ptr + e, mask=e_mask, other=0)
    n = s // P
    k = (s - n * P) * PANEL + tl.load(col_ptr + e, mask=e_mask, other=0).to(tl.int32)
    gy_cols = gy_ptr + n.to(tl.int64)[:, None] * sgn
    x_cols = x_ptr + k.to(tl.int64)[:, None] * sxk
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_NZ, BLOCK_M], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + offs_m
        mask = e_mask[:, None] & (m < M)[None, :]
        g = tl.load(gy_cols + m.to(tl.int64)[None, :] * sgm, mask=mask, other=0.0).to(tl.float32)
        xv = tl.load(x_cols + m.to(tl.int64)[None, :] * sxm, mask=mask, other=0.0).to(tl.float32)
        acc += g * xv
    tl.store(out_ptr + e, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=e_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _pow2_clamp(n, lo, hi):
    """next_power_of_2(n) clamped to [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device):
    """SMs to fill; 1 off-GPU, where fewer, larger programs run fastest in the interpreter."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _dot_args(x):
    """mma's constexprs; fp32 uses TF32 iff F.linear would (legacy default: off)."""
    return dot_args(x, tf32_allowed(lambda: torch.backends.cuda.matmul.allow_tf32,
                                    (lambda: torch.backends.cuda.matmul.fp32_precision,
                                     lambda: torch.backends.fp32_precision), False))


def _mm_block_m(M, inner, outer, dtype):
    """M tile of _bsr_mm_kernel: 128 tokens on the GPU for fp16/bf16, 64 for fp32 (at 128 its 32x32-block
    forward spilled on sm_90 even at 8 warps) and under the interpreter; fewer for small M, never below 16
    (tl.dot). 8 warps from 4096-value tiles: at 4 warps a 128x32 fp16 tile took 202-231 registers a thread on
    sm_90 (the [BLOCK_M, IBP] 64-bit pointer tile of the x gather costs as much as the accumulator). fp32 from
    2048: its 64x32 forward spilled at 4 warps with triton 3.6 (the GPU machine's; 3.9 did not)."""
    block_m = _pow2_clamp(M, 16, 64 if interpreting() or dtype == torch.float32 else 128)
    eight_from = 2048 if dtype == torch.float32 else 4096
    return dict(BLOCK_M=block_m, num_warps=8 if block_m * max(inner, outer) >= eight_from else 4)


def _n_panels(width):
    """Panels of PANEL columns covering ``width`` columns, at least 1 (the spec's P and Pn)."""
    return max(1, triton.cdiv(width, PANEL.value))


def _csr_config(M, P):
    """Tiles of _csr_mm_kernel for M tokens and rows of P segments. BLOCK_M = all tokens up to 64; a step
    holds 2048 fp32 partials (16 a thread over 4 warps) = ROWS x PANELS x BLOCK_NZ entry slots x BLOCK_M.
    Entry chunks of 32 cover a whole segment at 90% sparsity (~26 entries in 256 columns; ~128 at 50% take 4
    steps); the other slots go first to more segments of the same row (PANELS, up to all P, never fewer than
    2 rows), so one step gathers from a row's whole width, then to rows, at most 8 of them (a 4096-row weight
    still spreads over 512+ programs); what that cap leaves over widens BLOCK_NZ. At one token: 4 rows x 16
    panels x 32 entries for 4096 columns, 8 x 1 x 256 for up to 256; at 16 tokens 2 x 2 x 32; at 64 tokens
    2 x 1 x 16. Chosen by this reasoning, not yet timed on a GPU."""
    block_m = _pow2_clamp(M, 1, 64)
    slots = 2048 // block_m
    segments = slots // min(32, slots // 2)
    panels = min(triton.next_power_of_2(P), segments // 2)
    rows = min(8, segments // panels)
    return dict(BLOCK_M=block_m, ROWS=rows, PANELS=panels, BLOCK_NZ=slots // (rows * panels), num_warps=4)


def _token_major(t):
    """t [M, C] with the tokens of each column contiguous (strides (1, M)): the CSR kernels gather whole
    columns. A copy of the small activation (M <= 64 in the intended use); none when M == 1."""
    return t if t.stride(0) == 1 else t.t().contiguous().t()


def _pad(n):
    return max(16, triton.next_power_of_2(n))


# ----------------------------------------------------------------------------------------------
# Launchers (the op layer has validated every argument; these only assert the layout they rely on)
# ----------------------------------------------------------------------------------------------


def _bsr_mm(a, ptr, idx, perm, values, bias, out_features, inner_block, outer_block, transposed):
    M, IN = a.shape
    n_out_blocks = ptr.numel() - 1
    out = torch.empty((M, out_features), dtype=a.dtype, device=a.device)
    if M == 0 or out_features == 0:
        return out
    # Element (i, o) of the right operand: block^T (forward: o = block row) or block (grad_input).
    v_si, v_so = (outer_block, 1) if transposed else (1, inner_block)
    cfg = _mm_block_m(M, _pad(inner_block), _pad(outer_block), a.dtype)
    grid = (n_out_blocks * triton.cdiv(M, cfg["BLOCK_M"]),)
    _bsr_mm_kernel[grid](
        a, ptr, idx, perm if perm is not None else idx, values, bias if bias is not None else values, out,
        M, IN, out_features, n_out_blocks, *a.stride(), *out.stride(),
        IB=inner_block, OB=outer_block, IBP=_pad(inner_block), OBP=_pad(outer_block), V_SI=v_si, V_SO=v_so,
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, **_dot_args(a), **cfg,
    )
    return out


def bsr_fwd(x, crow, col, values, bias, N, K):
    """y = x @ W^T + bias for W [N, K] in BSR. x [M, K]; crow [Np/BR + 1], col [nnzb] int32; values
    [nnzb, BR, BC]; bias [N] or None. Returns y [M, N] in x's dtype."""
    _, BR, BC = values.shape
    assert x.dim() == 2 and x.shape[1] == K and values.is_contiguous()
    assert crow.numel() == triton.cdiv(N, BR) + 1
    return _bsr_mm(x, crow, col, None, values, bias, N, BC, BR, False)


def bsr_grad_input(gy, t_crow, t_row, t_perm, values, N, K):
    """gx = gy @ W for W [N, K] in BSR, through the block-column view. gy [M, N]; t_crow [Kp/BC + 1],
    t_row, t_perm [nnzb] int32; values [nnzb, BR, BC]. Returns gx [M, K] in gy's dtype."""
    _, BR, BC = values.shape
    assert gy.dim() == 2 and gy.shape[1] == N and values.is_contiguous()
    assert t_crow.numel() == triton.cdiv(K, BC) + 1
    return _bsr_mm(gy, t_crow, t_row, t_perm, values, None, K, BR, BC, True)


def bsr_grad_values(gy, x, row, col, values_shape):
    """Gradient of the stored blocks: g[b] = gy[:, rows of b]^T @ x[:, cols of b] (the dense gradient
    gy^T @ x sampled at the stored blocks; padding rows/cols come out 0). gy [M, N], x [M, K]; row, col
    [nnzb] int32; values_shape (nnzb, BR, BC). Returns [nnzb, BR, BC] in x's dtype."""
    nnzb, BR, BC = values_shape
    M, N = gy.shape
    K = x.shape[1]
    assert x.shape[0] == M and row.numel() == nnzb and col.numel() == nnzb
    if nnzb == 0 or M == 0:
        return torch.zeros(tuple(values_shape), dtype=x.dtype, device=x.device)
    block_m = _pow2_clamp(M, 16, 64)
    # Split M when the blocks alone leave SMs idle (few blocks, many tokens): ~4 programs per SM, no more
    # splits than M chunks. Splits write fp32 partials summed here.
    splits = max(1, min(triton.cdiv(4 * _num_sms(x.device), nnzb), triton.cdiv(M, block_m)))
    part_dtype = x.dtype if splits == 1 else torch.float32
    out = torch.empty((splits, nnzb, BR, BC), dtype=part_dtype, device=x.device)
    _bsr_sddmm_kernel[(nnzb * splits,)](
        gy, x, row, col, out, M, N, K, nnzb, splits, *gy.stride(), *x.stride(),
        BR=BR, BC=BC, BRP=_pad(BR), BCP=_pad(BC), BLOCK_M=block_m, **_dot_args(x),
        num_warps=8 if _pad(BR) * _pad(BC) >= 4096 else 4,
    )
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)


def _csr_mm(a, ptr, idx, perm, values, bias, out_features):
    """out [M, out_features] = a [M, IN] times the panelled CSR (ptr, idx, values through perm) whose rows are
    the outputs and whose columns are a's."""
    M, IN = a.shape
    P = _n_panels(IN)
    assert ptr.dtype == torch.int32 and ptr.numel() == out_features * P + 1 and idx.dtype == torch.uint8
    out = torch.empty((M, out_features), dtype=a.dtype, device=a.device)
    if M == 0 or out_features == 0:
        return out
    a = _token_major(a)
    cfg = _csr_config(M, P)
    grid = (triton.cdiv(out_features, cfg["ROWS"]) * triton.cdiv(M, cfg["BLOCK_M"]),)
    _csr_mm_kernel[grid](
        a, ptr, idx, perm if perm is not None else idx, values, bias if bias is not None else values, out,
        M, out_features, P, *a.stride(), *out.stride(),
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, **cfg,
    )
    return out


def csr_fwd(x, crow, col, values, bias, N, K):
    """y = x @ W^T + bias for W [N, K] in panelled CSR (built for M <= 64, correct for any M). x [M, K];
    crow [N*P + 1] int32 segment pointers (P = ceil(K/256), at least 1); col [nnz] uint8 offsets within the
    panel; values [nnz]; bias [N] or None. Returns y [M, N] in x's dtype."""
    assert x.dim() == 2 and x.shape[1] == K
    return _csr_mm(x, crow, col, None, values, bias, N)


def csr_grad_input(gy, t_crow, t_row, t_perm, values, N, K):
    """gx = gy @ W for W [N, K] in panelled CSR, through the transposed view (the same layout over
    W^T [K, N]). gy [M, N]; t_crow [K*Pn + 1] int32 (Pn = ceil(N/256), at least 1); t_row [nnz] uint8 row
    offsets within the row panel; t_perm [nnz] int32 index into values; values [nnz]. Returns gx [M, K] in
    gy's dtype."""
    assert gy.dim() == 2 and gy.shape[1] == N
    return _csr_mm(gy, t_crow, t_row, t_perm, values, None, K)


def csr_grad_values(gy, x, row, col):
    """g[e] = gy[:, s // P] . x[:, (s % P)*256 + col[e]] with s = row[e] (the dense gradient gy^T @ x at the
    stored entries). gy [M, N], x [M, K]; row [nnz] int32 segment of each entry, P = ceil(K/256) (at least 1);
    col [nnz] uint8. Returns [nnz] in x's dtype."""
    M = gy.shape[0]
    nnz = row.numel()
    assert x.shape[0] == M and col.numel() == nnz and col.dtype == torch.uint8
    if nnz == 0 or M == 0:
        return torch.zeros(nnz, dtype=x.dtype, device=x.device)
    out = torch.empty(nnz, dtype=x.dtype, device=x.device)
    P = _n_panels(x.shape[1])
    gy, x = _token_major(gy), _token_major(x)
    # 2048 fp32 partials a program (16 a thread): at 4096, 16+ tokens took 136-142 registers a thread on sm_90.
    block_m = _pow2_clamp(M, 1, 64)
    block_nz = max(16, min(256, 2048 // block_m))
    _csr_sddmm_kernel[(triton.cdiv(nnz, block_nz),)](
        gy, x, row, col, out, nnz, M, P, *gy.stride(), *x.stride(),
        BLOCK_NZ=block_nz, BLOCK_M=block_m, num_warps=4,
    )
    return out
