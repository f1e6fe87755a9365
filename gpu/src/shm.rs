//! The `shm` transport: same host, host memory, true one-sided copies.
//!
//! The target's regions live in memfds. An initiator connects to the
//! target's abstract unix socket, authenticates, and asks for a region
//! (`OP_OPEN`); the target answers with the memfd attached (`SCM_RIGHTS`).
//! The initiator maps it and from then on copies in and out with `memcpy`,
//! without the target's CPU. The socket stays open as the control channel:
//! notifications travel on it after the copies (so they arrive after the
//! bytes), the target revokes a mapping before deregistering a region
//! (`OP_REVOKE` → the initiator drains its copies, unmaps, `OP_REVOKE_ACK`),
//! and its EOF tells the initiator the target died.
//!
//! A GPU region on the initiator's side is staged through a pinned bounce
//! buffer of the copying thread (`cuMemcpy` plus `memcpy`); the target's
//! regions are always host memory (GPU targets are reached over `cuda-ipc`).
//!
//! Mappings cover exactly one region, so an initiator cannot reach any
//! other memory of the target whatever offsets it computes; slices are
//! still bounds-checked against the mapping before every copy.

use std::collections::{HashMap, HashSet};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use parking_lot::Mutex;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use zerocopy::{FromBytes, IntoBytes};

use crate::batch::{BatchState, OpKind, BUSY, PENDING};
use crate::desc::PeerDesc;
use crate::engine::{Notification, Shared};
use crate::error::ErrorKind;
use crate::handshake;
use crate::memory::{map_shared, RegionId};
use crate::rawio::{read_exact, write_all, RawStream};
use crate::wire::{self, ReqHeader, RespHeader, CHANNEL_SHM};

