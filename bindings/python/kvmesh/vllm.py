"""kvmesh.vllm: a vLLM V1 KV connector over the kvmesh peer store.

    --kv-transfer-config '{"kv_connector": "KvMeshConnector",
                           "kv_connector_module_path": "kvmesh.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"bootstrap": "/ip4/10.0.0.5/tcp/4001/p2p/12D3..."}}'

Two jobs, both keyed by vLLM's block hashes chained into a kvmesh key
namespace (model, dtype, layout fingerprint, TP rank, weight version):

Prefix offload (any role). The scheduler looks up the longest stored prefix
of a new request beyond its local hit and *leases* it, so the blocks it
reports stay stored until the worker has loaded them; the worker looks the
prefix up again under its own lease and loads it layer by layer during the
forward pass (``wait_for_layer_load``). Blocks are saved as they fill, layer
by layer (``save_kv_layer``); a finished request keeps its blocks until its
saves are done (``get_finished``). Blocks that fail to load are reported by
``get_block_ids_with_load_errors`` and recomputed by vLLM.

P/D (push). A request whose ``kv_transfer_params`` carry
``{"do_remote_decode": true, "kvmesh_transfer_id": T}`` runs on a prefill
instance (``kv_producer``/``kv_both``); the same ``T`` with
``{"do_remote_prefill": true}`` on a decode instance (``kv_consumer``/
``kv_both``). The decode worker publishes where it wants the blocks (its KV
cache descriptor and block ids) in the store under a key derived from ``T``;
the prefill worker, once the request finished, pushes its blocks straight
into those decode blocks and notifies with ``T``; the decode worker reports
the request as received. Either side may start first.

``kv_connector_extra_config``: ``bootstrap`` (multiaddrs, or
``$KVMESH_BOOTSTRAP``), ``mem_bytes`` (DRAM a worker donates to the swarm,
default 0), ``psk``, ``lease_s`` (30), ``timeout_s`` (10), ``pd_timeout_s``
(60), ``save`` / ``load`` (true), ``model_id``, ``weight_version``.

Limits: one KV cache group (``disable_hybrid_kv_cache_manager``); host
memory KV caches (GPU caches come with the engine's GPU memory kind); with
tensor parallelism the scheduler's lease covers rank 0's blocks and every
worker re-checks its own (a block missing there is a load error, then
recomputed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)

from . import core
from ._tensors import LayoutSpec, dtype_name, kv_layout_spec, span_bytes

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("kvmesh.vllm")

TRANSFER_ID = "kvmesh_transfer_id"


def plan_key(transfer_id: str) -> bytes:
    """Store key of a decode worker's registration for a transfer id."""
    return hashlib.blake2b(b"kvmesh vllm pd plan v1\0" + transfer_id.encode(),
                           digest_size=32).digest()


def _hash_bytes(h) -> bytes:
    """vLLM block hashes are bytes; older versions used ints."""
    if isinstance(h, (bytes, bytearray)):
        return bytes(h)
    if isinstance(h, int):
        return h.to_bytes(32, "little", signed=True)
    return bytes(h)


# ---------------------------------------------------------------------------
# Scheduler -> worker metadata.

@dataclass
class BlockSpan:
    """Blocks ``first..first+len(block_ids)`` of a request, in cache blocks
    ``block_ids``; ``hashes`` are the request's block hashes up to the last
    of them (keys chain from block 0)."""

    req_id: str
    hashes: list
    first: int
    block_ids: list


@dataclass
class Receive:
    """Decode side: where the pushed blocks of ``transfer_id`` go."""

    req_id: str
    transfer_id: str
    first: int
    block_ids: list


@dataclass
class Send:
    """Prefill side: push the blocks of a finished request."""

    req_id: str
    transfer_id: str
    block_ids: list


@dataclass
class KvMeshConnectorMetadata(KVConnectorMetadata):
    loads: list = field(default_factory=list)
    saves: list = field(default_factory=list)
    receives: list = field(default_factory=list)
    sends: list = field(default_factory=list)


@dataclass
class KvMeshHandshake(KVConnectorHandshakeMetadata):
    """Worker -> scheduler at start-up: the worker's KV layout (keys depend
    on its packed format)."""

    layout: LayoutSpec
    tp_rank: int


@dataclass
class _Req:
    request: Any
    block_ids: list = field(default_factory=list)
    saved: int = 0
    save_issued: bool = False
    local_tokens: int = 0


