"""The amp ops on PyTorch's own fused and foreach kernels, where ``auto`` has no faster effikern kernel.

Why: the ``torch`` backend of ``fused_adamw_`` / ``fused_sgd_`` (ops/amp.py) is the reference the kernels are tested
against, written for clarity with fp32 copies and ~20 foreach passes: 0.05x and 0.19x of
``torch.optim.AdamW/SGD(fused=True)`` on a ResNet-50 step (benchmarks/results/amp/, the ``effikern-torch`` rows).
Where ``auto`` keeps PyTorch (any GPU until a GPU run measures our kernels, CPU classes or dtypes not measured),
effikern.optim would run that reference. Instead the ops run what a user of ``fused=True`` runs today:
``torch._fused_adamw_`` and ``torch._fused_sgd_``, with the op's contract kept:

- grads are read only. torch's kernels write the unscaled gradient back when given ``grad_scale``; so when the op has
  a ``grad_factor``, each dtype group's grads are copied (in chunks of at most ``CHUNK_BYTES``, to bound the
  temporary memory) and the kernel runs on the copy with ``grad_scale = 1 / grad_factor`` (exact for the
  power-of-two factors of loss scaling alone; within an ulp or two of ``g * grad_factor`` with a clip coefficient
  folded in). That copy is one more read and write of the gradients.
- ``found_inf`` nonzero skips everything, ``step`` included: the kernels skip where found_inf == 1, so they get
  ``found_inf != 0`` as 0/1, and ``step`` grows by that on the device (no host sync).
- ``step`` (one shared count) is given to the kernels as ``step + 1``, the count torch's optimizers pass after
  incrementing.
- SGD's first momentum step (``step == 0``: buf = g) is a Python bool for torch's kernel. On CPU the count is read
  on the host (CPU memory: no device sync). Elsewhere reading it would sync, so with momentum the buffers are
  zeroed on the device where ``step == 0`` and the kernel runs its later-step formula, buf = momentum * 0 + g: the
  same values when dampening == 0 (up to the sign of a zero). With dampening != 0 there, the reference runs.

Tensor lr: torch's CUDA kernels read a float32 lr tensor; a float64 one is converted on the device.

``unscale_check_norm`` runs as ``torch._foreach_mul_`` (with write-back) and one ``torch._foreach_norm`` in float32,
and takes the inf/nan check from the norm: the largest |v| is non-finite exactly when some v is, and so is the
2-norm (computed for the check alone when ``norm_type`` is 0: torch's CPU inf-norm took 7x as long), which can also
overflow by itself where the sum of squares passes float32's range. Gradients that large (a norm past ~1.8e19 of
the values summed) then count as an overflow and the step is skipped, where the ``cpp`` kernel returns an inf norm
without setting found_inf. Without write-back the norm is taken of the grads as they are and multiplied by inv_scale
(the same value up to rounding). Passes over the gradients: with write-back a read and write, then a read (as
torch's GradScaler.unscale_ followed by clip_grad_norm_'s norm); without, one read.

torch's CPU ``_fused_sgd_`` leaves the vectorized blocks of fp16 and bf16 params unchanged in torch 2.13 and earlier
(pytorch/pytorch#191763, found here by tests/test_amp_ops.py): ``torch.optim.SGD(fused=True)`` silently does not
train such params. So a CPU call probes it once (:func:`cpu_half_sgd_works`) and runs those dtypes on the reference
while it is broken.
"""

import functools
from typing import Dict, List, Optional

import torch

# The largest temporary copy of gradients made at once (see the module docstring).
CHUNK_BYTES = 64 << 20

_KERNELS = {"fused_adamw": "_fused_adamw_", "fused_sgd": "_fused_sgd_", "unscale_check_norm": "_foreach_norm"}


def available(op: str) -> bool:
    """Whether this torch has the fused kernel ``op`` falls back to."""
    return op in _KERNELS and hasattr(torch, _KERNELS[op])


def describe(op: str, device_type: str, dtype: torch.dtype) -> str:
    """What ``effikern info`` prints for calls of ``op`` that run here on this device type and dtype."""
    if op == "unscale_check_norm":
        return "PyTorch's foreach kernels torch._foreach_mul_ and _foreach_norm (no effikern kernel measured faster)"
    if op == "fused_sgd" and not sgd_kernel_works(torch.device(device_type), dtype):
        return ("the torch reference: torch's CPU fused SGD does not update fp16/bf16 params in this torch "
                "(pytorch#191763), and no effikern kernel is measured faster")
    return f"PyTorch's fused kernel torch.{_KERNELS[op]} (no effikern kernel measured faster)"


def _by_dtype(tensors: List[torch.Tensor]) -> Dict[torch.dtype, List[int]]:
    groups: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


def _chunks(tensors: List[torch.Tensor], idx: List[int], limit: int):
    """idx split into runs whose tensors hold at most ``limit`` bytes together (a larger tensor is a run alone)."""
    run, size = [], 0
    for i in idx:
        nbytes = tensors[i].numel() * tensors[i].element_size()
        if run and size + nbytes > limit:
            yield run
            run, size = [], 0
        run.append(i)
        size += nbytes
    if run:
        yield run


def _groups(params, grads, grad_factor):
    """(indices, grads to hand the kernel) per dtype group and, with a grad_factor, per chunk of copies."""
    for idx in _by_dtype(params).values():
        if grad_factor is None:
            yield idx, [grads[i] for i in idx]
            continue
        for run in _chunks(grads, idx, CHUNK_BYTES):
            yield run, [grads[i].clone() for i in run]


