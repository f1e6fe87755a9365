//! Synthetic MoE workloads with exact checks, shared by `moe-bench` and the
//! tests: activations whose every row encodes (source rank, token index),
//! routings (uniform, zipf, hot expert), a deterministic stand-in for the
//! experts, and a single-process reference of combine.
//!
//! The reference follows the combine contract of [`crate::EpGroup::combine`]
//! operation by operation, so a correct group matches it bit for bit.

use crate::dtype::{self, DType, WireFormat};
use crate::layout::ExpertMap;
use crate::{Dispatched, Tensor};

/// A small, fast, seedable generator (splitmix64); stable across builds so a
/// seed names the same workload everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How tokens pick their experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Routing {
    /// k distinct experts, uniformly.
    Uniform,
    /// k distinct experts with popularity ∝ 1/(e+1)^1.1 (low expert ids,
    /// hence low ranks, are hot).
    Zipf,
    /// Every token picks expert 0; the other k-1 uniformly.
    Hot,
}

impl std::str::FromStr for Routing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uniform" => Ok(Routing::Uniform),
            "zipf" => Ok(Routing::Zipf),
            "hot" | "hot-expert" => Ok(Routing::Hot),
            _ => Err(format!("unknown routing {s:?} (uniform, zipf, hot-expert)")),
        }
    }
}

impl Routing {
    pub fn name(self) -> &'static str {
        match self {
            Routing::Uniform => "uniform",
            Routing::Zipf => "zipf",
            Routing::Hot => "hot-expert",
        }
    }
}

