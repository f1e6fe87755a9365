//! The engine's side of the `rdma` transport: opens [`RdmaTransport`] for
//! the engine, registers its regions with the NICs, connects queue pairs to
//! peers over the engine control channel, hands batches to the NICs and
//! runs the progress thread that turns completions into batch results.
//!
//! One RDMA connection per pair of engines, whichever side needs it first.
//! The engine with the smaller engine id always drives the handshake, so the
//! two sides never prepare queue pairs for each other at the same time:
//!
//! ```text
//!  smaller id (drives)                          larger id
//!  prepare(peer, its desc, initiator) -> info
//!  Control::Connect{our desc, gen, info} ─────► prepare(peer, desc, responder)
//!                                               complete(peer, info); up
//!  complete(peer, its info); up   ◄──────────── ControlReply::Connected(its info)
//!
//!  (larger id needs a connection)
//!  handles Control::Connect as above  ◄──────── Control::Reconnect{its desc, failed gen}
//!  ControlReply::Done ────────────────────────► up (set by the Connect it served)
//! ```
//!
//! Control messages travel on `OP_CONTROL` of a tcp lane to the peer (the
//! same channel as RPC calls), so they are authenticated by the data-plane
//! handshake. A `Connect` carries the sender's [`PeerDesc`]: the receiver
//! needs it to answer (notification credits) and to reach the sender.
//!
//! Data path: one engine slice per operation; the slices go BUSY before
//! [`RdmaTransport::submit`] and are completed from
//! [`RdmaEvent::BatchDone`] by the progress thread. Cancel and deadlines
//! reach the NIC through the batch's abort hook ([`RdmaTransport::abort`]).
//! Incoming notifications go to the engine's notification queue and the
//! consumed count is relayed to the sender as a `Credit`. A failed peer is
//! reconnected at once and again by the next batch that needs it.
//!
//! Nothing here has run on RDMA hardware (see `gpu/RDMA.md`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::batch::{BatchState, Op, OpKind, BUSY, PENDING};
use crate::desc::{EngineId, PeerDesc};
use crate::engine::{EngineConfig, Notification, Shared, TransportKind};
use crate::error::{Error, ErrorKind, Result};
use crate::memory::{MemoryKind, NicRegistration, RegionInner};
use crate::rdma::{
    self, BatchOutcome, BatchTag, ConnectInfo, GpuMemory, RdmaConfig, RdmaError, RdmaEvent, RdmaOp,
    RdmaOpKind, RdmaPeerDesc, RdmaRegion, RdmaTransport, ReconnectDecision,
};
use crate::rdma_wire::RdmaRegionDesc;
use crate::tcp::{Lane, LaneJob};

/// Control messages between two engines (`OP_CONTROL` payloads, postcard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Control {
    /// From the engine with the smaller id: connect our queue pairs.
    Connect {
        desc: PeerDesc,
        generation: u64,
        info: ConnectInfo,
    },
    /// From the engine with the larger id: connect (again); it has no
    /// healthy connection newer than generation `failed`.
    Reconnect { desc: PeerDesc, failed: u64 },
    /// The sender consumed this many of the receiver's notifications.
    Credit { consumed: u32 },
}

/// Answers to [`Control`] messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ControlReply {
    Connected(ConnectInfo),
    Done,
}

/// Whether the engine `me` drives the handshake with `them`.
pub(crate) fn drives(me: &EngineId, them: &EngineId) -> bool {
    me < them
}

/// Connection state of one peer as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ConnState {
    /// Handshake generation (set by the driver, counts from 1).
    pub(crate) generation: u64,
    /// Connected and no queue pair failed since.
    pub(crate) up: bool,
}

impl ConnState {
    /// The driver got `Reconnect{failed}`: must it connect again? Yes unless
    /// it holds a healthy connection newer than the one the peer saw fail.
    pub(crate) fn must_reconnect(self, failed: u64) -> bool {
        !self.up || self.generation <= failed
    }
}

