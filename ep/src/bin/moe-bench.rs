//! moe-bench: MoE dispatch/combine latency and bandwidth over the kvmesh
//! engine, with every byte checked.
//!
//! By default it starts N rank processes of itself on this host, forms the
//! group through a rendezvous it serves on loopback, and prints one row per
//! configuration (token count, implementation). `--listen ADDR` serves the
//! rendezvous without starting ranks, for ranks started elsewhere with
//! `--join ADDR --rank I`.
//!
//! Timing: every iteration starts with a group barrier; dispatch and combine
//! are timed separately on every rank; per iteration the maximum over ranks
//! is taken, then p50/p99 over iterations.
//!
//! Baselines: `naive` (two-sided all-to-allv over the same engine and
//! transport) and `nccl`: one rank per GPU (rank r on GPU r mod the visible
//! GPUs), rank 0's NCCL unique id shared through the same rendezvous, and
//! per iteration one NCCL all-to-all-v (grouped send/recv, self included)
//! of the same deduplicated dispatch rows and one of the combine rows back,
//! between device buffers, timed with CUDA events on the stream (GPU time
//! of the collective, where kvmesh rows are host wall time of the call), the
//! received bytes checked against what every sender put there. It needs a
//! GPU and libnccl; without them it stops before running anything.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use kvmesh_ep::alltoallv::{self, AllToAllPlan, Phase, PlanParams};
use kvmesh_ep::rendezvous::{self, Server};
use kvmesh_ep::workload::{self, RankReport, Routing, RunParams};
use kvmesh_ep::{DType, EpBuffers, EpConfig, EpGroup, Exchange, WireFormat};
use kvmesh_gpu::cuda::nccl::{self, NcclComm, NcclId, PeerSpan};
use kvmesh_gpu::cuda::{self, DeviceBuffer, GpuDevice, GpuStream};
use kvmesh_gpu::{Engine, EngineConfig, TransportKind};
use serde::{Deserialize, Serialize};

#[derive(Parser, Debug)]
#[command(
    name = "moe-bench",
    about = "MoE dispatch/combine benchmark over the kvmesh engine"
)]
struct Args {
    /// Ranks (processes) in the group.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Named configurations, comma separated: tiny, v2lite, dsv3.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// Tokens per rank, comma separated (overrides the configuration's).
    #[arg(long)]
    tokens: Option<String>,
    /// Override the configuration's hidden size.
    #[arg(long)]
    hidden: Option<usize>,
    /// Override the configuration's experts per token.
    #[arg(long)]
    topk: Option<usize>,
    /// Override the configuration's expert count.
    #[arg(long)]
    experts: Option<usize>,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Dispatch in FP8 e4m3 with per-128-channel scales.
    #[arg(long)]
    fp8: bool,
    /// uniform, zipf or hot-expert.
    #[arg(long, default_value = "uniform")]
    routing: String,
    /// shm, tcp or auto.
    #[arg(long, default_value = "shm")]
    transport: String,
    /// Also run this baseline and print it side by side: naive (two-sided
    /// all-to-allv over the same transport) or nccl (NCCL all-to-all-v
    /// between GPUs, one GPU per rank; needs a GPU and libnccl).
    #[arg(long)]
    baseline: Option<String>,
    /// How the experts hand back outputs: per-expert (combine applies the
    /// gate weights) or reduced (already summed per received row).
    #[arg(long, default_value = "per-expert")]
    expert_mode: String,
    /// Keep inputs and reduced expert rows in plain memory (one staging copy
    /// more) instead of the group's registered send buffers.
    #[arg(long)]
    no_send_buffers: bool,
    /// Dispatch later iterations with the first iteration's handle.
    #[arg(long)]
    reuse_handle: bool,
    #[arg(long, default_value_t = 50)]
    iters: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the per-iteration checks.
    #[arg(long)]
    no_verify: bool,
    /// Engine tuning: shm batches up to this many KiB are copied by the
    /// submitting thread instead of the engine's copy threads (fewer thread
    /// hand-offs; the engine's own default is 256).
    #[arg(long, default_value_t = 8192)]
    shm_inline_kib: u64,
    /// Engine tuning: write shm batches of 1 MiB and more with streaming
    /// stores. Off by default: the receiving rank reads dispatched rows at
    /// once, faster from the sender's cache than from memory (over shm,
    /// combine no longer writes rows to the owner: the owner reads them in
    /// place).
    #[arg(long)]
    shm_streaming: bool,
    /// How long waiting ranks spin before yielding (µs; default: automatic).
    #[arg(long)]
    spin_us: Option<u64>,
    /// Per-operation timeout.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// One JSON object per configuration on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Print every rank's median phase times (settle, plan, send, of which
    /// in the engine, wait, finish) to stderr.
    #[arg(long)]
    per_rank: bool,
    /// Write the rows as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw latency and bandwidth against tokens per rank into this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write the per-rank byte matrix of the first configuration here (input
    /// of bench/mpi_alltoallv.c).
    #[arg(long)]
    write_matrix: Option<PathBuf>,
    /// Serve the rendezvous here and wait for ranks started elsewhere.
    #[arg(long)]
    listen: Option<String>,
    /// Join the rendezvous at this address as `--rank` (started by hand).
    #[arg(long)]
    join: Option<String>,
    /// Engine TCP listen address of a joining rank (routable for other hosts).
    #[arg(long, default_value = "127.0.0.1:0")]
    engine_listen: String,
    /// Rank of this process (with --join; set internally for spawned ranks).
    #[arg(long)]
    rank: Option<usize>,
    /// Internal: the case a spawned rank runs (JSON).
    #[arg(long, hide = true)]
    case: Option<String>,
    /// Internal: rendezvous of a spawned rank.
    #[arg(long, hide = true)]
    rendezvous: Option<String>,
}

