#!/usr/bin/env bash
# The main job: install, build, tokenise real English text (the Debian linux-doc package,
# or any files given in CORPUS), train a small Differential Transformer on it (GPU when
# present, else CPU) and sample from it. Environment knobs: CORPUS, STEPS, DEVICE, OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/build.sh
BIN=${BUILD_DIR:-build}/difftron
CORPUS=${CORPUS:-/usr/share/doc/linux-doc}
OUT=${OUT:-data/linux-doc}
DEVICE=${DEVICE:-auto}

if [ ! -d "$OUT/train" ]; then
  "$BIN" prepare --input="$CORPUS" --out="$OUT" --tokenizer=bytes --val_fraction=0.01
fi
"$BIN" inspect "$OUT/train" | head -20

if [ "$DEVICE" = cuda ] || { [ "$DEVICE" = auto ] && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
  # one GPU: a ~100M-parameter model, a few minutes
  STEPS=${STEPS:-2000}
  "$BIN" train --device=cuda --data="$OUT/train" --val_data="$OUT/val" --d_model=768 --n_layers=12 \
    --n_heads=6 --seq=1024 --batch=16 --steps="$STEPS" --lr=1e-3 --warmup=100 --log_every=50 \
    --eval_every=500 --sample_tokens=400 --sample_prompt="The kernel" --ckpt_dir=runs/linux-doc-gpu
else
  # CPU: a ~1M-parameter byte-level model, about five minutes on two cores
  STEPS=${STEPS:-600}
  "$BIN" train --device=cpu --data="$OUT/train" --val_data="$OUT/val" --d_model=128 --n_layers=4 \
    --n_heads=2 --seq=128 --batch=16 --steps="$STEPS" --lr=2e-3 --warmup=50 --log_every=25 \
    --eval_every=200 --sample_tokens=300 --sample_prompt="The kernel" --ckpt_dir=runs/linux-doc-cpu
fi
