#!/usr/bin/env bash
# Several machines, torchrun's c10d rendezvous: run this on every node with the same settings.
#
#   NNODES=2 NPROC_PER_NODE=3 RDZV_ENDPOINT=node0.example:29400 RUN_ID=exp1 launch/multi_node.sh [hydra overrides...]
#
# Environment:
#   NNODES          number of nodes (required)
#   NPROC_PER_NODE  agent processes per node (required); NNODES x NPROC_PER_NODE = the topology's agents
#   RDZV_ENDPOINT   host:port of the first node, reachable from every node (required); it hosts the rendezvous
#   RUN_ID          the job's name, the same on every node (required): the rendezvous id and the run directory
#   RUN_DIR         run directory (default outputs/$RUN_ID); on a shared filesystem every rank writes into one
#                   folder, otherwise each node keeps its own agents' files and rank 0's node the summary
#   MAX_RESTARTS    torchrun restarts of the whole job after a failure (default 0)
#   TORCHRUN        the launcher command (default: torchrun on PATH, else .venv/bin/torchrun)
# Agent k is global rank k whichever node runs it; torchrun assigns ranks in the order nodes join.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"

require NNODES "the number of nodes, e.g. NNODES=2"
require NPROC_PER_NODE "agent processes per node, e.g. NPROC_PER_NODE=3"
require RDZV_ENDPOINT "host:port of the first node, e.g. RDZV_ENDPOINT=10.0.0.1:29400"
require RUN_ID "one name for the job, the same on every node, e.g. RUN_ID=exp1"
require_count NNODES "$NNODES"
require_count NPROC_PER_NODE "$NPROC_PER_NODE"
if [[ ! "$RDZV_ENDPOINT" =~ ^[^:]+:[0-9]+$ ]]; then
    fail "RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'"
fi
RUN_DIR="${RUN_DIR:-outputs/$RUN_ID}"

MAX_RESTARTS="${MAX_RESTARTS:-0}"
require_restarts
# Before joining the rendezvous: a mistake is then this node's one line, not torchrun's report on every node.
preflight "$((NNODES * NPROC_PER_NODE))" "$NPROC_PER_NODE" "$MAX_RESTARTS" \
    "NNODES=$NNODES x NPROC_PER_NODE=$NPROC_PER_NODE" "hydra.run.dir=$RUN_DIR" "$@"

# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
exec $TORCHRUN --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$RDZV_ENDPOINT" --rdzv-id="$RUN_ID" \
    --max-restarts="$MAX_RESTARTS" \
    -m dif_maml_dist.train "hydra.run.dir=$RUN_DIR" "$@"
