#!/usr/bin/env bash
# One call on a lent GPU machine (the `device` tool): builds the extension with CUDA for the GPU that is there,
# then runs the stages named on the command line, each with its own time limit, writing every log and result under
# $OUT (default ./gpu-out) so a stage that fails or runs out of time still leaves the others' output.
#
#   bash scripts/gpu_session.sh env build tests-sparse tests bench
#
# Stages, in the order given:
#   env           nvidia-smi, versions, a device-to-device copy and a bf16 GEMM: the two ceilings (METHOD.md)
#   build         pip install --no-build-isolation -e . for this GPU's arch (every later stage needs it on a
#                 fresh machine: the build does not survive the machine going idle)
#   tests-sparse  the panelled-CSR / 2:4 GPU kernel tests first (never run on a GPU before)
#   tests         every test marked gpu or triton, on the GPU
#   sanitize      compute-sanitizer memcheck, then racecheck (shared memory), over small CUDA-backend tests of each
#                 family: out-of-bounds accesses and races that a matching result can hide
#   bench         python -m effikern bench (quick) into $OUT/results; bench-full: the whole matrix
# A device call may run 600 s, and the build survives only while the machine stays warm (30 s idle), so plan
# e.g. `env build tests-sparse`, then `build tests`, then `build bench`; a warm rebuild is incremental.
# The machine has no network: nothing is installed but effikern itself (its python3 holds torch and triton).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: runs it, logs to $OUT/NAME.log, records its exit status
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  tail -n 5 "$OUT/$name.log"
  return 0
}

for s in "$@"; do
  case "$s" in
    env)
      stage env 120 bash -c "nvidia-smi; $PY - <<'EOF'
import torch, triton, time
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
p = torch.cuda.get_device_properties(0)
print(p.name, p.multi_processor_count, 'SMs', p.total_memory // 2**20, 'MiB')
src = torch.empty(2**30, dtype=torch.uint8, device='cuda').random_(); dst = torch.empty_like(src)
a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16); b = torch.randn_like(a)
for name, fn, work in [('copy GB/s (read+write)', lambda: dst.copy_(src), 2 * src.numel()),
                       ('bf16 GEMM TFLOP/s', lambda: a @ b, 2 * 8192**3)]:
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): fn()
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
    print(name, round(work / dt / 1e9 if 'GB' in name else work / dt / 1e12, 1))
EOF"
      ;;
    build)
      arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
      stage build 540 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
        $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .
      stage info 60 $PY -m effikern info
      ;;
    tests-sparse)
      stage tests-sparse 300 $PY -m pytest -q -rs -x --junitxml="$OUT/tests-sparse.xml" \
        tests/test_sparse_kernels_gpu.py tests/test_sparse_op.py tests/test_sparse_semi_structured.py -m "gpu or triton"
      ;;
    tests)
      stage tests 540 $PY -m pytest -q -rs --junitxml="$OUT/tests.xml" tests -m "gpu or triton"
      ;;
    sanitize)
      cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
      # Small cases only: every access is checked, so kernels run ~100x slower. --error-exitcode makes a finding
      # fail the stage even where pytest's own assertions pass.
      sel=(tests/test_dwsep_op.py::test_both_layouts tests/test_sparse_kernels_gpu.py::test_cuda_csr_kernels
           tests/test_sparse_kernels_gpu.py::test_cuda_bsr_kernels
           tests/test_amp_kernels_gpu.py::test_gpu_unscale_check_norm_large
           tests/test_amp_kernels_gpu.py::test_gpu_optimizers_large)
      stage sanitize-memcheck 280 "$cs" --tool memcheck --error-exitcode 99 --print-limit 20 \
        $PY -m pytest -q -x -m gpu -k "cuda" "${sel[@]}"
      stage sanitize-racecheck 280 "$cs" --tool racecheck --error-exitcode 99 --print-limit 20 \
        $PY -m pytest -q -x -m gpu -k "cuda" "${sel[@]:0:3}"
      ;;
    bench)
      stage bench 540 $PY -m effikern bench --out "$OUT/results"
      ;;
    bench-full)
      stage bench-full 580 $PY -m effikern bench --full --out "$OUT/results"
      ;;
    *)
      echo "unknown stage: $s" | tee -a "$OUT/summary.txt"
      ;;
  esac
done
echo "== summary"
cat "$OUT/summary.txt"
