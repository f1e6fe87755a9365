//! `EpGroup`: N ranks doing MoE dispatch and combine over the transfer
//! engine.
//!
//! Every rank owns one symmetric receive region (engine memory, memfd-backed,
//! so same-host peers write into it with a plain `memcpy` over `shm`) and one
//! local staging region:
//!
//! ```text
//! receive region (same size on every rank)
//! +---------+-----------------------------------+-----------------------------------+
//! | probe   | dispatch: [parity 0|1][src rank]  | combine:  [parity 0|1][src rank]  |
//! |  64B/rk |  slot = payload rows | meta rows  |  slot = max_tokens × crow         |
//! +---------+-----------------------------------+-----------------------------------+
//! payload row = activation (or FP8 + per-128-channel scales); meta row = token,
//! k local experts, k gate weights; crow = hidden × dtype size.
//! then the send buffers (`take_send_buffers`): input rows | reduced expert rows;
//! rows there leave in place, one copy into the peer (or none: pulled), no
//! staging copy.
//! staging region: dispatch [dst rank] + combine [dst rank], same slot layouts.
//! ```
//!
//! Dispatch at rank r, operation number k (parity p = k mod 2):
//! plan (or reuse the handle) → for each peer d, starting at r+1: pack the
//! rows for d into staging (or, from a send buffer, take runs of consecutive
//! tokens in place) plus their metadata, submit ONE batch into d's slot
//! (p, r) → own rows are not copied (only their metadata is written to own
//! slot (p, r)) → once a batch has landed, ring the doorbell (dispatch, p, r)
//! at d: 16 bytes holding (k, row count) and its complement → wait for the
//! N-1 doorbells by polling local memory (deadline; a missing one names its
//! rank) → build the expert-major index from the rows' metadata. Counts and
//! completion travel together, so there is no separate count round, and no
//! engine thread sits between a landed row and the rank that waits for it.
//! Combine is the reverse, into the combine area, followed by the
//! fixed-order f32 sum. The barrier rings doorbells too.
//!
//! Combine between two ranks that map each other's receive region over
//! `shm` (agreed at formation) is a pull instead: the rank holding the
//! partial rows for token owner s does not copy them to s; it leaves them
//! where they are (the caller's send buffer, which is an area of the
//! receive region, or else its own combine slot (p, s), free because s
//! pushes nothing there) and rings s's doorbell with (k, row count, offset).
//! s sums straight from its view of the peer's memory, then rings a release
//! doorbell back. A rank whose send-buffer rows were read in place returns
//! from combine only after those releases (the caller may then overwrite
//! the buffer); rows in its own slot are safe by the parity argument below.
//!
//! ```text
//!  rank r (rows for s)                      rank s (owner)
//!  bell(k, n, off) ──────────────────────────▶ poll bell == k+1
//!                                             sum rows read at r.view[off..]
//!  poll release == k+1 ◀──────────────────── release(k)
//! ```
//!
//! ```text
//!  rank r                                   rank d
//!  submit(rows → d.slot[p][r]) ──memcpy / tcp──▶ rows land
//!  batch complete ─▶ submit(bell → d.bell[K][p][r]) ─▶ (k, n) lands
//!                                            poll bell[K][p][*] == k+1 ─▶ read rows
//! ```
//!
//! Why two parities are enough: a peer writes parity p of kind K only in
//! operation k (k ≡ p); it can start operation k+2 only after this rank's
//! part of operation k+1 reached it, which this rank sends only after it
//! finished reading operation k. Operations take `&mut self`, so a
//! [`Dispatched`] view of the receive area ends before the next operation.
//!
//! Only the host path exists today. The GPU path (NVRTC permute/unpermute
//! kernels, cuda-ipc within a host, RDMA across hosts) plugs in under the
//! same API: [`Rows`] keeps its storage private, and [`EpConfig::memory`]
//! selects the buffers' memory kind.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_gpu::{
    Batch, BatchOptions, Engine, EngineId, MemoryKind, Op, Region, RegionDesc, RegionId,
    RemoteRegion, ShmView,
};

use crate::ctl::{Ctl, Kind, HEADER};
use crate::dtype::{self, payload_bytes, DType, WireFormat};
use crate::error::{Error, Result};
use crate::layout::{self, ExpertMap, RecvIndex, RowMeta, SendPlan};
use crate::rows::{ExpertOut, Rows, SendBuf, Tensor};
use crate::wait::block_on_timeout;

/// How rows move between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Exchange {
    /// One-sided writes into the peer's receive region, then a one-sided
    /// doorbell per peer and operation (the real path).
    OneSided,
    /// A plain two-sided all-to-allv over the same engine: rows travel inside
    /// notification messages (≤ 64 KiB each) that the receiver copies out.
    /// Kept as the baseline `moe-bench --baseline naive` measures.
    TwoSided,
}

/// Shape and behaviour of a group; identical on every rank (checked at
/// formation).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpConfig {
    /// Experts in the model (spread over the ranks in contiguous blocks).
    pub num_experts: usize,
    /// Channels per token.
    pub hidden: usize,
    /// Experts per token.
    pub topk: usize,
    /// Largest number of tokens one rank dispatches in one operation; sizes
    /// the receive buffers.
    pub max_tokens_per_rank: usize,
    /// Activation dtype (dispatch input, expert outputs, combine output).
    pub dtype: DType,
    /// How dispatched rows travel (FP8 quantizes on the sender).
    pub dispatch_format: WireFormat,
    /// An operation not complete by then fails, naming the missing rank.
    pub timeout: Duration,
    pub exchange: Exchange,
    /// How long a rank waiting for its peers spins before it starts
    /// yielding the CPU (then, after 200 ms, sleeping). `None`: 20 µs.
    /// Local tuning; need not match across ranks.
    pub spin_wait: Option<Duration>,
    /// Memory of the buffers: host kinds today; a GPU kind is refused with
    /// [`Error::Config`] until the CUDA transports exist.
    pub memory: MemoryKind,
}

impl EpConfig {
    /// A host, bf16, one-sided group with a 10 s timeout.
    pub fn new(num_experts: usize, hidden: usize, topk: usize, max_tokens_per_rank: usize) -> Self {
        EpConfig {
            num_experts,
            hidden,
            topk,
            max_tokens_per_rank,
            dtype: DType::Bf16,
            dispatch_format: WireFormat::Native,
            timeout: Duration::from_secs(10),
            exchange: Exchange::OneSided,
            spin_wait: None,
            memory: MemoryKind::Host,
        }
    }

    /// Bytes of one dispatched row on the wire: payload, metadata (token,
    /// local experts, gate weights), padded to 64 bytes.
    pub fn dispatch_row_bytes(&self) -> usize {
        Shape::new(self, 1).drow()
    }

    /// Bytes of one combine row on the wire.
    pub fn combine_row_bytes(&self) -> usize {
        self.hidden * self.dtype.size()
    }

    /// What must match on every rank (everything but the timeout).
    pub fn fingerprint(&self) -> String {
        format!(
            "e{}-h{}-k{}-t{}-{}-{:?}-{:?}-{}",
            self.num_experts,
            self.hidden,
            self.topk,
            self.max_tokens_per_rank,
            self.dtype.name(),
            self.dispatch_format,
            self.exchange,
            self.memory
        )
    }

    fn validate(&self, world: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if world == 0 || world > 1024 {
            return bad(format!("world size {world} outside 1..=1024"));
        }
        if self.num_experts < world {
            return bad(format!(
                "{} experts cannot cover {world} ranks",
                self.num_experts
            ));
        }
        if self.num_experts / world >= layout::NOT_LOCAL as usize {
            return bad("too many experts per rank".into());
        }
        if self.hidden == 0 || self.topk == 0 || self.max_tokens_per_rank == 0 {
            return bad("hidden, topk and max_tokens_per_rank must be > 0".into());
        }
        if self.topk > self.num_experts {
            return bad(format!("topk {} > {} experts", self.topk, self.num_experts));
        }
        if self.max_tokens_per_rank >= 1 << 24 {
            return bad("max_tokens_per_rank too large".into());
        }
        if !self.memory.is_host() {
            return bad(format!(
                "{} buffers need the GPU path (NVRTC permute kernels, cuda-ipc/rdma), \
                 which is not built yet; use host memory",
                self.memory
            ));
        }
        Ok(())
    }
}

/// Byte layout derived from a config and a world size.
#[derive(Debug, Clone, Copy)]
struct Shape {
    world: usize,
    max_tokens: usize,
    /// Dispatched payload bytes per row (also the row stride of a slot's
    /// payload block, so runs of input rows land with one copy).
    payload: usize,
    /// Metadata bytes per row, and the offsets of its fields.
    meta: usize,
    meta_experts: usize,
    meta_weights: usize,
    /// Bytes of one dispatch slot, and where its metadata block starts.
    dslot: usize,
    dmeta: usize,
    /// Combine row bytes (= activation row).
    crow: usize,
    dispatch_base: usize,
    combine_base: usize,
    recv_len: usize,
    /// Doorbells: in the receive region, and their outgoing copies in staging.
    bells: usize,
    staging_bells: usize,
    staging_combine: usize,
    staging_len: usize,
    /// Caller-writable send buffers: input rows, then reduced expert rows.
    /// (offsets in the receive region, which peers on the same host map,
    /// so they can read combine rows in place).
    user_input: usize,
    user_expert_out: usize,
    user_end: usize,
}

const PROBE_BYTES: usize = 64;
/// One doorbell per (kind, parity, source rank), a cache line each; the
/// first 32 bytes are written: (seq + 1, count), an offset, and checks.
const BELL_BYTES: usize = 64;
const BELL_WRITE: usize = 32;
const BELL_KINDS: usize = 5;
/// How long a waiting rank stays runnable (spinning, then yielding) before
/// it sleeps between looks at its doorbells.
const SPIN_FOR: Duration = Duration::from_millis(200);
/// Default of [`EpConfig::spin_wait`]. Measured on a shared 2-core host:
/// longer spins (2 ms) gain ~5-10% when the machine is otherwise idle and
/// lose several times that under load from other processes, where a
/// spinning rank keeps a descheduled peer (or engine thread) off the core.
const SPIN_DEFAULT: Duration = Duration::from_micros(20);

