"""ctypes mirror of plugin/include/kvmesh.h (ABI 1.1) and the library loader.

Nothing here is compiled: the shared library is found and loaded with
ctypes, its single exported symbol ``kvmesh_get_api`` fills a function
table, and every call goes through that table.
"""

from __future__ import annotations

import ctypes
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

ABI_MAJOR = 1
ABI_MINOR = 1

CAP_HOST_MEMORY = 1 << 0
CAP_GPU_MEMORY = 1 << 1
CAP_PUSH = 1 << 2
CAP_LOOKUP = 1 << 3
CAP_SAVE = 1 << 4
CAP_LOAD = 1 << 5
SAVE_PER_LAYER = 1
NO_BLOCK = 0xFFFFFFFF
MAX_OBJECT_BYTES = 64 << 20

DTYPES = {"f32": 0, "f16": 1, "bf16": 2, "fp8_e4m3": 3, "fp8_e5m2": 4}
DTYPE_SIZE = {"f32": 4, "f16": 2, "bf16": 2, "fp8_e4m3": 1, "fp8_e5m2": 1}
KIND_KEY_VALUE = 0
KIND_LATENT = 1
PLACEMENT_PER_LAYER = 0
PLACEMENT_ONE_REGION = 1
MEMORY_HOST = 0
MEMORY_HOST_PINNED = 1
MEMORY_GPU = 2
TRANSPORTS = {"auto": 0, "tcp": 1, "shm": 2}
OP_PENDING = 0
OP_DONE = 1
MAX_TRANSFER_ID = 256

STATUS_OK = 0
STATUS_NOT_READY = 1
STATUS_BUFFER_TOO_SMALL = -5
STATUS_TIMEOUT = -8
STATUS_NOT_FOUND = -17

Status = c_int32
Handle = c_uint64


class ContextConfig(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("transport", c_uint32),
        ("tcp_listen", c_char_p),
        ("tcp_conns", c_uint32),
        ("io_threads", c_uint32),
        ("default_timeout_ms", c_uint64),
    ]


class LayoutSpec(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("num_layers", c_uint32),
        ("num_blocks", c_uint32),
        ("block_size", c_uint32),
        ("num_kv_heads", c_uint32),
        ("head_size", c_uint32),
        ("dtype", c_uint32),
        ("kind", c_uint32),
        ("placement", c_uint32),
        ("reserved", c_uint32),
        ("layer_stride", c_uint64),
        ("block_stride", c_uint64),
        ("kv_stride", c_uint64),
        ("token_stride", c_uint64),
        ("head_stride", c_uint64),
    ]


class OpStatus(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("state", c_uint32),
        ("status", c_int32),
        ("reserved", c_uint32),
        ("bytes", c_uint64),
        ("failed_blocks", c_uint64),
    ]


class BlockFailure(Structure):
    _fields_ = [
        ("index", c_uint32),
        ("src_block", c_uint32),
        ("dst_block", c_uint32),
        ("status", c_int32),
    ]


class Received(Structure):
    _fields_ = [
        ("from_engine", c_uint8 * 16),
        ("blocks", c_uint32),
        ("transfer_id_len", c_uint32),
        ("transfer_id", c_uint8 * 256),
    ]


class Stats(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("reserved", c_uint32),
        ("pushes_submitted", c_uint64),
        ("pushes_succeeded", c_uint64),
        ("pushes_failed", c_uint64),
        ("bytes_pushed", c_uint64),
        ("blocks_pushed", c_uint64),
        ("pushes_received", c_uint64),
        ("ops_in_flight", c_uint64),
        ("kv_caches", c_uint64),
    ]


class StoreConfig(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("replicas", c_uint32),
        ("engine", POINTER(ContextConfig)),
        ("listen", c_char_p),
        ("bootstrap", c_char_p),
        ("psk", c_char_p),
        ("mem_bytes", c_uint64),
        ("staging_bytes", c_uint64),
        ("default_lease_ms", c_uint64),
        ("op_timeout_ms", c_uint64),
        ("mdns", c_uint32),
        ("threads", c_uint32),
    ]


class Namespace(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("tp_rank", c_uint32),
        ("model_id", c_char_p),
        ("weight_version", c_char_p),
    ]