/// Everything one run of N ranks needs; sent to the ranks as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Case {
    config: String,
    ranks: usize,
    experts: usize,
    hidden: usize,
    topk: usize,
    dtype: DType,
    fp8: bool,
    transport: String,
    /// "kvmesh", "naive" or "nccl".
    implementation: String,
    timeout_ms: u64,
    #[serde(default = "default_inline_kib")]
    shm_inline_kib: u64,
    #[serde(default)]
    shm_streaming: bool,
    #[serde(default)]
    spin_us: Option<u64>,
    run: RunParams,
}

fn default_inline_kib() -> u64 {
    8192
}

impl Case {
    fn ep_config(&self) -> EpConfig {
        let mut c = EpConfig::new(self.experts, self.hidden, self.topk, self.run.tokens);
        c.dtype = self.dtype;
        c.dispatch_format = if self.fp8 {
            WireFormat::Fp8E4M3
        } else {
            WireFormat::Native
        };
        c.timeout = Duration::from_millis(self.timeout_ms);
        c.spin_wait = self.spin_us.map(Duration::from_micros);
        c.exchange = if self.implementation == "naive" {
            Exchange::TwoSided
        } else {
            Exchange::OneSided
        };
        c
    }
}

/// (tokens per rank, hidden, topk, experts) of the named configurations.
fn named(name: &str) -> Result<(Vec<usize>, usize, usize, usize)> {
    Ok(match name {
        "tiny" => (vec![64], 256, 2, 8),
        "v2lite" => (vec![128, 512], 2048, 6, 64),
        "dsv3" => (vec![128], 7168, 8, 256),
        _ => bail!("unknown configuration {name:?} (tiny, v2lite, dsv3)"),
    })
}

fn cases(a: &Args) -> Result<Vec<Case>> {
    let dtype: DType = a.dtype.parse().map_err(|e: String| anyhow!(e))?;
    a.routing
        .parse::<Routing>()
        .map_err(|e: String| anyhow!(e))?;
    a.transport
        .parse::<TransportKind>()
        .map_err(|e| anyhow!("{e}"))?;
    if !matches!(a.expert_mode.as_str(), "per-expert" | "reduced") {
        bail!("--expert-mode must be per-expert or reduced");
    }
    let mut impls = vec!["kvmesh".to_string()];
    match a.baseline.as_deref() {
        None => {}
        Some("naive") => impls.push("naive".into()),
        Some("nccl") => impls.push("nccl".into()),
        Some(b) => bail!("unknown baseline {b:?} (naive, nccl)"),
    }
    let mut out = Vec::new();
    for name in a.config.split(',') {
        let (mut toks, hidden, topk, experts) = named(name.trim())?;
        if let Some(t) = &a.tokens {
            toks = t
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .context("--tokens")?;
        }
        for &tokens in &toks {
            for imp in &impls {
                out.push(Case {
                    config: name.trim().to_string(),
                    ranks: a.ranks,
                    experts: a.experts.unwrap_or(experts),
                    hidden: a.hidden.unwrap_or(hidden),
                    topk: a.topk.unwrap_or(topk),
                    dtype,
                    fp8: a.fp8,
                    transport: if imp == "nccl" {
                        "nccl".into()
                    } else {
                        a.transport.clone()
                    },
                    implementation: imp.clone(),
                    timeout_ms: a.timeout_ms,
                    shm_inline_kib: a.shm_inline_kib,
                    shm_streaming: a.shm_streaming,
                    spin_us: a.spin_us,
                    run: RunParams {
                        tokens,
                        routing: a.routing.clone(),
                        seed: a.seed,
                        iters: a.iters,
                        warmup: a.warmup,
                        verify: !a.no_verify,
                        expert_mode: a.expert_mode.clone(),
                        reuse_handle: a.reuse_handle,
                        send_buffers: !a.no_send_buffers,
                    },
                });
            }
        }
    }
    Ok(out)
}

