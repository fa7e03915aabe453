#!/usr/bin/env bash
# Starts a multi-rank `difftron train` with Open MPI: world = tp x dp ranks, TP groups on
# consecutive ranks (keep them inside one node), one GPU per rank (node-local rank).
# usage: launch/mpirun.sh --tp=2 --dp=4 [other difftron train flags]
# env:   DIFFTRON_BIN (default build/difftron), HOSTFILE (mpirun --hostfile), NP_PER_NODE
#        (ranks per node, default: all on this host), OVERSUBSCRIBE=1 (more ranks than cores,
#        e.g. CPU tests), MPIRUN_ARGS (extra mpirun arguments).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${DIFFTRON_BIN:-$here/build/difftron}"
tp=1
dp=1
for a in "$@"; do
  case "$a" in
    --tp=*) tp="${a#--tp=}" ;;
    --dp=*) dp="${a#--dp=}" ;;
  esac
done
world=$((tp * dp))
if [ ! -x "$bin" ]; then
  echo "mpirun.sh: $bin not found or not executable (build first, or set DIFFTRON_BIN)" >&2
  exit 2
fi
# one BLAS / OpenMP thread per rank unless asked (ranks share the cores of a node)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
args=(-np "$world" --bind-to none -x NCCL_NVLS_ENABLE=0 -x OPENBLAS_NUM_THREADS=1 -x OMP_NUM_THREADS -x LD_LIBRARY_PATH)
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${NP_PER_NODE:-}" ] && args+=(--map-by "ppr:${NP_PER_NODE}:node")
[ "${OVERSUBSCRIBE:-0}" = 1 ] && args+=(--oversubscribe)
export NCCL_NVLS_ENABLE=0  # never NVLink multicast
echo "mpirun.sh: $world ranks (tp $tp x dp $dp): $bin train $*" >&2
# shellcheck disable=SC2086
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} "$bin" train "$@"
