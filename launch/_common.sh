# Shared by the launch scripts (sourced, not run).
fail() {
    echo "launch: error: $*" >&2
    exit 2
}

require() {  # require NAME "what it is": a one-line error if the variable is unset or empty
    [[ -n "${!1:-}" ]] || fail "set $1: $2"
}

require_count() {  # require_count NAME VALUE: a positive integer
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail "$1 must be a positive integer, got '$2'"
}

require_restarts() {  # MAX_RESTARTS: a non-negative integer
    [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || fail "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"
}

require_free_port() {  # require_free_port PORT NAME: nothing on this machine listens on PORT
    if (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; then
        fail "port $1 ($2) is already in use on this machine; choose another $2"
    fi
}

if [[ -z "${TORCHRUN:-}" ]]; then
    if command -v torchrun > /dev/null; then
        TORCHRUN=torchrun
    elif [[ -x .venv/bin/torchrun ]]; then
        TORCHRUN=.venv/bin/torchrun
    else
        fail "no torchrun found: activate the environment (pip install -e .) or set TORCHRUN=/path/to/torchrun"
    fi
fi

# The Python that runs the pre-flight check: torchrun's own (the interpreter on its #! line, or TORCHRUN's first
# word when that is python itself, as in "python -m torch.distributed.run"), so both see the same packages.
if [[ -z "${PYTHON:-}" ]]; then
    read -r -a _launcher <<< "$TORCHRUN"
    PYTHON="$(command -v "${_launcher[0]}")" || fail "TORCHRUN=$TORCHRUN: no command ${_launcher[0]}"
    # A script's first line only (a binary holds NUL bytes); a shim's #! names a shell, not a python: kept as is.
    if [[ "$(head -c 2 "$PYTHON")" == "#!" && "$(head -n 1 "$PYTHON")" == *python* ]]; then
        PYTHON="$(head -n 1 "$PYTHON")"
        PYTHON="${PYTHON#\#!}"
        PYTHON="${PYTHON#/usr/bin/env }"
    fi
fi

preflight() {  # preflight NPROC NPROC_PER_NODE MAX_RESTARTS "WHAT SETS NPROC" OVERRIDES...
    # Every check a rank would make at start-up, in one plain process before torchrun: under torchrun a mistake
    # would bring torchrun's own failure report and exit status 1 (and its restarts) besides the one line.
    # PREFLIGHT_AGENTS: the agents this node hosts, whose own data (data.agent_root) is checked here.
    local nproc="$1" per_node="$2" restarts="$3" launch="$4" agents=()
    [[ -n "${PREFLIGHT_AGENTS:-}" ]] && agents=(--agents="$PREFLIGHT_AGENTS")
    shift 4
    # shellcheck disable=SC2086  # PYTHON may be a command with arguments
    $PYTHON -m dif_maml_dist.preflight --nproc="$nproc" --nproc-per-node="$per_node" --max-restarts="$restarts" \
        --launch="$launch" "${agents[@]}" -- "$@" > /dev/null || exit
}
