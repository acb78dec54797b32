"""CUDA sources cannot run on CI (no GPU) but must compile there, so they cannot rot unseen.

Every csrc/**/*.cu is compiled with nvcc for sm_80 and sm_90, and the torch-side CUDA glue (csrc/cuda/*.cpp)
is syntax-checked against the installed torch headers: it includes no c10/cuda header precisely so that this
works with the CPU wheel. The index arithmetic of the panelled-CSR kernels is also run on the host (it is
__host__ __device__ code), the part of those kernels that can be checked without a GPU.
"""

import glob
import os
import shlex
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
GLUE_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))


def _nvcc():
    path = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if path is None or not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("nvcc is required on CI for the CUDA compile check")
        pytest.skip("nvcc not found")
    return path


def _nvcc_includes():
    # Ask nvcc where its headers are (torch's CUDA_HOME is None in a CPU build, and nvcc may be a wrapper).
    out = subprocess.run([_nvcc(), "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            return shlex.split(line.split("INCLUDES=", 1)[1].strip().strip('"'))
    pytest.fail(f"could not read nvcc's include path from --dryrun:\n{out.stderr}")


def test_sources_exist():
    if not os.path.isdir(os.path.join(ROOT, "csrc")):
        pytest.skip("not a source checkout")
    assert CU_FILES, "no .cu files found under csrc/"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cu_compiles(source, arch, tmp_path):
    cmd = [_nvcc(), "-c", "-std=c++17", "-O3", f"-arch={arch}", "--expt-relaxed-constexpr",
           "-Werror", "all-warnings", source, "-o", str(tmp_path / "out.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr}"


@pytest.mark.parametrize("source", GLUE_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_cuda_glue_compiles_against_torch_headers(source):
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()] + _nvcc_includes() + [f"-I{sysconfig.get_paths()['include']}"]
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-DEFFIKERN_WITH_CUDA=1", *flags, source]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr[-4000:]}"


# Includes sparse_kernels.cu and runs the panelled-CSR index helpers on the host: the warp walk of csr_mm_kernel
# (32 lanes, each with its PanelCursor) over the forward and transposed arrays of random masks must visit every
# entry once at its true column, csr_sddmm_kernel's segment_entry must recover each entry's (row, column), and
# entries outside [N, K] must be rejected. Arrays are built the way effikern/sparse/formats.py builds them.
_PANELLED_CSR_HARNESS = r"""
#include "sparse_kernels.cu"
#include <cstdio>
#include <random>
#include <vector>
using namespace effikern::cuda::sparse;

// Panelled CSR of a [n, k] mask as formats.py _panelled builds it (entries in (major, minor) order).
struct Panelled { std::vector<int32_t> ptr, seg; std::vector<uint8_t> off; std::vector<int64_t> minor; };
static Panelled panelled(const std::vector<std::vector<int64_t>>& lists, int64_t width) {
  const int64_t p = csr_panels(width);
  Panelled out;
  out.ptr.assign(lists.size() * p + 1, 0);
  for (size_t r = 0; r < lists.size(); ++r)
    for (int64_t c : lists[r]) {
      const int64_t s = static_cast<int64_t>(r) * p + c / 256;
      ++out.ptr[s + 1];
      out.seg.push_back(static_cast<int32_t>(s));
      out.off.push_back(static_cast<uint8_t>(c % 256));
      out.minor.push_back(c);
    }
  for (size_t s = 1; s < out.ptr.size(); ++s) out.ptr[s] += out.ptr[s - 1];
  return out;
}

// The warp walk of csr_mm_kernel, lane by lane: every entry of every row must be visited once, at its column.
static bool walk(const Panelled& w, int64_t rows, int64_t width, const char* what) {
  const int64_t p = csr_panels(width);
  std::vector<int> seen(w.minor.size(), 0);
  for (int64_t o = 0; o < rows; ++o) {
    const int32_t* row_ptr = w.ptr.data() + o * p;
    for (int lane = 0; lane < 32; ++lane) {
      PanelCursor cursor(row_ptr, p);
      for (int64_t e = row_ptr[0] + lane; e < row_ptr[p]; e += 32) {
        const int64_t i = cursor.panel_of(e) * kCsrPanel + w.off[e];
        if (i != w.minor[e] || i >= p * kCsrPanel) {
          std::printf("%s: row %lld entry %lld at column %lld, expected %lld\n", what, (long long)o, (long long)e,
                      (long long)i, (long long)w.minor[e]);
          return false;
        }
        ++seen[e];
      }
    }
  }
  for (size_t e = 0; e < seen.size(); ++e)
    if (seen[e] != 1) { std::printf("%s: entry %zu visited %d times\n", what, e, seen[e]); return false; }
  return true;
}

int main() {
  std::mt19937_64 rng(7);
  const int64_t shapes[][2] = {{1, 1}, {3, 255}, {5, 256}, {7, 257}, {33, 700}, {64, 4096}, {300, 513}, {2, 70000}};
  const double densities[] = {0.0, 0.02, 0.1, 0.5, 1.0};
  int cases = 0;
  for (const auto& nk : shapes)
    for (double d : densities) {
      const int64_t n = nk[0], k = nk[1], p = csr_panels(k);
      std::bernoulli_distribution keep(d);
      std::vector<std::vector<int64_t>> by_row(n), by_col(k);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < k; ++c)
          if (keep(rng) || (d > 0 && r == 0 && c / 256 == p - 1)) {  // row 0 fills its last (partial) panel
            by_row[r].push_back(c);
            by_col[c].push_back(r);
          }
      const Panelled fwd = panelled(by_row, k), tr = panelled(by_col, n);
      if (!walk(fwd, n, k, "forward") || !walk(tr, k, n, "transposed")) return 1;
      // csr_sddmm_kernel's lookup from each entry's own segment.
      const uint32_t p32 = static_cast<uint32_t>(p);
      for (size_t e = 0, r = 0; r < by_row.size(); ++r)
        for (int64_t c : by_row[r]) {
          int64_t rr = -1, cc = -1;
          if (!segment_entry(fwd.seg[e], fwd.off[e], p32, n, k, &rr, &cc) || rr != static_cast<int64_t>(r) || cc != c) {
            std::printf("segment_entry(%d, %d) -> %lld, %lld; expected %zu, %lld\n", fwd.seg[e], fwd.off[e],
                        (long long)rr, (long long)cc, r, (long long)c);
            return 1;
          }
          ++e;
        }
      ++cases;
    }
  // Edges: P at least 1; entries outside [N, K] rejected; a clamped huge P still divides right; the cursor stops
  // at the row's last panel whatever e is.
  int64_t r, c;
  const int32_t ptr3[] = {0, 2, 2, 5};
  PanelCursor cursor(ptr3, 3);
  const bool ok = csr_panels(0) == 1 && csr_panels(256) == 1 && csr_panels(257) == 2 && csr_panels(4096) == 16 &&
                  !segment_entry(2 * 16, 0, 16, 2, 4096, &r, &c) && !segment_entry(-1, 0, 16, 2, 4096, &r, &c) &&
                  !segment_entry(1, 44, 2, 1, 300, &r, &c) && segment_entry(1, 43, 2, 1, 300, &r, &c) && c == 299 &&
                  segment_entry(5, 7, UINT32_MAX, 1, INT64_MAX, &r, &c) && r == 0 && c == 5 * 256 + 7 &&
                  cursor.panel_of(0) == 0 && cursor.panel_of(2) == 2 && cursor.panel_of(1 << 30) == 2;
  if (!ok) { std::printf("edge cases failed\n"); return 1; }
  std::printf("OK %d cases\n", cases);
  return 0;
}
"""


def test_panelled_csr_index_walk_on_host(tmp_path):
    if not os.path.isdir(os.path.join(ROOT, "csrc")):
        pytest.skip("not a source checkout")
    (tmp_path / "walk.cu").write_text(_PANELLED_CSR_HARNESS)
    # Host code is what runs: no CUDA call is made, so no GPU (or driver) is needed.
    cmd = [_nvcc(), "-std=c++17", "-O1", "-arch=sm_80", "-I", os.path.join(ROOT, "csrc", "cuda"),
           str(tmp_path / "walk.cu"), "-o", str(tmp_path / "walk")]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(tmp_path / "walk")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("OK"), run.stdout + run.stderr
