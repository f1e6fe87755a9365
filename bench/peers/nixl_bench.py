#!/usr/bin/env python3
"""NIXL (UCX backend) DRAM-to-DRAM transfer benchmark between two processes on one host.

The initiator (this process) spawns a target process, both register a DRAM buffer with
NIXL's UCX backend, the target sends its agent metadata and buffer address over a
socketpair, and the initiator then posts READ or WRITE transfers of BATCH descriptors of
BLOCK bytes each, one batch in flight at a time (post, then poll until DONE), for DURATION
seconds after a warmup.

Modes:
  bw   throughput: --batch descriptors (default 32) per transfer request
  lat  single-descriptor latency: batch forced to 1 (default block 64 KiB)

Prints one JSON line, e.g.
  {"peer": "nixl-ucx", "mode": "bw", "op": "read", "block": 1048576, "batch": 32,
   "gbps": ..., "ops_per_s": ..., "batch_p50_us": ..., "batch_p99_us": ..., ...}
gbps is 1e9 bytes/s of payload (batch * block * completed batches / timed wall time).
ops_per_s counts descriptors (blocks) per second. batch_p50_us / batch_p99_us are the
post-to-DONE times of one whole transfer request; in lat mode they are also reported as
p50_us / p99_us.

Run with the virtual environment that holds nixl (see bench/README.md), e.g.
  .venv-bench/bin/python bench/peers/nixl_bench.py --op read --block 1MiB --duration 3

NIXL/UCX can crash at interpreter exit, so both processes end with os._exit().
"""

import argparse
import json
import mmap
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

PAGE = 4096
PATTERN_TARGET = 251  # target buffer byte i = i % 251
PATTERN_INIT = 241  # initiator buffer byte i = (i % 241) + 7


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B?|[kmg])?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"bad size: {text!r}")
    n = int(m.group(1))
    unit = (m.group(2) or "").upper()
    if unit.startswith("K"):
        n *= 1 << 10
    elif unit.startswith("M"):
        n *= 1 << 20
    elif unit.startswith("G"):
        n *= 1 << 30
    return n


# ---------------------------------------------------------------- framing over the socketpair
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


