//! Pure planning of dispatch and combine: which token goes to which rank,
//! where each row lands, and the expert-major order of what a rank received.
//! No I/O and no engine: the executor in the group (`EpGroup`) only moves the bytes
//! this module decides on.
//!
//! ```text
//!  sender r                                  receiver d
//!  tokens t (ascending) with ≥1 expert on d   slot[r]: rows in r's token order
//!  send[d] = [t0, t3, t4, ...]  ---- rows ---> row j of slot r = token send[d][j] of r
//!                                             expert-major order: local expert asc,
//!                                             then received row asc (rank asc, j asc)
//! ```
//!
//! Deduplication: a token goes to a rank once, whatever number of its top-k
//! experts live there; the row carries which of them are local, with their
//! gate weights.

use std::ops::Range;

/// Where experts live: expert `e` is on rank `e × world / num_experts`;
/// rank `r` holds the contiguous block `first(r)..first(r + 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertMap {
    pub num_experts: usize,
    pub world: usize,
}

impl ExpertMap {
    pub fn owner(&self, e: usize) -> usize {
        e * self.world / self.num_experts
    }

    pub fn first(&self, r: usize) -> usize {
        (r * self.num_experts).div_ceil(self.world)
    }

    /// Experts held by rank `r`.
    pub fn local(&self, r: usize) -> Range<usize> {
        self.first(r)..self.first(r + 1)
    }

    /// Largest number of experts on one rank.
    pub fn max_local(&self) -> usize {
        (0..self.world)
            .map(|r| self.local(r).len())
            .max()
            .unwrap_or(0)
    }
}

/// Marks "this top-k entry is not on the receiving rank" in row metadata.
pub const NOT_LOCAL: u16 = u16::MAX;

/// Sender-side plan of one routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendPlan {
    /// Per destination rank: the tokens sent there, ascending, each once.
    pub send: Vec<Vec<u32>>,
    /// Per token: `tok_dst[tok_off[t]..tok_off[t+1]]` = (rank, position in
    /// `send[rank]`), ranks ascending (the fixed combine order).
    pub tok_off: Vec<u32>,
    pub tok_dst: Vec<(u32, u32)>,
    /// Non-masked (token, expert) selections.
    pub selections: u64,
}

/// Checks a routing and plans the sends. `topk_idx` is `[tokens, k]`,
/// row-major; `-1` masks an entry.
pub fn plan_sends(topk_idx: &[i32], k: usize, map: ExpertMap) -> Result<SendPlan, String> {
    if topk_idx.len().checked_rem(k) != Some(0) {
        return Err(format!(
            "topk_idx has {} entries, not a multiple of k = {k}",
            topk_idx.len()
        ));
    }
    let tokens = topk_idx.len() / k;
    let mut send: Vec<Vec<u32>> = vec![Vec::new(); map.world];
    let mut tok_off = Vec::with_capacity(tokens + 1);
    let mut tok_dst = Vec::with_capacity(tokens * map.world.min(k));
    let mut selections = 0u64;
    let mut ranks = Vec::with_capacity(k);
    tok_off.push(0);
    for t in 0..tokens {
        let row = &topk_idx[t * k..(t + 1) * k];
        ranks.clear();
        for (j, &e) in row.iter().enumerate() {
            if e == -1 {
                continue;
            }
            if e < 0 || e as usize >= map.num_experts {
                return Err(format!(
                    "token {t}: expert {e} outside 0..{} (or -1)",
                    map.num_experts
                ));
            }
            if row[..j].contains(&e) {
                return Err(format!("token {t}: expert {e} selected twice"));
            }
            selections += 1;
            ranks.push(map.owner(e as usize) as u32);
        }
        ranks.sort_unstable();
        ranks.dedup();
        for &r in &ranks {
            tok_dst.push((r, send[r as usize].len() as u32));
            send[r as usize].push(t as u32);
        }
        tok_off.push(tok_dst.len() as u32);
    }
    Ok(SendPlan {
        send,
        tok_off,
        tok_dst,
        selections,
    })
}

