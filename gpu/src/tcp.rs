//! The `tcp` transport: works between any two hosts.
//!
//! Server: one task per accepted connection serves requests in order,
//! receiving write payloads straight into the registered region and sending
//! read payloads straight from it (`writev` of header + bytes).
//!
//! Client: a peer has several lanes (connections). A lane is a writer task
//! fed by a bounded queue of `(batch, slices)` jobs plus a reader task; both
//! share an in-flight FIFO, which matches responses because the server
//! answers in request order.
//!
//! GPU regions, on either side, are staged through a pinned bounce buffer
//! per connection (per lane writer and reader on the client): device bytes
//! are copied into it with `cuMemcpy` before sending, and received bytes are
//! copied from it to the device. Host regions keep the zero-copy paths.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use zerocopy::{FromBytes, IntoBytes};

use crate::batch::{BatchState, OpKind, BUSY, PENDING, SENT};
use crate::cuda::Bounce;
use crate::engine::{Notification, Shared};
use crate::error::ErrorKind;
use crate::handshake;
use crate::rawio::{
    discard, read_exact, read_exact_raw, read_exact_raw_spin, write_all, write_all_raw,
    write_spliced, SplicePipe, SPLICE_MIN,
};
use crate::wire::{self, ReqHeader, RespHeader, CHANNEL_TCP};
use crate::PeerDesc;

/// A write is answered at least every this many slices ...
const ACK_EVERY_SLICES: usize = 16;
/// ... or bytes (keeps in-flight permits flowing back).
const ACK_EVERY_BYTES: u64 = 16 << 20;

/// Largest single request payload a server accepts (a slice).
pub const MAX_SLICE_BYTES: u64 = 64 << 20;

// ---------------------------------------------------------------- server ---

pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.server_conns.fetch_add(1, SeqCst) >= shared.cfg.max_server_conns {
            shared.server_conns.fetch_sub(1, SeqCst);
            tracing::warn!(%addr, "refusing connection: {} connections open", shared.cfg.max_server_conns);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let shared2 = shared.clone();
        tokio::spawn(async move {
            if let Err(reason) = serve_conn(&stream, &shared2).await {
                tracing::info!(%addr, "closing data connection: {reason}");
            }
            shared2.server_conns.fetch_sub(1, SeqCst);
        });
    }
}

