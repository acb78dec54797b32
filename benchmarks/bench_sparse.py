"""Masked sparse matmul (``effikern.functional.sparse_linear``) against dense and torch.sparse, per pass.

y = x W^T with W [out, in] pruned; each case times one pass separately: ``fwd`` (y), ``grad_input`` (grad_y W) and
``grad_weight`` (grad_y^T x: dense for the baselines, only at the kept positions for effikern).
Weights: BERT-base 768x768, 3072x768, 768x3072 and LLaMA-7B 4096x4096, 11008x4096, 4096x11008 (out x in).
Tokens: 1, 16, 256, 4096 (the CPU matrix stops at 256: 4096 dense tokens take seconds per call on 2 cores).
Patterns: unstructured 50/70/90/95%, block 32 and 64 at 50/70/90%, 2:4.
Baselines -- CPU: dense ``F.linear`` (the speedup's base), torch CSR (``to_sparse_csr`` matmul; ``sampled_addmm``
for grad_weight); GPU: dense (cuBLAS), torch BSR (``to_sparse_bsr``), torch 2:4 (``to_sparse_semi_structured``,
forward) and the ideal: a dense matmul over in * density columns.
CPU also times ``fwd-cold`` at 4096 x 4096, 90%, 1-64 tokens: the forward with the last-level cache emptied before
each call (see ``_make_case``). ``report()`` lists the bytes each format holds next to the dense weight's.
"""

import math

import torch
import torch.nn.functional as F

import effikern
from effikern.ops import semi_structured
from effikern.sparse import from_dense

from .runner import Case
from .timing import min_ms

FAMILY = "sparse"

WEIGHTS = ((768, 768), (3072, 768), (768, 3072), (4096, 4096), (11008, 4096), (4096, 11008))
TOKENS = (1, 16, 256, 4096)
# (format, block, sparsity): the patterns
PATTERNS = ([("unstructured", None, s) for s in (0.5, 0.7, 0.9, 0.95)]
            + [("block", (b, b), s) for b in (32, 64) for s in (0.5, 0.7, 0.9)] + [("2:4", None, 0.5)])
MODES = ("fwd", "grad_input", "grad_weight")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _matrix(device, quick):
    """(weight, tokens, pattern, dtype name, mode) to run on this device."""
    if device.type == "cpu":
        if quick:
            key = (4096, 4096)
            runs = [(key, m, ("unstructured", None, 0.9), "fp32", mode) for mode in ("fwd", "fwd-cold")
                    for m in (1, 16, 64)]
            runs += [(key, 16, ("block", (32, 32), 0.9), "fp32", "fwd"),
                     (key, 16, ("unstructured", None, 0.9), "fp32", "grad_input"),
                     (key, 16, ("unstructured", None, 0.9), "fp32", "grad_weight")]
            return runs
        cold = [((4096, 4096), m, ("unstructured", None, 0.9), "fp32", "fwd-cold") for m in (1, 16, 64)]
        return [(w, m, p, "fp32", mode) for w in WEIGHTS for m in TOKENS[:3] for p in PATTERNS for mode in MODES] + cold
    if quick:
        key = (4096, 4096)
        return [(key, 4096, ("block", (32, 32), 0.9), "fp16", "fwd"), (key, 16, ("unstructured", None, 0.9), "fp16",
                "fwd"), (key, 4096, ("2:4", None, 0.5), "fp16", "fwd")]
    return [(w, m, p, "fp16", mode) for w in WEIGHTS for m in TOKENS for p in PATTERNS for mode in MODES]


def random_pattern(n, k, fmt, block, sparsity, device):
    """A bool [n, k] mask of the pattern: random positions, random whole blocks, or 2 random of every 4."""
    if fmt == "unstructured":
        return torch.rand(n, k, device=device) >= sparsity
    if fmt == "2:4":
        order = torch.rand(n, k // 4, 4, device=device).argsort(-1)[..., :2]
        return torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(-1, order, True).reshape(n, k)
    br, bc = block
    keep = torch.rand(math.ceil(n / br), math.ceil(k / bc), device=device) >= sparsity
    return keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:n, :k]


def _layout(fmt, block, sparsity):
    if fmt == "block":
        return f"b{block[0]}-{round(sparsity * 100)}"
    return "2:4" if fmt == "2:4" else f"u{round(sparsity * 100)}"


def _effikern_pass(sw, mode, x, gy):
    if mode == "fwd":
        return lambda: effikern.functional.sparse_linear(x, sw)
    if mode == "grad_input":
        return lambda: torch.ops.effikern.sparse_linear_grad_input(gy, sw.values, sw.crow, sw.col, sw.t_crow, sw.t_row,
                                                                   sw.t_perm, sw.format, *sw.shape)
    return lambda: torch.ops.effikern.sparse_linear_grad_values(gy, x, sw.crow, sw.row, sw.col, sw.value_mask,
                                                                list(sw.values.shape), sw.format)


def _dense_pass(w, mode, x, gy):
    if mode == "fwd":
        return lambda: F.linear(x, w)
    if mode == "grad_input":
        return lambda: gy @ w
    return lambda: gy.t() @ x


