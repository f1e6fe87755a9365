#!/usr/bin/env python3
"""Redis SET/GET benchmark through redis-py with the hiredis parser, one client thread.

Starts its own redis-server (Debian's redis-server 7.x by default) on 127.0.0.1 with a free
private port, no persistence (--save '' --appendonly no) and a temporary working directory,
then, per value size: warmup (--warmup SET + GET pairs, untimed), --ops sequential
SET key value with fresh keys, each timed, then --ops sequential GET key of those keys, each
timed (each GET's result is compared with the value after its timer has stopped); then
FLUSHALL (untimed). The connection is TCP over loopback, one redis.Redis client with its
default connection pool (one connection, as the calls are sequential).

Output: one JSON list on stdout, rows in the same schema as `p2pctl bench --json`:
  [{"peer": "redis", "op": "set"->"put" / "get", "size": 65536, "ops": 300, "p50_us": ...,
    "p99_us": ..., "mean_us": ..., "gbps": ..., "transport": "tcp", ...}, ...]
SET is reported as op "put". gbps = size * ops / (sum of the timed op durations), in 1e9
bytes per second; p50_us / p99_us are nearest-rank percentiles of the per-op times.

The run fails (exit 2) if a GET returns wrong data; it exits 1 if hiredis is not the active
parser unless --allow-python-parser is given, and warns if the server is not Redis 7.

Run with the virtual environment that holds redis and hiredis (see bench/README.md):
  .venv-bench/bin/python bench/peers/redis_bench.py --ops 300
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PEER = "redis"
DEFAULT_SIZES = "65536,524288,2097152"
NPATTERNS = 8


def log(msg):
    sys.stderr.write(f"redis_bench: {msg}\n")
    sys.stderr.flush()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_pdeathsig():
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def lo_bytes():
    try:
        with open("/sys/class/net/lo/statistics/rx_bytes") as fh:
            return int(fh.read())
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated value sizes in bytes (default {DEFAULT_SIZES})")
    ap.add_argument("--ops", type=int, default=300, help="timed SETs and GETs per size (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed SET+GET pairs per size (default 20)")
    ap.add_argument("--redis-server", default=os.environ.get("REDIS_SERVER", "redis-server"),
                    help="redis-server binary (default: redis-server from PATH)")
    ap.add_argument("--port", type=int, default=0, help="server port (default: a free port)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra redis-server argument (repeatable)")
    ap.add_argument("--allow-python-parser", action="store_true", help="run even if hiredis is not active")
    ap.add_argument("--timeout", type=int, default=300, help="hard limit in seconds (default 300)")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; the output is always JSON")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    import redis
    import redis.connection
    from redis.utils import HIREDIS_AVAILABLE

    parser_name = getattr(redis.connection, "DefaultParser", type(None)).__name__
    if not HIREDIS_AVAILABLE or "Hiredis" not in parser_name:
        log(f"hiredis parser not active (HIREDIS_AVAILABLE={HIREDIS_AVAILABLE}, DefaultParser={parser_name})")
        if not args.allow_python_parser:
            sys.exit(1)

    server_bin = shutil.which(args.redis_server) or args.redis_server
    if not os.access(server_bin, os.X_OK):
        log(f"redis-server not found: {args.redis_server} (apt-get install -y redis-server)")
        sys.exit(1)

    workdir = tempfile.mkdtemp(prefix="redis-bench-")
    port = args.port or free_port()
    server = None

    def cleanup():
        if server is not None and server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    def on_signal(signum, frame):
        if signum == signal.SIGALRM:
            log(f"timed out after {args.timeout}s")
        cleanup()
        os._exit(3 if signum == signal.SIGALRM else 128 + signum)

    for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    signal.alarm(args.timeout)

    rc = 0
    try:
        cmd = [server_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", workdir, "--daemonize", "no", "--protected-mode", "yes", "--logfile", ""] + args.server_arg
        log("server: " + " ".join(repr(c) if c == "" else c for c in cmd))
        server = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, preexec_fn=set_pdeathsig)

        r = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                r.ping()
                break
            except redis.exceptions.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not come up (exit {server.poll()})")
                time.sleep(0.05)
        info = r.info("server")
        version = str(info.get("redis_version"))
        if not version.startswith("7."):
            log(f"warning: redis-server version {version}, not 7.x")
        conn = r.connection_pool.get_connection()
        active_parser = type(conn._parser).__name__
        r.connection_pool.release(conn)
        log(f"redis {version}, redis-py {redis.__version__}, parser {active_parser}")

        base = os.urandom(max(sizes) + NPATTERNS * 64)
        run_id = f"{os.getpid()}-{int(time.time())}"
        rows = []
        failures = []
        clock = time.perf_counter_ns
        for size in sizes:
            vals = [base[j * 64: j * 64 + size] for j in range(NPATTERNS)]
            for i in range(args.warmup):
                k = f"{run_id}-{size}-w{i}"
                r.set(k, vals[i % NPATTERNS])
                if r.get(k) != vals[i % NPATTERNS]:
                    raise RuntimeError(f"warmup GET of {size} B returned wrong data")
            keys = [f"{run_id}-{size}-t{i}" for i in range(args.ops)]
            set_ns = []
            lo0 = lo_bytes()
            for i, k in enumerate(keys):
                v = vals[i % NPATTERNS]
                t0 = clock()
                ok = r.set(k, v)
                t1 = clock()
                if ok is not True:
                    raise RuntimeError(f"SET returned {ok!r}")
                set_ns.append(t1 - t0)
            lo1 = lo_bytes()
            get_ns = []
            bad = 0
            lo2 = lo_bytes()
            for i, k in enumerate(keys):
                t0 = clock()
                got = r.get(k)
                t1 = clock()
                get_ns.append(t1 - t0)
                if got != vals[i % NPATTERNS]:
                    bad += 1
            lo3 = lo_bytes()
            r.flushall()
            payload = size * args.ops
            for op, ns, lo_delta in (("put", set_ns, (lo1 - lo0) if lo0 is not None else None),
                                     ("get", get_ns, (lo3 - lo2) if lo2 is not None else None)):
                us = sorted(x / 1e3 for x in ns)
                row = {
                    "peer": PEER,
                    "op": op,
                    "redis_op": "SET" if op == "put" else "GET",
                    "size": size,
                    "ops": len(ns),
                    "p50_us": round(pct(us, 50), 2),
                    "p99_us": round(pct(us, 99), 2),
                    "mean_us": round(sum(us) / len(us), 2),
                    "gbps": round(payload / (sum(ns) / 1e9) / 1e9, 4),
                    "transport": "tcp",
                    "verified": bad == 0 if op == "get" else True,
                    "lo_bytes_per_payload": round(lo_delta / payload, 3) if lo_delta is not None else None,
                    "redis_version": version,
                    "redis_py": redis.__version__,
                    "parser": active_parser,
                }
                if op == "get":
                    row["wrong_data"] = bad
                    if bad:
                        failures.append(f"GET {size}: {bad} wrong values")
                rows.append(row)
                log(f"{row['redis_op']} {size:>8d} B: p50 {row['p50_us']:9.1f} us  p99 {row['p99_us']:9.1f} us  "
                    f"{row['gbps']:7.3f} GB/s  lo/payload {row['lo_bytes_per_payload']}")
        print(json.dumps(rows), flush=True)
        if failures:
            log("verification failed: " + "; ".join(failures))
            rc = 2
    except Exception as e:  # noqa: BLE001
        log(f"error: {e!r}")
        rc = 1
    signal.alarm(0)
    cleanup()
    sys.exit(rc)


if __name__ == "__main__":
    main()
