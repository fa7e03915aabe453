#!/usr/bin/env bash
# The whole life of a large run, checked, on any machine (docs/TRAINING.md, "scale_check"):
#   A   trains the 1.3B Diff model (d 2048, L 24, h 8, dh 128, ffn 5632, seq 2048, micro-batch 8)
#       on real text for STEPS steps with async checkpoints every CKPT_EVERY steps;
#   HF  converts A's final checkpoint to Hugging Face (f32) and back to a checkpoint: the HF
#       folder and the re-import must give bit-identical logits for a prompt, and the original
#       checkpoint the same up to f32 rounding (the export folds the sub-layer norm's weight
#       into o_proj: DiffLlama has none); then A's checkpoints go (disk: ~16 GB each at 1.3B);
#   B   runs the same command in another run directory, is sent SIGTERM after step KILL_AT (it
#       saves and exits 143), and is started again (it resumes from `latest`): every step's
#       loss of B must equal A's bit for bit, as metrics.jsonl records them;
# then prints a table (start-up, tokens/s, MFU, peak memory measured vs planned, checkpoint
# stall and write, resume, export, PASS/FAIL) and writes everything to $OUT. Exit status 0
# when every check passed.
#
#   DATA=data/debian-bpe32k bash tools/scale_check.sh
#
# Environment (defaults in brackets):
#   DATA         a prepared dataset (DATA/train, DATA/val; tools/bpe_dataset.py). Without it the
#                dataset is made here from the Debian docs when they and `tokenizers` are present.
#   OUT          where runs, logs and the table go [runs/scale_check]; emptied first
#   BIN          the difftron binary [$BUILD_DIR/difftron, built when missing; BUILD_DIR: build-gpu]
#   DEVICE       cuda | cpu | auto [auto]
#   MODEL_FLAGS  [--d_model=2048 --n_layers=24 --n_heads=8 --head_dim=128 --ffn_dim=5632]
#   SEQ, BATCH   [2048, 8]
#   STEPS, CKPT_EVERY, KILL_AT   [300, 100, CKPT_EVERY + CKPT_EVERY/2]
#   TRAIN_FLAGS  more train flags [--lr=3e-4 --warmup=30 --eval_every=CKPT_EVERY --eval_batches=4]
#   PYTHON       [python3] (parsing the records; tools/plot_metrics.py when matplotlib is there)
#   STALL_S      seconds run B may go without a new step before it is killed [1800]
#   KEEP_CKPT=1  keep the checkpoints and exports (by default they are deleted once checked:
#                the 1.3B model's checkpoint is ~16 GB)
# A small CPU run, e.g.:
#   DATA=data/debian-bpe32k DEVICE=cpu MODEL_FLAGS="--d_model=64 --n_layers=2 --n_heads=2" \
#     SEQ=32 BATCH=4 STEPS=12 CKPT_EVERY=4 BIN=build/difftron bash tools/scale_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/scale_check}
BUILD_DIR=${BUILD_DIR:-build-gpu}
BIN=${BIN:-$BUILD_DIR/difftron}
DEVICE=${DEVICE:-auto}
MODEL_FLAGS=${MODEL_FLAGS:---d_model=2048 --n_layers=24 --n_heads=8 --head_dim=128 --ffn_dim=5632}
SEQ=${SEQ:-2048}
BATCH=${BATCH:-8}
STEPS=${STEPS:-300}
CKPT_EVERY=${CKPT_EVERY:-100}
KILL_AT=${KILL_AT:-$((CKPT_EVERY + CKPT_EVERY / 2))}
TRAIN_FLAGS=${TRAIN_FLAGS:---lr=3e-4 --warmup=30 --eval_every=$CKPT_EVERY --eval_batches=4}
PYTHON=${PYTHON:-python3}
KEEP_CKPT=${KEEP_CKPT:-0}

say() { echo "==== scale_check: $*"; }
die() {
  say "FAILED: $*"
  say "logs in $OUT"
  exit 1
}
# The last lines of a log, to show why a command failed.
show_tail() { [ -f "$1" ] && tail -n "${2:-15}" "$1" | sed 's/^/    /'; }

# ---- set-up: output folder, binary, data ------------------------------------------------
# OUT is emptied first: only when it is new, empty or an earlier scale_check's output
if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT" 2> /dev/null)" ] && [ ! -f "$OUT/command.txt" ]; then
  echo "==== scale_check: FAILED: OUT=$OUT holds files that are not a scale_check output: choose another OUT"
  exit 1
