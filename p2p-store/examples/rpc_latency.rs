//! Request-response round-trip latency on loopback.
//!
//! Two peers on 127.0.0.1; the responder answers through the normal
//! `Event::InboundRequest` → `Client::respond` path. After 100 warm-up
//! requests, 1000 sequential 64-byte requests (64-byte responses) are timed,
//! without and with a pre-shared key. Prints a table and one JSON line per row.
//!
//! Run: `cargo run --release --example rpc_latency`

use std::time::{Duration, Instant};

use kvmesh_p2p_store::network::{
    self, generate_swarm_key, parse_swarm_key, Event, Keypair, NetworkConfig,
};

const WARMUP: usize = 100;
const REQUESTS: usize = 1000;
const SIZE: usize = 64;

fn config(psk: Option<network::PreSharedKey>) -> NetworkConfig {
    let mut cfg = NetworkConfig::new(Keypair::generate_ed25519());
    cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    cfg.psk = psk;
    cfg
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

async fn measure(label: &str, psk: Option<network::PreSharedKey>) -> anyhow::Result<()> {
    let (server, mut events) = network::start(config(psk)).await?;
    let responder = server.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let Event::InboundRequest { data, token, .. } = event {
                let _ = responder.respond(token, data).await;
            }
        }
    });
    let (client, _client_events) = network::start(config(psk)).await?;
    let addr = server.listen_addrs().await?[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(server.local_peer_id()));
    client.dial(addr).await?;

    let payload = vec![0xabu8; SIZE];
    for _ in 0..WARMUP {
        client
            .request(server.local_peer_id(), payload.clone())
            .await?;
    }
    let mut samples = Vec::with_capacity(REQUESTS);
    let total = Instant::now();
    for _ in 0..REQUESTS {
        let t = Instant::now();
        let resp = client
            .request(server.local_peer_id(), payload.clone())
            .await?;
        samples.push(t.elapsed());
        anyhow::ensure!(resp == payload, "wrong response");
    }
    let total = total.elapsed();
    samples.sort();
    let mean = total / REQUESTS as u32;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{label:<6} {REQUESTS:>6} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
        us(percentile(&samples, 0.5)),
        us(percentile(&samples, 0.99)),
        us(mean),
        us(samples[0]),
        us(*samples.last().expect("samples"))
    );
    println!(
        "{{\"bench\":\"rpc_latency\",\"transport\":\"{label}\",\"requests\":{REQUESTS},\"bytes\":{SIZE},\"p50_us\":{:.1},\"p99_us\":{:.1},\"mean_us\":{:.1},\"min_us\":{:.1},\"max_us\":{:.1}}}",
        us(percentile(&samples, 0.5)),
        us(percentile(&samples, 0.99)),
        us(mean),
        us(samples[0]),
        us(*samples.last().expect("samples"))
    );
    client.shutdown().await?;
    server.shutdown().await?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    println!(
        "{:<6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "psk", "reqs", "p50_us", "p99_us", "mean_us", "min_us", "max_us"
    );
    measure("none", None).await?;
    let psk = parse_swarm_key(&generate_swarm_key())?;
    measure("psk", Some(psk)).await?;
    Ok(())
}
