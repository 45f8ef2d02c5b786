#!/usr/bin/env bash
# Compare socksgate with other proxies on this machine, over loopback only.
#
# Peers (Debian packages, installed when missing): dante-server (danted), microsocks,
# tinyproxy, haproxy (plain `mode tcp` forwarder: the no-handshake reference). Every proxy
# runs pinned to CPU 0 (`taskset -c 0`; socksgate with --threads 1), the load generator and
# its targets pinned to CPU 1; each measurement is repeated (default 3 times, interleaved
# across proxies so machine noise spreads evenly) and the medians go into a Markdown table
# with ratios, plus a chart, under bench-results/.
#
#   scripts/compare-peers.sh            # full run, ~14 minutes (up to ~19 with retries)
#   scripts/compare-peers.sh --quick    # ~5 minutes, shorter windows
#   scripts/compare-peers.sh --only connrate,latency
#   scripts/compare-peers.sh --only udp --baseline /tmp/socksgate-old   # before/after, interleaved
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib-bench.sh"

usage() {
    cat <<'EOF'
Usage: scripts/compare-peers.sh [--quick] [--seconds S] [--reps N] [--only LIST]
                                [--out PREFIX] [--idle-conns N] [--no-build] [--no-install]
                                [--baseline BIN] [--connrate-blocking] [--nice N]

  --quick          1.5 s windows, 0.3 s warmup, 1 s idle hold (about 5 minutes in all)
  --seconds S      measured seconds per run (default 7; quick 1.5)
  --reps N         repetitions of every measurement (default 3)
  --only LIST      comma-separated sections: throughput,connrate,latency,idle,udp,http,threads
  --out PREFIX     output files PREFIX.md, PREFIX.svg, PREFIX.jsonl (raw), PREFIX.meta.json
                   (default bench-results/compare, or bench-results/compare-quick)
  --idle-conns N   idle tunnels (default 10000, lowered to what RLIMIT_NOFILE allows)
  --no-build       do not run cargo build --release --workspace
  --no-install     do not apt-get install missing peers (sections needing them are skipped)
  --baseline BIN   also run another socksgate binary (e.g. one built from an older commit)
                   as system `socksgate-baseline`, interleaved with the current one in the
                   throughput, connrate (no auth), latency, udp and http sections, so a change
                   is measured against its baseline in the same run
  --connrate-blocking
                   connrate with the load generator's blocking engine (one thread per
                   connection, as before 2026-12-05) instead of its event loop
  --nice N         run the proxies, the load generator and its targets under `nice -n N`
                   (e.g. -10), so other work on a shared machine takes less of their CPU;
                   applies to every proxy alike (default 0: no change)
  --tries N        run a measurement up to N times (default 3) while more than
  --max-other P    P % (default 35) of CPU 0 went to other processes during it (only
                   where the proxy's own CPU time is measured); the last try is kept;
                   at most 30 retries in a whole run (8 with --quick)
EOF
}

QUICK=0
SECS=""
REPS=3
ONLY="throughput,connrate,latency,idle,udp,http,threads"
OUT=""
IDLE_CONNS=10000
BUILD=1
INSTALL=1
NICE=0
TRIES=3
MAX_OTHER=35
BASELINE=""
CR_ENGINE=()
# Retries over the whole run at most, so a busy machine cannot stretch it without bound.
RETRY_BUDGET=30
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --seconds) SECS=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --idle-conns) IDLE_CONNS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --no-install) INSTALL=0; shift ;;
        --nice) NICE=$2; shift 2 ;;
        --tries) TRIES=$2; shift 2 ;;
        --max-other) MAX_OTHER=$2; shift 2 ;;
        --baseline) BASELINE=$2; shift 2 ;;
        --connrate-blocking) CR_ENGINE=(--blocking); shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done
if [ "$QUICK" = 1 ]; then
    # Fewer retries, so a busy machine cannot stretch the quick run much past 5 minutes.
    RETRY_BUDGET=8
    SECS=${SECS:-1.5}
    WARMUP=0.3
    HOLD=1
    OUT=${OUT:-$ROOT/bench-results/compare-quick}
