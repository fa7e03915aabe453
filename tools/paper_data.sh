#!/usr/bin/env bash
# The [paper] dataset (docs/RESULTS.md section 1): Debian's documentation text plus a needle
# mixture, tokenised with the 32k byte-level BPE of data/debian-bpe32k, and a validation sample
# of prose only (the validation split starts with needle documents, which activation statistics
# and quantisation should not read).
#
#   bash tools/paper_data.sh [--bin build/difftron] [--out data]
#
# Writes OUT/needle_mix/ (180 files of 20 needle paragraphs), OUT/paper-bpe32k (train, val,
# tokenizer.json) and OUT/paper-valprose (train: the validation documents that are not needle
# text). Makes OUT/debian-bpe32k first when its tokenizer is missing. Deterministic: the same
# machine's /usr/share/doc gives the same tokens (45,742,214 train tokens on Debian 12 with
# linux-doc and the packages of tools/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/difftron
OUTD=data
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --out) OUTD=$2; shift 2 ;;
    *) echo "paper_data: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$BIN" ] || { echo "paper_data: no difftron at $BIN (bash tools/build.sh, or --bin)" >&2; exit 1; }
TOK=$OUTD/debian-bpe32k/tokenizer.json
[ -f "$TOK" ] || python3 tools/bpe_dataset.py --out="$OUTD/debian-bpe32k" --difftron="$BIN"

# 1. the needle mixture: 1800 samples (lengths 256/512/768 tokens, 5 depths, 6 needles, 2
#    queried) written as training text, one paragraph per query, 20 paragraphs a file
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$BIN" needles --needle_format=text --needle_out="$work/needles.txt" --needle_tokenizer="$TOK" \
  --needle_lengths=256,512,768 --needle_samples=120 --needle_seed=1001
rm -rf "$OUTD/needle_mix"
mkdir -p "$OUTD/needle_mix"
python3 - "$work/needles.txt" "$OUTD/needle_mix" << 'EOF'
import sys
paras = [p for p in open(sys.argv[1]).read().split("\n\n") if p.strip()]
for i in range(0, len(paras), 20):
    with open(f"{sys.argv[2]}/needles_{i // 20:04d}.txt", "w") as f:
        f.write("\n\n".join(paras[i:i + 20]) + "\n")
print(f"paper_data: {len(paras)} needle paragraphs in {(len(paras) + 19) // 20} files")
EOF

# 2. the dataset: needle files first, then linux-doc, then the rest of /usr/share/doc
CORPUS=("$OUTD/needle_mix" /usr/share/doc/linux-doc/Documentation /usr/share/doc)
ARGS=()
for c in "${CORPUS[@]}"; do ARGS+=("--corpus=$c"); done
python3 tools/bpe_dataset.py --out="$OUTD/paper-bpe32k" "${ARGS[@]}" --max_mb=200 --tokenizer="$TOK" \
  --difftron="$BIN" --force

# 3. the prose-only validation sample: the same documents prepare's router sends to val
#    (io/prepare.cpp DocRouter: document i when floor((i+1) f) > floor(i f)), needle files left out
python3 - "$work/prose" 200 0.015 "${CORPUS[@]}" << 'EOF'
import hashlib, math, os, sys
sys.path.insert(0, "tools")
import bpe_dataset as b
out, max_mb, f, roots = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
os.makedirs(out)
seen, n, total, kept = set(), 0, 0, 0
for path in b.corpus_files(roots):  # the order and filters of bpe_dataset.collect
    text = b.read_text(path)
    if text is None or not text.strip():
        continue
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).digest()
    if digest in seen:
        continue
    if total + len(data) > int(max_mb * 1e6):
        break
    seen.add(digest)
    if math.floor((n + 1) * f) > math.floor(n * f) and "/needle_mix/" not in path:
        open(os.path.join(out, f"{n:06d}.txt"), "wb").write(data)
        kept += 1
    n += 1
    total += len(data)
print(f"paper_data: {n} documents, {kept} prose validation documents")
EOF
rm -rf "$OUTD/paper-valprose"
"$BIN" prepare --input="$work/prose" --out="$OUTD/paper-valprose" --tokenizer="$TOK" --val_fraction=0 --progress=false
