#!/usr/bin/env bash
# Builds a wheel with the project's .venv, installs it into a fresh venv, and runs the test suite from a folder
# outside the source tree: proves nothing depends on the checkout. Slow (a second build): not part of CI.
#   bash scripts/check_wheel.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
. .venv/bin/activate
MAX_JOBS=${MAX_JOBS:-2} pip wheel -q --no-build-isolation --no-deps . -w "$work/dist"
deactivate
python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install -q "${EFFIKERN_TORCH_SPEC:-torch==2.13.0}" triton numpy pytest expecttest
pip install -q --no-deps "$work"/dist/effikern-*.whl
cp -r tests "$work/tests"
cd "$work"
python -c "import effikern, effikern._C, effikern.kernels, effikern.benchmarks; print('effikern from', effikern.__file__)"
CI=true pytest -q -p no:cacheprovider tests "$@"
