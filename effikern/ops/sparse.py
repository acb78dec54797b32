"""``torch.ops.effikern.sparse_linear``: y = x W^T + b with W a pruned weight held sparse, and its gradients.

W [N, K] comes as the arrays of a :class:`effikern.sparse.SparseWeight` (format "unstructured" (CSR), "block" (BSR)
or "2:4", see ``effikern/sparse/formats.py``); x is [..., K], y [..., N] in x's dtype, accumulated in fp32
(fp64 for fp64). Backward:

- grad_x = grad_y W (``sparse_linear_grad_input``), through the transposed view of W;
- grad_values = (grad_y^T x) at the stored positions only, a sampled dense-dense product
  (``sparse_linear_grad_values``), times ``value_mask`` where stored positions are pruned (zeros inside a block, 2:4
  padding), so an optimizer step never makes a pruned weight nonzero;
- grad_bias = sum of grad_y over the tokens (fp32, then the bias dtype).

Backends (``effikern.set_backend``): ``torch`` densifies W and runs a dense matmul (the reference); ``cpp`` runs the
CSR/BSR kernels of ``csrc/cpu/sparse_cpu.cpp``; ``triton`` the kernels of ``effikern.kernels.sparse``; ``cuda`` the
``sparse_*_cuda`` functions of ``effikern._C``. The 2:4 format runs the CSR kernels of the chosen backend, except its
forward on CUDA with fp16/bf16, which uses PyTorch's own semi-structured kernel when the shape and the GPU allow it
(``effikern/ops/semi_structured.py``).
"""

import functools
import math
import types
import weakref
from typing import List, Optional

import torch

from .. import _ext, backends
from ..sparse.checks import check_index_arrays
from ..sparse.formats import FORMATS, csr_coordinates, n_panels, offset_dtype, segment_coordinates
from . import _checks, _eager, semi_structured
from ._device import on_device_of

OP = "sparse_linear"
_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_ALL_FLOAT = _HALF_AND_FLOAT + (torch.float64,)
KERNELS = ("csr_fwd", "csr_grad_input", "csr_grad_values", "bsr_fwd", "bsr_grad_input", "bsr_grad_values")
# Optional: csr_grad_input_rowwise(gy, crow, col, values, N, K) and csr_grad_values_rowwise(gy, x, crow, col), the
# CSR gradients from the forward arrays alone. A backend that has them gets them for CSR (cpp: a per-panel scatter
# and a row walk; the transposed view reads the values through a random permutation, one cache miss per nonzero on
# a CPU), and then needs none of the training arrays (row, t_crow, t_row, t_perm).
ROWWISE = "csr_grad_input_rowwise"
ROWWISE_VALUES = "csr_grad_values_rowwise"


# --- checks ---------------------------------------------------------------------------------------------

def _check_index(t, name, device, length=None, dtype=torch.int32):
    _checks.tensor(t, name, 1)
    if t.dtype != dtype:
        what = "an int32 index array" if dtype == torch.int32 else "a uint8 array of offsets within a panel"
        raise TypeError(f"{name} must be {what}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of x ({device}), got {t.device}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name} must have {length} entries, got {t.numel()}")


def _segments(fmt, major, minor, block_major=None):
    """Compressed rows of W [major, minor] (or of W^T, swapping them): block rows of ``block_major``, or for CSR
    one segment per (row, panel of 256 columns). A pointer array has this many entries plus one."""
    return math.ceil(major / block_major) if fmt == "block" else major * n_panels(minor)


