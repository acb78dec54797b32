"""Triton kernel of ``torch.ops.effikern.distillation_loss`` (the formula: effikern/ops/distill.py).

One program per token (row of V logits), two passes over the row in BLOCK_V chunks:
  pass 1: online softmax statistics (running max, sum of exp) of student/T, teacher/T and the untempered
          student (for the CE term);
  pass 2: the KL terms p * (log p - log q), and the gradient, written once in the logits' dtype.
Every load is upcast to float32 before any arithmetic: bf16 arithmetic gives garbage in the interpreter and
float32 costs nothing extra on a memory-bound kernel.
"""

import torch
import triton
import triton.language as tl

# Chunk of the vocabulary per loop iteration. On the GPU 4096 fp32 lanes over 8 warps is 16 values a thread
# per stream (untuned: no GPU measurement yet). The interpreter runs on CPU tensors in tests only: small
# chunks keep it quick and make short test rows span several chunks, exercising the online rescaling.
_MAX_BLOCK = {"cuda": 4096, "cpu": 256}


@triton.jit
def _distill_fwd_kernel(
    s_ptr, t_ptr, y_ptr, loss_ptr, grad_ptr,
    V, inv_t, grad_soft, loss_soft, hard, ignore_index,
    HAS_TARGET: tl.constexpr, HARD: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    g_row = grad_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    counted = True
    y = -1
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        counted = y != ignore_index
    if counted:
        # Pass 1. T > 0, so max(s/T) = max(s)/T: one running max serves both student streams.
        ms = float("-inf")
        mt = float("-inf")
        ds = 0.0
        dt = 0.0
        dh = 0.0
        for j0 in range(0, V, BLOCK_V):
            cols = j0 + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            ms_new = tl.maximum(ms, tl.max(s, 0))
            mt_new = tl.maximum(mt, tl.max(t, 0))
            # A row whose logits so far are all -inf keeps a -inf max; shift by 0 then (-inf - -inf is NaN).
            ms_safe = tl.where(ms_new == float("-inf"), 0.0, ms_new)
            mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
            ds = ds * tl.exp(ms * inv_t - ms_safe * inv_t) + tl.sum(tl.exp(s * inv_t - ms_safe * inv_t), 0)
            dt = dt * tl.exp(mt * inv_t - mt_safe * inv_t) + tl.sum(tl.exp(t * inv_t - mt_safe * inv_t), 0)
            if HARD:
                dh = dh * tl.exp(ms - ms_safe) + tl.sum(tl.exp(s - ms_safe), 0)
            ms = ms_new
            mt = mt_new
        # Shift and log-sum stay separate, as in log_softmax: shift + log_sum rounded to one float would lose
        # about 2e-6 absolute at a log-sum-exp of 30.
        shift_s = ms * inv_t
        shift_t = mt * inv_t
        log_sum_s = tl.log(ds)
        log_sum_t = tl.log(dt)
        log_sum_h = 0.0
        if HARD:
            log_sum_h = tl.log(dh)

        # Pass 2.
        kl_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
        for j0 in range(0, V, BLOCK_V):
            cols = j0 + offs
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            log_q = (s * inv_t - shift_s) - log_sum_s
            log_p = (t * inv_t - shift_t) - log_sum_t
            p = tl.exp(log_p)
            # F.kl_div's convention: a term with p == 0 is 0, even where log p is -inf.
            kl_acc += p * tl.where(mask & (p > 0), log_p - log_q, 0.0)
            if WRITE_GRAD:
                g = grad_soft * (tl.exp(log_q) - p)
                if HARD:
                    g += hard * (tl.exp((s - ms) - log_sum_h) - tl.where(cols == y, 1.0, 0.0))
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        loss = loss_soft * tl.sum(kl_acc, 0)
        if HARD:
            # A target outside [0, V) reads NaN here: the loss says so instead of reading out of bounds.
            in_range = (y >= 0) & (y < V)
            s_y = tl.load(s_row + y, mask=in_range, other=float("nan")).to(tl.float32)
            loss += hard * ((ms - s_y) + log_sum_h)
        tl.store(loss_ptr + row, loss)
    else:
        tl.store(loss_ptr + row, 0.0)
        if WRITE_GRAD:
            for j0 in range(0, V, BLOCK_V):
                cols = j0 + offs
                zeros = tl.zeros([BLOCK_V], dtype=tl.float32)
                tl.store(g_row + cols, zeros.to(grad_ptr.dtype.element_ty), mask=cols < V)


def distill_fwd_triton(student, teacher, target, temperature, soft_weight, hard_weight, ignore_index,
                       compute_grad):
    """Launcher. student, teacher: [M, V] contiguous; target: [M] int64 contiguous or None.

    Returns (loss [M] float32, grad [M, V] in the logits' dtype, or an empty [0] tensor without compute_grad).
    """
    rows, vocab = student.shape
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    has_target = target is not None
    block = min(triton.next_power_of_2(vocab), _MAX_BLOCK.get(student.device.type, 4096))
    _distill_fwd_kernel[(rows,)](
        student, teacher, target if has_target else loss, loss, grad if compute_grad else student,
        vocab, 1.0 / temperature, soft_weight * temperature, soft_weight * temperature**2,
        hard_weight if has_target else 0.0, ignore_index,
        HAS_TARGET=has_target, HARD=has_target and hard_weight != 0, WRITE_GRAD=compute_grad, BLOCK_V=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return loss, grad
