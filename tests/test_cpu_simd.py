"""The SIMD lane reductions of csrc/cpu/simd.h, checked directly in C++ (tests/cpp/simd_reductions.cpp).

The kernels' own tests reach these through whichever ISA the CI machine has; this check also covers the 64-byte
(AVX-512) shuffle patterns on a machine without AVX-512: compiled for the baseline ISA, GCC lowers the wide vector
types to narrower instructions with the same results. Each wider ISA the host can run is compiled and run too.
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "cpp", "simd_reductions.cpp")
HEADERS = os.path.join(ROOT, "csrc", "cpu")


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _variants():
    flags = _cpu_flags()
    yield pytest.param([], id="baseline")
    # marks=skipif rather than leaving them out, so the report shows which ISAs this host could not check
    yield pytest.param(["-mavx2", "-mfma", "-mf16c"], id="avx2",
                       marks=pytest.mark.skipif("avx2" not in flags, reason="host has no AVX2"))
    yield pytest.param(["-mavx512f", "-mavx512bw", "-mavx512vl"], id="avx512",
                       marks=pytest.mark.skipif("avx512f" not in flags, reason="host has no AVX-512"))


@pytest.mark.parametrize("isa_flags", list(_variants()))
def test_simd_reductions(isa_flags, tmp_path):
    if not os.path.exists(HEADERS):
        pytest.skip("needs the source tree (csrc/)")
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("a C++ compiler is required on CI (the extension is built with one)")
        pytest.skip("no C++ compiler")
    binary = tmp_path / "simd_reductions"
    build = subprocess.run([compiler, "-O2", "-std=c++17", *isa_flags, "-I", HEADERS, SOURCE, "-o", str(binary)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
