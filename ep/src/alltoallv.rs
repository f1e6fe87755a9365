//! The byte plan of a collective all-to-all-v baseline (moe-bench's
//! `--baseline nccl`): the same deduplicated rows [`crate::EpGroup`]
//! dispatch and combine move, laid out per peer as a plain all-to-all-v
//! would move them, with the exact bytes every rank sends and must receive.
//!
//! ```text
//!  dispatch: rank i -> rank j   rows[i][j] rows of dispatch_row_bytes
//!            (token t of i: its wire payload, then metadata-sized bytes tagged (i, t))
//!  combine:  rank j -> rank i   rows[i][j] rows of combine_row_bytes
//!            (pattern tagged (j, i, row))
//!  each direction: the send buffer packed by destination, the receive
//!  buffer packed by source, self included (as MPI_Alltoallv does).
//! ```
//!
//! Pure: no GPU, no I/O. Every rank builds the same row matrix from the
//! shared seed and routing, so send and receive lengths agree across ranks
//! without a count exchange.

use crate::dtype::{self, DType, WireFormat};
use crate::layout::{plan_sends, ExpertMap};
use crate::workload::{self, Routing, SplitMix};

/// Which all-to-all of an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Dispatch,
    Combine,
}

/// What one rank moves in both all-to-alls.
#[derive(Debug, Clone)]
pub struct AllToAllPlan {
    pub world: usize,
    pub rank: usize,
    /// `tokens[i][j]`: the tokens of rank `i` sent to rank `j` (deduplicated
    /// over the experts `j` holds), in send order.
    pub tokens: Vec<Vec<Vec<u32>>>,
    /// Expert selections of this rank (token × top-k), for the DeepEP-style bandwidth.
    pub selections: u64,
    pub dispatch_row_bytes: usize,
    pub combine_row_bytes: usize,
    seed: u64,
    hidden: usize,
    dtype: DType,
    wire: WireFormat,
}

/// The workload an [`AllToAllPlan`] is built from.
#[derive(Debug, Clone)]
pub struct PlanParams {
    pub routing: Routing,
    pub seed: u64,
    pub world: usize,
    pub tokens: usize,
    pub topk: usize,
    pub experts: usize,
    pub hidden: usize,
    pub dtype: DType,
    pub wire: WireFormat,
    /// Bytes of a dispatched row (payload and metadata), as the group's.
    pub dispatch_row_bytes: usize,
    /// Bytes of a combine row, as the group's.
    pub combine_row_bytes: usize,
}

/// `rows[i][j]`: deduplicated rows rank `i` sends to rank `j` in dispatch
/// (self included) for the workload of `seed` and `routing`.
pub fn row_matrix(
    routing: Routing,
    seed: u64,
    world: usize,
    tokens: usize,
    topk: usize,
    experts: usize,
) -> Result<Vec<Vec<usize>>, String> {
    Ok(token_lists(routing, seed, world, tokens, topk, experts)?
        .0
        .iter()
        .map(|to| to.iter().map(Vec::len).collect())
        .collect())
}

type TokenLists = (Vec<Vec<Vec<u32>>>, Vec<u64>);

fn token_lists(
    routing: Routing,
    seed: u64,
    world: usize,
    tokens: usize,
    topk: usize,
    experts: usize,
) -> Result<TokenLists, String> {
    let map = ExpertMap {
        num_experts: experts,
        world,
    };
    let mut lists = Vec::with_capacity(world);
    let mut sel = Vec::with_capacity(world);
    for r in 0..world {
        let (idx, _) = workload::routing(routing, seed, r, tokens, topk, experts);
        let plan = plan_sends(&idx, topk, map)?;
        lists.push(plan.send);
        sel.push(plan.selections);
    }
    Ok((lists, sel))
}

impl AllToAllPlan {
    /// The plan of `rank`.
    pub fn new(p: &PlanParams, rank: usize) -> Result<AllToAllPlan, String> {
        if rank >= p.world {
            return Err(format!("rank {rank} does not fit a group of {}", p.world));
        }
        let payload = dtype::payload_bytes(p.hidden, p.dtype, p.wire);
        if p.dispatch_row_bytes < payload {
            return Err(format!(
                "dispatch rows of {} bytes cannot hold a {payload}-byte payload",
                p.dispatch_row_bytes
            ));
        }
        let (tokens, sel) = token_lists(p.routing, p.seed, p.world, p.tokens, p.topk, p.experts)?;
        Ok(AllToAllPlan {
            world: p.world,
            rank,
            tokens,
            selections: sel[rank],
            dispatch_row_bytes: p.dispatch_row_bytes,
            combine_row_bytes: p.combine_row_bytes,
            seed: p.seed,
            hidden: p.hidden,
            dtype: p.dtype,
            wire: p.wire,
        })
    }

