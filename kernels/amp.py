"""Triton multi-tensor kernels of the fused GradScaler and optimizers (issue #5; interface:
docs/amp_kernels.md, semantics repeated in each function's docstring).

    unscale_check_norm  grad *= inv_scale (optional), found_inf, total norm: one pass over the gradients
    fused_adamw_        torch.optim.AdamW's update, gradient scaled by a device factor, skipped on found_inf
    fused_sgd_          torch.optim.SGD's update (momentum, dampening, nesterov, weight decay, maximize)

One launch covers any number of tensors. The host builds, per list of tensors, a table in device memory
(int64, one section after another):

    addresses of list 0 [n] | ... | addresses of list D-1 [n] | numels [n]
        | chunk tensor [c] | chunk start [c]

and launches one program per chunk: the program reads which tensor it works on and where its chunk starts,
turns the stored address into a typed pointer (tl.pointer_type) and walks CHUNK elements in BLOCK steps. Empty
tensors get no chunk. The table is a function of the tensors' addresses, numels and dtypes only, so it is
cached under exactly that key: a training loop whose gradients keep their storage (or get it back from the
caching allocator) pays the table's H2D copy once. Nothing here reads a device value on the host: the
table is copied from pinned memory with non_blocking, the norm is finished by a one-program kernel and the
optimizers' step counter is read and incremented on the device. For CUDA-graph capture, make one eager call
with the same tensors first (as torch asks for warm-up anyway): the capture then finds the table cached and
records launches only, no copy from a host buffer that may be gone by replay. A float lr is a kernel
argument, fixed in a captured graph; a tensor lr (``lr_tensor``) is loaded by the kernels, so replays use its
current value.

A launch holds one dtype (the pointer's element type is compile-time) and one alignment class: when every
address of a group is 16-byte aligned (any tensor torch allocates itself is) the kernel is told so
(tl.multiple_of) and loads and stores 16 bytes at a time; views at odd offsets go to a second, scalar launch.
Full BLOCKs run unmasked (a runtime mask would also stop vectorization); only a chunk's tail is masked.

Works on CUDA tensors and, under TRITON_INTERPRET=1, on CPU tensors: the interpreter passes CPU tensors by
their real address, so loading an address from the table and dereferencing it works there too (checked with
triton 3.9). Every load is upcast to float32 before any arithmetic (bf16 arithmetic is garbage in the
interpreter; the GPU wants fp32 math anyway).

Floors (H100, ~3.0 TB/s copy-class bandwidth, a spec figure: none measured here yet; compulsory bytes per
element):
  unscale_check_norm: fp16/bf16 read-only 2 B (BERT-large 335M: 0.22 ms), with write-back 4 B (0.45 ms);
                      fp32 4 B / 8 B.
  fused_adamw_: read p, g, m, v and write p, m, v: 7 x elem bytes (fp32 28 B: 335M params 3.1 ms).
  fused_sgd_: read p, g (+buf), write p (+buf): 3 x elem bytes without momentum, 5 x with.
"""

import collections
import struct

import torch
import triton
import triton.language as tl

from ._matmul import TL_DTYPE

__all__ = ["unscale_check_norm", "fused_adamw_", "fused_sgd_"]

# Norm codes (constexpr): what unscale_check_norm reduces.
_NORM_NONE = 0
_NORM_L2 = 1
_NORM_INF = 2

# (CHUNK, BLOCK, num_warps) per device type. GPU: a 2048-element block over 8 warps is one 16-byte vector per
# thread for fp16 (two for fp32); 16384-element chunks keep BERT-large at ~21k programs (21k norm partials).
# Untuned: no GPU measurement yet. The interpreter runs tiny test tensors: small chunks and blocks make them
# span several chunks and exercise both the unmasked and the masked (tail) path.
_UNSCALE_CFG = {"cuda": (16384, 2048, 8), "cpu": (32, 8, 1)}
_OPTIM_CFG = {"cuda": (16384, 1024, 4), "cpu": (32, 8, 1)}
_FINISH_BLOCK = {"cuda": 4096, "cpu": 16}


