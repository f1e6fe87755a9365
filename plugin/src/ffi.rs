//! The C ABI of `libkvmesh.so`.
//!
//! Exactly one exported symbol, [`kvmesh_get_api`], fills a versioned
//! function table ([`KvmeshApi`]): ABI major/minor, capability bits and
//! function pointers. Everything else is reached through the table.
//!
//! ```text
//!  kvmesh_get_api(KVMESH_ABI_MAJOR, sizeof(KvmeshApi), &api)
//!  api.context_create ─► context ──┬─ kv_cache_register(layout, host pointers) ─► kv cache
//!                                  ├─ remote_cache_import(descriptor bytes)   ─► remote cache
//!                                  ├─ push(cache, remote, blocks, transfer id) ─► op
//!                                  │     op_status / op_wait / op_failed_blocks / op_cancel / op_release
//!                                  ├─ poll (completed ops) · fence (deadline) · stats
//!                                  └─ poll_received (transfer ids pushed into this context)
//!
//!  ABI 1.1, the peer store:
//!  api.store_context_create ─► context that is also a store peer (a swarm member)
//!       block_keys_from_tokens / block_keys_from_hashes (layout, namespace) ─► 32-byte keys
//!       lookup(cache, keys, lease) ─► lookup (longest stored prefix, leased)
//!       load(lookup, blocks) ─► op; layer_ready(op, layer, deadline)
//!       save(cache, blocks, keys, per-layer?) ─► op; save_layer(op, layer)
//!       store_put / store_get (small objects) · store_stats · store_addrs
//! ```
//!
//! Rules every entry point follows:
//! - returns a [`KvmeshStatus`]; on failure a message is kept per thread
//!   (`last_error`);
//! - handles are opaque 64-bit values from a table with generation
//!   counters: a null, unknown, stale (destroyed) or wrong-type handle is
//!   refused with `KVMESH_STATUS_INVALID_HANDLE`, never dereferenced;
//! - input structs start with `struct_size`, checked against the sizes
//!   this library knows; null pointers are refused;
//! - no Rust panic crosses the boundary (caught, reported as
//!   `KVMESH_STATUS_INTERNAL`);
//! - thread-safe; nothing blocks without a deadline argument.
//!
//! Versioning: a new minor version only appends fields to the table (and
//! values to enums) and sets new capability bits. ABI 1.1 appends the peer
//! store after `poll_received`: store contexts, block keys, `lookup`,
//! `save`, `load`, `layer_ready` (capability bits [`KVMESH_CAP_LOOKUP`],
//! [`KVMESH_CAP_SAVE`], [`KVMESH_CAP_LOAD`]) and three statuses
//! (`NOT_FOUND`, `INTEGRITY`, `NO_SPACE`). A caller built against 1.0 asks
//! for the 1.0 table size and gets the 1.0 table.
//!
//! The header `include/kvmesh.h` is generated from this file by cbindgen
//! (`tests/header.rs` fails when it is stale).

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_gpu::{Engine, EngineConfig, ErrorKind, MemoryKind, TransportKind};
use kvmesh_p2p_store::{ObjectKey, PutOptions, StoreConfig};
use parking_lot::Mutex;

use crate::cache::{KvCache, KvCacheDesc, RemoteKvCache};
use crate::error::Error;
use crate::keys::{BlockKey, ExtraKeys, KeyNamespace};
use crate::layout::{
    BlockShape, DType, KvKind, KvLayout, KvLayoutSpec, LayerPlacement, LayoutError, Strides,
};
use crate::node::StoreNode;
use crate::prefix::{
    BlockErrorKind, Lookup, PrefixStats, PrefixStore, PrefixStoreConfig, StoreOp, StoreOpStatus,
};
use crate::push::{Push, PushInbox, PushStatus, MAX_TRANSFER_ID};

/// ABI major version: bumped on incompatible change.
pub const KVMESH_ABI_MAJOR: u32 = 1;
/// ABI minor version: bumped when fields are appended to the table.
pub const KVMESH_ABI_MINOR: u32 = 1;

/// Host (CPU) memory KV caches can be registered.
pub const KVMESH_CAP_HOST_MEMORY: u64 = 1 << 0;
/// GPU memory KV caches can be registered (not in this build).
pub const KVMESH_CAP_GPU_MEMORY: u64 = 1 << 1;
/// `push`, `poll_received`: P/D transfers between KV caches.
pub const KVMESH_CAP_PUSH: u64 = 1 << 2;
/// `store_context_create`, block keys and `lookup` of stored prefixes (ABI 1.1).
pub const KVMESH_CAP_LOOKUP: u64 = 1 << 3;
/// `save` of blocks to the peer store, with `save_layer` (ABI 1.1).
pub const KVMESH_CAP_SAVE: u64 = 1 << 4;
/// `load` of stored blocks, with `layer_ready` (ABI 1.1).
pub const KVMESH_CAP_LOAD: u64 = 1 << 5;

/// `save` flags: the caller signals each written layer with `save_layer`.
pub const KVMESH_SAVE_PER_LAYER: u32 = 1;
/// `KvmeshBlockFailure::dst_block` of a save (the destination is an object).
pub const KVMESH_NO_BLOCK: u32 = u32::MAX;

/// `KvmeshLayoutSpec::dtype` values.
pub const KVMESH_DTYPE_F32: u32 = 0;
pub const KVMESH_DTYPE_F16: u32 = 1;
pub const KVMESH_DTYPE_BF16: u32 = 2;
pub const KVMESH_DTYPE_FP8_E4M3: u32 = 3;
pub const KVMESH_DTYPE_FP8_E5M2: u32 = 4;

/// `KvmeshLayoutSpec::kind`: K and V vectors per head.
pub const KVMESH_KIND_KEY_VALUE: u32 = 0;
/// `KvmeshLayoutSpec::kind`: one latent vector per token (MLA).
pub const KVMESH_KIND_LATENT: u32 = 1;

/// `KvmeshLayoutSpec::placement`: one base region per layer.
pub const KVMESH_PLACEMENT_PER_LAYER: u32 = 0;
/// `KvmeshLayoutSpec::placement`: all layers in one region, `layer_stride` apart.
pub const KVMESH_PLACEMENT_ONE_REGION: u32 = 1;

/// `kv_cache_register` memory kinds.
pub const KVMESH_MEMORY_HOST: u32 = 0;
pub const KVMESH_MEMORY_HOST_PINNED: u32 = 1;
pub const KVMESH_MEMORY_GPU: u32 = 2;

/// `KvmeshContextConfig::transport` values.
pub const KVMESH_TRANSPORT_AUTO: u32 = 0;
pub const KVMESH_TRANSPORT_TCP: u32 = 1;
pub const KVMESH_TRANSPORT_SHM: u32 = 2;

/// `KvmeshOpStatus::state` values.
pub const KVMESH_OP_PENDING: u32 = 0;
pub const KVMESH_OP_DONE: u32 = 1;

/// Longest transfer id (bytes).
pub const KVMESH_MAX_TRANSFER_ID: u32 = 256;
/// Bytes of an engine id (`context_engine_id`, `KvmeshReceived::from_engine`).
pub const KVMESH_ENGINE_ID_BYTES: u32 = 16;
/// Bytes of a layout fingerprint.
pub const KVMESH_FINGERPRINT_BYTES: u32 = 32;
/// Longest `store_put` object (bytes).
pub const KVMESH_MAX_OBJECT_BYTES: u64 = 64 << 20;

/// Result of every call. 0 is success, positive values are not errors,
/// negative values are.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmeshStatus {
    Ok = 0,
    /// The operation has not completed yet (not an error).
    NotReady = 1,
    /// An argument is out of its domain (see last_error).
    InvalidArgument = -1,
    /// A required pointer is NULL (or misaligned).
    NullPointer = -2,
    /// A handle is null, unknown, destroyed already, or of another type.
    InvalidHandle = -3,
    /// Wrong ABI major version or struct size.
    AbiMismatch = -4,
    /// An output buffer is too small; the needed length was written.
    BufferTooSmall = -5,
    /// The KV layout is inconsistent, or two layouts do not match.
    Layout = -6,
    /// A block id or layer is outside the registered KV cache.
    OutOfRange = -7,
    /// The deadline passed.
    Timeout = -8,
    /// Cancelled by the caller.
    Cancelled = -9,
    /// The connection to the peer was lost (peer died or closed).
    PeerLost = -10,
    /// The peer cannot be reached over the configured transport.
    Unreachable = -11,
    /// Not supported by this build (e.g. GPU memory without CUDA).
    Unsupported = -12,
    /// Still in use (operations in flight); try again later.
    Busy = -13,
    /// Local operating-system error.
    Io = -14,
    /// The peer refused the request (unknown region, authentication, protocol).
    Remote = -15,
    /// Internal error (a bug); the message says where.
    Internal = -16,
    /// Not stored (any more), or the lookup's lease ran out (ABI 1.1).
    NotFound = -17,
    /// Bytes did not match their checksum; nothing was trusted (ABI 1.1).
    Integrity = -18,
    /// No store peer had room (ABI 1.1).
    NoSpace = -19,
}

/// Handle of a context (one transfer engine).
pub type KvmeshContext = u64;
/// Handle of a validated KV layout.
pub type KvmeshLayout = u64;
/// Handle of a registered local KV cache.
pub type KvmeshKvCache = u64;
/// Handle of a peer's KV cache imported into a context.
pub type KvmeshRemoteCache = u64;
/// Handle of an asynchronous operation (push, save or load).
pub type KvmeshOp = u64;
/// Handle of a lookup: the longest stored prefix of a key list, leased (ABI 1.1).
pub type KvmeshLookup = u64;

/// Engine settings for `context_create`. Zero fields take the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshContextConfig {
    /// `sizeof(KvmeshContextConfig)`.
    pub struct_size: u32,
    /// `KVMESH_TRANSPORT_*`. With `KVMESH_TRANSPORT_TCP` the context also
    /// serves no shared memory to same-host peers, and allocates its host
    /// buffers on transparent huge pages instead.
    pub transport: u32,
    /// TCP listen address "host:port"; NULL for "127.0.0.1:0".
    pub tcp_listen: *const c_char,
    /// TCP connections per peer (0: 4).
    pub tcp_conns: u32,
    /// I/O threads (0: 2).
    pub io_threads: u32,
    /// Deadline of a push whose `timeout_ms` is 0 (0: 30000).
    pub default_timeout_ms: u64,
}

/// A KV layout: block shape plus byte strides (see the plugin's layout
/// documentation). `num_*`, `block_size` and `head_size` count elements;
/// strides are in bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshLayoutSpec {
    /// `sizeof(KvmeshLayoutSpec)`.
    pub struct_size: u32,
    pub num_layers: u32,
    pub num_blocks: u32,
    /// Tokens per block.
    pub block_size: u32,
    /// 1 for `KVMESH_KIND_LATENT`.
    pub num_kv_heads: u32,
    /// Elements per head vector (the latent size for MLA).
    pub head_size: u32,
    /// `KVMESH_DTYPE_*`.
    pub dtype: u32,
    /// `KVMESH_KIND_*`.
    pub kind: u32,
    /// `KVMESH_PLACEMENT_*`.
    pub placement: u32,
    /// Must be 0.
    pub reserved: u32,
    /// Bytes between layers (`KVMESH_PLACEMENT_ONE_REGION` only).
    pub layer_stride: u64,
    pub block_stride: u64,
    pub kv_stride: u64,
    pub token_stride: u64,
    pub head_stride: u64,
}

/// State of an operation.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshOpStatus {
    /// `sizeof(KvmeshOpStatus)`, set by the caller.
    pub struct_size: u32,
    /// `KVMESH_OP_*`.
    pub state: u32,
    /// The result once done: `KVMESH_STATUS_OK` or the failure.
    pub status: KvmeshStatus,
    pub reserved: u32,
    /// Bytes transferred.
    pub bytes: u64,
    /// Number of blocks that failed (`op_failed_blocks` lists them).
    pub failed_blocks: u64,
}

/// One block of an operation that failed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshBlockFailure {
    /// Entry in the operation's block lists.
    pub index: u32,
    pub src_block: u32,
    pub dst_block: u32,
    pub status: KvmeshStatus,
}

/// A push received by a context (all its bytes landed).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshReceived {
    /// Engine id of the sender (`context_engine_id` of its context).
    pub from_engine: [u8; 16],
    /// Number of blocks written.
    pub blocks: u32,
    pub transfer_id_len: u32,
    pub transfer_id: [u8; 256],
}

