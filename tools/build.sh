#!/usr/bin/env bash
# Configures and builds difftron into ${BUILD_DIR:-build} (Release). Everything by default, the
# tests included (tools/run_tests.sh, CI), with the CUDA backend when a toolkit is found.
# BUILD_TARGETS="difftron ...": build only those targets (the main job builds the program only).
# DIFFTRON_CUDA=OFF: the CPU backend only (default ON: CUDA when found). Extra arguments go to
# cmake's configure step, e.g. -DDIFFTRON_CUDA_ARCHS="80;90a".
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DDIFFTRON_CUDA="${DIFFTRON_CUDA:-ON}" "$@" |
  grep -E "difftron|Error|error" || true
targets=()
for t in ${BUILD_TARGETS:-}; do targets+=(--target "$t"); done
cmake --build "$BUILD_DIR" -j "$(nproc)" "${targets[@]}"
