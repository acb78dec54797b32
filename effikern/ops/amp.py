"""Multi-tensor ops behind loss scaling: ``torch.ops.effikern.unscale_check_norm``, ``fused_adamw_``,
``fused_sgd_``.

The contract every backend implements (``torch`` reference here, ``cpp`` in csrc/cpu/amp_cpu.cpp, ``triton``
in kernels/amp.py, ``cuda`` in csrc/cuda/amp_*):

``unscale_check_norm(grads, inv_scale, found_inf, norm_type, write_back) -> norm``
    grads: list of N tensors (N >= 0, any shapes, float32/float16/bfloat16 mixed, one device); inv_scale,
    found_inf: float32 1-element tensors. With ``write_back`` every grad becomes grad * inv_scale (fp32 math,
    rounded to its dtype), else grads are only read. Sets found_inf to 1.0 (never resets it) when any value
    v = grad * inv_scale is inf or nan, v taken as the grad holds it afterwards with ``write_back`` (rounded to its
    dtype: an fp16 product past 65504 counts) and in fp32 without. Returns a new 0-dim float32 tensor: the norm
    of all those v together (norm_type 2.0: Euclidean; inf: max |.|; 0.0: not computed, returns 0), of v in fp32
    or as stored (backends may differ by that one rounding per element); whenever found_inf is set by this call it
    is nan if some v is nan, else inf (as torch's norms).

``fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize,
grad_factor, found_inf, lr_tensor=None)``
    torch.optim.AdamW's update with g = grads[i] * grad_factor; ``step`` (float32, 1 element, shared by the
    list) counts updates done before this one and is incremented on the device. Nothing changes (step
    included) when found_inf is nonzero: no host sync, which is what makes a scaled step capturable in a CUDA
    graph.

``fused_sgd_(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov, weight_decay, maximize,
grad_factor, found_inf, lr_tensor=None)``
    torch.optim.SGD's update; momentum_buffers is [] when momentum == 0; step == 0 means the buffers are
    uninitialised (the first update sets buf = g, as torch).

``lr_tensor``: None, or a float32/float64 tensor with 1 element (shape [] or [1]) on the params' device
that replaces ``lr`` (then ignored): every backend reads its value when the update runs, on the device for
the GPU backends. A float lr is baked into the launch, so a CUDA graph replays the value it was captured
with; a tensor lr is what an LR scheduler can change between replays (``lr_tensor.fill_(new)``: torch's
schedulers do that to a tensor lr), as torch's capturable optimizers take it. Every use of lr follows it,
AdamW's decay p *= 1 - lr * weight_decay included.

Non-contiguous tensors, the same on every backend: where a param, its grad and its state are dense with the same
strides (a channels_last conv weight: autograd gives its grad the param's layout, and the optimizers allocate
state with ``preserve_format``), the backend gets flat views of their storage, so the update runs in place at no
extra cost. Otherwise (a sliced or transposed ``.grad``; a documented fallback) the op hands the backend contiguous
copies and copies the result back into the originals afterwards (only tensors the op writes), one more read and
write of those tensors.

Mixed dtypes: every backend takes mixed lists. Under ``auto`` the backend is chosen per dtype, so a mixed list
may be split into one call per backend; the norms are then combined on the device (sqrt of the sum of squares,
or the max) and the shared ``step`` is incremented once.

Under ``auto``, where no effikern kernel was measured faster (``torch`` is picked: a GPU until one is measured, a CPU
class or dtype not measured), the ops run PyTorch's own fused optimizer and foreach kernels with this contract kept
(ops/amp_torch_fused.py), not the slow reference; ``set_backend("torch")`` runs the reference.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _ext, backends
from . import _eager, amp_torch_fused
from ._device import on_device_of

OPS = ("unscale_check_norm", "fused_adamw", "fused_sgd")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORM_TYPES = (0.0, 2.0, math.inf)


# --- argument checks ------------------------------------------------------------------------------------

def _check_list(tensors, name: str, device=None) -> torch.device:
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    # Fast path, one set comprehension over the list (a model's grads are ~1000 tensors and this runs every step;
    # the loop below took 0.5 ms there): when they all agree and are valid, done; else the loop names the culprit.
    try:
        kinds = {(t.layout, t.dtype, t.device) for t in tensors if isinstance(t, torch.Tensor)}
    except TypeError:  # an unhashable device: let the loop report
        kinds = set()
    if len(kinds) == 1:
        layout, dtype, dev = next(iter(kinds))
        valid = layout == torch.strided and dtype in DTYPES and (device is None or dev == device)
        if valid and all(isinstance(t, torch.Tensor) for t in tensors):
            return dev
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise ValueError(f"{name}[{i}] must be a dense (strided) tensor, got layout {t.layout}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}[{i}] must have dtype float32, float16 or bfloat16, got "
                            f"{str(t.dtype).replace('torch.', '')}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{name}[{i}] must be on {device} like the other tensors, got {t.device}")
    return device


def _check_scalar_tensor(t, name: str, device, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a float32 tensor with 1 element, got {type(t).__name__}")
    if t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{name} must be a float32 tensor with 1 element, got dtype "
                         f"{str(t.dtype).replace('torch.', '')} and shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on the tensors' device {device}, got {t.device}")


def _check_matching(ref: Sequence[torch.Tensor], ref_name: str, others: Dict[str, Sequence[torch.Tensor]]):
    for name, lst in others.items():
        if len(lst) != len(ref):
            raise ValueError(f"{name} must have one tensor per tensor of {ref_name} ({len(ref)}), "
                             f"got {len(lst)}")
        for i, (a, b) in enumerate(zip(ref, lst)):
            if a.shape != b.shape:
                raise ValueError(f"{name}[{i}] must have the shape of {ref_name}[{i}] {tuple(a.shape)}, "
                                 f"got {tuple(b.shape)}")
            if a.dtype != b.dtype:
                raise TypeError(f"{name}[{i}] must have the dtype of {ref_name}[{i}] ({a.dtype}), "
                                f"got {b.dtype}")


def _check_lr_tensor(t, device) -> None:
    """lr_tensor: None or a float32/float64 tensor with 1 element on the params' device (its value is not
    checked: that would read it on the host)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lr_tensor must be None or a float32/float64 tensor with 1 element, got "
                        f"{type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64) or t.numel() != 1:
        raise ValueError(f"lr_tensor must be a float32 or float64 tensor with 1 element, got dtype "
                         f"{str(t.dtype).replace('torch.', '')} and shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"lr_tensor must be on the tensors' device {device}, got {t.device}")


def _check_float(value, name: str, low=None, high=None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


def check_unscale_args(grads, inv_scale, found_inf, norm_type, write_back) -> torch.device:
    device = _check_list(grads, "grads")
    device = device if device is not None else getattr(inv_scale, "device", None)
    _check_scalar_tensor(inv_scale, "inv_scale", device)
    _check_scalar_tensor(found_inf, "found_inf", device)
    if norm_type not in NORM_TYPES:
        raise ValueError(f"norm_type must be 2.0, inf or 0.0 (no norm), got {norm_type!r}")
    if not isinstance(write_back, bool):
        raise TypeError(f"write_back must be a bool, got {write_back!r}")
    return device


def check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                     grad_factor, found_inf, lr_tensor=None) -> torch.device:
    device = _check_list(params, "params")
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        _check_list(lst, name, device)
    _check_matching(params, "params", {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs})
    device = device if device is not None else getattr(step, "device", None)
    _check_scalar_tensor(step, "step", device)
    _check_float(lr, "lr", 0.0)
    _check_float(beta1, "beta1", 0.0, 1.0)
    _check_float(beta2, "beta2", 0.0, 1.0)
    if beta1 == 1.0 or beta2 == 1.0:
        raise ValueError(f"beta1 and beta2 must be < 1 (the bias correction divides by 1 - beta^t), got "
                         f"{(beta1, beta2)}")
    _check_float(eps, "eps", 0.0)
    _check_float(weight_decay, "weight_decay", 0.0)
    _check_scalar_tensor(grad_factor, "grad_factor", device, optional=True)
    _check_scalar_tensor(found_inf, "found_inf", device, optional=True)
    _check_lr_tensor(lr_tensor, device)
    return device


def check_sgd_args(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov, weight_decay,
                   grad_factor, found_inf, lr_tensor=None) -> torch.device:
    device = _check_list(params, "params")
    _check_list(grads, "grads", device)
    _check_matching(params, "params", {"grads": grads})
    _check_float(momentum, "momentum", 0.0)
    if momentum != 0.0:
        _check_list(momentum_buffers, "momentum_buffers", device)
        _check_matching(params, "params", {"momentum_buffers": momentum_buffers})
    elif len(momentum_buffers) != 0:
        raise ValueError(f"momentum_buffers must be empty when momentum == 0, got {len(momentum_buffers)}")
    device = device if device is not None else getattr(step, "device", None)
    _check_scalar_tensor(step, "step", device)
    _check_float(lr, "lr", 0.0)
    _check_float(dampening, "dampening")
    _check_float(weight_decay, "weight_decay", 0.0)
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    _check_scalar_tensor(grad_factor, "grad_factor", device, optional=True)
    _check_scalar_tensor(found_inf, "found_inf", device, optional=True)
    _check_lr_tensor(lr_tensor, device)
    return device


# --- the torch reference backend ---------------------------------------------------------------------------
# Written for clarity, not speed: fp32 copies of everything, then the formula with foreach ops, then the
# results copied back where found_inf is 0 (torch.where on the device: no host sync, like the kernels).

def _f32(tensors):
    return [t.float() for t in tensors]


def reference_unscale_check_norm(grads, inv_scale, found_inf, norm_type, write_back):
    """The ``torch`` backend of unscale_check_norm (contract in the module docstring)."""
    norm = torch.zeros((), dtype=torch.float32, device=inv_scale.device)
    if not grads:
        return norm
    unscaled = torch._foreach_mul(_f32(grads), inv_scale.reshape(()))
    if write_back:
        # Checked (and measured) is what the gradients hold afterwards: the products rounded to their dtypes, so an
        # fp16 product past 65504 (a scale below 1) is an overflow, not a silent inf in the gradient.
        torch._foreach_copy_(list(grads), unscaled)
        unscaled = [u if g.dtype == torch.float32 else g.float() for u, g in zip(unscaled, grads)]
    # torch's own check kernel, on the fp32 values multiplied by exactly 1: non-finite iff the gradient was or the
    # product overflowed.
    checked = torch.zeros((), dtype=torch.float32, device=found_inf.device)
    torch._amp_foreach_non_finite_check_and_unscale_(unscaled, checked, torch.ones_like(checked))
    found_inf.copy_(torch.maximum(found_inf, checked.reshape(found_inf.shape)))
    nonempty = [u for u in unscaled if u.numel()]  # the inf-norm of an empty tensor is an error in torch
    if norm_type != 0.0 and nonempty:
        per_tensor = torch._foreach_norm(nonempty, norm_type)
        norm = torch.linalg.vector_norm(torch.stack(per_tensor), norm_type)
    return norm


def _keep_if(skip, old, new):
    """new where skip is false, old where true, for lists; skip is a 0-dim bool tensor or None."""
    return new if skip is None else [torch.where(skip, o, n) for o, n in zip(old, new)]


def _grad_f32(grads, grad_factor, maximize):
    g = _f32(grads)
    if grad_factor is not None:
        g = torch._foreach_mul(g, grad_factor.reshape(()))
    return torch._foreach_neg(g) if maximize else g


def _skip(found_inf):
    return None if found_inf is None else found_inf.reshape(()) != 0


def _device_lr(lr_tensor):
    """lr_tensor's value as a 0-dim float64 tensor where it lives: read by the ops, not on the host."""
    return lr_tensor.reshape(()).double()


def reference_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                           maximize, grad_factor, found_inf, lr_tensor=None):
    """The ``torch`` backend of fused_adamw_, written as torch.optim.AdamW's steps."""
    skip = _skip(found_inf)
    if params:
        g = _grad_f32(grads, grad_factor, maximize)
        p, m, v = _f32(params), _f32(exp_avgs), _f32(exp_avg_sqs)
        lr = lr if lr_tensor is None else _device_lr(lr_tensor)
        t = step.reshape(()).double() + 1
        step_size = (lr / (1 - beta1**t)).float()
        bc2_sqrt = torch.sqrt(1 - beta2**t).float()
        decay = 1 - lr * weight_decay  # a float, or a 0-dim tensor (_foreach_mul's tensor-scalar overload)
        p = torch._foreach_mul(p, decay if lr_tensor is None else decay.float())
        m = torch._foreach_lerp(m, g, 1 - beta1)
        v = torch._foreach_mul(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        denom = torch._foreach_div(torch._foreach_sqrt(v), bc2_sqrt)
        torch._foreach_add_(denom, eps)
        p = torch._foreach_sub(p, torch._foreach_mul(torch._foreach_div(m, denom), step_size))
        for dst, new in ((params, p), (exp_avgs, m), (exp_avg_sqs, v)):
            torch._foreach_copy_(list(dst), _keep_if(skip, _f32(dst), new))
    step.add_(1.0 if skip is None else (~skip).float())


def reference_fused_sgd_(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov,
                         weight_decay, maximize, grad_factor, found_inf, lr_tensor=None):
    """The ``torch`` backend of fused_sgd_, written as torch.optim.SGD's steps."""
    skip = _skip(found_inf)
    if params:
        p = _f32(params)
        g = _grad_f32(grads, grad_factor, maximize)
        if weight_decay != 0.0:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        if momentum != 0.0:
            first = step.reshape(()) == 0
            old = _f32(momentum_buffers)
            later = torch._foreach_add(torch._foreach_mul(old, momentum), g, alpha=1 - dampening)
            buf = [torch.where(first, gi, li) for gi, li in zip(g, later)]
            # torch keeps the buffer in the param's dtype: round it before using it, as torch does.
            buf = [b.to(t.dtype).float() for b, t in zip(buf, params)]
            torch._foreach_copy_(list(momentum_buffers), _keep_if(skip, old, buf))
            g = torch._foreach_add(g, buf, alpha=momentum) if nesterov else buf
        if lr_tensor is None:
            p = torch._foreach_add(p, g, alpha=-lr)
        else:  # alpha must be a Python number: multiply by the 0-dim tensor instead
            p = torch._foreach_sub(p, torch._foreach_mul(g, _device_lr(lr_tensor).float()))
        torch._foreach_copy_(list(params), _keep_if(skip, _f32(params), p))
    step.add_(1.0 if skip is None else (~skip).float())


# --- backends -----------------------------------------------------------------------------------------------
# Each loader returns a callable with the contract's arguments (contiguous tensors).

def _device_of(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, list) and a:
            return a[0].device
    raise ValueError("no tensor among the arguments")


def _cuda_call(name):
    fn = getattr(_ext.require("cuda"), name)

    def call(*args):
        device = _device_of(args)
        with torch.cuda.device(device):
            # The CUDA glue takes the raw stream from Python (the dwsep convention: no c10/cuda headers).
            return fn(*args, torch.cuda.current_stream(device).cuda_stream)

    return call


def _triton(name):
    def load():
        from ..kernels import amp as kernels

        return on_device_of(getattr(kernels, name), _device_of)

    return load


_LOADERS = {
    "unscale_check_norm": {
        "torch": lambda: reference_unscale_check_norm,
        "cpp": lambda: _ext.require("cpu").amp_unscale_check_norm_cpu,
        "triton": _triton("unscale_check_norm"),
        "cuda": lambda: _cuda_call("amp_unscale_check_norm_cuda"),
    },
    "fused_adamw": {
        "torch": lambda: reference_fused_adamw_,
        "cpp": lambda: _ext.require("cpu").amp_fused_adamw_cpu,
        "triton": _triton("fused_adamw_"),
        "cuda": lambda: _cuda_call("amp_fused_adamw_cuda"),
    },
    "fused_sgd": {
        "torch": lambda: reference_fused_sgd_,
        "cpp": lambda: _ext.require("cpu").amp_fused_sgd_cpu,
        "triton": _triton("fused_sgd_"),
        "cuda": lambda: _cuda_call("amp_fused_sgd_cuda"),
    },
}
_DEVICES = {"torch": ("cpu", "cuda"), "cpp": ("cpu",), "triton": ("cpu", "cuda"), "cuda": ("cuda",)}

for _op, _by_backend in _LOADERS.items():
    for _name, _load in _by_backend.items():
        backends.register(_op, _name, _DEVICES[_name], DTYPES, _load)


def _split_by_backend(op: str, device: torch.device, tensors) -> List[Tuple[str, List[int]]]:
    """[(backend, indices into tensors)]: one group when every dtype gets the same backend (the usual)."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:  # the usual case, without a Python loop over the indices
        return [(backends.choose(op, device.type, dtypes.pop()), list(range(len(tensors))))]
    chosen: Dict[torch.dtype, str] = {}
    groups: Dict[str, List[int]] = {}
    for i, t in enumerate(tensors):
        if t.dtype not in chosen:
            chosen[t.dtype] = backends.choose(op, device.type, t.dtype)
        groups.setdefault(chosen[t.dtype], []).append(i)
    return list(groups.items())


def backend_for(op: str, device: torch.device, tensors) -> str:
    """The backend (or '+'-joined backends) that runs ``op`` on these tensors: for benchmarks and tests."""
    groups = _split_by_backend(op, device, tensors)
    return "+".join(name for name, _ in groups) or backends.choose(op, device.type, torch.float32)


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill the storage range [offset, offset + numel) exactly once, in some dimension order
    (contiguous, channels_last, any permutation): then an elementwise op may run over that range as a flat array."""
    step = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != step:
            return False
        step *= size
    return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D view of a dense tensor's storage range (its elements in memory order)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class _Contiguous:
    """Contiguous stand-ins for equal-length lists, element i of each of the same shape (the op's contract).

    Element i as it is where all lists hold it contiguous; else a flat view of each (``_flat``: writes land in the
    originals, no copy) where all hold it dense with the same strides, which is how autograd lays out the grad and
    the optimizers the state of a channels_last conv weight; else contiguous copies (the documented fallback),
    copied back into the originals that the op wrote (``copy_back``)."""

    def __init__(self, *lists):
        self.originals = [list(lst) for lst in lists]
        self.lists = [list(lst) for lst in lists]
        self.copied = []  # indices i whose stand-ins are copies
        used = [lst for lst in self.lists if lst]  # an empty list (SGD's buffers without momentum) has no column
        if all(t.is_contiguous() for lst in used for t in lst):
            return  # the usual case, in one pass: 0.07 ms over 1,000 tensors against 0.45 ms for the loop below
        for i in range(len(used[0]) if used else 0):
            column = [lst[i] for lst in used]
            if all(t.is_contiguous() for t in column):
                continue
            strides = column[0].stride()
            if all(_dense(t) and t.stride() == strides for t in column):
                stand_ins = [_flat(t) for t in column]
            else:
                stand_ins = [t.contiguous() for t in column]
                self.copied.append(i)
            for lst, t in zip(used, stand_ins):
                lst[i] = t

    def copy_back(self, which: Sequence[int]):
        """Copies the stand-ins of lists ``which`` (those the op wrote) into their originals, where they are copies."""
        for k in which:
            for i in self.copied if self.originals[k] else ():
                self.originals[k][i].copy_(self.lists[k][i])


def _pick(lst, idx):
    return lst if len(idx) == len(lst) else [lst[i] for i in idx]  # idx is sorted and unique: all means lst


# --- the ops ----------------------------------------------------------------------------------------------

def _unscale_check_norm(grads, inv_scale, found_inf, norm_type, write_back):
    device = check_unscale_args(grads, inv_scale, found_inf, norm_type, write_back)
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=inv_scale.device)
    work = _Contiguous(grads)
    tensors = work.lists[0]
    norms = []
    for name, idx in _split_by_backend("unscale_check_norm", device, tensors):
        fn = implementation("unscale_check_norm", name)
        norms.append(fn(_pick(tensors, idx), inv_scale, found_inf, float(norm_type), write_back)
                     .reshape(()).float())
    if write_back:
        work.copy_back([0])
    if len(norms) == 1:
        return norms[0].clone() if norms[0]._base is not None else norms[0]
    stacked = torch.stack(norms)
    return torch.linalg.vector_norm(stacked, norm_type) if norm_type != 0.0 else stacked.sum()