/// Counters of a context.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshStats {
    /// `sizeof(KvmeshStats)`, set by the caller.
    pub struct_size: u32,
    pub reserved: u32,
    pub pushes_submitted: u64,
    pub pushes_succeeded: u64,
    pub pushes_failed: u64,
    pub bytes_pushed: u64,
    pub blocks_pushed: u64,
    pub pushes_received: u64,
    /// Operations not yet completed.
    pub ops_in_flight: u64,
    /// Registered KV caches.
    pub kv_caches: u64,
}

/// Settings of `store_context_create` (ABI 1.1). Zero fields and NULL
/// pointers take the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshStoreConfig {
    /// `sizeof(KvmeshStoreConfig)`.
    pub struct_size: u32,
    /// Copies each saved block gets (0: 1).
    pub replicas: u32,
    /// Transfer engine settings; NULL for the defaults.
    pub engine: *const KvmeshContextConfig,
    /// libp2p listen multiaddr; NULL for "/ip4/127.0.0.1/tcp/0".
    pub listen: *const c_char,
    /// Peers to join through: multiaddrs separated by spaces, commas or
    /// newlines; NULL or "" for none (the first peer of a swarm).
    pub bootstrap: *const c_char,
    /// Pre-shared swarm key (the text of a swarm.key file); NULL for an
    /// open swarm.
    pub psk: *const c_char,
    /// DRAM this peer donates to the store; 0 for a peer that holds nothing.
    pub mem_bytes: u64,
    /// Host staging memory per KV cache for save and load (0: 64 MiB).
    pub staging_bytes: u64,
    /// Lease of a `lookup` whose `lease_ms` is 0 (0: 10000; at most 30000).
    pub default_lease_ms: u64,
    /// Deadline of a save or load, layer signals included (0: 30000).
    pub op_timeout_ms: u64,
    /// 1: find peers on the local network with mDNS.
    pub mdns: u32,
    /// Threads running the store's I/O (0: 2).
    pub threads: u32,
}

/// What makes KV bytes of the same tokens differ (ABI 1.1). The layout's
/// dtype and fingerprint are added by the key functions.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshNamespace {
    /// `sizeof(KvmeshNamespace)`.
    pub struct_size: u32,
    /// Tensor-parallel rank (each rank holds different heads).
    pub tp_rank: u32,
    /// Model identity (e.g. a Hugging Face repo id); not NULL.
    pub model_id: *const c_char,
    /// Weight revision; NULL for "".
    pub weight_version: *const c_char,
}

/// The 32-byte key of a block and of its whole prefix (ABI 1.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmeshBlockKey {
    pub bytes: [u8; 32],
}

/// Counters of a store context (ABI 1.1): the swarm as this peer sees it,
/// and lookups, saves and loads of its KV caches.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshStoreStats {
    /// `sizeof(KvmeshStoreStats)`, set by the caller.
    pub struct_size: u32,
    pub reserved: u32,
    /// Live store peers that hold objects.
    pub peers_alive: u64,
    /// Objects and bytes this peer holds, and its capacity.
    pub objects: u64,
    pub bytes_stored: u64,
    pub capacity: u64,
    pub lookups: u64,
    /// Keys asked about by lookups, and keys found (stored prefixes).
    pub lookup_blocks: u64,
    pub hit_blocks: u64,
    pub saves: u64,
    pub blocks_saved: u64,
    /// Blocks a save found stored already (not sent again).
    pub blocks_save_skipped: u64,
    pub bytes_saved: u64,
    pub loads: u64,
    pub blocks_loaded: u64,
    pub bytes_loaded: u64,
    /// Blocks of saves and loads that failed.
    pub blocks_failed: u64,
    /// Lookups still holding leases.
    pub lookups_open: u64,
}

/// The function table (ABI 1.1). Every function returns a `KvmeshStatus`;
/// `timeout_ms` arguments bound every wait.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshApi {
    /// Bytes of this table that are valid (the caller's `sizeof(KvmeshApi)`).
    pub struct_size: u32,
    pub abi_major: u16,
    pub abi_minor: u16,
    /// `KVMESH_CAP_*` bits.
    pub capabilities: u64,
    /// Copies the message of the last failed call on this thread into
    /// `buf` (NUL-terminated, truncated to `cap`) and its full length into
    /// `*len_out` (either pointer may be NULL). `KVMESH_STATUS_BUFFER_TOO_SMALL`
    /// if truncated. Does not change the last error.
    pub last_error:
        unsafe extern "C" fn(buf: *mut c_char, cap: usize, len_out: *mut usize) -> KvmeshStatus,
    /// Points `*out` at a static name of `status` ("KVMESH_STATUS_OK", ...).
    pub status_name: unsafe extern "C" fn(status: i32, out: *mut *const c_char) -> KvmeshStatus,
    /// Starts a context: a transfer engine with its listeners and threads.
    /// `config` may be NULL for the defaults.
    pub context_create: unsafe extern "C" fn(
        config: *const KvmeshContextConfig,
        out: *mut KvmeshContext,
    ) -> KvmeshStatus,
    /// Cancels the context's operations, deregisters its KV caches and
    /// releases every handle created from it, waiting up to `timeout_ms`.
    /// On `KVMESH_STATUS_TIMEOUT`/`BUSY` the context stays valid; call again.
    pub context_destroy: unsafe extern "C" fn(ctx: KvmeshContext, timeout_ms: u64) -> KvmeshStatus,
    /// Writes the context's 16-byte engine id (matches `KvmeshReceived::from_engine`).
    pub context_engine_id: unsafe extern "C" fn(ctx: KvmeshContext, out: *mut u8) -> KvmeshStatus,
    /// Validates a layout.
    pub layout_create:
        unsafe extern "C" fn(spec: *const KvmeshLayoutSpec, out: *mut KvmeshLayout) -> KvmeshStatus,
    pub layout_destroy: unsafe extern "C" fn(layout: KvmeshLayout) -> KvmeshStatus,
    /// Writes the 32-byte layout fingerprint (block shape and packed format).
    pub layout_fingerprint:
        unsafe extern "C" fn(layout: KvmeshLayout, out: *mut u8) -> KvmeshStatus,
    /// Writes the minimum byte length of each base region (one per layer,
    /// or one) into `out[0..cap]` and their number into `*len_out`.
    pub layout_region_lens: unsafe extern "C" fn(
        layout: KvmeshLayout,
        out: *mut u64,
        cap: usize,
        len_out: *mut usize,
    ) -> KvmeshStatus,
    /// Registers a KV cache in caller memory: `bases[r]`, `lens[r]` for
    /// each of the layout's `n_regions` base regions. `memory_kind` is
    /// `KVMESH_MEMORY_*` (`device` for GPU memory). The memory must stay
    /// valid until `kv_cache_deregister` (or `context_destroy`) returns OK.
    pub kv_cache_register: unsafe extern "C" fn(
        ctx: KvmeshContext,
        layout: KvmeshLayout,
        bases: *const *mut c_void,
        lens: *const u64,
        n_regions: usize,
        memory_kind: u32,
        device: u32,
        out: *mut KvmeshKvCache,
    ) -> KvmeshStatus,
    /// Refuses new transfers touching the cache, waits up to `timeout_ms`
    /// for those in flight, then releases the handle.
    pub kv_cache_deregister:
        unsafe extern "C" fn(cache: KvmeshKvCache, timeout_ms: u64) -> KvmeshStatus,
    /// Writes the cache's descriptor (bytes for `remote_cache_import` in
    /// the peer) into `buf[0..cap]` and its length into `*len_out`
    /// (`KVMESH_STATUS_BUFFER_TOO_SMALL` if `cap` is short; `buf` may then
    /// be NULL). It carries a data-plane secret: give it only to peers
    /// allowed to write into the cache.
    pub kv_cache_export: unsafe extern "C" fn(
        cache: KvmeshKvCache,
        buf: *mut u8,
        cap: usize,
        len_out: *mut usize,
    ) -> KvmeshStatus,
    /// Imports a peer's KV cache descriptor.
    pub remote_cache_import: unsafe extern "C" fn(
        ctx: KvmeshContext,
        desc: *const u8,
        len: usize,
        out: *mut KvmeshRemoteCache,
    ) -> KvmeshStatus,
    pub remote_cache_release: unsafe extern "C" fn(remote: KvmeshRemoteCache) -> KvmeshStatus,
    /// P/D push: writes `src_blocks[i]` of `cache` into `dst_blocks[i]` of
    /// `remote` (every layer), then notifies the remote context with the
    /// transfer id (1..=256 bytes). Blocks outside either cache are refused
    /// before any byte moves. Never blocks on the network; the push ends by
    /// `timeout_ms` (0: the context default). `n_blocks` may be 0 (the
    /// notification alone).
    pub push: unsafe extern "C" fn(
        cache: KvmeshKvCache,
        remote: KvmeshRemoteCache,
        src_blocks: *const u32,
        dst_blocks: *const u32,
        n_blocks: usize,
        transfer_id: *const u8,
        transfer_id_len: usize,
        timeout_ms: u64,
        out: *mut KvmeshOp,
    ) -> KvmeshStatus,
    /// Non-blocking: fills `*out` (may be NULL) and returns
    /// `KVMESH_STATUS_NOT_READY` while running, else the operation's result.
    pub op_status: unsafe extern "C" fn(op: KvmeshOp, out: *mut KvmeshOpStatus) -> KvmeshStatus,
    /// Like `op_status`, waiting up to `timeout_ms` for completion.
    pub op_wait: unsafe extern "C" fn(
        op: KvmeshOp,
        timeout_ms: u64,
        out: *mut KvmeshOpStatus,
    ) -> KvmeshStatus,
    /// Lists the failed blocks of a completed operation.
    pub op_failed_blocks: unsafe extern "C" fn(
        op: KvmeshOp,
        out: *mut KvmeshBlockFailure,
        cap: usize,
        len_out: *mut usize,
    ) -> KvmeshStatus,
    /// Requests cancellation (completion still comes through poll/wait).
    pub op_cancel: unsafe extern "C" fn(op: KvmeshOp) -> KvmeshStatus,
    /// Releases a completed operation's handle (`KVMESH_STATUS_BUSY` while
    /// it runs).
    pub op_release: unsafe extern "C" fn(op: KvmeshOp) -> KvmeshStatus,
    /// Writes up to `cap` handles of operations of `ctx` that completed
    /// since they were last reported, and their number into `*len_out`.
    pub poll: unsafe extern "C" fn(
        ctx: KvmeshContext,
        out: *mut KvmeshOp,
        cap: usize,
        len_out: *mut usize,
    ) -> KvmeshStatus,
    /// Waits up to `timeout_ms` until every operation of `ctx` started
    /// before the call has completed (`KVMESH_STATUS_TIMEOUT` otherwise).
    pub fence: unsafe extern "C" fn(ctx: KvmeshContext, timeout_ms: u64) -> KvmeshStatus,
    pub stats: unsafe extern "C" fn(ctx: KvmeshContext, out: *mut KvmeshStats) -> KvmeshStatus,
    /// Writes up to `cap` pushes received by `ctx` (each reported once,
    /// after all its bytes landed) and their number into `*len_out`.
    pub poll_received: unsafe extern "C" fn(
        ctx: KvmeshContext,
        out: *mut KvmeshReceived,
        cap: usize,
        len_out: *mut usize,
    ) -> KvmeshStatus,
    // ---- ABI 1.1: the peer store ----
    /// Starts a context whose transfer engine is also a peer of the store
    /// swarm (joining through `config->bootstrap`). Every 1.0 function works
    /// on it; KV caches registered in it get `lookup`, `save` and `load`.
    /// `config` may be NULL for the defaults (a swarm of one client; give
    /// `mem_bytes` to hold objects). Joining waits at most 10 s for the
    /// bootstrap peers' member lists.
    pub store_context_create: unsafe extern "C" fn(
        config: *const KvmeshStoreConfig,
        out: *mut KvmeshContext,
    ) -> KvmeshStatus,
    /// Writes the context's store listen addresses (multiaddrs ending in
    /// `/p2p/<peer id>`, one per line; a bootstrap value for other peers)
    /// into `buf` (NUL-terminated, `cap` bytes) and their length into `*len_out`.
    pub store_addrs: unsafe extern "C" fn(
        ctx: KvmeshContext,
        buf: *mut c_char,
        cap: usize,
        len_out: *mut usize,
    ) -> KvmeshStatus,
    /// Waits up to `timeout_ms` until `n` store peers that hold objects are
    /// live (this one included if it holds).
    pub store_wait_members:
        unsafe extern "C" fn(ctx: KvmeshContext, n: u32, timeout_ms: u64) -> KvmeshStatus,
    /// Keys of the full blocks of `tokens` (`block_size` of `layout` each;
    /// a partial last block has none): `n_tokens / block_size` keys into
    /// `out[0..cap]`, their number into `*len_out`.
    pub block_keys_from_tokens: unsafe extern "C" fn(
        layout: KvmeshLayout,
        ns: *const KvmeshNamespace,
        tokens: *const u32,
        n_tokens: usize,
        out: *mut KvmeshBlockKey,
        cap: usize,
        len_out: *mut usize,
    ) -> KvmeshStatus,
    /// Keys from the caller's per-block hashes (`n_hashes` of `hash_len`
    /// bytes each, back to back; e.g. vLLM's block hashes), chained into
    /// the namespace.
    pub block_keys_from_hashes: unsafe extern "C" fn(
        layout: KvmeshLayout,
        ns: *const KvmeshNamespace,
        hashes: *const u8,
        hash_len: usize,
        n_hashes: usize,
        out: *mut KvmeshBlockKey,
        cap: usize,
        len_out: *mut usize,
    ) -> KvmeshStatus,
    /// Finds the longest stored prefix of `keys` and leases it for
    /// `lease_ms` (0: the context default; at most 30 s): the holders keep
    /// those blocks until `lookup_release` or the lease's end, so a `load`
    /// started before then delivers them. Writes the number found into
    /// `*found_out` and a lookup handle (also when 0 were found) into `*out`.
    pub lookup: unsafe extern "C" fn(
        cache: KvmeshKvCache,
        keys: *const KvmeshBlockKey,
        n_keys: usize,
        lease_ms: u64,
        timeout_ms: u64,
        out: *mut KvmeshLookup,
        found_out: *mut usize,
    ) -> KvmeshStatus,
    /// Ends the lookup's leases and releases its handle (loads already
    /// started are not affected).
    pub lookup_release: unsafe extern "C" fn(lookup: KvmeshLookup) -> KvmeshStatus,
    /// Saves `blocks[i]` of `cache` under `keys[i]`, asynchronously. With
    /// `KVMESH_SAVE_PER_LAYER` in `flags` the caller signals each written
    /// layer with `save_layer` (the op ends by its deadline otherwise);
    /// without it every layer is taken as written. `cuda_event` (a CUevent,
    /// 0 for none) orders the save after GPU work: this build has no CUDA
    /// and refuses a non-zero event with `KVMESH_STATUS_UNSUPPORTED`.
    /// Leading blocks stored already are skipped. Failed blocks have
    /// `dst_block` `KVMESH_NO_BLOCK`.
    pub save: unsafe extern "C" fn(
        cache: KvmeshKvCache,
        blocks: *const u32,
        keys: *const KvmeshBlockKey,
        n_blocks: usize,
        flags: u32,
        cuda_event: u64,
        out: *mut KvmeshOp,
    ) -> KvmeshStatus,
    /// Per-layer save: layer `layer` of every block of the save is written.
    pub save_layer: unsafe extern "C" fn(op: KvmeshOp, layer: u32) -> KvmeshStatus,
    /// Loads blocks `first..first + n_blocks` of the lookup into
    /// `dst_blocks` of its cache, asynchronously and layer by layer.
    /// Failed blocks (`src_block` is the lookup entry) keep their old bytes
    /// or, for layouts loaded without staging, must be recomputed.
    pub load: unsafe extern "C" fn(
        lookup: KvmeshLookup,
        first: usize,
        dst_blocks: *const u32,
        n_blocks: usize,
        out: *mut KvmeshOp,
    ) -> KvmeshStatus,
    /// Load: `KVMESH_STATUS_OK` once layer `layer` is in place for every
    /// block that loads (or the load has ended; its status tells which
    /// blocks failed); `KVMESH_STATUS_NOT_READY` if not yet and `timeout_ms`
    /// is 0, `KVMESH_STATUS_TIMEOUT` after waiting `timeout_ms`.
    pub layer_ready:
        unsafe extern "C" fn(op: KvmeshOp, layer: u32, timeout_ms: u64) -> KvmeshStatus,
    pub store_stats:
        unsafe extern "C" fn(ctx: KvmeshContext, out: *mut KvmeshStoreStats) -> KvmeshStatus,
    /// Stores a small object (at most `KVMESH_MAX_OBJECT_BYTES`) under
    /// `key`, waiting up to `timeout_ms`. Idempotent.
    pub store_put: unsafe extern "C" fn(
        ctx: KvmeshContext,
        key: *const KvmeshBlockKey,
        data: *const u8,
        len: usize,
        timeout_ms: u64,
    ) -> KvmeshStatus,
    /// Reads the object `key` into `buf[0..cap]` and its length into
    /// `*len_out`, waiting up to `timeout_ms`: `KVMESH_STATUS_NOT_FOUND`
    /// if no live peer holds it, `KVMESH_STATUS_BUFFER_TOO_SMALL` (with the
    /// length) if `cap` is short.
    pub store_get: unsafe extern "C" fn(
        ctx: KvmeshContext,
        key: *const KvmeshBlockKey,
        buf: *mut u8,
        cap: usize,
        len_out: *mut usize,
        timeout_ms: u64,
    ) -> KvmeshStatus,
}

