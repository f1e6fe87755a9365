#!/usr/bin/env bash
# Single-stream loopback TCP throughput with iperf3 (Debian package `iperf3`).
#
#   bench/peers/iperf3.sh [DURATION_S]        (default 5)
#
# Starts a one-shot iperf3 server on 127.0.0.1:$IPERF3_PORT (default 15201), runs one
# client stream for DURATION_S seconds with JSON output, and prints one JSON line:
#   {"peer":"iperf3","gbps":<receiver GB/s>,"sender_gbps":...,"duration_s":...,"retransmits":...}
# gbps = end.sum_received.bits_per_second / 8 / 1e9 (1 GB = 1e9 bytes), i.e. the bytes the
# receiving side got over the whole timed interval (iperf3's own 1-stream default: 128 KiB writes).
set -euo pipefail

DUR="${1:-5}"
PORT="${IPERF3_PORT:-15201}"
IPERF3="${IPERF3:-iperf3}"

command -v "$IPERF3" >/dev/null || { echo "iperf3 not found (apt-get install -y iperf3)" >&2; exit 127; }

TMP="$(mktemp -d)"
SRV_PID=""
CLI_PID=""
stop() {
  local pid="$1"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$CLI_PID"
  stop "$SRV_PID"
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -1: serve one client then exit; bounded by timeout anyway.
timeout -k 5 "$((DUR + 30))" "$IPERF3" -s -1 -B 127.0.0.1 -p "$PORT" >"$TMP/server.log" 2>&1 &
SRV_PID=$!

# wait for the listener (up to ~5 s) without connecting to it (-1 would count that as the client)
for _ in $(seq 1 50); do
  if ss -Hltn "sport = :$PORT" 2>/dev/null | grep -q .; then break; fi
  kill -0 "$SRV_PID" 2>/dev/null || { echo "iperf3 server exited:" >&2; cat "$TMP/server.log" >&2; exit 1; }
  sleep 0.1
done

timeout -k 5 "$((DUR + 20))" "$IPERF3" -c 127.0.0.1 -p "$PORT" -t "$DUR" -J >"$TMP/client.json" 2>"$TMP/client.err" &
CLI_PID=$!
CLI_RC=0
wait "$CLI_PID" || CLI_RC=$?
CLI_PID=""
if [[ "$CLI_RC" -ne 0 ]]; then
  echo "iperf3 client failed (exit $CLI_RC):" >&2
  cat "$TMP/client.err" "$TMP/client.json" >&2 || true
  exit 1
fi

python3 - "$TMP/client.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d:
    sys.exit("iperf3 error: " + d["error"])
end = d["end"]
rx = end["sum_received"]
tx = end["sum_sent"]
print(json.dumps({
    "peer": "iperf3",
    "gbps": round(rx["bits_per_second"] / 8 / 1e9, 4),
    "sender_gbps": round(tx["bits_per_second"] / 8 / 1e9, 4),
    "duration_s": round(rx["seconds"], 3),
    "bytes": rx["bytes"],
    "retransmits": tx.get("retransmits"),
}))
EOF