def check_weight(values, crow, col, fmt, out_features, in_features, device):
    """Validates the forward arrays of the sparse weight; returns the block size (BR, BC) or None."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    _checks.tensor(values, "values")
    block = None
    if fmt == "block":
        if values.dim() != 3:
            raise ValueError(f"values of the block format must be [nnzb, BR, BC], got shape {tuple(values.shape)}")
        block = (values.shape[1], values.shape[2])
        if min(block) < 1:
            raise ValueError(f"the block size must be >= 1, got {block}")
    else:
        if values.dim() != 1:
            raise ValueError(f"values of the {fmt} format must be 1-D [nnz], got shape {tuple(values.shape)}")
        if fmt == "2:4" and in_features % 4:
            raise ValueError(f"the 2:4 format needs in_features divisible by 4, got {in_features}")
    _check_index(crow, "crow", device, _segments(fmt, out_features, in_features, block and block[0]) + 1)
    _check_index(col, "col", device, values.shape[0], offset_dtype(fmt))
    return block


def check_args(x, values, crow, col, value_mask, bias, fmt, out_features, in_features):
    """Validates the forward's arguments; returns the block size or None."""
    _checks.tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have shape [..., in_features], got a 0-D tensor")
    _checks.floating(x, "x", _ALL_FLOAT)
    block = check_weight(values, crow, col, fmt, out_features, in_features, x.device)
    _checks.same_dtype_device(x, "x", values=values, bias=bias)
    if value_mask is not None:
        _check_value_mask(value_mask, values.shape, x.device)
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have shape [..., {in_features}] (in_features of the sparse weight), got "
                         f"{tuple(x.shape)}")
    if bias is not None:
        _checks.shape(bias, "bias", (out_features,), "[out_features]")
    return block


# --- the torch reference (dense masked matmul), with the kernel interface's signatures ---------------------

def _math_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def _dense_csr(crow, col, values, n, k):
    dense = values.new_zeros(n, k, dtype=_math_dtype(values))
    return dense.index_put_(csr_coordinates(crow, col, n, k), values.to(dense.dtype))


def _dense_bsr(crow, col, values, n, k):
    br, bc = values.shape[1], values.shape[2]
    nb, kb = crow.numel() - 1, math.ceil(k / bc)
    row = torch.repeat_interleave(torch.arange(nb, device=crow.device), (crow[1:] - crow[:-1]).long(),
                                  output_size=col.numel())  # no device sync (formats.csr_coordinates)
    blocks = values.new_zeros(nb, kb, br, bc, dtype=_math_dtype(values))
    blocks.index_put_((row, col.long()), values.to(blocks.dtype))
    return blocks.permute(0, 2, 1, 3).reshape(nb * br, kb * bc)[:n, :k]


def _transpose_csr(t_crow, t_row, t_perm, values, n, k):
    """Dense W from the transposed view (so the grad_input reference exercises the transposed arrays)."""
    col, row = csr_coordinates(t_crow, t_row, k, n)
    w = values.new_zeros(n, k, dtype=_math_dtype(values))
    return w.index_put_((row, col), values[t_perm.long()].to(w.dtype))


def _transpose_bsr(t_crow, t_row, t_perm, values, n, k):
    br, bc = values.shape[1], values.shape[2]
    nb, kb = math.ceil(n / br), t_crow.numel() - 1
    bcol = torch.repeat_interleave(torch.arange(kb, device=t_crow.device), (t_crow[1:] - t_crow[:-1]).long(),
                                   output_size=t_row.numel())
    blocks = values.new_zeros(nb, kb, br, bc, dtype=_math_dtype(values))
    blocks.index_put_((t_row.long(), bcol), values[t_perm.long()].to(blocks.dtype))
    return blocks.permute(0, 2, 1, 3).reshape(nb * br, kb * bc)[:n, :k]


