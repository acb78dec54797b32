"""Triton kernels for the fused depthwise-separable convolution.

    z = dw(x) + dw_bias            depthwise kh x kw conv, groups=C
    a = act(z)
    y = pw(a) + pw_bias [+ residual]   1x1 conv, C -> Cout

Forward is one kernel: a program owns BLOCK_P output pixels x BLOCK_CO output channels, walks C in
BLOCK_C chunks, builds the depthwise tile in fp32 registers and feeds it straight into ``tl.dot``
against the pointwise weight, so ``z``/``a`` never touch memory.

Backward recomputes ``z`` from the inputs (nothing is saved by forward) and runs four kernels:

1. ``_dwsep_bwd_act_kernel``        grad_a = grad_y @ pw_w (a GEMM over Cout), grad_z = grad_a * act'(z);
                                     writes grad_z (fp32) and a (input dtype) to scratch.
2. ``_dwsep_bwd_pw_weight_kernel``  grad_pw_w = grad_y^T @ a, grad_pw_b = sum grad_y (split-K over pixels).
3. ``_dwsep_bwd_input_kernel``      grad_x: transposed depthwise conv of grad_z, gather form (no atomics).
4. ``_dwsep_bwd_dw_weight_kernel``  grad_dw_w, grad_dw_b: per-tap reductions of grad_z * x, split
                                     over pixels.

All reductions are deterministic: split reductions write per-split fp32 partials that the launcher
sums with torch; no atomics anywhere.

Layout: every kernel takes element strides, so one kernel serves NCHW and channels_last. Outputs and
scratch are allocated in x's memory format, so all pixel-indexed tensors are walked the same way.

Precision: every load is upcast to fp32 (the Triton interpreter computes garbage in bf16, and the GPU
wants fp32 math anyway); tensor-core dots take operands in the input dtype with fp32 accumulation.
For fp32 inputs the dots use TF32 exactly when ``torch.backends.cudnn.allow_tf32`` is set (True by
default), matching what PyTorch's own cuDNN 1x1 conv does with the same flag; otherwise IEEE fp32.
"""

import functools

import torch
import triton
import triton.language as tl

from ._matmul import dot_args, mma, tf32_allowed

# constexpr: @triton.jit code may read only constexpr globals
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2), exact-erf GELU
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi), GELU's pdf factor



# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _unflatten3(pid, n0, n1):
    """Split a flat program id into (i0, i1, i2) with i0 fastest. One flat grid axis avoids the
    65535 limit on grid axes 1 and 2."""
    i0 = pid % n0
    rest = pid // n0
    return i0, rest % n1, rest // n1


@triton.jit
def _act(z, ACT: tl.constexpr):
    """Activation by code (0 none, 1 relu, 2 relu6, 3 silu, 4 exact gelu, 5 hardswish) on fp32 z.
    The where-forms keep NaN as NaN, as torch does."""
    if ACT == 1:
        out = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        out = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACT == 3:
        out = z * tl.sigmoid(z)
    elif ACT == 4:
        out = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 5:
        out = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    else:
        out = z
    return out


@triton.jit
def _act_backward(grad_a, z, ACT: tl.constexpr):
    """grad_z = grad_a * act'(z), with the boundary conventions of torch's backward kernels:
    relu/relu6 pass nothing at the kinks (z == 0, z == 6); hardswish is 0 for z <= -3, z/3 + 1/2
    strictly inside, 1 for z >= 3 (torch since pytorch#148049; earlier torch gave -1/2 and 3/2 at
    the kinks). NaN z passes grad_a through, as in torch."""
    if ACT == 1:
        out = tl.where(z <= 0.0, 0.0, grad_a)
    elif ACT == 2:
        out = tl.where((z <= 0.0) | (z >= 6.0), 0.0, grad_a)
    elif ACT == 3:
        s = tl.sigmoid(z)
        out = grad_a * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 4:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        out = grad_a * (cdf + z * (_INV_SQRT_2PI * tl.exp(-0.5 * z * z)))
    elif ACT == 5:
        out = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, grad_a * (z / 3.0 + 0.5), grad_a))
    else:
        out = grad_a
    return out


