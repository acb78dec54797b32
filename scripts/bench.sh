#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: the benchmark suite on whatever device is here.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m effikern bench "$@"
