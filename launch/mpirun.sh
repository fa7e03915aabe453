#!/usr/bin/env bash
# Starts a multi-rank `difftron train` with Open MPI: world = tp x dp ranks, TP groups on
# consecutive ranks (keep them inside one node), one GPU per rank (each rank sees all of its
# node's GPUs and takes the one of its node-local rank).
# usage: launch/mpirun.sh --tp=2 --dp=4 [other difftron train flags]
# env:   DIFFTRON_BIN (default build/difftron), HOSTFILE (mpirun --hostfile), NP_PER_NODE
#        (ranks per node, default: all on this host), OVERSUBSCRIBE=1 (more ranks than cores,
#        e.g. CPU tests), KILL_GRACE (seconds, default 60: see below), MPIRUN_ARGS (extra
#        mpirun arguments), DRY_RUN=1 (print the mpirun command, run nothing).
# Passed to every rank: OMP_NUM_THREADS (default 1), OPENBLAS_NUM_THREADS=1, NCCL_NVLS_ENABLE=0,
# every NCCL_* variable set here (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...), PATH and, when set,
# LD_LIBRARY_PATH.
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
if [ ! -x "$bin" ] && [ "${DRY_RUN:-0}" != 1 ]; then
  echo "mpirun.sh: $bin not found or not executable (build first, or set DIFFTRON_BIN)" >&2
  exit 2
fi
# one BLAS / OpenMP thread per rank unless asked (ranks share the cores of a node)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export OPENBLAS_NUM_THREADS=1
export NCCL_NVLS_ENABLE=0  # never NVLink multicast
# Signals: SIGTERM to mpirun (a job's end, preemption) reaches the ranks only through Open
# MPI's kill sequence: SIGCONT, odls_base_sigkill_timeout seconds, SIGTERM, as long again,
# SIGKILL (Open MPI 4; its default of 1 s leaves no time to save). With KILL_GRACE=60 the ranks
# see SIGTERM 60 s after mpirun did and have 60 s to finish the step and write the checkpoint;
# signal mpirun at least 2 x KILL_GRACE before the end. Ranks left after a failed one are also
# ended that way, up to 2 x KILL_GRACE later. srun passes SIGTERM on at once (difftron.sbatch).
args=(-np "$world" --bind-to none --mca odls_base_sigkill_timeout "${KILL_GRACE:-60}"
  -x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS -x PATH)
for v in $(compgen -e | grep '^NCCL_' || true); do args+=(-x "$v"); done
# -x of an unset variable makes mpirun warn; a rank started on another node needs it when set
[ -n "${LD_LIBRARY_PATH:-}" ] && args+=(-x LD_LIBRARY_PATH)
[ "$(id -u)" = 0 ] && args+=(--allow-run-as-root)
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${NP_PER_NODE:-}" ] && args+=(--map-by "ppr:${NP_PER_NODE}:node")
[ "${OVERSUBSCRIBE:-0}" = 1 ] && args+=(--oversubscribe)
echo "mpirun.sh: $world ranks (tp $tp x dp $dp): $bin train $*" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then
  # shellcheck disable=SC2086
  echo mpirun "${args[@]}" ${MPIRUN_ARGS:-} "$bin" train "$@"
  exit 0
fi
# shellcheck disable=SC2086
exec mpirun "${args[@]}" ${MPIRUN_ARGS:-} "$bin" train "$@"