# ---------------------------------------------------------------- buffers
def make_buffer(size, modulus, offset):
    """Page-aligned anonymous buffer, every page touched, filled with a known pattern."""
    import numpy as np

    mm = mmap.mmap(-1, size)
    buf = np.frombuffer(mm, dtype=np.uint8)
    tile = ((np.arange(modulus * 256, dtype=np.uint32) % modulus) + offset).astype(np.uint8)
    reps = -(-size // tile.size)
    buf[:] = np.tile(tile, reps)[:size]
    return mm, buf


def expected(start, length, modulus, offset):
    import numpy as np

    return (((np.arange(start, start + length, dtype=np.uint64) % modulus) + offset) & 0xFF).astype(
        np.uint8
    )


def regions_match(buf, offsets, block, modulus, offset):
    for off in offsets:
        if not (buf[off : off + block] == expected(off, block, modulus, offset)).all():
            return False
    return True


def block_offsets(batch, block, layout):
    # "strided" leaves one page between blocks so NIXL cannot merge the descriptors
    # into one large transfer; "contiguous" packs them back to back.
    stride = block + (PAGE if layout == "strided" else 0)
    return [i * stride for i in range(batch)], batch * stride


def flush_c_streams():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").fflush(None)
    except Exception:
        pass


def set_pdeathsig():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def make_agent(name, prog_thread):
    import logging

    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    from nixl._api import nixl_agent, nixl_agent_config

    # NIXL's Python logger writes to stdout; keep stdout for the one JSON line.
    for h in logging.getLogger("nixl").handlers:
        if isinstance(h, logging.StreamHandler):
            h.setStream(sys.stderr)

    return nixl_agent(name, nixl_agent_config(enable_prog_thread=prog_thread, backends=["UCX"]))


# ---------------------------------------------------------------- target
def run_target(args):
    set_pdeathsig()
    sock = socket.socket(fileno=args.ctrl_fd)
    offsets, size = block_offsets(args.batch, args.block, args.layout)
    mm, buf = make_buffer(size, PATTERN_TARGET, 0)
    agent = make_agent("target", False)
    agent.register_memory([(buf.ctypes.data, size, 0, "")], "DRAM")
    send_msg(sock, {"md": agent.get_agent_metadata(), "addr": buf.ctypes.data, "size": size})
    # Passive side: CMA reads/writes need no work here, but keep the UCX worker
    # progressing (wireup) at a low duty cycle so this process does not steal a core.
    sock.setblocking(False)
    rc = 0
    while True:
        agent.get_new_notifs()
        try:
            msg = recv_msg_nb(sock)
        except EOFError:
            break
        if msg is None:
            time.sleep(0.001)
            continue
        if msg == "verify-write":
            ok = regions_match(buf, offsets, args.block, PATTERN_INIT, 7)
            sock.setblocking(True)
            send_msg(sock, ok)
            sock.setblocking(False)
        elif msg == "exit":
            break
    sys.stdout.flush()
    os._exit(rc)


def recv_msg_nb(sock):
    try:
        head = sock.recv(8, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    if not head:
        raise EOFError
    if len(head) < 8:
        return None
    sock.setblocking(True)
    try:
        return recv_msg(sock)
    finally:
        sock.setblocking(False)


# ---------------------------------------------------------------- UCX protocol report
def ucx_protocols(log_path, op):
    """Return the UCX 'Config' column(s) chosen for intra-node RMA of this op, from UCX_PROTO_INFO."""
    want = "remote memory read" if op == "read" else "remote memory write"
    try:
        lines = open(log_path, errors="replace").read().splitlines()
    except OSError:
        return None
    found = []
    i = 0
    while i < len(lines):
        if "initiator intra-node" in lines[i] and i + 1 < len(lines) and want in lines[i + 1]:
            j = i + 2
            while j < len(lines) and j < i + 40:
                cells = [c.strip() for c in lines[j].split("|")]
                # row shape: prefix | range | description | config |
                if len(cells) >= 5 and re.match(r"^\d", cells[1]):
                    found.append(f"{cells[1]}:{cells[2]}:{cells[3]}")
                elif j > i + 6 and "+--" in lines[j]:
                    break
                j += 1
            i = j
        i += 1
    return sorted(set(found)) or None


# ---------------------------------------------------------------- initiator
def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


def run_initiator(args):
    parent, child = socket.socketpair()
    env = dict(os.environ)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--role", "target",
        "--ctrl-fd", str(child.fileno()),
        "--block", str(args.block),
        "--batch", str(args.batch),
        "--layout", args.layout,
    ]
    target = subprocess.Popen(cmd, pass_fds=[child.fileno()], env=env)
    child.close()

    def drop_log():
        if args.ucx_log and not os.environ.get("NIXL_BENCH_KEEP_LOG"):
            shutil.rmtree(os.path.dirname(args.ucx_log), ignore_errors=True)

    def on_alarm(signum, frame):
        sys.stderr.write(f"nixl_bench: timed out after {args.timeout}s\n")
        target.kill()
        drop_log()
        os._exit(3)

    def on_term(signum, frame):
        target.kill()
        drop_log()
        os._exit(128 + signum)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.alarm(args.timeout)

    try:
        offsets, size = block_offsets(args.batch, args.block, args.layout)
        mm, buf = make_buffer(size, PATTERN_INIT, 7)
        agent = make_agent("initiator", args.prog_thread)
        agent.register_memory([(buf.ctypes.data, size, 0, "")], "DRAM")
        info = recv_msg(parent)
        remote = agent.add_remote_agent(info["md"])
        laddr, raddr = buf.ctypes.data, info["addr"]
        local = agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", [(laddr + o, args.block, 0) for o in offsets], "DRAM"
        )
        rlist = agent.prep_xfer_dlist(remote, [(raddr + o, args.block, 0) for o in offsets], "DRAM")
        idx = list(range(args.batch))
        handle = agent.make_prepped_xfer(args.op.upper(), local, idx, rlist, idx)

        transfer = agent.transfer
        check = agent.check_xfer_state

        def one():
            st = transfer(handle)
            while st == "PROC":
                st = check(handle)
            if st != "DONE":
                raise RuntimeError(f"transfer state {st}")

        # warmup (connection setup, page faults, protocol selection)
        t_end = time.perf_counter() + args.warmup
        one()
        while time.perf_counter() < t_end:
            one()

        lat_ns = []
        clock = time.perf_counter_ns
        t_start = clock()
        deadline = t_start + int(args.duration * 1e9)
        now = t_start
        while now < deadline:
            t0 = now
            st = transfer(handle)
            while st == "PROC":
                st = check(handle)
            if st != "DONE":
                raise RuntimeError(f"transfer state {st}")
            now = clock()
            lat_ns.append(now - t0)
        elapsed = (now - t_start) / 1e9

        # correctness check of the data that moved
        if args.op == "read":
            verified = regions_match(buf, offsets, args.block, PATTERN_TARGET, 0)
        else:
            send_msg(parent, "verify-write")
            verified = bool(recv_msg(parent))
        backend = agent.query_xfer_backend(handle)
        send_msg(parent, "exit")
        try:
            target.wait(timeout=10)
        except subprocess.TimeoutExpired:
            target.kill()

        iters = len(lat_ns)
        lat_us = sorted(x / 1e3 for x in lat_ns)
        total_bytes = iters * args.batch * args.block
        res = {
            "peer": "nixl-ucx",
            "mode": args.mode,
            "op": args.op,
            "block": args.block,
            "batch": args.batch,
            "layout": args.layout,
            "duration_s": round(elapsed, 4),
            "iters": iters,
            "gbps": round(total_bytes / elapsed / 1e9, 4),
            "ops_per_s": round(iters * args.batch / elapsed, 1),
            "batch_p50_us": round(pct(lat_us, 50), 2),
            "batch_p99_us": round(pct(lat_us, 99), 2),
            "verified": verified,
            "backend": backend,
            "prog_thread": args.prog_thread,
            "ucx_tls": os.environ.get("UCX_TLS", "(unset: all)"),
        }
        if args.mode == "lat":
            res["p50_us"] = res["batch_p50_us"]
            res["p99_us"] = res["batch_p99_us"]
        if args.ucx_log:
            flush_c_streams()  # UCX's log FILE* is buffered; os._exit would drop it
            res["ucx_proto"] = ucx_protocols(args.ucx_log.replace("%p", str(os.getpid())), args.op)
        print(json.dumps(res), flush=True)
        rc = 0 if verified else 2
    except Exception as e:  # noqa: BLE001
        sys.stderr.write(f"nixl_bench: error: {e!r}\n")
        target.kill()
        rc = 1
    drop_log()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["bw", "lat"], default="bw")
    ap.add_argument("--op", choices=["read", "write"], default="read")
    ap.add_argument("--block", type=parse_size, default=None, help="bytes per descriptor (64KiB, 1MiB, ...)")
    ap.add_argument("--batch", type=int, default=32, help="descriptors per transfer request (bw mode)")
    ap.add_argument("--duration", type=float, default=3.0, help="timed seconds")
    ap.add_argument("--warmup", type=float, default=0.5, help="warmup seconds")
    ap.add_argument("--layout", choices=["strided", "contiguous"], default="strided",
                    help="strided (default): a page gap between blocks, so descriptors are not merged")
    ap.add_argument("--prog-thread", action="store_true",
                    help="enable NIXL's progress thread in the initiator (default: off, the loop polls)")
    ap.add_argument("--no-proto-info", action="store_true",
                    help="do not ask UCX which protocol/transport it chose (UCX_PROTO_INFO)")
    ap.add_argument("--timeout", type=int, default=0, help="hard limit in seconds (default duration+60)")
    ap.add_argument("--role", choices=["initiator", "target"], default="initiator", help=argparse.SUPPRESS)
    ap.add_argument("--ctrl-fd", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.block is None:
        args.block = 65536
    if args.mode == "lat":
        args.batch = 1
    if args.timeout <= 0:
        args.timeout = int(args.duration + args.warmup + 60)
    args.ucx_log = None

    if args.role == "target":
        run_target(args)
        return

    if not args.no_proto_info and "UCX_PROTO_INFO" not in os.environ:
        # UCX prints its protocol selection tables to its log; send that to a file so
        # stdout stays one JSON line, and read back which transport served the RMA.
        logdir = tempfile.mkdtemp(prefix="nixl-bench-")
        args.ucx_log = os.path.join(logdir, "ucx.%p.log")
        os.environ["UCX_PROTO_INFO"] = "y"
        os.environ["UCX_LOG_FILE"] = args.ucx_log
    run_initiator(args)


if __name__ == "__main__":
    main()
