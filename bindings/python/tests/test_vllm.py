"""kvmesh.vllm.KvMeshConnector against vLLM's own classes, on a CPU: a real
VllmConfig and vllm.v1 Scheduler (loading the connector through
``kv_connector_module_path``), requests with vLLM's block hashes, and the
worker side driven through vLLM's KVConnectorModelRunnerMixin with only the
model forward faked (it writes a deterministic K/V vector per token, layer
and plane, a function of the token's whole prefix, so every loaded or pushed
byte can be checked).

Needs vLLM (``pip install vllm==0.32.0``; runs without a GPU): skipped when
it is not installed, unless ``KVMESH_REQUIRE_VLLM=1`` (set by
``bindings/python/ci.sh`` with ``KVMESH_CI_VLLM=1``, which installs it).
"""

import hashlib
import json
import os
import tempfile
import time

import pytest

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("KVMESH_REQUIRE_VLLM") == "1":
    import torch  # noqa: F401  (an import error fails the run: vLLM was asked for)
    import vllm  # noqa: F401
torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

import kvmesh  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer import kv_transfer_state  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorRole,
)
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.kv_connector_model_runner_mixin import (  # noqa: E402
    KVConnectorModelRunnerMixin,
)

from kvmesh.vllm import KvMeshConnector  # noqa: E402

BS = 16  # tokens per block
LAYERS = 2
HEADS = 2
HEAD = 16
NUM_BLOCKS = 64
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
SAMPLED = 7  # the fake model always samples this token


@pytest.fixture(scope="module")
def model_dir():
    d = tempfile.mkdtemp(prefix="kvmesh-vllm-")
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "num_attention_heads": 4, "num_key_value_heads": HEADS, "head_dim": HEAD,
           "num_hidden_layers": LAYERS, "intermediate_size": 128, "vocab_size": 1000,
           "max_position_embeddings": 4096, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


@pytest.fixture(scope="module")
def model_config(model_dir):
    init_none_hash(sha256)
    return ModelConfig(model=model_dir, tokenizer=model_dir, skip_tokenizer_init=True,
                       dtype="bfloat16", max_model_len=1024, seed=0)


@pytest.fixture(scope="module")
def swarm():
    node = kvmesh.StoreContext(mem_bytes=64 << 20)
    yield node
    node.close()


def vllm_config(model_config, role, bootstrap, extra=None):
    kt = KVTransferConfig(kv_connector="KvMeshConnector", kv_connector_module_path="kvmesh.vllm",
                          kv_role=role, kv_load_failure_policy="recompute",
                          kv_connector_extra_config={"bootstrap": bootstrap, **(extra or {})})
    vc = VllmConfig(model_config=model_config,
                    scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024,
                                                     max_model_len=1024,
                                                     enable_chunked_prefill=True,
                                                     is_encoder_decoder=False),
                    cache_config=CacheConfig(block_size=BS, cache_dtype="auto",
                                             enable_prefix_caching=True),
                    kv_transfer_config=kt, device_config=DeviceConfig("cpu"))
    vc.cache_config.num_gpu_blocks = NUM_BLOCKS
    return vc


def kv_cache_config():
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=HEADS, head_size=HEAD,
                             dtype=torch.bfloat16)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(LAYER_NAMES, spec)])


def expected_kv(prefix, layer, kv):
    """The fake model's K (kv=0) or V vector of the last token of `prefix`."""
    h = hashlib.blake2b(repr((tuple(prefix), layer, kv)).encode(), digest_size=8).digest()
    g = torch.Generator().manual_seed(int.from_bytes(h, "little") >> 1)
    return torch.randn((HEADS, HEAD), generator=g).to(torch.bfloat16)


