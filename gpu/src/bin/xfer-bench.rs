//! xfer-bench: throughput and latency of the kvmesh transfer engine.
//!
//! ```text
//! xfer-bench --mode target [--region-size 1GiB]          # prints KVMESH_REGION <hex>
//! xfer-bench --mode initiator --target <hex> --op write --block-size 1MiB
//! xfer-bench --local --transport shm --op read --block-size 64KiB --json
//! ```
//! `--local` starts the target as a second process and runs the initiator
//! against it on this host. Every number is measured by this program over
//! `--duration` seconds after a warm-up batch.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use kvmesh_gpu::size::{format_size, parse_size};
use kvmesh_gpu::{
    pattern, BatchOptions, Engine, EngineConfig, MemoryKind, Op, RegionDesc, TransportKind,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Target,
    Initiator,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OpArg {
    Read,
    Write,
    /// RPC round trips of `--block-size` bytes (echoed by the target).
    Call,
}

#[derive(Debug, Clone, Parser)]
#[command(
    version,
    about = "Benchmark the kvmesh transfer engine (modelled on transfer_engine_bench)"
)]
struct Args {
    /// Run as the target (serves a region) or the initiator (moves bytes).
    #[arg(long, value_enum, default_value = "initiator")]
    mode: Mode,
    /// Start a target in a second process and run the initiator against it.
    #[arg(long)]
    local: bool,
    /// Target region descriptor (hex, as printed by the target).
    #[arg(long)]
    target: Option<String>,
    #[arg(long, default_value = "auto")]
    transport: String,
    #[arg(long, value_enum, default_value = "write")]
    op: OpArg,
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    block_size: u64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Seconds to measure.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Write a pattern and check every byte.
    #[arg(long)]
    verify: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Target: size of the served region (default: what the initiator needs).
    #[arg(long, value_parser = parse_size)]
    region_size: Option<u64>,
    /// Target: fill the region with this pattern seed (for verified reads).
    #[arg(long)]
    fill_seed: Option<u64>,
    /// TCP listen address of this engine.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// TCP connections per peer.
    #[arg(long, default_value_t = 4)]
    tcp_conns: u16,
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    slice_size: u64,
    /// Send TCP payloads with writev copies instead of vmsplice+splice.
    #[arg(long)]
    no_splice: bool,
    /// Threads running shm copies of large batches.
    #[arg(long, default_value_t = 2)]
    shm_threads: usize,
}

const SEED: u64 = 0x6b76_6d65_7368;