def _ref_linear(x, w, bias):
    y = x.to(w.dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(w.dtype)
    return y.to(x.dtype)


def _reference_kernels():
    def csr_fwd(x, crow, col, values, bias, n, k):
        return _ref_linear(x, _dense_csr(crow, col, values, n, k), bias)

    def bsr_fwd(x, crow, col, values, bias, n, k):
        return _ref_linear(x, _dense_bsr(crow, col, values, n, k), bias)

    def csr_grad_input(gy, t_crow, t_row, t_perm, values, n, k):
        return (gy.to(_math_dtype(gy)) @ _transpose_csr(t_crow, t_row, t_perm, values, n, k)).to(gy.dtype)

    def bsr_grad_input(gy, t_crow, t_row, t_perm, values, n, k):
        return (gy.to(_math_dtype(gy)) @ _transpose_bsr(t_crow, t_row, t_perm, values, n, k)).to(gy.dtype)

    def csr_grad_values(gy, x, seg, col):
        full = gy.to(_math_dtype(gy)).t() @ x.to(_math_dtype(x))
        return full[segment_coordinates(seg, col, x.shape[1])].to(gy.dtype)

    def bsr_grad_values(gy, x, row, col, values_shape):
        nnzb, br, bc = values_shape
        n, k = gy.shape[1], x.shape[1]
        nb, kb = math.ceil(n / br), math.ceil(k / bc)
        full = gy.new_zeros(nb * br, kb * bc, dtype=_math_dtype(gy))
        full[:n, :k] = gy.to(full.dtype).t() @ x.to(full.dtype)
        tiles = full.reshape(nb, br, kb, bc).permute(0, 2, 1, 3)
        return tiles[row.long(), col.long()].to(gy.dtype).reshape(nnzb, br, bc)

    return types.SimpleNamespace(**{name: fn for name, fn in locals().items() if name in KERNELS})


# --- backends -------------------------------------------------------------------------------------------
# Each loader returns a namespace with the six functions of KERNELS (signatures: docs/sparse_kernels.md).

def _load_torch():
    return _reference_kernels()


def _load_cpp():
    ext = _ext.require("cpu")
    names = KERNELS + (ROWWISE, ROWWISE_VALUES)
    found = {n: getattr(ext, f"sparse_{n}_cpu") for n in names if hasattr(ext, f"sparse_{n}_cpu")}
    # cpp has only the row-wise CSR gradients (the op layer prefers them); the transposed-view ones do not exist.
    return _partial_namespace("cpp", found, [n for n in KERNELS if n not in found])


def _load_triton():
    try:
        from ..kernels import sparse as kernels
    except ImportError as err:
        raise backends.BackendUnavailableError(
            f"the triton backend of {OP} needs effikern.kernels.sparse, which could not be imported ({err})") from err
    missing = [name for name in KERNELS if not hasattr(kernels, name)]
    return _partial_namespace("triton", {n: on_device_of(getattr(kernels, n)) for n in KERNELS if n not in missing},
                              missing)


def _load_cuda():
    ext = _ext.require("cuda")
    found = {n: getattr(ext, f"sparse_{n}_cuda") for n in KERNELS if hasattr(ext, f"sparse_{n}_cuda")}

    def with_stream(fn):  # the CUDA glue takes torch's current stream as a trailing int (as dwsep_cuda does)
        @functools.wraps(fn)
        def call(*args):
            return fn(*args, torch.cuda.current_stream(args[0].device).cuda_stream)
        # ... and launches on the current device, which must be the tensors' (cuda:1 tensors with cuda:0 current
        # failed in the glue's check): made current here, as the triton loaders and dwsep's cuda loader do.
        return on_device_of(call)

    return _partial_namespace("cuda", {n: with_stream(f) for n, f in found.items()},
                              [n for n in KERNELS if n not in found])


def _partial_namespace(backend, found, missing):
    """Kernels a backend lacks raise BackendUnavailableError when called (not at load: the others still run)."""
    def unavailable(name):
        def fail(*_args):
            raise backends.BackendUnavailableError(
                f"the {backend} backend of {OP} has no {name} kernel in this build")
        return fail

    return types.SimpleNamespace(**found, **{name: unavailable(name) for name in missing})


backends.register(OP, "torch", ("cpu", "cuda"), _ALL_FLOAT, _load_torch)
backends.register(OP, "cpp", ("cpu",), _ALL_FLOAT, _load_cpp)
backends.register(OP, "triton", ("cpu", "cuda"), _HALF_AND_FLOAT, _load_triton)
backends.register(OP, "cuda", ("cuda",), _HALF_AND_FLOAT, _load_cuda)


# --- the ops --------------------------------------------------------------------------------------------

def _flat(t, width):
    return t.reshape(-1, width).contiguous()


def _kernel_prefix(fmt):
    return "bsr" if fmt == "block" else "csr"


def _linear(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
            row: torch.Tensor, t_crow: torch.Tensor, t_row: torch.Tensor, t_perm: torch.Tensor,
            value_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], format: str,
            out_features: int, in_features: int) -> torch.Tensor:
    """y [..., N] = x [..., K] W^T + bias (module docstring). Prefer ``effikern.functional.sparse_linear``."""
    block = check_args(x, values, crow, col, value_mask, bias, format, out_features, in_features)
    # The forward reads crow and col only; the training arrays are checked when a backward is given them.
    trust_index_arrays(format, (out_features, in_features), values.shape[0], block, crow, col)
    lead = x.shape[:-1]
    x2 = _flat(x, in_features)
    if x2.shape[0] == 0:
        backends.choose(OP, x.device.type, x.dtype)  # a chosen backend that cannot run this call says so
        return x.new_empty(*lead, out_features)
    if semi_structured.usable(x, format, out_features, in_features) and backends.get_backend() != "torch":
        y = semi_structured.forward(x2, values, crow, col, bias, out_features, in_features)
    else:
        _, kernels = backends.resolve(OP, x)
        fwd = getattr(kernels, _kernel_prefix(format) + "_fwd")
        # The kernels read bias[o] at stride 1: a strided view (bias = b2[:, 0]) would add the wrong values.
        y = fwd(x2, crow, col, values.contiguous(), None if bias is None else bias.contiguous(), out_features,
                in_features)
    return y.reshape(*lead, out_features)