fi
rm -rf "$OUT" && mkdir -p "$OUT" || { echo "==== scale_check: FAILED: cannot create OUT=$OUT"; exit 1; }
OUT=$(cd "$OUT" && pwd)
command -v "$PYTHON" > /dev/null || die "PYTHON=$PYTHON not found (needed to read metrics.jsonl)"
if [ -f .devdeps/env.sh ]; then source .devdeps/env.sh; fi

if [ ! -x "$BIN" ]; then
  say "building $BIN (log: $OUT/build.log)"
  { cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release &&
    cmake --build "$BUILD_DIR" -j "$(nproc)" --target difftron; } > "$OUT/build.log" 2>&1 ||
    { show_tail "$OUT/build.log" 30; die "the build failed"; }
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
if [ "$DEVICE" = cpu ] && [ "$MODEL_FLAGS" = "--d_model=2048 --n_layers=24 --n_heads=8 --head_dim=128 --ffn_dim=5632" ]; then
  die "DEVICE=cpu with the 1.3B model would take days: set MODEL_FLAGS, SEQ, BATCH and STEPS for a small model"
fi
if [ "$KILL_AT" -le "$CKPT_EVERY" ] || [ "$KILL_AT" -ge "$STEPS" ]; then
  die "KILL_AT=$KILL_AT must lie after the first checkpoint (CKPT_EVERY=$CKPT_EVERY) and before STEPS=$STEPS"
fi

if [ -z "${DATA:-}" ]; then
  if [ -d /usr/share/doc/linux-doc ] && "$PYTHON" -c "import tokenizers" 2> /dev/null; then
    DATA=$OUT/data
    say "no DATA given: preparing a BPE dataset from the Debian docs into $DATA (log: $OUT/data.log)"
    "$PYTHON" tools/bpe_dataset.py --out="$DATA" --difftron="$BIN" > "$OUT/data.log" 2>&1 ||
      { show_tail "$OUT/data.log"; die "preparing the dataset failed"; }
  else
    die "give DATA=<a prepared dataset with train/ and val/> (made by tools/bpe_dataset.py; this machine has no
    /usr/share/doc/linux-doc or no Python package tokenizers to make one)"
  fi
fi
[ -d "$DATA/train" ] && [ -d "$DATA/val" ] || die "DATA=$DATA has no train/ and val/ (prepare it with tools/bpe_dataset.py)"
DATA=$(cd "$DATA" && pwd)

# Both runs of the check use exactly this command (but --ckpt_dir). --deterministic: the GPU
# steps must repeat to the bit for the comparison (it slows the attention backward ~20%).
train_cmd=("$BIN" train --device="$DEVICE" --data="$DATA/train" --val_data="$DATA/val" $MODEL_FLAGS
  --seq="$SEQ" --batch="$BATCH" --steps="$STEPS" --ckpt_every="$CKPT_EVERY" --async_save --ckpt_keep=1
  --log_every=1 --deterministic $TRAIN_FLAGS)
echo "${train_cmd[*]} --ckpt_dir=..." > "$OUT/command.txt"
say "device $DEVICE; ${STEPS} steps, checkpoints every $CKPT_EVERY, B stopped after step $KILL_AT; out: $OUT"
df -h "$OUT" 2> /dev/null | tail -1 | awk '{ print "==== scale_check: free disk at OUT: " $4 }'

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
# The last step metrics.jsonl records (0 when none yet).
last_step() {
  local s
  s=$(grep -o '"event":"step","step":[0-9]*' "$1/metrics.jsonl" 2> /dev/null | tail -1 | grep -o '[0-9]*$')
  echo "${s:-0}"
}

# ---- A: the reference run -----------------------------------------------------------------
t0=$(now)
say "A: training (log: $OUT/A.log)"
"${train_cmd[@]}" --ckpt_dir="$OUT/A" > "$OUT/A.log" 2>&1
rc=$?
say "A: exit $rc after $(secs "$t0" "$(now)") s"
[ $rc -eq 0 ] || { show_tail "$OUT/A.log"; die "run A failed (exit $rc)"; }

