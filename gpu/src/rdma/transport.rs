//! The RDMA executor: owns NICs, memory regions and queue pairs, posts what
//! the planner decided and feeds completions to the tracker.
//!
//! Every decision is made by the pure modules ([`super::plan`],
//! [`super::completion`], [`super::qp`], [`super::endpoint`],
//! [`super::notify`], [`gpu_registration_order`]); this file only sequences
//! verbs calls around them. All state sits behind one mutex: verbs calls
//! made under it never block (posting and polling are non-blocking).
//!
//! Connection flow per peer (both sides run it, one as initiator):
//!
//! ```text
//!  local_desc() ──(engine peer descriptor)──► peer
//!  prepare(peer, its RdmaPeerDesc) -> ConnectInfo ──(handshake)──► peer
//!  complete(peer, its ConnectInfo)            QPs INIT → RTR → RTS
//!  submit(tag, peer, ops, notify) ... progress() -> events
//!  on_peer_desc(peer, newer desc) -> Reconnect: queue pairs torn down
//! ```

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::ErrorKind;

use super::completion::{BatchOutcome, BatchTag, CompletionTracker, TrackerEvent};
use super::device::{discover, select_paths, GidPolicy, LocalPath};
use super::endpoint::{
    pair_nics, reconnect_decision, ConnectInfo, ConnectedPeer, NicDesc, QpEndpoint, RdmaPeerDesc,
    ReconnectDecision, RDMA_DESC_VERSION,
};
use super::error::{RdmaError, Result};
use super::notify::{NotifyReceiver, NotifyRingDesc, NotifySender, RECV_WR_FLAG};
use super::plan::{assign_slices, cut_slices, Extent, Lane, RdmaOp, RdmaOpKind, Slice};
use super::qp::{
    access, connect_sequence, init_attrs, psn_from_random, state_only_attrs, QpConfig, QpState,
    QpStateMachine,
};
pub use crate::rdma_wire::RdmaRegionDesc;

use super::verbs::{
    CompletionQueue, Context, MemoryRegion, ProtectionDomain, QpCaps, QueuePair, SendOp,
    SendRequest,
};

/// Configuration of the RDMA transport.
#[derive(Debug, Clone)]
pub struct RdmaConfig {
    /// NIC names to use; empty = every NIC with an active port.
    pub nics: Vec<String>,
    /// Source GID choice.
    pub gid_policy: GidPolicy,
    /// Queue pairs per (local NIC, remote NIC) pair.
    pub qps_per_nic_pair: usize,
    /// Send-queue depth per QP (clamped to the NIC maximum).
    pub send_queue_depth: u32,
    /// Completion-queue entries per NIC; bounds the QPs a NIC can hold.
    pub cq_depth: u32,
    /// Largest work request.
    pub max_slice_bytes: u64,
    /// Signal every Nth request of a lane (plus the last).
    pub signal_every: u32,
    /// Queue-pair tunables.
    pub qp: QpConfig,
    /// Notification ring slots per peer.
    pub notify_slots: u32,
    /// Largest notification payload.
    pub notify_slot_bytes: u32,
    /// Completions polled per CQ per [`RdmaTransport::progress`] call.
    pub poll_batch: usize,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            nics: Vec::new(),
            gid_policy: GidPolicy::default(),
            qps_per_nic_pair: 2,
            send_queue_depth: 256,
            cq_depth: 16384,
            max_slice_bytes: 1 << 20,
            signal_every: 16,
            qp: QpConfig::default(),
            notify_slots: 64,
            notify_slot_bytes: 4096,
            poll_batch: 64,
        }
    }
}

/// Where memory to register comes from.
#[derive(Debug)]
pub enum GpuMemory<'a> {
    /// A dma-buf of the GPU allocation (from `cuMemGetHandleForAddressRange`)
    /// with the offset of the range inside it.
    DmaBuf {
        /// The dma-buf fd (borrowed; the MR keeps its own reference).
        fd: BorrowedFd<'a>,
        /// Offset of `va` inside the dma-buf.
        offset: u64,
    },
    /// No dma-buf: only the nvidia-peermem path is possible.
    PeerMemOnly,
}

/// How GPU memory ended up registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuRegPath {
    /// `ibv_reg_dmabuf_mr`.
    DmaBuf,
    /// `ibv_reg_mr` on the device pointer (nvidia-peermem).
    PeerMem,
}

/// The order in which GPU registration paths are tried.
pub fn gpu_registration_order(has_dmabuf: bool) -> &'static [GpuRegPath] {
    if has_dmabuf {
        &[GpuRegPath::DmaBuf, GpuRegPath::PeerMem]
    } else {
        &[GpuRegPath::PeerMem]
    }
}

