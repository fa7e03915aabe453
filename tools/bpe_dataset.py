#!/usr/bin/env python3
"""A real-text token dataset with a byte-level BPE tokenizer, for runs that want more than
the byte tokenizer (tools/scale_check.sh): collects text documents from corpus folders
(default: the Debian linux-doc Documentation, then the other Debian docs under
/usr/share/doc, the Python docs among them when installed), trains a GPT-2 style byte-level
BPE with Hugging Face `tokenizers` (tools/requirements.txt), and tokenises the same
documents with `difftron prepare` into OUT/train and OUT/val. OUT/tokenizer.json is the
tokenizer (the shards also store it).

    python3 tools/bpe_dataset.py --out=data/debian-bpe32k [--corpus=DIR ...] [--vocab=32000]
        [--max_mb=45] [--val_fraction=0.015] [--difftron=build/difftron] [--force]
        [--tokenizer=FILE]   (reuse a tokenizer.json instead of training one)

Documents are the corpus files in sorted path order: *.txt, *.rst, *.md (each also .gz) and
README*, NEWS*, HISTORY*, changelog* (also .gz) and copyright files; files that are not UTF-8
or hold NUL bytes are skipped, and so is a file whose content was already taken (the html
copies of linux-doc's sources). Collection stops at --max_mb of text. The same corpus gives
the same tokenizer and dataset."""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TEXT_SUFFIXES = (".txt", ".rst", ".md")
NAME_PREFIXES = ("readme", "news", "history", "changelog")
DEFAULT_CORPUS = ["/usr/share/doc/linux-doc/Documentation", "/usr/share/doc"]
EOS = "<|endoftext|>"


def is_document(name):
    low = name.lower()
    base = low[:-3] if low.endswith(".gz") else low
    return base.endswith(TEXT_SUFFIXES) or base.startswith(NAME_PREFIXES) or base == "copyright"


def corpus_files(roots):
    """Every document file under the roots, in sorted path order, each real file once."""
    seen = set()
    for root in roots:
        if not os.path.isdir(root):
            print(f"bpe_dataset: skipping {root}: not a folder", file=sys.stderr)
            continue
        found = []
        for d, dirs, files in os.walk(os.path.realpath(root)):
            dirs.sort()
            found.extend(os.path.join(d, f) for f in files if is_document(f))
        for path in sorted(found):
            real = os.path.realpath(path)
            if real not in seen and os.path.isfile(real):
                seen.add(real)
                yield real


