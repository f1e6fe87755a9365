//! The engine: one per process. Owns registered memory, the listeners, the
//! peer connections and the I/O runtime; turns batches into slices (see
//! [`crate::plan`]) and hands them to the transports.
//!
//! ```text
//!  submit(ops) --validate--> plan per (peer, transport) --> tcp lanes  --> peer's tcp server
//!       |                                              |--> shm copies --> peer's memfd pages
//!       |                                              |--> cuda-ipc: cuMemcpyAsync on the
//!       |                                              |    engine stream --> event poller
//!       |                                              \--> rdma (feature): one op = one slice,
//!       |                                                   RdmaTransport::submit --> NIC;
//!       |                                                   progress thread --> slices done
//!       +--> deadline timer (abort + tear down stalled lanes; rdma: RdmaTransport::abort)
//!  all slices terminal --> notifications (if any) --> batch complete --> poll / wait
//! ```
//!
//! The transport of each op is chosen by [`crate::route::choose`] (pure).
//!
//! GPU memory: `cuda-ipc` copies device to device (or host to device)
//! straight into a same-host peer's region; `tcp` (both sides) and `shm`
//! (initiator side) stage GPU bytes through pinned bounce buffers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::batch::{Batch, BatchOptions, BatchState, Op, OpKind, BUSY, PENDING};
use crate::desc::{local_host_id, EngineId, PeerDesc};
use crate::error::{Error, ErrorKind, Result};
use crate::memory::{InUse, MemoryKind, Region, RegionDesc, RegionId, RegionInner};
use crate::plan::{plan, OpSpan, Slice};
use crate::rdma_wire::RdmaRegionDesc;
use crate::route::{choose, rdma_reach, Carrier, Reach};
use crate::shm::{self, CopyJob, ShmPeer};
use crate::tcp::{self, Lane, LaneJob};
use crate::wire::MAX_NOTIFY_BYTES;

/// Which transport an initiator uses for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// TCP to every peer.
    Tcp,
    /// Shared memory only; peers on other hosts (or regions that are not
    /// shareable) are refused with `Unreachable`.
    Shm,
    /// `cuda-ipc` for same-host GPU regions, `shm` for same-host shareable
    /// host regions, else `tcp`.
    Auto,
    /// CUDA IPC only (same machine, remote GPU regions); other ops are
    /// refused with `Unreachable`.
    CudaIpc,
    /// RDMA only (cargo feature `rdma`): both engines run RDMA and the
    /// region carries rkeys; other ops are refused with `Unreachable`.
    /// `Engine::new` fails where no RDMA NIC can be used, or in a build
    /// without the feature. (`Auto` uses RDMA when it is up, after
    /// `cuda-ipc` and `shm`, before `tcp`.)
    Rdma,
}

impl std::str::FromStr for TransportKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(TransportKind::Tcp),
            "shm" => Ok(TransportKind::Shm),
            "auto" => Ok(TransportKind::Auto),
            "cuda-ipc" => Ok(TransportKind::CudaIpc),
            "rdma" => Ok(TransportKind::Rdma),
            _ => Err(Error::Invalid(format!(
                "unknown transport {s:?} (expected tcp, shm, cuda-ipc, rdma or auto)"
            ))),
        }
    }
}

/// Engine configuration. `Default` gives loopback-only listening; set
/// `tcp_listen` to a routable address for a real cluster.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Transport used when this engine initiates.
    pub transport: TransportKind,
    /// TCP data-plane listen address (`0.0.0.0:0` advertises every IPv4
    /// interface address).
    pub tcp_listen: SocketAddr,
    /// TCP connections per peer (lanes a large batch is spread over).
    pub tcp_conns: u16,
    /// Largest piece of an operation sent as one request.
    pub slice_size: u64,
    /// Send large TCP payloads with `vmsplice`+`splice` (no copy on the
    /// sending side) instead of `writev`.
    pub tcp_splice: bool,
    /// Serve the `shm` channel (same-host peers). When false, nobody maps
    /// this engine's memory, and [`Engine::alloc`] backs host regions with
    /// private memory on transparent huge pages instead of a shared memfd.
    pub shm: bool,
    /// Threads that run `shm` copies of large batches.
    pub shm_threads: usize,
    /// `shm` batches up to this many bytes are copied inside `submit`.
    pub shm_inline_bytes: u64,
    /// `shm` WRITE batches of at least this many bytes use streaming stores,
    /// which bypass this core's cache: 1.2-1.7x faster copies into memory
    /// the peer reads later (a stored object, a KV page). A peer that reads
    /// the bytes at once, from this core's cache, is better served by
    /// ordinary stores: `u64::MAX` turns streaming off. Default 1 MiB (half
    /// a server core's L2: a larger batch would mostly pass through it).
    pub shm_streaming_bytes: u64,
    /// Deadline of a batch when its options give none.
    pub default_timeout: Duration,
    /// Worker threads of the engine's I/O runtime.
    pub io_threads: usize,
    /// How long a waiter that expects bytes within microseconds polls its
    /// TCP socket before it parks: a caller waiting for the answer on a
    /// direct connection ([`Engine::call`], [`Engine::read_streamed`],
    /// [`Engine::write_streamed`]), and a server connection that answered
    /// an RPC sent within this long of its previous answer (waiting for the
    /// caller's next request).
    /// Parking costs a thread wake-up or two when the bytes come, tens of
    /// microseconds on a busy or virtualized host; polling costs the
    /// waiting core at most this long. Zero never polls. Default 50 µs.
    pub reply_spin: Duration,
    /// Batches queued per lane before `submit` answers `Busy`.
    pub lane_queue: usize,
    /// Requests in flight per lane.
    pub lane_inflight: usize,
    /// Notifications buffered before senders are slowed down.
    pub notify_queue: usize,
    /// Incoming data connections accepted at once.
    pub max_server_conns: usize,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// The `rdma` transport (used only in builds with the `rdma` feature).
    pub rdma: RdmaSettings,
}

/// Settings of the `rdma` transport. With the `rdma` feature and transport
/// `Auto` or `Rdma`, [`Engine::new`] opens the NICs; `Auto` goes on without
/// RDMA where none can be used, `Rdma` fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaSettings {
    /// Use RDMA at all (with `Auto`); `false` with transport `Rdma` is an
    /// error.
    pub enabled: bool,
    /// NIC names to use (e.g. `mlx5_0`); empty = every NIC with an active
    /// port.
    pub nics: Vec<String>,
    /// Queue pairs per (local NIC, peer NIC) pair.
    pub qps_per_nic_pair: usize,
    /// Largest RDMA work request; operations are cut into pieces of at
    /// most this many bytes spread over the queue pairs.
    pub max_slice_bytes: u64,
}

impl Default for RdmaSettings {
    fn default() -> Self {
        RdmaSettings {
            enabled: true,
            nics: Vec::new(),
            qps_per_nic_pair: 2,
            max_slice_bytes: 1 << 20,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            transport: TransportKind::Auto,
            tcp_listen: "127.0.0.1:0".parse().expect("literal address"),
            tcp_conns: 4,
            slice_size: 1 << 20,
            tcp_splice: true,
            shm: true,
            shm_threads: 2,
            shm_inline_bytes: 256 << 10,
            shm_streaming_bytes: 1 << 20,
            default_timeout: Duration::from_secs(30),
            io_threads: 2,
            reply_spin: Duration::from_micros(50),
            lane_queue: 1024,
            lane_inflight: 256,
            notify_queue: 4096,
            max_server_conns: 1024,
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            rdma: RdmaSettings::default(),
        }
    }
}

impl EngineConfig {
    /// The default configuration for an engine that moves bytes with
    /// `transport`: it serves `shm` only where that transport may use it
    /// (`Auto`, `Shm`). A `Tcp`, `Rdma` or `CudaIpc` engine then allocates
    /// its host regions as private huge-page memory (see
    /// [`EngineConfig::shm`]), which sockets and NICs move faster.
    pub fn for_transport(transport: TransportKind) -> Self {
        EngineConfig {
            transport,
            shm: matches!(transport, TransportKind::Auto | TransportKind::Shm),
            ..EngineConfig::default()
        }
    }
}

/// A message delivered after all bytes of a batch landed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Engine id of the sender.
    pub from: EngineId,
    pub data: Vec<u8>,
}

/// Handle of a peer engine inside this engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u64);

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer#{}", self.0)
    }
}

/// State shared by the engine and its background tasks.
pub(crate) struct Shared {
    pub(crate) desc: Arc<PeerDesc>,
    pub(crate) cfg: EngineConfig,
    /// The RDMA transport, when it is up.
    #[cfg(feature = "rdma")]
    pub(crate) rdma: Option<Arc<crate::rdma_link::RdmaLink>>,
    pub(crate) regions: RwLock<HashMap<RegionId, Arc<RegionInner>>>,
    pub(crate) notify_tx: mpsc::Sender<Notification>,
    pub(crate) server_conns: AtomicUsize,
    pub(crate) shm_conns: Mutex<HashMap<u64, Arc<shm::ServerConn>>>,
    copy_tx: crossbeam_channel::Sender<CopyJob>,
    rt: tokio::runtime::Handle,
    rpc: RwLock<Option<RpcHandler>>,
    deadlines: Arc<crate::deadline::Deadlines>,
    /// Wakes threads blocked in `recv_notification_timeout`.
    pub(crate) notify_lock: Mutex<()>,
    pub(crate) notify_cv: parking_lot::Condvar,
    /// One copy stream per GPU for `cuda-ipc` batches.
    gpu_streams: Mutex<HashMap<u32, Arc<crate::cuda::GpuStream>>>,
}

/// How a streamed transfer can skip the batch machinery.
enum Direct {
    /// Over a direct TCP connection to this peer.
    Tcp(Arc<Peer>),
    /// As a copy in the calling thread out of the peer's mapping (reads).
    Shm(Arc<ShmPeer>),
    /// Not at all: an ordinary batch.
    No,
}

/// Answers RPCs from peers ([`Engine::call`], [`Engine::call_bulk`]): gets
/// the caller's engine id and the request, returns the reply. Runs on the
/// engine's I/O threads, so it must be quick and must not block.
pub type RpcHandler = Arc<dyn Fn(EngineId, &[u8]) -> Reply + Send + Sync>;

