//! Batches of one-sided operations and their completion bookkeeping.
//!
//! Every slice of a batch moves through this state machine; each terminal
//! transition happens exactly once (compare-and-swap), which is what makes
//! the batch's `remaining` counter and its completion exact:
//!
//! ```text
//! write: PENDING -> BUSY ------------------> DONE | FAILED   (BUSY until acked)
//! read:  PENDING -> SENT -> BUSY ----------> DONE | FAILED   (BUSY while landing)
//!           \________\______ abort ------> ABORTED
//! ```
//! BUSY means the engine is (or may be) touching the slice's local memory.
//! Abort (cancel, deadline) only moves PENDING and SENT slices; a BUSY slice
//! finishes first (a stalled one is failed by tearing its connection down),
//! so once a batch reports completion the engine no longer touches its
//! local memory.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::engine::PeerId;
use crate::error::ErrorKind;
use crate::memory::{InUse, RegionId};
use crate::plan::Slice;

/// Direction of a one-sided operation, seen from the initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Copy remote bytes into the local region.
    Read,
    /// Copy local bytes into the remote region.
    Write,
}

/// A region of another engine, as imported from its [`crate::RegionDesc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    pub peer: PeerId,
    pub region: RegionId,
    pub len: u64,
    pub shareable: bool,
    /// Where the remote bytes live (GPU regions may go over `cuda-ipc`).
    pub kind: crate::memory::MemoryKind,
}

/// One one-sided operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    pub kind: OpKind,
    pub local: RegionId,
    pub local_offset: u64,
    pub remote: RemoteRegion,
    pub remote_offset: u64,
    pub len: u64,
}

impl Op {
    pub fn read(
        local: RegionId,
        local_offset: u64,
        remote: RemoteRegion,
        remote_offset: u64,
        len: u64,
    ) -> Op {
        Op {
            kind: OpKind::Read,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
        }
    }

    pub fn write(
        local: RegionId,
        local_offset: u64,
        remote: RemoteRegion,
        remote_offset: u64,
        len: u64,
    ) -> Op {
        Op {
            kind: OpKind::Write,
            local,
            local_offset,
            remote,
            remote_offset,
            len,
        }
    }
}

/// Per-batch options.
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    /// Time allowed for the whole batch; the engine default when `None`.
    pub timeout: Option<Duration>,
    /// A message delivered to every remote peer of the batch after all of the
    /// batch's bytes have landed there (at most 64 KiB).
    pub notify: Option<Vec<u8>>,
}

/// Outcome of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpStatus {
    /// Bytes that completed (landed remotely for writes, locally for reads).
    pub bytes: u64,
    /// First error seen by the operation.
    pub error: Option<ErrorKind>,
}

/// Outcome of a whole batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchStatus {
    pub id: BatchId,
    /// `Ok` iff every operation (and the notification, if any) succeeded;
    /// otherwise the batch-level kind (cancel/timeout) or the first op error.
    pub result: Result<(), ErrorKind>,
    pub ops: Vec<OpStatus>,
    /// Total bytes completed.
    pub bytes: u64,
}

/// Identifier of a batch, unique in its engine.
pub type BatchId = u64;

/// Run once when every slice of a batch is terminal.
pub(crate) type SlicesDoneHook = Box<dyn FnOnce(Arc<BatchState>) + Send>;

/// Run once when the batch is cancelled or times out, with that kind: lets
/// a transport that owns BUSY slices (RDMA) stop them.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) type AbortHook = Box<dyn FnOnce(ErrorKind) + Send>;

pub(crate) const PENDING: u8 = 0;
pub(crate) const BUSY: u8 = 1;
pub(crate) const SENT: u8 = 2;
pub(crate) const DONE: u8 = 3;
pub(crate) const FAILED: u8 = 4;
pub(crate) const ABORTED: u8 = 5;

pub(crate) struct OpState {
    bytes: AtomicU64,
    error: AtomicU8,
}