impl Shape {
    fn new(cfg: &EpConfig, world: usize) -> Shape {
        let payload = payload_bytes(cfg.hidden, cfg.dtype, cfg.dispatch_format);
        let meta_experts = 4;
        let meta_weights = (meta_experts + 2 * cfg.topk).next_multiple_of(4);
        let meta = (meta_weights + 4 * cfg.topk).next_multiple_of(8);
        let crow = cfg.hidden * cfg.dtype.size();
        let m = cfg.max_tokens_per_rank;
        let dmeta = (m * payload).next_multiple_of(64);
        let dslot = (dmeta + m * meta).next_multiple_of(64);
        let cslot = (m * crow).next_multiple_of(64);
        let bells = world * PROBE_BYTES;
        let bell_area = BELL_KINDS * 2 * world * BELL_BYTES;
        let dispatch_base = (bells + bell_area).next_multiple_of(4096);
        let combine_base = dispatch_base + 2 * world * dslot;
        let user_input = (combine_base + 2 * world * cslot).next_multiple_of(4096);
        let user_expert_out = user_input + (m * crow).next_multiple_of(4096);
        let user_end = (user_expert_out + world * m * crow).next_multiple_of(4096);
        let recv_len = user_end;
        let staging_combine = world * dslot;
        let staging_bells = staging_combine + world * cslot;
        let staging_len = (staging_bells + bell_area).next_multiple_of(4096);
        Shape {
            world,
            max_tokens: m,
            payload,
            meta,
            meta_experts,
            meta_weights,
            dslot,
            dmeta,
            crow,
            dispatch_base,
            combine_base,
            recv_len,
            bells,
            staging_bells,
            staging_combine,
            staging_len,
            user_input,
            user_expert_out,
            user_end,
        }
    }

    /// Bytes one dispatched row puts on the wire.
    fn drow(&self) -> usize {
        self.payload + self.meta
    }

    fn cslot(&self) -> usize {
        (self.max_tokens * self.crow).next_multiple_of(64)
    }

    fn dispatch_slot(&self, parity: usize, src: usize) -> usize {
        self.dispatch_base + (parity * self.world + src) * self.dslot
    }

    fn combine_slot(&self, parity: usize, src: usize) -> usize {
        self.combine_base + (parity * self.world + src) * self.cslot()
    }

    fn bell_index(&self, kind: Kind, parity: usize, rank: usize) -> usize {
        let k = match kind {
            Kind::Dispatch => 0,
            Kind::Combine => 1,
            Kind::Abort => 3,
            Kind::Release => 4,
            _ => 2,
        };
        ((k * 2 + parity) * self.world + rank) * BELL_BYTES
    }

    /// Where rank `src`'s doorbell for (`kind`, `parity`) lives here.
    fn bell_in(&self, kind: Kind, parity: usize, src: usize) -> usize {
        self.bells + self.bell_index(kind, parity, src)
    }

    /// Where this rank stages the doorbell it rings at `dst`.
    fn bell_out(&self, kind: Kind, parity: usize, dst: usize) -> usize {
        self.staging_bells + self.bell_index(kind, parity, dst)
    }

    fn staging_dispatch(&self, dst: usize) -> usize {
        dst * self.dslot
    }

    fn staging_combine(&self, dst: usize) -> usize {
        self.staging_combine + dst * self.cslot()
    }
}

/// A registered host region this rank reads and writes directly.
///
/// Who else touches it: the engine (copying out of staging while one of our
/// batches is in flight; we settle those batches before writing staging
/// again) and peers (writing their own slot of the receive region during an
/// operation of the matching parity; see the module docs for why that never
/// overlaps a range this rank is reading or writing).
#[derive(Debug)]
struct HostBuf {
    region: Region,
    len: usize,
}

impl HostBuf {
    fn new(region: Region) -> Result<HostBuf> {
        if !region.kind().is_host() {
            return Err(Error::Config("buffer is not host memory".into()));
        }
        Ok(HostBuf {
            len: region.len() as usize,
            region,
        })
    }

    fn check(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.len),
            "range {off}+{len} outside buffer of {}",
            self.len
        );
    }

    fn bytes(&self, off: usize, len: usize) -> &[u8] {
        self.check(off, len);
        // SAFETY: `off..off+len` lies inside the region's live mapping (checked
        // above; `self.region` keeps it mapped for the lifetime of the borrow).
        // No one writes the range while the borrow lives: the group protocol
        // (module docs) keeps peers out of any slot this rank is reading, and
        // our own writers need `&mut self`.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr().add(off), len) }
    }

    /// Reads an aligned 8-byte word that a peer may be writing right now.
    fn load_u64(&self, off: usize) -> u64 {
        self.check(off, 8);
        assert!(off & 7 == 0, "unaligned doorbell");
        let p = self.region.as_ptr().wrapping_add(off).cast::<u64>();
        // SAFETY: in bounds, 8-byte aligned (the region is page aligned and
        // `off` a multiple of 8) and mapped while `self` lives. Peers write
        // this word concurrently (doorbells), so it is read atomically and
        // never through a plain reference.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(p) }
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn bytes_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        self.check(off, len);
        // SAFETY: in bounds as above; `&mut self` excludes other borrows in
        // this process, the engine no longer reads staging ranges whose batches
        // were settled, and peers only write their own receive slots, never the
        // one this rank fills.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr().add(off), len) }
    }
}

struct HandleInner {
    group: u64,
    tokens: usize,
    topk_idx: Vec<i32>,
    topk_w: Vec<f32>,
    plan: SendPlan,
    recv: RecvIndex,
}

/// The routing of one dispatch, on this rank: what was sent where and what
/// was received. Pass it to [`EpGroup::combine`], or to
/// [`EpGroup::dispatch_with`] to dispatch new activations with the same
/// routing (no planning and no index building). Cheap to clone; valid only
/// in the group that made it.
#[derive(Clone)]
pub struct Handle(Arc<HandleInner>);

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("tokens", &self.0.tokens)
            .field("recv_rows", &self.0.recv.num_rows())
            .field("expert_rows", &self.0.recv.num_entries())
            .finish()
    }
}

impl Handle {
    /// Tokens this rank dispatched.
    pub fn num_tokens(&self) -> usize {
        self.0.tokens
    }

    /// Rows sent to each rank (deduplicated; own rank included).
    pub fn send_counts(&self) -> Vec<usize> {
        self.0.plan.send.iter().map(Vec::len).collect()
    }

    /// Rows received from each rank.
    pub fn recv_counts(&self) -> Vec<usize> {
        self.0
            .recv
            .recv_off
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect()
    }

    /// Non-masked (token, expert) selections of this rank's tokens.
    pub fn selections(&self) -> u64 {
        self.0.plan.selections
    }

    /// Expert-major entries per local expert.
    pub fn expert_counts(&self) -> Vec<usize> {
        self.0
            .recv
            .expert_off
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .collect()
    }
}

/// Rows received by one dispatch: deduplicated rows (grouped by source rank,
/// each rank's tokens in order), plus their grouping by local expert.
///
/// The rows are a view of the receive buffer, and this rank's own rows a
/// view of its input (no copy); [`Self::permute`]
/// materializes the expert-major tensor a grouped GEMM wants (a row appears
/// once per local expert it selected). The view ends when the group's next
/// operation begins.
pub struct Dispatched<'g> {
    group: &'g EpGroup,
    handle: Handle,
    parity: usize,
    /// This rank's own rows are not copied: they are read from the input.
    own: Option<Rows<'g>>,
}

impl std::fmt::Debug for Dispatched<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatched")
            .field("handle", &self.handle)
            .field("parity", &self.parity)
            .finish()
    }
}

impl<'g> Dispatched<'g> {
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub fn into_handle(self) -> Handle {
        self.handle
    }

    fn ix(&self) -> &RecvIndex {
        &self.handle.0.recv
    }

    /// Deduplicated rows received.
    pub fn num_rows(&self) -> usize {
        self.ix().num_rows()
    }

    /// Expert-major entries (received rows × their local experts).
    pub fn num_expert_rows(&self) -> usize {
        self.ix().num_entries()
    }

    /// Entries per local expert (the grouped GEMM's group sizes).
    pub fn expert_counts(&self) -> Vec<usize> {
        self.handle.expert_counts()
    }

    /// (source rank, source token index) of received row `i`.
    pub fn source(&self, i: usize) -> (usize, usize) {
        (self.ix().source(i), self.ix().token[i] as usize)
    }

    /// Received rows of local expert `e` (indices into the received rows),
    /// ascending; and their gate weights.
    pub fn expert_rows(&self, e: usize) -> (&[u32], &[f32]) {
        let ix = self.ix();
        let r = ix.expert_off[e] as usize..ix.expert_off[e + 1] as usize;
        (&ix.expert_rows[r.clone()], &ix.expert_w[r])
    }

    /// Payload bytes of received row `i` in the wire format (activation
    /// dtype, or FP8 e4m3 followed by the per-128-channel `f32` scales).
    pub fn row(&self, i: usize) -> &[u8] {
        let g = self.group;
        let s = self.ix().source(i);
        if let (Some(x), true) = (&self.own, s == g.rank) {
            return x.row(self.ix().token[i] as usize);
        }
        let j = i - self.ix().recv_off[s] as usize;
        let off = g.shape.dispatch_slot(self.parity, s) + j * g.shape.payload;
        g.recv.bytes(off, g.shape.payload)
    }

    /// Received row `i` as `f32` (dequantized for FP8).
    pub fn row_f32(&self, i: usize, out: &mut [f32]) {
        let c = &self.group.cfg;
        dtype::payload_to_f32(self.row(i), c.dtype, c.dispatch_format, out);
    }

    /// Global id of this rank's local expert 0 (local expert `e` is global
    /// expert `first_expert() + e`).
    pub fn first_expert(&self) -> usize {
        self.group.map.first(self.group.rank)
    }

    /// Channels per row.
    pub fn hidden(&self) -> usize {
        self.group.cfg.hidden
    }