/// A rank: form the group through the rendezvous, run, report.
fn rank_main(case: &Case, rank: usize, addr: &str, engine_listen: &str) -> Result<()> {
    if case.implementation == "nccl" {
        return nccl_rank_main(case, rank, addr);
    }
    let transport: TransportKind = case.transport.parse().map_err(|e| anyhow!("{e}"))?;
    let engine = Engine::new(EngineConfig {
        tcp_listen: engine_listen.parse().context("--engine-listen")?,
        shm_inline_bytes: case.shm_inline_kib << 10,
        shm_streaming_bytes: if case.shm_streaming {
            EngineConfig::default().shm_streaming_bytes
        } else {
            u64::MAX
        },
        ..EngineConfig::for_transport(transport)
    })?;
    let cfg = case.ep_config();
    let bufs = EpBuffers::alloc(&engine, &cfg, rank, case.ranks)?;
    let mut joined = rendezvous::join(
        addr,
        rank,
        case.ranks,
        &cfg.fingerprint(),
        &bufs.desc(),
        Duration::from_secs(60),
    )?;
    let mut group = EpGroup::new(bufs, &joined.descs)?;
    let (rep, err) = workload::run_rank(&mut group, &case.run);
    joined
        .conn
        .send(&format!("REPORT {}", serde_json::to_string(&rep)?))?;
    // Wait for the launcher's go-ahead so no rank leaves while others still
    // need it (an early exit would look like a failure to them).
    let _ = joined.conn.recv(Duration::from_secs(60));
    if let Some(e) = err {
        bail!("rank {rank}: {e}");
    }
    Ok(())
}

/// Before any case runs: `--baseline nccl` needs CUDA, libnccl and one GPU
/// per rank on this host (NCCL refuses two ranks of a group on one GPU).
fn nccl_preflight(ranks: usize) -> Result<()> {
    nccl::available().context("--baseline nccl needs a GPU and NCCL")?;
    let gpus = cuda::device_count()? as usize;
    if ranks > gpus {
        bail!(
            "--baseline nccl runs one rank per GPU: --ranks {ranks}, but {gpus} GPU(s) visible \
             (NCCL refuses two ranks of one group on the same GPU)"
        );
    }
    Ok(())
}

/// What a rank puts in its rendezvous payload for the NCCL baseline: rank 0
/// its NCCL unique id in hex, the others "ok"; "failed" where the rank could
/// not set up, so every rank stops before NCCL init (which would wait for
/// the missing rank without a deadline).
const NCCL_FAILED: &str = "failed";

/// A rank of the NCCL baseline: set up the GPU (rank 0 also the NCCL id),
/// join the rendezvous with the id (or its status) as payload, run, report.
fn nccl_rank_main(case: &Case, rank: usize, addr: &str) -> Result<()> {
    let setup = (|| -> Result<(GpuDevice, Option<NcclId>)> {
        nccl::available()?;
        let gpus = cuda::device_count()?.max(1);
        let dev = GpuDevice::open(rank as u32 % gpus)?;
        let id = if rank == 0 {
            Some(NcclId::new()?)
        } else {
            None
        };
        Ok((dev, id))
    })();
    let payload = match &setup {
        Ok((_, Some(id))) => id.to_hex(),
        Ok((_, None)) => "ok".to_string(),
        Err(_) => NCCL_FAILED.to_string(),
    };
    let fingerprint = format!("nccl-{}", case.ep_config().fingerprint());
    let mut joined = rendezvous::join_payload(
        addr,
        rank,
        case.ranks,
        &fingerprint,
        &payload,
        Duration::from_secs(60),
    )?;
    let ran = setup.and_then(|(dev, _)| {
        if let Some(r) = joined.payloads.iter().position(|p| p == NCCL_FAILED) {
            bail!("rank {r} could not set up its GPU or NCCL");
        }
        let id = NcclId::from_hex(&joined.payloads[0]).context("rank 0's NCCL id")?;
        Ok(nccl_run(case, rank, &dev, &id))
    });
    let (rep, err) = match ran {
        Ok(r) => r,
        Err(e) => (
            RankReport {
                rank,
                error: Some(format!("{e:#}")),
                ..Default::default()
            },
            Some(e),
        ),
    };
    joined
        .conn
        .send(&format!("REPORT {}", serde_json::to_string(&rep)?))?;
    let _ = joined.conn.recv(Duration::from_secs(60));
    if let Some(e) = err {
        bail!("rank {rank}: {e:#}");
    }
    Ok(())
}

