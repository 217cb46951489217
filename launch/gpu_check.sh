#!/usr/bin/env bash
# Every GPU check in one run, ending in a table (launch/gpu_check.py says what each step does); under 8 minutes
# on one GPU. Run from anywhere:
#   launch/gpu_check.sh [--omniglot DIR] [--out DIR]
# It uses $PYTHON, else .venv/bin/python, else python3. A machine that cannot install packages (no network) gets
# the few pure-Python ones torch images lack (hydra-core, omegaconf, antlr4) from wheels in .whl/ at the
# repository root, made beforehand on a machine that can:
#   pip wheel --no-deps -w .whl hydra-core omegaconf antlr4-python3-runtime==4.9.3
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
if ! "$PYTHON" -c "import hydra, omegaconf, networkx" 2> /dev/null; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl
        export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu_check: error: $PYTHON cannot import hydra/omegaconf/networkx; pip install -e . (or put their wheels in .whl/, see this script's header)" >&2
        exit 2
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PYTHON" launch/gpu_check.py "$@"
