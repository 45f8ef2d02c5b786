#!/usr/bin/env bash
# TLS on the proxy port against HAProxy terminating TLS (`bind ... ssl crt`, mode tcp), loopback only:
#   handshakes  openssl s_time -new (ECDSA P-256, TLS 1.3, no resumption): handshakes and server CPU per handshake
#   upload      2 GiB client -> target inside TLS (socksgate: SOCKS5 CONNECT inside TLS): server CPU per KiB
#   download    2 GiB target -> client inside TLS: server CPU per KiB (the direction rustls encrypts)
#   idle        N idle TLS tunnels: server RSS per tunnel (socksgate also in clear text, for comparison)
# stunnel (where installed) gets the handshake and both bulk directions too.
# The server is pinned to core 0 (socksgate --threads 1, haproxy nbthread 1), clients to core 1. The last lines
# are ratios against haproxy measured in the same run.
# Usage: scripts/tls-bench.sh [--seconds S] [--tunnels N]     (needs openssl, python3; haproxy, stunnel optional)
#        SOCKSGATE_ARGS="--buffer-size 65536" scripts/tls-bench.sh   (extra flags for socksgate)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=5
TUNNELS=4000
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) SECONDS_RUN=$2; shift 2 ;;
    --tunnels) TUNNELS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
BIN=${SOCKSGATE:-target/release/socksgate}
[ -x "$BIN" ] || cargo build --release -q
HERE=scripts/tls
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# A throwaway CA and a P-256 server certificate for localhost / 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$WORK/key.pem" -out "$WORK/csr.pem" 2>/dev/null
openssl x509 -req -in "$WORK/csr.pem" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial -days 2 \
  -out "$WORK/cert.pem" -extfile <(printf "subjectAltName=DNS:localhost,IP:127.0.0.1") 2>/dev/null
cat "$WORK/cert.pem" "$WORK/key.pem" > "$WORK/haproxy.pem"
export CA=$WORK/ca.pem

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_target() { # mode (sets TARGET_PORT; not in a subshell, so its pid is cleaned up)
  python3 "$HERE/sink.py" "$1" 0 > "$WORK/target-$1.port" 2> /dev/null &
  PIDS+=($!)
  for _ in $(seq 100); do [ -s "$WORK/target-$1.port" ] && break; sleep 0.05; done
  TARGET_PORT=$(cat "$WORK/target-$1.port")
}
start_target sink
SINK=$TARGET_PORT
start_target hold
HOLD=$TARGET_PORT
start_target source
SOURCE=$TARGET_PORT
declare -A HS UP DOWN IDLE

start_socksgate() { # -> sets SG_PID SG_PORT
  # shellcheck disable=SC2086 # SOCKSGATE_ARGS is a list of flags
  taskset -c 0 "$BIN" -t 1 -q -l 127.0.0.1:0 --tls-cert "$WORK/cert.pem" --tls-key "$WORK/key.pem" \
    ${SOCKSGATE_ARGS:-} > "$WORK/sg.out" 2> "$WORK/sg.err" &
  SG_PID=$!
  PIDS+=($SG_PID)
  for _ in $(seq 100); do grep -q "listening on" "$WORK/sg.out" 2>/dev/null && break; sleep 0.05; done
  SG_PORT=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$WORK/sg.out" | head -1)
}
start_haproxy() { # backend port -> sets HA_PID HA_PORT (empty without haproxy)
  HA_PID=""
  command -v haproxy > /dev/null || return 0
  HA_PORT=$(free_port)
  cat > "$WORK/haproxy.cfg" <<CFG
global
    nbthread 1
    maxconn $((TUNNELS + 1000))
    tune.ssl.cachesize 0
    ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend f
    bind 127.0.0.1:$HA_PORT ssl crt $WORK/haproxy.pem
    default_backend b
backend b
    server s1 127.0.0.1:$1
CFG
  taskset -c 0 haproxy -f "$WORK/haproxy.cfg" > "$WORK/haproxy.log" 2>&1 &
  HA_PID=$!
  PIDS+=($HA_PID)
  for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $HA_PORT)).close()" 2>/dev/null && break
    sleep 0.05
  done
}
start_stunnel() { # backend port -> sets ST_PID ST_PORT (empty without stunnel)
  ST_PID=""
  command -v stunnel > /dev/null || return 0
  ST_PORT=$(free_port)
  cat > "$WORK/stunnel.conf" <<CFG
foreground = yes
pid =
debug = 3
[b]
accept = 127.0.0.1:$ST_PORT
connect = 127.0.0.1:$1
cert = $WORK/cert.pem
key = $WORK/key.pem
sslVersionMin = TLSv1.3
CFG
  taskset -c 0 stunnel "$WORK/stunnel.conf" > "$WORK/stunnel.log" 2>&1 &
  ST_PID=$!
  PIDS+=($ST_PID)
  for _ in $(seq 100); do
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $ST_PORT)).close()" 2>/dev/null && break
    sleep 0.05
  done
}
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