# Tables built recently, keyed by (kind, device, chunk, per-tensor dtype/addresses/numel). Bounded: a model
# with a handful of parameter groups needs a few entries; anything else just rebuilds.
_TABLE_CACHE = collections.OrderedDict()
_TABLE_CACHE_SIZE = 16


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_of_program(table, n_tensors, n_chunks, DEPTH: tl.constexpr, CHUNK: tl.constexpr):
    """(tensor index, chunk start, elements in this chunk) of this program, from the table."""
    pid = tl.program_id(0)
    tensor = tl.load(table + (DEPTH + 1) * n_tensors + pid)
    start = tl.multiple_of(tl.load(table + (DEPTH + 1) * n_tensors + n_chunks + pid), CHUNK)
    numel = tl.load(table + DEPTH * n_tensors + tensor)
    return tensor, start, tl.minimum(numel - start, CHUNK)


@triton.jit
def _tensor_ptr(table, n_tensors, tensor, start, list_index, ELEM: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to element `start` of tensor `tensor` of list `list_index`."""
    ptr = tl.load(table + list_index * n_tensors + tensor).to(tl.pointer_type(ELEM))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # host checked: every address of this launch is 16-byte aligned
    return ptr + start  # start is a multiple of CHUNK (>= 8 elements): alignment is kept


@triton.jit
def _load_f32(ptr, offs, n, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    else:
        x = tl.load(ptr + offs).to(tl.float32)
    return x


@triton.jit
def _store(ptr, offs, n, x, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=offs < n)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty))


@triton.jit
def _pow_f64(base, n):
    """base ** n for an fp64 scalar base and an int32 0 <= n < 2**31, by squaring (31 steps, all in fp64).
    Avoids fp32 exp2/log2: 1 - beta2**t at t = 1 cancels 3 digits, and fp32 pow would leave ~1e-4 relative
    error in Adam's bias correction where torch computes it in double."""
    result = base * 0.0 + 1.0
    for _ in range(31):
        result = tl.where((n & 1) == 1, result * base, result)
        base = base * base
        n = n >> 1
    return result


# ----------------------------------------------------------------------------------------------------------
# unscale + inf/nan check + norm
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _unscale_block(ptr, offs, n, inv_scale, acc, bad, nan_seen,
                   NORM: tl.constexpr, WRITE_BACK: tl.constexpr, MASKED: tl.constexpr):
    x = _load_f32(ptr, offs, n, MASKED)
    y = x * inv_scale
    if WRITE_BACK:
        # Checked (and measured) is what the gradient holds afterwards: the product rounded to its dtype, so an
        # fp16 product past 65504 (a scale below 1) is an overflow, not a silent inf in the gradient.
        y = y.to(ptr.dtype.element_ty).to(tl.float32)
        _store(ptr, offs, n, y, MASKED)
    # The product is non-finite iff the gradient is or the product overflowed; masked lanes load 0.
    bad = bad | (y != y) | (tl.abs(y) == float("inf"))
    if NORM == 1:
        acc += y * y  # inf and nan propagate through the sum by themselves
    elif NORM == 2:
        # GPU max drops NaN (fmaxf): keep NaN in a flag of its own so the norm stays non-finite.
        is_nan = y != y
        nan_seen = nan_seen | is_nan
        acc = tl.maximum(acc, tl.where(is_nan, 0.0, tl.abs(y)))
    return acc, bad, nan_seen


@triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
def _unscale_check_norm_kernel(
    table, n_tensors, n_chunks, partial_ptr, inv_scale_ptr, found_inf_ptr, elem_ptr,
    NORM: tl.constexpr, WRITE_BACK: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per chunk. partial_ptr[pid] <- sum of squares (NORM 1) or max |.| (NORM 2, NaN if any)
    of grad * inv_scale over the chunk; found_inf <- 1.0 when the chunk holds an inf or nan.
    Floor: fp16/bf16 2 B per element read-only, 4 B with write-back (fp32 4 / 8 B); at H100's ~3.0 TB/s
    BERT-large's 335M fp16 grads take 0.22 ms / 0.45 ms."""
    tensor, start, n = _chunk_of_program(table, n_tensors, n_chunks, 1, CHUNK)
    ptr = _tensor_ptr(table, n_tensors, tensor, start, 0, elem_ptr.dtype.element_ty, ALIGNED)
    inv_scale = tl.load(inv_scale_ptr)
    ar = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bad = ar < 0
    nan_seen = ar < 0
    for off in range(0, CHUNK, BLOCK):
        offs = off + ar
        if off + BLOCK <= n:
            acc, bad, nan_seen = _unscale_block(ptr, offs, n, inv_scale, acc, bad, nan_seen, NORM, WRITE_BACK,
                                                False)
        elif off < n:
            acc, bad, nan_seen = _unscale_block(ptr, offs, n, inv_scale, acc, bad, nan_seen, NORM, WRITE_BACK,
                                                True)
    # Only a program that saw a non-finite writes found_inf: it is never reset here.
    tl.store(found_inf_ptr, 1.0, mask=tl.max(bad.to(tl.int32), 0) > 0)
    if NORM == 1:
        tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, 0))
    elif NORM == 2:
        part = tl.max(acc, 0)
        any_nan = tl.max(nan_seen.to(tl.int32), 0) > 0
        tl.store(partial_ptr + tl.program_id(0), tl.where(any_nan, float("nan"), part))