/// The single exported entry point: copies the function table of ABI
/// `abi_major` into `*out`. `struct_size` is the caller's
/// `sizeof(KvmeshApi)`; a library older than the caller's header (smaller
/// table) or a wrong major version answers `KVMESH_STATUS_ABI_MISMATCH`.
///
/// # Safety
/// `out` must be NULL or point to `struct_size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn kvmesh_get_api(
    abi_major: u32,
    struct_size: u32,
    out: *mut KvmeshApi,
) -> KvmeshStatus {
    guard("kvmesh_get_api", || {
        if abi_major != KVMESH_ABI_MAJOR {
            return Err(FfiError::new(
                KvmeshStatus::AbiMismatch,
                format!(
                    "the caller wants ABI {abi_major}.x, this library provides \
                     {KVMESH_ABI_MAJOR}.{KVMESH_ABI_MINOR}"
                ),
            ));
        }
        let have = std::mem::size_of::<KvmeshApi>();
        if (struct_size as usize) < TABLE_1_0_SIZE || struct_size as usize > have {
            return Err(FfiError::new(
                KvmeshStatus::AbiMismatch,
                format!(
                    "function table of {struct_size} bytes requested; this library \
                     ({KVMESH_ABI_MAJOR}.{KVMESH_ABI_MINOR}) provides {TABLE_1_0_SIZE}..={have}"
                ),
            ));
        }
        check_out(out, "out")?;
        let table = KvmeshApi {
            struct_size,
            ..TABLE
        };
        // SAFETY: `out` is non-null and aligned (checked) and the caller
        // promised `struct_size` writable bytes; `struct_size` is at most
        // the size of `table`, so the copy reads inside it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&table as *const KvmeshApi).cast::<u8>(),
                out.cast::<u8>(),
                struct_size as usize,
            )
        };
        Ok(KvmeshStatus::Ok)
    })
}

/// Size of the ABI 1.0 table (the smallest a caller may ask for).
const TABLE_1_0_SIZE: usize = std::mem::offset_of!(KvmeshApi, store_context_create);

const TABLE: KvmeshApi = KvmeshApi {
    struct_size: std::mem::size_of::<KvmeshApi>() as u32,
    abi_major: KVMESH_ABI_MAJOR as u16,
    abi_minor: KVMESH_ABI_MINOR as u16,
    capabilities: KVMESH_CAP_HOST_MEMORY
        | KVMESH_CAP_PUSH
        | KVMESH_CAP_LOOKUP
        | KVMESH_CAP_SAVE
        | KVMESH_CAP_LOAD,
    last_error: api_last_error,
    status_name: api_status_name,
    context_create: api_context_create,
    context_destroy: api_context_destroy,
    context_engine_id: api_context_engine_id,
    layout_create: api_layout_create,
    layout_destroy: api_layout_destroy,
    layout_fingerprint: api_layout_fingerprint,
    layout_region_lens: api_layout_region_lens,
    kv_cache_register: api_kv_cache_register,
    kv_cache_deregister: api_kv_cache_deregister,
    kv_cache_export: api_kv_cache_export,
    remote_cache_import: api_remote_cache_import,
    remote_cache_release: api_remote_cache_release,
    push: api_push,
    op_status: api_op_status,
    op_wait: api_op_wait,
    op_failed_blocks: api_op_failed_blocks,
    op_cancel: api_op_cancel,
    op_release: api_op_release,
    poll: api_poll,
    fence: api_fence,
    stats: api_stats,
    poll_received: api_poll_received,
    store_context_create: api_store_context_create,
    store_addrs: api_store_addrs,
    store_wait_members: api_store_wait_members,
    block_keys_from_tokens: api_block_keys_from_tokens,
    block_keys_from_hashes: api_block_keys_from_hashes,
    lookup: api_lookup,
    lookup_release: api_lookup_release,
    save: api_save,
    save_layer: api_save_layer,
    load: api_load,
    layer_ready: api_layer_ready,
    store_stats: api_store_stats,
    store_put: api_store_put,
    store_get: api_store_get,
};

// ---------------------------------------------------------------------------
// Errors, the last-error string, the panic guard.

#[derive(Debug)]
struct FfiError {
    status: KvmeshStatus,
    msg: String,
}

impl FfiError {
    fn new(status: KvmeshStatus, msg: impl Into<String>) -> Self {
        FfiError {
            status,
            msg: msg.into(),
        }
    }
}

fn status_of_kind(k: ErrorKind) -> KvmeshStatus {
    match k {
        ErrorKind::Timeout => KvmeshStatus::Timeout,
        ErrorKind::Cancelled => KvmeshStatus::Cancelled,
        ErrorKind::OutOfBounds => KvmeshStatus::OutOfRange,
        ErrorKind::UnknownRegion | ErrorKind::AuthFailed | ErrorKind::Protocol => {
            KvmeshStatus::Remote
        }
        ErrorKind::ConnectionLost => KvmeshStatus::PeerLost,
        ErrorKind::Unreachable => KvmeshStatus::Unreachable,
        ErrorKind::Invalid => KvmeshStatus::InvalidArgument,
        ErrorKind::Io => KvmeshStatus::Io,
        ErrorKind::Busy => KvmeshStatus::Busy,
    }
}

fn status_of_store(k: kvmesh_p2p_store::ErrorKind) -> KvmeshStatus {
    use kvmesh_p2p_store::ErrorKind as K;
    match k {
        K::NotFound | K::NotResident | K::BadHandle => KvmeshStatus::NotFound,
        K::Integrity => KvmeshStatus::Integrity,
        K::NoSpace | K::LimitExceeded => KvmeshStatus::NoSpace,
        K::Invalid | K::TooLarge => KvmeshStatus::InvalidArgument,
        K::Busy | K::AlreadyExists => KvmeshStatus::Busy,
        _ => KvmeshStatus::Remote,
    }
}

impl From<LayoutError> for FfiError {
    fn from(e: LayoutError) -> Self {
        let status = match e {
            LayoutError::BlockOutOfRange { .. } | LayoutError::LayerRange { .. } => {
                KvmeshStatus::OutOfRange
            }
            LayoutError::DuplicateBlock { .. } | LayoutError::CountMismatch { .. } => {
                KvmeshStatus::InvalidArgument
            }
            _ => KvmeshStatus::Layout,
        };
        FfiError::new(status, e.to_string())
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Layout(l) => l.into(),
            Error::Engine(g) => {
                let status = match &g {
                    kvmesh_gpu::Error::NoCuda(_) | kvmesh_gpu::Error::Unsupported(_) => {
                        KvmeshStatus::Unsupported
                    }
                    kvmesh_gpu::Error::UnknownRegion(_) => KvmeshStatus::InvalidArgument,
                    g => status_of_kind(g.kind()),
                };
                FfiError::new(status, g.to_string())
            }
            Error::Store(e) => FfiError::new(status_of_store(e.kind()), e.to_string()),
            e @ (Error::Descriptor(_) | Error::Invalid(_) | Error::Closed(_)) => {
                FfiError::new(KvmeshStatus::InvalidArgument, e.to_string())
            }
        }
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(msg: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg);
}