/// Per-op results of a finished RDMA batch: `Ok` where all `lens[i]` bytes
/// moved, else the op's error (or the abort kind).
pub(crate) fn op_results(outcome: &BatchOutcome, lens: &[u64]) -> Vec<Result<(), ErrorKind>> {
    lens.iter()
        .enumerate()
        .map(|(i, &len)| match outcome.ops.get(i) {
            Some(o) if o.error.is_none() && o.bytes == len => Ok(()),
            Some(o) => Err(o.error.or(outcome.aborted).unwrap_or(ErrorKind::Io)),
            None => Err(ErrorKind::Protocol),
        })
        .collect()
}

/// How long the progress thread pauses after `idle` rounds without events:
/// spin first (completions of a busy link come within microseconds), then
/// back off to at most 1 ms.
pub(crate) fn idle_pause(idle: u32) -> Duration {
    match idle {
        0..=63 => Duration::ZERO,
        64..=255 => Duration::from_micros(10),
        256..=1023 => Duration::from_micros(100),
        _ => Duration::from_millis(1),
    }
}

/// Builds the RDMA operation of `op` from the local region's registration
/// and the peer's region keys; `None` when the local region has none.
pub(crate) fn rdma_op(op: &Op, local: &RegionInner, remote: &RdmaRegionDesc) -> Option<RdmaOp> {
    let kind = match op.kind {
        OpKind::Read => RdmaOpKind::Read,
        OpKind::Write => RdmaOpKind::Write,
    };
    local
        .with_nic(|n| {
            n.handle
                .downcast_ref::<RdmaRegion>()
                .map(|r| rdma::rdma_op(kind, r, op.local_offset, remote, op.remote_offset, op.len))
        })
        .flatten()
}

/// What the engine hands over for one peer of a batch.
pub(crate) struct RdmaWork {
    /// The engine slice of each op (one per op).
    pub(crate) slices: Vec<usize>,
    pub(crate) ops: Vec<RdmaOp>,
    /// Carried after the data (WRITE_WITH_IMM).
    pub(crate) notify: Option<Vec<u8>>,
}

struct LinkPeer {
    /// The peer's id inside [`RdmaTransport`].
    key: u64,
    desc: Mutex<PeerDesc>,
    conn: Mutex<ConnState>,
    /// Held while this side runs a handshake with the peer.
    connecting: tokio::sync::Mutex<()>,
    /// Control lane to the peer.
    lane: Mutex<Option<Arc<Lane>>>,
}

impl LinkPeer {
    fn is_up(&self) -> bool {
        self.conn.lock().up
    }

    fn lane(&self, sh: &Arc<Shared>) -> Arc<Lane> {
        let mut g = self.lane.lock();
        match &*g {
            Some(l) if !l.is_dead() => l.clone(),
            _ => {
                let l = Lane::start(sh, &self.desc.lock());
                *g = Some(l.clone());
                l
            }
        }
    }
}

struct InFlight {
    state: Arc<BatchState>,
    slices: Vec<usize>,
    lens: Vec<u64>,
}

/// The engine's RDMA transport and its peers.
pub(crate) struct RdmaLink {
    transport: RdmaTransport,
    notify_slot_bytes: usize,
    peers: Mutex<HashMap<EngineId, Arc<LinkPeer>>>,
    by_key: Mutex<HashMap<u64, EngineId>>,
    next_key: AtomicU64,
    next_tag: AtomicU64,
    batches: Mutex<HashMap<BatchTag, InFlight>>,
    stop: AtomicBool,
}

impl std::fmt::Debug for RdmaLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaLink")
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

