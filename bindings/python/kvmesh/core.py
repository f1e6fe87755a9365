"""Pythonic wrappers over the libkvmesh function table.

    ctx = kvmesh.Context()
    layout = kvmesh.Layout.vllm_flash_attn(num_layers=32, num_blocks=1000,
                                           block_size=16, num_kv_heads=8,
                                           head_size=128, dtype="bf16")
    cache = ctx.register_kv_cache(layout, [t.data_ptr() for t in kv_caches],
                                  [t.nbytes for t in kv_caches])
    desc = cache.export()                    # hand to the prefill worker
    ...
    remote = prefill_ctx.import_remote(desc)
    op = prefill_cache.push(remote, src_blocks, dst_blocks, b"req-1")
    result = op.wait(10.0)                   # PushResult: ok, bytes, failed blocks
    ...
    for r in ctx.poll_received():            # decode side: r.transfer_id
        ...

The peer store (ABI 1.1):

    node = kvmesh.StoreContext(mem_bytes=1 << 30)          # a peer that holds blocks
    ctx = kvmesh.StoreContext(bootstrap=node.addrs)        # a worker joining it
    cache = ctx.register_kv_cache(layout, ...)
    ns = kvmesh.Namespace("meta-llama/Llama-3.1-8B")
    keys = layout.token_keys(ns, prompt_tokens)            # one per full block
    cache.save(blocks, keys).wait(10.0)
    with cache.lookup(keys) as found:                      # longest stored prefix, leased
        op = found.load(dst_blocks[:found.count])
        op.layer_ready(0, 5.0)                             # ... layer by layer
        op.wait(10.0)

Timeouts are in seconds. Every wait is bounded.
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import byref, c_char_p, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p
from dataclasses import dataclass, field
from typing import List
from typing import Iterable, Optional, Sequence, Union

from . import _abi
from .errors import KvmeshError, from_status

_lock = threading.Lock()
_loaded: Optional[tuple] = None


def load_library(path=None) -> _abi.Api:
    """Loads libkvmesh.so (once per process) and returns its function table.

    ``path`` overrides the search (see ``kvmesh._abi.load``)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _abi.load(path)
        return _loaded[1]


def api() -> _abi.Api:
    return load_library()


def last_error() -> str:
    a = api()
    buf = ctypes.create_string_buffer(4096)
    n = c_size_t()
    a.last_error(buf, len(buf), byref(n))
    return buf.value.decode("utf-8", "replace")


def _check(status: int) -> int:
    if status < 0:
        raise from_status(status, last_error())
    return status


def status_name(status: int) -> str:
    out = c_char_p()
    _check(api().status_name(status, byref(out)))
    return out.value.decode()


def capabilities() -> int:
    return api().capabilities


def _ms(seconds: float) -> int:
    if seconds < 0:
        raise ValueError("timeout must be >= 0")
    return int(seconds * 1000)


def _blocks(v: Sequence[int]):
    arr = (c_uint32 * len(v))(*v)
    return arr