class Instance:
    """A vLLM instance: the real scheduler and a fake-forward worker."""

    def __init__(self, model_config, role, bootstrap, extra=None):
        self.vc = vllm_config(model_config, role, bootstrap, extra)
        kcc = kv_cache_config()
        self.sched = Scheduler(vllm_config=self.vc, kv_cache_config=kcc,
                               structured_output_manager=StructuredOutputManager(self.vc),
                               block_size=BS, log_stats=False)
        assert isinstance(self.sched.connector, KvMeshConnector)
        assert isinstance(self.sched.connector, KVConnectorBase_V1)
        self.worker = KvMeshConnector(self.vc, KVConnectorRole.WORKER, kcc)
        # vLLM's FlashAttention/CPU layout: (2, num_blocks, block_size, heads, head_size).
        self.kv = {n: torch.zeros((2, NUM_BLOCKS, BS, HEADS, HEAD), dtype=torch.bfloat16)
                   for n in LAYER_NAMES}
        self.worker.register_kv_caches(self.kv)
        # What the engine core does at start-up: worker handshakes to the scheduler.
        self.sched.connector.set_xfer_handshake_metadata_pp_aware(
            {(0, 0): self.worker.get_handshake_metadata()})
        self.hasher = get_request_block_hasher(BS, sha256)
        self.reqs = {}  # req_id -> [tokens, block_ids]
        self.computed = []  # (req_id, position) the fake model computed
        self.outputs = {}

    def add(self, req_id, prompt, max_tokens=2, params=None):
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                            extra_args={"kv_transfer_params": params} if params else None)
        r = Request(req_id, prompt, sp, None, block_hasher=self.hasher)
        self.sched.add_request(r)
        return r

    def forward(self, so):
        """Fake forward: per layer, wait for its load, write the K/V of the
        scheduled tokens, hand the layer to save_kv_layer."""
        for new in so.scheduled_new_reqs:
            self.reqs[new.req_id] = [list(new.prompt_token_ids), list(new.block_ids[0])]
        c = so.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            if c.new_block_ids[i] is not None:
                if rid in c.resumed_req_ids:
                    self.reqs[rid][1] = list(c.new_block_ids[i][0])
                else:
                    self.reqs[rid][1].extend(c.new_block_ids[i][0])
        starts = {n.req_id: n.num_computed_tokens for n in so.scheduled_new_reqs}
        starts.update(zip(c.req_ids, c.num_computed_tokens))
        conn = self.worker
        for li, name in enumerate(LAYER_NAMES):
            conn.wait_for_layer_load(name)
            for rid, n in so.num_scheduled_tokens.items():
                toks, blocks = self.reqs[rid]
                for p in range(starts[rid], starts[rid] + n):
                    b, o = blocks[p // BS], p % BS
                    for kv in (0, 1):
                        self.kv[name][kv, b, o] = expected_kv(toks[:p + 1], li, kv)
                    if li == 0:
                        self.computed.append((rid, p))
            conn.save_kv_layer(name, self.kv[name], None)
        sampled = []
        for rid, n in so.num_scheduled_tokens.items():
            toks = self.reqs[rid][0]
            done = starts[rid] + n >= len(toks)
            sampled.append([SAMPLED] if done else [])
            if done:
                toks.append(SAMPLED)
        return list(so.num_scheduled_tokens), sampled

    def step(self):
        so = self.sched.schedule()
        kv_transfer_state._KV_CONNECTOR_AGENT = self.worker
        try:
            with set_forward_context(None, self.vc):
                with KVConnectorModelRunnerMixin.maybe_get_kv_connector_output(so) as kv_out:
                    ids, sampled = self.forward(so) if so.total_num_scheduled_tokens else ([], [])
        finally:
            kv_transfer_state._KV_CONNECTOR_AGENT = None
        out = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=sampled, kv_connector_output=kv_out)
        for eco in self.sched.update_from_output(so, out).values():
            for o in eco.outputs:
                if o.finished:
                    self.outputs[o.request_id] = o
        return so

    def run(self, until, timeout=30.0):
        t0 = time.monotonic()
        while not until():
            assert time.monotonic() - t0 < timeout, "the instance did not get there in time"
            self.step()
            time.sleep(0.002)

    def cache_holds(self, rid, tokens, positions):
        """Whether the cache holds the fake model's K/V for `positions`."""
        blocks = self.reqs[rid][1]
        return all(torch.equal(self.kv[name][kv, blocks[p // BS], p % BS],
                               expected_kv(tokens[:p + 1], li, kv))
                   for li, name in enumerate(LAYER_NAMES) for kv in (0, 1) for p in positions)

    def close(self):
        self.worker.shutdown()
        self.sched.connector.shutdown()


def test_prefix_offload_saves_and_a_second_instance_loads_the_prefix(model_config, swarm):
    boot = swarm.addrs
    shared = [(i * 37) % 997 + 1 for i in range(4 * BS)]  # 4 blocks of shared prefix
    a = Instance(model_config, "kv_both", boot)
    ra = a.add("a", shared + [11] * (BS + 3))
    a.run(lambda: "a" in a.outputs)
    # The finished request holds its blocks until its saves are done.
    a.run(lambda: not a.sched.connector.has_pending_push_work())
    assert "a" not in a.sched.requests
    assert ra.num_computed_tokens >= 5 * BS
    st = a.worker._ctx.store_stats()
    assert st["blocks_saved"] >= 5 and st["blocks_failed"] == 0

    b = Instance(model_config, "kv_both", boot)
    prompt = shared + [22] * (BS + 5)
    b.add("b", prompt)
    so = b.step()
    # 4 blocks came from the store: vLLM scheduled only the rest.
    assert so.num_scheduled_tokens["b"] == len(prompt) - 4 * BS
    assert so.has_sync_kv_loads
    assert [p for r, p in b.computed if r == "b"] == list(range(4 * BS, len(prompt)))
    # ... and every loaded byte is the fake model's K/V of those tokens.
    assert b.cache_holds("b", prompt, range(4 * BS))
    st = b.worker._ctx.store_stats()
    assert st["blocks_loaded"] == 4 and st["blocks_failed"] == 0
    assert b.sched.connector._ctx.store_stats()["hit_blocks"] == 4
    b.run(lambda: "b" in b.outputs)
    a.close()
    b.close()


def test_pd_push_with_the_transfer_id_in_kv_transfer_params(model_config, swarm):
    boot = swarm.addrs
    prefill = Instance(model_config, "kv_producer", boot)
    decode = Instance(model_config, "kv_consumer", boot)
    prompt = [(i * 13) % 991 + 2 for i in range(3 * BS + 5)]
    tid = "pd-req-1"
    # The decode side may start first: it registers where the blocks go.
    rd = decode.add("d", prompt, max_tokens=3,
                    params={"do_remote_prefill": True, "kvmesh_transfer_id": tid})
    decode.step()
    assert rd.status.name == "WAITING_FOR_REMOTE_KVS"
    prefill.add("p", prompt, max_tokens=1,
                params={"do_remote_decode": True, "kvmesh_transfer_id": tid})
    prefill.run(lambda: "p" in prefill.outputs)
    params = prefill.outputs["p"].kv_transfer_params
    assert params["kvmesh_transfer_id"] == tid and params["do_remote_prefill"]
    # The prefill instance keeps the blocks until the push is done.
    prefill.run(lambda: not prefill.sched.connector.has_pending_push_work())
    assert prefill.worker._ctx.stats()["pushes_succeeded"] == 1
    # The decode side learns of the push and goes on decoding.
    decode.run(lambda: "d" in decode.outputs)
    recomputed = {p for r, p in decode.computed if r == "d" and p < len(prompt)}
    assert len(recomputed) <= 1, recomputed  # at most the last prompt token
    pushed = [p for p in range(len(prompt)) if p not in recomputed]
    assert decode.cache_holds("d", prompt, pushed)
    assert decode.worker._ctx.stats()["pushes_received"] == 1
    prefill.close()
    decode.close()
