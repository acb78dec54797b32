"""How one callable is timed, and the device's copy bandwidth (the roofline's ceiling)."""

import ctypes
import gc
import os
import statistics
import time

import torch


def median_ms(fn, device_type: str, quick: bool) -> float:
    """Median wall time of ``fn()`` in milliseconds, warm-up excluded.

    GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) when Triton is there, else events
    around repeated calls. CPU: ``torch.utils.benchmark`` blocked_autorange, which picks the repeat count.
    """
    if device_type == "cuda":
        return _median_ms_cuda(fn, quick)
    from torch.utils import benchmark

    fn()  # warm-up: first-call allocation and thread-pool start stay out of the numbers
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.3 if quick else 1.0).median * 1e3


def _call_ms(fn, calls: int, before=None) -> list:
    """Wall times of ``calls`` single calls of ``fn()`` in milliseconds (CPU), ``before()`` run untimed ahead of
    each."""
    times = []
    for _ in range(calls):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def min_ms(fn, calls: int) -> float:
    """Fastest of ``calls`` wall-clock calls of ``fn()`` in milliseconds (CPU), after one warm-up call. For the
    decision tables on the shared 2-core machine: a median there measures the other jobs."""
    fn()
    return min(_call_ms(fn, calls))


# Read before each call of a cold timing: twice the 32 MiB L3 of the machines these ran on.
_EVICT_MIB = 64
_evict_buffer = None


def cold_median_ms(fn, quick: bool) -> float:
    """Median wall time of ``fn()`` in milliseconds (CPU), each call timed alone right after reading a 64 MiB
    buffer, so the call's operands come from DRAM, not from the last-level cache. The buffer is read (not written):
    evicting clean lines costs the timed call no write-backs."""
    global _evict_buffer
    if _evict_buffer is None:
        _evict_buffer = torch.ones(_EVICT_MIB * 2**20 // 4)
    return statistics.median(_call_ms(fn, 30 if quick else 100, before=lambda: _evict_buffer.sum()))


def _median_ms_cuda(fn, quick: bool) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=25, rep=100 if quick else 400, return_mode="median"))
    for _ in range(3):
        fn()
    times = []
    for _ in range(20 if quick else 100):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, quick: bool) -> float:
    """Bytes read + written per second by a large device-to-device copy: the memory ceiling we report against.

    256 MiB on GPU (well past L2, 50 MiB on H100) and 64 MiB on CPU (past the last-level cache of this class
    of machine) so the number is DRAM's, not a cache's.
    """
    nbytes = (256 if device.type == "cuda" else 64) * 2**20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device.type, quick)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def peak_extra_mib(fn, device: torch.device):
    """Peak memory above what was held before ``fn()`` ran, in MiB. GPU: the caching allocator's peak. CPU (Linux):
    the process's peak resident set (:func:`cpu_peak_extra_mib`); None elsewhere."""
    if device.type == "cpu":
        return cpu_peak_extra_mib(fn)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


_CLEAR_REFS = "/proc/self/clear_refs"


def cpu_peak_extra_mib(fn):
    """Peak resident memory of the process during ``fn()`` above its resident set just before, in MiB; None where
    Linux's /proc cannot reset the peak.

    Why resident memory: it counts every allocator alike (PyTorch's tensors, oneDNN's scratchpads, the cpp kernels'
    own scratch), where PyTorch's CPU memory profiler sees only its own tensors. Writing "5" to
    /proc/self/clear_refs resets VmHWM (the peak) to the current resident set. Memory freed before the call but
    still resident would hide part of the call's need, so first: Python garbage, effikern's scratch cache (it is
    the kernels' working memory: a cold call must count it) and glibc's free lists (malloc_trim) go back to the
    system. Page granularity: 4 KiB, or 2 MiB where transparent huge pages back a tensor."""
    if not os.access(_CLEAR_REFS, os.W_OK):
        return None
    gc.collect()
    _release_cpu_caches()
    base = _status_kib("VmRSS")
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")
    fn()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(0, peak - base) / 1024


def _release_cpu_caches():
    from effikern import _ext

    ext = _ext.extension()  # None when not built: then nothing of ours is cached
    if ext is not None and hasattr(ext, "scratch_cache_release"):
        ext.scratch_cache_release()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_kib(key):
    """A /proc/self/status field in KiB (VmRSS, VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None