class BlockKey(Structure):
    _fields_ = [("bytes", c_uint8 * 32)]


class StoreStats(Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("reserved", c_uint32),
        ("peers_alive", c_uint64),
        ("objects", c_uint64),
        ("bytes_stored", c_uint64),
        ("capacity", c_uint64),
        ("lookups", c_uint64),
        ("lookup_blocks", c_uint64),
        ("hit_blocks", c_uint64),
        ("saves", c_uint64),
        ("blocks_saved", c_uint64),
        ("blocks_save_skipped", c_uint64),
        ("bytes_saved", c_uint64),
        ("loads", c_uint64),
        ("blocks_loaded", c_uint64),
        ("bytes_loaded", c_uint64),
        ("blocks_failed", c_uint64),
        ("lookups_open", c_uint64),
    ]


P = POINTER
Api_fields = [
    ("struct_size", c_uint32),
    ("abi_major", c_uint16),
    ("abi_minor", c_uint16),
    ("capabilities", c_uint64),
    ("last_error", CFUNCTYPE(Status, P(c_char), c_size_t, P(c_size_t))),
    ("status_name", CFUNCTYPE(Status, c_int32, P(c_char_p))),
    ("context_create", CFUNCTYPE(Status, P(ContextConfig), P(Handle))),
    ("context_destroy", CFUNCTYPE(Status, Handle, c_uint64)),
    ("context_engine_id", CFUNCTYPE(Status, Handle, P(c_uint8))),
    ("layout_create", CFUNCTYPE(Status, P(LayoutSpec), P(Handle))),
    ("layout_destroy", CFUNCTYPE(Status, Handle)),
    ("layout_fingerprint", CFUNCTYPE(Status, Handle, P(c_uint8))),
    ("layout_region_lens", CFUNCTYPE(Status, Handle, P(c_uint64), c_size_t, P(c_size_t))),
    (
        "kv_cache_register",
        CFUNCTYPE(
            Status, Handle, Handle, P(c_void_p), P(c_uint64), c_size_t, c_uint32, c_uint32, P(Handle)
        ),
    ),
    ("kv_cache_deregister", CFUNCTYPE(Status, Handle, c_uint64)),
    ("kv_cache_export", CFUNCTYPE(Status, Handle, P(c_uint8), c_size_t, P(c_size_t))),
    ("remote_cache_import", CFUNCTYPE(Status, Handle, P(c_uint8), c_size_t, P(Handle))),
    ("remote_cache_release", CFUNCTYPE(Status, Handle)),
    (
        "push",
        CFUNCTYPE(
            Status,
            Handle,
            Handle,
            P(c_uint32),
            P(c_uint32),
            c_size_t,
            P(c_uint8),
            c_size_t,
            c_uint64,
            P(Handle),
        ),
    ),
    ("op_status", CFUNCTYPE(Status, Handle, P(OpStatus))),
    ("op_wait", CFUNCTYPE(Status, Handle, c_uint64, P(OpStatus))),
    ("op_failed_blocks", CFUNCTYPE(Status, Handle, P(BlockFailure), c_size_t, P(c_size_t))),
    ("op_cancel", CFUNCTYPE(Status, Handle)),
    ("op_release", CFUNCTYPE(Status, Handle)),
    ("poll", CFUNCTYPE(Status, Handle, P(Handle), c_size_t, P(c_size_t))),
    ("fence", CFUNCTYPE(Status, Handle, c_uint64)),
    ("stats", CFUNCTYPE(Status, Handle, P(Stats))),
    ("poll_received", CFUNCTYPE(Status, Handle, P(Received), c_size_t, P(c_size_t))),
    # ---- ABI 1.1: the peer store ----
    ("store_context_create", CFUNCTYPE(Status, P(StoreConfig), P(Handle))),
    ("store_addrs", CFUNCTYPE(Status, Handle, P(c_char), c_size_t, P(c_size_t))),
    ("store_wait_members", CFUNCTYPE(Status, Handle, c_uint32, c_uint64)),
    (
        "block_keys_from_tokens",
        CFUNCTYPE(Status, Handle, P(Namespace), P(c_uint32), c_size_t, P(BlockKey), c_size_t,
                  P(c_size_t)),
    ),
    (
        "block_keys_from_hashes",
        CFUNCTYPE(Status, Handle, P(Namespace), P(c_uint8), c_size_t, c_size_t, P(BlockKey),
                  c_size_t, P(c_size_t)),
    ),
    (
        "lookup",
        CFUNCTYPE(Status, Handle, P(BlockKey), c_size_t, c_uint64, c_uint64, P(Handle),
                  P(c_size_t)),
    ),
    ("lookup_release", CFUNCTYPE(Status, Handle)),
    (
        "save",
        CFUNCTYPE(Status, Handle, P(c_uint32), P(BlockKey), c_size_t, c_uint32, c_uint64,
                  P(Handle)),
    ),
    ("save_layer", CFUNCTYPE(Status, Handle, c_uint32)),
    ("load", CFUNCTYPE(Status, Handle, c_size_t, P(c_uint32), c_size_t, P(Handle))),
    ("layer_ready", CFUNCTYPE(Status, Handle, c_uint32, c_uint64)),
    ("store_stats", CFUNCTYPE(Status, Handle, P(StoreStats))),
    ("store_put", CFUNCTYPE(Status, Handle, P(BlockKey), P(c_uint8), c_size_t, c_uint64)),
    (
        "store_get",
        CFUNCTYPE(Status, Handle, P(BlockKey), P(c_uint8), c_size_t, P(c_size_t), c_uint64),
    ),
]