class Layout:
    """A validated KV layout (block shape + byte strides).

    Sizes count elements; strides are bytes. Constructors for the common
    layouts compute the strides of contiguous tensors; frameworks with
    permuted views build a Layout from their tensors' strides directly."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: str = "bf16",
        kind: str = "kv",
        placement: str = "per_layer",
        layer_stride: int = 0,
        block_stride: int,
        kv_stride: int,
        token_stride: int,
        head_stride: int,
    ):
        if dtype not in _abi.DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_abi.DTYPES)}")
        if kind not in ("kv", "latent"):
            raise ValueError(f"kind {kind!r} is not 'kv' or 'latent'")
        if placement not in ("per_layer", "one_region"):
            raise ValueError(f"placement {placement!r} is not 'per_layer' or 'one_region'")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.dtype = dtype
        self.kind = kind
        self.placement = placement
        self.layer_stride = layer_stride
        self.block_stride = block_stride
        self.kv_stride = kv_stride
        self.token_stride = token_stride
        self.head_stride = head_stride
        spec = _abi.LayoutSpec(
            struct_size=ctypes.sizeof(_abi.LayoutSpec),
            num_layers=num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=num_kv_heads,
            head_size=head_size,
            dtype=_abi.DTYPES[dtype],
            kind=_abi.KIND_KEY_VALUE if kind == "kv" else _abi.KIND_LATENT,
            placement=(
                _abi.PLACEMENT_PER_LAYER if placement == "per_layer" else _abi.PLACEMENT_ONE_REGION
            ),
            reserved=0,
            layer_stride=layer_stride,
            block_stride=block_stride,
            kv_stride=kv_stride,
            token_stride=token_stride,
            head_stride=head_stride,
        )
        h = _abi.Handle()
        _check(api().layout_create(byref(spec), byref(h)))
        self.handle = h.value

    # --- constructors for the common layouts (element sizes from dtype) ---

    @staticmethod
    def _sizes(dtype, head_size, block_size, num_kv_heads):
        v = head_size * _abi.DTYPE_SIZE[dtype]
        return v, block_size, num_kv_heads

    @classmethod
    def vllm_flash_attn(cls, *, num_layers, num_blocks, block_size, num_kv_heads, head_size,
                        dtype="bf16", order="NHD"):
        """Per layer (2, num_blocks, block_size, heads, head_size); HND keeps
        heads outside tokens in memory."""
        v, t, h = cls._sizes(dtype, head_size, block_size, num_kv_heads)
        token, head = (h * v, v) if order == "NHD" else (v, t * v)
        return cls(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                   num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype,
                   block_stride=t * h * v, kv_stride=num_blocks * t * h * v,
                   token_stride=token, head_stride=head)

    @classmethod
    def vllm_blocks_first(cls, *, num_layers, num_blocks, block_size, num_kv_heads, head_size,
                          dtype="bf16", order="NHD"):
        """Per layer (num_blocks, 2, block_size, heads, head_size)."""
        v, t, h = cls._sizes(dtype, head_size, block_size, num_kv_heads)
        token, head = (h * v, v) if order == "NHD" else (v, t * v)
        return cls(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                   num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype,
                   block_stride=2 * t * h * v, kv_stride=t * h * v,
                   token_stride=token, head_stride=head)

    @classmethod
    def packed_kv(cls, *, num_layers, num_blocks, block_size, num_kv_heads, head_size,
                  dtype="bf16"):
        """Per layer (num_blocks, heads, block_size, 2 * head_size)."""
        v, t, h = cls._sizes(dtype, head_size, block_size, num_kv_heads)
        return cls(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                   num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype,
                   block_stride=h * t * 2 * v, kv_stride=v, token_stride=2 * v,
                   head_stride=t * 2 * v)

    @classmethod
    def mla(cls, *, num_layers, num_blocks, block_size, latent_dim=576, dtype="bf16"):
        """Per layer (num_blocks, block_size, latent_dim)."""
        v = latent_dim * _abi.DTYPE_SIZE[dtype]
        return cls(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                   num_kv_heads=1, head_size=latent_dim, dtype=dtype, kind="latent",
                   block_stride=block_size * v, kv_stride=block_size * v, token_stride=v,
                   head_stride=v)

    @classmethod
    def trtllm_pool(cls, *, num_layers, num_blocks, block_size, num_kv_heads, head_size,
                    dtype="bf16", kv_factor=2):
        """One pool [num_blocks, layers, kv_factor, heads * block_size * head_size]."""
        v, t, h = cls._sizes(dtype, head_size, block_size, num_kv_heads)
        kv = h * t * v
        layer = kv_factor * kv
        return cls(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                   num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype,
                   kind="kv" if kv_factor == 2 else "latent", placement="one_region",
                   layer_stride=layer, block_stride=num_layers * layer, kv_stride=kv,
                   token_stride=v, head_stride=t * v)

    # --- keys ---

    def token_keys(self, ns: Namespace, tokens: Sequence[int]) -> List[bytes]:
        """32-byte keys of the full blocks of ``tokens`` (a partial last
        block has none); each names its whole prefix."""
        n = len(tokens) // self.block_size
        out = (_abi.BlockKey * max(n, 1))()
        got = c_size_t()
        t = (c_uint32 * max(len(tokens), 1))(*tokens)
        c = ns._c()
        _check(api().block_keys_from_tokens(self.handle, byref(c), t, len(tokens), out, n,
                                            byref(got)))
        return [bytes(k.bytes) for k in out[: got.value]]

    def hash_keys(self, ns: Namespace, hashes: Sequence[bytes]) -> List[bytes]:
        """32-byte keys from the caller's per-block hashes (e.g. vLLM's
        ``request.block_hashes``; all of one length), chained into ``ns``."""
        if not hashes:
            return []
        hl = len(hashes[0])
        if any(len(h) != hl for h in hashes):
            raise ValueError("block hashes of different lengths")
        flat = b"".join(hashes)
        buf = (c_uint8 * len(flat)).from_buffer_copy(flat)
        out = (_abi.BlockKey * len(hashes))()
        got = c_size_t()
        c = ns._c()
        _check(api().block_keys_from_hashes(self.handle, byref(c), buf, hl, len(hashes), out,
                                            len(hashes), byref(got)))
        return [bytes(k.bytes) for k in out[: got.value]]

    # --- queries ---

    @property
    def fingerprint(self) -> bytes:
        out = (c_uint8 * 32)()
        _check(api().layout_fingerprint(self.handle, out))
        return bytes(out)

    def region_lens(self) -> list:
        n = c_size_t()
        st = api().layout_region_lens(self.handle, None, 0, byref(n))
        if st < 0 and n.value == 0:
            _check(st)
        out = (c_uint64 * n.value)()
        _check(api().layout_region_lens(self.handle, out, n.value, byref(n)))
        return list(out)

    @property
    def planes(self) -> int:
        return 2 if self.kind == "kv" else 1

    @property
    def vector_bytes(self) -> int:
        return self.head_size * _abi.DTYPE_SIZE[self.dtype]

    def vector_place(self, layer, block, kv, token, head) -> tuple:
        """(region, byte offset) of one head vector."""
        off = (block * self.block_stride + kv * self.kv_stride + token * self.token_stride
               + head * self.head_stride)
        if self.placement == "per_layer":
            return layer, off
        return 0, layer * self.layer_stride + off

    def close(self):
        if self.handle:
            h, self.handle = self.handle, 0
            _check(api().layout_destroy(h))

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@dataclass
class BlockFailure:
    index: int
    src_block: int
    dst_block: int
    error: KvmeshError


@dataclass
class PushResult:
    """Outcome of a push: ``ok`` iff every byte landed and the receiver was
    notified; ``failed`` lists the blocks whose bytes did not land."""

    ok: bool
    status: int
    bytes: int
    failed: list = field(default_factory=list)
    error: Optional[KvmeshError] = None

    def raise_for_status(self) -> "PushResult":
        if self.error is not None:
            raise self.error
        return self


@dataclass
class ReceivedPush:
    transfer_id: bytes
    blocks: int
    from_engine: bytes


OpResult = PushResult


class Op:
    """An asynchronous operation (push, save or load). ``wait``/``status``
    never raise for a failed operation: they return a result carrying the
    error and the failed blocks."""

    def __init__(self, ctx: "Context", handle: int):
        self.ctx = ctx
        self.handle = handle
        self._result: Optional[PushResult] = None

    def _result_from(self, st: int, out: _abi.OpStatus) -> Optional[PushResult]:
        if st == _abi.STATUS_NOT_READY:
            return None
        if st < 0 and out.state != _abi.OP_DONE:
            raise from_status(st, last_error())  # the call itself failed
        err = None if st == 0 else from_status(st, last_error())
        failed = []
        if out.failed_blocks:
            arr = (_abi.BlockFailure * out.failed_blocks)()
            n = c_size_t()
            _check(api().op_failed_blocks(self.handle, arr, out.failed_blocks, byref(n)))
            failed = [
                BlockFailure(f.index, f.src_block, f.dst_block,
                             from_status(f.status, status_name(f.status)))
                for f in arr[: n.value]
            ]
        self._result = PushResult(st == 0, st, out.bytes, failed, err)
        return self._result

    def status(self) -> Optional[PushResult]:
        """Non-blocking: the result once complete, else None."""
        if self._result is not None:
            return self._result
        out = _abi.OpStatus(struct_size=ctypes.sizeof(_abi.OpStatus))
        st = api().op_status(self.handle, byref(out))
        return self._result_from(st, out)

    def wait(self, timeout: float) -> Optional[PushResult]:
        """Waits up to ``timeout`` seconds; None if still running."""
        if self._result is not None:
            return self._result
        out = _abi.OpStatus(struct_size=ctypes.sizeof(_abi.OpStatus))
        st = api().op_wait(self.handle, _ms(timeout), byref(out))
        return self._result_from(st, out)

    def done(self) -> bool:
        return self.status() is not None

    def cancel(self):
        _check(api().op_cancel(self.handle))

    def release(self):
        """Frees the handle of a completed operation (raises Busy while it runs)."""
        if self.handle:
            _check(api().op_release(self.handle))
            self.ctx._ops.pop(self.handle, None)
            self.handle = 0


class PushOp(Op):
    """An asynchronous P/D push."""

    def __init__(self, ctx: "Context", handle: int, transfer_id: bytes):
        super().__init__(ctx, handle)
        self.transfer_id = transfer_id


class StoreOp(Op):
    """A save or a load. Failed blocks: ``src_block`` is the cache block of
    a save (``dst_block`` is NO_BLOCK), the lookup entry of a load
    (``dst_block`` is the cache block)."""

    def __init__(self, ctx: "Context", handle: int, kind: str, blocks: Sequence[int]):
        super().__init__(ctx, handle)
        self.kind = kind
        self.blocks = list(blocks)

    def save_layer(self, layer: int):
        """Per-layer save: layer ``layer`` of every block is written."""
        _check(api().save_layer(self.handle, layer))

    def layer_ready(self, layer: int, timeout: float) -> bool:
        """Load: True once layer ``layer`` is in place for every block that
        loads (or the load ended); False if still not after ``timeout``."""
        st = api().layer_ready(self.handle, layer, _ms(timeout))
        if st == _abi.STATUS_OK:
            return True
        if st in (_abi.STATUS_NOT_READY, _abi.STATUS_TIMEOUT):
            return False
        raise from_status(st, last_error())


@dataclass
class Namespace:
    """What makes KV bytes of the same tokens differ, besides the layout
    (whose dtype and fingerprint the keys include)."""

    model_id: str
    tp_rank: int = 0
    weight_version: str = ""

    def _c(self):
        self._m = self.model_id.encode()
        self._w = self.weight_version.encode()
        return _abi.Namespace(struct_size=ctypes.sizeof(_abi.Namespace), tp_rank=self.tp_rank,
                              model_id=self._m, weight_version=self._w)


def _keys_array(keys: Sequence[bytes]):
    arr = (_abi.BlockKey * max(len(keys), 1))()
    for i, k in enumerate(keys):
        if len(k) != 32:
            raise ValueError(f"key {i} has {len(k)} bytes, keys have 32")
        arr[i].bytes[:] = k
    return arr


class Lookup:
    """The longest stored prefix of a key list, leased: its blocks stay
    stored until ``release()`` (or ``with`` exit) or the lease's end."""

    def __init__(self, cache: "KvCache", handle: int, keys: List[bytes], count: int):
        self.cache = cache
        self.handle = handle
        self.keys = keys[:count]
        self.count = count

    def load(self, dst_blocks: Sequence[int], first: int = 0) -> StoreOp:
        """Loads lookup entries ``first..first+len(dst_blocks)`` into
        ``dst_blocks`` of the cache, asynchronously and layer by layer."""
        out = _abi.Handle()
        _check(api().load(self.handle, first, _blocks(dst_blocks), len(dst_blocks), byref(out)))
        op = StoreOp(self.cache.ctx, out.value, "load", dst_blocks)
        self.cache.ctx._ops[op.handle] = op
        return op

    def release(self):
        if self.handle:
            h, self.handle = self.handle, 0
            _check(api().lookup_release(h))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


