//! Group formation from a list of addresses: one process (rank 0, or a
//! launcher such as `moe-bench`) serves; every rank joins with its rank, the
//! group's config fingerprint and its receive descriptor, and gets back every
//! descriptor in rank order.
//!
//! ```text
//! rank -> server  KEP-HELLO 1 <rank> <world> <fingerprint> <payload>
//! server -> rank  KEP-GROUP <world>, then <world> lines <payload>    (all joined)
//!                 KEP-ERROR <reason>                                 (mismatch)
//! ```
//!
//! The payload is the rank's receive descriptor in hex ([`join`]), or any
//! token of a group that needs no engine ([`join_payload`]); the server does
//! not interpret it.
//!
//! Plain std TCP, one line per message, lines bounded in size, every read and
//! the whole formation bounded in time. The connection stays open afterwards
//! as a line channel ([`LineConn`]) the caller may use (moe-bench sends its
//! reports over it). Descriptors carry the engine's data-plane secret: serve
//! only on networks the group trusts.
//!
//! Forming a group through the p2p-store swarm is not available yet.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use kvmesh_gpu::RegionDesc;

use crate::error::{Error, Result};

/// Longest line accepted (descriptors are a few hundred bytes).
pub const MAX_LINE: usize = 1 << 20;
const PROTO: &str = "1";

fn err(m: impl Into<String>) -> Error {
    Error::Rendezvous(m.into())
}

/// A connection that carries newline-terminated text messages.
#[derive(Debug)]
pub struct LineConn {
    r: BufReader<TcpStream>,
}

impl LineConn {
    fn new(s: TcpStream) -> LineConn {
        let _ = s.set_nodelay(true);
        LineConn {
            r: BufReader::new(s),
        }
    }

    /// Sends one line (must not contain a newline).
    pub fn send(&mut self, line: &str) -> Result<()> {
        if line.contains('\n') || line.len() > MAX_LINE {
            return Err(err("line contains a newline or is too long"));
        }
        let s = self.r.get_mut();
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| err(format!("socket: {e}")))?;
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| err(format!("send: {e}")))
    }

    /// Receives one line within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut buf = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(err(format!("no message within {timeout:?}")));
            }
            self.r
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|e| err(format!("socket: {e}")))?;
            let avail = match self.r.fill_buf() {
                Ok([]) => return Err(err("connection closed")),
                Ok(b) => b,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(err(format!("receive: {e}"))),
            };
            if let Some(i) = avail.iter().position(|&b| b == b'\n') {
                buf.extend_from_slice(&avail[..i]);
                self.r.consume(i + 1);
                break;
            }
            let n = avail.len();
            buf.extend_from_slice(avail);
            self.r.consume(n);
            if buf.len() > MAX_LINE {
                return Err(err("line too long"));
            }
        }
        String::from_utf8(buf).map_err(|_| err("line is not UTF-8"))
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.r.get_ref().peer_addr().ok()
    }
}

/// A joined rank, as the server sees it.
#[derive(Debug)]
pub struct Member {
    pub rank: usize,
    pub conn: LineConn,
}

/// The serving side of a rendezvous.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    world: usize,
}

impl Server {
    /// Listens on `addr` for a group of `world` ranks.
    pub fn bind(addr: impl ToSocketAddrs, world: usize) -> Result<Server> {
        if world == 0 {
            return Err(err("world size 0"));
        }
        let listener = TcpListener::bind(addr).map_err(|e| err(format!("bind: {e}")))?;
        Ok(Server { listener, world })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| err(format!("local address: {e}")))
    }

    /// Waits until every rank joined (or `timeout`), checks they agree on
    /// the world size and the config fingerprint, and sends each the full
    /// descriptor list. Returns the members in rank order.
    pub fn run(&self, timeout: Duration) -> Result<Vec<Member>> {
        let deadline = Instant::now() + timeout;
        self.listener
            .set_nonblocking(true)
            .map_err(|e| err(format!("listener: {e}")))?;
        let mut joined: Vec<Option<(Member, String, String)>> =
            (0..self.world).map(|_| None).collect();
        let mut count = 0;
        while count < self.world {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let missing: Vec<usize> =
                    (0..self.world).filter(|&r| joined[r].is_none()).collect();
                return Err(err(format!(
                    "ranks {missing:?} did not join within {timeout:?}"
                )));
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(err(format!("accept: {e}"))),
            };
            stream
                .set_nonblocking(false)
                .map_err(|e| err(format!("socket: {e}")))?;
            let mut conn = LineConn::new(stream);
            let line = match conn.recv(left.min(Duration::from_secs(10))) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("rendezvous: dropping a connection: {e}");
                    continue;
                }
            };
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() != 6 || f[0] != "KEP-HELLO" || f[1] != PROTO {
                tracing::warn!("rendezvous: dropping a connection with a bad hello");
                continue;
            }
            let (Ok(rank), Ok(world)) = (f[2].parse::<usize>(), f[3].parse::<usize>()) else {
                tracing::warn!("rendezvous: dropping a hello with bad numbers");
                continue;
            };
            if world != self.world || rank >= world {
                let _ = conn.send(&format!(
                    "KEP-ERROR rank {rank} of {world} does not fit a group of {}",
                    self.world
                ));
                continue;
            }
            if joined[rank].is_some() {
                let _ = conn.send(&format!("KEP-ERROR rank {rank} already joined"));
                continue;
            }
            joined[rank] = Some((Member { rank, conn }, f[4].to_string(), f[5].to_string()));
            count += 1;
        }
        let mut members = Vec::with_capacity(self.world);
        let mut fps = Vec::new();
        let mut descs = Vec::new();
        for (m, fp, d) in joined.into_iter().flatten() {
            members.push(m);
            fps.push(fp);
            descs.push(d);
        }
        if let Some(r) = fps.iter().position(|f| *f != fps[0]) {
            let why = format!("rank {r} has config {:?}, rank 0 has {:?}", fps[r], fps[0]);
            for m in &mut members {
                let _ = m.conn.send(&format!("KEP-ERROR {why}"));
            }
            return Err(err(why));
        }
        for m in &mut members {
            m.conn.send(&format!("KEP-GROUP {}", self.world))?;
            for d in &descs {
                m.conn.send(d)?;
            }
        }
        Ok(members)
    }
}