@torch.library.custom_op("effikern::unscale_check_norm", mutates_args=("grads", "found_inf"))
def unscale_check_norm(grads: List[torch.Tensor], inv_scale: torch.Tensor, found_inf: torch.Tensor,
                       norm_type: float, write_back: bool) -> torch.Tensor:
    """One pass over ``grads``: inf/nan check into found_inf, optional in-place unscale, total norm."""
    return _unscale_check_norm(grads, inv_scale, found_inf, norm_type, write_back)


@unscale_check_norm.register_fake
def _(grads, inv_scale, found_inf, norm_type, write_back):
    check_unscale_args(grads, inv_scale, found_inf, norm_type, write_back)
    return torch.empty((), dtype=torch.float32, device=inv_scale.device)


def implementation(op: str, name: str):
    """The callable that runs ``op`` for backend ``name``. Under ``auto``, where ``name`` is ``torch`` (no effikern
    kernel measured faster there), PyTorch's own fused or foreach kernels instead of the reference: the reference is
    for testing, 0.05-0.40x of those (ops/amp_torch_fused.py)."""
    if name == "torch" and backends.get_backend() == "auto" and amp_torch_fused.available(op):
        return amp_torch_fused.IMPLEMENTATIONS[op]
    return backends.implementation(op, name)