/// Binds the abstract unix socket `name` (no filesystem entry; per network
/// namespace, which is why the host id includes the namespace).
pub(crate) fn bind(name: &str) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn connect_std(name: &str) -> std::io::Result<std::os::unix::net::UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Sends `bytes` with an optional descriptor attached.
async fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        let r = s.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(&bytes[sent..])];
            let fds: Vec<RawFd> = if sent == 0 {
                fd.into_iter().collect()
            } else {
                Vec::new()
            };
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let cm: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
            sendmsg::<()>(s.as_raw_fd(), &iov, cm, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                s.ready_for(Interest::WRITABLE).await?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes, collecting any descriptors that come along.
async fn recv_with_fds(
    s: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let r = s.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let msg = recvmsg::<()>(
                s.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut new = Vec::new();
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(v) = c {
                    new.extend(v);
                }
            }
            Ok((msg.bytes, new))
        });
        match r {
            Ok((0, _)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok((n, new)) => {
                for fd in new {
                    // SAFETY: the kernel just installed this descriptor for us.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                got += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                s.ready_for(Interest::READABLE).await?
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- server ---

/// A connected initiator, as the target sees it.
pub(crate) struct ServerConn {
    stream: Arc<UnixStream>,
    write: tokio::sync::Mutex<()>,
    opened: Mutex<HashSet<RegionId>>,
    revoke_acks: Mutex<HashMap<RegionId, oneshot::Sender<()>>>,
}

pub(crate) async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    let mut next = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("shm accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.server_conns.fetch_add(1, SeqCst) >= shared.cfg.max_server_conns {
            shared.server_conns.fetch_sub(1, SeqCst);
            tracing::warn!("refusing shm connection: too many connections");
            continue;
        }
        next += 1;
        let id = next;
        let sh = shared.clone();
        tokio::spawn(async move {
            let conn = Arc::new(ServerConn {
                stream: Arc::new(stream),
                write: tokio::sync::Mutex::new(()),
                opened: Mutex::new(HashSet::new()),
                revoke_acks: Mutex::new(HashMap::new()),
            });
            if let Err(reason) = serve_conn(id, &conn, &sh).await {
                tracing::info!("closing shm connection: {reason}");
            }
            sh.shm_conns.lock().remove(&id);
            // Dropping pending acks tells deregistration this client is gone.
            conn.revoke_acks.lock().clear();
            sh.server_conns.fetch_sub(1, SeqCst);
        });
    }
}

async fn serve_conn(id: u64, conn: &Arc<ServerConn>, shared: &Arc<Shared>) -> Result<(), String> {
    let s = &*conn.stream;
    let peer = tokio::time::timeout(
        shared.cfg.handshake_timeout,
        handshake::server(s, CHANNEL_SHM, &shared.desc),
    )
    .await
    .map_err(|_| "handshake timed out".to_string())??;
    shared.shm_conns.lock().insert(id, conn.clone());
    let mut hb = [0u8; std::mem::size_of::<ReqHeader>()];
    loop {
        match read_exact(s, &mut hb).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("read: {e}")),
        }
        let h = ReqHeader::read_from_bytes(&hb).map_err(|_| "short header")?;
        if h.magic.get() != wire::MAGIC {
            return Err(format!("bad request magic {:#x}", h.magic.get()));
        }
        let rid = h.id.get();
        match h.op {
            wire::OP_OPEN => {
                let region = h.region.get();
                let found = shared.regions.read().get(&region).cloned();
                match found {
                    Some(r) if r.memfd().is_some() => {
                        conn.opened.lock().insert(region);
                        let rh = RespHeader::new(wire::OP_OPEN, 0, rid, r.len);
                        let fd = r.memfd().map(|f| f.as_raw_fd());
                        let _g = conn.write.lock().await;
                        send_with_fd(s, rh.as_bytes(), fd)
                            .await
                            .map_err(|e| format!("open reply: {e}"))?;
                    }
                    other => {
                        let k = if other.is_some() {
                            ErrorKind::Unreachable
                        } else {
                            ErrorKind::UnknownRegion
                        };
                        let rh = RespHeader::new(wire::OP_OPEN, k.code(), rid, 0);
                        let _g = conn.write.lock().await;
                        write_all(s, rh.as_bytes())
                            .await
                            .map_err(|e| format!("open reply: {e}"))?;
                    }
                }
            }
            wire::OP_NOTIFY => {
                let len = h.len.get();
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
                let rh = RespHeader::new(wire::OP_NOTIFY, 0, rid, 0);
                let _g = conn.write.lock().await;
                write_all(s, rh.as_bytes())
                    .await
                    .map_err(|e| format!("notify reply: {e}"))?;
            }
            wire::OP_CALL | wire::OP_CALL_BULK => {
                let len = h.len.get();
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
                let (status, reply) = shared.answer_payload(h.op, status, reply);
                let rh = RespHeader::new(h.op, status, rid, reply.len() as u64);
                let _g = conn.write.lock().await;
                write_all(s, rh.as_bytes())
                    .await
                    .map_err(|e| format!("call reply: {e}"))?;
                write_all(s, &reply)
                    .await
                    .map_err(|e| format!("call reply: {e}"))?;
            }
            wire::OP_REVOKE_ACK => {
                let region = h.region.get();
                conn.opened.lock().remove(&region);
                if let Some(tx) = conn.revoke_acks.lock().remove(&region) {
                    let _ = tx.send(());
                }
            }
            op => return Err(format!("unknown opcode {op} on shm channel")),
        }
    }
}

/// Asks every initiator that mapped `region` to unmap it; waits for their
/// acknowledgements until `deadline`. Returns how many did not answer.
pub(crate) async fn revoke(shared: &Shared, region: RegionId, deadline: Instant) -> usize {
    let conns: Vec<Arc<ServerConn>> = shared
        .shm_conns
        .lock()
        .values()
        .filter(|c| c.opened.lock().contains(&region))
        .cloned()
        .collect();
    let mut waits = Vec::new();
    for c in conns {
        let (tx, rx) = oneshot::channel();
        c.revoke_acks.lock().insert(region, tx);
        // Server-to-client messages are all RespHeaders; a revoke names the
        // region in `len`.
        let h = RespHeader::new(wire::OP_REVOKE, 0, 0, region);
        let sent = {
            let _g = c.write.lock().await;
            write_all(&*c.stream, h.as_bytes()).await
        };
        if sent.is_ok() {
            waits.push(rx);
        }
    }
    let mut missing = 0;
    for rx in waits {
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Ok(_) => {} // acked, or the connection closed (sender dropped)
            Err(_) => missing += 1,
        }
    }
    missing
}

// ---------------------------------------------------------------- client ---

/// A mapping of one remote region.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: u64,
    revoked: AtomicBool,
}