else
    SECS=${SECS:-7}
    WARMUP=1
    HOLD=3
    OUT=${OUT:-$ROOT/bench-results/compare}
fi
# Prefix for every process under test: proxies, load generator, targets.
PRIO=()
[ "$NICE" != 0 ] && PRIO=(nice -n "$NICE")
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# ---------------------------------------------------------------------------------------
# Peers: install what is missing (one apt-get update at most).
# ---------------------------------------------------------------------------------------
declare -A PKG=([microsocks]=microsocks [danted]=dante-server [tinyproxy]=tinyproxy
    [haproxy]=haproxy [gnuplot]=gnuplot-nox [taskset]=util-linux)
missing=()
for bin in "${!PKG[@]}"; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("${PKG[$bin]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$INSTALL" = 1 ]; then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        if ! { apt-get update -qq >/dev/null && apt-get install -y -qq "${missing[@]}" >/dev/null; }; then
            die "apt-get install ${missing[*]} failed"
        fi
    else
        log "missing: ${missing[*]} (--no-install): runs that need them will fail"
    fi
fi
export PATH="$PATH:/usr/sbin:/sbin"
command -v python3 >/dev/null || die "python3 is needed for the report"

[ "$BUILD" = 1 ] && build_release
if [ ! -x "$LOAD" ] || [ ! -x "$SOCKSGATE" ]; then die "release binaries missing"; fi
if [ -n "$BASELINE" ] && [ ! -x "$BASELINE" ]; then die "--baseline $BASELINE: not an executable"; fi
mkdir -p "$(dirname "$OUT")"

