//! Stored prefixes: lookup, save and load of a KV cache's blocks in the
//! peer store.
//!
//! ```text
//!  lookup(keys, lease)   contains_prefix(keys) ─► lease_many(stored prefix)
//!                        ─► Lookup { leases, expires }   the holders keep the
//!                           objects until the leases are released or expire
//!  save(blocks, keys)    skip the leading blocks already stored
//!                        ─► [per layer: layer_saved(l)] pack layers into
//!                           staging slots as they are signalled (plan_save)
//!                        ─► put_from(key, slot) per block
//!  load(lookup, blocks)  read_leased into staging slots (the store checks
//!                        every checksum) ─► unpack layer by layer (plan_load)
//!                        ─► layer_ready(l)
//! ```
//!
//! One stored object per block: the block's packed bytes, all layers (the
//! packed block format of [`crate::layout`]), under its [`BlockKey`]. Keys
//! name whole prefixes, so puts are idempotent and replicas never diverge.
//! Layouts whose blocks are one contiguous run (TensorRT-LLM's pool, vLLM's
//! cross-layer tensor) skip the staging copy: objects are put from and read
//! into the cache memory directly.
//!
//! Per-layer saves: a save that finds staging slots free when it starts
//! takes them and packs each layer as soon as the caller signals it;
//! otherwise it waits for the last layer, then for slots. Start the loads a
//! step waits on before its per-layer saves (frameworks do: loads before
//! the forward pass, saves during it), or a load may wait behind a save's
//! slots until that save's deadline. Loads make layer `l` ready once layer
//! `l` of every block of the load is in place.
//!
//! Every operation ends by its deadline (`op_timeout`, plus at most one
//! store transfer deadline: a transfer in flight is never abandoned, since
//! its bytes could land in a slot that was handed to another operation).
//! Cancellation takes effect between steps. Failures are per block: a block
//! that was not stored, whose lease ran out, whose bytes failed their
//! checksum, or that found no room is reported, never loaded with wrong
//! bytes.
//!
//! Host-memory caches work today; a GPU cache goes through the engine's
//! GPU memory kind, whose local copies the engine refuses with a clear
//! "unsupported" error until it has CUDA support.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_gpu::{MemoryKind, Region};
use kvmesh_p2p_store::{ErrorKind as StoreErrorKind, Leased, ObjectKey, PutOptions, Store};
use parking_lot::{Condvar, Mutex};
use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::gpu_staging::{cache_device, Direction, GpuStaging};
use crate::keys::BlockKey;
use crate::layout::{CopySegment, Packed, Place};

/// Settings of a [`PrefixStore`].
#[derive(Debug, Clone)]
pub struct PrefixStoreConfig {
    /// Host staging memory for packing and unpacking blocks (rounded down
    /// to whole blocks, at least one block).
    pub staging_bytes: u64,
    /// Lease of a lookup when the caller gives none.
    pub default_lease: Duration,
    /// Longest lease a lookup may ask for (holders clamp to 30 s).
    pub max_lease: Duration,
    /// Deadline of a save or load (waiting for layer signals included).
    pub op_timeout: Duration,
    /// Copies each saved block gets.
    pub replicas: usize,
    /// Lookups holding leases at once.
    pub max_lookups: usize,
    /// Save and load operations in flight at once.
    pub max_ops: usize,
}

impl Default for PrefixStoreConfig {
    fn default() -> Self {
        PrefixStoreConfig {
            staging_bytes: 64 << 20,
            default_lease: Duration::from_secs(10),
            max_lease: Duration::from_secs(30),
            op_timeout: Duration::from_secs(30),
            replicas: 1,
            max_lookups: 4096,
            max_ops: 4096,
        }
    }
}

/// Why one block of a save or load failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockErrorKind {
    /// Not stored (any more), or the lookup's lease ran out before the read.
    NotFound,
    /// The bytes read did not match their checksum.
    Integrity,
    /// No holder had room for the block.
    NoSpace,
    /// The operation's deadline passed first.
    Timeout,
    /// Cancelled by the caller.
    Cancelled,
    /// A transfer or a holder failed (peer lost, unreachable, busy).
    Transfer,
    /// Refused as invalid (a bug or a misconfigured peer).
    Invalid,
    /// The memory kind cannot be copied by this build (GPU without CUDA).
    Unsupported,
}

impl BlockErrorKind {
    fn of_store(e: &kvmesh_p2p_store::Error) -> Self {
        match e.kind() {
            StoreErrorKind::NotFound | StoreErrorKind::NotResident | StoreErrorKind::BadHandle => {
                BlockErrorKind::NotFound
            }
            StoreErrorKind::Integrity => BlockErrorKind::Integrity,
            StoreErrorKind::NoSpace | StoreErrorKind::LimitExceeded => BlockErrorKind::NoSpace,
            StoreErrorKind::Invalid | StoreErrorKind::TooLarge => BlockErrorKind::Invalid,
            _ => BlockErrorKind::Transfer,
        }
    }
}

impl std::fmt::Display for BlockErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BlockErrorKind::NotFound => "not found",
            BlockErrorKind::Integrity => "checksum mismatch",
            BlockErrorKind::NoSpace => "no space",
            BlockErrorKind::Timeout => "timed out",
            BlockErrorKind::Cancelled => "cancelled",
            BlockErrorKind::Transfer => "transfer failed",
            BlockErrorKind::Invalid => "invalid",
            BlockErrorKind::Unsupported => "unsupported memory kind",
        })
    }
}

/// One block of a save or load that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreBlockFailure {
    /// Entry in the operation's block list.
    pub index: u32,
    /// The cache block (source of a save, destination of a load).
    pub block: u32,
    pub error: BlockErrorKind,
    pub message: String,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOpKind {
    Save,
    Load,
}

