//! p2pctl: run a kvmesh store peer, or talk to a running swarm.
//!
//! ```text
//! p2pctl node --listen /ip4/0.0.0.0/tcp/4001 --mem 4GiB [--bootstrap ADDR]... [--ssd-dir D --ssd-size 64GiB]
//!             [--dead-after S] [--announce-interval S] [--repair-delay S] [--mdns] [--psk-file F]
//! p2pctl peers | stat | locate KEY | put KEY FILE [--replicas N] | get KEY FILE | bench
//! ```
//! Client commands join the swarm briefly (as a peer that holds nothing) and
//! leave. `KVMESH_BOOTSTRAP` (addresses separated by commas or spaces) and
//! `KVMESH_PSK_FILE` are read from the environment. `node` prints
//! `KVMESH_NODE <peer id> <multiaddr>...` as its first stdout line. Failures
//! exit non-zero with a one-line reason. Tables by default,
//! `--json` for scripts. KEY is 64 hex digits, or any other text, which is
//! hashed into a key.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand};
use kvmesh_gpu::size::{format_size, parse_size};
use kvmesh_gpu::{EngineConfig, MemoryKind};
use kvmesh_p2p_store::{ObjectKey, PutOptions, Store, StoreConfig};

#[derive(Debug, Parser)]
#[command(version, about = "kvmesh peer store: run a peer or query the swarm")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Clone, ClapArgs)]
struct Common {
    /// Peer to join through (multiaddr; repeat the flag or separate with
    /// commas); also KVMESH_BOOTSTRAP.
    #[arg(long, global = true, value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Private-network key file (swarm.key format); also KVMESH_PSK_FILE.
    #[arg(long, global = true)]
    psk_file: Option<PathBuf>,
    /// Discover peers with mDNS.
    #[arg(long, global = true)]
    mdns: bool,
    /// Transport of the data plane.
    #[arg(long, global = true, default_value = "auto")]
    transport: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the swarm.
    #[arg(long, global = true, default_value_t = 10.0)]
    timeout: f64,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a store peer until interrupted.
    Node(NodeArgs),
    /// List live members.
    Peers,
    /// Figures of every holder.
    Stat,
    /// Which peers hold KEY.
    Locate { key: String },
    /// Store FILE under KEY.
    Put {
        key: String,
        file: PathBuf,
        #[arg(long, default_value_t = 1)]
        replicas: usize,
    },
    /// Fetch KEY into FILE.
    Get { key: String, file: PathBuf },
    /// Measure put/get latency and throughput against a local swarm.
    Bench(BenchArgs),
}

#[derive(Debug, Clone, ClapArgs)]
struct NodeArgs {
    /// libp2p listen address.
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
    listen: String,
    /// DRAM donated to the store.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    mem: u64,
    #[arg(long)]
    ssd_dir: Option<PathBuf>,
    #[arg(long, value_parser = parse_size)]
    ssd_size: Option<u64>,
    /// Serve Prometheus metrics here (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Seconds of silence before a member is declared dead.
    #[arg(long, default_value_t = 3.0)]
    dead_after: f64,
    /// Seconds between this peer's membership announces (less than
    /// --dead-after).
    #[arg(long, default_value_t = 0.5)]
    announce_interval: f64,
    /// Seconds to wait after a member dies before re-replicating its objects.
    #[arg(long, default_value_t = 0.5)]
    repair_delay: f64,
    /// Data-plane (engine) TCP listen address; default: the libp2p IP, port 0.
    #[arg(long)]
    engine_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, ClapArgs)]
struct BenchArgs {
    /// Holder processes to start (ignored with --attach).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Use the swarm given by --bootstrap / KVMESH_BOOTSTRAP instead.
    #[arg(long)]
    attach: bool,
    /// Object sizes.
    #[arg(long, value_delimiter = ',', default_value = "64KiB,512KiB,2MiB", value_parser = parse_size)]
    sizes: Vec<u64>,
    /// Operations per size and kind.
    #[arg(long, default_value_t = 300)]
    ops: usize,
    /// Memory of each started node.
    #[arg(long, default_value = "2GiB", value_parser = parse_size)]
    node_mem: u64,
}

