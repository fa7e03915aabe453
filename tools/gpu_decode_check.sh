#!/usr/bin/env bash
# GPU decode speed of `difftron generate` (K/V cache, core/decode.h) next to Hugging Face
# transformers' generate, on the same exported folder, in the same run (docs/GENERATION.md).
# The 1.3B Diff model (d 2048, L 24, h 8, dh 128, ffn 5632, vocab 32000), random weights from
# a 1-step `difftron train` on synthetic data, exported with `convert --to_hf --dtype=bf16`;
# both engines load that folder in bf16 and generate greedily, batch 1 and 8, from the same
# 128-token prompt, exactly 256 new tokens (eos ignored), after one untimed warm-up run each.
# Prints a table; ratio = transformers' time / difftron's (> 1: difftron is faster).
# Usage (GPU machine, torch + transformers installed, build-gpu/difftron built):
#   bash tools/gpu_decode_check.sh
# Env: BUILD_DIR (default build-gpu), WORK (default /tmp/decode_check_1p3b), PYTHON (python3),
#      BATCHES (default "1 8"), PROMPT_TOKENS (128), NEW_TOKENS (256).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build-gpu}
WORK=${WORK:-/tmp/decode_check_1p3b}
PYTHON=${PYTHON:-python3}
BATCHES=${BATCHES:-"1 8"}
PROMPT_TOKENS=${PROMPT_TOKENS:-128}
NEW_TOKENS=${NEW_TOKENS:-256}
BIN=$BUILD_DIR/difftron

die() { echo "gpu_decode_check: error: $*" >&2; exit 1; }
[ -x "$BIN" ] || die "$BIN not found or not executable: build it first (cmake --build $BUILD_DIR --target difftron)"
"$PYTHON" -c "import torch, transformers" 2>/dev/null || die "$PYTHON cannot import torch and transformers"
"$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null || die "torch sees no GPU"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
mkdir -p "$WORK"
LOG=$WORK/logs
mkdir -p "$LOG"

# 1. the checkpoint: random init, one step on synthetic data (seq 512 >= prompt + new tokens)
SEQ=$(( PROMPT_TOKENS + NEW_TOKENS > 512 ? PROMPT_TOKENS + NEW_TOKENS : 512 ))
rm -rf "$WORK/ck" "$WORK/hf"
echo "== train 1 step (1.3B, seq $SEQ) -> $WORK/ck"
"$BIN" train --device=cuda --data=synthetic:copy --vocab_size=32000 --d_model=2048 --n_layers=24 --n_heads=8 \
  --head_dim=128 --ffn_dim=5632 --seq="$SEQ" --batch=1 --steps=1 --warmup=0 --log_every=1 \
  --ckpt_dir="$WORK/ck" > "$LOG/train.log" 2>&1 || { tail -20 "$LOG/train.log"; die "train failed (log: $LOG/train.log)"; }

# 2. the export both engines read
echo "== convert --to_hf --dtype=bf16 -> $WORK/hf"
"$BIN" convert --checkpoint="$WORK/ck" --to_hf="$WORK/hf" --dtype=bf16 > "$LOG/convert.log" 2>&1 ||
  { tail -20 "$LOG/convert.log"; die "convert failed (log: $LOG/convert.log)"; }
[ -f "$WORK/hf/config.json" ] || die "$WORK/hf/config.json missing after convert"

# 3. the prompt: PROMPT_TOKENS fixed pseudo-random ids
PROMPT=$("$PYTHON" -c "import random; r = random.Random(7); print(','.join(str(r.randrange(32000)) for _ in range($PROMPT_TOKENS)))")

cat > "$WORK/hf_generate.py" <<'PY'
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
folder, prompt, batch, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = [int(x) for x in prompt.split(",")]
model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda").eval()
x = torch.tensor([ids] * batch, device="cuda")
mask = torch.ones_like(x)
kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
          num_beams=1, use_cache=True)
with torch.inference_mode():
    model.generate(x, **kw)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(x, **kw)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
gen = out[:, len(ids):]
print(json.dumps({"seconds": dt, "new_tokens": int(gen.numel()), "attn": getattr(model.config, "_attn_implementation", "?"),
                  "tokens": gen[0].tolist()}))
PY

rows=()
for B in $BATCHES; do
  ids=$PROMPT
  for ((i = 1; i < B; ++i)); do ids="$ids;$PROMPT"; done
  echo "== batch $B: difftron generate"
  "$BIN" generate --device=cuda --from_hf="$WORK/hf" --prompt_ids="$ids" --max_new_tokens="$NEW_TOKENS" \
    --temperature=0 --ignore_eos --warmup_runs=1 --json > "$LOG/difftron_b$B.out" 2> "$LOG/difftron_b$B.log" ||
    { tail -20 "$LOG/difftron_b$B.log"; die "difftron generate failed (log: $LOG/difftron_b$B.log)"; }
  grep "tokens/s" "$LOG/difftron_b$B.log" || true
  dj=$(grep '^{"batch"' "$LOG/difftron_b$B.out") || die "no JSON line in $LOG/difftron_b$B.out"
  echo "== batch $B: transformers generate"
  hj=$("$PYTHON" "$WORK/hf_generate.py" "$WORK/hf" "$PROMPT" "$B" "$NEW_TOKENS" 2> "$LOG/hf_b$B.log" | tail -1) ||
    { tail -20 "$LOG/hf_b$B.log"; die "transformers generate failed (log: $LOG/hf_b$B.log)"; }
  rows+=("$("$PYTHON" - "$B" "$dj" "$hj" <<'PY'
import json, sys
b, d, h = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
dt = d["prefill_seconds"] + d["decode_seconds"]
new = d["generated_tokens"]
same = 0
for a, c in zip(d["sequences"][0]["tokens"], h["tokens"]):
    if a != c:
        break
    same += 1
print(f"| {b} | {new} | {dt:.3f} | {new / dt:.1f} | {d['prompt_tokens_per_s']:.0f} | {d['decode_tokens_per_s']:.1f} | "
      f"{h['seconds']:.3f} | {h['new_tokens'] / h['seconds']:.1f} ({h['attn']}) | {h['seconds'] / dt:.2f} | {same} |")
PY
)")
done

echo
echo "1.3B Diff, bf16, prompt $PROMPT_TOKENS tokens, $NEW_TOKENS new tokens per sequence, greedy; times include the prompt"
echo "| batch | new tokens | difftron s | difftron new tok/s | difftron prompt tok/s | difftron decode tok/s | transformers s | transformers new tok/s (attention) | ratio (hf s / difftron s) | equal leading greedy tokens |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for r in "${rows[@]}"; do echo "$r"; done
echo
echo "logs: $LOG"
