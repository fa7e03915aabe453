#!/usr/bin/env bash
# The main job: install, build the `difftron` program (only it: the tests are built by
# tools/run_tests.sh), tokenise real English text (the Debian linux-doc package, or any files
# given in CORPUS), train a small Differential Transformer on it (GPU when present, else CPU),
# sample from it and draw the run's loss curves. Without a GPU the build is CPU-only, so that
# nvcc does not spend minutes on kernels nothing will run; a build folder already configured
# with CUDA (by the tests) is kept as it is. Environment knobs: CORPUS, STEPS, DEVICE
# (auto, cpu or cuda), OUT (the dataset), BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
BIN=$BUILD_DIR/difftron
CORPUS=${CORPUS:-/usr/share/doc/linux-doc}
OUT=${OUT:-data/linux-doc}
DEVICE=${DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi

bash tools/setup.sh
cuda=ON
if [ "$DEVICE" = cpu ] && ! grep -qs '^DIFFTRON_CUDA:BOOL=ON' "$BUILD_DIR/CMakeCache.txt"; then cuda=OFF; fi
BUILD_TARGETS=difftron DIFFTRON_CUDA=$cuda BUILD_DIR=$BUILD_DIR bash tools/build.sh

if [ ! -d "$OUT/train" ]; then
  "$BIN" prepare --input="$CORPUS" --out="$OUT" --tokenizer=bytes --val_fraction=0.01
fi
"$BIN" inspect "$OUT/train" | head -20

if [ "$DEVICE" = cuda ]; then
  # one GPU: a ~100M-parameter model, a few minutes
  RUN=runs/linux-doc-gpu
  STEPS=${STEPS:-2000}
  "$BIN" train --device=cuda --data="$OUT/train" --val_data="$OUT/val" --d_model=768 --n_layers=12 \
    --n_heads=6 --seq=1024 --batch=16 --steps="$STEPS" --lr=1e-3 --warmup=100 --log_every=50 \
    --eval_every=500 --sample_tokens=400 --sample_prompt="The kernel" --ckpt_dir="$RUN"
else
  # CPU: a ~1M-parameter byte-level model, about five minutes on two idle cores
  RUN=runs/linux-doc-cpu
  STEPS=${STEPS:-600}
  "$BIN" train --device=cpu --data="$OUT/train" --val_data="$OUT/val" --d_model=128 --n_layers=4 \
    --n_heads=2 --seq=128 --batch=16 --steps="$STEPS" --lr=2e-3 --warmup=50 --log_every=25 \
    --eval_every=200 --sample_tokens=300 --sample_prompt="The kernel" --ckpt_dir="$RUN"
fi

# The run's record (RUN/metrics.jsonl, docs/TRAINING.md) drawn: loss and tokens/s against tokens.
if "$BIN" plot --runs="$RUN" --out="$RUN/loss.png"; then
  echo "main job: the sample is above; the run's plot: $RUN/loss.png (metrics: $RUN/metrics.jsonl)"
else
  echo "main job: the sample is above; no plot (gnuplot missing?); metrics: $RUN/metrics.jsonl"
fi