/// Outcome of a save or load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOpStatus {
    /// `Ok` iff every block was saved (or already stored) or loaded.
    pub result: Result<(), BlockErrorKind>,
    /// Bytes moved (put or read).
    pub bytes: u64,
    /// Blocks saved or loaded.
    pub blocks_done: u32,
    /// Save: leading blocks that were stored already (not sent again).
    pub blocks_skipped: u32,
    pub failed: Vec<StoreBlockFailure>,
    /// A sentence for logs, when failed.
    pub message: Option<String>,
}

/// Counters of a [`PrefixStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    pub lookups: u64,
    /// Keys asked about by lookups.
    pub lookup_blocks: u64,
    /// Keys found and leased (the longest stored prefixes).
    pub hit_blocks: u64,
    pub saves: u64,
    pub blocks_saved: u64,
    /// Blocks a save found stored already.
    pub blocks_save_skipped: u64,
    pub bytes_saved: u64,
    pub loads: u64,
    pub blocks_loaded: u64,
    pub bytes_loaded: u64,
    /// Blocks of saves and loads that failed.
    pub blocks_failed: u64,
    /// Operations not yet completed.
    pub ops_in_flight: u64,
    /// Lookups still holding leases.
    pub lookups_open: u64,
}

impl std::ops::AddAssign for PrefixStats {
    fn add_assign(&mut self, o: PrefixStats) {
        self.lookups += o.lookups;
        self.lookup_blocks += o.lookup_blocks;
        self.hit_blocks += o.hit_blocks;
        self.saves += o.saves;
        self.blocks_saved += o.blocks_saved;
        self.blocks_save_skipped += o.blocks_save_skipped;
        self.bytes_saved += o.bytes_saved;
        self.loads += o.loads;
        self.blocks_loaded += o.blocks_loaded;
        self.bytes_loaded += o.bytes_loaded;
        self.blocks_failed += o.blocks_failed;
        self.ops_in_flight += o.ops_in_flight;
        self.lookups_open += o.lookups_open;
    }
}

#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    lookup_blocks: AtomicU64,
    hit_blocks: AtomicU64,
    saves: AtomicU64,
    blocks_saved: AtomicU64,
    blocks_save_skipped: AtomicU64,
    bytes_saved: AtomicU64,
    loads: AtomicU64,
    blocks_loaded: AtomicU64,
    bytes_loaded: AtomicU64,
    blocks_failed: AtomicU64,
}

/// Lookup, save and load of one KV cache's blocks in the peer store.
/// Cheap to clone; thread-safe.
#[derive(Debug, Clone)]
pub struct PrefixStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    cache: Arc<KvCache>,
    rt: Handle,
    cfg: PrefixStoreConfig,
    staging: Arc<Staging>,
    /// Whether a block's packed bytes are one run of the cache (and host
    /// memory): objects go to and from the cache without staging.
    direct: bool,
    /// Device-side staging when the cache is GPU memory.
    gpu: Option<GpuStaging>,
    block_bytes: u64,
    counters: Counters,
    ops: Mutex<Vec<StoreOp>>,
    lookups_open: AtomicUsize,
    closing: AtomicBool,
    next_op: AtomicU64,
}

/// Host staging memory registered with the store's engine, cut into
/// block-sized slots.
#[derive(Debug)]
struct Staging {
    region: Region,
    slot_bytes: u64,
    total: usize,
    free: Mutex<Vec<u32>>,
    sem: Arc<Semaphore>,
}

/// Slots held by one step of an operation; returned on drop.
#[derive(Debug)]
struct Slots {
    staging: Arc<Staging>,
    idx: Vec<u32>,
    _permit: OwnedSemaphorePermit,
}

impl Staging {
    fn take(self: &Arc<Self>, n: usize, permit: OwnedSemaphorePermit) -> Slots {
        let mut free = self.free.lock();
        let at = free.len() - n; // the permit guarantees n free slots
        Slots {
            staging: self.clone(),
            idx: free.split_off(at),
            _permit: permit,
        }
    }

    fn try_acquire(self: &Arc<Self>, n: usize) -> Option<Slots> {
        let p = self.sem.clone().try_acquire_many_owned(n as u32).ok()?;
        Some(self.take(n, p))
    }

    async fn acquire(self: &Arc<Self>, n: usize) -> Slots {
        let p = self
            .sem
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .expect("the staging semaphore is never closed");
        self.take(n, p)
    }
}

impl Slots {
    fn offset(&self, i: usize) -> u64 {
        self.idx[i] as u64 * self.staging.slot_bytes
    }

    fn packed(&self, n: usize) -> Packed {
        Packed {
            places: (0..n).map(|i| Place::new(0, self.offset(i))).collect(),
            first_layer: 0,
        }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        self.staging.free.lock().append(&mut self.idx);
    }
}

/// The longest stored prefix of a list of keys, leased. Dropping it (or
/// [`Lookup::release`]) ends the leases once no load from it is running;
/// they also end on their own at [`Lookup::expires`].
#[derive(Debug, Clone)]
pub struct Lookup {
    inner: Arc<LookupInner>,
}

#[derive(Debug)]
struct LookupInner {
    prefix: Arc<Inner>,
    keys: Vec<BlockKey>,
    leases: Mutex<LeaseState>,
    expires: Instant,
}

#[derive(Debug)]
struct LeaseState {
    leases: Vec<Leased>,
    /// Loads from the lookup that are running.
    loads: usize,
    /// Release asked for: the leases end when the last load does.
    releasing: bool,
    /// The leases have ended.
    released: bool,
}

impl Lookup {
    /// Number of leading keys found (and leased).
    pub fn blocks(&self) -> usize {
        self.inner.keys.len()
    }

