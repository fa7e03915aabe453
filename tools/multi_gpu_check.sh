#!/usr/bin/env bash
# Multi-GPU check (issue 19; docs/PARALLEL.md, "Checking on a multi-GPU machine"): one command
# that runs everything a 2/4/8-GPU machine has to show and prints a table with PASS/FAIL:
#
#   correctness  TP=2, TP=4, TP=8, DP=8 and TP=2 x DP=4 (those that fit N GPUs; with N < 8 also
#                DP=N and TP=2 x DP=N/2) train a small model on synthetic:copy for STEPS steps
#                and must give the one-GPU run's loss at every step within LOSS_RTOL (relative);
#                the run at TP=N/2 x DP=2 (TP=4 x DP=2 on 8 GPUs) writes a checkpoint at step
#                CKPT_AT that is resumed at TP=N and at TP=1 (one process): the losses of steps
#                CKPT_AT+1..STEPS must match the uninterrupted run's within LOSS_RTOL.
#   faults       a TP=2 x DP=N/2 job is killed in one rank (kill -9, mid-run, after a checkpoint):
#                every other rank must exit non-zero within --collective_timeout (FAULT_TIMEOUT)
#                + FAULT_SLACK with the watchdog's message naming its rank and the collective, the
#                job must end (no hang: enforced with timeout), and the same command resumes from
#                `latest`; the steps it recomputes must give the killed job's losses.
#   scaling      tokens/s per GPU of the 1.3B model at DP=1, 2, 4, 8 (weak-scaling efficiency
#                against DP=1) and of 6.8B at TP=N and TP=N/2 x DP=2 (TP=8, TP=4 x DP=2), the
#                median of the metrics.jsonl step records after SCALE_WARMUP steps, next to
#                `difftron plan`'s memory, communication and time for the same layout.
# Output: the table on stdout and in $OUT/summary.md; runs, logs and plans under $OUT. Exit status
# 0 only when every check passed.
#
#   bash tools/multi_gpu_check.sh                        # all GPUs nvidia-smi lists
#   DEVICE=cpu NGPUS=4 BIN=build-mg/difftron bash tools/multi_gpu_check.sh   # CPU ranks (tiny)
#
# Tolerances (LOSS_RTOL: max over steps of |loss - loss_ref| / |loss_ref|):
#   cuda  2^-7 = 7.8e-3: the losses must agree to bf16 precision (bf16 keeps 8 significant bits;
#         2^-7 is the relative spacing of bf16 numbers). Weights and activations are bf16; another
#         layout sums in another order (other GEMM shapes and kernels, TP partial products rounded
#         to bf16 before the NCCL sum), so any bf16 value may round to its neighbour (2^-8 .. 2^-7
#         relative). Those differences are unbiased and the loss averages them over all tokens of
#         a step, so correct layouts stay far inside one bf16 ulp of the loss over 50 steps; an
#         error (a wrong shard, a missing or doubled reduction, a rank on the wrong data) moves
#         the loss by percents. --deterministic makes each run repeatable to the bit.
#   cpu   all f32: the forward-error bound of tests/tolerances.h for the loss of one pass whose
#         sums are all reordered: (8L + 3) x 2 gamma_n, gamma_n = n u / (1 - n u), u = 2^-24,
#         n = the longest reduction (max of d, ffn, vocab, seq, 2 h dh, tokens per step).
#   LOSS_RTOL=x overrides both (e.g. to show that a too tight one fails).
#
# Environment [defaults: GPU / DEVICE=cpu]:
#   DEVICE       cuda | cpu [cuda when nvidia-smi lists a GPU, else cpu]
#   NGPUS        GPUs (cpu: ranks) to use [nvidia-smi -L count / 4]
#   BIN          difftron binary [build-gpu/difftron if present, else build/difftron]; not built here
#   OUT          output folder, emptied first [runs/multi_gpu_check]
#   PARTS        which parts, in order ["correctness faults scaling"] (split them over device calls
#                when one call's time limit is short: each part prints its wall time)
#   MODEL_FLAGS  small model [--d_model=512 --n_layers=4 --n_heads=8 --head_dim=64 --ffn_dim=1536
#                --vocab_size=512 / --d_model=64 --n_layers=2 --n_heads=8 --head_dim=8 --ffn_dim=128
#                --vocab_size=64]; n_heads, n_kv_heads and ffn_dim must divide by 8 for TP=8
#   SEQ, GLOBAL_BATCH  [256, 16 / 32, 8]: sequences per step over all DP ranks (per rank: /DP)
#   STEPS, CKPT_AT     [50, 25 / 20, 10]
#   LR, WARMUP   [1e-3, 10]
#   TRAIN_FLAGS  more train flags for the small runs [""]
#   FAULT_STEPS, FAULT_CKPT_EVERY, FAULT_KILL_AFTER  [300, 10, 25 / 120, 10, 25]: the faulted job's
#                --steps, --ckpt_every, and the step after which a rank is killed
#   FAULT_TP, FAULT_DP, FAULT_RANK  [2, N/2, the last rank]
#   FAULT_TIMEOUT  --collective_timeout of the faulted job in s [10]
#   FAULT_SLACK    s allowed beyond it (a survivor enters its blocked collective up to a step
#                  later; the watchdog polls every 0.05 s) [10]
#   FAULT_KILL_GRACE  KILL_GRACE of that job (launch/mpirun.sh): Open MPI waits 2 x this after the
#                  first rank died before it ends; must exceed FAULT_TIMEOUT [FAULT_TIMEOUT + 10]
#   SCALE_STEPS, SCALE_WARMUP  [20, 5 / 8, 3]; SCALE_GOAL  weak-scaling efficiency required at the
#                largest DP [0.95 / 0: not checked]
#   SCALE_MODEL_S, SCALE_MODEL_L  the "1.3B" and "6.8B" model flags [the brief's; DEVICE=cpu: tiny]
#   SCALE_SEQ, SCALE_BATCH  [2048, 8 / 32, 4]; SCALE_RECOMPUTE_L  [none, full when plan says it
#                does not fit]; SCALE_SAVE=1 lets the runs write their final checkpoint (by default
#                the ranks are killed after the last step record: 1.3B = 16 GB, 6.8B = 80 GB)
#   PLAN_FLAGS   extra `difftron plan` flags [--plan_dp_gbps=370: one node, DP over NVLink too]
#   RUN_TIMEOUT  s per run [600 / 300]; KILL_GRACE for the other jobs [10]
#   TAMPER=name  self-test: multiplies the loss of step STEPS/2 in run `name`'s metrics.jsonl
#                (e.g. tp2, tp2_dp2, resume_tp1) by (1 + 4 LOSS_RTOL) before the comparison: FAIL
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export NCCL_NVLS_ENABLE=0  # never NVLink multicast (launch/mpirun.sh sets it for the ranks too)

