#!/usr/bin/env bash
# One machine, one agent process per slot: torchrun --standalone.
#
#   NPROC_PER_NODE=6 launch/single_node.sh [hydra overrides...]
#
# Environment (all optional):
#   NPROC_PER_NODE  agent processes; must equal the topology's number of agents (default 6, the paper's graph)
#   RUN_ID          names the run (default: a timestamp); RUN_DIR defaults to outputs/$RUN_ID
#   RUN_DIR         the run directory all ranks write to (refused if it already holds a run)
#   MASTER_PORT     a fixed port for the job's store on 127.0.0.1 (default: torchrun --standalone picks a free one)
#   MAX_RESTARTS    torchrun restarts of the whole job after a failure (default 0; agents resume from checkpoints)
#   TORCHRUN        the launcher command (default: torchrun on PATH, else .venv/bin/torchrun)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"

NPROC_PER_NODE="${NPROC_PER_NODE:-6}"
RUN_ID="${RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}"
RUN_DIR="${RUN_DIR:-outputs/$RUN_ID}"
require_count NPROC_PER_NODE "$NPROC_PER_NODE"

if [[ -n "${MASTER_PORT:-}" ]]; then
    require_count MASTER_PORT "$MASTER_PORT"
    # Checked here: torchrun would report a taken port only as a long traceback.
    require_free_port "$MASTER_PORT" "MASTER_PORT"
    where=(--rdzv-backend=c10d --rdzv-endpoint="127.0.0.1:$MASTER_PORT" --rdzv-id="$RUN_ID")
else
    where=(--standalone)
fi
MAX_RESTARTS="${MAX_RESTARTS:-0}"
require_restarts
preflight "$NPROC_PER_NODE" "$NPROC_PER_NODE" "$MAX_RESTARTS" "NPROC_PER_NODE=$NPROC_PER_NODE" \
    "hydra.run.dir=$RUN_DIR" "$@"
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
exec $TORCHRUN "${where[@]}" --nproc-per-node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS" \
    -m dif_maml_dist.train "hydra.run.dir=$RUN_DIR" "$@"