/// Whether a failed dma-buf registration (errno) should fall back to
/// nvidia-peermem: the kernel or NIC lacks dma-buf support. Other errors
/// (out of memory, bad fd) would fail the same way again.
pub fn dmabuf_failure_allows_fallback(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::EOPNOTSUPP)
            | Some(libc::ENOSYS)
            | Some(libc::EINVAL)
            | Some(libc::EPROTONOSUPPORT)
    )
}

/// Remote access flags of every region this transport registers.
const REGION_ACCESS: u32 =
    access::LOCAL_WRITE | access::REMOTE_READ | access::REMOTE_WRITE | access::RELAXED_ORDERING;

/// Memory registered on every NIC of the transport.
#[derive(Debug)]
pub struct RdmaRegion {
    base: u64,
    len: u64,
    mrs: Vec<MemoryRegion>,
}

impl RdmaRegion {
    /// The descriptor peers need.
    pub fn desc(&self) -> RdmaRegionDesc {
        RdmaRegionDesc {
            addr: self.base,
            len: self.len,
            rkeys: self.mrs.iter().map(MemoryRegion::rkey).collect(),
        }
    }

    /// lkeys per local NIC, as [`RdmaOp::lkeys`] wants them.
    pub fn lkeys(&self) -> Vec<Option<u32>> {
        self.mrs.iter().map(|m| Some(m.lkey())).collect()
    }

    /// The registered range.
    pub fn extent(&self) -> Extent {
        Extent {
            base: self.base,
            len: self.len,
        }
    }
}

/// Builds one operation of a batch from a local region and a peer's region
/// descriptor.
pub fn rdma_op(
    kind: RdmaOpKind,
    local: &RdmaRegion,
    local_offset: u64,
    remote: &RdmaRegionDesc,
    remote_offset: u64,
    len: u64,
) -> RdmaOp {
    RdmaOp {
        kind,
        local: local.extent(),
        local_offset,
        lkeys: local.lkeys(),
        remote: Extent {
            base: remote.addr,
            len: remote.len,
        },
        remote_offset,
        rkeys: remote.rkeys.iter().map(|&k| Some(k)).collect(),
        len,
    }
}

/// What [`RdmaTransport::progress`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdmaEvent {
    /// A batch finished (every request terminal).
    BatchDone(BatchOutcome),
    /// A peer's notification arrived.
    Notification {
        /// The engine's peer id.
        peer: u64,
        /// Its sequence.
        seq: u32,
        /// The payload.
        payload: Vec<u8>,
    },
    /// A queue pair to the peer failed; reconnect (new descriptor exchange).
    PeerFailed {
        /// The engine's peer id.
        peer: u64,
        /// Why.
        kind: ErrorKind,
    },
}

struct Nic {
    path: LocalPath,
    pd: Arc<ProtectionDomain>,
    cq: Arc<CompletionQueue>,
}

struct PeerQp {
    qp: QueuePair,
    sm: QpStateMachine,
    local_nic: usize,
    remote_nic: usize,
    psn: u32,
    lane: usize,
}

/// Host buffers of one peer's notifications: our receive ring and the
/// staging area our outgoing payloads are written from.
struct NotifyBuffers {
    // Field order is drop order: deregister before freeing. The receive
    // ring's MRs are only held to keep it registered while published.
    _rx_mrs: Vec<MemoryRegion>,
    tx_mrs: Vec<MemoryRegion>,
    rx_ring: Box<[u8]>,
    tx_stage: Box<[u8]>,
}

struct Peer {
    incarnation: u64,
    qps: Vec<PeerQp>,
    connected: bool,
    failed: bool,
    notify_tx: Option<(NotifySender, NotifyRingDesc)>,
    notify_rx: NotifyReceiver,
    cq_need: Vec<u32>,
    // Dropped after `qps` (field order), so MRs outlive the QPs using them.
    buffers: NotifyBuffers,
}

struct BatchCtx {
    peer: u64,
    ops: Vec<RdmaOp>,
    notify: Option<Vec<u8>>,
}

struct State {
    tracker: CompletionTracker,
    peers: HashMap<u64, Peer>,
    lane_owner: HashMap<usize, u64>,
    free_lanes: Vec<usize>,
    batches: HashMap<BatchTag, BatchCtx>,
    qpn_owner: HashMap<(usize, u32), u64>,
    cq_reserved: Vec<u32>,
    events: Vec<RdmaEvent>,
}