// SAFETY: the mapping is process-wide memory owned by this value until drop;
// copies into it are raw and their ordering is the batch protocol's.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the raw pointer.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range; no copy holds an Arc to us.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len as usize) };
    }
}

/// A local view of a same-host peer's region, mapped over `shm`
/// ([`crate::Engine::shm_view`]): the peer's memfd pages themselves, so the
/// bytes can be read in place instead of being copied over first.
///
/// The view keeps the mapping alive (a revoke from the peer waits for it,
/// up to its bound, before the pages are unmapped here), so reading through
/// it never faults. It is a snapshot of nothing: the peer, and anyone else
/// mapping the region, may write the bytes at any time. Readers must agree
/// with the writers, by their own protocol (doorbells), on which ranges are
/// quiet while they read; [`ShmView::bytes`] is `unsafe` for that reason.
/// Hold a view only for as long as it is read: a held view delays the
/// peer's deregistration of the region.
#[derive(Clone)]
pub struct ShmView {
    map: Arc<Mapping>,
}

impl std::fmt::Debug for ShmView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmView")
            .field("len", &self.map.len)
            .field("revoked", &self.is_revoked())
            .finish()
    }
}

impl ShmView {
    /// Bytes of the region.
    pub fn len(&self) -> u64 {
        self.map.len
    }

    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Address of the region's first byte in this process. Valid while the
    /// view lives; the memory may change under any reader (see the type's
    /// docs).
    pub fn as_ptr(&self) -> *const u8 {
        self.map.ptr.as_ptr()
    }

    /// Whether the peer has since revoked the mapping (it is deregistering
    /// the region): the bytes stay readable while the view lives but are no
    /// longer the peer's.
    pub fn is_revoked(&self) -> bool {
        self.map.revoked.load(SeqCst)
    }

    /// Reads an aligned 8-byte word atomically (acquire), for words the
    /// peer may be writing right now. Panics when out of bounds or
    /// unaligned.
    pub fn load_u64(&self, off: usize) -> u64 {
        assert!(
            off.checked_add(8).is_some_and(|e| e as u64 <= self.map.len) && off.is_multiple_of(8),
            "word at {off} outside or unaligned in a view of {} bytes",
            self.map.len
        );
        // SAFETY: in bounds and 8-byte aligned (the mapping is page aligned),
        // mapped while `self` holds the Arc; read atomically because the
        // peer may write it concurrently.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.map.ptr.as_ptr().add(off).cast()) }
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// `len` bytes at `off` as a slice. Panics when out of bounds.
    ///
    /// # Safety
    /// Nobody may write `off..off+len` of the region (in any process) while
    /// the returned slice lives: the caller must know, from its protocol
    /// with the peer, that the range is quiet (e.g. the peer rang a
    /// doorbell after writing it and waits for a reply before writing it
    /// again).
    pub unsafe fn bytes(&self, off: usize, len: usize) -> &[u8] {
        assert!(
            off.checked_add(len)
                .is_some_and(|e| e as u64 <= self.map.len),
            "range {off}+{len} outside a view of {} bytes",
            self.map.len
        );
        // SAFETY: in bounds (checked above) of a mapping `self` keeps alive;
        // the caller guarantees nobody writes the range meanwhile.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr().add(off), len) }
    }
}

/// A control-channel answer, with the descriptor it carried (for `OP_OPEN`)
/// and its payload (for `OP_CALL` and `OP_CALL_BULK`).
type Reply = (RespHeader, Option<OwnedFd>, Vec<u8>);

/// The initiator's connection to one target's shm channel.
pub(crate) struct ShmPeer {
    stream: Arc<UnixStream>,
    write: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    maps: Mutex<HashMap<RegionId, Arc<Mapping>>>,
    pub(crate) dead: AtomicBool,
}

impl std::fmt::Debug for ShmPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmPeer")
            .field("dead", &self.dead.load(SeqCst))
            .finish()
    }
}

