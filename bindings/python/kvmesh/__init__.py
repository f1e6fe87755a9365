"""kvmesh: move LLM KV-cache pages between workers and peers.

Pure Python over ``libkvmesh.so`` (ctypes; no compiled extension). The
library is found through ``$KVMESH_LIB``, next to this package, or in the
repository's ``target/`` (build it with ``cargo build --release -p
kvmesh-cabi``); ``kvmesh.load_library(path)`` picks one explicitly.

KV layouts, KV caches in host memory, P/D push of a request's blocks into
a remote worker's KV cache with a transfer-id notification, and the peer
store (ABI 1.1): ``StoreContext`` is a store peer and client; its KV caches
look up (leased), save and load blocks keyed by prefix keys.

Connectors: ``kvmesh.vllm.KvMeshConnector`` (vLLM V1 KV connector) and
``kvmesh.trtllm`` (TensorRT-LLM's KV cache connector scheduler and worker).
"""

from ._abi import (
    ABI_MAJOR,
    ABI_MINOR,
    CAP_GPU_MEMORY,
    CAP_HOST_MEMORY,
    CAP_LOAD,
    CAP_LOOKUP,
    CAP_PUSH,
    CAP_SAVE,
    LibraryNotFound,
)
from .core import (
    BlockFailure,
    Context,
    KvCache,
    Layout,
    Lookup,
    Namespace,
    Op,
    OpResult,
    PushOp,
    PushResult,
    ReceivedPush,
    RemoteCache,
    StoreContext,
    StoreOp,
    capabilities,
    last_error,
    load_library,
    status_name,
)
from .errors import *  # noqa: F401,F403
from .errors import KvmeshError

__all__ = [
    "ABI_MAJOR",
    "ABI_MINOR",
    "CAP_GPU_MEMORY",
    "CAP_HOST_MEMORY",
    "CAP_LOAD",
    "CAP_LOOKUP",
    "CAP_PUSH",
    "CAP_SAVE",
    "BlockFailure",
    "Context",
    "KvCache",
    "KvmeshError",
    "Layout",
    "LibraryNotFound",
    "Lookup",
    "Namespace",
    "Op",
    "OpResult",
    "PushOp",
    "PushResult",
    "ReceivedPush",
    "RemoteCache",
    "StoreContext",
    "StoreOp",
    "capabilities",
    "last_error",
    "load_library",
    "status_name",
]