WORK=$(mktemp -d /tmp/socksgate-compare.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
NOFILE=$(raise_nofile)
# Proxy side: two fds per tunnel (client + target) plus a little. The hard limit cannot be
# raised without CAP_SYS_RESOURCE, so the idle test shrinks to what fits and says so.
IDLE_MAX=$(((NOFILE - 300) / 2))
IDLE_N=$IDLE_CONNS
[ "$IDLE_N" -gt "$IDLE_MAX" ] && IDLE_N=$IDLE_MAX
RESULTS="$OUT.jsonl"
: >"$RESULTS"
AUTH_USER=bench
AUTH_PASS=benchpass7

START_TIME=$(date +%s)
cat >"$OUT.meta.json" <<EOF
{"date": "$(date -u +%Y-%m-%dT%H:%MZ)", "commit": "$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)$(cd "$ROOT" && [ -n "$(git status --porcelain -- src Cargo.toml 2>/dev/null)" ] && echo ' + uncommitted changes')",
 "kernel": "$(uname -r)", "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//;s/"//g')",
 "cores": $(nproc), "loadavg_start": "$(cut -d' ' -f1-3 /proc/loadavg)", "seconds": $SECS, "warmup": $WARMUP, "reps": $REPS, "quick": $QUICK,
 "baseline": "$BASELINE", "idle_requested": $IDLE_CONNS, "nice": $NICE, "connrate_engine": "$([ ${#CR_ENGINE[@]} = 0 ] && echo events || echo blocking)", "tries": $TRIES, "max_other": $MAX_OTHER, "idle_conns": $IDLE_N, "nofile": $NOFILE,
 "versions": {"dante": "$(danted -v 2>&1 | head -1 | cut -c1-40)",
   "microsocks": "$(dpkg-query -W -f='${Version}' microsocks 2>/dev/null)",
   "tinyproxy": "$(tinyproxy -v 2>&1 | head -1)",
   "haproxy": "$(haproxy -v 2>&1 | head -1 | cut -d' ' -f3)"}}
EOF

# ---------------------------------------------------------------------------------------
# Starting things. Every start records its PID (lib-bench.sh) and waits for the port.
# ---------------------------------------------------------------------------------------
start_target() {
    # One standalone target process on CPU 1 for everything that must reach a fixed
    # address (haproxy) and, for fairness, for every proxy in those tests.
    T_ECHOCLOSE=$(free_port)
    T_ECHO=$(free_port)
    start_bg "$WORK/target.log" "${PRIO[@]}" taskset -c 1 "$LOAD" target --echo-close "$T_ECHOCLOSE" \
        --echo "$T_ECHO" --lifetime 3600
    wait_port "$T_ECHO" || die "target did not start: $(cat "$WORK/target.log")"
}

start_dante() {
    DANTE_PORT=$(free_port)
    local d="$WORK/dante"
    mkdir -p "$d"
    cat >"$d/danted.conf" <<EOF
logoutput: $d/danted.log
errorlog: $d/danted.err
internal: 127.0.0.1 port = $DANTE_PORT
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {
  from: 127.0.0.0/8 to: 0.0.0.0/0
  log: error
}
socks pass {
  from: 127.0.0.0/8 to: 0.0.0.0/0
  command: bind connect udpassociate
  log: error
}
socks pass {
  from: 0.0.0.0/0 to: 127.0.0.0/8
  command: bindreply udpreply
  log: error
}
EOF
    start_bg "$d/stdout.log" "${PRIO[@]}" taskset -c 0 danted -f "$d/danted.conf" -p "$d/danted.pid"
    DANTE_PID=$BG_PID
    wait_port "$DANTE_PORT" || die "danted did not start: $(cat "$d/stdout.log" "$d/danted.err" 2>/dev/null)"
}

start_microsocks() { # [user pass] -> MS_PORT MS_PID
    MS_PORT=$(free_port)
    local extra=()
    [ $# -eq 2 ] && extra=(-u "$1" -P "$2")
    start_bg "$WORK/microsocks-$MS_PORT.log" "${PRIO[@]}" taskset -c 0 microsocks -i 127.0.0.1 -p "$MS_PORT" "${extra[@]}"
    MS_PID=$BG_PID
    wait_port "$MS_PORT" || die "microsocks did not start: $(cat "$WORK/microsocks-$MS_PORT.log")"
}

start_haproxy() { # -> HAP_PID, HAP_ECHOCLOSE, HAP_ECHO (frontends forwarding to the target)
    HAP_ECHOCLOSE=$(free_port)
    HAP_ECHO=$(free_port)
    local cfg="$WORK/haproxy-$HAP_ECHO.cfg" maxconn=$((IDLE_N + 50))
    cat >"$cfg" <<EOF
global
  maxconn $maxconn
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend fe_echoclose
  bind 127.0.0.1:$HAP_ECHOCLOSE
  default_backend be_echoclose
backend be_echoclose
  server target 127.0.0.1:$T_ECHOCLOSE
frontend fe_echo
  bind 127.0.0.1:$HAP_ECHO
  default_backend be_echo
backend be_echo
  server target 127.0.0.1:$T_ECHO
EOF
    start_bg "$WORK/haproxy-$HAP_ECHO.log" "${PRIO[@]}" taskset -c 0 haproxy -db -f "$cfg"
    HAP_PID=$BG_PID
    wait_port "$HAP_ECHO" || die "haproxy did not start: $(cat "$WORK/haproxy-$HAP_ECHO.log")"
}

start_tinyproxy() {
    TP_PORT=$(free_port)
    cat >"$WORK/tinyproxy.conf" <<EOF
Port $TP_PORT
Listen 127.0.0.1
User nobody
Group nogroup
Timeout 60
MaxClients 1000
Allow 127.0.0.1
LogLevel Critical
DisableViaHeader Yes
EOF
    start_bg "$WORK/tinyproxy.log" "${PRIO[@]}" taskset -c 0 tinyproxy -d -c "$WORK/tinyproxy.conf"
    TP_PID=$BG_PID
    wait_port "$TP_PORT" || die "tinyproxy did not start: $(cat "$WORK/tinyproxy.log")"
}

# Busy percentage of CPU 0 and CPU 1 between two snapshots of their /proc/stat lines, as
# JSON [cpu0, cpu1]: with the proxy's own CPU % it shows how much other work shared CPU 0.
cpu_busy() {
    python3 - "$1" "$2" <<'PY'
import sys
def parse(s):
    return {l.split()[0]: list(map(int, l.split()[1:])) for l in s.splitlines() if l.strip()}
a, b = parse(sys.argv[1]), parse(sys.argv[2])
out = []
for c in ("cpu0", "cpu1"):
    d = [y - x for x, y in zip(a[c], b[c])]
    tot = sum(d[:8]) or 1
    out.append(round(100 * (tot - d[3] - d[4]) / tot, 1))
print("[%s, %s]" % tuple(out))
PY
}

# ---------------------------------------------------------------------------------------
# One measurement: record TEST SYSTEM REP CPU ARGS... (CPU = taskset list or - for none).
# ---------------------------------------------------------------------------------------
record() {
    local test=$1 system=$2 rep=$3 cpu=$4 line rc attempt other busy
    shift 4
    local cmd=("$LOAD" "$@" --seconds "$SECS" --warmup "$WARMUP" --json-only)
    case "$1" in idle) cmd=("$LOAD" "$@" --hold "$HOLD" --json-only) ;; esac
    [ "$cpu" != "-" ] && cmd=(taskset -c "$cpu" "${cmd[@]}")
    cmd=(${PRIO[@]+"${PRIO[@]}"} "${cmd[@]}")
    for attempt in $(seq 1 "$TRIES"); do
        if [ "$attempt" = 1 ]; then
            log "[$rep/$REPS] $test / $system"
        else
            log "[$rep/$REPS] $test / $system (try $attempt)"
        fi
        local before after
        before=$(grep -E '^cpu[01] ' /proc/stat)
        rc=0
        line=$(timeout 300 "${cmd[@]}" 2>"$WORK/err") || rc=$?
        after=$(grep -E '^cpu[01] ' /proc/stat)
        line=$(printf '%s\n' "$line" | tail -n 1)
        case "$line" in "{"*) ;; *) line=null ;; esac
        if [ "$rc" != 0 ]; then
            log "  exit $rc: $(tail -c 300 "$WORK/err" | tr '\n' ' ')"
        fi
        busy=$(cpu_busy "$before" "$after")
        # Share of CPU 0 that went to other processes while the pinned proxy ran; above
        # the threshold the run measured the machine's other load, so it is retried.
        other=$(python3 -c 'import json,sys
r = json.loads(sys.argv[1]); b = json.loads(sys.argv[2])
if r and r.get("cpu_seconds") is not None and r.get("elapsed"):
    print(int(max(0, b[0] - 100 * r["cpu_seconds"] / r["elapsed"])))
else:
    print(0)' "$line" "$busy")
        if [ "$cpu" = "-" ] || [ "$other" -le "$MAX_OTHER" ] || [ "$attempt" = "$TRIES" ] ||
            [ "$RETRY_BUDGET" -le 0 ]; then
            break
        fi
        RETRY_BUDGET=$((RETRY_BUDGET - 1))
        log "  CPU 0 was ${other}% busy with other work: retrying"
    done
    printf '{"test":"%s","system":"%s","rep":%d,"rc":%d,"attempts":%d,"busy":%s,"result":%s}\n' \
        "$test" "$system" "$rep" "$rc" "$attempt" "$busy" "$line" >>"$RESULTS"
}

