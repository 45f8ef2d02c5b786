# shellcheck shell=bash disable=SC2034
# Shared helpers for scripts/loadtest.sh, compare-peers.sh and profile.sh (sourced, not run).
# (SC2034: the variables set here are used by the scripts that source this file.)
#
# Every process a script starts goes through start_bg, which records its PID; cleanup stops
# exactly those PIDs (and, for forking servers such as danted, the children they had), never
# anything found by name.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOAD="$ROOT/target/release/socksgate-load"
SOCKSGATE="$ROOT/target/release/socksgate"
STARTED_PIDS=()

log() { printf '%s %s\n' "[$(date +%H:%M:%S)]" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A free TCP (and UDP) port on 127.0.0.1; the kernel picks it, we release it at once.
free_port() {
    python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait until 127.0.0.1:PORT accepts a TCP connection (at most ~10 s).
wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# start_bg LOGFILE CMD...: run CMD in the background, record its PID, print the PID.
# Use it as `pid=$(...)`? No: a subshell would lose STARTED_PIDS. Call it plainly and read
# $BG_PID afterwards.
start_bg() {
    local logfile=$1
    shift
    "$@" >"$logfile" 2>&1 &
    BG_PID=$!
    STARTED_PIDS+=("$BG_PID")
}

# Children of PID (for forking servers), read from /proc.
child_pids() {
    local pid=$1
    cat "/proc/$pid/task/"*/children 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+$' || true
}

# Stop one process we started (SIGTERM, then SIGKILL after 3 s), and any children it had.
stop_pid() {
    local pid=$1 kids i k
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kids=$(child_pids "$pid")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    for k in $kids; do
        for i in $(seq 1 30); do
            kill -0 "$k" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$k" 2>/dev/null; then
            kill -KILL "$k" 2>/dev/null || true
        fi
    done
    return 0
}

stop_all() {
    local p
    for p in "${STARTED_PIDS[@]}"; do
        stop_pid "$p"
    done
    STARTED_PIDS=()
}

# Start socksgate on a free port: start_socksgate LOGFILE [taskset-cpu|-] ARGS...
# Sets SG_PID and SG_PORT. The PRIO array (e.g. nice -n -10), if set, prefixes the command.
start_socksgate() {
    local logfile=$1 cpu=$2 pin=()
    shift 2
    SG_PORT=$(free_port)
    [ "$cpu" != "-" ] && pin=(taskset -c "$cpu")
    start_bg "$logfile" ${PRIO[@]+"${PRIO[@]}"} "${pin[@]}" "$SOCKSGATE" -q -l "127.0.0.1:$SG_PORT" "$@"
    SG_PID=$BG_PID
    wait_port "$SG_PORT" || die "socksgate did not start: $(cat "$logfile")"
}

# Build the release binaries unless told not to.
build_release() {
    # --workspace: the proxy and tools/socksgate-load, both into target/release/.
    (cd "$ROOT" && cargo build --release --workspace --quiet) || die "cargo build --release --workspace failed"
}

# The soft RLIMIT_NOFILE after raising it as far as allowed; the idle tests need
# 2 fds per tunnel in the proxy.
raise_nofile() {
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    ulimit -n
}
