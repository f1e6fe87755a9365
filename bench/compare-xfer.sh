#!/usr/bin/env bash
# Side-by-side transfer benchmark: kvmesh xfer-bench vs iperf3, Mooncake TE (TCP) and NIXL (UCX).
#
#   bench/compare-xfer.sh XFER_BENCH_BINARY      # path to kvmesh's xfer-bench
#   bench/compare-xfer.sh none                   # peers only (or XFER_BENCH=none)
#
# For each of $REPS repetitions (default 3): iperf3 once, then for each block size
# (64KiB 1MiB 4MiB) and op (read write): mooncake-tcp, nixl-ucx, kvmesh tcp, kvmesh shm
# (batch 32, 1 thread, $DUR seconds each), then single-block 64KiB read latency for nixl-ucx
# and kvmesh shm (batch 1). All raw rows go to $OUT_DIR/xfer-compare.csv (default
# <repo>/bench-out/), raw JSON to xfer-compare.jsonl, tool stderr to xfer-compare.log, and a
# table of medians with ratios is printed at the end.
#
# Environment:
#   DUR=3            seconds per point (integer; Mooncake's tool takes whole seconds)
#   REPS=3           repetitions
#   IPERF_DUR=5      seconds for the iperf3 run
#   BLOCKS="64KiB 1MiB 4MiB"   OPS="read write"   BATCH=32
#   LAT_BLOCK=64KiB  LAT_OP=read
#   PEERS="iperf3 mooncake nixl"   subset of peers to run (empty: kvmesh only)
#   XFER_BENCH=none  skip kvmesh (same as passing "none")
#   XFER_SIZE_FMT=human|bytes   how --block-size is passed to xfer-bench (default human: 64KiB)
#   XFER_ARGS="..."  extra arguments for every xfer-bench run
#   BENCH_VENV=<repo>/.venv-bench   virtual environment with nixl and mooncake
#   OUT_DIR=<repo>/bench-out
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

XFER="${1:-${XFER_BENCH:-}}"
if [[ -z "$XFER" ]]; then
  echo "usage: $0 XFER_BENCH_BINARY|none   (or set XFER_BENCH)" >&2
  exit 2
fi
if [[ "$XFER" != none ]]; then
  [[ -x "$XFER" ]] || { echo "xfer-bench binary not executable: $XFER" >&2; exit 2; }
  XFER="$(cd "$(dirname "$XFER")" && pwd)/$(basename "$XFER")"
fi

DUR="${DUR:-3}"
REPS="${REPS:-3}"
IPERF_DUR="${IPERF_DUR:-5}"
BLOCKS="${BLOCKS:-64KiB 1MiB 4MiB}"
OPS="${OPS:-read write}"
BATCH="${BATCH:-32}"
LAT_BLOCK="${LAT_BLOCK:-64KiB}"
LAT_OP="${LAT_OP:-read}"
PEERS="${PEERS-iperf3 mooncake nixl}"
XFER_SIZE_FMT="${XFER_SIZE_FMT:-human}"
XFER_ARGS="${XFER_ARGS:-}"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
OUT_DIR="${OUT_DIR:-$ROOT/bench-out}"
PY="$VENV/bin/python"
TABLE="$HERE/compare_table.py"

[[ "$DUR" =~ ^[0-9]+$ && "$DUR" -ge 1 ]] || { echo "DUR must be a whole number of seconds >= 1" >&2; exit 2; }
has_peer() { [[ " $PEERS " == *" $1 "* ]]; }
if has_peer nixl || has_peer mooncake; then
  [[ -x "$PY" ]] || { echo "no virtual environment at $VENV (see bench/README.md)" >&2; exit 2; }
fi

mkdir -p "$OUT_DIR"
CSV="$OUT_DIR/xfer-compare.csv"
JSONL="$OUT_DIR/xfer-compare.jsonl"
LOG="$OUT_DIR/xfer-compare.log"
python3 "$TABLE" header >"$CSV"
: >"$JSONL"
: >"$LOG"

# Everything started below runs in the foreground under `timeout`; the peer scripts own their
# background targets and clean them up with traps. On Ctrl-C, stop the current child group.
CUR_PID=""
CUR_OUT=""
on_signal() {
  echo "interrupted" >&2
  if [[ -n "$CUR_PID" ]]; then kill -TERM "$CUR_PID" 2>/dev/null || true; wait "$CUR_PID" 2>/dev/null || true; fi
  [[ -n "$CUR_OUT" ]] && rm -f "$CUR_OUT"
  exit 130
}
trap on_signal INT TERM

to_bytes() {
  local s="$1"
  if [[ "$s" =~ ^([0-9]+)([KkMmGg])(i?[Bb]?)$ ]]; then
    local n="${BASH_REMATCH[1]}" u="${BASH_REMATCH[2]}"
    case "$u" in K|k) echo $((n << 10));; M|m) echo $((n << 20));; G|g) echo $((n << 30));; esac
  else
    echo "$s"
  fi
}

