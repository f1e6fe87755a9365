"""kvmesh.trtllm against the real library, driven the way TensorRT-LLM's
KvCacheConnectorManager drives a connector (TensorRT-LLM itself installs only
with CUDA wheels): get_num_new_matched_tokens and update_state_after_alloc at
scheduling, build_connector_meta, then on the worker start_load_kv,
wait_for_layer_load / save_kv_layer around each layer, wait_for_save and
get_finished; request_finished at the end. The pool is TensorRT-LLM's
``[blocks, layers, 2, heads * tokens * head_dim]`` in host memory; a fake
forward writes a K/V vector per token, layer, plane and head that is a
function of the token's whole prefix, so every loaded byte is checked."""

import ctypes
import hashlib
import time
from types import SimpleNamespace

import pytest

import kvmesh
from kvmesh import trtllm
from kvmesh.trtllm import RequestData, SchedulerOutput

LAYERS, HEADS, HEAD, BS, BLOCKS = 3, 2, 16, 8, 32
VEC = HEAD * 2  # bf16


class HostPool:
    """Just enough of a torch tensor for register_kv_caches."""

    shape = (BLOCKS, LAYERS, 2, HEADS * BS * HEAD)
    dtype = "torch.bfloat16"
    device = SimpleNamespace(type="cpu")

    def __init__(self):
        self.mem = (ctypes.c_uint8 * (BLOCKS * LAYERS * 2 * HEADS * BS * VEC))()

    def element_size(self):
        return 2

    def stride(self):
        s, out = 1, []
        for n in reversed(self.shape):
            out.append(s)
            s *= n
        return tuple(reversed(out))

    def is_contiguous(self):
        return True

    def data_ptr(self):
        return ctypes.addressof(self.mem)

    def vector(self, block, layer, kv, head, token):
        off = ((((block * LAYERS + layer) * 2 + kv) * HEADS + head) * BS + token) * VEC
        return bytes(self.mem[off:off + VEC])

    def write(self, block, layer, kv, head, token, data):
        off = ((((block * LAYERS + layer) * 2 + kv) * HEADS + head) * BS + token) * VEC
        self.mem[off:off + VEC] = data


def expected(prefix, layer, kv, head):
    return hashlib.blake2b(repr((tuple(prefix), layer, kv, head)).encode(),
                           digest_size=VEC).digest()


class Request:
    """The parts of TensorRT-LLM's LlmRequest a connector reads."""

    def __init__(self, request_id, tokens):
        self.request_id = request_id
        self.tokens = list(tokens)

    def get_tokens(self, beam):
        assert beam == 0
        return self.tokens


class Instance:
    """A TensorRT-LLM executor with the kvmesh connector, minus the model."""

    def __init__(self, bootstrap):
        args = SimpleNamespace(model="trt-test-model",
                               kv_cache_config=SimpleNamespace(tokens_per_block=BS),
                               kvmesh_config={"bootstrap": bootstrap, "num_layers": LAYERS,
                                              "num_kv_heads": HEADS, "head_size": HEAD,
                                              "timeout_s": 10})
        self.sched = trtllm.KvMeshConnectorScheduler(args)
        self.worker = trtllm.KvMeshConnectorWorker(args)
        assert isinstance(self.sched, trtllm.KvCacheConnectorScheduler)
        assert isinstance(self.worker, trtllm.KvCacheConnectorWorker)
        self.pool = HostPool()
        self.worker.register_kv_caches(self.pool)
        self.free = list(range(BLOCKS))
        self.computed = []

    def forward(self, meta, batch):
        """One pass: batch = [(request, block_ids, first computed position, n)]."""
        w = self.worker
        w.bind_connector_meta(meta)
        w.start_load_kv(None)
        for layer in range(LAYERS):
            w.wait_for_layer_load(layer, None)
            for req, blocks, start, n in batch:
                for p in range(start, start + n):
                    for kv in (0, 1):
                        for h in range(HEADS):
                            self.pool.write(blocks[p // BS], layer, kv, h, p % BS,
                                            expected(req.tokens[:p + 1], layer, kv, h))
                    if layer == 0:
                        self.computed.append((req.request_id, p))
            w.save_kv_layer(layer, None)
        w.wait_for_save(None)
        w._clear_connector_meta()

    def run_request(self, req, decode_steps=2):
        """Context pass, decode passes, finish; returns what was loaded."""
        matched, is_async = self.sched.get_num_new_matched_tokens(req, 0)
        assert not is_async
        nblocks = -(-(len(req.tokens) + decode_steps) // BS)
        blocks = [self.free.pop(0) for _ in range(nblocks)]
        self.sched.update_state_after_alloc(req, blocks)
        rd = RequestData(req.request_id, list(req.tokens), blocks, 0, len(req.tokens) - matched)
        meta = self.sched.build_connector_meta(SchedulerOutput(new_requests=[rd]))
        self.forward(meta, [(req, blocks, matched, len(req.tokens) - matched)])
        assert self.worker.get_finished([], []) == ([], [])
        for _ in range(decode_steps):
            req.tokens.append(5)
            p = len(req.tokens) - 1
            rd = RequestData(req.request_id, [5], [], p, 1)
            meta = self.sched.build_connector_meta(SchedulerOutput(cached_requests=[rd]))
            self.forward(meta, [(req, blocks, p, 1)])
        if self.sched.request_finished(req, blocks):
            ids, until = [req.request_id], time.monotonic() + 20
            while True:
                done, _ = self.worker.get_finished(ids, [])
                ids = []
                if req.request_id in done:
                    break
                assert time.monotonic() < until, "saves did not finish"
                time.sleep(0.002)
        return matched, blocks


@pytest.fixture(scope="module")
def swarm():
    node = kvmesh.StoreContext(mem_bytes=32 << 20)
    yield node
    trtllm.close_stores()
    node.close()


def test_trtllm_connector_saves_and_another_executor_loads_the_prefix(swarm):
    shared = [(i * 31) % 499 + 1 for i in range(3 * BS)]
    a = Instance(swarm.addrs)
    matched, _ = a.run_request(Request(1, shared + [9] * (BS + 2)))
    assert matched == 0
    st = a.worker._cache.ctx.store_stats()
    assert st["blocks_saved"] >= 4 and st["blocks_failed"] == 0

    b = Instance(swarm.addrs)
    req = Request(7, shared + [8] * 5)
    prompt = list(req.tokens)
    matched, blocks = b.run_request(req, decode_steps=1)
    assert matched == 3 * BS
    assert [p for r, p in b.computed if p < len(prompt)] == list(range(3 * BS, len(prompt)))
    for p in range(3 * BS):
        for layer in range(LAYERS):
            for kv in (0, 1):
                for h in range(HEADS):
                    assert b.pool.vector(blocks[p // BS], layer, kv, h, p % BS) == \
                        expected(prompt[:p + 1], layer, kv, h), (p, layer, kv, h)


def test_settings_name_what_is_missing():
    with pytest.raises(ValueError, match="num_kv_heads"):
        trtllm.settings(SimpleNamespace(kvmesh_config={"num_layers": 2, "head_size": 8}))
    s = trtllm.settings(SimpleNamespace(model="m", kvmesh_config={
        "num_layers": 2, "num_kv_heads": 1, "head_size": 8}))
    assert s["tokens_per_block"] == 32 and s["model_id"] == "m"
