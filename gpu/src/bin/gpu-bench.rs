//! gpu-bench: copy paths of the KV-cache offload on one GPU, with the
//! Llama-3.1-8B cache geometry (32 layers, 8 KV heads, head dim 128, bf16,
//! 16-token blocks, K and V in separate per-layer planes).
//!
//! A request's blocks are scattered at random over a large paged cache.
//! Measured, as medians of `--reps` runs timed with CUDA events:
//!
//! - offload to pinned host: gather kernel into a device staging buffer +
//!   one D2H copy, and one `cuMemcpyAsync` per block, against one
//!   contiguous D2H copy of the same bytes;
//! - gather and scatter kernels (device to device) against one contiguous
//!   `cuMemcpyAsync` D2D of the same bytes;
//! - CUDA IPC push into another process's buffer against a local D2D copy.
//!
//! Prints a table; `--out DIR` also writes `gpu-bench.json` and `gpu-bench.csv`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kvmesh_gpu::cuda::{
    segments, DeviceBuffer, GpuDevice, GpuKernels, GpuMemory, GpuStream, IpcExport, IpcMapping,
    PinnedBuffer, Segment,
};
use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Parser, Debug)]
#[command(about = "KV-cache copy paths on one GPU (gather/scatter kernels, D2H, CUDA IPC)")]
struct Args {
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    device: u32,
    /// Request sizes in tokens.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000u64, 4000])]
    tokens: Vec<u64>,
    /// Blocks in the paged cache (each holds 16 tokens of every layer).
    #[arg(long, default_value_t = 4096)]
    cache_blocks: u64,
    /// Timed repetitions per case (median reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// Skip the two-process CUDA IPC case.
    #[arg(long)]
    no_ipc: bool,
    /// Directory for gpu-bench.json and gpu-bench.csv.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: serve an IPC target buffer of this many bytes.
    #[arg(long, hide = true)]
    ipc_child: Option<u64>,
}

const LAYERS: u64 = 32;
const KV_HEADS: u64 = 8;
const HEAD_DIM: u64 = 128;
const DTYPE_BYTES: u64 = 2;
const BLOCK_TOKENS: u64 = 16;
/// Bytes of one block of one layer's K (or V) plane.
const BLOCK_BYTES: u64 = BLOCK_TOKENS * KV_HEADS * HEAD_DIM * DTYPE_BYTES;

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    case: String,
    tokens: u64,
    bytes: u64,
    segments: u64,
    median_ms: f64,
    gb_per_s: f64,
    baseline: String,
    vs_baseline: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `f` on `s` between two timing events.
fn time(s: &GpuStream, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up
    s.synchronize()?;
    let mut ms = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let a = s.record_timed()?;
        f()?;
        let b = s.record_timed()?;
        b.synchronize()?;
        ms.push(a.elapsed_ms(&b)? as f64);
    }
    Ok(median(ms))
}