fn env_list(name: &str) -> Vec<String> {
    std::env::var(name)
        .map(|v| {
            v.split([',', ' '])
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// A duration from a positive, finite number of seconds.
fn secs(flag: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        bail!("{flag} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_key(s: &str) -> ObjectKey {
    s.parse::<ObjectKey>()
        .unwrap_or_else(|_| ObjectKey::for_content(s.as_bytes()))
}

impl Common {
    fn config(&self, mem: u64) -> Result<StoreConfig> {
        let mut bootstrap = self.bootstrap.clone();
        if bootstrap.is_empty() {
            bootstrap = env_list("KVMESH_BOOTSTRAP");
        }
        let psk_file = self
            .psk_file
            .clone()
            .or_else(|| std::env::var_os("KVMESH_PSK_FILE").map(PathBuf::from));
        let psk = match psk_file {
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("reading pre-shared key {}", p.display()))?,
            ),
            None => None,
        };
        Ok(StoreConfig {
            bootstrap: bootstrap
                .iter()
                .map(|b| {
                    b.parse()
                        .with_context(|| format!("bad bootstrap address {b:?}"))
                })
                .collect::<Result<_>>()?,
            psk,
            mdns: self.mdns,
            mem_bytes: mem,
            engine: EngineConfig::for_transport(self.transport.parse()?),
            op_timeout: secs("--timeout", self.timeout)?,
            ..StoreConfig::default()
        })
    }

    async fn client(&self) -> Result<Store> {
        let cfg = self.config(0)?;
        if cfg.bootstrap.is_empty() && !cfg.mdns {
            bail!("no swarm to join: give --bootstrap ADDR, set KVMESH_BOOTSTRAP, or use --mdns");
        }
        let store = Store::start(cfg).await?;
        // `start` waited (up to --timeout) for the bootstrap peer's member
        // list, or the first mDNS peer's, which names every live holder.
        if let Err(e) = store.wait_for_members(1, Duration::from_millis(500)).await {
            store.shutdown().await;
            return Err(e.into());
        }
        Ok(store)
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let c = &cli.common;
    match &cli.cmd {
        Cmd::Node(n) => node(c, n).await,
        Cmd::Peers => {
            let s = c.client().await?;
            let peers: Vec<_> = s.peers().into_iter().filter(|p| p.capacity > 0).collect();
            if c.json {
                println!("{}", serde_json::to_string(&peers)?);
            } else {
                println!(
                    "{:<54} {:>10} {:>10} {:>6}  addrs",
                    "peer_id", "capacity", "free", "load"
                );
                for p in &peers {
                    println!(
                        "{:<54} {:>10} {:>10} {:>6}  {}",
                        p.peer_id,
                        format_size(p.capacity),
                        format_size(p.free),
                        p.load,
                        p.addrs.join(" ")
                    );
                }
            }
            s.shutdown().await;
            Ok(())
        }
        Cmd::Stat => {
            let s = c.client().await?;
            let rows = s.cluster_stats().await;
            if c.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(p, r)| match r {
                        Ok(st) => serde_json::json!({"peer_id": p, "objects": st.objects, "bytes_stored": st.bytes_stored,
                            "capacity": st.capacity, "ssd_objects": st.ssd_objects, "ssd_bytes": st.ssd_bytes,
                            "evictions": st.evictions, "spills": st.spills, "repairs": st.repairs, "rpc_served": st.rpc_served,
                            "leases": st.leases, "reservations": st.reservations, "integrity_failures": st.integrity_failures}),
                        Err(e) => serde_json::json!({"peer_id": p, "error": e.to_string()}),
                    })
                    .collect();
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "{:<54} {:>8} {:>10} {:>10} {:>8} {:>10} {:>9} {:>7}",
                    "peer_id",
                    "objects",
                    "stored",
                    "capacity",
                    "ssd_obj",
                    "ssd",
                    "evictions",
                    "repairs"
                );
                for (p, r) in &rows {
                    match r {
                        Ok(st) => println!(
                            "{:<54} {:>8} {:>10} {:>10} {:>8} {:>10} {:>9} {:>7}",
                            p,
                            st.objects,
                            format_size(st.bytes_stored),
                            format_size(st.capacity),
                            st.ssd_objects,
                            format_size(st.ssd_bytes),
                            st.evictions,
                            st.repairs
                        ),
                        Err(e) => println!("{p:<54} error: {e}"),
                    }
                }
            }
            s.shutdown().await;
            Ok(())
        }
        Cmd::Locate { key } => {
            let s = c.client().await?;
            let k = parse_key(key);
            let holders: Vec<String> = s
                .locate(k)
                .await?
                .iter()
                .map(kvmesh_p2p_store::peer_id_text)
                .collect();
            if c.json {
                println!(
                    "{}",
                    serde_json::json!({"key": k.to_string(), "holders": holders})
                );
            } else {
                println!("key {k}");
                if holders.is_empty() {
                    println!("  not stored on any live peer");
                }
                for h in &holders {
                    println!("  {h}");
                }
            }
            s.shutdown().await;
            Ok(())
        }
        Cmd::Put {
            key,
            file,
            replicas,
        } => {
            let data =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let s = c.client().await?;
            let k = parse_key(key);
            let t0 = Instant::now();
            s.put(
                k,
                &data,
                PutOptions {
                    replicas: *replicas,
                    ..PutOptions::default()
                },
            )
            .await
            .context("put")?;
            let holders: Vec<String> = s
                .locate(k)
                .await?
                .iter()
                .map(kvmesh_p2p_store::peer_id_text)
                .collect();
            if c.json {
                println!(
                    "{}",
                    serde_json::json!({"key": k.to_string(), "bytes": data.len(), "holders": holders, "us": t0.elapsed().as_micros() as u64})
                );
            } else {
                println!(
                    "stored {} under {k} on {} peer(s)",
                    format_size(data.len() as u64),
                    holders.len()
                );
            }
            s.shutdown().await;
            Ok(())
        }
        Cmd::Get { key, file } => {
            let s = c.client().await?;
            let k = parse_key(key);
            let Some(data) = s.get(k).await.context("get")? else {
                s.shutdown().await;
                bail!("key {k} is not stored on any live peer");
            };
            std::fs::write(file, &data).with_context(|| format!("writing {}", file.display()))?;
            if c.json {
                println!(
                    "{}",
                    serde_json::json!({"key": k.to_string(), "bytes": data.len(), "file": file})
                );
            } else {
                println!(
                    "wrote {} of {k} to {}",
                    format_size(data.len() as u64),
                    file.display()
                );
            }
            s.shutdown().await;
            Ok(())
        }
        Cmd::Bench(b) => bench(c, b).await,
    }
}