    /// The keys found.
    pub fn keys(&self) -> &[BlockKey] {
        &self.inner.keys
    }

    /// When the leases end (measured from before they were asked for).
    pub fn expires(&self) -> Instant {
        self.inner.expires
    }

    /// Ends the leases: now, or when the last load from the lookup ends
    /// (loads already started are not affected). New loads are refused.
    pub fn release(&self) {
        let mut st = self.inner.leases.lock();
        st.releasing = true;
        self.inner.end_if_idle(&mut st);
    }
}

impl LookupInner {
    fn end_if_idle(&self, st: &mut LeaseState) {
        if !st.releasing || st.loads > 0 || st.released {
            return;
        }
        st.released = true;
        self.prefix.lookups_open.fetch_sub(1, Relaxed);
        let leases = std::mem::take(&mut st.leases);
        if !leases.is_empty() {
            let _g = self.prefix.rt.enter();
            self.prefix.store.release(leases);
        }
    }

    /// A load starts: its leases, or `None` once released.
    fn start_load(&self, first: usize, n: usize) -> Option<Vec<Leased>> {
        let mut st = self.leases.lock();
        if st.releasing {
            return None;
        }
        st.loads += 1;
        Some(st.leases[first..first + n].to_vec())
    }

    fn end_load(&self) {
        let mut st = self.leases.lock();
        st.loads -= 1;
        self.end_if_idle(&mut st);
    }
}

impl Drop for LookupInner {
    fn drop(&mut self) {
        let mut st = self.leases.lock();
        // Loads hold the lookup (an `Arc`), so none runs any more.
        st.loads = 0;
        st.releasing = true;
        self.end_if_idle(&mut st);
    }
}

/// A save or load in flight. Cheap to clone; dropping it does not cancel it.
#[derive(Debug, Clone)]
pub struct StoreOp {
    inner: Arc<OpInner>,
}

#[derive(Debug)]
struct OpInner {
    id: u64,
    kind: StoreOpKind,
    blocks: Vec<u32>,
    num_layers: u32,
    deadline: Instant,
    state: Mutex<OpState>,
    cv: Condvar,
    notify: Notify,
}

#[derive(Debug)]
struct OpState {
    /// Save: layers signalled (`layer_saved`).
    signalled: Vec<bool>,
    /// Save: leading layers signalled.
    signalled_prefix: u32,
    /// Load: leading layers in place for every block.
    layers_ready: u32,
    cancelled: bool,
    /// Per block: `None` while pending.
    results: Vec<Option<Result<(), (BlockErrorKind, String)>>>,
    bytes: u64,
    skipped: u32,
    done: Option<StoreOpStatus>,
}

/// How a step of an operation ended early.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Cancelled,
    Deadline,
}

impl Stop {
    fn kind(self) -> BlockErrorKind {
        match self {
            Stop::Cancelled => BlockErrorKind::Cancelled,
            Stop::Deadline => BlockErrorKind::Timeout,
        }
    }
}

impl StoreOp {
    /// Identifier, unique in its [`PrefixStore`].
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    pub fn kind(&self) -> StoreOpKind {
        self.inner.kind
    }

    /// The cache blocks of the operation.
    pub fn blocks(&self) -> &[u32] {
        &self.inner.blocks
    }

    /// Non-blocking: the status once completed.
    pub fn poll(&self) -> Option<StoreOpStatus> {
        self.inner.state.lock().done.clone()
    }

    /// Waits up to `timeout`; `None` if still running. Every operation
    /// completes by its deadline.
    pub fn wait(&self, timeout: Duration) -> Option<StoreOpStatus> {
        let until = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        while st.done.is_none() {
            if self.inner.cv.wait_until(&mut st, until).timed_out() {
                break;
            }
        }
        st.done.clone()
    }

    /// Async wait. Cancel-safe: dropping the future leaves the operation running.
    pub async fn wait_async(&self) -> StoreOpStatus {
        loop {
            let n = self.inner.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if let Some(s) = self.poll() {
                return s;
            }
            n.await;
        }
    }

    /// Requests cancellation: blocks not yet moved fail as `Cancelled`.
    pub fn cancel(&self) {
        self.inner.state.lock().cancelled = true;
        self.inner.wake();
    }

    /// Save: layer `layer` of every block is written (per-layer saves).
    /// Idempotent; refused for loads and for saves of all layers.
    pub fn layer_saved(&self, layer: u32) -> Result<()> {
        if self.inner.kind != StoreOpKind::Save {
            return Err(Error::Invalid("layer_saved on a load".into()));
        }
        if layer >= self.inner.num_layers {
            return Err(Error::Invalid(format!(
                "layer {layer} is outside the cache's {} layers",
                self.inner.num_layers
            )));
        }
        let mut st = self.inner.state.lock();
        st.signalled[layer as usize] = true;
        while (st.signalled_prefix as usize) < st.signalled.len()
            && st.signalled[st.signalled_prefix as usize]
        {
            st.signalled_prefix += 1;
        }
        drop(st);
        self.inner.wake();
        Ok(())
    }

    /// Load: whether layer `layer` is in place for every block that loads
    /// (failed blocks are reported by the status). Waits up to `timeout`.
    /// A finished operation answers `true` for every layer.
    pub fn layer_ready(&self, layer: u32, timeout: Duration) -> Result<bool> {
        self.check_layer(layer)?;
        let until = Instant::now() + timeout;
        let mut st = self.inner.state.lock();
        loop {
            if st.layers_ready > layer || st.done.is_some() {
                return Ok(true);
            }
            if self.inner.cv.wait_until(&mut st, until).timed_out() {
                return Ok(st.layers_ready > layer || st.done.is_some());
            }
        }
    }