fn engine_config(a: &Args) -> Result<EngineConfig> {
    let transport: TransportKind = a.transport.parse()?;
    Ok(EngineConfig {
        tcp_listen: a.listen.parse().context("--listen")?,
        tcp_conns: a.tcp_conns,
        slice_size: a.slice_size,
        shm_threads: a.shm_threads,
        tcp_splice: !a.no_splice,
        ..EngineConfig::for_transport(transport)
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let a = Args::parse();
    if a.block_size == 0 || a.batch_size == 0 || a.threads == 0 {
        bail!("--block-size, --batch-size and --threads must be > 0");
    }
    match (a.mode, a.local) {
        (Mode::Target, _) => run_target(&a),
        (Mode::Initiator, true) => {
            let (child, desc) = spawn_target(&a)?;
            let _guard = KillOnDrop(child);
            run_initiator(&a, &desc)
        }
        (Mode::Initiator, false) => {
            let hex = a
                .target
                .as_deref()
                .context("--target <descriptor> is required (or use --local)")?;
            run_initiator(&a, &RegionDesc::from_hex(hex)?)
        }
    }
}

fn needed_region(a: &Args) -> u64 {
    a.block_size * a.batch_size as u64 * a.threads as u64
}

fn run_target(a: &Args) -> Result<()> {
    let engine = Engine::new(engine_config(a)?)?;
    let size = a.region_size.unwrap_or_else(|| needed_region(a));
    let region = engine.alloc(size, MemoryKind::Host)?;
    engine.set_rpc_handler(Arc::new(|_, req: &[u8]| req.to_vec().into()));
    if let Some(seed) = a.fill_seed {
        let mut chunk = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < size {
            let n = (chunk.len() as u64).min(size - off) as usize;
            pattern::fill(&mut chunk[..n], seed, off);
            region.write_at(off, &chunk[..n])?;
            off += n as u64;
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "KVMESH_REGION {}", region.desc().to_hex())?;
    out.flush()?;
    drop(out);
    // Serve until stdin closes (the parent exits) or we are killed. Commands
    // on stdin: `check SEED OFFSET LEN` verifies a range and answers on stdout.
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line?;
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["check", seed, off, len] => {
                let (seed, off, len): (u64, u64, u64) = (seed.parse()?, off.parse()?, len.parse()?);
                let mut buf = vec![0u8; len as usize];
                region.read_at(off, &mut buf)?;
                match pattern::check(&buf, seed, off) {
                    None => println!("CHECK ok"),
                    Some(i) => println!("CHECK bad at {}", off + i as u64),
                }
            }
            ["notify", secs] => {
                let secs: f64 = secs.parse()?;
                match engine.recv_notification_timeout(Duration::from_secs_f64(secs)) {
                    Some(n) => println!("NOTIFY {}", String::from_utf8_lossy(&n.data)),
                    None => println!("NOTIFY none"),
                }
            }
            ["notify-check", secs] => {
                // Waits for a notification "SEED OFFSET LEN" and checks that
                // range at once: the bytes must already be there.
                let secs: f64 = secs.parse()?;
                match engine.recv_notification_timeout(Duration::from_secs_f64(secs)) {
                    Some(n) => {
                        let text = String::from_utf8_lossy(&n.data).to_string();
                        let v: Vec<u64> = text
                            .split_whitespace()
                            .filter_map(|x| x.parse().ok())
                            .collect();
                        let verdict = match v.as_slice() {
                            [seed, off, len] => {
                                let mut buf = vec![0u8; *len as usize];
                                region.read_at(*off, &mut buf)?;
                                if pattern::check(&buf, *seed, *off).is_none() {
                                    "ok"
                                } else {
                                    "bad"
                                }
                            }
                            _ => "malformed",
                        };
                        println!("NOTIFY {verdict} {text}");
                    }
                    None => println!("NOTIFY none"),
                }
            }
            [] => {}
            _ => println!("ERR unknown command {line:?}"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_target(a: &Args) -> Result<(Child, RegionDesc)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "--mode",
        "target",
        "--transport",
        &a.transport,
        "--listen",
        "127.0.0.1:0",
    ])
    .args(["--region-size", &needed_region(a).to_string()])
    .args(["--tcp-conns", &a.tcp_conns.to_string()])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped());
    if a.verify && a.op == OpArg::Read {
        cmd.args(["--fill-seed", &SEED.to_string()]);
    }
    let mut child = cmd.spawn().context("starting the target process")?;
    let stdout = child.stdout.take().context("target stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let hex = line
        .strip_prefix("KVMESH_REGION ")
        .context("target did not print its descriptor")?;
    Ok((child, RegionDesc::from_hex(hex)?))
}

struct Measured {
    bytes: u64,
    batches: u64,
    elapsed: f64,
    lat_us: Vec<f64>,
}

fn run_initiator(a: &Args, desc: &RegionDesc) -> Result<()> {
    let engine = Engine::new(engine_config(a)?)?;
    let need = needed_region(a);
    if desc.len < need {
        bail!("target region has {} bytes, need {need}", desc.len);
    }
    let local = engine.alloc(need, MemoryKind::Host)?;
    let remote = engine.import(desc);
    let kind = match a.op {
        OpArg::Read => kvmesh_gpu::OpKind::Read,
        OpArg::Write => kvmesh_gpu::OpKind::Write,
        OpArg::Call => return run_calls(a, &engine, remote.peer),
    };
    if a.verify && a.op == OpArg::Write {
        fill_region(&local, SEED)?;
    }
    let per_thread = a.block_size * a.batch_size as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let start_at = Instant::now();
    let results: Vec<Result<Measured>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..a.threads)
            .map(|t| {
                let (engine, stop) = (engine.clone(), stop.clone());
                let local = local.id();
                s.spawn(move || -> Result<Measured> {
                    let base = t as u64 * per_thread;
                    let ops: Vec<Op> = (0..a.batch_size as u64)
                        .map(|i| Op {
                            kind,
                            local,
                            local_offset: base + i * a.block_size,
                            remote,
                            remote_offset: base + i * a.block_size,
                            len: a.block_size,
                        })
                        .collect();
                    let run = |m: &mut Option<&mut Measured>| -> Result<()> {
                        let t0 = Instant::now();
                        let st = engine
                            .submit(&ops, BatchOptions::default())?
                            .wait_blocking(Duration::from_secs(120))
                            .context("batch did not complete")?;
                        if let Err(k) = st.result {
                            bail!("batch failed: {k}");
                        }
                        if let Some(m) = m {
                            m.lat_us.push(t0.elapsed().as_secs_f64() * 1e6);
                            m.bytes += st.bytes;
                            m.batches += 1;
                        }
                        Ok(())
                    };
                    run(&mut None)?; // warm-up: connect, map
                    let mut m = Measured {
                        bytes: 0,
                        batches: 0,
                        elapsed: 0.0,
                        lat_us: Vec::new(),
                    };
                    let t0 = Instant::now();
                    while !stop.load(Ordering::Relaxed) {
                        run(&mut Some(&mut m))?;
                    }
                    m.elapsed = t0.elapsed().as_secs_f64();
                    Ok(m)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(a.duration));
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("thread panicked")))
            })
            .collect()
    });
    let _ = start_at;
    let mut all = Measured {
        bytes: 0,
        batches: 0,
        elapsed: 0.0,
        lat_us: Vec::new(),
    };
    for r in results {
        let m = r?;
        all.bytes += m.bytes;
        all.batches += m.batches;
        all.elapsed = all.elapsed.max(m.elapsed);
        all.lat_us.extend(m.lat_us);
    }
    let verified = if a.verify {
        Some(verify(a, &engine, &local, remote, need)?)
    } else {
        None
    };
    report(a, &all, verified, desc, &engine)
}