fn ipc_child(dev: &GpuDevice, bytes: u64) -> Result<()> {
    let buf = DeviceBuffer::zeroed(dev, bytes)?;
    let x = IpcExport::new(dev, buf.addr(), bytes)?;
    let hex: String = x.handle.iter().map(|b| format!("{b:02x}")).collect();
    println!("KVMESH_IPC {hex} {}", x.offset);
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?; // parent says done
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dev = GpuDevice::open(a.device).context("opening the GPU")?;
    if let Some(bytes) = a.ipc_child {
        return ipc_child(&dev, bytes);
    }
    let k = GpuKernels::load(&dev).context("compiling the copy kernels (NVRTC)")?;
    let s = GpuStream::new(&dev)?;
    let cache_bytes = LAYERS * 2 * a.cache_blocks * BLOCK_BYTES;
    println!(
        "# {} (sm_{}{}), cache {} blocks = {:.1} GiB, block plane {} KiB, {} reps",
        dev.name(),
        dev.compute_capability().0,
        dev.compute_capability().1,
        a.cache_blocks,
        cache_bytes as f64 / (1u64 << 30) as f64,
        BLOCK_BYTES >> 10,
        a.reps
    );
    let cache = DeviceBuffer::zeroed(&dev, cache_bytes).context("allocating the paged cache")?;
    let mut rows = Vec::new();
    for &tokens in &a.tokens {
        let nblk = tokens.div_ceil(BLOCK_TOKENS);
        if nblk > a.cache_blocks {
            bail!(
                "{tokens} tokens need {nblk} blocks, the cache has {}",
                a.cache_blocks
            );
        }
        let mut ids: Vec<u64> = (0..a.cache_blocks).collect();
        ids.shuffle(&mut rand::rngs::StdRng::seed_from_u64(tokens));
        ids.truncate(nblk as usize);
        // Every (layer, K/V, block) plane of the request, in request order.
        let mut pieces = Vec::with_capacity((LAYERS * 2 * nblk) as usize);
        for l in 0..LAYERS {
            for kv in 0..2 {
                for &b in &ids {
                    let off = ((l * 2 + kv) * a.cache_blocks + b) * BLOCK_BYTES;
                    pieces.push((cache.addr() + off, BLOCK_BYTES));
                }
            }
        }
        let total = pieces.len() as u64 * BLOCK_BYTES;
        let nseg = pieces.len() as u64;
        let staging = DeviceBuffer::zeroed(&dev, total)?;
        let other = DeviceBuffer::zeroed(&dev, total)?;
        let host = PinnedBuffer::alloc(&dev, total)?;
        let gather: Vec<Segment> = segments::gather(&pieces, staging.addr());
        let scatter_pieces: Vec<(u64, u64)> = pieces.clone();
        let scatter: Vec<Segment> = segments::scatter(staging.addr(), &scatter_pieces);
        let g_table = k.upload(&s, &gather)?;
        let s_table = k.upload(&s, &scatter)?;
        s.synchronize()?;
        let mut row = |case: &str, ms: f64, base: &str, base_ms: f64| {
            rows.push(Row {
                case: case.into(),
                tokens,
                bytes: total,
                segments: nseg,
                median_ms: ms,
                gb_per_s: total as f64 / (ms / 1e3) / 1e9,
                baseline: base.into(),
                vs_baseline: base_ms / ms,
            });
        };
        let copy = |dst: u64, src: u64, n: u64| -> Result<()> {
            // SAFETY: every address passed is inside `cache`, `staging`,
            // `other`, `host` or the peer's mapping, all alive until the end
            // of this iteration, after the stream synchronised.
            unsafe { s.copy_raw(dst, src, n) }?;
            Ok(())
        };
        let launch = |t: &kvmesh_gpu::cuda::SegmentTable| -> Result<()> {
            // SAFETY: the tables' segments were built inside `cache` and
            // `staging` (alive as above) and their destinations do not overlap.
            unsafe { k.launch(&s, t) }?;
            Ok(())
        };
        // (a) offload to pinned host.
        let d2h = time(&s, a.reps, || copy(host.addr(), staging.addr(), total))?;
        row("contiguous D2H (cuMemcpyAsync)", d2h, "contiguous D2H", d2h);
        let gd2h = time(&s, a.reps, || {
            launch(&g_table)?;
            copy(host.addr(), staging.addr(), total)
        })?;
        row(
            "offload: gather kernel + 1 D2H",
            gd2h,
            "contiguous D2H",
            d2h,
        );
        let per_seg = time(&s, a.reps, || {
            let mut at = host.addr();
            for &(src, len) in &pieces {
                copy(at, src, len)?;
                at += len;
            }
            Ok(())
        })?;
        row(
            "offload: cuMemcpyAsync per block",
            per_seg,
            "contiguous D2H",
            d2h,
        );
        // (b) kernels vs D2D.
        let d2d = time(&s, a.reps, || copy(other.addr(), staging.addr(), total))?;
        row("contiguous D2D (cuMemcpyAsync)", d2d, "contiguous D2D", d2d);
        let g = time(&s, a.reps, || launch(&g_table))?;
        row(
            "gather kernel (scattered -> contiguous)",
            g,
            "contiguous D2D",
            d2d,
        );
        let sc = time(&s, a.reps, || launch(&s_table))?;
        row(
            "scatter kernel (contiguous -> scattered)",
            sc,
            "contiguous D2D",
            d2d,
        );
        let up = time(&s, a.reps, || {
            k.gather(&s, &gather, &cache, &staging)?;
            Ok(())
        })?;
        row("gather incl. segment upload", up, "contiguous D2D", d2d);
        // (c) CUDA IPC push to another process.
        if !a.no_ipc {
            let mut child = Command::new(std::env::current_exe()?)
                .args([
                    "--device",
                    &a.device.to_string(),
                    "--ipc-child",
                    &total.to_string(),
                ])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut out = BufReader::new(child.stdout.take().context("child stdout")?);
            let mut line = String::new();
            out.read_line(&mut line)?;
            let rest = line
                .trim()
                .strip_prefix("KVMESH_IPC ")
                .context("child handshake")?;
            let (h, off) = rest.split_once(' ').context("child handshake")?;
            let bytes: Vec<u8> = (0..64)
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16))
                .collect::<Result<_, _>>()?;
            let handle: [u8; 64] = bytes.try_into().map_err(|_| anyhow::anyhow!("handle"))?;
            let m = IpcMapping::open(&dev, &handle)?;
            let dst = m.base() + off.parse::<u64>()?;
            let ipc = time(&s, a.reps, || copy(dst, staging.addr(), total))?;
            row(
                "CUDA IPC push (D2D into peer process)",
                ipc,
                "contiguous D2D",
                d2d,
            );
            let gipc = time(&s, a.reps, || {
                launch(&g_table)?;
                copy(dst, staging.addr(), total)
            })?;
            row("gather + CUDA IPC push", gipc, "contiguous D2D", d2d);
            s.synchronize()?;
            drop(m);
            if let Some(mut stdin) = child.stdin.take() {
                writeln!(stdin, "done")?;
            }
            child.wait()?;
        }
        s.synchronize()?;
    }
    println!(
        "{:<44} {:>6} {:>10} {:>7} {:>10} {:>8} {:>8}  baseline",
        "case", "tokens", "MiB", "segs", "median ms", "GB/s", "ratio"
    );
    for r in &rows {
        println!(
            "{:<44} {:>6} {:>10.1} {:>7} {:>10.3} {:>8.1} {:>8.2}  {}",
            r.case,
            r.tokens,
            r.bytes as f64 / (1 << 20) as f64,
            r.segments,
            r.median_ms,
            r.gb_per_s,
            r.vs_baseline,
            r.baseline
        );
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::json!({
            "device": dev.name(),
            "compute_capability": [dev.compute_capability().0, dev.compute_capability().1],
            "geometry": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                         "dtype_bytes": DTYPE_BYTES, "block_tokens": BLOCK_TOKENS,
                         "cache_blocks": a.cache_blocks},
            "reps": a.reps,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "rows": rows,
        });
        std::fs::write(
            dir.join("gpu-bench.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        let mut csv =
            String::from("case,tokens,bytes,segments,median_ms,gb_per_s,baseline,vs_baseline\n");
        for r in &rows {
            csv.push_str(&format!(
                "\"{}\",{},{},{},{:.4},{:.2},\"{}\",{:.3}\n",
                r.case,
                r.tokens,
                r.bytes,
                r.segments,
                r.median_ms,
                r.gb_per_s,
                r.baseline,
                r.vs_baseline
            ));
        }
        std::fs::write(dir.join("gpu-bench.csv"), csv)?;
        println!("# wrote {}/gpu-bench.{{json,csv}}", dir.display());
    }
    Ok(())
}
