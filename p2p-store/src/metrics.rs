//! Prometheus metrics of a store peer: counters, gauges and latency
//! histograms kept in atomics, rendered as the text exposition format and
//! served over a minimal HTTP endpoint (`GET /metrics`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Bucket upper bounds of the latency histograms, in microseconds.
const BUCKETS_US: [u64; 14] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1e6);
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Everything a peer counts.
#[derive(Debug, Default)]
pub struct Metrics {
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub put_failures: AtomicU64,
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub get_failovers: AtomicU64,
    pub local_reads: AtomicU64,
    pub inline_reads: AtomicU64,
    pub checksum_failures: AtomicU64,
    pub evictions: AtomicU64,
    pub spills: AtomicU64,
    pub promotions: AtomicU64,
    pub repairs: AtomicU64,
    pub repair_failures: AtomicU64,
    pub integrity_failures: AtomicU64,
    pub announces_sent: AtomicU64,
    pub announces_received: AtomicU64,
    pub rpc_served: AtomicU64,
    pub peers_alive: AtomicU64,
    pub objects: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub put_latency: Histogram,
    pub get_latency: Histogram,
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let c = |o: &mut String, name: &str, help: &str, kind: &str, v: &AtomicU64| {
            let _ = writeln!(
                o,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        };
        c(
            &mut o,
            "kvmesh_puts_total",
            "Objects put by this peer as a client.",
            "counter",
            &self.puts,
        );
        c(
            &mut o,
            "kvmesh_put_bytes_total",
            "Bytes put by this peer as a client.",
            "counter",
            &self.put_bytes,
        );
        c(
            &mut o,
            "kvmesh_put_failures_total",
            "Puts that failed.",
            "counter",
            &self.put_failures,
        );
        c(
            &mut o,
            "kvmesh_gets_total",
            "Gets issued by this peer as a client.",
            "counter",
            &self.gets,
        );
        c(
            &mut o,
            "kvmesh_get_bytes_total",
            "Bytes read by gets.",
            "counter",
            &self.get_bytes,
        );
        c(
            &mut o,
            "kvmesh_get_hits_total",
            "Gets that found the object.",
            "counter",
            &self.hits,
        );
        c(
            &mut o,
            "kvmesh_get_misses_total",
            "Gets that found no replica.",
            "counter",
            &self.misses,
        );
        c(
            &mut o,
            "kvmesh_get_failovers_total",
            "Gets that moved on to another replica.",
            "counter",
            &self.get_failovers,
        );
        c(
            &mut o,
            "kvmesh_local_reads_total",
            "Gets served from a same-host holder's location table, with no round trip.",
            "counter",
            &self.local_reads,
        );
        c(
            &mut o,
            "kvmesh_inline_reads_total",
            "Gets whose bytes followed the holder's reply (one round trip; links without shm).",
            "counter",
            &self.inline_reads,
        );
        c(
            &mut o,
            "kvmesh_checksum_failures_total",
            "Reads whose bytes did not match the checksum.",
            "counter",
            &self.checksum_failures,
        );
        c(
            &mut o,
            "kvmesh_evictions_total",
            "Objects evicted from DRAM here.",
            "counter",
            &self.evictions,
        );
        c(
            &mut o,
            "kvmesh_spills_total",
            "Objects spilled to the SSD tier.",
            "counter",
            &self.spills,
        );
        c(
            &mut o,
            "kvmesh_promotions_total",
            "Objects promoted from SSD to DRAM.",
            "counter",
            &self.promotions,
        );
        c(
            &mut o,
            "kvmesh_repairs_total",
            "Replicas re-created by this peer.",
            "counter",
            &self.repairs,
        );
        c(
            &mut o,
            "kvmesh_repair_failures_total",
            "Repairs that failed.",
            "counter",
            &self.repair_failures,
        );
        c(
            &mut o,
            "kvmesh_integrity_failures_total",
            "Stored copies found damaged here (SSD files failing their checks).",
            "counter",
            &self.integrity_failures,
        );
        c(
            &mut o,
            "kvmesh_announces_sent_total",
            "Membership announces published by this peer.",
            "counter",
            &self.announces_sent,
        );
        c(
            &mut o,
            "kvmesh_announces_received_total",
            "Membership announces and goodbyes received by this peer.",
            "counter",
            &self.announces_received,
        );
        c(
            &mut o,
            "kvmesh_rpc_served_total",
            "Store RPCs answered.",
            "counter",
            &self.rpc_served,
        );
        c(
            &mut o,
            "kvmesh_peers_alive",
            "Live members known.",
            "gauge",
            &self.peers_alive,
        );
        c(
            &mut o,
            "kvmesh_objects",
            "Objects held here.",
            "gauge",
            &self.objects,
        );
        c(
            &mut o,
            "kvmesh_bytes_stored",
            "Bytes of objects held in DRAM here.",
            "gauge",
            &self.bytes_stored,
        );
        self.put_latency.render(
            &mut o,
            "kvmesh_put_seconds",
            "Put latency as seen by this client.",
        );
        self.get_latency.render(
            &mut o,
            "kvmesh_get_seconds",
            "Get latency as seen by this client.",
        );
        o
    }
}

/// Scrapes served at once; more connections are closed unanswered.
const MAX_METRICS_CONNS: usize = 16;

/// Serves `GET /metrics` until the listener fails. Requests are read with a
/// size and time bound; anything else gets 404.
pub async fn serve(listener: tokio::net::TcpListener, metrics: std::sync::Arc<Metrics>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Connection tasks live in the set: aborting `serve` ends them too.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        while conns.try_join_next().is_some() {}
        if conns.len() >= MAX_METRICS_CONNS {
            continue;
        }
        let m = metrics.clone();
        conns.spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    let k = s.read(&mut buf[n..]).await?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let resp = if req.starts_with("GET /metrics") {
                let body = m.render();
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.gets.fetch_add(3, Relaxed);
        m.get_latency.observe(Duration::from_micros(40));
        m.get_latency.observe(Duration::from_millis(3));
        let t = m.render();
        assert!(t.contains("kvmesh_gets_total 3"));
        assert!(t.contains("kvmesh_get_seconds_bucket{le=\"0.00005\"} 1"));
        assert!(t.contains("kvmesh_get_seconds_bucket{le=\"0.005\"} 2"));
        assert!(t.contains("kvmesh_get_seconds_count 2"));
    }
}