sparse_linear = torch.library.custom_op("effikern::sparse_linear", _linear, mutates_args=())


@sparse_linear.register_fake
def _(x, values, crow, col, row, t_crow, t_row, t_perm, value_mask, bias, format, out_features, in_features):
    check_args(x, values, crow, col, value_mask, bias, format, out_features, in_features)
    return x.new_empty(*x.shape[:-1], out_features)


def _grad_input(grad_y: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                t_crow: torch.Tensor, t_row: torch.Tensor, t_perm: torch.Tensor, format: str,
                out_features: int, in_features: int, backend: str = "") -> torch.Tensor:
    """grad_x [..., K] = grad_y [..., N] W: through the transposed view, or from the forward arrays (crow, col) on a
    backend with ``csr_grad_input_rowwise``. ``backend``: the choice to resolve under ("": the current one;
    autograd passes the forward's, as effikern.ops.dwsep's backward op explains)."""
    block = _check_grad_input(grad_y, values, crow, col, t_crow, t_row, t_perm, format, out_features, in_features)
    trust_index_arrays(format, (out_features, in_features), values.shape[0], block, crow, col, None, t_crow, t_row,
                       t_perm)
    lead = grad_y.shape[:-1]
    gy = _flat(grad_y, out_features)
    name, kernels = backends.resolve(OP, grad_y, choice=backend)  # first: an unusable choice raises, even if empty
    if gy.shape[0] == 0:
        return grad_y.new_empty(*lead, in_features)
    if format != "block" and hasattr(kernels, ROWWISE):
        gx = getattr(kernels, ROWWISE)(gy, crow, col, values.contiguous(), out_features, in_features)
    else:
        _require_training_arrays(name, format, t_perm, values.shape[0])
        fn = getattr(kernels, _kernel_prefix(format) + "_grad_input")
        gx = fn(gy, t_crow, t_row, t_perm, values.contiguous(), out_features, in_features)
    return gx.reshape(*lead, in_features)


sparse_linear_grad_input = torch.library.custom_op("effikern::sparse_linear_grad_input", _grad_input, mutates_args=())


