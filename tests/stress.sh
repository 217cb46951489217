#!/usr/bin/env bash
# The tests that start processes, time out, send signals or compare runs bit for bit, run while the machine is
# saturated: HOGS busy-looping processes (default 2 per core) beside pytest for the whole run. A test that
# passes alone but fails here depends on timing margins or the thread count.
#
#   tests/stress.sh                       # the default selection below
#   HOGS=8 tests/stress.sh tests/test_cli.py -k torchrun   # any pytest arguments instead
#
# Not part of the default suite (it takes 3-4x the selection's idle time); run it before changing anything
# that waits, times out, or claims bit-for-bit equality.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || { echo "stress: error: no $PYTHON; install first (README: Quick start), or set PYTHON" >&2; exit 2; }
HOGS=${HOGS:-$((2 * $(nproc)))}
[[ $HOGS =~ ^[0-9]+$ ]] || { echo "stress: error: HOGS=$HOGS must be a whole number" >&2; exit 2; }
if [[ $# -eq 0 ]]; then
  set -- tests/test_cli.py tests/test_distributed.py tests/test_faults.py tests/test_run_dir.py \
    tests/test_launch.py tests/test_churn.py tests/test_liveness.py tests/test_agents.py tests/test_checkpoint.py
fi

hogs=()
stop_hogs() { ((${#hogs[@]})) && kill "${hogs[@]}" 2>/dev/null; wait 2>/dev/null || true; }
trap stop_hogs EXIT
for _ in $(seq "$HOGS"); do
  "$PYTHON" -c 'while True: pass' &
  hogs+=($!)
done
echo "stress: $HOGS busy processes on $(nproc) core(s); running pytest $*"
start=$(date +%s)
status=0
"$PYTHON" -m pytest -q "$@" || status=$?
echo "stress: pytest exited $status after $(( $(date +%s) - start )) s; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
exit $status
