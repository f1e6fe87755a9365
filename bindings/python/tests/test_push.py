"""P/D push through the Python bindings, against the real library."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvmesh
from layouts import expected, initial_regions, make_layout

HERE = Path(__file__).resolve().parent


def wait_received(ctx, timeout=10.0):
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        got = ctx.poll_received()
        if got:
            return got
        time.sleep(0.001)
    return []


@pytest.mark.parametrize(
    "src_family,dst_family",
    [("flash", "flash"), ("flash-hnd", "flash"), ("blocks-first", "trtllm"),
     ("packed", "packed"), ("mla", "mla"), ("trtllm", "flash-hnd")],
)
def test_push_between_contexts_lands_in_the_named_blocks_only(src_family, dst_family):
    with kvmesh.Context() as a, kvmesh.Context() as b:
        sl, dl = make_layout(src_family, 3, 10), make_layout(dst_family, 3, 14)
        smem, dmem = initial_regions(sl, 1), initial_regions(dl, 2)
        before = [bytes(m) for m in dmem]
        src = a.register_kv_cache(sl, smem)
        dst = b.register_kv_cache(dl, dmem)
        remote = a.import_remote(dst.export())
        rng = random.Random(5)
        sb = rng.sample(range(10), 6)
        db = rng.sample(range(14), 6)
        op = src.push(remote, sb, db, "req-py", timeout=10.0)
        res = op.wait(10.0)
        assert res is not None and res.ok, res
        assert res.failed == [] and res.error is None
        assert a.poll() == [op]
        assert a.poll() == []
        got = wait_received(b)
        assert [(g.transfer_id, g.blocks, g.from_engine) for g in got] == [(b"req-py", 6, a.engine_id)]
        want = expected(sl, smem, dl, before, sb, db)
        assert [bytes(m) for m in dmem] == [bytes(m) for m in want]
        assert [bytes(m) for m in dmem] != before
        s = a.stats()
        assert (s["pushes_submitted"], s["pushes_succeeded"], s["blocks_pushed"]) == (1, 1, 6)
        assert b.stats()["pushes_received"] == 1
        op.release()
        with pytest.raises(kvmesh.InvalidHandle):
            kvmesh.core._check(kvmesh.core.api().op_release(op.handle or 0))


def test_out_of_range_and_bad_layouts_are_refused_with_exact_messages():
    with kvmesh.Context() as a, kvmesh.Context() as b:
        layout = make_layout("flash", 2, 8)
        smem, dmem = initial_regions(layout, 3), initial_regions(layout, 4)
        before = [bytes(m) for m in dmem]
        src = a.register_kv_cache(layout, smem)
        dst = b.register_kv_cache(layout, dmem)
        remote = a.import_remote(dst.export())
        with pytest.raises(kvmesh.OutOfRange, match=r"destination block 8 \(entry 1\) is outside the cache's 8 blocks"):
            src.push(remote, [0, 1], [2, 8], "t")
        with pytest.raises(kvmesh.InvalidArgument, match="destination block 2 appears twice"):
            src.push(remote, [0, 1], [2, 2], "t")
        assert wait_received(b, 0.2) == []
        assert [bytes(m) for m in dmem] == before
        with pytest.raises(kvmesh.LayoutError, match="block stride 10 B is smaller than"):
            kvmesh.Layout(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=2, head_size=8,
                          dtype="f16", block_stride=10, kv_stride=4096, token_stride=32, head_stride=16)
        with pytest.raises(kvmesh.LayoutError, match="2 base region"):
            a.register_kv_cache(layout, smem[:1])
        with pytest.raises(kvmesh.LayoutError, match="region 1 holds 16 B"):
            a.register_kv_cache(layout, [smem[0], bytearray(16)])
        with pytest.raises(kvmesh.Unsupported, match="GPU"):
            a.register_kv_cache(layout, [1 << 20, 1 << 20], lens=[1 << 20, 1 << 20], memory="gpu")
        with pytest.raises(kvmesh.InvalidArgument, match="bad magic"):
            a.import_remote(b"garbage")
        with pytest.raises(kvmesh.InvalidHandle, match="already destroyed"):
            src.deregister()
            kvmesh.core._check(kvmesh.core.api().kv_cache_deregister(
                dst.handle ^ (1 << 32), 0))


class Worker:
    def __init__(self, family, layers, blocks, seed):
        self.args = (family, layers, blocks, seed)
        self.p = subprocess.Popen(
            [sys.executable, str(HERE / "decode_worker.py"), family, str(layers), str(blocks), str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline().split()
        assert line and line[0] == "DESC", line
        self.desc = bytes.fromhex(line[1])

    def cmd(self, c):
        self.p.stdin.write(c + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().split()

    def quit(self):
        self.p.stdin.write("quit\n")
        self.p.stdin.flush()
        assert self.p.wait(10) == 0


def test_push_to_another_process():
    w = Worker("flash", 2, 16, 9)
    try:
        with kvmesh.Context() as a:
            sl = make_layout("blocks-first", 2, 12)
            smem = initial_regions(sl, 10)
            src = a.register_kv_cache(sl, smem)
            remote = a.import_remote(w.desc)
            before = w.cmd("hash")
            sb, db = [3, 4, 5, 11], [7, 8, 9, 0]
            res = src.push(remote, sb, db, b"\x00bin-id", timeout=10).wait(10)
            assert res.ok, res
            assert w.cmd("wait 10") == ["RECEIVED", b"\x00bin-id".hex(), "4"]
            dl = make_layout("flash", 2, 16)
            want = expected(sl, smem, dl, initial_regions(dl, 9), sb, db)
            assert w.cmd("hash") == ["HASH", *[hashlib.sha256(m).hexdigest() for m in want]]
            assert before != w.cmd("hash")
        w.quit()
    finally:
        w.p.kill()


def test_receiver_killed_mid_push_reports_peer_lost_and_failed_blocks():
    # 8 layers x 32768 blocks x 256 B = 64 MiB: far more than the socket
    # buffers hold while the receiver is stopped.
    layers, blocks = 8, 32768
    w = Worker("flash", layers, blocks, 1)
    try:
        with kvmesh.Context() as a:
            sl = make_layout("flash", layers, blocks)
            src = a.register_kv_cache(sl, initial_regions(sl, 2))
            remote = a.import_remote(w.desc)
            os.kill(w.p.pid, signal.SIGSTOP)
            every = list(range(blocks))
            op = src.push(remote, every, every, "req-killed", timeout=60)
            time.sleep(0.3)
            assert op.status() is None, "push finished into a stopped receiver"
            w.p.kill()
            w.p.wait(10)
            res = op.wait(30)
            assert res is not None, "a push to a dead receiver ends long before its deadline"
            assert not res.ok
            assert isinstance(res.error, kvmesh.PeerLost), res.error
            assert 'push of transfer "req-killed"' in str(res.error)
            assert "connection to peer lost" in str(res.error)
            assert res.failed and all(isinstance(f.error, kvmesh.PeerLost) for f in res.failed)
            assert {f.src_block for f in res.failed} <= set(every)
            with pytest.raises(kvmesh.PeerLost):
                res.raise_for_status()
            assert a.stats()["pushes_failed"] == 1
    finally:
        w.p.kill()
