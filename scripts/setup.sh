#!/usr/bin/env bash
# Sets up a fresh machine for effikern: a virtual environment in .venv, torch, triton, the test and bench
# tools, and the package itself built in place (the C++ extension, and CUDA kernels where torch has CUDA).
#
# Where torch is already importable (a GPU machine with its own CUDA torch), the venv reuses it through
# --system-site-packages rather than downloading another build. Otherwise it installs torch
# ${EFFIKERN_TORCH_SPEC:-torch==2.13.0} (the CPU build on our CI machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] reusing the system torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel 2>/dev/null || true
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${EFFIKERN_TORCH_SPEC:-torch==2.13.0}"
fi
python -c "import triton" 2>/dev/null || python -m pip install -q "triton>=3.6" || echo "[setup] triton unavailable: the triton backend will say so"
python -m pip install -q numpy pytest expecttest ninja matplotlib
# --no-build-isolation: the extension must compile against the torch installed above.
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation -e .
python -m effikern info