/// `(topk_idx, topk_weights)` of `tokens` tokens of rank `rank`; weights
/// are positive and sum to 1 per token.
pub fn routing(
    kind: Routing,
    seed: u64,
    rank: usize,
    tokens: usize,
    topk: usize,
    num_experts: usize,
) -> (Vec<i32>, Vec<f32>) {
    let mut rng = SplitMix(mix(seed ^ 0x5EED_0000 ^ ((rank as u64) << 32)));
    let cdf: Vec<f64> = match kind {
        Routing::Zipf => {
            let mut acc = 0.0;
            (0..num_experts)
                .map(|e| {
                    acc += 1.0 / ((e + 1) as f64).powf(1.1);
                    acc
                })
                .collect()
        }
        _ => Vec::new(),
    };
    let mut idx = Vec::with_capacity(tokens * topk);
    let mut w = Vec::with_capacity(tokens * topk);
    let mut chosen: Vec<i32> = Vec::with_capacity(topk);
    for _ in 0..tokens {
        chosen.clear();
        if kind == Routing::Hot {
            chosen.push(0);
        }
        let mut tries = 0;
        while chosen.len() < topk {
            tries += 1;
            let e = if kind == Routing::Zipf && tries < 64 * topk {
                let total = cdf[num_experts - 1];
                let u = rng.unit() * total;
                cdf.partition_point(|&c| c <= u).min(num_experts - 1)
            } else {
                rng.below(num_experts as u64) as usize
            } as i32;
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        let us: Vec<f32> = (0..topk).map(|_| 0.1 + 0.9 * rng.unit() as f32).collect();
        let sum: f32 = us.iter().sum();
        idx.extend_from_slice(&chosen);
        w.extend(us.iter().map(|u| u / sum));
    }
    (idx, w)
}

/// Element `h` of token `t` of rank `rank`: a pseudo-random finite value
/// (|v| in [1/8, 16)) derived from (seed, rank, token, channel), so a row
/// names its origin.
fn element_bits(seed: u64, rank: usize, t: usize, h: usize, dtype: DType) -> u32 {
    let z = mix(seed ^ ((rank as u64) << 48) ^ ((t as u64) << 24) ^ h as u64);
    let sign = (z >> 63) as u32;
    let exp = 124 + (z >> 56 & 7) as u32; // 2^-3 .. 2^4
    match dtype {
        DType::Bf16 => (sign << 15) | (exp << 7) | (z as u32 & 0x7F),
        DType::F32 => (sign << 31) | (exp << 23) | (z as u32 & 0x7F_FFFF),
    }
}

/// Row `t` of rank `rank` (activation bytes).
pub fn token_row(seed: u64, rank: usize, t: usize, hidden: usize, dtype: DType, out: &mut [u8]) {
    for h in 0..hidden {
        let b = element_bits(seed, rank, t, h, dtype);
        match dtype {
            DType::Bf16 => out[2 * h..2 * h + 2].copy_from_slice(&(b as u16).to_le_bytes()),
            DType::F32 => out[4 * h..4 * h + 4].copy_from_slice(&b.to_le_bytes()),
        }
    }
}

/// All `tokens` rows of rank `rank`.
pub fn tokens(seed: u64, rank: usize, tokens: usize, hidden: usize, dtype: DType) -> Tensor {
    let mut t = Tensor::zeros(tokens, hidden, dtype);
    let rb = hidden * dtype.size();
    for (i, row) in t.bytes.chunks_exact_mut(rb).enumerate() {
        token_row(seed, rank, i, hidden, dtype, row);
    }
    t
}

/// The wire form of an activation row (identity, or FP8 quantized).
pub fn wire_row(row: &[u8], hidden: usize, dtype: DType, wire: WireFormat) -> Vec<u8> {
    match wire {
        WireFormat::Native => row.to_vec(),
        WireFormat::Fp8E4M3 => {
            let mut f = vec![0f32; hidden];
            dtype::to_f32(row, dtype, &mut f);
            let mut q = vec![0u8; dtype::payload_bytes(hidden, dtype, wire)];
            dtype::quantize_fp8(&f, &mut q);
            q
        }
    }
}

/// The stand-in expert `e`: `y = round(x × s_e)` with `s_e = 1 + (e mod 8)/8`.
pub fn expert_scale(e: usize) -> f32 {
    1.0 + (e % 8) as f32 / 8.0
}

/// Checks every received row against the row its (source rank, token)
/// must carry, bit for bit (in wire format). Returns the number checked.
pub fn verify_dispatch(
    recv: &Dispatched<'_>,
    seed: u64,
    hidden: usize,
    dtype: DType,
    wire: WireFormat,
) -> Result<usize, String> {
    let mut row = vec![0u8; hidden * dtype.size()];
    for i in 0..recv.num_rows() {
        let (s, t) = recv.source(i);
        token_row(seed, s, t, hidden, dtype, &mut row);
        let want = wire_row(&row, hidden, dtype, wire);
        if recv.row(i) != want.as_slice() {
            return Err(format!("received row {i} (rank {s}, token {t}) differs"));
        }
    }
    Ok(recv.num_rows())
}

/// How the bench's experts hand their outputs to combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ExpertMode {
    /// One output row per (received row, local expert): `ExpertOut::PerExpert`.
    PerExpert,
    /// Outputs already summed per received row: `ExpertOut::Reduced`.
    Reduced,
}

/// Runs the stand-in experts of rank `rank` on what it received. Returns a
/// tensor for [`crate::ExpertOut::PerExpert`] or [`crate::ExpertOut::Reduced`].
pub fn run_experts(recv: &Dispatched<'_>, dtype: DType, mode: ExpertMode) -> Tensor {
    let mut out = Tensor::zeros(0, recv.hidden(), dtype);
    run_experts_into(recv, dtype, mode, &mut out);
    out
}

/// [`run_experts`] into `out`, reusing its allocation.
pub fn run_experts_into(recv: &Dispatched<'_>, dtype: DType, mode: ExpertMode, out: &mut Tensor) {
    let first_expert = recv.first_expert();
    let counts = recv.expert_counts();
    let hidden = recv.hidden();
    let rb = hidden * dtype.size();
    let mut x = vec![0f32; hidden];
    let mut y = vec![0f32; hidden];
    match mode {
        ExpertMode::PerExpert => {
            out.reshape(recv.num_expert_rows(), hidden, dtype);
            let mut pos = 0;
            for (e, _) in counts.iter().enumerate() {
                let s = expert_scale(first_expert + e);
                let (rows, _) = recv.expert_rows(e);
                for &r in rows {
                    recv.row_f32(r as usize, &mut x);
                    for (o, v) in y.iter_mut().zip(&x) {
                        *o = v * s;
                    }
                    dtype::store(&y, &mut out.bytes[pos * rb..(pos + 1) * rb], dtype);
                    pos += 1;
                }
            }
        }
        ExpertMode::Reduced => {
            out.reshape(recv.num_rows(), hidden, dtype);
            let mut acc = vec![0f32; hidden];
            let mut tmp = vec![0u8; rb];
            for i in 0..recv.num_rows() {
                recv.row_f32(i, &mut x);
                acc.fill(0.0);
                for (e, w) in recv.row_experts(i) {
                    let s = expert_scale(first_expert + e);
                    for (o, v) in y.iter_mut().zip(&x) {
                        *o = v * s;
                    }
                    dtype::store(&y, &mut tmp, dtype);
                    dtype::axpy(&mut acc, &tmp, dtype, w);
                }
                dtype::store(&acc, &mut out.bytes[i * rb..(i + 1) * rb], dtype);
            }
        }
    }
}