/// The RDMA transport of one engine.
pub struct RdmaTransport {
    cfg: RdmaConfig,
    incarnation: u64,
    nics: Vec<Nic>,
    state: Mutex<State>,
    // Contexts outlive everything above (PDs and CQs hold Arcs too).
    _contexts: Vec<Arc<Context>>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("incarnation", &self.incarnation)
            .field(
                "nics",
                &self.nics.iter().map(|n| &n.path.nic).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RdmaTransport {
    /// Discovers NICs, opens them, allocates a PD and a CQ on each.
    /// `incarnation` must change on every process start.
    pub fn open(cfg: RdmaConfig, incarnation: u64) -> Result<RdmaTransport> {
        if cfg.signal_every == 0 || cfg.qps_per_nic_pair == 0 || cfg.notify_slots == 0 {
            return Err(RdmaError::Invalid(
                "signal_every, qps_per_nic_pair and notify_slots must be positive".into(),
            ));
        }
        let infos = discover()?;
        let paths = select_paths(&infos, &cfg.nics, cfg.gid_policy)?;
        let mut nics = Vec::new();
        let mut contexts = Vec::new();
        for path in paths {
            let ctx = Context::open(&path.nic)?;
            let pd = ProtectionDomain::new(&ctx)?;
            let cq = CompletionQueue::new(&ctx, cfg.cq_depth)?;
            contexts.push(ctx);
            nics.push(Nic { path, pd, cq });
        }
        let nic_count = nics.len();
        Ok(RdmaTransport {
            cfg,
            incarnation,
            nics,
            state: Mutex::new(State {
                tracker: CompletionTracker::new(),
                peers: HashMap::new(),
                lane_owner: HashMap::new(),
                free_lanes: Vec::new(),
                batches: HashMap::new(),
                qpn_owner: HashMap::new(),
                cq_reserved: vec![0; nic_count],
                events: Vec::new(),
            }),
            _contexts: contexts,
        })
    }

    /// Send-queue depth of every QP: the configured depth within the
    /// smallest NIC limit.
    fn send_depth(&self) -> u32 {
        let nic_max = self
            .nics
            .iter()
            .map(|n| n.path.max_qp_wr)
            .min()
            .unwrap_or(1);
        self.cfg.send_queue_depth.min(nic_max).max(1)
    }

    /// The RDMA part of our peer descriptor.
    pub fn local_desc(&self) -> RdmaPeerDesc {
        RdmaPeerDesc {
            version: RDMA_DESC_VERSION,
            incarnation: self.incarnation,
            nics: self
                .nics
                .iter()
                .map(|n| NicDesc::from_path(&n.path))
                .collect(),
        }
    }

    /// Registers host memory on every NIC.
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must stay mapped until the region is dropped, and
    /// peers may read and write it at any time while it is registered.
    pub unsafe fn register_host(&self, addr: u64, len: u64) -> Result<RdmaRegion> {
        let mut mrs = Vec::new();
        for n in &self.nics {
            // SAFETY: forwarded from the caller.
            mrs.push(unsafe { MemoryRegion::register(&n.pd, addr, len, REGION_ACCESS) }?);
        }
        Ok(RdmaRegion {
            base: addr,
            len,
            mrs,
        })
    }

    /// Registers GPU memory at virtual address `va` on every NIC: through
    /// the dma-buf when given, falling back to nvidia-peermem (plain
    /// registration of the device pointer) where dma-buf is unsupported.
    ///
    /// # Safety
    ///
    /// The GPU allocation must outlive the region (as for
    /// [`RdmaTransport::register_host`]).
    pub unsafe fn register_gpu(
        &self,
        va: u64,
        len: u64,
        mem: GpuMemory<'_>,
    ) -> Result<(RdmaRegion, GpuRegPath)> {
        let has_fd = matches!(mem, GpuMemory::DmaBuf { .. });
        let mut last = None;
        for &path in gpu_registration_order(has_fd) {
            let attempt: Result<Vec<MemoryRegion>> = self
                .nics
                .iter()
                .map(|n| match (path, &mem) {
                    (GpuRegPath::DmaBuf, GpuMemory::DmaBuf { fd, offset }) => {
                        MemoryRegion::register_dmabuf(&n.pd, *fd, *offset, len, va, REGION_ACCESS)
                    }
                    // SAFETY: forwarded from the caller; with nvidia-peermem
                    // the kernel resolves the device pointer.
                    _ => unsafe { MemoryRegion::register(&n.pd, va, len, REGION_ACCESS) },
                })
                .collect();
            match attempt {
                Ok(mrs) => return Ok((RdmaRegion { base: va, len, mrs }, path)),
                Err(e) => {
                    let errno = match &e {
                        RdmaError::Verbs { source, .. } => source.raw_os_error(),
                        _ => None,
                    };
                    let fallback =
                        path == GpuRegPath::DmaBuf && dmabuf_failure_allows_fallback(errno);
                    tracing::debug!(?path, error = %e, fallback, "GPU memory registration failed");
                    last = Some(e);
                    if !fallback {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| RdmaError::Invalid("no GPU registration path".into())))
    }

    /// Creates the queue pairs for `peer` (RESET → INIT), registers its
    /// notification buffers, and returns what to send it in the handshake.
    /// Replaces an earlier connection to the same peer.
    pub fn prepare(
        &self,
        peer: u64,
        remote: &RdmaPeerDesc,
        initiator: bool,
    ) -> Result<ConnectInfo> {
        if remote.version != RDMA_DESC_VERSION {
            return Err(RdmaError::Endpoint(format!(
                "descriptor version {}",
                remote.version
            )));
        }
        let paths: Vec<LocalPath> = self.nics.iter().map(|n| n.path.clone()).collect();
        let pairs = pair_nics(&paths, &remote.nics, self.cfg.qps_per_nic_pair, initiator)?;
        let mut st = self.state.lock();
        self.teardown_locked(&mut st, peer);

        let slots = self.cfg.notify_slots;
        let ring_bytes = usize::try_from(u64::from(slots) * u64::from(self.cfg.notify_slot_bytes))
            .map_err(|_| RdmaError::Invalid("notification ring too large".into()))?;
        let rx_ring = vec![0u8; ring_bytes].into_boxed_slice();
        let tx_stage = vec![0u8; ring_bytes].into_boxed_slice();
        let mut rx_mrs = Vec::new();
        let mut tx_mrs = Vec::new();
        for n in &self.nics {
            // SAFETY: both boxes live in the Peer next to their MRs and are
            // dropped after them (field order of Peer/NotifyBuffers).
            unsafe {
                rx_mrs.push(MemoryRegion::register(
                    &n.pd,
                    rx_ring.as_ptr() as u64,
                    ring_bytes as u64,
                    REGION_ACCESS,
                )?);
                tx_mrs.push(MemoryRegion::register(
                    &n.pd,
                    tx_stage.as_ptr() as u64,
                    ring_bytes as u64,
                    access::LOCAL_WRITE,
                )?);
            }
        }
        let depth = self.send_depth();
        let cq_need = cq_entries_needed(&pairs, self.nics.len(), depth, slots);
        for (n, extra) in cq_need.iter().enumerate() {
            if st.cq_reserved[n] + extra > self.cfg.cq_depth {
                return Err(RdmaError::Busy(format!(
                    "completion queue of {} cannot take {} more entries",
                    self.nics[n].path.nic, extra
                )));
            }
        }
        let mut qps = Vec::new();
        let mut endpoints = Vec::new();
        for (i, &(l, r)) in pairs.iter().enumerate() {
            let nic = &self.nics[l];
            // Only QP 0 carries notifications, so only it needs receives.
            let recv_depth = if i == 0 { slots } else { 1 };
            let qp = QueuePair::new_rc(
                &nic.pd,
                &nic.cq,
                &nic.cq,
                QpCaps {
                    max_send_wr: depth,
                    max_recv_wr: recv_depth,
                },
            )?;
            let mut sm = QpStateMachine::default();
            let init = init_attrs(&self.cfg.qp, &nic.path);
            sm.check(init.target())?;
            qp.modify(&init)?;
            sm.apply(init.target())?;
            let psn = psn_from_random(rand::random());
            endpoints.push(QpEndpoint {
                nic: nic.path.nic.clone(),
                port_num: nic.path.port_num,
                link_layer: nic.path.link_layer,
                lid: nic.path.lid,
                gid: nic.path.gid,
                qpn: qp.qpn(),
                psn,
                mtu: nic.path.mtu,
            });
            qps.push(PeerQp {
                qp,
                sm,
                local_nic: l,
                remote_nic: r,
                psn,
                lane: usize::MAX,
            });
        }
        let ring = NotifyRingDesc {
            addr: rx_ring.as_ptr() as u64,
            rkeys: rx_mrs.iter().map(MemoryRegion::rkey).collect(),
            slots,
            slot_bytes: self.cfg.notify_slot_bytes,
        };
        for (r, n) in st.cq_reserved.iter_mut().zip(&cq_need) {
            *r += n;
        }
        st.peers.insert(
            peer,
            Peer {
                incarnation: remote.incarnation,
                qps,
                connected: false,
                failed: false,
                notify_tx: None,
                notify_rx: NotifyReceiver::new(slots, self.cfg.notify_slot_bytes, slots),
                cq_need,
                buffers: NotifyBuffers {
                    rx_ring,
                    tx_stage,
                    _rx_mrs: rx_mrs,
                    tx_mrs,
                },
            },
        );
        Ok(ConnectInfo {
            version: RDMA_DESC_VERSION,
            incarnation: self.incarnation,
            qps: endpoints,
            notify_ring: Some(ring),
        })
    }

    /// Connects the queue pairs prepared for `peer` to the endpoints it sent
    /// (INIT → RTR → RTS) and pre-posts notification receives.
    pub fn complete(&self, peer: u64, remote: &ConnectInfo) -> Result<()> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let p = st
            .peers
            .get_mut(&peer)
            .ok_or(RdmaError::NotConnected(peer))?;
        remote.validate(p.qps.len())?;
        if remote.incarnation != p.incarnation {
            return Err(RdmaError::Endpoint(format!(
                "connect info of incarnation {}, descriptor said {}",
                remote.incarnation, p.incarnation
            )));
        }
        let depth = self.send_depth();
        for (q, ep) in p.qps.iter_mut().zip(&remote.qps) {
            let path = &self.nics[q.local_nic].path;
            let seq = connect_sequence(&self.cfg.qp, path, q.psn, ep)?;
            for a in &seq[1..] {
                q.sm.check(a.target())?;
                q.qp.modify(a)?;
                q.sm.apply(a.target())?;
            }
        }
        for q in p.qps.iter_mut() {
            q.lane = match st.free_lanes.pop() {
                Some(l) => {
                    st.tracker.reset_lane(l, depth);
                    l
                }
                None => st.tracker.add_lane(depth),
            };
            st.lane_owner.insert(q.lane, peer);
            st.qpn_owner.insert((q.local_nic, q.qp.qpn()), peer);
        }
        p.notify_tx = remote
            .notify_ring
            .clone()
            .map(|r| (NotifySender::new(r.slots, r.slot_bytes), r));
        let n = p.notify_rx.to_post();
        let ids: Vec<u64> = (0..n).map(|i| RECV_WR_FLAG | u64::from(i)).collect();
        if let Some(q0) = p.qps.first() {
            q0.qp.post_recv_empty(&ids).map_err(|e| e.error)?;
            p.notify_rx.posted(n);
        }
        p.connected = true;
        p.failed = false;
        Ok(())
    }

    /// A (possibly new) descriptor of `peer` arrived: decides whether to
    /// keep, connect or reconnect; on reconnect the queue pairs are torn
    /// down here and the caller runs [`RdmaTransport::prepare`] again.
    pub fn on_peer_desc(&self, peer: u64, desc: &RdmaPeerDesc) -> ReconnectDecision {
        let mut st = self.state.lock();
        let current = st
            .peers
            .get(&peer)
            .filter(|p| p.connected)
            .map(|p| ConnectedPeer {
                incarnation: p.incarnation,
                any_qp_failed: p.failed,
            });
        let d = reconnect_decision(current, desc.incarnation);
        if let ReconnectDecision::Reconnect(_) = d {
            self.teardown_locked(&mut st, peer);
        }
        d
    }

    /// Drops every queue pair to `peer`; its in-flight work fails with
    /// `ConnectionLost`.
    pub fn disconnect(&self, peer: u64) {
        let mut st = self.state.lock();
        self.teardown_locked(&mut st, peer);
    }

    fn teardown_locked(&self, st: &mut State, peer: u64) {
        let Some(mut p) = st.peers.remove(&peer) else {
            return;
        };
        for q in p.qps.iter_mut() {
            // Best effort: moving to ERROR flushes; destroy follows anyway.
            if q.sm.check(QpState::Error).is_ok()
                && q.qp.modify(&state_only_attrs(QpState::Error)).is_ok()
            {
                q.sm.failed();
            }
            if q.lane != usize::MAX {
                st.qpn_owner.remove(&(q.local_nic, q.qp.qpn()));
                st.lane_owner.remove(&q.lane);
            }
        }
        for (r, n) in st.cq_reserved.iter_mut().zip(&p.cq_need) {
            *r = r.saturating_sub(*n);
        }
        let lanes: Vec<usize> = p
            .qps
            .iter()
            .map(|q| q.lane)
            .filter(|&l| l != usize::MAX)
            .collect();
        // Destroy the QPs (the NIC stops touching memory), then settle the
        // tracker: what they still owned fails as flushed.
        drop(p);
        for l in lanes {
            st.tracker.reset_lane(l, 0);
            st.free_lanes.push(l);
        }
        self.drain_tracker(st);
    }

    /// Submits a batch of operations to `peer`; with `notify`, the payload
    /// is delivered to the peer after all bytes landed. Completion is
    /// reported by [`RdmaTransport::progress`] as [`RdmaEvent::BatchDone`].
    pub fn submit(
        &self,
        tag: BatchTag,
        peer: u64,
        ops: Vec<RdmaOp>,
        notify: Option<Vec<u8>>,
    ) -> Result<()> {
        let slices = cut_slices(&ops, self.cfg.max_slice_bytes)?;
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let p = st.peers.get_mut(&peer).filter(|p| p.connected && !p.failed);
        let p = p.ok_or(RdmaError::NotConnected(peer))?;
        if let Some(payload) = &notify {
            let (tx, _) = p
                .notify_tx
                .as_mut()
                .ok_or_else(|| RdmaError::Invalid("peer has no notification ring".into()))?;
            if payload.len() > self.cfg.notify_slot_bytes as usize {
                return Err(RdmaError::Invalid(format!(
                    "notification of {} bytes",
                    payload.len()
                )));
            }
            if tx.in_flight() >= self.cfg.notify_slots {
                return Err(RdmaError::Busy(
                    "peer has not consumed its notifications".into(),
                ));
            }
        }
        // Refuse operations no lane can carry before tracking anything: the
        // key check does not depend on budgets.
        let probe: Vec<Lane> = p
            .qps
            .iter()
            .map(|q| Lane {
                local_nic: q.local_nic,
                remote_nic: q.remote_nic,
                free_slots: 0,
            })
            .collect();
        assign_slices(&ops, &slices, &probe, self.cfg.signal_every)?;
        let lens: Vec<u64> = ops.iter().map(|o| o.len).collect();
        st.tracker.begin_batch(tag, &lens, notify.is_some());
        st.batches.insert(tag, BatchCtx { peer, ops, notify });
        self.post_slices(st, tag, &slices)?;
        self.drain_tracker(st);
        Ok(())
    }

    fn post_slices(&self, st: &mut State, tag: BatchTag, slices: &[Slice]) -> Result<()> {
        let Some(ctx) = st.batches.get(&tag) else {
            return Ok(());
        };
        let Some(p) = st.peers.get(&ctx.peer) else {
            st.tracker.defer(tag, slices);
            st.tracker.abort(tag, ErrorKind::ConnectionLost);
            return Ok(());
        };
        let lanes: Vec<Lane> = p
            .qps
            .iter()
            .map(|q| Lane {
                local_nic: q.local_nic,
                remote_nic: q.remote_nic,
                free_slots: if q.sm.can_send() {
                    st.tracker.free_slots(q.lane)
                } else {
                    0
                },
            })
            .collect();
        let plan = assign_slices(&ctx.ops, slices, &lanes, self.cfg.signal_every)?;
        st.tracker.defer(tag, &plan.deferred);
        for (li, q) in p.qps.iter().enumerate() {
            let reqs: Vec<SendRequest> = plan
                .wrs
                .iter()
                .filter(|w| w.lane == li)
                .map(|w| SendRequest {
                    wr_id: st.tracker.record_posted(tag, q.lane, w.slice),
                    op: match w.kind {
                        RdmaOpKind::Read => SendOp::Read,
                        RdmaOpKind::Write => SendOp::Write,
                    },
                    local_addr: w.local_addr,
                    lkey: w.lkey,
                    len: w.len,
                    remote_addr: w.remote_addr,
                    rkey: w.rkey,
                    signaled: w.signaled,
                })
                .collect();
            if let Err(e) = q.qp.post_send(&reqs) {
                let ids: Vec<u64> = reqs[e.first_failed.min(reqs.len())..]
                    .iter()
                    .map(|r| r.wr_id)
                    .collect();
                tracing::warn!(error = %e.error, refused = ids.len(), "ibv_post_send refused requests");
                st.tracker.post_failed(&ids, e.error.kind());
            }
        }
        Ok(())
    }

    fn post_notify(&self, st: &mut State, tag: BatchTag) {
        let Some(ctx) = st.batches.get(&tag) else {
            return;
        };
        let payload = ctx.notify.clone().unwrap_or_default();
        let Some(p) = st.peers.get_mut(&ctx.peer) else {
            st.tracker.abort(tag, ErrorKind::ConnectionLost);
            return;
        };
        let (Some(q0), Some((tx, ring))) = (p.qps.first(), p.notify_tx.as_mut()) else {
            st.tracker.abort(tag, ErrorKind::ConnectionLost);
            return;
        };
        let slot = match tx.reserve(payload.len()) {
            Ok(s) => s,
            Err(e) => {
                st.tracker.abort(tag, e.kind());
                return;
            }
        };
        let stride = ring.slot_bytes as usize;
        let start = slot.slot as usize * stride;
        p.buffers.tx_stage[start..start + payload.len()].copy_from_slice(&payload);
        let local_addr = p.buffers.tx_stage.as_ptr() as u64 + start as u64;
        let lkey = p.buffers.tx_mrs[q0.local_nic].lkey();
        let Some(&rkey) = ring.rkeys.get(q0.remote_nic) else {
            st.tracker.abort(tag, ErrorKind::Protocol);
            return;
        };
        let wr_id = st.tracker.record_notify(tag, q0.lane);
        let req = SendRequest {
            wr_id,
            op: SendOp::WriteImm(slot.seq),
            local_addr,
            lkey,
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            remote_addr: ring.slot_addr(slot.seq),
            rkey,
            signaled: true,
        };
        if let Err(e) = q0.qp.post_send(&[req]) {
            st.tracker.post_failed(&[wr_id], e.error.kind());
        }
    }

    /// Cancels (or times out) a batch; it is reported once the NICs have
    /// released its requests.
    pub fn abort(&self, tag: BatchTag, kind: ErrorKind) {
        let mut st = self.state.lock();
        st.tracker.abort(tag, kind);
        self.drain_tracker(&mut st);
    }

    /// The notification credit to relay to `peer` (how many of its
    /// notifications we consumed).
    pub fn notify_credit(&self, peer: u64) -> Option<u32> {
        self.state
            .lock()
            .peers
            .get(&peer)
            .map(|p| p.notify_rx.credit())
    }

    /// `peer` relayed its credit for our notifications.
    pub fn on_notify_credit(&self, peer: u64, consumed: u32) -> Result<()> {
        let mut st = self.state.lock();
        let p = st
            .peers
            .get_mut(&peer)
            .ok_or(RdmaError::NotConnected(peer))?;
        match p.notify_tx.as_mut() {
            Some((tx, _)) => tx.on_credit(consumed),
            None => Err(RdmaError::Protocol(
                "credit without a notification ring".into(),
            )),
        }
    }

    /// Polls every completion queue, advances the bookkeeping, posts
    /// deferred slices and notifications; returns what happened.
    pub fn progress(&self) -> Result<Vec<RdmaEvent>> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let mut cqes = Vec::new();
        for (ni, n) in self.nics.iter().enumerate() {
            cqes.clear();
            n.cq.poll(&mut cqes, self.cfg.poll_batch)?;
            for c in &cqes {
                if c.wr_id & RECV_WR_FLAG != 0 {
                    self.on_recv(st, ni, c.qp_num, c.status, c.imm, c.byte_len);
                } else {
                    st.tracker.on_completion(c.wr_id, c.status);
                }
            }
        }
        self.drain_tracker(st);
        for (tag, slices) in st.tracker.take_deferred() {
            self.post_slices(st, tag, &slices)?;
        }
        self.drain_tracker(st);
        Ok(std::mem::take(&mut st.events))
    }

    fn on_recv(
        &self,
        st: &mut State,
        nic: usize,
        qpn: u32,
        status: u32,
        imm: Option<u32>,
        byte_len: u32,
    ) {
        let Some(&peer) = st.qpn_owner.get(&(nic, qpn)) else {
            return;
        };
        let Some(p) = st.peers.get_mut(&peer) else {
            return;
        };
        if status != 0 {
            // Flushed receives of a failed QP: the send side reports it.
            return;
        }
        let delivered = imm
            .ok_or_else(|| RdmaError::Protocol("receive without immediate".into()))
            .and_then(|imm| p.notify_rx.on_recv(imm, byte_len));
        match delivered {
            Ok(d) => {
                let stride = self.cfg.notify_slot_bytes as usize;
                let start = d.slot as usize * stride;
                let payload = p.buffers.rx_ring[start..start + d.len as usize].to_vec();
                // Copied out: the slot may be reused once the credit travels.
                let _ = p.notify_rx.consumed(d.seq);
                st.events.push(RdmaEvent::Notification {
                    peer,
                    seq: d.seq,
                    payload,
                });
                let n = p.notify_rx.to_post();
                let ids: Vec<u64> = (0..n).map(|i| RECV_WR_FLAG | u64::from(i)).collect();
                if let Some(q0) = p.qps.first() {
                    match q0.qp.post_recv_empty(&ids) {
                        Ok(()) => p.notify_rx.posted(n),
                        Err(e) => {
                            tracing::warn!(error = %e.error, "reposting notification receives failed")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(peer, error = %e, "bad notification; marking the peer failed");
                p.failed = true;
                st.events.push(RdmaEvent::PeerFailed {
                    peer,
                    kind: e.kind(),
                });
            }
        }
    }

    fn drain_tracker(&self, st: &mut State) {
        while let Some(ev) = st.tracker.poll_event() {
            match ev {
                TrackerEvent::BatchDone(outcome) => {
                    st.batches.remove(&outcome.tag);
                    st.events.push(RdmaEvent::BatchDone(outcome));
                }
                TrackerEvent::NotifyReady { tag } => self.post_notify(st, tag),
                TrackerEvent::LaneFailed { lane, kind } => {
                    if let Some(&peer) = st.lane_owner.get(&lane) {
                        if let Some(p) = st.peers.get_mut(&peer) {
                            for q in p.qps.iter_mut().filter(|q| q.lane == lane) {
                                q.sm.failed();
                            }
                            if !p.failed {
                                p.failed = true;
                                st.events.push(RdmaEvent::PeerFailed { peer, kind });
                            }
                        }
                    }
                }
                TrackerEvent::UnknownCompletion { wr_id } => {
                    tracing::debug!(wr_id, "completion for an unknown work request");
                }
            }
        }
    }
}

/// Completion-queue entries each NIC must reserve for these queue pairs:
/// every send slot and every receive slot can produce one entry; QP 0
/// carries the notification receives.
pub fn cq_entries_needed(
    pairs: &[(usize, usize)],
    nics: usize,
    send_depth: u32,
    notify_slots: u32,
) -> Vec<u32> {
    let mut need = vec![0u32; nics];
    for (i, &(l, _)) in pairs.iter().enumerate() {
        if let Some(n) = need.get_mut(l) {
            *n += send_depth + if i == 0 { notify_slots } else { 1 };
        }
    }
    need
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_registration_prefers_dmabuf_then_peermem() {
        assert_eq!(
            gpu_registration_order(true),
            &[GpuRegPath::DmaBuf, GpuRegPath::PeerMem]
        );
        assert_eq!(gpu_registration_order(false), &[GpuRegPath::PeerMem]);
        assert!(dmabuf_failure_allows_fallback(Some(libc::EOPNOTSUPP)));
        assert!(dmabuf_failure_allows_fallback(Some(libc::ENOSYS)));
        assert!(!dmabuf_failure_allows_fallback(Some(libc::ENOMEM)));
        assert!(!dmabuf_failure_allows_fallback(Some(libc::EBADF)));
        assert!(!dmabuf_failure_allows_fallback(None));
    }

    #[test]
    fn opening_the_transport_without_hardware_is_no_devices() {
        match RdmaTransport::open(RdmaConfig::default(), 1) {
            Err(RdmaError::NoDevices { .. }) => {}
            // On a machine with NICs the transport opens.
            Ok(t) => assert!(!t.local_desc().nics.is_empty()),
            Err(e) => panic!("expected NoDevices, got {e:?}"),
        }
        let bad = RdmaConfig {
            signal_every: 0,
            ..RdmaConfig::default()
        };
        assert!(matches!(
            RdmaTransport::open(bad, 1),
            Err(RdmaError::Invalid(_))
        ));
    }

    #[test]
    fn cq_budget_counts_send_and_receive_slots() {
        let pairs = [(0, 0), (0, 0), (1, 1)];
        assert_eq!(
            cq_entries_needed(&pairs, 2, 256, 64),
            vec![256 + 64 + 256 + 1, 256 + 1]
        );
        assert_eq!(cq_entries_needed(&[(5, 0)], 2, 8, 8), vec![0, 0]);
    }

    #[test]
    fn region_descriptors_round_trip() {
        let d = RdmaRegionDesc {
            addr: 0x7000_0000,
            len: 1 << 20,
            rkeys: vec![0x11, 0x22],
        };
        let bytes = postcard::to_allocvec(&d).unwrap();
        assert_eq!(postcard::from_bytes::<RdmaRegionDesc>(&bytes).unwrap(), d);
    }
}
