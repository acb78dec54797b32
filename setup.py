"""Builds the one compiled extension, ``effikern._C``.

What gets compiled (printed at build time):
- always: the C++ CPU kernels in ``csrc/cpu`` (``-O3``, OpenMP);
- CUDA kernels in ``csrc/cuda`` when torch is a CUDA build and ``nvcc`` is found, or ``FORCE_CUDA=1``;
- nothing at all with ``EFFIKERN_NO_EXT=1`` (pure Python: the ``torch`` and ``triton`` backends only).

``MAX_JOBS`` and ``TORCH_CUDA_ARCH_LIST`` are read by ``torch.utils.cpp_extension.BuildExtension``.
The Triton kernels (``kernels/``) and the benchmark suite (``benchmarks/``) are plain Python and ship
inside the wheel as ``effikern.kernels`` and ``effikern.benchmarks``.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["effikern", "effikern.ops", "effikern.nn", "effikern.data", "effikern.kernels", "effikern.benchmarks",
            "effikern.losses", "effikern.amp", "effikern.optim", "effikern.sparse"]
PACKAGE_DIR = {"effikern": "effikern", "effikern.kernels": "kernels", "effikern.benchmarks": "benchmarks"}


def _say(msg):
    print(f"[effikern setup] {msg}", file=sys.stderr)


def _sources(pattern):
    # Relative paths: setuptools rejects absolute source paths in some versions.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def _want_cuda(torch, cuda_home):
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if cuda_home is None or shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda} and nvcc in {cuda_home}"


def _extensions():
    if os.environ.get("EFFIKERN_NO_EXT", "0") == "1":
        _say("EFFIKERN_NO_EXT=1: building no extension (torch and triton backends only)")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden"]
    sources = _sources("csrc/bindings.cpp") + _sources("csrc/cpu/*.cpp")
    use_cuda, why = _want_cuda(torch, CUDA_HOME)
    if use_cuda:
        sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = CUDAExtension(
            "effikern._C",
            sources,
            define_macros=[("EFFIKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch default: the visible GPU, else all)")
        _say(f"building C++ CPU kernels + CUDA kernels ({why}); TORCH_CUDA_ARCH_LIST={arch}")
    else:
        ext = CppExtension("effikern._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        _say(f"building C++ CPU kernels only ({why})")
    _say(f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