/// Single-process reference of combine for one rank's tokens, given that
/// rank's activations and routing and the stand-in experts.
pub fn reference_combine(
    x: &Tensor,
    topk_idx: &[i32],
    topk_w: &[f32],
    map: ExpertMap,
    wire: WireFormat,
) -> Tensor {
    let (hidden, dtype) = (x.hidden, x.dtype);
    let k = topk_idx.len() / x.rows.max(1);
    let rb = hidden * dtype.size();
    let mut out = Tensor::zeros(x.rows, hidden, dtype);
    let mut xf = vec![0f32; hidden];
    let mut y = vec![0f32; hidden];
    let mut tmp = vec![0u8; rb];
    let mut part = vec![0f32; hidden];
    let mut total = vec![0f32; hidden];
    for t in 0..x.rows {
        let row = &x.bytes[t * rb..(t + 1) * rb];
        let w = wire_row(row, hidden, dtype, wire);
        dtype::payload_to_f32(&w, dtype, wire, &mut xf);
        let mut sel: Vec<(usize, f32)> = topk_idx[t * k..(t + 1) * k]
            .iter()
            .zip(&topk_w[t * k..(t + 1) * k])
            .filter(|(e, _)| **e >= 0)
            .map(|(e, w)| (*e as usize, *w))
            .collect();
        sel.sort_by_key(|s| s.0);
        total.fill(0.0);
        let mut d = 0;
        while d < map.world {
            let here: Vec<&(usize, f32)> = sel.iter().filter(|s| map.owner(s.0) == d).collect();
            if !here.is_empty() {
                part.fill(0.0);
                for &&(e, wt) in &here {
                    let s = expert_scale(e);
                    for (o, v) in y.iter_mut().zip(&xf) {
                        *o = v * s;
                    }
                    dtype::store(&y, &mut tmp, dtype);
                    dtype::axpy(&mut part, &tmp, dtype, wt);
                }
                dtype::store(&part, &mut tmp, dtype);
                dtype::add(&mut total, &tmp, dtype);
            }
            d += 1;
        }
        dtype::store(&total, &mut out.bytes[t * rb..(t + 1) * rb], dtype);
    }
    out
}

/// Short printable hash of bytes (first 16 hex digits of blake3).
pub fn short_hash(b: &[u8]) -> String {
    blake3::hash(b).to_hex()[..16].to_string()
}

/// One rank's part of a benchmark or test run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunParams {
    pub tokens: usize,
    pub routing: String,
    pub seed: u64,
    pub iters: usize,
    pub warmup: usize,
    /// Check every received row and every combine output.
    pub verify: bool,
    /// `per-expert` or `reduced`.
    pub expert_mode: String,
    /// Reuse the first dispatch's handle for later dispatches.
    pub reuse_handle: bool,
    /// Put the input and the reduced expert rows in the group's send
    /// buffers (no staging copy) instead of plain memory.
    #[serde(default)]
    pub send_buffers: bool,
}

