#!/usr/bin/env bash
# difftron vs the PyTorch reference (tools/reference/) on the same GPU, in the same run: full
# training steps (forward, backward, grad clip, AdamW) at vocab 32000, seq 2048, micro-batch 8
# on random tokens, for the Diff and baseline models at 1.3B and 350M. Prints a table with the
# ratio difftron / PyTorch (> 1: difftron is faster) and writes it as markdown and JSON.
#
#   bash tools/compare_pytorch.sh [--quick] [--out DIR] [--models LIST] [--bin PATH]
#                                 [--python PY] [--part_timeout S] [--pytorch_args "ARGS"]
#                                 [--recompute MODE]
#
#   --quick           fewer steps (2 warm-up + 5 timed instead of 3 + 20): a smoke run
#   --out DIR         where the logs and compare.md / compare.json go (default: $OUT when set,
#                     else /tmp/compare_pytorch)
#   --models LIST     comma-separated, from diff-1.3B,base-1.3B,diff-350M,base-350M (default: all)
#   --bin PATH        the CUDA build of difftron (default: build-gpu/difftron, else build/difftron)
#   --python PY       the python with torch (default: python3)
#   --part_timeout S  limit of each part (one model on one side), seconds (default 240; quick 150)
#   --pytorch_args A  extra flags for tools/reference/bench.py (e.g. "--compile=full --sdpa=cudnn")
#   --recompute MODE  difftron's activation recomputation: none (default), selective, full
#                     (torch.compile's partitioner may itself recompute cheap element-wise ops)
#
# Both sides are timed the same way: W warm-up steps are dropped (difftron's first steps, the
# PyTorch side's compile), then the tokens of K steps over the time of those K steps (PyTorch:
# torch.cuda.synchronize() before and after the K steps; difftron: `train --log_every=1`, each
# logged step's tok/s measured between synchronisations). Peak memory: difftron's own allocator
# statistics (its log's "mem"), PyTorch's torch.cuda.max_memory_allocated() over the timed steps.
# Where torch or a GPU is missing, it prints SKIP and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

ARGS_GIVEN="$*"
QUICK=0
OUTDIR=${OUT:-/tmp/compare_pytorch}
MODELS=diff-1.3B,base-1.3B,diff-350M,base-350M
BIN=""
PY=${PYTHON:-python3}
PART_TIMEOUT=""
PT_ARGS=""
RECOMPUTE=none

die() { echo "compare_pytorch: error: $*" >&2; exit 1; }
skip() { echo "compare_pytorch: SKIP: $*"; exit 0; }

while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUTDIR=${2:?--out needs a directory}; shift ;;
    --out=*) OUTDIR=${1#*=} ;;
    --models) MODELS=${2:?--models needs a list}; shift ;;
    --models=*) MODELS=${1#*=} ;;
    --bin) BIN=${2:?--bin needs a path}; shift ;;
    --bin=*) BIN=${1#*=} ;;
    --python) PY=${2:?--python needs a command}; shift ;;
    --python=*) PY=${1#*=} ;;
    --part_timeout) PART_TIMEOUT=${2:?--part_timeout needs seconds}; shift ;;
    --part_timeout=*) PART_TIMEOUT=${1#*=} ;;
    --pytorch_args) PT_ARGS=${2?--pytorch_args needs a string}; shift ;;
    --pytorch_args=*) PT_ARGS=${1#*=} ;;
    --recompute) RECOMPUTE=${2:?--recompute needs a mode}; shift ;;
    --recompute=*) RECOMPUTE=${1#*=} ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

if [ "$QUICK" = 1 ]; then WARMUP=2; STEPS=5; else WARMUP=3; STEPS=20; fi
PART_TIMEOUT=${PART_TIMEOUT:-$([ "$QUICK" = 1 ] && echo 150 || echo 240)}
case "$PART_TIMEOUT" in ''|*[!0-9]*) die "--part_timeout must be a whole number of seconds" ;; esac
BATCH=8
SEQ=2048
VOCAB=32000

# --- what this needs: torch with a GPU, a CUDA build of difftron --------------------------------
command -v "$PY" > /dev/null || skip "'$PY' not found: the PyTorch side needs python with torch"
"$PY" -c "import torch" 2> /dev/null || skip "$PY cannot import torch: install torch (the GPU machine has it)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null ||
  skip "torch sees no CUDA GPU here: this comparison runs on the GPU machine"
if [ -z "$BIN" ]; then
  for b in build-gpu/difftron build/difftron; do [ -x "$b" ] && { BIN=$b; break; }; done
fi
{ [ -n "$BIN" ] && [ -x "$BIN" ]; } ||
  die "no difftron binary (looked for build-gpu/difftron, build/difftron): build the CUDA one with" \
      "'BUILD_DIR=build-gpu bash tools/build.sh' or name it with --bin"
