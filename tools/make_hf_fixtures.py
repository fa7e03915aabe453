#!/usr/bin/env python3
"""Writes the Hugging Face Llama fixture under tests/data/hf_llama_tied_sharded/ with
transformers itself (CPU is enough: pip install torch transformers safetensors numpy).

A tiny LlamaForCausalLM (GQA: 4 query heads over 2 K/V heads, head_dim 16, tied embeddings,
rope_theta 50000, rms_norm_eps 1e-6, random non-unit norm weights) saved by save_pretrained in
bfloat16 with a small max_shard_size, so that the folder is transformers' own sharded layout
(model-0000K-of-0000N.safetensors + model.safetensors.index.json). logits.npy holds the
logits of every position of tokens.json, computed in float64 (eager attention) from exactly
the stored bf16 weights, so difftron's float64 import must match them to float64 rounding and
its float32 import to float32 rounding (tests/test_hf_llama.cpp).

Not run in CI. Run from the repository root: python3 tools/make_hf_fixtures.py
"""
import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "hf_llama_tied_sharded")


def main():
    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=299,
                      pad_token_id=None, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # not all ones: a mix-up must show
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    model.save_pretrained(OUT, max_shard_size="100KB")
    files = sorted(os.listdir(OUT))
    assert "model.safetensors.index.json" in files, files

    # The logits of exactly the stored (bf16) weights, in float64.
    ref = LlamaForCausalLM.from_pretrained(OUT, dtype=torch.float64, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, cfg.vocab_size, (1, 24), generator=gen)
    with torch.no_grad():
        logits = ref(tokens).logits[0].numpy().astype(np.float64)
    np.save(os.path.join(OUT, "logits.npy"), logits)
    with open(os.path.join(OUT, "tokens.json"), "w") as f:
        json.dump(tokens[0].tolist(), f)
    with open(os.path.join(OUT, "README"), "w") as f:
        f.write(f"Made by tools/make_hf_fixtures.py with transformers {transformers.__version__}, "
                f"torch {torch.__version__}.\n")
    total = sum(os.path.getsize(os.path.join(OUT, n)) for n in os.listdir(OUT))
    print(f"wrote {OUT}: {sorted(os.listdir(OUT))}, {total} bytes")


if __name__ == "__main__":
    main()