    fn rows(&self, from: usize, to: usize) -> usize {
        self.tokens[from][to].len()
    }

    /// The (sender, receiver) of the dispatch token list behind the bytes
    /// `src` sends `dst` in `phase`.
    fn pair(&self, phase: Phase, src: usize, dst: usize) -> (usize, usize) {
        match phase {
            // Dispatch rows i -> j are tokens[i][j].
            Phase::Dispatch => (src, dst),
            // Combine j -> i returns the rows i sent j.
            Phase::Combine => (dst, src),
        }
    }

    fn row_bytes(&self, phase: Phase) -> usize {
        match phase {
            Phase::Dispatch => self.dispatch_row_bytes,
            Phase::Combine => self.combine_row_bytes,
        }
    }

    /// Bytes `src` sends `dst` in `phase`.
    pub fn pair_bytes(&self, phase: Phase, src: usize, dst: usize) -> usize {
        let (a, b) = self.pair(phase, src, dst);
        self.rows(a, b) * self.row_bytes(phase)
    }

    /// Bytes this rank sends to each rank in `phase`.
    pub fn send_lens(&self, phase: Phase) -> Vec<u64> {
        (0..self.world)
            .map(|d| self.pair_bytes(phase, self.rank, d) as u64)
            .collect()
    }

    /// Bytes this rank receives from each rank in `phase`.
    pub fn recv_lens(&self, phase: Phase) -> Vec<u64> {
        (0..self.world)
            .map(|s| self.pair_bytes(phase, s, self.rank) as u64)
            .collect()
    }

    /// Rows that cross between different ranks from this rank in dispatch,
    /// and rows this rank keeps.
    pub fn dispatch_rows_remote_and_self(&self) -> (usize, usize) {
        let all: usize = (0..self.world).map(|d| self.rows(self.rank, d)).sum();
        let own = self.rows(self.rank, self.rank);
        (all - own, own)
    }

    /// Rows this rank returns to other ranks in combine.
    pub fn combine_rows_remote(&self) -> usize {
        (0..self.world)
            .filter(|&s| s != self.rank)
            .map(|s| self.rows(s, self.rank))
            .sum()
    }

    /// The exact bytes `src` sends `dst` in `phase`.
    pub fn pair_data(&self, phase: Phase, src: usize, dst: usize) -> Vec<u8> {
        let rb = self.row_bytes(phase);
        let (a, b) = self.pair(phase, src, dst);
        let list = &self.tokens[a][b];
        let mut out = vec![0u8; list.len() * rb];
        let mut act = vec![0u8; self.hidden * self.dtype.size()];
        for (i, (row, &t)) in out.chunks_exact_mut(rb).zip(list).enumerate() {
            match phase {
                Phase::Dispatch => {
                    workload::token_row(
                        self.seed,
                        src,
                        t as usize,
                        self.hidden,
                        self.dtype,
                        &mut act,
                    );
                    let w = workload::wire_row(&act, self.hidden, self.dtype, self.wire);
                    row[..w.len()].copy_from_slice(&w);
                    fill(&mut row[w.len()..], [self.seed, 1, src as u64, t as u64]);
                }
                Phase::Combine => {
                    fill(
                        row,
                        [self.seed, 2, src as u64, ((dst as u64) << 32) | i as u64],
                    );
                }
            }
        }
        out
    }

    /// This rank's send buffer in `phase`: packed by destination.
    pub fn send_data(&self, phase: Phase) -> Vec<u8> {
        (0..self.world)
            .flat_map(|d| self.pair_data(phase, self.rank, d))
            .collect()
    }

    /// What this rank's receive buffer must hold after `phase`: packed by source.
    pub fn expected_recv(&self, phase: Phase) -> Vec<u8> {
        (0..self.world)
            .flat_map(|s| self.pair_data(phase, s, self.rank))
            .collect()
    }

    /// Rows this rank receives in `phase`.
    pub fn recv_rows(&self, phase: Phase) -> usize {
        (0..self.world)
            .map(|s| {
                let (a, b) = self.pair(phase, s, self.rank);
                self.rows(a, b)
            })
            .sum()
    }
}

