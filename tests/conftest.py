"""Test setup shared by every test file.

Without a GPU, Triton kernels run on CPU tensors through the interpreter, which must be switched on
before triton is first imported: hence here, at the top of the first file pytest loads.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from backend_util import tf32_flags  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def poisoned_outputs():
    """Every tensor allocated with torch.empty (kernel outputs included) starts as NaN, so an element a
    kernel forgets to write shows up as NaN instead of passing by luck."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture
def avx512_auto_table(monkeypatch):
    """auto reads the measurements of the AVX-512 CPU class (effikern/_auto.py cpu_class), whatever this CPU is:
    for tests of particular decisions in that table."""
    from effikern import _auto

    monkeypatch.setattr(_auto, "cpu_class", lambda: "avx512")


@pytest.fixture(autouse=True)
def _seed_from_test_name(request):
    """Every test draws its random inputs from a seed derived from its own name, so a failure on CI
    reproduces with the same inputs here (run the one test by its node id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _ieee_fp32_on_gpu():
    """fp32 on a GPU is compared in IEEE arithmetic: with TF32 on (cuDNN convolutions' default) a kernel's dots
    err by ~1e-4 while cuDNN may pick a non-TF32 kernel for the tests' tiny convolutions (error ~1e-7), and the
    oracle's bound (twice PyTorch's own error) would fail a correct kernel. Tests of the TF32 path set the flags
    themselves (backend_util.tf32_flags)."""
    if not torch.cuda.is_available():
        yield
        return
    with tf32_flags(False):
        yield

