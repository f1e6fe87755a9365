//! Completion bookkeeping: `wr_id` → slice → batch, as a pure state machine.
//!
//! The executor tells the tracker what it posts ([`CompletionTracker::record_posted`]
//! hands out the `wr_id`), feeds it every work completion it polls
//! ([`CompletionTracker::on_completion`]) and drains [`TrackerEvent`]s. No
//! verbs call happens here, so tests drive it with made-up completions.
//!
//! Rules it implements:
//!
//! - Per lane (queue pair) requests complete in posting order. A completion
//!   for `wr_id` X also completes every earlier request of that lane (the
//!   unsignalled ones never produce their own entry).
//! - The first failed completion on a lane breaks it: X fails with its
//!   mapped kind, and everything after X (flushed by the hardware, with or
//!   without its own flush entry) fails with `ConnectionLost` (or
//!   `Cancelled` after a local abort). The lane takes no new work until it is
//!   reset by a reconnect.
//! - Lanes are independent: completions of different QPs interleave in any
//!   order.
//! - A batch is finished only when none of its requests is still owned by a
//!   NIC (outstanding), even if it was cancelled or failed earlier: buffers
//!   must not be reused while a NIC may still DMA into them.
//! - A batch with a notification emits [`TrackerEvent::NotifyReady`] once all
//!   its bytes have landed; the notification request then completes it.

use std::collections::{HashMap, VecDeque};

use crate::ErrorKind;

use super::plan::Slice;
use super::status::{wc_status_kind, WcContext};

/// Identifier of a batch inside the transport (the engine's batch id).
pub type BatchTag = u64;

/// Outcome of one operation of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpOutcome {
    /// Bytes that completed.
    pub bytes: u64,
    /// First error seen.
    pub error: Option<ErrorKind>,
}

/// Outcome of a finished batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// The batch.
    pub tag: BatchTag,
    /// Per operation.
    pub ops: Vec<OpOutcome>,
    /// The batch was aborted (cancel, deadline) with this kind.
    pub aborted: Option<ErrorKind>,
    /// The notification failed (data may have landed).
    pub notify_error: Option<ErrorKind>,
}

impl BatchOutcome {
    /// `Ok` iff every operation and the notification succeeded; otherwise the
    /// abort kind, the first operation error, or the notification error.
    pub fn result(&self) -> Result<(), ErrorKind> {
        if let Some(k) = self.aborted {
            return Err(k);
        }
        if let Some(k) = self.ops.iter().find_map(|o| o.error) {
            return Err(k);
        }
        match self.notify_error {
            Some(k) => Err(k),
            None => Ok(()),
        }
    }

    /// Total bytes that completed.
    pub fn bytes(&self) -> u64 {
        self.ops.iter().map(|o| o.bytes).sum()
    }
}

/// What the tracker tells the executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackerEvent {
    /// Every request of the batch is terminal.
    BatchDone(BatchOutcome),
    /// All data of the batch landed; post its notification now.
    NotifyReady {
        /// The batch.
        tag: BatchTag,
    },
    /// A lane failed; its peer needs a reconnect.
    LaneFailed {
        /// The lane.
        lane: usize,
        /// Kind of the first failure.
        kind: ErrorKind,
    },
    /// A completion named a `wr_id` the tracker does not know (a bug or a
    /// completion from a destroyed QP); it was ignored.
    UnknownCompletion {
        /// The id.
        wr_id: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Data { tag: BatchTag, slice: Slice },
    Notify { tag: BatchTag },
}

#[derive(Debug)]
struct LaneTrack {
    capacity: u32,
    fifo: VecDeque<u64>,
    broken: Option<ErrorKind>,
    local_abort: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotifyState {
    None,
    Wanted,
    Ready,
    Posted,
    Done,
}

#[derive(Debug)]
struct BatchTrack {
    ops: Vec<OpOutcome>,
    op_len: Vec<u64>,
    outstanding: usize,
    deferred: Vec<Slice>,
    aborted: Option<ErrorKind>,
    notify: NotifyState,
    notify_error: Option<ErrorKind>,
}

impl BatchTrack {
    fn data_complete(&self) -> bool {
        self.outstanding == 0 && self.deferred.is_empty()
    }

