"""The 2:4 forward through PyTorch's semi-structured kernels (effikern/ops/semi_structured.py): the GPU path
against float64, the compressed-weight cache, and the gate and report that choose it (those run on CPU)."""

import pytest
import torch
import torch.nn.functional as F
from backend_util import device_for, skip_unavailable
from oracle import assert_matches
from sparse_util import check_all, random_weight

import effikern


def _skip_without_semi_structured(x, n, k):
    from effikern.ops import semi_structured

    if not semi_structured.usable(x, "2:4", n, k):
        pytest.skip("neither of torch's 2:4 kernels runs on this GPU (the 2:4 forward falls back to CSR)")


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_of_four_semi_structured_path(dtype):
    """128 x 256 (out_features a multiple of 64, in_features of 128; no other shape here is): the 2:4 forward runs
    torch's semi-structured kernel, the backward the cuda backend's CSR kernels. Smaller sizes and fp32 stay on CSR."""
    from effikern.ops import semi_structured

    device = device_for("cuda")
    skip_unavailable("cuda", device)
    for d, n, k, fmt in ((torch.float32, 128, 256, "2:4"), (dtype, 96, 256, "2:4"), (dtype, 128, 192, "2:4"),
                         (dtype, 128, 256, "unstructured")):
        assert not semi_structured.usable(torch.empty(1, k, dtype=d, device=device), fmt, n, k)
    sw, dense = random_weight("2:4", 128, 256, 0.5, dtype, device)
    x = torch.randn(2, 3, 256, device=device).to(dtype)
    _skip_without_semi_structured(x, 128, 256)
    bias, gy = torch.randn(128, device=device).to(dtype), torch.randn(2, 3, 128, device=device).to(dtype)
    check_all("cuda", sw, dense, x, bias, gy)
    assert semi_structured.CACHE.get(sw.values) is not None, "the forward did not take the semi-structured path"


@pytest.mark.gpu
def test_two_of_four_compressed_weight_cached_until_values_change():
    """torch's 2:4 kernel runs on W compressed once per values tensor: a second forward, eager or through the
    registered op (as a torch.compile graph calls it), reuses it; an in-place change of values (an optimizer step's
    kind of write) makes the next forward compress again and compute with the new values."""
    from effikern.ops import semi_structured

    dtype = torch.float16
    sw, dense = random_weight("2:4", 128, 256, 0.5, dtype, "cuda")
    x = torch.randn(2, 3, 256, device="cuda").to(dtype)
    _skip_without_semi_structured(x, 128, 256)
    with effikern.set_backend("auto"):  # any choice but torch takes torch's 2:4 kernel; the forward needs no build
        y = effikern.functional.sparse_linear(x, sw)
        entry = semi_structured.CACHE.get(sw.values)
        assert entry is not None
        y_op = torch.ops.effikern.sparse_linear(x, sw.values, sw.crow, sw.col, sw.row, sw.t_crow, sw.t_row, sw.t_perm,
                                                sw.value_mask, None, "2:4", 128, 256)
        assert semi_structured.CACHE.get(sw.values) is entry
        with torch.no_grad():
            sw.values.mul_(2)
        y_doubled = effikern.functional.sparse_linear(x, sw)
        assert semi_structured.CACHE.get(sw.values) is not entry
    truth = F.linear(x.double(), dense)
    assert_matches("y", y, truth, F.linear(x, dense.to(dtype)))
    assert_matches("y through the op", y_op, truth, F.linear(x, dense.to(dtype)))
    assert_matches("y after values *= 2", y_doubled, 2 * truth, F.linear(x, (2 * dense).to(dtype)))