/// Sequential RPC round trips (one per "batch"), each echoing
/// `--block-size` bytes.
fn run_calls(a: &Args, engine: &Engine, peer: kvmesh_gpu::PeerId) -> Result<()> {
    if a.block_size > kvmesh_gpu::MAX_CALL_BYTES {
        bail!(
            "--block-size for calls is at most {}",
            kvmesh_gpu::MAX_CALL_BYTES
        );
    }
    let req = vec![0x42u8; a.block_size as usize];
    let call = || engine.call_blocking(peer, req.clone(), Duration::from_secs(10));
    call()?;
    let mut m = Measured {
        bytes: 0,
        batches: 0,
        elapsed: 0.0,
        lat_us: Vec::new(),
    };
    let t0 = Instant::now();
    while t0.elapsed().as_secs_f64() < a.duration {
        let t = Instant::now();
        let r = call()?;
        m.lat_us.push(t.elapsed().as_secs_f64() * 1e6);
        if r.len() != req.len() {
            bail!("echo returned {} bytes, sent {}", r.len(), req.len());
        }
        m.bytes += r.len() as u64;
        m.batches += 1;
    }
    m.elapsed = t0.elapsed().as_secs_f64();
    let desc_peer = engine.descriptor();
    let fake = RegionDesc {
        peer: desc_peer,
        region: 0,
        len: 0,
        kind: MemoryKind::Host,
        shareable: true,
        gpu: None,
        rdma: None,
    };
    let a1 = Args {
        batch_size: 1,
        ..a.clone()
    };
    report(&a1, &m, None, &fake, engine)
}