/// Fills the metadata of the row token `t` sends to rank `dst`: for each
/// top-k entry, its local expert index on `dst` (or [`NOT_LOCAL`]) and its
/// weight.
pub fn row_entries(
    topk_idx: &[i32],
    weights: &[f32],
    map: ExpertMap,
    dst: usize,
    local_experts: &mut [u16],
    local_weights: &mut [f32],
) {
    let first = map.first(dst);
    for (j, &e) in topk_idx.iter().enumerate() {
        let on_dst = e >= 0 && map.owner(e as usize) == dst;
        local_experts[j] = if on_dst {
            (e as usize - first) as u16
        } else {
            NOT_LOCAL
        };
        local_weights[j] = if on_dst { weights[j] } else { 0.0 };
    }
}

/// Receiver-side index of one dispatch: what came from whom and the
/// expert-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct RecvIndex {
    /// Received rows of source `s` are `recv_off[s]..recv_off[s+1]`.
    pub recv_off: Vec<u32>,
    /// Source token index of each received row.
    pub token: Vec<u32>,
    /// Entries of local expert `e` are `expert_off[e]..expert_off[e+1]` in
    /// expert-major order.
    pub expert_off: Vec<u32>,
    /// Received row of each expert-major entry.
    pub expert_rows: Vec<u32>,
    /// Gate weight of each expert-major entry.
    pub expert_w: Vec<f32>,
    /// Expert-major entries of received row `i` are
    /// `row_entries[row_off[i]..row_off[i+1]]`, local expert ascending.
    pub row_off: Vec<u32>,
    pub row_entries: Vec<u32>,
}

impl RecvIndex {
    pub fn num_rows(&self) -> usize {
        self.token.len()
    }

    pub fn num_entries(&self) -> usize {
        self.expert_rows.len()
    }

    /// Source rank of received row `i`.
    pub fn source(&self, i: usize) -> usize {
        self.recv_off.partition_point(|&o| o as usize <= i) - 1
    }
}

/// One received row's metadata, as read from the receive buffer.
#[derive(Debug, Clone, Copy)]
pub struct RowMeta<'a> {
    pub token: u32,
    pub experts: &'a [u16],
    pub weights: &'a [f32],
}