command -v timeout > /dev/null || die "'timeout' (coreutils) not found"

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
REPORT=tools/reference/report.py
rm -f "$OUTDIR"/*.difftron.json "$OUTDIR"/*.pytorch.json "$OUTDIR"/compare.md "$OUTDIR"/compare.json

GPU=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2> /dev/null | head -1 || true)
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "GPU: ${GPU:-$("$PY" -c 'import torch; print(torch.cuda.get_device_name())')}"
  echo "difftron: $BIN, commit $(git rev-parse --short HEAD 2> /dev/null || echo unknown)$(git diff --quiet HEAD -- 2> /dev/null || echo ' (+ uncommitted changes)')"
  echo "PyTorch: $("$PY" -c 'import torch; print(torch.__version__, "cuDNN", torch.backends.cudnn.version())')"
  echo "each side: vocab $VOCAB, seq $SEQ, micro-batch $BATCH, $WARMUP warm-up + $STEPS timed steps (mean over the timed steps)"
  echo "command: bash tools/compare_pytorch.sh${ARGS_GIVEN:+ $ARGS_GIVEN}"
} > "$OUTDIR/meta.txt"
sed 's/^/# /' "$OUTDIR/meta.txt"

model_flags() {
  case "$1" in
    diff-1.3B) echo "--attention=diff --d_model=2048 --n_layers=24 --n_heads=8 --head_dim=128 --ffn_dim=5632" ;;
    base-1.3B) echo "--attention=standard --d_model=2048 --n_layers=24 --n_heads=8 --head_dim=128 --ffn_dim=5632" ;;
    diff-350M) echo "--attention=diff --d_model=1024 --n_layers=24 --n_heads=8 --head_dim=64 --ffn_dim=2816" ;;
    base-350M) echo "--attention=standard --d_model=1024 --n_layers=24 --n_heads=8 --head_dim=64 --ffn_dim=2816" ;;
    *) return 1 ;;
  esac
}

IFS=',' read -r -a MODEL_LIST <<< "$MODELS"
for m in "${MODEL_LIST[@]}"; do model_flags "$m" > /dev/null || die "unknown model '$m' (diff-1.3B, base-1.3B, diff-350M, base-350M)"; done

# run_part NAME LOG CMD...: runs CMD under the time limit; 0 when it succeeded
run_part() {
  local name=$1 log=$2 rc=0
  shift 2
  local t0=$SECONDS
  timeout --kill-after=15 "$PART_TIMEOUT" "$@" > "$log" 2>&1 || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "  $name: timed out after ${PART_TIMEOUT} s (log: $log)" >&2
  elif [ "$rc" != 0 ]; then
    echo "  $name: failed with status $rc (log: $log); its last lines:" >&2
    tail -n 8 "$log" | sed 's/^/    /' >&2
  else
    echo "  $name: done in $((SECONDS - t0)) s"
  fi
  return "$rc"
}

error_json() {  # FILE MESSAGE
  "$PY" -c 'import json, sys; json.dump({"error": sys.argv[2]}, open(sys.argv[1], "w"))' "$1" "$2"
}

T_ALL=$SECONDS
for m in "${MODEL_LIST[@]}"; do
  echo "== $m"
  # shellcheck disable=SC2046
  if run_part "difftron" "$OUTDIR/$m.difftron.log" "$BIN" train --device=cuda --data=synthetic:copy \
      --vocab_size=$VOCAB --seq=$SEQ --batch=$BATCH $(model_flags "$m") --recompute="$RECOMPUTE" \
      --steps=$((WARMUP + STEPS)) --warmup=0 --log_every=1 --eval_batches=1; then
    "$PY" "$REPORT" difftron-log "$OUTDIR/$m.difftron.log" "$WARMUP" "$BATCH" "$SEQ" "$OUTDIR/$m.difftron.json" || true
  else
    error_json "$OUTDIR/$m.difftron.json" "difftron train failed or timed out (log $m.difftron.log)"
  fi
  # shellcheck disable=SC2086
  if ! run_part "pytorch" "$OUTDIR/$m.pytorch.log" "$PY" tools/reference/bench.py --model="$m" --batch=$BATCH \
      --seq=$SEQ --vocab_size=$VOCAB --warmup=$WARMUP --steps=$STEPS --json="$OUTDIR/$m.pytorch.json" $PT_ARGS; then
    error_json "$OUTDIR/$m.pytorch.json" "bench.py failed or timed out (log $m.pytorch.log)"
  fi
  grep -h "tok/s" "$OUTDIR/$m.pytorch.log" | tail -n 1 | sed 's/^/  /' || true
done

echo
echo "== difftron / PyTorch, same GPU, same run ($((SECONDS - T_ALL)) s)"
"$PY" "$REPORT" table "$OUTDIR" "${MODEL_LIST[@]}"
echo "(written to $OUTDIR/compare.md and $OUTDIR/compare.json; logs beside them)"
MISSING=$("$PY" -c 'import json, sys; print(sum(r["ratio"] is None for r in json.load(open(sys.argv[1]))["rows"]))' "$OUTDIR/compare.json")
[ "$MISSING" = 0 ] || die "$MISSING of ${#MODEL_LIST[@]} models have no ratio (see the notes column and the logs)"