# The exports beside A's checkpoint, then B's two checkpoints (while one is saved) once A's are gone.
ck_bytes=$(du -sb "$OUT/A/$(cat "$OUT/A/latest" 2> /dev/null)" 2> /dev/null | cut -f1)
free_bytes=$(df -B1 --output=avail "$OUT" 2> /dev/null | tail -1)
if [ -n "$ck_bytes" ] && [ -n "$free_bytes" ] && [ "$free_bytes" -lt $((ck_bytes * 2)) ]; then
  say "WARNING: a checkpoint takes $((ck_bytes / 1000000)) MB and $((free_bytes / 1000000)) MB are free: the export or B may not fit"
fi

# ---- HF: export, re-import, logits ----------------------------------------------------------
hf_ok=1
vocab=$(grep -o '"vocab_size":[0-9]*' "$OUT/A/metrics.jsonl" | head -1 | grep -o '[0-9]*$')
ids=$(awk -v v="${vocab:-16}" 'BEGIN { for (i = 1; i <= 16; i++) printf "%s%d", (i > 1 ? "," : ""), (i * 7919 + 11) % v }')
convert() {  # name, flags...
  local name=$1
  shift
  "$BIN" convert "$@" > "$OUT/$name.log" 2>&1 || { show_tail "$OUT/$name.log"; say "FAILED: convert $* (log: $OUT/$name.log)"; return 1; }
}
t0=$(now)
convert export --checkpoint="$OUT/A" --to_hf="$OUT/hf" || hf_ok=0
export_s=$(secs "$t0" "$(now)")
say "HF: export took $export_s s"
[ $hf_ok = 1 ] && { convert reimport --from_hf="$OUT/hf" --to_checkpoint="$OUT/reimport" || hf_ok=0; }
if [ $hf_ok = 1 ]; then
  convert logits_original --checkpoint="$OUT/A" --prompt_ids="$ids" --logits_out="$OUT/logits_original.npy" &&
    convert logits_hf --from_hf="$OUT/hf" --prompt_ids="$ids" --logits_out="$OUT/logits_hf.npy" &&
    convert logits_reimport --checkpoint="$OUT/reimport" --prompt_ids="$ids" --logits_out="$OUT/logits_reimport.npy" ||
    hf_ok=0