@triton.jit(do_not_specialize=["n"])
def _norm_finish_kernel(partial_ptr, n, out_ptr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    """out = sqrt(sum partials) (NORM 1) or max partials with NaN kept (NORM 2); 0 for no partials."""
    ar = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    nan_seen = ar < 0
    for off in range(0, n, BLOCK):
        x = tl.load(partial_ptr + off + ar, mask=off + ar < n, other=0.0)
        if NORM == 1:
            acc += x
        else:
            nan_seen = nan_seen | (x != x)
            acc = tl.maximum(acc, tl.where(x != x, 0.0, x))
    if NORM == 1:
        tl.store(out_ptr, tl.sqrt(tl.sum(acc, 0)))
    else:
        tl.store(out_ptr, tl.where(tl.max(nan_seen.to(tl.int32), 0) > 0, float("nan"), tl.max(acc, 0)))


# ----------------------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _grad_scale_and_go(factor_ptr, found_inf_ptr, HAS_FACTOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """(gradient factor, whether to update) from the optional device scalars."""
    factor = 1.0
    if HAS_FACTOR:
        factor = tl.load(factor_ptr)
    go = True
    if HAS_FOUND_INF:
        go = tl.load(found_inf_ptr) == 0.0
    return factor, go


@triton.jit
def _device_lr(lr, lr_ptr, HAS_LR_TENSOR: tl.constexpr):
    """The learning rate in fp64: a tensor lr's current value (fp32 or fp64 storage, loaded here, so a
    replayed CUDA graph sees what an LR scheduler wrote into it) or the `lr` argument."""
    if HAS_LR_TENSOR:
        value = tl.load(lr_ptr).to(tl.float64)
    else:
        value = tl.cast(lr, tl.float64)
    return value


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, factor, decay, one_minus_beta1, beta2,
                 one_minus_beta2, step_size, inv_bc2_sqrt, eps, MAXIMIZE: tl.constexpr, MASKED: tl.constexpr):
    g = _load_f32(g_ptr, offs, n, MASKED) * factor
    if MAXIMIZE:
        g = -g
    p = _load_f32(p_ptr, offs, n, MASKED) * decay
    m = _load_f32(m_ptr, offs, n, MASKED)
    m = m + one_minus_beta1 * (g - m)  # torch: exp_avg.lerp_(grad, 1 - beta1)
    v = _load_f32(v_ptr, offs, n, MASKED) * beta2 + one_minus_beta2 * g * g
    p = p - step_size * m / (tl.sqrt(v) * inv_bc2_sqrt + eps)
    _store(p_ptr, offs, n, p, MASKED)
    _store(m_ptr, offs, n, m, MASKED)
    _store(v_ptr, offs, n, v, MASKED)


@triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
def _adamw_kernel(
    table, n_tensors, n_chunks, elem_ptr, step_ptr, factor_ptr, found_inf_ptr, lr_ptr,
    lr, decay, weight_decay, beta1_hi, beta1_lo, one_minus_beta1, beta2, beta2_hi, beta2_lo, one_minus_beta2,
    eps, HAS_FACTOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
    MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per chunk of (param, grad, exp_avg, exp_avg_sq); the table's lists in that order.
    beta*_hi + beta*_lo carry the Python double betas into fp64 for the bias corrections. With HAS_LR_TENSOR
    the learning rate is loaded from lr_ptr (lr and decay unused) and decay = 1 - lr * weight_decay computed
    here.
    Floor: 7 x element size per element (read p, g, m, v; write p, m, v): fp32 28 B, 335M params 3.1 ms."""
    factor, go = _grad_scale_and_go(factor_ptr, found_inf_ptr, HAS_FACTOR, HAS_FOUND_INF)
    if go:
        tensor, start, n = _chunk_of_program(table, n_tensors, n_chunks, 4, CHUNK)
        p_ptr = _tensor_ptr(table, n_tensors, tensor, start, 0, elem_ptr.dtype.element_ty, ALIGNED)
        g_ptr = _tensor_ptr(table, n_tensors, tensor, start, 1, elem_ptr.dtype.element_ty, ALIGNED)
        m_ptr = _tensor_ptr(table, n_tensors, tensor, start, 2, elem_ptr.dtype.element_ty, ALIGNED)
        v_ptr = _tensor_ptr(table, n_tensors, tensor, start, 3, elem_ptr.dtype.element_ty, ALIGNED)
        # t = step + 1 as torch computes it (fp32 tensor += 1); bias corrections in fp64 as torch's (Python
        # double) ones.
        # Clamped below 2**30 for the int conversion: beta**(2**30) is 0 for any beta < 1 - 1e-7 anyway.
        t = tl.minimum(tl.load(step_ptr) + 1.0, 1073741824.0).to(tl.int32)
        bc1 = 1.0 - _pow_f64(tl.cast(beta1_hi, tl.float64) + tl.cast(beta1_lo, tl.float64), t)
        bc2 = 1.0 - _pow_f64(tl.cast(beta2_hi, tl.float64) + tl.cast(beta2_lo, tl.float64), t)
        lr64 = _device_lr(lr, lr_ptr, HAS_LR_TENSOR)
        if HAS_LR_TENSOR:
            # in fp64 and rounded once, as the host does for a float lr
            decay = (1.0 - lr64 * tl.cast(weight_decay, tl.float64)).to(tl.float32)
        step_size = (lr64 / bc1).to(tl.float32)
        inv_bc2_sqrt = (1.0 / tl.sqrt(bc2)).to(tl.float32)
        ar = tl.arange(0, BLOCK)
        for off in range(0, CHUNK, BLOCK):
            offs = off + ar
            if off + BLOCK <= n:
                _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, factor, decay, one_minus_beta1, beta2,
                             one_minus_beta2, step_size, inv_bc2_sqrt, eps, MAXIMIZE, False)
            elif off < n:
                _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, factor, decay, one_minus_beta1, beta2,
                             one_minus_beta2, step_size, inv_bc2_sqrt, eps, MAXIMIZE, True)


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, offs, n, factor, lr, weight_decay, momentum, one_minus_dampening, first,
               HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, MASKED: tl.constexpr):
    g = _load_f32(g_ptr, offs, n, MASKED) * factor
    if MAXIMIZE:
        g = -g
    p = _load_f32(p_ptr, offs, n, MASKED)
    if HAS_WD:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        if first:
            buf = g  # torch: buf = clone(grad) on the first step; the buffer's old contents are never read
        else:
            buf = momentum * _load_f32(b_ptr, offs, n, MASKED) + one_minus_dampening * g
        # Rounded to the buffer's dtype before it is used, as torch's buffer (held in the param's dtype) is.
        buf = buf.to(b_ptr.dtype.element_ty).to(tl.float32)
        _store(b_ptr, offs, n, buf, MASKED)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    _store(p_ptr, offs, n, p - lr * g, MASKED)


@triton.jit(do_not_specialize=["n_tensors", "n_chunks"])
def _sgd_kernel(
    table, n_tensors, n_chunks, elem_ptr, step_ptr, factor_ptr, found_inf_ptr, lr_ptr,
    lr, weight_decay, momentum, one_minus_dampening,
    HAS_FACTOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_WD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
    DEPTH: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per chunk of (param, grad[, momentum_buffer]); the table's lists in that order
    (DEPTH 3 with momentum, else 2). With HAS_LR_TENSOR the learning rate is loaded from lr_ptr (lr unused).
    Floor: 3 x element size per element without momentum (read p, g; write p), 5 x with (and read/write buf;
    4 x on the first step, which does not read it)."""
    factor, go = _grad_scale_and_go(factor_ptr, found_inf_ptr, HAS_FACTOR, HAS_FOUND_INF)
    if go:
        tensor, start, n = _chunk_of_program(table, n_tensors, n_chunks, DEPTH, CHUNK)
        p_ptr = _tensor_ptr(table, n_tensors, tensor, start, 0, elem_ptr.dtype.element_ty, ALIGNED)
        g_ptr = _tensor_ptr(table, n_tensors, tensor, start, 1, elem_ptr.dtype.element_ty, ALIGNED)
        b_ptr = p_ptr
        if HAS_MOMENTUM:
            b_ptr = _tensor_ptr(table, n_tensors, tensor, start, 2, elem_ptr.dtype.element_ty, ALIGNED)
        first = tl.load(step_ptr) == 0.0
        if HAS_LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float32)
        ar = tl.arange(0, BLOCK)
        for off in range(0, CHUNK, BLOCK):
            offs = off + ar
            if off + BLOCK <= n:
                _sgd_block(p_ptr, g_ptr, b_ptr, offs, n, factor, lr, weight_decay, momentum,
                           one_minus_dampening, first, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE, False)
            elif off < n:
                _sgd_block(p_ptr, g_ptr, b_ptr, offs, n, factor, lr, weight_decay, momentum,
                           one_minus_dampening, first, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE, True)