    /// Async [`StoreOp::layer_ready`] without a timeout (the operation
    /// itself has a deadline). Cancel-safe.
    pub async fn layer_ready_async(&self, layer: u32) -> Result<()> {
        self.check_layer(layer)?;
        loop {
            let n = self.inner.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            {
                let st = self.inner.state.lock();
                if st.layers_ready > layer || st.done.is_some() {
                    return Ok(());
                }
            }
            n.await;
        }
    }

    fn check_layer(&self, layer: u32) -> Result<()> {
        if self.inner.kind != StoreOpKind::Load {
            return Err(Error::Invalid("layer_ready on a save".into()));
        }
        if layer >= self.inner.num_layers {
            return Err(Error::Invalid(format!(
                "layer {layer} is outside the cache's {} layers",
                self.inner.num_layers
            )));
        }
        Ok(())
    }
}

impl OpInner {
    fn wake(&self) {
        self.cv.notify_all();
        self.notify.notify_waiters();
    }

    fn stopped(&self) -> Option<Stop> {
        if self.state.lock().cancelled {
            Some(Stop::Cancelled)
        } else if Instant::now() >= self.deadline {
            Some(Stop::Deadline)
        } else {
            None
        }
    }

    /// Waits until `cond(state)` holds, the operation is cancelled or its
    /// deadline passes.
    async fn wait_for(&self, cond: impl Fn(&OpState) -> bool) -> Result<(), Stop> {
        loop {
            let n = self.notify.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if let Some(s) = self.stopped() {
                return Err(s);
            }
            if cond(&self.state.lock()) {
                return Ok(());
            }
            let deadline = tokio::time::Instant::from_std(self.deadline);
            if tokio::time::timeout_at(deadline, n).await.is_err() {
                return Err(Stop::Deadline);
            }
        }
    }

    /// Waits for slots, the cancellation or the deadline.
    async fn acquire(&self, staging: &Arc<Staging>, n: usize) -> Result<Slots, Stop> {
        if let Some(s) = staging.try_acquire(n) {
            return Ok(s);
        }
        let acquire = staging.acquire(n);
        tokio::pin!(acquire);
        loop {
            let woken = self.notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(s) = self.stopped() {
                return Err(s);
            }
            let deadline = tokio::time::Instant::from_std(self.deadline);
            tokio::select! {
                s = &mut acquire => return Ok(s),
                _ = woken => {}
                _ = tokio::time::sleep_until(deadline) => return Err(Stop::Deadline),
            }
        }
    }

    fn set(&self, i: usize, r: Result<(), (BlockErrorKind, String)>, bytes: u64) {
        let mut st = self.state.lock();
        if st.results[i].is_none() {
            st.bytes += bytes;
            st.results[i] = Some(r);
        }
    }

    fn pending(&self) -> Vec<usize> {
        let st = self.state.lock();
        (0..st.results.len())
            .filter(|&i| st.results[i].is_none())
            .collect()
    }

    fn set_layers_ready(&self, n: u32) {
        self.state.lock().layers_ready = n;
        self.wake();
    }
}

fn object_key(k: &BlockKey) -> ObjectKey {
    ObjectKey::from_bytes(k.0)
}

impl PrefixStore {
    /// Lookup, save and load for `cache`, which must be registered with
    /// `store`'s engine. Must be called inside a tokio runtime (the one
    /// running the store); its operations run there.
    pub fn new(store: Store, cache: Arc<KvCache>, cfg: PrefixStoreConfig) -> Result<PrefixStore> {
        // SAFETY: no stream is given.
        unsafe { Self::build(store, cache, cfg, None) }
    }

    /// [`PrefixStore::new`] for a GPU KV cache written by kernels on
    /// `compute_stream` (a `CUstream`, 0 for the legacy default stream): a
    /// save of a layer is ordered after the work enqueued there when the
    /// layer is signalled, so the caller need not synchronize.
    ///
    /// # Safety
    /// `compute_stream` must be a live stream of the cache's GPU (primary
    /// context) that outlives the returned store.
    pub unsafe fn with_compute_stream(
        store: Store,
        cache: Arc<KvCache>,
        cfg: PrefixStoreConfig,
        compute_stream: u64,
    ) -> Result<PrefixStore> {
        // SAFETY: forwarded from the caller's contract.
        unsafe { Self::build(store, cache, cfg, Some(compute_stream)) }
    }