impl RdmaLink {
    /// Opens the NICs for an engine. `Ok(None)`: transport `Auto` and no
    /// usable NIC (the engine goes on without RDMA); an explicit `Rdma`
    /// fails instead.
    pub(crate) fn open(cfg: &EngineConfig) -> Result<Option<Arc<RdmaLink>>> {
        let rc = RdmaConfig {
            nics: cfg.rdma.nics.clone(),
            qps_per_nic_pair: cfg.rdma.qps_per_nic_pair,
            max_slice_bytes: cfg.rdma.max_slice_bytes,
            ..RdmaConfig::default()
        };
        let notify_slot_bytes = rc.notify_slot_bytes as usize;
        // Larger on every start of a process: the reconnect rule relies on it.
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        match RdmaTransport::open(rc, incarnation) {
            Ok(transport) => {
                tracing::info!(?transport, "RDMA transport up");
                Ok(Some(Arc::new(RdmaLink {
                    transport,
                    notify_slot_bytes,
                    peers: Mutex::new(HashMap::new()),
                    by_key: Mutex::new(HashMap::new()),
                    next_key: AtomicU64::new(1),
                    next_tag: AtomicU64::new(1),
                    batches: Mutex::new(HashMap::new()),
                    stop: AtomicBool::new(false),
                })))
            }
            Err(e) if cfg.transport == TransportKind::Rdma => {
                Err(Error::Unsupported(format!("transport rdma: {e}")))
            }
            Err(e @ RdmaError::NoDevices { .. }) => {
                tracing::debug!("going without RDMA: {e}");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!("going without RDMA: {e}");
                Ok(None)
            }
        }
    }

    /// The RDMA part of the engine's descriptor.
    pub(crate) fn local_desc(&self) -> RdmaPeerDesc {
        self.transport.local_desc()
    }

    /// Whether a notification of `len` bytes fits the data path's slots.
    pub(crate) fn carries_notification(&self, len: usize) -> bool {
        len <= self.notify_slot_bytes
    }

    /// Registers a region with every NIC (before it is shared). A region
    /// that cannot be registered stays reachable over the other transports.
    pub(crate) fn register(&self, inner: &mut RegionInner) {
        let (addr, len) = (inner.ptr() as u64, inner.len);
        let r = match inner.kind {
            // SAFETY: the region's memory stays mapped until `RegionInner`
            // drops, and its `Drop` (or `release_nic` at deregistration,
            // after in-flight operations drained) drops this registration
            // first; peers may access it while registered, which is the
            // engine's one-sided contract.
            MemoryKind::Host | MemoryKind::HostPinned | MemoryKind::Shm => unsafe {
                self.transport.register_host(addr, len)
            },
            // SAFETY: as above for the device allocation. The cuda module
            // offers no dma-buf export, so only nvidia-peermem can work.
            MemoryKind::Gpu { .. } => unsafe {
                self.transport
                    .register_gpu(addr, len, GpuMemory::PeerMemOnly)
                    .map(|(r, _)| r)
            },
        };
        match r {
            Ok(r) => inner.set_nic(NicRegistration {
                desc: r.desc(),
                handle: Box::new(r),
            }),
            Err(e) => tracing::warn!(
                region = inner.id,
                kind = %inner.kind,
                "not registered with the RDMA NICs (other transports still reach it): {e}"
            ),
        }
    }

    /// The peer record of `desc`'s engine, created on first sight; a newer
    /// descriptor replaces the stored one.
    fn peer_for(&self, desc: &PeerDesc) -> Arc<LinkPeer> {
        let mut peers = self.peers.lock();
        if let Some(p) = peers.get(&desc.engine_id) {
            let mut d = p.desc.lock();
            if *d != *desc {
                *d = desc.clone();
            }
            return p.clone();
        }
        let key = self.next_key.fetch_add(1, SeqCst);
        let p = Arc::new(LinkPeer {
            key,
            desc: Mutex::new(desc.clone()),
            conn: Mutex::new(ConnState::default()),
            connecting: tokio::sync::Mutex::new(()),
            lane: Mutex::new(None),
        });
        peers.insert(desc.engine_id, p.clone());
        self.by_key.lock().insert(key, desc.engine_id);
        p
    }

    fn peer_by_key(&self, key: u64) -> Option<(EngineId, Arc<LinkPeer>)> {
        let id = *self.by_key.lock().get(&key)?;
        let p = self.peers.lock().get(&id)?.clone();
        Some((id, p))
    }