async fn serve_conn(s: &TcpStream, shared: &Arc<Shared>) -> Result<(), String> {
    let peer = tokio::time::timeout(
        shared.cfg.handshake_timeout,
        handshake::server(s, CHANNEL_TCP, &shared.desc),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())??;
    // Memfd-backed regions are sent without a copy (see `SplicePipe`);
    // caller-registered memory too, since its pages are referenced, not moved.
    let pipe = if shared.cfg.tcp_splice {
        SplicePipe::new().ok()
    } else {
        None
    };
    let mut bounce = Bounce::default();
    let mut hb = [0u8; std::mem::size_of::<ReqHeader>()];
    // A client that sent an RPC within `reply_spin` of our last answer (a
    // caller doing one operation after another on a direct connection) gets
    // its next request read by a short poll instead of a wake-up. Only after
    // calls: a lane's stream of reads and writes keeps this thread busy
    // anyway, and polling there would hold the thread from the other
    // connections it serves.
    let spin = shared.cfg.reply_spin;
    let mut poll_next = false;
    loop {
        let waited = std::time::Instant::now();
        let got = if poll_next {
            // SAFETY: `hb` is ours for the call.
            unsafe { read_exact_raw_spin(s, hb.as_mut_ptr() as usize, hb.len(), spin) }.await
        } else {
            read_exact(s, &mut hb).await
        };
        let quick = waited.elapsed() < spin;
        match got {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("read: {e}")),
        }
        let h = ReqHeader::read_from_bytes(&hb).map_err(|_| "short header")?;
        if h.magic.get() != wire::MAGIC {
            return Err(format!("bad request magic {:#x}", h.magic.get()));
        }
        let (id, region, offset, len) = (h.id.get(), h.region.get(), h.offset.get(), h.len.get());
        poll_next = quick && (h.op == wire::OP_CALL || h.op == wire::OP_CALL_BULK);
        match h.op {
            wire::OP_WRITE => {
                if len > MAX_SLICE_BYTES {
                    return Err(format!(
                        "write of {len} bytes exceeds the {MAX_SLICE_BYTES}-byte slice limit"
                    ));
                }
                match shared.checked_region(region, offset, len) {
                    Ok(r) if r.gpu_device().is_some() => {
                        let dev = r.gpu_device().cloned().expect("checked above");
                        let area = bounce.receive_area(&dev, len).map(|a| a as usize);
                        let area = match area {
                            Ok(a) => a,
                            Err(e) => {
                                tracing::warn!(region, "refused GPU write: {e}");
                                discard(s, len)
                                    .await
                                    .map_err(|e| format!("discarding refused write: {e}"))?;
                                respond(s, wire::OP_WRITE, ErrorKind::Io.code(), id, 0).await?;
                                continue;
                            }
                        };
                        // SAFETY: the receive area holds `len` bytes and is ours.
                        unsafe { read_exact_raw(s, area, len as usize) }
                            .await
                            .map_err(|e| format!("write payload: {e}"))?;
                        // SAFETY: bounds checked; `r` keeps the device memory
                        // registered while the copy runs.
                        let landed =
                            unsafe { bounce.drain_to_device(&dev, r.ptr() as u64 + offset, len) };
                        drop(r);
                        match landed {
                            Ok(()) if h.flags & wire::FLAG_ACK == 0 => {}
                            Ok(()) => respond(s, wire::OP_WRITE, 0, id, 0).await?,
                            Err(e) => {
                                tracing::warn!(region, "GPU write: {e}");
                                respond(s, wire::OP_WRITE, ErrorKind::Io.code(), id, 0).await?;
                            }
                        }
                    }
                    Ok(r) => {
                        // SAFETY: bounds checked; `r` keeps the memory alive and
                        // counts as in flight until the payload has landed.
                        unsafe {
                            read_exact_raw(s, r.ptr() as usize + offset as usize, len as usize)
                        }
                        .await
                        .map_err(|e| format!("write payload: {e}"))?;
                        drop(r);
                        if h.flags & wire::FLAG_ACK != 0 {
                            respond(s, wire::OP_WRITE, 0, id, 0).await?;
                        }
                    }
                    Err(k) => {
                        tracing::warn!(region, offset, len, "refused write: {k}");
                        discard(s, len)
                            .await
                            .map_err(|e| format!("discarding refused write: {e}"))?;
                        respond(s, wire::OP_WRITE, k.code(), id, 0).await?;
                    }
                }
            }
            wire::OP_READ => {
                if len > MAX_SLICE_BYTES {
                    return Err(format!(
                        "read of {len} bytes exceeds the {MAX_SLICE_BYTES}-byte slice limit"
                    ));
                }
                match shared.checked_region(region, offset, len) {
                    Ok(r) if r.gpu_device().is_some() => {
                        let dev = r.gpu_device().cloned().expect("checked above");
                        // SAFETY: bounds checked; `r` keeps the device memory
                        // registered during the copy.
                        let staged =
                            unsafe { bounce.fill_from_device(&dev, r.ptr() as u64 + offset, len) };
                        drop(r);
                        let staged = staged.map(|p| p as usize);
                        match staged {
                            Ok(p) => {
                                let rh = RespHeader::new(wire::OP_READ, 0, id, len);
                                let parts = [
                                    (rh.as_bytes().as_ptr() as usize, rh.as_bytes().len()),
                                    (p, len as usize),
                                ];
                                // SAFETY: header on this frame; the bounce holds
                                // `len` staged bytes and is not touched until sent.
                                unsafe { write_all_raw(s, &parts) }
                                    .await
                                    .map_err(|e| format!("read reply: {e}"))?;
                            }
                            Err(e) => {
                                tracing::warn!(region, "GPU read: {e}");
                                respond(s, wire::OP_READ, ErrorKind::Io.code(), id, 0).await?;
                            }
                        }
                    }
                    Ok(r) => {
                        let rh = RespHeader::new(wire::OP_READ, 0, id, len);
                        let payload = r.ptr() as usize + offset as usize;
                        // SAFETY: payload bounds checked and kept registered
                        // by `r`.
                        unsafe { send_memory(s, pipe.as_ref(), rh.as_bytes(), payload, len) }
                            .await
                            .map_err(|e| format!("read reply: {e}"))?;
                    }
                    Err(k) => {
                        tracing::warn!(region, offset, len, "refused read: {k}");
                        respond(s, wire::OP_READ, k.code(), id, 0).await?;
                    }
                }
            }
            wire::OP_NOTIFY => {
                if len > wire::MAX_NOTIFY_BYTES {
                    return Err(format!(
                        "notification of {len} bytes exceeds {}",
                        wire::MAX_NOTIFY_BYTES
                    ));
                }
                let mut data = vec![0u8; len as usize];
                read_exact(s, &mut data)
                    .await
                    .map_err(|e| format!("notify payload: {e}"))?;
                shared.deliver(Notification { from: peer, data }).await;
                respond(s, wire::OP_NOTIFY, 0, id, 0).await?;
            }
            wire::OP_CALL | wire::OP_CALL_BULK => {
                if len > wire::MAX_CALL_BYTES {
                    return Err(format!(
                        "call of {len} bytes exceeds {}",
                        wire::MAX_CALL_BYTES
                    ));
                }
                let mut data = vec![0u8; len as usize];
                read_exact(s, &mut data)
                    .await
                    .map_err(|e| format!("call payload: {e}"))?;
                let (status, reply) = shared.answer_call(peer, &data);
                send_answer(s, shared, pipe.as_ref(), h.op, id, status, reply).await?;
            }
            wire::OP_CONTROL => {
                if len > wire::MAX_CALL_BYTES {
                    return Err(format!(
                        "control message of {len} bytes exceeds {}",
                        wire::MAX_CALL_BYTES
                    ));
                }
                let mut data = vec![0u8; len as usize];
                read_exact(s, &mut data)
                    .await
                    .map_err(|e| format!("control payload: {e}"))?;
                let (status, reply) = shared.answer_control(peer, &data).await;
                let rh = RespHeader::new(wire::OP_CONTROL, status, id, reply.len() as u64);
                let parts = [
                    (rh.as_bytes().as_ptr() as usize, 24usize),
                    (reply.as_ptr() as usize, reply.len()),
                ];
                // SAFETY: both buffers live on this frame for the call.
                unsafe { write_all_raw(s, &parts) }
                    .await
                    .map_err(|e| format!("control reply: {e}"))?;
            }
            wire::OP_PING => respond(s, wire::OP_PING, 0, id, 0).await?,
            op => return Err(format!("unknown opcode {op}")),
        }
    }
}