/// Pseudo-random bytes named by `tag` (the same on every rank).
fn fill(out: &mut [u8], tag: [u64; 4]) {
    let mut s = tag.iter().fold(0x6A09_E667_F3BC_C908u64, |h, &x| {
        SplitMix(h ^ x.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
    });
    let mut rng = SplitMix(s);
    for c in out.chunks_mut(8) {
        s = rng.next_u64();
        c.copy_from_slice(&s.to_le_bytes()[..c.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(world: usize, routing: Routing) -> PlanParams {
        PlanParams {
            routing,
            seed: 7,
            world,
            tokens: 24,
            topk: 3,
            experts: 12,
            hidden: 32,
            dtype: DType::Bf16,
            wire: WireFormat::Native,
            dispatch_row_bytes: 64 + 24,
            combine_row_bytes: 64,
        }
    }

    #[test]
    fn lengths_agree_across_ranks_and_combine_is_the_transpose() {
        for routing in [Routing::Uniform, Routing::Zipf, Routing::Hot] {
            let p = params(3, routing);
            let plans: Vec<AllToAllPlan> =
                (0..3).map(|r| AllToAllPlan::new(&p, r).unwrap()).collect();
            for phase in [Phase::Dispatch, Phase::Combine] {
                for i in 0..3 {
                    for j in 0..3 {
                        assert_eq!(
                            plans[i].send_lens(phase)[j],
                            plans[j].recv_lens(phase)[i],
                            "{phase:?} {i}->{j}"
                        );
                    }
                }
            }
            for i in 0..3 {
                for j in 0..3 {
                    let d = plans[i].send_lens(Phase::Dispatch)[j] / 88;
                    let c = plans[j].send_lens(Phase::Combine)[i] / 64;
                    assert_eq!(d, c, "combine returns one row per dispatched row");
                }
            }
        }
    }

    #[test]
    fn rows_match_the_dispatch_plan() {
        let p = params(4, Routing::Zipf);
        let m = row_matrix(p.routing, p.seed, 4, p.tokens, p.topk, p.experts).unwrap();
        let map = ExpertMap {
            num_experts: 12,
            world: 4,
        };
        for (r, row) in m.iter().enumerate() {
            let (idx, _) = workload::routing(p.routing, p.seed, r, p.tokens, p.topk, p.experts);
            let sp = plan_sends(&idx, p.topk, map).unwrap();
            let want: Vec<usize> = sp.send.iter().map(Vec::len).collect();
            assert_eq!(row, &want);
            let plan = AllToAllPlan::new(&p, r).unwrap();
            assert_eq!(plan.selections, sp.selections);
            let (remote, own) = plan.dispatch_rows_remote_and_self();
            assert_eq!(remote + own, want.iter().sum::<usize>());
            assert_eq!(own, want[r]);
        }
    }

    #[test]
    fn every_rank_expects_exactly_what_the_others_send() {
        let p = params(3, Routing::Uniform);
        let plans: Vec<AllToAllPlan> = (0..3).map(|r| AllToAllPlan::new(&p, r).unwrap()).collect();
        for phase in [Phase::Dispatch, Phase::Combine] {
            let sends: Vec<Vec<u8>> = plans.iter().map(|pl| pl.send_data(phase)).collect();
            for (me, plan) in plans.iter().enumerate() {
                // Cut my piece out of every sender's packed buffer.
                let mut got = Vec::new();
                for (s, buf) in sends.iter().enumerate() {
                    let lens = plans[s].send_lens(phase);
                    let off: u64 = lens[..me].iter().sum();
                    got.extend_from_slice(&buf[off as usize..(off + lens[me]) as usize]);
                }
                assert_eq!(got, plan.expected_recv(phase), "{phase:?} rank {me}");
                assert_eq!(
                    got.len(),
                    plan.recv_rows(phase) * plan.row_bytes(phase),
                    "{phase:?} rank {me}"
                );
            }
        }
    }

    #[test]
    fn dispatch_rows_carry_the_token_payload_and_differ_by_origin() {
        let p = params(2, Routing::Uniform);
        let plan = AllToAllPlan::new(&p, 0).unwrap();
        let t = plan.tokens[1][0][0] as usize;
        let data = plan.pair_data(Phase::Dispatch, 1, 0);
        let mut act = vec![0u8; 64];
        workload::token_row(7, 1, t, 32, DType::Bf16, &mut act);
        assert_eq!(&data[..64], &act[..]);
        // Two different rows never share their metadata-sized tail.
        let rows: Vec<&[u8]> = data.chunks_exact(88).map(|r| &r[64..]).collect();
        for (i, a) in rows.iter().enumerate() {
            for b in &rows[i + 1..] {
                assert_ne!(a, b);
            }
        }
        let c1 = plan.pair_data(Phase::Combine, 0, 1);
        let c2 = plan.pair_data(Phase::Combine, 1, 0);
        assert!(c1.len() >= 64 && c2.len() >= 64);
        assert_ne!(&c1[..64], &c2[..64]);
    }

    #[test]
    fn bad_shapes_are_refused() {
        let mut p = params(2, Routing::Uniform);
        assert!(AllToAllPlan::new(&p, 2).is_err());
        p.dispatch_row_bytes = 10;
        assert!(AllToAllPlan::new(&p, 0).is_err());
    }
}