class RemoteCache:
    """A peer's KV cache imported into a context (the push destination)."""

    def __init__(self, ctx: "Context", handle: int):
        self.ctx = ctx
        self.handle = handle

    def release(self):
        if self.handle:
            h, self.handle = self.handle, 0
            _check(api().remote_cache_release(h))


def _pointer_of(buf) -> tuple:
    """(address, length, keepalive) of an int address or a writable buffer."""
    if isinstance(buf, int):
        raise TypeError("pass lens= with integer addresses")
    c = (ctypes.c_char * memoryview(buf).nbytes).from_buffer(buf)
    return ctypes.addressof(c), len(c), c


class KvCache:
    """A KV cache registered in a context. Host memory today; GPU memory
    (``memory="gpu"``) is accepted by the API and refused with Unsupported
    until the engine has CUDA support."""

    def __init__(self, ctx: "Context", layout: Layout, handle: int, keepalive):
        self.ctx = ctx
        self.layout = layout
        self.handle = handle
        self._keepalive = keepalive

    def export(self) -> bytes:
        """The descriptor a peer imports to push into this cache."""
        n = c_size_t()
        api().kv_cache_export(self.handle, None, 0, byref(n))
        if n.value == 0:
            _check(api().kv_cache_export(self.handle, None, 0, byref(n)))
        buf = (c_uint8 * n.value)()
        _check(api().kv_cache_export(self.handle, buf, n.value, byref(n)))
        return bytes(buf[: n.value])

    def push(self, remote: RemoteCache, src_blocks: Sequence[int], dst_blocks: Sequence[int],
             transfer_id: Union[bytes, str], timeout: float = 0.0) -> PushOp:
        """Writes ``src_blocks[i]`` into ``dst_blocks[i]`` of ``remote`` (every
        layer), then notifies its owner with ``transfer_id``. Blocks outside
        either cache raise OutOfRange before any byte moves."""
        tid = transfer_id.encode() if isinstance(transfer_id, str) else bytes(transfer_id)
        if len(src_blocks) != len(dst_blocks):
            raise ValueError(
                f"{len(src_blocks)} source blocks, {len(dst_blocks)} destination blocks")
        tbuf = (c_uint8 * len(tid)).from_buffer_copy(tid) if tid else None
        out = _abi.Handle()
        _check(api().push(self.handle, remote.handle, _blocks(src_blocks), _blocks(dst_blocks),
                          len(src_blocks), tbuf, len(tid), _ms(timeout), byref(out)))
        op = PushOp(self.ctx, out.value, tid)
        self.ctx._ops[op.handle] = op
        return op

    # --- the peer store (caches of a StoreContext) ---

    def lookup(self, keys: Sequence[bytes], lease: float = 0.0, timeout: float = 10.0) -> Lookup:
        """Finds the longest stored prefix of ``keys`` and leases it for
        ``lease`` seconds (0: the context default): a load started before
        the lease ends delivers every block it reports."""
        keys = [bytes(k) for k in keys]
        arr = _keys_array(keys)
        out = _abi.Handle()
        found = c_size_t()
        _check(api().lookup(self.handle, arr, len(keys), _ms(lease), _ms(timeout), byref(out),
                            byref(found)))
        return Lookup(self, out.value, keys, found.value)

    def save(self, blocks: Sequence[int], keys: Sequence[bytes], per_layer: bool = False) -> StoreOp:
        """Saves ``blocks[i]`` under ``keys[i]``, asynchronously. With
        ``per_layer`` call ``op.save_layer(l)`` as each layer is written."""
        if len(blocks) != len(keys):
            raise ValueError(f"{len(blocks)} blocks and {len(keys)} keys")
        out = _abi.Handle()
        flags = _abi.SAVE_PER_LAYER if per_layer else 0
        _check(api().save(self.handle, _blocks(blocks), _keys_array(keys), len(blocks), flags, 0,
                          byref(out)))
        op = StoreOp(self.ctx, out.value, "save", blocks)
        self.ctx._ops[op.handle] = op
        return op

    def deregister(self, timeout: float = 5.0):
        """Refuses new transfers, waits for those in flight (bounded)."""
        if self.handle:
            _check(api().kv_cache_deregister(self.handle, _ms(timeout)))
            self.handle = 0
            self._keepalive = None


