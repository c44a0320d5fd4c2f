#!/usr/bin/env bash
# The standard checks on a GPU machine. Run from the repository root there, e.g.
#   bash .device/checks.sh selftest bench
# Every section writes its full log under $OUT (or ./device-out) and a summary to stdout.
set -uo pipefail
out="${OUT:-device-out}"
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
bin=.device/hrm-cu
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.csv"
for section in "$@"; do
  echo "=== $section"
  case "$section" in
    selftest) timeout "${SECTION_TIMEOUT:-240}" "$bin" selftest 2>&1 | tee "$out/selftest.log" ;;
    bench) timeout "${SECTION_TIMEOUT:-240}" "$bin" bench kernels 2>&1 | tee "$out/bench.log" ;;
    bench-attention) timeout "${SECTION_TIMEOUT:-240}" "$bin" bench attention 2>&1 | tee "$out/bench-attention.log" ;;
    *) echo "unknown section $section"; false ;;
  esac
  rc=${PIPESTATUS[0]}
  [[ $rc -eq 0 ]] || { echo "--- $section failed with exit $rc"; status=1; }
done
exit $status