    /// (local expert, gate weight) of received row `i`, local expert
    /// ascending.
    pub fn row_experts(&self, i: usize) -> impl Iterator<Item = (usize, f32)> + '_ {
        let ix = self.ix();
        ix.row_entries[ix.row_off[i] as usize..ix.row_off[i + 1] as usize]
            .iter()
            .map(move |&p| {
                let e = ix.expert_off.partition_point(|&o| o <= p) - 1;
                (e, ix.expert_w[p as usize])
            })
    }

    /// Bytes of one payload row.
    pub fn row_bytes(&self) -> usize {
        self.group.shape.payload
    }

    /// Expert-major copy of the received rows: entries of local expert 0,
    /// then 1, …; each in received-row order. `out` must hold
    /// `num_expert_rows × row_bytes` bytes (wire format).
    pub fn permute_into(&self, out: &mut [u8]) -> Result<()> {
        let pb = self.row_bytes();
        if out.len() != self.num_expert_rows() * pb {
            return Err(Error::Invalid(format!(
                "permute output of {} bytes, need {}",
                out.len(),
                self.num_expert_rows() * pb
            )));
        }
        for (dst, &r) in out.chunks_exact_mut(pb).zip(&self.ix().expert_rows) {
            dst.copy_from_slice(self.row(r as usize));
        }
        Ok(())
    }

    /// [`Self::permute_into`] into a new buffer.
    pub fn permute(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.num_expert_rows() * self.row_bytes()];
        // Sized exactly above.
        let _ = self.permute_into(&mut v);
        v
    }
}

/// Where the time of the last operation went (µs).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct OpTimings {
    /// Waiting for this rank's previous batches of the same kind.
    pub settle_us: f64,
    /// Planning (dispatch without a handle).
    pub plan_us: f64,
    /// Packing rows / computing partial rows, and submitting them.
    pub send_us: f64,
    /// The part of `send_us` spent in the engine: submitting data batches
    /// (same-host copies below the engine's inline size happen there) and
    /// waiting for them to land before ringing the doorbells.
    pub engine_us: f64,
    /// Waiting for the peers' rows.
    pub wait_us: f64,
    /// Index building (dispatch) or the final sum (combine).
    pub finish_us: f64,
}

/// The symmetric buffers of one rank, allocated before the group forms so
/// their descriptor can be handed to the other ranks.
#[derive(Debug)]
pub struct EpBuffers {
    engine: Engine,
    cfg: EpConfig,
    rank: usize,
    world: usize,
    shape: Shape,
    recv: Region,
    staging: Region,
}

impl EpBuffers {
    /// Allocates the receive and staging regions of rank `rank` of `world`.
    pub fn alloc(engine: &Engine, cfg: &EpConfig, rank: usize, world: usize) -> Result<EpBuffers> {
        cfg.validate(world)?;
        if rank >= world {
            return Err(Error::Config(format!("rank {rank} outside 0..{world}")));
        }
        let shape = Shape::new(cfg, world);
        let recv = engine.alloc(shape.recv_len as u64, cfg.memory)?;
        let staging = engine.alloc(shape.staging_len as u64, cfg.memory)?;
        Ok(EpBuffers {
            engine: engine.clone(),
            cfg: cfg.clone(),
            rank,
            world,
            shape,
            recv,
            staging,
        })
    }

