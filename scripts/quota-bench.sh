#!/usr/bin/env bash
# Cost of per-user quotas (issue 12: a policy of 10,000 users with limits that are not hit keeps connrate and
# throughput >= 0.95x). Starts socksgate itself (--threads 1, pinned to CPU 0 when taskset exists) with a policy of
# 10,000 users, once without quotas and once with a quota (1 TiB, 30 d period) for every user, and measures
# `socksgate-load throughput --dir down` and `connrate` as user u0, interleaving the setups; prints the medians
# and the ratios (quota / none).
#
#   scripts/quota-bench.sh                   # 3 rounds of 3 s each
#   scripts/quota-bench.sh --rounds 5 --seconds 5 --no-build
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=3
SECS=3
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --seconds) SECS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$BUILD" = 1 ] && cargo build --release -q --workspace

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import sys
for name, extra in (("none", ""), ("quota", 'quota = "1TiB"\nquota_period = "30d"\n')):
    with open(f"{sys.argv[1]}/{name}.toml", "w") as f:
        for i in range(10000):
            f.write(f'[users.u{i}]\npassword = "pw{i}"\n{extra}\n')
PY
for p in none quota; do target/release/socksgate --check-config --policy "$work/$p.toml" >/dev/null; done

pin() { if command -v taskset >/dev/null; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }

# One measurement: MODE ARGS... against a fresh socksgate with policy $POLICY; prints the JSON field $FIELD.
measure() {
    local out="$work/out" pid addr json
    : >"$out"
    pin 0 target/release/socksgate -t 1 -q -q -l 127.0.0.1:0 --policy "$work/$POLICY.toml" >"$out" 2>/dev/null &
    pid=$!
    for _ in $(seq 100); do grep -q 'listening on' "$out" && break; sleep 0.1; done
    addr=$(sed -n 's/^socksgate: listening on //p' "$out" | head -1)
    json=$(pin 1 target/release/socksgate-load "$@" --proxy "socks5://u0:pw0@$addr" --seconds "$SECS" \
        --warmup 1 --json-only 2>/dev/null || true)
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$json" | sed -n "s/.*\"$FIELD\":\([0-9.]*\).*/\1/p"
}

median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
tn=() tq=() cn=() cq=()
for r in $(seq "$ROUNDS"); do
    FIELD=gbit_per_sec
    a=$(POLICY=none measure throughput --streams 1 --dir down); b=$(POLICY=quota measure throughput --streams 1 --dir down)
    FIELD=ops_per_sec
    c=$(POLICY=none measure connrate --concurrency 20); d=$(POLICY=quota measure connrate --concurrency 20)
    [ -n "$a" ] && tn+=("$a"); [ -n "$b" ] && tq+=("$b"); [ -n "$c" ] && cn+=("$c"); [ -n "$d" ] && cq+=("$d")
    echo "round $r: throughput ${a:-?} / ${b:-?} Gbit/s, connrate ${c:-?} / ${d:-?} ops/s (none / quota)" >&2
done
m0=$(median "${tn[@]}"); m1=$(median "${tq[@]}"); m2=$(median "${cn[@]}"); m3=$(median "${cq[@]}")
awk -v a="$m0" -v b="$m1" -v c="$m2" -v d="$m3" 'BEGIN {
    printf "%-12s %14s %14s %8s\n", "", "no quota", "quota", "ratio"
    printf "%-12s %14.2f %14.2f %8.3f\n", "Gbit/s", a, b, (a > 0 ? b / a : 0)
    printf "%-12s %14.0f %14.0f %8.3f\n", "connrate/s", c, d, (c > 0 ? d / c : 0)
}'