async fn node(c: &Common, n: &NodeArgs) -> Result<()> {
    let mut cfg = c.config(n.mem)?;
    cfg.listen = vec![n
        .listen
        .parse()
        .with_context(|| format!("bad --listen {:?}", n.listen))?];
    cfg.metrics_addr = n.metrics_addr;
    cfg.dead_after = secs("--dead-after", n.dead_after)?;
    cfg.announce_interval = secs("--announce-interval", n.announce_interval)?;
    cfg.repair_delay = secs("--repair-delay", n.repair_delay)?;
    if let (Some(dir), Some(size)) = (&n.ssd_dir, n.ssd_size) {
        cfg.ssd = Some((dir.clone(), size));
    } else if n.ssd_dir.is_some() != n.ssd_size.is_some() {
        bail!("--ssd-dir and --ssd-size go together");
    }
    cfg.engine.tcp_listen = match n.engine_listen {
        Some(a) => a,
        None => std::net::SocketAddr::new(
            kvmesh_p2p_store::multiaddr_ip(&cfg.listen[0]).unwrap_or([127, 0, 0, 1].into()),
            0,
        ),
    };
    let store = Store::start(cfg).await?;
    let addrs = store.listen_addrs().await;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "KVMESH_NODE {} {}",
        store.peer_id_text(),
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    out.flush()?;
    drop(out);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    store.shutdown().await;
    Ok(())
}

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `n` `p2pctl node` processes bootstrapped off the first; returns
/// them and the first one's address.
fn start_nodes(c: &Common, n: usize, mem: u64) -> Result<(Nodes, String)> {
    let exe = std::env::current_exe()?;
    let mut nodes = Nodes(Vec::new());
    let mut first: Option<String> = None;
    for _ in 0..n.max(1) {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "node",
            "--mem",
            &mem.to_string(),
            "--transport",
            &c.transport,
        ])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
        if let Some(f) = &first {
            cmd.args(["--bootstrap", f]);
        }
        if let Some(p) = &c.psk_file {
            cmd.arg("--psk-file").arg(p);
        }
        let mut child = cmd.spawn().context("starting a node")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("node stdout")?).read_line(&mut line)?;
        let addr = line
            .split_whitespace()
            .nth(2)
            .context("node did not report its address")?
            .to_string();
        nodes.0.push(child);
        first.get_or_insert(addr);
    }
    Ok((nodes, first.unwrap_or_default()))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