# run_point REP PEER MODE OP BLOCK_BYTES BATCH LIMIT_S -- command...
run_point() {
  local rep="$1" peer="$2" mode="$3" op="$4" block="$5" batch="$6" limit="$7"
  shift 8
  local out rc
  out="$(mktemp)"
  CUR_OUT="$out"
  printf '[rep %s] %-12s %-4s %-5s %-8s ... ' "$rep" "$peer" "$mode" "$op" "$block" >&2
  echo "=== rep $rep $peer $mode $op $block: $*" >>"$LOG"
  timeout -k 10 "$limit" "$@" >"$out" 2>>"$LOG" &
  CUR_PID=$!
  wait "$CUR_PID"; rc=$?
  CUR_PID=""
  cat "$out" >>"$LOG"
  python3 "$TABLE" row --rep "$rep" --peer "$peer" --mode "$mode" --op "$op" --block "$block" \
    --batch "$batch" --status "$rc" <"$out" >>"$CSV"
  local json
  json="$(python3 -c 'import sys,json
sys.path.insert(0, sys.argv[1]); import compare_table as t
o = t.find_json(open(sys.argv[2]).read()); print(json.dumps(o) if o else "")' "$HERE" "$out")"
  if [[ -n "$json" ]]; then
    printf '{"rep":%s,"peer":"%s","mode":"%s","result":%s}\n' "$rep" "$peer" "$mode" "$json" >>"$JSONL"
  fi
  tail -n1 "$CSV" | awk -F, '{ if ($12=="1") { printf "%s GB/s", $7; if ($9 != "") printf "  p50 %s us", $9; printf "\n" } else print "FAILED (status " $13 ")" }' >&2
  rm -f "$out"
  CUR_OUT=""
}

xfer_size() {
  if [[ "$XFER_SIZE_FMT" == bytes ]]; then to_bytes "$1"; else echo "$1"; fi
}

LIMIT=$((DUR * 3 + 60))
echo "compare-xfer: DUR=${DUR}s REPS=$REPS BLOCKS=($BLOCKS) OPS=($OPS) BATCH=$BATCH PEERS=($PEERS) kvmesh=$XFER" >&2
echo "raw rows: $CSV   log: $LOG" >&2

for rep in $(seq 1 "$REPS"); do
  if has_peer iperf3; then
    run_point "$rep" iperf3 stream "" "" "" $((IPERF_DUR + 40)) -- "$HERE/peers/iperf3.sh" "$IPERF_DUR"
  fi
  for blk in $BLOCKS; do
    bytes="$(to_bytes "$blk")"
    for op in $OPS; do
      if has_peer mooncake; then
        run_point "$rep" mooncake-tcp bw "$op" "$bytes" "$BATCH" "$LIMIT" -- \
          env BATCH="$BATCH" THREADS=1 BENCH_VENV="$VENV" "$HERE/peers/mooncake_te.sh" "$bytes" "$op" "$DUR"
      fi
      if has_peer nixl; then
        run_point "$rep" nixl-ucx bw "$op" "$bytes" "$BATCH" "$LIMIT" -- \
          "$PY" "$HERE/peers/nixl_bench.py" --mode bw --op "$op" --block "$bytes" --batch "$BATCH" \
          --duration "$DUR" --timeout "$((LIMIT - 5))"
      fi
      if [[ "$XFER" != none ]]; then
        for tr in tcp shm; do
          # shellcheck disable=SC2086
          run_point "$rep" "kvmesh-$tr" bw "$op" "$bytes" "$BATCH" "$LIMIT" -- \
            "$XFER" --local --transport "$tr" --op "$op" --block-size "$(xfer_size "$blk")" \
            --batch-size "$BATCH" --threads 1 --duration "$DUR" --json $XFER_ARGS
        done
      fi
    done
  done
  lat_bytes="$(to_bytes "$LAT_BLOCK")"
  if has_peer nixl; then
    run_point "$rep" nixl-ucx lat "$LAT_OP" "$lat_bytes" 1 "$LIMIT" -- \
      "$PY" "$HERE/peers/nixl_bench.py" --mode lat --op "$LAT_OP" --block "$lat_bytes" \
      --duration "$DUR" --timeout "$((LIMIT - 5))"
  fi
  if [[ "$XFER" != none ]]; then
    # shellcheck disable=SC2086
    run_point "$rep" kvmesh-shm lat "$LAT_OP" "$lat_bytes" 1 "$LIMIT" -- \
      "$XFER" --local --transport shm --op "$LAT_OP" --block-size "$(xfer_size "$LAT_BLOCK")" \
      --batch-size 1 --threads 1 --duration "$DUR" --json $XFER_ARGS
  fi
done

python3 "$TABLE" table "$CSV"