class KvMeshConnector(KVConnectorBase_V1):
    """vLLM V1 KV connector: prefix offload and P/D push through kvmesh."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig" = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._extra = extra
        self._kv_role = self._kv_transfer_config.kv_role or "kv_both"
        self._block_size = vllm_config.cache_config.block_size
        self._lease = float(extra.get("lease_s", 30.0))
        self._timeout = float(extra.get("timeout_s", 10.0))
        self._pd_timeout = float(extra.get("pd_timeout_s", 60.0))
        self._save_enabled = bool(extra.get("save", True)) and self._kv_role != "kv_consumer"
        self._load_enabled = bool(extra.get("load", True))
        mc = vllm_config.model_config
        self._model_id = str(extra.get("model_id") or mc.model)
        self._weight_version = str(extra.get("weight_version") or getattr(mc, "revision", "")
                                   or "")
        self._ctx: Optional[core.StoreContext] = None
        self._cache: Optional[core.KvCache] = None
        self._layout: Optional[core.Layout] = None
        self._ns: Optional[core.Namespace] = None
        self._lock = threading.Lock()
        if role == KVConnectorRole.SCHEDULER:
            self._reqs: dict = {}
            self._lookups: dict = {}
            self._pending_loads: list = []
            self._pending_receives: list = []
            self._pending_sends: list = []
            self._sending: set = set()
            # Lookups whose load was handed to the workers last step.
            self._loading: list = []
            self._lookup_mem = None
        else:
            self._layer_index: dict = {}
            self._num_layers = 0
            self._loads: list = []  # (span, op or None, missing dst blocks)
            self._load_errors: set = set()
            self._saves_this_step: list = []
            self._save_ops: dict = {}  # req_id -> [StoreOp]
            self._finished: set = set()
            self._receives: dict = {}  # transfer_id -> (req_id, deadline, block_ids)
            self._pushing: set = set()  # req ids whose push runs
            self._sent: set = set()  # req ids whose push ended
            self._failed_receives: set = set()
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kvmesh-push")
            self._remotes: dict = {}
            self._gpu = False
            self._signals: Optional[ThreadPoolExecutor] = None

    # ------------------------------------------------------------------
    # Shared helpers.

    def _store(self, mem_bytes: int = 0) -> core.StoreContext:
        if self._ctx is None:
            boot = self._extra.get("bootstrap") or os.environ.get("KVMESH_BOOTSTRAP")
            self._ctx = core.StoreContext(bootstrap=boot, mem_bytes=int(mem_bytes),
                                          psk=self._extra.get("psk"),
                                          default_lease=self._lease,
                                          op_timeout=self._timeout * 3)
        return self._ctx

    def _keys(self, hashes) -> list:
        return self._layout.hash_keys(self._ns, [_hash_bytes(h) for h in hashes])

    # ------------------------------------------------------------------
    # Scheduler side.

    def set_xfer_handshake_metadata(self, metadata: dict) -> None:
        """Builds the lookup layout from the workers' layout (rank 0)."""
        if self._role != KVConnectorRole.SCHEDULER or not metadata:
            return
        hs = metadata.get(0) or next(iter(metadata.values()))
        self._lookup_layout(hs.layout)

    def _lookup_layout(self, spec: LayoutSpec) -> None:
        """A one-block KV cache with the workers' packed format: lookups
        need a cache of the right block size and fingerprint."""
        compact = spec.compact(1)
        layout = compact.layout()
        mem = [bytearray(n) for n in layout.region_lens()]
        ctx = self._store()
        with self._lock:
            self._layout = layout
            self._ns = core.Namespace(self._model_id, 0, self._weight_version)
            self._lookup_mem = mem
            self._cache = ctx.register_kv_cache(layout, mem)

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple:
        params = request.kv_transfer_params or {}
        prompt = request.prompt_token_ids or []
        st = self._reqs.setdefault(request.request_id, _Req(request))
        st.local_tokens = num_computed_tokens
        if params.get("do_remote_prefill") and params.get(TRANSFER_ID):
            count = len(prompt) - num_computed_tokens
            return (count, True) if count > 0 else (0, False)
        if not self._load_enabled or self._cache is None:
            return 0, False
        bs = self._block_size
        # At least one prompt token is left to compute (for the logits).
        end = min(len(request.block_hashes), (len(prompt) - 1) // bs)
        first = num_computed_tokens // bs
        self._release_lookup(request.request_id)
        if end <= first:
            return 0, False
        try:
            keys = self._keys(request.block_hashes[:end])[first:]
            lk = self._cache.lookup(keys, lease=self._lease, timeout=self._timeout)
        except core.KvmeshError as e:
            log.warning("kvmesh lookup failed, treating as a miss: %s", e)
            return 0, False
        if lk.count == 0:
            lk.release()
            return 0, False
        self._lookups[request.request_id] = lk
        return lk.count * bs, False

    def _release_lookup(self, req_id: str) -> None:
        lk = self._lookups.pop(req_id, None)
        if lk is not None:
            lk.release()

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int):
        params = request.kv_transfer_params or {}
        st = self._reqs.setdefault(request.request_id, _Req(request))
        if num_external_tokens <= 0:
            if not params.get("do_remote_prefill"):
                self._release_lookup(request.request_id)
            return
        bs = self._block_size
        block_ids = list(blocks.get_block_ids()[0])
        first = st.local_tokens // bs
        n = -(-(st.local_tokens + num_external_tokens) // bs) - first
        if params.get("do_remote_prefill") and params.get(TRANSFER_ID):
            self._pending_receives.append(Receive(request.request_id, str(params[TRANSFER_ID]),
                                                  first, block_ids[first:first + n]))
            # Handled: a later call for this request (after the push) loads nothing.
            params["do_remote_prefill"] = False
            return
        n = num_external_tokens // bs
        if request.request_id in self._lookups and n > 0:
            self._pending_loads.append(BlockSpan(request.request_id,
                                                 [_hash_bytes(h) for h in
                                                  request.block_hashes[:first + n]],
                                                 first, block_ids[first:first + n]))
            # Loaded blocks are stored already.
            st.saved = max(st.saved, first + n)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        # Loads handed out last step ran in that step's forward, under the
        # workers' own leases: this scheduler's leases may end.
        for req_id in self._loading:
            self._release_lookup(req_id)
        self._loading = [span.req_id for span in self._pending_loads]
        meta = KvMeshConnectorMetadata(loads=self._pending_loads,
                                       receives=self._pending_receives,
                                       sends=self._pending_sends)
        self._pending_loads, self._pending_receives, self._pending_sends = [], [], []
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            new_ids = cached.new_block_ids[i]
            if st is None or new_ids is None:
                continue
            if req_id in cached.resumed_req_ids:
                st.block_ids = list(new_ids[0])
            else:
                st.block_ids.extend(new_ids[0])
        if self._save_enabled and self._cache is not None:
            bs = self._block_size
            for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
                st = self._reqs.get(req_id)
                if st is None:
                    continue
                req = st.request
                # vLLM builds the metadata before it advances
                # num_computed_tokens: after this step's forward these are done.
                computed = req.num_computed_tokens + n_sched
                full = min(computed // bs, len(req.block_hashes), len(st.block_ids))
                if full > st.saved:
                    meta.saves.append(BlockSpan(req_id,
                                                [_hash_bytes(h) for h in req.block_hashes[:full]],
                                                st.saved, st.block_ids[st.saved:full]))
                    st.saved = full
                    st.save_issued = True
        return meta

    def request_finished(self, request: "Request", block_ids: list) -> tuple:
        from vllm.v1.request import RequestStatus

        req_id = request.request_id
        st = self._reqs.pop(req_id, None)
        self._release_lookup(req_id)
        params = request.kv_transfer_params or {}
        if params.get("do_remote_decode") and params.get(TRANSFER_ID):
            if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                      RequestStatus.FINISHED_STOPPED) or not block_ids:
                return False, None
            tid = str(params[TRANSFER_ID])
            self._pending_sends.append(Send(req_id, tid, list(block_ids)))
            self._sending.add(req_id)
            return True, {"do_remote_prefill": True, "do_remote_decode": False,
                          TRANSFER_ID: tid, "remote_num_tokens": request.num_computed_tokens}
        if st is not None and st.save_issued:
            # The worker reports it in finished_sending once its saves are done.
            self._sending.add(req_id)
            return True, None
        return False, None

    def update_connector_output(self, connector_output: "KVConnectorOutput"):
        for req_id in connector_output.finished_sending or ():
            self._sending.discard(req_id)

    def has_pending_push_work(self) -> bool:
        return bool(self._pending_sends or self._sending)

    def get_num_pending(self) -> int:
        return len(self._sending)

    # ------------------------------------------------------------------
    # Worker side.

    def register_kv_caches(self, kv_caches: dict):
        """Registers vLLM's per-layer KV tensors (host memory, or one GPU) as
        one kvmesh KV cache, one base region per layer."""
        try:
            from vllm.model_executor.models.utils import extract_layer_index
        except ImportError:  # pragma: no cover - older layouts of vLLM
            extract_layer_index = None
        names = list(kv_caches)
        if extract_layer_index is not None:
            names.sort(key=extract_layer_index)
        self._layer_index = {n: i for i, n in enumerate(names)}
        self._num_layers = len(names)
        tensors = [kv_caches[n] for n in names]
        devices = {(t.device.type, t.device.index) for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"KV tensors on several devices: {sorted(map(str, devices))}")
        kind, index = devices.pop()
        if kind not in ("cpu", "cuda"):
            raise core.Unsupported(f"KV cache on {kind}: kvmesh takes host or CUDA memory")
        self._gpu = kind == "cuda"
        spec = self._kv_cache_config.kv_cache_groups[0].kv_cache_spec
        latent = type(spec).__name__.startswith("MLA")
        ls = kv_layout_spec(tensors, self._kv_cache_config.num_blocks, spec.block_size,
                            getattr(spec, "num_kv_heads", 1), spec.head_size, latent=latent)
        if dtype_name(tensors[0].dtype) != ls.dtype:
            raise ValueError("KV tensors of mixed dtypes")
        self._spec = ls
        self._layout = ls.layout()
        self._tp_rank = self._get_tp_rank()
        self._ns = core.Namespace(self._model_id, self._tp_rank, self._weight_version)
        ctx = self._store(int(self._extra.get("mem_bytes", 0)))
        self._cache = ctx.register_kv_cache(self._layout, [t.data_ptr() for t in tensors],
                                            [span_bytes(t) for t in tensors],
                                            memory="gpu" if self._gpu else "host",
                                            device=index or 0)
        if self._gpu:
            # Layer signals of GPU saves wait here for the compute stream's
            # KV writes, in order, without stalling the model.
            self._signals = ThreadPoolExecutor(max_workers=1,
                                               thread_name_prefix="kvmesh-signal")
        self._kv_tensors = tensors  # keep them alive while registered

    @staticmethod
    def _get_tp_rank() -> int:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
            return get_tensor_model_parallel_rank()
        except Exception:
            return 0

    def get_handshake_metadata(self) -> Optional[KvMeshHandshake]:
        if self._role != KVConnectorRole.WORKER or self._cache is None:
            return None
        return KvMeshHandshake(layout=self._spec, tp_rank=self._tp_rank)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvMeshConnectorMetadata)
        for r in meta.receives:
            self._publish_receive(r)
        for s in meta.sends:
            with self._lock:
                self._pushing.add(s.req_id)
            self._finished.add(s.req_id)
            self._pool.submit(self._push, s)
        for span in meta.loads:
            self._start_load(span)

    def _start_load(self, span: BlockSpan) -> None:
        keys = self._keys(span.hashes)[span.first:]
        try:
            lk = self._cache.lookup(keys, lease=self._lease, timeout=self._timeout)
        except core.KvmeshError as e:
            log.warning("kvmesh lookup for %s failed: %s", span.req_id, e)
            self._load_errors.update(span.block_ids)
            return
        n = min(lk.count, len(span.block_ids))
        missing = span.block_ids[n:]
        op = lk.load(span.block_ids[:n]) if n else None
        # Released now, the leases still last until the load ends.
        lk.release()
        self._loads.append((span, op, missing))

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for span, op, _ in self._loads:
            if op is not None and not op.layer_ready(layer, self._timeout):
                log.warning("kvmesh: layer %d of %s not loaded in %.1fs", layer, span.req_id,
                            self._timeout)
                op.cancel()

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvMeshConnectorMetadata)
        if meta.saves and not self._saves_this_step:
            self._start_saves(meta)
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        self._signal_layer(list(self._saves_this_step), layer)

    def _signal_layer(self, ops: list, layer: int) -> None:
        """Tells `ops` that `layer` is written: at once for host caches; for
        GPU caches once the work enqueued so far on the current CUDA stream
        (the layer's KV writes) has finished."""
        if not ops:
            return
        if not self._gpu:
            for op in ops:
                op.save_layer(layer)
            return
        import torch
        written = torch.cuda.Event()
        written.record()

        def signal():
            written.synchronize()
            for op in ops:
                op.save_layer(layer)
        self._signals.submit(signal)

    def _start_saves(self, meta: KvMeshConnectorMetadata) -> None:
        for span in meta.saves:
            keys = self._keys(span.hashes)[span.first:]
            try:
                op = self._cache.save(span.block_ids, keys, per_layer=True)
            except core.KvmeshError as e:
                log.warning("kvmesh save for %s refused: %s", span.req_id, e)
                continue
            self._saves_this_step.append(op)
            self._save_ops.setdefault(span.req_id, []).append(op)

    def wait_for_save(self):
        """Starts this step's saves if no layer did, and marks every layer
        written; the saves complete in the background."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if isinstance(meta, KvMeshConnectorMetadata) and meta.saves and not self._saves_this_step:
            self._start_saves(meta)
        ops, self._saves_this_step = self._saves_this_step, []
        for layer in range(self._num_layers):
            self._signal_layer(ops, layer)

    def get_finished(self, finished_req_ids: set) -> tuple:
        r = self.get_transfer_results(finished_req_ids)
        return (r.finished_sending or None, r.finished_recving or None)

    def get_transfer_results(self, finished_req_ids: set) -> KVConnectorTransferResults:
        sending, recving, failed = set(), set(), set()
        self._finished.update(finished_req_ids)
        # A finished request is sent once its saves and its push ended.
        for req_id in list(self._finished):
            ops = self._save_ops.get(req_id, [])
            with self._lock:
                pushing, pushed = req_id in self._pushing, req_id in self._sent
            if not ops and not pushing and not pushed:
                self._finished.discard(req_id)  # nothing held for it here
                continue
            if pushing or not all(op.done() for op in ops):
                continue
            for op in ops:
                res = op.status()
                if res is not None and not res.ok:
                    log.warning("kvmesh save of %s: %s", req_id, res.error)
                op.release()
            self._save_ops.pop(req_id, None)
            with self._lock:
                self._sent.discard(req_id)
            self._finished.discard(req_id)
            sending.add(req_id)
        for got in self._ctx.poll_received() if self._ctx is not None else ():
            tid = got.transfer_id.decode(errors="replace")
            entry = self._receives.pop(tid, None)
            if entry is not None:
                recving.add(entry[0])
        now = time.monotonic()
        for tid, (req_id, deadline, block_ids) in list(self._receives.items()):
            if now > deadline:
                del self._receives[tid]
                log.warning("kvmesh: no push for %s (transfer %s) in %.0fs", req_id, tid,
                            self._pd_timeout)
                recving.add(req_id)
                failed.add(req_id)
                self._load_errors.update(block_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set:
        for span, op, missing in self._loads:
            self._load_errors.update(missing)
            if op is None:
                continue
            res = op.wait(self._timeout)
            if res is None:
                op.cancel()
                self._load_errors.update(op.blocks)
                continue
            self._load_errors.update(f.dst_block for f in res.failed)
            op.release()
        self._loads = []
        errors, self._load_errors = self._load_errors, set()
        return errors

    # --- P/D ---

    def _publish_receive(self, r: Receive) -> None:
        plan = json.dumps({"desc": self._cache.export().hex(), "first": r.first,
                           "blocks": r.block_ids}).encode()
        self._receives[r.transfer_id] = (r.req_id, time.monotonic() + self._pd_timeout,
                                         r.block_ids)
        try:
            self._ctx.put(plan_key(r.transfer_id), plan, timeout=self._timeout)
        except core.KvmeshError as e:
            log.warning("kvmesh: publishing the receive of %s failed: %s", r.transfer_id, e)

    def _push(self, s: Send) -> None:
        """Background: waits for the decode side's registration, pushes."""
        try:
            deadline = time.monotonic() + self._pd_timeout
            plan = None
            while plan is None and time.monotonic() < deadline:
                plan = self._ctx.get(plan_key(s.transfer_id), timeout=self._timeout)
                if plan is None:
                    time.sleep(0.01)
            if plan is None:
                log.warning("kvmesh: no decode registration for transfer %s", s.transfer_id)
                return
            p = json.loads(plan)
            desc = bytes.fromhex(p["desc"])
            remote = self._remotes.get(desc)
            if remote is None:
                remote = self._remotes[desc] = self._ctx.import_remote(desc)
            first, dst = int(p["first"]), list(p["blocks"])
            src = s.block_ids[first:first + len(dst)]
            dst = dst[:len(src)]
            op = self._cache.push(remote, src, dst, s.transfer_id, timeout=self._timeout)
            res = op.wait(self._timeout * 2)
            if res is None or not res.ok:
                log.warning("kvmesh push of %s: %s", s.transfer_id,
                            res.error if res else "timed out")
            op.release()
        except Exception as e:  # a background thread: log, never raise
            log.warning("kvmesh push of %s failed: %s", s.transfer_id, e)
        finally:
            with self._lock:
                self._pushing.discard(s.req_id)
                self._sent.add(s.req_id)

    def shutdown(self):
        if self._role == KVConnectorRole.WORKER:
            self._pool.shutdown(wait=True)
            if self._signals is not None:
                self._signals.shutdown(wait=True)
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
