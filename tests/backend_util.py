"""Which device a backend's test runs on, and skipping (or, in CI, failing) when the backend is missing."""

import os

import pytest
import torch

import effikern


def device_for(backend: str) -> str:
    """cuda for the cuda backend, and for triton when a GPU is present; else cpu (triton via the interpreter)."""
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def skip_unavailable(backend: str, device: str) -> None:
    """Skips a test whose backend cannot run here. On CI the cpp and interpreted triton backends must run:
    a missing build there is a failure, not a skip that would hide it."""
    why = effikern.backends.unavailable_reason(backend, device)
    if why:
        if os.environ.get("CI") and backend in ("cpp", "triton") and device == "cpu":
            pytest.fail(f"backend {backend} must be available in CI: {why}")
        pytest.skip(why)


class tf32_flags:
    """Sets cuDNN's and cuBLAS's legacy allow_tf32 flags for a block and restores them."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved
