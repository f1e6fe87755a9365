//! Planning RDMA READ/WRITE work requests: pure, no verbs.
//!
//! ```text
//!  RdmaOp (local region+offset, remote region+offset, len, keys per NIC)
//!     │ cut_slices(max_slice_bytes)          bounds-checked, ≤ 2 GiB each
//!     ▼
//!  Slice (op, offset, len) ...
//!     │ assign_slices(lanes, signal_every)   lane = one QP (local NIC → remote NIC)
//!     ▼
//!  PlannedWr (lane, addresses, lkey/rkey, signalled?)   + deferred slices
//! ```
//!
//! A lane is one connected RC queue pair with a number of free send-queue
//! slots. Each slice goes to the eligible lane (both regions registered on
//! its NICs) with the most free slots, rotating among equals, so a large
//! operation spreads over every QP and NIC. Slices that find no free slot are
//! returned as deferred and planned again after completions free slots.
//! Within each lane, every `signal_every`-th request and the lane's last one
//! are signalled; the unsignalled ones complete implicitly with the next
//! signalled one on the same QP.

use super::error::{RdmaError, Result};

/// Largest message length of one RDMA work request (2^31 bytes).
pub const MAX_WR_BYTES: u64 = 1 << 31;

/// Direction of an operation, from the initiator's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RdmaOpKind {
    /// Remote → local (`IBV_WR_RDMA_READ`).
    Read,
    /// Local → remote (`IBV_WR_RDMA_WRITE`).
    Write,
}

/// An address range: a registered region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First address (virtual address or IOVA the MR was registered at).
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaOp {
    /// Direction.
    pub kind: RdmaOpKind,
    /// The local registered region.
    pub local: Extent,
    /// Offset inside the local region.
    pub local_offset: u64,
    /// lkey of the local region per local NIC (path index); `None` where it
    /// is not registered.
    pub lkeys: Vec<Option<u32>>,
    /// The remote registered region, from the peer's descriptor.
    pub remote: Extent,
    /// Offset inside the remote region.
    pub remote_offset: u64,
    /// rkey of the remote region per remote NIC (the peer's NIC index).
    pub rkeys: Vec<Option<u32>>,
    /// Bytes to move.
    pub len: u64,
}

/// A piece of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Index of the operation.
    pub op: usize,
    /// Offset inside the operation.
    pub offset: u64,
    /// Length (≤ [`MAX_WR_BYTES`]).
    pub len: u64,
}

/// A connected queue pair work requests can go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    /// Local NIC (path index).
    pub local_nic: usize,
    /// Remote NIC (index in the peer's descriptor).
    pub remote_nic: usize,
    /// Free send-queue slots.
    pub free_slots: u32,
}

/// One work request to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedWr {
    /// Lane (index into the lanes given to [`assign_slices`]).
    pub lane: usize,
    /// The slice it carries.
    pub slice: Slice,
    /// Direction.
    pub kind: RdmaOpKind,
    /// Local address.
    pub local_addr: u64,
    /// lkey on the lane's local NIC.
    pub lkey: u32,
    /// Remote address.
    pub remote_addr: u64,
    /// rkey on the lane's remote NIC.
    pub rkey: u32,
    /// Length in bytes (fits the 32-bit SGE length).
    pub len: u32,
    /// Request a completion entry.
    pub signaled: bool,
}

/// Result of [`assign_slices`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LanePlan {
    /// Work requests, grouped by nothing in particular; post them in this
    /// order (per lane the order is the slice order).
    pub wrs: Vec<PlannedWr>,
    /// Slices that found no free slot.
    pub deferred: Vec<Slice>,
}

fn check_range(what: &'static str, region: Extent, offset: u64, len: u64) -> Result<()> {
    let end = offset.checked_add(len);
    let in_bounds =
        end.is_some_and(|e| e <= region.len) && region.base.checked_add(region.len).is_some();
    if in_bounds {
        Ok(())
    } else {
        Err(RdmaError::OutOfBounds {
            what,
            offset,
            len,
            region_len: region.len,
        })
    }
}

/// Checks every operation against its regions and cuts it into slices of
/// at most `max_slice_bytes` (clamped to [`MAX_WR_BYTES`]).
pub fn cut_slices(ops: &[RdmaOp], max_slice_bytes: u64) -> Result<Vec<Slice>> {
    if max_slice_bytes == 0 {
        return Err(RdmaError::Invalid(
            "max_slice_bytes must be positive".into(),
        ));
    }
    let max = max_slice_bytes.min(MAX_WR_BYTES);
    let mut slices = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if op.len == 0 {
            return Err(RdmaError::Invalid(format!("operation {i} has length 0")));
        }
        check_range("local", op.local, op.local_offset, op.len)?;
        check_range("remote", op.remote, op.remote_offset, op.len)?;
        let mut offset = 0;
        while offset < op.len {
            let len = (op.len - offset).min(max);
            slices.push(Slice { op: i, offset, len });
            offset += len;
        }
    }
    Ok(slices)
}

fn keys_for(op: &RdmaOp, lane: &Lane) -> Option<(u32, u32)> {
    let lkey = (*op.lkeys.get(lane.local_nic)?)?;
    let rkey = (*op.rkeys.get(lane.remote_nic)?)?;
    Some((lkey, rkey))
}

/// Assigns slices to lanes within their free slots; see the module docs.
///
/// Fails with [`RdmaError::Invalid`] when an operation's regions are not
/// registered on any lane's NIC pair (no amount of waiting helps then).
pub fn assign_slices(
    ops: &[RdmaOp],
    slices: &[Slice],
    lanes: &[Lane],
    signal_every: u32,
) -> Result<LanePlan> {
    if signal_every == 0 {
        return Err(RdmaError::Invalid("signal_every must be positive".into()));
    }
    for (i, op) in ops.iter().enumerate() {
        if slices.iter().any(|s| s.op == i) && !lanes.iter().any(|l| keys_for(op, l).is_some()) {
            return Err(RdmaError::Invalid(format!(
                "operation {i}: regions not registered on any connected NIC pair"
            )));
        }
    }
    let mut free: Vec<u32> = lanes.iter().map(|l| l.free_slots).collect();
    let mut plan = LanePlan::default();
    let mut cursor = 0usize;
    for s in slices {
        let op = ops
            .get(s.op)
            .ok_or_else(|| RdmaError::Invalid(format!("slice names operation {}", s.op)))?;
        if s.len == 0
            || s.len > MAX_WR_BYTES
            || s.offset.checked_add(s.len).is_none_or(|e| e > op.len)
        {
            return Err(RdmaError::Invalid(format!(
                "slice {s:?} outside its operation"
            )));
        }
        // Most free slots wins; among equals the first at or after the
        // rotating cursor, so equal lanes take turns.
        let n = lanes.len();
        let best = (0..n)
            .map(|k| (cursor + k) % n)
            .filter(|&l| free[l] > 0)
            .filter_map(|l| keys_for(op, &lanes[l]).map(|keys| (l, keys)))
            .fold(None::<(usize, (u32, u32))>, |best, cand| match best {
                Some(b) if free[b.0] >= free[cand.0] => Some(b),
                _ => Some(cand),
            });
        let Some((lane, (lkey, rkey))) = best else {
            plan.deferred.push(*s);
            continue;
        };
        free[lane] -= 1;
        cursor = (lane + 1) % n;
        plan.wrs.push(PlannedWr {
            lane,
            slice: *s,
            kind: op.kind,
            local_addr: op.local.base + op.local_offset + s.offset,
            lkey,
            remote_addr: op.remote.base + op.remote_offset + s.offset,
            rkey,
            // MAX_WR_BYTES is 2^31, so this always fits.
            len: u32::try_from(s.len).unwrap_or(u32::MAX),
            signaled: false,
        });
    }
    mark_signaled(&mut plan.wrs, lanes.len(), signal_every);
    Ok(plan)
}

/// Sets `signaled` on every `every`-th request of each lane and on each
/// lane's last request.
pub fn mark_signaled(wrs: &mut [PlannedWr], lanes: usize, every: u32) {
    let mut count = vec![0u32; lanes];
    let mut last: Vec<Option<usize>> = vec![None; lanes];
    for (i, wr) in wrs.iter_mut().enumerate() {
        count[wr.lane] += 1;
        wr.signaled = count[wr.lane].is_multiple_of(every);
        last[wr.lane] = Some(i);
    }
    for i in last.into_iter().flatten() {
        wrs[i].signaled = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op(len: u64, local_off: u64, remote_off: u64, nics: usize) -> RdmaOp {
        RdmaOp {
            kind: RdmaOpKind::Write,
            local: Extent {
                base: 0x1000_0000,
                len: local_off + len + 7,
            },
            local_offset: local_off,
            lkeys: (0..nics).map(|n| Some(100 + n as u32)).collect(),
            remote: Extent {
                base: 0x7f00_0000_0000,
                len: remote_off + len,
            },
            remote_offset: remote_off,
            rkeys: (0..nics).map(|n| Some(200 + n as u32)).collect(),
            len,
        }
    }

    fn lanes(nics: usize, qps: usize, free: u32) -> Vec<Lane> {
        let mut v = Vec::new();
        for q in 0..qps {
            for n in 0..nics {
                let _ = q;
                v.push(Lane {
                    local_nic: n,
                    remote_nic: n,
                    free_slots: free,
                });
            }
        }
        v
    }

    #[test]
    fn out_of_bounds_and_empty_ops_are_refused() {
        let mut o = op(100, 0, 0, 1);
        o.remote_offset = 1;
        assert!(matches!(
            cut_slices(&[o], 64),
            Err(RdmaError::OutOfBounds { what: "remote", .. })
        ));
        let mut o = op(100, 0, 0, 1);
        o.local_offset = u64::MAX;
        assert!(matches!(
            cut_slices(&[o], 64),
            Err(RdmaError::OutOfBounds { what: "local", .. })
        ));
        assert!(matches!(
            cut_slices(&[op(0, 0, 0, 1)], 64),
            Err(RdmaError::Invalid(_))
        ));
        assert!(cut_slices(&[op(1, 0, 0, 1)], 0).is_err());
    }

    #[test]
    fn big_ops_spread_evenly_over_all_lanes() {
        let ops = vec![op(64 << 20, 0, 0, 2)];
        let slices = cut_slices(&ops, 1 << 20).unwrap();
        assert_eq!(slices.len(), 64);
        let l = lanes(2, 4, 100);
        let plan = assign_slices(&ops, &slices, &l, 4).unwrap();
        assert!(plan.deferred.is_empty());
        let mut per_lane = [0; 8];
        for w in &plan.wrs {
            per_lane[w.lane] += 1;
            assert_eq!(w.lkey, 100 + l[w.lane].local_nic as u32);
            assert_eq!(w.rkey, 200 + l[w.lane].remote_nic as u32);
        }
        assert_eq!(per_lane, [8; 8]);
        // 8 per lane, signal every 4th: requests 4 and 8 of each lane.
        assert_eq!(plan.wrs.iter().filter(|w| w.signaled).count(), 16);
    }

    #[test]
    fn exhausted_budgets_defer_the_rest() {
        let ops = vec![op(10 * 4096, 0, 0, 1)];
        let slices = cut_slices(&ops, 4096).unwrap();
        let plan = assign_slices(&ops, &slices, &lanes(1, 2, 3), 16).unwrap();
        assert_eq!(plan.wrs.len(), 6);
        assert_eq!(plan.deferred.len(), 4);
        assert_eq!(plan.deferred[0].offset, 6 * 4096);
        assert_eq!(plan.wrs.iter().filter(|w| w.signaled).count(), 2);
        let none = assign_slices(&ops, &plan.deferred, &lanes(1, 2, 0), 16).unwrap();
        assert!(none.wrs.is_empty());
        assert_eq!(none.deferred, plan.deferred);
    }

    #[test]
    fn unregistered_regions_use_only_lanes_with_keys() {
        let mut o = op(8 * 4096, 0, 0, 2);
        o.lkeys[1] = None;
        let ops = vec![o.clone()];
        let slices = cut_slices(&ops, 4096).unwrap();
        let plan = assign_slices(&ops, &slices, &lanes(2, 1, 100), 1).unwrap();
        assert!(plan.wrs.iter().all(|w| w.lane == 0 && w.lkey == 100));
        o.lkeys[0] = None;
        assert!(matches!(
            assign_slices(&[o], &slices, &lanes(2, 1, 100), 1),
            Err(RdmaError::Invalid(_))
        ));
    }

    #[test]
    fn slices_never_exceed_the_wr_maximum() {
        let ops = vec![op(5 << 30, 0, 0, 1)];
        let slices = cut_slices(&ops, u64::MAX).unwrap();
        assert_eq!(slices.len(), 3);
        assert!(slices.iter().all(|s| s.len <= MAX_WR_BYTES));
        let plan = assign_slices(&ops, &slices, &lanes(1, 1, 8), 8).unwrap();
        assert_eq!(plan.wrs.iter().map(|w| w.len as u64).sum::<u64>(), 5 << 30);
    }

    fn arb_case() -> impl Strategy<Value = (Vec<RdmaOp>, Vec<Lane>, u64, u32)> {
        let nics = 1usize..4;
        nics.prop_flat_map(|nics| {
            let op_s = (
                1u64..200_000,
                0u64..5000,
                0u64..5000,
                any::<bool>(),
                proptest::collection::vec(any::<bool>(), nics),
            )
                .prop_map(move |(len, lo, ro, read, holes)| {
                    let mut o = op(len, lo, ro, nics);
                    if read {
                        o.kind = RdmaOpKind::Read;
                    }
                    // Some NICs lack the registration, but never all.
                    for (n, h) in holes.iter().enumerate() {
                        if *h && n + 1 < nics {
                            o.lkeys[n] = None;
                        }
                    }
                    o
                });
            let lane_s =
                proptest::collection::vec((0..nics, 0..nics, 0u32..20), 1..8).prop_map(move |v| {
                    let mut lanes: Vec<Lane> = v
                        .into_iter()
                        .map(|(l, r, f)| Lane {
                            local_nic: l,
                            remote_nic: r,
                            free_slots: f,
                        })
                        .collect();
                    // Guarantee one lane on the NIC every op has keys for.
                    lanes.push(Lane {
                        local_nic: nics - 1,
                        remote_nic: 0,
                        free_slots: 1,
                    });
                    lanes
                });
            (
                proptest::collection::vec(op_s, 1..6),
                lane_s,
                1u64..70_000,
                1u32..6,
            )
        })
    }

    proptest! {
        #[test]
        fn every_byte_once_budgets_kept_bounds_respected((ops, lanes, max, every) in arb_case()) {
            let slices = cut_slices(&ops, max).unwrap();
            let plan = assign_slices(&ops, &slices, &lanes, every).unwrap();

            // Budgets respected.
            let mut used = vec![0u32; lanes.len()];
            for w in &plan.wrs {
                used[w.lane] += 1;
            }
            for (l, u) in used.iter().enumerate() {
                prop_assert!(*u <= lanes[l].free_slots);
            }

            // Every byte of every op covered exactly once by posted + deferred.
            let mut pieces: Vec<Vec<(u64, u64)>> = vec![Vec::new(); ops.len()];
            for w in &plan.wrs {
                prop_assert_eq!(w.len as u64, w.slice.len);
                pieces[w.slice.op].push((w.slice.offset, w.slice.len));
            }
            for s in &plan.deferred {
                pieces[s.op].push((s.offset, s.len));
            }
            for (i, p) in pieces.iter_mut().enumerate() {
                p.sort();
                let mut at = 0;
                for &(off, len) in p.iter() {
                    prop_assert_eq!(off, at);
                    prop_assert!(len > 0 && len <= max);
                    at += len;
                }
                prop_assert_eq!(at, ops[i].len);
            }

            // No request crosses its regions, keys belong to the lane's NICs.
            for w in &plan.wrs {
                let o = &ops[w.slice.op];
                prop_assert!(w.local_addr >= o.local.base);
                prop_assert!(w.local_addr + w.len as u64 <= o.local.base + o.local.len);
                prop_assert!(w.remote_addr >= o.remote.base);
                prop_assert!(w.remote_addr + w.len as u64 <= o.remote.base + o.remote.len);
                prop_assert_eq!(Some(w.lkey), o.lkeys[lanes[w.lane].local_nic]);
                prop_assert_eq!(Some(w.rkey), o.rkeys[lanes[w.lane].remote_nic]);
                prop_assert_eq!(w.kind, o.kind);
            }

            // Per lane: last one signalled, never more than `every` in a row unsignalled.
            for l in 0..lanes.len() {
                let on_lane: Vec<&PlannedWr> = plan.wrs.iter().filter(|w| w.lane == l).collect();
                if let Some(last) = on_lane.last() {
                    prop_assert!(last.signaled);
                }
                let mut run = 0;
                for w in on_lane {
                    if w.signaled { run = 0 } else { run += 1 }
                    prop_assert!(run < every);
                }
            }

            // Deferral only happens when no eligible lane had a free slot.
            if !plan.deferred.is_empty() {
                for s in &plan.deferred {
                    let o = &ops[s.op];
                    for (l, lane) in lanes.iter().enumerate() {
                        if keys_for(o, lane).is_some() {
                            prop_assert_eq!(used[l], lane.free_slots);
                        }
                    }
                }
            }
        }
    }
}
