#!/usr/bin/env python3
"""Checks a folder written by `difftron convert --to_hf` in Hugging Face transformers itself.

Needs python3 with torch, transformers and numpy (CPU is enough), and a difftron binary:

    python3 tools/hf_check.py --hf_dir=OUT --difftron=build/difftron [--checkpoint=CKPT]
        [--prompt="The"] [--max_new_tokens=40]

It loads OUT with AutoTokenizer and AutoModelForCausalLM (float32, eager attention) and checks:
  1. tokenizer: AutoTokenizer's ids for the prompt are difftron's (convert --logits_out prints
     the ids its own tokenizer gives), and its eos/pad ids are generation_config's;
  2. logits of every prompt position: transformers' vs difftron's import of the same folder,
     within the float32 rounding bound of the forward pass (below); and, with --checkpoint, vs
     the checkpoint the folder came from (the same bound for an f32 export; a bf16 export is
     reported, as its weights were rounded);
  3. generate: generation_config's eos is the tokenizer's; greedy decoding stops at that eos
     (forced at step 3 with a logits processor, the output must end there however large
     max_new_tokens is); and, with --checkpoint, transformers' greedy text is difftron's
     (`difftron generate --temperature=0`).
Prints one line per check and exits 1 if any failed.

The bound: an f32 sum of n terms in another order differs by at most 2 gamma_n of its terms'
scale (gamma_n = n u / (1 - n u), u = 2^-24); the forward pass chains 8 such reductions per
layer and 3 at the head (tests/tolerances.h); transformers' RoPE angles are f32 as well.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

U32 = 2.0 ** -24


def f32_bound(cfg, seq):
    n = max(cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], seq,
            cfg["num_attention_heads"] * cfg["head_dim"])
    gamma = n * U32 / (1 - n * U32)
    chain = 8 * cfg["num_hidden_layers"] + 3
    rope = 2.0 * (seq + 1) * U32 * cfg["num_hidden_layers"] * 2
    return chain * 2 * gamma + rope


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def difftron_logits(binary, source_flag, prompt, out):
    r = subprocess.run([binary, "convert", source_flag, "--prompt=" + prompt, "--logits_out=" + out],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"difftron convert --logits_out failed:\n{r.stdout}{r.stderr}")
    line = next(l for l in r.stdout.splitlines() if l.startswith("prompt_ids: "))
    return [int(x) for x in line[len("prompt_ids: "):].split(",")], np.load(out).astype(np.float64)


class ForceAt(LogitsProcessor):
    """Makes token `tok` the only choice once `step` new tokens exist."""

    def __init__(self, prompt_len, step, tok):
        self.at, self.tok = prompt_len + step, tok

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.tok] = 0.0
        return scores


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True)
    ap.add_argument("--difftron", required=True, help="path of the difftron binary")
    ap.add_argument("--checkpoint", default="", help="the checkpoint the folder was exported from")
    ap.add_argument("--prompt", default="The")
    ap.add_argument("--max_new_tokens", type=int, default=40)
    a = ap.parse_args()
    failures = []

    def check(ok, what):
        print(("PASS " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; folder {a.hf_dir}: "
          f"{sorted(os.listdir(a.hf_dir))}")
    cfg = json.load(open(os.path.join(a.hf_dir, "config.json")))
    gen_cfg = json.load(open(os.path.join(a.hf_dir, "generation_config.json")))
    tok = AutoTokenizer.from_pretrained(a.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(a.hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    print(f"model {type(model).__name__} ({cfg['model_type']}, stored {cfg.get('dtype')}), "
          f"tokenizer {type(tok).__name__}: eos {tok.eos_token!r} = {tok.eos_token_id}, "
          f"pad {tok.pad_token_id}, bos {tok.bos_token_id}")

    # 1. tokenizer
    ids = tok(a.prompt)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        dt_ids, dt_logits = difftron_logits(a.difftron, "--from_hf=" + a.hf_dir, a.prompt, tmp + "/f.npy")
        ck = difftron_logits(a.difftron, "--checkpoint=" + a.checkpoint, a.prompt, tmp + "/c.npy") \
            if a.checkpoint else None
    check(ids == dt_ids, f"tokenizer: AutoTokenizer ids of {a.prompt!r} = difftron's ({len(ids)} tokens)")
    check(tok.eos_token_id == gen_cfg.get("eos_token_id") == cfg.get("eos_token_id"),
          f"eos: tokenizer {tok.eos_token_id}, generation_config {gen_cfg.get('eos_token_id')}, "
          f"config {cfg.get('eos_token_id')}")
    check(tok.pad_token_id == gen_cfg.get("pad_token_id"), f"pad: tokenizer {tok.pad_token_id}, "
          f"generation_config {gen_cfg.get('pad_token_id')}")
    check(tok.decode(ids) == a.prompt, "tokenizer: decode(encode(prompt)) == prompt")

    # 2. logits
    with torch.no_grad():
        hf = model(torch.tensor([dt_ids])).logits[0].double().numpy()
    bound = f32_bound(cfg, len(dt_ids))
    err = rel_l2(dt_logits, hf)
    check(err < bound, f"logits, difftron import of the folder vs transformers: rel L2 {err:.3g} "
          f"(f32 bound {bound:.3g})")
    if ck is not None:
        err = rel_l2(ck[1], hf)
        if cfg.get("dtype") == "float32":
            check(err < bound, f"logits, the checkpoint vs transformers: rel L2 {err:.3g} (f32 bound {bound:.3g})")
        else:
            print(f"INFO logits, the checkpoint vs transformers: rel L2 {err:.3g} (weights rounded to {cfg.get('dtype')})")

    # 3. generate
    prompt = torch.tensor([ids])
    eos = tok.eos_token_id
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=a.max_new_tokens, do_sample=False)[0].tolist()
    new = out[len(ids):]
    stopped = eos in new
    check(not stopped or new.index(eos) == len(new) - 1,
          f"generate: greedy {len(new)} new tokens, " + ("ends at its first eos" if stopped else "no eos emitted"))
    print(f"INFO transformers greedy: {tok.decode(out)!r}")
    with torch.no_grad():
        forced = model.generate(prompt, max_new_tokens=a.max_new_tokens, do_sample=False,
                                logits_processor=LogitsProcessorList([ForceAt(len(ids), 3, eos)]))[0].tolist()
    check(forced[len(ids):][-1:] == [eos] and len(forced) == len(ids) + 4,
          f"generate: eos forced as new token 4 ends the output there ({len(forced) - len(ids)} new tokens, "
          f"max_new_tokens {a.max_new_tokens})")
    if a.checkpoint:
        r = subprocess.run([a.difftron, "generate", "--device=cpu", "--checkpoint=" + a.checkpoint,
                            "--prompt=" + a.prompt, f"--max_new_tokens={a.max_new_tokens}", "--temperature=0"],
                           capture_output=True, text=True)
        dt_text = r.stdout[:-1] if r.stdout.endswith("\n") else r.stdout
        # difftron's byte tokenizer shows its EOS as "\n<|eos|>\n"
        dt_text = dt_text.replace("\n<|eos|>\n", "<|eos|>")
        hf_text = tok.decode(out)
        check(r.returncode == 0 and dt_text == hf_text, f"generate: difftron's greedy text = transformers' "
              f"({len(hf_text)} characters)" + ("" if dt_text == hf_text else f"; difftron: {dt_text!r}"))
    print(f"{len(failures)} failed" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
