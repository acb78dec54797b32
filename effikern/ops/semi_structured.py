"""The 2:4 format's forward on a GPU through PyTorch's own semi-structured kernels (``torch.sparse``'s 2:4 tensors).

``effikern/ops/sparse.py`` runs a 2:4 weight's forward here when :func:`usable` says one of torch's kernels runs
the call (CUDA, fp16/bf16, a GPU and torch build one of its kernels supports, out_features a multiple of 64 and
in_features of 128) and the chosen backend is not ``torch``; otherwise the chosen backend's CSR kernels run it.
The weight is compressed once per values tensor (:func:`compressed_weight`). The backward always runs the CSR
kernels. :func:`path` says which of the two runs a call, for ``python -m effikern info`` and the benchmark rows.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from ..sparse.formats import densify


def usable(x, fmt, n, k):
    """Whether torch's 2:4 kernel can run this forward: fp16/bf16 on a CUDA GPU one of its kernels runs on
    (:func:`backend_for`), and the sizes it accepts (out_features a multiple of 64 and in_features of
    128 for the CUTLASS path; smaller ones it refuses). Otherwise the CSR kernels of the chosen backend run it."""
    if fmt != "2:4" or x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if kernel_class(x.device) is None:
        return False
    return n % 64 == 0 and k % 128 == 0


def path(device, dtype, out_features: int, in_features: int) -> str:
    """Which kernel runs a 2:4 forward of this dtype and weight size on ``device`` (a non-torch backend chosen),
    and why, for ``python -m effikern info`` and the benchmark rows: torch's semi-structured kernel, or the chosen
    backend's CSR kernels."""
    device = torch.device(device)
    if device.type != "cuda":
        return "CSR kernels (torch's 2:4 kernels are CUDA only)"
    if dtype not in (torch.float16, torch.bfloat16):
        return "CSR kernels (torch's 2:4 kernels take fp16/bf16)"
    cls = kernel_class(device)
    if cls is None:
        return "CSR kernels (no torch 2:4 kernel runs on this GPU with this torch build)"
    if out_features % 64 != 0 or in_features % 128 != 0:
        return "CSR kernels (torch's 2:4 kernels need out_features % 64 == 0 and in_features % 128 == 0)"
    return f"torch 2:4 kernel ({cls.__name__})"


def backend_for(capability, cusparselt: bool, force_cutlass: bool) -> Optional[str]:
    """Which of torch's 2:4 kernels runs on a GPU of this compute capability: "cusparselt", "cutlass" or None.

    torch uses cuSPARSELt (sm80+) unless its build lacks it (``torch.backends.cusparselt.is_available()``) or
    ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set; its CUTLASS 2:4 kernels support compute capability 8.x
    only (an H100, 9.0, raises in them)."""
    if tuple(capability) < (8, 0):
        return None
    if cusparselt and not force_cutlass:
        return "cusparselt"
    return "cutlass" if capability[0] == 8 else None


def kernel_class(device):
    """torch's 2:4 tensor class whose kernels run on ``device`` (CUDA), or None. Chosen here rather than by
    ``to_sparse_semi_structured``, which picks cuSPARSELt whenever _FORCE_CUTLASS is unset, even where it is missing.
    Attributes a torch version lacks count as absent."""
    cusparselt = getattr(torch.backends, "cusparselt", None)
    base = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    name = backend_for(torch.cuda.get_device_capability(device),
                                    bool(cusparselt is not None and cusparselt.is_available()),
                                    bool(getattr(base, "_FORCE_CUTLASS", False)))
    classes = {"cusparselt": "SparseSemiStructuredTensorCUSPARSELT", "cutlass": "SparseSemiStructuredTensorCUTLASS"}
    return getattr(torch.sparse, classes[name], None) if name else None


# Compressed weights of torch's 2:4 kernels, one per values tensor. Weakly keyed (an entry goes with its tensor)
# rather than an attribute of values: a tensor's __dict__ is pickled and deep-copied with it (torch.save of the
# tensor or a module), and torch.load(weights_only=True) refuses the semi-structured class.
CACHE = WeakTensorKeyDictionary()


def compressed_weight(cls, values, crow, col, n, k):
    """W [n, k] as ``cls`` (a torch 2:4 tensor class), compressed once per values tensor and kept (half of W's
    values plus metadata) until values or the pattern change.

    Compressing per call built a dense fp32 W and compressed it on every forward: several passes over n*k
    elements, where the matmul at few tokens reads n*k/2 values once. The entry is rebuilt when values change in
    place (``values._version``: optimizer steps, ``copy_``, ``load_state_dict``), are swapped (``values.data = ...``:
    data_ptr, dtype) or the index arrays change (data_ptr, version; the entry holds them, so no other pattern's
    arrays can take their memory while it is kept). Writes through ``values.data`` (``p.data.mul_(2)``) do not bump
    ``values._version``: they go unseen, and the old W runs until the next counted change. Under autocast values are
    a fresh cast per call: a miss every call. Real tensors only: torch.compile traces the op's fake impl, and the
    compiled graph calls this with the real values (the same tensor object, so the entry is shared with eager calls).
    """
    def compress():
        # Dense W in the values' dtype: placing values is exact, so the fp32 detour only doubled its bytes.
        return cls.from_dense(densify("2:4", values.detach(), crow, col, n, k))

    if values.is_cuda and torch.cuda.is_current_stream_capturing():
        # Compressed inside the CUDA graph being captured, not cached: each replay then compresses the values it
        # finds, where a cached copy read by the graph would miss every later in-place change (an optimizer step).
        return compress()
    key = (values.data_ptr(), values._version, values.dtype, crow.data_ptr(), crow._version, col.data_ptr(),
           col._version, n, k, cls)
    entry = CACHE.get(values)
    if entry is None or entry[0] != key:
        entry = (key, compress(), crow, col)
        CACHE[values] = entry
    return entry[1]


def forward(x2, values, crow, col, bias, n, k):
    """y [M, n] = x2 [M, k] W^T + bias through torch's 2:4 kernel, on the cached compressed W."""
    w = compressed_weight(kernel_class(x2.device), values, crow, col, n, k)
    # bias added inside the matmul (its epilogue): y rounded once, as by cuBLAS and the CSR kernels (y + bias rounded
    # twice). Contiguous: torch's cuSPARSELt path hands the kernel bias.data_ptr() as it is, read at stride 1.
    return F.linear(x2, w, None if bias is None else bias.contiguous())