/// Sends `prefix`, then `len` bytes of registered host memory at `at`:
/// through `pipe` by page reference when there is one and the bytes are
/// worth it, else from the memory.
///
/// # Safety
/// `at..at+len` must be registered host memory that stays mapped for the
/// call; spliced pages may be read after it returns, until the peer
/// consumed them.
async unsafe fn send_memory(
    s: &TcpStream,
    pipe: Option<&SplicePipe>,
    prefix: &[u8],
    at: usize,
    len: u64,
) -> std::io::Result<()> {
    match pipe {
        // SAFETY: the caller's contract.
        Some(p) if len as usize >= SPLICE_MIN => unsafe {
            write_spliced(s, p, prefix, at, len as usize).await
        },
        _ => {
            let parts = [(prefix.as_ptr() as usize, prefix.len()), (at, len as usize)];
            // SAFETY: `prefix` lives for the call; the memory is the caller's.
            unsafe { write_all_raw(s, &parts) }.await
        }
    }
}

/// Sends the handler's answer to RPC `id` (`OP_CALL` or `OP_CALL_BULK`):
/// the bulk bytes of an `OP_CALL_BULK` answer straight from their region
/// (see [`send_memory`]), every other answer from one buffer.
async fn send_answer(
    s: &TcpStream,
    shared: &Shared,
    pipe: Option<&SplicePipe>,
    op: u8,
    id: u64,
    status: u8,
    reply: crate::engine::Reply,
) -> Result<(), String> {
    use crate::engine::Reply;
    let (head, bulk) = match (op, reply) {
        (
            wire::OP_CALL_BULK,
            Reply::Bulk {
                head,
                region,
                offset,
                len,
            },
        ) => {
            let src = shared.bulk_source(&head, region, offset, len);
            (head, src.map(|src| (src, len)).ok())
        }
        (wire::OP_CALL_BULK, Reply::Bytes(head)) if head.len() as u64 <= wire::MAX_CALL_BYTES => {
            (head, None)
        }
        (op, reply) => {
            let (status, v) = shared.answer_payload(op, status, reply);
            let rh = RespHeader::new(op, status, id, v.len() as u64);
            let parts = [
                (rh.as_bytes().as_ptr() as usize, rh.as_bytes().len()),
                (v.as_ptr() as usize, v.len()),
            ];
            // SAFETY: both buffers live on this frame for the call.
            return unsafe { write_all_raw(s, &parts) }
                .await
                .map_err(|e| format!("call reply: {e}"));
        }
    };
    let blen = bulk.as_ref().map_or(0, |b| b.1);
    let rh = RespHeader::new(op, status, id, 4 + head.len() as u64 + blen);
    let mut prefix = Vec::with_capacity(rh.as_bytes().len() + 4 + head.len());
    prefix.extend_from_slice(rh.as_bytes());
    prefix.extend_from_slice(&(head.len() as u32).to_le_bytes());
    prefix.extend_from_slice(&head);
    // Bulk bytes of more than one piece are copied into the socket here
    // rather than spliced: this core then reads the (usually cold) source
    // while the caller's core copies out of the socket and checksums, the
    // two overlapped. Spliced pages leave the cold read and the copy both
    // to the caller (2 MiB gets over loopback measured about 20% slower).
    // One piece cannot overlap, and splicing saves it a copy.
    let pipe = pipe.filter(|_| blen <= crate::tcp_direct::PIECE_BYTES as u64);
    let sent = match bulk {
        // SAFETY: checked against the region, which `_held` keeps
        // registered; the handler keeps the bytes in place.
        Some(((_held, at), len)) => unsafe { send_memory(s, pipe, &prefix, at, len) }.await,
        None => write_all(s, &prefix).await,
    };
    sent.map_err(|e| format!("call reply: {e}"))
}