/// What one rank measured.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RankReport {
    pub rank: usize,
    /// Per timed iteration, µs.
    pub dispatch_us: Vec<f64>,
    pub combine_us: Vec<f64>,
    /// Median phase times over the timed iterations (µs):
    /// settle, plan, send, of which in the engine, wait, finish.
    pub dispatch_phases: [f64; 6],
    pub combine_phases: [f64; 6],
    /// Rows this rank sent to other ranks / kept, per dispatch.
    pub rows_remote: usize,
    pub rows_self: usize,
    pub dispatch_remote_bytes: usize,
    pub combine_remote_bytes: usize,
    pub selections: u64,
    /// Bytes of one token's payload (for the DeepEP-style bandwidth).
    pub token_bytes: usize,
    pub verified: bool,
    /// Rows checked bit for bit, and combine outputs compared.
    pub rows_checked: usize,
    pub combines_checked: usize,
    /// Distinct combine output hashes over all iterations (1 = deterministic).
    pub hashes: Vec<String>,
    pub error: Option<String>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn phases(t: &crate::OpTimings) -> [f64; 6] {
    [
        t.settle_us,
        t.plan_us,
        t.send_us,
        t.engine_us,
        t.wait_us,
        t.finish_us,
    ]
}

/// How long a rank pauses after a timed operation before its untimed
/// checks: with more ranks than cores, a rank that is done would otherwise
/// start several milliseconds of checks (and stand-in experts) while ranks
/// still inside the same operation wait for a core, and their times would
/// measure this benchmark's own checks, not the operation (`moe-bench
/// --ranks 4 --config dsv3 --expert-mode reduced` on 2 cores: dispatch p50
/// 4.3-4.8 ms without a pause, 1.8 ms with a 3 ms one). A barrier would
/// say this exactly, but a rank cannot enter one while it holds the
/// dispatch's view of the group. (The MPI loop it is compared with does no
/// work between operations.)
const AFTER_TIMED: std::time::Duration = std::time::Duration::from_millis(2);

