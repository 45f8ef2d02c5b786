#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time each, two at a time (the machines have 2 cores).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]      default: 120 s, every target
#   JOBS=1 scripts/fuzz.sh 600                             one at a time, 10 minutes each
#
# Needs a nightly toolchain and cargo-fuzz (`rustup toolchain install nightly`, `cargo install cargo-fuzz`).
# The committed seeds in fuzz/corpus/<target>/ are read, never written: new inputs go to the ignored
# fuzz/target/corpus-work/<target>/, crashes to fuzz/artifacts/<target>/. Prints executions and crashes per target
# and exits 1 if any target crashed (copy the crash file into fuzz/corpus/<target>/ once it is fixed).
set -euo pipefail

secs="${1:-120}"
shift || true
cd "$(dirname "$0")/../fuzz"

all=(socks5 socks4 http_request http_response http_body proxy_protocol upstream_reply users_file acl)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
jobs="${JOBS:-2}"

max_len() {
    case "$1" in
        socks5 | socks4) echo 600 ;;
        proxy_protocol) echo 1024 ;;
        upstream_reply | acl) echo 2048 ;;
        http_body | users_file) echo 4096 ;;
        http_request | http_response) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

if [ -z "${SKIP_BUILD:-}" ]; then
    cargo +nightly fuzz build -O
fi
bin_dir="target/x86_64-unknown-linux-gnu/release"
logs="target/fuzz-logs"
mkdir -p "$logs"

run_one() {
    local t="$1" work="target/corpus-work/$1" art="artifacts/$1"
    mkdir -p "$work" "$art"
    local before
    before=$(find "$art" -type f | wc -l)
    # -max_total_time bounds the run; timeout(1) is a backstop if the target hangs outside libFuzzer's control.
    timeout --kill-after=30 $((secs + 60)) "$bin_dir/$t" "$work" "corpus/$t" \
        -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$art/" -print_final_stats=1 >"$logs/$t.log" 2>&1 || true
    local after
    after=$(find "$art" -type f | wc -l)
    echo "$((after - before))" >"$logs/$t.crashes"
}

start=$(date +%s)
for t in "${targets[@]}"; do
    [ -x "$bin_dir/$t" ] || { echo "no fuzz binary for target '$t'" >&2; exit 2; }
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    echo "fuzzing $t for ${secs}s (max_len $(max_len "$t"))"
    run_one "$t" &
done
wait

failed=0
printf '\n%-16s %14s %10s %8s\n' target executions exec/s crashes
for t in "${targets[@]}"; do
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' || echo '?')
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$logs/$t.log" | grep -o '[0-9]*$' || echo '?')
    crashes=$(cat "$logs/$t.crashes")
    printf '%-16s %14s %10s %8s\n' "$t" "$execs" "$rate" "$crashes"
    if [ "$crashes" != 0 ] || grep -q '^==[0-9]*== ERROR\|panicked at' "$logs/$t.log"; then
        failed=1
        grep -m3 'panicked at\|ERROR: libFuzzer\|Test unit written' "$logs/$t.log" | sed 's/^/    /'
    fi
done
echo "total wall time: $(($(date +%s) - start))s; logs in fuzz/$logs/"
exit "$failed"