/// Runs an entry point: converts errors to a status plus the thread's last
/// error, and panics to `Internal`.
fn guard(name: &str, f: impl FnOnce() -> Result<KvmeshStatus, FfiError>) -> KvmeshStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            set_last_error(format!("{name}: {}", e.msg));
            e.status
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("{name}: internal error: {what}"));
            KvmeshStatus::Internal
        }
    }
}

// ---------------------------------------------------------------------------
// Pointer checks. Each returns an error instead of touching a bad pointer.

fn check_out<T>(p: *mut T, what: &str) -> Result<(), FfiError> {
    if p.is_null() {
        return Err(FfiError::new(
            KvmeshStatus::NullPointer,
            format!("{what} is NULL"),
        ));
    }
    if (p as usize) & (std::mem::align_of::<T>() - 1) != 0 {
        return Err(FfiError::new(
            KvmeshStatus::NullPointer,
            format!("{what} is not aligned for its type"),
        ));
    }
    Ok(())
}

/// Writes `v` through a checked output pointer.
///
/// # Safety
/// `p` must be NULL or valid for a write of `T`.
unsafe fn write_out<T>(p: *mut T, v: T, what: &str) -> Result<(), FfiError> {
    check_out(p, what)?;
    // SAFETY: non-null and aligned (checked); validity is the caller's contract.
    unsafe { p.write(v) };
    Ok(())
}

/// A slice from a caller pointer; `n == 0` gives an empty slice whatever `p`.
///
/// # Safety
/// If `n > 0`, `p` must be NULL or valid for reads of `n` elements for `'a`.
unsafe fn in_slice<'a, T>(p: *const T, n: usize, what: &str) -> Result<&'a [T], FfiError> {
    if n == 0 {
        return Ok(&[]);
    }
    check_out(p as *mut T, what)?;
    if n.checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(FfiError::new(
            KvmeshStatus::InvalidArgument,
            format!("{what}: {n} elements is too many"),
        ));
    }
    // SAFETY: non-null, aligned, size bounded (checked); validity is the
    // caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Output slice (possibly empty).
///
/// # Safety
/// If `cap > 0`, `p` must be NULL or valid for writes of `cap` elements.
unsafe fn out_slice<'a, T>(p: *mut T, cap: usize, what: &str) -> Result<&'a mut [T], FfiError> {
    if cap == 0 {
        return Ok(&mut []);
    }
    check_out(p, what)?;
    if cap
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(FfiError::new(
            KvmeshStatus::InvalidArgument,
            format!("{what}: capacity {cap} is too large"),
        ));
    }
    // SAFETY: non-null, aligned, size bounded (checked); validity is the
    // caller's contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, cap) })
}

/// Reads a caller struct that starts with `struct_size`, after checking
/// the size against the versions this library knows.
///
/// # Safety
/// `p` must be NULL or point to a readable struct of at least 4 bytes
/// whose first field is its size, and of that size.
unsafe fn read_sized<T: Copy>(p: *const T, what: &str) -> Result<T, FfiError> {
    check_out(p as *mut T, what)?;
    // SAFETY: non-null and aligned; every such struct starts with a u32.
    let size = unsafe { p.cast::<u32>().read() };
    let want = std::mem::size_of::<T>();
    if size as usize != want {
        return Err(FfiError::new(
            KvmeshStatus::AbiMismatch,
            format!("{what}->struct_size is {size}, this library knows {want}"),
        ));
    }
    // SAFETY: the caller's struct is `want` bytes (its own size field says so).
    Ok(unsafe { p.read() })
}

/// Checks the `struct_size` of a caller's output struct.
///
/// # Safety
/// `p` must be NULL or point to a struct starting with a readable u32.
unsafe fn check_out_sized<T>(p: *mut T, what: &str) -> Result<(), FfiError> {
    check_out(p, what)?;
    // SAFETY: non-null and aligned; every such struct starts with a u32.
    let size = unsafe { p.cast::<u32>().read() };
    let want = std::mem::size_of::<T>();
    if size as usize != want {
        return Err(FfiError::new(
            KvmeshStatus::AbiMismatch,
            format!("{what}->struct_size is {size}, this library knows {want}"),
        ));
    }
    Ok(())
}

fn ms(timeout_ms: u64) -> Duration {
    Duration::from_millis(timeout_ms)
}

// ---------------------------------------------------------------------------
// Handles: a table of objects with generation counters.
//
// handle = tag (8 bits) << 56 | generation (24 bits) << 32 | slot index
// A freed slot bumps its generation, so a destroyed handle never matches a
// new object in the same slot (until 2^24 reuses of that slot).

const MAX_HANDLES: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Context = 1,
    Layout = 2,
    Cache = 3,
    Remote = 4,
    Op = 5,
    Lookup = 6,
}