/// Builds the expert-major index from the received rows' metadata, given
/// in received-row order (sources ascending). Fails on a local expert
/// index outside `0..num_local`.
pub fn build_recv_index<'a>(
    counts: &[u32],
    num_local: usize,
    rows: impl Iterator<Item = RowMeta<'a>> + Clone,
) -> Result<RecvIndex, String> {
    let mut recv_off = Vec::with_capacity(counts.len() + 1);
    recv_off.push(0u32);
    for c in counts {
        recv_off.push(recv_off.last().copied().unwrap_or(0) + c);
    }
    let n = *recv_off.last().unwrap_or(&0) as usize;
    let mut per_expert = vec![0u32; num_local + 1];
    let mut total = 0usize;
    for (i, m) in rows.clone().enumerate() {
        for &e in m.experts {
            if e == NOT_LOCAL {
                continue;
            }
            if e as usize >= num_local {
                return Err(format!(
                    "received row {i}: local expert {e} outside 0..{num_local}"
                ));
            }
            per_expert[e as usize + 1] += 1;
            total += 1;
        }
    }
    for e in 0..num_local {
        per_expert[e + 1] += per_expert[e];
    }
    let expert_off = per_expert.clone();
    let mut cursor = per_expert;
    let mut expert_rows = vec![0u32; total];
    let mut expert_w = vec![0f32; total];
    let mut token = Vec::with_capacity(n);
    let mut row_off = Vec::with_capacity(n + 1);
    let mut row_entries = Vec::with_capacity(total);
    let mut mine: Vec<(u16, f32)> = Vec::new();
    row_off.push(0u32);
    for (i, m) in rows.enumerate() {
        token.push(m.token);
        mine.clear();
        mine.extend(
            m.experts
                .iter()
                .zip(m.weights)
                .filter(|(e, _)| **e != NOT_LOCAL)
                .map(|(e, w)| (*e, *w)),
        );
        mine.sort_by_key(|p| p.0);
        for &(e, w) in &mine {
            let pos = cursor[e as usize] as usize;
            cursor[e as usize] += 1;
            expert_rows[pos] = i as u32;
            expert_w[pos] = w;
            row_entries.push(pos as u32);
        }
        row_off.push(row_entries.len() as u32);
    }
    if token.len() != n {
        return Err(format!(
            "{} row metadata for {n} received rows",
            token.len()
        ));
    }
    Ok(RecvIndex {
        recv_off,
        token,
        expert_off,
        expert_rows,
        expert_w,
        row_off,
        row_entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_map_partitions_evenly_and_unevenly() {
        for (e, w) in [(8, 2), (8, 3), (256, 4), (64, 3), (5, 5)] {
            let m = ExpertMap {
                num_experts: e,
                world: w,
            };
            let mut seen = 0;
            for r in 0..w {
                for x in m.local(r) {
                    assert_eq!(m.owner(x), r, "{e} experts / {w} ranks: expert {x}");
                    seen += 1;
                }
            }
            assert_eq!(seen, e);
        }
    }

    #[test]
    fn dedup_sends_a_token_once_per_rank() {
        let map = ExpertMap {
            num_experts: 8,
            world: 2,
        };
        // token 0: experts 0,1 both on rank 0; token 1: 2 and 6; token 2: masked.
        let idx = [0, 1, 2, 6, -1, -1];
        let p = plan_sends(&idx, 2, map).unwrap();
        assert_eq!(p.send, vec![vec![0, 1], vec![1]]);
        assert_eq!(p.selections, 4);
        assert_eq!(p.tok_off, vec![0, 1, 3, 3]);
        assert_eq!(p.tok_dst, vec![(0, 0), (0, 1), (1, 0)]);
        let (mut e, mut w) = ([0u16; 2], [0f32; 2]);
        row_entries(&idx[0..2], &[0.25, 0.75], map, 0, &mut e, &mut w);
        assert_eq!(e, [0, 1]);
        row_entries(&idx[2..4], &[0.5, 0.5], map, 1, &mut e, &mut w);
        assert_eq!((e, w), ([NOT_LOCAL, 2], [0.0, 0.5]));
    }

    #[test]
    fn rejects_bad_routing() {
        let map = ExpertMap {
            num_experts: 4,
            world: 2,
        };
        assert!(plan_sends(&[0, 0], 2, map).unwrap_err().contains("twice"));
        assert!(plan_sends(&[0, 4], 2, map).unwrap_err().contains("outside"));
        assert!(plan_sends(&[0, -2], 2, map).is_err());
        assert!(plan_sends(&[0, 1, 2], 2, map).is_err());
    }

    #[test]
    fn recv_index_is_expert_major_and_row_entries_point_back() {
        // Two sources; local experts 0..3.
        let metas = [
            (7u32, [2u16, 0], [0.3f32, 0.7]),
            (9, [1, NOT_LOCAL], [1.0, 0.0]),
            (4, [0, 2], [0.6, 0.4]),
        ];
        let rows = metas.iter().map(|(t, e, w)| RowMeta {
            token: *t,
            experts: e,
            weights: w,
        });
        let ix = build_recv_index(&[2, 1], 3, rows).unwrap();
        assert_eq!(ix.recv_off, vec![0, 2, 3]);
        assert_eq!(ix.token, vec![7, 9, 4]);
        assert_eq!(ix.expert_off, vec![0, 2, 3, 5]);
        assert_eq!(ix.expert_rows, vec![0, 2, 1, 0, 2]);
        assert_eq!(ix.expert_w, vec![0.7, 0.6, 1.0, 0.3, 0.4]);
        assert_eq!(ix.row_off, vec![0, 2, 3, 5]);
        assert_eq!(ix.row_entries, vec![0, 3, 2, 1, 4]);
        assert_eq!((ix.source(0), ix.source(1), ix.source(2)), (0, 0, 1));
        for i in 0..ix.num_rows() {
            for &p in &ix.row_entries[ix.row_off[i] as usize..ix.row_off[i + 1] as usize] {
                assert_eq!(ix.expert_rows[p as usize] as usize, i);
            }
        }
        let bad = [(0u32, [5u16, NOT_LOCAL], [1.0f32, 0.0])];
        let rows = bad.iter().map(|(t, e, w)| RowMeta {
            token: *t,
            experts: e,
            weights: w,
        });
        assert!(build_recv_index(&[1], 3, rows).is_err());
    }
}
