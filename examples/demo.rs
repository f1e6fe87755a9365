//! The README's main job: a local swarm of 3 store peers (separate
//! processes: this program re-run with `--peer`), a "prefill" and a
//! "decode" worker (in this process, each a store peer of its own with its
//! own transfer engine, so every byte between them crosses an engine), both
//! with a host KV cache of Llama-3.1-8B geometry (32 layers, 8 KV heads,
//! head size 128, bf16, 16-token blocks; vLLM's per-layer FlashAttention
//! layout), and a workload of requests that share prefixes: 8 system
//! prompts of 384 tokens, each followed by 5 different user turns.
//!
//! For each request the prefill worker looks up the longest stored prefix
//! (leased), loads it, "computes" the rest (deterministic K/V bytes derived
//! from each block's prefix key, written layer by layer while a per-layer
//! save sends the new full blocks to the swarm), then pushes all the
//! request's blocks into the decode worker's KV cache with the request id
//! as transfer id (P/D). The decode worker checks every pushed byte; the
//! prefill worker checks every byte it loaded from the store.
//!
//! Run: `cargo run --release --example demo`

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kvmesh::gpu::{MemoryKind, Region};
use kvmesh::p2p_store::StoreConfig;
use kvmesh::plugin::keys::next_token_key;
use kvmesh::plugin::{
    BlockKey, BlockShape, DType, ExtraKeys, HeadOrder, KeyNamespace, KvCache, KvLayout,
    PrefixStoreConfig, PushInbox, RemoteKvCache, StoreNode,
};

// Llama-3.1-8B.
const LAYERS: u32 = 32;
const KV_HEADS: u32 = 8;
const HEAD_SIZE: u32 = 128;
const BLOCK_TOKENS: u32 = 16;
/// Blocks of each worker's KV cache (2 MiB each): 4 decode slots of 48.
const CACHE_BLOCKS: u32 = 192;
const DECODE_SLOT: u32 = 48;
const PEERS: usize = 3;
/// DRAM each store peer donates.
const PEER_MEM: u64 = 640 << 20;
const SYSTEM_PROMPTS: usize = 8;
const USERS: usize = 5;
const SYSTEM_TOKENS: usize = 384;
const T: Duration = Duration::from_secs(30);

/// Prefill compute of `n` tokens, the estimate `l * (a*n^2*d + b*n*d^2)`
/// for Llama-3.1-8B (l = 32 layers, d = 4096):
/// - attention scores and the weighted sum of values: under causal masking
///   about n^2/2 query-key pairs, each costing d multiply-adds in `QK^T`
///   and d in `AV`, i.e. n^2 * d MACs = 2 n^2 d flops: a = 2;
/// - per token, the Q and O projections (d x d each), K and V (d x 1024
///   each: 8 KV heads of 128 = d/4) and the MLP (gate, up, down: 3 x d x
///   14336 = 10.5 d^2) are 13 d^2 MACs = 26 d^2 flops: b = 26.
///
/// A cached prefix of h tokens saves exactly flops(h): the remaining n - h
/// tokens still attend to all n, so their cost is flops(n) - flops(h).
fn flops(n: f64) -> f64 {
    const L: f64 = 32.0;
    const D: f64 = 4096.0;
    const A: f64 = 2.0;
    const B: f64 = 26.0;
    L * (A * n * n * D + B * n * D * D)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() == Some("--peer") {
        return run_peer(args.next());
    }
    let t_start = Instant::now();
    let exe = std::env::current_exe()?;
    // The swarm: the first peer, then two joining through it.
    let mut peers = Vec::new();
    peers.push(PeerProcess::start(&exe, None)?);
    let boot = peers[0].addr.clone();
    for _ in 1..PEERS {
        peers.push(PeerProcess::start(&exe, Some(&boot))?);
    }
    let result = run(&boot, &mut peers, t_start);
    // Peers are killed on drop, also when `run` failed.
    drop(peers);
    result
}

fn worker_config(boot: &str) -> Result<StoreConfig> {
    Ok(StoreConfig {
        mem_bytes: 0, // workers hold nothing; the peers do
        bootstrap: vec![boot.parse().context("bootstrap address")?],
        ..StoreConfig::default()
    })
}