def _scaling(grad_factor, found_inf):
    """(grad_scale, found_inf) for torch's kernels, and what to add to ``step`` afterwards (1, or 0 where found_inf
    is set: a device tensor, no sync)."""
    grad_scale = None if grad_factor is None else grad_factor.reshape(()).double().reciprocal().float()
    if found_inf is None:
        return grad_scale, None, 1.0
    flag = (found_inf.reshape(()) != 0).float()
    return grad_scale, flag, 1.0 - flag


def _lr(lr: float, lr_tensor: Optional[torch.Tensor], device: torch.device):
    if lr_tensor is None:
        return lr
    lr_tensor = lr_tensor.reshape(())
    return lr_tensor if device.type == "cpu" else lr_tensor.float()


def fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize,
                 grad_factor, found_inf, lr_tensor=None):
    """The fused_adamw_ contract (ops/amp.py) on ``torch._fused_adamw_``; lists contiguous, one device."""
    grad_scale, flag, done = _scaling(grad_factor, found_inf)
    if params:
        counts = [step.reshape(()) + 1]
        rate = _lr(lr, lr_tensor, params[0].device)
        for idx, g in _groups(params, grads, grad_factor):
            torch._fused_adamw_([params[i] for i in idx], g, [exp_avgs[i] for i in idx],
                                [exp_avg_sqs[i] for i in idx], [], counts * len(idx), lr=rate, beta1=beta1,
                                beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=maximize,
                                grad_scale=grad_scale, found_inf=flag)
    step.add_(done)


@functools.lru_cache(maxsize=None)
def cpu_half_sgd_works(dtype: torch.dtype) -> bool:
    """Whether torch's CPU ``_fused_sgd_`` updates a ``dtype`` param of 64 elements (pytorch/pytorch#191763)."""
    param = torch.zeros(64, dtype=dtype)
    torch._fused_sgd_([param], [torch.ones(64, dtype=dtype)], [], weight_decay=0.0, momentum=0.0, lr=1.0,
                      dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
    return bool((param == -1).all())


def sgd_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's ``_fused_sgd_`` updates ``dtype`` params on ``device`` (not CPU fp16/bf16 while
    pytorch/pytorch#191763 is in this torch)."""
    return device.type != "cpu" or dtype == torch.float32 or cpu_half_sgd_works(dtype)


def reads_step_on_host(device: torch.device) -> bool:
    """Whether SGD's first-step flag is read from ``step`` on the host (free for CPU memory; a sync elsewhere)."""
    return device.type == "cpu"


def fused_sgd_(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov, weight_decay, maximize,
               grad_factor, found_inf, lr_tensor=None):
    """The fused_sgd_ contract (ops/amp.py) on ``torch._fused_sgd_``; lists contiguous, one device. Runs the
    reference where the first step cannot be told without a host sync (module docstring)."""
    from .amp import reference_fused_sgd_

    device = params[0].device if params else step.device
    on_kernel = [i for i, p in enumerate(params) if sgd_kernel_works(device, p.dtype)]
    if momentum != 0.0 and not reads_step_on_host(device) and dampening != 0.0:
        on_kernel = []
    if len(on_kernel) < len(params):  # the rest on the reference, with its own copy of the count (added below)
        kernel_set = set(on_kernel)
        rest = [i for i in range(len(params)) if i not in kernel_set]
        reference_fused_sgd_([params[i] for i in rest], [grads[i] for i in rest],
                             [momentum_buffers[i] for i in rest] if momentum != 0.0 else [], step.clone(), lr,
                             momentum, dampening, nesterov, weight_decay, maximize, grad_factor, found_inf,
                             lr_tensor)
    first = False
    if on_kernel and momentum != 0.0:
        if reads_step_on_host(device):
            first = bool(step.reshape(()) == 0)
        else:  # dampening == 0 here
            unstarted = step.reshape(()) == 0
            for i in on_kernel:
                momentum_buffers[i].masked_fill_(unstarted, 0.0)
    grad_scale, flag, done = _scaling(grad_factor, found_inf)
    if on_kernel:
        rate = _lr(lr, lr_tensor, device)
        ps = [params[i] for i in on_kernel]
        bufs = [momentum_buffers[i] for i in on_kernel] if momentum != 0.0 else []
        for idx, g in _groups(ps, [grads[i] for i in on_kernel], grad_factor):
            torch._fused_sgd_([ps[i] for i in idx], g, [bufs[i] for i in idx] if bufs else [],
                              weight_decay=weight_decay, momentum=momentum, lr=rate, dampening=dampening,
                              nesterov=nesterov, maximize=maximize, is_first_step=first, grad_scale=grad_scale,
                              found_inf=flag)
    step.add_(done)


def unscale_check_norm(grads, inv_scale, found_inf, norm_type, write_back):
    """The unscale_check_norm contract (ops/amp.py) on torch's foreach kernels (module docstring); grads contiguous,
    one device. Returns the 0-dim float32 norm (0 for norm_type 0)."""
    inv = inv_scale.reshape(())
    zero = torch.zeros((), dtype=torch.float32, device=inv_scale.device)
    nonempty = [g for g in grads if g.numel()]  # the inf-norm of an empty tensor is an error in torch
    if not nonempty:
        return zero
    if write_back:
        torch._foreach_mul_(nonempty, inv)
    order = norm_type if norm_type != 0.0 else 2.0
    per_tensor = torch._foreach_norm(nonempty, order, dtype=torch.float32)
    norm = torch.linalg.vector_norm(torch.stack(per_tensor), order)
    if not write_back:
        norm = norm * inv.float()
    overflow = (~torch.isfinite(norm)).float()
    found_inf.copy_(torch.maximum(found_inf, overflow.reshape(found_inf.shape)))
    return norm if norm_type != 0.0 else zero


IMPLEMENTATIONS = {"fused_adamw": fused_adamw_, "fused_sgd": fused_sgd_, "unscale_check_norm": unscale_check_norm}