async fn bench(c: &Common, b: &BenchArgs) -> Result<()> {
    let mut c = c.clone();
    let _nodes = if b.attach {
        None
    } else {
        let (nodes, addr) = start_nodes(&c, b.nodes, b.node_mem)?;
        c.bootstrap = vec![addr];
        Some(nodes)
    };
    let s = c.client().await?;
    s.wait_for_members(
        if b.attach { 1 } else { b.nodes },
        Duration::from_secs_f64(c.timeout),
    )
    .await?;
    let mut rows = Vec::new();
    let run_id: u64 = rand::random();
    for &size in &b.sizes {
        let buf = s.engine().alloc(size, MemoryKind::Host)?;
        let mut data = vec![0u8; size as usize];
        kvmesh_gpu::pattern::fill(&mut data, run_id ^ size, 0);
        buf.write_at(0, &data)?;
        let keys: Vec<ObjectKey> = (0..b.ops)
            .map(|i| ObjectKey::for_content(format!("bench-{run_id}-{size}-{i}").as_bytes()))
            .collect();
        // Warm-up: connections, mappings.
        let wk = ObjectKey::for_content(format!("bench-{run_id}-{size}-warm").as_bytes());
        s.put_from(wk, &buf, 0, size, PutOptions::default()).await?;
        s.get_into(wk, &buf, 0, size).await?;
        let mut lat = Vec::with_capacity(b.ops);
        let t0 = Instant::now();
        for k in &keys {
            let t = Instant::now();
            s.put_from(*k, &buf, 0, size, PutOptions::default()).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let secs = t0.elapsed().as_secs_f64();
        rows.push((
            "put",
            size,
            pct(&mut lat.clone(), 0.5),
            pct(&mut lat, 0.99),
            size as f64 * b.ops as f64 / secs / 1e9,
        ));
        let mut lat = Vec::with_capacity(b.ops);
        let t0 = Instant::now();
        for k in &keys {
            let t = Instant::now();
            let got = s.get_into(*k, &buf, 0, size).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            if got != Some(size) {
                bail!("get of {k} returned {got:?}");
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let mut check = vec![0u8; size as usize];
        buf.read_at(0, &mut check)?;
        if check != data {
            bail!("bytes read back differ from what was put");
        }
        rows.push((
            "get",
            size,
            pct(&mut lat.clone(), 0.5),
            pct(&mut lat, 0.99),
            size as f64 * b.ops as f64 / secs / 1e9,
        ));
        for k in keys.iter().chain([&wk]) {
            let _ = s.remove(*k).await;
        }
    }
    if c.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(op, size, p50, p99, gbps)| serde_json::json!({"op": op, "size": size, "p50_us": p50, "p99_us": p99, "gbps": gbps, "ops": b.ops, "transport": c.transport}))
            .collect();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "{:<4} {:>8} {:>10} {:>10} {:>8}",
            "op", "size", "p50 us", "p99 us", "GB/s"
        );
        for (op, size, p50, p99, gbps) in &rows {
            println!(
                "{:<4} {:>8} {:>10.1} {:>10.1} {:>8.3}",
                op,
                format_size(*size),
                p50,
                p99,
                gbps
            );
        }
    }
    s.shutdown().await;
    Ok(())
}