def _require_training_arrays(backend, fmt, arr, nnz):
    """RuntimeError unless ``arr`` (a per-entry training array) is present: nnz entries."""
    if arr.numel() != nnz:
        raise RuntimeError(f"this sparse weight was built without its training arrays (row, t_crow, t_row, t_perm), "
                           f"which the {backend} backend's {fmt} backward needs (the cpp backend's CSR backward does "
                           f"not); build it again with effikern.sparse.from_dense or SparseLinear.from_linear")


def _check_grad_input(grad_y, values, crow, col, t_crow, t_row, t_perm, fmt, out_features, in_features):
    _checks.tensor(grad_y, "grad_y")
    _checks.floating(grad_y, "grad_y", _ALL_FLOAT)
    _checks.tensor(values, "values")
    _checks.same_dtype_device(grad_y, "grad_y", values=values)
    if grad_y.dim() < 1 or grad_y.shape[-1] != out_features:
        raise ValueError(f"grad_y must have shape [..., {out_features}], got {tuple(grad_y.shape)}")
    block = check_weight(values, crow, col, fmt, out_features, in_features, grad_y.device)
    # The transposed view, or nothing (all three empty: dropped; the row-wise kernels do not need it).
    dropped = t_crow.numel() == t_row.numel() == t_perm.numel() == 0
    segments = _segments(fmt, in_features, out_features, block and block[1])  # over W^T
    _check_index(t_crow, "t_crow", grad_y.device, None if dropped else segments + 1)
    _check_index(t_row, "t_row", grad_y.device, None if dropped else values.shape[0], offset_dtype(fmt))
    _check_index(t_perm, "t_perm", grad_y.device, None if dropped else values.shape[0])
    return block


@sparse_linear_grad_input.register_fake
def _(grad_y, values, crow, col, t_crow, t_row, t_perm, format, out_features, in_features, backend=""):
    _check_grad_input(grad_y, values, crow, col, t_crow, t_row, t_perm, format, out_features, in_features)
    return grad_y.new_empty(*grad_y.shape[:-1], in_features)


def _grad_values(grad_y: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, row: torch.Tensor,
                 col: torch.Tensor, value_mask: Optional[torch.Tensor], values_shape: List[int],
                 format: str, backend: str = "") -> torch.Tensor:
    """grad_values (values_shape) = (grad_y^T x) at the stored positions, times value_mask when given; from row
    (the per-entry index of the training arrays), or from crow on a backend with ``csr_grad_values_rowwise``.
    ``backend``: as for the grad_input op."""
    _check_grad_values(grad_y, x, crow, row, col, value_mask, values_shape, format)
    block = tuple(values_shape[1:]) if format == "block" else None
    trust_index_arrays(format, (grad_y.shape[-1], x.shape[-1]), values_shape[0], block, crow, col, row)
    gy = _flat(grad_y, grad_y.shape[-1])
    x2 = _flat(x, x.shape[-1])
    name, kernels = backends.resolve(OP, grad_y, choice=backend)
    if format != "block" and hasattr(kernels, ROWWISE_VALUES):
        g = getattr(kernels, ROWWISE_VALUES)(gy, x2, crow, col)
    else:
        _require_training_arrays(name, format, row, values_shape[0])
        if format == "block":
            g = kernels.bsr_grad_values(gy, x2, row, col, list(values_shape))
        else:
            g = kernels.csr_grad_values(gy, x2, row, col)
    return g if value_mask is None else g.masked_fill(~value_mask, 0)


sparse_linear_grad_values = torch.library.custom_op("effikern::sparse_linear_grad_values", _grad_values,
                                                    mutates_args=())


