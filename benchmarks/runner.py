"""The one runner every ``bench_<family>.py`` plugs into.

A family module exposes ``FAMILY`` (a name) and ``cases(device, quick) -> list[Case]``, and optionally
``report(quick) -> list[dict]`` for measurements that are not timings (the padding a batching strategy
adds). The runner times every candidate of every case in one process, so speedups compare numbers measured
minutes apart on the same machine, and writes ``<out>/<device>.json`` (device, versions, git sha, date, every row)
and ``<device>.png``.
"""

import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from . import timing

FAMILIES = ("dwsep", "kd", "data", "amp", "sparse", "examples")


@dataclasses.dataclass
class Case:
    """One problem (op, shape, dtype, layout, mode) and the ways of running it.

    ``build()`` allocates the inputs and returns {candidate label: zero-argument callable, or a string saying
    why that candidate cannot run this case}; it runs just before timing so only one case's tensors are alive.
    ``bytes`` is the compulsory traffic (each input read once, each output written once) and ``flops`` the
    arithmetic, both for the floor: time >= max(bytes / bandwidth, flops / peak).
    ``cold``: on CPU, each timed call starts with the last-level cache emptied of the case's data (a model's
    weights do not stay cached between its layers; a loop over one call keeps a small sparse weight in L3).
    ``group``: cases summarized together (e.g. dwsep's "N=64 MobileNetV2+EfficientNet", the set its goal names);
    "" puts the case in one group with the family's other ungrouped cases.
    """

    op: str
    shape: str
    dtype: str
    layout: str
    mode: str
    bytes: int
    flops: int
    baseline: str
    build: Callable[[], Dict[str, Union[Callable, str]]]
    cold: bool = False
    group: str = ""  # the summary's group within its family, where one geomean over all cases would mix goals


@dataclasses.dataclass
class Row:
    family: str
    op: str
    shape: str
    dtype: str
    layout: str
    mode: str
    backend: str
    ms: Optional[float]
    gbps: Optional[float]
    tflops: Optional[float]
    pct_copy_bw: Optional[float]
    peak_extra_mib: Optional[float]
    speedup: Optional[float]
    baseline: str
    note: str = ""
    group: str = ""