def _engine_config(transport, tcp_listen, tcp_conns, io_threads, default_timeout):
    if transport not in _abi.TRANSPORTS:
        raise ValueError(f"transport {transport!r} is not one of {sorted(_abi.TRANSPORTS)}")
    listen = tcp_listen.encode() if tcp_listen else None
    cfg = _abi.ContextConfig(
        struct_size=ctypes.sizeof(_abi.ContextConfig),
        transport=_abi.TRANSPORTS[transport],
        tcp_listen=listen,
        tcp_conns=tcp_conns,
        io_threads=io_threads,
        default_timeout_ms=_ms(default_timeout),
    )
    return cfg, listen


class Context:
    """One transfer engine. Thread-safe; close() (or ``with``) releases
    everything created from it."""

    def __init__(self, transport: str = "auto", tcp_listen: Optional[str] = None,
                 tcp_conns: int = 0, io_threads: int = 0, default_timeout: float = 0.0):
        cfg, self._listen = _engine_config(transport, tcp_listen, tcp_conns, io_threads,
                                           default_timeout)
        h = _abi.Handle()
        _check(api().context_create(byref(cfg), byref(h)))
        self.handle = h.value
        self._ops: dict = {}

    @property
    def engine_id(self) -> bytes:
        out = (c_uint8 * 16)()
        _check(api().context_engine_id(self.handle, out))
        return bytes(out)

    def register_kv_cache(self, layout: Layout, buffers: Iterable, lens: Optional[Sequence[int]] = None,
                          memory: str = "host", device: int = 0) -> KvCache:
        """Registers one base region per entry of ``buffers``: writable
        Python buffers (bytearray, numpy arrays, ...), or integer addresses
        with ``lens``. The memory must stay valid until deregistration."""
        buffers = list(buffers)
        keep = []
        if lens is None:
            ptrs, ls = [], []
            for b in buffers:
                p, n, k = _pointer_of(b)
                ptrs.append(p)
                ls.append(n)
                keep.append(k)
        else:
            ptrs, ls = [int(p) for p in buffers], [int(n) for n in lens]
            if len(ptrs) != len(ls):
                raise ValueError(f"{len(ptrs)} addresses, {len(ls)} lengths")
        kinds = {"host": _abi.MEMORY_HOST, "host_pinned": _abi.MEMORY_HOST_PINNED,
                 "gpu": _abi.MEMORY_GPU}
        if memory not in kinds:
            raise ValueError(f"memory {memory!r} is not one of {sorted(kinds)}")
        n = len(ptrs)
        bases = (c_void_p * n)(*ptrs)
        lens_arr = (c_uint64 * n)(*ls)
        out = _abi.Handle()
        _check(api().kv_cache_register(self.handle, layout.handle, bases, lens_arr, n,
                                       kinds[memory], device, byref(out)))
        return KvCache(self, layout, out.value, keep)

    def import_remote(self, desc: bytes) -> RemoteCache:
        buf = (c_uint8 * len(desc)).from_buffer_copy(desc) if desc else None
        out = _abi.Handle()
        _check(api().remote_cache_import(self.handle, buf, len(desc), byref(out)))
        return RemoteCache(self, out.value)

    def poll(self, max_ops: int = 64) -> list:
        """Pushes of this context that completed since last reported."""
        out = (_abi.Handle * max_ops)()
        n = c_size_t()
        _check(api().poll(self.handle, out, max_ops, byref(n)))
        return [self._ops[h] for h in out[: n.value] if h in self._ops]

    def fence(self, timeout: float):
        """Waits until every push started so far has completed (raises
        Timeout otherwise)."""
        _check(api().fence(self.handle, _ms(timeout)))

    def stats(self) -> dict:
        s = _abi.Stats(struct_size=ctypes.sizeof(_abi.Stats))
        _check(api().stats(self.handle, byref(s)))
        return {name: getattr(s, name) for name, _ in _abi.Stats._fields_
                if name not in ("struct_size", "reserved")}

    def poll_received(self, max_items: int = 64) -> list:
        """Pushes received by this context (each once, after its bytes landed)."""
        out = (_abi.Received * max_items)()
        n = c_size_t()
        _check(api().poll_received(self.handle, out, max_items, byref(n)))
        return [
            ReceivedPush(bytes(r.transfer_id[: r.transfer_id_len]), r.blocks, bytes(r.from_engine))
            for r in out[: n.value]
        ]

    def close(self, timeout: float = 5.0):
        """Cancels pushes, deregisters caches and releases every handle."""
        if self.handle:
            _check(api().context_destroy(self.handle, _ms(timeout)))
            self.handle = 0
            self._ops.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close(1.0)
        except Exception:
            pass