@triton.jit
def _step_increment_kernel(step_ptr, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """step += 1 unless found_inf is set. A launch of its own, after the update launches on the same stream:
    every update program must have read the old step first."""
    step = tl.load(step_ptr)
    if HAS_FOUND_INF:
        step = tl.where(tl.load(found_inf_ptr) == 0.0, step + 1.0, step)
    else:
        step = step + 1.0
    tl.store(step_ptr, step)


# ----------------------------------------------------------------------------------------------------------
# Host side: tensor tables
# ----------------------------------------------------------------------------------------------------------


class _Group:
    """One launch: tensors of one dtype and alignment class. `table` is a device int64 view (layout in the
    module docstring), `example` a tensor of the group's dtype (only its pointer type is used), and
    `partial_offset` where this launch's chunks start in a buffer over all groups' chunks."""

    __slots__ = ("table", "n_tensors", "n_chunks", "example", "aligned", "partial_offset")

    def __init__(self, table, n_tensors, n_chunks, example, aligned, partial_offset):
        self.table, self.n_tensors, self.n_chunks = table, n_tensors, n_chunks
        self.example, self.aligned, self.partial_offset = example, aligned, partial_offset


def _describe(lists):
    """Per-list attributes of every tensor, gathered with one comprehension each (about 0.1 us a tensor: a
    10k-tensor AdamW step pays ~20 ms here, BERT-large's 391 tensors under 1 ms): dtypes and numels of list 0,
    and per list the data pointers."""
    dtypes = [t.dtype for t in lists[0]]
    numels = [t.numel() for t in lists[0]]
    return dtypes, numels, [[t.data_ptr() for t in lst] for lst in lists]


def _check_lists(lists, names, dtypes, numels):
    """Clear errors for what the kernels cannot take (the op layer validates first; this guards direct calls).
    Checked in bulk; only a failure walks the tensors to name the first bad one."""
    n = len(lists[0])
    for lst, name in zip(lists, names):
        if len(lst) != n:
            raise ValueError(f"{name}: expected {n} tensors (one per param), got {len(lst)}")
    if n == 0:
        return
    device = lists[0][0].device
    for lst, name in zip(lists, names):
        ok = ([t.dtype for t in lst] == dtypes and [t.numel() for t in lst] == numels
              and all([t.device == device for t in lst]) and all([t.is_contiguous() for t in lst]))
        if ok and all([d in TL_DTYPE for d in set(dtypes)]):
            continue
        for i, t in enumerate(lst):
            if t.dtype not in TL_DTYPE:
                raise TypeError(f"{name}[{i}]: expected float32, float16 or bfloat16, got {t.dtype}")
            if t.dtype != dtypes[i] or t.numel() != numels[i]:
                raise ValueError(f"{name}[{i}]: expected {dtypes[i]} with {numels[i]} elements like "
                                 f"{names[0]}[{i}], got {t.dtype} with {t.numel()}")
            if t.device != device:
                raise ValueError(f"{name}[{i}]: expected a tensor on {device}, got {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}]: expected a contiguous tensor (the op layer falls back for "
                                 "non-contiguous ones)")


def _groups(lists, device, chunk, names):
    """Checks `lists` (equal-length lists whose element i share dtype and numel) and returns the launches
    (list of _Group) covering every non-empty tensor, and the total chunk count. Cached by addresses, numels
    and dtypes: exactly what the table holds."""
    dtypes, numels, ptrs = _describe(lists)
    _check_lists(lists, names, dtypes, numels)
    key = (len(lists), device, chunk, tuple(dtypes), tuple(numels), *(tuple(p) for p in ptrs))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit

    by_group = collections.defaultdict(list)
    for i, (dtype, numel) in enumerate(zip(dtypes, numels)):
        if numel:
            addrs = [p[i] for p in ptrs]
            by_group[(dtype, all(a % 16 == 0 for a in addrs))].append((numel, addrs))
    sections, layout, total_chunks = [], [], 0
    for (dtype, aligned), members in by_group.items():
        numels = torch.tensor([m[0] for m in members], dtype=torch.int64)
        counts = (numels + chunk - 1) // chunk
        n_chunks = int(counts.sum())
        chunk_tensor = torch.repeat_interleave(torch.arange(len(members)), counts)
        first_chunk = torch.cumsum(counts, 0) - counts
        chunk_start = (torch.arange(n_chunks) - first_chunk[chunk_tensor]) * chunk
        addrs = torch.tensor([m[1] for m in members], dtype=torch.int64).t().reshape(-1)
        sections.append(torch.cat([addrs, numels, chunk_tensor, chunk_start]))
        layout.append((dtype, aligned, len(members), n_chunks, total_chunks))
        total_chunks += n_chunks

    table = torch.cat(sections) if sections else torch.empty(0, dtype=torch.int64)
    if device.type == "cuda":
        # Pinned + non_blocking: an async H2D copy, no host sync (the caching host allocator keeps the pinned
        # buffer alive until the copy has run).
        table = table.pin_memory().to(device, non_blocking=True)
    groups, offset = [], 0
    for (dtype, aligned, n_tensors, n_chunks, partial_offset), section in zip(layout, sections):
        example = torch.empty(0, dtype=dtype, device=device)
        groups.append(_Group(table[offset:offset + section.numel()], n_tensors, n_chunks, example, aligned,
                             partial_offset))
        offset += section.numel()
    result = (groups, total_chunks)
    _TABLE_CACHE[key] = result
    while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return result


def _check_scalar(t, name, device):
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a float32 tensor with 1 element on {device}, "
                         f"got {type(t).__name__}")
    if t.numel() != 1 or t.dtype != torch.float32 or t.device != device:
        raise ValueError(f"{name}: expected a float32 tensor with 1 element on {device}, got {t.dtype} with "
                         f"{t.numel()} elements on {t.device}")


