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
//! Versioning: a new minor version only appends fields to the table and
//! sets new capability bits. ABI 1.0 has no prefix-store operations; the
//! `lookup`, `save`, `load` and `layer_ready` entries (capability bits
//! [`KVMESH_CAP_LOOKUP`], [`KVMESH_CAP_SAVE`], [`KVMESH_CAP_LOAD`]) arrive
//! in a later minor version, appended after `poll_received`.
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
use parking_lot::Mutex;

use crate::cache::{KvCache, KvCacheDesc, RemoteKvCache};
use crate::error::Error;
use crate::layout::{
    BlockShape, DType, KvKind, KvLayout, KvLayoutSpec, LayerPlacement, LayoutError, Strides,
};
use crate::push::{Push, PushInbox, PushStatus, MAX_TRANSFER_ID};

/// ABI major version: bumped on incompatible change.
pub const KVMESH_ABI_MAJOR: u32 = 1;
/// ABI minor version: bumped when fields are appended to the table.
pub const KVMESH_ABI_MINOR: u32 = 0;

/// Host (CPU) memory KV caches can be registered.
pub const KVMESH_CAP_HOST_MEMORY: u64 = 1 << 0;
/// GPU memory KV caches can be registered (not in this build).
pub const KVMESH_CAP_GPU_MEMORY: u64 = 1 << 1;
/// `push`, `poll_received`: P/D transfers between KV caches.
pub const KVMESH_CAP_PUSH: u64 = 1 << 2;
/// Reserved: `lookup` of stored prefixes (a later minor version).
pub const KVMESH_CAP_LOOKUP: u64 = 1 << 3;
/// Reserved: `save` of blocks to the peer store (a later minor version).
pub const KVMESH_CAP_SAVE: u64 = 1 << 4;
/// Reserved: `load` of stored blocks, with `layer_ready` (a later minor version).
pub const KVMESH_CAP_LOAD: u64 = 1 << 5;

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
}

/// Handle of a context (one transfer engine).
pub type KvmeshContext = u64;
/// Handle of a validated KV layout.
pub type KvmeshLayout = u64;
/// Handle of a registered local KV cache.
pub type KvmeshKvCache = u64;
/// Handle of a peer's KV cache imported into a context.
pub type KvmeshRemoteCache = u64;
/// Handle of an asynchronous operation.
pub type KvmeshOp = u64;

/// Engine settings for `context_create`. Zero fields take the defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KvmeshContextConfig {
    /// `sizeof(KvmeshContextConfig)`.
    pub struct_size: u32,
    /// `KVMESH_TRANSPORT_*`.
    pub transport: u32,
    /// TCP listen address "host:port"; NULL for "127.0.0.1:0".
    pub tcp_listen: *const c_char,
    /// TCP connections per peer (0: 2).
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

/// The function table (ABI 1.0). Every function returns a `KvmeshStatus`;
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
const TABLE_1_0_SIZE: usize = std::mem::size_of::<KvmeshApi>();

const TABLE: KvmeshApi = KvmeshApi {
    struct_size: std::mem::size_of::<KvmeshApi>() as u32,
    abi_major: KVMESH_ABI_MAJOR as u16,
    abi_minor: KVMESH_ABI_MINOR as u16,
    capabilities: KVMESH_CAP_HOST_MEMORY | KVMESH_CAP_PUSH,
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
}