impl Tag {
    fn name(self) -> &'static str {
        match self {
            Tag::Context => "context",
            Tag::Layout => "layout",
            Tag::Cache => "KV cache",
            Tag::Remote => "remote cache",
            Tag::Op => "operation",
            Tag::Lookup => "lookup",
        }
    }

    fn from_handle(h: u64) -> Option<Tag> {
        Some(match h >> 56 {
            1 => Tag::Context,
            2 => Tag::Layout,
            3 => Tag::Cache,
            4 => Tag::Remote,
            5 => Tag::Op,
            6 => Tag::Lookup,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
enum Object {
    Context(Arc<Ctx>),
    Layout(Arc<KvLayout>),
    Cache(Arc<CacheObj>),
    Remote(Arc<RemoteObj>),
    Op(Arc<OpObj>),
    Lookup(Arc<LookupObj>),
}

impl Object {
    fn tag(&self) -> Tag {
        match self {
            Object::Context(_) => Tag::Context,
            Object::Layout(_) => Tag::Layout,
            Object::Cache(_) => Tag::Cache,
            Object::Remote(_) => Tag::Remote,
            Object::Op(_) => Tag::Op,
            Object::Lookup(_) => Tag::Lookup,
        }
    }
}

#[derive(Debug)]
struct Slot {
    gen: u32,
    obj: Option<Object>,
}

#[derive(Debug)]
struct Handles {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

static HANDLES: Mutex<Handles> = parking_lot::const_mutex(Handles {
    slots: Vec::new(),
    free: Vec::new(),
});

fn insert(obj: Object) -> Result<u64, FfiError> {
    let tag = obj.tag() as u64;
    let mut t = HANDLES.lock();
    let idx = match t.free.pop() {
        Some(i) => i,
        None => {
            if t.slots.len() >= MAX_HANDLES {
                return Err(FfiError::new(
                    KvmeshStatus::Busy,
                    format!("{MAX_HANDLES} handles are open; release some"),
                ));
            }
            t.slots.push(Slot { gen: 1, obj: None });
            (t.slots.len() - 1) as u32
        }
    };
    let slot = &mut t.slots[idx as usize];
    slot.obj = Some(obj);
    Ok(tag << 56 | (slot.gen as u64) << 32 | idx as u64)
}

fn lookup(h: u64, want: Tag, remove: bool) -> Result<Object, FfiError> {
    let bad = |m: String| FfiError::new(KvmeshStatus::InvalidHandle, m);
    if h == 0 {
        return Err(bad(format!("null {} handle", want.name())));
    }
    match Tag::from_handle(h) {
        Some(t) if t == want => {}
        Some(t) => {
            return Err(bad(format!(
                "handle {h:#x} is a {}, expected a {}",
                t.name(),
                want.name()
            )))
        }
        None => return Err(bad(format!("{h:#x} is not a kvmesh handle"))),
    }
    let gen = ((h >> 32) & 0xFF_FFFF) as u32;
    let idx = (h & 0xFFFF_FFFF) as usize;
    let mut t = HANDLES.lock();
    let t = &mut *t;
    let Some(slot) = t.slots.get_mut(idx) else {
        return Err(bad(format!("unknown {} handle {h:#x}", want.name())));
    };
    if slot.gen != gen || slot.obj.is_none() {
        return Err(bad(format!(
            "{} handle {h:#x} was already destroyed",
            want.name()
        )));
    }
    if remove {
        let obj = slot.obj.take().expect("checked above");
        slot.gen = (slot.gen + 1) & 0xFF_FFFF;
        if slot.gen == 0 {
            slot.gen = 1;
        }
        t.free.push(idx as u32);
        Ok(obj)
    } else {
        Ok(slot.obj.clone().expect("checked above"))
    }
}

macro_rules! getter {
    ($name:ident, $variant:ident, $ty:ty) => {
        fn $name(h: u64) -> Result<Arc<$ty>, FfiError> {
            match lookup(h, Tag::$variant, false)? {
                Object::$variant(x) => Ok(x),
                _ => unreachable!("tag checked by lookup"),
            }
        }
    };
}
getter!(get_ctx, Context, Ctx);
getter!(get_layout, Layout, KvLayout);
getter!(get_cache, Cache, CacheObj);
getter!(get_remote, Remote, RemoteObj);
getter!(get_op, Op, OpObj);
getter!(get_lookup, Lookup, LookupObj);

// ---------------------------------------------------------------------------
// Objects behind the handles.

#[derive(Debug, Default)]
struct Counters {
    pushes_submitted: AtomicU64,
    pushes_succeeded: AtomicU64,
    pushes_failed: AtomicU64,
    bytes_pushed: AtomicU64,
    blocks_pushed: AtomicU64,
    pushes_received: AtomicU64,
}

#[derive(Debug)]
struct Ctx {
    engine: Engine,
    inbox: PushInbox,
    /// Set for contexts made by `store_context_create`.
    store: Option<StoreCtx>,
    /// Handles created from this context (caches, remotes, ops, lookups).
    children: Mutex<Vec<u64>>,
    /// Live operations: (handle, op).
    ops: Mutex<Vec<(u64, Arc<OpObj>)>>,
    counters: Counters,
}

/// The store side of a store context.
#[derive(Debug)]
struct StoreCtx {
    /// The peer and its runtime; shut down by `context_destroy`.
    node: StoreNode,
    prefix: PrefixStoreConfig,
    /// Counters of KV caches deregistered already.
    retired: Mutex<PrefixStats>,
}

impl Ctx {
    fn store(&self) -> Result<&StoreCtx, FfiError> {
        self.store.as_ref().ok_or_else(|| {
            FfiError::new(
                KvmeshStatus::InvalidArgument,
                "the context has no peer store (create it with store_context_create)",
            )
        })
    }
}

#[derive(Debug)]
struct CacheObj {
    ctx: Arc<Ctx>,
    cache: Arc<KvCache>,
    /// Lookup, save and load (store contexts only).
    prefix: Option<PrefixStore>,
}

impl CacheObj {
    fn prefix(&self) -> Result<&PrefixStore, FfiError> {
        self.prefix.as_ref().ok_or_else(|| {
            FfiError::new(
                KvmeshStatus::InvalidArgument,
                "the KV cache's context has no peer store (create it with store_context_create)",
            )
        })
    }

    /// Refuses new saves and loads of the cache, cancels those running and
    /// waits up to `timeout` for them.
    fn close_prefix(&self, timeout: Duration) -> Result<(), FfiError> {
        let Some(p) = &self.prefix else {
            return Ok(());
        };
        if !p.close(timeout) {
            return Err(FfiError::new(
                KvmeshStatus::Timeout,
                "saves or loads of the KV cache are still running at the deadline",
            ));
        }
        Ok(())
    }

    fn retire(&self) {
        if let (Some(p), Some(st)) = (&self.prefix, &self.ctx.store) {
            let mut s = p.stats();
            s.ops_in_flight = 0;
            s.lookups_open = 0;
            *st.retired.lock() += s;
        }
    }
}

#[derive(Debug)]
struct RemoteObj {
    ctx: Arc<Ctx>,
    remote: RemoteKvCache,
}

#[derive(Debug)]
struct LookupObj {
    cache: Arc<CacheObj>,
    lookup: Lookup,
}

/// What an operation handle runs.
#[derive(Debug)]
enum Work {
    Push(Push),
    /// A save, or a load of lookup entries from `.1` on.
    Store(StoreOp, u32),
}

#[derive(Debug)]
struct OpObj {
    work: Work,
    ctx: std::sync::Weak<Ctx>,
    /// Reported by `poll` already.
    reported: AtomicBool,
    /// Counted in the context's statistics already.
    counted: AtomicBool,
}

/// A completed operation, push or store, in C terms.
#[derive(Debug, Clone)]
struct Outcome {
    result: Result<(), KvmeshStatus>,
    bytes: u64,
    failed: Vec<KvmeshBlockFailure>,
    message: Option<String>,
}

fn status_of_block(k: BlockErrorKind) -> KvmeshStatus {
    match k {
        BlockErrorKind::NotFound => KvmeshStatus::NotFound,
        BlockErrorKind::Integrity => KvmeshStatus::Integrity,
        BlockErrorKind::NoSpace => KvmeshStatus::NoSpace,
        BlockErrorKind::Timeout => KvmeshStatus::Timeout,
        BlockErrorKind::Cancelled => KvmeshStatus::Cancelled,
        BlockErrorKind::Transfer => KvmeshStatus::Remote,
        BlockErrorKind::Invalid => KvmeshStatus::InvalidArgument,
        BlockErrorKind::Unsupported => KvmeshStatus::Unsupported,
    }
}

impl Outcome {
    fn of_push(s: PushStatus) -> Outcome {
        Outcome {
            result: s.result.map_err(status_of_kind),
            bytes: s.bytes,
            failed: s
                .failed
                .iter()
                .map(|f| KvmeshBlockFailure {
                    index: f.index,
                    src_block: f.src_block,
                    dst_block: f.dst_block,
                    status: status_of_kind(f.error),
                })
                .collect(),
            message: s.message,
        }
    }

    fn of_store(s: StoreOpStatus, op: &StoreOp, first: u32) -> Outcome {
        let save = op.kind() == crate::prefix::StoreOpKind::Save;
        Outcome {
            result: s.result.map_err(status_of_block),
            bytes: s.bytes,
            failed: s
                .failed
                .iter()
                .map(|f| KvmeshBlockFailure {
                    index: f.index,
                    src_block: if save { f.block } else { first + f.index },
                    dst_block: if save { KVMESH_NO_BLOCK } else { f.block },
                    status: status_of_block(f.error),
                })
                .collect(),
            message: s.message,
        }
    }
}

impl OpObj {
    /// The outcome once complete, counting it in the statistics once.
    fn poll(&self) -> Option<Outcome> {
        let o = match &self.work {
            Work::Push(p) => Outcome::of_push(p.poll()?),
            Work::Store(op, first) => Outcome::of_store(op.poll()?, op, *first),
        };
        self.count(&o);
        Some(o)
    }

    fn wait(&self, timeout: Duration) -> Option<Outcome> {
        let o = match &self.work {
            Work::Push(p) => Outcome::of_push(p.wait(timeout)?),
            Work::Store(op, first) => Outcome::of_store(op.wait(timeout)?, op, *first),
        };
        self.count(&o);
        Some(o)
    }

    fn cancel(&self) {
        match &self.work {
            Work::Push(p) => p.cancel(),
            Work::Store(op, _) => op.cancel(),
        }
    }

    fn count(&self, o: &Outcome) {
        let Work::Push(push) = &self.work else {
            return; // store operations are counted by their prefix store
        };
        if self.counted.swap(true, SeqCst) {
            return;
        }
        if let Some(ctx) = self.ctx.upgrade() {
            let c = &ctx.counters;
            c.bytes_pushed.fetch_add(o.bytes, SeqCst);
            if o.result.is_ok() {
                c.pushes_succeeded.fetch_add(1, SeqCst);
                c.blocks_pushed.fetch_add(push.blocks() as u64, SeqCst);
            } else {
                c.pushes_failed.fetch_add(1, SeqCst);
            }
        }
    }

    fn store_op(&self, what: &str) -> Result<&StoreOp, FfiError> {
        match &self.work {
            Work::Store(op, _) => Ok(op),
            Work::Push(_) => Err(FfiError::new(
                KvmeshStatus::InvalidArgument,
                format!("{what} on a push"),
            )),
        }
    }
}

fn fill_op_status(o: Option<&Outcome>) -> KvmeshOpStatus {
    KvmeshOpStatus {
        struct_size: std::mem::size_of::<KvmeshOpStatus>() as u32,
        state: if o.is_some() {
            KVMESH_OP_DONE
        } else {
            KVMESH_OP_PENDING
        },
        status: match o {
            None => KvmeshStatus::NotReady,
            Some(o) => o.result.err().unwrap_or(KvmeshStatus::Ok),
        },
        reserved: 0,
        bytes: o.map_or(0, |o| o.bytes),
        failed_blocks: o.map_or(0, |o| o.failed.len() as u64),
    }
}

/// Reports an op's status: fills `out` (if given) and returns the op's
/// result as the call's status.
///
/// # Safety
/// `out` must be NULL or valid for a `KvmeshOpStatus` write.
unsafe fn report_op(
    o: Option<Outcome>,
    out: *mut KvmeshOpStatus,
) -> Result<KvmeshStatus, FfiError> {
    if !out.is_null() {
        // SAFETY: forwarded from the caller's contract.
        unsafe { check_out_sized(out, "out") }?;
        // SAFETY: checked above.
        unsafe { write_out(out, fill_op_status(o.as_ref()), "out") }?;
    }
    match o {
        None => Ok(KvmeshStatus::NotReady),
        Some(Outcome { result: Ok(()), .. }) => Ok(KvmeshStatus::Ok),
        Some(Outcome {
            result: Err(st),
            message,
            ..
        }) => Err(FfiError::new(
            st,
            message.unwrap_or_else(|| "the operation failed".into()),
        )),
    }
}

// ---------------------------------------------------------------------------
// Entry points.

unsafe extern "C" fn api_last_error(
    buf: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    // Not through `guard`: it must not replace the message it reports.
    let r = catch_unwind(AssertUnwindSafe(|| {
        LAST_ERROR.with(|e| {
            let e = e.borrow();
            let msg = e.as_bytes();
            if !len_out.is_null() {
                if (len_out as usize) & (std::mem::align_of::<usize>() - 1) != 0 {
                    return KvmeshStatus::NullPointer;
                }
                // SAFETY: non-null and aligned; the caller passes a writable size_t.
                unsafe { len_out.write(msg.len()) };
            }
            if buf.is_null() || cap == 0 {
                return if msg.is_empty() {
                    KvmeshStatus::Ok
                } else {
                    KvmeshStatus::BufferTooSmall
                };
            }
            let n = msg.len().min(cap - 1);
            // SAFETY: the caller passes `cap` writable bytes at `buf`; we
            // write `n + 1 <= cap`.
            unsafe {
                std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                buf.add(n).write(0);
            }
            if n < msg.len() {
                KvmeshStatus::BufferTooSmall
            } else {
                KvmeshStatus::Ok
            }
        })
    }));
    r.unwrap_or(KvmeshStatus::Internal)
}

const STATUS_NAMES: [(KvmeshStatus, &CStr); 21] = [
    (KvmeshStatus::Ok, c"KVMESH_STATUS_OK"),
    (KvmeshStatus::NotReady, c"KVMESH_STATUS_NOT_READY"),
    (
        KvmeshStatus::InvalidArgument,
        c"KVMESH_STATUS_INVALID_ARGUMENT",
    ),
    (KvmeshStatus::NullPointer, c"KVMESH_STATUS_NULL_POINTER"),
    (KvmeshStatus::InvalidHandle, c"KVMESH_STATUS_INVALID_HANDLE"),
    (KvmeshStatus::AbiMismatch, c"KVMESH_STATUS_ABI_MISMATCH"),
    (
        KvmeshStatus::BufferTooSmall,
        c"KVMESH_STATUS_BUFFER_TOO_SMALL",
    ),
    (KvmeshStatus::Layout, c"KVMESH_STATUS_LAYOUT"),
    (KvmeshStatus::OutOfRange, c"KVMESH_STATUS_OUT_OF_RANGE"),
    (KvmeshStatus::Timeout, c"KVMESH_STATUS_TIMEOUT"),
    (KvmeshStatus::Cancelled, c"KVMESH_STATUS_CANCELLED"),
    (KvmeshStatus::PeerLost, c"KVMESH_STATUS_PEER_LOST"),
    (KvmeshStatus::Unreachable, c"KVMESH_STATUS_UNREACHABLE"),
    (KvmeshStatus::Unsupported, c"KVMESH_STATUS_UNSUPPORTED"),
    (KvmeshStatus::Busy, c"KVMESH_STATUS_BUSY"),
    (KvmeshStatus::Io, c"KVMESH_STATUS_IO"),
    (KvmeshStatus::Remote, c"KVMESH_STATUS_REMOTE"),
    (KvmeshStatus::Internal, c"KVMESH_STATUS_INTERNAL"),
    (KvmeshStatus::NotFound, c"KVMESH_STATUS_NOT_FOUND"),
    (KvmeshStatus::Integrity, c"KVMESH_STATUS_INTEGRITY"),
    (KvmeshStatus::NoSpace, c"KVMESH_STATUS_NO_SPACE"),
];

unsafe extern "C" fn api_status_name(status: i32, out: *mut *const c_char) -> KvmeshStatus {
    guard("status_name", || {
        let name = STATUS_NAMES
            .iter()
            .find(|(s, _)| *s as i32 == status)
            .map(|(_, n)| *n)
            .ok_or_else(|| {
                FfiError::new(
                    KvmeshStatus::InvalidArgument,
                    format!("{status} is not a kvmesh status"),
                )
            })?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { write_out(out, name.as_ptr(), "out") }?;
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_context_create(
    config: *const KvmeshContextConfig,
    out: *mut KvmeshContext,
) -> KvmeshStatus {
    guard("context_create", || {
        check_out(out, "out")?;
        // SAFETY: forwarded from the caller's contract.
        let cfg = unsafe { engine_config(config) }?;
        let engine = Engine::new(cfg).map_err(|e| FfiError::from(Error::Engine(e)))?;
        let ctx = Arc::new(Ctx {
            inbox: PushInbox::new(&engine),
            engine,
            store: None,
            children: Mutex::new(Vec::new()),
            ops: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let h = insert(Object::Context(ctx))?;
        // SAFETY: checked non-null and aligned above.
        unsafe { out.write(h) };
        Ok(KvmeshStatus::Ok)
    })
}

/// Engine settings from a caller's (possibly NULL) config.
///
/// # Safety
/// `config` must be NULL or point to a readable `KvmeshContextConfig`
/// whose `tcp_listen` is NULL or a NUL-terminated string.
unsafe fn engine_config(config: *const KvmeshContextConfig) -> Result<EngineConfig, FfiError> {
    let mut cfg = EngineConfig::default();
    if !config.is_null() {
        // SAFETY: forwarded from the caller's contract.
        let c = unsafe { read_sized(config, "config") }?;
        cfg = EngineConfig::for_transport(match c.transport {
            KVMESH_TRANSPORT_AUTO => TransportKind::Auto,
            KVMESH_TRANSPORT_TCP => TransportKind::Tcp,
            KVMESH_TRANSPORT_SHM => TransportKind::Shm,
            t => {
                return Err(FfiError::new(
                    KvmeshStatus::InvalidArgument,
                    format!("transport {t} is not a KVMESH_TRANSPORT_* value"),
                ))
            }
        });
        if !c.tcp_listen.is_null() {
            // SAFETY: the caller passes a NUL-terminated string.
            let s = unsafe { CStr::from_ptr(c.tcp_listen) };
            let s = s.to_str().map_err(|_| {
                FfiError::new(KvmeshStatus::InvalidArgument, "tcp_listen is not UTF-8")
            })?;
            cfg.tcp_listen = s.parse().map_err(|_| {
                FfiError::new(
                    KvmeshStatus::InvalidArgument,
                    format!("tcp_listen {s:?} is not an IP:port address"),
                )
            })?;
        }
        if c.tcp_conns > 0 {
            cfg.tcp_conns = c.tcp_conns.min(64) as u16;
        }
        if c.io_threads > 0 {
            cfg.io_threads = c.io_threads.min(256) as usize;
        }
        if c.default_timeout_ms > 0 {
            cfg.default_timeout = ms(c.default_timeout_ms);
        }
    }
    Ok(cfg)
}

unsafe extern "C" fn api_context_destroy(ctx: KvmeshContext, timeout_ms: u64) -> KvmeshStatus {
    guard("context_destroy", || {
        let c = get_ctx(ctx)?;
        let deadline = Instant::now() + ms(timeout_ms);
        let ops: Vec<Arc<OpObj>> = c.ops.lock().iter().map(|o| o.1.clone()).collect();
        for op in &ops {
            op.cancel();
        }
        for op in &ops {
            if op
                .wait(deadline.saturating_duration_since(Instant::now()))
                .is_none()
            {
                return Err(FfiError::new(
                    KvmeshStatus::Timeout,
                    "operations still running at the deadline; the context stays valid",
                ));
            }
        }
        let stays = |mut f: FfiError| {
            f.msg = format!("{}; the context stays valid", f.msg);
            f
        };
        let children: Vec<u64> = c.children.lock().clone();
        for &h in &children {
            if Tag::from_handle(h) == Some(Tag::Cache) {
                if let Ok(cache) = get_cache(h) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    cache.close_prefix(left).map_err(stays)?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    cache
                        .cache
                        .deregister(left)
                        .map_err(|e| stays(FfiError::from(e)))?;
                }
            }
        }
        // Lookups go first: dropping them releases their leases, which
        // needs the store running.
        let mut children = children;
        children.sort_by_key(|&h| Tag::from_handle(h) != Some(Tag::Lookup));
        for h in children {
            let tag = Tag::from_handle(h).expect("children are valid handles");
            let _ = lookup(h, tag, true);
        }
        lookup(ctx, Tag::Context, true)?;
        if let Some(st) = &c.store {
            st.node
                .shutdown(deadline.saturating_duration_since(Instant::now()));
        }
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_context_engine_id(ctx: KvmeshContext, out: *mut u8) -> KvmeshStatus {
    guard("context_engine_id", || {
        let c = get_ctx(ctx)?;
        // SAFETY: the caller passes 16 writable bytes.
        let o = unsafe { out_slice(out, KVMESH_ENGINE_ID_BYTES as usize, "out") }?;
        o.copy_from_slice(&c.engine.descriptor().engine_id);
        Ok(KvmeshStatus::Ok)
    })
}

fn layout_from_spec(s: &KvmeshLayoutSpec) -> Result<KvLayout, FfiError> {
    let inv = |m: String| FfiError::new(KvmeshStatus::InvalidArgument, m);
    let dtype = DType::from_code(s.dtype)
        .ok_or_else(|| inv(format!("dtype {} is not a KVMESH_DTYPE_* value", s.dtype)))?;
    let kind = match s.kind {
        KVMESH_KIND_KEY_VALUE => KvKind::KeyValue,
        KVMESH_KIND_LATENT => KvKind::Latent,
        k => return Err(inv(format!("kind {k} is not a KVMESH_KIND_* value"))),
    };
    let layers = match s.placement {
        KVMESH_PLACEMENT_PER_LAYER => LayerPlacement::PerLayerRegions,
        KVMESH_PLACEMENT_ONE_REGION => LayerPlacement::OneRegion {
            layer_stride: s.layer_stride,
        },
        p => {
            return Err(inv(format!(
                "placement {p} is not a KVMESH_PLACEMENT_* value"
            )))
        }
    };
    if s.reserved != 0 {
        return Err(inv("reserved must be 0".into()));
    }
    Ok(KvLayout::new(KvLayoutSpec {
        shape: BlockShape {
            num_layers: s.num_layers,
            block_size: s.block_size,
            num_kv_heads: s.num_kv_heads,
            head_size: s.head_size,
            dtype,
            kind,
        },
        num_blocks: s.num_blocks,
        layers,
        strides: Strides {
            block: s.block_stride,
            kv: s.kv_stride,
            token: s.token_stride,
            head: s.head_stride,
        },
    })?)
}

unsafe extern "C" fn api_layout_create(
    spec: *const KvmeshLayoutSpec,
    out: *mut KvmeshLayout,
) -> KvmeshStatus {
    guard("layout_create", || {
        check_out(out, "out")?;
        // SAFETY: forwarded from the caller's contract.
        let s = unsafe { read_sized(spec, "spec") }?;
        let layout = layout_from_spec(&s)?;
        let h = insert(Object::Layout(Arc::new(layout)))?;
        // SAFETY: checked non-null and aligned above.
        unsafe { out.write(h) };
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_layout_destroy(layout: KvmeshLayout) -> KvmeshStatus {
    guard("layout_destroy", || {
        lookup(layout, Tag::Layout, true)?;
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_layout_fingerprint(layout: KvmeshLayout, out: *mut u8) -> KvmeshStatus {
    guard("layout_fingerprint", || {
        let l = get_layout(layout)?;
        // SAFETY: the caller passes 32 writable bytes.
        let o = unsafe { out_slice(out, KVMESH_FINGERPRINT_BYTES as usize, "out") }?;
        o.copy_from_slice(&l.fingerprint().0);
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_layout_region_lens(
    layout: KvmeshLayout,
    out: *mut u64,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    guard("layout_region_lens", || {
        let l = get_layout(layout)?;
        let lens: Vec<u64> = (0..l.region_count())
            .map(|r| l.required_region_len(r))
            .collect();
        // SAFETY: forwarded from the caller's contract.
        unsafe { fill_out(&lens, out, cap, len_out, "regions", |n| *n) }
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn api_kv_cache_register(
    ctx: KvmeshContext,
    layout: KvmeshLayout,
    bases: *const *mut c_void,
    lens: *const u64,
    n_regions: usize,
    memory_kind: u32,
    device: u32,
    out: *mut KvmeshKvCache,
) -> KvmeshStatus {
    guard("kv_cache_register", || {
        check_out(out, "out")?;
        let c = get_ctx(ctx)?;
        let l = get_layout(layout)?;
        if n_regions == 0 {
            return Err(FfiError::new(
                KvmeshStatus::InvalidArgument,
                format!("n_regions is 0; the layout has {}", l.region_count()),
            ));
        }
        // SAFETY: forwarded from the caller's contract.
        let bases = unsafe { in_slice(bases, n_regions, "bases") }?;
        // SAFETY: forwarded from the caller's contract.
        let lens = unsafe { in_slice(lens, n_regions, "lens") }?;
        if let Some(r) = bases.iter().position(|p| p.is_null()) {
            return Err(FfiError::new(
                KvmeshStatus::NullPointer,
                format!("bases[{r}] is NULL"),
            ));
        }
        let kind = match memory_kind {
            KVMESH_MEMORY_HOST => MemoryKind::Host,
            KVMESH_MEMORY_HOST_PINNED => MemoryKind::HostPinned,
            KVMESH_MEMORY_GPU => MemoryKind::Gpu { device },
            k => {
                return Err(FfiError::new(
                    KvmeshStatus::InvalidArgument,
                    format!("memory_kind {k} is not a KVMESH_MEMORY_* value"),
                ))
            }
        };
        let regions: Vec<(*mut u8, u64)> = bases
            .iter()
            .zip(lens)
            .map(|(&p, &n)| (p.cast::<u8>(), n))
            .collect();
        // SAFETY: the C contract of `kv_cache_register`: the memory stays
        // valid until deregistration returns OK.
        let cache =
            Arc::new(unsafe { KvCache::register(&c.engine, (*l).clone(), &regions, kind) }?);
        let prefix = match &c.store {
            Some(st) => Some(st.node.prefix_store(cache.clone(), st.prefix.clone())?),
            None => None,
        };
        let h = insert(Object::Cache(Arc::new(CacheObj {
            ctx: c.clone(),
            cache,
            prefix,
        })))?;
        c.children.lock().push(h);
        // SAFETY: checked non-null and aligned above.
        unsafe { out.write(h) };
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_kv_cache_deregister(
    cache: KvmeshKvCache,
    timeout_ms: u64,
) -> KvmeshStatus {
    guard("kv_cache_deregister", || {
        let c = get_cache(cache)?;
        let deadline = Instant::now() + ms(timeout_ms);
        c.close_prefix(ms(timeout_ms))?;
        c.cache
            .deregister(deadline.saturating_duration_since(Instant::now()))?;
        lookup(cache, Tag::Cache, true)?;
        c.retire();
        c.ctx.children.lock().retain(|&h| h != cache);
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_kv_cache_export(
    cache: KvmeshKvCache,
    buf: *mut u8,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    guard("kv_cache_export", || {
        let c = get_cache(cache)?;
        let bytes = c.cache.desc().to_bytes();
        // SAFETY: forwarded from the caller's contract.
        unsafe { fill_out(&bytes, buf, cap, len_out, "descriptor bytes", |b| *b) }
    })
}

unsafe extern "C" fn api_remote_cache_import(
    ctx: KvmeshContext,
    desc: *const u8,
    len: usize,
    out: *mut KvmeshRemoteCache,
) -> KvmeshStatus {
    guard("remote_cache_import", || {
        check_out(out, "out")?;
        let c = get_ctx(ctx)?;
        if desc.is_null() {
            return Err(FfiError::new(KvmeshStatus::NullPointer, "desc is NULL"));
        }
        // SAFETY: forwarded from the caller's contract.
        let bytes = unsafe { in_slice(desc, len, "desc") }?;
        let d = KvCacheDesc::from_bytes(bytes)?;
        let remote = RemoteKvCache::import(&c.engine, &d)?;
        let h = insert(Object::Remote(Arc::new(RemoteObj {
            ctx: c.clone(),
            remote,
        })))?;
        c.children.lock().push(h);
        // SAFETY: checked non-null and aligned above.
        unsafe { out.write(h) };
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_remote_cache_release(remote: KvmeshRemoteCache) -> KvmeshStatus {
    guard("remote_cache_release", || {
        let r = match lookup(remote, Tag::Remote, true)? {
            Object::Remote(r) => r,
            _ => unreachable!("tag checked by lookup"),
        };
        r.ctx.children.lock().retain(|&h| h != remote);
        Ok(KvmeshStatus::Ok)
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn api_push(
    cache: KvmeshKvCache,
    remote: KvmeshRemoteCache,
    src_blocks: *const u32,
    dst_blocks: *const u32,
    n_blocks: usize,
    transfer_id: *const u8,
    transfer_id_len: usize,
    timeout_ms: u64,
    out: *mut KvmeshOp,
) -> KvmeshStatus {
    guard("push", || {
        check_out(out, "out")?;
        let c = get_cache(cache)?;
        let r = get_remote(remote)?;
        if !Arc::ptr_eq(&c.ctx, &r.ctx) {
            return Err(FfiError::new(
                KvmeshStatus::InvalidArgument,
                "the KV cache and the remote cache belong to different contexts",
            ));
        }
        // SAFETY: forwarded from the caller's contract.
        let src = unsafe { in_slice(src_blocks, n_blocks, "src_blocks") }?;
        // SAFETY: forwarded from the caller's contract.
        let dst = unsafe { in_slice(dst_blocks, n_blocks, "dst_blocks") }?;
        if transfer_id.is_null() {
            return Err(FfiError::new(
                KvmeshStatus::NullPointer,
                "transfer_id is NULL",
            ));
        }
        if transfer_id_len == 0 || transfer_id_len > MAX_TRANSFER_ID {
            return Err(FfiError::new(
                KvmeshStatus::InvalidArgument,
                format!("transfer_id_len {transfer_id_len} (must be 1..={MAX_TRANSFER_ID})"),
            ));
        }
        // SAFETY: forwarded from the caller's contract.
        let tid = unsafe { in_slice(transfer_id, transfer_id_len, "transfer_id") }?;
        let timeout = (timeout_ms > 0).then(|| ms(timeout_ms));
        let push = c.cache.push(&r.remote, src, dst, tid, timeout)?;
        let op = Arc::new(OpObj {
            work: Work::Push(push),
            ctx: Arc::downgrade(&c.ctx),
            reported: AtomicBool::new(false),
            counted: AtomicBool::new(false),
        });
        c.ctx.counters.pushes_submitted.fetch_add(1, SeqCst);
        let h = insert(Object::Op(op.clone()))?;
        c.ctx.ops.lock().push((h, op));
        c.ctx.children.lock().push(h);
        // SAFETY: checked non-null and aligned above.
        unsafe { out.write(h) };
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_op_status(op: KvmeshOp, out: *mut KvmeshOpStatus) -> KvmeshStatus {
    guard("op_status", || {
        let o = get_op(op)?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { report_op(o.poll(), out) }
    })
}

unsafe extern "C" fn api_op_wait(
    op: KvmeshOp,
    timeout_ms: u64,
    out: *mut KvmeshOpStatus,
) -> KvmeshStatus {
    guard("op_wait", || {
        let o = get_op(op)?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { report_op(o.wait(ms(timeout_ms)), out) }
    })
}

unsafe extern "C" fn api_op_failed_blocks(
    op: KvmeshOp,
    out: *mut KvmeshBlockFailure,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    guard("op_failed_blocks", || {
        let o = get_op(op)?;
        let Some(st) = o.poll() else {
            return Err(FfiError::new(
                KvmeshStatus::NotReady,
                "the operation is still running",
            ));
        };
        // SAFETY: forwarded from the caller's contract.
        unsafe { fill_out(&st.failed, out, cap, len_out, "failed blocks", |f| *f) }
    })
}

unsafe extern "C" fn api_op_cancel(op: KvmeshOp) -> KvmeshStatus {
    guard("op_cancel", || {
        get_op(op)?.cancel();
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_op_release(op: KvmeshOp) -> KvmeshStatus {
    guard("op_release", || {
        let o = get_op(op)?;
        if o.poll().is_none() {
            return Err(FfiError::new(
                KvmeshStatus::Busy,
                "the operation is still running; cancel it or wait for it first",
            ));
        }
        lookup(op, Tag::Op, true)?;
        if let Some(ctx) = o.ctx.upgrade() {
            ctx.ops.lock().retain(|x| x.0 != op);
            ctx.children.lock().retain(|&h| h != op);
        }
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_poll(
    ctx: KvmeshContext,
    out: *mut KvmeshOp,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    guard("poll", || {
        let c = get_ctx(ctx)?;
        check_out(len_out, "len_out")?;
        // SAFETY: forwarded from the caller's contract.
        let o = unsafe { out_slice(out, cap, "out") }?;
        let ops: Vec<(u64, Arc<OpObj>)> = c.ops.lock().clone();
        let mut n = 0;
        for (h, op) in ops {
            if n == o.len() {
                break;
            }
            if !op.reported.load(SeqCst) && op.poll().is_some() && !op.reported.swap(true, SeqCst) {
                o[n] = h;
                n += 1;
            }
        }
        // SAFETY: checked non-null and aligned above.
        unsafe { len_out.write(n) };
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_fence(ctx: KvmeshContext, timeout_ms: u64) -> KvmeshStatus {
    guard("fence", || {
        let c = get_ctx(ctx)?;
        let deadline = Instant::now() + ms(timeout_ms);
        let ops: Vec<Arc<OpObj>> = c.ops.lock().iter().map(|o| o.1.clone()).collect();
        for (i, op) in ops.iter().enumerate() {
            if op
                .wait(deadline.saturating_duration_since(Instant::now()))
                .is_none()
            {
                return Err(FfiError::new(
                    KvmeshStatus::Timeout,
                    format!(
                        "{} of {} operations still running after {timeout_ms} ms",
                        ops.len() - i,
                        ops.len()
                    ),
                ));
            }
        }
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_stats(ctx: KvmeshContext, out: *mut KvmeshStats) -> KvmeshStatus {
    guard("stats", || {
        let c = get_ctx(ctx)?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { check_out_sized(out, "out") }?;
        let ops: Vec<Arc<OpObj>> = c.ops.lock().iter().map(|o| o.1.clone()).collect();
        let in_flight = ops.iter().filter(|o| o.poll().is_none()).count() as u64;
        let caches = c
            .children
            .lock()
            .iter()
            .filter(|&&h| Tag::from_handle(h) == Some(Tag::Cache))
            .count() as u64;
        let k = &c.counters;
        let s = KvmeshStats {
            struct_size: std::mem::size_of::<KvmeshStats>() as u32,
            reserved: 0,
            pushes_submitted: k.pushes_submitted.load(SeqCst),
            pushes_succeeded: k.pushes_succeeded.load(SeqCst),
            pushes_failed: k.pushes_failed.load(SeqCst),
            bytes_pushed: k.bytes_pushed.load(SeqCst),
            blocks_pushed: k.blocks_pushed.load(SeqCst),
            pushes_received: k.pushes_received.load(SeqCst),
            ops_in_flight: in_flight,
            kv_caches: caches,
        };
        // SAFETY: checked above.
        unsafe { write_out(out, s, "out") }?;
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_poll_received(
    ctx: KvmeshContext,
    out: *mut KvmeshReceived,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    guard("poll_received", || {
        let c = get_ctx(ctx)?;
        check_out(len_out, "len_out")?;
        // SAFETY: forwarded from the caller's contract.
        let o = unsafe { out_slice(out, cap, "out") }?;
        let got = c.inbox.poll_received(o.len());
        for (x, p) in o.iter_mut().zip(&got) {
            let mut tid = [0u8; 256];
            tid[..p.transfer_id.len()].copy_from_slice(&p.transfer_id);
            *x = KvmeshReceived {
                from_engine: p.from,
                blocks: p.blocks,
                transfer_id_len: p.transfer_id.len() as u32,
                transfer_id: tid,
            };
        }
        c.counters
            .pushes_received
            .fetch_add(got.len() as u64, SeqCst);
        // SAFETY: checked non-null and aligned above.
        unsafe { len_out.write(got.len()) };
        Ok(KvmeshStatus::Ok)
    })
}

// ---------------------------------------------------------------------------
// ABI 1.1: the peer store.

/// An optional C string argument.
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string valid for the call.
unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, FfiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(Some).map_err(|_| {
        FfiError::new(
            KvmeshStatus::InvalidArgument,
            format!("{what} is not UTF-8"),
        )
    })
}

fn multiaddr(s: &str, what: &str) -> Result<kvmesh_p2p_store::network::Multiaddr, FfiError> {
    s.parse().map_err(|e| {
        FfiError::new(
            KvmeshStatus::InvalidArgument,
            format!("{what} {s:?} is not a multiaddr: {e}"),
        )
    })
}

unsafe extern "C" fn api_store_context_create(
    config: *const KvmeshStoreConfig,
    out: *mut KvmeshContext,
) -> KvmeshStatus {
    guard("store_context_create", || {
        check_out(out, "out")?;
        let c = if config.is_null() {
            KvmeshStoreConfig {
                struct_size: std::mem::size_of::<KvmeshStoreConfig>() as u32,
                replicas: 0,
                engine: std::ptr::null(),
                listen: std::ptr::null(),
                bootstrap: std::ptr::null(),
                psk: std::ptr::null(),
                mem_bytes: 0,
                staging_bytes: 0,
                default_lease_ms: 0,
                op_timeout_ms: 0,
                mdns: 0,
                threads: 0,
            }
        } else {
            // SAFETY: forwarded from the caller's contract.
            unsafe { read_sized(config, "config") }?
        };
        // SAFETY: forwarded from the caller's contract.
        let engine = unsafe { engine_config(c.engine) }?;
        let mut cfg = StoreConfig {
            engine,
            mem_bytes: c.mem_bytes,
            mdns: c.mdns != 0,
            default_replicas: c.replicas.max(1) as usize,
            ..StoreConfig::default()
        };
        // SAFETY: the caller passes NULL or NUL-terminated strings.
        if let Some(l) = unsafe { opt_str(c.listen, "listen") }? {
            cfg.listen = vec![multiaddr(l, "listen")?];
        }
        // SAFETY: as above.
        if let Some(b) = unsafe { opt_str(c.bootstrap, "bootstrap") }? {
            cfg.bootstrap = b
                .split(|ch: char| ch.is_whitespace() || ch == ',')
                .filter(|a| !a.is_empty())
                .map(|a| multiaddr(a, "bootstrap address"))
                .collect::<Result<_, _>>()?;
        }
        // SAFETY: as above.
        cfg.psk = unsafe { opt_str(c.psk, "psk") }?.map(str::to_string);
        let mut prefix = PrefixStoreConfig {
            replicas: cfg.default_replicas,
            ..PrefixStoreConfig::default()
        };
        if c.staging_bytes > 0 {
            prefix.staging_bytes = c.staging_bytes;
        }
        if c.default_lease_ms > 0 {
            prefix.default_lease = ms(c.default_lease_ms).min(prefix.max_lease);
        }
        if c.op_timeout_ms > 0 {
            prefix.op_timeout = ms(c.op_timeout_ms);
        }
        let threads = if c.threads == 0 {
            2
        } else {
            c.threads.min(64) as usize
        };
        let node = StoreNode::start(cfg, threads)?;
        let engine = node.store().engine().clone();
        let ctx = Arc::new(Ctx {
            inbox: PushInbox::new(&engine),
            engine,
            store: Some(StoreCtx {
                node,
                prefix,
                retired: Mutex::new(PrefixStats::default()),
            }),
            children: Mutex::new(Vec::new()),
            ops: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let h = insert(Object::Context(ctx))?;
        // SAFETY: checked non-null and aligned above.
        unsafe { out.write(h) };
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_store_addrs(
    ctx: KvmeshContext,
    buf: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    guard("store_addrs", || {
        let c = get_ctx(ctx)?;
        let st = c.store()?;
        let addrs = st.node.block_on(
            Duration::from_secs(5),
            "store_addrs",
            st.node.store().listen_addrs(),
        )?;
        let id = st.node.store().peer_id_text();
        let text = addrs
            .iter()
            .map(|a| {
                let a = a.to_string();
                if a.contains("/p2p/") {
                    a
                } else {
                    format!("{a}/p2p/{id}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        // SAFETY: forwarded from the caller's contract.
        unsafe { write_out(len_out, text.len(), "len_out") }?;
        if cap <= text.len() {
            return Err(FfiError::new(
                KvmeshStatus::BufferTooSmall,
                format!("{} bytes and a NUL, room for {cap}", text.len()),
            ));
        }
        // SAFETY: forwarded from the caller's contract.
        let o = unsafe { out_slice(buf.cast::<u8>(), cap, "buf") }?;
        o[..text.len()].copy_from_slice(text.as_bytes());
        o[text.len()] = 0;
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_store_wait_members(
    ctx: KvmeshContext,
    n: u32,
    timeout_ms: u64,
) -> KvmeshStatus {
    guard("store_wait_members", || {
        let c = get_ctx(ctx)?;
        let st = c.store()?;
        let t = ms(timeout_ms);
        st.node
            .block_on(
                t + Duration::from_secs(1),
                "store_wait_members",
                st.node.store().wait_for_members(n as usize, t),
            )?
            .map_err(|e| FfiError::new(KvmeshStatus::Timeout, e.to_string()))?;
        Ok(KvmeshStatus::Ok)
    })
}

/// The key namespace of `layout` under the caller's namespace fields.
///
/// # Safety
/// `ns` must be NULL or point to a readable `KvmeshNamespace` whose strings
/// are NULL or NUL-terminated.
unsafe fn namespace(
    ns: *const KvmeshNamespace,
    layout: &KvLayout,
) -> Result<KeyNamespace, FfiError> {
    // SAFETY: forwarded from the caller's contract.
    let n = unsafe { read_sized(ns, "ns") }?;
    // SAFETY: as above.
    let model_id = unsafe { opt_str(n.model_id, "ns->model_id") }?
        .ok_or_else(|| FfiError::new(KvmeshStatus::NullPointer, "ns->model_id is NULL"))?;
    // SAFETY: as above.
    let weight_version = unsafe { opt_str(n.weight_version, "ns->weight_version") }?.unwrap_or("");
    Ok(KeyNamespace {
        model_id: model_id.to_string(),
        dtype: layout.shape().dtype,
        layout_fingerprint: layout.fingerprint(),
        tp_rank: n.tp_rank,
        weight_version: weight_version.to_string(),
    })
}

/// Writes `items` to a caller array of `cap` elements and their count to
/// `len_out`: as many as fit, then `BufferTooSmall` (naming `what`) if not
/// all did, so a caller can size its buffer from `len_out` and call again.
///
/// # Safety
/// `out` must be NULL or valid for `cap` writes; `len_out` for one.
unsafe fn fill_out<T, U>(
    items: &[U],
    out: *mut T,
    cap: usize,
    len_out: *mut usize,
    what: &str,
    conv: impl Fn(&U) -> T,
) -> Result<KvmeshStatus, FfiError> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { write_out(len_out, items.len(), "len_out") }?;
    // SAFETY: forwarded from the caller's contract.
    let o = unsafe { out_slice(out, cap, "out") }?;
    for (x, v) in o.iter_mut().zip(items) {
        *x = conv(v);
    }
    if cap < items.len() {
        return Err(FfiError::new(
            KvmeshStatus::BufferTooSmall,
            format!("{} {what}, room for {cap}", items.len()),
        ));
    }
    Ok(KvmeshStatus::Ok)
}

/// Writes keys to a caller array.
///
/// # Safety
/// `out` must be NULL or valid for `cap` writes; `len_out` for one.
unsafe fn write_keys(
    keys: &[BlockKey],
    out: *mut KvmeshBlockKey,
    cap: usize,
    len_out: *mut usize,
) -> Result<KvmeshStatus, FfiError> {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        fill_out(keys, out, cap, len_out, "keys", |k| KvmeshBlockKey {
            bytes: k.0,
        })
    }
}

/// Keys from a caller array.
///
/// # Safety
/// If `n > 0`, `p` must be NULL or valid for `n` reads.
unsafe fn read_keys(p: *const KvmeshBlockKey, n: usize) -> Result<Vec<BlockKey>, FfiError> {
    // SAFETY: forwarded from the caller's contract.
    let k = unsafe { in_slice(p, n, "keys") }?;
    Ok(k.iter().map(|k| BlockKey(k.bytes)).collect())
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn api_block_keys_from_tokens(
    layout: KvmeshLayout,
    ns: *const KvmeshNamespace,
    tokens: *const u32,
    n_tokens: usize,
    out: *mut KvmeshBlockKey,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    guard("block_keys_from_tokens", || {
        let l = get_layout(layout)?;
        // SAFETY: forwarded from the caller's contract.
        let ns = unsafe { namespace(ns, &l) }?;
        // SAFETY: forwarded from the caller's contract.
        let t = unsafe { in_slice(tokens, n_tokens, "tokens") }?;
        let keys = ns.token_keys(t, l.shape().block_size, &ExtraKeys::new());
        // SAFETY: forwarded from the caller's contract.
        unsafe { write_keys(&keys, out, cap, len_out) }
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn api_block_keys_from_hashes(
    layout: KvmeshLayout,
    ns: *const KvmeshNamespace,
    hashes: *const u8,
    hash_len: usize,
    n_hashes: usize,
    out: *mut KvmeshBlockKey,
    cap: usize,
    len_out: *mut usize,
) -> KvmeshStatus {
    guard("block_keys_from_hashes", || {
        let l = get_layout(layout)?;
        // SAFETY: forwarded from the caller's contract.
        let ns = unsafe { namespace(ns, &l) }?;
        if hash_len == 0 && n_hashes > 0 {
            return Err(FfiError::new(
                KvmeshStatus::InvalidArgument,
                "hash_len is 0",
            ));
        }
        let total = hash_len.checked_mul(n_hashes).ok_or_else(|| {
            FfiError::new(
                KvmeshStatus::InvalidArgument,
                "hash_len * n_hashes overflows",
            )
        })?;
        // SAFETY: forwarded from the caller's contract.
        let h = unsafe { in_slice(hashes, total, "hashes") }?;
        let hs: Vec<&[u8]> = if total == 0 {
            Vec::new()
        } else {
            h.chunks_exact(hash_len).collect()
        };
        let keys = ns.external_keys(&hs);
        // SAFETY: forwarded from the caller's contract.
        unsafe { write_keys(&keys, out, cap, len_out) }
    })
}

/// Registers an operation of a context (handle, op list, children).
fn add_op(ctx: &Arc<Ctx>, work: Work) -> Result<u64, FfiError> {
    let op = Arc::new(OpObj {
        work,
        ctx: Arc::downgrade(ctx),
        reported: AtomicBool::new(false),
        counted: AtomicBool::new(false),
    });
    let h = insert(Object::Op(op.clone()))?;
    ctx.ops.lock().push((h, op));
    ctx.children.lock().push(h);
    Ok(h)
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn api_lookup(
    cache: KvmeshKvCache,
    keys: *const KvmeshBlockKey,
    n_keys: usize,
    lease_ms: u64,
    timeout_ms: u64,
    out: *mut KvmeshLookup,
    found_out: *mut usize,
) -> KvmeshStatus {
    guard("lookup", || {
        check_out(out, "out")?;
        check_out(found_out, "found_out")?;
        let c = get_cache(cache)?;
        let p = c.prefix()?;
        // SAFETY: forwarded from the caller's contract.
        let keys = unsafe { read_keys(keys, n_keys) }?;
        let l = p.lookup_blocking(&keys, ms(lease_ms), ms(timeout_ms))?;
        let found = l.blocks();
        let h = insert(Object::Lookup(Arc::new(LookupObj {
            cache: c.clone(),
            lookup: l,
        })))?;
        c.ctx.children.lock().push(h);
        // SAFETY: checked non-null and aligned above.
        unsafe {
            out.write(h);
            found_out.write(found);
        }
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_lookup_release(lookup_h: KvmeshLookup) -> KvmeshStatus {
    guard("lookup_release", || {
        let l = match lookup(lookup_h, Tag::Lookup, true)? {
            Object::Lookup(l) => l,
            _ => unreachable!("tag checked by lookup"),
        };
        l.lookup.release();
        l.cache.ctx.children.lock().retain(|&h| h != lookup_h);
        Ok(KvmeshStatus::Ok)
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn api_save(
    cache: KvmeshKvCache,
    blocks: *const u32,
    keys: *const KvmeshBlockKey,
    n_blocks: usize,
    flags: u32,
    cuda_event: u64,
    out: *mut KvmeshOp,
) -> KvmeshStatus {
    guard("save", || {
        check_out(out, "out")?;
        let c = get_cache(cache)?;
        let p = c.prefix()?;
        if flags & !KVMESH_SAVE_PER_LAYER != 0 {
            return Err(FfiError::new(
                KvmeshStatus::InvalidArgument,
                format!("flags {flags:#x} has bits other than KVMESH_SAVE_PER_LAYER"),
            ));
        }
        if cuda_event != 0 {
            return Err(FfiError::new(
                KvmeshStatus::Unsupported,
                "waiting on a CUDA event needs the engine's CUDA support; this build has none",
            ));
        }
        // SAFETY: forwarded from the caller's contract.
        let b = unsafe { in_slice(blocks, n_blocks, "blocks") }?;
        // SAFETY: forwarded from the caller's contract.
        let keys = unsafe { read_keys(keys, n_blocks) }?;
        let op = p.save(b, &keys, flags & KVMESH_SAVE_PER_LAYER != 0)?;
        let h = add_op(&c.ctx, Work::Store(op, 0))?;
        // SAFETY: checked non-null and aligned above.
        unsafe { out.write(h) };
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_save_layer(op: KvmeshOp, layer: u32) -> KvmeshStatus {
    guard("save_layer", || {
        let o = get_op(op)?;
        o.store_op("save_layer")?.layer_saved(layer)?;
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_load(
    lookup_h: KvmeshLookup,
    first: usize,
    dst_blocks: *const u32,
    n_blocks: usize,
    out: *mut KvmeshOp,
) -> KvmeshStatus {
    guard("load", || {
        check_out(out, "out")?;
        let l = get_lookup(lookup_h)?;
        let p = l.cache.prefix()?;
        // SAFETY: forwarded from the caller's contract.
        let dst = unsafe { in_slice(dst_blocks, n_blocks, "dst_blocks") }?;
        let op = p.load(&l.lookup, first, dst)?;
        let h = add_op(&l.cache.ctx, Work::Store(op, first as u32))?;
        // SAFETY: checked non-null and aligned above.
        unsafe { out.write(h) };
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_layer_ready(op: KvmeshOp, layer: u32, timeout_ms: u64) -> KvmeshStatus {
    guard("layer_ready", || {
        let o = get_op(op)?;
        if o.store_op("layer_ready")?
            .layer_ready(layer, ms(timeout_ms))?
        {
            Ok(KvmeshStatus::Ok)
        } else if timeout_ms == 0 {
            Ok(KvmeshStatus::NotReady)
        } else {
            Err(FfiError::new(
                KvmeshStatus::Timeout,
                format!("layer {layer} not loaded after {timeout_ms} ms"),
            ))
        }
    })
}

unsafe extern "C" fn api_store_stats(
    ctx: KvmeshContext,
    out: *mut KvmeshStoreStats,
) -> KvmeshStatus {
    guard("store_stats", || {
        let c = get_ctx(ctx)?;
        let st = c.store()?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { check_out_sized(out, "out") }?;
        let mut p = *st.retired.lock();
        let children: Vec<u64> = c.children.lock().clone();
        for h in children {
            if Tag::from_handle(h) == Some(Tag::Cache) {
                if let Ok(cache) = get_cache(h) {
                    if let Some(ps) = &cache.prefix {
                        p += ps.stats();
                    }
                }
            }
        }
        let s = st.node.store().stats();
        let out_stats = KvmeshStoreStats {
            struct_size: std::mem::size_of::<KvmeshStoreStats>() as u32,
            reserved: 0,
            peers_alive: s.peers_alive as u64,
            objects: s.objects as u64,
            bytes_stored: s.bytes_stored,
            capacity: s.capacity,
            lookups: p.lookups,
            lookup_blocks: p.lookup_blocks,
            hit_blocks: p.hit_blocks,
            saves: p.saves,
            blocks_saved: p.blocks_saved,
            blocks_save_skipped: p.blocks_save_skipped,
            bytes_saved: p.bytes_saved,
            loads: p.loads,
            blocks_loaded: p.blocks_loaded,
            bytes_loaded: p.bytes_loaded,
            blocks_failed: p.blocks_failed,
            lookups_open: p.lookups_open,
        };
        // SAFETY: checked above.
        unsafe { write_out(out, out_stats, "out") }?;
        Ok(KvmeshStatus::Ok)
    })
}

/// A key argument.
///
/// # Safety
/// `key` must be NULL or valid for a read.
unsafe fn read_key(key: *const KvmeshBlockKey) -> Result<ObjectKey, FfiError> {
    check_out(key as *mut KvmeshBlockKey, "key")?;
    // SAFETY: non-null and aligned (checked); validity is the caller's contract.
    Ok(ObjectKey::from_bytes(unsafe { key.read() }.bytes))
}

unsafe extern "C" fn api_store_put(
    ctx: KvmeshContext,
    key: *const KvmeshBlockKey,
    data: *const u8,
    len: usize,
    timeout_ms: u64,
) -> KvmeshStatus {
    guard("store_put", || {
        let c = get_ctx(ctx)?;
        let st = c.store()?;
        // SAFETY: forwarded from the caller's contract.
        let k = unsafe { read_key(key) }?;
        if len == 0 || len as u64 > KVMESH_MAX_OBJECT_BYTES {
            return Err(FfiError::new(
                KvmeshStatus::InvalidArgument,
                format!("len {len} (must be 1..={KVMESH_MAX_OBJECT_BYTES})"),
            ));
        }
        // SAFETY: forwarded from the caller's contract.
        let d = unsafe { in_slice(data, len, "data") }?;
        let opts = PutOptions {
            replicas: st.prefix.replicas,
            ..PutOptions::default()
        };
        st.node
            .block_on(ms(timeout_ms), "store_put", st.node.store().put(k, d, opts))?
            .map_err(|e| FfiError::from(Error::Store(e)))?;
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_store_get(
    ctx: KvmeshContext,
    key: *const KvmeshBlockKey,
    buf: *mut u8,
    cap: usize,
    len_out: *mut usize,
    timeout_ms: u64,
) -> KvmeshStatus {
    guard("store_get", || {
        let c = get_ctx(ctx)?;
        let st = c.store()?;
        // SAFETY: forwarded from the caller's contract.
        let k = unsafe { read_key(key) }?;
        check_out(len_out, "len_out")?;
        let v = st
            .node
            .block_on(ms(timeout_ms), "store_get", st.node.store().get(k))?
            .map_err(|e| FfiError::from(Error::Store(e)))?
            .ok_or_else(|| {
                FfiError::new(
                    KvmeshStatus::NotFound,
                    format!("no live store peer holds {k}"),
                )
            })?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { fill_out(&v, buf, cap, len_out, "object bytes", |b| *b) }
    })
}

#[cfg(test)]
mod store_tests;
#[cfg(test)]
mod tests;
