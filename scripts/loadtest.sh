#!/usr/bin/env bash
# Run every socksgate-load mode against one proxy and print a table (mode, figure, value).
#
# By default the script builds and starts socksgate itself on a free loopback port, and
# stops it by PID at the end. Point it at another proxy with --proxy.
#
#   scripts/loadtest.sh                       # socksgate, 5 s per mode
#   scripts/loadtest.sh --seconds 10 --threads 1
#   scripts/loadtest.sh --proxy socks5://127.0.0.1:1080 --pid 1234
#   scripts/loadtest.sh --proxy http://127.0.0.1:8888     # CONNECT + forwarding
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib-bench.sh"

usage() {
    cat <<'EOF'
Usage: scripts/loadtest.sh [--proxy URL] [--http-proxy URL] [--seconds S] [--pid PID]
                           [--threads N] [--idle-conns N] [--json FILE] [--no-build]

  --proxy URL       proxy for the tunnel modes: socks5://, socks5h://, socks4://,
                    socks4a://, http:// (CONNECT) or direct. Default: start socksgate.
  --http-proxy URL  http:// proxy for the http (forwarding) mode. Default: the socksgate
                    started here, or --proxy when it is http://; else http mode is skipped.
  --seconds S       measured seconds per mode (default 5; 1 s warmup each)
  --pid PID         process whose memory the idle mode measures (default: the socksgate
                    started here; without it the idle mode is skipped for --proxy)
  --threads N       worker threads of the socksgate started here (default: all cores)
  --idle-conns N    tunnels held open by the idle mode (default 1000)
  --json FILE       also append every raw JSON line to FILE
  --no-build        do not run cargo build --release --workspace first
EOF
}

PROXY=""
HTTP_PROXY_URL=""
SECS=5
PID=""
THREADS=""
IDLE_CONNS=1000
JSON_OUT=""
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --proxy) PROXY=$2; shift 2 ;;
        --http-proxy) HTTP_PROXY_URL=$2; shift 2 ;;
        --seconds) SECS=$2; shift 2 ;;
        --pid) PID=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --idle-conns) IDLE_CONNS=$2; shift 2 ;;
        --json) JSON_OUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

[ "$BUILD" = 1 ] && build_release
[ -x "$LOAD" ] || die "$LOAD not built"
WORK=$(mktemp -d /tmp/socksgate-loadtest.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
NOFILE=$(raise_nofile)

if [ -z "$PROXY" ]; then
    args=()
    [ -n "$THREADS" ] && args+=(--threads "$THREADS")
    start_socksgate "$WORK/socksgate.log" - "${args[@]}"
    PROXY="socks5://127.0.0.1:$SG_PORT"
    [ -z "$HTTP_PROXY_URL" ] && HTTP_PROXY_URL="http://127.0.0.1:$SG_PORT"
    [ -z "$PID" ] && PID=$SG_PID
    log "socksgate (pid $SG_PID) on 127.0.0.1:$SG_PORT"
fi
case "$PROXY" in
    http://*) [ -z "$HTTP_PROXY_URL" ] && HTTP_PROXY_URL=$PROXY ;;
esac

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
# run LABEL MODE ARGS...: one bounded loadgen run; its JSON line goes to $RESULTS.
run() {
    local label=$1 line rc=0
    shift
    log "$label: socksgate-load $*"
    line=$(timeout $((${SECS%.*} * 4 + 150)) "$LOAD" "$@" --json-only 2>"$WORK/err") || rc=$?
    line=$(printf '%s\n' "$line" | tail -n 1)
    if [ "$rc" != 0 ]; then
        log "$label: exit $rc: $(head -c 400 "$WORK/err")"
    fi
    [ -n "$JSON_OUT" ] && [ -n "$line" ] && printf '%s\n' "$line" >>"$JSON_OUT"
    printf '{"label":"%s","rc":%d,"result":%s}\n' "$label" "$rc" "${line:-null}" >>"$RESULTS"
}

T=(--seconds "$SECS" --warmup 1)
for streams in 1 8; do
    for dir in up down; do
        run "throughput ${streams}x $dir" throughput --proxy "$PROXY" --streams "$streams" --dir "$dir" "${T[@]}"
    done
done
run "connrate c50" connrate --proxy "$PROXY" --concurrency 50 "${T[@]}"
run "latency 1 tunnel" latency --proxy "$PROXY" --conns 1 "${T[@]}"
run "latency 50 tunnels" latency --proxy "$PROXY" --conns 50 "${T[@]}"
if [ -n "$PID" ]; then
    # The built-in target needs a second fd per tunnel in this process, as the proxy does.
    max=$(((NOFILE - 300) / 2))
    n=$IDLE_CONNS
    [ "$n" -gt "$max" ] && { log "idle: RLIMIT_NOFILE $NOFILE allows $max tunnels, not $n"; n=$max; }
    run "idle $n tunnels" idle --proxy "$PROXY" --conns "$n" --pid "$PID" --hold 2
else
    log "idle: skipped (no --pid for an external proxy)"
fi
case "$PROXY" in
    socks5://* | socks5h://* | direct) run "udp" udp --proxy "$PROXY" "${T[@]}" ;;
    *) log "udp: skipped (needs a socks5 proxy)" ;;