/// Shared state of an in-flight batch.
pub(crate) struct BatchState {
    pub(crate) id: BatchId,
    pub(crate) deadline: Instant,
    pub(crate) kinds: Vec<OpKind>,
    pub(crate) slices: Vec<Slice>,
    /// Local regions of the ops, held in use until the batch completes.
    locals: Mutex<Vec<InUse>>,
    /// Base address of each entry of `locals`.
    local_base: Vec<usize>,
    /// The GPU of each entry of `locals` that is device memory.
    local_gpu: Vec<Option<crate::cuda::GpuDevice>>,
    /// Index into `locals` for each op.
    pub(crate) op_local: Vec<u32>,
    pub(crate) remote_regions: Vec<RegionId>,
    slice_state: Vec<AtomicU8>,
    ops: Vec<OpState>,
    remaining: AtomicUsize,
    /// 0, or the ErrorKind code that aborted the batch.
    aborted: AtomicU8,
    /// Extra completions outstanding beyond slices (notifications).
    pub(crate) notify: Option<Vec<u8>>,
    pub(crate) notify_peers: Vec<PeerId>,
    notify_error: AtomicU8,
    done: Mutex<bool>,
    cond: Condvar,
    waker: tokio::sync::Notify,
    /// Where this batch's deadline is armed (disarmed on completion).
    deadlines: Mutex<Option<Arc<crate::deadline::Deadlines>>>,
    /// Called once when all slices are terminal (sends notifications).
    pub(crate) on_slices_done: Mutex<Option<SlicesDoneHook>>,
    /// Called once on abort.
    on_abort: Mutex<Vec<AbortHook>>,
}

impl std::fmt::Debug for BatchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchState")
            .field("id", &self.id)
            .field("slices", &self.slices.len())
            .field("remaining", &self.remaining.load(SeqCst))
            .finish()
    }
}