def _check_lr_tensor(t, device):
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype not in (torch.float32, torch.float64) \
            or t.device != device:
        got = (f"{t.dtype} with {t.numel()} elements on {t.device}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"lr_tensor: expected None or a float32/float64 tensor with 1 element on {device}, "
                         f"got {got}")


def _scalar_device(grads, *scalars):
    """The device of the work: the tensors', or the scalars' when the list is empty."""
    if grads:
        return grads[0].device
    return next(s.device for s in scalars if s is not None)


# ----------------------------------------------------------------------------------------------------------
# Public launchers
# ----------------------------------------------------------------------------------------------------------


def unscale_check_norm(grads, inv_scale, found_inf, norm_type, write_back):
    """Unscale, inf/nan check and total norm in one pass over `grads`.

    grads: list of contiguous float32/float16/bfloat16 tensors (mixed, any numel incl. 0) on one device.
    inv_scale, found_inf: float32 tensors with 1 element. found_inf is set to 1.0 if any element of any grad
    is inf or nan, never reset. norm_type: 2.0, inf, or 0.0 for no norm. write_back: replace each grad by
    grad * inv_scale (fp32 math, rounded to the grad's dtype); else only read.
    Returns a new 0-dim float32 tensor: the norm of grad * inv_scale over all grads (0.0 for norm_type 0;
    non-finite when a non-finite is present).
    """
    norm = {0.0: _NORM_NONE, 2.0: _NORM_L2, float("inf"): _NORM_INF}.get(float(norm_type))
    if norm is None:
        raise ValueError(f"norm_type: expected 2.0, inf or 0.0 (no norm), got {norm_type}")
    grads = list(grads)
    device = _scalar_device(grads, inv_scale, found_inf)
    _check_scalar(inv_scale, "inv_scale", device)
    _check_scalar(found_inf, "found_inf", device)
    chunk, block, warps = _UNSCALE_CFG.get(device.type, _UNSCALE_CFG["cuda"])
    groups, total_chunks = _groups([grads], device, chunk, ["grads"])
    out = torch.empty((), dtype=torch.float32, device=device)
    n_partials = max(total_chunks, 1) if norm != _NORM_NONE else 1
    partials = torch.empty(n_partials, dtype=torch.float32, device=device)
    for g in groups:
        if norm != _NORM_NONE:
            part = partials[g.partial_offset:g.partial_offset + g.n_chunks]
        else:
            part = partials
        _unscale_check_norm_kernel[(g.n_chunks,)](
            g.table, g.n_tensors, g.n_chunks, part, inv_scale, found_inf, g.example,
            NORM=norm, WRITE_BACK=bool(write_back), ALIGNED=g.aligned, CHUNK=chunk, BLOCK=block,
            num_warps=warps)
    if norm == _NORM_NONE:
        out.zero_()
    else:
        _norm_finish_kernel[(1,)](partials, total_chunks, out, NORM=norm,
                                  BLOCK=_FINISH_BLOCK.get(device.type, 4096), num_warps=4)
    return out