/// Device buffers of one all-to-all-v direction.
struct Direction {
    send: DeviceBuffer,
    send_spans: Vec<PeerSpan>,
    recv: DeviceBuffer,
    recv_spans: Vec<PeerSpan>,
    recv_len: usize,
    expected: Vec<u8>,
    recv_rows: usize,
}

impl Direction {
    fn new(dev: &GpuDevice, plan: &AllToAllPlan, phase: Phase) -> Result<Direction> {
        let data = plan.send_data(phase);
        let expected = plan.expected_recv(phase);
        // Zero-byte directions still get a buffer (the spans are all empty).
        let send = DeviceBuffer::alloc(dev, data.len().max(1) as u64)?;
        if !data.is_empty() {
            send.write_from_host(0, &data)?;
        }
        let recv = DeviceBuffer::alloc(dev, expected.len().max(1) as u64)?;
        Ok(Direction {
            send,
            send_spans: PeerSpan::packed(&plan.send_lens(phase)),
            recv,
            recv_spans: PeerSpan::packed(&plan.recv_lens(phase)),
            recv_len: expected.len(),
            expected,
            recv_rows: plan.recv_rows(phase),
        })
    }

    /// One timed all-to-all-v: µs between CUDA events around it.
    fn run(&self, comm: &mut NcclComm, s: &GpuStream, timeout: Duration) -> Result<f64> {
        let t0 = s.record_timed()?;
        comm.all_to_all_v(
            s,
            &self.send,
            &self.send_spans,
            &self.recv,
            &self.recv_spans,
        )?;
        let t1 = s.record_timed()?;
        comm.wait(&t1, timeout)?;
        Ok(t0.elapsed_ms(&t1)? as f64 * 1e3)
    }

    /// The received bytes (waits for the GPU).
    fn received(&self) -> Result<Vec<u8>> {
        let mut got = vec![0u8; self.recv_len];
        if !got.is_empty() {
            self.recv.read_to_host(0, &mut got)?;
        }
        Ok(got)
    }
}

/// The NCCL baseline loop of one rank, shaped like `workload::run_rank`:
/// per iteration 1 ms sleep and two barriers (a one-byte all-to-all each),
/// the timed dispatch all-to-all-v, its check, the same for combine. The
/// receive buffers are scribbled over before every operation, so every
/// check sees that iteration's bytes.
fn nccl_run(
    case: &Case,
    rank: usize,
    dev: &GpuDevice,
    id: &NcclId,
) -> (RankReport, Option<anyhow::Error>) {
    let mut rep = RankReport {
        rank,
        verified: case.run.verify,
        ..Default::default()
    };
    let r = nccl_loop(case, rank, dev, id, &mut rep);
    if let Err(e) = &r {
        rep.error = Some(format!("{e:#}"));
    }
    (rep, r.err())
}