impl BatchState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: BatchId,
        deadline: Instant,
        kinds: Vec<OpKind>,
        slices: Vec<Slice>,
        locals: Vec<InUse>,
        op_local: Vec<u32>,
        remote_regions: Vec<RegionId>,
        notify: Option<Vec<u8>>,
        notify_peers: Vec<PeerId>,
    ) -> Self {
        let n = slices.len();
        BatchState {
            id,
            deadline,
            ops: kinds
                .iter()
                .map(|_| OpState {
                    bytes: AtomicU64::new(0),
                    error: AtomicU8::new(0),
                })
                .collect(),
            kinds,
            slice_state: (0..n).map(|_| AtomicU8::new(PENDING)).collect(),
            slices,
            local_base: locals.iter().map(|r| r.ptr() as usize).collect(),
            local_gpu: locals.iter().map(|r| r.gpu_device().cloned()).collect(),
            locals: Mutex::new(locals),
            op_local,
            remote_regions,
            remaining: AtomicUsize::new(n),
            aborted: AtomicU8::new(0),
            notify,
            notify_peers,
            notify_error: AtomicU8::new(0),
            done: Mutex::new(false),
            cond: Condvar::new(),
            waker: tokio::sync::Notify::new(),
            on_slices_done: Mutex::new(None),
            on_abort: Mutex::new(Vec::new()),
            deadlines: Mutex::new(None),
        }
    }

    /// Local region and base pointer for slice `i`.
    pub(crate) fn local_ptr(&self, i: usize) -> *mut u8 {
        let s = &self.slices[i];
        let base = self.local_base[self.op_local[s.op as usize] as usize];
        (base + s.local_offset as usize) as *mut u8
    }

    /// The GPU holding slice `i`'s local bytes, if they are device memory
    /// (transports that cannot address it stage through pinned memory).
    pub(crate) fn local_device(&self, i: usize) -> Option<&crate::cuda::GpuDevice> {
        let s = &self.slices[i];
        self.local_gpu[self.op_local[s.op as usize] as usize].as_ref()
    }

    pub(crate) fn kind_of(&self, i: usize) -> OpKind {
        self.kinds[self.slices[i].op as usize]
    }

    pub(crate) fn remote_region_of(&self, i: usize) -> RegionId {
        self.remote_regions[self.slices[i].op as usize]
    }

    /// The abort kind, if the batch was cancelled or timed out.
    pub(crate) fn aborted(&self) -> Option<ErrorKind> {
        ErrorKind::from_code(self.aborted.load(SeqCst))
    }

    /// Non-terminal transition (e.g. PENDING -> BUSY). False if the slice
    /// was in another state (typically ABORTED).
    pub(crate) fn advance(&self, i: usize, from: u8, to: u8) -> bool {
        self.slice_state[i]
            .compare_exchange(from, to, SeqCst, SeqCst)
            .is_ok()
    }

    /// Terminal transition; returns whether this call made it.
    pub(crate) fn terminate(
        self: &Arc<Self>,
        i: usize,
        from: u8,
        to: u8,
        err: Option<ErrorKind>,
    ) -> bool {
        if !self.advance(i, from, to) {
            return false;
        }
        let s = &self.slices[i];
        let op = &self.ops[s.op as usize];
        match to {
            DONE => {
                op.bytes.fetch_add(s.len, SeqCst);
            }
            _ => {
                let code = err.or(self.aborted()).unwrap_or(ErrorKind::Protocol).code();
                let _ = op.error.compare_exchange(0, code, SeqCst, SeqCst);
            }
        }
        if self.remaining.fetch_sub(1, SeqCst) == 1 {
            self.all_slices_done();
        }
        true
    }

    /// Marks slice `i` done from `from`.
    pub(crate) fn complete(self: &Arc<Self>, i: usize, from: u8) -> bool {
        self.terminate(i, from, DONE, None)
    }

    /// Fails slice `i` from whatever non-terminal state it is in. Only the
    /// owner of the slice (the lane or copy thread that moved it) calls this.
    pub(crate) fn fail(self: &Arc<Self>, i: usize, err: ErrorKind) {
        for from in [PENDING, SENT, BUSY] {
            if self.terminate(i, from, FAILED, Some(err)) {
                return;
            }
        }
    }

    /// Cancels or times out the batch: every slice not touching local memory
    /// right now ends as ABORTED. Returns whether this call set the abort.
    pub(crate) fn abort(self: &Arc<Self>, kind: ErrorKind) -> bool {
        if self
            .aborted
            .compare_exchange(0, kind.code(), SeqCst, SeqCst)
            .is_err()
        {
            return false;
        }
        for i in 0..self.slices.len() {
            if !self.terminate(i, PENDING, ABORTED, Some(kind)) {
                self.terminate(i, SENT, ABORTED, Some(kind));
            }
        }
        let hooks = std::mem::take(&mut *self.on_abort.lock());
        for h in hooks {
            h(kind);
        }
        if self.slices.is_empty() {
            self.finish();
        }
        true
    }

    /// Runs `f` when the batch is aborted (at once if it already was).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn on_abort(&self, f: AbortHook) {
        let mut g = self.on_abort.lock();
        match self.aborted() {
            Some(k) => {
                drop(g);
                f(k);
            }
            None => g.push(f),
        }
    }

    /// Records a failed notification without completing the batch (the
    /// transport that carried it completes the slices next).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn set_notify_error(&self, k: ErrorKind) {
        let _ = self
            .notify_error
            .compare_exchange(0, k.code(), SeqCst, SeqCst);
    }

    /// Whether any slice is in BUSY or SENT (used to decide on a deadline
    /// whether a connection must be torn down).
    pub(crate) fn busy_slices(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slices.len()).filter(|&i| self.slice_state[i].load(SeqCst) == BUSY)
    }

    pub(crate) fn has_op_errors(&self) -> bool {
        self.ops.iter().any(|o| o.error.load(SeqCst) != 0)
    }

    pub(crate) fn set_deadlines(&self, d: Arc<crate::deadline::Deadlines>) {
        *self.deadlines.lock() = Some(d);
    }

    /// Slices not yet terminal.
    pub(crate) fn remaining(&self) -> usize {
        self.remaining.load(SeqCst)
    }

    /// Runs once every slice is terminal: sends notifications or completes.
    pub(crate) fn all_slices_done(self: &Arc<Self>) {
        let hook = self.on_slices_done.lock().take();
        match hook {
            Some(f)
                if self.notify.is_some() && self.aborted().is_none() && !self.has_op_errors() =>
            {
                f(self.clone())
            }
            _ => self.finish(),
        }
    }

    /// Records the outcome of the notification step and completes the batch.
    pub(crate) fn notify_result(&self, r: Result<(), ErrorKind>) {
        if let Err(k) = r {
            let _ = self
                .notify_error
                .compare_exchange(0, k.code(), SeqCst, SeqCst);
        }
        self.finish();
    }

    pub(crate) fn finish(&self) {
        let mut d = self.done.lock();
        if !*d {
            *d = true;
            // No slice touches local memory any more: release the regions.
            self.locals.lock().clear();
            if let Some(d) = self.deadlines.lock().take() {
                d.remove(self.deadline, self.id);
            }
            self.cond.notify_all();
            self.waker.notify_waiters();
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        *self.done.lock()
    }

    pub(crate) fn status(&self) -> BatchStatus {
        let ops: Vec<OpStatus> = self
            .ops
            .iter()
            .map(|o| OpStatus {
                bytes: o.bytes.load(SeqCst),
                error: ErrorKind::from_code(o.error.load(SeqCst)),
            })
            .collect();
        let bytes = ops.iter().map(|o| o.bytes).sum();
        let result = match self.aborted() {
            Some(k) => Err(k),
            None => match ops.iter().find_map(|o| o.error) {
                Some(k) => Err(k),
                None => match ErrorKind::from_code(self.notify_error.load(SeqCst)) {
                    Some(k) => Err(k),
                    None => Ok(()),
                },
            },
        };
        BatchStatus {
            id: self.id,
            result,
            ops,
            bytes,
        }
    }

    pub(crate) fn wait_blocking(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut d = self.done.lock();
        while !*d {
            if self.cond.wait_until(&mut d, until).timed_out() {
                return *d;
            }
        }
        true
    }

    pub(crate) async fn wait_async(&self) {
        loop {
            let notified = self.waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }
}

/// Handle to a submitted batch.
///
/// Dropping the handle does not cancel the batch; it runs to completion (or
/// its deadline) in the background.
#[derive(Debug, Clone)]
pub struct Batch {
    pub(crate) state: Arc<BatchState>,
}

impl Batch {
    pub fn id(&self) -> BatchId {
        self.state.id
    }

    /// Non-blocking: the status once the batch has completed.
    pub fn poll(&self) -> Option<BatchStatus> {
        self.state.is_done().then(|| self.state.status())
    }

    /// Waits for completion. Cancel-safe: dropping the future leaves the
    /// batch running.
    pub async fn wait(&self) -> BatchStatus {
        self.state.wait_async().await;
        self.state.status()
    }

    /// Blocks the thread until completion or `timeout`; `None` on timeout.
    /// Batches always complete by their deadline, so waiting past it returns.
    pub fn wait_blocking(&self, timeout: Duration) -> Option<BatchStatus> {
        self.state
            .wait_blocking(timeout)
            .then(|| self.state.status())
    }

    /// Cancels the batch: slices not yet started end as `Cancelled`; slices
    /// copying right now finish first, so after completion the engine no
    /// longer touches the batch's local memory.
    pub fn cancel(&self) {
        self.state.abort(ErrorKind::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Arc<BatchState> {
        let slices = (0..n as u32)
            .map(|op| Slice {
                op,
                local_offset: 0,
                remote_offset: 0,
                len: 8,
                lane: 0,
            })
            .collect();
        Arc::new(BatchState::new(
            1,
            Instant::now() + Duration::from_secs(5),
            vec![OpKind::Write; n],
            slices,
            Vec::new(),
            vec![0; n],
            vec![0; n],
            None,
            Vec::new(),
        ))
    }

    /// A transport owning BUSY slices hears about the abort once, and the
    /// batch completes only when it reports those slices.
    #[test]
    fn abort_hooks_run_once_and_busy_slices_wait_for_their_owner() {
        let b = batch(2);
        assert!(b.advance(0, PENDING, BUSY));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        b.on_abort(Box::new(move |k| s2.lock().push(k)));
        assert!(b.abort(ErrorKind::Cancelled));
        assert!(!b.abort(ErrorKind::Timeout));
        assert_eq!(*seen.lock(), vec![ErrorKind::Cancelled]);
        // Slice 1 was pending: aborted. Slice 0 is BUSY until its owner
        // reports it.
        assert!(!b.is_done());
        b.fail(0, ErrorKind::Cancelled);
        assert!(b.is_done());
        assert_eq!(b.status().result, Err(ErrorKind::Cancelled));
        // A hook added after the abort runs at once.
        let s3 = seen.clone();
        b.on_abort(Box::new(move |k| s3.lock().push(k)));
        assert_eq!(seen.lock().len(), 2);
    }

    #[test]
    fn a_failed_carried_notification_fails_a_batch_whose_data_landed() {
        let b = batch(1);
        assert!(b.advance(0, PENDING, BUSY));
        b.set_notify_error(ErrorKind::ConnectionLost);
        b.complete(0, BUSY);
        assert!(b.is_done());
        let st = b.status();
        assert_eq!(st.bytes, 8);
        assert_eq!(st.result, Err(ErrorKind::ConnectionLost));
    }
}
