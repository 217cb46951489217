#!/usr/bin/env bash
# One machine, one agent process per slot: torchrun --standalone.
#
#   NPROC_PER_NODE=6 launch/single_node.sh [hydra overrides...]
#
# Environment (all optional):
#   NPROC_PER_NODE  agent processes; must equal the topology's number of agents (default 6, the paper's graph)
#   RUN_ID          names the run (default: a timestamp); RUN_DIR defaults to outputs/$RUN_ID
#   RUN_DIR         the run directory all ranks write to (refused if it already holds a run)
#   TORCHRUN        the launcher command (default: torchrun on PATH, else .venv/bin/torchrun)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"

NPROC_PER_NODE="${NPROC_PER_NODE:-6}"
RUN_ID="${RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}"
RUN_DIR="${RUN_DIR:-outputs/$RUN_ID}"
require_count NPROC_PER_NODE "$NPROC_PER_NODE"

# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
exec $TORCHRUN --standalone --nproc-per-node="$NPROC_PER_NODE" \
    -m dif_maml_dist.train "hydra.run.dir=$RUN_DIR" "$@"
