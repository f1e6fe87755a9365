#!/usr/bin/env bash
# Side-by-side peer-store benchmark: kvmesh `p2pctl bench` vs Mooncake Store and Redis.
#
#   bench/compare-store.sh P2PCTL_BINARY      # path to kvmesh's p2pctl
#   bench/compare-store.sh none               # peers only (or P2PCTL=none)
#
# All runs: one client thread, sequential ops, values of 64 KiB, 512 KiB and 2 MiB, $OPS timed
# puts then $OPS timed gets per size, the data held by another process on this host.
# For each of $REPS repetitions (default 3), in this order:
#   mooncake   bench/peers/mooncake_store_bench.py (mooncake_master + holder + client,
#              TCP, P2PHANDSHAKE; both the bytes API and the registered-buffer API)
#   redis      bench/peers/redis_bench.py (redis-server 7, redis-py + hiredis, TCP)
#   kvmesh     P2PCTL bench --nodes $NODES --transport tcp|shm --sizes ... --ops $OPS --json
# Raw rows go to $OUT_DIR/store-compare.csv (default <repo>/bench-out/), the JSON of each run to
# store-compare.jsonl, every tool's stderr to store-compare.log, and a table of medians with
# the target ratios is printed at the end.
#
# Environment:
#   REPS=3           repetitions
#   OPS=300          timed ops per op and size
#   SIZES=65536,524288,2097152
#   PEERS="mooncake redis"    subset of peers to run (empty: kvmesh only)
#   TRANSPORTS="tcp shm"      kvmesh transports
#   NODES=1          kvmesh holder nodes (p2pctl bench --nodes)
#   P2PCTL=none      skip kvmesh (same as passing "none")
#   P2PCTL_ARGS="..."         extra arguments for every `p2pctl bench` run
#   MC_API=both      bytes | buffer | both (Mooncake APIs to time)
#   MC_ARGS="..."    extra arguments for mooncake_store_bench.py
#   REDIS_ARGS="..." extra arguments for redis_bench.py
#   RUN_TIMEOUT=300  seconds allowed for one run of one peer (all sizes)
#   BENCH_VENV=<repo>/.venv-bench   virtual environment with mooncake, redis, hiredis
#   OUT_DIR=<repo>/bench-out
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

P2PCTL="${1:-${P2PCTL:-}}"
if [[ -z "$P2PCTL" ]]; then
  echo "usage: $0 P2PCTL_BINARY|none   (or set P2PCTL)" >&2
  exit 2
fi
if [[ "$P2PCTL" != none ]]; then
  [[ -x "$P2PCTL" ]] || { echo "p2pctl binary not executable: $P2PCTL" >&2; exit 2; }
  P2PCTL="$(cd "$(dirname "$P2PCTL")" && pwd)/$(basename "$P2PCTL")"
fi

REPS="${REPS:-3}"
OPS="${OPS:-300}"
SIZES="${SIZES:-65536,524288,2097152}"
PEERS="${PEERS-mooncake redis}"
TRANSPORTS="${TRANSPORTS:-tcp shm}"
NODES="${NODES:-1}"
P2PCTL_ARGS="${P2PCTL_ARGS:-}"
MC_API="${MC_API:-both}"
MC_ARGS="${MC_ARGS:-}"
REDIS_ARGS="${REDIS_ARGS:-}"
RUN_TIMEOUT="${RUN_TIMEOUT:-300}"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
OUT_DIR="${OUT_DIR:-$ROOT/bench-out}"
PY="$VENV/bin/python"
TABLE="$HERE/store_table.py"

