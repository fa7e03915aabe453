#!/usr/bin/env python3
"""Checks that tools/reference/model.py is difftron's model (CPU, float32; a few seconds).

    python3 tools/reference/check_reference.py [--difftron=build/difftron] [--work=DIR] [--compile]

Needs torch (CPU is enough) and a difftron binary (a CPU build does). Checks:
  1. parameter count: model.py's, on the meta device, equals `difftron plan`'s for the four
     models of tools/compare_pytorch.sh (diff/baseline, 1.3B/350M);
  2. logits: for a tiny Diff model with grouped K/V (h 2, h_kv 1, 3 layers: three different
     lambda_init) and a tiny baseline, `difftron train` a few steps on the CPU (so lambda and the
     sub-norm weight are no longer at their initial values), `difftron convert --to_hf` the
     checkpoint, load that folder into model.py, and compare its logits of a random prompt with
     `difftron convert --checkpoint --logits_out` (difftron's own forward of the checkpoint),
     for both ways of feeding V to SDPA ("split", "wide"); both in float32;
  3. if transformers is installed: model.py's logits equal DiffLlamaForCausalLM's / Llama's of
     the same folder;
  4. training: AdamW on one fixed batch lowers the loss of a tiny Diff model (and, with
     --compile, the regionally compiled model's loss equals the eager one's);
Prints one line per check and exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import model as M  # noqa: E402

FAILED = []


def report(ok: bool, what: str):
    print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)
    if not ok:
        FAILED.append(what)


def run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"check_reference: {what} failed ({' '.join(cmd)}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def model_flags(cfg: M.Config):
    return [f"--attention={cfg.attention}", f"--d_model={cfg.d_model}", f"--n_layers={cfg.n_layers}",
            f"--n_heads={cfg.n_heads}", f"--n_kv_heads={cfg.n_kv_heads}", f"--head_dim={cfg.head_dim}",
            f"--ffn_dim={cfg.ffn_dim}", f"--vocab_size={cfg.vocab_size}"]


def check_param_counts(binary):
    for name, kw in M.PRESETS.items():
        cfg = M.Config(vocab_size=32000, max_seq_len=2048, **kw)
        with torch.device("meta"):
            m = M.Transformer(cfg)
        ours = sum(p.numel() for p in m.parameters())
        out = run([binary, "plan", *model_flags(cfg), "--seq=2048", "--batch=8"], f"difftron plan ({name})")
        found = re.search(r"params=(\d+)", out) or re.search(r"([\d,]+) parameters", out)
        theirs = int(found.group(1).replace(",", "")) if found else None
        report(theirs == ours and ours == cfg.num_parameters(),
               f"{name}: parameters model.py {ours:,}, difftron plan {theirs if theirs is None else f'{theirs:,}'}")


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def check_logits(binary, work, cfg: M.Config, steps=3, seq=24):
    tag = cfg.attention
    ck, hf = os.path.join(work, f"ck_{tag}"), os.path.join(work, f"hf_{tag}")
    run([binary, "train", "--device=cpu", "--data=synthetic:copy", *model_flags(cfg), f"--seq={seq}", "--batch=2",
         f"--steps={steps}", "--warmup=0", "--lr=0.01", "--log_every=1", "--eval_batches=1", f"--ckpt_dir={ck}"],
        f"difftron train ({tag})")
    run([binary, "convert", f"--checkpoint={ck}", f"--to_hf={hf}"], f"difftron convert --to_hf ({tag})")
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (seq,), generator=g)
    npy = os.path.join(work, f"logits_{tag}.npy")
    run([binary, "convert", f"--checkpoint={ck}", "--prompt_ids=" + ",".join(map(str, ids.tolist())),
         f"--logits_out={npy}"], f"difftron convert --logits_out ({tag})")
    import numpy as np
    ref = torch.from_numpy(np.load(npy).astype(np.float64))

    hf_cfg, tensors = M.read_hf_folder(hf)
    mcfg = M.config_from_hf(hf_cfg, max_seq_len=seq)
    report(all(getattr(mcfg, k) == getattr(cfg, k) for k in
               ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "attention")),
           f"{tag}: config.json reads back as the trained config")
    model = M.Transformer(mcfg)
    M.load_hf_state(model, tensors)
    model.eval()
    if cfg.attention == "diff":
        lams = [float(b.self_attn.lambda_full().detach()) for b in model.model.layers]
        inits = [M.lambda_init(l) for l in range(cfg.n_layers)]
        print(f"  lambda per layer {['%.4f' % x for x in lams]} (lambda_init {['%.4f' % x for x in inits]})")
    scale = float(ref.abs().max())
    for impl in (["split", "wide"] if cfg.attention == "diff" else ["split"]):
        model.set_diff_impl(impl)
        with torch.no_grad():
            ours = model(ids[None])[0].double()
        e, mx = rel_l2(ours, ref), float((ours - ref).abs().max())
        report(e < 2e-5, f"{tag} ({impl}): logits vs difftron's, {seq} positions x {cfg.vocab_size}: "
               f"rel L2 {e:.2e}, max |diff| {mx:.2e} (logits up to {scale:.2f})")
    try:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM
    except ImportError:
        print(f"  ({tag}: transformers not installed: skipped the comparison with its model)")
        return
    hfm = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    hfm.eval()
    model.set_diff_impl("wide")
    with torch.no_grad():
        theirs = hfm(ids[None]).logits[0].double()
        ours = model(ids[None])[0].double()
    report(rel_l2(ours, theirs) < 2e-5, f"{tag}: logits vs transformers' {type(hfm).__name__}: rel L2 "
           f"{rel_l2(ours, theirs):.2e}; transformers vs difftron {rel_l2(theirs, ref):.2e}")


def check_training(compile_too: bool):
    torch.manual_seed(0)
    cfg = M.Config(vocab_size=97, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=128,
                   max_seq_len=32, attention="diff")
    model = M.Transformer(cfg, "wide")
    model.init_weights(3)
    opt = torch.optim.AdamW(M.decay_groups(model, 0.05), lr=3e-3, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (4, 33), generator=g)
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(30):
        loss = M.loss_fn(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    report(losses[-1] < 0.5 * losses[0], f"training: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 30 AdamW steps "
           "on one batch (tiny Diff model, h_kv 1)")
    lam_grad_ok = True
    loss = M.loss_fn(model, x, y)
    loss.backward()
    for b in model.model.layers:
        a = b.self_attn
        for p in (a.lambda_q1, a.lambda_k1, a.lambda_q2, a.lambda_k2, a.subln.weight):
            lam_grad_ok &= p.grad is not None and bool(p.grad.abs().sum() > 0)
    report(lam_grad_ok, "training: the lambda vectors and the sub-norm weight get gradients")
    if compile_too:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            eager = float(M.loss_fn(model, x, y))
        for blk in model.model.layers:
            blk.compile()
        head = torch.compile(M.head_loss)
        with torch.no_grad():
            comp = float(head(model, model.hidden(x), y))
        report(abs(comp - eager) < 1e-4 * abs(eager), f"compile: regionally compiled loss {comp:.6f} vs eager {eager:.6f}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    default = next((os.path.join(root, b, "difftron") for b in ("build", "build-ref", "build-gpu")
                    if os.access(os.path.join(root, b, "difftron"), os.X_OK)), "build/difftron")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--difftron", default=default, help=f"the difftron binary (default {default})")
    p.add_argument("--work", default="", help="a folder for the checkpoints and exports (default: a temporary one)")
    p.add_argument("--compile", action="store_true", help="also check torch.compile (needs a C++ compiler)")
    a = p.parse_args()
    if not os.access(a.difftron, os.X_OK):
        sys.exit(f"check_reference: no difftron binary at {a.difftron}: build it (tools/build.sh) or pass --difftron")
    torch.set_default_dtype(torch.float32)
    print(f"torch {torch.__version__}, difftron {a.difftron}")
    check_param_counts(a.difftron)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or tmp
        os.makedirs(work, exist_ok=True)
        check_logits(a.difftron, work, M.Config(vocab_size=101, d_model=64, n_layers=3, n_heads=2, n_kv_heads=1,
                                                head_dim=16, ffn_dim=160, max_seq_len=64, attention="diff"))
        check_logits(a.difftron, work, M.Config(vocab_size=101, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                                head_dim=16, ffn_dim=160, max_seq_len=64, attention="standard"))
    check_training(a.compile)
    print(f"{len(FAILED)} failed" if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
