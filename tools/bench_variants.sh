#!/usr/bin/env bash
# The three attention variants side by side, same GPU, same run: full training steps (forward,
# backward, grad clip, AdamW) of the baseline, Diff (V1) and Diff V2 at the same size, vocab
# 32000, seq 2048, micro-batch 8, random tokens. Prints tokens/s, peak memory and each variant's
# ratio to the baseline ([diff-v2]'s goal: V2 within 3% of the baseline).
#
#   bash tools/bench_variants.sh [SIZES] [--bin PATH] [--steps K] [--warmup W]
#
#   SIZES       comma list of 350M, 1.3B (default: both)
#   --bin PATH  the CUDA build of difftron (default: build-gpu/difftron)
#   --steps K   timed steps per model (default 10); --warmup W dropped first (default 2)
# Logs go to $OUT (or /tmp/bench_variants). Timing as tools/compare_pytorch.sh's difftron side.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=350M,1.3B
BIN=build-gpu/difftron
STEPS=10
WARMUP=2
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    -*) echo "bench_variants: unknown flag $1" >&2; exit 2 ;;
    *) SIZES=$1; shift ;;
  esac
done
[ -x "$BIN" ] || { echo "bench_variants: no difftron binary at $BIN" >&2; exit 2; }
OUTDIR=${OUT:-/tmp/bench_variants}
mkdir -p "$OUTDIR"
BATCH=8
SEQ=2048

size_flags() {
  case "$1" in
    350M) echo "--d_model=1024 --n_layers=24 --n_heads=8 --head_dim=64 --ffn_dim=2816" ;;
    1.3B) echo "--d_model=2048 --n_layers=24 --n_heads=8 --head_dim=128 --ffn_dim=5632" ;;
    *) echo "bench_variants: unknown size '$1' (350M, 1.3B)" >&2; return 1 ;;
  esac
}

printf "| size | variant | tokens/s | vs baseline | peak GiB |\n|---|---|---|---|---|\n" > "$OUTDIR/variants.md"
IFS=',' read -r -a SIZE_LIST <<< "$SIZES"
for s in "${SIZE_LIST[@]}"; do
  flags=$(size_flags "$s")
  base=""
  for a in standard diff diff_v2; do
    log="$OUTDIR/$s.$a.log"
    # shellcheck disable=SC2086
    if ! "$BIN" train --device=cuda --data=synthetic:copy --vocab_size=32000 --seq=$SEQ --batch=$BATCH \
        $flags --attention=$a --recompute=none --steps=$((WARMUP + STEPS)) --warmup=0 --log_every=1 \
        --eval_batches=1 > "$log" 2>&1; then
      echo "bench_variants: $s $a failed; last lines of $log:" >&2
      tail -n 8 "$log" >&2
      echo "| $s | $a | failed | - | - |" >> "$OUTDIR/variants.md"
      continue
    fi
    python3 tools/reference/report.py difftron-log "$log" "$WARMUP" "$BATCH" "$SEQ" "$OUTDIR/$s.$a.json" || true
    read -r tps mem < <(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("tokens_per_s") or 0, r.get("peak_gib") or 0)' "$OUTDIR/$s.$a.json")
    if [ "$a" = standard ]; then base=$tps; fi
    ratio=$(python3 -c "import sys; b=float(sys.argv[2] or 0); print(f'{float(sys.argv[1]) / b:.3f}x' if b > 0 else '-')" "$tps" "$base")
    printf "| %s | %s | %.0f | %s | %.2f |\n" "$s" "$a" "$tps" "$ratio" "$mem" >> "$OUTDIR/variants.md"
  done
done
echo "== bench_variants: $STEPS timed steps after $WARMUP warm-up, vocab 32000, seq $SEQ, micro-batch $BATCH, commit $(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
cat "$OUTDIR/variants.md"