def _run_update(op: str, device, lists: Sequence[List[torch.Tensor]], written: Sequence[int], step, call):
    """Runs an update op over backend groups; ``lists[0]`` are the params that pick the backend.

    With more than one group each call gets its own copy of the step count taken before the update, so the
    shared step is incremented once (on the device) however many calls there are.
    """
    work = _Contiguous(*lists)
    groups = _split_by_backend(op, device, work.lists[0]) or [(backends.choose(op, device.type,
                                                                                torch.float32), [])]
    if len(groups) == 1:
        name, idx = groups[0]
        call(implementation(op, name), work.lists, step)
    else:
        start = step.clone()
        for name, idx in groups:
            own = start.clone()
            call(implementation(op, name), [_pick(lst, idx) for lst in work.lists], own)
        step.copy_(own)
    work.copy_back(written)


def _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize,
                 grad_factor, found_inf, lr_tensor=None):
    device = check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                              grad_factor, found_inf, lr_tensor)

    def call(fn, lists, step_):
        fn(*lists, step_, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
           bool(maximize), grad_factor, found_inf, lr_tensor)

    _run_update("fused_adamw", device or step.device, [params, grads, exp_avgs, exp_avg_sqs], (0, 2, 3), step,
                call)


@torch.library.custom_op("effikern::fused_adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "step"))
def fused_adamw_(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                 exp_avg_sqs: List[torch.Tensor], step: torch.Tensor, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, maximize: bool, grad_factor: Optional[torch.Tensor],
                 found_inf: Optional[torch.Tensor], lr_tensor: Optional[torch.Tensor] = None) -> None:
    """torch.optim.AdamW's update over lists, grads times grad_factor, skipped on the device on found_inf; the
    learning rate is lr_tensor's value (read at run time) when given, else lr."""
    _fused_adamw(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize,
                 grad_factor, found_inf, lr_tensor)


@fused_adamw_.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay, maximize, grad_factor,
      found_inf, lr_tensor=None):
    check_adamw_args(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                     grad_factor, found_inf, lr_tensor)