fi
# The HF folder and its re-import: the same weights, so bit-identical logits. The original
# checkpoint: DiffLlama has no sub-layer norm weight, the export folds it into o_proj, so its
# logits differ from the export's by f32 rounding only (tolerance: 1e-4 of the largest logit).
logits="FAIL: a convert command failed (see its log in $OUT)"
if [ $hf_ok = 1 ]; then
  logits=$("$PYTHON" - "$OUT" << 'EOF'
import array
import ast
import sys


def load_npy(path):
    """A float32 little-endian .npy (what convert --logits_out writes): (shape, values)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        raise SystemExit(f"{path}: not a .npy file")
    at = 10 if data[6] == 1 else 12
    end = at + int.from_bytes(data[8:at], "little")
    header = ast.literal_eval(data[at:end].decode("latin1"))
    if header["descr"] != "<f4" or header["fortran_order"]:
        raise SystemExit(f"{path}: expected little-endian float32 in C order, got {header}")
    values = array.array("f")
    values.frombytes(data[end:])
    if sys.byteorder != "little":
        values.byteswap()
    return header["shape"], values


o = sys.argv[1]
shape, orig = load_npy(f"{o}/logits_original.npy")
_, hf = load_npy(f"{o}/logits_hf.npy")
_, re = load_npy(f"{o}/logits_reimport.npy")
if not (len(hf) == len(re) == len(orig)):
    print(f"FAIL: the logits have different sizes ({len(orig)}, {len(hf)}, {len(re)})")
    raise SystemExit
exact = hf.tobytes() == re.tobytes()
scale = max(abs(x) for x in orig)
diff = max(abs(a - b) for a, b in zip(orig, hf))
tol = 1e-4 * max(scale, 1.0)
rows, vocab = shape


def argmax(v, r):
    return max(range(vocab), key=lambda j: v[r * vocab + j])


agree = sum(argmax(orig, r) == argmax(hf, r) for r in range(rows))
ok = exact and diff <= tol
print(("PASS" if ok else "FAIL") + f": HF folder and re-import {'bit-identical' if exact else 'DIFFER'}; "
      f"original vs export max |diff| {diff:.3g} (largest logit {scale:.3g}, tolerance {tol:.3g}), "
      f"argmax equal at {agree}/{rows} positions")
EOF
  ) || logits="FAIL: comparing the logits failed"
fi
say "HF: logits $logits"
[ "$KEEP_CKPT" = 1 ] || rm -rf "$OUT/hf" "$OUT/reimport" "$OUT"/A/step_* "$OUT"/A/latest

# ---- B: stopped by SIGTERM after step KILL_AT, then resumed ------------------------------
say "B: training until step $KILL_AT, then SIGTERM (log: $OUT/B1.log)"
"${train_cmd[@]}" --ckpt_dir="$OUT/B" > "$OUT/B1.log" 2>&1 &
pid=$!
# waits for step KILL_AT; a run that records no new step for STALL_S seconds is ended
seen=0
seen_at=$(date +%s)
while kill -0 $pid 2> /dev/null && [ "$(last_step "$OUT/B")" -lt "$KILL_AT" ]; do
  sleep 0.2
  step=$(last_step "$OUT/B")
  if [ "$step" != "$seen" ]; then
    seen=$step
    seen_at=$(date +%s)
  elif [ $(($(date +%s) - seen_at)) -gt "${STALL_S:-1800}" ]; then
    kill -KILL $pid
    show_tail "$OUT/B1.log"
    die "run B recorded no step for ${STALL_S:-1800} s (last: step $seen); killed it"
  fi
done
if ! kill -0 $pid 2> /dev/null; then
  wait $pid
  rc=$?
  show_tail "$OUT/B1.log"
  die "run B ended (exit $rc) before it could be stopped at step $KILL_AT"
fi
kill -TERM $pid
wait $pid
rc=$?
stopped_at=$(last_step "$OUT/B")
say "B: exit $rc after SIGTERM (steps done: $stopped_at)"
[ $rc -eq 143 ] || { show_tail "$OUT/B1.log"; die "run B should exit 143 (128 + SIGTERM) after saving, got $rc"; }
t0=$(now)
say "B: resuming (log: $OUT/B2.log)"
"${train_cmd[@]}" --ckpt_dir="$OUT/B" > "$OUT/B2.log" 2>&1
rc=$?
say "B: resumed run exit $rc after $(secs "$t0" "$(now)") s"
[ $rc -eq 0 ] || { show_tail "$OUT/B2.log"; die "the resumed run B failed (exit $rc)"; }
grep -q "resumed from" "$OUT/B2.log" || die "the second run of B did not resume (no 'resumed from' in $OUT/B2.log)"
[ "$KEEP_CKPT" = 1 ] || rm -rf "$OUT"/B/step_* "$OUT"/B/.tmp.step_* "$OUT"/B/latest

# ---- the table ---------------------------------------------------------------------------------
"$PYTHON" tools/plot_metrics.py "$OUT/A" "$OUT/B" --labels=A,B --out="$OUT/loss.png" \
  --title="scale_check: $MODEL_FLAGS, seq $SEQ, batch $BATCH" > "$OUT/plot.log" 2>&1 ||
  say "no plot ($(tail -1 "$OUT/plot.log"))"
"$PYTHON" - "$OUT" "$KILL_AT" "$export_s" "$logits" "$DEVICE" << 'EOF'
import json
import statistics
import sys

out, kill_at, export_s, logits, device = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]


def records(run):
    with open(f"{out}/{run}/metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def of(recs, event):
    return [r for r in recs if r.get("event") == event]


a, b = records("A"), records("B")
problems = []

# every step's loss: B (both processes) against A, bit for bit
a_loss = {r["step"]: r["loss"] for r in of(a, "step") if r.get("window_steps") == 1}
b_loss = {}
for r in of(b, "step"):
    if r.get("window_steps") == 1:
        b_loss[r["step"]] = r["loss"]
b_starts = of(b, "start")
resume_step = b_starts[-1].get("resume_step") if len(b_starts) >= 2 else None
steps = max(a_loss) if a_loss else 0
differ = [s for s in sorted(b_loss) if s in a_loss and a_loss[s] != b_loss[s]]
missing = [s for s in range(1, steps + 1) if s not in b_loss]
after = [s for s in b_loss if resume_step is not None and s > resume_step]
loss_ok = steps > 0 and not differ and not missing and bool(after) and set(a_loss) == set(range(1, steps + 1))
if resume_step is None:
    problems.append("B has no resumed start record")
if differ:
    s = differ[0]
    problems.append(f"loss differs at {len(differ)} step(s), first at step {s}: A {a_loss[s]!r}, B {b_loss[s]!r}")
if missing:
    problems.append(f"B recorded no loss for {len(missing)} step(s), e.g. {missing[:5]}")

start = of(a, "start")[0]
steps_a = of(a, "step")
# throughput: the median over the logged windows, the first (start-up) left out
later = steps_a[1:] or steps_a
tps = statistics.median(r["tokens_per_s"] for r in later)
mfus = [r["mfu"] for r in later if r.get("mfu") is not None]
mfu = f"{100 * statistics.median(mfus):.1f} %" if mfus else "n/a"
peaks = [r["mem_peak_bytes"] for r in steps_a if r.get("mem_peak_bytes")]
measured = max(peaks) if peaks else None
plan = start.get("plan_peak_bytes")
gib = 1024.0 ** 3
if measured and plan:
    memory = f"{measured / gib:.2f} GiB measured vs {plan / gib:.2f} GiB planned (ratio {measured / plan:.3f})"
else:
    memory = f"n/a measured ({device}) vs {plan / gib:.2f} GiB planned" if plan else "n/a"
ck = of(a, "checkpoint")
periodic = [c for c in ck if c.get("reason") == "periodic"]
final = [c for c in ck if c.get("reason") == "final"]
signal = [c for c in of(b, "checkpoint") if c.get("reason") == "signal"]


def ck_text(cs):
    if not cs:
        return "none"
    return (f"stall {max(c['stall_s'] for c in cs):.2f} s, write {max(c['write_s'] for c in cs):.2f} s"
            + (f" (max of {len(cs)})" if len(cs) > 1 else ""))


startup = start["startup_s"]
resumed = b_starts[-1]["startup_s"] if len(b_starts) >= 2 else {}
end_a = of(a, "end")[-1] if of(a, "end") else {}
evals = of(a, "eval")
rows = [
    ("model", f"{start['parameters'] / 1e9:.3f} B parameters, {start['device']}, "
              f"{start['tokens_per_step']} tokens/step"),
    ("start-up (fresh)", f"{startup['to_first_step']:.1f} s to the first step done (config {startup['config']:.1f}, "
                         f"allocation {startup['allocation']:.1f}, init {startup['init']:.1f}, "
                         f"first step {startup['first_step']:.1f})"),
    ("tokens/s", f"{tps:,.0f} (median of {len(later)} logged steps; whole run {end_a.get('tokens_per_s', 0):,.0f})"),
    ("MFU", mfu),
    ("peak device memory", memory),
    ("checkpoint, periodic (async)", ck_text(periodic)),
    ("checkpoint, final (blocking)", ck_text(final)),
    ("checkpoint, on SIGTERM (B)", ck_text(signal)),
    ("resume (B)", f"{resumed.get('to_first_step', float('nan')):.1f} s from launch to the first step "
                   f"(load {resumed.get('load', float('nan')):.1f} s), from step {resume_step}"
                   if resumed else "n/a"),
    ("HF export (f32)", f"{export_s:.1f} s"),
    ("final loss (A)", f"train {end_a.get('final_loss', float('nan')):.4f}"
                       + (f", validation {evals[-1]['loss']:.4f}" if evals else "")),
    ("loss check", ("PASS" if loss_ok else "FAIL")
     + f": {len([s for s in b_loss if s in a_loss])} steps of B compared with A's, {len(differ)} differ"
       f" ({len(after)} steps after the resume at step {resume_step}; SIGTERM after step {kill_at})"),
    ("logits check", logits),
]
width = max(len(k) for k, _ in rows)
lines = [f"{k:<{width}}  {v}" for k, v in rows] + [f"problem: {p}" for p in problems]
text = "\n".join(lines)
print(text)
with open(f"{out}/summary.txt", "w") as f:
    f.write(text + "\n")
with open(f"{out}/summary.json", "w") as f:
    json.dump({"loss_check": loss_ok, "logits_check": logits.startswith("PASS"), "rows": dict(rows), "problems": problems}, f,
              indent=1)
sys.exit(0 if loss_ok and logits.startswith("PASS") else 1)
EOF
rc=$?
say "$([ $rc -eq 0 ] && echo PASS || echo FAIL); table in $OUT/summary.txt, logs and metrics in $OUT"
exit $rc
