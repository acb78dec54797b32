"""CUDA sources cannot run on CI (no GPU) but must compile there, so they cannot rot unseen.

Every csrc/**/*.cu is compiled with nvcc for sm_80 and sm_90, and the torch-side CUDA glue (csrc/cuda/*.cpp)
is syntax-checked against the installed torch headers: it includes no c10/cuda header precisely so that this
works with the CPU wheel.
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