if [ -z "${DEVICE:-}" ]; then
  if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
if [ -z "${BIN:-}" ]; then
  if [ -x build-gpu/difftron ]; then BIN=build-gpu/difftron; else BIN=build/difftron; fi
fi
if [ -z "${NGPUS:-}" ]; then
  if [ "$DEVICE" = cuda ]; then NGPUS=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU'); else NGPUS=4; fi
fi
N=$NGPUS
OUT=${OUT:-runs/multi_gpu_check}
PARTS=${PARTS:-correctness faults scaling}
PYTHON=${PYTHON:-python3}
if [ "$DEVICE" = cuda ]; then
  MODEL_FLAGS=${MODEL_FLAGS:---d_model=512 --n_layers=4 --n_heads=8 --head_dim=64 --ffn_dim=1536 --vocab_size=512}
  SEQ=${SEQ:-256} GLOBAL_BATCH=${GLOBAL_BATCH:-16} STEPS=${STEPS:-50} CKPT_AT=${CKPT_AT:-25}
  FAULT_STEPS=${FAULT_STEPS:-300}
  SCALE_STEPS=${SCALE_STEPS:-20} SCALE_WARMUP=${SCALE_WARMUP:-5} SCALE_GOAL=${SCALE_GOAL:-0.95}
  SCALE_MODEL_S=${SCALE_MODEL_S:---d_model=2048 --n_layers=24 --n_heads=8 --head_dim=128 --ffn_dim=5632 --vocab_size=32000}
  SCALE_MODEL_L=${SCALE_MODEL_L:---d_model=4096 --n_layers=32 --n_heads=16 --head_dim=128 --ffn_dim=11008 --vocab_size=32000}
  SCALE_SEQ=${SCALE_SEQ:-2048} SCALE_BATCH=${SCALE_BATCH:-8}
  RUN_TIMEOUT=${RUN_TIMEOUT:-600}
  OVERSUB=0
else
  MODEL_FLAGS=${MODEL_FLAGS:---d_model=64 --n_layers=2 --n_heads=8 --head_dim=8 --ffn_dim=128 --vocab_size=64}
  SEQ=${SEQ:-32} GLOBAL_BATCH=${GLOBAL_BATCH:-8} STEPS=${STEPS:-20} CKPT_AT=${CKPT_AT:-10}
  FAULT_STEPS=${FAULT_STEPS:-120}
  SCALE_STEPS=${SCALE_STEPS:-8} SCALE_WARMUP=${SCALE_WARMUP:-3} SCALE_GOAL=${SCALE_GOAL:-0}
  SCALE_MODEL_S=${SCALE_MODEL_S:---d_model=64 --n_layers=2 --n_heads=8 --head_dim=8 --ffn_dim=128 --vocab_size=256}
  SCALE_MODEL_L=${SCALE_MODEL_L:---d_model=128 --n_layers=2 --n_heads=8 --head_dim=8 --ffn_dim=256 --vocab_size=256}
  SCALE_SEQ=${SCALE_SEQ:-32} SCALE_BATCH=${SCALE_BATCH:-4}
  RUN_TIMEOUT=${RUN_TIMEOUT:-300}
  OVERSUB=1
fi
LR=${LR:-1e-3} WARMUP=${WARMUP:-10} TRAIN_FLAGS=${TRAIN_FLAGS:-}
FAULT_CKPT_EVERY=${FAULT_CKPT_EVERY:-10} FAULT_KILL_AFTER=${FAULT_KILL_AFTER:-25}
FAULT_TIMEOUT=${FAULT_TIMEOUT:-10} FAULT_SLACK=${FAULT_SLACK:-10}
FAULT_KILL_GRACE=${FAULT_KILL_GRACE:-$((${FAULT_TIMEOUT%.*} + 10))}
KILL_GRACE=${KILL_GRACE:-10}
PLAN_FLAGS=${PLAN_FLAGS:---plan_dp_gbps=370}
TAMPER=${TAMPER:-}

say() { echo "==== multi_gpu_check: $*"; }
die() { say "FAILED: $*"; exit 1; }
show_tail() { [ -f "$1" ] && tail -n "${2:-12}" "$1" | sed 's/^/    /'; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ---- set-up --------------------------------------------------------------------------------------
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT" 2> /dev/null)" ] && [ ! -f "$OUT/.multi_gpu_check" ]; then
  die "OUT=$OUT holds files that are not a multi_gpu_check output: choose another OUT"
