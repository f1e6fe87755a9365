//! The README's main job: a local multi-peer demo that offloads KV pages to
//! peer processes and reloads them, verifying every byte.
//!
//! It starts 3 peer processes (this same program with `--peer`), gives a
//! worker a host KV cache with Llama-3.1-8B geometry (32 layers, 8 KV heads,
//! head size 128, bf16, 16-token blocks; vLLM's per-layer
//! `(2, num_blocks, block_size, heads, head_size)` layout), "prefills"
//! blocks, offloads each block's 64 per-layer K/V pages to a peer chosen by
//! block, wipes the cache, reloads the blocks into different slots and
//! checks them.
//!
//! Run: `cargo run --release --example demo`

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvmesh::gpu::{
    pattern, BatchOptions, Engine, EngineConfig, MemoryKind, Op, RegionDesc, RemoteRegion,
};

const LAYERS: u64 = 32;
const KV_HEADS: u64 = 8;
const HEAD_SIZE: u64 = 128;
const BLOCK_TOKENS: u64 = 16;
const DTYPE_BYTES: u64 = 2; // bf16
const NUM_BLOCKS: u64 = 64; // slots in the worker's KV cache
const PEERS: usize = 3;
const OFFLOADED: u64 = 24; // blocks offloaded and reloaded

/// Bytes of one block of K (or V) in one layer.
const PAGE: u64 = BLOCK_TOKENS * KV_HEADS * HEAD_SIZE * DTYPE_BYTES;

/// Offset of the K (kv=0) or V (kv=1) page of `block` in `layer`, for a
/// cache made of per-layer tensors laid out one after another.
fn page_offset(layer: u64, kv: u64, block: u64) -> u64 {
    ((layer * 2 + kv) * NUM_BLOCKS + block) * PAGE
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--peer") {
        return run_peer();
    }
    let t_start = Instant::now();
    let exe = std::env::current_exe()?;
    let mut peers = Vec::new();
    for _ in 0..PEERS {
        peers.push(Peer::start(&exe)?);
    }
    let engine = Engine::new(EngineConfig::default())?;
    let cache_bytes = LAYERS * 2 * NUM_BLOCKS * PAGE;
    let cache = engine.alloc(cache_bytes, MemoryKind::Host)?;
    let remotes: Vec<RemoteRegion> = peers.iter().map(|p| engine.import(&p.desc)).collect();
    println!("kvmesh demo: {PEERS} peer processes, KV cache {} MiB ({NUM_BLOCKS} blocks x {LAYERS} layers x K/V, {} KiB pages)",
        cache_bytes >> 20, PAGE >> 10);

    // "Prefill": block b holds pattern b in every page.
    for b in 0..OFFLOADED {
        for layer in 0..LAYERS {
            for kv in 0..2 {
                let off = page_offset(layer, kv, b);
                let mut page = vec![0u8; PAGE as usize];
                pattern::fill(&mut page, b, off);
                cache.write_at(off, &page)?;
            }
        }
    }
    // Offload: block b goes to peer b % PEERS, slot b / PEERS there; one
    // batch per block (64 pages).
    let block_bytes = LAYERS * 2 * PAGE;
    let remote_slot = |b: u64| (b / PEERS as u64) * block_bytes;
    let t0 = Instant::now();
    let mut batches = Vec::new();
    for b in 0..OFFLOADED {
        let r = remotes[(b % PEERS as u64) as usize];
        let ops: Vec<Op> = (0..LAYERS * 2)
            .map(|p| {
                Op::write(
                    cache.id(),
                    page_offset(p / 2, p % 2, b),
                    r,
                    remote_slot(b) + p * PAGE,
                    PAGE,
                )
            })
            .collect();
        batches.push(engine.submit(&ops, BatchOptions::default())?);
    }
    for b in batches {
        let st = b
            .wait_blocking(Duration::from_secs(60))
            .context("offload deadline")?;
        if let Err(k) = st.result {
            bail!("offload failed: {k}");
        }
    }
    let offload_s = t0.elapsed().as_secs_f64();
    cache.fill(0, cache_bytes, 0)?; // the worker evicts its copy

    // Reload block b into slot b + OFFLOADED (a different place in the cache).
    let t1 = Instant::now();
    let mut batches = Vec::new();
    for b in 0..OFFLOADED {
        let r = remotes[(b % PEERS as u64) as usize];
        let ops: Vec<Op> = (0..LAYERS * 2)
            .map(|p| {
                Op::read(
                    cache.id(),
                    page_offset(p / 2, p % 2, b + OFFLOADED),
                    r,
                    remote_slot(b) + p * PAGE,
                    PAGE,
                )
            })
            .collect();
        batches.push(engine.submit(&ops, BatchOptions::default())?);
    }
    for b in batches {
        let st = b
            .wait_blocking(Duration::from_secs(60))
            .context("reload deadline")?;
        if let Err(k) = st.result {
            bail!("reload failed: {k}");
        }
    }
    let reload_s = t1.elapsed().as_secs_f64();

    // Verify: slot b + OFFLOADED must hold exactly what block b held.
    let mut checked = 0u64;
    for b in 0..OFFLOADED {
        for layer in 0..LAYERS {
            for kv in 0..2 {
                let mut page = vec![0u8; PAGE as usize];
                cache.read_at(page_offset(layer, kv, b + OFFLOADED), &mut page)?;
                if pattern::check(&page, b, page_offset(layer, kv, b)).is_some() {
                    bail!("block {b} layer {layer} kv {kv}: reloaded bytes differ");
                }
                checked += PAGE;
            }
        }
    }
    let moved = OFFLOADED * block_bytes;
    println!();
    println!(
        "{:<8} {:>7} {:>7} {:>10} {:>9} {:>8}",
        "step", "blocks", "pages", "MiB", "ms", "GB/s"
    );
    for (name, s) in [("offload", offload_s), ("reload", reload_s)] {
        println!(
            "{:<8} {:>7} {:>7} {:>10.1} {:>9.1} {:>8.2}",
            name,
            OFFLOADED,
            OFFLOADED * LAYERS * 2,
            moved as f64 / (1 << 20) as f64,
            s * 1e3,
            moved as f64 / s / 1e9
        );
    }
    println!();
    for (i, p) in peers.iter().enumerate() {
        let n = (0..OFFLOADED)
            .filter(|b| (b % PEERS as u64) as usize == i)
            .count();
        println!("peer {i} (pid {}): holds {n} blocks", p.child.id());
    }
    println!(
        "verified: all {} reloaded bytes match what was offloaded",
        checked
    );
    println!("total time {:.2} s", t_start.elapsed().as_secs_f64());
    Ok(())
}

struct Peer {
    child: Child,
    desc: RegionDesc,
}

impl Peer {
    fn start(exe: &std::path::Path) -> Result<Peer> {
        let mut child = Command::new(exe)
            .arg("--peer")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("peer stdout")?).read_line(&mut line)?;
        let hex = line
            .strip_prefix("REGION ")
            .context("peer did not report its region")?;
        Ok(Peer {
            child,
            desc: RegionDesc::from_hex(hex)?,
        })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A peer donates memory for offloaded blocks and serves it until its
/// parent closes stdin.
fn run_peer() -> Result<()> {
    let engine = Engine::new(EngineConfig::default())?;
    let slots = OFFLOADED.div_ceil(PEERS as u64);
    let region = engine.alloc(slots * LAYERS * 2 * PAGE, MemoryKind::Host)?;
    println!("REGION {}", region.desc().to_hex());
    let mut sink = String::new();
    while std::io::stdin().read_line(&mut sink)? > 0 {}
    Ok(())
}