impl Tag {
    fn name(self) -> &'static str {
        match self {
            Tag::Context => "context",
            Tag::Layout => "layout",
            Tag::Cache => "KV cache",
            Tag::Remote => "remote cache",
            Tag::Op => "operation",
        }
    }

    fn from_handle(h: u64) -> Option<Tag> {
        Some(match h >> 56 {
            1 => Tag::Context,
            2 => Tag::Layout,
            3 => Tag::Cache,
            4 => Tag::Remote,
            5 => Tag::Op,
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
}

impl Object {
    fn tag(&self) -> Tag {
        match self {
            Object::Context(_) => Tag::Context,
            Object::Layout(_) => Tag::Layout,
            Object::Cache(_) => Tag::Cache,
            Object::Remote(_) => Tag::Remote,
            Object::Op(_) => Tag::Op,
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
    /// Handles created from this context (caches, remotes, ops).
    children: Mutex<Vec<u64>>,
    /// Live operations: (handle, op).
    ops: Mutex<Vec<(u64, Arc<OpObj>)>>,
    counters: Counters,
}

#[derive(Debug)]
struct CacheObj {
    ctx: Arc<Ctx>,
    cache: KvCache,
}

#[derive(Debug)]
struct RemoteObj {
    ctx: Arc<Ctx>,
    remote: RemoteKvCache,
}

#[derive(Debug)]
struct OpObj {
    push: Push,
    ctx: std::sync::Weak<Ctx>,
    /// Reported by `poll` already.
    reported: AtomicBool,
    /// Counted in the context's statistics already.
    counted: AtomicBool,
}

impl OpObj {
    /// The status once complete, counting it in the statistics once.
    fn poll(&self) -> Option<PushStatus> {
        let st = self.push.poll()?;
        self.count(&st);
        Some(st)
    }

    fn wait(&self, timeout: Duration) -> Option<PushStatus> {
        let st = self.push.wait(timeout)?;
        self.count(&st);
        Some(st)
    }

    fn count(&self, st: &PushStatus) {
        if self.counted.swap(true, SeqCst) {
            return;
        }
        if let Some(ctx) = self.ctx.upgrade() {
            let c = &ctx.counters;
            c.bytes_pushed.fetch_add(st.bytes, SeqCst);
            if st.result.is_ok() {
                c.pushes_succeeded.fetch_add(1, SeqCst);
                c.blocks_pushed.fetch_add(self.push.blocks() as u64, SeqCst);
            } else {
                c.pushes_failed.fetch_add(1, SeqCst);
            }
        }
    }
}

fn fill_op_status(st: Option<&PushStatus>) -> KvmeshOpStatus {
    KvmeshOpStatus {
        struct_size: std::mem::size_of::<KvmeshOpStatus>() as u32,
        state: if st.is_some() {
            KVMESH_OP_DONE
        } else {
            KVMESH_OP_PENDING
        },
        status: match st {
            None => KvmeshStatus::NotReady,
            Some(s) => match s.result {
                Ok(()) => KvmeshStatus::Ok,
                Err(k) => status_of_kind(k),
            },
        },
        reserved: 0,
        bytes: st.map_or(0, |s| s.bytes),
        failed_blocks: st.map_or(0, |s| s.failed.len() as u64),
    }
}

/// Reports an op's status: fills `out` (if given) and returns the op's
/// result as the call's status.
///
/// # Safety
/// `out` must be NULL or valid for a `KvmeshOpStatus` write.
unsafe fn report_op(
    st: Option<PushStatus>,
    out: *mut KvmeshOpStatus,
) -> Result<KvmeshStatus, FfiError> {
    if !out.is_null() {
        // SAFETY: forwarded from the caller's contract.
        unsafe { check_out_sized(out, "out") }?;
        // SAFETY: checked above.
        unsafe { write_out(out, fill_op_status(st.as_ref()), "out") }?;
    }
    match st {
        None => Ok(KvmeshStatus::NotReady),
        Some(PushStatus { result: Ok(()), .. }) => Ok(KvmeshStatus::Ok),
        Some(s) => {
            let k = s.result.expect_err("failed");
            Err(FfiError::new(
                status_of_kind(k),
                s.message.unwrap_or_else(|| k.to_string()),
            ))
        }
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

const STATUS_NAMES: [(KvmeshStatus, &CStr); 18] = [
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
        let mut cfg = EngineConfig::default();
        if !config.is_null() {
            // SAFETY: forwarded from the caller's contract.
            let c = unsafe { read_sized(config, "config") }?;
            cfg.transport = match c.transport {
                KVMESH_TRANSPORT_AUTO => TransportKind::Auto,
                KVMESH_TRANSPORT_TCP => TransportKind::Tcp,
                KVMESH_TRANSPORT_SHM => TransportKind::Shm,
                t => {
                    return Err(FfiError::new(
                        KvmeshStatus::InvalidArgument,
                        format!("transport {t} is not a KVMESH_TRANSPORT_* value"),
                    ))
                }
            };
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
        let engine = Engine::new(cfg).map_err(|e| FfiError::from(Error::Engine(e)))?;
        let ctx = Arc::new(Ctx {
            inbox: PushInbox::new(&engine),
            engine,
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

unsafe extern "C" fn api_context_destroy(ctx: KvmeshContext, timeout_ms: u64) -> KvmeshStatus {
    guard("context_destroy", || {
        let c = get_ctx(ctx)?;
        let deadline = Instant::now() + ms(timeout_ms);
        let ops: Vec<Arc<OpObj>> = c.ops.lock().iter().map(|o| o.1.clone()).collect();
        for op in &ops {
            op.push.cancel();
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
        let children: Vec<u64> = c.children.lock().clone();
        for &h in &children {
            if Tag::from_handle(h) == Some(Tag::Cache) {
                if let Ok(cache) = get_cache(h) {
                    cache
                        .cache
                        .deregister(deadline.saturating_duration_since(Instant::now()))
                        .map_err(|e| {
                            let mut f = FfiError::from(e);
                            f.msg = format!("{}; the context stays valid", f.msg);
                            f
                        })?;
                }
            }
        }
        for h in children {
            let tag = Tag::from_handle(h).expect("children are valid handles");
            let _ = lookup(h, tag, true);
        }
        lookup(ctx, Tag::Context, true)?;
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
        let n = l.region_count();
        // SAFETY: forwarded from the caller's contract.
        unsafe { write_out(len_out, n, "len_out") }?;
        // SAFETY: forwarded from the caller's contract.
        let o = unsafe { out_slice(out, cap, "out") }?;
        for (r, x) in o.iter_mut().take(n).enumerate() {
            *x = l.required_region_len(r);
        }
        if cap < n {
            return Err(FfiError::new(
                KvmeshStatus::BufferTooSmall,
                format!("{n} regions, room for {cap}"),
            ));
        }
        Ok(KvmeshStatus::Ok)
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
        let cache = unsafe { KvCache::register(&c.engine, (*l).clone(), &regions, kind) }?;
        let h = insert(Object::Cache(Arc::new(CacheObj {
            ctx: c.clone(),
            cache,
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
        c.cache.deregister(ms(timeout_ms))?;
        lookup(cache, Tag::Cache, true)?;
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
        unsafe { write_out(len_out, bytes.len(), "len_out") }?;
        if cap < bytes.len() {
            return Err(FfiError::new(
                KvmeshStatus::BufferTooSmall,
                format!("descriptor is {} bytes, buffer holds {cap}", bytes.len()),
            ));
        }
        // SAFETY: forwarded from the caller's contract.
        let o = unsafe { out_slice(buf, cap, "buf") }?;
        o[..bytes.len()].copy_from_slice(&bytes);
        Ok(KvmeshStatus::Ok)
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
            push,
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
        unsafe { write_out(len_out, st.failed.len(), "len_out") }?;
        // SAFETY: forwarded from the caller's contract.
        let o = unsafe { out_slice(out, cap, "out") }?;
        for (x, f) in o.iter_mut().zip(&st.failed) {
            *x = KvmeshBlockFailure {
                index: f.index,
                src_block: f.src_block,
                dst_block: f.dst_block,
                status: status_of_kind(f.error),
            };
        }
        if cap < st.failed.len() {
            return Err(FfiError::new(
                KvmeshStatus::BufferTooSmall,
                format!("{} failed blocks, room for {cap}", st.failed.len()),
            ));
        }
        Ok(KvmeshStatus::Ok)
    })
}

unsafe extern "C" fn api_op_cancel(op: KvmeshOp) -> KvmeshStatus {
    guard("op_cancel", || {
        get_op(op)?.push.cancel();
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

#[cfg(test)]
mod tests;
