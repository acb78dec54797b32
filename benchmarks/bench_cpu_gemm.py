"""The C++ kernels' AVX512-BF16 GEMM (csrc/cpu/bf16_gemm.h) against PyTorch's matmuls, on one thread.

The shapes are the dwsep pointwise step's tiles (pixels x C x Cout). Each effikern call goes through the test hook
``effikern._C.bf16_gemm_for_test``, so it includes rounding A and packing B on every call (in the dwsep kernel the
weight is packed once per call, not per tile): a lower bound on the kernel's own rate. The baselines are
``torch.mm`` in fp32 and in bf16 on the same operands. Rates are 2*M*N*K over the minimum of 20 calls.

    python -m benchmarks.bench_cpu_gemm OUT.json
"""

import torch

from .timing import min_ms

# (M pixels, K = C, N = Cout) of tiles of the benchmark's dwsep shapes.
SHAPES = [(84, 384, 1536), (196, 960, 160), (224, 96, 384), (112, 192, 768), (98, 1152, 192), (448, 32, 16),
          (200, 144, 24), (128, 672, 112)]


def table(calls=20):
    from effikern import _C

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a16, b16 = a.bfloat16(), b.bfloat16()
        flop = 2 * m * n * k
        row = {"m": m, "k": k, "n": n}
        for name, fn in [("effikern_bf16", lambda: _C.bf16_gemm_for_test(a, b)),
                         ("torch_fp32", lambda: torch.mm(a, b)), ("torch_bf16", lambda: torch.mm(a16, b16))]:
            row[name + "_gflops"] = flop / min_ms(fn, calls) / 1e6
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    import json
    import sys

    from .runner import environment

    out = sys.argv[1] if len(sys.argv) > 1 else "cpu-bf16-gemm-1t.json"
    rows = table()
    with open(out, "w") as f:
        json.dump({**environment(torch.device("cpu")), "stat": "min of 20 calls, 1 thread, GFLOP/s", "rows": rows},
                  f, indent=1)
    print(f"wrote {out}")