def _torch_sparse_passes(device, w, mask, fmt, block, density, mode, x, gy):
    """{label: callable or why not} for the torch.sparse baselines of this device."""
    out = {}
    if device.type == "cpu":
        csr = w.to_sparse_csr()
        if mode == "fwd":
            out["torch_csr"] = lambda: torch.mm(csr, x.t()).t()
        elif mode == "grad_input":
            csr_t = w.t().contiguous().to_sparse_csr()
            out["torch_csr"] = lambda: torch.mm(csr_t, gy.t()).t()
        else:
            out["torch_csr"] = lambda: torch.sparse.sampled_addmm(csr, gy.t().contiguous(), x, beta=0.0)
        return out
    if fmt == "block" and mode == "fwd":
        bsr = w.to_sparse_bsr(block)
        out["torch_bsr"] = lambda: torch.mm(bsr, x.t()).t()
    if fmt == "2:4" and mode == "fwd":
        try:
            from torch.sparse import to_sparse_semi_structured

            semi = to_sparse_semi_structured(w)
            out["torch_2:4"] = lambda: F.linear(x, semi)
        except Exception as err:  # noqa: BLE001 - a GPU or shape torch refuses is reported, not fatal
            out["torch_2:4"] = f"unavailable: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
    kept = max(1, round(w.shape[1] * density))
    w_ideal = w[:, :kept].contiguous()
    x_ideal, ideal_mode = x[:, :kept].contiguous(), mode
    out["ideal"] = _dense_pass(w_ideal, ideal_mode, x_ideal, gy)
    return out