class StoreContext(Context):
    """A context that is also a peer of the store swarm: the store client.

    ``mem_bytes > 0`` makes it hold objects for the swarm; ``bootstrap``
    (addresses from another peer's ``addrs``, or a string of them) joins
    an existing swarm. KV caches registered in it get ``lookup``,
    ``save`` and ``load``; ``put``/``get`` move small objects."""

    def __init__(self, *, bootstrap=None, mem_bytes: int = 0, listen: Optional[str] = None,
                 psk: Optional[str] = None, replicas: int = 1, staging_bytes: int = 0,
                 default_lease: float = 0.0, op_timeout: float = 0.0, mdns: bool = False,
                 threads: int = 0, transport: str = "auto", tcp_listen: Optional[str] = None,
                 tcp_conns: int = 0, io_threads: int = 0, default_timeout: float = 0.0):
        ecfg, self._listen = _engine_config(transport, tcp_listen, tcp_conns, io_threads,
                                            default_timeout)
        if bootstrap is not None and not isinstance(bootstrap, str):
            bootstrap = "\n".join(bootstrap)
        self._strings = [x.encode() if x else None for x in (listen, bootstrap, psk)]
        cfg = _abi.StoreConfig(
            struct_size=ctypes.sizeof(_abi.StoreConfig),
            replicas=replicas,
            engine=ctypes.pointer(ecfg),
            listen=self._strings[0],
            bootstrap=self._strings[1],
            psk=self._strings[2],
            mem_bytes=mem_bytes,
            staging_bytes=staging_bytes,
            default_lease_ms=_ms(default_lease),
            op_timeout_ms=_ms(op_timeout),
            mdns=1 if mdns else 0,
            threads=threads,
        )
        h = _abi.Handle()
        _check(api().store_context_create(byref(cfg), byref(h)))
        self.handle = h.value
        self._ops = {}

    @property
    def addrs(self) -> List[str]:
        """Listen addresses ending in /p2p/<peer id>: a bootstrap for others."""
        n = c_size_t()
        api().store_addrs(self.handle, None, 0, byref(n))
        buf = ctypes.create_string_buffer(n.value + 1)
        _check(api().store_addrs(self.handle, buf, len(buf), byref(n)))
        return buf.value.decode().split("\n")

    def wait_members(self, n: int, timeout: float):
        """Waits until ``n`` peers that hold objects are live (raises Timeout)."""
        _check(api().store_wait_members(self.handle, n, _ms(timeout)))

    def put(self, key: bytes, data: bytes, timeout: float = 10.0):
        """Stores a small object under a 32-byte key (idempotent)."""
        k = _keys_array([key])
        buf = (c_uint8 * len(data)).from_buffer_copy(data) if data else None
        _check(api().store_put(self.handle, k, buf, len(data), _ms(timeout)))

    def get(self, key: bytes, timeout: float = 10.0) -> Optional[bytes]:
        """The object stored under ``key``, or None if no live peer holds it."""
        k = _keys_array([key])
        n = c_size_t()
        cap = 4096
        while True:
            buf = (c_uint8 * cap)()
            st = api().store_get(self.handle, k, buf, cap, byref(n), _ms(timeout))
            if st == _abi.STATUS_NOT_FOUND:
                return None
            if st == _abi.STATUS_BUFFER_TOO_SMALL and n.value > cap:
                cap = n.value
                continue
            _check(st)
            return bytes(buf[: n.value])

    def store_stats(self) -> dict:
        s = _abi.StoreStats(struct_size=ctypes.sizeof(_abi.StoreStats))
        _check(api().store_stats(self.handle, byref(s)))
        return {name: getattr(s, name) for name, _ in _abi.StoreStats._fields_
                if name not in ("struct_size", "reserved")}