def _check_grad_values(grad_y, x, crow, row, col, value_mask, values_shape, fmt):
    _checks.tensor(grad_y, "grad_y")
    _checks.tensor(x, "x")
    _checks.floating(grad_y, "grad_y", _ALL_FLOAT)
    _checks.same_dtype_device(grad_y, "grad_y", x=x)
    if grad_y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"grad_y [..., N] and x [..., K] must share their leading dims, got {tuple(grad_y.shape)} "
                         f"and {tuple(x.shape)}")
    if len(values_shape) != (3 if fmt == "block" else 1):
        raise ValueError(f"values_shape {list(values_shape)} does not fit the {fmt} format")
    n, k = grad_y.shape[-1], x.shape[-1]
    _check_index(crow, "crow", x.device, _segments(fmt, n, k, fmt == "block" and values_shape[1]) + 1)
    _check_index(row, "row", x.device, values_shape[0] if row.numel() else None)  # empty: dropped
    _check_index(col, "col", x.device, values_shape[0], offset_dtype(fmt))
    if value_mask is not None:
        _check_value_mask(value_mask, values_shape, x.device)


# Index arrays whose contents passed check_index_arrays: id(crow) -> (weak reference to crow, the signatures that
# passed: format, shape, block, nnz, and each array's data pointer, version counter and length). An in-place change
# bumps the version counter shared by a tensor and its views, so the next call checks again. A plain dict on id()
# with a weak reference, not torch's WeakIdKeyDictionary: its lookup built a weak reference per call (1.2 us of the
# 2.9 us this check first cost on a 64 x 64 layer's ~26 us forward).
_CHECKED = {}
_SIGNATURES_KEPT = 8  # per crow: more means arrays changing in place call after call; keep the newest only


def _forget(key):
    return lambda _ref: _CHECKED.pop(key, None)


def trust_index_arrays(fmt, shape, nnz, block, crow, col, row=None, t_crow=None, t_row=None, t_perm=None):
    """Proves the contents of the index arrays the kernels are about to trust (effikern/sparse/checks.py) the first
    time each set is seen: O(nnz) on the arrays' device and a device sync, then a dictionary lookup per call. A
    raw ``torch.ops.effikern.sparse_linear`` call with hand-made arrays gets a ValueError naming the array instead
    of an out-of-bounds access. Inference tensors carry no version counter: their arrays are checked every call."""
    arrays = (crow, col, row, t_crow, t_row, t_perm)
    signature = [fmt, shape, block, nnz]
    try:
        for t in arrays:  # a loop, not a generator: this runs on every call (0.3 against 1.7 us)
            signature += (None, None, None) if t is None else (t.data_ptr(), t._version, t.numel())
    except RuntimeError:  # "Inference tensors do not track version counter"
        check_index_arrays(fmt, shape, nnz, block, *arrays)
        return
    signature = tuple(signature)
    key = id(crow)
    entry = _CHECKED.get(key)
    if entry is not None and entry[0]() is crow and signature in entry[1]:
        return
    if crow.is_cuda and torch.cuda.is_current_stream_capturing():
        # The check reads values back to the host, which a capture forbids (PyTorch's error would not say why).
        raise RuntimeError("effikern sparse_linear: these index arrays have not been checked yet, and checking them "
                           "needs a device sync, which CUDA-graph capture forbids; run one call with them (a warm-up) "
                           "before capturing")
    check_index_arrays(fmt, shape, nnz, block, *arrays)
    if entry is None or entry[0]() is not crow or len(entry[1]) >= _SIGNATURES_KEPT:
        entry = _CHECKED[key] = (weakref.ref(crow, _forget(key)), set())
    entry[1].add(signature)


def _check_value_mask(value_mask, values_shape, device):
    _checks.tensor(value_mask, "value_mask")
    if value_mask.dtype != torch.bool or value_mask.device != device:
        raise TypeError(f"value_mask must be a bool tensor on {device}, got {value_mask.dtype} on {value_mask.device}")
    _checks.shape(value_mask, "value_mask", tuple(values_shape), "the values' shape")


@sparse_linear_grad_values.register_fake
def _(grad_y, x, crow, row, col, value_mask, values_shape, format, backend=""):
    _check_grad_values(grad_y, x, crow, row, col, value_mask, values_shape, format)
    return grad_y.new_empty(values_shape)


