#!/usr/bin/env python3
"""Mooncake Store put/get benchmark: one client thread, the data held by another process.

Processes (all on this host, all over 127.0.0.1):
  mooncake_master  the store's master (object metadata, allocation); started here with private
                   ports, no etcd, no HA, no HTTP metadata server
  holder           a MooncakeDistributedStore client that mounts a global segment of
                   --segment-size bytes (default 2 GiB) and otherwise only waits
  client           a MooncakeDistributedStore client that mounts NO segment
                   (global_segment_size=0), so every object it puts is placed in the holder's
                   segment and every byte put or got crosses to / from the holder process
                   through Mooncake's transfer engine (TCP transport, metadata P2PHANDSHAKE)

The client, per API and value size: warmup (--warmup puts + gets, untimed), then --ops
sequential put(key, value) calls with fresh keys, each timed, then --ops sequential get(key)
of those keys, each timed; the data is then removed (remove_all(force=True)).

APIs (--api, default both):
  bytes    put(key, bytes) / get(key) -> bytes: the plain Python API (the client copies
           through its registered local buffer; get returns a new bytes object)
  buffer   the zero-copy API: register_buffer(ptr, len) once, then put_from(key, ptr, size) /
           get_into(key, ptr, size) from / into that registered memory

Checks (a failure makes the run exit 2):
  - every get returns exactly the bytes that were put under that key (checked after the op's
    timer has stopped)
  - placement: for a sample of keys, get_replica_desc(key) must give one memory replica; its
    buffer address is sent to the holder, which reads that memory in its own address space
    and compares a SHA-256 with the client's value: the object's bytes are in the holder
  - loopback traffic: bytes counted on `lo` during each timed loop are reported per payload
    byte (lo_bytes_per_payload, about 1 or more when the payload went over TCP; it also counts
    any other loopback traffic on the host)
  - holder_rss_growth_mib: how much the holder's resident memory grew during the timed put
    loop (0 means no first-touch page faults were timed; see --prefault)

Output: one JSON list on stdout (the same row schema as `p2pctl bench --json`), e.g.
  [{"peer": "mooncake-store", "api": "bytes", "op": "get", "size": 65536, "ops": 300,
    "p50_us": ..., "p99_us": ..., "mean_us": ..., "gbps": ..., "transport": "tcp", ...}, ...]
gbps = size * ops / (sum of the timed op durations) in 1e9 bytes per second; p50_us /
p99_us are nearest-rank percentiles of the per-op times in microseconds.

Run with the virtual environment that holds mooncake-transfer-engine-non-cuda:
  .venv-bench/bin/python bench/peers/mooncake_store_bench.py --ops 300
Mooncake clients can hang at interpreter exit, so every process ends with os._exit().
"""

import argparse
import ctypes
import glob
import hashlib
import json
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import time

PEER = "mooncake-store"
DEFAULT_SIZES = "65536,524288,2097152"
NPATTERNS = 8  # distinct values per size; key i holds pattern i % NPATTERNS


def log(msg):
    sys.stderr.write(f"mooncake_store_bench: {msg}\n")
    sys.stderr.flush()


def parse_size(text):
    t = str(text).strip()
    mult = 1
    for suf, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("G", 1 << 30), ("M", 1 << 20),
                   ("K", 1 << 10)):
        if t.endswith(suf):
            t, mult = t[: -len(suf)], m
            break
    return int(t) * mult


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_pdeathsig():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except Exception:
        pass


def find_master(explicit):
    if explicit:
        return explicit
    try:
        import importlib.util

        spec = importlib.util.find_spec("mooncake")
        if spec and spec.submodule_search_locations:
            for d in spec.submodule_search_locations:
                p = os.path.join(d, "mooncake_master")
                if os.access(p, os.X_OK):
                    return p
    except Exception:
        pass
    for p in glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "mooncake", "mooncake_master")):
        if os.access(p, os.X_OK):
            return p
    return None


# ---------------------------------------------------------------- control messages
def send_msg(sock, obj):
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("<Q", len(data)) + data)


def recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError("peer closed the control socket")
        out += chunk
    return bytes(out)


def recv_msg(sock):
    (n,) = struct.unpack("<Q", recv_exact(sock, 8))
    return pickle.loads(recv_exact(sock, n))


