#!/usr/bin/env bash
# The GPU check, for any machine with an NVIDIA GPU: configures and builds difftron with
# CUDA (build dir ${BUILD_DIR:-build-gpu}), runs the CUDA tests (ctest -L cuda) and
# `difftron bench`, writes full logs to $OUT (or ./gpu-logs) and prints a short table last.
#   GPU_CHECK_TESTS=regex      only the CUDA tests matching it (ctest -R)
#   GPU_CHECK_BENCH_ARGS=...   extra flags for `difftron bench` (e.g. --bench_steps=false)
#   GPU_CHECK_SKIP_BENCH=1     tests only
#   GPU_CHECK_TARGETS="a b"    build only these targets (default: everything)
#   DATA=dir                   also run tools/scale_check.sh (the 1.3B model's whole life: train,
#                              SIGTERM + resume, HF export) on this prepared dataset (tools/bpe_dataset.py);
#                              skipped with a message without it, or with GPU_CHECK_SKIP_SCALE=1
# Exit status: 0 when the build, the tests, the bench and (when run) scale_check all succeeded.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-$PWD/gpu-logs}
BUILD_DIR=${BUILD_DIR:-build-gpu}
mkdir -p "$LOG_DIR"
# Machines without gflags/glog/OpenBLAS get them from the packed .devdeps (tools/pack_gpu_deps.sh).
if [ -f .devdeps/env.sh ]; then source .devdeps/env.sh; fi

now() { date +%s; }
nvidia-smi > "$LOG_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >> "$LOG_DIR/nvidia-smi.txt"
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)

t0=$(now)
build=ok
# keep going past failures (ninja -k 0): a broken unrelated target must not hide the CUDA results
{ cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release &&
  cmake --build "$BUILD_DIR" -j "$(nproc)" ${GPU_CHECK_TARGETS:+--target $GPU_CHECK_TARGETS} -- -k 0; } \
  > "$LOG_DIR/build.log" 2>&1 || build=FAILED
t1=$(now)
if [ "$build" != ok ]; then
  grep -E "error|Error" "$LOG_DIR/build.log" | head -20
  if ! ls "$BUILD_DIR"/test_cuda_* > /dev/null 2>&1; then
    echo "==== gpu_check: build FAILED after $((t1 - t0)) s, no CUDA test built (log: $LOG_DIR/build.log)"
    exit 1
  fi
  echo "==== gpu_check: build had failures (above); running what was built"
fi

tests=ok
(cd "$BUILD_DIR" && ctest -L cuda --verbose --timeout 600 ${GPU_CHECK_TESTS:+-R "$GPU_CHECK_TESTS"}) \
  > "$LOG_DIR/ctest.log" 2>&1 || tests=FAILED
cp "$BUILD_DIR/Testing/Temporary/LastTest.log" "$LOG_DIR/ctest-LastTest.log" 2>/dev/null || true
t2=$(now)

bench=skipped
if [ -z "${GPU_CHECK_SKIP_BENCH:-}" ]; then
  bench=ok
  if [ -x "$BUILD_DIR/difftron" ]; then
    "$BUILD_DIR/difftron" bench ${GPU_CHECK_BENCH_ARGS:-} > "$LOG_DIR/bench.log" 2>&1 || bench=FAILED
  else
    bench=FAILED
    echo "difftron was not built" > "$LOG_DIR/bench.log"
  fi
fi
t3=$(now)

scale=skipped
if [ -n "${GPU_CHECK_SKIP_SCALE:-}" ]; then
  scale_note="GPU_CHECK_SKIP_SCALE is set"
elif [ -z "${DATA:-}" ]; then
  scale_note="no DATA=<prepared dataset> given (tools/bpe_dataset.py makes one; see docs/TRAINING.md)"
elif [ ! -x "$BUILD_DIR/difftron" ]; then
  scale=FAILED
  scale_note="difftron was not built"
else
  scale=ok
  scale_note="table in $LOG_DIR/scale_check/summary.txt"
  DATA="$DATA" OUT="$LOG_DIR/scale_check" BIN="$BUILD_DIR/difftron" DEVICE=cuda bash tools/scale_check.sh \
    > "$LOG_DIR/scale_check.log" 2>&1 || scale=FAILED
fi
t4=$(now)

echo
echo "==== gpu_check $(date -u +%Y-%m-%dT%H:%MZ) on ${gpu_name:-unknown GPU}: logs in $LOG_DIR"
echo "build ${build} ($((t1 - t0)) s) | CUDA tests ${tests} ($((t2 - t1)) s) | bench ${bench} ($((t3 - t2)) s) | scale_check ${scale} ($((t4 - t3)) s)"
grep -E "tests passed|Passed|Failed|\*\*\*|Skipped" "$LOG_DIR/ctest.log" | grep -E "^ *[0-9]+/[0-9]+ Test|tests passed" || true
grep -E "FAIL|threw" "$LOG_DIR/ctest.log" | head -20 || true
if [ "$bench" != skipped ]; then
  # the bench table: header, ceilings, ops, steps
  grep -E "^(op |ceiling|matmul|rmsnorm|rope|swiglu|embedding|cross_entropy|adamw|copy|sum_squares|axpy|scale|diff_attention|attention|step )" \
    "$LOG_DIR/bench.log" || true
  if [ "$bench" = FAILED ]; then tail -5 "$LOG_DIR/bench.log"; fi
fi
echo "scale_check ${scale}: ${scale_note}"
if [ "$scale" != skipped ]; then
  # the table (or, when it never came, the script's last lines)
  if [ -f "$LOG_DIR/scale_check/summary.txt" ]; then cat "$LOG_DIR/scale_check/summary.txt"; else tail -15 "$LOG_DIR/scale_check.log"; fi
fi
[ "$build" = ok ] && [ "$tests" = ok ] && [ "$bench" != FAILED ] && [ "$scale" != FAILED ]