/// What an [`RpcHandler`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// These bytes (at most 1 MiB).
    Bytes(Vec<u8>),
    /// `head` (at most 1 MiB), then `len` bytes (at most 64 MiB) at
    /// `offset` of this engine's registered host region `region`. To a
    /// caller of [`Engine::call_bulk`] over TCP the bytes go from the region
    /// to the socket with no reply buffer in between (an answer of one
    /// 256 KiB piece from shareable memory by page reference, a larger one
    /// copied into the socket by the serving thread, which then overlaps
    /// with the caller's receive), so they may be read after the handler
    /// returned:
    /// the handler must keep them in place and unchanged until the caller
    /// is done with them (under a lease the caller ends, say). A caller of
    /// [`Engine::call`] gets `head` and the bytes concatenated. Bytes that
    /// cannot be sent (a range outside the region or over the limit, GPU
    /// memory, a region deregistered meanwhile) are left out: the caller
    /// gets `head` alone, so it still learns what the handler granted and
    /// can end it, and sees no bulk bytes where the head announced some.
    Bulk {
        head: Vec<u8>,
        region: RegionId,
        offset: u64,
        len: u64,
    },
}

impl From<Vec<u8>> for Reply {
    fn from(v: Vec<u8>) -> Reply {
        Reply::Bytes(v)
    }
}

/// Where [`Engine::call_bulk`] puts the bulk bytes of an answer.
#[derive(Debug)]
pub enum BulkDest<'a> {
    /// Into this registered host region, from this offset.
    Region(&'a Region, u64),
    /// Into a new vector ([`BulkAnswer::bytes`]).
    Vec,
}

/// An answer to [`Engine::call_bulk`].
#[derive(Debug, Default)]
pub struct BulkAnswer {
    /// The reply's head (all of it, for a [`Reply::Bytes`] answer).
    pub head: Vec<u8>,
    /// How many bulk bytes followed the head.
    pub len: u64,
    /// Whether they landed where `place` said (false: it refused them, or
    /// there were none).
    pub landed: bool,
    /// The bytes, for [`BulkDest::Vec`].
    pub bytes: Option<Vec<u8>>,
}

/// Where the bulk bytes of a [`Engine::call_bulk`] answer land: a held
/// range of a local host region, or a new vector's room.
enum Landing {
    /// The range stays registered while the bytes land.
    Region {
        _held: InUse,
        at: usize,
    },
    Vec(Vec<u8>),
}

impl Landing {
    fn new(sh: &Shared, dest: BulkDest<'_>, len: u64) -> Result<Landing> {
        match dest {
            BulkDest::Region(r, offset) => {
                if r.peer.engine_id != sh.desc.engine_id {
                    return Err(Error::Invalid(
                        "bulk destination: a region of another engine".into(),
                    ));
                }
                let held = sh
                    .checked_region(r.id(), offset, len)
                    .map_err(|k| Error::Invalid(format!("bulk destination: {k}")))?;
                if held.gpu_device().is_some() {
                    return Err(Error::Invalid(
                        "bulk destination: bulk answers land in host memory".into(),
                    ));
                }
                let at = held.ptr() as usize + offset as usize;
                Ok(Landing::Region { _held: held, at })
            }
            BulkDest::Vec => Ok(Landing::Vec(Vec::with_capacity(len as usize))),
        }
    }

    /// The address of the first byte.
    fn ptr(&mut self) -> usize {
        match self {
            Landing::Region { at, .. } => *at,
            Landing::Vec(v) => v.as_mut_ptr() as usize,
        }
    }

    /// The vector, for a vector landing.
    ///
    /// # Safety
    /// All `len` bytes must have been written.
    unsafe fn finish(self, len: u64) -> Option<Vec<u8>> {
        match self {
            Landing::Region { .. } => None,
            Landing::Vec(mut v) => {
                // SAFETY: the capacity is `len` and the caller wrote them all.
                unsafe { v.set_len(len as usize) };
                Some(v)
            }
        }
    }
}

/// Splits a framed `OP_CALL_BULK` answer into head and bulk bytes.
fn split_framed(framed: &[u8]) -> Option<(&[u8], &[u8])> {
    let hl = u32::from_le_bytes(framed.get(..4)?.try_into().ok()?) as usize;
    let rest = &framed[4..];
    (hl <= rest.len()).then(|| rest.split_at(hl))
}