fn nccl_loop(
    case: &Case,
    rank: usize,
    dev: &GpuDevice,
    id: &NcclId,
    rep: &mut RankReport,
) -> Result<()> {
    let cfg = case.ep_config();
    let routing: Routing = case.run.routing.parse().map_err(|e: String| anyhow!(e))?;
    let plan = AllToAllPlan::new(
        &PlanParams {
            routing,
            seed: case.run.seed,
            world: case.ranks,
            tokens: case.run.tokens,
            topk: case.topk,
            experts: case.experts,
            hidden: case.hidden,
            dtype: case.dtype,
            wire: cfg.dispatch_format,
            dispatch_row_bytes: cfg.dispatch_row_bytes(),
            combine_row_bytes: cfg.combine_row_bytes(),
        },
        rank,
    )
    .map_err(|e| anyhow!(e))?;
    let (remote, own) = plan.dispatch_rows_remote_and_self();
    rep.rows_remote = remote;
    rep.rows_self = own;
    rep.dispatch_remote_bytes = remote * plan.dispatch_row_bytes;
    rep.combine_remote_bytes = plan.combine_rows_remote() * plan.combine_row_bytes;
    rep.selections = plan.selections;
    rep.token_bytes = kvmesh_ep::dtype::payload_bytes(case.hidden, case.dtype, cfg.dispatch_format);

    let mut comm = NcclComm::init_rank(dev, case.ranks, rank, id)?;
    let stream = GpuStream::new(dev)?;
    let timeout = Duration::from_millis(case.timeout_ms);
    let dispatch = Direction::new(dev, &plan, Phase::Dispatch)?;
    let combine = Direction::new(dev, &plan, Phase::Combine)?;
    let world = case.ranks as u64;
    let bar_send = DeviceBuffer::zeroed(dev, world)?;
    let bar_recv = DeviceBuffer::zeroed(dev, world)?;
    let bar_spans = PeerSpan::packed(&vec![1; case.ranks]);
    let barrier = |comm: &mut NcclComm| -> Result<()> {
        comm.all_to_all_v(&stream, &bar_send, &bar_spans, &bar_recv, &bar_spans)?;
        comm.wait(&stream.record()?, timeout)?;
        Ok(())
    };
    for it in 0..case.run.warmup + case.run.iters {
        let timed = it >= case.run.warmup;
        let mut times = [0f64; 2];
        for (i, (dir, phase)) in [(&dispatch, Phase::Dispatch), (&combine, Phase::Combine)]
            .into_iter()
            .enumerate()
        {
            if case.run.verify && dir.recv_len > 0 {
                stream.fill(&dir.recv, 0, dir.recv_len as u64, 0xA5 ^ it as u8)?;
            }
            std::thread::sleep(Duration::from_millis(1));
            barrier(&mut comm)?;
            barrier(&mut comm)?;
            times[i] = dir
                .run(&mut comm, &stream, timeout)
                .with_context(|| format!("{phase:?} iteration {it}"))?;
            // Combine bytes are read back every iteration for the hash.
            if case.run.verify || phase == Phase::Combine {
                let got = dir.received()?;
                if case.run.verify {
                    if got == dir.expected {
                        rep.rows_checked += dir.recv_rows;
                    } else {
                        let at = got
                            .iter()
                            .zip(&dir.expected)
                            .position(|(a, b)| a != b)
                            .unwrap_or(0);
                        rep.verified = false;
                        rep.error.get_or_insert(format!(
                            "{phase:?} iteration {it}: received bytes differ from the senders' \
                             at offset {at}"
                        ));
                    }
                }
                if phase == Phase::Combine {
                    rep.combines_checked += usize::from(case.run.verify);
                    let h = workload::short_hash(&got);
                    if !rep.hashes.contains(&h) {
                        rep.hashes.push(h);
                    }
                }
            }
        }
        if timed {
            rep.dispatch_us.push(times[0]);
            rep.combine_us.push(times[1]);
        }
    }
    Ok(())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[idx.clamp(1, sorted.len()) - 1]
}

/// One printed row.
#[derive(Debug, Clone, Serialize)]
struct Row {
    config: String,
    implementation: String,
    ranks: usize,
    tokens_per_rank: usize,
    hidden: usize,
    topk: usize,
    experts: usize,
    dtype: String,
    fp8: bool,
    routing: String,
    transport: String,
    expert_mode: String,
    iters: usize,
    dispatch_p50_us: f64,
    dispatch_p99_us: f64,
    combine_p50_us: f64,
    combine_p99_us: f64,
    /// Bytes one rank sends to other ranks per dispatch / combine (max over ranks).
    dispatch_bytes_per_rank: usize,
    combine_bytes_per_rank: usize,
    /// selections × token bytes / time (per rank, GB/s).
    dispatch_deepep_gbps: f64,
    combine_deepep_gbps: f64,
    /// Bytes that crossed between ranks / time (per rank, GB/s).
    dispatch_xfer_gbps: f64,
    combine_xfer_gbps: f64,
    /// Median phase times of rank 0 (µs): settle, plan, send, of which engine, wait, finish.
    dispatch_phases_us: [f64; 6],
    combine_phases_us: [f64; 6],
    verified: bool,
    deterministic: bool,
    output_hash: String,
    rows_checked: usize,
}

