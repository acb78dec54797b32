#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite. Without a GPU, Triton kernels run through the
# interpreter and GPU tests are skipped; CUDA sources are compile-checked with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec pytest -q -rs "$@"
