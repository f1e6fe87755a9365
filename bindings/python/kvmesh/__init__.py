"""kvmesh: move LLM KV-cache pages between workers and peers.

Pure Python over ``libkvmesh.so`` (ctypes; no compiled extension). The
library is found through ``$KVMESH_LIB``, next to this package, or in the
repository's ``target/`` (build it with ``cargo build --release -p
kvmesh-cabi``); ``kvmesh.load_library(path)`` picks one explicitly.

Today: KV layouts, KV caches in host memory, and P/D push of a request's
blocks into a remote worker's KV cache with a transfer-id notification.
The prefix store (lookup/save/load) arrives with a later ABI minor version
(capability bits ``CAP_LOOKUP``, ``CAP_SAVE``, ``CAP_LOAD``).
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
    PushOp,
    PushResult,
    ReceivedPush,
    RemoteCache,
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
    "PushOp",
    "PushResult",
    "ReceivedPush",
    "RemoteCache",
    "capabilities",
    "last_error",
    "load_library",
    "status_name",
]