def read_text(path):
    """The file's text, or None when it is not UTF-8 text (or a damaged .gz)."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
        if b"\0" in data:
            return None
        return data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
        return None


def collect(roots, max_bytes, stage):
    """Writes the chosen documents to stage/NNNNNN.txt; returns (documents, bytes)."""
    hashes = set()
    n = total = skipped = 0
    for path in corpus_files(roots):
        text = read_text(path)
        if text is None or not text.strip():
            skipped += 1
            continue
        data = text.encode("utf-8")
        digest = hashlib.sha256(data).digest()
        if digest in hashes:
            skipped += 1
            continue
        if total + len(data) > max_bytes:
            break
        hashes.add(digest)
        with open(os.path.join(stage, f"{n:06d}.txt"), "wb") as f:
            f.write(data)
        n += 1
        total += len(data)
    print(f"bpe_dataset: {n} documents, {total / 1e6:.1f} MB of text ({skipped} files skipped: "
          f"not UTF-8 text, empty or duplicates)", file=sys.stderr)
    return n, total


def train_tokenizer(stage, vocab, path):
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        sys.exit("bpe_dataset: the Python package `tokenizers` is missing: "
                 "python3 -m pip install -r tools/requirements.txt")
    tok = Tokenizer(models.BPE())
    # GPT-2 style: ByteLevel with its built-in regex, no normalizer (what difftron reads)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    files = sorted(os.path.join(stage, f) for f in os.listdir(stage))
    tok.train(files, trainer=trainer)
    tok.save(path)
    return tok.get_vocab_size(with_added_tokens=True)


def find_difftron(given):
    if given:
        if not os.access(given, os.X_OK):
            sys.exit(f"bpe_dataset: --difftron={given} is not an executable")
        return given
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in ("build", "build-run", "build-gpu"):
        p = os.path.join(here, d, "difftron")
        if os.access(p, os.X_OK):
            return p
    return shutil.which("difftron") or sys.exit("bpe_dataset: no difftron binary found: give --difftron=PATH")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="dataset folder to create (OUT/train, OUT/val, OUT/tokenizer.json)")
    ap.add_argument("--corpus", action="append", help="a folder of text documents (repeatable; default: "
                    + ", ".join(DEFAULT_CORPUS) + ")")
    ap.add_argument("--vocab", type=int, default=32000, help="BPE vocabulary size, EOS included")
    ap.add_argument("--max_mb", type=float, default=45, help="stop collecting after this many MB of text")
    ap.add_argument("--val_fraction", type=float, default=0.015, help="fraction of documents for OUT/val")
    ap.add_argument("--difftron", default="", help="the difftron binary (default: build*/difftron, then PATH)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it is a dataset this script wrote")
    ap.add_argument("--tokenizer", default="", help="use this tokenizer.json (e.g. another dataset's) instead of "
                    "training one on the corpus")
    a = ap.parse_args()

    out = os.path.abspath(a.out)
    if os.path.exists(out):
        if not a.force:
            sys.exit(f"bpe_dataset: {out} exists (pass --force to replace a dataset this script wrote)")
        if not os.path.isfile(os.path.join(out, "prepare.json")):
            sys.exit(f"bpe_dataset: {out} is not a dataset (no prepare.json): not replacing it")
    binary = find_difftron(a.difftron)
    roots = a.corpus or DEFAULT_CORPUS
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bpe_dataset_", dir=os.path.dirname(out)) as work:
        stage = os.path.join(work, "corpus")
        os.mkdir(stage)
        t0 = time.time()
        n, total = collect(roots, int(a.max_mb * 1e6), stage)
        if n == 0:
            sys.exit(f"bpe_dataset: no text documents found under {', '.join(roots)}")
        tok_path = os.path.join(work, "tokenizer.json")
        if a.tokenizer:
            if not os.path.isfile(a.tokenizer):
                sys.exit(f"bpe_dataset: --tokenizer={a.tokenizer} is not a file")
            shutil.copyfile(a.tokenizer, tok_path)
            print(f"bpe_dataset: using the tokenizer {a.tokenizer}", file=sys.stderr)
        else:
            vocab = train_tokenizer(stage, a.vocab, tok_path)
            t1 = time.time()
            print(f"bpe_dataset: trained a {vocab}-token byte-level BPE in {t1 - t0:.0f} s", file=sys.stderr)
        old_tok = os.path.join(out, "tokenizer.json")
        if a.force and os.path.exists(old_tok):  # prepare replaces only a folder holding its own files
            os.remove(old_tok)
        cmd = [binary, "prepare", f"--input={stage}", f"--out={out}", f"--tokenizer={tok_path}",
               f"--val_fraction={a.val_fraction}", "--progress=false"] + (["--overwrite"] if a.force else [])
        print("bpe_dataset: " + " ".join(cmd), file=sys.stderr)
        r = subprocess.run(cmd)
        if r.returncode != 0:
            sys.exit(f"bpe_dataset: difftron prepare failed (exit {r.returncode})")
        shutil.copyfile(tok_path, os.path.join(out, "tokenizer.json"))
    info = json.load(open(os.path.join(out, "prepare.json")))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"bpe_dataset: wrote {out}: {size / 1e6:.1f} MB, vocab {info['vocab_size']}, train "
          f"{info['train']['tokens']} tokens, val {info['val']['tokens']} tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