impl Shared {
    pub(crate) fn rt_handle(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    /// Looks a region up and checks a request against it (serving side).
    pub(crate) fn checked_region(
        &self,
        region: RegionId,
        offset: u64,
        len: u64,
    ) -> Result<InUse, ErrorKind> {
        let r = self
            .regions
            .read()
            .get(&region)
            .cloned()
            .ok_or(ErrorKind::UnknownRegion)?;
        r.check("remote request", offset, len)
            .map_err(|e| e.kind())?;
        Ok(InUse::new(r))
    }

    /// The engine's copy stream on `dev`.
    fn gpu_stream(&self, dev: &crate::cuda::GpuDevice) -> Result<Arc<crate::cuda::GpuStream>> {
        let mut g = self.gpu_streams.lock();
        if let Some(s) = g.get(&dev.ordinal()) {
            return Ok(s.clone());
        }
        let s = Arc::new(crate::cuda::GpuStream::new(dev)?);
        g.insert(dev.ordinal(), s.clone());
        Ok(s)
    }

    /// Runs the RPC handler; (status, reply).
    pub(crate) fn answer_call(&self, from: EngineId, req: &[u8]) -> (u8, Reply) {
        let h = self.rpc.read().clone();
        match h {
            Some(h) => (0, h(from, req)),
            None => (ErrorKind::Unreachable.code(), Reply::Bytes(Vec::new())),
        }
    }

    /// The bytes of a [`Reply::Bulk`], checked: the held region and the
    /// address of the first byte; `Invalid` for a head or bulk over its
    /// limit or for GPU memory, the region's error for a bad range (logged:
    /// the answer then goes without them).
    pub(crate) fn bulk_source(
        &self,
        head: &[u8],
        region: RegionId,
        offset: u64,
        len: u64,
    ) -> Result<(InUse, usize), ErrorKind> {
        let checked = || {
            if head.len() as u64 > crate::wire::MAX_CALL_BYTES || len > crate::wire::MAX_BULK_BYTES
            {
                return Err(ErrorKind::Invalid);
            }
            let r = self.checked_region(region, offset, len)?;
            if r.gpu_device().is_some() {
                return Err(ErrorKind::Invalid);
            }
            let at = r.ptr() as usize + offset as usize;
            Ok((r, at))
        };
        checked().inspect_err(|k| {
            tracing::warn!(region, offset, len, "bulk bytes left out of an answer: {k}")
        })
    }

    /// An answer as one buffer, for channels that send from one: framed
    /// (`u32` head length, head, bulk) for `OP_CALL_BULK`, head and bulk
    /// concatenated for `OP_CALL`; (status, payload).
    pub(crate) fn answer_payload(&self, op: u8, status: u8, reply: Reply) -> (u8, Vec<u8>) {
        let framed = op == crate::wire::OP_CALL_BULK;
        let (head, bulk) = match reply {
            Reply::Bytes(v) if !framed => return (status, v),
            Reply::Bytes(v) => (v, None),
            Reply::Bulk {
                head,
                region,
                offset,
                len,
            } => {
                let src = self.bulk_source(&head, region, offset, len);
                (head, src.map(|src| (src, len as usize)).ok())
            }
        };
        let blen = bulk.as_ref().map_or(0, |b| b.1);
        let mut out = Vec::with_capacity(4 + head.len() + blen);
        if framed {
            out.extend_from_slice(&(head.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(&head);
        if let Some(((_held, at), n)) = bulk {
            // SAFETY: checked against the region, which `_held` keeps
            // registered; the handler keeps the bytes unchanged.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(at as *const u8, n) });
        }
        (status, out)
    }

    /// Answers an engine control message (`OP_CONTROL`) from `from`:
    /// (status, reply). Engines running without RDMA answer `Unreachable`.
    pub(crate) async fn answer_control(
        self: &Arc<Self>,
        from: EngineId,
        req: &[u8],
    ) -> (u8, Vec<u8>) {
        #[cfg(feature = "rdma")]
        if let Some(link) = &self.rdma {
            return link.answer(self, from, req).await;
        }
        let _ = (from, req);
        (ErrorKind::Unreachable.code(), Vec::new())
    }

    /// Queues an incoming notification; waits (back-pressuring the sender's
    /// connection) while the queue is full.
    pub(crate) async fn deliver(&self, n: Notification) {
        let _ = self.notify_tx.send(n).await;
        let _g = self.notify_lock.lock();
        self.notify_cv.notify_all();
    }
}

struct Peer {
    desc: PeerDesc,
    same_host: bool,
    /// CUDA IPC reachability of the peer's GPU regions we imported.
    /// (with the region's length).
    gpu: Mutex<HashMap<RegionId, (crate::memory::GpuRegionDesc, u64)>>,
    /// Opened CUDA IPC mappings of the peer's regions.
    ipc: Mutex<HashMap<RegionId, Arc<crate::cuda::IpcMapping>>>,
    lanes: Mutex<Vec<Option<Arc<Lane>>>>,
    /// Connections that callers drive themselves (RPCs).
    direct: Arc<crate::tcp_direct::DirectPool>,
    shm: Mutex<Option<Arc<ShmPeer>>>,
    shm_connect: tokio::sync::Mutex<()>,
    /// RDMA keys of the peer's regions we imported.
    rdma_regions: Mutex<HashMap<RegionId, RdmaRegionDesc>>,
}

impl Peer {
    fn lane(&self, shared: &Arc<Shared>, i: usize) -> Arc<Lane> {
        let mut lanes = self.lanes.lock();
        match &lanes[i] {
            Some(l) if !l.is_dead() => l.clone(),
            _ => {
                let l = Lane::start(shared, &self.desc);
                lanes[i] = Some(l.clone());
                l
            }
        }
    }

    fn shm_ready(&self) -> Option<Arc<ShmPeer>> {
        self.shm
            .lock()
            .as_ref()
            .filter(|p| !p.dead.load(SeqCst))
            .cloned()
    }

    async fn shm_peer(&self, shared: &Arc<Shared>) -> Result<Arc<ShmPeer>, ErrorKind> {
        let _g = self.shm_connect.lock().await;
        if let Some(p) = self.shm_ready() {
            return Ok(p);
        }
        let p = ShmPeer::connect(shared, &self.desc).await?;
        *self.shm.lock() = Some(p.clone());
        Ok(p)
    }
}

struct EngineInner {
    shared: Arc<Shared>,
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    peers: RwLock<HashMap<PeerId, Arc<Peer>>>,
    by_engine: Mutex<HashMap<EngineId, PeerId>>,
    next_peer: AtomicU64,
    next_region: AtomicU64,
    next_batch: AtomicU64,
    notify_rx: tokio::sync::Mutex<mpsc::Receiver<Notification>>,
    local_addr: SocketAddr,
    /// Regions deregistered whose operations have not drained yet.
    draining: Mutex<std::collections::HashSet<RegionId>>,
    /// The thread polling the RDMA completion queues.
    #[cfg(feature = "rdma")]
    rdma_progress: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Engines of this process (a process cannot open its own CUDA IPC handles;
/// `cuda-ipc` between them uses the device pointer directly).
static LOCAL_ENGINES: Mutex<Vec<EngineId>> = Mutex::new(Vec::new());

impl Drop for EngineInner {
    fn drop(&mut self) {
        let id = self.shared.desc.engine_id;
        LOCAL_ENGINES.lock().retain(|e| *e != id);
        #[cfg(feature = "rdma")]
        if let Some(link) = &self.shared.rdma {
            link.stop();
            // The last handle may be dropped by the progress thread itself
            // (a completed batch's hook): then it exits after this round.
            if let Some(t) = self.rdma_progress.lock().take() {
                if t.thread().id() != std::thread::current().id() && t.join().is_err() {
                    tracing::warn!("RDMA progress thread panicked");
                }
            }
        }
        if let Some(rt) = self.rt.lock().take() {
            rt.shutdown_background();
        }
    }
}

/// The transfer engine. Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("id", &self.inner.shared.desc.short_id())
            .field("tcp", &self.inner.local_addr)
            .finish()
    }
}

/// Where a group of ops goes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Route {
    Tcp(PeerId),
    Shm(PeerId),
    CudaIpc(PeerId),
    /// RDMA to the peer; only chosen where this engine runs RDMA.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    Rdma(PeerId),
}

/// Checks the RDMA settings against the transport asked for; `Ok(true)`
/// when the engine should open its NICs.
fn wants_rdma(cfg: &EngineConfig) -> Result<bool> {
    let asked = cfg.transport == TransportKind::Rdma;
    if !cfg!(feature = "rdma") {
        // The settings mean nothing in this build.
        return match asked {
            true => Err(Error::Unsupported(
                "transport rdma: kvmesh-gpu was built without the rdma feature".into(),
            )),
            false => Ok(false),
        };
    }
    if asked && !cfg.rdma.enabled {
        return Err(Error::Invalid(
            "transport rdma with rdma.enabled = false".into(),
        ));
    }
    let wanted =
        cfg.rdma.enabled && matches!(cfg.transport, TransportKind::Auto | TransportKind::Rdma);
    if wanted && (cfg.rdma.qps_per_nic_pair == 0 || cfg.rdma.max_slice_bytes == 0) {
        return Err(Error::Invalid(
            "rdma.qps_per_nic_pair and rdma.max_slice_bytes must be > 0".into(),
        ));
    }
    Ok(wanted)
}

impl Engine {
    /// Starts an engine: binds the TCP listener (and the shm socket), starts
    /// the I/O runtime and the copy threads.
    pub fn new(cfg: EngineConfig) -> Result<Engine> {
        if cfg.slice_size == 0 || cfg.slice_size > tcp::MAX_SLICE_BYTES {
            return Err(Error::Invalid(format!(
                "slice_size must be in 1..={} bytes, got {}",
                tcp::MAX_SLICE_BYTES,
                cfg.slice_size
            )));
        }
        if cfg.tcp_conns == 0
            || cfg.io_threads == 0
            || cfg.lane_queue == 0
            || cfg.lane_inflight == 0
        {
            return Err(Error::Invalid(
                "tcp_conns, io_threads, lane_queue and lane_inflight must be > 0".into(),
            ));
        }
        let wants_rdma = wants_rdma(&cfg)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.io_threads)
            .thread_name("kvmesh-io")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting I/O runtime", e))?;
        let engine_id: EngineId = rand::random();
        #[cfg(feature = "rdma")]
        let rdma = if wants_rdma {
            crate::rdma_link::RdmaLink::open(&cfg)?
        } else {
            None
        };
        #[cfg(not(feature = "rdma"))]
        let _ = wants_rdma;
        let std_listener = std::net::TcpListener::bind(cfg.tcp_listen)
            .map_err(|e| Error::io(format!("binding {}", cfg.tcp_listen), e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("listener", e))?;
        let local_addr = std_listener
            .local_addr()
            .map_err(|e| Error::io("listener", e))?;
        let shm_name = format!("kvmesh-{}", crate::desc::hex_encode(&engine_id));
        let shm_listener = if cfg.shm {
            Some(
                shm::bind(&shm_name)
                    .map_err(|e| Error::io(format!("binding shm socket {shm_name}"), e))?,
            )
        } else {
            None
        };
        let desc = PeerDesc {
            engine_id,
            host_id: local_host_id(),
            tcp: tcp::advertise_addrs(local_addr),
            shm: cfg.shm.then_some(shm_name),
            tcp_conns: cfg.tcp_conns,
            secret: rand::random(),
            #[cfg(feature = "rdma")]
            rdma: rdma.as_ref().map(|l| l.local_desc()),
            #[cfg(not(feature = "rdma"))]
            rdma: None,
        };
        let (notify_tx, notify_rx) = mpsc::channel(cfg.notify_queue.max(1));
        let shared = Arc::new(Shared {
            desc: Arc::new(desc),
            cfg: cfg.clone(),
            #[cfg(feature = "rdma")]
            rdma,
            regions: RwLock::new(HashMap::new()),
            notify_tx,
            server_conns: AtomicUsize::new(0),
            shm_conns: Mutex::new(HashMap::new()),
            copy_tx: shm::start_copy_threads(cfg.shm_threads),
            rt: rt.handle().clone(),
            rpc: RwLock::new(None),
            deadlines: Arc::new(crate::deadline::Deadlines::default()),
            notify_lock: Mutex::new(()),
            notify_cv: parking_lot::Condvar::new(),
            gpu_streams: Mutex::new(HashMap::new()),
        });
        LOCAL_ENGINES.lock().push(engine_id);
        rt.spawn(shared.deadlines.clone().run());
        #[cfg(feature = "rdma")]
        let rdma_progress = match &shared.rdma {
            Some(link) => Some(link.spawn_progress(Arc::downgrade(&shared))?),
            None => None,
        };
        {
            let _g = rt.enter();
            let l = tokio::net::TcpListener::from_std(std_listener)
                .map_err(|e| Error::io("listener", e))?;
            rt.spawn(tcp::serve(l, shared.clone()));
            if let Some(l) = shm_listener {
                let l = tokio::net::UnixListener::from_std(l)
                    .map_err(|e| Error::io("shm listener", e))?;
                rt.spawn(shm::serve(l, shared.clone()));
            }
        }
        Ok(Engine {
            inner: Arc::new(EngineInner {
                shared,
                rt: Mutex::new(Some(rt)),
                peers: RwLock::new(HashMap::new()),
                by_engine: Mutex::new(HashMap::new()),
                next_peer: AtomicU64::new(1),
                next_region: AtomicU64::new(1),
                next_batch: AtomicU64::new(1),
                notify_rx: tokio::sync::Mutex::new(notify_rx),
                local_addr,
                draining: Mutex::new(std::collections::HashSet::new()),
                #[cfg(feature = "rdma")]
                rdma_progress: Mutex::new(rdma_progress),
            }),
        })
    }

    /// This engine's descriptor (contains the data-plane secret).
    pub fn descriptor(&self) -> PeerDesc {
        (*self.inner.shared.desc).clone()
    }

    /// The configuration this engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.shared.cfg
    }

    /// The bound TCP data-plane address.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    fn add_region(&self, #[allow(unused_mut)] mut inner: RegionInner) -> Region {
        #[cfg(feature = "rdma")]
        if let Some(link) = &self.shared().rdma {
            link.register(&mut inner);
        }
        let inner = Arc::new(inner);
        self.shared()
            .regions
            .write()
            .insert(inner.id, inner.clone());
        Region {
            inner,
            peer: self.shared().desc.clone(),
        }
    }

    /// Allocates and registers `len` bytes of engine-owned memory.
    ///
    /// Host kinds are backed by a memfd, so same-host peers reach them over
    /// `shm`; an engine that serves no `shm` (`EngineConfig::shm` false)
    /// allocates private memory on transparent huge pages instead, which
    /// TCP and RDMA move faster. `HostPinned` is additionally locked in RAM. GPU memory
    /// (zeroed, exported for CUDA IPC) needs the `cuda` feature and a
    /// driver; without them the error is [`Error::NoCuda`].
    pub fn alloc(&self, len: u64, kind: MemoryKind) -> Result<Region> {
        let id = self.inner.next_region.fetch_add(1, SeqCst);
        if let MemoryKind::Gpu { device } = kind {
            let inner = RegionInner::alloc_gpu(id, len, device).map_err(|e| match e {
                Error::NoCuda(m) => {
                    Error::NoCuda(format!("cannot allocate {len} bytes on GPU {device}: {m}"))
                }
                e => e,
            })?;
            return Ok(self.add_region(inner));
        }
        let inner = if self.shared().cfg.shm {
            RegionInner::alloc_memfd(id, len, kind)?
        } else {
            RegionInner::alloc_private(id, len, kind)?
        };
        Ok(self.add_region(inner))
    }

    /// Registers caller-owned memory. Reachable over `tcp` (not `shm`).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes from any thread
    /// until [`Engine::deregister`] for this region has returned `Ok`.
    ///
    /// GPU memory (`MemoryKind::Gpu`, e.g. a KV-cache tensor's
    /// `data_ptr()`) must lie inside one device allocation of that GPU; it
    /// is exported for CUDA IPC when the driver allows (not for
    /// `cuMemCreate`/expandable-segment memory, which then travels staged
    /// over `tcp`).
    pub unsafe fn register(&self, ptr: *mut u8, len: u64, kind: MemoryKind) -> Result<Region> {
        let id = self.inner.next_region.fetch_add(1, SeqCst);
        if let MemoryKind::Gpu { device } = kind {
            // SAFETY: forwarded from the caller's contract.
            let inner = unsafe { RegionInner::external_gpu(id, ptr, len, device) }.map_err(
                |e| match e {
                    Error::NoCuda(m) => {
                        Error::NoCuda(format!("cannot register GPU {device} memory: {m}"))
                    }
                    e => e,
                },
            )?;
            return Ok(self.add_region(inner));
        }
        // SAFETY: forwarded from the caller's contract.
        let inner = unsafe { RegionInner::external(id, ptr, len, kind) }?;
        Ok(self.add_region(inner))
    }

    /// Deregisters a region: new requests for it fail with `UnknownRegion`;
    /// same-host initiators are told to unmap it; then waits (up to
    /// `timeout`) for operations in flight on it to finish. Blocks the
    /// calling thread. After `Ok`, the engine no longer touches the memory;
    /// after `RegionBusy` it may, and the call can be repeated to wait again.
    pub fn deregister(&self, region: &Region, timeout: Duration) -> Result<()> {
        let id = region.id();
        let removed = self.shared().regions.write().remove(&id);
        if removed.is_none() && !self.inner.draining.lock().contains(&id) {
            return Err(Error::UnknownRegion(id));
        }
        // Remembered until its operations drain, so a deregister that timed
        // out can be retried.
        self.inner.draining.lock().insert(id);
        let deadline = Instant::now() + timeout;
        if region.is_shareable() {
            let (tx, rx) = std::sync::mpsc::channel();
            let sh = self.shared().clone();
            self.shared().rt.spawn(async move {
                let _ = tx.send(shm::revoke(&sh, id, deadline).await);
            });
            match rx.recv_timeout(timeout) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(region = id, "{n} shm peers did not acknowledge the revoke")
                }
                Err(_) => tracing::warn!(region = id, "shm revoke did not finish in time"),
            }
        }
        while region.inner.inflight() > 0 {
            if Instant::now() >= deadline {
                return Err(Error::RegionBusy(id));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // Peers' RDMA keys for the region stop working.
        region.inner.release_nic();
        self.inner.draining.lock().remove(&id);
        Ok(())
    }

    /// Makes a peer known (idempotent per engine id). Connections are made
    /// lazily by the first batch that needs them.
    pub fn add_peer(&self, desc: &PeerDesc) -> PeerId {
        let mut by = self.inner.by_engine.lock();
        if let Some(id) = by.get(&desc.engine_id) {
            return *id;
        }
        let id = PeerId(self.inner.next_peer.fetch_add(1, SeqCst));
        let lanes = desc.tcp_conns.clamp(1, 64).min(self.shared().cfg.tcp_conns) as usize;
        let peer = Peer {
            desc: desc.clone(),
            same_host: desc.host_id == self.shared().desc.host_id,
            gpu: Mutex::new(HashMap::new()),
            ipc: Mutex::new(HashMap::new()),
            lanes: Mutex::new(vec![None; lanes]),
            direct: Default::default(),
            shm: Mutex::new(None),
            shm_connect: tokio::sync::Mutex::new(()),
            rdma_regions: Mutex::new(HashMap::new()),
        };
        self.inner.peers.write().insert(id, Arc::new(peer));
        by.insert(desc.engine_id, id);
        id
    }

    /// Forgets a peer and closes its connections; batches in flight to it fail.
    pub fn remove_peer(&self, id: PeerId) {
        let p = self.inner.peers.write().remove(&id);
        if let Some(p) = p {
            self.inner.by_engine.lock().remove(&p.desc.engine_id);
            for l in p.lanes.lock().iter().flatten() {
                l.shutdown();
            }
            p.direct.close_idle();
        }
    }

    /// Imports a peer's region descriptor for use in [`Op`]s.
    pub fn import(&self, desc: &RegionDesc) -> crate::RemoteRegion {
        let peer = self.add_peer(&desc.peer);
        if let Ok(p) = self.peer(peer) {
            if let Some(g) = &desc.gpu {
                p.gpu.lock().insert(desc.region, (g.clone(), desc.len));
            }
            if let Some(r) = &desc.rdma {
                p.rdma_regions.lock().insert(desc.region, r.clone());
            }
        }
        crate::RemoteRegion {
            peer,
            region: desc.region,
            len: desc.len,
            shareable: desc.shareable,
            kind: desc.kind,
        }
    }

    fn peer(&self, id: PeerId) -> Result<Arc<Peer>> {
        self.inner
            .peers
            .read()
            .get(&id)
            .cloned()
            .ok_or(Error::UnknownPeer(id.0))
    }

    /// Whether `cuda-ipc` reaches the peer's region: a GPU region of an
    /// engine on this machine with an IPC export (or in this process).
    fn ipc_reason(&self, peer: &Peer, op: &Op) -> std::result::Result<(), &'static str> {
        if !matches!(op.remote.kind, MemoryKind::Gpu { .. }) {
            return Err("region is host memory");
        }
        let g = peer.gpu.lock();
        let Some((d, _)) = g.get(&op.remote.region) else {
            return Err("region descriptor carries no CUDA IPC information");
        };
        if LOCAL_ENGINES.lock().contains(&peer.desc.engine_id) {
            return Ok(());
        }
        if d.host_id != crate::desc::machine_id() {
            return Err("peer is on another machine");
        }
        if d.ipc_handle.len() != crate::cuda::IPC_HANDLE_BYTES {
            return Err("region could not be exported for CUDA IPC");
        }
        Ok(())
    }