@triton.jit
def _dw_tile(x_n, w_ptr, b_ptr, offs_c, c_mask, oh, ow, p_mask, H, W, sxc, sxh, sxw,
             sh, sw, ph, pw, dh, dw,
             KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """z[p, c] = sum_{i,j} x[c, oh*sh-ph+i*dh, ow*sw-pw+j*dw] * w[c, i, j] + b[c], fp32 [BLOCK_P, BLOCK_C].

    x_n points at sample n of x; offs_c [BLOCK_C], oh/ow [BLOCK_P]. Padding is a masked load (0).
    Columns with c_mask False come out exactly 0 (weights and bias load as 0)."""
    c_off = offs_c[None, :] * sxc
    ld_c = c_mask[None, :]
    ih0 = oh * sh - ph
    iw0 = ow * sw - pw
    z = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    # range, not tl.static_range: unrolled taps let the scheduler hoist every gather and spilled
    # (sm_90, 3x3: 255 registers + 1 KB stack); the loop keeps one tap's gather live.
    for i in range(KH):
        ih = ih0 + i * dh
        row_ok = p_mask & (ih >= 0) & (ih < H)
        for j in range(KW):
            iw = iw0 + j * dw
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_n + (ih * sxh + iw * sxw)[:, None] + c_off, mask=ok[:, None] & ld_c, other=0.0)
            wv = tl.load(w_ptr + offs_c * (KH * KW) + (i * KW + j), mask=c_mask, other=0.0)
            z += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        z += tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return z


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dwsep_fwd_kernel(
    x_ptr, dw_w_ptr, dw_b_ptr, pw_w_ptr, pw_b_ptr, res_ptr, y_ptr,
    C, H, W, Cout, Wo, P,
    sxn, sxc, sxh, sxw,  # x [N, C, H, W]
    syn, syc, syh, syw,  # y and residual [N, Cout, Ho, Wo] (same memory format)
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr,
    HAS_DW_BIAS: tl.constexpr, HAS_PW_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """y[n, co-block, p-block] for one (Cout block, pixel block, n); P = Ho*Wo.

    Cout blocks are the fastest program index so the programs that re-gather the same x tile run
    together and hit L2 (the depthwise recompute per Cout block costs kh*kw/BLOCK_CO of the dot)."""
    co_blk, p_blk, n = _unflatten3(tl.program_id(0), tl.cdiv(Cout, BLOCK_CO), tl.cdiv(P, BLOCK_P))
    offs_p = p_blk * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    oh = offs_p // Wo
    ow = offs_p % Wo
    offs_co = co_blk * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < Cout
    n64 = n.to(tl.int64)  # n * stride can pass 2**31 on big batches
    x_n = x_ptr + n64 * sxn

    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        z = _dw_tile(x_n, dw_w_ptr, dw_b_ptr, offs_c, c_mask, oh, ow, p_mask, H, W, sxc, sxh, sxw,
                     sh, sw, ph, pw, dh, dw, KH, KW, HAS_DW_BIAS, BLOCK_P, BLOCK_C)
        # pw_w is [Cout, C]; this is its transpose tile [BLOCK_C, BLOCK_CO]. Masked rows are 0, so
        # padded channels add nothing whatever act(0) is.
        w_t = tl.load(pw_w_ptr + offs_co[None, :] * C + offs_c[:, None],
                      mask=c_mask[:, None] & co_mask[None, :], other=0.0)
        acc = mma(acc, _act(z, ACT), w_t, DOT_DTYPE, DOT_PREC, EMULATE)

    if HAS_PW_BIAS:
        acc += tl.load(pw_b_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
    y_off = n64 * syn + (oh * syh + ow * syw)[:, None] + offs_co[None, :] * syc
    mask = p_mask[:, None] & co_mask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + y_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dwsep_bwd_act_kernel(
    x_ptr, dw_w_ptr, dw_b_ptr, pw_w_ptr, gy_ptr, gz_ptr, a_ptr,
    C, H, W, Cout, Wo, P,
    sxn, sxc, sxh, sxw,  # x
    syn, syc, syh, syw,  # grad_y [N, Cout, Ho, Wo]
    szn, szc, szh, szw,  # grad_z and a scratch [N, C, Ho, Wo]
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, HAS_DW_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """For one (C block, pixel block, n): recompute z, grad_a = grad_y @ pw_w over all of Cout,
    store grad_z = grad_a * act'(z) (fp32) and a = act(z) (input dtype, the operand of grad_pw_w)."""
    c_blk, p_blk, n = _unflatten3(tl.program_id(0), tl.cdiv(C, BLOCK_C), tl.cdiv(P, BLOCK_P))
    offs_p = p_blk * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    oh = offs_p // Wo
    ow = offs_p % Wo
    offs_c = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    n64 = n.to(tl.int64)

    z = _dw_tile(x_ptr + n64 * sxn, dw_w_ptr, dw_b_ptr, offs_c, c_mask, oh, ow, p_mask, H, W,
                 sxc, sxh, sxw, sh, sw, ph, pw, dh, dw, KH, KW, HAS_DW_BIAS, BLOCK_P, BLOCK_C)

    gy_p = gy_ptr + n64 * syn + (oh * syh + ow * syw)[:, None]
    grad_a = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for co0 in range(0, Cout, BLOCK_CO):
        offs_co = co0 + tl.arange(0, BLOCK_CO)
        co_mask = offs_co < Cout
        g = tl.load(gy_p + offs_co[None, :] * syc, mask=p_mask[:, None] & co_mask[None, :], other=0.0)
        w = tl.load(pw_w_ptr + offs_co[:, None] * C + offs_c[None, :],
                    mask=co_mask[:, None] & c_mask[None, :], other=0.0)
        grad_a = mma(grad_a, g, w, DOT_DTYPE, DOT_PREC, EMULATE)

    z_off = n64 * szn + (oh * szh + ow * szw)[:, None] + offs_c[None, :] * szc
    mask = p_mask[:, None] & c_mask[None, :]
    tl.store(gz_ptr + z_off, _act_backward(grad_a, z, ACT), mask=mask)
    tl.store(a_ptr + z_off, _act(z, ACT).to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_offsets(offs_m, P, Wo, s_n, s_h, s_w):
    """Offsets of flat pixels m = n*P + oh*Wo + ow in a [N, *, Ho, Wo] tensor (channel 0), int64."""
    n = offs_m // P
    p = offs_m % P
    return n.to(tl.int64) * s_n + (p // Wo) * s_h + (p % Wo) * s_w


@triton.jit
def _dwsep_bwd_pw_weight_kernel(
    gy_ptr, a_ptr, gw_part_ptr, gb_part_ptr,
    C, Cout, Wo, P, M, n_splits,
    syn, syc, syh, syw,  # grad_y
    szn, szc, szh, szw,  # a scratch
    DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Split s of grad_pw_w[co, c] = sum_m grad_y[m, co] * a[m, c] over M = N*Ho*Wo pixels, and of
    grad_pw_b[co] = sum_m grad_y[m, co]. Writes fp32 partials gw_part [S, Cout, C], gb_part [S, Cout]."""
    c_blk, co_blk, s = _unflatten3(tl.program_id(0), tl.cdiv(C, BLOCK_C), tl.cdiv(Cout, BLOCK_CO))
    offs_co = co_blk * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < Cout
    offs_c = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    acc = tl.zeros((BLOCK_CO, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for mt in range(s, tl.cdiv(M, BLOCK_M), n_splits):
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        g_t = tl.load(gy_ptr + _pixel_offsets(offs_m, P, Wo, syn, syh, syw)[None, :] + offs_co[:, None] * syc,
                      mask=co_mask[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_CO, BLOCK_M]
        a = tl.load(a_ptr + _pixel_offsets(offs_m, P, Wo, szn, szh, szw)[:, None] + offs_c[None, :] * szc,
                    mask=m_mask[:, None] & c_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_C]
        acc = mma(acc, g_t, a, DOT_DTYPE, DOT_PREC, EMULATE)
        acc_b += tl.sum(g_t.to(tl.float32), axis=1)

    s64 = s.to(tl.int64)
    tl.store(gw_part_ptr + s64 * Cout * C + offs_co[:, None] * C + offs_c[None, :], acc,
             mask=co_mask[:, None] & c_mask[None, :])
    if c_blk == 0:  # every C block computes the same bias sum; the first stores it
        tl.store(gb_part_ptr + s64 * Cout + offs_co, acc_b, mask=co_mask)


@triton.jit
def _dwsep_bwd_input_kernel(
    gz_ptr, dw_w_ptr, gx_ptr,
    C, H, W, Ho, Wo,
    szn, szc, szh, szw,  # grad_z scratch [N, C, Ho, Wo]
    sxn, sxc, sxh, sxw,  # grad_x [N, C, H, W] (x's strides)
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x[n, c, ih, iw] = sum over taps (i, j) whose output pixel oh = (ih + ph - i*dh)/sh,
    ow = (iw + pw - j*dw)/sw is integral and in range of grad_z[n, c, oh, ow] * w[c, i, j].
    Gather form: each program owns its input pixels, so no atomics."""
    c_blk, p_blk, n = _unflatten3(tl.program_id(0), tl.cdiv(C, BLOCK_C), tl.cdiv(H * W, BLOCK_P))
    offs_p = p_blk * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < H * W
    ih = offs_p // W
    iw = offs_p % W
    offs_c = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    n64 = n.to(tl.int64)
    gz_nc = gz_ptr + n64 * szn + offs_c[None, :] * szc

    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in range(KH):  # not unrolled, as in _dw_tile
        # Clamp before // and %: negative integer division rounds differently on GPU (toward 0)
        # and in the numpy interpreter (toward -inf); the clamped lanes are masked anyway.
        th = ih + ph - i * dh
        thc = tl.maximum(th, 0)
        oh = thc // sh
        row_ok = p_mask & (th >= 0) & (thc % sh == 0) & (oh < Ho)
        for j in range(KW):
            tw = iw + pw - j * dw
            twc = tl.maximum(tw, 0)
            ow = twc // sw
            ok = row_ok & (tw >= 0) & (twc % sw == 0) & (ow < Wo)
            g = tl.load(gz_nc + (oh * szh + ow * szw)[:, None], mask=ok[:, None] & c_mask[None, :], other=0.0)
            wv = tl.load(dw_w_ptr + offs_c * (KH * KW) + (i * KW + j), mask=c_mask, other=0.0)
            acc += g * wv.to(tl.float32)[None, :]

    gx_off = n64 * sxn + (ih * sxh + iw * sxw)[:, None] + offs_c[None, :] * sxc
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])


@triton.jit
def _dwsep_bwd_dw_weight_kernel(
    x_ptr, gz_ptr, part_ptr,
    C, H, W, Wo, P, M, n_splits,
    sxn, sxc, sxh, sxw,  # x
    szn, szc, szh, szw,  # grad_z scratch
    sh, sw, ph, pw, dh, dw,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split s of one tap t of the depthwise weight gradient,
        part[s, c, t] = sum_m grad_z[m, c] * x[n, c, oh*sh-ph+i*dh, ow*sw-pw+j*dw],  t = i*KW + j,
    and for t == KH*KW (an extra 'tap' whose input is 1) of grad_dw_b. part is fp32 [S, C, KH*KW+1].

    One program per tap keeps the accumulator a single [BLOCK_M, BLOCK_C] tile; a tap axis in
    registers would cost BLOCK_M*BLOCK_C*KH*KW (49x for 7x7). Taps are the fastest program index so
    the programs re-reading the same grad_z tile run together and share it through L2."""
    T = KH * KW
    t, c_blk, s = _unflatten3(tl.program_id(0), T + 1, tl.cdiv(C, BLOCK_C))
    i = t // KW
    j = t % KW
    is_tap = t < T
    offs_c = c_blk * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for mt in range(s, tl.cdiv(M, BLOCK_M), n_splits):
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        g = tl.load(gz_ptr + _pixel_offsets(offs_m, P, Wo, szn, szh, szw)[:, None] + offs_c[None, :] * szc,
                    mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        n = offs_m // P
        p = offs_m % P
        ih = (p // Wo) * sh - ph + i * dh
        iw = (p % Wo) * sw - pw + j * dw
        ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        # The bias 'tap' loads nothing. A where, not `is_tap & ok`: the 3.9 interpreter rejects a
        # mask made by and-ing a scalar with a block ("mask has unsupported dtype").
        ok = tl.where(is_tap, ok, False)
        x_off = n.to(tl.int64) * sxn + ih * sxh + iw * sxw
        xv = tl.load(x_ptr + x_off[:, None] + offs_c[None, :] * sxc,
                     mask=ok[:, None] & c_mask[None, :], other=0.0)
        acc += g * tl.where(is_tap, xv.to(tl.float32), 1.0)

    tl.store(part_ptr + s.to(tl.int64) * C * (T + 1) + offs_c * (T + 1) + t, tl.sum(acc, axis=0), mask=c_mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _pow2_clamp(n, lo, hi):
    """next_power_of_2(n) clamped to [lo, hi]; lo >= 16 wherever the block is a tl.dot dimension."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device):
    """Streaming multiprocessors to fill; 1 off-GPU, where fewer, larger programs run fastest in the
    interpreter."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _fwd_config(N, P, C, Cout, sms):
    """Blocks for _dwsep_fwd_kernel.

    BLOCK_CO <= 128: a 64x128 fp32 accumulator is 64 registers/thread at 4 warps, 32 at 8.
    BLOCK_C = 32 (the dot's K chunk): the fp32 depthwise tile [BLOCK_P, 32] plus one x gather per
    tap must stay in registers next to the accumulator. BLOCK_P starts at 64 and halves (to 16)
    while the grid would leave SMs idle: small images with small Cout otherwise give a handful of
    programs."""
    block_co = _pow2_clamp(Cout, 16, 128)
    block_c = _pow2_clamp(C, 16, 32)
    block_p = _pow2_clamp(P, 16, 64)
    while block_p > 16 and N * triton.cdiv(P, block_p) * triton.cdiv(Cout, block_co) < 2 * sms:
        block_p //= 2
    num_warps = 8 if block_p * block_co >= 8192 else 4
    return dict(BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_CO=block_co, num_warps=num_warps)


def _bwd_act_config(P, C, Cout):
    """Blocks for _dwsep_bwd_act_kernel, a GEMM [pixels, C] = [pixels, Cout] @ [Cout, C] with the
    depthwise recompute fused in: 64x64 output tile (one recompute per (pixel, c)), K chunk 32.
    8 warps: at 4, the fp32 grad_a and z tiles took 254 registers/thread (NCHW fp16, sm_90)."""
    return dict(BLOCK_P=_pow2_clamp(P, 16, 64), BLOCK_C=_pow2_clamp(C, 16, 64),
                BLOCK_CO=_pow2_clamp(Cout, 16, 32), num_warps=8)


def _num_splits(n_tiles, n_m_tiles, sms):
    """Splits of a pixel reduction so that ~4 programs per SM run, but no more splits than pixel
    tiles (a split with no tile is wasted). splits * n_tiles <= max(n_tiles, 4 * sms) also bounds
    the fp32 partials: at most ~528 tiles on an H100 (8.6 MB for 64x64 tiles)."""
    return max(1, min(triton.cdiv(4 * sms, n_tiles), n_m_tiles))


def _pw_weight_config(M, C, Cout, sms):
    """Blocks and splits for _dwsep_bwd_pw_weight_kernel, a GEMM [Cout, C] with K = N*Ho*Wo split
    over pixels: with Cout, C <= 64 there is one output tile, and without splits one program.
    8 warps: at 4, the 64x64 tile plus two [64, 64] pointer tiles took 254 registers/thread on
    sm_90 and spilled on sm_80."""
    cfg = dict(BLOCK_CO=_pow2_clamp(Cout, 16, 64), BLOCK_C=_pow2_clamp(C, 16, 64), BLOCK_M=64, num_warps=8)
    n_tiles = triton.cdiv(Cout, cfg["BLOCK_CO"]) * triton.cdiv(C, cfg["BLOCK_C"])
    return cfg, _num_splits(n_tiles, triton.cdiv(M, cfg["BLOCK_M"]), sms)


def _dw_weight_config(M, C, taps, sms):
    """Blocks and splits for _dwsep_bwd_dw_weight_kernel: elementwise multiply-reduce, so 64 pixels
    x 32 channels (2048 fp32, 16 per thread at 4 warps) and enough splits to fill the GPU."""
    cfg = dict(BLOCK_M=64, BLOCK_C=_pow2_clamp(C, 1, 32), num_warps=4)
    n_tiles = taps * triton.cdiv(C, cfg["BLOCK_C"])
    return cfg, _num_splits(n_tiles, triton.cdiv(M, cfg["BLOCK_M"]), sms)


def _input_grad_config(C):
    """Blocks for _dwsep_bwd_input_kernel, a gather: 64 pixels x up to 32 channels. 128 pixels
    took 215 registers/thread for NCHW on sm_90, 64 take 128 (twice the resident programs)."""
    return dict(BLOCK_P=64, BLOCK_C=_pow2_clamp(C, 1, 32), num_warps=4)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _memory_format(x):
    """x's memory format; an x contiguous both ways (e.g. H = W = 1) counts as NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _out_hw(H, W, kh, kw, stride, padding, dilation):
    """(Ho, Wo) as F.conv2d computes them."""
    ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return ho, wo


def _dot_args(x):
    """mma's constexprs; fp32 uses TF32 iff cuDNN convolutions would (legacy default: on)."""
    return dot_args(x, tf32_allowed(lambda: torch.backends.cudnn.allow_tf32,
                                    (lambda: torch.backends.cudnn.conv.fp32_precision,
                                     lambda: torch.backends.cudnn.fp32_precision,
                                     lambda: torch.backends.fp32_precision), True))


def _conv_args(stride, padding, dilation):
    """(sh, sw, ph, pw, dh, dw), the order every kernel takes them in."""
    return (*stride, *padding, *dilation)


def dwsep_fwd_triton(x, dw_weight, dw_bias, pw_weight, pw_bias, stride, padding, dilation, activation: int,
                     residual):
    """Fused depthwise-separable conv forward.

    x [N, C, H, W] (NCHW or channels_last), dw_weight [C, 1, kh, kw], dw_bias [C] or None,
    pw_weight [Cout, C, 1, 1], pw_bias [Cout] or None, residual [N, Cout, Ho, Wo] or None;
    stride/padding/dilation 2-tuples; activation code 0..5.
    Returns y [N, Cout, Ho, Wo] in x's dtype and memory format."""
    N, C, H, W = x.shape
    Cout = pw_weight.shape[0]
    KH, KW = dw_weight.shape[2], dw_weight.shape[3]
    Ho, Wo = _out_hw(H, W, KH, KW, stride, padding, dilation)
    P = Ho * Wo
    fmt = _memory_format(x)
    y = torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    # residual shares y's strides once it is in the same format (a no-op copy when it already is).
    res = residual.contiguous(memory_format=fmt) if residual is not None else y
    cfg = _fwd_config(N, P, C, Cout, _num_sms(x.device))
    grid = (N * triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(Cout, cfg["BLOCK_CO"]),)
    _dwsep_fwd_kernel[grid](
        x, dw_weight, dw_bias if dw_bias is not None else dw_weight,
        pw_weight, pw_bias if pw_bias is not None else pw_weight, res, y,
        C, H, W, Cout, Wo, P, *x.stride(), *y.stride(), *_conv_args(stride, padding, dilation),
        KH=KH, KW=KW, ACT=activation,
        HAS_DW_BIAS=dw_bias is not None, HAS_PW_BIAS=pw_bias is not None, HAS_RES=residual is not None,
        **_dot_args(x), **cfg,
    )
    return y


def dwsep_bwd_triton(grad_y, x, dw_weight, dw_bias, pw_weight, stride, padding, dilation, activation: int):
    """Fused depthwise-separable conv backward; recomputes z = dw(x) + dw_bias.

    grad_y [N, Cout, Ho, Wo] (any layout), other arguments as dwsep_fwd_triton.
    Returns (grad_x [N, C, H, W] in x's memory format, grad_dw_weight [C, 1, kh, kw],
    grad_dw_bias [C], grad_pw_weight [Cout, C, 1, 1], grad_pw_bias [Cout]), all in x's dtype,
    accumulated in fp32. grad_dw_bias is returned even when dw_bias is None."""
    N, C, H, W = x.shape
    Cout = pw_weight.shape[0]
    KH, KW = dw_weight.shape[2], dw_weight.shape[3]
    Ho, Wo = _out_hw(H, W, KH, KW, stride, padding, dilation)
    P, M, T = Ho * Wo, N * Ho * Wo, KH * KW
    fmt = _memory_format(x)
    dev, sms = x.device, _num_sms(x.device)
    conv = _conv_args(stride, padding, dilation)
    dot = _dot_args(x)
    gy = grad_y.contiguous(memory_format=fmt)
    # Scratch in x's format: grad_z in fp32 (feeds two reductions and grad_x), a in x's dtype (the
    # operand PyTorch's own backward would use for grad_pw_w). Same shape and format: same strides.
    grad_z = torch.empty((N, C, Ho, Wo), dtype=torch.float32, device=dev, memory_format=fmt)
    a = torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=dev, memory_format=fmt)
    assert grad_z.stride() == a.stride()

    cfg = _bwd_act_config(P, C, Cout)
    grid = (N * triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(C, cfg["BLOCK_C"]),)
    _dwsep_bwd_act_kernel[grid](
        x, dw_weight, dw_bias if dw_bias is not None else dw_weight, pw_weight, gy, grad_z, a,
        C, H, W, Cout, Wo, P, *x.stride(), *gy.stride(), *grad_z.stride(), *conv,
        KH=KH, KW=KW, ACT=activation, HAS_DW_BIAS=dw_bias is not None, **dot, **cfg,
    )

    cfg, splits = _pw_weight_config(M, C, Cout, sms)
    gw_part = torch.empty((splits, Cout, C), dtype=torch.float32, device=dev)
    gb_part = torch.empty((splits, Cout), dtype=torch.float32, device=dev)
    grid = (triton.cdiv(C, cfg["BLOCK_C"]) * triton.cdiv(Cout, cfg["BLOCK_CO"]) * splits,)
    _dwsep_bwd_pw_weight_kernel[grid](
        gy, a, gw_part, gb_part, C, Cout, Wo, P, M, splits, *gy.stride(), *a.stride(), **dot, **cfg,
    )

    grad_x = torch.empty((N, C, H, W), dtype=x.dtype, device=dev, memory_format=fmt)
    cfg = _input_grad_config(C)
    grid = (N * triton.cdiv(H * W, cfg["BLOCK_P"]) * triton.cdiv(C, cfg["BLOCK_C"]),)
    _dwsep_bwd_input_kernel[grid](
        grad_z, dw_weight, grad_x, C, H, W, Ho, Wo, *grad_z.stride(), *grad_x.stride(), *conv,
        KH=KH, KW=KW, **cfg,
    )

    cfg, splits_dw = _dw_weight_config(M, C, T + 1, sms)
    dw_part = torch.empty((splits_dw, C, T + 1), dtype=torch.float32, device=dev)
    grid = ((T + 1) * triton.cdiv(C, cfg["BLOCK_C"]) * splits_dw,)
    _dwsep_bwd_dw_weight_kernel[grid](
        x, grad_z, dw_part, C, H, W, Wo, P, M, splits_dw, *x.stride(), *grad_z.stride(), *conv,
        KH=KH, KW=KW, **cfg,
    )

    dw_sum = dw_part.sum(0)  # [C, T + 1]: the taps, then the bias
    return (
        grad_x,
        dw_sum[:, :T].contiguous().view(C, 1, KH, KW).to(x.dtype),
        dw_sum[:, T].contiguous().to(x.dtype),
        gw_part.sum(0).reshape(Cout, C, 1, 1).to(x.dtype),
        gb_part.sum(0).to(x.dtype),
    )
