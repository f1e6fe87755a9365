//! Transfer planning: a pure function that cuts a batch's operations into
//! slices and spreads them over a peer's connections. Executors (the
//! transports) only do I/O on the plan.
//!
//! ```text
//!  op0 [=========== 2.5 slices ===========]   op1 [= <1 slice =]
//!       | s0 -> c0 | s1 -> c1 | s2 -> c0 |         | s3 -> c1 |
//! ```
//! Each slice goes to the connection with the fewest bytes assigned so far,
//! so one large operation uses every connection and mixed sizes balance.

/// One operation's byte ranges, as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSpan {
    pub local_offset: u64,
    pub remote_offset: u64,
    pub len: u64,
}

/// A contiguous piece of one operation assigned to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    /// Index of the operation in the batch.
    pub op: u32,
    pub local_offset: u64,
    pub remote_offset: u64,
    pub len: u64,
    /// Connection (lane) index, `< lanes`.
    pub lane: u16,
}

/// Cuts `ops` into slices of at most `slice_size` bytes over `lanes` lanes.
///
/// Zero-length operations produce no slice. `slice_size` and `lanes` of 0
/// are treated as 1.
pub fn plan(ops: &[OpSpan], slice_size: u64, lanes: u16) -> Vec<Slice> {
    let slice_size = slice_size.max(1);
    let lanes = lanes.max(1) as usize;
    let total: u64 = ops.iter().map(|o| o.len.div_ceil(slice_size)).sum();
    let mut out = Vec::with_capacity(total as usize);
    let mut load = vec![0u64; lanes];
    for (i, op) in ops.iter().enumerate() {
        let mut done = 0;
        while done < op.len {
            let len = slice_size.min(op.len - done);
            // Least-loaded lane; ties go to the lowest index (deterministic).
            let lane = (0..lanes).min_by_key(|&l| (load[l], l)).unwrap_or(0);
            load[lane] += len;
            out.push(Slice {
                op: i as u32,
                local_offset: op.local_offset + done,
                remote_offset: op.remote_offset + done,
                len,
                lane: lane as u16,
            });
            done += len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exact_multiple_and_remainder() {
        let s = plan(
            &[OpSpan {
                local_offset: 10,
                remote_offset: 100,
                len: 25,
            }],
            10,
            2,
        );
        assert_eq!(s.len(), 3);
        assert_eq!(
            (s[0].local_offset, s[0].remote_offset, s[0].len, s[0].lane),
            (10, 100, 10, 0)
        );
        assert_eq!((s[1].local_offset, s[1].len, s[1].lane), (20, 10, 1));
        assert_eq!((s[2].local_offset, s[2].len, s[2].lane), (30, 5, 0));
    }

    #[test]
    fn one_byte_and_zero() {
        let s = plan(
            &[
                OpSpan {
                    local_offset: 0,
                    remote_offset: 0,
                    len: 0,
                },
                OpSpan {
                    local_offset: 7,
                    remote_offset: 9,
                    len: 1,
                },
            ],
            1 << 20,
            4,
        );
        assert_eq!(
            s,
            vec![Slice {
                op: 1,
                local_offset: 7,
                remote_offset: 9,
                len: 1,
                lane: 0
            }]
        );
    }

    #[test]
    fn large_op_uses_every_lane() {
        let s = plan(
            &[OpSpan {
                local_offset: 0,
                remote_offset: 0,
                len: 8 << 20,
            }],
            1 << 20,
            4,
        );
        let mut per = [0u64; 4];
        for x in &s {
            per[x.lane as usize] += x.len;
        }
        assert_eq!(per, [2 << 20; 4]);
    }

    proptest! {
        #[test]
        fn slices_cover_each_op_exactly(
            ops in prop::collection::vec((0u64..1<<40, 0u64..1<<40, 0u64..5_000_000), 0..40),
            slice in 1u64..3_000_000,
            lanes in 0u16..9,
        ) {
            let ops: Vec<OpSpan> = ops.into_iter()
                .map(|(l, r, len)| OpSpan { local_offset: l, remote_offset: r, len })
                .collect();
            let s = plan(&ops, slice, lanes);
            let mut next = vec![0u64; ops.len()];
            let mut lane_bytes = vec![0u64; lanes.max(1) as usize];
            for x in &s {
                let op = ops[x.op as usize];
                prop_assert!(x.len >= 1 && x.len <= slice);
                prop_assert!(x.lane < lanes.max(1));
                // In order, contiguous, same displacement locally and remotely.
                prop_assert_eq!(x.local_offset, op.local_offset + next[x.op as usize]);
                prop_assert_eq!(x.remote_offset, op.remote_offset + next[x.op as usize]);
                next[x.op as usize] += x.len;
                lane_bytes[x.lane as usize] += x.len;
            }
            for (i, op) in ops.iter().enumerate() {
                prop_assert_eq!(next[i], op.len);
            }
            // Balance: no lane carries more than the least-loaded one plus a slice.
            let (mn, mx) = (lane_bytes.iter().min().unwrap(), lane_bytes.iter().max().unwrap());
            prop_assert!(mx - mn <= slice);
        }
    }
}
