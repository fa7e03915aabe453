#!/usr/bin/env bash
# Runs the CPU test suite (an existing build in ${BUILD_DIR:-build}) under each OpenBLAS
# kernel family this processor can execute and with 1 and 2 OpenMP threads, and prints one
# line per setting: the evidence that no tolerance depends on one machine's rounding
# (docs/NOTES.md records the matrix). Usage: bash tools/blas_matrix.sh [ctest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
flags=$(grep -m1 '^flags' /proc/cpuinfo)
cores=(Prescott Haswell Zen)
[[ $flags == *avx512f* ]] && cores+=(SkylakeX)
status=0
for core in "${cores[@]}"; do
  for threads in 1 2; do
    log=$(mktemp)
    if (cd "$BUILD_DIR" && OPENBLAS_CORETYPE=$core OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads \
          ctest -j 2 --timeout 900 "$@" >"$log" 2>&1); then
      echo "OPENBLAS_CORETYPE=$core OMP_NUM_THREADS=$threads: $(grep -E 'tests passed' "$log")"
    else
      status=1
      echo "OPENBLAS_CORETYPE=$core OMP_NUM_THREADS=$threads: FAILED"
      grep -E 'Failed|Failure|Expected|actual|Which is|bound' "$log" | head -40
    fi
    rm -f "$log"
  done
done
exit $status
