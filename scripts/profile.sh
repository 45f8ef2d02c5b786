#!/usr/bin/env bash
# Profile one socksgate worker under one load mode: perf record -g (DWARF call graphs) on a
# socksgate --threads 1 pinned to CPU 0 while socksgate-load runs pinned to CPU 1, then print
# the kernel/user split, the top symbols, and the syscalls by inclusive time. Falls back to
# `strace -c` (syscall counts only) when perf cannot record.
#
#   scripts/profile.sh connrate                      # connrate --concurrency 50
#   scripts/profile.sh throughput --streams 8 --dir down
#   scripts/profile.sh --strace latency --conns 50   # syscalls per operation instead
#
# Output (perf.data, reports) goes to /tmp/socksgate-profile-MODE/ unless --out DIR is given;
# perf.data files are large and are not meant to be committed.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib-bench.sh"

SECS=4
OUTDIR=""
STRACE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) SECS=$2; shift 2 ;;
        --out) OUTDIR=$2; shift 2 ;;
        --strace) STRACE=1; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 2; }
MODE=$1
OUTDIR=${OUTDIR:-/tmp/socksgate-profile-$MODE}
mkdir -p "$OUTDIR"
build_release
command -v perf >/dev/null || [ "$STRACE" = 1 ] || {
    log "installing linux-perf"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
}
WORK=$(mktemp -d /tmp/socksgate-profile.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

start_socksgate "$WORK/socksgate.log" 0 --threads 1
# The port accepts (into the backlog) before the worker threads exist: wait for the thread, not the port.
WORKER=""
for _ in $(seq 100); do
    for t in /proc/"$SG_PID"/task/*; do
        [ "$(cat "$t/comm" 2>/dev/null)" = "worker-0" ] && WORKER=$(basename "$t")
    done
    [ -n "$WORKER" ] && break
    sleep 0.05
done
[ -n "$WORKER" ] || die "no worker-0 thread in socksgate (pid $SG_PID)"
PROXY="socks5://127.0.0.1:$SG_PORT"
[ "$MODE" = http ] && PROXY="http://127.0.0.1:$SG_PORT"
# The load runs 2 s longer than the recording, which starts after a 1 s warmup.
start_bg "$OUTDIR/load.json" taskset -c 1 "$LOAD" "$@" --proxy "$PROXY" --seconds $((SECS + 2)) \
    --warmup 0.5 --json-only --cpu-pid "$SG_PID"
LOAD_PID=$BG_PID
sleep 1
if [ "$STRACE" = 1 ] || ! perf record -F 999 --call-graph dwarf,16384 -t "$WORKER" \
    -o "$OUTDIR/perf.data" -- sleep "$SECS" 2>"$OUTDIR/record.log"; then
    command -v strace >/dev/null || apt-get install -y -qq strace >/dev/null
    log "strace -c on the worker thread for ${SECS}s"
    timeout -s INT "$SECS" strace -c -p "$WORKER" -o "$OUTDIR/strace.txt" || true
    wait "$LOAD_PID" || true
    cat "$OUTDIR/strace.txt"
    cat "$OUTDIR/load.json"
    exit 0
fi
wait "$LOAD_PID" || true
cat "$OUTDIR/load.json"
R=(perf report -i "$OUTDIR/perf.data" --stdio -g none)
{
    echo "== kernel / user split"
    "${R[@]}" --no-children --sort dso 2>/dev/null | grep '%' | head -6
    echo "== top symbols (self)"
    "${R[@]}" --no-children --sort sym 2>/dev/null | grep '%' | head -30
    echo "== syscalls and socksgate functions (inclusive)"
    "${R[@]}" --children --sort sym 2>/dev/null | grep -E '__x64_sys_|handle_softirqs|socksgate::' | head -40
} | tee "$OUTDIR/report.txt"