esac
if [ -n "$HTTP_PROXY_URL" ]; then
    run "http c50" http --proxy "$HTTP_PROXY_URL" --concurrency 50 "${T[@]}"
else
    log "http: skipped (no http:// proxy)"
fi

echo
echo "proxy: $PROXY${HTTP_PROXY_URL:+ (http: $HTTP_PROXY_URL)}; ${SECS}s per mode"
python3 - "$RESULTS" <<'EOF'
import json, sys

FIGURES = {
    "throughput": [("gbit_per_sec", "Gbit/s", "{:.2f}")],
    "connrate": [("ops_per_sec", "conn/s", "{:.0f}"), ("p50_us", "p50 us", "{:.0f}"),
                 ("p99_us", "p99 us", "{:.0f}")],
    "latency": [("round_trips_per_sec", "round trips/s", "{:.0f}"), ("p50_us", "p50 us", "{:.1f}"),
                ("p99_us", "p99 us", "{:.1f}")],
    "idle": [("established", "tunnels", "{:.0f}"), ("kib_per_tunnel", "KiB/tunnel", "{:.2f}"),
             ("fd_back_to_baseline", "fds released", "{}")],
    "udp": [("received_per_sec", "datagrams/s", "{:.0f}"), ("loss_pct", "loss %", "{:.3f}"),
            ("p99_us", "p99 us", "{:.0f}")],
    "http": [("requests_per_sec", "requests/s", "{:.0f}"), ("p99_us", "p99 us", "{:.0f}")],
}
rows = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    res = r["result"]
    if not res:
        rows.append((r["label"], "FAILED", "exit %d" % r["rc"]))
        continue
    for key, name, fmt in FIGURES[res["mode"]]:
        v = res.get(key)
        if isinstance(v, bool):
            v = "yes" if v else "no"
        rows.append((r["label"], name, "n/a" if v is None else fmt.format(v)))
    if res.get("errors"):
        rows.append((r["label"], "errors", str(res["errors"])))
w0 = max(len("mode"), *(len(a) for a, _, _ in rows))
w1 = max(len("figure"), *(len(b) for _, b, _ in rows))
w2 = max(len("value"), *(len(c) for _, _, c in rows))
print(f"{'mode':<{w0}}  {'figure':<{w1}}  {'value':>{w2}}")
print(f"{'-' * w0}  {'-' * w1}  {'-' * w2}")
for a, b, c in rows:
    print(f"{a:<{w0}}  {b:<{w1}}  {c:>{w2}}")
EOF