# ---------------------------------------------------------------------------------------
# Long-lived proxies for the pinned sections.
# ---------------------------------------------------------------------------------------
start_target
if want throughput || want connrate || want latency || want udp || want http; then
    start_socksgate "$WORK/socksgate.log" 0 --threads 1
    SGN_PORT=$SG_PORT SGN_PID=$SG_PID
    log "socksgate no-auth pid $SGN_PID port $SGN_PORT"
    if [ -n "$BASELINE" ]; then
        CURRENT=$SOCKSGATE SOCKSGATE=$BASELINE
        start_socksgate "$WORK/socksgate-baseline.log" 0 --threads 1
        SOCKSGATE=$CURRENT
        SGB_PORT=$SG_PORT SGB_PID=$SG_PID
        log "socksgate baseline ($BASELINE) pid $SGB_PID port $SGB_PORT"
    fi
fi
# baseline TEST REP ARGS...: the same measurement against the baseline binary, if one was given;
# `@PROXY@` in ARGS stands for its address.
baseline() {
    [ -n "$BASELINE" ] || return 0
    local test=$1 rep=$2 a=() x
    shift 2
    for x in "$@"; do a+=("${x//@PROXY@/127.0.0.1:$SGB_PORT}"); done
    record "$test" socksgate-baseline "$rep" 1 "${a[@]}" --cpu-pid "$SGB_PID"
}
if want connrate; then
    start_socksgate "$WORK/socksgate-auth.log" 0 --threads 1 -U "$AUTH_USER:$AUTH_PASS"
    SGA_PORT=$SG_PORT SGA_PID=$SG_PID
    start_microsocks
    MSN_PORT=$MS_PORT MSN_PID=$MS_PID
    start_microsocks "$AUTH_USER" "$AUTH_PASS"
    MSA_PORT=$MS_PORT MSA_PID=$MS_PID
