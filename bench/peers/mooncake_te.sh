#!/usr/bin/env bash
# Mooncake Transfer Engine, TCP transport, target + initiator on 127.0.0.1, no etcd.
#
#   bench/peers/mooncake_te.sh BLOCK OP DURATION_S
#     BLOCK: bytes or 64KiB / 1MiB / 4MiB ...;  OP: read | write;  DURATION_S: integer seconds
#
# Uses `transfer_engine_bench` from the PyPI package mooncake-transfer-engine-non-cuda
# (virtual environment $BENCH_VENV, default <repo>/.venv-bench) with
#   --metadata_server=P2PHANDSHAKE --protocol=tcp --batch_size=$BATCH (32) --threads=$THREADS (1)
# The target's segment name is the "P2P handshake, listening on 127.0.0.1:<port>" address it
# logs (that port is chosen at random); the initiator passes it as --segment_id.
#
# Prints one JSON line:
#   {"peer":"mooncake-tcp","block":...,"op":...,"gbps":...,"ops_per_s":...,"batches":...,...}
# gbps = batch_count * batch_size * block_size / duration / 1e9, recomputed from the
# "Test completed: duration D, batch count N, throughput X GB/s" line (the tool's own GB is
# also 1e9 bytes; "te_reported" keeps its text). Its duration is wall time from worker start to
# join, and includes connection setup (no warmup); each worker submits a batch of BATCH requests,
# waits for all of them, and only then submits the next batch.
set -euo pipefail

usage() { echo "usage: $0 BLOCK read|write DURATION_S" >&2; exit 2; }
[[ $# -eq 3 ]] || usage
BLOCK_ARG="$1"; OP="$2"; DUR="$3"
[[ "$OP" == read || "$OP" == write ]] || usage
[[ "$DUR" =~ ^[0-9]+$ ]] || { echo "DURATION_S must be an integer (transfer_engine_bench takes int32 seconds)" >&2; exit 2; }

to_bytes() {
  local s="$1"
  if [[ "$s" =~ ^([0-9]+)([KkMmGg])(i?[Bb]?)$ ]]; then
    local n="${BASH_REMATCH[1]}" u="${BASH_REMATCH[2]}"
    case "$u" in K|k) echo $((n << 10));; M|m) echo $((n << 20));; G|g) echo $((n << 30));; esac
  elif [[ "$s" =~ ^[0-9]+$ ]]; then
    echo "$s"
  else
    echo "bad size: $s" >&2; exit 2
  fi
}
BLOCK="$(to_bytes "$BLOCK_ARG")"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
BATCH="${BATCH:-32}"
THREADS="${THREADS:-1}"
TARGET_NAME="${MC_TARGET_NAME:-127.0.0.1:12345}"
INIT_NAME="${MC_INITIATOR_NAME:-127.0.0.1:12346}"

# The console script in $VENV/bin is a Python wrapper that runs the real binary as a child;
# call the binary directly so that killing it really stops it.
TEB="${MC_TE_BENCH:-}"
if [[ -z "$TEB" ]]; then
  TEB="$(ls "$VENV"/lib/python3*/site-packages/mooncake/transfer_engine_bench 2>/dev/null | head -n1 || true)"
fi
[[ -n "$TEB" && -x "$TEB" ]] || { echo "transfer_engine_bench not found under $VENV (pip install mooncake-transfer-engine-non-cuda)" >&2; exit 127; }

# Buffer just large enough for one batch (blocks are laid out back to back).
BUF=$(( BLOCK * BATCH * THREADS ))

TMP="$(mktemp -d)"
TGT_PID=""
INIT_PID=""
stop() {  # stop one background `timeout` (it forwards the signal to the bench process)
  local pid="$1"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$INIT_PID"
  stop "$TGT_PID"
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

COMMON=(--metadata_server=P2PHANDSHAKE --protocol=tcp --buffer_size="$BUF" --logtostderr)

# create the log before the background job opens it: the loop below may run first
: >"$TMP/target.log"
timeout -k 5 "$((DUR + 90))" "$TEB" --mode=target --local_server_name="$TARGET_NAME" "${COMMON[@]}" \
  >"$TMP/target.log" 2>&1 &
TGT_PID=$!

SEG=""
for _ in $(seq 1 150); do
  SEG="$(sed -n 's/.*P2P handshake, listening on \([0-9.]*:[0-9]*\).*/\1/p' "$TMP/target.log" | head -n1 || true)"
  # segment is usable once the buffer is registered (last step before the target idles)
  if [[ -n "$SEG" ]] && grep -q "DRAM is used\|numa node num" "$TMP/target.log"; then
    sleep 0.3; break
  fi
  kill -0 "$TGT_PID" 2>/dev/null || { echo "mooncake target exited:" >&2; cat "$TMP/target.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$SEG" ]] || { echo "mooncake target did not report its handshake address:" >&2; cat "$TMP/target.log" >&2; exit 1; }

# run in the background and wait, so that a signal to this script is handled at once
timeout -k 5 "$((DUR + 60))" "$TEB" --mode=initiator --local_server_name="$INIT_NAME" "${COMMON[@]}" \
    --segment_id="$SEG" --operation="$OP" --batch_size="$BATCH" --threads="$THREADS" \
    --block_size="$BLOCK" --duration="$DUR" --report_unit=GB --report_precision=4 \
    >"$TMP/init.log" 2>&1 &
INIT_PID=$!
INIT_RC=0
wait "$INIT_PID" || INIT_RC=$?
INIT_PID=""
if [[ "$INIT_RC" -ne 0 ]]; then
  echo "mooncake initiator failed (exit $INIT_RC):" >&2
  tail -n 30 "$TMP/init.log" >&2
  exit 1
fi

LINE="$(grep -m1 'Test completed:' "$TMP/init.log" || true)"
[[ -n "$LINE" ]] || { echo "no result line from transfer_engine_bench:" >&2; tail -n 30 "$TMP/init.log" >&2; exit 1; }

python3 - "$LINE" "$BLOCK" "$OP" "$BATCH" "$THREADS" <<'EOF'
import json, re, sys
line, block, op, batch, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
m = re.search(r"duration ([\d.]+), batch count (\d+), throughput ([\d.]+ \S+)", line)
if not m:
    sys.exit("cannot parse: " + line)
dur, batches, reported = float(m.group(1)), int(m.group(2)), m.group(3)
print(json.dumps({
    "peer": "mooncake-tcp",
    "block": block,
    "op": op,
    "batch": batch,
    "threads": threads,
    "gbps": round(batches * batch * block / dur / 1e9, 4),
    "ops_per_s": round(batches * batch / dur, 1),
    "batches": batches,
    "duration_s": dur,
    "te_reported": reported,
}))
EOF
