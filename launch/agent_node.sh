#!/usr/bin/env bash
# One agent per torchrun node, static rendezvous: the launch under which the others go on when an agent dies
# (runtime.on_peer_failure=continue), and under which a dead agent's own node restarts it into the running network.
# Run it once per agent, on any machine, with the same settings and its own AGENT:
#
#   NUM_AGENTS=6 AGENT=3 MASTER=node0.example:29500 RUN_DIR=/shared/runs/exp1 launch/agent_node.sh [hydra overrides...]
#
# Environment:
#   NUM_AGENTS    number of agents = nodes (required); the topology must have as many
#   AGENT         this node's agent, 0..NUM_AGENTS-1 (required); agent 0's node hosts the job's store
#   MASTER        host:port of agent 0's node, reachable from every node (required)
#   RUN_DIR       run directory, the same folder for every agent (required; a shared filesystem across machines)
#   MAX_RESTARTS  how often this node restarts its agent after a crash (default 3); each restart comes back into
#                 the running network without rolling anyone back
#   TORCHRUN      the launcher command (default: torchrun on PATH, else .venv/bin/torchrun)
#
# What survives what: any agent's crash or hang, its node's restarts included. Agent 0's *node* (this script's
# torchrun process, not its agent) hosts the store: while it lives, agents can come back; without it the others
# still finish, but nobody can come back. torchrun's nodes wait for each other at exit (up to 300 s): a node
# that is gone for good makes the others' torchrun linger that long after their agents have finished.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/_common.sh
source "$here/_common.sh"

require NUM_AGENTS "the number of agents (one node each), e.g. NUM_AGENTS=6"
require AGENT "this node's agent, e.g. AGENT=0"
require MASTER "host:port of agent 0's node, e.g. MASTER=10.0.0.1:29500"
require RUN_DIR "the run directory every agent writes into, e.g. RUN_DIR=runs/exp1"
require_count NUM_AGENTS "$NUM_AGENTS"
if [[ ! "$AGENT" =~ ^[0-9]+$ ]] || (( AGENT >= NUM_AGENTS )); then
    fail "AGENT must be one of 0..$((NUM_AGENTS - 1)), got '$AGENT'"
fi
if [[ ! "$MASTER" =~ ^[^:]+:[0-9]+$ ]]; then
    fail "MASTER must be host:port, got '$MASTER'"
fi
MAX_RESTARTS="${MAX_RESTARTS:-3}"
require_restarts
PREFLIGHT_AGENTS="$AGENT" preflight "$NUM_AGENTS" 1 "$MAX_RESTARTS" "NUM_AGENTS=$NUM_AGENTS" \
    runtime.on_peer_failure=continue \
    "hydra.run.dir=$RUN_DIR" "$@"

# Static rendezvous: every node knows its rank, node 0 hosts the store, and a node's restart of its own worker
# needs nobody else (c10d would restart every node's workers when one node comes back).
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
exec $TORCHRUN --nnodes="$NUM_AGENTS" --nproc-per-node=1 --rdzv-backend=static --node-rank="$AGENT" \
    --master-addr="${MASTER%:*}" --master-port="${MASTER##*:}" --max-restarts="$MAX_RESTARTS" --monitor-interval=0.5 \
    -m dif_maml_dist.train runtime.on_peer_failure=continue "hydra.run.dir=$RUN_DIR" "$@"