    fn all_ok(&self) -> bool {
        self.aborted.is_none()
            && self
                .ops
                .iter()
                .zip(&self.op_len)
                .all(|(o, &len)| o.error.is_none() && o.bytes == len)
    }
}

/// The bookkeeping state machine; see the module docs.
#[derive(Debug, Default)]
pub struct CompletionTracker {
    next_wr_id: u64,
    lanes: Vec<LaneTrack>,
    wrs: HashMap<u64, (usize, Purpose)>,
    batches: HashMap<BatchTag, BatchTrack>,
    events: VecDeque<TrackerEvent>,
}

impl CompletionTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        CompletionTracker {
            next_wr_id: 1,
            ..Default::default()
        }
    }

    /// Adds a lane with `capacity` send-queue slots; returns its index.
    pub fn add_lane(&mut self, capacity: u32) -> usize {
        self.lanes.push(LaneTrack {
            capacity,
            fifo: VecDeque::new(),
            broken: None,
            local_abort: false,
        });
        self.lanes.len() - 1
    }

    /// Number of lanes ever added.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Free send-queue slots of a lane (0 when broken or unknown).
    pub fn free_slots(&self, lane: usize) -> u32 {
        match self.lanes.get(lane) {
            Some(l) if l.broken.is_none() => l.capacity.saturating_sub(l.fifo.len() as u32),
            _ => 0,
        }
    }

    /// Requests a lane's NIC still owns.
    pub fn outstanding(&self, lane: usize) -> usize {
        self.lanes.get(lane).map_or(0, |l| l.fifo.len())
    }

    /// Whether the lane failed and awaits a reconnect.
    pub fn is_broken(&self, lane: usize) -> bool {
        self.lanes.get(lane).is_some_and(|l| l.broken.is_some())
    }

    /// Starts tracking a batch of operations with these lengths.
    pub fn begin_batch(&mut self, tag: BatchTag, op_lens: &[u64], notify: bool) {
        self.batches.insert(
            tag,
            BatchTrack {
                ops: vec![OpOutcome::default(); op_lens.len()],
                op_len: op_lens.to_vec(),
                outstanding: 0,
                deferred: Vec::new(),
                aborted: None,
                notify: if notify {
                    NotifyState::Wanted
                } else {
                    NotifyState::None
                },
                notify_error: None,
            },
        );
    }

    /// Records a data request about to be posted; returns its `wr_id`.
    pub fn record_posted(&mut self, tag: BatchTag, lane: usize, slice: Slice) -> u64 {
        self.record(lane, Purpose::Data { tag, slice })
    }

    /// Records the notification request of a batch; returns its `wr_id`.
    pub fn record_notify(&mut self, tag: BatchTag, lane: usize) -> u64 {
        if let Some(b) = self.batches.get_mut(&tag) {
            b.notify = NotifyState::Posted;
        }
        self.record(lane, Purpose::Notify { tag })
    }

    fn record(&mut self, lane: usize, purpose: Purpose) -> u64 {
        let id = self.next_wr_id;
        self.next_wr_id += 1;
        if let Some(l) = self.lanes.get_mut(lane) {
            l.fifo.push_back(id);
        }
        let tag = match purpose {
            Purpose::Data { tag, .. } | Purpose::Notify { tag } => tag,
        };
        if let Some(b) = self.batches.get_mut(&tag) {
            b.outstanding += 1;
        }
        self.wrs.insert(id, (lane, purpose));
        id
    }

    /// Slices of a batch that found no free slot, to plan again.
    pub fn defer(&mut self, tag: BatchTag, slices: &[Slice]) {
        if let Some(b) = self.batches.get_mut(&tag) {
            b.deferred.extend_from_slice(slices);
        }
    }

    /// Takes the deferred slices of every live batch (for re-planning).
    pub fn take_deferred(&mut self) -> Vec<(BatchTag, Vec<Slice>)> {
        let mut out: Vec<(BatchTag, Vec<Slice>)> = self
            .batches
            .iter_mut()
            .filter(|(_, b)| !b.deferred.is_empty())
            .map(|(t, b)| (*t, std::mem::take(&mut b.deferred)))
            .collect();
        out.sort_by_key(|(t, _)| *t);
        out
    }

    /// `ibv_post_send` refused these requests (the `bad_wr` and everything
    /// linked after it): they never reached the NIC.
    pub fn post_failed(&mut self, wr_ids: &[u64], kind: ErrorKind) {
        for id in wr_ids {
            if let Some((lane, purpose)) = self.wrs.remove(id) {
                if let Some(l) = self.lanes.get_mut(lane) {
                    l.fifo.retain(|x| x != id);
                }
                self.resolve(purpose, Some(kind));
            }
        }
        self.finish_ready();
    }

    /// Cancels or times out a batch: unfinished operations fail with `kind`,
    /// deferred slices are dropped; the batch is reported once its
    /// outstanding requests drain.
    pub fn abort(&mut self, tag: BatchTag, kind: ErrorKind) {
        if let Some(b) = self.batches.get_mut(&tag) {
            if b.aborted.is_none() {
                b.aborted = Some(kind);
            }
            b.deferred.clear();
        }
        self.finish_ready();
    }

    /// The executor moved a lane's QP to the error state on purpose (cancel
    /// or teardown): its flushed requests count as `Cancelled`.
    pub fn mark_local_abort(&mut self, lane: usize) {
        if let Some(l) = self.lanes.get_mut(lane) {
            l.local_abort = true;
        }
    }

    /// The lane's QP was destroyed (or reset): nothing of it can complete
    /// any more, so every request still listed fails as flushed, and the
    /// lane is usable again with `capacity` slots once reconnected.
    pub fn reset_lane(&mut self, lane: usize, capacity: u32) {
        let Some(l) = self.lanes.get_mut(lane) else {
            return;
        };
        let kind = if l.local_abort {
            ErrorKind::Cancelled
        } else {
            ErrorKind::ConnectionLost
        };
        let ids: Vec<u64> = l.fifo.drain(..).collect();
        l.broken = None;
        l.local_abort = false;
        l.capacity = capacity;
        for id in ids {
            if let Some((_, p)) = self.wrs.remove(&id) {
                self.resolve(p, Some(kind));
            }
        }
        self.finish_ready();
    }

    /// Feeds one work completion: its `wr_id` and `ibv_wc_status`.
    pub fn on_completion(&mut self, wr_id: u64, status: u32) {
        let Some(&(lane_idx, _)) = self.wrs.get(&wr_id) else {
            self.events
                .push_back(TrackerEvent::UnknownCompletion { wr_id });
            return;
        };
        let Some(lane) = self.lanes.get_mut(lane_idx) else {
            self.wrs.remove(&wr_id);
            self.events
                .push_back(TrackerEvent::UnknownCompletion { wr_id });
            return;
        };
        // Everything posted before wr_id on this lane is done too.
        let mut implied = Vec::new();
        while let Some(&front) = lane.fifo.front() {
            lane.fifo.pop_front();
            if front == wr_id {
                break;
            }
            implied.push(front);
        }
        let flushed = if lane.local_abort {
            ErrorKind::Cancelled
        } else {
            ErrorKind::ConnectionLost
        };
        let earlier = lane.broken.map(|_| flushed);
        let ctx = WcContext {
            remote_bounds_checked: true,
            local_abort: lane.local_abort,
        };
        // After the lane broke, every later completion is a flush, whatever
        // status the NIC reports for it.
        let this = match (lane.broken, wc_status_kind(status, ctx)) {
            (Some(_), _) => Some(flushed),
            (None, k) => k,
        };
        if lane.broken.is_none() {
            if let Some(k) = this {
                lane.broken = Some(k);
                self.events.push_back(TrackerEvent::LaneFailed {
                    lane: lane_idx,
                    kind: k,
                });
            }
        }
        for id in implied {
            if let Some((_, p)) = self.wrs.remove(&id) {
                self.resolve(p, earlier);
            }
        }
        if let Some((_, p)) = self.wrs.remove(&wr_id) {
            self.resolve(p, this);
        }
        self.finish_ready();
    }

    fn resolve(&mut self, purpose: Purpose, error: Option<ErrorKind>) {
        let tag = match purpose {
            Purpose::Data { tag, .. } | Purpose::Notify { tag } => tag,
        };
        let Some(b) = self.batches.get_mut(&tag) else {
            return;
        };
        b.outstanding = b.outstanding.saturating_sub(1);
        match purpose {
            Purpose::Data { slice, .. } => {
                if let Some(op) = b.ops.get_mut(slice.op) {
                    match error {
                        None => op.bytes += slice.len,
                        Some(k) => {
                            op.error.get_or_insert(k);
                        }
                    }
                }
            }
            Purpose::Notify { .. } => {
                b.notify = NotifyState::Done;
                b.notify_error = error;
            }
        }
    }

    fn finish_ready(&mut self) {
        let mut done = Vec::new();
        for (tag, b) in self.batches.iter_mut() {
            if !b.data_complete() {
                continue;
            }
            match b.notify {
                NotifyState::Wanted if b.all_ok() => {
                    b.notify = NotifyState::Ready;
                    self.events
                        .push_back(TrackerEvent::NotifyReady { tag: *tag });
                }
                NotifyState::Ready => {
                    // Waiting for the executor to post it, unless aborted meanwhile.
                    if b.aborted.is_some() {
                        done.push(*tag);
                    }
                }
                NotifyState::Posted => {}
                _ => done.push(*tag),
            }
        }
        done.sort_unstable();
        for tag in done {
            if let Some(b) = self.batches.remove(&tag) {
                let mut ops = b.ops;
                if let Some(k) = b.aborted {
                    for (o, &len) in ops.iter_mut().zip(&b.op_len) {
                        if o.bytes < len {
                            o.error.get_or_insert(k);
                        }
                    }
                } else {
                    // Slices dropped without completing (never the case
                    // without an abort, kept for robustness).
                    for (o, &len) in ops.iter_mut().zip(&b.op_len) {
                        if o.bytes < len && o.error.is_none() {
                            o.error = Some(ErrorKind::ConnectionLost);
                        }
                    }
                }
                self.events.push_back(TrackerEvent::BatchDone(BatchOutcome {
                    tag,
                    ops,
                    aborted: b.aborted,
                    notify_error: b.notify_error,
                }));
            }
        }
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<TrackerEvent> {
        self.events.pop_front()
    }

    /// Batches still tracked.
    pub fn live_batches(&self) -> usize {
        self.batches.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ibverbs::ibv_wc_status as st;

    fn s(op: usize, offset: u64, len: u64) -> Slice {
        Slice { op, offset, len }
    }

    fn drain(t: &mut CompletionTracker) -> Vec<TrackerEvent> {
        std::iter::from_fn(|| t.poll_event()).collect()
    }

    fn done(events: &[TrackerEvent]) -> Vec<&BatchOutcome> {
        events
            .iter()
            .filter_map(|e| match e {
                TrackerEvent::BatchDone(o) => Some(o),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn signalled_completion_completes_earlier_unsignalled_requests() {
        let mut t = CompletionTracker::new();
        let lane = t.add_lane(8);
        t.begin_batch(7, &[300], false);
        let ids: Vec<u64> = (0..3)
            .map(|i| t.record_posted(7, lane, s(0, i * 100, 100)))
            .collect();
        assert_eq!(t.free_slots(lane), 5);
        t.on_completion(ids[2], st::IBV_WC_SUCCESS);
        assert_eq!(t.free_slots(lane), 8);
        let ev = drain(&mut t);
        let d = done(&ev);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].result(), Ok(()));
        assert_eq!(d[0].bytes(), 300);
        assert_eq!(t.live_batches(), 0);
    }

    #[test]
    fn completions_across_lanes_arrive_in_any_order() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(4);
        let b = t.add_lane(4);
        t.begin_batch(1, &[400], false);
        t.begin_batch(2, &[100], false);
        let a1 = t.record_posted(1, a, s(0, 0, 100));
        let b1 = t.record_posted(1, b, s(0, 100, 100));
        let a2 = t.record_posted(1, a, s(0, 200, 100));
        let b2 = t.record_posted(1, b, s(0, 300, 100));
        let b3 = t.record_posted(2, b, s(0, 0, 100));
        t.on_completion(b3, st::IBV_WC_SUCCESS);
        // Batch 2 is done; batch 1 still waits for lane a.
        let ev = drain(&mut t);
        let d = done(&ev);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].tag, 2);
        t.on_completion(a2, st::IBV_WC_SUCCESS);
        let ev = drain(&mut t);
        assert_eq!(done(&ev).len(), 1);
        assert_eq!(done(&ev)[0].bytes(), 400);
        // Stale completions after the fact are reported, not misapplied.
        t.on_completion(a1, st::IBV_WC_SUCCESS);
        t.on_completion(b1, st::IBV_WC_SUCCESS);
        t.on_completion(b2, st::IBV_WC_SUCCESS);
        assert_eq!(
            drain(&mut t),
            vec![
                TrackerEvent::UnknownCompletion { wr_id: a1 },
                TrackerEvent::UnknownCompletion { wr_id: b1 },
                TrackerEvent::UnknownCompletion { wr_id: b2 },
            ]
        );
    }

    #[test]
    fn error_completion_breaks_the_lane_and_flushes_the_rest() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(8);
        let b = t.add_lane(8);
        t.begin_batch(1, &[200, 200], false);
        let ok1 = t.record_posted(1, a, s(0, 0, 100));
        let bad = t.record_posted(1, a, s(0, 100, 100));
        let fl1 = t.record_posted(1, a, s(1, 0, 100));
        let fl2 = t.record_posted(1, a, s(1, 100, 100));
        let _ = ok1;
        // Remote access error on the second request: the first (unsignalled)
        // succeeded, the rest are flushed.
        t.on_completion(bad, st::IBV_WC_REM_ACCESS_ERR);
        let ev = drain(&mut t);
        assert_eq!(
            ev,
            vec![TrackerEvent::LaneFailed {
                lane: a,
                kind: ErrorKind::UnknownRegion
            }]
        );
        assert!(t.is_broken(a));
        assert_eq!(t.free_slots(a), 0);
        assert_eq!(t.free_slots(b), 8);
        // The NIC flushes only one entry for the two remaining (the last);
        // the other is implied.
        t.on_completion(fl2, st::IBV_WC_WR_FLUSH_ERR);
        let _ = fl1;
        let ev = drain(&mut t);
        let d = done(&ev);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].ops[0],
            OpOutcome {
                bytes: 100,
                error: Some(ErrorKind::UnknownRegion)
            }
        );
        assert_eq!(
            d[0].ops[1],
            OpOutcome {
                bytes: 0,
                error: Some(ErrorKind::ConnectionLost)
            }
        );
        assert_eq!(d[0].result(), Err(ErrorKind::UnknownRegion));
        // Reconnect resets the lane.
        t.reset_lane(a, 16);
        assert!(!t.is_broken(a));
        assert_eq!(t.free_slots(a), 16);
    }

    #[test]
    fn flush_status_after_break_wins_over_reported_success() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(8);
        t.begin_batch(1, &[300], false);
        let x = t.record_posted(1, a, s(0, 0, 100));
        let y = t.record_posted(1, a, s(0, 100, 100));
        let z = t.record_posted(1, a, s(0, 200, 100));
        t.on_completion(x, st::IBV_WC_RETRY_EXC_ERR);
        t.on_completion(y, st::IBV_WC_SUCCESS);
        t.on_completion(z, st::IBV_WC_WR_FLUSH_ERR);
        let ev = drain(&mut t);
        assert!(ev.contains(&TrackerEvent::LaneFailed {
            lane: a,
            kind: ErrorKind::ConnectionLost
        }));
        let d = done(&ev);
        assert_eq!(d[0].ops[0].bytes, 0);
        assert_eq!(d[0].result(), Err(ErrorKind::ConnectionLost));
    }

    #[test]
    fn abort_waits_for_outstanding_requests() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(8);
        t.begin_batch(5, &[300], false);
        let x = t.record_posted(5, a, s(0, 0, 100));
        t.defer(5, &[s(0, 100, 200)]);
        t.abort(5, ErrorKind::Cancelled);
        assert!(done(&drain(&mut t)).is_empty(), "a NIC still owns x");
        assert!(t.take_deferred().is_empty());
        t.on_completion(x, st::IBV_WC_SUCCESS);
        let ev = drain(&mut t);
        let d = done(&ev);
        assert_eq!(d[0].result(), Err(ErrorKind::Cancelled));
        assert_eq!(
            d[0].ops[0],
            OpOutcome {
                bytes: 100,
                error: Some(ErrorKind::Cancelled)
            }
        );
    }

    #[test]
    fn local_abort_turns_flushes_into_cancelled() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(8);
        t.begin_batch(1, &[100], false);
        let x = t.record_posted(1, a, s(0, 0, 100));
        t.mark_local_abort(a);
        t.on_completion(x, st::IBV_WC_WR_FLUSH_ERR);
        let ev = drain(&mut t);
        assert!(ev.contains(&TrackerEvent::LaneFailed {
            lane: a,
            kind: ErrorKind::Cancelled
        }));
        assert_eq!(done(&ev)[0].result(), Err(ErrorKind::Cancelled));
    }

    #[test]
    fn destroying_a_lane_fails_what_it_still_owned() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(8);
        t.begin_batch(1, &[100], false);
        t.record_posted(1, a, s(0, 0, 100));
        t.reset_lane(a, 8);
        let ev = drain(&mut t);
        assert_eq!(done(&ev)[0].result(), Err(ErrorKind::ConnectionLost));
        assert_eq!(t.outstanding(a), 0);
    }

    #[test]
    fn deferred_slices_keep_the_batch_open_until_posted() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(1);
        t.begin_batch(1, &[200], false);
        let x = t.record_posted(1, a, s(0, 0, 100));
        t.defer(1, &[s(0, 100, 100)]);
        t.on_completion(x, st::IBV_WC_SUCCESS);
        assert!(done(&drain(&mut t)).is_empty());
        let d = t.take_deferred();
        assert_eq!(d, vec![(1, vec![s(0, 100, 100)])]);
        let y = t.record_posted(1, a, d[0].1[0]);
        t.on_completion(y, st::IBV_WC_SUCCESS);
        let ev = drain(&mut t);
        assert_eq!(done(&ev)[0].result(), Ok(()));
        assert_eq!(done(&ev)[0].bytes(), 200);
    }

    #[test]
    fn post_failure_fails_only_the_refused_requests() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(4);
        t.begin_batch(1, &[200], false);
        let x = t.record_posted(1, a, s(0, 0, 100));
        let y = t.record_posted(1, a, s(0, 100, 100));
        t.post_failed(&[y], ErrorKind::Busy);
        assert_eq!(t.outstanding(a), 1);
        t.on_completion(x, st::IBV_WC_SUCCESS);
        let ev = drain(&mut t);
        let d = done(&ev);
        assert_eq!(
            d[0].ops[0],
            OpOutcome {
                bytes: 100,
                error: Some(ErrorKind::Busy)
            }
        );
    }

    #[test]
    fn notification_follows_the_data() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(4);
        let b = t.add_lane(4);
        t.begin_batch(9, &[200], true);
        let x = t.record_posted(9, a, s(0, 0, 100));
        let y = t.record_posted(9, b, s(0, 100, 100));
        t.on_completion(y, st::IBV_WC_SUCCESS);
        assert!(drain(&mut t).is_empty());
        t.on_completion(x, st::IBV_WC_SUCCESS);
        assert_eq!(drain(&mut t), vec![TrackerEvent::NotifyReady { tag: 9 }]);
        let n = t.record_notify(9, a);
        assert!(drain(&mut t).is_empty());
        t.on_completion(n, st::IBV_WC_SUCCESS);
        let ev = drain(&mut t);
        assert_eq!(done(&ev)[0].result(), Ok(()));
    }

    #[test]
    fn failed_data_sends_no_notification() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(4);
        t.begin_batch(9, &[100], true);
        let x = t.record_posted(9, a, s(0, 0, 100));
        t.on_completion(x, st::IBV_WC_RNR_RETRY_EXC_ERR);
        let ev = drain(&mut t);
        assert!(!ev
            .iter()
            .any(|e| matches!(e, TrackerEvent::NotifyReady { .. })));
        assert_eq!(done(&ev)[0].result(), Err(ErrorKind::ConnectionLost));
    }

    #[test]
    fn failed_notification_fails_the_batch() {
        let mut t = CompletionTracker::new();
        let a = t.add_lane(4);
        t.begin_batch(9, &[100], true);
        let x = t.record_posted(9, a, s(0, 0, 100));
        t.on_completion(x, st::IBV_WC_SUCCESS);
        assert_eq!(drain(&mut t), vec![TrackerEvent::NotifyReady { tag: 9 }]);
        t.abort(9, ErrorKind::Timeout);
        let ev = drain(&mut t);
        assert_eq!(done(&ev)[0].result(), Err(ErrorKind::Timeout));

        t.begin_batch(10, &[100], true);
        let x = t.record_posted(10, a, s(0, 0, 100));
        t.on_completion(x, st::IBV_WC_SUCCESS);
        drain(&mut t);
        let n = t.record_notify(10, a);
        t.on_completion(n, st::IBV_WC_RNR_RETRY_EXC_ERR);
        let ev = drain(&mut t);
        let d = done(&ev);
        assert_eq!(d[0].ops[0].error, None);
        assert_eq!(d[0].notify_error, Some(ErrorKind::ConnectionLost));
        assert_eq!(d[0].result(), Err(ErrorKind::ConnectionLost));
    }
}