    /// Whether this engine runs RDMA.
    fn rdma_up(&self) -> bool {
        #[cfg(feature = "rdma")]
        return self.shared().rdma.is_some();
        #[cfg(not(feature = "rdma"))]
        false
    }

    fn route(&self, peer: &Peer, id: PeerId, op: &Op, local: &RegionInner) -> Result<Route> {
        let shm = if !peer.same_host {
            Err("peer is on another host")
        } else if peer.desc.shm.is_none() {
            Err("peer does not serve shm")
        } else if !op.remote.shareable {
            Err("region is not shareable (registered caller memory)")
        } else {
            Ok(())
        };
        let rdma = rdma_reach(
            self.rdma_up(),
            peer.desc.rdma.as_ref().map(|r| r.nics.len()),
            peer.rdma_regions
                .lock()
                .get(&op.remote.region)
                .map(|d| d.rkeys.len()),
            local.with_nic(|_| ()).is_some(),
        );
        let reach = Reach {
            cuda_ipc: self.ipc_reason(peer, op),
            shm,
            rdma,
        };
        match choose(self.shared().cfg.transport, &reach) {
            Ok(Carrier::Tcp) => Ok(Route::Tcp(id)),
            Ok(Carrier::Shm) => Ok(Route::Shm(id)),
            Ok(Carrier::CudaIpc) => Ok(Route::CudaIpc(id)),
            Ok(Carrier::Rdma) => Ok(Route::Rdma(id)),
            Err(r) => Err(Error::Unsupported(format!(
                "{} cannot reach region {} of {id}: {}",
                r.transport, op.remote.region, r.why
            ))),
        }
    }

    /// Submits a batch of one-sided operations; never blocks on the network.
    /// Same-host `shm` batches of at most `shm_inline_bytes` are copied
    /// before it returns (cheaper than waking a copy thread); larger ones go
    /// to the copy threads.
    ///
    /// Errors here are about the request itself (unknown region or peer,
    /// out of bounds, unreachable); transfer failures are reported by the
    /// returned [`Batch`].
    pub fn submit(&self, ops: &[Op], opts: BatchOptions) -> Result<Batch> {
        if ops.is_empty() {
            return Err(Error::Invalid(
                "empty batch (use Engine::notify for a notification without data)".into(),
            ));
        }
        self.submit_inner(ops, opts, Vec::new())
    }

    /// Sends a notification alone to `peer`; the returned batch completes
    /// once the peer has queued it.
    pub fn notify(&self, peer: PeerId, data: Vec<u8>, timeout: Option<Duration>) -> Result<Batch> {
        self.peer(peer)?;
        self.submit_inner(
            &[],
            BatchOptions {
                timeout,
                notify: Some(data),
            },
            vec![peer],
        )
    }

    fn submit_inner(
        &self,
        ops: &[Op],
        opts: BatchOptions,
        extra_notify: Vec<PeerId>,
    ) -> Result<Batch> {
        let sh = self.shared();
        if let Some(n) = &opts.notify {
            if n.len() as u64 > MAX_NOTIFY_BYTES {
                return Err(Error::Invalid(format!(
                    "notification of {} bytes exceeds {MAX_NOTIFY_BYTES}",
                    n.len()
                )));
            }
        }
        let regions = sh.regions.read();
        let mut locals: Vec<InUse> = Vec::new();
        let mut local_index: HashMap<RegionId, u32> = HashMap::new();
        let mut op_local = Vec::with_capacity(ops.len());
        let mut peers: HashMap<PeerId, Arc<Peer>> = HashMap::new();
        let mut groups: Vec<(Route, Vec<usize>)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            if op.len == 0 {
                return Err(Error::Invalid(format!("op {i} has length 0")));
            }
            let idx = match local_index.get(&op.local) {
                Some(&x) => x,
                None => {
                    let r = regions
                        .get(&op.local)
                        .ok_or(Error::UnknownRegion(op.local))?;
                    locals.push(InUse::new(r.clone()));
                    local_index.insert(op.local, (locals.len() - 1) as u32);
                    (locals.len() - 1) as u32
                }
            };
            let l = &locals[idx as usize];
            l.check("local range", op.local_offset, op.len)?;
            if op
                .remote_offset
                .checked_add(op.len)
                .is_none_or(|e| e > op.remote.len)
            {
                return Err(Error::OutOfBounds {
                    what: "remote range",
                    offset: op.remote_offset,
                    len: op.len,
                    region_len: op.remote.len,
                });
            }
            op_local.push(idx);
            let peer = match peers.get(&op.remote.peer) {
                Some(p) => p.clone(),
                None => {
                    let p = self.peer(op.remote.peer)?;
                    peers.insert(op.remote.peer, p.clone());
                    p
                }
            };
            let route = self.route(&peer, op.remote.peer, op, &locals[idx as usize])?;
            match groups.iter_mut().find(|g| g.0 == route) {
                Some(g) => g.1.push(i),
                None => groups.push((route, vec![i])),
            }
        }
        drop(regions);