fn aggregate(case: &Case, reps: &[RankReport]) -> Row {
    let n = reps.iter().map(|r| r.dispatch_us.len()).min().unwrap_or(0);
    let maxed = |f: &dyn Fn(&RankReport) -> &Vec<f64>| {
        let mut v: Vec<f64> = (0..n)
            .map(|i| reps.iter().map(|r| f(r)[i]).fold(0.0, f64::max))
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let d = maxed(&|r| &r.dispatch_us);
    let c = maxed(&|r| &r.combine_us);
    let (d50, c50) = (pct(&d, 50.0), pct(&c, 50.0));
    let mean = |f: &dyn Fn(&RankReport) -> f64| reps.iter().map(f).sum::<f64>() / reps.len() as f64;
    let sel_bytes = mean(&|r| r.selections as f64 * r.token_bytes as f64);
    let comb_sel_bytes = mean(&|r| r.selections as f64 * (case.hidden * case.dtype.size()) as f64);
    let dx = mean(&|r| r.dispatch_remote_bytes as f64);
    let cx = mean(&|r| r.combine_remote_bytes as f64);
    let gbps = |b: f64, us: f64| if us > 0.0 { b / us / 1e3 } else { 0.0 };
    let mut hashes: Vec<String> = reps.iter().flat_map(|r| r.hashes.clone()).collect();
    let deterministic = reps.iter().all(|r| r.hashes.len() == 1);
    hashes.sort();
    hashes.dedup();
    let r0 = &reps[0];
    Row {
        config: case.config.clone(),
        implementation: case.implementation.clone(),
        ranks: case.ranks,
        tokens_per_rank: case.run.tokens,
        hidden: case.hidden,
        topk: case.topk,
        experts: case.experts,
        dtype: case.dtype.name().into(),
        fp8: case.fp8,
        routing: case.run.routing.clone(),
        transport: case.transport.clone(),
        expert_mode: case.run.expert_mode.clone(),
        iters: n,
        dispatch_p50_us: d50,
        dispatch_p99_us: pct(&d, 99.0),
        combine_p50_us: c50,
        combine_p99_us: pct(&c, 99.0),
        dispatch_bytes_per_rank: reps
            .iter()
            .map(|r| r.dispatch_remote_bytes)
            .max()
            .unwrap_or(0),
        combine_bytes_per_rank: reps
            .iter()
            .map(|r| r.combine_remote_bytes)
            .max()
            .unwrap_or(0),
        dispatch_deepep_gbps: gbps(sel_bytes, d50),
        combine_deepep_gbps: gbps(comb_sel_bytes, c50),
        dispatch_xfer_gbps: gbps(dx, d50),
        combine_xfer_gbps: gbps(cx, c50),
        dispatch_phases_us: r0.dispatch_phases,
        combine_phases_us: r0.combine_phases,
        verified: case.run.verify && reps.iter().all(|r| r.verified && r.error.is_none()),
        deterministic,
        output_hash: hashes.join("+"),
        rows_checked: reps.iter().map(|r| r.rows_checked).sum(),
    }
}

/// Runs one case: rendezvous on `server` (one listener for all cases, so
/// ranks joined from elsewhere that move on to the next case early wait in
/// its backlog), ranks as child processes unless `external`.
fn run_case(case: &Case, server: &Server, external: bool, per_rank: bool) -> Result<Row> {
    let addr = server.local_addr()?.to_string();
    let mut children: Vec<Child> = Vec::new();
    if !external {
        let exe = std::env::current_exe()?;
        let case_json = serde_json::to_string(case)?;
        for r in 0..case.ranks {
            children.push(
                Command::new(&exe)
                    .args([
                        "--rank",
                        &r.to_string(),
                        "--rendezvous",
                        &addr,
                        "--case",
                        &case_json,
                    ])
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting a rank")?,
            );
        }
    } else {
        eprintln!(
            "rendezvous at {addr}: start {} ranks with --join {addr} --rank I and the same flags",
            case.ranks
        );
    }
    let result = (|| -> Result<Row> {
        let mut members = server.run(Duration::from_secs(120))?;
        let budget = Duration::from_millis(case.timeout_ms)
            * 4
            * (case.run.iters + case.run.warmup + 1) as u32;
        let mut reps = Vec::new();
        for m in &mut members {
            let line = m.conn.recv(budget.min(Duration::from_secs(3600)))?;
            let body = line
                .strip_prefix("REPORT ")
                .ok_or_else(|| anyhow!("rank {}: unexpected line", m.rank))?;
            reps.push(serde_json::from_str::<RankReport>(body)?);
        }
        for m in &mut members {
            let _ = m.conn.send("DONE");
        }
        if let Some(r) = reps
            .iter()
            .find(|r| r.error.is_some() && r.dispatch_us.is_empty())
        {
            bail!(
                "rank {} failed: {}",
                r.rank,
                r.error.clone().unwrap_or_default()
            );
        }
        if per_rank {
            for r in &reps {
                let mut d = r.dispatch_us.clone();
                let mut c = r.combine_us.clone();
                d.sort_by(f64::total_cmp);
                c.sort_by(f64::total_cmp);
                eprintln!(
                    "rank {}: dispatch p50 {:.1} µs phases {:?}; combine p50 {:.1} µs phases {:?}",
                    r.rank,
                    pct(&d, 50.0),
                    r.dispatch_phases.map(|v| (v * 10.0).round() / 10.0),
                    pct(&c, 50.0),
                    r.combine_phases.map(|v| (v * 10.0).round() / 10.0)
                );
            }
        }
        Ok(aggregate(case, &reps))
    })();
    for mut c in children {
        if result.is_err() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    result
}

/// The byte matrix of `case` for bench/mpi_alltoallv.c (same routing,
/// same deduplicated rows, same row bytes).
fn write_matrix(case: &Case, path: &PathBuf) -> Result<()> {
    let cfg = case.ep_config();
    let routing: Routing = case.run.routing.parse().map_err(|e: String| anyhow!(e))?;
    let rows = alltoallv::row_matrix(
        routing,
        case.run.seed,
        case.ranks,
        case.run.tokens,
        case.topk,
        case.experts,
    )
    .map_err(|e| anyhow!(e))?;
    let mut f = std::fs::File::create(path)?;
    writeln!(f, "kvmesh-ep-matrix 1 {}", case.ranks)?;
    for row in &rows {
        let v: Vec<String> = row
            .iter()
            .map(|n| (n * cfg.dispatch_row_bytes()).to_string())
            .collect();
        writeln!(f, "{}", v.join(" "))?;
    }
    // Combine: rank i sends back to j what j sent to i.
    for i in 0..case.ranks {
        let v: Vec<String> = rows
            .iter()
            .map(|from_j| (from_j[i] * cfg.combine_row_bytes()).to_string())
            .collect();
        writeln!(f, "{}", v.join(" "))?;
    }
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<7} {:<7} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>5}",
        "config", "impl", "ranks", "tok/rk", "disp p50", "disp p99", "comb p50", "comb p99",
        "MB/rank", "dDeepEP", "dXfer", "cDeepEP", "cXfer", "verified", "det"
    );
    for r in rows {
        println!(
            "{:<7} {:<7} {:>5} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8} {:>5}",
            r.config,
            r.implementation,
            r.ranks,
            r.tokens_per_rank,
            r.dispatch_p50_us,
            r.dispatch_p99_us,
            r.combine_p50_us,
            r.combine_p99_us,
            r.dispatch_bytes_per_rank as f64 / 1e6,
            r.dispatch_deepep_gbps,
            r.dispatch_xfer_gbps,
            r.combine_deepep_gbps,
            r.combine_xfer_gbps,
            r.verified,
            r.deterministic
        );
    }
    println!("(latency in µs, max over ranks per iteration; bandwidth in GB/s per rank: DeepEP-style = selections × token bytes / p50, Xfer = bytes sent to other ranks / p50)");
}