    /// Sends a control message on the peer's control lane; cancel-safe.
    async fn control(
        &self,
        sh: &Arc<Shared>,
        peer: &LinkPeer,
        msg: &Control,
    ) -> std::result::Result<ControlReply, ErrorKind> {
        let data = postcard::to_allocvec(msg).map_err(|_| ErrorKind::Invalid)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        peer.lane(sh)
            .try_send(LaneJob::Control { data, done: tx })
            .map_err(|(k, _)| k)?;
        let limit = sh.cfg.connect_timeout + sh.cfg.handshake_timeout;
        let reply = tokio::time::timeout(limit, rx)
            .await
            .map_err(|_| ErrorKind::Timeout)?
            .unwrap_or(Err(ErrorKind::ConnectionLost))?;
        postcard::from_bytes(&reply).map_err(|_| ErrorKind::Protocol)
    }

    /// Makes sure the queue pairs to `peer` are connected.
    async fn ensure_connected(
        &self,
        sh: &Arc<Shared>,
        peer: &LinkPeer,
    ) -> std::result::Result<(), ErrorKind> {
        let _g = peer.connecting.lock().await;
        if peer.is_up() {
            return Ok(());
        }
        let theirs = peer.desc.lock().clone();
        if drives(&sh.desc.engine_id, &theirs.engine_id) {
            return self.connect_as_driver(sh, peer, &theirs).await;
        }
        let failed = peer.conn.lock().generation;
        let msg = Control::Reconnect {
            desc: (*sh.desc).clone(),
            failed,
        };
        match self.control(sh, peer, &msg).await? {
            ControlReply::Done if peer.is_up() => Ok(()),
            ControlReply::Done => Err(ErrorKind::ConnectionLost),
            ControlReply::Connected(_) => Err(ErrorKind::Protocol),
        }
    }

    async fn connect_as_driver(
        &self,
        sh: &Arc<Shared>,
        peer: &LinkPeer,
        theirs: &PeerDesc,
    ) -> std::result::Result<(), ErrorKind> {
        let rd = theirs.rdma.as_ref().ok_or(ErrorKind::Unreachable)?;
        match self.transport.on_peer_desc(peer.key, rd) {
            ReconnectDecision::IgnoreStale => {
                tracing::warn!(peer = %theirs.short_id(), "stale RDMA descriptor; not connecting");
                return Err(ErrorKind::Protocol);
            }
            d => tracing::debug!(peer = %theirs.short_id(), ?d, "RDMA connect"),
        }
        let info = self
            .transport
            .prepare(peer.key, rd, true)
            .map_err(|e| logged("RDMA prepare", e))?;
        let generation = peer.conn.lock().generation + 1;
        let msg = Control::Connect {
            desc: (*sh.desc).clone(),
            generation,
            info,
        };
        let reply = self.control(sh, peer, &msg).await;
        let done = match reply {
            Ok(ControlReply::Connected(their_info)) => self
                .transport
                .complete(peer.key, &their_info)
                .map_err(|e| logged("RDMA complete", e)),
            Ok(ControlReply::Done) => Err(ErrorKind::Protocol),
            Err(k) => Err(k),
        };
        match done {
            Ok(()) => {
                *peer.conn.lock() = ConnState {
                    generation,
                    up: true,
                };
                Ok(())
            }
            Err(k) => {
                self.transport.disconnect(peer.key);
                peer.conn.lock().up = false;
                Err(k)
            }
        }
    }

    /// Answers a control message from engine `from`: (status, reply).
    pub(crate) async fn answer(
        &self,
        sh: &Arc<Shared>,
        from: EngineId,
        req: &[u8],
    ) -> (u8, Vec<u8>) {
        let reply = match postcard::from_bytes::<Control>(req) {
            Ok(msg) => self.handle(sh, from, msg).await,
            Err(_) => Err(ErrorKind::Protocol),
        };
        match reply {
            Ok(r) => (0, postcard::to_allocvec(&r).unwrap_or_default()),
            Err(k) => (k.code(), Vec::new()),
        }
    }

