#!/usr/bin/env bash
# The life of a large run on one GPU, whole: the 1.3B Diff model (d 2048, L 24, h 8, dh 128,
# ffn 5632, vocab 32000, seq 2048, micro-batch 8) trains, saves a checkpoint mid-run and at
# the end, and a second process resumes from it. Prints the phases from the program's own
# log: start-up to the first step, the save stall (what the step loop waited for), the write,
# and the resume. Usage (GPU machine, after source .devdeps/env.sh):
#   bash tools/gpu_ckpt_1p3b.sh [extra train flags]
# Env: BUILD_DIR (default build-gpu), CKPT_ROOT (default /tmp/ckpt_1p3b), OUT (logs).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-gpu}
LOG_DIR=${OUT:-$PWD/gpu-logs}
ROOT=${CKPT_ROOT:-/tmp/ckpt_1p3b}
mkdir -p "$LOG_DIR"
if [ ! -x "$BUILD_DIR/difftron" ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release > "$LOG_DIR/build.log" 2>&1 &&
    cmake --build "$BUILD_DIR" -j "$(nproc)" --target difftron >> "$LOG_DIR/build.log" 2>&1 ||
    { tail -30 "$LOG_DIR/build.log"; exit 1; }
fi
rm -rf "$ROOT"
model="--device=cuda --data=synthetic:copy --vocab_size=32000 --d_model=2048 --n_layers=24 --n_heads=8 \
  --head_dim=128 --ffn_dim=5632 --seq=2048 --batch=8 --log_every=1 --warmup=2 --ckpt_keep=1 --ckpt_dir=$ROOT"
run() {  # name, flags
  local name=$1; shift
  local t0=$(date +%s.%N)
  "$BUILD_DIR/difftron" train $model "$@" > "$LOG_DIR/$name.log" 2>&1
  local rc=$?
  local t1=$(date +%s.%N)
  awk -v n="$name" -v rc="$rc" -v a="$t0" -v b="$t1" 'BEGIN { printf "%s: rc %d, %.1f s wall\n", n, rc, b - a }'
  grep -E "backend|step +[0-9]+/|checkpoint|resumed|snapshot|written|error|Error|phase|start-up" "$LOG_DIR/$name.log" |
    sed -E 's/^[IWE][0-9]{8} //' | cut -c1-220
  return $rc
}
run fresh --steps=4 --ckpt_every=2 "$@" || exit 1
du -sh "$ROOT"/step_* 2>/dev/null
run resumed --steps=6 "$@" || exit 1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
