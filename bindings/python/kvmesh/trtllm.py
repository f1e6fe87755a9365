"""kvmesh.trtllm: TensorRT-LLM's KV cache connector over the kvmesh peer store.

    from tensorrt_llm.llmapi.llm_args import KvCacheConnectorConfig
    KvCacheConnectorConfig(connector_module="kvmesh.trtllm",
                           connector_scheduler_class="KvMeshConnectorScheduler",
                           connector_worker_class="KvMeshConnectorWorker")

Prefix offload: the scheduler (rank 0) looks up the longest stored prefix of
a new request beyond its device hit and leases it, so its blocks stay stored
until the worker has loaded them; the worker looks the prefix up again under
its own lease and loads it before the forward pass (``wait_for_layer_load``
per layer). Full blocks are saved as they fill, layer by layer
(``save_kv_layer``); a finished request keeps its blocks until its saves are
done (``request_finished`` returns True; ``get_finished`` reports them).

Keys are kvmesh token keys of the request's tokens (TensorRT-LLM hands the
connector tokens, not block hashes) in a namespace of model, dtype, layout
fingerprint, TP rank and weight version.

The KV pool TensorRT-LLM registers is ``[num_blocks, num_layers, kv_factor,
num_kv_heads * tokens_per_block * head_dim]`` (heads outside tokens); a
block is one contiguous run, so blocks move between the pool and the store
without staging. Geometry the pool does not tell (KV heads, head size) and
the swarm come from ``$KVMESH_TRTLLM_CONFIG`` (JSON) or an attribute
``kvmesh_config`` (dict) of the arguments the connector is built with:
``bootstrap``, ``num_layers``, ``num_kv_heads``, ``head_size``, ``tokens_per_block``
(default: ``llm_args.kv_cache_config.tokens_per_block``), ``model_id``
(default ``llm_args.model``), ``dtype`` ("bf16"), ``weight_version``,
``mem_bytes``, ``lease_s`` (30), ``timeout_s`` (10).

TensorRT-LLM installs only with its CUDA wheels. When ``tensorrt_llm`` is
importable the classes below subclass its ``KvCacheConnectorScheduler`` and
``KvCacheConnectorWorker``; otherwise they subclass stand-ins with the same
interface (``HAVE_TRTLLM`` says which). Host memory pools only (GPU pools
come with the engine's GPU memory kind).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from . import core
from ._tensors import dtype_name, span_bytes

log = logging.getLogger("kvmesh.trtllm")

try:  # pragma: no cover - needs TensorRT-LLM (CUDA wheels)
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (
        KvCacheConnectorScheduler,
        KvCacheConnectorWorker,
        RequestData,
        SchedulerOutput,
    )

    HAVE_TRTLLM = True
except ImportError:
    HAVE_TRTLLM = False

    @dataclass
    class RequestData:
        """TensorRT-LLM's per-request scheduler data (same fields)."""

        request_id: int
        new_tokens: List[int]
        new_block_ids: List[int]
        computed_position: int
        num_scheduled_tokens: int

    @dataclass
    class SchedulerOutput:
        """TensorRT-LLM's connector scheduler output (same fields)."""

        new_requests: List[RequestData] = field(default_factory=list)
        cached_requests: List[RequestData] = field(default_factory=list)

    class KvCacheConnectorWorker(ABC):
        """Stand-in for ``tensorrt_llm._torch.pyexecutor.kv_cache_connector.
        KvCacheConnectorWorker``: the same constructor and methods."""

        def __init__(self, llm_args):
            self._llm_args = llm_args
            self._metadata = None
            super().__init__()

        def bind_connector_meta(self, metadata: object):
            self._metadata = metadata

        def get_connector_meta(self) -> object:
            return self._metadata

        def _clear_connector_meta(self):
            self._metadata = None

        def register_forward_pass_callable(self) -> Optional[Callable]:
            return None

        @abstractmethod
        def register_kv_caches(self, kv_cache_tensor): ...

        @abstractmethod
        def start_load_kv(self, stream): ...

        @abstractmethod
        def wait_for_layer_load(self, layer_idx: int, stream): ...

        @abstractmethod
        def save_kv_layer(self, layer_idx: int, stream): ...

        @abstractmethod
        def wait_for_save(self, stream): ...

        @abstractmethod
        def get_finished(self, finished_gen_req_ids: List[int],
                         started_loading_req_ids: List[int]) -> Tuple[List[int], List[int]]: ...

    class KvCacheConnectorScheduler(ABC):
        """Stand-in for TensorRT-LLM's ``KvCacheConnectorScheduler``."""

        def __init__(self, llm_args):
            self._llm_args = llm_args
            super().__init__()

        @abstractmethod
        def build_connector_meta(self, scheduler_output: SchedulerOutput): ...

        @abstractmethod
        def get_num_new_matched_tokens(self, request, num_computed_tokens: int
                                       ) -> Tuple[int, bool]: ...

        @abstractmethod
        def request_finished(self, request, cache_block_ids: List[int]) -> bool: ...

        @abstractmethod
        def update_state_after_alloc(self, request, block_ids: List[int]): ...


