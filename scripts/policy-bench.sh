#!/usr/bin/env bash
# What a large policy file costs, as ratios against no policy measured in the same run (target >= 0.95x):
#  - rules: connrate with and without 10,000 destination rules, through socks5h:// (the target is the name
#    "localhost", so the name index and, after resolution, the address index are both consulted);
#  - users: connrate, 1-stream download throughput and idle memory per tunnel, RFC 1929 auth in both setups: one
#    user given with -U against the same user as one of 10,000 policy users, each with her own password, rates,
#    quota, connection cap and groups (set high enough that no limit is hit).
# Starts socksgate itself (--threads 1, pinned to CPU 0 when taskset exists), interleaves the setups, and prints
# the medians.
#
#   scripts/policy-bench.sh                  # 5 rounds of 3 s each, both parts
#   scripts/policy-bench.sh --rounds 3 --seconds 5 --no-build --only users
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=5
SECS=3
BUILD=1
ONLY="rules,users"
IDLE_CONNS=4000
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --seconds) SECS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --only) ONLY="$2"; shift 2 ;;
        --idle-conns) IDLE_CONNS="$2"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$BUILD" = 1 ] && cargo build --release -q --workspace
want() { case ",$ONLY," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# 10,000 deny rules over every pattern kind, none of which matches localhost or 127.0.0.1.
python3 - "$work/rules.toml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(10000):
        d = [f"*.s{i}.test", f"e{i}.test", f".b{i}.test", f"10.{(i >> 8) & 255}.{i & 255}.0/24",
             f"p{i}.test:8000-8099"][i % 5]
        f.write(f'[[rules]]\ndest = ["{d}"]\naction = "deny"\n')
PY
target/release/socksgate --check-config --policy "$work/rules.toml" >/dev/null
# 10,000 users with every per-user limit set, none of them low enough to be reached; the benchmark logs in as u5000.
python3 - "$work/users.toml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write('[defaults]\nmax_connections = 20000\n')
    for i in range(10000):
        f.write(f'[users.u{i}]\npassword = "pw{i}"\nrate_down = "40GiB/s"\nrate_up = "40GiB/s"\n'
                f'max_connections = 20000\nquota = "1TiB"\nquota_period = "30d"\ngroups = ["g{i % 16}"]\n')
PY
target/release/socksgate --check-config --policy "$work/users.toml" >/dev/null

# Pinning is a command prefix, not a shell function: `$!` of a backgrounded function is a subshell's PID, which
# neither stops the proxy nor has its RSS.
pin0=() pin1=()
if command -v taskset >/dev/null; then pin0=(taskset -c 0) pin1=(taskset -c 1); fi

# Start a fresh socksgate with "$@" (pinned to CPU 0); sets PID and ADDR.
start() {
    local out="$work/out"
    : >"$out"
    ${pin0[@]+"${pin0[@]}"} target/release/socksgate -t 1 -q -q -l 127.0.0.1:0 --resolve localhost=127.0.0.1 "$@" >"$out" 2>/dev/null &
    PID=$!
    for _ in $(seq 100); do grep -q 'listening on' "$out" && break; sleep 0.1; done
    ADDR=$(sed -n 's/^socksgate: listening on //p' "$out" | head -1)
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
field() { sed -n "s/.*\"$1\":\([-0-9.]*\).*/\1/p"; }

# One measurement: `socksgate-load MODE URL LOAD-ARGS...` (pinned to CPU 1, ADDR in URL replaced by the proxy's
# address) against a fresh socksgate started with the options after `--`; prints the JSON field KEY.
measure() {
    local key=$1 mode=$2 url=$3 json
    shift 3
    local load=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do load+=("$1"); shift; done
    shift
    start "$@"
    [ ${#load[@]} -gt 0 ] && load=("${load[@]//@PID/$PID}")
    json=$(${pin1[@]+"${pin1[@]}"} target/release/socksgate-load "$mode" --proxy "${url/ADDR/$ADDR}" ${load[@]+"${load[@]}"} \
        --json-only 2>/dev/null || true)
    stop
    echo "$json" | field "$key"
}
connrate() { local url=$1; shift; measure ops_per_sec connrate "$url" --seconds "$SECS" --warmup 1 -- "$@"; }
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
# row LABEL UNIT BASELINE... -- POLICY...: the medians and their ratio.
row() {
    local label=$1 unit=$2 a=() b=() m0 m1
    shift 2
    while [ "$1" != -- ]; do a+=("$1"); shift; done
    shift
    b=("$@")
    m0=$(median ${a[@]+"${a[@]}"})
    m1=$(median ${b[@]+"${b[@]}"})
    awk -v l="$label ($unit)" -v a="$m0" -v b="$m1" \
        'BEGIN { printf "%-46s %12.2f %12.2f %8.3f\n", l, a, b, (a > 0 ? b / a : 0) }'
}

printf '%-46s %12s %12s %8s\n' "figure" "no policy" "policy" "ratio"
if want rules; then
    none=() rules=()
    for r in $(seq "$ROUNDS"); do
        a=$(connrate "socks5h://ADDR")
        b=$(connrate "socks5h://ADDR" --policy "$work/rules.toml")
        [ -n "$a" ] && none+=("$a")
        [ -n "$b" ] && rules+=("$b")
        echo "round $r: no policy ${a:-?} ops/s, 10,000 rules ${b:-?} ops/s" >&2
    done
    row "connrate, 10,000 rules" "conn/s" ${none[@]+"${none[@]}"} -- ${rules[@]+"${rules[@]}"}
fi
if want users; then
    url="socks5://u5000:pw5000@ADDR"
    one=(-U u5000:pw5000)
    many=(--policy "$work/users.toml")
    c0=() c1=() t0=() t1=() i0=() i1=()
    for r in $(seq "$ROUNDS"); do
        a=$(connrate "$url" "${one[@]}")
        b=$(connrate "$url" "${many[@]}")
        x=$(measure gbit_per_sec throughput "$url" --dir down --seconds "$SECS" -- "${one[@]}")
        y=$(measure gbit_per_sec throughput "$url" --dir down --seconds "$SECS" -- "${many[@]}")
        p=$(measure kib_per_tunnel idle "$url" --conns "$IDLE_CONNS" --hold 1 --pid @PID -- "${one[@]}")
        q=$(measure kib_per_tunnel idle "$url" --conns "$IDLE_CONNS" --hold 1 --pid @PID -- "${many[@]}")
        [ -n "$a" ] && c0+=("$a")
        [ -n "$b" ] && c1+=("$b")
        [ -n "$x" ] && t0+=("$x")
        [ -n "$y" ] && t1+=("$y")
        [ -n "$p" ] && i0+=("$p")
        [ -n "$q" ] && i1+=("$q")
        echo "round $r: connrate ${a:-?} / ${b:-?} ops/s, download ${x:-?} / ${y:-?} Gbit/s," \
            "idle ${p:-?} / ${q:-?} KiB/tunnel (-U / 10,000 users)" >&2
    done
    row "connrate, RFC 1929, 10,000 users" "conn/s" ${c0[@]+"${c0[@]}"} -- ${c1[@]+"${c1[@]}"}
    row "download, 1 stream, 10,000 users" "Gbit/s" ${t0[@]+"${t0[@]}"} -- ${t1[@]+"${t1[@]}"}
    row "idle ($IDLE_CONNS tunnels), 10,000 users" "KiB/tunnel" ${i0[@]+"${i0[@]}"} -- ${i1[@]+"${i1[@]}"}
fi