fi
rm -rf "$OUT" && mkdir -p "$OUT/runs" "$OUT/logs" || die "cannot create OUT=$OUT"
OUT=$(cd "$OUT" && pwd)
touch "$OUT/.multi_gpu_check"
[ -x "$BIN" ] || die "BIN=$BIN is not an executable (build it first: tools/build.sh, or cmake ... --target difftron)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
command -v "$PYTHON" > /dev/null || die "PYTHON=$PYTHON not found (needed to read metrics.jsonl)"
command -v mpirun > /dev/null || die "mpirun not found"
case "$N" in '' | *[!0-9]*) die "NGPUS=$N is not a number" ;; esac
[ "$N" -ge 2 ] || die "NGPUS=$N: needs at least 2 GPUs (or DEVICE=cpu NGPUS>=2)"
ROWS=$OUT/rows.tsv
: > "$ROWS"
# row PART CHECK LAYOUT RESULT FIGURES
row() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$ROWS"
  say "$1 | $2 | $3 | $4 | $5"
}
{
  echo "date: $(date -u +%FT%TZ)  host: $(hostname)  device: $DEVICE  N: $N"
  echo "git: $(git rev-parse --short HEAD 2> /dev/null) $(git status --porcelain 2> /dev/null | wc -l) changed files"
  echo "bin: $BIN"
  echo "mpirun: $(mpirun --version 2> /dev/null | head -1)"
  if [ "$DEVICE" = cuda ]; then nvidia-smi -L; nvidia-smi topo -m 2>&1; fi
} > "$OUT/machine.txt" 2>&1

# The helper that reads metrics.jsonl and `plan` output (standard library only).
cat > "$OUT/mgc.py" << 'EOF'
import json
import math
import re
import statistics
import sys


def records(path):
    if not path.endswith(".jsonl"):
        path += "/metrics.jsonl"
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass  # empty, or cut short by a kill
    except OSError:
        pass
    return out


def losses(recs):
    return {r["step"]: r["loss"] for r in recs if r.get("event") == "step" and r.get("window_steps", 1) == 1}


def cmd_tol(device, ref):
    """The relative loss tolerance (see the script's header)."""
    if device != "cpu":
        print(f"{2.0 ** -7!r}\tbf16 precision: 2^-7")
        return
    start = [r for r in records(ref) if r.get("event") == "start"]
    if not start:
        raise SystemExit(f"{ref}: no start record")
    c, s = start[0]["model_config"], start[0]
    n = max(c["d_model"], c["ffn_dim"], c["vocab_size"], c.get("max_seq_len", 0), 2 * c["n_heads"] * c["head_dim"],
            s["tokens_per_step"])
    k = 8 * c["n_layers"] + 3
    nu = n * 2.0 ** -24
    tol = k * 2 * nu / (1 - nu)
    print(f"{tol!r}\tf32 reordered-sum bound (8L+3) 2 gamma_n, L {c['n_layers']}, n {n}")


def cmd_compare(ref, run, lo, hi, tol):
    """Steps lo..hi of run against ref: PASS/FAIL and the figures."""
    lo, hi, tol = int(lo), int(hi), float(tol)
    a, b = losses(records(ref)), losses(records(run))
    missing = [s for s in range(lo, hi + 1) if s not in a or s not in b]
    if missing:
        print(f"FAIL\tno loss for {len(missing)} of steps {lo}..{hi} (e.g. step {missing[0]}: "
              f"{'reference' if missing[0] not in a else 'run'} lacks it)")
        return
    rel = {s: abs(b[s] - a[s]) / abs(a[s]) for s in range(lo, hi + 1)}
    worst = max(rel, key=rel.get)
    exact = sum(1 for s in rel if a[s] == b[s])
    ok = rel[worst] <= tol
    print(f"{'PASS' if ok else 'FAIL'}\tmax rel diff {rel[worst]:.3g} at step {worst} (tol {tol:.3g}), "
          f"steps {lo}..{hi}: {exact} bit-equal, first {rel[lo]:.2g}, last {rel[hi]:.2g}; "
          f"loss {a[lo]:.4f} -> {a[hi]:.4f}")


def cmd_tamper(run, step, factor):
    """Self-test: multiplies one step's loss in run/metrics.jsonl."""
    path = run + "/metrics.jsonl"
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    done = False
    for i, line in enumerate(lines):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("event") == "step" and r.get("step") == int(step):
            r["loss"] *= float(factor)
            lines[i] = json.dumps(r) + "\n"
            done = True
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
    print(f"tampered step {step} of {path}" if done else f"step {step} not found in {path}")


def cmd_resumed(run, step):
    """Did the run's (last) start record resume at `step`?"""
    starts = [r for r in records(run) if r.get("event") == "start"]
    got = starts[-1].get("resume_step") if starts else None
    print("yes" if got == int(step) else f"no (resume_step {got})")


def cmd_scale(run, warmup, world):
    """Median tokens/s per GPU, step time and MFU of the step records after `warmup` steps."""
    recs = records(run)
    start = [r for r in recs if r.get("event") == "start"]
    steps = [r for r in recs if r.get("event") == "step" and r["step"] > int(warmup)]
    if not steps or not start:
        print("nan\tnan\tnan\t0")
        return
    tps = statistics.median(r["tokens_per_s"] for r in steps)
    mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
    mfu = statistics.median(mfus) if mfus else float("nan")
    step_s = start[0]["tokens_per_step"] / tps
    print(f"{tps / int(world)!r}\t{step_s!r}\t{mfu!r}\t{len(steps)}")