async fn respond(s: &TcpStream, op: u8, status: u8, id: u64, len: u64) -> Result<(), String> {
    write_all(s, RespHeader::new(op, status, id, len).as_bytes())
        .await
        .map_err(|e| format!("respond: {e}"))
}

// ---------------------------------------------------------------- client ---

/// Work for a lane.
pub(crate) enum LaneJob {
    /// Send these slices (indices into the batch) in order.
    Slices {
        batch: Arc<BatchState>,
        slices: Vec<u32>,
    },
    /// Deliver a notification; answer on `done` once acknowledged.
    Notify {
        data: Vec<u8>,
        done: oneshot::Sender<Result<(), ErrorKind>>,
    },
    /// An RPC (`OP_CALL` or `OP_CALL_BULK`); answer on `done` with the
    /// peer's reply.
    Call {
        op: u8,
        data: Vec<u8>,
        done: oneshot::Sender<Result<Vec<u8>, ErrorKind>>,
    },
    /// An engine control message (`OP_CONTROL`); answered like `Call`.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    Control {
        data: Vec<u8>,
        done: oneshot::Sender<Result<Vec<u8>, ErrorKind>>,
    },
}

enum InFlight {
    Slice {
        batch: Arc<BatchState>,
        slice: u32,
        id: u64,
        /// The server answers this slice even on success.
        answered: bool,
    },
    Ping {
        id: u64,
    },
    Notify {
        id: u64,
        done: oneshot::Sender<Result<(), ErrorKind>>,
    },
    Call {
        id: u64,
        /// `OP_CALL`, `OP_CALL_BULK` or `OP_CONTROL`: the answer must
        /// carry the same.
        op: u8,
        done: oneshot::Sender<Result<Vec<u8>, ErrorKind>>,
    },
}

struct FlightQueue {
    dead: bool,
    q: VecDeque<InFlight>,
}

/// One TCP connection to a peer.
pub(crate) struct Lane {
    tx: mpsc::Sender<LaneJob>,
    dead: AtomicBool,
    stream: Mutex<Option<Arc<TcpStream>>>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("dead", &self.dead.load(SeqCst))
            .finish()
    }
}

impl Lane {
    /// Starts a lane to `peer`; the connection is made in the background and
    /// queued jobs fail with `ConnectionLost` if it cannot be.
    pub(crate) fn start(shared: &Arc<Shared>, peer: &PeerDesc) -> Arc<Lane> {
        let (tx, rx) = mpsc::channel(shared.cfg.lane_queue);
        let lane = Arc::new(Lane {
            tx,
            dead: AtomicBool::new(false),
            stream: Mutex::new(None),
        });
        let (l, sh, p) = (lane.clone(), shared.clone(), peer.clone());
        shared
            .rt_handle()
            .spawn(async move { l.run(sh, p, rx).await });
        lane
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(SeqCst)
    }