fn write_csv(rows: &[Row], path: &PathBuf) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::File::create(path)?;
    writeln!(
        f,
        "config,implementation,ranks,tokens_per_rank,hidden,topk,experts,dtype,fp8,routing,transport,expert_mode,iters,dispatch_p50_us,dispatch_p99_us,combine_p50_us,combine_p99_us,dispatch_bytes_per_rank,combine_bytes_per_rank,dispatch_deepep_gbps,combine_deepep_gbps,dispatch_xfer_gbps,combine_xfer_gbps,verified,deterministic,output_hash"
    )?;
    for r in rows {
        writeln!(
            f,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{},{},{:.3},{:.3},{:.3},{:.3},{},{},{}",
            r.config, r.implementation, r.ranks, r.tokens_per_rank, r.hidden, r.topk, r.experts,
            r.dtype, r.fp8, r.routing, r.transport, r.expert_mode, r.iters, r.dispatch_p50_us,
            r.dispatch_p99_us, r.combine_p50_us, r.combine_p99_us, r.dispatch_bytes_per_rank,
            r.combine_bytes_per_rank, r.dispatch_deepep_gbps, r.combine_deepep_gbps,
            r.dispatch_xfer_gbps, r.combine_xfer_gbps, r.verified, r.deterministic, r.output_hash
        )?;
    }
    Ok(())
}