    /// # Safety
    /// As [`PrefixStore::with_compute_stream`] when a stream is given.
    unsafe fn build(
        store: Store,
        cache: Arc<KvCache>,
        cfg: PrefixStoreConfig,
        compute_stream: Option<u64>,
    ) -> Result<PrefixStore> {
        let rt = Handle::try_current().map_err(|_| {
            Error::Invalid("PrefixStore::new must be called inside a tokio runtime".into())
        })?;
        let mine = store.engine().descriptor().engine_id;
        if cache.engine().descriptor().engine_id != mine {
            return Err(Error::Invalid(
                "the KV cache is registered with another engine than the store's".into(),
            ));
        }
        if cfg.replicas == 0 || cfg.max_lookups == 0 || cfg.max_ops == 0 {
            return Err(Error::Invalid(
                "replicas, max_lookups and max_ops must be at least 1".into(),
            ));
        }
        let layout = cache.layout();
        let shape = *layout.shape();
        let block_bytes = shape.block_bytes();
        let total = (cfg.staging_bytes / block_bytes).clamp(1, Semaphore::MAX_PERMITS as u64 >> 1);
        let region = store
            .engine()
            .alloc(total * block_bytes, MemoryKind::Host)?;
        let staging = Arc::new(Staging {
            region,
            slot_bytes: block_bytes,
            total: total as usize,
            free: Mutex::new((0..total as u32).rev().collect()),
            sem: Arc::new(Semaphore::new(total as usize)),
        });
        let all = 0..shape.num_layers;
        let one = Packed::contiguous(&shape, 0, 0, 1, all.clone());
        let gpu = match cache_device(cache.regions())? {
            // SAFETY: forwarded from the caller's contract.
            Some(dev) => Some(unsafe { GpuStaging::new(dev, &staging.region, compute_stream) }?),
            None if compute_stream.is_some() => {
                return Err(Error::Invalid(
                    "a compute stream was given for a KV cache in host memory".into(),
                ))
            }
            None => None,
        };
        let direct = cache.regions().iter().all(|r| r.kind().is_host())
            && layout
                .plan_save(&[0], all, &one)
                .is_ok_and(|p| p.len() == 1 && p[0].len == block_bytes);
        Ok(PrefixStore {
            inner: Arc::new(Inner {
                store,
                cache,
                rt,
                cfg,
                staging,
                direct,
                gpu,
                block_bytes,
                counters: Counters::default(),
                ops: Mutex::new(Vec::new()),
                lookups_open: AtomicUsize::new(0),
                closing: AtomicBool::new(false),
                next_op: AtomicU64::new(1),
            }),
        })
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn cache(&self) -> &Arc<KvCache> {
        &self.inner.cache
    }

    /// Bytes of one stored block (all layers).
    pub fn block_bytes(&self) -> u64 {
        self.inner.block_bytes
    }

    /// Whether blocks move between the cache and the store without staging.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }

    /// Blocks the staging memory holds at once.
    pub fn staging_blocks(&self) -> usize {
        self.inner.staging.total
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closing.load(Relaxed) || self.inner.cache.is_closing() {
            return Err(Error::Closed("prefix store"));
        }
        Ok(())
    }

    /// Finds the longest stored prefix of `keys` and leases it for `lease`
    /// (clamped to `max_lease`; zero takes `default_lease`). Every block
    /// it reports stays stored until the lease ends, so a load started
    /// before [`Lookup::expires`] delivers it.
    pub async fn lookup(&self, keys: &[BlockKey], lease: Duration) -> Result<Lookup> {
        self.check_open()?;
        let inner = &self.inner;
        let open = inner.lookups_open.load(Relaxed);
        if open >= inner.cfg.max_lookups {
            return Err(Error::Invalid(format!(
                "{open} lookups hold leases (at most {}); release some",
                inner.cfg.max_lookups
            )));
        }
        let lease = if lease.is_zero() {
            inner.cfg.default_lease
        } else {
            lease.min(inner.cfg.max_lease)
        };
        let c = &inner.counters;
        c.lookups.fetch_add(1, Relaxed);
        c.lookup_blocks.fetch_add(keys.len() as u64, Relaxed);
        let okeys: Vec<ObjectKey> = keys.iter().map(object_key).collect();
        let t0 = Instant::now();
        // One round to the holders for all keys; leases only for the prefix.
        let leases = match inner.store.contains_prefix(&okeys).await {
            Ok(0) => Vec::new(),
            Ok(stored) => {
                let got = inner.store.lease_many(&okeys[..stored], lease).await;
                let found = got
                    .iter()
                    .take_while(|g| g.as_ref().is_some_and(|g| g.len == inner.block_bytes))
                    .count();
                let mut leases: Vec<Leased> = got.into_iter().flatten().collect();
                let beyond = leases.split_off(found);
                if !beyond.is_empty() {
                    inner.store.release(beyond);
                }
                leases
            }
            Err(e) => return Err(e.into()),
        };
        c.hit_blocks.fetch_add(leases.len() as u64, Relaxed);
        // Counted from here to the leases' end (cancelling this future
        // earlier leaves granted leases to expire on their holders).
        inner.lookups_open.fetch_add(1, Relaxed);
        Ok(Lookup {
            inner: Arc::new(LookupInner {
                prefix: inner.clone(),
                keys: keys[..leases.len()].to_vec(),
                leases: Mutex::new(LeaseState {
                    leases,
                    loads: 0,
                    releasing: false,
                    released: false,
                }),
                expires: t0 + lease,
            }),
        })
    }

    /// Saves `blocks[i]` of the cache under `keys[i]`. With `per_layer`
    /// the caller signals each written layer with [`StoreOp::layer_saved`];
    /// otherwise every layer is taken as written. Blocks that lead the list
    /// and are stored already are skipped. Never blocks.
    pub fn save(&self, blocks: &[u32], keys: &[BlockKey], per_layer: bool) -> Result<StoreOp> {
        self.check_open()?;
        if blocks.len() != keys.len() {
            return Err(Error::Invalid(format!(
                "{} blocks and {} keys",
                blocks.len(),
                keys.len()
            )));
        }
        self.inner
            .cache
            .layout()
            .check_blocks("source", blocks, false)?;
        let op = self.new_op(StoreOpKind::Save, blocks, !per_layer)?;
        self.inner.counters.saves.fetch_add(1, Relaxed);
        let (inner, o, keys) = (self.inner.clone(), op.inner.clone(), keys.to_vec());
        self.inner.rt.spawn(async move {
            inner.run_save(&o, &keys).await;
            inner.finish(&o);
        });
        Ok(op)
    }

    /// Loads the lookup's blocks `first..first + dst_blocks.len()` into
    /// `dst_blocks` of the cache, layer by layer ([`StoreOp::layer_ready`]).
    /// Never blocks.
    pub fn load(&self, lookup: &Lookup, first: usize, dst_blocks: &[u32]) -> Result<StoreOp> {
        self.check_open()?;
        if !Arc::ptr_eq(&lookup.inner.prefix, &self.inner) {
            return Err(Error::Invalid(
                "the lookup was made by another prefix store".into(),
            ));
        }
        let n = lookup.blocks();
        if first.checked_add(dst_blocks.len()).is_none_or(|e| e > n) {
            return Err(Error::Invalid(format!(
                "blocks {first}..{} of a lookup that found {n}",
                first.saturating_add(dst_blocks.len())
            )));
        }
        self.inner
            .cache
            .layout()
            .check_blocks("destination", dst_blocks, true)?;
        let Some(leases) = lookup.inner.start_load(first, dst_blocks.len()) else {
            return Err(Error::Invalid("the lookup was released".into()));
        };
        let op = match self.new_op(StoreOpKind::Load, dst_blocks, true) {
            Ok(op) => op,
            Err(e) => {
                lookup.inner.end_load();
                return Err(e);
            }
        };
        self.inner.counters.loads.fetch_add(1, Relaxed);
        let (inner, o, l) = (self.inner.clone(), op.inner.clone(), lookup.clone());
        self.inner.rt.spawn(async move {
            inner.run_load(&o, &l, &leases).await;
            l.inner.end_load();
            inner.finish(&o);
        });
        Ok(op)
    }

    fn new_op(&self, kind: StoreOpKind, blocks: &[u32], all_layers: bool) -> Result<StoreOp> {
        let layers = self.inner.cache.layout().num_layers();
        let op = StoreOp {
            inner: Arc::new(OpInner {
                id: self.inner.next_op.fetch_add(1, Relaxed),
                kind,
                blocks: blocks.to_vec(),
                num_layers: layers,
                deadline: Instant::now() + self.inner.cfg.op_timeout,
                state: Mutex::new(OpState {
                    signalled: vec![all_layers; layers as usize],
                    signalled_prefix: if all_layers { layers } else { 0 },
                    layers_ready: 0,
                    cancelled: false,
                    results: vec![None; blocks.len()],
                    bytes: 0,
                    skipped: 0,
                    done: None,
                }),
                cv: Condvar::new(),
                notify: Notify::new(),
            }),
        };
        let mut ops = self.inner.ops.lock();
        ops.retain(|o| o.poll().is_none());
        if ops.len() >= self.inner.cfg.max_ops {
            return Err(Error::Invalid(format!(
                "{} operations in flight (at most {})",
                ops.len(),
                self.inner.cfg.max_ops
            )));
        }
        ops.push(op.clone());
        Ok(op)
    }

    /// Operations not yet completed.
    pub fn in_flight(&self) -> Vec<StoreOp> {
        let mut ops = self.inner.ops.lock();
        ops.retain(|o| o.poll().is_none());
        ops.clone()
    }

    /// Waits up to `timeout` for every operation started before the call;
    /// `false` if some are still running.
    pub fn fence(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        self.in_flight().iter().all(|o| {
            o.wait(until.saturating_duration_since(Instant::now()))
                .is_some()
        })
    }

    /// Async [`PrefixStore::fence`] without a timeout (operations have deadlines).
    pub async fn fence_async(&self) {
        for o in self.in_flight() {
            o.wait_async().await;
        }
    }

    /// Refuses new operations, cancels those running and waits up to
    /// `timeout` for them; `false` if some are still running.
    pub fn close(&self, timeout: Duration) -> bool {
        self.inner.closing.store(true, Relaxed);
        let ops = self.in_flight();
        for o in &ops {
            o.cancel();
        }
        self.fence(timeout)
    }

    pub fn stats(&self) -> PrefixStats {
        let c = &self.inner.counters;
        PrefixStats {
            lookups: c.lookups.load(Relaxed),
            lookup_blocks: c.lookup_blocks.load(Relaxed),
            hit_blocks: c.hit_blocks.load(Relaxed),
            saves: c.saves.load(Relaxed),
            blocks_saved: c.blocks_saved.load(Relaxed),
            blocks_save_skipped: c.blocks_save_skipped.load(Relaxed),
            bytes_saved: c.bytes_saved.load(Relaxed),
            loads: c.loads.load(Relaxed),
            blocks_loaded: c.blocks_loaded.load(Relaxed),
            bytes_loaded: c.bytes_loaded.load(Relaxed),
            blocks_failed: c.blocks_failed.load(Relaxed),
            ops_in_flight: self.in_flight().len() as u64,
            lookups_open: self.inner.lookups_open.load(Relaxed) as u64,
        }
    }

    /// Blocking [`PrefixStore::lookup`] for threads outside the runtime,
    /// bounded by `timeout` (a lookup cut short leaves its leases to expire).
    pub fn lookup_blocking(
        &self,
        keys: &[BlockKey],
        lease: Duration,
        timeout: Duration,
    ) -> Result<Lookup> {
        block_on(&self.inner.rt, timeout, "lookup", self.lookup(keys, lease))?
    }
}

/// Runs `fut` on `rt` from a thread outside it, bounded by `timeout`.
pub(crate) fn block_on<T>(
    rt: &Handle,
    timeout: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T> {
    if Handle::try_current().is_ok() {
        return Err(Error::Invalid(format!(
            "blocking {what} called from inside an async runtime; use the async variant"
        )));
    }
    rt.block_on(async { tokio::time::timeout(timeout, fut).await })
        .map_err(|_| {
            Error::Engine(kvmesh_gpu::Error::Timeout(format!(
                "{what} did not finish within {timeout:?}"
            )))
        })
}

impl Inner {
    fn region_refs(&self) -> Vec<&Region> {
        self.cache.regions().iter().collect()
    }

    /// Runs a save (cache to staging) or load (staging to cache) plan: on
    /// the GPU for a GPU cache, with memcpy otherwise.
    async fn copy_plan(
        &self,
        dir: Direction,
        plan: &[CopySegment],
        cache: &[&Region],
        staging: &[&Region],
    ) -> Result<()> {
        match (&self.gpu, dir) {
            (Some(g), _) => g.copy(dir, plan, cache).await,
            (None, Direction::Save) => Inner::copy(plan, cache, staging).map_err(Error::Invalid),
            (None, Direction::Load) => Inner::copy(plan, staging, cache).map_err(Error::Invalid),
        }
    }

    /// Copies plan segments between host regions.
    fn copy(segs: &[CopySegment], src: &[&Region], dst: &[&Region]) -> Result<(), String> {
        for s in segs {
            let (a, b) = (src[s.src.region as usize], dst[s.dst.region as usize]);
            // SAFETY: the plan stays inside the registered regions (the
            // layout was checked against their lengths at registration and
            // the staging slots are block-sized); source and destination
            // are different regions; no engine batch touches these ranges
            // now (staging slots are owned by this operation, cache blocks
            // by the caller's save/load contract).
            let r = unsafe {
                a.slice(s.src.offset, s.len).and_then(|from| {
                    b.slice_mut(s.dst.offset, s.len)
                        .map(|to| to.copy_from_slice(from))
                })
            };
            r.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Where the packed bytes of `block` start in the cache (direct layouts).
    fn direct_place(&self, block: u32) -> Place {
        let shape = self.cache.layout().shape();
        let all = 0..shape.num_layers;
        let one = Packed::contiguous(shape, 0, 0, 1, all.clone());
        self.cache
            .layout()
            .plan_save(&[block], all, &one)
            .map(|p| p[0].src)
            .unwrap_or(Place::new(0, 0))
    }

    fn put_options(&self) -> PutOptions {
        PutOptions {
            replicas: self.cfg.replicas,
            ..PutOptions::default()
        }
    }

    async fn run_save(&self, op: &OpInner, keys: &[BlockKey]) {
        let okeys: &[ObjectKey] = &keys.iter().map(object_key).collect::<Vec<_>>();
        // Leading blocks stored already (keys name prefixes: their bytes
        // are the ones we would send).
        let skip = self.store.contains_prefix(okeys).await.unwrap_or(0);
        {
            let mut st = op.state.lock();
            for r in &mut st.results[..skip] {
                *r = Some(Ok(()));
            }
            st.skipped = skip as u32;
        }
        let todo: Vec<usize> = (skip..okeys.len()).collect();
        if todo.is_empty() {
            return;
        }
        let layers = op.num_layers;
        let all_signalled = |s: &OpState| s.signalled_prefix == layers;
        let opts = self.put_options();
        if self.direct {
            if op.wait_for(all_signalled).await.is_err() {
                return;
            }
            let regions = self.cache.regions();
            for chunk in todo.chunks(self.staging.total) {
                if op.stopped().is_some() {
                    return;
                }
                let puts = chunk.iter().map(|&i| {
                    let p = self.direct_place(op.blocks[i]);
                    let region = &regions[p.region as usize];
                    async move {
                        let r = self
                            .store
                            .put_from(okeys[i], region, p.offset, self.block_bytes, opts)
                            .await;
                        (i, r)
                    }
                });
                for (i, r) in futures::future::join_all(puts).await {
                    self.record(op, i, r);
                }
            }
            return;
        }
        let cache_regions = self.region_refs();
        let staging = [&self.staging.region];
        for chunk in todo.chunks(self.staging.total) {
            // Pack layer by layer only with slots in hand now; otherwise
            // wait for the last layer before waiting for slots.
            let slots = match self.staging.try_acquire(chunk.len()) {
                Some(s) => s,
                None => {
                    if op.wait_for(all_signalled).await.is_err() {
                        return;
                    }
                    match op.acquire(&self.staging, chunk.len()).await {
                        Ok(s) => s,
                        Err(_) => return,
                    }
                }
            };
            let blocks: Vec<u32> = chunk.iter().map(|&i| op.blocks[i]).collect();
            let packed = slots.packed(chunk.len());
            let mut done = 0;
            while done < layers {
                if op.wait_for(|s| s.signalled_prefix > done).await.is_err() {
                    return;
                }
                let upto = op.state.lock().signalled_prefix;
                let copied = self
                    .cache
                    .layout()
                    .plan_save(&blocks, done..upto, &packed)
                    .map_err(|e| e.to_string())
                    .map_err(Error::Invalid);
                let copied = match copied {
                    Ok(plan) => {
                        self.copy_plan(Direction::Save, &plan, &cache_regions, &staging)
                            .await
                    }
                    Err(e) => Err(e),
                }
                .map_err(|e| e.to_string());
                if let Err(m) = copied {
                    for &i in chunk {
                        op.set(i, Err((BlockErrorKind::Unsupported, m.clone())), 0);
                    }
                    return;
                }
                done = upto;
            }
            if op.stopped().is_some() {
                return;
            }
            let puts = chunk.iter().enumerate().map(|(j, &i)| {
                let off = slots.offset(j);
                let region = &self.staging.region;
                async move {
                    let r = self
                        .store
                        .put_from(okeys[i], region, off, self.block_bytes, opts)
                        .await;
                    (i, r)
                }
            });
            for (i, r) in futures::future::join_all(puts).await {
                self.record(op, i, r);
            }
        }
    }

    fn record(&self, op: &OpInner, i: usize, r: kvmesh_p2p_store::Result<()>) {
        match r {
            Ok(()) => op.set(i, Ok(()), self.block_bytes),
            Err(e) => op.set(i, Err((BlockErrorKind::of_store(&e), e.to_string())), 0),
        }
    }

    async fn run_load(&self, op: &OpInner, lookup: &Lookup, leases: &[Leased]) {
        let layers = op.num_layers;
        let n = op.blocks.len();
        if n == 0 {
            op.set_layers_ready(layers);
            return;
        }
        let expired = |op: &OpInner| {
            if Instant::now() < lookup.expires() {
                return false;
            }
            for i in op.pending() {
                op.set(
                    i,
                    Err((
                        BlockErrorKind::NotFound,
                        "the lookup's lease expired before the read".into(),
                    )),
                    0,
                );
            }
            true
        };
        if self.direct {
            if op.stopped().is_some() || expired(op) {
                return;
            }
            let regions = self.cache.regions();
            let places: Vec<Place> = op.blocks.iter().map(|&b| self.direct_place(b)).collect();
            let items: Vec<(&Leased, &Region, u64)> = leases
                .iter()
                .zip(&places)
                .map(|(l, p)| (l, &regions[p.region as usize], p.offset))
                .collect();
            let res = self.store.read_leased(&items).await;
            for (i, r) in res.into_iter().enumerate() {
                self.record(op, i, r);
            }
            op.set_layers_ready(layers);
            return;
        }
        let cache_regions = self.region_refs();
        let staging = [&self.staging.region];
        let idx: Vec<usize> = (0..n).collect();
        let chunks: Vec<&[usize]> = idx.chunks(self.staging.total).collect();
        for (c, chunk) in chunks.iter().enumerate() {
            let Ok(slots) = op.acquire(&self.staging, chunk.len()).await else {
                return;
            };
            if op.stopped().is_some() || expired(op) {
                return;
            }
            let items: Vec<(&Leased, &Region, u64)> = chunk
                .iter()
                .enumerate()
                .map(|(j, &i)| (&leases[i], &self.staging.region, slots.offset(j)))
                .collect();
            let res = self.store.read_leased(&items).await;
            // Entries of this chunk whose bytes arrived intact.
            let mut ok_j = Vec::new();
            for (j, r) in res.into_iter().enumerate() {
                match r {
                    Ok(()) => ok_j.push(j),
                    r => self.record(op, chunk[j], r),
                }
            }
            let blocks: Vec<u32> = ok_j.iter().map(|&j| op.blocks[chunk[j]]).collect();
            let packed = Packed {
                places: ok_j
                    .iter()
                    .map(|&j| Place::new(0, slots.offset(j)))
                    .collect(),
                first_layer: 0,
            };
            let last = c + 1 == chunks.len();
            // The last chunk makes layers ready one by one.
            let steps: Vec<std::ops::Range<u32>> = if last {
                (0..layers).map(|l| l..l + 1).collect()
            } else {
                std::iter::once(0..layers).collect()
            };
            for r in steps {
                if !blocks.is_empty() {
                    let copied = self
                        .cache
                        .layout()
                        .plan_load(&blocks, r.clone(), &packed)
                        .map_err(|e| e.to_string())
                        .map_err(Error::Invalid);
                    let copied = match copied {
                        Ok(plan) => {
                            self.copy_plan(Direction::Load, &plan, &cache_regions, &staging)
                                .await
                        }
                        Err(e) => Err(e),
                    }
                    .map_err(|e| e.to_string());
                    if let Err(m) = copied {
                        for &j in &ok_j {
                            op.set(chunk[j], Err((BlockErrorKind::Unsupported, m.clone())), 0);
                        }
                        return;
                    }
                }
                if last {
                    op.set_layers_ready(r.end);
                }
            }
            for &j in &ok_j {
                op.set(chunk[j], Ok(()), self.block_bytes);
            }
        }
    }

    /// Completes an operation: blocks left pending fail as cancelled or
    /// timed out; counters; wake the waiters.
    fn finish(&self, op: &OpInner) {
        let mut st = op.state.lock();
        let stop = if st.cancelled {
            Stop::Cancelled
        } else {
            Stop::Deadline
        };
        let mut failed = Vec::new();
        let mut done = 0u32;
        for (i, r) in st.results.iter().enumerate() {
            match r {
                Some(Ok(())) => done += 1,
                Some(Err((k, m))) => failed.push(StoreBlockFailure {
                    index: i as u32,
                    block: op.blocks[i],
                    error: *k,
                    message: m.clone(),
                }),
                None => failed.push(StoreBlockFailure {
                    index: i as u32,
                    block: op.blocks[i],
                    error: stop.kind(),
                    message: format!("{} before this block moved", stop.kind()),
                }),
            }
        }
        let skipped = st.skipped;
        let what = match op.kind {
            StoreOpKind::Save => "save",
            StoreOpKind::Load => "load",
        };
        let status = StoreOpStatus {
            result: failed.first().map_or(Ok(()), |f| Err(f.error)),
            bytes: st.bytes,
            blocks_done: done
                - if op.kind == StoreOpKind::Save {
                    skipped
                } else {
                    0
                },
            blocks_skipped: skipped,
            message: failed.first().map(|f| {
                format!(
                    "{what} of {} blocks: {} failed; first: block {} (entry {}): {}",
                    op.blocks.len(),
                    failed.len(),
                    f.block,
                    f.index,
                    f.message
                )
            }),
            failed,
        };
        let c = &self.counters;
        match op.kind {
            StoreOpKind::Save => {
                c.blocks_saved.fetch_add(status.blocks_done as u64, Relaxed);
                c.blocks_save_skipped.fetch_add(skipped as u64, Relaxed);
                c.bytes_saved.fetch_add(status.bytes, Relaxed);
            }
            StoreOpKind::Load => {
                c.blocks_loaded
                    .fetch_add(status.blocks_done as u64, Relaxed);
                c.bytes_loaded.fetch_add(status.bytes, Relaxed);
            }
        }
        c.blocks_failed
            .fetch_add(status.failed.len() as u64, Relaxed);
        st.layers_ready = op.num_layers;
        st.done = Some(status);
        drop(st);
        op.wake();
    }
}
