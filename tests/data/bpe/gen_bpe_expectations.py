#!/usr/bin/env python3
"""Generates the byte-level BPE test data under tests/data/bpe/ with Hugging Face
`tokenizers` (pip install tokenizers; made with the version recorded in expected_*.json):
two small tokenizers trained on Debian linux-doc text (GPT-2 style: ByteLevel with its
built-in regex; Llama-3 style: a Split regex then ByteLevel without regex) and the ids HF
produces for sample.txt, each of its lines and some edge cases. The C++ test
(tests/test_io_tokenizer_bpe.cpp) must reproduce these ids exactly. Not run in CI.
Run from the repository root: python3 tests/data/bpe/gen_bpe_expectations.py"""
import glob
import gzip
import json
import os

import tokenizers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = sorted(glob.glob("/usr/share/doc/linux-doc/Documentation/process/*.rst.gz"))
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus():
    # numbers, so that digit merges exist and the Llama-3 \p{N}{1,3} grouping matters
    yield " ".join(str(i * 7919 % 100000) for i in range(3000))
    for path in CORPUS:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            yield f.read()


def train(kind):
    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<|endoftext|>"]
    else:
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def main():
    assert CORPUS, "needs the Debian package linux-doc"
    sample = open(os.path.join(HERE, "sample.txt"), encoding="utf-8", newline="").read()
    cases = [sample] + sample.splitlines(keepends=True) + [
        "", " ", "a", "  \n ", "\n\n", "\t\n", "x  y", "x   y", "'s", "''", "'S'T",
        "<|endoftext|>", "<|endoftext|><|endoftext|>", "a<|endoftext|>b", "<|endoftext",
        "<|end_of_text|>x", "=" * 100, " " * 50 + "x", "123456789012", "\u00c0\u00c9\u00ce\u00d5\u00dc \u00e0\u00e9\u00ee\u00f5\u00fc",
        "word\u00a0word", "end with spaces  ", "\u3000\u3000x", "tab\tx", "a\r\n\r\nb", "!!!\n\nx",
    ]
    for kind in ("gpt2", "llama3"):
        tok = train(kind)
        tok.save(os.path.join(HERE, f"{kind}_tokenizer.json"))
        out = {"tokenizers_version": tokenizers.__version__, "tokenizer": f"{kind}_tokenizer.json",
               "vocab_size": tok.get_vocab_size(with_added_tokens=True), "cases": []}
        for text in cases:
            ids = tok.encode(text, add_special_tokens=False).ids
            out["cases"].append({"text": text, "ids": ids,
                                 "decoded": tok.decode(ids, skip_special_tokens=False)})
        with open(os.path.join(HERE, f"expected_{kind}.json"), "w", encoding="utf-8") as f:
            json.dump(out, f, ensure_ascii=False, indent=0)
        print(kind, out["vocab_size"], len(out["cases"]), "cases")


if __name__ == "__main__":
    main()