/// The joining side's result.
#[derive(Debug)]
pub struct Joined {
    /// Every rank's receive descriptor, in rank order.
    pub descs: Vec<RegionDesc>,
    /// The connection to the server, for the caller's own messages.
    pub conn: LineConn,
}

/// Joins the rendezvous at `addr` (retrying the connection until `timeout`,
/// so ranks may start before the server).
pub fn join(
    addr: impl ToSocketAddrs,
    rank: usize,
    world: usize,
    fingerprint: &str,
    desc: &RegionDesc,
    timeout: Duration,
) -> Result<Joined> {
    let hex = desc.to_hex();
    let j = join_payload(addr, rank, world, fingerprint, &hex, timeout)?;
    let descs = j
        .payloads
        .iter()
        .map(|line| RegionDesc::from_hex(line).map_err(|e| err(format!("descriptor: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Joined {
        descs,
        conn: j.conn,
    })
}

/// The joining side's result of [`join_payload`].
#[derive(Debug)]
pub struct JoinedPayloads {
    /// Every rank's payload, in rank order.
    pub payloads: Vec<String>,
    /// The connection to the server, for the caller's own messages.
    pub conn: LineConn,
}

/// Like [`join`] with an opaque payload in place of the receive descriptor
/// (non-empty printable ASCII without spaces, at most [`MAX_LINE`] bytes):
/// groups that need no engine exchange their own tokens this way (moe-bench's
/// NCCL baseline shares rank 0's NCCL unique id).
pub fn join_payload(
    addr: impl ToSocketAddrs,
    rank: usize,
    world: usize,
    fingerprint: &str,
    payload: &str,
    timeout: Duration,
) -> Result<JoinedPayloads> {
    if fingerprint.contains(' ') || fingerprint.contains('\n') {
        return Err(err("fingerprint must not contain spaces"));
    }
    if payload.is_empty()
        || payload.len() > MAX_LINE / 2
        || !payload.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(err(
            "payload must be non-empty printable ASCII without spaces",
        ));
    }
    let deadline = Instant::now() + timeout;
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| err(format!("address: {e}")))?
        .collect();
    let stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(err(format!("could not reach {addrs:?} within {timeout:?}")));
        }
        let mut got = None;
        for a in &addrs {
            if let Ok(s) = TcpStream::connect_timeout(a, left.min(Duration::from_secs(2))) {
                got = Some(s);
                break;
            }
        }
        match got {
            Some(s) => break s,
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut conn = LineConn::new(stream);
    conn.send(&format!(
        "KEP-HELLO {PROTO} {rank} {world} {fingerprint} {payload}"
    ))?;
    let left = deadline.saturating_duration_since(Instant::now());
    let head = conn.recv(left)?;
    if let Some(why) = head.strip_prefix("KEP-ERROR ") {
        return Err(err(why.to_string()));
    }
    if head != format!("KEP-GROUP {world}") {
        return Err(err(format!("unexpected answer {head:?}")));
    }
    let mut payloads = Vec::with_capacity(world);
    for _ in 0..world {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        payloads.push(conn.recv(left)?);
    }
    if payloads.get(rank).map(String::as_str) != Some(payload) {
        return Err(err("the server returned a different payload for this rank"));
    }
    Ok(JoinedPayloads { payloads, conn })
}