def cmd_plan(path):
    """From `difftron plan` output: tokens/s per rank... as tab-separated fields (nan: absent)."""
    text = open(path, encoding="utf-8").read()

    def num(pattern):
        m = re.search(pattern, text)
        return float(m.group(1)) if m else float("nan")

    world = num(r"= (\d+) ranks")
    tps = num(r"a step takes [0-9.e+-]+ s, ([0-9.]+) tokens/s \(all ranks\)")
    fits = "no" if "does NOT fit" in text else "yes"
    print("\t".join(str(x) for x in (tps / world if world == world else float("nan"), num(r"a step takes ([0-9.e+-]+) s"),
                                     num(r"TP total .*?: ([0-9.]+) ms"), num(r"DP total .*?: ([0-9.]+) ms"),
                                     num(r"peak device memory .*?([0-9.]+) GiB"), fits)))


def cmd_table(rows_path, md_path, header):
    rows = [line.rstrip("\n").split("\t") for line in open(rows_path, encoding="utf-8") if line.strip()]
    heads = ["part", "check", "layout", "result", "figures"]
    width = [max([len(heads[i])] + [len(r[i]) for r in rows]) for i in range(4)]
    text = ["  ".join(h.ljust(w) for h, w in zip(heads[:4], width)) + "  figures"]
    text += ["  ".join(c.ljust(w) for c, w in zip(r[:4], width)) + "  " + r[4] for r in rows]
    print("\n".join(text))
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("# multi_gpu_check\n\n" + header.replace("\n", "  \n") + "\n\n")
        f.write("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads) + "\n")
        for r in rows:
            f.write("| " + " | ".join(c.replace("|", "/") for c in r) + " |\n")
    failed = [r for r in rows if r[3] == "FAIL"]
    passed = [r for r in rows if r[3] == "PASS"]
    sys.exit(0 if passed and not failed else 1)


globals()["cmd_" + sys.argv[1]](*sys.argv[2:])
EOF
mgc() { "$PYTHON" "$OUT/mgc.py" "$@"; }

# launch NAME TP DP TIMEOUT_S [train flags]: one process for TP x DP = 1, else launch/mpirun.sh;
# its output goes to logs/NAME.log. Returns the exit status (124: timed out).
launch() {
  local name=$1 tp=$2 dp=$3 limit=$4
  shift 4
  if [ $((tp * dp)) -eq 1 ]; then
    timeout -k 10 "$limit" "$BIN" train "$@" > "$OUT/logs/$name.log" 2>&1
  else
    DIFFTRON_BIN=${LAUNCH_BIN:-$BIN} OVERSUBSCRIBE=$OVERSUB KILL_GRACE=${LAUNCH_GRACE:-$KILL_GRACE} \
      timeout -k 10 "$limit" launch/mpirun.sh --tp="$tp" --dp="$dp" "$@" > "$OUT/logs/$name.log" 2>&1
  fi
}
last_step() {
  local s
  s=$(grep -o '"event":"step","step":[0-9]*' "$1/metrics.jsonl" 2> /dev/null | tail -1 | grep -o '[0-9]*$')
  echo "${s:-0}"
}
descendants() {
  local p
  for p in $(pgrep -P "$1"); do
    echo "$p"
    descendants "$p"
  done
}
name_of() { # tp dp -> tp2, dp8, tp2_dp4, tp1
  if [ "$1" -gt 1 ] && [ "$2" -gt 1 ]; then echo "tp$1_dp$2"; elif [ "$2" -gt 1 ]; then echo "dp$2"; else echo "tp$1"; fi
}
layout_of() { echo "TP=$1 x DP=$2"; }

say "device $DEVICE, N $N, parts: $PARTS; out: $OUT"
t_all=$(now)

# ---- 1. correctness --------------------------------------------------------------------------
small=(--device="$DEVICE" --data=synthetic:copy $MODEL_FLAGS --seq="$SEQ" --steps="$STEPS" --log_every=1
  --lr="$LR" --warmup="$WARMUP" --ckpt_every="$CKPT_AT" --deterministic $TRAIN_FLAGS)
part_correctness() {
  local t0 rc name tp dp tol tol_why res fig k w writer
  t0=$(now)
  # The reference: one process (one GPU), the whole global batch.
  say "correctness: reference run, one process (log: $OUT/logs/ref.log)"
  launch ref 1 1 "$RUN_TIMEOUT" "${small[@]}" --batch="$GLOBAL_BATCH" --ckpt_dir="$OUT/runs/ref"
  rc=$?
  if [ $rc -ne 0 ]; then
    show_tail "$OUT/logs/ref.log"
    row correctness "reference run" "1 GPU" FAIL "exit $rc (log: logs/ref.log)"
    return
  fi
  if [ -n "${LOSS_RTOL:-}" ]; then
    tol=$LOSS_RTOL tol_why="LOSS_RTOL given"
  else
    IFS=$'\t' read -r tol tol_why < <(mgc tol "$DEVICE" "$OUT/runs/ref")
  fi
  echo "$tol" > "$OUT/tolerance.txt"
  row correctness "reference run" "1 GPU" PASS "$STEPS steps, batch $GLOBAL_BATCH x seq $SEQ; tolerance $tol ($tol_why)"
  # The layouts: the issue's five, those that fit N; below 8 GPUs also DP=N and TP=2 x DP=N/2.
  local layouts=("2 1" "4 1" "8 1" "1 8" "2 4")
  if [ "$N" -lt 8 ]; then
    layouts+=("1 $N")
    [ "$N" -ge 4 ] && layouts+=("2 $((N / 2))")
  fi
  writer="$((N / 2)) 2"
  local seen=" " l
  for l in "${layouts[@]}" "$writer"; do
    case "$seen" in *" $l,"*) continue ;; esac
    seen="$seen $l,"
    read -r tp dp <<< "$l"
    name=$(name_of "$tp" "$dp")
    if [ $((tp * dp)) -gt "$N" ]; then
      row correctness "losses = 1 GPU" "$(layout_of "$tp" "$dp")" SKIP "needs $((tp * dp)) GPUs, N = $N"
      continue
    fi
    if [ $((GLOBAL_BATCH % dp)) -ne 0 ]; then
      row correctness "losses = 1 GPU" "$(layout_of "$tp" "$dp")" FAIL "GLOBAL_BATCH=$GLOBAL_BATCH does not divide by DP $dp"
      continue
    fi
    say "correctness: $(layout_of "$tp" "$dp") (log: $OUT/logs/$name.log)"
    launch "$name" "$tp" "$dp" "$RUN_TIMEOUT" "${small[@]}" --batch=$((GLOBAL_BATCH / dp)) --ckpt_dir="$OUT/runs/$name"
    rc=$?
    if [ $rc -ne 0 ]; then
      show_tail "$OUT/logs/$name.log"
      row correctness "losses = 1 GPU" "$(layout_of "$tp" "$dp")" FAIL "exit $rc$([ $rc -eq 124 ] && echo ' (timed out)') (log: logs/$name.log)"
      continue
    fi
    [ "$TAMPER" = "$name" ] && mgc tamper "$OUT/runs/$name" $((STEPS / 2)) "$("$PYTHON" -c "print(1 + 4 * $tol)")"
    IFS=$'\t' read -r res fig < <(mgc compare "$OUT/runs/ref" "$OUT/runs/$name" 1 "$STEPS" "$tol")
    row correctness "losses = 1 GPU" "$(layout_of "$tp" "$dp")" "$res" "$fig"
  done
  # The checkpoint of the writer at step CKPT_AT, resumed at TP=N and at TP=1.
  read -r tp dp <<< "$writer"
  w=$(name_of "$tp" "$dp")
  k=$(printf 'step_%08d' "$CKPT_AT")
  local wl
  wl=$(layout_of "$tp" "$dp")
  for l in "$N 1" "1 1"; do
    local rtp rdp rname
    read -r rtp rdp <<< "$l"
    rname=resume_$(name_of "$rtp" "$rdp")
    if [ ! -f "$OUT/runs/$w/$k/meta.json" ]; then
      row correctness "resume $wl ckpt" "$(layout_of "$rtp" "$rdp")" FAIL "no checkpoint $k in runs/$w"
      continue
    fi
    mkdir -p "$OUT/runs/$rname" && cp -r "$OUT/runs/$w/$k" "$OUT/runs/$rname/" && echo "$k" > "$OUT/runs/$rname/latest"
    say "correctness: $wl's checkpoint at step $CKPT_AT resumed at $(layout_of "$rtp" "$rdp") (log: $OUT/logs/$rname.log)"
    launch "$rname" "$rtp" "$rdp" "$RUN_TIMEOUT" "${small[@]}" --batch=$((GLOBAL_BATCH / rdp)) --ckpt_dir="$OUT/runs/$rname"
    rc=$?
    if [ $rc -ne 0 ]; then
      show_tail "$OUT/logs/$rname.log"
      row correctness "resume $wl ckpt" "$(layout_of "$rtp" "$rdp")" FAIL "exit $rc (log: logs/$rname.log)"
      continue
    fi
    local resumed
    resumed=$(mgc resumed "$OUT/runs/$rname" "$CKPT_AT")
    [ "$TAMPER" = "$rname" ] && mgc tamper "$OUT/runs/$rname" $(((CKPT_AT + 1 + STEPS) / 2)) "$("$PYTHON" -c "print(1 + 4 * $tol)")"
    IFS=$'\t' read -r res fig < <(mgc compare "$OUT/runs/$w" "$OUT/runs/$rname" $((CKPT_AT + 1)) "$STEPS" "$tol")
    if [ "$resumed" != yes ]; then res=FAIL fig="did not resume at step $CKPT_AT: $resumed; $fig"; fi
    row correctness "resume $wl ckpt" "$(layout_of "$rtp" "$rdp")" "$res" "vs uninterrupted $wl: $fig"
  done
  say "correctness: $(secs "$t0" "$(now)") s"
}