fn load_font() -> Result<()> {
    const CANDIDATES: &[&str] = &[
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    let path = CANDIDATES
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or_else(|| {
            anyhow!("--plot needs a TrueType font: install Debian's fonts-dejavu-core")
        })?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))?;
    Ok(())
}

fn plot(rows: &[Row], path: &PathBuf) -> Result<()> {
    use plotters::prelude::*;
    load_font()?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let mut series: Vec<(String, Vec<&Row>)> = Vec::new();
    for r in rows {
        let key = format!("{} {} {}r", r.config, r.implementation, r.ranks);
        match series.iter_mut().find(|s| s.0 == key) {
            Some(s) => s.1.push(r),
            None => series.push((key, vec![r])),
        }
    }
    let xmax = rows.iter().map(|r| r.tokens_per_rank).max().unwrap_or(1) as f64 * 1.1;
    let lat_max = rows
        .iter()
        .map(|r| r.dispatch_p50_us.max(r.combine_p50_us))
        .fold(1.0, f64::max)
        * 1.15;
    let bw_max = rows
        .iter()
        .map(|r| r.dispatch_deepep_gbps.max(r.combine_deepep_gbps))
        .fold(0.1, f64::max)
        * 1.15;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (panel, title, ylabel, ymax, pick) in [
        (
            &left,
            "p50 latency vs tokens per rank",
            "µs (max over ranks)",
            lat_max,
            0usize,
        ),
        (
            &right,
            "bandwidth vs tokens per rank (selections × token bytes / p50)",
            "GB/s per rank",
            bw_max,
            1,
        ),
    ] {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("tokens per rank")
            .y_desc(ylabel)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = colors[i % colors.len()];
            for (op, dashed) in [("dispatch", false), ("combine", true)] {
                let data: Vec<(f64, f64)> = pts
                    .iter()
                    .map(|r| {
                        let y = match (pick, op) {
                            (0, "dispatch") => r.dispatch_p50_us,
                            (0, _) => r.combine_p50_us,
                            (_, "dispatch") => r.dispatch_deepep_gbps,
                            _ => r.combine_deepep_gbps,
                        };
                        (r.tokens_per_rank as f64, y)
                    })
                    .collect();
                let style = if dashed {
                    color.mix(0.55).stroke_width(2)
                } else {
                    color.stroke_width(3)
                };
                chart
                    .draw_series(LineSeries::new(data.clone(), style))?
                    .label(format!("{name} {op}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                chart.draw_series(
                    data.iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
                )?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if let (Some(case), Some(rank), Some(addr)) = (&a.case, a.rank, &a.rendezvous) {
        let case: Case = serde_json::from_str(case)?;
        return rank_main(&case, rank, addr, "127.0.0.1:0");
    }
    let all = cases(&a)?;
    if let Some(addr) = &a.join {
        let rank = a.rank.ok_or_else(|| anyhow!("--join needs --rank"))?;
        for c in &all {
            rank_main(c, rank, addr, &a.engine_listen)?;
        }
        return Ok(());
    }
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if a.listen.is_none() && all.iter().any(|c| c.implementation == "nccl") {
        nccl_preflight(a.ranks)?;
    }
    if let Some(p) = &a.write_matrix {
        write_matrix(&all[0], p)?;
    }
    let server = Server::bind(a.listen.as_deref().unwrap_or("127.0.0.1:0"), a.ranks)?;
    let mut rows = Vec::new();
    for c in &all {
        let row = run_case(c, &server, a.listen.is_some(), a.per_rank).with_context(|| {
            format!("{} {} tokens {}", c.config, c.implementation, c.run.tokens)
        })?;
        if a.json {
            println!("{}", serde_json::to_string(&row)?);
        }
        rows.push(row);
    }
    if !a.json {
        print_table(&rows);
    }
    if let Some(p) = &a.csv {
        write_csv(&rows, p)?;
    }
    if let Some(p) = &a.plot {
        plot(&rows, p)?;
    }
    if rows.iter().any(|r| !r.verified && !a.no_verify) {
        bail!("verification failed");
    }
    Ok(())
}