handshakes() { # name pid port
  local t0 t1 out n secs
  t0=$(ticks "$2")
  out=$(taskset -c 1 openssl s_time -connect "127.0.0.1:$3" -new -time "$SECONDS_RUN" -tls1_3 -CAfile "$CA" 2>&1 \
    | grep "real seconds" || true)
  t1=$(ticks "$2")
  n=$(echo "$out" | awk '{print $1}')
  secs=$(echo "$out" | awk '{print $4}')
  # s_time's client (one openssl process on core 1) is usually the limit: the server CPU per handshake is the
  # figure that compares the servers.
  HS[$1]=$(echo "($t1 - $t0) * 1000 / $hz / ${n:-1}" | bc -l)
  printf "%-10s handshakes: %6s in %ss, %.0f/s; server CPU %.3f ms per handshake\n" "$1" "${n:-0}" "${secs:-?}" \
    "$(echo "${n:-0} / ${secs:-1}" | bc -l)" "${HS[$1]}"
}
bulk() { # name pid port mode upload|download
  local t0 t1 gbit bytes=$((2 << 30)) cmd target
  if [ "$5" = upload ]; then cmd=bulk target=$SINK; else cmd=download target=$SOURCE; fi
  t0=$(ticks "$2")
  gbit=$(taskset -c 1 python3 "$HERE/client.py" "$cmd" "$3" "$4" "$bytes" "$target")
  sleep 0.3
  t1=$(ticks "$2")
  local ns
  ns=$(echo "($t1 - $t0) * 1000000000 / $hz / ($bytes / 1024)" | bc -l)
  if [ "$5" = upload ]; then UP[$1]=$ns; else DOWN[$1]=$ns; fi
  printf "%-10s bulk %-8s: %s Gbit/s; server CPU %.0f ns per KiB\n" "$1" "$5" "$gbit" "$ns"
}
idle() { # name pid port mode tls|clear
  local r0 r1 fifo=$WORK/idle.fifo
  r0=$(rss "$2")
  rm -f "$fifo"; mkfifo "$fifo"
  taskset -c 1 python3 "$HERE/client.py" idle "$3" "$4" "$TUNNELS" "$HOLD" "$5" < "$fifo" > "$WORK/idle.out" &
  local cpid=$!
  exec 7> "$fifo"
  for _ in $(seq 1200); do grep -q open "$WORK/idle.out" 2>/dev/null && break; sleep 0.1; done
  sleep 1
  r1=$(rss "$2")
  exec 7>&-
  wait "$cpid" 2>/dev/null || true
  IDLE[$1-$5]=$(echo "($r1 - $r0) / $TUNNELS" | bc -l)
  printf "%-10s idle %s tunnels (%s): %.2f KiB per tunnel\n" "$1" "$TUNNELS" "$5" "${IDLE[$1-$5]}"
}

# The targets are fixed per direction, so one socksgate serves both bulk runs.
start_socksgate
handshakes socksgate "$SG_PID" "$SG_PORT"
bulk socksgate "$SG_PID" "$SG_PORT" socks upload
bulk socksgate "$SG_PID" "$SG_PORT" socks download
idle socksgate "$SG_PID" "$SG_PORT" socks tls
stop "$SG_PID"
start_socksgate
idle socksgate "$SG_PID" "$SG_PORT" socks clear
stop "$SG_PID"

# haproxy and stunnel forward to one fixed backend: one instance per target.
start_haproxy "$SINK"
if [ -n "$HA_PID" ]; then
  handshakes haproxy "$HA_PID" "$HA_PORT"
  bulk haproxy "$HA_PID" "$HA_PORT" raw upload
  stop "$HA_PID"
  start_haproxy "$SOURCE"
  bulk haproxy "$HA_PID" "$HA_PORT" raw download
  stop "$HA_PID"
  start_haproxy "$HOLD"
  idle haproxy "$HA_PID" "$HA_PORT" raw tls
  stop "$HA_PID"
else
  echo "haproxy not installed: no comparison"
fi
start_stunnel "$SINK"
if [ -n "$ST_PID" ]; then
  handshakes stunnel "$ST_PID" "$ST_PORT"
  bulk stunnel "$ST_PID" "$ST_PORT" raw upload
  stop "$ST_PID"
  start_stunnel "$SOURCE"
  bulk stunnel "$ST_PID" "$ST_PORT" raw download
  stop "$ST_PID"
fi

ratio() { # value baseline
  if [ -n "${2:-}" ] && [ -n "${1:-}" ]; then printf "%.2fx" "$(echo "$1 / $2" | bc -l)"; else printf "n/a"; fi
}
if [ -n "${HS[haproxy]:-}" ]; then
  echo "ratios vs haproxy (same run; < 1.0x: socksgate uses less):"
  for who in socksgate stunnel; do
    [ -n "${HS[$who]:-}" ] || continue
    printf "  %-10s handshake CPU %s, upload CPU/KiB %s, download CPU/KiB %s\n" "$who" \
      "$(ratio "${HS[$who]}" "${HS[haproxy]}")" "$(ratio "${UP[$who]}" "${UP[haproxy]}")" \
      "$(ratio "${DOWN[$who]}" "${DOWN[haproxy]}")"
  done
  printf "  socksgate  idle memory per TLS tunnel %s (%.2f vs %.2f KiB; clear text %.2f KiB)\n" \
    "$(ratio "${IDLE[socksgate-tls]}" "${IDLE[haproxy-tls]}")" "${IDLE[socksgate-tls]}" "${IDLE[haproxy-tls]}" \
    "${IDLE[socksgate-clear]}"
fi
