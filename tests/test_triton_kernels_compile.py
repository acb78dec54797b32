"""Triton kernels compile for sm_90 (H100) without a GPU: the interpreter tests check their arithmetic, this
checks that the real compiler accepts them (see tests/triton_compile.py)."""

import importlib.util
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.triton
def test_triton_kernels_compile_for_sm90():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, os.path.join(HERE, "triton_compile.py"), "90"], capture_output=True,
                         text=True, timeout=1200, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "OK:" in out.stdout
