//! The peer store: the public [`Store`] API and the thin event loop that ties
//! the I/O-free state machines (membership, holder, placement, repair) to
//! libp2p (membership gossip, provider records, join) and to the transfer
//! engine (bytes, and the hot-path holder RPCs).
//!
//! ```text
//!              gossip announces ─► Membership ─► links (engine peers) ─► placement
//!  Store::put ─► HRW targets ─► Reserve (engine RPC) ─► engine WRITE ∥ hash ─► Commit
//!                 (─► provider record only where placement will not find the copy)
//!  Store::get ─► same-host holder: READ location table ─► READ bytes ─► READ seq ─► checksum
//!             ─► else location cache / HRW candidates / Kademlia providers
//!                 ─► Lease (+ deferred releases) ─► engine READ ─► checksum ─► Release (deferred)
//!  engine RPC handler ─► Holder ─► events ─► maintenance task (SSD spill, provider records)
//!  member dead / left ─► release its leases/reservations ─► RepairContext ─► re-replicate
//!                        (retried every `repair_delay` while copies are still missing)
//! ```
//! Locks: `holder` before `ssd`, never the other way; no lock is held across
//! an `.await`. Every task a store spawns is tracked and stopped by
//! [`Store::shutdown`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kvmesh_gpu::{
    BatchOptions, BulkDest, Engine, EngineConfig, EngineId, MemoryKind, Op, Region, RegionDesc,
    RemoteRegion, Reply, TransportKind,
};
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;

use crate::error::{Error, ErrorKind, Result};
use crate::holder::{Holder, HolderConfig, HolderEvent, LeaseId, ReservationId};
use crate::index::{IndexConfig, ObjectOptions, Pin, RemovalReason};
use crate::key::{Checksum, ChecksumHasher, ObjectKey};
use crate::membership::{Announce, Membership, MembershipConfig, MembershipEvent};
use crate::metrics::Metrics;
use crate::network::{self, Multiaddr, NetworkConfig};
use crate::peer::PeerId;
use crate::placement;
use crate::pool::PoolConfig;
use crate::repair::{RepairContext, RepairTask, ReplicaSet};
use crate::rpc::{self, Grant, NetRequest, NetResponse, PinWire, Request, Response};
use crate::shm_index::{self, ShmIndexWriter};
use crate::ssd::{SsdConfig, SsdTier};

/// Gossipsub topic of membership announces.
pub const MEMBERS_TOPIC: &str = "kvmesh/members/1";
/// Gossipsub topic of goodbyes ([`Leave`] messages).
pub const LEAVE_TOPIC: &str = "kvmesh/leave/1";
/// Wire version of [`Leave`].
pub const LEAVE_VERSION: u16 = 1;

/// A peer's goodbye, published on [`LEAVE_TOPIC`] when it shuts down, so the
/// others repair at once instead of after `dead_after`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leave {
    /// Always [`LEAVE_VERSION`] when built here.
    pub version: u16,
    /// Who leaves (must equal the gossip message's source).
    pub peer: PeerId,
    /// The incarnation that ends.
    pub incarnation: u64,
}

/// Configuration of a store peer.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// libp2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to join through (with or without `/p2p/<id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Private-network key (swarm.key text); `None` for an open network.
    pub psk: Option<String>,
    /// Zero-configuration discovery on the local network.
    pub mdns: bool,
    /// DRAM donated to the store; 0 makes a client that holds nothing.
    pub mem_bytes: u64,
    /// SSD tier directory and capacity.
    pub ssd: Option<(PathBuf, u64)>,
    /// Silence after which a member is declared dead.
    pub dead_after: Duration,
    /// How often this peer announces itself.
    pub announce_interval: Duration,
    /// Wait after a death before re-replicating (lets a flapping peer back).
    pub repair_delay: Duration,
    /// The transfer engine (transport, data-plane listen address, ...).
    pub engine: EngineConfig,
    /// Where to serve Prometheus metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// Lease length for gets.
    pub lease: Duration,
    /// Reservation lifetime for puts.
    pub reservation_ttl: Duration,
    /// Deadline of one RPC or one engine batch.
    pub op_timeout: Duration,
    /// Replicas a put makes unless told otherwise.
    pub default_replicas: usize,
}

impl StoreConfig {
    fn validate(&self) -> Result<()> {
        let durations = [
            ("dead_after", self.dead_after),
            ("announce_interval", self.announce_interval),
            ("lease", self.lease),
            ("reservation_ttl", self.reservation_ttl),
            ("op_timeout", self.op_timeout),
        ];
        if let Some((name, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(Error::InvalidConfig(format!("{name} must be positive")));
        }
        if self.announce_interval >= self.dead_after {
            return Err(Error::InvalidConfig(format!(
                "announce_interval ({:?}) must be shorter than dead_after ({:?})",
                self.announce_interval, self.dead_after
            )));
        }
        Ok(())
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("literal multiaddr")],
            bootstrap: Vec::new(),
            psk: None,
            mdns: false,
            mem_bytes: 256 << 20,
            ssd: None,
            dead_after: Duration::from_secs(3),
            announce_interval: Duration::from_millis(500),
            repair_delay: Duration::from_millis(500),
            engine: EngineConfig::default(),
            metrics_addr: None,
            lease: Duration::from_secs(10),
            reservation_ttl: Duration::from_secs(10),
            op_timeout: Duration::from_secs(10),
            default_replicas: 1,
        }
    }
}

/// Options of one put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOptions {
    /// Copies to make (R); clamped to the live holders.
    pub replicas: usize,
    /// Eviction protection.
    pub pin: Pin,
    /// Lifetime; `None` keeps the object until evicted or removed.
    pub ttl: Option<Duration>,
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions {
            replicas: 1,
            pin: Pin::None,
            ttl: None,
        }
    }
}

/// A live member as seen by this peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub incarnation: u64,
    /// Sequence number of its last announce this peer accepted.
    pub seq: u64,
    pub capacity: u64,
    pub free: u64,
    pub load: u32,
    pub addrs: Vec<String>,
    pub is_self: bool,
}

/// Counters of this peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub peer_id: String,
    pub peers_alive: usize,
    pub objects: usize,
    pub bytes_stored: u64,
    pub capacity: u64,
    pub ssd_objects: usize,
    pub ssd_bytes: u64,
    pub puts: u64,
    pub gets: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub repairs: u64,
    /// Leases other peers (or this one) hold on objects here.
    pub leases: usize,
    /// Reservations of puts in progress here.
    pub reservations: usize,
    /// Stored copies found damaged here (SSD files failing their checks).
    pub integrity_failures: u64,
    /// Membership announces this peer published.
    pub announces_sent: u64,
    /// Membership announces (and goodbyes) this peer received.
    pub announces_received: u64,
}

/// What a get's request to one holder brought back.
enum Got {
    /// A lease: read the bytes with the engine, then release.
    Lease(Leased),
    /// The bytes, already in the destination (one round trip, see
    /// [`Request::Fetch`]), and the checksum of what landed; the lease is
    /// still to be released.
    Landed {
        lease: Leased,
        actual: Checksum,
        bytes: Option<Vec<u8>>,
    },
    /// The holder granted the object but its bytes did not land (released).
    Failed { holder: PeerId, error: Error },
}

/// How a [`Request::Fetch`] ended.
enum FetchOutcome {
    /// The bytes landed: the grant, the checksum of what landed, and the
    /// vector for a vector destination.
    Landed(Grant, Checksum, Option<Vec<u8>>),
    /// An answer without bytes: a lease of an object too large for the
    /// destination, or a refusal.
    Answer(Response),
    /// Granted, but the bytes did not land (the lease is released).
    Broken(Error),
}

/// A lease on one object at one holder, from [`Store::lease_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    pub key: ObjectKey,
    pub holder: PeerId,
    pub len: u64,
    grant: Grant,
}

/// How a member is reached through the engine.
#[derive(Debug, Clone, Copy)]
struct Link {
    engine_peer: kvmesh_gpu::PeerId,
    pool: RemoteRegion,
    engine_id: EngineId,
    /// Reached through `shm` (same host, both sides allow it).
    same_host_shm: bool,
}

enum Maint {
    Holder(HolderEvent),
    Provide(ObjectKey),
    /// Publish provider records for every local copy placement no longer
    /// finds (a peer joined and outranks this holder for them).
    ProvideDisplaced,
    Repair(Vec<PeerId>),
}

/// An engine failure as a store error: retryable ones (timeouts, lost
/// connections, a busy peer) as `Busy`, the rest as `Internal`.
fn engine_error(what: &str, e: kvmesh_gpu::Error) -> Error {
    remote(
        if e.is_retryable() {
            ErrorKind::Busy
        } else {
            ErrorKind::Internal
        },
        format!("{what}: {e}"),
    )
}

/// The checksum of the bytes a put stores, computed once per put: the copy
/// that claims it hashes the source piece by piece while its bytes are on
/// the wire; the other copies of the put wait for that, and hash the source
/// themselves only if the claiming copy failed first.
struct PutChecksum<'a> {
    cell: OnceLock<Checksum>,
    claimed: AtomicBool,
    settled: tokio::sync::Notify,
    /// The source (empty when the checksum is known up front).
    bytes: &'a [u8],
}

impl<'a> PutChecksum<'a> {
    fn of(bytes: &'a [u8]) -> Self {
        PutChecksum {
            cell: OnceLock::new(),
            claimed: AtomicBool::new(false),
            settled: tokio::sync::Notify::new(),
            bytes,
        }
    }

    fn known(c: Checksum) -> Self {
        PutChecksum {
            cell: OnceLock::from(c),
            ..PutChecksum::of(&[])
        }
    }

    /// Whether the caller is the copy that hashes (it must then `settle`).
    fn claim(&self) -> bool {
        self.cell.get().is_none() && !self.claimed.swap(true, SeqCst)
    }

    /// The claiming copy's outcome: the checksum, or `None` when its write
    /// failed (another copy then computes it).
    fn settle(&self, c: Option<Checksum>) {
        match c {
            Some(c) => {
                let _ = self.cell.set(c);
            }
            None => self.claimed.store(false, SeqCst),
        }
        self.settled.notify_waiters();
    }

    /// The checksum; waits up to `patience` for the claiming copy before
    /// hashing the source itself (a slow copy must not hold the others past
    /// their reservations).
    async fn get(&self, patience: Duration) -> Checksum {
        let until = tokio::time::Instant::now() + patience;
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if let Some(c) = self.cell.get() {
                return *c;
            }
            if !self.claimed.load(SeqCst) || tokio::time::timeout_at(until, settled).await.is_err()
            {
                return *self.cell.get_or_init(|| Checksum::compute(self.bytes));
            }
        }
    }
}

/// Where a get puts the bytes.
#[derive(Clone, Copy)]
enum Dest<'a> {
    /// A caller's registered region: (region, offset, room).
    Region(&'a Region, u64, u64),
    /// A staging buffer sized from the lease, copied into a vector.
    Vec,
}

/// Most holders a get asks for one key before it gives up.
const MAX_GET_ATTEMPTS: usize = 4;

/// HRW ranks a get asks before it turns to the DHT (the lookup order's
/// last-seen holder comes first, so two leave room for it among three).
const PLACEMENT_LOOKUP_RANKS: usize = 2;

/// Least time between two passes that publish provider records for copies
/// placement stopped finding.
const PROVIDE_PASS_EVERY: Duration = Duration::from_secs(2);

/// How long an ended lease may wait for a request to its holder to ride on
/// before it is sent on its own.
const RELEASE_DELAY: Duration = Duration::from_millis(2);
/// Wait between tries of a put whose target is out of room for a moment
/// (evicting or spilling).
const PUT_RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// Objects a repair pass copies at once.
const REPAIR_CONCURRENCY: usize = 8;
/// How long a put keeps asking a target that is out of room before it moves
/// on to the next peer.
const NO_SPACE_RETRY: Duration = Duration::from_secs(2);

struct Inner {
    cfg: StoreConfig,
    engine: Engine,
    pool: Option<Region>,
    me: PeerId,
    net: network::Client,
    holder: Option<Mutex<Holder>>,
    ssd: Option<Mutex<SsdTier>>,
    membership: Mutex<Membership>,
    links: RwLock<HashMap<PeerId, Link>>,
    maint: mpsc::UnboundedSender<Maint>,
    metrics: Arc<Metrics>,
    incarnation: u64,
    seq: AtomicU64,
    staging: Mutex<Vec<Region>>,
    loc_cache: Mutex<HashMap<ObjectKey, PeerId>>,
    closed: AtomicBool,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    listen: RwLock<Vec<Multiaddr>>,
    /// One repair pass at a time.
    repair_lock: tokio::sync::Mutex<()>,
    /// A repair pass left copies missing; the ticker runs another.
    repair_pending: AtomicBool,
    /// Live peers whose copies are gone (restarted), until a repair pass
    /// has restored everything.
    repair_lost: Mutex<Vec<PeerId>>,
    /// Leases ended by the caller but not yet told to their holder: the
    /// next lease request to that holder carries them, or a flush
    /// [`RELEASE_DELAY`] later does.
    pending_release: Mutex<PendingRelease>,
    /// This holder's location table and its bucket count (same-host gets).
    shm_table: Option<(Region, u32)>,
    /// Location tables of same-host holders (`None`: asked, has none).
    peer_tables: RwLock<HashMap<PeerId, Option<PeerTable>>>,
}

/// A same-host holder's location table.
#[derive(Clone)]
struct PeerTable {
    table: RemoteRegion,
    buckets: u32,
}

/// Lease ids waiting to be sent to their holders.
#[derive(Default)]
struct PendingRelease {
    by_peer: HashMap<PeerId, Vec<u64>>,
    flush_scheduled: bool,
}

/// A store peer (cheap to clone). Holds objects if `mem_bytes > 0`, and is
/// always a client of the others. Call [`Store::shutdown`] before dropping
/// the last handle: the background tasks hold the store until then.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("peer", &self.inner.me.to_string())
            .finish()
    }
}

/// A store peer id in libp2p's usual text form (base58), or hex if the
/// bytes are not a libp2p peer id.
pub fn peer_id_text(p: &PeerId) -> String {
    network::PeerId::from_bytes(p.as_bytes())
        .map(|x| x.to_string())
        .unwrap_or_else(|_| p.to_string())
}

/// A multiaddr in text form, from its bytes.
pub fn multiaddr_text(b: &[u8]) -> String {
    Multiaddr::try_from(b.to_vec())
        .map(|m| m.to_string())
        .unwrap_or_else(|_| "<bad multiaddr>".into())
}

/// The IP address of a `/ip4/..` or `/ip6/..` multiaddr.
pub fn multiaddr_ip(m: &Multiaddr) -> Option<std::net::IpAddr> {
    m.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(a) => Some(a.into()),
        libp2p::multiaddr::Protocol::Ip6(a) => Some(a.into()),
        _ => None,
    })
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn pin_wire(p: Pin) -> PinWire {
    match p {
        Pin::None => PinWire::None,
        Pin::Soft => PinWire::Soft,
        Pin::Hard => PinWire::Hard,
    }
}

fn pin_local(p: PinWire) -> Pin {
    match p {
        PinWire::None => Pin::None,
        PinWire::Soft => Pin::Soft,
        PinWire::Hard => Pin::Hard,
    }
}

fn remote(kind: ErrorKind, message: impl Into<String>) -> Error {
    Error::Remote {
        kind,
        message: message.into(),
    }
}

const MAX_LOC_CACHE: usize = 1 << 16;
const STAGING_SLOTS: usize = 8;

