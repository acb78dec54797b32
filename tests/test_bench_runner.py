"""The shared benchmark runner writes what it promises: JSON with device, versions, sha, date and rows."""

import json
import sys
import types

import torch

from effikern.benchmarks import runner


def test_runner_writes_results(tmp_path, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    def build():
        a = torch.randn(256, 256)
        def cpp():
            return a.mm(a)

        cpp.note = "which kernel ran"  # a candidate may say what it ran (bench_sparse's 2:4 rows)
        return {"torch": lambda: a @ a, "cpp": cpp, "cuda": "unavailable: no GPU"}

    case = runner.Case(op="mm", shape="256x256", dtype="fp32", layout="-", mode="fwd", bytes=3 * 256 * 256 * 4,
                       flops=2 * 256**3, baseline="torch", build=build)
    fake = types.ModuleType("effikern.benchmarks.bench_fake")
    fake.cases = lambda device, quick: [case]
    monkeypatch.setitem(sys.modules, "effikern.benchmarks.bench_fake", fake)
    monkeypatch.setattr(runner.timing, "copy_bandwidth_gbps", lambda device, quick: 10.0)
    path = runner.run(("fake",), device=torch.device("cpu"), quick=True, out_dir=str(tmp_path))
    data = json.loads(open(path).read())
    for key in ("device", "versions", "git_sha", "date", "copy_bandwidth_gbps", "memory", "rows", "summary"):
        assert key in data
    assert data["memory"]["THP_MEM_ALLOC_ENABLE"] is None  # not set in the test environment
    assert "EFFIKERN_HUGE_PAGES" in data["memory"]
    rows = {r["backend"]: r for r in data["rows"]}
    assert rows["torch"]["speedup"] == 1.0 and rows["torch"]["ms"] > 0
    assert abs(rows["cpp"]["speedup"] - rows["torch"]["ms"] / rows["cpp"]["ms"]) < 1e-9
    assert rows["cpp"]["note"] == "which kernel ran" and rows["torch"]["note"] == ""
    assert rows["cuda"]["ms"] is None and "unavailable" in rows["cuda"]["note"]


def test_runner_refuses_to_write_a_file_with_no_rows(tmp_path, monkeypatch):
    """A dtype filter that leaves no case (kd had no fp16 cases once) is an error, not an empty results file."""
    fake = types.ModuleType("effikern.benchmarks.bench_fake")
    fake.cases = lambda device, quick: []
    monkeypatch.setitem(sys.modules, "effikern.benchmarks.bench_fake", fake)
    monkeypatch.setattr(runner.timing, "copy_bandwidth_gbps", lambda device, quick: 10.0)
    try:
        runner.run(("fake",), device=torch.device("cpu"), quick=True, out_dir=str(tmp_path), dtypes=["fp16"])
    except SystemExit as e:
        assert "nothing to run" in str(e) and "fp16" in str(e)
    else:
        raise AssertionError("runner.run wrote a results file with no rows")
    assert not list(tmp_path.iterdir())


def test_call_overhead_bench_runs(tmp_path):
    """benchmarks/bench_call_overhead.py measures every call it names (a smoke run with few calls)."""
    from backend_util import skip_unavailable

    skip_unavailable("cpp", "cpu")
    from effikern.benchmarks import bench_call_overhead

    threads = torch.get_num_threads()
    try:
        rows = bench_call_overhead.table(calls=20)
    finally:
        torch.set_num_threads(threads)
    assert len(rows) == 8 and all(r["us"] > 0 for r in rows)


def test_cold_timing_empties_the_cache_before_every_call(monkeypatch):
    from effikern.benchmarks import timing

    events = []

    class Evict:
        def sum(self):
            events.append("evict")

    monkeypatch.setattr(timing, "_evict_buffer", Evict())
    ms = timing.cold_median_ms(lambda: events.append("call"), quick=True)
    assert ms >= 0
    assert events == ["evict", "call"] * (len(events) // 2) and len(events) >= 20


def test_runner_times_cold_cases_cold_on_cpu(tmp_path, monkeypatch):
    def build():
        return {"torch": lambda: None, "cpp": lambda: None}

    cold = runner.Case(op="mm", shape="s", dtype="fp32", layout="-", mode="fwd-cold", bytes=1, flops=1,
                       baseline="torch", build=build, cold=True)
    warm = runner.Case(op="mm", shape="s", dtype="fp32", layout="-", mode="fwd", bytes=1, flops=1,
                       baseline="torch", build=build)
    fake = types.ModuleType("effikern.benchmarks.bench_fake_cold")
    fake.cases = lambda device, quick: [cold, warm]
    monkeypatch.setitem(sys.modules, "effikern.benchmarks.bench_fake_cold", fake)
    monkeypatch.setattr(runner.timing, "copy_bandwidth_gbps", lambda device, quick: 10.0)
    monkeypatch.setattr(runner.timing, "cold_median_ms", lambda fn, quick: 7.0)
    monkeypatch.setattr(runner.timing, "median_ms", lambda fn, device_type, quick: 3.0)
    path = runner.run(("fake_cold",), device=torch.device("cpu"), quick=True, out_dir=str(tmp_path))
    rows = json.loads(open(path).read())["rows"]
    assert {r["mode"]: r["ms"] for r in rows} == {"fwd-cold": 7.0, "fwd": 3.0}


def test_cpu_peak_memory_counts_a_transient_allocation():
    """The CPU peak is the resident set's high-water mark during the call: a 64 MiB tensor made and freed inside
    the call counts, one kept from before does not, and it counts again on the next call (glibc's free lists and
    the scratch cache are emptied first, so memory freed earlier does not hide the call's need)."""
    import pytest

    from effikern.benchmarks import timing

    kept = torch.ones(16 * 2**20)  # 64 MiB held before the call

    def transient():
        t = torch.empty(16 * 2**20)
        t.fill_(1.0)  # touch every page
        return float(t[-1]) + float(kept[0])

    first = timing.peak_extra_mib(transient, torch.device("cpu"))
    if first is None:
        pytest.skip("/proc/self/clear_refs is not writable here (not Linux)")
    second = timing.peak_extra_mib(transient, torch.device("cpu"))
    idle = timing.peak_extra_mib(lambda: float(kept[0]), torch.device("cpu"))
    for peak in (first, second):
        assert 60 <= peak <= 72, peak
    assert idle < 8, idle
