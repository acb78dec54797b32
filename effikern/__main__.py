"""``python -m effikern info`` and ``python -m effikern bench``."""

import argparse
import os
import sys

import torch


def _huge_page_advice() -> str:
    """What csrc/cpu/output_alloc.h does on this machine (Linux only; EFFIKERN_HUGE_PAGES=0 turns it off)."""
    if not sys.platform.startswith("linux"):
        return "no (not Linux)"
    if os.environ.get("EFFIKERN_HUGE_PAGES") == "0":
        return "no (EFFIKERN_HUGE_PAGES=0)"
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().strip()
        with open("/sys/kernel/mm/transparent_hugepage/defrag") as f:
            defrag = f.read().strip()  # "madvise" selected: advised faults may compact memory (README)
    except OSError:
        return "no (the kernel has no transparent huge pages)"
    return f"yes (EFFIKERN_HUGE_PAGES=0 turns it off; kernel THP mode: {mode}; defrag: {defrag})"


def info() -> None:
    """Versions, device, which backends are built and usable per op, and what ``auto`` picks."""
    import effikern
    from effikern import _auto, _ext, backends
    from effikern.ops import amp_torch_fused

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    ext = _ext.extension()
    print(f"effikern {effikern.__version__}  torch {torch.__version__}  triton {triton_version}  "
          f"CUDA {torch.version.cuda or 'none (CPU build of torch)'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"devices: cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}: auto uses the "
          f"{_auto.table_device('cpu')!r} measurements), cuda: {gpu}")
    print(f"extension effikern._C: {ext.build_info() if ext else _ext.extension_error()}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}  backend choice: {backends.get_backend()}"
          " (set with effikern.set_backend or EFFIKERN_BACKEND)")
    print(f"cpp outputs of 4 MiB or more advised for huge pages: {_huge_page_advice()}")
    for op in backends.ops():
        print(f"\n{op}:")
        impls = backends.registered(op)
        for device in devices:
            for name in backends.BACKENDS:
                if name not in impls:
                    status = "not implemented"
                elif device not in impls[name].devices:
                    continue
                else:
                    status = backends.unavailable_reason(name, device) or "usable"
                print(f"  {device:<5}{name:<8}{status}")
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                name = str(dtype).replace("torch.", "")
                picked = _choice(op, device, dtype)
                if picked == "torch" and backends.get_backend() == "auto":
                    if op in _EAGER_UNDER_AUTO:
                        picked = "eager PyTorch code (no kernel measured faster)"
                    elif amp_torch_fused.available(op):
                        picked = amp_torch_fused.describe(op, device, dtype)
                print(f"  {device:<5}{name:<9} -> runs on: {picked}")
                if backends.get_backend() == "auto":  # classes of shapes measured the other way (_auto._CASES)
                    for case in _auto.cases(op, device, dtype):
                        print(f"  {device:<5}{name:<9}    {case}: {_choice(op, device, dtype, case)}")
        if op == "sparse_linear" and "cuda" in devices:  # the 2:4 forward may run torch's kernel instead
            from effikern.ops import semi_structured

            for dtype in (torch.float16, torch.bfloat16):
                path = semi_structured.path("cuda", dtype, 4096, 4096)
                print(f"  cuda {str(dtype).replace('torch.', ''):<9} 2:4 forward (e.g. 4096x4096): {path}")


def _choice(op, device, dtype, case=None) -> str:
    """The backend the current choice runs ``op`` on, or the reason it cannot."""
    from effikern import backends

    try:
        return backends.choose(op, device, dtype, case)
    except backends.BackendUnavailableError as err:
        return f"error: {err}"


# Ops that, where auto keeps PyTorch, run the plain eager code instead of their torch reference backend
# (auto_runs_eager in effikern/ops/dwsep.py and effikern/ops/distill.py).
_EAGER_UNDER_AUTO = ("dwsep_conv2d", "distillation_loss")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effikern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, built backends and what auto picks")
    bench = sub.add_parser("bench", help="run the benchmark suite on this machine's device")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="quick", action="store_true", default=True,
                      help="the default: a few minutes on a 2-core CPU")
    size.add_argument("--full", dest="quick", action="store_false", help="the whole matrix")
    bench.add_argument("--family", action="append", help="only these families (repeatable), e.g. dwsep")
    bench.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--out", help="results folder (default: benchmarks/results in a checkout)")
    bench.add_argument("--dtype", action="append",
                       help="only cases in these dtypes (repeatable: fp32, fp16, bf16), taken from the full matrix")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    from effikern.benchmarks import runner

    device = torch.device(args.device) if args.device else None
    runner.run(tuple(args.family or runner.FAMILIES), device=device, quick=args.quick, out_dir=args.out,
               dtypes=args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
