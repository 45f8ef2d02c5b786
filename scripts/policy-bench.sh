#!/usr/bin/env bash
# Connection rate with and without a 10,000-rule policy file (issue 13: rules must not slow connrate measurably,
# target >= 0.95x). Starts socksgate itself (--threads 1, pinned to CPU 0 when taskset exists), runs
# `socksgate-load connrate` through socks5h:// (the target is the name "localhost", so the name index and, after
# resolution, the address index are both consulted), interleaving the two setups, and prints the medians.
#
#   scripts/policy-bench.sh                  # 5 rounds of 3 s each
#   scripts/policy-bench.sh --rounds 3 --seconds 5 --no-build
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUNDS=5
SECS=3
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --seconds) SECS="$2"; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$BUILD" = 1 ] && cargo build --release -q

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

pin() { if command -v taskset >/dev/null; then taskset -c "$1" "${@:2}"; else "${@:2}"; fi; }

# One measurement: ops/s of connrate against a fresh socksgate started with "$@".
measure() {
    local out="$work/out" pid addr json
    : >"$out"
    pin 0 target/release/socksgate -t 1 -q -q -l 127.0.0.1:0 --resolve localhost=127.0.0.1 "$@" >"$out" 2>/dev/null &
    pid=$!
    for _ in $(seq 100); do grep -q 'listening on' "$out" && break; sleep 0.1; done
    addr=$(sed -n 's/^socksgate: listening on //p' "$out" | head -1)
    json=$(pin 1 target/release/socksgate-load connrate --proxy "socks5h://$addr" --seconds "$SECS" --warmup 1 \
        --json-only 2>/dev/null || true)
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    echo "$json" | sed -n 's/.*"ops_per_sec":\([0-9.]*\).*/\1/p'
}

none=() rules=()
for r in $(seq "$ROUNDS"); do
    a=$(measure); b=$(measure --policy "$work/rules.toml")
    [ -n "$a" ] && none+=("$a")
    [ -n "$b" ] && rules+=("$b")
    echo "round $r: no policy ${a:-?} ops/s, 10,000 rules ${b:-?} ops/s" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
m0=$(median "${none[@]}"); m1=$(median "${rules[@]}")
printf '%-28s %12s\n' "setup" "connrate/s"
printf '%-28s %12.0f\n' "no policy" "$m0" "10,000 rules" "$m1"
awk -v a="$m0" -v b="$m1" 'BEGIN { if (a > 0) printf "ratio (rules / none)         %12.3f\n", b / a }'