# ---- 2. faults -------------------------------------------------------------------------------
part_faults() {
  local t0 tp dp world victim dir wrap rc pid t_kill job_s step latest_step
  t0=$(now)
  tp=${FAULT_TP:-2}
  dp=${FAULT_DP:-$((N / tp))}
  world=$((tp * dp))
  victim=${FAULT_RANK:-$((world - 1))}
  local lay
  lay=$(layout_of "$tp" "$dp")
  if [ "$world" -lt 2 ] || [ "$world" -gt "$N" ]; then
    row faults "kill -9 one rank" "$lay" FAIL "FAULT_TP x FAULT_DP = $world must lie in 2..$N"
    return
  fi
  dir=$OUT/runs/fault
  mkdir -p "$dir" "$OUT/fault"
  # A wrapper (DIFFTRON_BIN of launch/mpirun.sh) that records each rank's pid, exit status and time.
  wrap=$OUT/fault/rank_wrapper.sh
  cat > "$wrap" << EOF
#!/usr/bin/env bash
r=\${OMPI_COMM_WORLD_RANK:-\${PMIX_RANK:-x}}
"$BIN" "\$@" &
child=\$!
echo \$child > "$OUT/fault/rank_\$r.pid"
wait \$child
rc=\$?
echo "\$rc \$(date +%s.%N)" > "$OUT/fault/rank_\$r.exit"
exit \$rc
EOF
  chmod +x "$wrap"
  local fflags=(--device="$DEVICE" --data=synthetic:copy $MODEL_FLAGS --seq="$SEQ" --batch=$((GLOBAL_BATCH / dp))
    --steps="$FAULT_STEPS" --log_every=1 --lr="$LR" --warmup="$WARMUP" --ckpt_every="$FAULT_CKPT_EVERY"
    --deterministic --collective_timeout="$FAULT_TIMEOUT" --ckpt_dir="$dir" $TRAIN_FLAGS)
  local limit=$((${FAULT_TIMEOUT%.*} + 2 * FAULT_KILL_GRACE + RUN_TIMEOUT))
  say "faults: $lay, rank $victim killed after step $FAULT_KILL_AFTER; --collective_timeout=$FAULT_TIMEOUT (log: $OUT/logs/fault.log)"
  LAUNCH_BIN=$wrap LAUNCH_GRACE=$FAULT_KILL_GRACE launch fault "$tp" "$dp" "$limit" "${fflags[@]}" &
  pid=$!
  while kill -0 $pid 2> /dev/null && [ "$(last_step "$dir")" -le "$FAULT_KILL_AFTER" ]; do sleep 0.1; done
  if ! kill -0 $pid 2> /dev/null || [ ! -f "$OUT/fault/rank_$victim.pid" ]; then
    wait $pid
    rc=$?
    show_tail "$OUT/logs/fault.log"
    row faults "kill -9 one rank" "$lay" FAIL "the job ended (exit $rc) before the kill (log: logs/fault.log)"
    return
  fi
  step=$(last_step "$dir")
  latest_step=$(sed -n 's/^step_0*//p' "$dir/latest" 2> /dev/null)
  t_kill=$(now)
  kill -KILL "$(cat "$OUT/fault/rank_$victim.pid")"
  wait $pid
  rc=$?
  job_s=$(secs "$t_kill" "$(now)")
  cp "$dir/metrics.jsonl" "$OUT/fault/metrics.killed.jsonl" 2> /dev/null
  [ -n "$latest_step" ] || latest_step=$(sed -n 's/^step_0*//p' "$dir/latest" 2> /dev/null)
  # Every other rank: exit status and time from the wrapper, its watchdog message from the log.
  local r bad=0 worst=0 msgs="" ers ets dt m rp i
  # A rank left running after mpirun ended (possible only through the wrapper: mpirun's SIGTERM
  # ends the wrapper's bash first) is a failure; it is killed so that it frees --ckpt_dir's lock.
  for ((r = 0; r < world; r++)); do
    rp=$(cat "$OUT/fault/rank_$r.pid" 2> /dev/null) || continue
    for ((i = 0; i < 50; i++)); do kill -0 "$rp" 2> /dev/null || break; sleep 0.2; done
    if kill -0 "$rp" 2> /dev/null && [ "$(cat /proc/"$rp"/comm 2> /dev/null)" = difftron ]; then
      kill -KILL "$rp"
      bad=1
      msgs="$msgs rank $r (pid $rp) still ran 10 s after the job ended (killed);"
      sleep 1
    fi
  done
  for ((r = 0; r < world; r++)); do
    [ $r -eq "$victim" ] && continue
    if [ ! -f "$OUT/fault/rank_$r.exit" ]; then
      bad=1
      msgs="$msgs rank $r: no exit recorded (killed with the job?);"
      continue
    fi
    read -r ers ets < "$OUT/fault/rank_$r.exit"
    dt=$(secs "$t_kill" "$ets")
    worst=$(awk -v a="$worst" -v b="$dt" 'BEGIN { print (b > a ? b : a) }')
    m=$(grep -o "difftron watchdog: rank $r ([^)]*): .* did not finish within [0-9.e+-]* s" "$OUT/logs/fault.log" | head -1)
    if [ "$ers" -eq 0 ] || [ -z "$m" ] || awk -v d="$dt" -v l="$FAULT_TIMEOUT" -v s="$FAULT_SLACK" 'BEGIN { exit !(d > l + s) }'; then
      bad=1
      msgs="$msgs rank $r: exit $ers after $dt s, message: ${m:-none};"
    fi
  done
  local first dead
  first=$(grep -o "difftron watchdog: rank [0-9]* ([^)]*): [^;]*" "$OUT/logs/fault.log" | head -1 | sed 's/ did not finish.*//; s/difftron watchdog: //')
  # mpirun names the dead rank: "process rank V ... exited on signal 9", or (through the wrapper)
  # "Process name: [[job,1],V]" with "Exit code: 137"
  dead=$(grep -o "process rank $victim with PID [0-9]* on node [^ ]* exited on signal [0-9]*" "$OUT/logs/fault.log" | head -1)
  [ -n "$dead" ] || dead=$(grep -A1 "Process name: *\[\[[0-9]*,[0-9]*\],$victim\]" "$OUT/logs/fault.log" | tr -s ' \n' ' ' | sed 's/ *$//')
  local fig="rank $victim killed after step $step (latest: step $latest_step); the other $((world - 1)) ranks: last exit recorded $worst s after the kill"
  fig="$fig (limit $FAULT_TIMEOUT + $FAULT_SLACK s), watchdog messages name the waiting rank and its collective, e.g. '$first'; the dead rank is named by mpirun: '${dead:-no line naming rank $victim}'"
  fig="$fig, job ended after $job_s s (exit $rc; Open MPI waits 2 x KILL_GRACE=$FAULT_KILL_GRACE s)"
  local end_limit=$((${FAULT_TIMEOUT%.*} + 2 * FAULT_KILL_GRACE + ${FAULT_SLACK%.*} + 10))
  if [ $rc -eq 124 ] || { [ $rc -eq 137 ] && awk -v j="$job_s" -v l="$limit" 'BEGIN { exit !(j >= l - 1) }'; }; then
    row faults "kill -9 one rank" "$lay" FAIL "HANG: the job was still running $limit s after its start (timeout); $msgs"
  elif awk -v j="$job_s" -v l="$end_limit" 'BEGIN { exit !(j > l) }'; then
    bad=1
    row faults "kill -9 one rank" "$lay" FAIL "$fig; the job took longer than $end_limit s to end after the kill;$msgs"
  elif [ $bad -ne 0 ] || [ $rc -eq 0 ]; then
    row faults "kill -9 one rank" "$lay" FAIL "$fig; problems:$msgs"
  else
    row faults "kill -9 one rank" "$lay" PASS "$fig"
  fi
  # The same command resumes from latest.
  if [ -z "$latest_step" ]; then
    row faults "resume from latest" "$lay" FAIL "no checkpoint was published before the kill ($dir/latest)"
    return
  fi
  say "faults: the same command again, resuming from step $latest_step (log: $OUT/logs/fault_resume.log)"
  launch fault_resume "$tp" "$dp" "$RUN_TIMEOUT" "${fflags[@]}"
  rc=$?
  local resumed res
  resumed=$(mgc resumed "$dir" "$latest_step")
  # The steps it did again must give the killed job's losses (same layout: bit-equal expected).
  "$PYTHON" - "$OUT/fault/metrics.killed.jsonl" "$dir/metrics.jsonl" > "$OUT/fault/resumed.jsonl" << 'EOF'
import sys
n = sum(1 for _ in open(sys.argv[1], encoding="utf-8"))
sys.stdout.writelines(open(sys.argv[2], encoding="utf-8").readlines()[n:])
EOF
  local tol
  # the correctness part's tolerance; without it (PARTS=faults) LOSS_RTOL, else 2^-7 on the GPU, 0 (bitwise) on the CPU
  tol=$(cat "$OUT/tolerance.txt" 2> /dev/null || echo "${LOSS_RTOL:-$([ "$DEVICE" = cpu ] && echo 0 || echo 0.0078125)}")
  IFS=$'\t' read -r res fig < <(mgc compare "$OUT/fault/metrics.killed.jsonl" "$OUT/fault/resumed.jsonl" $((latest_step + 1)) "$step" "$tol")
  if [ $rc -ne 0 ] || [ "$resumed" != yes ] || [ "$(last_step "$dir")" -ne "$FAULT_STEPS" ]; then
    show_tail "$OUT/logs/fault_resume.log"
    row faults "resume from latest" "$lay" FAIL "exit $rc, resumed at step $latest_step: $resumed, last step $(last_step "$dir") of $FAULT_STEPS"
  else
    row faults "resume from latest" "$lay" "$res" "resumed at step $latest_step, ran to $FAULT_STEPS; steps redone vs killed job: $fig"
  fi
  say "faults: $(secs "$t0" "$(now)") s"
}