def _make_case(device, weight, tokens, pattern, dtype_name, mode):
    """mode: a pass of MODES, or "fwd-cold" (CPU): the forward with the last-level cache emptied before every timed
    call, as in a model whose layers' weights together exceed it; the 8.7 MB of a 4096 x 4096 weight at 90% sparsity
    otherwise stays in this machine's 32 MiB L3 between calls, which the 64 MiB dense weight cannot."""
    cold = mode == "fwd-cold"
    mode_label, mode = mode, ("fwd" if cold else mode)
    n, k = weight
    fmt, block, sparsity = pattern
    dtype = DTYPES[dtype_name]
    esize = torch.finfo(dtype).bits // 8
    density = 1.0 - sparsity
    nnz = round(n * k * density)
    idx_bytes = 4 * (nnz if fmt != "block" else nnz // (block[0] * block[1]))
    act = {"fwd": tokens * (k + n), "grad_input": tokens * (n + k), "grad_weight": tokens * (n + k)}[mode]
    nbytes = nnz * esize + idx_bytes + act * esize
    backends = ("torch", "cpp") if device.type == "cpu" else ("torch", "triton", "cuda")

    def build():
        mask = random_pattern(n, k, fmt, block, sparsity, device)
        w = (torch.randn(n, k, device=device) * mask).to(dtype)
        x = torch.randn(tokens, k, device=device).to(dtype)
        gy = torch.randn(tokens, n, device=device).to(dtype)
        sw = from_dense(w, mask, fmt, block)
        out = {"dense": _dense_pass(w, mode, x, gy)}
        out.update(_torch_sparse_passes(device, w, mask, fmt, block, density, mode, x, gy))
        for backend in backends:
            if why := effikern.backends.unavailable_reason(backend, device.type):
                out[backend] = f"unavailable: {why}"
            else:
                out[backend] = _under_backend(backend, _effikern_pass(sw, mode, x, gy))
                if fmt == "2:4" and mode == "fwd" and backend != "torch":  # the row says which kernel ran
                    out[backend].note = semi_structured.path(device, dtype, n, k)
        return out

    return Case(op="sparse_linear", shape=f"{n}x{k} M{tokens}", dtype=dtype_name, layout=_layout(fmt, block, sparsity),
                mode=mode_label, bytes=nbytes, flops=2 * tokens * nnz, baseline="dense", build=build, cold=cold)


def _under_backend(backend, fn):
    def run():
        with effikern.set_backend(backend):
            return fn()

    return run


def cases(device, quick=True):
    """Every (weight, tokens, pattern, dtype, pass) case for this device."""
    return [_make_case(device, *spec) for spec in _matrix(device, quick)]


def report(quick=True, dtypes=("fp32", "fp16")):
    """Bytes each format holds for a 4096 x 4096 weight in each dtype: inference (values + crow + col) and training
    (adds row and the transposed view), against the dense weight in the same dtype. bf16 holds what fp16 does."""
    rows = []
    patterns = PATTERNS if not quick else [("unstructured", None, 0.5), ("unstructured", None, 0.9),
                                           ("block", (32, 32), 0.5), ("2:4", None, 0.5)]
    for fmt, block, sparsity in patterns:
        torch.manual_seed(0)
        mask = random_pattern(4096, 4096, fmt, block, sparsity, "cpu")
        weight = torch.randn(4096, 4096) * mask
        for dtype_name in dtypes:
            sw = from_dense(weight.to(DTYPES[dtype_name]), mask, fmt, block)
            training = sw.memory_report()
            inference = sw.drop_training_arrays().memory_report()
            rows.append({"weight": "4096x4096", "dtype": dtype_name, "layout": _layout(fmt, block, sparsity),
                         "dense_bytes": training["dense"], "inference_bytes": inference["total"],
                         "training_bytes": training["total"]})
    return rows


def decision_table(threads=1, calls=15, weights=((4096, 4096), (768, 3072)), tokens=(1, 16, 64, 256),
                   dtypes=("fp32",)):
    """CPU forward times of cpp, dense F.linear and torch CSR, as the MINIMUM over ``calls`` calls.

    The data behind ``effikern.optimize.SPARSE_FASTER`` and ``effikern/_auto.py``. The minimum, at one thread,
    because the machine these were taken on is shared: a median (what the runner reports) there measures the
    other jobs, and with 2 threads a call waits whenever its partner thread is descheduled (4 ms ticks).
    """
    torch.set_num_threads(threads)

    def best_ms(fn):
        return min_ms(fn, calls)

    patterns = [p for p in PATTERNS if p[0] != "2:4"]
    rows = []
    for n, k in weights:
        for fmt, block, sparsity in patterns:
            for dtype_name in dtypes:
                torch.manual_seed(0)
                mask = random_pattern(n, k, fmt, block, sparsity, "cpu")
                w = (torch.randn(n, k) * mask).to(DTYPES[dtype_name])
                sw = from_dense(w, mask, fmt, block)
                csr = w.to_sparse_csr() if dtype_name == "fp32" else None
                for m in tokens:
                    x = torch.randn(m, k).to(w.dtype)
                    with effikern.set_backend("cpp"):
                        cpp = best_ms(lambda: effikern.functional.sparse_linear(x, sw))
                    row = {"weight": f"{n}x{k}", "layout": _layout(fmt, block, sparsity), "dtype": dtype_name,
                           "tokens": m, "cpp_ms": cpp, "dense_ms": best_ms(lambda: F.linear(x, w))}
                    if csr is not None:
                        row["torch_csr_ms"] = best_ms(lambda: torch.mm(csr, x.t()).t())
                    rows.append(row)
                    print(row, flush=True)
    return rows


def backend_table(threads=1, calls=5, weights=((4096, 4096), (768, 3072)), tokens=(1, 16, 64),
                  dtypes=("bf16", "fp16")):
    """CPU times of the cpp and torch (reference: densify + dense matmul) backends in half precision, forward and
    forward + backward, as the minimum over ``calls`` calls: the data behind ``effikern/_auto.py``'s half-precision
    sparse_linear entries (the decision table above compares cpp with dense ``F.linear`` instead)."""
    torch.set_num_threads(threads)

    def best_ms(fn):
        return min_ms(fn, calls)

    rows = []
    for n, k in weights:
        for fmt, block, sparsity in (("unstructured", None, 0.5), ("unstructured", None, 0.9),
                                     ("block", (32, 32), 0.5), ("block", (32, 32), 0.9)):
            for dtype_name in dtypes:
                torch.manual_seed(0)
                mask = random_pattern(n, k, fmt, block, sparsity, "cpu")
                w = (torch.randn(n, k) * mask).to(DTYPES[dtype_name])
                sw = from_dense(w, mask, fmt, block)
                sw.values.requires_grad_(True)
                for m in tokens:
                    x = torch.randn(m, k).to(w.dtype).requires_grad_(True)
                    row = {"weight": f"{n}x{k}", "layout": _layout(fmt, block, sparsity), "dtype": dtype_name,
                           "tokens": m}
                    for backend in ("cpp", "torch"):
                        with effikern.set_backend(backend):
                            with torch.no_grad():
                                row[f"{backend}_fwd_ms"] = best_ms(lambda: effikern.functional.sparse_linear(x, sw))
                            row[f"{backend}_fwd_bwd_ms"] = best_ms(
                                lambda: effikern.functional.sparse_linear(x, sw).sum().backward())
                    rows.append(row)
                    print(row, flush=True)
    return rows


if __name__ == "__main__":
    import json
    import sys

    # python -m benchmarks.bench_sparse OUT.json            the decision table (cpp vs dense, forward)
    # python -m benchmarks.bench_sparse --backends OUT.json the half-precision backend table (cpp vs torch)
    backends_mode = "--backends" in sys.argv[1:]
    paths = [a for a in sys.argv[1:] if a != "--backends"]
    out = paths[0] if paths else ("sparse-backends.json" if backends_mode else "sparse-decision-table.json")
    from .runner import environment

    if backends_mode:
        table, stat = backend_table(), "min of 5 calls, 1 thread, forward (no_grad) and forward + backward"
    else:
        table, stat = decision_table(dtypes=("fp32", "bf16", "fp16")), "min of 15 calls, 1 thread, forward"
    with open(out, "w") as f:
        json.dump({**environment(torch.device("cpu")), "stat": stat, "rows": table}, f, indent=1)
    print(f"wrote {out}")