def settings(llm_args) -> dict:
    """The kvmesh settings: ``llm_args.kvmesh_config``, then
    ``$KVMESH_TRTLLM_CONFIG``, with defaults from ``llm_args``."""
    cfg = dict(getattr(llm_args, "kvmesh_config", None) or {})
    env = os.environ.get("KVMESH_TRTLLM_CONFIG")
    if env:
        cfg = {**json.loads(env), **cfg}
    kvc = getattr(llm_args, "kv_cache_config", None)
    cfg.setdefault("tokens_per_block", getattr(kvc, "tokens_per_block", None) or 32)
    cfg.setdefault("model_id", str(getattr(llm_args, "model", "") or "model"))
    cfg.setdefault("dtype", "bf16")
    cfg.setdefault("weight_version", "")
    cfg.setdefault("bootstrap", os.environ.get("KVMESH_BOOTSTRAP"))
    for k in ("num_layers", "num_kv_heads", "head_size"):
        if k not in cfg:
            raise ValueError(f"kvmesh.trtllm needs {k!r} in kvmesh_config or "
                             "$KVMESH_TRTLLM_CONFIG")
    return cfg


def pool_layout(cfg: dict, num_blocks: int, kv_factor: int = 2) -> core.Layout:
    """TensorRT-LLM's pool ``[blocks, layers, kv, heads * tokens * head]``."""
    return core.Layout.trtllm_pool(num_layers=int(cfg["num_layers"]), num_blocks=num_blocks,
                                   block_size=int(cfg["tokens_per_block"]),
                                   num_kv_heads=int(cfg["num_kv_heads"]),
                                   head_size=int(cfg["head_size"]), dtype=cfg["dtype"],
                                   kv_factor=kv_factor)


_contexts: dict = {}
_contexts_lock = threading.Lock()


def _store(cfg: dict) -> core.StoreContext:
    """One store peer per process and swarm, shared by scheduler and worker."""
    key = (str(cfg.get("bootstrap")), int(cfg.get("mem_bytes", 0)))
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _contexts[key] = core.StoreContext(
                bootstrap=cfg.get("bootstrap"), mem_bytes=int(cfg.get("mem_bytes", 0)),
                psk=cfg.get("psk"), default_lease=float(cfg.get("lease_s", 30.0)),
                op_timeout=3 * float(cfg.get("timeout_s", 10.0)))
        return ctx


def close_stores():
    """Closes the store peers of this process (tests, shutdown)."""
    with _contexts_lock:
        for ctx in _contexts.values():
            ctx.close()
        _contexts.clear()


@dataclass
class Span:
    """Blocks ``first..first+len(block_ids)`` of a request's token sequence."""

    req_id: int
    tokens: List[int]
    first: int
    block_ids: List[int]


@dataclass
class KvMeshTrtllmMetadata:
    loads: List[Span] = field(default_factory=list)
    saves: List[Span] = field(default_factory=list)


@dataclass
class _Req:
    tokens: List[int] = field(default_factory=list)
    block_ids: List[int] = field(default_factory=list)
    local_tokens: int = 0
    loaded_tokens: int = 0
    saved: int = 0
    save_issued: bool = False


