//! Gossip load in an in-process cluster.
//!
//! N peers (default 32) on 127.0.0.1, all bootstrapped by peer 0, subscribe to
//! one topic. Once every peer has received a message from every other peer
//! (mesh formed; bounded at 20 s), each peer publishes one 64-byte message
//! every 500 ms for the measurement window (default 20 s). Prints per-peer
//! delivered messages per second (min/median/max), the delivery ratio,
//! publish-to-delivery latency percentiles, connections per peer, and the
//! process CPU time; then one JSON line.
//!
//! Run: `cargo run --release --example gossip_cluster -- [peers] [seconds]`

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kvmesh_p2p_store::network::{self, Client, Event, Keypair, NetError, NetworkConfig, PeerId};

const TOPIC: &str = "kvmesh/membership";
const INTERVAL: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Stats {
    publishers: HashSet<PeerId>,
    in_window: u64,
    latencies_us: Vec<u64>,
}

fn cpu_seconds() -> f64 {
    // utime + stime in clock ticks (fields 14 and 15), 100 ticks per second.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(32);
    let secs: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let epoch = Instant::now();
    let window: Arc<Mutex<Option<(Instant, Instant)>>> = Arc::default();

    let mut clients: Vec<Client> = Vec::new();
    let mut stats: Vec<Arc<Mutex<Stats>>> = Vec::new();
    let mut bootstrap = Vec::new();
    for i in 0..n {
        let mut cfg = NetworkConfig::new(Keypair::generate_ed25519());
        cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
        cfg.bootstrap = bootstrap.clone();
        let (client, mut events) = network::start(cfg).await?;
        if i == 0 {
            let addr = client.listen_addrs().await?[0]
                .clone()
                .with(libp2p::multiaddr::Protocol::P2p(client.local_peer_id()));
            bootstrap.push(addr);
        }
        client.subscribe(TOPIC).await?;
        let st: Arc<Mutex<Stats>> = Arc::default();
        let (st2, window2) = (st.clone(), window.clone());
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::Message { from, data, .. } = event {
                    let now = Instant::now();
                    let sent_us = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
                    let lat = (now - epoch).as_micros() as u64 - sent_us;
                    let mut s = st2.lock().expect("stats");
                    s.publishers.insert(from);
                    let w = *window2.lock().expect("window");
                    if let Some((start, end)) = w {
                        let sent = epoch + Duration::from_micros(sent_us);
                        if sent >= start && sent < end {
                            s.in_window += 1;
                            s.latencies_us.push(lat);
                        }
                    }
                }
            }
        });
        clients.push(client);
        stats.push(st);
    }
    let started = epoch.elapsed();

    // Publishers: one task per peer, one message per INTERVAL.
    let published = Arc::new(Mutex::new(0u64));
    let publish_errors = Arc::new(Mutex::new(0u64));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for (i, c) in clients.iter().enumerate() {
        let (c, window, published, errors, stop) = (
            c.clone(),
            window.clone(),
            published.clone(),
            publish_errors.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            // Spread peers over the interval.
            tokio::time::sleep(INTERVAL * i as u32 / n as u32).await;
            let mut tick = tokio::time::interval(INTERVAL);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let now_us = epoch.elapsed().as_micros() as u64;
                let mut data = now_us.to_be_bytes().to_vec();
                data.resize(64, 0);
                match c.publish(TOPIC, data).await {
                    Ok(()) => {
                        let in_window = window.lock().expect("window").is_some_and(|(s, e)| {
                            let t = epoch + Duration::from_micros(now_us);
                            t >= s && t < e
                        });
                        if in_window {
                            *published.lock().expect("count") += 1;
                        }
                    }
                    Err(NetError::NoSubscribers { .. }) => {}
                    Err(_) => *errors.lock().expect("count") += 1,
                }
            }
        });
    }

    // Mesh formed: every peer has heard every other peer.
    let mesh_start = Instant::now();
    loop {
        let formed = stats
            .iter()
            .all(|s| s.lock().expect("stats").publishers.len() >= n - 1);
        if formed {
            break;
        }
        anyhow::ensure!(
            mesh_start.elapsed() < Duration::from_secs(20),
            "mesh did not form within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mesh_time = mesh_start.elapsed();

    let cpu0 = cpu_seconds();
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs(secs);
    *window.lock().expect("window") = Some((start, end));
    tokio::time::sleep_until((end + Duration::from_secs(2)).into()).await;
    let cpu = cpu_seconds() - cpu0;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);

    let mut conns = Vec::new();
    for c in &clients {
        conns.push(c.connected_peers().await?.len());
    }
    conns.sort();
    let published = *published.lock().expect("count");
    let mut per_peer_rate: Vec<f64> = stats
        .iter()
        .map(|s| s.lock().expect("stats").in_window as f64 / secs as f64)
        .collect();
    per_peer_rate.sort_by(f64::total_cmp);
    let delivered: u64 = stats
        .iter()
        .map(|s| s.lock().expect("stats").in_window)
        .sum();
    let expected = published * (n as u64 - 1);
    let mut lat: Vec<u64> = stats
        .iter()
        .flat_map(|s| s.lock().expect("stats").latencies_us.clone())
        .collect();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    let errors = *publish_errors.lock().expect("count");

    println!("peers                       {n}");
    println!("startup (all peers)         {:.2} s", started.as_secs_f64());
    println!(
        "mesh formed after           {:.2} s",
        mesh_time.as_secs_f64()
    );
    println!(
        "window                      {secs} s, publish every {} ms",
        INTERVAL.as_millis()
    );
    println!("published in window         {published}  (errors {errors})");
    println!(
        "delivered msgs/s per peer   min {:.1}  median {:.1}  max {:.1}  (ideal {:.1})",
        per_peer_rate[0],
        per_peer_rate[n / 2],
        per_peer_rate[n - 1],
        (n - 1) as f64 / INTERVAL.as_secs_f64()
    );
    println!(
        "delivery ratio              {:.4}  ({delivered} / {expected})",
        delivered as f64 / expected.max(1) as f64
    );
    println!(
        "latency us                  p50 {}  p99 {}  max {}",
        pct(0.5),
        pct(0.99),
        lat.last().copied().unwrap_or(0)
    );
    println!(
        "connections per peer        min {}  median {}  max {}",
        conns[0],
        conns[n / 2],
        conns[n - 1]
    );
    println!(
        "process CPU                 {:.1} s over {:.1} s ({:.0}% of one core)",
        cpu,
        secs as f64 + 2.0,
        cpu / (secs as f64 + 2.0) * 100.0
    );
    println!(
        "{{\"bench\":\"gossip_cluster\",\"peers\":{n},\"window_s\":{secs},\"mesh_s\":{:.3},\"published\":{published},\"delivered\":{delivered},\"expected\":{expected},\"rate_min\":{:.2},\"rate_median\":{:.2},\"rate_max\":{:.2},\"lat_p50_us\":{},\"lat_p99_us\":{},\"cpu_s\":{cpu:.2}}}",
        mesh_time.as_secs_f64(),
        per_peer_rate[0],
        per_peer_rate[n / 2],
        per_peer_rate[n - 1],
        pct(0.5),
        pct(0.99)
    );
    for c in &clients {
        c.shutdown().await?;
    }
    Ok(())
}
