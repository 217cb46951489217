#!/usr/bin/env bash
# Bring up the compose cluster (docker/compose.yaml), wait for every node, print their logs, take it down.
# Exit status: 0 only if every node exited 0 (plain `docker-compose up` returns 0 even when a node fails, and
# --abort-on-container-exit stops the slower nodes as soon as the first one finishes).
#
#   NNODES=2 NPROC_PER_NODE=3 RUN_ID=exp1 TRAIN_ARGS="train.iterations=2000" docker/run_cluster.sh
#
# Settings: those of compose.yaml, plus COMPOSE_FILES (extra compose files in docker/, e.g. compose.gpu.yaml)
# and COMPOSE_PROJECT_NAME (default dif_maml_dist; set it to run two clusters at once).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export NNODES="${NNODES:-2}" COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-dif_maml_dist}"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || { echo "run_cluster: error: NNODES must be a positive integer, got '$NNODES'" >&2; exit 2; }
files=(-f compose.yaml)
for f in ${COMPOSE_FILES:-}; do files+=(-f "$f"); done
compose() { docker-compose "${files[@]}" "$@"; }

mkdir -p "${RUNS_DIR:-../runs}" "${DATA_DIR:-../data}" "${CACHE_DIR:-../cache}"
trap 'compose down --remove-orphans > /dev/null 2>&1 || true' EXIT
compose up -d --scale node="$NNODES"
# shellcheck disable=SC2046  # one container id per word
codes="$(docker wait $(compose ps -q node))"
compose logs --no-color node
failed=0
for code in $codes; do
    [[ "$code" == 0 ]] || failed=1
done
if (( failed )); then
    echo "run_cluster: a node failed (exit statuses: $(echo $codes))" >&2
    exit 1
fi
echo "run_cluster: all $NNODES nodes finished; results in $(cd "${RUNS_DIR:-../runs}" && pwd)/${RUN_ID:-compose}" >&2
