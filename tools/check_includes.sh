#!/usr/bin/env bash
# The include floors (docs/ARCHITECTURE.md): a folder may include its own headers and those of
# the floors below it, never one above. Fails listing every include that crosses the wrong way.
#   base      -> base
#   kernels   -> base, kernels
#   parallel  -> base, kernels, parallel
#   core      -> base, kernels, parallel, core
#   io        -> base, kernels, parallel, core, io
#   launch, tools, tests -> anything
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A allowed=(
  [base]="base"
  [kernels]="base kernels"
  [parallel]="base kernels parallel"
  [core]="base kernels parallel core"
  [io]="base kernels parallel core io"
)
bad=0
for floor in "${!allowed[@]}"; do
  [ -d "$floor" ] || continue
  while IFS= read -r line; do
    file=${line%%:*}
    target=$(sed -E 's/.*#include "([a-z_]+)\/.*/\1/' <<<"$line")
    if [[ " ${allowed[$floor]} " != *" $target "* ]]; then
      echo "include floor violated: $line"
      bad=1
    fi
  done < <(grep -rnE '^\s*#\s*include "[a-z_]+/' "$floor" --include='*.h' --include='*.cpp' --include='*.cu' \
             --include='*.cuh' --include='*.inc' || true)
done
if [ $bad -ne 0 ]; then
  echo "check_includes: FAILED (see docs/ARCHITECTURE.md, 'Floors')"
  exit 1
fi
echo "check_includes: every include respects the floors"