# ---- 3. scaling ------------------------------------------------------------------------------
# scale_run NAME TP DP MODEL_FLAGS [more flags]: a run of SCALE_STEPS steps; its ranks are killed
# after the last step record (no final checkpoint) unless SCALE_SAVE=1. Prints nothing; returns 0
# when all step records are there.
scale_run() {
  local name=$1 tp=$2 dp=$3 model=$4
  shift 4
  local dir=$OUT/runs/$name pid p
  LAUNCH_GRACE=1 launch "$name" "$tp" "$dp" "$RUN_TIMEOUT" --device="$DEVICE" --data=synthetic:copy $model \
    --seq="$SCALE_SEQ" --batch="$SCALE_BATCH" --steps="$SCALE_STEPS" --log_every=1 --ckpt_dir="$dir" "$@" &
  pid=$!
  if [ "${SCALE_SAVE:-0}" != 1 ]; then
    while kill -0 $pid 2> /dev/null && [ "$(last_step "$dir")" -lt "$SCALE_STEPS" ]; do sleep 0.2; done
    if kill -0 $pid 2> /dev/null; then
      for p in $(descendants $pid); do
        [ "$(cat /proc/$p/comm 2> /dev/null)" = difftron ] && kill -KILL "$p" 2> /dev/null
      done
    fi
  fi
  wait $pid
  [ "$(last_step "$dir")" -ge "$SCALE_STEPS" ]
}
part_scaling() {
  local t0 base_tps="" base_step="" dp tp name lay tps step_s mfu n ptps pstep ptp pdp ppeak pfits fig res
  t0=$(now)
  plan_of() { # name tp dp model [flags]
    local pn=$1 ptp_=$2 pdp_=$3 pm=$4
    shift 4
    "$BIN" plan --device="$DEVICE" $pm --seq="$SCALE_SEQ" --batch="$SCALE_BATCH" --tp="$ptp_" --dp="$pdp_" $PLAN_FLAGS "$@" \
      > "$OUT/logs/plan_$pn.txt" 2>&1
    mgc plan "$OUT/logs/plan_$pn.txt"
  }
  fmt() { awk -v x="$1" -v f="$2" 'BEGIN { if (x == "nan" || x == "") print "n/a"; else printf f, x }'; }
  local largest_dp=1 eff_at_largest=""
  for dp in 1 2 4 8; do
    [ "$dp" -gt "$N" ] && continue
    name=scale_s_dp$dp
    lay=$(layout_of 1 "$dp")
    IFS=$'\t' read -r ptps pstep ptp pdp ppeak pfits < <(plan_of "$name" 1 "$dp" "$SCALE_MODEL_S")
    say "scaling: model S at $lay (log: $OUT/logs/$name.log)"
    if ! scale_run "$name" 1 "$dp" "$SCALE_MODEL_S"; then
      show_tail "$OUT/logs/$name.log"
      row scaling "tokens/s per GPU, model S" "$lay" FAIL "the run recorded $(last_step "$OUT/runs/$name") of $SCALE_STEPS steps (log: logs/$name.log)"
      continue
    fi
    IFS=$'\t' read -r tps step_s mfu n < <(mgc scale "$OUT/runs/$name" "$SCALE_WARMUP" "$dp")
    fig="$(fmt "$tps" '%.0f') tok/s/GPU (median of $n steps), step $(fmt "$step_s" '%.3f') s, MFU $(fmt "$mfu" '%.3f')"
    if [ "$dp" -eq 1 ]; then
      base_tps=$tps base_step=$step_s
    elif [ -n "$base_tps" ]; then
      local eff exposed hidden
      eff=$(awk -v a="$tps" -v b="$base_tps" 'BEGIN { printf "%.3f", a / b }')
      exposed=$(awk -v a="$step_s" -v b="$base_step" 'BEGIN { printf "%.1f", 1000 * (a - b) }')
      hidden=$(awk -v e="$exposed" -v p="$pdp" 'BEGIN { if (p != p + 0 || p <= 0) print "n/a"; else { h = 1 - e / p; if (h < 0) h = 0; if (h > 1) h = 1; printf "%.0f%%", 100 * h } }')
      fig="$fig; weak-scaling efficiency $eff; step longer than DP=1 by $exposed ms of plan's $(fmt "$pdp" '%.1f') ms DP comm (hidden ~$hidden)"
      largest_dp=$dp eff_at_largest=$eff
    fi
    fig="$fig; plan: $(fmt "$ptps" '%.0f') tok/s/GPU at MFU 0.4 (step $(fmt "$pstep" '%.3f') s), TP $(fmt "$ptp" '%.1f') ms, DP $(fmt "$pdp" '%.1f') ms, peak $(fmt "$ppeak" '%.1f') GiB"
    row scaling "tokens/s per GPU, model S" "$lay" INFO "$fig"
  done
  if [ "$largest_dp" -gt 1 ] && [ -n "$eff_at_largest" ]; then
    if awk -v g="$SCALE_GOAL" 'BEGIN { exit !(g > 0) }'; then
      res=$(awk -v e="$eff_at_largest" -v g="$SCALE_GOAL" 'BEGIN { print (e >= g ? "PASS" : "FAIL") }')
      row scaling "weak-scaling efficiency >= $SCALE_GOAL" "$(layout_of 1 "$largest_dp")" "$res" "$eff_at_largest"
    else
      row scaling "weak-scaling efficiency" "$(layout_of 1 "$largest_dp")" INFO "$eff_at_largest (not checked: SCALE_GOAL=$SCALE_GOAL)"
    fi
  fi
  local l
  for l in "$N 1" "$((N / 2)) 2"; do
    read -r tp dp <<< "$l"
    name=scale_l_$(name_of "$tp" "$dp")
    lay=$(layout_of "$tp" "$dp")
    local rec=${SCALE_RECOMPUTE_L:-}
    IFS=$'\t' read -r ptps pstep ptp pdp ppeak pfits < <(plan_of "$name" "$tp" "$dp" "$SCALE_MODEL_L" --recompute="${rec:-none}")
    if [ -z "$rec" ]; then
      rec=none
      if [ "$pfits" = no ]; then
        rec=full
        IFS=$'\t' read -r ptps pstep ptp pdp ppeak pfits < <(plan_of "$name" "$tp" "$dp" "$SCALE_MODEL_L" --recompute=full)
      fi
    fi
    say "scaling: model L at $lay, --recompute=$rec (log: $OUT/logs/$name.log)"
    if ! scale_run "$name" "$tp" "$dp" "$SCALE_MODEL_L" --recompute="$rec"; then
      show_tail "$OUT/logs/$name.log"
      row scaling "tokens/s per GPU, model L" "$lay" FAIL "the run recorded $(last_step "$OUT/runs/$name") of $SCALE_STEPS steps (log: logs/$name.log)"
      continue
    fi
    IFS=$'\t' read -r tps step_s mfu n < <(mgc scale "$OUT/runs/$name" "$SCALE_WARMUP" $((tp * dp)))
    fig="$(fmt "$tps" '%.0f') tok/s/GPU (median of $n steps), step $(fmt "$step_s" '%.3f') s, MFU $(fmt "$mfu" '%.3f'), --recompute=$rec"
    fig="$fig; plan: $(fmt "$ptps" '%.0f') tok/s/GPU at MFU 0.4 (step $(fmt "$pstep" '%.3f') s), TP $(fmt "$ptp" '%.1f') ms (not overlapped), DP $(fmt "$pdp" '%.1f') ms, peak $(fmt "$ppeak" '%.1f') GiB"
    row scaling "tokens/s per GPU, model L" "$lay" INFO "$fig"
  done
  say "scaling: $(secs "$t0" "$(now)") s"
}

for part in $PARTS; do
  case "$part" in
    correctness | faults | scaling) "part_$part" ;;
    *) row setup "PARTS" "" FAIL "unknown part '$part' (correctness, faults, scaling)" ;;
  esac
done

header="multi_gpu_check: device $DEVICE, N $N, $(cat "$OUT/machine.txt" | sed -n 2p); $(secs "$t_all" "$(now)") s in all
small model: $MODEL_FLAGS, seq $SEQ, global batch $GLOBAL_BATCH, $STEPS steps, lr $LR; loss tolerance $(cat "$OUT/tolerance.txt" 2> /dev/null || echo n/a) (relative)
model S: $SCALE_MODEL_S; model L: $SCALE_MODEL_L; seq $SCALE_SEQ, micro-batch $SCALE_BATCH, $SCALE_STEPS steps (median after $SCALE_WARMUP)"
echo
echo "$header"
"$PYTHON" "$OUT/mgc.py" table "$ROWS" "$OUT/summary.md" "$header"
rc=$?
say "$([ $rc -eq 0 ] && echo PASS || echo FAIL); table in $OUT/summary.md, logs in $OUT/logs, runs in $OUT/runs"
exit $rc