[[ "$REPS" =~ ^[0-9]+$ && "$REPS" -ge 1 ]] || { echo "REPS must be a whole number >= 1" >&2; exit 2; }
[[ "$OPS" =~ ^[0-9]+$ && "$OPS" -ge 1 ]] || { echo "OPS must be a whole number >= 1" >&2; exit 2; }
[[ "$SIZES" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "SIZES must be comma-separated byte counts" >&2; exit 2; }
[[ "$RUN_TIMEOUT" =~ ^[0-9]+$ && "$RUN_TIMEOUT" -ge 10 ]] || { echo "RUN_TIMEOUT must be >= 10" >&2; exit 2; }
has_peer() { [[ " $PEERS " == *" $1 "* ]]; }
if has_peer mooncake || has_peer redis; then
  [[ -x "$PY" ]] || { echo "no virtual environment at $VENV (see bench/README.md)" >&2; exit 2; }
fi

mkdir -p "$OUT_DIR"
CSV="$OUT_DIR/store-compare.csv"
JSONL="$OUT_DIR/store-compare.jsonl"
LOG="$OUT_DIR/store-compare.log"
python3 "$TABLE" header >"$CSV"
: >"$JSONL"
: >"$LOG"

# Every run is `timeout ... CMD` in the background and waited for. GNU timeout makes itself the
# leader of a new process group and signals that whole group when the limit is hit; after each
# run (and on Ctrl-C / TERM) whatever is still left in that group (holder or node processes of
# a run that exited without cleaning up) is stopped as well.
CUR_PID=""
CUR_OUT=""
kill_group() {
  local pid="$1"
  [[ -n "$pid" ]] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || return 0
  sleep 0.5
  kill -KILL -- "-$pid" 2>/dev/null || true
}
on_signal() {
  echo "interrupted" >&2
  if [[ -n "$CUR_PID" ]]; then
    kill -TERM "$CUR_PID" 2>/dev/null || true
    wait "$CUR_PID" 2>/dev/null || true
    kill_group "$CUR_PID"
  fi
  [[ -n "$CUR_OUT" ]] && rm -f "$CUR_OUT"
  exit 130
}
trap on_signal INT TERM

# run_peer REP PEER -- command...
run_peer() {
  local rep="$1" peer="$2"
  shift 3
  local out rc
  out="$(mktemp)"
  CUR_OUT="$out"
  printf '[rep %s] %-12s ... ' "$rep" "$peer" >&2
  echo "=== rep $rep $peer: $*" >>"$LOG"
  timeout -k 10 "$RUN_TIMEOUT" "$@" >"$out" 2>>"$LOG" &
  CUR_PID=$!
  wait "$CUR_PID"; rc=$?
  kill_group "$CUR_PID"
  CUR_PID=""
  cat "$out" >>"$LOG"
  echo >>"$LOG"
  local before after
  before=$(wc -l <"$CSV")
  python3 "$TABLE" rows --rep "$rep" --peer "$peer" --status "$rc" --jsonl "$JSONL" <"$out" >>"$CSV"
  after=$(wc -l <"$CSV")
  # one-line summary: get p50 at the smallest size and GB/s at the largest, per reported peer
  tail -n $((after - before)) "$CSV" | python3 -c '
import csv, sys
rows = list(csv.DictReader(sys.stdin, fieldnames=sys.argv[1].split(",")))
bad = [r for r in rows if r["ok"] != "1"]
if not rows or bad and len(bad) == len(rows):
    print("FAILED (status %s)" % (rows[0]["status"] if rows else "?")); sys.exit()
out = []
for peer in dict.fromkeys(r["peer"] for r in rows):
    pr = [r for r in rows if r["peer"] == peer and r["ok"] == "1" and r["size"]]
    if not pr: out.append(peer + ": failed"); continue
    lo = min(int(r["size"]) for r in pr); hi = max(int(r["size"]) for r in pr)
    g = {(r["op"], int(r["size"])): r for r in pr}
    s = peer + ":"
    if ("get", lo) in g: s += " get p50@%d %s us" % (lo, g[("get", lo)]["p50_us"])
    for op in ("get", "put"):
        if (op, hi) in g: s += ", %s@%d %s GB/s" % (op, hi, g[(op, hi)]["gbps"])
    out.append(s)
print("; ".join(out) + ("  (%d row(s) failed)" % len(bad) if bad else ""))
' "$(python3 "$TABLE" header)" >&2
  rm -f "$out"
  CUR_OUT=""
}

echo "compare-store: REPS=$REPS OPS=$OPS SIZES=$SIZES PEERS=($PEERS) TRANSPORTS=($TRANSPORTS) NODES=$NODES kvmesh=$P2PCTL" >&2
echo "raw rows: $CSV   log: $LOG" >&2

PEER_TIMEOUT=$((RUN_TIMEOUT - 5))
for rep in $(seq 1 "$REPS"); do
  if has_peer mooncake; then
    # shellcheck disable=SC2086
    run_peer "$rep" mooncake -- "$PY" "$HERE/peers/mooncake_store_bench.py" --sizes "$SIZES" --ops "$OPS" \
      --api "$MC_API" --timeout "$PEER_TIMEOUT" $MC_ARGS
  fi
  if has_peer redis; then
    # shellcheck disable=SC2086
    run_peer "$rep" redis -- "$PY" "$HERE/peers/redis_bench.py" --sizes "$SIZES" --ops "$OPS" \
      --timeout "$PEER_TIMEOUT" $REDIS_ARGS
  fi
  if [[ "$P2PCTL" != none ]]; then
    for tr in $TRANSPORTS; do
      # shellcheck disable=SC2086
      run_peer "$rep" "kvmesh-$tr" -- "$P2PCTL" bench --nodes "$NODES" --transport "$tr" --sizes "$SIZES" \
        --ops "$OPS" --json $P2PCTL_ARGS
    done
  fi
done

python3 "$TABLE" table "$CSV"
