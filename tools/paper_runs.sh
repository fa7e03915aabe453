#!/usr/bin/env bash
# The [paper] experiments (docs/RESULTS.md), with difftron's own commands only: matched
# baseline / Diff / Diff V2 language models on one prepared dataset, then `difftron eval` for
# the paper's other claims on the trained checkpoints.
#
#   bash tools/paper_runs.sh --data DIR [--part seeds|main|all] [--out DIR] [--bin PATH]
#
#   --data DIR    a dataset from tools/bpe_dataset.py (DIR/train, DIR/val, DIR/tokenizer.json);
#                 the needle-mixture one is made as docs/RESULTS.md says
#   --part        seeds: SEEDS seeds of each variant (VARIANTS_SEEDS) at the small size;
#                 main: one run of each variant (VARIANTS_MAIN) at the main size, then the eval
#                 tasks (loss on the whole validation split, activations, quant, needles, noise)
#   --out DIR     run roots, logs and results.jsonl (default: $OUT/paper when $OUT is set, else
#                 runs/paper)
# The sizes and schedules are variables (defaults: the runs of docs/RESULTS.md on one H200);
# a CPU smoke run sets them small, e.g.
#   DEVICE=cpu MAIN_FLAGS="--d_model=64 --n_layers=2 --n_heads=2 --head_dim=16 --ffn_dim=128"
#   SMALL_FLAGS="$MAIN_FLAGS" SEQ=128 BATCH=4 MAIN_STEPS=20 SMALL_STEPS=10 ...
# Every result is one JSON line in OUT/results.jsonl: {"part", "variant", "seed", "what", ...}.
set -uo pipefail
cd "$(dirname "$0")/.."

DATA=""
PART=all
OUTDIR=${OUT:+$OUT/paper}
OUTDIR=${OUTDIR:-runs/paper}
BIN=${BIN:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --part) PART=$2; shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    *) echo "paper_runs: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
die() { echo "paper_runs: error: $*" >&2; exit 1; }
[ -n "$DATA" ] || die "--data DIR is required"
for f in "$DATA/train" "$DATA/val" "$DATA/tokenizer.json"; do [ -e "$f" ] || die "$f is missing (make the dataset with tools/bpe_dataset.py)"; done
case "$PART" in seeds|main|all) ;; *) die "--part must be seeds, main or all, not '$PART'" ;; esac
if [ -z "$BIN" ]; then
  for b in build-gpu/difftron build/difftron; do [ -x "$b" ] && { BIN=$b; break; }; done
fi
[ -x "$BIN" ] || die "no difftron binary (give --bin PATH)"

DEVICE=${DEVICE:-cuda}
SEQ=${SEQ:-1024}
BATCH=${BATCH:-32}
LR=${LR:-1e-3}
# main: 134M parameters (d 768, 12 layers; baseline 12 heads of 64), one pass over the data
MAIN_FLAGS=${MAIN_FLAGS:---d_model=768 --n_layers=12 --n_heads=6 --head_dim=64 --ffn_dim=2048}
MAIN_STEPS=${MAIN_STEPS:-1400}
MAIN_WARMUP=${MAIN_WARMUP:-100}
VARIANTS_MAIN=${VARIANTS_MAIN:-standard diff}
# small: 35M parameters (d 384, 6 layers), SEEDS seeds of each variant
SMALL_FLAGS=${SMALL_FLAGS:---d_model=384 --n_layers=6 --n_heads=3 --head_dim=64 --ffn_dim=1024}
SMALL_STEPS=${SMALL_STEPS:-300}
SMALL_WARMUP=${SMALL_WARMUP:-30}
SEEDS=${SEEDS:-1 2 3}
VARIANTS_SEEDS=${VARIANTS_SEEDS:-standard diff diff_v2}
EVAL_EVERY=${EVAL_EVERY:-100}
# eval tasks on the main checkpoints
NEEDLE_LENGTHS=${NEEDLE_LENGTHS:-512,768,1000}  # at most SEQ - 10 (the answer is generated within the context)
NEEDLE_SAMPLES=${NEEDLE_SAMPLES:-10}
NEEDLE_COUNT=${NEEDLE_COUNT:-6}      # N needles in each context, NEEDLE_QUERIES of them asked for
NEEDLE_QUERIES=${NEEDLE_QUERIES:-2}
STAT_TOKENS=${STAT_TOKENS:-8192}
STATS_DATA=${STATS_DATA:-$DATA/val}  # the dataset whose first sequences activations and quant read
SEED_TASKS=${SEED_TASKS:-loss}       # eval tasks of the seed runs: loss activations quant needles noise
LOSS_TOKENS=${LOSS_TOKENS:-0}  # validation tokens of the final loss (0: the whole split)

mkdir -p "$OUTDIR"
RESULTS=$OUTDIR/results.jsonl
log() { echo "[paper $(date +%H:%M:%S) +$((SECONDS))s] $*"; }