        // Plan each group; slice indices are global to the batch.
        let mut slices = Vec::new();
        let mut group_ranges = Vec::with_capacity(groups.len());
        for (route, idx) in &groups {
            let spans: Vec<OpSpan> = idx
                .iter()
                .map(|&i| OpSpan {
                    local_offset: ops[i].local_offset,
                    remote_offset: ops[i].remote_offset,
                    len: ops[i].len,
                })
                .collect();
            let lanes = match route {
                Route::Tcp(p) => peers[p].lanes.lock().len() as u16,
                Route::Shm(_) | Route::CudaIpc(_) | Route::Rdma(_) => 1,
            };
            let start = slices.len();
            if let Route::Rdma(_) = route {
                // The RDMA transport cuts and spreads operations itself: one
                // engine slice per operation.
                slices.extend(idx.iter().zip(&spans).map(|(&i, s)| Slice {
                    op: i as u32,
                    local_offset: s.local_offset,
                    remote_offset: s.remote_offset,
                    len: s.len,
                    lane: 0,
                }));
            } else {
                for mut s in plan(&spans, sh.cfg.slice_size, lanes) {
                    s.op = idx[s.op as usize] as u32;
                    slices.push(s);
                }
            }
            group_ranges.push(start..slices.len());
        }
        // A batch that goes to one peer over RDMA alone carries its
        // notification on the data path (WRITE_WITH_IMM after the data);
        // every other batch sends it on the control channel.
        #[cfg(feature = "rdma")]
        let rdma_notify = match (&sh.rdma, &opts.notify, groups.as_slice()) {
            (Some(link), Some(n), [(Route::Rdma(_), _)])
                if extra_notify.is_empty() && link.carries_notification(n.len()) =>
            {
                Some(n.clone())
            }
            _ => None,
        };
        #[cfg(feature = "rdma")]
        let mut rdma_work = {
            let mut w = HashMap::new();
            for (route, idx) in &groups {
                if let Route::Rdma(pid) = *route {
                    let ops = self.rdma_ops(&peers[&pid], ops, idx, &locals, &op_local)?;
                    w.insert(pid, (ops, rdma_notify.clone()));
                }
            }
            w
        };
        let mut notify_peers: Vec<PeerId> = peers.keys().copied().chain(extra_notify).collect();
        notify_peers.sort();
        notify_peers.dedup();
        #[cfg(feature = "rdma")]
        if rdma_notify.is_some() {
            notify_peers.clear();
        }
        let timeout = opts.timeout.unwrap_or(sh.cfg.default_timeout);
        let state = Arc::new(BatchState::new(
            self.inner.next_batch.fetch_add(1, SeqCst),
            Instant::now() + timeout,
            ops.iter().map(|o| o.kind).collect(),
            slices,
            locals,
            op_local,
            ops.iter().map(|o| o.remote.region).collect(),
            opts.notify.clone(),
            notify_peers,
        ));
        if opts.notify.is_some() {
            let me = self.clone();
            *state.on_slices_done.lock() =
                Some(Box::new(move |b: Arc<BatchState>| me.send_notifications(b)));
        }
        if state.slices.is_empty() {
            state.all_slices_done();
        }
        for ((route, _), range) in groups.iter().zip(group_ranges) {
            match *route {
                Route::Tcp(pid) => self.dispatch_tcp(&state, &peers[&pid], range),
                Route::Shm(pid) => self.dispatch_shm(&state, &peers[&pid], range),
                Route::CudaIpc(pid) => self.dispatch_ipc(&state, &peers[&pid], range),
                #[cfg(feature = "rdma")]
                Route::Rdma(pid) => {
                    let (ops, notify) = rdma_work.remove(&pid).unwrap_or_default();
                    self.dispatch_rdma(&state, &peers[&pid], range, ops, notify)
                }
                #[cfg(not(feature = "rdma"))]
                Route::Rdma(_) => {
                    // `route` never picks RDMA in a build without it.
                    for i in range {
                        state.fail(i, ErrorKind::Unreachable);
                    }
                }
            }
        }
        // Batches copied inline are done already and need no deadline.
        if !state.is_done() {
            self.arm_deadline(&state, &groups, &peers);
        }
        Ok(Batch { state })
    }

    fn dispatch_tcp(
        &self,
        state: &Arc<BatchState>,
        peer: &Arc<Peer>,
        range: std::ops::Range<usize>,
    ) {
        let nl = peer.lanes.lock().len();
        let mut per_lane: Vec<Vec<u32>> = vec![Vec::new(); nl];
        for i in range {
            per_lane[state.slices[i].lane as usize].push(i as u32);
        }
        for (l, sl) in per_lane.into_iter().enumerate() {
            if sl.is_empty() {
                continue;
            }
            let lane = peer.lane(self.shared(), l);
            if let Err((k, LaneJob::Slices { slices, .. })) = lane.try_send(LaneJob::Slices {
                batch: state.clone(),
                slices: sl,
            }) {
                for i in slices {
                    state.fail(i as usize, k);
                }
            }
        }
    }

    fn dispatch_shm(
        &self,
        state: &Arc<BatchState>,
        peer: &Arc<Peer>,
        range: std::ops::Range<usize>,
    ) {
        let idx: Vec<u32> = range.map(|i| i as u32).collect();
        let sh = self.shared();
        // Fast path: connected and every region mapped.
        if let Some(sp) = peer.shm_ready() {
            let maps: Option<Vec<_>> = idx
                .iter()
                .map(|&i| sp.mapping(state.remote_region_of(i as usize)))
                .collect();
            if let Some(maps) = maps {
                run_copies(sh, state, idx, maps, sp);
                return;
            }
        }
        let (sh2, st, p) = (sh.clone(), state.clone(), peer.clone());
        sh.rt.spawn(async move {
            let sp = match p.shm_peer(&sh2).await {
                Ok(sp) => sp,
                Err(k) => {
                    for &i in &idx {
                        st.fail(i as usize, k);
                    }
                    return;
                }
            };
            let mut maps = Vec::with_capacity(idx.len());
            for &i in &idx {
                match sp.open(st.remote_region_of(i as usize)).await {
                    Ok(m) => maps.push(m),
                    Err(k) => {
                        for &j in &idx {
                            st.fail(j as usize, k);
                        }
                        return;
                    }
                }
            }
            run_copies(&sh2, &st, idx, maps, sp);
        });
    }

    /// Queues the group's copies on the engine's copy stream of the local
    /// GPU (or of the remote region's GPU when the local side is host
    /// memory); the event poller completes the slices.
    fn dispatch_ipc(
        &self,
        state: &Arc<BatchState>,
        peer: &Arc<Peer>,
        range: std::ops::Range<usize>,
    ) {
        let idx: Vec<usize> = range.collect();
        // Every op of the group has one remote region per op; resolve each
        // distinct region once.
        let mut remotes: HashMap<RegionId, std::result::Result<RemoteGpu, ErrorKind>> =
            HashMap::new();
        let mut issued = Vec::with_capacity(idx.len());
        let mut stream_of: Option<Arc<crate::cuda::GpuStream>> = None;
        for &i in &idx {
            let region = state.remote_region_of(i);
            let remote = remotes
                .entry(region)
                .or_insert_with(|| self.open_remote_gpu(peer, region, state.local_device(i)))
                .clone();
            let remote = match remote {
                Ok(r) => r,
                Err(k) => {
                    state.fail(i, k);
                    continue;
                }
            };
            let s = state.slices[i];
            if s.remote_offset
                .checked_add(s.len)
                .is_none_or(|e| e > remote.len)
            {
                state.fail(i, ErrorKind::OutOfBounds);
                continue;
            }
            let stream = match &stream_of {
                Some(st) if st.device() == &remote.dev => st.clone(),
                _ => match self.shared().gpu_stream(&remote.dev) {
                    Ok(st) => {
                        stream_of = Some(st.clone());
                        st
                    }
                    Err(e) => {
                        tracing::warn!("cuda-ipc stream: {e}");
                        state.fail(i, ErrorKind::Io);
                        continue;
                    }
                },
            };
            if !state.advance(i, PENDING, BUSY) {
                continue; // aborted
            }
            let local = state.local_ptr(i) as u64;
            let rptr = remote.addr + s.remote_offset;
            let (dst, src) = match state.kind_of(i) {
                OpKind::Write => (rptr, local),
                OpKind::Read => (local, rptr),
            };
            // SAFETY: the local range was checked at submit and its region is
            // held in use by the batch until the slice completes; the remote
            // range lies inside the peer's region (checked above) whose
            // mapping `remote.keep` holds until the completion callback.
            match unsafe { stream.copy_raw(dst, src, s.len) } {
                Ok(()) => issued.push((i, stream.clone(), remote.keep.clone())),
                Err(e) => {
                    tracing::warn!("cuda-ipc copy: {e}");
                    state.fail(i, ErrorKind::Io);
                }
            }
        }
        // One event per stream used, after all of its copies.
        let mut by_stream: Vec<(Arc<crate::cuda::GpuStream>, Vec<usize>, Vec<KeepAlive>)> =
            Vec::new();
        for (i, st, keep) in issued {
            match by_stream.iter_mut().find(|(s, _, _)| Arc::ptr_eq(s, &st)) {
                Some(e) => {
                    e.1.push(i);
                    e.2.push(keep);
                }
                None => by_stream.push((st, vec![i], vec![keep])),
            }
        }
        for (st, slices, keep) in by_stream {
            let ev = match st.record() {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!("cuda-ipc event: {e}");
                    // The copies are queued; wait for them here rather than
                    // report bytes that may still be moving.
                    let ok = st.synchronize().is_ok();
                    for i in slices {
                        if ok {
                            state.complete(i, BUSY);
                        } else {
                            state.fail(i, ErrorKind::Io);
                        }
                    }
                    continue;
                }
            };
            let st2 = state.clone();
            ev.on_complete(move |r| {
                let _keep = keep;
                for i in slices {
                    match &r {
                        Ok(()) => {
                            st2.complete(i, BUSY);
                        }
                        Err(e) => {
                            tracing::warn!("cuda-ipc copy failed: {e}");
                            st2.fail(i, ErrorKind::Io);
                        }
                    }
                }
            });
        }
    }

    /// The RDMA operations of one group (the ops at `idx`, in order): local
    /// keys from the local region's registration, remote keys from the
    /// imported descriptor.
    #[cfg(feature = "rdma")]
    fn rdma_ops(
        &self,
        peer: &Peer,
        ops: &[Op],
        idx: &[usize],
        locals: &[InUse],
        op_local: &[u32],
    ) -> Result<Vec<crate::rdma::RdmaOp>> {
        let remote = peer.rdma_regions.lock();
        idx.iter()
            .map(|&i| {
                let op = &ops[i];
                let r = remote.get(&op.remote.region);
                let local = &locals[op_local[i] as usize];
                r.and_then(|r| crate::rdma_link::rdma_op(op, local, r))
                    .ok_or_else(|| {
                        Error::Unsupported(format!(
                            "rdma cannot reach region {} of {}: keys missing",
                            op.remote.region, op.remote.peer
                        ))
                    })
            })
            .collect()
    }

    /// Hands one group to the RDMA transport (connecting to the peer first
    /// when needed); the progress thread completes its slices.
    #[cfg(feature = "rdma")]
    fn dispatch_rdma(
        &self,
        state: &Arc<BatchState>,
        peer: &Arc<Peer>,
        range: std::ops::Range<usize>,
        ops: Vec<crate::rdma::RdmaOp>,
        notify: Option<Vec<u8>>,
    ) {
        let Some(link) = &self.shared().rdma else {
            for i in range {
                state.fail(i, ErrorKind::Unreachable);
            }
            return;
        };
        let work = crate::rdma_link::RdmaWork {
            slices: range.collect(),
            ops,
            notify,
        };
        link.dispatch(self.shared(), state, &peer.desc, work);
    }

    /// Resolves a peer's GPU region to an address usable here: the pointer
    /// itself for an engine of this process, else the opened IPC mapping.
    fn open_remote_gpu(
        &self,
        peer: &Peer,
        region: RegionId,
        local_dev: Option<&crate::cuda::GpuDevice>,
    ) -> std::result::Result<RemoteGpu, ErrorKind> {
        let (d, len) = peer
            .gpu
            .lock()
            .get(&region)
            .cloned()
            .ok_or(ErrorKind::Unreachable)?;
        let dev = match local_dev {
            Some(dv) => dv.clone(),
            None => crate::cuda::GpuDevice::open(d.device).map_err(|e| {
                tracing::warn!("cuda-ipc: GPU {}: {e}", d.device);
                ErrorKind::Unreachable
            })?,
        };
        if LOCAL_ENGINES.lock().contains(&peer.desc.engine_id) {
            return Ok(RemoteGpu {
                dev,
                addr: d.addr,
                len,
                keep: None,
            });
        }
        if let Some(m) = peer.ipc.lock().get(&region) {
            if m.device() == &dev {
                return Ok(RemoteGpu {
                    dev,
                    addr: m.base() + d.ipc_offset,
                    len,
                    keep: Some(m.clone()),
                });
            }
        }
        let handle: [u8; crate::cuda::IPC_HANDLE_BYTES] = d
            .ipc_handle
            .as_slice()
            .try_into()
            .map_err(|_| ErrorKind::Unreachable)?;
        let m = crate::cuda::IpcMapping::open(&dev, &handle).map_err(|e| {
            tracing::warn!("cuda-ipc: opening region {region}: {e}");
            ErrorKind::Unreachable
        })?;
        peer.ipc.lock().insert(region, m.clone());
        Ok(RemoteGpu {
            dev,
            addr: m.base() + d.ipc_offset,
            len,
            keep: Some(m),
        })
    }

    fn arm_deadline(
        &self,
        state: &Arc<BatchState>,
        groups: &[(Route, Vec<usize>)],
        peers: &HashMap<PeerId, Arc<Peer>>,
    ) {
        let lanes: Vec<Arc<Peer>> = groups
            .iter()
            .filter_map(|(r, _)| match r {
                Route::Tcp(p) => Some(peers[p].clone()),
                Route::Shm(_) | Route::CudaIpc(_) | Route::Rdma(_) => None,
            })
            .collect();
        let on_expire: crate::deadline::OnExpire = Box::new(move |st: Arc<BatchState>| {
            if st.is_done() {
                return;
            }
            st.abort(ErrorKind::Timeout);
            if st.busy_slices().next().is_some() {
                // A slice is stuck mid-transfer: tear its connections down so
                // the copy into local memory stops and the batch completes.
                for p in &lanes {
                    for l in p.lanes.lock().iter().flatten() {
                        l.shutdown();
                    }
                }
            }
            if st.remaining() == 0 {
                // Only the notification step was outstanding.
                st.notify_result(Err(ErrorKind::Timeout));
            }
        });
        let d = &self.shared().deadlines;
        state.set_deadlines(d.clone());
        d.insert(state, on_expire);
        if state.is_done() {
            // Completed while being armed (inline copies): disarm.
            d.remove(state.deadline, state.id);
        }
    }

    fn send_notifications(&self, b: Arc<BatchState>) {
        let me = self.clone();
        self.shared().rt.spawn(async move {
            let data = b.notify.clone().unwrap_or_default();
            let mut result = Ok(());
            for pid in b.notify_peers.clone() {
                let r = me.notify_one(pid, &data).await;
                if r.is_err() {
                    result = r;
                    break;
                }
            }
            b.notify_result(result);
        });
    }

    async fn notify_one(&self, pid: PeerId, data: &[u8]) -> Result<(), ErrorKind> {
        let peer = self.peer(pid).map_err(|_| ErrorKind::ConnectionLost)?;
        // Every slice is acknowledged (tcp) or copied (shm) by now, so the
        // bytes have landed whichever channel carries the notification.
        if let Some(sp) = peer.shm_ready() {
            return sp.notify(data).await;
        }
        let lane = peer.lane(self.shared(), 0);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lane.try_send(LaneJob::Notify {
            data: data.to_vec(),
            done: tx,
        })
        .map_err(|(k, _)| k)?;
        rx.await.unwrap_or(Err(ErrorKind::ConnectionLost))
    }

    /// Installs the handler that answers [`Engine::call`] from peers.
    pub fn set_rpc_handler(&self, h: RpcHandler) {
        *self.shared().rpc.write() = Some(h);
    }

    /// Sends a small request (at most 1 MiB) to a peer's RPC handler over the
    /// data plane and returns its reply: on a direct TCP connection the
    /// calling task drives (see `tcp_direct`), or, when every direct
    /// connection is taken, over the `shm` control channel (same-host peer)
    /// or TCP lane 0. Cancel-safe. Fails with `Unreachable` when the peer
    /// has no handler.
    pub async fn call(&self, peer: PeerId, req: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
        Self::check_call_size(&req)?;
        let p = self.peer(peer)?;
        let sh = self.shared().clone();
        let fut = async move {
            match Self::call_conn(&sh, &p, peer).await? {
                Some(mut c) => c.call(crate::wire::OP_CALL, &req, sh.cfg.reply_spin).await,
                None => Self::call_fallback(&sh, &p, crate::wire::OP_CALL, req).await,
            }
        };
        match self.within(timeout, fut).await {
            Some(r) => r.map_err(Error::Transfer),
            None => Err(Error::Timeout(format!("call to {peer} after {timeout:?}"))),
        }
    }

    /// Like [`Engine::call`], for a handler that may answer with
    /// [`Reply::Bulk`]: the bytes after the reply's head land where `place`
    /// says, without a reply buffer in between. `place(head, len)` sees the
    /// head before any bulk byte arrives and returns the destination of the
    /// `len` bytes (`None` refuses them: they are read and dropped). Each
    /// landed piece goes to `on_piece`, in order, while the rest is still
    /// arriving (a caller that checksums the bytes does so while they are
    /// in cache).
    ///
    /// On a direct TCP connection the bytes are received straight into the
    /// destination (and the peer sends them straight from its region): one
    /// round trip and no copy besides the socket's. Over the fallback
    /// channels (see [`Engine::call`]) the answer arrives whole and is
    /// copied to the destination. A region destination must be host memory
    /// of this engine with room for `len` bytes; after an error it holds
    /// undefined bytes.
    pub async fn call_bulk<'r>(
        &self,
        peer: PeerId,
        req: Vec<u8>,
        timeout: Duration,
        place: &mut (dyn FnMut(&[u8], u64) -> Option<BulkDest<'r>> + Send),
        on_piece: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<BulkAnswer> {
        Self::check_call_size(&req)?;
        let p = self.peer(peer)?;
        let sh = self.shared().clone();
        let op = crate::wire::OP_CALL_BULK;
        let fut = async {
            let transfer = Error::Transfer;
            let Some(mut c) = Self::call_conn(&sh, &p, peer).await.map_err(transfer)? else {
                let framed = Self::call_fallback(&sh, &p, op, req)
                    .await
                    .map_err(transfer)?;
                let (head, bulk) =
                    split_framed(&framed).ok_or(Error::Transfer(ErrorKind::Protocol))?;
                let mut ans = BulkAnswer {
                    head: head.to_vec(),
                    len: bulk.len() as u64,
                    ..BulkAnswer::default()
                };
                // As on a direct connection: `place` is asked only when
                // bytes follow.
                let dest = if ans.len > 0 {
                    place(&ans.head, ans.len)
                } else {
                    None
                };
                if let Some(dest) = dest {
                    let mut land = Landing::new(&sh, dest, ans.len)?;
                    let base = land.ptr();
                    for (i, piece) in bulk.chunks(crate::tcp_direct::PIECE_BYTES).enumerate() {
                        let at = base + i * crate::tcp_direct::PIECE_BYTES;
                        // SAFETY: inside the landing's checked `len` bytes,
                        // which nothing else references during the call.
                        let to =
                            unsafe { std::slice::from_raw_parts_mut(at as *mut u8, piece.len()) };
                        to.copy_from_slice(piece);
                        on_piece(to);
                    }
                    // SAFETY: all `len` bytes were written above.
                    ans.bytes = unsafe { land.finish(ans.len) };
                    ans.landed = true;
                }
                return Ok(ans);
            };
            let (head, len) = c
                .call_head(&req, sh.cfg.reply_spin)
                .await
                .map_err(transfer)?;
            let mut ans = BulkAnswer {
                head,
                len,
                ..BulkAnswer::default()
            };
            if len == 0 {
                return Ok(ans);
            }
            let Some(dest) = place(&ans.head, len) else {
                c.skip_bulk(len).await.map_err(transfer)?;
                return Ok(ans);
            };
            let mut land = Landing::new(&sh, dest, len)?;
            let base = land.ptr();
            let mut hand = |off: usize, n: usize| {
                // SAFETY: a landed piece inside the landing's checked range.
                on_piece(unsafe { std::slice::from_raw_parts((base + off) as *const u8, n) })
            };
            // SAFETY: the landing holds `len` writable bytes at `base` that
            // nothing else references during the call.
            unsafe { c.recv_bulk(len, base, sh.cfg.reply_spin, &mut hand) }
                .await
                .map_err(transfer)?;
            // SAFETY: all `len` bytes landed.
            ans.bytes = unsafe { land.finish(len) };
            ans.landed = true;
            Ok(ans)
        };
        match self.within(timeout, fut).await {
            Some(r) => r,
            None => Err(Error::Timeout(format!("call to {peer} after {timeout:?}"))),
        }
    }

    fn check_call_size(req: &[u8]) -> Result<()> {
        if req.len() as u64 > crate::wire::MAX_CALL_BYTES {
            return Err(Error::Invalid(format!(
                "call of {} bytes exceeds 1 MiB",
                req.len()
            )));
        }
        Ok(())
    }

    /// A direct connection for one RPC to `p`, or `None` when the caller
    /// must use the fallback channel ([`Engine::call_fallback`]).
    ///
    /// The caller drives a TCP connection of its own (see `tcp_direct`),
    /// same-host peers included: one thread wake-up per call instead of the
    /// control channel's reader hand-offs. The fallback is for when too many
    /// calls run at once, or a same-host peer cannot be reached over TCP.
    async fn call_conn(
        sh: &Arc<Shared>,
        p: &Arc<Peer>,
        peer: PeerId,
    ) -> std::result::Result<Option<crate::tcp_direct::DirectConn>, ErrorKind> {
        match p.direct.take(sh, &p.desc).await {
            Ok(c) => Ok(c),
            Err(k) if Self::call_over_shm(sh, p) => {
                tracing::debug!("direct connection to {peer}: {k}");
                Ok(None)
            }
            Err(k) => Err(k),
        }
    }

    fn call_over_shm(sh: &Shared, p: &Peer) -> bool {
        sh.cfg.transport != TransportKind::Tcp && p.same_host && p.desc.shm.is_some()
    }

    /// One RPC (`op`) over the `shm` control channel of a same-host peer,
    /// else over TCP lane 0.
    async fn call_fallback(
        sh: &Arc<Shared>,
        p: &Arc<Peer>,
        op: u8,
        req: Vec<u8>,
    ) -> std::result::Result<Vec<u8>, ErrorKind> {
        if Self::call_over_shm(sh, p) {
            let sp = match p.shm_ready() {
                Some(sp) => sp,
                None => p.shm_peer(sh).await?,
            };
            return sp.call(op, &req).await;
        }
        let lane = p.lane(sh, 0);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lane.try_send(LaneJob::Call {
            op,
            data: req,
            done: tx,
        })
        .map_err(|(k, _)| k)?;
        rx.await.unwrap_or(Err(ErrorKind::ConnectionLost))
    }

    /// Runs one READ (`op`, which must read) and hands each landed piece of
    /// the local range, in order, to `on_piece` while the rest is still
    /// arriving: a caller that checksums what it reads does so while the
    /// bytes are in cache, overlapped with the transfer. Returns when all
    /// bytes have landed and been handed over.
    ///
    /// Between host memory on both ends the calling task moves the bytes
    /// itself, with no engine thread in between: over TCP on a connection
    /// of its own (one request, the answer received straight into the local
    /// range; see `tcp_direct`), over `shm` as a copy out of the peer's
    /// mapped region. Every other route, a TCP read while every direct
    /// connection to the peer is taken, and a first `shm` access to a region
    /// not mapped yet run an ordinary one-op batch and hand over the whole
    /// range once it landed. Errors as for a
    /// batch; after an error the local range holds undefined bytes.
    pub async fn read_streamed(
        &self,
        op: Op,
        timeout: Duration,
        on_piece: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<()> {
        if op.kind != OpKind::Read {
            return Err(Error::Invalid("read_streamed needs a READ".into()));
        }
        let sh = self.shared().clone();
        let (local, direct) = self.direct_route(&op)?;
        let base = local.ptr() as usize + op.local_offset as usize;
        // Callers pass pieces inside the local range that have landed.
        let landed = |off: usize, n: usize| {
            // SAFETY: inside the checked local range, which `local` keeps
            // registered; these bytes landed and nothing writes them any
            // more during the call.
            unsafe { std::slice::from_raw_parts((base + off) as *const u8, n) }
        };
        if let Direct::Shm(sp) = &direct {
            let mut hand = |off: usize, n: usize| on_piece(landed(off, n));
            // SAFETY: the checked local range, held in use by `local`; the
            // caller does not touch it during the call.
            let copied = unsafe {
                sp.read_direct(
                    op.remote.region,
                    base as *mut u8,
                    op.remote_offset,
                    op.len as usize,
                    crate::tcp_direct::PIECE_BYTES,
                    &mut hand,
                )
            };
            match copied {
                Ok(true) => return Ok(()),
                Ok(false) => {} // not mapped yet: the batch maps it
                Err(k) => return Err(Error::Transfer(k)),
            }
        }
        if let Direct::Tcp(p) = direct {
            let fut = async {
                let Some(mut c) = p.direct.take(&sh, &p.desc).await? else {
                    return Ok(false);
                };
                let id = c
                    .send_read(op.remote.region, op.remote_offset, op.len)
                    .await?;
                let mut hand = |off: usize, n: usize| on_piece(landed(off, n));
                // SAFETY: the range was checked and is held in use by
                // `local` for the call; the caller does not touch it.
                unsafe { c.recv_read(id, op.len, base, sh.cfg.reply_spin, &mut hand) }
                    .await
                    .map(|()| true)
            };
            if let Some(r) = Self::direct_outcome(self.within(timeout, fut).await, &op, timeout) {
                return r;
            }
        }
        self.submit_one(op, timeout)?
            .wait()
            .await
            .result
            .map_err(Error::Transfer)?;
        on_piece(landed(0, op.len as usize));
        Ok(())
    }

    /// Runs one WRITE (`op`, which must write) and hands each piece of the
    /// local source, in order, to `on_piece` once it is on its way, so a
    /// caller that checksums what it writes does so while the peer
    /// receives it. Returns when the bytes have landed. The source must not
    /// change during the call.
    ///
    /// Over TCP between host memory the calling task sends the bytes itself
    /// on a direct connection (as [`Engine::read_streamed`]); every other
    /// route runs an ordinary one-op batch and hands over the whole source
    /// while it is in flight (over `shm`, a copy thread writes while the
    /// caller works on the source).
    pub async fn write_streamed(
        &self,
        op: Op,
        timeout: Duration,
        on_piece: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<()> {
        if op.kind != OpKind::Write {
            return Err(Error::Invalid("write_streamed needs a WRITE".into()));
        }
        let sh = self.shared().clone();
        let (local, direct) = self.direct_route(&op)?;
        let base = local.ptr() as usize + op.local_offset as usize;
        // Callers pass pieces inside the local range.
        let source = |off: usize, n: usize| {
            // SAFETY: inside the checked range, held by `local`; a WRITE
            // only reads it and the caller keeps it unchanged.
            unsafe { std::slice::from_raw_parts((base + off) as *const u8, n) }
        };
        // Over `shm` a WRITE stays a batch: a copy thread writes the peer's
        // memory while the caller hashes the source, two cores at once. A
        // copy in the calling thread would put the copy and the hash on one
        // (measured slower for 2 MiB puts: memory this cold takes a core
        // about 350 us to write).
        if let Direct::Tcp(p) = direct {
            let fut = async {
                let Some(mut c) = p.direct.take(&sh, &p.desc).await? else {
                    return Ok(false);
                };
                let mut hand = |off: usize, n: usize| on_piece(source(off, n));
                // SAFETY: checked range held in use by `local`; the caller
                // keeps it unchanged for the call.
                unsafe {
                    c.write(
                        op.remote.region,
                        op.remote_offset,
                        base,
                        op.len,
                        sh.cfg.reply_spin,
                        &mut hand,
                    )
                }
                .await
                .map(|()| true)
            };
            if let Some(r) = Self::direct_outcome(self.within(timeout, fut).await, &op, timeout) {
                return r;
            }
        }
        let b = self.submit_one(op, timeout)?;
        on_piece(source(0, op.len as usize));
        b.wait().await.result.map_err(Error::Transfer)
    }

    /// The held local range of `op` (host memory, or an error), and how the
    /// calling task can move it without a batch: over a direct TCP
    /// connection, or by copying through an existing `shm` mapping (used
    /// for reads only); [`Direct::No`] for every other route and for a
    /// remote range the descriptor says is out of bounds (the batch then
    /// reports it).
    fn direct_route(&self, op: &Op) -> Result<(InUse, Direct)> {
        let local = self
            .shared()
            .checked_region(op.local, op.local_offset, op.len)
            .map_err(|k| Error::Invalid(format!("local range: {k}")))?;
        if local.gpu_device().is_some() {
            return Err(Error::Invalid(
                "streamed transfers need host memory on this side".into(),
            ));
        }
        let p = self.peer(op.remote.peer)?;
        if op
            .remote_offset
            .checked_add(op.len)
            .is_none_or(|end| end > op.remote.len)
            || matches!(op.remote.kind, MemoryKind::Gpu { .. })
        {
            return Ok((local, Direct::No));
        }
        let d = match self.route(&p, op.remote.peer, op, &local)? {
            Route::Tcp(_) => Direct::Tcp(p),
            Route::Shm(_) => p.shm_ready().map_or(Direct::No, Direct::Shm),
            _ => Direct::No,
        };
        Ok((local, d))
    }

    /// Submits a one-op batch with this deadline.
    fn submit_one(&self, op: Op, timeout: Duration) -> Result<Batch> {
        self.submit(
            &[op],
            BatchOptions {
                timeout: Some(timeout),
                notify: None,
            },
        )
    }

    /// What a direct transfer's outcome means for the streamed call: done
    /// or failed (`Some`), or `None` when no direct connection was free and
    /// a batch must run instead.
    fn direct_outcome(
        r: Option<std::result::Result<bool, ErrorKind>>,
        op: &Op,
        timeout: Duration,
    ) -> Option<Result<()>> {
        match r {
            Some(Ok(true)) => Some(Ok(())),
            Some(Ok(false)) => None,
            Some(Err(k)) => Some(Err(Error::Transfer(k))),
            None => Some(Err(Error::Timeout(format!(
                "{:?} with {} after {timeout:?}",
                op.kind, op.remote.peer
            )))),
        }
    }

    /// Runs `fut` until it ends or `timeout` passes (`None`). The deadline
    /// runs on the engine's runtime, so callers on an executor without a
    /// timer work too.
    async fn within<T>(
        &self,
        timeout: Duration,
        fut: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let mut deadline = self.shared().rt.spawn(tokio::time::sleep(timeout));
        let r = tokio::select! {
            r = fut => Some(r),
            _ = &mut deadline => None,
        };
        deadline.abort();
        r
    }

    /// [`Engine::call`] for threads outside any async runtime.
    pub fn call_blocking(&self, peer: PeerId, req: Vec<u8>, timeout: Duration) -> Result<Vec<u8>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let me = self.clone();
        self.shared().rt.spawn(async move {
            let _ = tx.send(me.call(peer, req, timeout).await);
        });
        rx.recv_timeout(timeout + Duration::from_secs(1))
            .map_err(|_| Error::Timeout(format!("call to {peer} after {timeout:?}")))?
    }

    /// Takes a received notification, if any (non-blocking).
    pub fn try_recv_notification(&self) -> Option<Notification> {
        self.inner.notify_rx.try_lock().ok()?.try_recv().ok()
    }

    /// Waits for the next notification. Cancel-safe.
    pub async fn recv_notification(&self) -> Option<Notification> {
        self.inner.notify_rx.lock().await.recv().await
    }

    /// Blocks up to `timeout` for the next notification.
    pub fn recv_notification_timeout(&self, timeout: Duration) -> Option<Notification> {
        let until = Instant::now() + timeout;
        let sh = self.shared();
        let mut g = sh.notify_lock.lock();
        loop {
            // Checked under the lock `deliver` signals under: no lost wake-up.
            if let Some(n) = self.try_recv_notification() {
                return Some(n);
            }
            if sh.notify_cv.wait_until(&mut g, until).timed_out() {
                return self.try_recv_notification();
            }
        }
    }

    /// Number of registered regions.
    pub fn region_count(&self) -> usize {
        self.shared().regions.read().len()
    }

    /// A local read-only view of `remote`, a same-host peer's region, when
    /// this engine reaches it over `shm` and has already mapped it (after a
    /// first batch to that region); `None` otherwise (a `tcp`/`rdma` peer,
    /// an engine or peer without `shm`, not mapped yet, revoked, or a peer
    /// whose control channel died). Starts no connection.
    ///
    /// Safety contract: the view shows the peer's live memory, which the
    /// peer (and other initiators) may change under the reader at any time;
    /// [`crate::ShmView::bytes`] is therefore `unsafe`, and the caller must agree
    /// with the peer through its own signalling (e.g. doorbells) on which
    /// ranges are quiet while it reads them. The view keeps the mapping
    /// alive; drop it when done, as a held view delays the peer's
    /// deregistration of the region.
    pub fn shm_view(&self, remote: &crate::RemoteRegion) -> Option<crate::ShmView> {
        if !remote.shareable || self.shared().cfg.transport == TransportKind::Tcp {
            return None;
        }
        let peer = self.peer(remote.peer).ok()?;
        if !peer.same_host {
            return None;
        }
        let view = peer.shm_ready()?.view(remote.region)?;
        (view.len() >= remote.len).then_some(view)
    }
}

/// What a completion callback keeps alive: the IPC mapping the copies use.
type KeepAlive = Option<Arc<crate::cuda::IpcMapping>>;

/// A peer's GPU region as reachable from this process.
#[derive(Clone)]
struct RemoteGpu {
    /// The device whose stream runs the copies.
    dev: crate::cuda::GpuDevice,
    /// Address of the region's first byte here.
    addr: u64,
    len: u64,
    keep: KeepAlive,
}

fn run_copies(
    sh: &Shared,
    state: &Arc<BatchState>,
    idx: Vec<u32>,
    maps: Vec<Arc<shm::Mapping>>,
    sp: Arc<ShmPeer>,
) {
    let bytes: u64 = idx.iter().map(|&i| state.slices[i as usize].len).sum();
    let streaming = bytes >= sh.cfg.shm_streaming_bytes;
    let threads = sh.cfg.shm_threads.max(1);
    if bytes <= sh.cfg.shm_inline_bytes {
        shm::copy_slices(state, &idx, &maps, &sp, streaming);
        return;
    }
    // Split by bytes into one chunk per copy thread; `submit` returns
    // without waiting for them.
    let per = bytes.div_ceil(threads as u64);
    let mut chunks: Vec<(Vec<u32>, Vec<Arc<shm::Mapping>>)> = vec![(Vec::new(), Vec::new())];
    let mut acc = 0u64;
    for (i, m) in idx.into_iter().zip(maps) {
        if acc >= per && chunks.len() < threads {
            chunks.push((Vec::new(), Vec::new()));
            acc = 0;
        }
        acc += state.slices[i as usize].len;
        let c = chunks.last_mut().expect("non-empty");
        c.0.push(i);
        c.1.push(m);
    }
    for (slices, maps) in chunks {
        let job = CopyJob {
            batch: state.clone(),
            slices,
            maps,
            peer: sp.clone(),
            streaming,
        };
        if let Err(e) = sh.copy_tx.try_send(job) {
            // Queue full (or threads gone): copy here rather than fail.
            let job = e.into_inner();
            shm::copy_slices(&job.batch, &job.slices, &job.maps, &job.peer, streaming);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchOptions;

    fn cfg(transport: TransportKind) -> EngineConfig {
        EngineConfig {
            transport,
            ..EngineConfig::default()
        }
    }

    #[test]
    fn rdma_parses_and_settings_are_checked() {
        assert_eq!(
            "rdma".parse::<TransportKind>().unwrap(),
            TransportKind::Rdma
        );
        let e = "rmda".parse::<TransportKind>().unwrap_err().to_string();
        assert!(e.contains("rdma"), "{e}");
        let feature = cfg!(feature = "rdma");
        // Auto tries RDMA (with the feature); tcp/shm/cuda-ipc never do.
        assert_eq!(wants_rdma(&cfg(TransportKind::Auto)).unwrap(), feature);
        for t in [
            TransportKind::Tcp,
            TransportKind::Shm,
            TransportKind::CudaIpc,
        ] {
            assert!(!wants_rdma(&cfg(t)).unwrap(), "{t:?}");
        }
        let mut off = cfg(TransportKind::Auto);
        off.rdma.enabled = false;
        assert!(!wants_rdma(&off).unwrap());
        off.transport = TransportKind::Rdma;
        match wants_rdma(&off).unwrap_err() {
            Error::Invalid(m) if feature => assert!(m.contains("enabled = false"), "{m}"),
            Error::Unsupported(m) if !feature => assert!(m.contains("without the rdma feature")),
            e => panic!("{e}"),
        }
        let mut zero = cfg(TransportKind::Auto);
        zero.rdma.qps_per_nic_pair = 0;
        assert_eq!(matches!(wants_rdma(&zero), Err(Error::Invalid(_))), feature);
        zero.rdma.enabled = false;
        // Disabled settings are not checked.
        assert!(!wants_rdma(&zero).unwrap());
    }

    /// An explicit `rdma` without a usable NIC fails with the reason; in a
    /// build without the feature it says so.
    #[test]
    fn explicit_rdma_without_devices_is_a_clear_error() {
        let r = Engine::new(cfg(TransportKind::Rdma));
        if cfg!(feature = "rdma") {
            match r {
                Err(e) => {
                    let s = e.to_string();
                    assert!(s.contains("transport rdma") && s.contains("RDMA"), "{s}");
                    assert_eq!(e.kind(), ErrorKind::Unreachable);
                }
                // A machine with an RDMA NIC opens it.
                Ok(e) => assert!(e.descriptor().rdma.is_some()),
            }
        } else {
            let e = r.unwrap_err();
            assert!(
                e.to_string().contains("built without the rdma feature"),
                "{e}"
            );
        }
    }

    /// `Auto` without RDMA devices starts without RDMA, and tcp and shm
    /// round trips work exactly as before (run with and without the
    /// feature).
    #[test]
    fn auto_without_rdma_devices_still_moves_bytes_over_tcp_and_shm() {
        let target = Engine::new(cfg(TransportKind::Auto)).unwrap();
        let e = Engine::new(cfg(TransportKind::Auto)).unwrap();
        let rdma_here = e.descriptor().rdma.is_some();
        if !rdma_here {
            assert!(!e.rdma_up());
        }
        let served = target.alloc(1 << 20, MemoryKind::Host).unwrap();
        served.fill(0, 1 << 20, 0x5a).unwrap();
        let desc = served.desc();
        assert_eq!(desc.rdma.is_some(), rdma_here);
        // Through the versioned encoding, as peers receive it.
        let desc = RegionDesc::from_bytes(&desc.to_bytes()).unwrap();
        for t in [TransportKind::Tcp, TransportKind::Shm] {
            let e = Engine::new(cfg(t)).unwrap();
            let local = e.alloc(1 << 20, MemoryKind::Host).unwrap();
            let remote = e.import(&desc);
            let st = e
                .submit(
                    &[Op::read(local.id(), 0, remote, 0, 1 << 20)],
                    BatchOptions {
                        notify: Some(b"landed".to_vec()),
                        ..BatchOptions::default()
                    },
                )
                .unwrap()
                .wait_blocking(Duration::from_secs(10))
                .unwrap();
            assert_eq!(st.result, Ok(()), "{t:?}");
            assert_eq!(st.bytes, 1 << 20);
            let mut out = vec![0u8; 1 << 20];
            local.read_at(0, &mut out).unwrap();
            assert!(out.iter().all(|&b| b == 0x5a), "{t:?}");
            let n = target
                .recv_notification_timeout(Duration::from_secs(5))
                .unwrap();
            assert_eq!(n.data, b"landed");
        }
        // Auto picks shm for the engine-allocated region on this host.
        let local = e.alloc(4096, MemoryKind::Host).unwrap();
        let remote = e.import(&desc);
        let peer = e.peer(remote.peer).unwrap();
        let op = Op::write(local.id(), 0, remote, 0, 4096);
        let route = e.route(&peer, remote.peer, &op, &local.inner).unwrap();
        assert!(route == Route::Shm(remote.peer));
        target.deregister(&served, Duration::from_secs(1)).unwrap();
    }
}