class Api(Structure):
    _fields_ = Api_fields


LIB_NAME = "libkvmesh.so"


def candidate_paths() -> list[Path]:
    """Where the library is looked for, in order."""
    out: list[Path] = []
    env = os.environ.get("KVMESH_LIB")
    if env:
        out.append(Path(env))
    here = Path(__file__).resolve().parent
    out.append(here / LIB_NAME)
    roots = []
    if os.environ.get("CARGO_TARGET_DIR"):
        roots.append(Path(os.environ["CARGO_TARGET_DIR"]))
    # bindings/python/kvmesh -> repository root
    repo = here.parent.parent.parent
    roots.append(repo / "target")
    for root in roots:
        out.append(root / "release" / LIB_NAME)
        out.append(root / "debug" / LIB_NAME)
    return out


class LibraryNotFound(ImportError):
    pass


def load(path: str | os.PathLike[str] | None = None) -> tuple[ctypes.CDLL, Api]:
    """Loads the library and returns (library, function table).

    With no ``path``: ``$KVMESH_LIB``, then ``libkvmesh.so`` next to this
    package, then ``$CARGO_TARGET_DIR`` and the repository's ``target/``
    (release before debug).
    """
    if path is not None:
        paths = [Path(path)]
        if not paths[0].exists():
            raise LibraryNotFound(f"{path} does not exist")
    else:
        if os.environ.get("KVMESH_LIB") and not Path(os.environ["KVMESH_LIB"]).exists():
            raise LibraryNotFound(f"KVMESH_LIB={os.environ['KVMESH_LIB']} does not exist")
        paths = [p for p in candidate_paths() if p.exists()]
        if not paths:
            tried = "\n  ".join(str(p) for p in candidate_paths())
            raise LibraryNotFound(
                f"{LIB_NAME} not found; tried:\n  {tried}\n"
                "Build it with `cargo build --release -p kvmesh-cabi` or set KVMESH_LIB."
            )
    lib = ctypes.CDLL(str(paths[0]), mode=ctypes.RTLD_LOCAL)
    get_api = lib.kvmesh_get_api
    get_api.restype = Status
    get_api.argtypes = [c_uint32, c_uint32, P(Api)]
    api = Api()
    st = get_api(ABI_MAJOR, ctypes.sizeof(Api), ctypes.byref(api))
    if st != STATUS_OK:
        # The table was not filled, so there is no last_error to read.
        raise ImportError(
            f"{paths[0]}: kvmesh_get_api(ABI {ABI_MAJOR}, {ctypes.sizeof(Api)} bytes) "
            f"returned status {st}"
        ) from None
    return lib, api