fn run(boot: &str, peers: &mut [PeerProcess], t_start: Instant) -> Result<()> {
    let prefill = StoreNode::start(worker_config(boot)?, 2)?;
    let decode = StoreNode::start(worker_config(boot)?, 1)?;
    for w in [&prefill, &decode] {
        w.block_on(T, "join", w.store().wait_for_members(PEERS, T))??;
    }
    let shape = BlockShape::kv(LAYERS, BLOCK_TOKENS, KV_HEADS, HEAD_SIZE, DType::Bf16);
    let layout = KvLayout::vllm_flash_attn(shape, CACHE_BLOCKS, HeadOrder::Nhd)?;
    let block_bytes = shape.block_bytes();
    let pcache = Arc::new(KvCache::alloc(
        prefill.store().engine(),
        layout.clone(),
        MemoryKind::Host,
    )?);
    let dcache = KvCache::alloc(decode.store().engine(), layout.clone(), MemoryKind::Host)?;
    let prefix = prefill.prefix_store(
        pcache.clone(),
        PrefixStoreConfig {
            staging_bytes: 96 << 20,
            ..PrefixStoreConfig::default()
        },
    )?;
    let remote = RemoteKvCache::import(prefill.store().engine(), &dcache.desc())?;
    println!(
        "kvmesh demo: {PEERS} store peer processes (pids {}), prefill and decode workers",
        peers
            .iter()
            .map(|p| p.child.id().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "KV cache per worker: Llama-3.1-8B geometry ({LAYERS} layers, {KV_HEADS} KV heads x \
         {HEAD_SIZE}, bf16, {BLOCK_TOKENS}-token blocks of {} MiB), {CACHE_BLOCKS} blocks = {} MiB",
        block_bytes >> 20,
        (block_bytes * CACHE_BLOCKS as u64) >> 20
    );

    // The decode worker: waits for each push's notification, checks every
    // byte, answers on `acks`.
    let (jobs_tx, jobs_rx) = mpsc::channel::<DecodeJob>();
    let (acks_tx, acks_rx) = mpsc::channel::<Result<u64>>();
    let inbox = PushInbox::new(decode.store().engine());
    let dcache = Arc::new(dcache);
    let dc = dcache.clone();
    let decoder = std::thread::spawn(move || decode_worker(&dc, &inbox, jobs_rx, acks_tx));

    let ns = KeyNamespace {
        model_id: "meta-llama/Llama-3.1-8B".into(),
        dtype: DType::Bf16,
        layout_fingerprint: layout.fingerprint(),
        tp_rank: 0,
        weight_version: "demo".into(),
    };
    let mut m = Metrics::default();
    let requests = workload();
    for (r, tokens) in requests.iter().enumerate() {
        let keys = ns.token_keys(tokens, BLOCK_TOKENS, &ExtraKeys::new());
        let n_blocks = tokens.len().div_ceil(BLOCK_TOKENS as usize);
        let full = keys.len();
        let seeds = block_seeds(&ns, tokens, &keys);
        let blocks: Vec<u32> = (0..n_blocks as u32)
            .map(|k| (r as u32 * 53 + k * 7) % CACHE_BLOCKS)
            .collect();

        // Longest stored prefix, leased until loaded.
        let lookup = prefix.lookup_blocking(&keys, Duration::from_secs(10), T)?;
        let hit = lookup.blocks();
        if hit > 0 {
            let t0 = Instant::now();
            let st = prefix
                .load(&lookup, 0, &blocks[..hit])?
                .wait(T)
                .context("load")?;
            ensure!(st.result.is_ok(), "load: {:?}", st.message);
            m.load_s += t0.elapsed().as_secs_f64();
            for (k, &b) in blocks[..hit].iter().enumerate() {
                m.verified_loaded += check_block(&pcache, b, seeds[k])
                    .with_context(|| format!("request {r}: loaded block {k}"))?;
            }
        }
        drop(lookup);

        // "Prefill" the rest layer by layer; a per-layer save ships the new
        // full blocks as their layers are written.
        let save = prefix.save(&blocks[hit..full], &keys[hit..full], true)?;
        let mut scratch = vec![0u8; run_bytes()];
        let mut last_layer = Instant::now();
        for layer in 0..LAYERS {
            for k in hit..n_blocks {
                fill_block_layer(&pcache, blocks[k], layer, seeds[k], &mut scratch)?;
            }
            last_layer = Instant::now();
            save.layer_saved(layer)?;
        }
        let st = save.wait(T).context("save")?;
        ensure!(st.result.is_ok(), "save: {:?}", st.message);
        // Earlier layers were packed while later ones were written; the
        // puts to the peers follow the last layer.
        m.save_s += last_layer.elapsed().as_secs_f64();

        // P/D: push every block (the partial last one too) into a decode
        // slot; slots are reused after the decode worker checked them.
        if r >= 3 {
            m.verified_pushed += acks_rx.recv_timeout(T).context("decode worker")??;
        }
        let slot = (r as u32 % 4) * DECODE_SLOT;
        let dst: Vec<u32> = (0..n_blocks as u32).map(|k| slot + k).collect();
        let tid = format!("req-{r}");
        let t0 = Instant::now();
        let push = pcache.push(&remote, &blocks, &dst, tid.as_bytes(), Some(T))?;
        let pst = push.wait(T).context("push deadline")?;
        ensure!(pst.result.is_ok(), "push: {:?}", pst.message);
        m.push_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        m.push_bytes += pst.bytes;
        jobs_tx.send(DecodeJob {
            transfer_id: tid.into_bytes(),
            blocks: dst,
            seeds: seeds.clone(),
        })?;

        m.blocks_looked_up += full as u64;
        m.blocks_hit += hit as u64;
        m.tokens += tokens.len() as u64;
        m.tokens_hit += (hit * BLOCK_TOKENS as usize) as u64;
        m.flops_total += flops(tokens.len() as f64);
        m.flops_avoided += flops((hit * BLOCK_TOKENS as usize) as f64);
    }
    drop(jobs_tx);
    for ack in acks_rx.iter() {
        m.verified_pushed += ack?;
    }
    decoder.join().expect("decode worker panicked")?;
    ensure!(prefix.fence(T), "operations still running");
    let s = prefix.stats();
    ensure!(s.blocks_failed == 0, "{} blocks failed", s.blocks_failed);

    // Peer processes report what they hold on the way out.
    let mut held = Vec::new();
    for p in peers.iter_mut() {
        held.push(p.finish()?);
    }
    print_table(&m, &s, &held, requests.len());
    println!(
        "verified: every loaded byte ({:.2} GB from the store) and every pushed byte ({:.2} GB \
         into the decode cache) matched the K/V the prefill computed for its prefix",
        m.verified_loaded as f64 / 1e9,
        m.verified_pushed as f64 / 1e9
    );
    println!(
        "total {:.1} s; the {PEERS} peer processes have exited",
        t_start.elapsed().as_secs_f64()
    );
    prefill.shutdown(Duration::from_secs(1));
    decode.shutdown(Duration::from_secs(1));
    Ok(())
}

#[derive(Default)]
struct Metrics {
    tokens: u64,
    tokens_hit: u64,
    blocks_looked_up: u64,
    blocks_hit: u64,
    load_s: f64,
    save_s: f64,
    push_ms: Vec<f64>,
    push_bytes: u64,
    flops_total: f64,
    flops_avoided: f64,
    verified_loaded: u64,
    verified_pushed: u64,
}

fn print_table(m: &Metrics, s: &kvmesh::plugin::PrefixStats, held: &[(u64, u64)], requests: usize) {
    let mut push = m.push_ms.clone();
    push.sort_by(f64::total_cmp);
    let pct = |q: f64| push[((push.len() - 1) as f64 * q).round() as usize];
    let gb = |b: u64| b as f64 / 1e9;
    let rows: Vec<(String, String)> = vec![
        (
            "requests".into(),
            format!("{requests} ({SYSTEM_PROMPTS} system prompts x {USERS} user turns)"),
        ),
        (
            "prefix hit rate".into(),
            format!(
                "{:.1} % of full blocks ({} of {}), {:.1} % of prompt tokens",
                100.0 * m.blocks_hit as f64 / m.blocks_looked_up as f64,
                m.blocks_hit,
                m.blocks_looked_up,
                100.0 * m.tokens_hit as f64 / m.tokens as f64
            ),
        ),
        (
            "bytes saved".into(),
            format!(
                "{:.2} GB ({} blocks; {} already stored)",
                gb(s.bytes_saved),
                s.blocks_saved,
                s.blocks_save_skipped
            ),
        ),
        (
            "bytes loaded".into(),
            format!("{:.2} GB ({} blocks)", gb(s.bytes_loaded), s.blocks_loaded),
        ),
        (
            "save GB/s".into(),
            format!(
                "{:.2} (from the last layer written to stored; earlier layers \
                 were packed while later ones were written)",
                gb(s.bytes_saved) / m.save_s
            ),
        ),
        (
            "load GB/s".into(),
            format!("{:.2}", gb(s.bytes_loaded) / m.load_s),
        ),
        (
            "P/D push per request".into(),
            format!(
                "median {:.1} ms, p90 {:.1} ms, max {:.1} ms ({:.1} MiB median; {:.2} GB/s)",
                pct(0.5),
                pct(0.9),
                push[push.len() - 1],
                (m.push_bytes / push.len() as u64) as f64 / (1 << 20) as f64,
                gb(m.push_bytes) / (m.push_ms.iter().sum::<f64>() / 1e3)
            ),
        ),
        (
            "prefill compute avoided".into(),
            format!(
                "{:.1} of {:.1} TFLOP ({:.1} %), flops(n) = l*(a*n^2*d + b*n*d^2), \
                 l=32 a=2 b=26 d=4096",
                m.flops_avoided / 1e12,
                m.flops_total / 1e12,
                100.0 * m.flops_avoided / m.flops_total
            ),
        ),
        (
            "stored on the peers".into(),
            held.iter()
                .map(|(o, b)| format!("{o} blocks / {} MiB", b >> 20))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ];
    println!();
    for (k, v) in rows {
        println!("  {k:<26} {v}");
    }
    println!();
}

/// 8 system prompts of 384 tokens, each followed by 5 user turns of
/// 40..300 tokens; requests interleave the system prompts.
fn workload() -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for u in 0..USERS {
        for s in 0..SYSTEM_PROMPTS {
            let mut t: Vec<u32> = (0..SYSTEM_TOKENS as u32)
                .map(|i| (i * 2_654_435_761u32) ^ (s as u32 * 7919))
                .map(|x| x % 128_000)
                .collect();
            let user = 40 + (u * 53 + s * 31) % 260;
            t.extend(
                (0..user as u32).map(|i| (i * 40_503 + (u * 8 + s) as u32 * 104_729) % 128_000),
            );
            out.push(t);
        }
    }
    out
}

/// A seed per block: from its key for full blocks (the K/V of a block is a
/// function of its whole prefix, as in a real model), and from the key
/// chain plus the tokens of a partial last block.
fn block_seeds(ns: &KeyNamespace, tokens: &[u32], keys: &[BlockKey]) -> Vec<u64> {
    let mut seeds: Vec<u64> = keys.iter().map(seed_of).collect();
    let done = keys.len() * BLOCK_TOKENS as usize;
    if done < tokens.len() {
        let parent = keys.last().copied().unwrap_or_else(|| ns.root());
        seeds.push(seed_of(&next_token_key(&parent, &tokens[done..], &[])));
    }
    seeds
}

fn seed_of(k: &BlockKey) -> u64 {
    u64::from_le_bytes(k.0[..8].try_into().expect("32-byte key"))
}

/// Bytes of one block's K (or V) in one layer: 16 tokens x 8 heads x 128
/// bf16, one run in vLLM's per-layer NHD layout.
fn run_bytes() -> usize {
    (BLOCK_TOKENS * KV_HEADS * HEAD_SIZE * 2) as usize
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn run_seed(seed: u64, layer: u32, kv: u32) -> u64 {
    splitmix(seed ^ ((layer as u64) << 1 | kv as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// Where the K (kv = 0) or V run of `block` in `layer` starts.
fn run_place(cache: &KvCache, layer: u32, block: u32, kv: u32) -> (&Region, u64) {
    let p = cache.layout().vector_place(layer, block, kv, 0, 0);
    (&cache.regions()[p.region as usize], p.offset)
}

/// The model's "output": deterministic K/V of a block in one layer.
fn fill_block_layer(
    cache: &KvCache,
    block: u32,
    layer: u32,
    seed: u64,
    scratch: &mut [u8],
) -> Result<()> {
    for kv in 0..2 {
        let s = run_seed(seed, layer, kv);
        for (i, w) in scratch.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&splitmix(s.wrapping_add(i as u64)).to_le_bytes());
        }
        let (region, off) = run_place(cache, layer, block, kv);
        region.write_at(off, scratch)?;
    }
    Ok(())
}

/// Checks every byte of a block (all layers, K and V); returns the bytes
/// checked.
fn check_block(cache: &KvCache, block: u32, seed: u64) -> Result<u64> {
    let mut buf = vec![0u8; run_bytes()];
    for layer in 0..LAYERS {
        for kv in 0..2 {
            let (region, off) = run_place(cache, layer, block, kv);
            region.read_at(off, &mut buf)?;
            let s = run_seed(seed, layer, kv);
            if let Some(i) = buf
                .chunks_exact(8)
                .enumerate()
                .position(|(i, w)| w != splitmix(s.wrapping_add(i as u64)).to_le_bytes())
            {
                bail!("block {block} layer {layer} kv {kv}: word {i} differs");
            }
        }
    }
    Ok(LAYERS as u64 * 2 * run_bytes() as u64)
}

struct DecodeJob {
    transfer_id: Vec<u8>,
    blocks: Vec<u32>,
    seeds: Vec<u64>,
}

/// Waits for each job's push notification, then checks every byte of the
/// pushed blocks.
fn decode_worker(
    cache: &KvCache,
    inbox: &PushInbox,
    jobs: mpsc::Receiver<DecodeJob>,
    acks: mpsc::Sender<Result<u64>>,
) -> Result<()> {
    let mut early: HashMap<Vec<u8>, u32> = HashMap::new();
    for job in jobs.iter() {
        let until = Instant::now() + T;
        let result = (|| {
            while !early.contains_key(&job.transfer_id) {
                let left = until.saturating_duration_since(Instant::now());
                let got = inbox.wait_received(left).context("no push notification")?;
                early.insert(got.transfer_id, got.blocks);
            }
            let n = early.remove(&job.transfer_id).unwrap_or(0);
            ensure!(n as usize == job.blocks.len(), "push of {n} blocks");
            let mut bytes = 0;
            for (k, &b) in job.blocks.iter().enumerate() {
                bytes += check_block(cache, b, job.seeds[k])
                    .with_context(|| format!("decode: pushed block {k}"))?;
            }
            Ok(bytes)
        })();
        let failed = result.is_err();
        if acks.send(result).is_err() || failed {
            break;
        }
    }
    Ok(())
}

/// A store peer in its own process (this program with `--peer`).
struct PeerProcess {
    child: Child,
    stdout: BufReader<ChildStdout>,
    addr: String,
}

impl PeerProcess {
    fn start(exe: &std::path::Path, bootstrap: Option<&str>) -> Result<PeerProcess> {
        let mut cmd = Command::new(exe);
        cmd.arg("--peer")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(b) = bootstrap {
            cmd.arg(b);
        }
        let mut child = cmd.spawn().context("starting a peer process")?;
        let mut stdout = BufReader::new(child.stdout.take().context("peer stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("KVMESH_PEER ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("peer process did not report its address (got {line:?})");
        };
        Ok(PeerProcess {
            addr: addr.to_string(),
            child,
            stdout,
        })
    }

    /// Closes its stdin (it leaves the swarm and exits) and reads what it
    /// held: (objects, bytes).
    fn finish(&mut self) -> Result<(u64, u64)> {
        drop(self.child.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let mut w = line.split_whitespace().skip(1);
        let mut num = || -> Result<u64> { Ok(w.next().context("peer stats")?.parse()?) };
        let held = (num()?, num()?);
        self.child.wait()?;
        Ok(held)
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A store peer: donates memory to the swarm until its parent closes stdin
/// (or dies), then reports what it held and leaves.
fn run_peer(bootstrap: Option<String>) -> Result<()> {
    let cfg = StoreConfig {
        mem_bytes: PEER_MEM,
        bootstrap: bootstrap
            .iter()
            .map(|b| b.parse().context("bootstrap address"))
            .collect::<Result<_>>()?,
        ..StoreConfig::default()
    };
    let node = StoreNode::start(cfg, 2)?;
    let addrs = node.block_on(T, "listen addresses", node.store().listen_addrs())?;
    let addr = addrs.first().context("no listen address")?.to_string();
    let addr = if addr.contains("/p2p/") {
        addr
    } else {
        format!("{addr}/p2p/{}", node.store().peer_id_text())
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "KVMESH_PEER {addr}")?;
    out.flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    let s = node.store().stats();
    writeln!(out, "KVMESH_PEER_HELD {} {}", s.objects, s.bytes_stored)?;
    out.flush()?;
    node.shutdown(Duration::from_secs(1));
    Ok(())
}
