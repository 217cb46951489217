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