impl Store {
    /// Starts a peer: engine, DRAM pool, SSD tier, libp2p swarm, and joins
    /// through the bootstrap peers (waiting up to `op_timeout` for their
    /// member lists; a client with only mDNS waits for the first peer mDNS
    /// finds). Must be called inside a tokio runtime.
    ///
    /// Not joining is not an error here (a holder may be the first peer);
    /// [`Store::wait_for_members`] reports why nothing was joined.
    pub async fn start(cfg: StoreConfig) -> Result<Store> {
        cfg.validate()?;
        let engine = Engine::new(cfg.engine.clone())
            .map_err(|e| Error::InvalidConfig(format!("engine: {e}")))?;
        let pool = if cfg.mem_bytes > 0 {
            Some(
                engine
                    .alloc(cfg.mem_bytes, MemoryKind::Host)
                    .map_err(|e| Error::InvalidConfig(format!("pool: {e}")))?,
            )
        } else {
            None
        };
        let psk = match &cfg.psk {
            Some(text) => Some(
                network::parse_swarm_key(text)
                    .map_err(|e| Error::InvalidConfig(format!("pre-shared key: {e}")))?,
            ),
            None => None,
        };
        let net_cfg = NetworkConfig {
            listen: cfg.listen.clone(),
            bootstrap: cfg.bootstrap.clone(),
            psk,
            mdns: cfg.mdns,
            request_timeout: cfg.op_timeout,
            connect_timeout: cfg.op_timeout.min(Duration::from_secs(10)),
            ..NetworkConfig::new(network::Keypair::generate_ed25519())
        };
        let (net, events) = network::start(net_cfg)
            .await
            .map_err(|e| Error::InvalidConfig(format!("network: {e}")))?;
        let me = PeerId::from_bytes(&net.local_peer_id().to_bytes())?;
        let mut restored = Vec::new();
        let (holder, ssd) = match &pool {
            Some(p) => {
                let mut index = IndexConfig::new(PoolConfig::new(p.len()));
                index.spill_to_ssd = cfg.ssd.is_some();
                let mut holder = Holder::new(HolderConfig::new(index))?;
                let ssd = match &cfg.ssd {
                    Some((dir, cap)) => {
                        let (tier, report) = SsdTier::open(SsdConfig::new(dir.clone(), *cap))?;
                        let now = Instant::now();
                        for o in tier.iter_lru() {
                            if holder
                                .restore_from_ssd(now, o.key, o.len, o.checksum)
                                .is_ok()
                            {
                                restored.push(o.key);
                            }
                        }
                        tracing::info!(
                            restored = report.restored.len(),
                            removed = report.removed.len(),
                            dropped = report.dropped.len(),
                            "ssd tier opened"
                        );
                        Some(Mutex::new(tier))
                    }
                    None => None,
                };
                (Some(Mutex::new(holder)), ssd)
            }
            None => (None, None),
        };
        // The table same-host clients read locations from (shm_index).
        let shm_table = match (&holder, &pool) {
            (Some(h), Some(p)) if cfg.engine.transport != TransportKind::Tcp => {
                let buckets = shm_index::buckets_for(p.len());
                let table = engine
                    .alloc(
                        u64::from(buckets) * shm_index::BUCKET_BYTES as u64,
                        MemoryKind::Host,
                    )
                    .map_err(|e| Error::InvalidConfig(format!("location table: {e}")))?;
                let w = ShmIndexWriter::new(table.clone(), buckets)
                    .ok_or_else(|| Error::InvalidConfig("location table layout".into()))?;
                h.lock().set_location_observer(Box::new(w));
                Some((table, buckets))
            }
            _ => None,
        };
        let mut mcfg = MembershipConfig::new(me.clone());
        mcfg.dead_after = cfg.dead_after;
        let membership = Membership::new(mcfg)?;
        let (maint_tx, maint_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            engine,
            pool,
            me,
            net,
            holder,
            ssd,
            membership: Mutex::new(membership),
            links: RwLock::new(HashMap::new()),
            maint: maint_tx,
            metrics: Arc::new(Metrics::default()),
            incarnation: now_unix_ms(),
            seq: AtomicU64::new(0),
            staging: Mutex::new(Vec::new()),
            loc_cache: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            listen: RwLock::new(Vec::new()),
            repair_lock: tokio::sync::Mutex::new(()),
            repair_pending: AtomicBool::new(false),
            repair_lost: Mutex::new(Vec::new()),
            pending_release: Mutex::new(PendingRelease::default()),
            shm_table,
            peer_tables: RwLock::new(HashMap::new()),
            cfg,
        });
        let store = Store { inner };
        if let Err(e) = store.finish_start(events, maint_rx, restored).await {
            store.shutdown().await;
            return Err(e);
        }
        Ok(store)
    }

    async fn finish_start(
        &self,
        events: mpsc::Receiver<network::Event>,
        maint_rx: mpsc::UnboundedReceiver<Maint>,
        restored: Vec<ObjectKey>,
    ) -> Result<()> {
        self.install_rpc_handler();
        // Listen addresses go into announces; they appear shortly after start.
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            let addrs = self.inner.net.listen_addrs().await.unwrap_or_default();
            if !addrs.is_empty() || Instant::now() >= until {
                *self.inner.listen.write() = addrs;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for topic in [MEMBERS_TOPIC, LEAVE_TOPIC] {
            self.inner
                .net
                .subscribe(topic)
                .await
                .map_err(|e| Error::InvalidConfig(format!("subscribe: {e}")))?;
        }
        if self.is_holder() {
            // Know ourselves at once (placement includes this peer).
            let a = self.announce();
            self.handle_announce(a);
        }
        self.spawn(event_loop(self.clone(), events));
        self.spawn(maintenance(self.clone(), maint_rx));
        self.spawn(ticker(self.clone()));
        if let Some(addr) = self.inner.cfg.metrics_addr {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("metrics {addr}"), e))?;
            self.spawn(crate::metrics::serve(l, self.inner.metrics.clone()));
        }
        for key in restored {
            if self.displaced(&key) {
                let _ = self.inner.maint.send(Maint::Provide(key));
            }
        }
        self.join().await;
        Ok(())
    }

    /// Runs `fut` as a task of this store (stopped by [`Store::shutdown`]).
    /// Refused once the store is closed.
    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.inner.tasks.lock();
        if self.inner.closed.load(Relaxed) {
            return;
        }
        if tasks.len() >= 32 {
            tasks.retain(|t| !t.is_finished());
        }
        tasks.push(tokio::spawn(fut));
    }

    /// Asks connected peers for their member lists until one answers or
    /// `op_timeout` passes. Joins through the bootstrap peers, or, for a
    /// client with mDNS and no bootstrap, through the first peer found.
    async fn join(&self) {
        let mdns_client = self.inner.cfg.mdns && !self.is_holder();
        if self.inner.cfg.bootstrap.is_empty() && !mdns_client {
            return;
        }
        let until = Instant::now() + self.inner.cfg.op_timeout;
        while Instant::now() < until {
            let peers = self.inner.net.connected_peers().await.unwrap_or_default();
            if peers.is_empty() && !mdns_client {
                // Every bootstrap address failed once and nothing is
                // connected: the next redial is seconds away, give up now
                // (`wait_for_members` reports why).
                let failed = self
                    .inner
                    .net
                    .recent_dial_errors()
                    .await
                    .unwrap_or_default();
                if failed.len() >= self.inner.cfg.bootstrap.len() {
                    break;
                }
            }
            for p in peers {
                if let Ok(resp) = self
                    .inner
                    .net
                    .request(p, rpc::encode(&NetRequest::Members))
                    .await
                {
                    if let Ok(NetResponse::Members(list)) = rpc::decode::<NetResponse>(&resp) {
                        for a in list.iter().filter_map(|b| Announce::decode(b).ok()) {
                            self.handle_announce(a);
                        }
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::warn!("no peer answered with its member list; relying on gossip");
    }

    /// Why this peer has no connection: the outcome of dialing each
    /// bootstrap address once more (empty when some peer is connected).
    async fn join_failure(&self) -> String {
        if !self
            .inner
            .net
            .connected_peers()
            .await
            .unwrap_or_default()
            .is_empty()
        {
            return String::new();
        }
        if self.inner.cfg.bootstrap.is_empty() {
            return if self.inner.cfg.mdns {
                "no peer found by mDNS".into()
            } else {
                "no bootstrap address given and mDNS is off".into()
            };
        }
        let mut reasons = self
            .inner
            .net
            .recent_dial_errors()
            .await
            .unwrap_or_default();
        reasons.dedup();
        if reasons.is_empty() {
            for addr in &self.inner.cfg.bootstrap {
                match self.inner.net.dial(addr.clone()).await {
                    Ok(_) => reasons.push(format!("{addr}: connected, but it sent no members")),
                    Err(e) => reasons.push(e.to_string()),
                }
            }
        }
        format!(
            "{}; check the bootstrap address and that every peer uses the same \
             pre-shared key (a peer with another key cannot complete the handshake)",
            reasons.join("; ")
        )
    }

    /// This peer's id (the libp2p peer id).
    pub fn peer_id(&self) -> &PeerId {
        &self.inner.me
    }

    /// The libp2p peer id, in its usual text form.
    pub fn peer_id_text(&self) -> String {
        peer_id_text(&self.inner.me)
    }

    /// The transfer engine of this peer (register buffers with it to put
    /// and get without copies).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// libp2p addresses this peer listens on (with `/p2p/<id>`).
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.inner.net.listen_addrs().await.unwrap_or_default()
    }

    /// Whether this peer holds objects.
    pub fn is_holder(&self) -> bool {
        self.inner.holder.is_some()
    }

    /// Waits until at least `n` holders (this one included if it holds) are live.
    pub async fn wait_for_members(&self, n: usize, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        loop {
            let live = self.inner.membership.lock().live_count();
            if live >= n {
                return Ok(());
            }
            if Instant::now() >= until {
                let why = self.join_failure().await;
                return Err(if live == 0 && !why.is_empty() {
                    Error::NotJoined(why)
                } else {
                    remote(
                        ErrorKind::Internal,
                        format!("only {live} of {n} members joined within {timeout:?}"),
                    )
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Live members.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let m = self.inner.membership.lock();
        let mut v: Vec<PeerInfo> = m
            .live_members()
            .map(|x| PeerInfo {
                peer_id: peer_id_text(&x.peer),
                incarnation: x.incarnation,
                seq: x.seq,
                capacity: x.capacity,
                free: x.free,
                load: x.load,
                addrs: x.addrs.iter().map(|a| multiaddr_text(a)).collect(),
                is_self: x.peer == self.inner.me,
            })
            .collect();
        v.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        v
    }

    /// Counters of this peer.
    pub fn stats(&self) -> StoreStats {
        let m = &self.inner.metrics;
        let (objects, bytes, leases, reservations) = match &self.inner.holder {
            Some(h) => {
                let h = h.lock();
                let s = h.index().stats();
                (
                    h.index().len(),
                    s.resident_bytes,
                    h.leases().count(),
                    h.reservations().count(),
                )
            }
            None => (0, 0, 0, 0),
        };
        let (ssd_objects, ssd_bytes) = match &self.inner.ssd {
            Some(s) => {
                let s = s.lock();
                (s.len(), s.used_bytes())
            }
            None => (0, 0),
        };
        StoreStats {
            peer_id: self.peer_id_text(),
            peers_alive: self.inner.membership.lock().live_count(),
            objects,
            bytes_stored: bytes,
            capacity: self.inner.cfg.mem_bytes,
            ssd_objects,
            ssd_bytes,
            puts: m.puts.load(Relaxed),
            gets: m.gets.load(Relaxed),
            hits: m.hits.load(Relaxed),
            misses: m.misses.load(Relaxed),
            evictions: m.evictions.load(Relaxed),
            repairs: m.repairs.load(Relaxed),
            leases,
            reservations,
            integrity_failures: m.integrity_failures.load(Relaxed),
            announces_sent: m.announces_sent.load(Relaxed),
            announces_received: m.announces_received.load(Relaxed),
        }
    }

    /// What this peer's libp2p layer has moved so far (bytes on the wire,
    /// gossip messages).
    pub fn traffic(&self) -> network::Traffic {
        self.inner.net.traffic()
    }

    /// Peers in this peer's membership gossip mesh.
    pub async fn gossip_mesh_peers(&self) -> usize {
        self.inner
            .net
            .mesh_peers(MEMBERS_TOPIC)
            .await
            .unwrap_or_default()
    }

    /// Peers this peer has a libp2p connection to.
    pub async fn connected_peers(&self) -> usize {
        self.inner
            .net
            .connected_peers()
            .await
            .map_or(0, |p| p.len())
    }

    /// Background tasks of this store still running (0 after
    /// [`Store::shutdown`]).
    pub fn running_tasks(&self) -> usize {
        self.inner
            .tasks
            .lock()
            .iter()
            .filter(|t| !t.is_finished())
            .count()
    }

    /// The metrics registry (also served on `metrics_addr`).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Leaves the swarm: tells the others (a holder publishes a goodbye),
    /// stops every task of this store and waits for them to end, closes the
    /// libp2p swarm. Holder RPCs are refused from then on. Idempotent.
    pub async fn shutdown(&self) {
        self.flush_releases().await;
        let mut tasks = {
            let mut t = self.inner.tasks.lock();
            if self.inner.closed.swap(true, Relaxed) {
                return;
            }
            std::mem::take(&mut *t)
        };
        for t in &tasks {
            t.abort();
        }
        for t in &mut tasks {
            let _ = t.await;
        }
        // Kept (all finished now) so that `running_tasks` reports the truth.
        self.inner.tasks.lock().extend(tasks);
        if self.is_holder() {
            let bye = Leave {
                version: LEAVE_VERSION,
                peer: self.inner.me.clone(),
                incarnation: self.inner.incarnation,
            };
            if let Ok(bytes) = postcard::to_stdvec(&bye) {
                if self.inner.net.publish(LEAVE_TOPIC, bytes).await.is_ok() {
                    // Give the connections a moment to flush the goodbye.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = self.inner.net.shutdown().await;
    }

    // ------------------------------------------------------------ membership

    fn announce(&self) -> Announce {
        let free = self
            .inner
            .holder
            .as_ref()
            .map_or(0, |h| h.lock().placement_free());
        let desc = self
            .inner
            .pool
            .as_ref()
            .map(|p| p.desc().to_bytes())
            .unwrap_or_default();
        let mut a = Announce::new(
            self.inner.me.clone(),
            self.inner.incarnation,
            self.inner.seq.fetch_add(1, Relaxed),
            self.inner.cfg.mem_bytes,
            free.min(self.inner.cfg.mem_bytes),
            desc,
        );
        a.addrs = self
            .inner
            .listen
            .read()
            .iter()
            .take(8)
            .map(|m| m.to_vec())
            .collect();
        a
    }

    fn handle_announce(&self, a: Announce) {
        let peer = a.peer.clone();
        let desc = a.engine_desc.clone();
        let ev = self
            .inner
            .membership
            .lock()
            .handle_announce(Instant::now(), a);
        match ev {
            Ok(Some(ev)) => self.on_membership(ev, Some(desc)),
            Ok(None) => {}
            Err(e) => tracing::debug!(peer = %peer, "announce refused: {e}"),
        }
    }

    fn handle_leave(&self, bye: &Leave) {
        let ev =
            self.inner
                .membership
                .lock()
                .handle_leave(Instant::now(), &bye.peer, bye.incarnation);
        if let Some(ev) = ev {
            self.on_membership(ev, None);
        }
    }

    fn on_membership(&self, ev: MembershipEvent, desc: Option<Vec<u8>>) {
        tracing::info!(?ev, "membership");
        match &ev {
            MembershipEvent::Joined { peer, .. } => {
                if let Some(d) = desc {
                    self.link(peer, &d);
                }
                // Copies that found no target before may find one now.
                if self.inner.repair_pending.load(Relaxed) {
                    let _ = self.inner.maint.send(Maint::Repair(Vec::new()));
                }
            }
            MembershipEvent::Restarted { peer, .. } => {
                self.unlink(peer);
                if let Some(d) = desc {
                    self.link(peer, &d);
                }
                let _ = self.inner.maint.send(Maint::Repair(vec![peer.clone()]));
            }
            MembershipEvent::Dead { peer, .. } | MembershipEvent::Left { peer, .. } => {
                self.unlink(peer);
                let _ = self.inner.maint.send(Maint::Repair(vec![peer.clone()]));
            }
        }
        let live = self.inner.membership.lock().live_count();
        self.inner.metrics.peers_alive.store(live as u64, Relaxed);
    }

    fn link(&self, peer: &PeerId, desc: &[u8]) {
        match RegionDesc::from_bytes(desc) {
            Ok(d) => {
                let r = self.inner.engine.import(&d);
                let same_host_shm = self.inner.cfg.engine.transport != TransportKind::Tcp
                    && d.peer.shm.is_some()
                    && d.shareable
                    && d.peer.host_id == kvmesh_gpu::local_host_id();
                let link = Link {
                    engine_peer: r.peer,
                    pool: r,
                    engine_id: d.peer.engine_id,
                    same_host_shm,
                };
                self.inner.links.write().insert(peer.clone(), link);
            }
            Err(e) => tracing::warn!(%peer, "member with an unusable engine descriptor: {e}"),
        }
    }

    fn unlink(&self, peer: &PeerId) {
        self.inner.peer_tables.write().remove(peer);
        let link = self.inner.links.write().remove(peer);
        if let Some(l) = link {
            self.inner.engine.remove_peer(l.engine_peer);
            if let Some(h) = &self.inner.holder {
                let owner = PeerId::from_bytes(&l.engine_id).expect("16 bytes");
                let (r, le) = h.lock().release_owner(&owner);
                if r + le > 0 {
                    tracing::info!(%peer, reservations = r, leases = le, "released what a departed peer held");
                }
                self.drain_holder_events();
            }
        }
        self.inner.loc_cache.lock().retain(|_, p| p != peer);
    }

    fn link_of(&self, peer: &PeerId) -> Result<Link> {
        self.inner.links.read().get(peer).copied().ok_or_else(|| {
            remote(
                ErrorKind::Internal,
                format!("peer {peer} is not a live member"),
            )
        })
    }

    fn candidates(&self) -> Vec<placement::Candidate> {
        self.inner.membership.lock().candidates()
    }

    /// Whether a get would miss this holder's copy of `key` by placement
    /// alone: it is not among the first [`PLACEMENT_LOOKUP_RANKS`] peers of
    /// the key's HRW order. Only such copies get a DHT provider record;
    /// the others are found without one, so a put costs no DHT traffic.
    fn displaced(&self, key: &ObjectKey) -> bool {
        !placement::targets(key, &self.candidates(), PLACEMENT_LOOKUP_RANKS)
            .contains(&self.inner.me)
    }

    // ---------------------------------------------------------------- holder

    fn install_rpc_handler(&self) {
        let weak = Arc::downgrade(&self.inner);
        self.inner
            .engine
            .set_rpc_handler(Arc::new(move |from: EngineId, req: &[u8]| {
                let inner = match weak.upgrade() {
                    Some(inner) if !inner.closed.load(Relaxed) => inner,
                    _ => {
                        return rpc::encode(&Response::Error {
                            kind: ErrorKind::Internal,
                            message: "shutting down".into(),
                        })
                        .into()
                    }
                };
                let store = Store { inner };
                store.inner.metrics.rpc_served.fetch_add(1, Relaxed);
                let resp = match rpc::decode::<Request>(req) {
                    Ok(Request::Fetch {
                        key,
                        duration_ms,
                        release,
                        max_len,
                    }) => {
                        let d = Duration::from_millis(duration_ms);
                        return store.serve_fetch(from, key, d, release, max_len);
                    }
                    Ok(r) => store.serve(from, r),
                    Err(m) => Response::Error {
                        kind: ErrorKind::Invalid,
                        message: m,
                    },
                };
                rpc::encode(&resp).into()
            }));
    }

    fn drain_holder_events(&self) {
        if let Some(h) = &self.inner.holder {
            let mut h = h.lock();
            while let Some(ev) = h.poll_event() {
                let _ = self.inner.maint.send(Maint::Holder(ev));
            }
        }
    }

    /// Answers one holder RPC. Runs on an engine I/O thread: no blocking
    /// except the bounded SSD read of a promotion.
    fn serve(&self, from: EngineId, req: Request) -> Response {
        let Some(holder) = &self.inner.holder else {
            return Response::Error {
                kind: ErrorKind::Invalid,
                message: "this peer holds no objects (client)".into(),
            };
        };
        let owner = PeerId::from_bytes(&from).expect("16 bytes");
        let now = Instant::now();
        let resp = match req {
            Request::Reserve { key, len, ttl_ms } => {
                match holder
                    .lock()
                    .reserve(now, &owner, key, len, Duration::from_millis(ttl_ms))
                {
                    Ok(r) => Response::Reserved {
                        reservation: r.id.0,
                        offset: r.location.offset,
                    },
                    Err(e) => Response::Error {
                        kind: e.kind(),
                        message: e.to_string(),
                    },
                }
            }
            Request::Commit {
                key,
                reservation,
                checksum,
                pin,
                ttl_ms,
                replication,
                holders,
            } => {
                let opts = ObjectOptions {
                    pin: pin_local(pin),
                    ttl: ttl_ms.map(Duration::from_millis),
                    replication,
                    holders,
                };
                let mut h = holder.lock();
                let same_key = h
                    .reservations()
                    .any(|r| r.id.0 == reservation && r.key == key);
                let r = if same_key {
                    h.commit(now, &owner, ReservationId(reservation), checksum, opts)
                } else {
                    Err(Error::UnknownReservation(reservation))
                };
                drop(h);
                match r {
                    Ok(_) => {
                        if self.displaced(&key) {
                            let _ = self.inner.maint.send(Maint::Provide(key));
                        }
                        Response::Done
                    }
                    Err(e) => Response::Error {
                        kind: e.kind(),
                        message: e.to_string(),
                    },
                }
            }
            Request::Abort { reservation } => {
                match holder.lock().abort(now, &owner, ReservationId(reservation)) {
                    Ok(()) => Response::Done,
                    Err(e) => Response::Error {
                        kind: e.kind(),
                        message: e.to_string(),
                    },
                }
            }
            Request::Lease {
                keys,
                duration_ms,
                release,
            } => {
                self.release_local(&owner, release);
                let d = Duration::from_millis(duration_ms);
                Response::Leases(
                    keys.iter()
                        .map(|k| self.lease_local(now, &owner, k, d))
                        .collect(),
                )
            }
            Request::Release { leases } => {
                self.release_local(&owner, leases);
                Response::Done
            }
            Request::Fetch { .. } => Response::Error {
                kind: ErrorKind::Invalid,
                message: "a fetch needs a bulk call".into(),
            },
            Request::Contains { keys } => {
                let h = holder.lock();
                Response::Flags(keys.iter().map(|k| h.index().contains(k)).collect())
            }
            Request::Remove { key } => match holder.lock().remove(&key) {
                Ok(()) => Response::Done,
                Err(e) => Response::Error {
                    kind: e.kind(),
                    message: e.to_string(),
                },
            },
            Request::SetHolders {
                key,
                replication,
                holders,
            } => match holder.lock().set_holders(&key, replication, holders) {
                Ok(()) => Response::Done,
                Err(e) => Response::Error {
                    kind: e.kind(),
                    message: e.to_string(),
                },
            },
            Request::SetPin { key, pin } => match holder.lock().set_pin(&key, pin_local(pin)) {
                Ok(()) => Response::Done,
                Err(e) => Response::Error {
                    kind: e.kind(),
                    message: e.to_string(),
                },
            },
            Request::LocationTable => match &self.inner.shm_table {
                Some((t, buckets)) => Response::LocationTable {
                    desc: t.desc().to_bytes(),
                    buckets: *buckets,
                },
                None => Response::LocationTable {
                    desc: Vec::new(),
                    buckets: 0,
                },
            },
            Request::Stat => {
                let st = self.stats();
                let m = &self.inner.metrics;
                Response::Stat(rpc::HolderStat {
                    objects: st.objects as u64,
                    bytes_stored: st.bytes_stored,
                    capacity: st.capacity,
                    ssd_objects: st.ssd_objects as u64,
                    ssd_bytes: st.ssd_bytes,
                    evictions: st.evictions,
                    spills: m.spills.load(Relaxed),
                    repairs: st.repairs,
                    rpc_served: m.rpc_served.load(Relaxed),
                    leases: st.leases as u64,
                    reservations: st.reservations as u64,
                    integrity_failures: st.integrity_failures,
                })
            }
        };
        self.drain_holder_events();
        resp
    }

    /// Ends leases `owner` holds here.
    fn release_local(&self, owner: &PeerId, leases: Vec<u64>) {
        if let (Some(h), false) = (&self.inner.holder, leases.is_empty()) {
            let mut h = h.lock();
            for l in leases {
                let _ = h.release(owner, LeaseId(l));
            }
        }
    }

    /// Answers [`Request::Fetch`]: a lease, and the object's bytes sent
    /// from the pool after the reply (the lease keeps them in place until
    /// the client releases it, which it does once they landed).
    fn serve_fetch(
        &self,
        from: EngineId,
        key: ObjectKey,
        d: Duration,
        release: Vec<u64>,
        max_len: u64,
    ) -> Reply {
        let resp = match (&self.inner.holder, &self.inner.pool) {
            (Some(_), Some(pool)) => {
                let owner = PeerId::from_bytes(&from).expect("16 bytes");
                self.release_local(&owner, release);
                let r = self.lease_local(Instant::now(), &owner, &key, d);
                self.drain_holder_events();
                match r {
                    Ok(grant) if grant.len <= max_len => {
                        return Reply::Bulk {
                            head: rpc::encode(&Response::Fetched { grant }),
                            region: pool.id(),
                            offset: grant.offset,
                            len: grant.len,
                        }
                    }
                    r => Response::Leases(vec![r]),
                }
            }
            _ => Response::Error {
                kind: ErrorKind::Invalid,
                message: "this peer holds no objects (client)".into(),
            },
        };
        rpc::encode(&resp).into()
    }

    /// Leases `key` here, promoting it from the SSD tier first if needed.
    fn lease_local(
        &self,
        now: Instant,
        owner: &PeerId,
        key: &ObjectKey,
        d: Duration,
    ) -> Result<Grant, ErrorKind> {
        let holder = self.inner.holder.as_ref().ok_or(ErrorKind::Invalid)?;
        let mut h = holder.lock();
        let lease = match h.lease(now, owner, key, d) {
            Err(Error::NotResident(_)) => {
                self.promote(&mut h, key).map_err(|e| e.kind())?;
                h.lease(now, owner, key, d)
            }
            other => other,
        }
        .map_err(|e| e.kind())?;
        Ok(Grant {
            lease: lease.id.0,
            offset: lease.location.offset,
            len: lease.location.len,
            checksum: lease.checksum,
        })
    }

    /// Reads an SSD-only object back into DRAM (verified by the SSD tier).
    fn promote(&self, h: &mut Holder, key: &ObjectKey) -> Result<()> {
        let (Some(ssd), Some(pool)) = (&self.inner.ssd, &self.inner.pool) else {
            return Err(Error::NotResident(*key));
        };
        let loc = h.begin_promote(key)?;
        let len = h.index().get(key).map_or(0, |m| m.len);
        // SAFETY: `loc` was just allocated for this promotion: no engine op
        // or other object uses these pool bytes until complete_promote.
        let r = match unsafe { pool.slice_mut(loc.offset, len) } {
            Ok(dst) => ssd.lock().read_into(key, dst),
            Err(e) => Err(Error::InvalidArgument(e.to_string())),
        };
        let ok = r.is_ok();
        h.complete_promote(Instant::now(), key, ok);
        match r {
            Ok(()) => {
                self.inner.metrics.promotions.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(%key, "promotion from SSD failed: {e}");
                if matches!(e, Error::Corrupt { .. } | Error::ChecksumMismatch { .. }) {
                    self.inner.metrics.integrity_failures.fetch_add(1, Relaxed);
                }
                if matches!(
                    e,
                    Error::Corrupt { .. } | Error::NotFound(_) | Error::ChecksumMismatch { .. }
                ) {
                    // The only local copy is gone: the index drops the key
                    // (its provider record is withdrawn by the event).
                    h.forget_ssd(key);
                }
                Err(e)
            }
        }
    }

    // ------------------------------------------------------------ client side

    async fn call(&self, link: &Link, req: &Request) -> Result<Response> {
        let bytes = self
            .inner
            .engine
            .call(
                link.engine_peer,
                rpc::encode(req),
                self.inner.cfg.op_timeout,
            )
            .await
            .map_err(|e| engine_error("rpc", e))?;
        let resp = rpc::decode::<Response>(&bytes).map_err(|m| remote(ErrorKind::Invalid, m))?;
        if let Response::Error { kind, message } = resp {
            return Err(remote(kind, message));
        }
        Ok(resp)
    }

    fn staging(&self, len: u64) -> Result<Region> {
        let mut s = self.inner.staging.lock();
        if let Some(i) = s
            .iter()
            .position(|r| r.len() >= len && r.len() <= len.max(1 << 20) * 4)
        {
            return Ok(s.swap_remove(i));
        }
        drop(s);
        self.inner
            .engine
            .alloc(len.next_power_of_two().max(64 << 10), MemoryKind::Host)
            .map_err(|e| Error::InvalidArgument(e.to_string()))
    }

    fn unstage(&self, r: Region) {
        let mut s = self.inner.staging.lock();
        if s.len() < STAGING_SLOTS {
            s.push(r);
        } else if let Some(i) = s
            .iter()
            .enumerate()
            .min_by_key(|(_, x)| x.len())
            .map(|(i, _)| i)
        {
            if s[i].len() < r.len() {
                s[i] = r;
            }
        }
    }

    /// Stores `data` under `key` on `opts.replicas` peers chosen by
    /// rendezvous hashing. Idempotent: a key already stored counts as stored.
    pub async fn put(&self, key: ObjectKey, data: &[u8], opts: PutOptions) -> Result<()> {
        let len = data.len() as u64;
        if len == 0 {
            return Err(Error::InvalidArgument("empty object".into()));
        }
        let staging = self.staging(len)?;
        staging
            .write_at(0, data)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let r = self.put_from(key, &staging, 0, len, opts).await;
        self.unstage(staging);
        r
    }

    /// Stores `len` bytes of a registered region (no copy on this side).
    /// The range must not change until the call returns.
    ///
    /// The copies go to the first `opts.replicas` live holders in HRW order;
    /// a target that fails (unreachable, full) is replaced by the next one
    /// in that order. Succeeds when at least one copy is stored; every
    /// holder then records where the copies really are, so repair counts
    /// them right.
    pub async fn put_from(
        &self,
        key: ObjectKey,
        region: &Region,
        offset: u64,
        len: u64,
        opts: PutOptions,
    ) -> Result<()> {
        let t0 = Instant::now();
        // SAFETY: the caller keeps the range unchanged during the put, and
        // the engine only reads it.
        let bytes = unsafe { region.slice(offset, len) }
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let checksum = PutChecksum::of(bytes);
        let members = self.candidates();
        let ranked = placement::ranked(&key, &members);
        let want = opts.replicas.max(1).min(ranked.len());
        if want == 0 {
            self.inner.metrics.put_failures.fetch_add(1, Relaxed);
            return Err(remote(ErrorKind::NoSpace, "no live holder to put on"));
        }
        let deadline = Instant::now() + self.inner.cfg.op_timeout;
        // Holder list the commits carry: the planned targets.
        let mut planned: Vec<PeerId> = ranked[..want].to_vec();
        let mut round: Vec<PeerId> = planned.clone();
        let mut next = want;
        let mut stored: Vec<PeerId> = Vec::new();
        let mut failures = 0usize;
        let mut last = None;
        loop {
            let futs = round.iter().map(|t| {
                self.put_one(
                    t, key, region, offset, len, &checksum, opts, &planned, deadline,
                )
            });
            let results = futures::future::join_all(futs).await;
            let mut failed = 0;
            for (t, r) in round.iter().zip(results) {
                match r {
                    Ok(()) => stored.push(t.clone()),
                    Err(e) => {
                        tracing::debug!(%key, target = %t, "put copy failed: {e}");
                        failed += 1;
                        last = Some(e);
                    }
                }
            }
            failures += failed;
            // Replace the failed targets with the next peers in HRW order,
            // a bounded number of times.
            if failed == 0 || next >= ranked.len() || failures > want + 2 {
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            round = ranked[next..].iter().take(failed).cloned().collect();
            next += round.len();
            planned = stored.iter().chain(round.iter()).cloned().collect();
        }
        if stored.is_empty() {
            self.inner.metrics.put_failures.fetch_add(1, Relaxed);
            return Err(last.unwrap_or_else(|| remote(ErrorKind::Internal, "put failed")));
        }
        if failures > 0 {
            if stored.len() < want {
                if let Some(e) = &last {
                    tracing::warn!(%key, "put stored {} of {want} replicas: {e}", stored.len());
                }
            }
            // Some commits named a peer that has no copy: record the real set.
            stored.sort();
            self.set_holders_on(key, want, &stored).await;
        }
        self.inner.loc_cache_insert(key, stored[0].clone());
        let m = &self.inner.metrics;
        m.puts.fetch_add(1, Relaxed);
        m.put_bytes.fetch_add(len, Relaxed);
        m.put_latency.observe(t0.elapsed());
        Ok(())
    }

    /// Tells each of `holders` that `key`'s copies are exactly `holders`.
    async fn set_holders_on(&self, key: ObjectKey, replication: usize, holders: &[PeerId]) {
        let req = Request::SetHolders {
            key,
            replication: replication.clamp(1, 255) as u8,
            holders: holders.to_vec(),
        };
        let futs = holders.iter().map(|h| {
            let req = &req;
            async move {
                if let Ok(link) = self.link_of(h) {
                    if let Err(e) = self.call(&link, req).await {
                        tracing::debug!(%key, holder = %h, "set holders failed: {e}");
                    }
                }
            }
        });
        futures::future::join_all(futs).await;
    }

    /// One copy: reserve on `target`, engine WRITE, commit. A target that is
    /// out of room for a moment (evicting, spilling to SSD) is asked again
    /// for a bounded time.
    #[allow(clippy::too_many_arguments)]
    async fn put_one(
        &self,
        target: &PeerId,
        key: ObjectKey,
        region: &Region,
        offset: u64,
        len: u64,
        checksum: &PutChecksum<'_>,
        opts: PutOptions,
        holders: &[PeerId],
        deadline: Instant,
    ) -> Result<()> {
        let link = self.link_of(target)?;
        let ttl_ms = self.inner.cfg.reservation_ttl.as_millis() as u64;
        let retry_until = deadline.min(Instant::now() + NO_SPACE_RETRY);
        let (reservation, roff) = loop {
            match self
                .call(&link, &Request::Reserve { key, len, ttl_ms })
                .await
            {
                Ok(Response::Reserved {
                    reservation,
                    offset,
                }) => break (reservation, offset),
                Ok(_) => return Err(remote(ErrorKind::Invalid, "unexpected reply to reserve")),
                Err(Error::Remote {
                    kind: ErrorKind::AlreadyExists,
                    ..
                }) => return Ok(()),
                // Only the holder says NoSpace (transport failures map to
                // other kinds), so this never spins on a dead peer.
                Err(Error::Remote {
                    kind: ErrorKind::NoSpace,
                    ..
                }) if Instant::now() + PUT_RETRY_BACKOFF < retry_until => {
                    tokio::time::sleep(PUT_RETRY_BACKOFF).await;
                }
                Err(e) => return Err(e),
            }
        };
        // One copy of the put hashes the pieces while the holder receives
        // them; the others reuse its checksum.
        let mine = checksum.claim();
        let wrote = Instant::now();
        let mut h = ChecksumHasher::new();
        let st = self
            .inner
            .engine
            .write_streamed(
                Op::write(region.id(), offset, link.pool, roff, len),
                self.inner.cfg.op_timeout,
                &mut |piece| {
                    if mine {
                        h.update(piece);
                    }
                },
            )
            .await
            .map_err(|e| engine_error("transfer", e));
        if mine {
            checksum.settle(st.is_ok().then(|| h.finalize()));
        }
        let st = match st {
            // As long again as this copy's own write took, at least 1 ms.
            Ok(()) => Ok(checksum
                .get(wrote.elapsed().max(Duration::from_millis(1)))
                .await),
            Err(e) => Err(e),
        };
        let checksum = match st {
            Ok(c) => c,
            Err(e) => {
                let _ = self.call(&link, &Request::Abort { reservation }).await;
                return Err(e);
            }
        };
        let commit = Request::Commit {
            key,
            reservation,
            checksum,
            pin: pin_wire(opts.pin),
            ttl_ms: opts.ttl.map(|t| t.as_millis() as u64),
            replication: opts.replicas.clamp(1, 255) as u8,
            holders: holders.to_vec(),
        };
        match self.call(&link, &commit).await {
            Ok(_)
            | Err(Error::Remote {
                kind: ErrorKind::AlreadyExists,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn transfer(&self, ops: &[Op]) -> Result<()> {
        let b = self.transfer_start(ops)?;
        self.transfer_finish(b).await
    }

    /// Submits an engine batch; the bytes start moving at once.
    fn transfer_start(&self, ops: &[Op]) -> Result<kvmesh_gpu::Batch> {
        self.inner
            .engine
            .submit(
                ops,
                BatchOptions {
                    timeout: Some(self.inner.cfg.op_timeout),
                    notify: None,
                },
            )
            .map_err(|e| remote(ErrorKind::Invalid, format!("engine: {e}")))
    }

    /// Waits for a batch from [`Store::transfer_start`].
    async fn transfer_finish(&self, b: kvmesh_gpu::Batch) -> Result<()> {
        let st = b.wait().await;
        st.result
            .map_err(|k| engine_error("transfer", kvmesh_gpu::Error::Transfer(k)))
    }

    /// Stores many objects concurrently; one result per item.
    pub async fn put_many(
        &self,
        items: &[(ObjectKey, &[u8])],
        opts: PutOptions,
    ) -> Vec<Result<()>> {
        futures::future::join_all(items.iter().map(|(k, d)| self.put(*k, d, opts))).await
    }

    /// Peers to ask for `key`, best first: where it was last seen, then the
    /// HRW order over live members.
    fn lookup_order(&self, key: &ObjectKey) -> Vec<PeerId> {
        let mut order = Vec::new();
        if let Some(p) = self.inner.loc_cache.lock().get(key) {
            order.push(p.clone());
        }
        for p in placement::ranked(key, &self.candidates()) {
            if !order.contains(&p) {
                order.push(p);
            }
        }
        order
    }

    /// Leases each key on one holder (batched per peer: one RPC per holder
    /// asked). `None` for keys no live holder has.
    pub async fn lease_many(&self, keys: &[ObjectKey], duration: Duration) -> Vec<Option<Leased>> {
        let mut out: Vec<Option<Leased>> = vec![None; keys.len()];
        let orders: Vec<Vec<PeerId>> = keys.iter().map(|k| self.lookup_order(k)).collect();
        let max_rounds = 3usize;
        let mut providers_tried = vec![false; keys.len()];
        for round in 0..=max_rounds {
            // Group the keys still missing by the peer to ask this round.
            let mut ask: HashMap<PeerId, Vec<usize>> = HashMap::new();
            for (i, o) in orders.iter().enumerate() {
                if out[i].is_some() {
                    continue;
                }
                if round < max_rounds {
                    if let Some(p) = o.get(round) {
                        ask.entry(p.clone()).or_default().push(i);
                    }
                } else if !providers_tried[i] {
                    providers_tried[i] = true;
                    // Last resort: the DHT's provider records.
                    if let Ok(ps) = self
                        .inner
                        .net
                        .get_providers(keys[i].as_bytes().to_vec())
                        .await
                    {
                        for lp in ps {
                            if let Ok(p) = PeerId::from_bytes(&lp.to_bytes()) {
                                if !o[..o.len().min(max_rounds)].contains(&p) {
                                    ask.entry(p).or_default().push(i);
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            if ask.is_empty() {
                continue;
            }
            let futs = ask.into_iter().map(|(peer, idx)| {
                let ks: Vec<ObjectKey> = idx.iter().map(|&i| keys[i]).collect();
                async move {
                    let r = match self.link_of(&peer) {
                        Ok(link) => {
                            self.call(
                                &link,
                                &Request::Lease {
                                    keys: ks,
                                    duration_ms: duration.as_millis() as u64,
                                    release: self.take_pending_release(&peer),
                                },
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    (peer, idx, r)
                }
            });
            for (peer, idx, r) in futures::future::join_all(futs).await {
                if let Ok(Response::Leases(grants)) = r {
                    for (j, g) in idx.iter().zip(grants) {
                        if let Ok(g) = g {
                            out[*j] = Some(Leased {
                                key: keys[*j],
                                holder: peer.clone(),
                                len: g.len,
                                grant: g,
                            });
                        }
                    }
                }
            }
            if out.iter().all(|x| x.is_some()) {
                break;
            }
        }
        out
    }

    /// Reads leased objects into registered regions: `(lease, region,
    /// offset)`; checks every checksum. One engine batch per holder.
    pub async fn read_leased(&self, items: &[(&Leased, &Region, u64)]) -> Vec<Result<()>> {
        let mut by_peer: HashMap<PeerId, Vec<usize>> = HashMap::new();
        for (i, (l, _, _)) in items.iter().enumerate() {
            by_peer.entry(l.holder.clone()).or_default().push(i);
        }
        let mut out: Vec<Result<()>> = (0..items.len()).map(|_| Ok(())).collect();
        let futs = by_peer.into_iter().map(|(peer, idx)| async move {
            let link = match self.link_of(&peer) {
                Ok(l) => l,
                Err(e) => return (idx, Err(e)),
            };
            let ops: Vec<Op> = idx
                .iter()
                .map(|&i| {
                    let (l, r, off) = items[i];
                    Op::read(r.id(), off, link.pool, l.grant.offset, l.len)
                })
                .collect();
            (idx, self.transfer(&ops).await)
        });
        for (idx, r) in futures::future::join_all(futs).await {
            for &i in &idx {
                out[i] = match &r {
                    Err(e) => Err(remote(e.kind(), e.to_string())),
                    Ok(()) => {
                        let (l, region, off) = items[i];
                        // SAFETY: the batch that filled the range completed;
                        // the caller does not write it during the call.
                        match unsafe { region.slice(off, l.len) } {
                            Ok(bytes) if l.grant.checksum.matches(bytes) => Ok(()),
                            Ok(bytes) => {
                                self.inner.metrics.checksum_failures.fetch_add(1, Relaxed);
                                Err(Error::ChecksumMismatch {
                                    expected: l.grant.checksum,
                                    actual: Checksum::compute(bytes),
                                })
                            }
                            Err(e) => Err(Error::InvalidArgument(e.to_string())),
                        }
                    }
                };
            }
        }
        out
    }

    /// Reads one leased object into `region` at `offset` and checks its
    /// checksum, hashing each piece as it lands (in cache, overlapped with
    /// the rest of the transfer; see [`Engine::read_streamed`]).
    async fn read_one(&self, l: &Leased, region: &Region, offset: u64) -> Result<()> {
        let link = self.link_of(&l.holder)?;
        let actual = self
            .read_hashed(Op::read(
                region.id(),
                offset,
                link.pool,
                l.grant.offset,
                l.len,
            ))
            .await?;
        if actual != l.grant.checksum {
            self.inner.metrics.checksum_failures.fetch_add(1, Relaxed);
            return Err(Error::ChecksumMismatch {
                expected: l.grant.checksum,
                actual,
            });
        }
        Ok(())
    }

    /// Runs one READ and returns the checksum of the bytes that landed,
    /// hashed piece by piece as they land ([`Engine::read_streamed`]).
    async fn read_hashed(&self, op: Op) -> Result<Checksum> {
        let mut h = ChecksumHasher::new();
        self.inner
            .engine
            .read_streamed(op, self.inner.cfg.op_timeout, &mut |piece| {
                h.update(piece);
            })
            .await
            .map_err(|e| engine_error("transfer", e))?;
        Ok(h.finalize())
    }

    /// Ends leases (fire and forget: the holder also expires them). Must be
    /// called inside a tokio runtime. The ids ride on the next lease request
    /// to the same holder, or go in one message per holder [`RELEASE_DELAY`]
    /// later: a get then costs one round trip, not two.
    pub fn release(&self, leases: Vec<Leased>) {
        if leases.is_empty() {
            return;
        }
        let schedule = {
            let mut p = self.inner.pending_release.lock();
            for l in leases {
                p.by_peer.entry(l.holder).or_default().push(l.grant.lease);
            }
            !std::mem::replace(&mut p.flush_scheduled, true)
        };
        if schedule {
            let me = self.clone();
            self.spawn(async move {
                tokio::time::sleep(RELEASE_DELAY).await;
                me.flush_releases().await;
            });
        }
    }

    /// Lease ids owed to `peer`, taken to ride on a request to it.
    fn take_pending_release(&self, peer: &PeerId) -> Vec<u64> {
        let mut p = self.inner.pending_release.lock();
        match p.by_peer.get_mut(peer) {
            Some(ids) if ids.len() > rpc::MAX_BATCH_KEYS => {
                let rest = ids.len() - rpc::MAX_BATCH_KEYS;
                ids.split_off(rest)
            }
            Some(_) => p.by_peer.remove(peer).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Sends every pending release now, one message per holder.
    async fn flush_releases(&self) {
        let pending = {
            let mut p = self.inner.pending_release.lock();
            p.flush_scheduled = false;
            std::mem::take(&mut p.by_peer)
        };
        let futs = pending.into_iter().map(|(peer, ids)| async move {
            if let Ok(link) = self.link_of(&peer) {
                for chunk in ids.chunks(rpc::MAX_BATCH_KEYS) {
                    let req = Request::Release {
                        leases: chunk.to_vec(),
                    };
                    let _ = self.call(&link, &req).await;
                }
            }
        });
        futures::future::join_all(futs).await;
    }

    /// Reads `key` into a registered region at `offset` (at most `max_len`
    /// bytes); returns its length. `Ok(None)` if no live holder has it.
    /// Fails over to the next replica when a holder dies mid-read, returns
    /// bad bytes, or finds its stored copy damaged; never leaves bad bytes
    /// reported as good. An error when copies exist but none could be read
    /// intact (a checksum or integrity failure is reported as such).
    pub async fn get_into(
        &self,
        key: ObjectKey,
        region: &Region,
        offset: u64,
        max_len: u64,
    ) -> Result<Option<u64>> {
        Ok(self
            .fetch(key, Dest::Region(region, offset, max_len))
            .await?
            .map(|(len, _)| len))
    }

    /// Reads `key` into a new vector; `Ok(None)` if no live holder has it.
    /// Same fail-over as [`Store::get_into`].
    pub async fn get(&self, key: ObjectKey) -> Result<Option<Vec<u8>>> {
        Ok(self
            .fetch(key, Dest::Vec)
            .await?
            .map(|(_, v)| v.unwrap_or_default()))
    }

    /// The get path: lease on one holder, read, verify, release; on a failed
    /// read the next holder, at most [`MAX_GET_ATTEMPTS`] holders in all.
    async fn fetch(
        &self,
        key: ObjectKey,
        dest: Dest<'_>,
    ) -> Result<Option<(u64, Option<Vec<u8>>)>> {
        let t0 = Instant::now();
        let m = &self.inner.metrics;
        m.gets.fetch_add(1, Relaxed);
        if let Some((len, v, holder)) = self.read_published(&key, dest).await {
            self.inner.loc_cache_insert(key, holder);
            m.hits.fetch_add(1, Relaxed);
            m.local_reads.fetch_add(1, Relaxed);
            m.get_bytes.fetch_add(len, Relaxed);
            m.get_latency.observe(t0.elapsed());
            return Ok(Some((len, v)));
        }
        let mut tried: HashSet<PeerId> = HashSet::new();
        let mut damaged: Option<(PeerId, String)> = None;
        let mut last_err = None;
        for _attempt in 0..MAX_GET_ATTEMPTS {
            let Some(got) = self.lease_for_get(&key, &tried, &mut damaged, dest).await else {
                break;
            };
            let l = match got {
                Got::Lease(l) => l,
                Got::Failed { holder, error } => {
                    tracing::warn!(%key, %holder, "fetch failed, trying another replica: {error}");
                    tried.insert(holder);
                    m.get_failovers.fetch_add(1, Relaxed);
                    self.inner.loc_cache.lock().remove(&key);
                    last_err = Some(error);
                    continue;
                }
                Got::Landed {
                    lease: l,
                    actual,
                    bytes,
                } => {
                    tried.insert(l.holder.clone());
                    self.release(vec![l.clone()]);
                    if actual != l.grant.checksum {
                        m.checksum_failures.fetch_add(1, Relaxed);
                        tracing::warn!(%key, holder = %l.holder, "fetched bytes failed their checksum, trying another replica");
                        m.get_failovers.fetch_add(1, Relaxed);
                        self.inner.loc_cache.lock().remove(&key);
                        last_err = Some(Error::ChecksumMismatch {
                            expected: l.grant.checksum,
                            actual,
                        });
                        continue;
                    }
                    let v = match dest {
                        Dest::Region(..) => None,
                        Dest::Vec => Some(bytes.unwrap_or_default()),
                    };
                    self.inner.loc_cache_insert(key, l.holder);
                    m.hits.fetch_add(1, Relaxed);
                    m.inline_reads.fetch_add(1, Relaxed);
                    m.get_bytes.fetch_add(l.len, Relaxed);
                    m.get_latency.observe(t0.elapsed());
                    return Ok(Some((l.len, v)));
                }
            };
            tried.insert(l.holder.clone());
            let r = match dest {
                Dest::Region(region, off, room) => {
                    if l.len > room {
                        self.release(vec![l.clone()]);
                        return Err(Error::InvalidArgument(format!(
                            "object is {} bytes, buffer has {room}",
                            l.len
                        )));
                    }
                    self.read_one(&l, region, off).await.map(|()| None)
                }
                Dest::Vec => {
                    let staging = match self.staging(l.len) {
                        Ok(s) => s,
                        Err(e) => {
                            self.release(vec![l.clone()]);
                            return Err(e);
                        }
                    };
                    let r = self.read_one(&l, &staging, 0).await.and_then(|()| {
                        let mut v = vec![0u8; l.len as usize];
                        staging
                            .read_at(0, &mut v)
                            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
                        Ok(Some(v))
                    });
                    self.unstage(staging);
                    r
                }
            };
            self.release(vec![l.clone()]);
            match r {
                Ok(v) => {
                    self.inner.loc_cache_insert(key, l.holder.clone());
                    m.hits.fetch_add(1, Relaxed);
                    m.get_bytes.fetch_add(l.len, Relaxed);
                    m.get_latency.observe(t0.elapsed());
                    return Ok(Some((l.len, v)));
                }
                Err(e) => {
                    tracing::warn!(%key, holder = %l.holder, "read failed, trying another replica: {e}");
                    m.get_failovers.fetch_add(1, Relaxed);
                    self.inner.loc_cache.lock().remove(&key);
                    last_err = Some(e);
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        if let Some((holder, message)) = damaged {
            return Err(remote(
                ErrorKind::Integrity,
                format!(
                    "{key}: the copy on {} is corrupt ({message}) and no intact replica was found",
                    peer_id_text(&holder)
                ),
            ));
        }
        m.misses.fetch_add(1, Relaxed);
        Ok(None)
    }

    /// The same-host fast path of a get: reads `key` from the first two
    /// holders in lookup order whose location table this client can map,
    /// with three one-sided `shm` READs and no RPC or lease
    /// ([`crate::shm_index`] says why that is safe). `None` whenever that
    /// does not work out; the lease path then runs and decides.
    async fn read_published(
        &self,
        key: &ObjectKey,
        dest: Dest<'_>,
    ) -> Option<(u64, Option<Vec<u8>>, PeerId)> {
        for peer in self.lookup_order(key).into_iter().take(2) {
            let Some((link, t)) = self.peer_table(&peer).await else {
                continue;
            };
            let scratch = self.staging(shm_index::BUCKET_BYTES as u64 + 8).ok()?;
            let r = self.read_published_at(key, dest, &link, &t, &scratch).await;
            self.unstage(scratch);
            if let Some((len, v)) = r {
                return Some((len, v, peer));
            }
        }
        None
    }

    async fn read_published_at(
        &self,
        key: &ObjectKey,
        dest: Dest<'_>,
        link: &Link,
        t: &PeerTable,
        scratch: &Region,
    ) -> Option<(u64, Option<Vec<u8>>)> {
        let bb = shm_index::BUCKET_BYTES as u64;
        let boff = u64::from(shm_index::bucket_of(key, t.buckets)) * bb;
        self.transfer(&[Op::read(scratch.id(), 0, t.table, boff, bb)])
            .await
            .ok()?;
        let mut bucket = [0u8; shm_index::BUCKET_BYTES];
        scratch.read_at(0, &mut bucket).ok()?;
        let found = shm_index::find(&bucket, boff, key)?;
        let len = found.at.len;
        let (region, off, staged) = match dest {
            Dest::Region(r, off, room) if len <= room => (r.clone(), off, None),
            Dest::Region(..) => return None,
            Dest::Vec => {
                let s = self.staging(len).ok()?;
                (s.clone(), 0, Some(s))
            }
        };
        let ok = async {
            let actual = self
                .read_hashed(Op::read(region.id(), off, link.pool, found.at.offset, len))
                .await
                .ok()?;
            self.transfer(&[Op::read(scratch.id(), bb, t.table, found.slot_offset, 8)])
                .await
                .ok()?;
            let mut seq = [0u8; 8];
            scratch.read_at(bb, &mut seq).ok()?;
            if shm_index::seq_at(&seq)? != found.seq {
                return None;
            }
            if actual != found.at.checksum {
                return None;
            }
            Some(if staged.is_some() {
                // SAFETY: the read that filled the range completed; staging
                // is ours.
                Some(unsafe { region.slice(off, len) }.ok()?.to_vec())
            } else {
                None
            })
        }
        .await;
        if let Some(s) = staged {
            self.unstage(s);
        }
        ok.map(|v| (len, v))
    }

    /// The location table of a same-host holder, asked for once per link.
    async fn peer_table(&self, peer: &PeerId) -> Option<(Link, PeerTable)> {
        let link = self.link_of(peer).ok()?;
        if !link.same_host_shm {
            return None;
        }
        if let Some(t) = self.inner.peer_tables.read().get(peer) {
            return t.clone().map(|t| (link, t));
        }
        let t = match self.call(&link, &Request::LocationTable).await {
            Ok(Response::LocationTable { desc, buckets }) if !desc.is_empty() && buckets > 0 => {
                RegionDesc::from_bytes(&desc)
                    .ok()
                    .filter(|d| {
                        d.peer.engine_id == link.engine_id
                            && d.len >= u64::from(buckets) * shm_index::BUCKET_BYTES as u64
                    })
                    .map(|d| PeerTable {
                        table: self.inner.engine.import(&d),
                        buckets,
                    })
            }
            // A holder without a table (tcp only), or one that does not
            // know the request: the lease path it is, for this link.
            Ok(_)
            | Err(Error::Remote {
                kind: ErrorKind::Invalid,
                ..
            }) => None,
            // Transient (busy, connection trouble): ask again next time.
            Err(_) => return None,
        };
        self.inner
            .peer_tables
            .write()
            .insert(peer.clone(), t.clone());
        t.map(|t| (link, t))
    }

    /// Leases `key` on the first holder that grants it, skipping `skip`: up
    /// to three peers in lookup order, then up to three providers from the
    /// DHT. A holder that reports its copy damaged is remembered in
    /// `damaged`.
    async fn lease_for_get(
        &self,
        key: &ObjectKey,
        skip: &HashSet<PeerId>,
        damaged: &mut Option<(PeerId, String)>,
        dest: Dest<'_>,
    ) -> Option<Got> {
        let mut asked: HashSet<PeerId> = skip.clone();
        let first: Vec<PeerId> = self
            .lookup_order(key)
            .into_iter()
            .filter(|p| !skip.contains(p))
            .take(3)
            .collect();
        for p in first {
            asked.insert(p.clone());
            if let Some(l) = self.lease_at(&p, key, damaged, dest).await {
                return Some(l);
            }
        }
        let more: Vec<PeerId> = self
            .providers_of(key)
            .await
            .into_iter()
            .filter(|p| !asked.contains(p))
            .take(3)
            .collect();
        for p in more {
            if let Some(l) = self.lease_at(&p, key, damaged, dest).await {
                return Some(l);
            }
        }
        None
    }

    /// Asks one holder for `key`: a [`Request::Fetch`] whose bytes land in
    /// `dest` with the reply where that works (links without `shm`, host
    /// destinations), else a [`Request::Lease`].
    async fn lease_at(
        &self,
        peer: &PeerId,
        key: &ObjectKey,
        damaged: &mut Option<(PeerId, String)>,
        dest: Dest<'_>,
    ) -> Option<Got> {
        let link = self.link_of(peer).ok()?;
        let duration_ms = self.inner.cfg.lease.as_millis() as u64;
        let release = self.take_pending_release(peer);
        // Over shm the engine READ is a memcpy out of the holder's mapping:
        // cheaper than bytes through a socket. GPU destinations take the
        // engine's device path.
        let fetch_into = match dest {
            _ if link.same_host_shm => None,
            Dest::Region(r, ..) if matches!(r.kind(), MemoryKind::Gpu { .. }) => None,
            Dest::Region(r, off, room) => Some((Some((r, off)), room)),
            Dest::Vec => Some((None, u64::MAX)),
        };
        let resp = match fetch_into {
            Some((region, room)) => {
                let max_len = room.min(kvmesh_gpu::MAX_BULK_BYTES);
                let req = Request::Fetch {
                    key: *key,
                    duration_ms,
                    release,
                    max_len,
                };
                match self.fetch_call(peer, &link, &req, region, max_len).await {
                    Ok(FetchOutcome::Landed(grant, actual, bytes)) => {
                        return Some(Got::Landed {
                            lease: Leased {
                                key: *key,
                                holder: peer.clone(),
                                len: grant.len,
                                grant,
                            },
                            actual,
                            bytes,
                        })
                    }
                    Ok(FetchOutcome::Broken(error)) => {
                        return Some(Got::Failed {
                            holder: peer.clone(),
                            error,
                        })
                    }
                    Ok(FetchOutcome::Answer(resp)) => Ok(resp),
                    Err(e) => Err(e),
                }
            }
            None => {
                let req = Request::Lease {
                    keys: vec![*key],
                    duration_ms,
                    release,
                };
                self.call(&link, &req).await
            }
        };
        match resp {
            Ok(Response::Leases(mut g)) => match g.pop() {
                Some(Ok(g)) => Some(Got::Lease(Leased {
                    key: *key,
                    holder: peer.clone(),
                    len: g.len,
                    grant: g,
                })),
                Some(Err(ErrorKind::Integrity)) => {
                    *damaged = Some((peer.clone(), "its stored file failed its checks".into()));
                    None
                }
                _ => None,
            },
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%key, peer = %peer, "lease failed: {e}");
                None
            }
        }
    }

    /// Sends a [`Request::Fetch`] and lands the object's bytes in `region`
    /// at its offset (or a new vector), checksummed piece by piece as they
    /// land. `Err` when no answer came.
    async fn fetch_call(
        &self,
        peer: &PeerId,
        link: &Link,
        req: &Request,
        region: Option<(&Region, u64)>,
        max_len: u64,
    ) -> Result<FetchOutcome> {
        let mut head: Option<Response> = None;
        let mut h = ChecksumHasher::new();
        let r = self
            .inner
            .engine
            .call_bulk(
                link.engine_peer,
                rpc::encode(req),
                self.inner.cfg.op_timeout,
                &mut |bytes, len| {
                    head = rpc::decode::<Response>(bytes).ok();
                    let fits = matches!(&head, Some(Response::Fetched { grant })
                        if grant.len == len && len <= max_len);
                    fits.then_some(match region {
                        Some((r, off)) => BulkDest::Region(r, off),
                        None => BulkDest::Vec,
                    })
                },
                &mut |piece| {
                    h.update(piece);
                },
            )
            .await;
        let key = match req {
            Request::Fetch { key, .. } => *key,
            _ => return Err(Error::InvalidArgument("fetch_call needs a fetch".into())),
        };
        let release = |grant: Grant| {
            self.release(vec![Leased {
                key,
                holder: peer.clone(),
                len: grant.len,
                grant,
            }])
        };
        let ans = match r {
            Ok(ans) => ans,
            Err(e) => {
                let e = engine_error("fetch", e);
                if let Some(Response::Fetched { grant }) = head {
                    release(grant);
                    return Ok(FetchOutcome::Broken(e));
                }
                return Err(e);
            }
        };
        let head = match head {
            Some(h) => h,
            None => {
                rpc::decode::<Response>(&ans.head).map_err(|m| remote(ErrorKind::Invalid, m))?
            }
        };
        match head {
            Response::Fetched { grant } if ans.landed || (grant.len == 0 && ans.len == 0) => {
                let bytes = ans.bytes.or_else(|| region.is_none().then(Vec::new));
                Ok(FetchOutcome::Landed(grant, h.finalize(), bytes))
            }
            Response::Fetched { grant } => {
                // The holder could not send its bytes (or sent the wrong
                // number of them).
                release(grant);
                Ok(FetchOutcome::Broken(remote(
                    ErrorKind::Internal,
                    format!(
                        "{} sent {} bytes for a {}-byte object",
                        peer_id_text(peer),
                        ans.len,
                        grant.len
                    ),
                )))
            }
            Response::Error { kind, message } => Err(remote(kind, message)),
            other => Ok(FetchOutcome::Answer(other)),
        }
    }

    /// Reads many objects; one result per key (batched per holder).
    pub async fn get_many(&self, keys: &[ObjectKey]) -> Vec<Result<Option<Vec<u8>>>> {
        let leases = self.lease_many(keys, self.inner.cfg.lease).await;
        let total: u64 = leases.iter().flatten().map(|l| l.len).sum();
        let mut out: Vec<Result<Option<Vec<u8>>>> = (0..keys.len()).map(|_| Ok(None)).collect();
        if total == 0 {
            self.inner
                .metrics
                .misses
                .fetch_add(keys.len() as u64, Relaxed);
            return out;
        }
        let staging = match self.staging(total) {
            Ok(s) => s,
            Err(e) => {
                return keys
                    .iter()
                    .map(|_| Err(Error::InvalidArgument(e.to_string())))
                    .collect()
            }
        };
        let mut offs = Vec::new();
        let mut at = 0;
        for l in leases.iter().flatten() {
            offs.push(at);
            at += l.len;
        }
        let items: Vec<(&Leased, &Region, u64)> = leases
            .iter()
            .flatten()
            .zip(&offs)
            .map(|(l, &o)| (l, &staging, o))
            .collect();
        let results = self.read_leased(&items).await;
        let mut k = 0;
        for (i, l) in leases.iter().enumerate() {
            let Some(l) = l else { continue };
            out[i] = match &results[k] {
                Ok(()) => {
                    let mut v = vec![0u8; l.len as usize];
                    let _ = staging.read_at(offs[k], &mut v);
                    Ok(Some(v))
                }
                // Fail over one by one for the keys whose batch failed.
                Err(_) => {
                    let key = keys[i];
                    Box::pin(self.get(key)).await
                }
            };
            k += 1;
        }
        self.release(leases.into_iter().flatten().collect());
        self.unstage(staging);
        out
    }

    /// How many leading keys of `keys` are stored anywhere (the prefix-cache
    /// question). Asks each HRW holder once for all its keys.
    pub async fn contains_prefix(&self, keys: &[ObjectKey]) -> Result<usize> {
        let found = self.contains_flags(keys).await;
        Ok(found.iter().take_while(|&&f| f).count())
    }

    async fn contains_flags(&self, keys: &[ObjectKey]) -> Vec<bool> {
        let mut found = vec![false; keys.len()];
        let members = self.candidates();
        for round in 0..2 {
            let mut ask: HashMap<PeerId, Vec<usize>> = HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                if found[i] {
                    continue;
                }
                let order = if round == 0 {
                    self.lookup_order(k)
                } else {
                    placement::ranked(k, &members)
                };
                if let Some(p) = order.get(round) {
                    ask.entry(p.clone()).or_default().push(i);
                }
            }
            let futs = ask.into_iter().map(|(peer, idx)| async move {
                let ks: Vec<ObjectKey> = idx.iter().map(|&i| keys[i]).collect();
                let r = match self.link_of(&peer) {
                    Ok(link) => self.call(&link, &Request::Contains { keys: ks }).await,
                    Err(e) => Err(e),
                };
                (idx, r)
            });
            for (idx, r) in futures::future::join_all(futs).await {
                if let Ok(Response::Flags(f)) = r {
                    for (j, x) in idx.iter().zip(f) {
                        found[*j] |= x;
                    }
                }
            }
            if found.iter().all(|&f| f) {
                break;
            }
        }
        // The first key still missing may live off its HRW peers (after
        // membership changes): ask the DHT for that one.
        if let Some(i) = found.iter().position(|&f| !f) {
            if !self.providers_of(&keys[i]).await.is_empty() {
                found[i] = true;
            }
        }
        found
    }

    async fn providers_of(&self, key: &ObjectKey) -> Vec<PeerId> {
        let live: HashSet<PeerId> = self.inner.links.read().keys().cloned().collect();
        self.inner
            .net
            .get_providers(key.as_bytes().to_vec())
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|lp| PeerId::from_bytes(&lp.to_bytes()).ok())
            .filter(|p| live.contains(p))
            .collect()
    }

    /// Live peers that hold `key`.
    pub async fn locate(&self, key: ObjectKey) -> Result<Vec<PeerId>> {
        let mut ask: Vec<PeerId> = self.inner.links.read().keys().cloned().collect();
        ask.sort();
        let futs = ask.into_iter().map(|p| async move {
            let r = match self.link_of(&p) {
                Ok(link) => {
                    self.call(&link, &Request::Contains { keys: vec![key] })
                        .await
                }
                Err(e) => Err(e),
            };
            (
                p,
                matches!(r, Ok(Response::Flags(f)) if f.first() == Some(&true)),
            )
        });
        let mut holders: Vec<PeerId> = futures::future::join_all(futs)
            .await
            .into_iter()
            .filter(|x| x.1)
            .map(|x| x.0)
            .collect();
        holders.sort();
        Ok(holders)
    }

    /// Figures of every live holder, by peer id text.
    pub async fn cluster_stats(&self) -> Vec<(String, Result<rpc::HolderStat>)> {
        let mut peers: Vec<PeerId> = self.inner.links.read().keys().cloned().collect();
        peers.sort();
        let futs = peers.into_iter().map(|p| async move {
            let r = match self.link_of(&p) {
                Ok(link) => match self.call(&link, &Request::Stat).await {
                    Ok(Response::Stat(s)) => Ok(s),
                    Ok(_) => Err(remote(ErrorKind::Invalid, "unexpected reply to stat")),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            (peer_id_text(&p), r)
        });
        futures::future::join_all(futs).await
    }

    /// Removes `key` from every live holder; returns how many had it.
    pub async fn remove(&self, key: ObjectKey) -> Result<usize> {
        let holders = self.locate(key).await?;
        let mut n = 0;
        for p in holders {
            let link = self.link_of(&p)?;
            if self.call(&link, &Request::Remove { key }).await.is_ok() {
                n += 1;
            }
        }
        self.inner.loc_cache.lock().remove(&key);
        Ok(n)
    }

    // ---------------------------------------------------------------- repair

    /// One repair pass: waits `repair_delay` (a flapping peer may come back),
    /// plans against the live members ([`RepairContext`]), and makes the
    /// copies this peer leads, several objects at once. Passes run one at a
    /// time. When copies are still missing afterwards (a copy failed, or too
    /// few peers are live) `repair_pending` stays set and the ticker (or the
    /// next join) runs another pass.
    async fn repair(&self, lost: Vec<PeerId>) {
        if self.inner.holder.is_none() {
            return;
        }
        {
            let mut l = self.inner.repair_lost.lock();
            for p in lost {
                if !l.contains(&p) {
                    l.push(p);
                }
            }
        }
        tokio::time::sleep(self.inner.cfg.repair_delay).await;
        let _one_pass = self.inner.repair_lock.lock().await;
        if self.inner.closed.load(Relaxed) {
            return;
        }
        self.inner.repair_pending.store(false, Relaxed);
        let lost: Vec<PeerId> = self.inner.repair_lost.lock().clone();
        let live = self.candidates();
        let plan = match &self.inner.holder {
            Some(holder) => {
                let h = holder.lock();
                let ctx = RepairContext::new(&self.inner.me, &live, &lost);
                ctx.plan(h.index().iter().map(ReplicaSet::from))
            }
            None => return,
        };
        let mut incomplete = false;
        if !plan.unrepairable.is_empty() {
            incomplete = true;
            tracing::warn!(
                n = plan.unrepairable.len(),
                "objects cannot get their replicas back yet: too few live peers"
            );
        }
        if !plan.tasks.is_empty() {
            tracing::info!(tasks = plan.tasks.len(), ?lost, "repairing");
        }
        let results = futures::stream::iter(plan.tasks)
            .map(|task| async move { self.repair_one(&task).await })
            .buffer_unordered(REPAIR_CONCURRENCY)
            .collect::<Vec<bool>>()
            .await;
        incomplete |= results.iter().any(|ok| !ok);
        self.drain_holder_events();
        if incomplete {
            self.inner.repair_pending.store(true, Relaxed);
        } else {
            self.inner.repair_lost.lock().clear();
        }
    }

    /// Copies one object to a repair task's targets and records the new
    /// holder set everywhere. `false` if a copy is still missing.
    async fn repair_one(&self, task: &RepairTask) -> bool {
        let (Some(holder), Some(pool)) = (&self.inner.holder, &self.inner.pool) else {
            return false;
        };
        let me_owner = self.local_owner();
        let now = Instant::now();
        let (pin, ttl) = match holder.lock().index().get(&task.key) {
            Some(meta) => (
                meta.pin,
                meta.expires_at.map(|at| at.saturating_duration_since(now)),
            ),
            // Gone since the plan (evicted, expired, removed): nothing to do.
            None => return true,
        };
        if ttl.is_some_and(|t| t.is_zero()) {
            return true;
        }
        // Leasing keeps the bytes in place during the copies; an object on
        // SSD only is promoted first.
        let grant = match self.lease_local(now, &me_owner, &task.key, self.inner.cfg.lease) {
            Ok(g) => g,
            Err(ErrorKind::NotFound) => return true,
            Err(kind) => {
                tracing::warn!(key = %task.key, ?kind, "cannot read the local copy to repair it");
                self.inner.metrics.repair_failures.fetch_add(1, Relaxed);
                return false;
            }
        };
        let opts = PutOptions {
            replicas: task.replication,
            pin,
            ttl,
        };
        let deadline = Instant::now() + self.inner.cfg.op_timeout;
        let checksum = PutChecksum::known(grant.checksum);
        let futs = task.targets.iter().map(|t| {
            self.put_one(
                t,
                task.key,
                pool,
                grant.offset,
                grant.len,
                &checksum,
                opts,
                &task.holders,
                deadline,
            )
        });
        let results = futures::future::join_all(futs).await;
        let _ = holder.lock().release(&me_owner, LeaseId(grant.lease));
        let mut holders: Vec<PeerId> = task
            .holders
            .iter()
            .filter(|h| !task.targets.contains(h))
            .cloned()
            .collect();
        let mut ok = true;
        for (t, r) in task.targets.iter().zip(results) {
            match r {
                Ok(()) => holders.push(t.clone()),
                Err(e) => {
                    tracing::warn!(key = %task.key, target = %t, "repair copy failed: {e}");
                    ok = false;
                }
            }
        }
        holders.sort();
        // Every holder, old and new, records where the copies are now (the
        // new ones got the planned list with their commit; it differs when
        // a copy failed).
        let _ = holder
            .lock()
            .set_holders(&task.key, task.replication as u8, holders.clone());
        let others: Vec<PeerId> = holders
            .iter()
            .filter(|h| **h != self.inner.me && (!ok || !task.targets.contains(h)))
            .cloned()
            .collect();
        self.set_holders_on(task.key, task.replication, &others)
            .await;
        if ok {
            self.inner.metrics.repairs.fetch_add(1, Relaxed);
        } else {
            self.inner.metrics.repair_failures.fetch_add(1, Relaxed);
        }
        ok
    }

    /// This peer as the owner of leases it takes on its own holder.
    fn local_owner(&self) -> PeerId {
        PeerId::from_bytes(&self.inner.engine.descriptor().engine_id)
            .expect("an engine id is 16 bytes")
    }
}

impl Inner {
    fn loc_cache_insert(&self, key: ObjectKey, peer: PeerId) {
        let mut c = self.loc_cache.lock();
        if c.len() >= MAX_LOC_CACHE {
            c.clear();
        }
        c.insert(key, peer);
    }
}

/// libp2p events: announces, goodbyes, join requests.
async fn event_loop(store: Store, mut events: mpsc::Receiver<network::Event>) {
    while let Some(ev) = events.recv().await {
        match ev {
            network::Event::Message { from, topic, data } if topic == MEMBERS_TOPIC => {
                store.inner.metrics.announces_received.fetch_add(1, Relaxed);
                match Announce::decode(&data) {
                    Ok(a) => {
                        let src = PeerId::from_bytes(&from.to_bytes());
                        if src.as_ref().ok() != Some(&a.peer) {
                            tracing::warn!(%from, "announce for another peer refused");
                            continue;
                        }
                        store.handle_announce(a);
                    }
                    Err(e) => tracing::debug!(%from, "bad announce: {e}"),
                }
            }
            network::Event::Message { from, topic, data } if topic == LEAVE_TOPIC => {
                store.inner.metrics.announces_received.fetch_add(1, Relaxed);
                match postcard::from_bytes::<Leave>(&data) {
                    Ok(bye) if bye.version == LEAVE_VERSION => {
                        let src = PeerId::from_bytes(&from.to_bytes());
                        if src.as_ref().ok() != Some(&bye.peer) {
                            tracing::warn!(%from, "goodbye for another peer refused");
                            continue;
                        }
                        store.handle_leave(&bye);
                    }
                    Ok(bye) => {
                        tracing::debug!(%from, version = bye.version, "goodbye of another version")
                    }
                    Err(e) => tracing::debug!(%from, "bad goodbye: {e}"),
                }
            }
            network::Event::ListenAddr(a) => {
                let mut l = store.inner.listen.write();
                if !l.contains(&a) {
                    l.push(a);
                }
            }
            network::Event::InboundRequest { peer, data, token } => {
                let resp = match rpc::decode::<NetRequest>(&data) {
                    Ok(NetRequest::Members) => {
                        let m = store.inner.membership.lock();
                        let list = m
                            .live_members()
                            .filter_map(|x| {
                                let mut a = Announce::new(
                                    x.peer.clone(),
                                    x.incarnation,
                                    x.seq,
                                    x.capacity,
                                    x.free,
                                    x.engine_desc.clone(),
                                );
                                a.addrs = x.addrs.clone();
                                a.load = x.load;
                                a.encode().ok()
                            })
                            .collect();
                        NetResponse::Members(list)
                    }
                    Err(e) => {
                        tracing::debug!(%peer, "bad request: {e}");
                        NetResponse::Error(e)
                    }
                };
                let _ = store.inner.net.respond(token, rpc::encode(&resp)).await;
            }
            _ => {}
        }
    }
}

/// Periodic work: announce, liveness, holder timeouts, repair retries.
async fn ticker(store: Store) {
    let tick = (store.inner.cfg.announce_interval / 2)
        .clamp(Duration::from_millis(20), Duration::from_millis(250));
    let repair_retry = (store.inner.cfg.repair_delay * 4).max(Duration::from_secs(1));
    let interval = store.inner.cfg.announce_interval;
    // A new peer announces at once, then 250 ms, 500 ms, 1 s, ... apart up
    // to `announce_interval`, so the others learn of it within about a
    // second of the gossip mesh forming even with a long interval. A
    // publish that finds no subscriber yet is retried at the next tick.
    let mut ramp = Duration::from_millis(250).min(interval);
    let mut next_announce = Instant::now();
    let mut next_repair = Instant::now() + repair_retry;
    // Placement changes with membership and with the holders' quantised
    // free memory; copies it no longer finds get provider records, in one
    // pass at most every PROVIDE_PASS_EVERY.
    let mut placed_generation = store.inner.membership.lock().generation();
    let mut next_provide_pass = Instant::now();
    loop {
        let now = Instant::now();
        if store.is_holder() && now >= next_provide_pass {
            let g = store.inner.membership.lock().generation();
            if g != placed_generation {
                placed_generation = g;
                next_provide_pass = now + PROVIDE_PASS_EVERY;
                let _ = store.inner.maint.send(Maint::ProvideDisplaced);
            }
        }
        if store.is_holder() && now >= next_announce {
            let a = store.announce();
            let mut sent = false;
            if let Ok(bytes) = a.encode() {
                store.handle_announce(a);
                sent = store.inner.net.publish(MEMBERS_TOPIC, bytes).await.is_ok();
            }
            if sent {
                store.inner.metrics.announces_sent.fetch_add(1, Relaxed);
                next_announce = now + ramp;
                ramp = (ramp * 2).min(interval);
            } else {
                next_announce = now + tick;
            }
        }
        if now >= next_repair {
            if store.inner.repair_pending.swap(false, Relaxed) {
                let _ = store.inner.maint.send(Maint::Repair(Vec::new()));
            }
            next_repair = now + repair_retry;
        }
        let dead = store.inner.membership.lock().poll_dead(Instant::now());
        for ev in dead {
            store.on_membership(ev, None);
        }
        if let Some(h) = &store.inner.holder {
            let s = {
                let mut h = h.lock();
                h.handle_timeout(Instant::now());
                h.index().stats()
            };
            store.drain_holder_events();
            store.inner.metrics.objects.store(s.objects, Relaxed);
            store
                .inner
                .metrics
                .bytes_stored
                .store(s.resident_bytes, Relaxed);
        }
        tokio::time::sleep(tick).await;
    }
}

/// Writes a spilling object's pool bytes to the SSD tier, on a blocking
/// thread. The SSD lock is taken and released there, never while the holder
/// lock is held (the lock order is holder, then SSD).
async fn spill(
    store: &Store,
    key: ObjectKey,
    location: crate::pool::Allocation,
    checksum: Checksum,
) -> bool {
    let s = store.clone();
    let written = tokio::task::spawn_blocking(move || {
        let (Some(ssd), Some(pool)) = (&s.inner.ssd, &s.inner.pool) else {
            return Err("no SSD tier".to_string());
        };
        // SAFETY: the holder keeps a spilling object's pool bytes allocated
        // and unchanged until complete_spill, which runs after this returns.
        let bytes =
            unsafe { pool.slice(location.offset, location.len) }.map_err(|e| e.to_string())?;
        let r = ssd.lock().write(key, checksum, bytes);
        r.map_err(|e| e.to_string())
    })
    .await;
    match written {
        Ok(Ok(dropped)) => {
            if let Some(h) = &store.inner.holder {
                let mut h = h.lock();
                for k in dropped {
                    h.forget_ssd(&k);
                }
            }
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(%key, "spill failed: {e}");
            false
        }
        Err(e) => {
            tracing::warn!(%key, "spill task failed: {e}");
            false
        }
    }
}

/// Holder side effects: SSD spills, provider records, repair.
async fn maintenance(store: Store, mut rx: mpsc::UnboundedReceiver<Maint>) {
    while let Some(m) = rx.recv().await {
        match m {
            Maint::ProvideDisplaced => {
                let keys: Vec<ObjectKey> = match &store.inner.holder {
                    Some(h) => h.lock().index().iter().map(|m| m.key).collect(),
                    None => Vec::new(),
                };
                for key in keys {
                    if store.displaced(&key) {
                        let _ = store
                            .inner
                            .net
                            .start_providing(key.as_bytes().to_vec())
                            .await;
                    }
                }
            }
            Maint::Provide(key) => {
                let _ = store
                    .inner
                    .net
                    .start_providing(key.as_bytes().to_vec())
                    .await;
            }
            Maint::Repair(lost) => {
                let s = store.clone();
                store.spawn(async move { s.repair(lost).await });
            }
            Maint::Holder(ev) => match ev {
                HolderEvent::Spill {
                    key,
                    location,
                    checksum,
                } => {
                    let ok = spill(&store, key, location, checksum).await;
                    if ok {
                        store.inner.metrics.spills.fetch_add(1, Relaxed);
                    }
                    if let Some(h) = &store.inner.holder {
                        h.lock().complete_spill(&key, ok);
                    }
                    store.drain_holder_events();
                }
                HolderEvent::Removed(r) => {
                    if matches!(
                        r.reason,
                        RemovalReason::Evicted | RemovalReason::SpillFailed
                    ) {
                        store.inner.metrics.evictions.fetch_add(1, Relaxed);
                    }
                    if r.on_ssd {
                        if let Some(ssd) = &store.inner.ssd {
                            let _ = ssd.lock().remove(&r.key);
                        }
                    }
                    let _ = store
                        .inner
                        .net
                        .stop_providing(r.key.as_bytes().to_vec())
                        .await;
                }
                HolderEvent::Demoted { .. } => {
                    store.inner.metrics.evictions.fetch_add(1, Relaxed);
                }
                HolderEvent::ReservationExpired { .. } | HolderEvent::LeaseExpired { .. } => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    //! The get path's fail-over, driven deterministically: one holder's
    //! copy is made unreadable (bytes damaged in DRAM, or its pool region
    //! gone from the data plane) while its lease RPCs still succeed.

    use super::*;
    use kvmesh_gpu::TransportKind;

    fn config(mem: u64, bootstrap: Vec<Multiaddr>) -> StoreConfig {
        StoreConfig {
            bootstrap,
            mem_bytes: mem,
            engine: EngineConfig {
                transport: TransportKind::Tcp,
                io_threads: 1,
                shm_threads: 1,
                ..EngineConfig::default()
            },
            op_timeout: Duration::from_secs(5),
            ..StoreConfig::default()
        }
    }

    /// Two holders with one object on both, and a client that asks `first`
    /// for it first. Returns (client, first, second, key, bytes).
    async fn two_copies() -> (Store, Store, Store, ObjectKey, Vec<u8>) {
        let a = Store::start(config(16 << 20, Vec::new())).await.unwrap();
        let boot = a.listen_addrs().await[0]
            .clone()
            .with(libp2p::multiaddr::Protocol::P2p(
                a.inner.net.local_peer_id(),
            ));
        let b = Store::start(config(16 << 20, vec![boot.clone()]))
            .await
            .unwrap();
        let c = Store::start(config(0, vec![boot])).await.unwrap();
        c.wait_for_members(2, Duration::from_secs(10))
            .await
            .unwrap();
        let key = ObjectKey::for_content(b"fail-over");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let opts = PutOptions {
            replicas: 2,
            ..PutOptions::default()
        };
        c.put(key, &data, opts).await.unwrap();
        let first = c.inner.loc_cache.lock().get(&key).cloned().unwrap();
        let (first, second) = if first == *a.peer_id() {
            (a, b)
        } else {
            (b, a)
        };
        (c, first, second, key, data)
    }

    fn location(s: &Store, key: &ObjectKey) -> crate::pool::Allocation {
        let h = s.inner.holder.as_ref().unwrap().lock();
        h.index().get(key).unwrap().location.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn get_fails_over_when_a_copy_has_bad_bytes() {
        let (c, first, second, key, data) = two_copies().await;
        // Damage the first holder's DRAM copy behind the holder's back.
        let loc = location(&first, &key);
        let pool = first.inner.pool.as_ref().unwrap();
        pool.write_at(loc.offset + 1000, &[0xAA; 16]).unwrap();
        assert_eq!(c.get(key).await.unwrap(), Some(data.clone()));
        let m = c.metrics();
        assert_eq!(m.checksum_failures.load(Relaxed), 1);
        assert_eq!(m.get_failovers.load(Relaxed), 1);
        // The good copy is remembered for the next get.
        assert_eq!(c.inner.loc_cache.lock().get(&key), Some(second.peer_id()));
        // With both copies damaged, the get reports it and returns nothing.
        let loc = location(&second, &key);
        let pool = second.inner.pool.as_ref().unwrap();
        pool.write_at(loc.offset + 7, &[0x55; 3]).unwrap();
        let err = c.get(key).await.unwrap_err();
        assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
        for s in [&c, &first, &second] {
            s.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn get_fails_over_when_a_holder_cannot_serve_the_read() {
        let (c, first, second, key, data) = two_copies().await;
        // The first holder still grants leases, but its pool is gone from
        // the data plane, as when it dies between lease and read.
        let pool = first.inner.pool.as_ref().unwrap();
        first
            .inner
            .engine
            .deregister(pool, Duration::from_secs(1))
            .unwrap();
        let region = c.engine().alloc(1 << 20, MemoryKind::Host).unwrap();
        let got = c.get_into(key, &region, 4096, 1 << 19).await.unwrap();
        assert_eq!(got, Some(data.len() as u64));
        let mut back = vec![0u8; data.len()];
        region.read_at(4096, &mut back).unwrap();
        assert!(back == data);
        assert_eq!(c.metrics().get_failovers.load(Relaxed), 1);
        // The failed holder's lease is released, the good one's too.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(first.stats().leases, 0);
        assert_eq!(second.stats().leases, 0);
        // Too small a buffer is refused, not truncated.
        let err = c.get_into(key, &region, 0, 1000).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        for s in [&c, &first, &second] {
            s.shutdown().await;
        }
    }
}
