"""Prints the floor of every dwsep benchmark case: compulsory bytes over bandwidth, FLOPs over peak.

    python -m effikern.benchmarks.floors [--bandwidth-gbps B] [--peak-tflops P] [--batch N] [--esize 2]

Defaults are H100 SXM datasheet rates (3350 GB/s, 989 dense fp16 TFLOP/s); pass the measured copy bandwidth
and matmul rate (the bench JSON holds the former) to get the floor on the machine at hand.
"""

import argparse

from .bench_dwsep import SHAPES, _traffic_and_flops


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--bandwidth-gbps", type=float, default=3350.0)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--esize", type=int, default=2, help="bytes per element: 2 for fp16/bf16, 4 for fp32")
    a = p.parse_args(argv)
    bw, peak = a.bandwidth_gbps * 1e9, a.peak_tflops * 1e12
    print(f"| shape (C,H,k,s->Cout) N={a.batch} | mode | MB | GFLOP | bytes floor us | flops floor us | bound |")
    print("|---|---|---|---|---|---|---|")
    for family, shapes in SHAPES.items():
        for c, hw, k, s, cout in shapes:
            for mode in ("fwd", "fwd+bwd"):
                nbytes, flops = _traffic_and_flops(a.batch, c, hw, k, s, cout, a.esize, mode)
                tb, tf = nbytes / bw * 1e6, flops / peak * 1e6
                print(f"| {family} {c},{hw},{k},{s}->{cout} | {mode} | {nbytes / 1e6:.1f} | {flops / 1e9:.2f} | "
                      f"{tb:.1f} | {tf:.1f} | {'memory' if tb >= tf else 'compute'} |")


if __name__ == "__main__":
    main()
