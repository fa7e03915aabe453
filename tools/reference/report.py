#!/usr/bin/env python3
"""Helpers of tools/compare_pytorch.sh (standard library only).

    report.py difftron-log LOG WARMUP BATCH SEQ OUT.json
        Parses `difftron train --log_every=1` output ("step N/M | ... | X tok/s | ... | mem Y GiB
        | ..."): drops the first WARMUP steps, and writes tokens/s = timed tokens / the sum of
        the timed steps' times (each step's time = BATCH*SEQ / its tok/s), the median step's
        tokens/s, the number of timed steps and the peak memory the log reports.
    report.py table DIR MODEL...
        Reads DIR/MODEL.difftron.json and DIR/MODEL.pytorch.json for each model (and DIR/meta.txt,
        one line per fact about the run) and writes DIR/compare.md and DIR/compare.json; prints
        the markdown table.
"""
import json
import os
import re
import statistics
import sys

STEP = re.compile(r"step\s+(\d+)/(\d+) \| loss ([-\d.naif]+) .*?\| ([\d.]+) tok/s \|(.*)$")
MEM = re.compile(r"\| mem ([\d.]+) GiB")

LABELS = {
    "diff-1.3B": "Diff 1.3B (d 2048, L 24, h 8, dh 128, ffn 5632)",
    "base-1.3B": "baseline 1.3B (16 heads of 128)",
    "diff-350M": "Diff 350M (d 1024, L 24, h 8, dh 64, ffn 2816)",
    "base-350M": "baseline 350M (16 heads of 64)",
}


def difftron_log(log, warmup, batch, seq, out):
    steps = {}
    mem = 0.0
    for line in open(log, errors="replace"):
        m = STEP.search(line)
        if not m:
            continue
        steps[int(m.group(1))] = (float(m.group(4)), m.group(3))
        mm = MEM.search(line)
        if mm:
            mem = max(mem, float(mm.group(1)))
    timed = [(s, tps) for s, (tps, _) in sorted(steps.items()) if s > warmup]
    res = {"log": log, "steps_logged": len(steps), "warmup_steps": warmup, "timed_steps": len(timed)}
    if not timed or any(t <= 0 for _, t in timed):
        res["error"] = f"no timed steps in {log} (logged {len(steps)} steps, warm-up {warmup})"
    else:
        # every logged step must be a window of one step, or the per-step times are wrong
        expected = list(range(warmup + 1, warmup + 1 + len(timed)))
        if [s for s, _ in timed] != expected:
            res["error"] = f"steps {[s for s, _ in timed]} are not consecutive: run with --log_every=1"
        tokens = batch * seq
        total = sum(tokens / t for _, t in timed)
        res.update(tokens_per_s=len(timed) * tokens / total, median_tokens_per_s=statistics.median(t for _, t in timed),
                   step_ms=1000 * total / len(timed), peak_gib=mem if mem > 0 else None,
                   last_loss=steps[max(steps)][1])
    json.dump(res, open(out, "w"), indent=1)
    if "error" in res:
        print("difftron log: " + res["error"], file=sys.stderr)
        return 1
    return 0


def fmt_k(x):
    return f"{x / 1000:.1f}k" if isinstance(x, (int, float)) else "-"


def table(d, models):
    rows, md = [], []
    md.append("| model | difftron tokens/s | PyTorch tokens/s | ratio | difftron peak GiB | PyTorch peak GiB "
              "| PyTorch attention | notes |")
    md.append("|---|---|---|---|---|---|---|---|")
    for m in models:
        def load(kind):
            p = os.path.join(d, f"{m}.{kind}.json")
            try:
                return json.load(open(p))
            except (OSError, ValueError):
                return {"error": f"no result ({p} missing or unreadable)"}
        dt, pt = load("difftron"), load("pytorch")
        a, b = dt.get("tokens_per_s"), pt.get("tokens_per_s")
        ratio = a / b if a and b else None
        row = {"model": m, "label": LABELS.get(m, m), "difftron_tokens_per_s": a, "pytorch_tokens_per_s": b,
               "ratio": ratio, "difftron_peak_gib": dt.get("peak_gib"), "pytorch_peak_gib": pt.get("peak_gib"),
               "pytorch_attention": f"{pt.get('diff_impl', '-')}/{pt.get('sdpa_backend', '-')}"
               if "sdpa_backend" in pt else None,
               "difftron": dt, "pytorch": pt}
        rows.append(row)
        errs = "; ".join(f"{k}: {v['error']}" for k, v in (("difftron", dt), ("pytorch", pt)) if "error" in v)
        g = lambda x: f"{x:.2f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
        md.append(f"| {row['label']} | {fmt_k(a)} | {fmt_k(b)} | "
                  f"{f'{ratio:.2f}x' if ratio else '-'} | {g(row['difftron_peak_gib'])} | "
                  f"{g(row['pytorch_peak_gib'])} | {row['pytorch_attention'] or '-'} | {errs} |")
    text = "\n".join(md) + "\n"
    meta_path = os.path.join(d, "meta.txt")
    meta = open(meta_path).read().strip().splitlines() if os.path.exists(meta_path) else []
    header = "".join(f"- {l}\n" for l in meta) + ("\n" if meta else "")
    open(os.path.join(d, "compare.md"), "w").write(header + text)
    json.dump({"meta": meta, "rows": rows}, open(os.path.join(d, "compare.json"), "w"), indent=1)
    print(text, end="")
    return 0


def main(argv):
    if len(argv) >= 6 and argv[0] == "difftron-log":
        return difftron_log(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5])
    if len(argv) >= 2 and argv[0] == "table":
        return table(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
