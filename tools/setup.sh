#!/usr/bin/env bash
# Installs everything difftron needs from Debian/Ubuntu packages (and PyPI for the few
# Python test helpers listed in tools/requirements.txt). Safe to re-run. The CUDA toolkit
# and NCCL are not installed here: the build uses them when /usr/local/cuda has them.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

packages=(
  build-essential cmake ninja-build pkg-config git
  libopenmpi-dev openmpi-bin          # MPI: multi-rank runs and the CPU communicator
  libhdf5-dev                         # token shards and checkpoints
  libgflags-dev libgoogle-glog-dev    # flags and logging
  libgtest-dev                        # tests
  nlohmann-json3-dev                  # configs, checkpoint metadata, tokenizer.json
  libopenblas-dev                     # GEMM for the CPU reference backend
  zlib1g-dev                          # reading .gz text in `difftron prepare`
  linux-doc                           # the default English corpus of the main job
  strace                              # fault injection in the checkpoint durability tests
  gnuplot-nox                         # `difftron plot` draws runs' metrics.jsonl into PNGs
  python3-matplotlib                  # tools/plot_metrics.py (tools/scale_check.sh's loss plot)
  python3 python3-pip
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: all Debian packages present"
fi

if [ -s tools/requirements.txt ]; then
  python3 -m pip install -q --disable-pip-version-check -r tools/requirements.txt 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check --break-system-packages -r tools/requirements.txt
fi

if [ -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: CUDA toolkit found at /usr/local/cuda ($(/usr/local/cuda/bin/nvcc --version | tail -1))"
else
  echo "setup: no CUDA toolkit at /usr/local/cuda: the CPU backend only will be built"
fi
