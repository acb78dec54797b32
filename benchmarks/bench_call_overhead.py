"""Per-call cost of effikern's Python layer on tiny problems, where the kernels take a few microseconds: the
functional API (plain eager calls run an autograd.Function over the op's implementation, ops/_eager.py
op_without_dispatcher) against calling the registered ``torch.ops.effikern`` op, which pays the custom op's Python
autograd layer, and PyTorch's own call for scale. One thread, the cpp backend; each number is the minimum over 3
loops of the mean per-call time (microseconds).

    python -m benchmarks.bench_call_overhead OUT.json
"""

import time

import torch
import torch.nn.functional as F

LOOPS = 3


def per_call_us(fn, calls):
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(LOOPS):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _sparse_rows(calls):
    import effikern
    from effikern import sparse

    torch.manual_seed(0)
    w = torch.randn(64, 64)
    mask = torch.rand(64, 64) > 0.9
    sw = sparse.from_dense(w * mask, mask, "unstructured")
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.ones(4, 64)
    dense_w = w.clone().requires_grad_()

    def op(x):
        return torch.ops.effikern.sparse_linear(x, sw.values, sw.crow, sw.col, sw.row, sw.t_crow, sw.t_row,
                                                sw.t_perm, sw.value_mask, None, sw.format, 64, 64)

    cases = {
        "functional fwd": lambda: effikern.functional.sparse_linear(x, sw),
        "torch.ops fwd": lambda: op(x),
        "functional fwd+bwd": lambda: effikern.functional.sparse_linear(x, sw).backward(g),
        "torch.ops fwd+bwd": lambda: op(x).backward(g),
        "F.linear fwd+bwd (dense weight with grad)": lambda: F.linear(x, dense_w).backward(g),
    }
    return [{"op": "sparse_linear 64x64 90% unstructured, 4 tokens, x requires grad", "call": name,
             "us": per_call_us(fn, calls)} for name, fn in cases.items()]


def _dwsep_rows(calls):
    import effikern
    from effikern.ops import dwsep as dwsep_ops

    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 4, requires_grad=True)
    dw = torch.randn(8, 1, 3, 3, requires_grad=True)
    pw = torch.randn(8, 8, 1, 1, requires_grad=True)
    args = (x, dw, None, pw, None, [1, 1], [1, 1], [1, 1], "relu", None)
    g = torch.ones(1, 8, 4, 4)
    cases = {
        "functional fwd+bwd": lambda: effikern.functional.dwsep_conv2d(x, dw, None, pw, None, 1, 1, 1,
                                                                       "relu").backward(g),
        "torch.ops fwd+bwd": lambda: torch.ops.effikern.dwsep_conv2d(*args).backward(g),
        "eager PyTorch fwd+bwd (two convolutions)": lambda: dwsep_ops.reference(*args).backward(g),
    }
    return [{"op": "dwsep_conv2d 1x8x4x4 k3 -> 8", "call": name, "us": per_call_us(fn, calls)}
            for name, fn in cases.items()]


def table(calls=2000):
    import effikern

    torch.set_num_threads(1)
    with effikern.set_backend("cpp"):
        rows = _sparse_rows(calls) + _dwsep_rows(calls // 2)
    for row in rows:
        print(f"{row['op']:<66} {row['call']:<44} {row['us']:8.1f} us", flush=True)
    return rows


if __name__ == "__main__":
    import json
    import sys

    from .runner import environment

    out = sys.argv[1] if len(sys.argv) > 1 else "cpu-call-overhead-1t.json"
    rows = table()
    with open(out, "w") as f:
        json.dump({**environment(torch.device("cpu")), "stat": "min over 3 loops of mean per-call us, 1 thread",
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}")