def _setup_context(ctx, inputs, output):
    x, values, crow, col, row, t_crow, t_row, t_perm, value_mask, bias, fmt, n, k = inputs
    ctx.fmt, ctx.n, ctx.k = fmt, n, k
    ctx.has_bias = bias is not None
    ctx.backend = backends.get_backend()  # for the backward: see effikern.ops.dwsep._setup_context
    ctx.save_for_backward(x, values, crow, row, t_crow, t_row, t_perm, col, value_mask)


def _gradients(ctx, grad_y, grad_input, grad_values):
    """(grad_x, grad_values, grad_bias) for the inputs that need one, through the given gradient functions (the
    registered ops, or their implementations on the eager path), as autograd wants them for the 13 inputs. With
    create_graph=True (grad mode on here) through :func:`_differentiable_gradients` instead."""
    x, values, crow, row, t_crow, t_row, t_perm, col, value_mask = ctx.saved_tensors
    need_x, need_values, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[9]
    grad_y = grad_y.contiguous()
    grad_x = grad_vals = grad_bias = None
    if torch.is_grad_enabled():
        grad_x, grad_vals = _differentiable_gradients(ctx, grad_y, need_x, need_values)
    else:
        if need_x:
            grad_x = grad_input(grad_y, values, crow, col, t_crow, t_row, t_perm, ctx.fmt, ctx.n, ctx.k, ctx.backend)
        if need_values:
            grad_vals = grad_values(grad_y, x, crow, row, col, value_mask, list(values.shape), ctx.fmt, ctx.backend)
    if need_bias and ctx.has_bias:
        grad_bias = grad_y.reshape(-1, ctx.n).sum(0, dtype=_math_dtype(grad_y)).to(grad_y.dtype)
    return grad_x, grad_vals, None, None, None, None, None, None, None, grad_bias, None, None, None


def _differentiable_gradients(ctx, grad_y, need_x, need_values):
    """(grad_x, grad_values) as a graph, for a backward with create_graph=True (double backward: gradient penalties,
    higher-order derivatives): autograd through the reference (the dense W built from the values, a dense matmul),
    which PyTorch can differentiate again; the kernels' gradients carry no graph. Materializes the dense W, and is
    only taken when asked for. grad_values keeps value_mask's zeros, as the kernels' does."""
    x, values, crow, row, t_crow, t_row, t_perm, col, value_mask = ctx.saved_tensors
    wanted = [t for t, need in ((x, need_x), (values, need_values)) if need]
    if not wanted:
        return None, None
    dense = _dense_bsr if ctx.fmt == "block" else _dense_csr
    with torch.enable_grad():
        w = dense(crow, col, values, ctx.n, ctx.k)
        y = x.to(w.dtype) @ w.t()
        found = iter(torch.autograd.grad(y, wanted, grad_y.to(w.dtype), create_graph=True))
    grad_x = next(found).to(x.dtype) if need_x else None
    grad_vals = next(found).to(values.dtype) if need_values else None
    if grad_vals is not None and value_mask is not None:
        grad_vals = grad_vals.masked_fill(~value_mask, 0)
    return grad_x, grad_vals


def _backward(ctx, grad_y):
    return _gradients(ctx, grad_y, torch.ops.effikern.sparse_linear_grad_input,
                      torch.ops.effikern.sparse_linear_grad_values)


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


# The op minus the dispatcher, for plain eager calls (``functional.sparse_linear`` decides when): a custom op's
# Python autograd layer cost ~70 us per forward on CPU (94 against 23 us for a 64 x 64 weight at 4 tokens; F.linear
# takes 5), and each of its two gradient ops as much again, which small layers cannot hide.
EagerSparseLinear = _eager.op_without_dispatcher(
    "EagerSparseLinear", _linear, _setup_context,
    functools.partial(_gradients, grad_input=_grad_input, grad_values=_grad_values))