class KvMeshConnectorScheduler(KvCacheConnectorScheduler):
    """Scheduler side (rank 0): lookups (leased), load and save plans."""

    def __init__(self, llm_args):
        super().__init__(llm_args)
        self._cfg = settings(llm_args)
        self._bs = int(self._cfg["tokens_per_block"])
        self._lease = float(self._cfg.get("lease_s", 30.0))
        self._timeout = float(self._cfg.get("timeout_s", 10.0))
        self._reqs: dict = {}
        self._lookups: dict = {}
        self._loading: list = []
        self._cache = None
        self._layout = None
        self._ns = core.Namespace(self._cfg["model_id"], 0, self._cfg["weight_version"])

    def _lookup_cache(self):
        """A one-block cache with the workers' packed format (lookups need a
        cache of the right block size and fingerprint)."""
        if self._cache is None:
            self._layout = pool_layout(self._cfg, 1)
            self._mem = [bytearray(n) for n in self._layout.region_lens()]
            self._cache = _store(self._cfg).register_kv_cache(self._layout, self._mem)
        return self._cache

    def _release(self, req_id):
        lk = self._lookups.pop(req_id, None)
        if lk is not None:
            lk.release()

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> Tuple[int, bool]:
        req_id = request.request_id
        tokens = list(request.get_tokens(0))
        st = self._reqs.setdefault(req_id, _Req())
        st.local_tokens = num_computed_tokens
        self._release(req_id)
        if num_computed_tokens % self._bs:
            return 0, False
        end = (len(tokens) - 1) // self._bs  # leave a token to compute
        first = num_computed_tokens // self._bs
        if end <= first:
            return 0, False
        cache = self._lookup_cache()
        try:
            keys = self._layout.token_keys(self._ns, tokens[:end * self._bs])[first:]
            lk = cache.lookup(keys, lease=self._lease, timeout=self._timeout)
        except core.KvmeshError as e:
            log.warning("kvmesh lookup failed, treating as a miss: %s", e)
            return 0, False
        if lk.count == 0:
            lk.release()
            return 0, False
        self._lookups[req_id] = lk
        st.loaded_tokens = lk.count * self._bs
        return st.loaded_tokens, False

    def update_state_after_alloc(self, request, block_ids: List[int]):
        st = self._reqs.setdefault(request.request_id, _Req())
        st.block_ids = list(block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KvMeshTrtllmMetadata:
        for req_id in self._loading:
            self._release(req_id)
        meta = KvMeshTrtllmMetadata()
        for rd in scheduler_output.new_requests:
            st = self._reqs.setdefault(rd.request_id, _Req())
            st.tokens = list(rd.new_tokens)
            st.block_ids = list(rd.new_block_ids)
            first = st.local_tokens // self._bs
            n = st.loaded_tokens // self._bs
            if n and rd.request_id in self._lookups:
                meta.loads.append(Span(rd.request_id, st.tokens[:(first + n) * self._bs], first,
                                       st.block_ids[first:first + n]))
                st.saved = first + n
            # Some TensorRT-LLM versions leave the loaded tokens out of a new
            # request's computed position: they are in place before this pass.
            self._plan_save(meta, rd, st, st.local_tokens + st.loaded_tokens)
        for rd in scheduler_output.cached_requests:
            st = self._reqs.setdefault(rd.request_id, _Req())
            st.tokens.extend(rd.new_tokens)
            st.block_ids.extend(rd.new_block_ids)
            self._plan_save(meta, rd, st, 0)
        self._loading = [s.req_id for s in meta.loads]
        return meta

    def _plan_save(self, meta, rd, st: _Req, in_place: int):
        """Saves the blocks that are full once this pass has run."""
        done = max(rd.computed_position, in_place) + rd.num_scheduled_tokens
        full = min(done, len(st.tokens)) // self._bs
        full = min(full, len(st.block_ids))
        if full > st.saved:
            meta.saves.append(Span(rd.request_id, st.tokens[:full * self._bs], st.saved,
                                   st.block_ids[st.saved:full]))
            st.saved = full
            st.save_issued = True

    def request_finished(self, request, cache_block_ids: List[int]) -> bool:
        st = self._reqs.pop(request.request_id, None)
        self._release(request.request_id)
        return bool(st and st.save_issued)


class KvMeshConnectorWorker(KvCacheConnectorWorker):
    """Worker side: registers the pool, loads and saves blocks."""

    def __init__(self, llm_args):
        super().__init__(llm_args)
        self._cfg = settings(llm_args)
        self._bs = int(self._cfg["tokens_per_block"])
        self._lease = float(self._cfg.get("lease_s", 30.0))
        self._timeout = float(self._cfg.get("timeout_s", 10.0))
        self._cache = None
        self._loads: list = []
        self._saves_this_step: list = []
        self._save_ops: dict = {}
        self._finished: set = set()

    def register_kv_caches(self, kv_cache_tensor):
        t = kv_cache_tensor
        if t.device.type != "cpu":
            raise core.Unsupported(
                f"KV pool on {t.device}: this kvmesh build registers host memory only")
        if len(t.shape) != 4:
            raise ValueError(f"KV pool of shape {tuple(t.shape)}; expected "
                             "[blocks, layers, kv_factor, heads * tokens * head_dim]")
        if dtype_name(t.dtype) != self._cfg["dtype"]:
            raise ValueError(f"KV pool dtype {t.dtype}, configured {self._cfg['dtype']}")
        num_blocks, layers, kv_factor, inner = t.shape
        if layers != int(self._cfg["num_layers"]):
            raise ValueError(f"KV pool of {layers} layers, configured {self._cfg['num_layers']}")
        self._layout = pool_layout(self._cfg, num_blocks, kv_factor)
        if inner * t.element_size() != self._layout.kv_stride or not t.is_contiguous():
            raise ValueError(f"KV pool inner dimension {inner} is not num_kv_heads * "
                             "tokens_per_block * head_size, or the pool is not contiguous")
        try:
            from tensorrt_llm._utils import mpi_rank  # pragma: no cover
            rank = mpi_rank()
        except ImportError:
            rank = 0
        self._ns = core.Namespace(self._cfg["model_id"], rank, self._cfg["weight_version"])
        self._cache = _store(self._cfg).register_kv_cache(self._layout, [t.data_ptr()],
                                                          [span_bytes(t)])
        self._pool = t

    def _keys(self, span: Span):
        return self._layout.token_keys(self._ns, span.tokens)[span.first:]

    def start_load_kv(self, stream):
        meta = self.get_connector_meta()
        for span in getattr(meta, "loads", ()):
            try:
                lk = self._cache.lookup(self._keys(span), lease=self._lease,
                                        timeout=self._timeout)
            except core.KvmeshError as e:
                log.warning("kvmesh lookup for %s failed: %s", span.req_id, e)
                continue
            n = min(lk.count, len(span.block_ids))
            if n < len(span.block_ids):
                log.warning("kvmesh: %d of %d blocks of request %s are gone; they keep "
                            "whatever the pool holds", len(span.block_ids) - n,
                            len(span.block_ids), span.req_id)
            if n:
                self._loads.append(lk.load(span.block_ids[:n]))
            lk.release()  # the load keeps its leases until it ends

    def wait_for_layer_load(self, layer_idx: int, stream):
        for op in self._loads:
            if not op.layer_ready(layer_idx, self._timeout):
                log.warning("kvmesh: layer %d not loaded in %.1fs", layer_idx, self._timeout)

    def save_kv_layer(self, layer_idx: int, stream):
        meta = self.get_connector_meta()
        if getattr(meta, "saves", None) and not self._saves_this_step:
            self._start_saves(meta)
        for op in self._saves_this_step:
            op.save_layer(layer_idx)

    def _start_saves(self, meta):
        for span in meta.saves:
            try:
                op = self._cache.save(span.block_ids, self._keys(span), per_layer=True)
            except core.KvmeshError as e:
                log.warning("kvmesh save for %s refused: %s", span.req_id, e)
                continue
            self._saves_this_step.append(op)
            self._save_ops.setdefault(span.req_id, []).append(op)

    def wait_for_save(self, stream):
        """The forward pass is complete (the stream is synchronised): every
        layer of this step's saves is written. Saves finish in the background."""
        if stream is not None and hasattr(stream, "synchronize"):
            stream.synchronize()
        meta = self.get_connector_meta()
        if getattr(meta, "saves", None) and not self._saves_this_step:
            self._start_saves(meta)
        for op in self._saves_this_step:
            for layer in range(self._layout.num_layers):
                op.save_layer(layer)
        self._saves_this_step = []
        for op in self._loads:
            res = op.wait(self._timeout)
            if res is None or not res.ok:
                log.warning("kvmesh load: %s", res.error if res else "timed out")
            op.release()
        self._loads = []

    def get_finished(self, finished_gen_req_ids: List[int],
                     started_loading_req_ids: List[int]) -> Tuple[List[int], List[int]]:
        """Requests whose saves are done (loads are synchronous: none)."""
        self._finished.update(finished_gen_req_ids)
        done = []
        for req_id in list(self._finished):
            ops = self._save_ops.get(req_id, [])
            if all(op.done() for op in ops):
                for op in ops:
                    op.release()
                self._save_ops.pop(req_id, None)
                self._finished.discard(req_id)
                done.append(req_id)
        return done, []


__all__ = ["HAVE_TRTLLM", "KvCacheConnectorScheduler", "KvCacheConnectorWorker",
           "KvMeshConnectorScheduler", "KvMeshConnectorWorker", "KvMeshTrtllmMetadata",
           "RequestData", "SchedulerOutput", "close_stores", "settings"]