    /// Queues a job without blocking; `Busy` if the lane queue is full.
    pub(crate) fn try_send(&self, job: LaneJob) -> Result<(), (ErrorKind, LaneJob)> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(j) => (ErrorKind::Busy, j),
            mpsc::error::TrySendError::Closed(j) => (ErrorKind::ConnectionLost, j),
        })
    }

    /// Tears the connection down; everything in flight on it fails.
    pub(crate) fn shutdown(&self) {
        self.dead.store(true, SeqCst);
        if let Some(s) = self.stream.lock().as_ref() {
            let fd = std::os::fd::AsRawFd::as_raw_fd(s.as_ref());
            // SAFETY: shutdown on a descriptor owned by a live TcpStream.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    async fn run(
        self: Arc<Self>,
        shared: Arc<Shared>,
        peer: PeerDesc,
        mut rx: mpsc::Receiver<LaneJob>,
    ) {
        let stream = match connect(&shared, &peer).await {
            Ok(s) => Arc::new(s),
            Err(k) => {
                tracing::warn!(peer = %peer.short_id(), "data connection failed: {k}");
                self.dead.store(true, SeqCst);
                rx.close();
                while let Some(job) = rx.recv().await {
                    fail_job(job, k);
                }
                return;
            }
        };
        *self.stream.lock() = Some(stream.clone());
        let flight = Arc::new(Mutex::new(FlightQueue {
            dead: false,
            q: VecDeque::new(),
        }));
        let permits = Arc::new(Semaphore::new(shared.cfg.lane_inflight));
        let reader = {
            let (s, f, p, l) = (
                stream.clone(),
                flight.clone(),
                permits.clone(),
                self.clone(),
            );
            tokio::spawn(async move {
                let err = read_loop(&s, &f, &p).await;
                l.shutdown();
                let drained: Vec<InFlight> = {
                    let mut g = f.lock();
                    g.dead = true;
                    g.q.drain(..).collect()
                };
                for x in drained {
                    fail_inflight(x, err);
                }
                p.close();
            })
        };
        let mut next_id = 1u64;
        let mut failed: Option<ErrorKind> = None;
        let mut bounce = Bounce::default();
        let pipe = if shared.cfg.tcp_splice {
            SplicePipe::new().ok()
        } else {
            None
        };
        while let Some(job) = rx.recv().await {
            if let Some(k) = failed {
                fail_job(job, k);
                continue;
            }
            if let Err(k) = self
                .send_job(
                    &stream,
                    &flight,
                    &permits,
                    job,
                    &mut next_id,
                    pipe.as_ref(),
                    &mut bounce,
                )
                .await
            {
                failed = Some(k);
                self.shutdown();
                rx.close();
            }
        }
        let _ = reader.await;
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_job(
        &self,
        s: &TcpStream,
        flight: &Mutex<FlightQueue>,
        permits: &Semaphore,
        job: LaneJob,
        next_id: &mut u64,
        pipe: Option<&SplicePipe>,
        bounce: &mut Bounce,
    ) -> Result<(), ErrorKind> {
        match job {
            LaneJob::Slices { batch, slices } => {
                // Writes are answered in groups (FLAG_ACK on the last of a
                // group): fewer tiny packets and wake-ups per byte.
                let (mut unacked, mut unacked_bytes) = (0usize, 0u64);
                for (pos, &i) in slices.iter().enumerate() {
                    let i = i as usize;
                    let kind = batch.kind_of(i);
                    let (from, to) = match kind {
                        OpKind::Write => (PENDING, BUSY),
                        OpKind::Read => (PENDING, SENT),
                    };
                    if !batch.advance(i, from, to) {
                        continue; // aborted before it left
                    }
                    match permits.acquire().await {
                        Ok(p) => p.forget(),
                        Err(_) => {
                            batch.fail(i, ErrorKind::ConnectionLost);
                            fail_rest(&batch, &slices[pos + 1..], ErrorKind::ConnectionLost);
                            return Err(ErrorKind::ConnectionLost);
                        }
                    }
                    let id = *next_id;
                    *next_id += 1;
                    if flight.lock().dead {
                        batch.fail(i, ErrorKind::ConnectionLost);
                        fail_rest(&batch, &slices[pos + 1..], ErrorKind::ConnectionLost);
                        return Err(ErrorKind::ConnectionLost);
                    }
                    let sl = batch.slices[i];
                    // Device bytes are staged before the slice is in flight.
                    let mut payload = batch.local_ptr(i) as usize;
                    let staged = kind == OpKind::Write && batch.local_device(i).is_some();
                    if staged {
                        let dev = batch.local_device(i).expect("checked above");
                        // SAFETY: the local range was checked at submit and
                        // the batch holds the region in use; BUSY means no one
                        // else touches these bytes for this batch.
                        match unsafe { bounce.fill_from_device(dev, payload as u64, sl.len) } {
                            Ok(p) => payload = p as usize,
                            Err(e) => {
                                tracing::warn!("staging GPU bytes: {e}");
                                batch.fail(i, ErrorKind::Io);
                                permits.add_permits(1);
                                continue;
                            }
                        }
                    }
                    let answered = match kind {
                        OpKind::Read => true,
                        OpKind::Write => {
                            unacked += 1;
                            unacked_bytes += sl.len;
                            let last = pos + 1 == slices.len();
                            let ack = last
                                || unacked >= ACK_EVERY_SLICES
                                || unacked_bytes >= ACK_EVERY_BYTES;
                            if ack {
                                (unacked, unacked_bytes) = (0, 0);
                            }
                            ack
                        }
                    };
                    flight.lock().q.push_back(InFlight::Slice {
                        batch: batch.clone(),
                        slice: i as u32,
                        id,
                        answered,
                    });
                    let region = batch.remote_region_of(i);
                    let r = match kind {
                        OpKind::Write => {
                            let mut h = ReqHeader::new(
                                wire::OP_WRITE,
                                id,
                                region,
                                sl.remote_offset,
                                sl.len,
                            );
                            if answered {
                                h.flags = wire::FLAG_ACK;
                            }
                            match pipe {
                                // Spliced pages are read by the kernel after the
                                // call returns: never the reused bounce buffer.
                                Some(p) if !staged && sl.len as usize >= SPLICE_MIN => {
                                    // SAFETY: bounds-checked at submit; the batch holds
                                    // the region in use until the peer acknowledged
                                    // this write, i.e. read the referenced pages.
                                    unsafe {
                                        write_spliced(s, p, h.as_bytes(), payload, sl.len as usize)
                                    }
                                    .await
                                }
                                _ => {
                                    let parts = [
                                        (h.as_bytes().as_ptr() as usize, h.as_bytes().len()),
                                        (payload, sl.len as usize),
                                    ];
                                    // SAFETY: header on this frame; the payload range
                                    // was bounds-checked at submit and the batch holds
                                    // the region in use.
                                    unsafe { write_all_raw(s, &parts) }.await
                                }
                            }
                        }
                        OpKind::Read => {
                            let h =
                                ReqHeader::new(wire::OP_READ, id, region, sl.remote_offset, sl.len);
                            write_all(s, h.as_bytes()).await
                        }
                    };
                    if r.is_err() {
                        // The reader fails everything in the FIFO, this slice included.
                        fail_rest(&batch, &slices[pos + 1..], ErrorKind::ConnectionLost);
                        return Err(ErrorKind::ConnectionLost);
                    }
                }
                if unacked > 0 {
                    // The job's flagged last write was skipped (aborted):
                    // a ping answers for the writes before it.
                    let id = *next_id;
                    *next_id += 1;
                    {
                        let mut g = flight.lock();
                        if g.dead {
                            return Err(ErrorKind::ConnectionLost);
                        }
                        g.q.push_back(InFlight::Ping { id });
                    }
                    let h = ReqHeader::new(wire::OP_PING, id, 0, 0, 0);
                    write_all(s, h.as_bytes())
                        .await
                        .map_err(|_| ErrorKind::ConnectionLost)?;
                }
                Ok(())
            }
            LaneJob::Notify { .. } | LaneJob::Call { .. } | LaneJob::Control { .. } => {
                let id = *next_id;
                *next_id += 1;
                let (op, data, entry) = match job {
                    LaneJob::Notify { data, done } => {
                        (wire::OP_NOTIFY, data, InFlight::Notify { id, done })
                    }
                    LaneJob::Call { op, data, done } => (op, data, InFlight::Call { id, op, done }),
                    LaneJob::Control { data, done } => {
                        let op = wire::OP_CONTROL;
                        (op, data, InFlight::Call { id, op, done })
                    }
                    LaneJob::Slices { .. } => unreachable!("matched above"),
                };
                {
                    let mut g = flight.lock();
                    if g.dead {
                        fail_inflight(entry, ErrorKind::ConnectionLost);
                        return Err(ErrorKind::ConnectionLost);
                    }
                    g.q.push_back(entry);
                }
                let h = ReqHeader::new(op, id, 0, 0, data.len() as u64);
                let parts = [
                    (h.as_bytes().as_ptr() as usize, 40usize),
                    (data.as_ptr() as usize, data.len()),
                ];
                // SAFETY: both buffers live on this frame for the call.
                unsafe { write_all_raw(s, &parts) }
                    .await
                    .map_err(|_| ErrorKind::ConnectionLost)
            }
        }
    }
}

fn fail_rest(batch: &Arc<BatchState>, rest: &[u32], k: ErrorKind) {
    for &j in rest {
        batch.fail(j as usize, k);
    }
}

fn fail_job(job: LaneJob, k: ErrorKind) {
    match job {
        LaneJob::Slices { batch, slices } => fail_rest(&batch, &slices, k),
        LaneJob::Notify { done, .. } => {
            let _ = done.send(Err(k));
        }
        LaneJob::Call { done, .. } | LaneJob::Control { done, .. } => {
            let _ = done.send(Err(k));
        }
    }
}

fn fail_inflight(x: InFlight, k: ErrorKind) {
    match x {
        InFlight::Slice { batch, slice, .. } => batch.fail(slice as usize, k),
        InFlight::Notify { done, .. } => {
            let _ = done.send(Err(k));
        }
        InFlight::Call { done, .. } => {
            let _ = done.send(Err(k));
        }
        InFlight::Ping { .. } => {}
    }
}

/// Reads responses until the connection fails; returns the error kind that
/// in-flight work fails with.
async fn read_loop(s: &TcpStream, flight: &Mutex<FlightQueue>, permits: &Semaphore) -> ErrorKind {
    let mut bounce = Bounce::default();
    let mut hb = [0u8; std::mem::size_of::<RespHeader>()];
    loop {
        if read_exact(s, &mut hb).await.is_err() {
            return ErrorKind::ConnectionLost;
        }
        let Ok(h) = RespHeader::read_from_bytes(&hb) else {
            return ErrorKind::Protocol;
        };
        if h.magic.get() != wire::MAGIC {
            tracing::warn!("bad response magic; closing lane");
            return ErrorKind::Protocol;
        }
        // Unanswered successful writes before this answer are done.
        let entry = loop {
            let Some(entry) = flight.lock().q.pop_front() else {
                tracing::warn!("response with nothing in flight; closing lane");
                return ErrorKind::Protocol;
            };
            match entry {
                InFlight::Slice {
                    batch,
                    slice,
                    id,
                    answered: false,
                } if id != h.id.get() => {
                    batch.complete(slice as usize, BUSY);
                    permits.add_permits(1);
                }
                other => break other,
            }
        };
        let status = ErrorKind::from_code(h.status);
        if h.status != 0 && status.is_none() {
            tracing::warn!(status = h.status, "unknown status code; closing lane");
            fail_inflight(entry, ErrorKind::Protocol);
            return ErrorKind::Protocol;
        }
        match entry {
            InFlight::Ping { id } => {
                if h.id.get() != id || h.op != wire::OP_PING {
                    return ErrorKind::Protocol;
                }
            }
            InFlight::Notify { id, done } => {
                if h.id.get() != id || h.op != wire::OP_NOTIFY {
                    let _ = done.send(Err(ErrorKind::Protocol));
                    return ErrorKind::Protocol;
                }
                let _ = done.send(status.map_or(Ok(()), Err));
            }
            InFlight::Call { id, op, done } => {
                let len = h.len.get();
                let most = if op == wire::OP_CALL_BULK {
                    wire::MAX_BULK_ANSWER
                } else {
                    wire::MAX_CALL_BYTES
                };
                if h.id.get() != id || h.op != op || len > most {
                    let _ = done.send(Err(ErrorKind::Protocol));
                    return ErrorKind::Protocol;
                }
                let mut data = vec![0u8; len as usize];
                if read_exact(s, &mut data).await.is_err() {
                    let _ = done.send(Err(ErrorKind::ConnectionLost));
                    return ErrorKind::ConnectionLost;
                }
                let _ = done.send(status.map_or(Ok(data), Err));
            }
            InFlight::Slice {
                batch, slice, id, ..
            } => {
                let i = slice as usize;
                let sl = batch.slices[i];
                let kind = batch.kind_of(i);
                let want_op = if kind == OpKind::Write {
                    wire::OP_WRITE
                } else {
                    wire::OP_READ
                };
                if h.id.get() != id || h.op != want_op {
                    tracing::warn!("response out of order; closing lane");
                    batch.fail(i, ErrorKind::Protocol);
                    return ErrorKind::Protocol;
                }
                match (kind, status) {
                    (OpKind::Write, None) => {
                        batch.complete(i, BUSY);
                    }
                    (OpKind::Write, Some(k)) => {
                        batch.terminate(i, BUSY, crate::batch::FAILED, Some(k));
                    }
                    (OpKind::Read, Some(k)) => {
                        batch.terminate(i, SENT, crate::batch::FAILED, Some(k));
                    }
                    (OpKind::Read, None) => {
                        if h.len.get() != sl.len {
                            batch.fail(i, ErrorKind::Protocol);
                            return ErrorKind::Protocol;
                        }
                        if batch.advance(i, SENT, BUSY) {
                            let dev = batch.local_device(i).cloned();
                            let into = match &dev {
                                None => Ok(batch.local_ptr(i) as usize),
                                Some(d) => bounce.receive_area(d, sl.len).map(|p| p as usize),
                            };
                            let into = match into {
                                Ok(p) => p,
                                Err(e) => {
                                    tracing::warn!("staging area for GPU read: {e}");
                                    batch.fail(i, ErrorKind::Io);
                                    if discard(s, sl.len).await.is_err() {
                                        return ErrorKind::ConnectionLost;
                                    }
                                    permits.add_permits(1);
                                    continue;
                                }
                            };
                            // SAFETY: either the local range (bounds-checked at submit,
                            // held in use by the batch; BUSY means no one else touches
                            // it and the batch cannot complete) or our bounce buffer
                            // of at least `len` bytes.
                            let r = unsafe { read_exact_raw(s, into, sl.len as usize) }.await;
                            if r.is_err() {
                                batch.fail(i, ErrorKind::ConnectionLost);
                                return ErrorKind::ConnectionLost;
                            }
                            let landed = match &dev {
                                None => Ok(()),
                                // SAFETY: the local device range was checked at
                                // submit and is held in use (BUSY).
                                Some(d) => unsafe {
                                    bounce.drain_to_device(d, batch.local_ptr(i) as u64, sl.len)
                                },
                            };
                            match landed {
                                Ok(()) => {
                                    batch.complete(i, BUSY);
                                }
                                Err(e) => {
                                    tracing::warn!("GPU read landing: {e}");
                                    batch.fail(i, ErrorKind::Io);
                                }
                            }
                        } else if discard(s, sl.len).await.is_err() {
                            return ErrorKind::ConnectionLost;
                        }
                    }
                }
            }
        }
        permits.add_permits(1);
    }
}

pub(crate) async fn connect(shared: &Shared, peer: &PeerDesc) -> Result<TcpStream, ErrorKind> {
    let mut last = ErrorKind::ConnectionLost;
    for addr in &peer.tcp {
        match tokio::time::timeout(shared.cfg.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                let hs = handshake::client(&s, CHANNEL_TCP, shared.desc.engine_id, peer);
                match tokio::time::timeout(shared.cfg.handshake_timeout, hs).await {
                    Ok(Ok(())) => return Ok(s),
                    Ok(Err(k)) => last = k,
                    Err(_) => last = ErrorKind::Timeout,
                }
            }
            Ok(Err(e)) => tracing::debug!(%addr, "connect: {e}"),
            Err(_) => tracing::debug!(%addr, "connect timed out"),
        }
    }
    Err(last)
}

/// Resolves the addresses to advertise for a listener bound to `bound`.
pub(crate) fn advertise_addrs(bound: SocketAddr) -> Vec<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let mut out = Vec::new();
    let mut lo = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(sa) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) else {
                continue;
            };
            let ip = std::net::IpAddr::V4(sa.ip());
            let sock = SocketAddr::new(ip, bound.port());
            if ip.is_loopback() {
                lo.push(sock);
            } else {
                out.push(sock);
            }
        }
    }
    out.extend(lo);
    if out.is_empty() {
        out.push(SocketAddr::new(
            std::net::Ipv4Addr::LOCALHOST.into(),
            bound.port(),
        ));
    }
    out
}