fi
if want connrate || want latency; then
    start_haproxy
    HAPL_PID=$HAP_PID HAPL_ECHO=$HAP_ECHO HAPL_ECHOCLOSE=$HAP_ECHOCLOSE
fi
if want throughput || want udp; then start_dante; fi
if want http; then start_tinyproxy; fi

SG="socks5://127.0.0.1:${SGN_PORT:-0}"
for rep in $(seq 1 "$REPS"); do
    if want throughput; then
        for streams in 1 8; do
            for dir in up down; do
                t="tp-$streams-$dir"
                a=(throughput --streams "$streams" --dir "$dir")
                record "$t" socksgate "$rep" 1 "${a[@]}" --proxy "$SG" --cpu-pid "$SGN_PID"
                baseline "$t" "$rep" "${a[@]}" --proxy "socks5://@PROXY@"
                record "$t" dante "$rep" 1 "${a[@]}" --proxy "socks5://127.0.0.1:$DANTE_PORT" --cpu-pid "$DANTE_PID"
                record "$t" direct "$rep" 1 "${a[@]}" --proxy direct
            done
        done
    fi
    if want connrate; then
        a=(connrate ${CR_ENGINE[@]+"${CR_ENGINE[@]}"} --concurrency 50 --target "127.0.0.1:$T_ECHOCLOSE")
        record connrate-noauth socksgate "$rep" 1 "${a[@]}" --proxy "$SG" --cpu-pid "$SGN_PID"
        baseline connrate-noauth "$rep" "${a[@]}" --proxy "socks5://@PROXY@"
        record connrate-noauth microsocks "$rep" 1 "${a[@]}" --proxy "socks5://127.0.0.1:$MSN_PORT" --cpu-pid "$MSN_PID"
        record connrate-noauth haproxy "$rep" 1 connrate ${CR_ENGINE[@]+"${CR_ENGINE[@]}"} --concurrency 50 --proxy direct \
            --target "127.0.0.1:$HAPL_ECHOCLOSE" --cpu-pid "$HAPL_PID"
        record connrate-auth socksgate "$rep" 1 "${a[@]}" \
            --proxy "socks5://$AUTH_USER:$AUTH_PASS@127.0.0.1:$SGA_PORT" --cpu-pid "$SGA_PID"
        record connrate-auth microsocks "$rep" 1 "${a[@]}" \
            --proxy "socks5://$AUTH_USER:$AUTH_PASS@127.0.0.1:$MSA_PORT" --cpu-pid "$MSA_PID"
    fi
    if want latency; then
        record latency-50 socksgate "$rep" 1 latency --conns 50 --proxy "$SG" \
            --target "127.0.0.1:$T_ECHO" --cpu-pid "$SGN_PID"
        baseline latency-50 "$rep" latency --conns 50 --proxy "socks5://@PROXY@" --target "127.0.0.1:$T_ECHO"
        record latency-50 haproxy "$rep" 1 latency --conns 50 --proxy direct \
            --target "127.0.0.1:$HAPL_ECHO" --cpu-pid "$HAPL_PID"
    fi
    if want udp; then
        record udp socksgate "$rep" 1 udp --proxy "$SG" --cpu-pid "$SGN_PID"
        baseline udp "$rep" udp --proxy "socks5://@PROXY@"
        record udp dante "$rep" 1 udp --proxy "socks5://127.0.0.1:$DANTE_PORT" --cpu-pid "$DANTE_PID"
        # The load generator's own ceiling (no proxy), for reading the two above.
        record udp direct "$rep" 1 udp --proxy direct
    fi
    if want http; then
        record http socksgate "$rep" 1 http --concurrency 50 --proxy "http://127.0.0.1:$SGN_PORT" --cpu-pid "$SGN_PID"
        baseline http "$rep" http --concurrency 50 --proxy "http://@PROXY@"
        record http tinyproxy "$rep" 1 http --concurrency 50 --proxy "http://127.0.0.1:$TP_PORT" --cpu-pid "$TP_PID"
        record http direct "$rep" 1 http --concurrency 50 --proxy direct
    fi
    if want idle; then
        # A fresh process per run, so the RSS baseline holds no pooled memory from before.
        start_socksgate "$WORK/socksgate-idle.log" 0 --threads 1
        record idle socksgate "$rep" 1 idle --conns "$IDLE_N" --proxy "socks5://127.0.0.1:$SG_PORT" \
            --target "127.0.0.1:$T_ECHO" --pid "$SG_PID"
        stop_pid "$SG_PID"
        start_haproxy
        record idle haproxy "$rep" 1 idle --conns "$IDLE_N" --proxy direct \
            --target "127.0.0.1:$HAP_ECHO" --pid "$HAP_PID"
        stop_pid "$HAP_PID"
        start_microsocks
        record idle microsocks "$rep" 1 idle --conns "$IDLE_N" --proxy "socks5://127.0.0.1:$MS_PORT" \
            --target "127.0.0.1:$T_ECHO" --pid "$MS_PID"
        stop_pid "$MS_PID"
    fi