def _git_sha() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown (not a git checkout)"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_isa_tag() -> str:
    """'' on an AVX-512 CPU, else its CPU class ('avx2', 'default', ...: effikern/_auto.py cpu_class). "AMD EPYC"
    names both AVX-512 (Zen 4) and AVX2-only machines, whose kernels and results differ: their files must not mix."""
    from effikern import _auto

    cpu_class = _auto.cpu_class()
    return "" if cpu_class == "avx512" else cpu_class


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa = _cpu_isa_tag()
    return f"{_cpu_name()}{' ' + isa.upper() if isa else ''} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A file name for the device: 'cuda-NVIDIA-H100-80GB-HBM3', 'cpu-AMD-EPYC-2t' (AVX-512),
    'cpu-AMD-EPYC-avx2-2t' (a CPU without AVX-512)."""
    if device.type == "cuda":
        name = f"cuda-{torch.cuda.get_device_name(device)}"
    else:
        isa = _cpu_isa_tag()
        name = f"cpu-{_cpu_name()}{'-' + isa if isa else ''}-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def environment(device: torch.device) -> dict:
    import effikern
    from effikern import _ext

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ext = _ext.extension()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else None,
        "versions": {
            "effikern": effikern.__version__,
            "torch": torch.__version__,
            "triton": triton_version,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "extension": None if ext is None else ext.build_info(),
        },
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "memory": _memory_settings(),
    }


def _memory_settings() -> dict:
    """Allocator settings that move CPU timings: with PyTorch's THP_MEM_ALLOC_ENABLE=1 large tensors get
    transparent huge pages, which removed most page-fault time from a stride-2 dwsep step (README), for every
    backend alike; EFFIKERN_HUGE_PAGES=0 turns off the advice the cpp kernels give their own large outputs
    (csrc/cpu/output_alloc.h). Recorded so that two results files are only compared when these agree."""
    thp_mode = None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp_mode = f.read().strip()
    except OSError:
        pass
    return {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), "transparent_hugepage": thp_mode,
            "EFFIKERN_HUGE_PAGES": os.environ.get("EFFIKERN_HUGE_PAGES")}


def _time_candidate(fn, device, quick, cold=False):
    fn()  # warm-up: compilation (torch.compile, Triton JIT, cudnn.benchmark) stays out of the numbers
    if cold and device.type == "cpu":
        ms = timing.cold_median_ms(fn, quick)
    else:
        ms = timing.median_ms(fn, device.type, quick)
    return ms, timing.peak_extra_mib(fn, device)


def _rows_for_case(family, case, device, quick, copy_gbps) -> List[Row]:
    candidates = case.build()
    measured = {}
    for label, fn in candidates.items():
        if isinstance(fn, str):
            measured[label] = (None, None, fn)
            continue
        try:
            ms, mem = _time_candidate(fn, device, quick, case.cold)
            measured[label] = (ms, mem, getattr(fn, "note", ""))  # e.g. which kernel a backend ran (bench_sparse)
        except Exception as err:  # a backend failing on one case must not lose the rest of the run
            measured[label] = (None, None, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    del candidates
    base_ms = measured.get(case.baseline, (None,))[0]
    rows = []
    for label, (ms, mem, note) in measured.items():
        gbps = case.bytes / (ms * 1e-3) / 1e9 if (ms and case.bytes) else None
        rows.append(Row(
            family=family, op=case.op, shape=case.shape, dtype=case.dtype, layout=case.layout, mode=case.mode,
            backend=label, ms=ms, gbps=gbps, tflops=case.flops / (ms * 1e-3) / 1e12 if (ms and case.flops) else None,
            pct_copy_bw=100.0 * gbps / copy_gbps if gbps else None, peak_extra_mib=mem,
            speedup=base_ms / ms if (ms and base_ms) else None, baseline=case.baseline, note=note, group=case.group,
        ))
    return rows


def geomean(values) -> Optional[float]:
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def summarize(rows: List[Row]) -> List[dict]:
    """Geometric-mean speedup over the baseline per (family, dtype, layout, mode, group, backend)."""
    groups: Dict[tuple, list] = {}
    for r in rows:
        if r.backend != r.baseline and r.speedup is not None:
            groups.setdefault((r.family, r.dtype, r.layout, r.mode, r.group, r.backend), []).append(r.speedup)
    return [
        {"family": k[0], "dtype": k[1], "layout": k[2], "mode": k[3], "group": k[4], "backend": k[5],
         "geomean_speedup": geomean(v), "cases": len(v), "slower_cases": sum(1 for s in v if s and s < 1)}
        for k, v in sorted(groups.items())
    ]


def _fmt(v, spec):
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def print_table(rows: List[Row], summary: List[dict]) -> None:
    print(f"\n{'op':<14}{'shape':<30}{'dtype':<6}{'layout':<8}{'mode':<8}{'backend':<9}"
          f"{'ms':>9}{'GB/s':>8}{'%copy':>7}{'TF/s':>7}{'MiB':>8}{'speedup':>8}  note")
    for r in rows:
        print(f"{r.op:<14}{r.shape:<30}{r.dtype:<6}{r.layout:<8}{r.mode:<8}{r.backend:<9}"
              f"{_fmt(r.ms, '9.3f')}{_fmt(r.gbps, '8.1f')}{_fmt(r.pct_copy_bw, '7.1f')}"
              f"{_fmt(r.tflops, '7.2f')}{_fmt(r.peak_extra_mib, '8.1f')}{_fmt(r.speedup, '8.2f')}  {r.note}")
    print("\ngeomean speedup over the baseline:")
    for s in summary:
        group = f"  [{s['group']}]" if s.get("group") else ""
        print(f"  {s['family']:<8}{s['dtype']:<6}{s['layout']:<8}{s['mode']:<8}{s['backend']:<9}"
              f"{_fmt(s['geomean_speedup'], '6.2f')}x over {s['cases']} cases ({s['slower_cases']} slower){group}")


def plot(rows: List[Row], path: str, title: str) -> Optional[str]:
    """Bar chart of speedups (log scale) per case and backend; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    timed = [r for r in rows if r.speedup and r.backend != r.baseline]
    labels = sorted({(r.op, r.shape, r.dtype, r.layout, r.mode) for r in timed})
    backends = sorted({r.backend for r in timed})
    if not timed:
        return None
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * len(labels) * max(1, len(backends))), 6))
    width = 0.8 / len(backends)
    for b_i, backend in enumerate(backends):
        by_label = {(r.op, r.shape, r.dtype, r.layout, r.mode): r.speedup for r in timed if r.backend == backend}
        xs = [i + b_i * width for i, lab in enumerate(labels) if lab in by_label]
        ax.bar(xs, [by_label[lab] for lab in labels if lab in by_label], width, label=backend)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup over baseline (log)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([" ".join(lab[1:]) for lab in labels], rotation=90, fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(families=FAMILIES, device: Optional[torch.device] = None, quick: bool = True,
        out_dir: Optional[str] = None, dtypes: Optional[Sequence[str]] = None) -> str:
    """Runs the suite; returns the JSON path. ``dtypes``: only the cases in these dtypes, taken from each family's
    full matrix (the quick one holds one dtype per device); timing stays quick or full as ``quick`` says."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = out_dir or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    meta = environment(device)
    print(f"effikern bench on {meta['device']} ({'quick' if quick else 'full'}), torch {torch.__version__}, "
          f"git {meta['git_sha']}", flush=True)
    copy_gbps = timing.copy_bandwidth_gbps(device, quick)
    print(f"measured copy bandwidth: {copy_gbps:.1f} GB/s (read + write)", flush=True)
    rows: List[Row] = []
    reports = {}
    for family in families:
        module = importlib.import_module(f"{__package__}.bench_{family}")
        if hasattr(module, "report"):
            reports[family] = module.report(quick)
        cases = module.cases(device, quick) if not dtypes else [
            c for c in module.cases(device, False) if c.dtype in dtypes]
        if not cases and not hasattr(module, "report"):
            print(f"[{family}] no cases" + (f" in {', '.join(dtypes)}" if dtypes else "") + f" on {device.type}",
                  flush=True)
        for i, case in enumerate(cases, 1):
            case_rows = _rows_for_case(family, case, device, quick, copy_gbps)
            rows += case_rows
            brief = ", ".join(f"{r.backend} {_fmt(r.ms, '.3f')} ms" + (f" ({r.speedup:.2f}x)" if r.speedup and
                              r.backend != r.baseline else "") for r in case_rows)
            print(f"[{family} {i}/{len(cases)}] {case.op} {case.shape} {case.dtype} {case.layout} {case.mode}: "
                  f"{brief}", flush=True)
            gc.collect()
    if not rows and not any(reports.values()):  # an empty results file would read as a run that measured something
        raise SystemExit(f"effikern bench: nothing to run for families {list(families)}"
                         + (f" in dtypes {list(dtypes)}" if dtypes else "") + f" on {device.type}")
    summary = summarize(rows)
    print_table(rows, summary)
    slug = device_slug(device)
    path = os.path.join(out_dir, f"{slug}.json")
    with open(path, "w") as f:
        json.dump({**meta, "mode": "quick" if quick else "full", "dtypes": list(dtypes or []),
                   "copy_bandwidth_gbps": copy_gbps,
                   "summary": summary, "reports": reports,
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    png = plot(rows, os.path.join(out_dir, f"{slug}.png"), f"effikern on {meta['device']}, {meta['date']}")
    print(f"\nwrote {path}" + (f" and {png}" if png else ""))
    return path


def default_out_dir() -> str:
    """``benchmarks/results`` of the source checkout when running from one, else ./effikern-bench-results."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.exists(os.path.join(here, "..", "pyproject.toml")):
        return os.path.join(here, "results")
    return os.path.join(os.getcwd(), "effikern-bench-results")


if __name__ == "__main__":
    sys.exit("run the suite with `python -m effikern bench`")