    /// What the other ranks need to reach this rank.
    pub fn desc(&self) -> RegionDesc {
        self.recv.desc()
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn config(&self) -> &EpConfig {
        &self.cfg
    }
}

/// A byte range to copy into a peer's receive region.
#[derive(Debug, Clone, Copy)]
struct Piece {
    region: RegionId,
    src_off: usize,
    dst_off: usize,
    len: usize,
}

/// One outgoing batch whose outcome is not known yet.
struct Pending {
    rank: usize,
    op: &'static str,
    seq: u64,
    batch: Batch,
}

impl Pending {
    /// The error of this batch, if it has failed with `st`.
    fn check(&self, st: &kvmesh_gpu::BatchStatus) -> Result<()> {
        match st.result {
            Ok(()) => Ok(()),
            Err(kind) => Err(Error::Transfer {
                rank: self.rank,
                op: self.op,
                seq: self.seq,
                kind,
            }),
        }
    }
}

/// Progress of one peer's part of an operation.
#[derive(Clone, Copy, Default)]
struct Arrival {
    count: Option<u32>,
    data: usize,
}

/// (kind, sequence number, source rank) of buffered early messages.
type InboxKey = (Kind, u64, usize);

/// An expert-parallel group of ranks over one engine per rank.
///
/// The group reads its engine's notification queue (group formation and the
/// two-sided baseline use it): give it an engine of its own, or at least one
/// whose other users send it no notifications while the group forms or runs
/// two-sided (they would be dropped).
/// Every method is a collective: all ranks call the same sequence.
pub struct EpGroup {
    engine: Engine,
    cfg: EpConfig,
    rank: usize,
    world: usize,
    map: ExpertMap,
    shape: Shape,
    recv: HostBuf,
    staging: HostBuf,
    staging_id: RegionId,
    /// Whether the send buffers (an area of the receive region) were handed
    /// out.
    send_bufs_taken: bool,
    /// Per rank: combine rows travel by pull (the rank that sums reads them
    /// in place through its `shm` view of the sender's receive region)
    /// rather than being written into its receive region. Agreed by both
    /// sides at formation; false for self.
    pull: Vec<bool>,
    /// Offsets the doorbells of the last collected operation carried.
    bell_offs: Vec<u64>,
    remotes: Vec<Option<RemoteRegion>>,
    ranks_by_engine: HashMap<EngineId, usize>,
    group_id: u64,
    dispatch_seq: u64,
    combine_seq: u64,
    barrier_seq: u64,
    inbox: HashMap<InboxKey, Vec<(Ctl, Vec<u8>)>>,
    inbox_bytes: usize,
    pending_dispatch: Vec<Pending>,
    pending_combine: Vec<Pending>,
    broken: Option<String>,
    acc: Vec<f32>,
    scratch: Vec<f32>,
    meta_experts: Vec<u16>,
    meta_weights: Vec<f32>,
    timings: OpTimings,
    engine_acc: Duration,
    /// How long waits spin before they start yielding.
    spin_for: Duration,
}

impl std::fmt::Debug for EpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("group_id", &format_args!("{:016x}", self.group_id))
            .field("broken", &self.broken)
            .finish()
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The 32 bytes of a doorbell: value, its complement, an offset, and a
/// check of the offset that also depends on the value (a reader that sees
/// the new value with the previous offset notices).
fn bell_words(v: u64, at: u64) -> [u8; BELL_WRITE] {
    let mut b = [0u8; BELL_WRITE];
    for (i, w) in [v, !v, at, !(at ^ v)].into_iter().enumerate() {
        b[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

impl EpGroup {
    /// Forms the group from this rank's buffers and every rank's receive
    /// descriptor, in rank order (own included). Checks the regions are
    /// symmetric, then does one probe round: a one-sided write to every peer
    /// plus its notification, which also sets up the connections. Fails,
    /// naming the rank, if a peer does not answer within the timeout.
    pub fn new(bufs: EpBuffers, descs: &[RegionDesc]) -> Result<EpGroup> {
        let EpBuffers {
            engine,
            cfg,
            rank,
            world,
            shape,
            recv,
            staging,
        } = bufs;
        if descs.len() != world {
            return Err(Error::Config(format!(
                "{} descriptors for a group of {world}",
                descs.len()
            )));
        }
        if descs[rank] != recv.desc() {
            return Err(Error::Config(format!(
                "descriptor {rank} is not this rank's receive region"
            )));
        }
        let mut remotes = Vec::with_capacity(world);
        let mut ranks_by_engine = HashMap::new();
        let mut h = blake3::Hasher::new();
        h.update(b"kvmesh-ep group v1");
        for (r, d) in descs.iter().enumerate() {
            if d.len != shape.recv_len as u64 {
                return Err(Error::Config(format!(
                    "rank {r}'s receive region is {} bytes, expected {} (configs differ?)",
                    d.len, shape.recv_len
                )));
            }
            if ranks_by_engine.insert(d.peer.engine_id, r).is_some() {
                return Err(Error::Config(format!(
                    "rank {r} uses the same engine as another rank"
                )));
            }
            h.update(&d.peer.engine_id);
            h.update(&d.region.to_le_bytes());
            remotes.push((r != rank).then(|| engine.import(d)));
        }
        let group_id =
            u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().unwrap_or([0; 8]));
        let map = ExpertMap {
            num_experts: cfg.num_experts,
            world,
        };
        let staging_id = staging.id();
        let mut g = EpGroup {
            engine,
            map,
            rank,
            world,
            shape,
            recv: HostBuf::new(recv)?,
            staging: HostBuf::new(staging)?,
            staging_id,
            send_bufs_taken: false,
            pull: vec![false; world],
            bell_offs: vec![0; world],
            remotes,
            ranks_by_engine,
            group_id,
            dispatch_seq: 0,
            combine_seq: 0,
            barrier_seq: 0,
            inbox: HashMap::new(),
            inbox_bytes: 0,
            pending_dispatch: Vec::new(),
            pending_combine: Vec::new(),
            broken: None,
            acc: vec![0.0; cfg.hidden],
            scratch: vec![0.0; cfg.hidden],
            meta_experts: Vec::new(),
            meta_weights: Vec::new(),
            timings: OpTimings::default(),
            engine_acc: Duration::ZERO,
            spin_for: SPIN_DEFAULT,
            cfg,
        };
        g.probe()?;
        g.agree_pull()?;
        g.spin_for = g.cfg.spin_wait.unwrap_or(SPIN_DEFAULT);
        Ok(g)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn config(&self) -> &EpConfig {
        &self.cfg
    }

    /// Same on every rank of one group; differs between groups.
    pub fn group_id(&self) -> u64 {
        self.group_id
    }

    /// Experts held by `rank`.
    pub fn local_experts(&self, rank: usize) -> std::ops::Range<usize> {
        self.map.local(rank)
    }

    /// Bytes of one dispatch row on the wire (payload + metadata + padding).
    pub fn dispatch_row_bytes(&self) -> usize {
        self.shape.drow()
    }

    /// Bytes of one combine row on the wire.
    pub fn combine_row_bytes(&self) -> usize {
        self.shape.crow
    }

    /// The two send buffers, once: the first holds up to
    /// `max_tokens_per_rank` input rows for [`Self::dispatch`], the second up
    /// to `world × max_tokens_per_rank` rows for [`ExpertOut::Reduced`].
    /// Rows taken from them skip the staging copy.
    pub fn take_send_buffers(&mut self) -> Option<(SendBuf, SendBuf)> {
        if std::mem::replace(&mut self.send_bufs_taken, true) {
            return None;
        }
        let r = self.recv.region.clone();
        let sh = self.shape;
        let (hidden, dtype) = (self.cfg.hidden, self.cfg.dtype);
        Some((
            SendBuf {
                region: r.clone(),
                off: sh.user_input,
                len: sh.max_tokens * sh.crow,
                hidden,
                dtype,
            },
            SendBuf {
                region: r,
                off: sh.user_expert_out,
                len: sh.world * sh.max_tokens * sh.crow,
                hidden,
                dtype,
            },
        ))
    }

    /// Deregisters the group's regions from the engine (waiting up to
    /// `timeout` for peers to unmap them and for batches in flight), so a
    /// rebuilt group on the same engine does not keep the old buffers.
    /// Send buffers the caller still holds stay readable and writable, but
    /// no longer registered.
    pub fn close(mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pending = std::mem::take(&mut self.pending_dispatch);
        pending.append(&mut self.pending_combine);
        for p in pending {
            // Outcomes no longer matter; the batches only must not be running.
            let _ = p.batch.wait_blocking(Self::left(deadline));
        }
        let mut first_err = None;
        for r in [&self.recv.region, &self.staging.region] {
            if let Err(e) = self.engine.deregister(r, Self::left(deadline)) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Phase times of the last dispatch or combine.
    pub fn last_timings(&self) -> OpTimings {
        self.timings
    }

    /// Fails if an earlier operation broke the group.
    fn usable(&self) -> Result<()> {
        match &self.broken {
            Some(why) => Err(Error::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Marks the group broken when `r` is an error that may leave the ranks
    /// out of step (anything but an argument check), and tells the peers
    /// whom it blames.
    fn note<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            let found_here = matches!(
                e,
                Error::PeerTimeout { .. } | Error::Transfer { .. } | Error::Protocol { .. }
            );
            // Argument checks fail before anything moves; every other
            // failure may leave the ranks out of step.
            if !matches!(e, Error::Invalid(_) | Error::Config(_) | Error::Broken(_)) {
                self.broken = Some(e.to_string());
            }
            if let (true, Some(blamed)) = (found_here, e.rank()) {
                self.announce(blamed);
            }
        }
        r
    }

    /// Tells every other peer that this rank gave up because of `blamed`
    /// (best effort: an abort doorbell, nothing waited for), so they stop
    /// waiting for this rank and blame the right one.
    fn announce(&mut self, blamed: usize) {
        let v = ((blamed as u64 + 1) << 24) | 1;
        let deadline = Instant::now() + Duration::from_millis(200);
        for d in self.peers().collect::<Vec<_>>() {
            if d == blamed {
                continue;
            }
            let off = self.shape.bell_out(Kind::Abort, 0, d);
            self.staging
                .bytes_mut(off, BELL_WRITE)
                .copy_from_slice(&bell_words(v, 0));
            let op = Op::write(
                self.staging_id,
                off as u64,
                self.remote(d),
                self.shape.bell_in(Kind::Abort, 0, self.rank) as u64,
                BELL_WRITE as u64,
            );
            let opts = BatchOptions {
                timeout: Some(Self::left(deadline)),
                notify: None,
            };
            if let Err(e) = self.engine.submit(&[op], opts) {
                tracing::debug!("abort doorbell to rank {d}: {e}");
            }
        }
    }

    /// Fails if a peer announced that it gave up on the group.
    fn check_aborts(&self) -> Result<()> {
        for s in self.peers() {
            if let Some((q, _, _)) = self.read_bell(Kind::Abort, 0, s) {
                if q > 0 {
                    return Err(Error::PeerFailed {
                        rank: q as usize - 1,
                        reported_by: s,
                    });
                }
            }
        }
        Ok(())
    }

    fn ctl(&self, kind: Kind, seq: u64, count: u32) -> Ctl {
        Ctl {
            group: self.group_id,
            kind,
            seq,
            src: self.rank as u32,
            count,
            offset: 0,
        }
    }

    fn peers(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.world).map(move |i| (self.rank + i) % self.world)
    }

    fn remote(&self, r: usize) -> RemoteRegion {
        self.remotes[r].expect("peer rank has a remote region")
    }

    fn left(deadline: Instant) -> Duration {
        deadline.saturating_duration_since(Instant::now())
    }

    fn probe(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.cfg.timeout;
        let mut sig = [0u8; PROBE_BYTES];
        sig[..8].copy_from_slice(&self.group_id.to_le_bytes());
        sig[8..16].copy_from_slice(&(self.rank as u64).to_le_bytes());
        // The staging region's first bytes are free until the first dispatch.
        self.staging.bytes_mut(0, PROBE_BYTES).copy_from_slice(&sig);
        let mut pending = Vec::new();
        for d in self.peers().collect::<Vec<_>>() {
            let op = Op::write(
                self.staging_id,
                0,
                self.remote(d),
                (self.rank * PROBE_BYTES) as u64,
                PROBE_BYTES as u64,
            );
            let b = self.engine.submit(
                &[op],
                BatchOptions {
                    timeout: Some(Self::left(deadline)),
                    notify: Some(self.ctl(Kind::Hello, 0, 0).encode(&[])),
                },
            )?;
            pending.push(Pending {
                rank: d,
                op: "group formation",
                seq: 0,
                batch: b,
            });
        }
        let r = self.collect(Kind::Hello, 0, deadline, &mut pending);
        let r = r.and_then(|_| self.settle_list(pending, deadline));
        self.note(r)?;
        for s in self.peers().collect::<Vec<_>>() {
            let got = self.recv.bytes(s * PROBE_BYTES, PROBE_BYTES);
            if got[..8] != self.group_id.to_le_bytes() || got[8..16] != (s as u64).to_le_bytes() {
                let e = Error::Protocol {
                    rank: s,
                    op: "group formation",
                    reason: "probe write did not land".into(),
                };
                return self.note(Err(e));
            }
        }
        Ok(())
    }

    /// Decides with every peer whether combine rows between the two travel
    /// by pull: both must already map the other's receive region over
    /// `shm` (the probe mapped it). Each rank writes "I can view yours"
    /// into its probe slot at the peer, then a barrier; the pair pulls only
    /// if both said yes, so both sides reach the same answer.
    fn agree_pull(&mut self) -> Result<()> {
        if self.cfg.exchange != Exchange::OneSided {
            return Ok(());
        }
        let deadline = Instant::now() + self.cfg.timeout;
        let seq = self.barrier_seq;
        self.barrier_seq += 1;
        let mut mine = vec![false; self.world];
        let mut pieces: Vec<Option<Piece>> = vec![None; self.world];
        for d in self.peers().collect::<Vec<_>>() {
            mine[d] = self.engine.shm_view(&self.remote(d)).is_some();
            // Staging is free until the first dispatch (past the probe's
            // first 64 bytes).
            let off = PROBE_BYTES * (1 + d);
            self.staging
                .bytes_mut(off, 8)
                .copy_from_slice(&u64::from(mine[d]).to_le_bytes());
            pieces[d] = Some(Piece {
                region: self.staging_id,
                src_off: off,
                dst_off: self.rank * PROBE_BYTES + 16,
                len: 8,
            });
        }
        let r = self.barrier_inner(seq, deadline, &pieces);
        self.note(r)?;
        for s in self.peers().collect::<Vec<_>>() {
            let theirs = self.recv.bytes(s * PROBE_BYTES + 16, 8) == 1u64.to_le_bytes();
            self.pull[s] = mine[s] && theirs;
        }
        Ok(())
    }

    /// Waits until every rank has reached the barrier (or the timeout,
    /// naming a rank that did not).
    pub fn barrier(&mut self) -> Result<()> {
        self.usable()?;
        let deadline = Instant::now() + self.cfg.timeout;
        let seq = self.barrier_seq;
        self.barrier_seq += 1;
        let r = self.barrier_inner(seq, deadline, &[]);
        self.note(r)
    }

    /// A barrier round; `extra[d]`, when given, is a piece written to peer
    /// `d` before its doorbell.
    fn barrier_inner(
        &mut self,
        seq: u64,
        deadline: Instant,
        extra: &[Option<Piece>],
    ) -> Result<()> {
        let mut pending = Vec::new();
        let mut data = Vec::new();
        for d in self.peers().collect::<Vec<_>>() {
            let piece = extra.get(d).copied().flatten();
            self.send_part(
                d,
                Kind::Barrier,
                seq,
                0,
                piece.as_slice(),
                deadline,
                &mut pending,
                &mut data,
            )?;
        }
        self.finish_sends(data, Kind::Barrier, seq, deadline, &mut pending)?;
        self.collect_part(Kind::Barrier, seq, deadline, &mut pending)?;
        self.settle_list(pending, deadline)
    }

    /// Waits for earlier batches (whose staging is about to be reused).
    fn settle_list(&mut self, list: Vec<Pending>, deadline: Instant) -> Result<()> {
        for p in list {
            match p.batch.wait_blocking(Self::left(deadline)) {
                None => {
                    return Err(Error::PeerTimeout {
                        rank: p.rank,
                        op: p.op,
                        seq: p.seq,
                        waited: self.cfg.timeout,
                        others: Vec::new(),
                    })
                }
                Some(st) => p.check(&st)?,
            }
        }
        Ok(())
    }

    /// Fails fast if an outgoing batch already failed.
    fn check_pending(list: &[Pending]) -> Result<()> {
        for p in list {
            if let Some(st) = p.batch.poll() {
                p.check(&st)?;
            }
        }
        Ok(())
    }

    /// Bytes a peer's part of operation `kind` carries inline (two-sided).
    fn inline_bytes(&self, kind: Kind, count: u32) -> usize {
        if self.cfg.exchange == Exchange::OneSided {
            return 0;
        }
        match kind {
            Kind::Dispatch => count as usize * self.shape.drow(),
            Kind::Combine => count as usize * self.shape.crow,
            _ => 0,
        }
    }

    /// Operations of `kind` this rank has started.
    fn next_seq(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Hello => 1,
            Kind::Dispatch => self.dispatch_seq,
            Kind::Combine => self.combine_seq,
            Kind::Barrier => self.barrier_seq,
            Kind::Abort | Kind::Release => 0,
        }
    }

    /// Applies one message of the operation being collected.
    fn apply(
        &mut self,
        ctl: Ctl,
        payload: &[u8],
        arrivals: &mut [Arrival],
        parity: usize,
    ) -> Result<()> {
        let s = ctl.src as usize;
        let op = ctl.kind.name();
        let a = &mut arrivals[s];
        if a.count.is_some_and(|c| c != ctl.count) {
            return Err(Error::Protocol {
                rank: s,
                op,
                reason: "row count changed within one operation".into(),
            });
        }
        if ctl.count as usize > self.shape.max_tokens {
            return Err(Error::Protocol {
                rank: s,
                op,
                reason: format!(
                    "{} rows exceed max_tokens_per_rank {}",
                    ctl.count, self.shape.max_tokens
                ),
            });
        }
        a.count = Some(ctl.count);
        if !payload.is_empty() {
            // Two-sided chunks name their place in the receive region; it
            // must lie inside the sender's slot of this operation.
            let (base, total) = match ctl.kind {
                Kind::Dispatch => (self.shape.dispatch_slot(parity, s), self.shape.dslot),
                Kind::Combine => (self.shape.combine_slot(parity, s), self.shape.cslot()),
                _ => (0, 0),
            };
            let off = ctl.offset as usize;
            if self.cfg.exchange == Exchange::OneSided
                || off < base
                || off
                    .checked_add(payload.len())
                    .is_none_or(|e| e > base + total)
            {
                return Err(Error::Protocol {
                    rank: s,
                    op,
                    reason: format!("chunk at {off}+{} outside its slot", payload.len()),
                });
            }
            self.recv
                .bytes_mut(off, payload.len())
                .copy_from_slice(payload);
            arrivals[s].data += payload.len();
        }
        Ok(())
    }

    /// Collects every peer's part of operation (`kind`, `seq`): their
    /// notifications (and, two-sided, their rows). Returns the row count
    /// per rank (own entry 0). Buffers messages of later operations; drops
    /// stale and foreign ones.
    fn collect(
        &mut self,
        kind: Kind,
        seq: u64,
        deadline: Instant,
        pending: &mut [Pending],
    ) -> Result<Vec<u32>> {
        let parity = (seq % 2) as usize;
        let mut arrivals = vec![Arrival::default(); self.world];
        let peers: Vec<usize> = self.peers().collect();
        for &s in &peers {
            if let Some(msgs) = self.inbox.remove(&(kind, seq, s)) {
                for (c, p) in msgs {
                    self.inbox_bytes -= p.len() + HEADER;
                    self.apply(c, &p, &mut arrivals, parity)?;
                }
            }
        }
        let done =
            |g: &Self, a: &Arrival| a.count.is_some_and(|c| a.data == g.inline_bytes(kind, c));
        loop {
            if peers.iter().all(|&s| done(self, &arrivals[s])) {
                break;
            }
            self.check_aborts()?;
            Self::check_pending(pending)?;
            let left = Self::left(deadline);
            if left.is_zero() {
                let mut missing: Vec<usize> = peers
                    .iter()
                    .copied()
                    .filter(|&s| !done(self, &arrivals[s]))
                    .collect();
                // A live peer's engine acknowledges our messages even while
                // its caller is busy elsewhere; a stopped or dead one does
                // not. Blame ranks with unacknowledged batches first.
                missing.sort_by_key(|&s| {
                    !pending
                        .iter()
                        .any(|p| p.rank == s && p.batch.poll().is_none())
                });
                return Err(Error::PeerTimeout {
                    rank: missing[0],
                    op: kind.name(),
                    seq,
                    waited: self.cfg.timeout,
                    others: missing[1..].to_vec(),
                });
            }
            // Wake up now and then to notice failed outgoing batches.
            let slice = left.min(Duration::from_millis(20));
            let n = match block_on_timeout(self.engine.recv_notification(), slice) {
                None => continue,
                Some(None) => {
                    return Err(Error::Broken(
                        "the engine's notification queue closed".into(),
                    ))
                }
                Some(Some(n)) => n,
            };
            let Some((c, payload)) = Ctl::decode(&n.data) else {
                tracing::debug!("dropping a notification that is not an EP message");
                continue;
            };
            let from = self.ranks_by_engine.get(&n.from).copied();
            if c.group != self.group_id || from != Some(c.src as usize) || from == Some(self.rank) {
                tracing::debug!(kind = ?c.kind, seq = c.seq, "dropping a message of another group");
                continue;
            }
            if c.kind == kind && c.seq == seq {
                self.apply(c, payload, &mut arrivals, parity)?;
            } else if c.seq >= self.next_seq(c.kind) {
                // A peer is ahead of us (it can be one operation ahead): keep
                // the message for the operation it belongs to.
                self.inbox_bytes += payload.len() + HEADER;
                if self.inbox_bytes > 2 * self.shape.recv_len + (64 << 10) {
                    return Err(Error::Protocol {
                        rank: c.src as usize,
                        op: c.kind.name(),
                        reason: "too many early messages".into(),
                    });
                }
                self.inbox
                    .entry((c.kind, c.seq, c.src as usize))
                    .or_default()
                    .push((c, payload.to_vec()));
            } else {
                tracing::debug!(kind = ?c.kind, seq = c.seq, "dropping a stale message");
            }
        }
        let mut counts: Vec<u32> = arrivals.iter().map(|a| a.count.unwrap_or(0)).collect();
        counts[self.rank] = 0;
        Ok(counts)
    }

    /// Sends this rank's part of operation (`kind`, `seq`) to rank `d`:
    /// `count` rows in `pieces`. One-sided, the data batch is submitted now
    /// and the doorbell rung by [`Self::finish_sends`] once it has landed;
    /// two-sided, everything goes in notifications now.
    #[allow(clippy::too_many_arguments)]
    fn send_part(
        &mut self,
        d: usize,
        kind: Kind,
        seq: u64,
        count: usize,
        pieces: &[Piece],
        deadline: Instant,
        pending: &mut Vec<Pending>,
        data: &mut Vec<(usize, u32, Batch)>,
    ) -> Result<()> {
        let ctl = self.ctl(kind, seq, count as u32);
        if self.cfg.exchange == Exchange::TwoSided {
            return self.post(d, ctl, pieces, deadline, pending);
        }
        if pieces.is_empty() {
            return self.ring(d, kind, seq, count as u32, deadline, pending);
        }
        let peer = self.remote(d);
        let ops: Vec<Op> = pieces
            .iter()
            .map(|p| {
                Op::write(
                    p.region,
                    p.src_off as u64,
                    peer,
                    p.dst_off as u64,
                    p.len as u64,
                )
            })
            .collect();
        let t = Instant::now();
        let b = self.engine.submit(
            &ops,
            BatchOptions {
                timeout: Some(Self::left(deadline)),
                notify: None,
            },
        )?;
        self.engine_acc += t.elapsed();
        data.push((d, count as u32, b));
        Ok(())
    }

    /// Waits for each data batch to land, then rings its doorbell.
    fn finish_sends(
        &mut self,
        data: Vec<(usize, u32, Batch)>,
        kind: Kind,
        seq: u64,
        deadline: Instant,
        pending: &mut Vec<Pending>,
    ) -> Result<()> {
        let t = Instant::now();
        for (d, count, b) in data {
            self.settle_list(
                vec![Pending {
                    rank: d,
                    op: kind.name(),
                    seq,
                    batch: b,
                }],
                deadline,
            )?;
            self.ring(d, kind, seq, count, deadline, pending)?;
        }
        self.engine_acc += t.elapsed();
        Ok(())
    }

    /// Writes (`seq`, `count`) into this rank's doorbell at rank `d`: the
    /// value and its complement, so a reader can tell a torn write.
    #[allow(clippy::too_many_arguments)]
    fn ring(
        &mut self,
        d: usize,
        kind: Kind,
        seq: u64,
        count: u32,
        deadline: Instant,
        pending: &mut Vec<Pending>,
    ) -> Result<()> {
        self.ring_at(d, kind, seq, count, 0, deadline, pending)
    }

    /// [`Self::ring`] with an offset for the reader (where, in this rank's
    /// receive region, rows to pull start), checked against the value too.
    #[allow(clippy::too_many_arguments)]
    fn ring_at(
        &mut self,
        d: usize,
        kind: Kind,
        seq: u64,
        count: u32,
        at: u64,
        deadline: Instant,
        pending: &mut Vec<Pending>,
    ) -> Result<()> {
        let parity = (seq % 2) as usize;
        let v = ((seq + 1) << 24) | count as u64;
        let off = self.shape.bell_out(kind, parity, d);
        self.staging
            .bytes_mut(off, BELL_WRITE)
            .copy_from_slice(&bell_words(v, at));
        let op = Op::write(
            self.staging_id,
            off as u64,
            self.remote(d),
            self.shape.bell_in(kind, parity, self.rank) as u64,
            BELL_WRITE as u64,
        );
        let batch = self.engine.submit(
            &[op],
            BatchOptions {
                timeout: Some(Self::left(deadline)),
                notify: None,
            },
        )?;
        pending.push(Pending {
            rank: d,
            op: kind.name(),
            seq,
            batch,
        });
        Ok(())
    }

    /// Rank `src`'s doorbell for (`kind`, `parity`): (seq + 1, count,
    /// offset), or `None` while it reads torn.
    fn read_bell(&self, kind: Kind, parity: usize, src: usize) -> Option<(u64, u32, u64)> {
        let off = self.shape.bell_in(kind, parity, src);
        let v = self.recv.load_u64(off);
        let check = self.recv.load_u64(off + 8);
        if check != !v {
            return None;
        }
        let at = self.recv.load_u64(off + 16);
        let check = self.recv.load_u64(off + 24);
        (check == !(at ^ v)).then_some((v >> 24, (v & 0xFF_FFFF) as u32, at))
    }

    /// Collects every peer's part of operation (`kind`, `seq`): row counts
    /// per rank (own entry 0).
    fn collect_part(
        &mut self,
        kind: Kind,
        seq: u64,
        deadline: Instant,
        pending: &mut [Pending],
    ) -> Result<Vec<u32>> {
        if self.cfg.exchange == Exchange::TwoSided {
            return self.collect(kind, seq, deadline, pending);
        }
        let peers: Vec<usize> = self.peers().collect();
        self.collect_bells(kind, seq, &peers, deadline, pending)
    }

    /// Waits for the peers' doorbells of (`kind`, `seq`). Spins, then
    /// yields (so waiting ranks leave the CPU to the ranks and engine threads
    /// still copying on a small machine, yet notice a doorbell at once), then
    /// sleeps in short steps.
    fn collect_bells(
        &mut self,
        kind: Kind,
        seq: u64,
        peers: &[usize],
        deadline: Instant,
        pending: &mut [Pending],
    ) -> Result<Vec<u32>> {
        let parity = (seq % 2) as usize;
        let want = seq + 1;
        let mut counts = vec![0u32; self.world];
        let mut got = vec![false; self.world];
        let start = Instant::now();
        let mut round = 0u32;
        loop {
            let mut all = true;
            for &s in peers {
                if got[s] {
                    continue;
                }
                match self.read_bell(kind, parity, s) {
                    Some((q, c, at)) if q == want => {
                        if c as usize > self.shape.max_tokens {
                            return Err(Error::Protocol {
                                rank: s,
                                op: kind.name(),
                                reason: format!("{c} rows exceed max_tokens_per_rank"),
                            });
                        }
                        got[s] = true;
                        counts[s] = c;
                        self.bell_offs[s] = at;
                    }
                    Some((q, _, _)) if q > want => {
                        return Err(Error::Protocol {
                            rank: s,
                            op: kind.name(),
                            reason: format!(
                                "rang for operation {} while this rank is at {seq}",
                                q - 1
                            ),
                        })
                    }
                    _ => all = false,
                }
            }
            if all {
                return Ok(counts);
            }
            round += 1;
            if round & 63 == 0 {
                self.check_aborts()?;
                Self::check_pending(pending)?;
                if Instant::now() >= deadline {
                    let mut missing: Vec<usize> =
                        peers.iter().copied().filter(|&s| !got[s]).collect();
                    missing.sort_by_key(|&s| {
                        !pending
                            .iter()
                            .any(|p| p.rank == s && p.batch.poll().is_none())
                    });
                    return Err(Error::PeerTimeout {
                        rank: missing[0],
                        op: kind.name(),
                        seq,
                        waited: self.cfg.timeout,
                        others: missing[1..].to_vec(),
                    });
                }
            }
            // A rank that slept would leave the barrier (and start the next
            // operation) late; keep yielding for a while instead, then back
            // off to short sleeps for long waits.
            if round < 256 || start.elapsed() < self.spin_for {
                std::hint::spin_loop();
            } else if start.elapsed() < SPIN_FOR {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Sends `pieces` to rank `d`'s receive region with the operation's
    /// message; records the batches in `pending`.
    fn post(
        &mut self,
        d: usize,
        ctl: Ctl,
        pieces: &[Piece],
        deadline: Instant,
        pending: &mut Vec<Pending>,
    ) -> Result<()> {
        let timeout = Some(Self::left(deadline));
        let peer = self.remote(d);
        let mut record = |batch| {
            pending.push(Pending {
                rank: d,
                op: ctl.kind.name(),
                seq: ctl.seq,
                batch,
            })
        };
        if pieces.is_empty() {
            record(self.engine.notify(peer.peer, ctl.encode(&[]), timeout)?);
            return Ok(());
        }
        match self.cfg.exchange {
            Exchange::OneSided => {
                let ops: Vec<Op> = pieces
                    .iter()
                    .map(|p| {
                        Op::write(
                            p.region,
                            p.src_off as u64,
                            peer,
                            p.dst_off as u64,
                            p.len as u64,
                        )
                    })
                    .collect();
                record(self.engine.submit(
                    &ops,
                    BatchOptions {
                        timeout,
                        notify: Some(ctl.encode(&[])),
                    },
                )?);
            }
            Exchange::TwoSided => {
                let chunk = kvmesh_gpu::MAX_NOTIFY_BYTES as usize - HEADER;
                let mut buf = vec![0u8; chunk];
                for p in pieces {
                    let src = if p.region == self.staging_id {
                        &self.staging.region
                    } else {
                        &self.recv.region
                    };
                    let mut off = 0;
                    while off < p.len {
                        let n = chunk.min(p.len - off);
                        src.read_at((p.src_off + off) as u64, &mut buf[..n])?;
                        let c = Ctl {
                            offset: (p.dst_off + off) as u64,
                            ..ctl
                        };
                        record(
                            self.engine
                                .notify(peer.peer, c.encode(&buf[..n]), timeout)?,
                        );
                        off += n;
                    }
                }
            }
        }
        Ok(())
    }

    /// Dispatches `x` (`[tokens, hidden]`) by `topk_idx` / `topk_weights`
    /// (`[tokens, topk]`, row-major; `-1` masks an entry). Each token goes
    /// once to each rank holding at least one of its experts.
    pub fn dispatch<'a>(
        &'a mut self,
        x: Rows<'a>,
        topk_idx: &[i32],
        topk_weights: &[f32],
    ) -> Result<Dispatched<'a>> {
        self.usable()?;
        let t0 = Instant::now();
        let k = self.cfg.topk;
        if topk_idx.len() != x.num_rows() * k || topk_weights.len() != topk_idx.len() {
            return Err(Error::Invalid(format!(
                "{} tokens need {} topk entries and weights, got {} and {}",
                x.num_rows(),
                x.num_rows() * k,
                topk_idx.len(),
                topk_weights.len()
            )));
        }
        let plan = layout::plan_sends(topk_idx, k, self.map).map_err(Error::Invalid)?;
        let plan_us = us(t0.elapsed());
        let inner = HandleInner {
            group: self.group_id,
            tokens: x.num_rows(),
            topk_idx: topk_idx.to_vec(),
            topk_w: topk_weights.to_vec(),
            plan,
            recv: RecvIndex {
                recv_off: Vec::new(),
                token: Vec::new(),
                expert_off: Vec::new(),
                expert_rows: Vec::new(),
                expert_w: Vec::new(),
                row_off: Vec::new(),
                row_entries: Vec::new(),
            },
        };
        let r = self.dispatch_inner(x, inner, None);
        let r = self.note(r);
        self.timings.plan_us = plan_us;
        let (handle, parity) = r?;
        let own = (self.cfg.dispatch_format == WireFormat::Native).then_some(x);
        Ok(Dispatched {
            group: self,
            handle,
            parity,
            own,
        })
    }

    /// Dispatches new activations with the routing of an earlier dispatch
    /// (every rank must reuse its handle of the same operation).
    pub fn dispatch_with<'a>(&'a mut self, x: Rows<'a>, handle: &Handle) -> Result<Dispatched<'a>> {
        self.usable()?;
        if handle.0.group != self.group_id {
            return Err(Error::Invalid("handle belongs to another group".into()));
        }
        if x.num_rows() != handle.0.tokens {
            return Err(Error::Invalid(format!(
                "{} tokens, the handle routed {}",
                x.num_rows(),
                handle.0.tokens
            )));
        }
        let r = self.dispatch_inner(x, HandleInner::placeholder(), Some(handle));
        let r = self.note(r);
        self.timings.plan_us = 0.0;
        let (handle, parity) = r?;
        let own = (self.cfg.dispatch_format == WireFormat::Native).then_some(x);
        Ok(Dispatched {
            group: self,
            handle,
            parity,
            own,
        })
    }

    fn check_rows(&self, x: &Rows<'_>, what: &str) -> Result<()> {
        if x.hidden != self.cfg.hidden || x.dtype != self.cfg.dtype {
            return Err(Error::Invalid(format!(
                "{what}: {}-channel {} rows, the group uses {}-channel {}",
                x.hidden,
                x.dtype.name(),
                self.cfg.hidden,
                self.cfg.dtype.name()
            )));
        }
        Ok(())
    }

    /// Writes the payload rows of `tokens` at `buf` (copy, or quantize).
    fn pack_payload(
        shape: &Shape,
        cfg: &EpConfig,
        buf: &mut [u8],
        x: &Rows<'_>,
        tokens: &[u32],
        scratch: &mut [f32],
    ) {
        for (row, &t) in buf.chunks_exact_mut(shape.payload).zip(tokens) {
            let src = x.row(t as usize);
            match cfg.dispatch_format {
                WireFormat::Native => row.copy_from_slice(src),
                WireFormat::Fp8E4M3 => {
                    dtype::to_f32(src, cfg.dtype, scratch);
                    dtype::quantize_fp8(scratch, row);
                }
            }
        }
    }

    /// Writes the metadata rows (token, local experts on `dst`, weights) of
    /// `tokens` at `buf`.
    fn pack_meta(
        shape: &Shape,
        map: ExpertMap,
        buf: &mut [u8],
        tokens: &[u32],
        h: &HandleInner,
        dst: usize,
    ) {
        let k = h.topk_idx.len() / h.tokens.max(1);
        let mut le = [0u16; 64];
        let mut lw = [0f32; 64];
        for (row, &t) in buf.chunks_exact_mut(shape.meta).zip(tokens) {
            let t = t as usize;
            let idx = &h.topk_idx[t * k..(t + 1) * k];
            let w = &h.topk_w[t * k..(t + 1) * k];
            layout::row_entries(idx, w, map, dst, &mut le[..k], &mut lw[..k]);
            row[..4].copy_from_slice(&(t as u32).to_le_bytes());
            for j in 0..k {
                let o = shape.meta_experts + 2 * j;
                row[o..o + 2].copy_from_slice(&le[j].to_le_bytes());
                let o = shape.meta_weights + 4 * j;
                row[o..o + 4].copy_from_slice(&lw[j].to_le_bytes());
            }
        }
    }

    /// Where rows of `x` can be sent from without a copy: (region, offset
    /// of row 0), if `x` lives in this group's send buffers and travels in
    /// its own format.
    fn in_place(&self, x: &Rows<'_>, wire_native: bool) -> Option<(RegionId, usize)> {
        // Region ids are per engine: also check the rows really lie in this
        // group's send buffers.
        let base = self.recv.region.as_ptr() as usize;
        let start = x.bytes.as_ptr() as usize;
        x.region.filter(|(id, off)| {
            wire_native
                && *id == self.recv.region.id()
                && start == base + off
                && *off >= self.shape.user_input
                && off + x.bytes.len() <= self.shape.user_end
        })
    }

    fn dispatch_inner(
        &mut self,
        x: Rows<'_>,
        fresh: HandleInner,
        reuse: Option<&Handle>,
    ) -> Result<(Handle, usize)> {
        self.check_rows(&x, "dispatch")?;
        if self.cfg.topk > 64 {
            return Err(Error::Config("topk above 64 is not supported".into()));
        }
        if x.num_rows() > self.shape.max_tokens {
            return Err(Error::Invalid(format!(
                "{} tokens exceed max_tokens_per_rank {}",
                x.num_rows(),
                self.shape.max_tokens
            )));
        }
        let t0 = Instant::now();
        let deadline = t0 + self.cfg.timeout;
        let prev = std::mem::take(&mut self.pending_dispatch);
        self.settle_list(prev, deadline)?;
        let t1 = Instant::now();
        let seq = self.dispatch_seq;
        self.dispatch_seq += 1;
        let parity = (seq % 2) as usize;
        let h: &HandleInner = match reuse {
            Some(h) => &h.0,
            None => &fresh,
        };
        let mut pending = Vec::with_capacity(self.world);
        let (shape, cfg, map) = (self.shape, self.cfg.clone(), self.map);
        let native = cfg.dispatch_format == WireFormat::Native;
        let in_place = self.in_place(&x, native);
        let me = self.rank;
        let mut pieces = Vec::new();
        let mut data = Vec::new();
        for d in self.peers().collect::<Vec<_>>() {
            let tokens = &h.plan.send[d];
            let n = tokens.len();
            let (stage, slot) = (shape.staging_dispatch(d), shape.dispatch_slot(parity, me));
            pieces.clear();
            if n > 0 {
                match in_place {
                    Some((region, base)) => {
                        // One piece per run of consecutive tokens.
                        let mut j = 0;
                        while j < n {
                            let mut r = 1;
                            while j + r < n && tokens[j + r] == tokens[j] + r as u32 {
                                r += 1;
                            }
                            pieces.push(Piece {
                                region,
                                src_off: base + tokens[j] as usize * shape.crow,
                                dst_off: slot + j * shape.payload,
                                len: r * shape.payload,
                            });
                            j += r;
                        }
                    }
                    None => {
                        let buf = self.staging.bytes_mut(stage, n * shape.payload);
                        Self::pack_payload(&shape, &cfg, buf, &x, tokens, &mut self.scratch);
                        pieces.push(Piece {
                            region: self.staging_id,
                            src_off: stage,
                            dst_off: slot,
                            len: n * shape.payload,
                        });
                    }
                }
                let buf = self.staging.bytes_mut(stage + shape.dmeta, n * shape.meta);
                Self::pack_meta(&shape, map, buf, tokens, h, d);
                pieces.push(Piece {
                    region: self.staging_id,
                    src_off: stage + shape.dmeta,
                    dst_off: slot + shape.dmeta,
                    len: n * shape.meta,
                });
            }
            self.send_part(
                d,
                Kind::Dispatch,
                seq,
                n,
                &pieces,
                deadline,
                &mut pending,
                &mut data,
            )?;
        }
        // Own rows stay where they are (their metadata is written for the
        // index), unless they must be quantized.
        let own = &h.plan.send[me];
        let slot = shape.dispatch_slot(parity, me);
        if !native {
            let buf = self.recv.bytes_mut(slot, own.len() * shape.payload);
            Self::pack_payload(&shape, &cfg, buf, &x, own, &mut self.scratch);
        }
        let buf = self
            .recv
            .bytes_mut(slot + shape.dmeta, own.len() * shape.meta);
        Self::pack_meta(&shape, map, buf, own, h, me);
        // Data batches (which may read the caller's send buffer) have landed
        // once their doorbells ring.
        let r = self.finish_sends(data, Kind::Dispatch, seq, deadline, &mut pending);
        let t2 = Instant::now();
        let r = r.and_then(|_| self.collect_part(Kind::Dispatch, seq, deadline, &mut pending));
        self.pending_dispatch = pending;
        let mut counts = r?;
        counts[me] = own.len() as u32;
        let t3 = Instant::now();
        let handle = match reuse {
            Some(h) => {
                let want = h.recv_counts();
                if let Some(s) = (0..self.world).find(|&s| want[s] != counts[s] as usize) {
                    return Err(Error::Protocol {
                        rank: s,
                        op: "dispatch",
                        reason: format!(
                            "sent {} rows, the reused handle expects {} (routing differs?)",
                            counts[s], want[s]
                        ),
                    });
                }
                h.clone()
            }
            None => {
                let recv = self.read_index(&counts, parity)?;
                Handle(Arc::new(HandleInner { recv, ..fresh }))
            }
        };
        self.timings = OpTimings {
            settle_us: us(t1 - t0),
            plan_us: 0.0,
            send_us: us(t2 - t1),
            engine_us: us(std::mem::take(&mut self.engine_acc)),
            wait_us: us(t3 - t2),
            finish_us: us(t3.elapsed()),
        };
        Ok((handle, parity))
    }

    /// Reads the metadata of every received row and builds the index.
    fn read_index(&mut self, counts: &[u32], parity: usize) -> Result<RecvIndex> {
        let k = self.cfg.topk;
        let sh = self.shape;
        let num_local = self.map.local(self.rank).len();
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        let mut tokens = Vec::with_capacity(total);
        self.meta_experts.clear();
        self.meta_weights.clear();
        for (s, &c) in counts.iter().enumerate() {
            let base = sh.dispatch_slot(parity, s) + sh.dmeta;
            let block = self.recv.bytes(base, c as usize * sh.meta);
            for (j, row) in block.chunks_exact(sh.meta).enumerate() {
                tokens.push(u32::from_le_bytes([row[0], row[1], row[2], row[3]]));
                for i in 0..k {
                    let o = sh.meta_experts + 2 * i;
                    let e = u16::from_le_bytes([row[o], row[o + 1]]);
                    if e != layout::NOT_LOCAL && e as usize >= num_local {
                        return Err(Error::Protocol {
                            rank: s,
                            op: "dispatch",
                            reason: format!("row {j} names local expert {e} of {num_local}"),
                        });
                    }
                    self.meta_experts.push(e);
                    let o = sh.meta_weights + 4 * i;
                    self.meta_weights.push(f32::from_le_bytes([
                        row[o],
                        row[o + 1],
                        row[o + 2],
                        row[o + 3],
                    ]));
                }
            }
        }
        let rows = tokens.iter().enumerate().map(|(i, &t)| RowMeta {
            token: t,
            experts: &self.meta_experts[i * k..(i + 1) * k],
            weights: &self.meta_weights[i * k..(i + 1) * k],
        });
        // Every local expert index was checked above.
        layout::build_recv_index(counts, num_local, rows).map_err(Error::Invalid)
    }

    /// Combines expert outputs back to the tokens' ranks and sums them with
    /// the gate weights; returns `[tokens, hidden]` in the activation dtype.
    ///
    /// Result, bit for bit: `y[t] = round(Σ_{d asc} f32(P_d[t]))` where
    /// `P_d[t] = round(Σ_{e on d, asc} w_e × f32(out_e[t]))` (f32, left to
    /// right from +0.0, separate multiply and add), or the caller's row in
    /// [`ExpertOut::Reduced`] mode. A token with no expert gives zeros.
    pub fn combine(&mut self, out: ExpertOut<'_>, handle: &Handle) -> Result<Tensor> {
        let mut t = Tensor::zeros(handle.0.tokens, self.cfg.hidden, self.cfg.dtype);
        self.combine_into(out, handle, &mut t.bytes)?;
        Ok(t)
    }

    /// [`Self::combine`] into a caller buffer of `tokens × hidden` elements.
    pub fn combine_into(
        &mut self,
        out: ExpertOut<'_>,
        handle: &Handle,
        dst: &mut [u8],
    ) -> Result<()> {
        self.usable()?;
        let h = &handle.0;
        if h.group != self.group_id {
            return Err(Error::Invalid("handle belongs to another group".into()));
        }
        let (rows, want, what) = match out {
            ExpertOut::PerExpert(r) => (r, h.recv.num_entries(), "expert-major entries"),
            ExpertOut::Reduced(r) => (r, h.recv.num_rows(), "received rows"),
        };
        self.check_rows(&rows, "combine")?;
        if rows.num_rows() != want {
            return Err(Error::Invalid(format!(
                "combine got {} rows, the handle has {want} {what}",
                rows.num_rows()
            )));
        }
        if dst.len() != h.tokens * self.shape.crow {
            return Err(Error::Invalid(format!(
                "combine output of {} bytes, need {}",
                dst.len(),
                h.tokens * self.shape.crow
            )));
        }
        let r = self.combine_inner(out, h, dst);
        self.note(r)
    }

    /// Partial rows (one per received row in `range`) into `buf`.
    fn partials(
        cfg: &EpConfig,
        crow: usize,
        out: ExpertOut<'_>,
        ix: &RecvIndex,
        range: std::ops::Range<usize>,
        buf: &mut [u8],
        acc: &mut [f32],
    ) {
        match out {
            ExpertOut::Reduced(r) => {
                let a = range.start * crow;
                buf.copy_from_slice(&r.bytes[a..a + range.len() * crow]);
            }
            ExpertOut::PerExpert(r) => {
                for (i, dst) in range.zip(buf.chunks_exact_mut(crow)) {
                    acc.fill(0.0);
                    let es = &ix.row_entries[ix.row_off[i] as usize..ix.row_off[i + 1] as usize];
                    for &p in es {
                        dtype::axpy(acc, r.row(p as usize), cfg.dtype, ix.expert_w[p as usize]);
                    }
                    dtype::store(acc, dst, cfg.dtype);
                }
            }
        }
    }

    fn combine_inner(&mut self, out: ExpertOut<'_>, h: &HandleInner, dst: &mut [u8]) -> Result<()> {
        let t0 = Instant::now();
        let deadline = t0 + self.cfg.timeout;
        let prev = std::mem::take(&mut self.pending_combine);
        self.settle_list(prev, deadline)?;
        let t1 = Instant::now();
        let seq = self.combine_seq;
        self.combine_seq += 1;
        let parity = (seq % 2) as usize;
        let (shape, cfg) = (self.shape, self.cfg.clone());
        let ix = &h.recv;
        let me = self.rank;
        let mut pending = Vec::with_capacity(self.world);
        let mut data = Vec::new();
        let in_place = match out {
            ExpertOut::Reduced(r) => self.in_place(&r, true),
            ExpertOut::PerExpert(_) => None,
        };
        // Peers that read rows in place from the caller's send buffer: this
        // rank may return only once they are done.
        let mut exposed = Vec::new();
        for s in self.peers().collect::<Vec<_>>() {
            let range = ix.recv_off[s] as usize..ix.recv_off[s + 1] as usize;
            let n = range.len();
            if self.pull[s] {
                // `s` reads the rows from this rank's receive region: in
                // place from the send buffer, or from this rank's own slot
                // (p, s), which `s` never writes (it pulls instead).
                let at = match in_place {
                    Some((_, base)) => {
                        if n > 0 {
                            exposed.push(s);
                        }
                        base + range.start * shape.crow
                    }
                    None => {
                        let at = shape.combine_slot(parity, s);
                        let buf = self.recv.bytes_mut(at, n * shape.crow);
                        Self::partials(&cfg, shape.crow, out, ix, range, buf, &mut self.acc);
                        at
                    }
                };
                self.ring_at(
                    s,
                    Kind::Combine,
                    seq,
                    n as u32,
                    at as u64,
                    deadline,
                    &mut pending,
                )?;
                continue;
            }
            let at = shape.combine_slot(parity, me);
            let piece = match in_place {
                Some((region, base)) => Piece {
                    region,
                    src_off: base + range.start * shape.crow,
                    dst_off: at,
                    len: n * shape.crow,
                },
                None => {
                    let off = shape.staging_combine(s);
                    let buf = self.staging.bytes_mut(off, n * shape.crow);
                    Self::partials(&cfg, shape.crow, out, ix, range, buf, &mut self.acc);
                    Piece {
                        region: self.staging_id,
                        src_off: off,
                        dst_off: at,
                        len: n * shape.crow,
                    }
                }
            };
            let pieces = if n > 0 { vec![piece] } else { Vec::new() };
            self.send_part(
                s,
                Kind::Combine,
                seq,
                n,
                &pieces,
                deadline,
                &mut pending,
                &mut data,
            )?;
        }
        let own = ix.recv_off[me] as usize..ix.recv_off[me + 1] as usize;
        if let ExpertOut::PerExpert(_) = out {
            let buf = self
                .recv
                .bytes_mut(shape.combine_slot(parity, me), own.len() * shape.crow);
            Self::partials(&cfg, shape.crow, out, ix, own.clone(), buf, &mut self.acc);
        }
        let r = self.finish_sends(data, Kind::Combine, seq, deadline, &mut pending);
        let t2 = Instant::now();
        let r = r.and_then(|_| self.collect_part(Kind::Combine, seq, deadline, &mut pending));
        let r = r.and_then(|counts| self.pull_views(&counts, h).map(|v| (counts, v)));
        let (counts, views) = match r {
            Ok(v) => v,
            Err(e) => {
                self.pending_combine = pending;
                return Err(e);
            }
        };
        let t3 = Instant::now();
        let p = &h.plan;
        let mut rows: Vec<&[u8]> = Vec::with_capacity(self.world);
        for (t, y) in dst.chunks_exact_mut(shape.crow).enumerate() {
            rows.clear();
            for &(d, pos) in &p.tok_dst[p.tok_off[t] as usize..p.tok_off[t + 1] as usize] {
                let (d, pos) = (d as usize, pos as usize);
                rows.push(match (out, &views[d]) {
                    (ExpertOut::Reduced(r), _) if d == me => r.row(own.start + pos),
                    (_, Some(v)) => {
                        // SAFETY: `d` wrote these rows before it rang its
                        // combine doorbell (collected above; the range was
                        // checked against the view in `pull_views`), and
                        // writes them again only after this rank's release
                        // doorbell (send-buffer rows: `d` waits for it
                        // before its combine returns) or in its combine
                        // seq + 2 (its own slot), which needs this rank's
                        // combine seq + 1 doorbell, rung after this sum.
                        unsafe {
                            v.bytes(self.bell_offs[d] as usize + pos * shape.crow, shape.crow)
                        }
                    }
                    _ => self
                        .recv
                        .bytes(shape.combine_slot(parity, d) + pos * shape.crow, shape.crow),
                });
            }
            dtype::sum_rows(&rows, y, cfg.dtype, &mut self.acc);
        }
        drop(views);
        let t4 = Instant::now();
        // Tell the pulled peers their rows are no longer read; wait for the
        // peers that read this rank's send buffer.
        let r = (|| -> Result<()> {
            for d in self.peers().collect::<Vec<_>>() {
                if self.pull[d] {
                    self.ring(d, Kind::Release, seq, counts[d], deadline, &mut pending)?;
                }
            }
            if !exposed.is_empty() {
                self.collect_bells(Kind::Release, seq, &exposed, deadline, &mut pending)?;
            }
            Ok(())
        })();
        self.pending_combine = pending;
        r?;
        let t5 = Instant::now();
        self.timings = OpTimings {
            settle_us: us(t1 - t0),
            plan_us: 0.0,
            send_us: us(t2 - t1),
            engine_us: us(std::mem::take(&mut self.engine_acc)),
            wait_us: us((t3 - t2) + (t5 - t4)),
            finish_us: us(t4 - t3),
        };
        Ok(())
    }

    /// Checks the peers' combine row counts, and for the peers this rank
    /// pulls from, takes a view of their receive region and checks that the
    /// rows their doorbells point at lie inside it.
    fn pull_views(&self, counts: &[u32], h: &HandleInner) -> Result<Vec<Option<ShmView>>> {
        let mut views = vec![None; self.world];
        for s in self.peers() {
            if counts[s] as usize != h.plan.send[s].len() {
                return Err(Error::Protocol {
                    rank: s,
                    op: "combine",
                    reason: format!(
                        "returned {} rows for the {} this rank sent",
                        counts[s],
                        h.plan.send[s].len()
                    ),
                });
            }
            if !self.pull[s] {
                continue;
            }
            let bad = |reason: String| Error::Protocol {
                rank: s,
                op: "combine",
                reason,
            };
            let v = self
                .engine
                .shm_view(&self.remote(s))
                .ok_or_else(|| bad("its receive region is no longer mapped here".into()))?;
            let at = self.bell_offs[s];
            let len = counts[s] as u64 * self.shape.crow as u64;
            if at.checked_add(len).is_none_or(|e| e > v.len()) {
                return Err(bad(format!(
                    "rows at {at}+{len} outside its region of {} bytes",
                    v.len()
                )));
            }
            views[s] = Some(v);
        }
        Ok(views)
    }
}

impl HandleInner {
    /// Stand-in for `dispatch_with`, where the caller's handle is used.
    fn placeholder() -> HandleInner {
        HandleInner {
            group: 0,
            tokens: 0,
            topk_idx: Vec::new(),
            topk_w: Vec::new(),
            plan: SendPlan {
                send: Vec::new(),
                tok_off: Vec::new(),
                tok_dst: Vec::new(),
                selections: 0,
            },
            recv: RecvIndex {
                recv_off: Vec::new(),
                token: Vec::new(),
                expert_off: Vec::new(),
                expert_rows: Vec::new(),
                expert_w: Vec::new(),
                row_off: Vec::new(),
                row_entries: Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{run_rank, RunParams};
    use kvmesh_gpu::{EngineConfig, TransportKind};

    /// `world` in-process ranks over `transport`; with `pull` false, the
    /// ranks are told to push combine rows even where they could pull.
    fn form(world: usize, cfg: &EpConfig, transport: TransportKind, pull: bool) -> Vec<EpGroup> {
        let bufs: Vec<EpBuffers> = (0..world)
            .map(|r| {
                let e = Engine::new(EngineConfig {
                    transport,
                    io_threads: 1,
                    shm_threads: 1,
                    ..Default::default()
                })
                .expect("engine");
                EpBuffers::alloc(&e, cfg, r, world).expect("buffers")
            })
            .collect();
        let descs: Vec<_> = bufs.iter().map(|b| b.desc()).collect();
        let hs: Vec<_> = bufs
            .into_iter()
            .map(|b| {
                let d = descs.clone();
                std::thread::spawn(move || EpGroup::new(b, &d))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                let mut g = h.join().expect("thread").expect("group");
                if !pull {
                    g.pull.fill(false);
                }
                g
            })
            .collect()
    }

    /// Runs the checked benchmark loop on every rank; returns each rank's
    /// combine output hashes. The groups live until every rank is done (a
    /// rank's last doorbells may still be in flight when it returns).
    fn run(groups: Vec<EpGroup>, p: &RunParams) -> Vec<Vec<String>> {
        let hs: Vec<_> = groups
            .into_iter()
            .map(|mut g| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let r = run_rank(&mut g, &p);
                    (g, r)
                })
            })
            .collect();
        let res: Vec<_> = hs
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect();
        res.into_iter()
            .map(|(_g, (rep, err))| {
                assert!(err.is_none() && rep.verified, "{:?}", rep.error);
                assert_eq!(rep.combines_checked, p.iters);
                assert_eq!(rep.hashes.len(), 1, "combine not deterministic");
                rep.hashes
            })
            .collect()
    }

    #[test]
    fn ranks_pull_combine_rows_over_shm_only() {
        let cfg = EpConfig::new(16, 256, 4, 48);
        for (t, want) in [(TransportKind::Shm, true), (TransportKind::Tcp, false)] {
            for g in form(3, &cfg, t, true) {
                for s in 0..3 {
                    assert_eq!(g.pull[s], want && s != g.rank, "{t:?} rank {}", g.rank);
                }
            }
        }
        let mut two = cfg.clone();
        two.exchange = Exchange::TwoSided;
        for g in form(2, &two, TransportKind::Shm, true) {
            assert!(g.pull.iter().all(|p| !p), "the two-sided baseline pulls");
        }
    }

    #[test]
    fn pulled_combine_gives_the_bits_of_pushed_combine() {
        let mut cfg = EpConfig::new(16, 256, 4, 48);
        cfg.timeout = Duration::from_secs(10);
        for mode in ["reduced", "per-expert"] {
            for send_buffers in [true, false] {
                let p = RunParams {
                    tokens: 40,
                    routing: "zipf".into(),
                    seed: 11,
                    // Odd and more than two: both parities, reused twice.
                    iters: 5,
                    warmup: 0,
                    verify: true,
                    expert_mode: mode.into(),
                    reuse_handle: false,
                    send_buffers,
                };
                let pulled = run(form(3, &cfg, TransportKind::Shm, true), &p);
                let pushed = run(form(3, &cfg, TransportKind::Shm, false), &p);
                let tcp = run(form(3, &cfg, TransportKind::Tcp, true), &p);
                assert_eq!(pulled, pushed, "{mode} send buffers {send_buffers}");
                assert_eq!(pulled, tcp, "{mode} send buffers {send_buffers}");
            }
        }
    }
}