def _fused_sgd(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov, weight_decay, maximize,
               grad_factor, found_inf, lr_tensor=None):
    device = check_sgd_args(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov,
                            weight_decay, grad_factor, found_inf, lr_tensor)
    lists = [params, grads] + ([momentum_buffers] if momentum != 0.0 else [])

    def call(fn, got, step_):
        bufs = got[2] if momentum != 0.0 else []
        fn(got[0], got[1], bufs, step_, float(lr), float(momentum), float(dampening), bool(nesterov),
           float(weight_decay), bool(maximize), grad_factor, found_inf, lr_tensor)

    _run_update("fused_sgd", device or step.device, lists, (0, 2) if momentum != 0.0 else (0,), step, call)


@torch.library.custom_op("effikern::fused_sgd_", mutates_args=("params", "momentum_buffers", "step"))
def fused_sgd_(params: List[torch.Tensor], grads: List[torch.Tensor], momentum_buffers: List[torch.Tensor],
               step: torch.Tensor, lr: float, momentum: float, dampening: float, nesterov: bool,
               weight_decay: float, maximize: bool, grad_factor: Optional[torch.Tensor],
               found_inf: Optional[torch.Tensor], lr_tensor: Optional[torch.Tensor] = None) -> None:
    """torch.optim.SGD's update over lists, grads times grad_factor, skipped on the device when found_inf; the
    learning rate is lr_tensor's value (read at run time) when given, else lr."""
    _fused_sgd(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov, weight_decay, maximize,
               grad_factor, found_inf, lr_tensor)