impl ShmPeer {
    pub(crate) async fn connect(
        shared: &Arc<Shared>,
        peer: &PeerDesc,
    ) -> Result<Arc<ShmPeer>, ErrorKind> {
        let name = peer.shm.as_deref().ok_or(ErrorKind::Unreachable)?;
        let std = connect_std(name).map_err(|e| {
            tracing::debug!("shm connect {name}: {e}");
            ErrorKind::Unreachable
        })?;
        // Register with the engine's reactor whatever runtime the caller is on.
        let s = {
            let _g = shared.rt_handle().enter();
            UnixStream::from_std(std).map_err(|_| ErrorKind::Io)?
        };
        tokio::time::timeout(
            shared.cfg.handshake_timeout,
            handshake::client(&s, CHANNEL_SHM, shared.desc.engine_id, peer),
        )
        .await
        .map_err(|_| ErrorKind::Timeout)??;
        let p = Arc::new(ShmPeer {
            stream: Arc::new(s),
            write: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            maps: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        let p2 = p.clone();
        shared
            .rt_handle()
            .spawn(async move { p2.read_loop().await });
        Ok(p)
    }

    async fn read_loop(self: Arc<Self>) {
        let mut hb = [0u8; std::mem::size_of::<RespHeader>()];
        let mut fds = Vec::new();
        let why = loop {
            if let Err(e) = recv_with_fds(&self.stream, &mut hb, &mut fds).await {
                break format!("{e}");
            }
            let Ok(h) = RespHeader::read_from_bytes(&hb) else {
                break "short header".into();
            };
            if h.magic.get() != wire::MAGIC {
                break "bad magic".into();
            }
            if h.op == wire::OP_REVOKE {
                let me = self.clone();
                let region = h.len.get();
                tokio::spawn(async move { me.handle_revoke(region).await });
                continue;
            }
            let fd = if h.op == wire::OP_OPEN && h.status == 0 {
                fds.pop()
            } else {
                None
            };
            fds.clear();
            let mut payload = Vec::new();
            if h.op == wire::OP_CALL || h.op == wire::OP_CALL_BULK {
                let most = if h.op == wire::OP_CALL_BULK {
                    wire::MAX_BULK_ANSWER
                } else {
                    wire::MAX_CALL_BYTES
                };
                if h.len.get() > most {
                    break "oversized call reply".into();
                }
                payload = vec![0u8; h.len.get() as usize];
                if let Err(e) = recv_with_fds(&self.stream, &mut payload, &mut fds).await {
                    break format!("{e}");
                }
                fds.clear();
            }
            if let Some(tx) = self.pending.lock().remove(&h.id.get()) {
                let _ = tx.send((h, fd, payload));
            }
        };
        tracing::debug!("shm control channel closed: {why}");
        self.dead.store(true, SeqCst);
        self.pending.lock().clear();
    }

    async fn handle_revoke(self: Arc<Self>, region: RegionId) {
        let m = self.maps.lock().remove(&region);
        if let Some(m) = m {
            m.revoked.store(true, SeqCst);
            // Copies in flight hold their own Arc; wait (bounded) for them.
            let until = Instant::now() + Duration::from_secs(5);
            while Arc::strong_count(&m) > 1 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let h = ReqHeader::new(wire::OP_REVOKE_ACK, 0, region, 0, 0);
        let _g = self.write.lock().await;
        let _ = write_all(&*self.stream, h.as_bytes()).await;
    }

    async fn request(&self, h: ReqHeader, payload: &[u8]) -> Result<Reply, ErrorKind> {
        if self.dead.load(SeqCst) {
            return Err(ErrorKind::ConnectionLost);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(h.id.get(), tx);
        {
            let _g = self.write.lock().await;
            write_all(&*self.stream, h.as_bytes())
                .await
                .map_err(|_| ErrorKind::ConnectionLost)?;
            if !payload.is_empty() {
                write_all(&*self.stream, payload)
                    .await
                    .map_err(|_| ErrorKind::ConnectionLost)?;
            }
        }
        rx.await.map_err(|_| ErrorKind::ConnectionLost)
    }

    /// The mapping of `region`, if already open.
    pub(crate) fn mapping(&self, region: RegionId) -> Option<Arc<Mapping>> {
        self.maps.lock().get(&region).cloned()
    }

    /// Copies `len` bytes at `remote_offset` of the peer's mapped `region`
    /// to `local` in the calling thread, piece by piece, calling
    /// `after(offset, len)` once each piece has been copied. `Ok(false)`
    /// when the region is not mapped yet (the caller runs a batch, which
    /// maps it). Same checks as a batch's copy: a dead peer, a revoked
    /// mapping, an out-of-bounds range.
    ///
    /// # Safety
    /// `local..local+len` must be valid for writes for the whole call and
    /// not overlap the peer's region.
    pub(crate) unsafe fn read_direct(
        &self,
        region: RegionId,
        local: *mut u8,
        remote_offset: u64,
        len: usize,
        piece: usize,
        after: &mut dyn FnMut(usize, usize),
    ) -> Result<bool, ErrorKind> {
        if self.dead.load(SeqCst) {
            return Err(ErrorKind::ConnectionLost);
        }
        let Some(m) = self.mapping(region) else {
            return Ok(false);
        };
        if m.revoked.load(SeqCst) {
            return Err(ErrorKind::UnknownRegion);
        }
        if remote_offset
            .checked_add(len as u64)
            .is_none_or(|e| e > m.len)
        {
            return Err(ErrorKind::OutOfBounds);
        }
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(piece.max(1));
            // SAFETY: the remote range lies inside the mapping (checked
            // above), which `m` keeps mapped; the local range is the
            // caller's (contract above); the two never overlap.
            unsafe {
                let remote = m.ptr.as_ptr().add(remote_offset as usize + done);
                std::ptr::copy_nonoverlapping(remote, local.add(done), n);
            }
            after(done, n);
            done += n;
        }
        // A target that died during the copy did not receive the bytes.
        if self.dead.load(SeqCst) {
            return Err(ErrorKind::ConnectionLost);
        }
        Ok(true)
    }

    /// A view of `region` when it is mapped and not revoked.
    pub(crate) fn view(&self, region: RegionId) -> Option<ShmView> {
        if self.dead.load(SeqCst) {
            return None;
        }
        self.mapping(region)
            .filter(|m| !m.revoked.load(SeqCst))
            .map(|map| ShmView { map })
    }

    /// Opens (maps) `region` unless already mapped.
    pub(crate) async fn open(&self, region: RegionId) -> Result<Arc<Mapping>, ErrorKind> {
        if let Some(m) = self.mapping(region) {
            return Ok(m);
        }
        let id = self.next_id.fetch_add(1, SeqCst);
        let (h, fd, _) = self
            .request(ReqHeader::new(wire::OP_OPEN, id, region, 0, 0), &[])
            .await?;
        if let Some(k) = ErrorKind::from_code(h.status) {
            return Err(k);
        }
        let fd = fd.ok_or(ErrorKind::Protocol)?;
        let len = h.len.get();
        let ptr = map_shared(&fd, len, true).map_err(|_| ErrorKind::Io)?;
        let m = Arc::new(Mapping {
            ptr,
            len,
            revoked: AtomicBool::new(false),
        });
        Ok(self.maps.lock().entry(region).or_insert(m).clone())
    }

    /// Delivers a notification after the batch's copies.
    pub(crate) async fn notify(&self, data: &[u8]) -> Result<(), ErrorKind> {
        let id = self.next_id.fetch_add(1, SeqCst);
        let (h, _, _) = self
            .request(
                ReqHeader::new(wire::OP_NOTIFY, id, 0, 0, data.len() as u64),
                data,
            )
            .await?;
        ErrorKind::from_code(h.status).map_or(Ok(()), Err)
    }

    /// Sends an RPC (`OP_CALL` or `OP_CALL_BULK`) and returns the reply
    /// payload.
    pub(crate) async fn call(&self, op: u8, data: &[u8]) -> Result<Vec<u8>, ErrorKind> {
        let id = self.next_id.fetch_add(1, SeqCst);
        let h = ReqHeader::new(op, id, 0, 0, data.len() as u64);
        let (h, _, payload) = self.request(h, data).await?;
        ErrorKind::from_code(h.status).map_or(Ok(payload), Err)
    }
}

/// Copies slices of `batch` through mappings, on the calling thread.
/// `maps[k]` is the mapping for `slices[k]`. With `streaming`, WRITEs use
/// streaming stores (see `ntcopy`): for batches large enough that keeping
/// the peer's lines in this core's cache is worth nothing.
pub(crate) fn copy_slices(
    batch: &Arc<BatchState>,
    slices: &[u32],
    maps: &[Arc<Mapping>],
    peer: &ShmPeer,
    streaming: bool,
) {
    for (k, &i) in slices.iter().enumerate() {
        let i = i as usize;
        let m = &maps[k];
        if !batch.advance(i, PENDING, BUSY) {
            continue;
        }
        if peer.dead.load(SeqCst) {
            batch.fail(i, ErrorKind::ConnectionLost);
            continue;
        }
        if m.revoked.load(SeqCst) {
            batch.fail(i, ErrorKind::UnknownRegion);
            continue;
        }
        let s = batch.slices[i];
        if s.remote_offset.checked_add(s.len).is_none_or(|e| e > m.len) {
            batch.fail(i, ErrorKind::OutOfBounds);
            continue;
        }
        let local = batch.local_ptr(i);
        if let Some(dev) = batch.local_device(i) {
            // SAFETY: as below; the local range is device memory of `dev`.
            let r = unsafe {
                let remote = m.ptr.as_ptr().add(s.remote_offset as usize);
                staged_copy(dev, batch.kind_of(i), local as u64, remote, s.len)
            };
            match r {
                Ok(()) if !peer.dead.load(SeqCst) => {
                    batch.complete(i, BUSY);
                }
                Ok(()) => batch.fail(i, ErrorKind::ConnectionLost),
                Err(e) => {
                    tracing::warn!("shm staged GPU copy: {e}");
                    batch.fail(i, ErrorKind::Io);
                }
            }
            continue;
        }
        // SAFETY: the remote range lies inside the mapping (checked just above)
        // which `m` keeps mapped; the local range was checked at submit and the
        // batch holds its region in use; the two never overlap (distinct
        // mappings).
        unsafe {
            let remote = m.ptr.as_ptr().add(s.remote_offset as usize);
            match batch.kind_of(i) {
                OpKind::Write if streaming => {
                    crate::ntcopy::copy_streaming(remote, local, s.len as usize)
                }
                OpKind::Write => std::ptr::copy_nonoverlapping(local, remote, s.len as usize),
                OpKind::Read => std::ptr::copy_nonoverlapping(remote, local, s.len as usize),
            }
        }
        // A target that died during the copy did not receive the bytes.
        if peer.dead.load(SeqCst) {
            batch.fail(i, ErrorKind::ConnectionLost);
        } else {
            batch.complete(i, BUSY);
        }
    }
}

thread_local! {
    /// The copying thread's pinned staging buffer for GPU slices.
    static BOUNCE: std::cell::RefCell<crate::cuda::Bounce> = Default::default();
}

/// Copies one slice between local device memory and a remote mapping
/// through this thread's bounce buffer.
///
/// # Safety
/// `dev_ptr..+len` must be device memory of `dev` and `host..+len` mapped
/// host memory, both reserved for this slice.
unsafe fn staged_copy(
    dev: &crate::cuda::GpuDevice,
    kind: OpKind,
    dev_ptr: u64,
    host: *mut u8,
    len: u64,
) -> crate::error::Result<()> {
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        // SAFETY: forwarded from the caller's contract.
        unsafe {
            match kind {
                OpKind::Write => b.device_to_host(dev, host, dev_ptr, len),
                OpKind::Read => b.host_to_device(dev, dev_ptr, host, len),
            }
        }
    })
}

/// A unit of work for the copy threads.
pub(crate) struct CopyJob {
    pub(crate) batch: Arc<BatchState>,
    pub(crate) slices: Vec<u32>,
    pub(crate) maps: Vec<Arc<Mapping>>,
    pub(crate) peer: Arc<ShmPeer>,
    /// WRITEs with streaming stores (see [`copy_slices`]).
    pub(crate) streaming: bool,
}

/// Starts `n` copy threads; they exit when the sender is dropped.
pub(crate) fn start_copy_threads(n: usize) -> crossbeam_channel::Sender<CopyJob> {
    let (tx, rx) = crossbeam_channel::bounded::<CopyJob>(4096);
    for t in 0..n.max(1) {
        let rx = rx.clone();
        let _ = std::thread::Builder::new()
            .name(format!("kvmesh-copy-{t}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    copy_slices(&job.batch, &job.slices, &job.maps, &job.peer, job.streaming);
                }
            });
    }
    tx
}