# ---------------------------------------------------------------- helpers
def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def lo_bytes():
    """Bytes received on the loopback interface so far (on lo every byte sent is also received)."""
    try:
        with open("/sys/class/net/lo/statistics/rx_bytes") as fh:
            return int(fh.read())
    except OSError:
        return None


def rss_bytes():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mapped(addr, size):
    """True if [addr, addr+size) lies inside one readable mapping of this process."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                rng, perms = line.split()[:2]
                lo, hi = (int(x, 16) for x in rng.split("-"))
                if lo <= addr and addr + size <= hi and perms[0] == "r":
                    return True
    except OSError:
        pass
    return False


def make_store(args, hostname_port, master, segment_size, local_buffer):
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup(
        hostname_port,          # local_hostname
        "P2PHANDSHAKE",         # metadata_server: no etcd, peers exchange metadata directly
        segment_size,           # global_segment_size: memory this process contributes
        local_buffer,           # local_buffer_size: registered staging buffer of this client
        "tcp",                  # protocol
        "",                     # rdma_devices
        master,                 # master_server_addr
    )
    if rc != 0:
        raise RuntimeError(f"MooncakeDistributedStore.setup returned {rc}")
    return store


# ---------------------------------------------------------------- holder
def run_holder(args):
    set_pdeathsig()
    sock = socket.socket(fileno=args.ctrl_fd)
    rc = 0
    try:
        store = make_store(args, "127.0.0.1", args.master, args.segment_size, 16 << 20)
        send_msg(sock, {"ready": True, "hostname": store.get_hostname(), "pid": os.getpid(), "rss": rss_bytes()})
        while True:
            msg = recv_msg(sock)
            cmd = msg.get("cmd")
            if cmd == "rss":
                send_msg(sock, {"rss": rss_bytes()})
            elif cmd == "check":
                out = []
                for addr, size, digest in msg["items"]:
                    if not mapped(addr, size):
                        out.append(False)
                        continue
                    data = ctypes.string_at(addr, size)
                    out.append(hashlib.sha256(data).hexdigest() == digest)
                send_msg(sock, {"ok": out})
            elif cmd == "exit":
                break
    except EOFError:
        pass
    except Exception as e:  # noqa: BLE001
        log(f"holder error: {e!r}")
        try:
            send_msg(sock, {"ready": False, "error": repr(e)})
        except Exception:
            pass
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


# ---------------------------------------------------------------- client
class Client:
    def __init__(self, args, sock):
        self.args = args
        self.sock = sock
        self.max_size = max(args.sizes)
        # global_segment_size=0: the client contributes no memory, so objects can only be placed
        # in the holder's segment (--client-segment-size > 0 is for testing the placement check)
        self.store = make_store(args, "127.0.0.1", args.master, args.client_segment_size, args.local_buffer_size)
        self.run_id = f"{os.getpid()}-{int(time.time())}"
        self.base = os.urandom(self.max_size + NPATTERNS * 64)
        self.failures = []

    def values(self, size):
        return [self.base[j * 64: j * 64 + size] for j in range(NPATTERNS)]

    def holder(self, msg):
        send_msg(self.sock, msg)
        return recv_msg(self.sock)

    def remove_all(self):
        self.store.remove_all(True)

    def check_placement(self, keys, vals):
        """The replica of each sampled key must be one memory replica whose bytes the holder has."""
        items = []
        endpoints = set()
        for i, key in keys:
            descs = self.store.get_replica_desc(key)
            mem = [d for d in descs if d.is_memory_replica()]
            if len(mem) != 1 or len(descs) != 1:
                return {"placement": f"unexpected replicas: {len(descs)} ({len(mem)} in memory)"}
            bd = mem[0].get_memory_descriptor().buffer_descriptor
            endpoints.add(bd.transport_endpoint)
            v = vals[i % NPATTERNS]
            if bd.size != len(v):
                return {"placement": f"replica size {bd.size} != {len(v)}"}
            items.append((bd.buffer_address, bd.size, hashlib.sha256(v).hexdigest()))
        res = self.holder({"cmd": "check", "items": items})["ok"]
        ok = all(res) and len(res) == len(items)
        return {
            "placement": "holder" if ok else f"holder memory mismatch for {res.count(False)} of {len(res)} keys",
            "replica_endpoints": sorted(endpoints),
            "placement_checked_keys": len(items),
        }

    def prefault(self):
        """Put and remove enough data to make the holder touch the segment pages used later."""
        size = self.max_size
        n = int((self.args.ops + self.args.warmup) * 1.1) + 2
        v = self.base[:size]
        rss0 = self.holder({"cmd": "rss"})["rss"]
        for i in range(n):
            rc = self.store.put(f"{self.run_id}-prefault-{i}", v)
            if rc != 0:
                raise RuntimeError(f"prefault put returned {rc}")
        self.remove_all()
        rss1 = self.holder({"cmd": "rss"})["rss"]
        log(f"prefault: {n} x {size} B put and removed; holder RSS +{(rss1 - rss0) / 2**20:.0f} MiB")

    def run_api(self, api):
        rows = []
        args = self.args
        put_slots = None
        if api == "buffer":
            # one registered region: NPATTERNS put sources, then one get destination
            region = mmap.mmap(-1, (NPATTERNS + 1) * self.max_size)
            cbuf = (ctypes.c_char * len(region)).from_buffer(region)
            base_addr = ctypes.addressof(cbuf)
            rc = self.store.register_buffer(base_addr, len(region))
            if rc != 0:
                raise RuntimeError(f"register_buffer returned {rc}")
            get_off = NPATTERNS * self.max_size
            get_addr = base_addr + get_off
        for size in args.sizes:
            vals = self.values(size)
            if api == "buffer":
                for j, v in enumerate(vals):
                    region[j * self.max_size: j * self.max_size + size] = v
                put_slots = [base_addr + j * self.max_size for j in range(NPATTERNS)]
            store = self.store

            def do_put(key, i):
                if api == "bytes":
                    t0 = time.perf_counter_ns()
                    rc = store.put(key, vals[i % NPATTERNS])
                    t1 = time.perf_counter_ns()
                else:
                    t0 = time.perf_counter_ns()
                    rc = store.put_from(key, put_slots[i % NPATTERNS], size)
                    t1 = time.perf_counter_ns()
                if rc != 0:
                    raise RuntimeError(f"{api} put of {size} B returned {rc}")
                return t1 - t0

            def do_get(key, i):
                if api == "bytes":
                    t0 = time.perf_counter_ns()
                    got = store.get(key)
                    t1 = time.perf_counter_ns()
                    ok = got == vals[i % NPATTERNS]
                else:
                    t0 = time.perf_counter_ns()
                    n = store.get_into(key, get_addr, size)
                    t1 = time.perf_counter_ns()
                    ok = n == size and region[get_off: get_off + size] == vals[i % NPATTERNS]
                    region[get_off: get_off + 64] = b"\0" * 64  # a stale buffer must not pass
                return t1 - t0, ok

            # warmup: connections, staging buffers, allocator paths
            for i in range(args.warmup):
                key = f"{self.run_id}-{api}-{size}-w{i}"
                do_put(key, i)
                _, ok = do_get(key, i)
                if not ok:
                    raise RuntimeError(f"{api} warmup get of {size} B returned wrong data")

            keys = [f"{self.run_id}-{api}-{size}-t{i}" for i in range(args.ops)]
            # timed puts
            rss0 = self.holder({"cmd": "rss"})["rss"]
            lo0 = lo_bytes()
            put_ns = [do_put(k, i) for i, k in enumerate(keys)]
            lo1 = lo_bytes()
            rss1 = self.holder({"cmd": "rss"})["rss"]
            sample = sorted({0, len(keys) // 2, len(keys) - 1} | set(range(0, len(keys), max(1, len(keys) // 8))))
            placement = self.check_placement([(i, keys[i]) for i in sample], vals)
            # timed gets
            bad = 0
            get_ns = []
            lo2 = lo_bytes()
            for i, k in enumerate(keys):
                dt, ok = do_get(k, i)
                get_ns.append(dt)
                bad += 0 if ok else 1
            lo3 = lo_bytes()
            self.remove_all()

            payload = size * args.ops
            for op, ns, lo_delta in (("put", put_ns, (lo1 - lo0) if lo0 is not None else None),
                                     ("get", get_ns, (lo3 - lo2) if lo2 is not None else None)):
                us = sorted(x / 1e3 for x in ns)
                row = {
                    "peer": PEER,
                    "api": api,
                    "op": op,
                    "size": size,
                    "ops": len(ns),
                    "p50_us": round(pct(us, 50), 2),
                    "p99_us": round(pct(us, 99), 2),
                    "mean_us": round(sum(us) / len(us), 2),
                    "gbps": round(payload / (sum(ns) / 1e9) / 1e9, 4),
                    "transport": "tcp",
                    # put: the bytes are in the holder's memory; get: that, and every get returned
                    # exactly the bytes put under its key
                    "verified": placement["placement"] == "holder" and (bad == 0 or op == "put"),
                    "placement": placement["placement"],
                    "lo_bytes_per_payload": round(lo_delta / payload, 3) if lo_delta is not None else None,
                }
                if op == "put":
                    row["holder_rss_growth_mib"] = round((rss1 - rss0) / 2**20, 1)
                    row["replica_endpoints"] = placement.get("replica_endpoints")
                else:
                    row["wrong_data"] = bad
                rows.append(row)
                if not row["verified"]:
                    self.failures.append(f"{api} {op} {size}: placement={placement['placement']} wrong_data={bad}")
                log(f"{api:6s} {op} {size:>8d} B: p50 {row['p50_us']:9.1f} us  p99 {row['p99_us']:9.1f} us  "
                    f"{row['gbps']:7.3f} GB/s  lo/payload {row['lo_bytes_per_payload']}  "
                    f"placement {placement['placement']}")
        if api == "buffer":
            self.store.unregister_buffer(base_addr)
        return rows


def run_client(args):
    set_pdeathsig()
    sock = socket.socket(fileno=args.ctrl_fd)
    rc = 0
    try:
        hello = recv_msg(sock)
        if not hello.get("ready"):
            raise RuntimeError(f"holder failed: {hello.get('error')}")
        c = Client(args, sock)
        if args.prefault:
            c.prefault()
        rows = []
        for api in args.apis:
            rows += c.run_api(api)
        try:
            send_msg(sock, {"cmd": "exit"})
        except OSError:
            pass
        print(json.dumps(rows), flush=True)
        if c.failures:
            log("verification failed: " + "; ".join(c.failures))
            rc = 2
    except Exception as e:  # noqa: BLE001
        log(f"client error: {e!r}")
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


# ---------------------------------------------------------------- orchestrator
def wait_port(port, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def run_main(args):
    master_bin = find_master(args.master_bin)
    if not master_bin:
        log("mooncake_master not found (install mooncake-transfer-engine-non-cuda, see bench/README.md)")
        os._exit(1)
    procs = []

    def stop_all():
        for p in reversed(procs):
            if p.poll() is None:
                try:
                    p.terminate()
                except OSError:
                    pass
        deadline = time.monotonic() + 5
        for p in reversed(procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def on_signal(signum, frame):
        if signum == signal.SIGALRM:
            log(f"timed out after {args.timeout}s")
        stop_all()
        os._exit(3 if signum == signal.SIGALRM else 128 + signum)

    for s in (signal.SIGALRM, signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    signal.alarm(args.timeout)

    rc = 1
    try:
        rpc_port = args.master_port or free_port()
        metrics_port = free_port()
        master_cmd = [
            master_bin,
            f"--rpc_port={rpc_port}",
            "--rpc_address=127.0.0.1",
            f"--metrics_port={metrics_port}",
            "--metrics_host=127.0.0.1",
            "--enable_metric_reporting=false",
            "--enable_http_metadata_server=false",
            "--enable_ha=false",
        ] + args.master_arg
        log("master: " + " ".join(master_cmd))
        master = subprocess.Popen(master_cmd, stdout=sys.stderr, preexec_fn=set_pdeathsig)
        procs.append(master)
        if not wait_port(rpc_port, master, 30):
            raise RuntimeError(f"mooncake_master did not listen on {rpc_port} (exit {master.poll()})")
        master_addr = f"127.0.0.1:{rpc_port}"

        h_sock, c_sock = socket.socketpair()
        me = [sys.executable, os.path.abspath(__file__)]
        common = ["--master", master_addr, "--sizes", ",".join(map(str, args.sizes)), "--ops", str(args.ops),
                  "--warmup", str(args.warmup), "--segment-size", str(args.segment_size),
                  "--local-buffer-size", str(args.local_buffer_size), "--api", args.api,
                  "--client-segment-size", str(args.client_segment_size)]
        if not args.prefault:
            common.append("--no-prefault")
        holder = subprocess.Popen(me + ["--role", "holder", "--ctrl-fd", str(h_sock.fileno())] + common,
                                  pass_fds=[h_sock.fileno()], stdout=sys.stderr)
        procs.append(holder)
        client = subprocess.Popen(me + ["--role", "client", "--ctrl-fd", str(c_sock.fileno())] + common,
                                  pass_fds=[c_sock.fileno()], stdout=subprocess.PIPE)
        procs.append(client)
        h_sock.close()
        c_sock.close()
        out, _ = client.communicate()
        rc = client.returncode
        text = out.decode(errors="replace").strip()
        last = [ln for ln in text.splitlines() if ln.startswith("[")]
        if last:
            rows = json.loads(last[-1])
            try:
                from importlib.metadata import version

                pkg = "mooncake-transfer-engine-non-cuda"
                ver = f"{pkg} {version(pkg)}"
            except Exception:
                ver = "unknown"
            for r in rows:
                r["mooncake"] = ver
            print(json.dumps(rows), flush=True)
        elif rc == 0:
            rc = 1
            log("client printed no result")
        if holder.poll() is not None and holder.returncode not in (0, None):
            log(f"holder exited with {holder.returncode}")
    except Exception as e:  # noqa: BLE001
        log(f"error: {e!r}")
        rc = 1
    signal.alarm(0)
    stop_all()
    sys.stdout.flush()
    os._exit(rc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated value sizes in bytes (default {DEFAULT_SIZES})")
    ap.add_argument("--ops", type=int, default=300, help="timed puts and gets per size (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed put+get pairs per size (default 20)")
    ap.add_argument("--api", default="both", choices=["bytes", "buffer", "both"],
                    help="bytes: put/get; buffer: register_buffer + put_from/get_into; both (default)")
    ap.add_argument("--segment-size", type=parse_size, default=2 << 30, help="holder's global segment (default 2GiB)")
    ap.add_argument("--local-buffer-size", type=parse_size, default=64 << 20,
                    help="client's local buffer (default 64MiB; must hold the largest value)")
    ap.add_argument("--client-segment-size", type=parse_size, default=0,
                    help="segment the timing client contributes (default 0, so all data is placed in the holder; "
                         "a non-zero value only serves to test the placement check)")
    ap.add_argument("--no-prefault", dest="prefault", action="store_false",
                    help="skip the untimed put+remove pass that makes the holder touch its segment pages")
    ap.add_argument("--master-bin", default="", help="path of mooncake_master (default: from the mooncake package)")
    ap.add_argument("--master-port", type=int, default=0, help="master RPC port (default: a free port)")
    ap.add_argument("--master-arg", action="append", default=[], help="extra mooncake_master flag (repeatable)")
    ap.add_argument("--timeout", type=int, default=300, help="hard limit in seconds for the whole run (default 300)")
    ap.add_argument("--json", action="store_true", help="accepted for symmetry; the output is always JSON")
    ap.add_argument("--role", choices=["main", "holder", "client"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--ctrl-fd", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--master", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.apis = ["bytes", "buffer"] if args.api == "both" else [args.api]
    # The timed data of one (API, size) step, and the prefault pass, must stay well below the
    # master's eviction watermark (--eviction_high_watermark_ratio, 0.9 of the segment):
    # evicted objects would make gets fail. Grow the holder's segment when needed.
    need = int((args.ops + args.warmup) * max(args.sizes) * 1.1 / 0.75) + (64 << 20)
    if args.role == "main" and args.segment_size < need:
        need = -(-need // (256 << 20)) * (256 << 20)
        log(f"segment size {args.segment_size} B is too small for {args.ops} x {max(args.sizes)} B; using {need} B")
        args.segment_size = need
    if args.role == "holder":
        run_holder(args)
    elif args.role == "client":
        run_client(args)
    else:
        run_main(args)


if __name__ == "__main__":
    main()
