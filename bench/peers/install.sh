#!/usr/bin/env bash
# Install the comparison peers for bench/compare-xfer.sh and bench/compare-store.sh
# (Debian, run as root).
#   - iperf3, libibverbs1 and redis-server (7.x) from Debian (transfer_engine_bench links
#     libibverbs.so.1 even when only the TCP transport is used; no RDMA device is needed)
#   - a virtual environment <repo>/.venv-bench (ignored by git) with
#     mooncake-transfer-engine-non-cuda, and nixl + nixl-cu12 + numpy without dependencies
#     (nixl-cu12's CUDA dependencies are not needed for DRAM-to-DRAM transfers), and
#     redis + hiredis (redis-py with the hiredis parser, for bench/peers/redis_bench.py)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"

if [[ "${SKIP_APT:-0}" != 1 ]]; then
  apt-get update
  apt-get install -y iperf3 libibverbs1 redis-server
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install mooncake-transfer-engine-non-cuda
"$VENV/bin/pip" install --no-deps nixl nixl-cu12 numpy
"$VENV/bin/pip" install redis hiredis

# smoke checks
iperf3 --version | head -n1
TEB="$(ls "$VENV"/lib/python3*/site-packages/mooncake/transfer_engine_bench | head -n1)"
if ldd "$TEB" | grep -q "not found"; then
  echo "transfer_engine_bench has unresolved libraries:" >&2
  ldd "$TEB" | grep "not found" >&2
  exit 1
fi
"$VENV/bin/python" -c 'import nixl._api as a; print("nixl ok:", a.nixl_agent.__name__)'
MM="$(ls "$VENV"/lib/python3*/site-packages/mooncake/mooncake_master | head -n1)"
if ldd "$MM" | grep -q "not found"; then
  echo "mooncake_master has unresolved libraries:" >&2
  ldd "$MM" | grep "not found" >&2
  exit 1
fi
"$VENV/bin/python" -c 'from mooncake.store import MooncakeDistributedStore as S; print("mooncake.store ok:", S.__name__)'
redis-server --version
"$VENV/bin/python" -c 'import redis; from redis.utils import HIREDIS_AVAILABLE as H; assert H, "hiredis not active"; print("redis-py", redis.__version__, "hiredis parser active")'
"$VENV/bin/pip" list 2>/dev/null | grep -iE "^(mooncake|nixl|numpy|redis|hiredis)"