    async fn handle(
        &self,
        sh: &Arc<Shared>,
        from: EngineId,
        msg: Control,
    ) -> std::result::Result<ControlReply, ErrorKind> {
        let me = sh.desc.engine_id;
        match msg {
            Control::Connect {
                desc,
                generation,
                info,
            } => {
                if desc.engine_id != from || !drives(&from, &me) {
                    return Err(ErrorKind::Protocol);
                }
                let rd = desc.rdma.clone().ok_or(ErrorKind::Protocol)?;
                let peer = self.peer_for(&desc);
                let d = self.transport.on_peer_desc(peer.key, &rd);
                tracing::debug!(peer = %desc.short_id(), ?d, generation, "RDMA connect from peer");
                let mine = self
                    .transport
                    .prepare(peer.key, &rd, false)
                    .map_err(|e| logged("RDMA prepare", e))?;
                if let Err(e) = self.transport.complete(peer.key, &info) {
                    self.transport.disconnect(peer.key);
                    peer.conn.lock().up = false;
                    return Err(logged("RDMA complete", e));
                }
                *peer.conn.lock() = ConnState {
                    generation,
                    up: true,
                };
                Ok(ControlReply::Connected(mine))
            }
            Control::Reconnect { desc, failed } => {
                if desc.engine_id != from || !drives(&me, &from) || desc.rdma.is_none() {
                    return Err(ErrorKind::Protocol);
                }
                let peer = self.peer_for(&desc);
                {
                    let mut c = peer.conn.lock();
                    if c.must_reconnect(failed) {
                        c.up = false;
                    }
                }
                self.ensure_connected(sh, &peer).await?;
                Ok(ControlReply::Done)
            }
            Control::Credit { consumed } => {
                let peer = self.peers.lock().get(&from).cloned();
                let peer = peer.ok_or(ErrorKind::ConnectionLost)?;
                self.transport
                    .on_notify_credit(peer.key, consumed)
                    .map_err(|e| e.kind())?;
                Ok(ControlReply::Done)
            }
        }
    }