@fused_sgd_.register_fake
def _(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov, weight_decay, maximize,
      grad_factor, found_inf, lr_tensor=None):
    check_sgd_args(params, grads, momentum_buffers, step, lr, momentum, dampening, nesterov, weight_decay,
                   grad_factor, found_inf, lr_tensor)


# --- eager entry points ---------------------------------------------------------------------------------------
# GradScaler and effikern.optim call these once per step. In eager mode they run the op's implementation directly
# (effikern/ops/_eager.py: the dispatcher's bookkeeping for mutated tensor lists cost 0.9 ms per call for 1000
# gradients on CPU, more than the 0.6 ms kernel) and bump the version counters themselves, in one call.

def _eager_entry(op, impl, mutated: Tuple[int, ...]):
    def run(*args):
        tensors = [t for a in args if isinstance(a, (torch.Tensor, list))
                   for t in ([a] if isinstance(a, torch.Tensor) else a)]
        if _eager.must_dispatch(tensors):
            return op(*args)
        out = impl(*args)
        bumped = []
        for i in mutated:
            bumped += [args[i]] if isinstance(args[i], torch.Tensor) else list(args[i])
        torch._C._increment_version(bumped)
        return out

    run.__doc__ = f"``torch.ops.effikern.{op._name.split('::')[-1]}`` without the dispatcher in eager mode (see above)."
    return run


unscale_check_norm_eager = _eager_entry(torch.ops.effikern.unscale_check_norm.default, _unscale_check_norm, (0, 2))
fused_adamw_eager = _eager_entry(torch.ops.effikern.fused_adamw_.default, _fused_adamw, (0, 2, 3, 4))
fused_sgd_eager = _eager_entry(torch.ops.effikern.fused_sgd_.default, _fused_sgd, (0, 2, 3))
