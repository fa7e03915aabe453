#!/usr/bin/env python3
"""Plots the training loss (each log line's window mean) and the validation loss of one or
more runs from their metrics.jsonl (`difftron train --ckpt_dir=ROOT` writes ROOT/metrics.jsonl;
docs/TRAINING.md), against steps and against tokens, runs side by side in one PNG.

    python3 tools/plot_metrics.py runs/a/metrics.jsonl runs/b [--labels=a,b] [--out=loss.png]

A run directory may be given instead of its metrics.jsonl. A resumed run's records continue
in the same file; steps logged twice (a resume from an earlier checkpoint) keep the later
value. Needs matplotlib (Debian: python3-matplotlib)."""
import argparse
import json
import os
import sys


def read_run(path):
    """(steps, train) and (steps, val) series: lists of (step, tokens, loss)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    train, val = {}, {}
    tokens_per_step = None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"plot_metrics: {path}:{n}: skipping a line that is not JSON ({e})", file=sys.stderr)
                continue
            ev = r.get("event")
            if ev == "start":
                tokens_per_step = r.get("tokens_per_step", tokens_per_step)
            elif ev == "step" and r.get("loss") is not None:
                train[r["step"]] = (r["step"], r.get("tokens", 0), r["loss"])
            elif ev == "eval" and r.get("loss") is not None:
                tokens = r["step"] * tokens_per_step if tokens_per_step else 0
                val[r["step"]] = (r["step"], tokens, r["loss"])
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl files or run directories")
    ap.add_argument("--labels", default="", help="comma-separated names of the runs (default: their folders)")
    ap.add_argument("--out", default="loss.png", help="the PNG to write")
    ap.add_argument("--title", default="", help="a title above the plots")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_metrics: matplotlib is missing (Debian: apt-get install python3-matplotlib)")

    labels = a.labels.split(",") if a.labels else []
    runs = []
    for i, path in enumerate(a.metrics):
        run_dir = os.path.abspath(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        name = labels[i] if i < len(labels) else os.path.basename(run_dir)
        train, val = read_run(path)
        if not train and not val:
            print(f"plot_metrics: {path}: no step or eval records", file=sys.stderr)
        runs.append((name, train, val))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for col, (axis, xlabel) in enumerate(((0, "step"), (1, "tokens"))):
        ax = axes[col]
        for k, (name, train, val) in enumerate(runs):
            color = f"C{k % 10}"
            if train:
                ax.plot([p[axis] for p in train], [p[2] for p in train], color=color, lw=1.2,
                        label=f"{name} train")
            if val:
                ax.plot([p[axis] for p in val], [p[2] for p in val], color=color, ls="--", marker="o", ms=4,
                        label=f"{name} validation")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if a.title:
        fig.suptitle(a.title)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"plot_metrics: wrote {a.out}")


if __name__ == "__main__":
    main()