    /// Hands one peer's part of a batch to the NICs, connecting first if
    /// needed (on the engine's runtime; `submit` never blocks on it).
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        sh: &Arc<Shared>,
        state: &Arc<BatchState>,
        desc: &PeerDesc,
        work: RdmaWork,
    ) {
        let peer = self.peer_for(desc);
        if peer.is_up() {
            self.start(state, &peer, work);
            return;
        }
        let (me, sh2, st) = (self.clone(), sh.clone(), state.clone());
        sh.rt_handle().spawn(async move {
            match me.ensure_connected(&sh2, &peer).await {
                Ok(()) => me.start(&st, &peer, work),
                Err(k) => {
                    for &i in &work.slices {
                        st.fail(i, k);
                    }
                }
            }
        });
    }

    fn start(self: &Arc<Self>, state: &Arc<BatchState>, peer: &LinkPeer, work: RdmaWork) {
        // Slices aborted meanwhile (cancel, deadline) are not posted.
        let mut slices = Vec::with_capacity(work.slices.len());
        let mut ops = Vec::with_capacity(work.ops.len());
        for (i, op) in work.slices.into_iter().zip(work.ops) {
            if state.advance(i, PENDING, BUSY) {
                slices.push(i);
                ops.push(op);
            }
        }
        if slices.is_empty() {
            return;
        }
        let tag = self.next_tag.fetch_add(1, SeqCst);
        let lens = ops.iter().map(|o| o.len).collect();
        self.batches.lock().insert(
            tag,
            InFlight {
                state: state.clone(),
                slices: slices.clone(),
                lens,
            },
        );
        let weak = Arc::downgrade(self);
        state.on_abort(Box::new(move |k| {
            if let Some(l) = weak.upgrade() {
                l.transport.abort(tag, k);
            }
        }));
        match self.transport.submit(tag, peer.key, ops, work.notify) {
            Ok(()) => {
                // An abort between the hook and the submit found no batch.
                if let Some(k) = state.aborted() {
                    self.transport.abort(tag, k);
                }
            }
            Err(e) => {
                self.batches.lock().remove(&tag);
                if matches!(e, RdmaError::NotConnected(_)) {
                    peer.conn.lock().up = false;
                }
                let k = logged("RDMA submit", e);
                for i in slices {
                    state.fail(i, k);
                }
            }
        }
    }

    /// Stops the progress thread (it exits within one pause).
    pub(crate) fn stop(&self) {
        self.stop.store(true, SeqCst);
    }

    /// Starts the thread that polls the completion queues.
    pub(crate) fn spawn_progress(
        self: &Arc<Self>,
        sh: Weak<Shared>,
    ) -> Result<std::thread::JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("kvmesh-rdma".into())
            .spawn(move || me.progress_loop(sh))
            .map_err(|e| Error::io("starting the RDMA progress thread", e))
    }

    fn progress_loop(&self, sh: Weak<Shared>) {
        let mut idle = 0u32;
        while !self.stop.load(SeqCst) {
            let events = match self.transport.progress() {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!("RDMA progress: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if events.is_empty() {
                idle = idle.saturating_add(1);
                match idle_pause(idle) {
                    Duration::ZERO => std::hint::spin_loop(),
                    d => std::thread::sleep(d),
                }
                continue;
            }
            idle = 0;
            let Some(sh) = sh.upgrade() else {
                return;
            };
            self.on_events(&sh, events);
        }
    }

    fn on_events(&self, sh: &Arc<Shared>, events: Vec<RdmaEvent>) {
        let mut credit_to = HashSet::new();
        for ev in events {
            match ev {
                RdmaEvent::BatchDone(outcome) => {
                    let Some(b) = self.batches.lock().remove(&outcome.tag) else {
                        continue;
                    };
                    if let Some(k) = outcome.notify_error {
                        b.state.set_notify_error(k);
                    }
                    for (r, &i) in op_results(&outcome, &b.lens).into_iter().zip(&b.slices) {
                        match r {
                            Ok(()) => {
                                b.state.complete(i, BUSY);
                            }
                            Err(k) => b.state.fail(i, k),
                        }
                    }
                }
                RdmaEvent::Notification { peer, payload, .. } => {
                    let Some((from, _)) = self.peer_by_key(peer) else {
                        tracing::debug!(peer, "notification from an unknown RDMA peer");
                        continue;
                    };
                    self.deliver(
                        sh,
                        Notification {
                            from,
                            data: payload,
                        },
                    );
                    credit_to.insert(peer);
                }
                RdmaEvent::PeerFailed { peer, kind } => {
                    let Some((_, p)) = self.peer_by_key(peer) else {
                        continue;
                    };
                    tracing::warn!(peer = %p.desc.lock().short_id(), "RDMA connection failed ({kind}); reconnecting");
                    p.conn.lock().up = false;
                    let (link, sh2) = (sh.rdma.clone(), sh.clone());
                    if let Some(link) = link {
                        sh.rt_handle().spawn(async move {
                            if let Err(k) = link.ensure_connected(&sh2, &p).await {
                                tracing::info!(
                                    "RDMA reconnect failed ({k}); the next batch retries"
                                );
                            }
                        });
                    }
                }
            }
        }
        for key in credit_to {
            let (Some(consumed), Some((_, p))) =
                (self.transport.notify_credit(key), self.peer_by_key(key))
            else {
                continue;
            };
            let Some(link) = sh.rdma.clone() else {
                continue;
            };
            let sh2 = sh.clone();
            sh.rt_handle().spawn(async move {
                if let Err(k) = link.control(&sh2, &p, &Control::Credit { consumed }).await {
                    tracing::debug!("relaying RDMA notification credit: {k}");
                }
            });
        }
    }

    /// Queues a notification without blocking the progress thread for
    /// good: while the queue is full it retries until the engine stops.
    fn deliver(&self, sh: &Shared, mut n: Notification) {
        loop {
            match sh.notify_tx.try_send(n) {
                Ok(()) => break,
                Err(tokio::sync::mpsc::error::TrySendError::Full(back)) => {
                    if self.stop.load(SeqCst) {
                        return;
                    }
                    n = back;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        let _g = sh.notify_lock.lock();
        sh.notify_cv.notify_all();
    }
}

/// Logs an RDMA error and returns its engine kind.
fn logged(what: &str, e: RdmaError) -> ErrorKind {
    tracing::warn!("{what}: {e}");
    e.kind()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::OpOutcome;
    use crate::rdma_wire::{LinkLayer, Mtu, QpEndpoint, RDMA_DESC_VERSION};

    #[test]
    fn exactly_one_side_drives_the_handshake() {
        let a = [1u8; 16];
        let mut b = [1u8; 16];
        b[15] = 2;
        assert!(drives(&a, &b));
        assert!(!drives(&b, &a));
        assert!(!drives(&a, &a));
    }

    #[test]
    fn the_driver_reconnects_unless_it_holds_a_newer_healthy_connection() {
        let up = |generation| ConnState {
            generation,
            up: true,
        };
        // Never connected: the peer says generation 0 failed.
        assert!(ConnState::default().must_reconnect(0));
        // The peer saw our current connection fail.
        assert!(up(3).must_reconnect(3));
        // We already reconnected (4) after the failure it reports (3).
        assert!(!up(4).must_reconnect(3));
        // We know it is down.
        assert!(ConnState {
            generation: 4,
            up: false
        }
        .must_reconnect(3));
    }

    #[test]
    fn batch_outcomes_map_to_op_results() {
        let outcome = BatchOutcome {
            tag: 1,
            ops: vec![
                OpOutcome {
                    bytes: 100,
                    error: None,
                },
                OpOutcome {
                    bytes: 40,
                    error: Some(ErrorKind::ConnectionLost),
                },
                OpOutcome {
                    bytes: 10,
                    error: None,
                },
            ],
            aborted: None,
            notify_error: None,
        };
        assert_eq!(
            op_results(&outcome, &[100, 100, 20, 5]),
            vec![
                Ok(()),
                Err(ErrorKind::ConnectionLost),
                // Short without an error: never reported as done.
                Err(ErrorKind::Io),
                // Missing from the outcome.
                Err(ErrorKind::Protocol),
            ]
        );
        let aborted = BatchOutcome {
            aborted: Some(ErrorKind::Cancelled),
            ops: vec![OpOutcome {
                bytes: 0,
                error: None,
            }],
            ..outcome
        };
        assert_eq!(op_results(&aborted, &[8]), vec![Err(ErrorKind::Cancelled)]);
    }

    #[test]
    fn the_progress_thread_spins_then_backs_off_to_a_millisecond() {
        assert_eq!(idle_pause(1), Duration::ZERO);
        let mut last = Duration::ZERO;
        for i in 0..5000 {
            let p = idle_pause(i);
            assert!(p >= last, "pause shrank at {i}");
            assert!(p <= Duration::from_millis(1));
            last = p;
        }
        assert_eq!(last, Duration::from_millis(1));
    }

    #[test]
    fn control_messages_round_trip() {
        let desc = PeerDesc {
            engine_id: [4; 16],
            host_id: "h".into(),
            tcp: vec!["127.0.0.1:1".parse().unwrap()],
            shm: None,
            tcp_conns: 1,
            secret: [2; 32],
            rdma: None,
        };
        let info = ConnectInfo {
            version: RDMA_DESC_VERSION,
            incarnation: 9,
            qps: vec![QpEndpoint {
                nic: "mlx5_0".into(),
                port_num: 1,
                link_layer: LinkLayer::Infiniband,
                lid: 7,
                gid: [0; 16],
                qpn: 0x123,
                psn: 0x456,
                mtu: Mtu::M4096,
            }],
            notify_ring: None,
        };
        for m in [
            Control::Connect {
                desc: desc.clone(),
                generation: 2,
                info: info.clone(),
            },
            Control::Reconnect { desc, failed: 1 },
            Control::Credit { consumed: 77 },
        ] {
            let b = postcard::to_allocvec(&m).unwrap();
            assert_eq!(postcard::from_bytes::<Control>(&b).unwrap(), m);
        }
        for r in [ControlReply::Connected(info), ControlReply::Done] {
            let b = postcard::to_allocvec(&r).unwrap();
            assert_eq!(postcard::from_bytes::<ControlReply>(&b).unwrap(), r);
        }
    }
}
