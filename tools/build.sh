#!/usr/bin/env bash
# Configures and builds difftron into ${BUILD_DIR:-build} (Release; CUDA when found).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" | grep -E "difftron|Error|error" || true
cmake --build "$BUILD_DIR" -j "$(nproc)"