/// Runs the benchmark loop on one rank of `g`: per iteration a barrier,
/// a timed dispatch, the checks and the stand-in experts (untimed), a
/// barrier, a timed combine and its check against the single-process
/// reference; after each timed operation a pause ([`AFTER_TIMED`]).
/// Before each timed operation a rank sleeps 1 ms, then does the
/// barrier twice: the checks are CPU bursts of several milliseconds, after
/// which the scheduler tends to preempt the rank for another process just
/// when the timed operation starts (on a shared machine); a short sleep
/// gives it a fresh slice. The first barrier absorbs the skew of the untimed
/// work, the second is entered by all ranks at nearly the same time and so
/// releases them together. Stops at the first group error (returned with what was
/// measured so far in the report's `error`).
pub fn run_rank(g: &mut crate::EpGroup, p: &RunParams) -> (RankReport, Option<crate::Error>) {
    let cfg = g.config().clone();
    let rank = g.rank();
    let map = ExpertMap {
        num_experts: cfg.num_experts,
        world: g.world(),
    };
    let kind: Routing = match p.routing.parse() {
        Ok(k) => k,
        Err(e) => {
            let rep = RankReport {
                rank,
                error: Some(e.clone()),
                ..Default::default()
            };
            return (rep, Some(crate::Error::Invalid(e)));
        }
    };
    let mode = if p.expert_mode == "reduced" {
        ExpertMode::Reduced
    } else {
        ExpertMode::PerExpert
    };
    let x = tokens(p.seed, rank, p.tokens, cfg.hidden, cfg.dtype);
    let (idx, w) = routing(kind, p.seed, rank, p.tokens, cfg.topk, cfg.num_experts);
    let reference = reference_combine(&x, &idx, &w, map, cfg.dispatch_format);
    let mut rep = RankReport {
        rank,
        verified: p.verify,
        token_bytes: crate::dtype::payload_bytes(cfg.hidden, cfg.dtype, cfg.dispatch_format),
        ..Default::default()
    };
    let mut y = vec![0u8; p.tokens * cfg.combine_row_bytes()];
    let mut dph: Vec<[f64; 6]> = Vec::new();
    let mut cph: Vec<[f64; 6]> = Vec::new();
    let mut handle: Option<crate::Handle> = None;
    let mut out = Tensor::zeros(0, cfg.hidden, cfg.dtype);
    let mut bufs = if p.send_buffers {
        g.take_send_buffers()
    } else {
        None
    };
    if let Some((inp, _)) = &mut bufs {
        inp.as_mut_slice()[..x.bytes.len()].copy_from_slice(&x.bytes);
    }
    let fail = |rep: &mut RankReport, m: String| {
        if rep.verified {
            tracing::error!(rank, "verification failed: {m}");
        }
        rep.verified = false;
        rep.error.get_or_insert(m);
    };
    for it in 0..p.warmup + p.iters {
        let timed = it >= p.warmup;
        std::thread::sleep(std::time::Duration::from_millis(1));
        if let Err(e) = g.barrier().and_then(|_| g.barrier()) {
            rep.error = Some(e.to_string());
            return (rep, Some(e));
        }
        let t0 = std::time::Instant::now();
        let input = match &bufs {
            Some((inp, _)) => inp.rows(p.tokens).expect("input fits the send buffer"),
            None => x.as_rows(),
        };
        let recv = match (&handle, p.reuse_handle) {
            (Some(h), true) => g.dispatch_with(input, &h.clone()),
            _ => g.dispatch(input, &idx, &w),
        };
        let recv = match recv {
            Ok(r) => r,
            Err(e) => {
                rep.error = Some(e.to_string());
                return (rep, Some(e));
            }
        };
        let dt = t0.elapsed().as_secs_f64() * 1e6;
        std::thread::sleep(AFTER_TIMED);
        if p.verify {
            match verify_dispatch(&recv, p.seed, cfg.hidden, cfg.dtype, cfg.dispatch_format) {
                Ok(n) => rep.rows_checked += n,
                Err(m) => fail(&mut rep, m),
            }
        }
        run_experts_into(&recv, cfg.dtype, mode, &mut out);
        let h = recv.into_handle();
        let dtimings = g.last_timings();
        if handle.is_none() {
            let sc = h.send_counts();
            rep.rows_self = sc[rank];
            rep.rows_remote = sc.iter().sum::<usize>() - sc[rank];
            rep.dispatch_remote_bytes = rep.rows_remote * cfg.dispatch_row_bytes();
            rep.combine_remote_bytes = (h.recv_counts().iter().sum::<usize>()
                - h.recv_counts()[rank])
                * cfg.combine_row_bytes();
            rep.selections = h.selections();
            handle = Some(h.clone());
        }
        if let (Some((_, ob)), ExpertMode::Reduced) = (&mut bufs, mode) {
            ob.as_mut_slice()[..out.bytes.len()].copy_from_slice(&out.bytes);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        if let Err(e) = g.barrier().and_then(|_| g.barrier()) {
            rep.error = Some(e.to_string());
            return (rep, Some(e));
        }
        let arg = match (mode, &bufs) {
            (ExpertMode::PerExpert, _) => crate::ExpertOut::PerExpert(out.as_rows()),
            (ExpertMode::Reduced, Some((_, ob))) => {
                crate::ExpertOut::Reduced(ob.rows(out.rows).expect("rows fit the send buffer"))
            }
            (ExpertMode::Reduced, None) => crate::ExpertOut::Reduced(out.as_rows()),
        };
        let t0 = std::time::Instant::now();
        if let Err(e) = g.combine_into(arg, &h, &mut y) {
            rep.error = Some(e.to_string());
            return (rep, Some(e));
        }
        let ct = t0.elapsed().as_secs_f64() * 1e6;
        std::thread::sleep(AFTER_TIMED);
        if p.verify {
            rep.combines_checked += 1;
            if y != reference.bytes {
                let bad = y
                    .chunks_exact(cfg.combine_row_bytes())
                    .zip(reference.bytes.chunks_exact(cfg.combine_row_bytes()))
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                fail(
                    &mut rep,
                    format!("combine output of token {bad} differs from the reference"),
                );
            }
        }
        let hash = short_hash(&y);
        if !rep.hashes.contains(&hash) {
            rep.hashes.push(hash);
        }
        if timed {
            rep.dispatch_us.push(dt);
            rep.combine_us.push(ct);
            dph.push(phases(&dtimings));
            cph.push(phases(&g.last_timings()));
        }
    }
    for i in 0..6 {
        rep.dispatch_phases[i] = median(&mut dph.iter().map(|p| p[i]).collect::<Vec<_>>());
        rep.combine_phases[i] = median(&mut cph.iter().map(|p| p[i]).collect::<Vec<_>>());
    }
    (rep, None)
}