def _split_beta(beta):
    """(hi, lo) fp32 pair with hi + lo == beta to ~1e-15: a Python double carried into a kernel as two fp32
    arguments (the GPU passes Python floats as fp32)."""
    hi = struct.unpack("f", struct.pack("f", beta))[0]
    return hi, beta - hi


def fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize,
                 grad_factor, found_inf, lr_tensor=None):
    """torch.optim.AdamW's update over all params in one launch per dtype group, in place.

    params, grads, exp_avgs, exp_avg_sqs: equal-length lists; element i of each has the same shape and dtype
    (float32/float16/bfloat16), contiguous. step: float32 1-element tensor, the step count before this
    update; incremented on the device when the update happens. grad_factor: None or float32 1-element tensor
    multiplying every grad (grads are not modified). found_inf: None or float32 1-element tensor; nonzero ->
    nothing changes (params, states, step). lr_tensor: None or a float32/float64 1-element tensor on the
    params' device whose value, loaded by the kernel (so a CUDA graph replays its current value), replaces lr.
    Math in fp32 per element:
        g = grad * grad_factor (negated if maximize); t = step + 1; p *= 1 - lr * weight_decay
        m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    lr, beta1, beta2, eps, weight_decay = (float(v) for v in (lr, beta1, beta2, eps, weight_decay))
    lists = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    device = _scalar_device(lists[0], step)
    _check_scalar(step, "step", device)
    _check_scalar(grad_factor, "grad_factor", device)
    _check_scalar(found_inf, "found_inf", device)
    _check_lr_tensor(lr_tensor, device)
    chunk, block, warps = _OPTIM_CFG.get(device.type, _OPTIM_CFG["cuda"])
    groups, _ = _groups(lists, device, chunk, ["params", "grads", "exp_avgs", "exp_avg_sqs"])
    b1_hi, b1_lo = _split_beta(beta1)
    b2_hi, b2_lo = _split_beta(beta2)
    for g in groups:
        _adamw_kernel[(g.n_chunks,)](
            g.table, g.n_tensors, g.n_chunks, g.example, step,
            grad_factor if grad_factor is not None else step, found_inf if found_inf is not None else step,
            lr_tensor if lr_tensor is not None else step,
            lr, 1.0 - lr * weight_decay, weight_decay, b1_hi, b1_lo, 1.0 - beta1, beta2, b2_hi, b2_lo,
            1.0 - beta2, eps, HAS_FACTOR=grad_factor is not None, HAS_FOUND_INF=found_inf is not None,
            HAS_LR_TENSOR=lr_tensor is not None, MAXIMIZE=bool(maximize), ALIGNED=g.aligned, CHUNK=chunk,
            BLOCK=block, num_warps=warps)
    _step_increment_kernel[(1,)](step, found_inf if found_inf is not None else step,
                                 HAS_FOUND_INF=found_inf is not None, num_warps=1)


def fused_sgd_(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov, weight_decay,
               maximize, grad_factor, found_inf, lr_tensor=None):
    """torch.optim.SGD's update over all params in one launch per dtype group, in place.

    params, grads: equal-length lists, element i of each with the same shape and dtype, contiguous.
    momentum_buffers: [] when momentum == 0, else one per param (its dtype). step: float32 1-element tensor,
    the step count before this update (0: buffers uninitialised, torch's first step sets buf = g);
    incremented on the device when the update happens. grad_factor, found_inf, lr_tensor: as in fused_adamw_.
        g = grad * grad_factor (negated if maximize); g += weight_decay * p
        buf = g (first step) or momentum * buf + (1 - dampening) * g; g = g + momentum * buf (nesterov) or buf
        p -= lr * g
    """
    lr, momentum, dampening, weight_decay = (float(v) for v in (lr, momentum, dampening, weight_decay))
    has_momentum = momentum != 0
    lists = [list(params), list(grads)]
    names = ["params", "grads"]
    if has_momentum:
        lists.append(list(momentum_buffers))
        names.append("momentum_buffers")
    elif len(momentum_buffers):
        raise ValueError(f"momentum_buffers: expected [] with momentum == 0, "
                         f"got {len(momentum_buffers)} tensors")
    device = _scalar_device(lists[0], step)
    _check_scalar(step, "step", device)
    _check_scalar(grad_factor, "grad_factor", device)
    _check_scalar(found_inf, "found_inf", device)
    _check_lr_tensor(lr_tensor, device)
    chunk, block, warps = _OPTIM_CFG.get(device.type, _OPTIM_CFG["cuda"])
    groups, _ = _groups(lists, device, chunk, names)
    for g in groups:
        _sgd_kernel[(g.n_chunks,)](
            g.table, g.n_tensors, g.n_chunks, g.example, step,
            grad_factor if grad_factor is not None else step, found_inf if found_inf is not None else step,
            lr_tensor if lr_tensor is not None else step, lr, weight_decay, momentum, 1.0 - dampening,
            HAS_FACTOR=grad_factor is not None, HAS_FOUND_INF=found_inf is not None,
            HAS_LR_TENSOR=lr_tensor is not None, HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_momentum,
            NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), ALIGNED=g.aligned, DEPTH=len(lists),
            CHUNK=chunk, BLOCK=block, num_warps=warps)
    _step_increment_kernel[(1,)](step, found_inf if found_inf is not None else step,
                                 HAS_FOUND_INF=found_inf is not None, num_warps=1)
