#!/usr/bin/env bash
# The test command: install dependencies, build (CPU and, when found, CUDA code), run the
# whole ctest suite. CUDA tests skip themselves when no GPU is present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
bash tools/check_includes.sh
bash tools/build.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure -j 2 --timeout 900