done

# ---------------------------------------------------------------------------------------
# socksgate --threads 1 vs 2, unpinned: proxy, load generator and built-in targets all
# share the two cores, so this shows scaling under contention, not per-core capacity.
# ---------------------------------------------------------------------------------------
if want threads; then
    stop_all
    start_socksgate "$WORK/socksgate-t1.log" - --threads 1
    # shellcheck disable=SC2034 # read through ${!port_var} / ${!pid_var} below
    T1_PORT=$SG_PORT T1_PID=$SG_PID
    start_socksgate "$WORK/socksgate-t2.log" - --threads 2
    # shellcheck disable=SC2034
    T2_PORT=$SG_PORT T2_PID=$SG_PID
    for rep in $(seq 1 "$REPS"); do
        for t in 1 2; do
            port_var="T${t}_PORT" pid_var="T${t}_PID"
            p="socks5://127.0.0.1:${!port_var}"
            record threads-connrate "socksgate-t$t" "$rep" - connrate ${CR_ENGINE[@]+"${CR_ENGINE[@]}"} --concurrency 50 --proxy "$p" --cpu-pid "${!pid_var}"
            record threads-tp-8-up "socksgate-t$t" "$rep" - throughput --streams 8 --dir up --proxy "$p" --cpu-pid "${!pid_var}"
            record threads-tp-8-down "socksgate-t$t" "$rep" - throughput --streams 8 --dir down --proxy "$p" --cpu-pid "${!pid_var}"
        done
    done
fi
stop_all

ELAPSED=$(($(date +%s) - START_TIME))
LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$OUT.meta.json" "$ELAPSED" "$LOADAVG_END" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
m["elapsed"], m["loadavg_end"] = int(sys.argv[2]), sys.argv[3]
json.dump(m, open(sys.argv[1], "w"), indent=1)
PY
# Regenerate the report from the saved files at any time with the same command.
python3 "$ROOT/scripts/bench_report.py" --results "$RESULTS" --meta "$OUT.meta.json" --out "$OUT"
log "wrote $OUT.md, $OUT.svg and $OUT.jsonl in ${ELAPSED}s"