fn fill_region(r: &kvmesh_gpu::Region, seed: u64) -> Result<()> {
    let mut buf = vec![0u8; r.len() as usize];
    pattern::fill(&mut buf, seed, 0);
    r.write_at(0, &buf)?;
    Ok(())
}

/// Checks every byte: after writes, reads the remote back into a fresh
/// region; after reads, checks what landed locally.
fn verify(
    a: &Args,
    engine: &Engine,
    local: &kvmesh_gpu::Region,
    remote: kvmesh_gpu::RemoteRegion,
    len: u64,
) -> Result<bool> {
    let target = match a.op {
        OpArg::Read => local.clone(),
        OpArg::Call => return Ok(true),
        OpArg::Write => {
            let back = engine.alloc(len, MemoryKind::Host)?;
            back.fill(0, len, 0)?;
            let ops = [Op::read(back.id(), 0, remote, 0, len)];
            let st = engine
                .submit(&ops, BatchOptions::default())?
                .wait_blocking(Duration::from_secs(120))
                .context("read-back did not complete")?;
            if let Err(k) = st.result {
                bail!("read-back failed: {k}");
            }
            back
        }
    };
    let mut buf = vec![0u8; len as usize];
    target.read_at(0, &mut buf)?;
    match pattern::check(&buf, SEED, 0) {
        None => Ok(true),
        Some(i) => {
            eprintln!("verify: first wrong byte at offset {i}");
            Ok(false)
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((v.len() - 1) as f64 * p).round() as usize;
    v[idx]
}

fn report(
    a: &Args,
    m: &Measured,
    verified: Option<bool>,
    desc: &RegionDesc,
    engine: &Engine,
) -> Result<()> {
    let mut lat = m.lat_us.clone();
    let p50 = percentile(&mut lat, 0.5);
    let p99 = percentile(&mut lat, 0.99);
    let secs = m.elapsed.max(1e-9);
    let gbps = m.bytes as f64 / secs / 1e9;
    let ops_per_s = (m.batches * a.batch_size as u64) as f64 / secs;
    let same_host = desc.peer.host_id == engine.descriptor().host_id;
    let transport = match a.transport.parse::<TransportKind>()? {
        TransportKind::Auto if same_host && desc.shareable => "shm (auto)".to_string(),
        TransportKind::Auto if desc.rdma.is_some() && engine.descriptor().rdma.is_some() => {
            "rdma (auto)".to_string()
        }
        TransportKind::Auto => "tcp (auto)".to_string(),
        t => format!("{t:?}").to_lowercase(),
    };
    if a.json {
        let v = serde_json::json!({
            "transport": transport,
            "op": format!("{:?}", a.op).to_lowercase(),
            "block_size": a.block_size,
            "batch_size": a.batch_size,
            "threads": a.threads,
            "duration_s": secs,
            "batches": m.batches,
            "bytes": m.bytes,
            "gbps": gbps,
            "ops_per_s": ops_per_s,
            "batch_p50_us": p50,
            "batch_p99_us": p99,
            "verified": verified,
        });
        println!("{v}");
    } else {
        println!(
            "{:<11} {:<5} {:>8} {:>5} {:>7} {:>9} {:>11} {:>10} {:>10} {:>8}",
            "transport",
            "op",
            "block",
            "batch",
            "threads",
            "GB/s",
            "ops/s",
            "p50 us",
            "p99 us",
            "verified"
        );
        println!(
            "{:<11} {:<5} {:>8} {:>5} {:>7} {:>9.3} {:>11.0} {:>10.1} {:>10.1} {:>8}",
            transport,
            format!("{:?}", a.op).to_lowercase(),
            format_size(a.block_size),
            a.batch_size,
            a.threads,
            gbps,
            ops_per_s,
            p50,
            p99,
            verified.map_or("-".to_string(), |v| if v {
                "yes".into()
            } else {
                "NO".into()
            })
        );
    }
    if verified == Some(false) {
        bail!("verification failed");
    }
    Ok(())
}