@pytest.mark.gpu
def test_two_of_four_semi_structured_in_a_cuda_graph():
    """The 2:4 forward captures in a CUDA graph (no host sync on its way) and compresses W inside the graph rather
    than reading the cached copy, so a replay after an in-place change of values computes with the new values."""
    dtype = torch.float16
    sw, dense = random_weight("2:4", 128, 256, 0.5, dtype, "cuda")
    x = torch.randn(2, 3, 256, device="cuda").to(dtype)
    _skip_without_semi_structured(x, 128, 256)
    with effikern.set_backend("auto"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream before capture, as torch.cuda.graph's docs advise
            effikern.functional.sparse_linear(x, sw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = effikern.functional.sparse_linear(x, sw)
    truth = F.linear(x.double(), dense)
    graph.replay()
    assert_matches("y replayed", y, truth, F.linear(x, dense.to(dtype)))
    with torch.no_grad():
        sw.values.mul_(2)
    graph.replay()
    assert_matches("y replayed after values *= 2", y, 2 * truth, F.linear(x, (2 * dense).to(dtype)))


def test_semi_structured_weight_cache():
    """The compressed 2:4 weight is built once per values tensor, in the values' dtype, and again only when values
    change in place or are swapped or the pattern arrays change; a temporary values tensor (autocast's cast) leaves
    nothing behind. On CPU, with a stand-in for torch's 2:4 class."""
    import gc

    from effikern.ops.semi_structured import CACHE, compressed_weight

    class Packed:
        built = []

        @classmethod
        def from_dense(cls, dense):
            cls.built.append(dense)
            return dense.clone()

    sw, dense = random_weight("2:4", 8, 16, 0.5, torch.float16, "cpu")

    def packed(values=None):
        return compressed_weight(Packed, sw.values if values is None else values, sw.crow, sw.col, 8, 16)

    w = packed()
    assert w.dtype == torch.float16 and torch.equal(w, dense.half())
    assert packed() is w and len(Packed.built) == 1
    with torch.no_grad():
        sw.values.mul_(2)
    assert torch.equal(packed(), 2 * dense.half()) and len(Packed.built) == 2
    sw.values.data = sw.values.detach().clone() / 2  # same tensor, new memory (no version bump)
    assert torch.equal(packed(), dense.half()) and len(Packed.built) == 3
    sw.crow = sw.crow.clone()  # a new pattern array
    packed()
    assert len(Packed.built) == 4 and packed() is packed()
    entries = len(CACHE)
    packed(sw.values.float().half())
    gc.collect()
    assert len(Packed.built) == 5 and len(CACHE) == entries


def test_semi_structured_gate():
    """torch's 2:4 kernel only for CUDA tensors, on a GPU one of its kernels runs on: cuSPARSELt on compute
    capability 8.0 and later; CUTLASS (torch built without cuSPARSELt, or _FORCE_CUTLASS set) on 8.x only."""
    from effikern.ops.semi_structured import backend_for, usable

    x = torch.randn(2, 256, dtype=torch.float16)
    assert not usable(x, "2:4", 128, 256)
    assert not usable(x.to("meta"), "2:4", 128, 256)
    assert backend_for((8, 0), True, False) == "cusparselt"
    assert backend_for((9, 0), True, False) == "cusparselt"
    assert backend_for((8, 6), False, False) == "cutlass"
    assert backend_for((8, 0), True, True) == "cutlass"
    assert backend_for((9, 0), False, False) is None
    assert backend_for((9, 0), True, True) is None
    assert backend_for((7, 5), True, False) is None


def test_semi_structured_path_is_reported(monkeypatch):
    """What info and the benchmark rows print for a 2:4 forward: torch's kernel only where the gate lets it run,
    otherwise the CSR kernels with the reason."""
    from effikern.ops import semi_structured

    class Kernel:
        pass

    monkeypatch.setattr(semi_structured, "kernel_class", lambda device: Kernel)
    assert semi_structured.path("cuda", torch.float16, 128, 256) == "torch 2:4 kernel (Kernel)"
    assert "CUDA only" in semi_structured.path("cpu", torch.float16, 128, 256)
    assert "fp16/bf16" in semi_structured.path("cuda", torch.float32, 128, 256)
    assert "% 128" in semi_structured.path("cuda", torch.bfloat16, 128, 200)
    monkeypatch.setattr(semi_structured, "kernel_class", lambda device: None)
    assert "no torch 2:4 kernel" in semi_structured.path("cuda", torch.float16, 128, 256)


def test_semi_structured_class_reads_torch_attributes_guarded(monkeypatch):
    """The kernel class from torch's flags, with a stand-in for the GPU's compute capability; a torch without
    cuSPARSELt's module or the 2:4 classes counts as having none of them (no AttributeError)."""
    import types

    from effikern.ops.semi_structured import kernel_class

    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", False)
    assert kernel_class("cuda") is torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)
    assert kernel_class("cuda") is None
    capability[0] = (8, 0)
    assert kernel_class("cuda") is torch.sparse.SparseSemiStructuredTensorCUTLASS
    monkeypatch.setattr(torch, "backends", types.SimpleNamespace())  # a torch without torch.backends.cusparselt
    monkeypatch.delattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS")
    assert kernel_class("cuda") is torch.sparse.SparseSemiStructuredTensorCUTLASS
    capability[0] = (9, 0)
    assert kernel_class("cuda") is None
    capability[0] = (8, 0)
    monkeypatch.delattr(torch.sparse, "SparseSemiStructuredTensorCUTLASS")
    assert kernel_class("cuda") is None