# record PART VARIANT SEED WHAT FILE: each JSON line of FILE (or its metrics.jsonl eval/end
# records) goes to results.jsonl with the run's labels
record() {
  python3 - "$@" >> "$RESULTS" << 'EOF'
import json, sys
part, variant, seed, what, path = sys.argv[1:6]
for line in open(path, errors="replace"):
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if what == "train" and r.get("event") not in ("eval", "end", "start"):
        continue
    if what == "train" and r.get("event") == "start":
        r = {"event": "start", "parameters": r.get("parameters"), "model_config": r.get("model_config"),
             "tokens_per_step": r.get("tokens_per_step"), "command_line": r.get("command_line")}
    r.update(part=part, variant=variant, seed=int(seed), what=what)
    print(json.dumps(r))
EOF
}

# train PART VARIANT SEED STEPS WARMUP FLAGS...: one run into OUTDIR/PART-VARIANT-sSEED
train() {
  local part=$1 variant=$2 seed=$3 steps=$4 warmup=$5
  shift 5
  local root=$OUTDIR/$part-$variant-s$seed
  rm -rf "$root"
  log "train $part $variant seed $seed: $steps steps of $BATCH x $SEQ tokens"
  # shellcheck disable=SC2068
  if ! "$BIN" train --device="$DEVICE" --data="$DATA/train" --val_data="$DATA/val" $@ \
      --attention="$variant" --seq="$SEQ" --batch="$BATCH" --steps="$steps" --warmup="$warmup" \
      --lr="$LR" --seed="$seed" --eval_every="$EVAL_EVERY" --eval_batches=8 --log_every=50 \
      --ckpt_dir="$root" > "$OUTDIR/$part-$variant-s$seed.train.log" 2>&1; then
    log "train $part $variant seed $seed FAILED; last lines:"
    tail -n 5 "$OUTDIR/$part-$variant-s$seed.train.log"
    return 1
  fi
  record "$part" "$variant" "$seed" train "$root/metrics.jsonl"
  grep -E "step +$steps/" "$OUTDIR/$part-$variant-s$seed.train.log" | tail -1 | sed 's/^.*\] /  /'
}

# evaluate PART VARIANT SEED TASK FLAGS...
evaluate() {
  local part=$1 variant=$2 seed=$3 task=$4
  shift 4
  local root=$OUTDIR/$part-$variant-s$seed out=$OUTDIR/$part-$variant-s$seed.$task.txt
  local t0=$SECONDS
  # shellcheck disable=SC2068
  if "$BIN" eval --device="$DEVICE" --checkpoint="$root" --task="$task" --seq="$SEQ" $@ > "$out" 2> "$out.err"; then
    record "$part" "$variant" "$seed" "$task" "$out"
    log "eval $task $part $variant seed $seed: $((SECONDS - t0)) s"
  else
    log "eval $task $part $variant seed $seed FAILED; last lines:"
    tail -n 3 "$out.err"
  fi
}

# eval_tasks PART VARIANT SEED TASK...: the named eval tasks on that run's checkpoint
eval_tasks() {
  local part=$1 variant=$2 seed=$3 task
  shift 3
  for task in "$@"; do
    case "$task" in
      loss) evaluate "$part" "$variant" "$seed" loss --data="$DATA/val" --batch=8 --max_tokens="$LOSS_TOKENS" ;;
      activations) evaluate "$part" "$variant" "$seed" activations --data="$STATS_DATA" --batch=4 --max_tokens="$STAT_TOKENS" ;;
      quant) evaluate "$part" "$variant" "$seed" quant --data="$STATS_DATA" --batch=4 --max_tokens="$STAT_TOKENS" --bits=8,6,4,3 --quant_logits ;;
      needles) evaluate "$part" "$variant" "$seed" needles --needles_file="$OUTDIR/needles_eval.jsonl" --batch=8 ;;
      noise) evaluate "$part" "$variant" "$seed" noise --needles_file="$OUTDIR/needles_eval.jsonl" --batch=8 ;;
      *) die "unknown eval task '$task'" ;;
    esac
  done
}

"$BIN" needles --needle_out="$OUTDIR/needles_eval.jsonl" --needle_tokenizer="$DATA/tokenizer.json" \
  --needle_lengths="$NEEDLE_LENGTHS" --needle_samples="$NEEDLE_SAMPLES" --needle_count="$NEEDLE_COUNT" \
  --needle_queries="$NEEDLE_QUERIES" --needle_seed=7 > /dev/null ||
  die "difftron needles failed"

if [ "$PART" = seeds ] || [ "$PART" = all ]; then
  for v in $VARIANTS_SEEDS; do
    for s in $SEEDS; do
      # shellcheck disable=SC2086
      train small "$v" "$s" "$SMALL_STEPS" "$SMALL_WARMUP" $SMALL_FLAGS && eval_tasks small "$v" "$s" $SEED_TASKS
      rm -rf "$OUTDIR/small-$v-s$s"/step_* "$OUTDIR/small-$v-s$s"/latest  # keep the records, not the weights
    done
  done
fi

if [ "$PART" = main ] || [ "$PART" = all ]; then
  for v in $VARIANTS_MAIN; do
    # shellcheck disable=SC2086
    train main "$v" 1 "$MAIN_STEPS" "$MAIN_WARMUP" $MAIN_FLAGS || continue
    eval_tasks main "$v" 1 loss activations quant needles noise
  done
fi
log "done; results in $RESULTS"
