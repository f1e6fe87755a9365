//! Caller-driven TCP requests: the task that waits for the answer does the
//! socket I/O itself, on a connection it holds alone for the exchange.
//!
//! A lane (see [`crate::tcp`]) hands every request to a writer task and every
//! answer to a reader task, so one RPC wakes up to four threads: the lane
//! writer, the peer's server, the lane reader, and the caller. Each wake-up
//! of a parked thread costs tens of microseconds on a busy or virtualized
//! host; a loopback round trip without them takes a few. Here the caller
//! writes the request, then polls the socket for a short while
//! ([`crate::EngineConfig::reply_spin`]) before it parks on readiness, so
//! only the server's thread is woken.
//!
//! The server side is the ordinary [`crate::tcp`] server: a direct
//! connection speaks the same protocol as a lane. A connection returns to
//! its peer's idle pool only after a complete exchange; one dropped halfway
//! (cancelled, timed out, failed) is closed, so no stale answer is ever read
//! as the next one's.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::TcpStream;
use zerocopy::{FromBytes, IntoBytes};

use crate::engine::Shared;
use crate::error::ErrorKind;
use crate::rawio::{read_exact_raw_spin, write_all_raw, write_spliced, SplicePipe, SPLICE_MIN};
use crate::wire::{self, ReqHeader, RespHeader};
use crate::PeerDesc;

/// Direct connections one peer may have open at once; more concurrent
/// callers use the lanes.
pub(crate) const MAX_DIRECT_CONNS: usize = 8;

/// The direct connections to one peer.
#[derive(Debug, Default)]
pub(crate) struct DirectPool {
    idle: Mutex<Vec<Conn>>,
    open: AtomicUsize,
}

/// An open direct connection.
#[derive(Debug)]
struct Conn {
    s: TcpStream,
    next_id: u64,
    /// For payloads sent without a copy (made on first use).
    pipe: Option<SplicePipe>,
}

impl Conn {
    fn next(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}

/// A direct connection held by one caller.
pub(crate) struct DirectConn {
    pool: Arc<DirectPool>,
    conn: Option<Conn>,
    /// The last exchange completed: the connection may serve the next.
    clean: bool,
}

impl DirectPool {
    /// An idle connection, or a new one; `Ok(None)` when
    /// [`MAX_DIRECT_CONNS`] are busy (the caller then uses a lane).
    pub(crate) async fn take(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        peer: &PeerDesc,
    ) -> Result<Option<DirectConn>, ErrorKind> {
        if let Some(c) = self.idle.lock().pop() {
            return Ok(Some(DirectConn {
                pool: self.clone(),
                conn: Some(c),
                clean: false,
            }));
        }
        if self.open.fetch_add(1, SeqCst) >= MAX_DIRECT_CONNS {
            self.open.fetch_sub(1, SeqCst);
            return Ok(None);
        }
        // Connected on the engine's runtime, so the socket is registered
        // with the reactor that the engine's threads drive, whichever
        // executor the caller runs on.
        let (sh, p) = (shared.clone(), peer.clone());
        let made = shared
            .rt_handle()
            .spawn(async move { crate::tcp::connect(&sh, &p).await })
            .await
            .unwrap_or(Err(ErrorKind::ConnectionLost));
        match made {
            Ok(s) => Ok(Some(DirectConn {
                pool: self.clone(),
                conn: Some(Conn {
                    s,
                    next_id: 1,
                    pipe: None,
                }),
                clean: false,
            })),
            Err(k) => {
                self.open.fetch_sub(1, SeqCst);
                Err(k)
            }
        }
    }

    /// Closes the idle connections (the peer is going away).
    pub(crate) fn close_idle(&self) {
        let closed = std::mem::take(&mut *self.idle.lock());
        self.open.fetch_sub(closed.len(), SeqCst);
    }
}

impl Drop for DirectConn {
    fn drop(&mut self) {
        match self.conn.take() {
            Some(c) if self.clean => self.pool.idle.lock().push(c),
            _ => {
                self.pool.open.fetch_sub(1, SeqCst);
            }
        }
    }
}

/// Reads the answer header to request `id` of kind `op`: the status the
/// peer answered with (`None`: success) and the payload length that
/// follows; `Err` for a broken or malformed answer (the connection must be
/// closed).
async fn read_answer(
    s: &TcpStream,
    id: u64,
    op: u8,
    spin: Duration,
) -> Result<(Option<ErrorKind>, u64), ErrorKind> {
    let mut hb = [0u8; std::mem::size_of::<RespHeader>()];
    // SAFETY: `hb` is ours for the call.
    unsafe { read_exact_raw_spin(s, hb.as_mut_ptr() as usize, hb.len(), spin) }
        .await
        .map_err(|_| ErrorKind::ConnectionLost)?;
    let rh = RespHeader::read_from_bytes(&hb).map_err(|_| ErrorKind::Protocol)?;
    if rh.magic.get() != wire::MAGIC || rh.id.get() != id || rh.op != op {
        tracing::warn!("malformed answer on a direct connection; closing it");
        return Err(ErrorKind::Protocol);
    }
    if rh.status == 0 {
        return Ok((None, rh.len.get()));
    }
    match ErrorKind::from_code(rh.status) {
        Some(k) => Ok((Some(k), rh.len.get())),
        None => {
            tracing::warn!(
                status = rh.status,
                "unknown status code; closing connection"
            );
            Err(ErrorKind::Protocol)
        }
    }
}

impl DirectConn {
    /// Sends an `op` request carrying `data`; returns its id.
    async fn send_call(&mut self, op: u8, data: &[u8]) -> Result<u64, ErrorKind> {
        self.clean = false;
        let c = self.conn.as_mut().ok_or(ErrorKind::ConnectionLost)?;
        let id = c.next();
        let h = ReqHeader::new(op, id, 0, 0, data.len() as u64);
        let parts = [
            (h.as_bytes().as_ptr() as usize, h.as_bytes().len()),
            (data.as_ptr() as usize, data.len()),
        ];
        // SAFETY: both buffers live on this frame for the call.
        unsafe { write_all_raw(&c.s, &parts) }
            .await
            .map_err(|_| ErrorKind::ConnectionLost)?;
        Ok(id)
    }

    /// Sends an `op` request carrying `data` and reads its answer header:
    /// the peer's status and the payload length, at most `most` (a longer
    /// one is a protocol error: the connection is then closed).
    async fn exchange(
        &mut self,
        op: u8,
        data: &[u8],
        spin: Duration,
        most: u64,
    ) -> Result<(Option<ErrorKind>, u64), ErrorKind> {
        let id = self.send_call(op, data).await?;
        let (status, len) = read_answer(self.stream()?, id, op, spin).await?;
        if len > most {
            tracing::warn!(len, "oversized answer on a direct connection; closing it");
            return Err(ErrorKind::Protocol);
        }
        Ok((status, len))
    }

    fn stream(&self) -> Result<&TcpStream, ErrorKind> {
        Ok(&self.conn.as_ref().ok_or(ErrorKind::ConnectionLost)?.s)
    }

    /// One `OP_CALL` or `OP_CONTROL` exchange: sends `data`, returns the
    /// reply (or the error status the peer answered with).
    pub(crate) async fn call(
        &mut self,
        op: u8,
        data: &[u8],
        spin: Duration,
    ) -> Result<Vec<u8>, ErrorKind> {
        let (status, len) = self.exchange(op, data, spin, wire::MAX_CALL_BYTES).await?;
        let reply = recv_vec(self.stream()?, len as usize, spin).await?;
        self.clean = true;
        status.map_or(Ok(reply), Err)
    }

    /// Sends an `OP_CALL_BULK` request and receives its answer up to the
    /// bulk bytes: (head, bulk length). Bulk bytes must then be taken with
    /// [`DirectConn::recv_bulk`] or [`DirectConn::skip_bulk`] before the
    /// connection serves another exchange.
    pub(crate) async fn call_head(
        &mut self,
        data: &[u8],
        spin: Duration,
    ) -> Result<(Vec<u8>, u64), ErrorKind> {
        let (status, len) = self
            .exchange(wire::OP_CALL_BULK, data, spin, wire::MAX_BULK_ANSWER)
            .await?;
        let s = self.stream()?;
        if let Some(k) = status {
            crate::rawio::discard(s, len)
                .await
                .map_err(|_| ErrorKind::ConnectionLost)?;
            self.clean = true;
            return Err(k);
        }
        let mut hl = [0u8; 4];
        // SAFETY: `hl` is ours for the call.
        unsafe { read_exact_raw_spin(s, hl.as_mut_ptr() as usize, 4, spin) }
            .await
            .map_err(|_| ErrorKind::ConnectionLost)?;
        let head_len = u64::from(u32::from_le_bytes(hl));
        let Some(bulk) = len.checked_sub(4 + head_len) else {
            tracing::warn!(
                len,
                head_len,
                "malformed bulk answer; closing the connection"
            );
            return Err(ErrorKind::Protocol);
        };
        if head_len > wire::MAX_CALL_BYTES || bulk > wire::MAX_BULK_BYTES {
            tracing::warn!(
                len,
                head_len,
                "oversized bulk answer; closing the connection"
            );
            return Err(ErrorKind::Protocol);
        }
        let head = recv_vec(s, head_len as usize, spin).await?;
        self.clean = bulk == 0;
        Ok((head, bulk))
    }

    /// Receives the `len` bulk bytes announced by [`DirectConn::call_head`]
    /// into `dst..dst+len`, handing each landed piece to `on_piece` as in
    /// [`DirectConn::recv_read`].
    ///
    /// # Safety
    /// As for [`DirectConn::recv_read`].
    pub(crate) async unsafe fn recv_bulk(
        &mut self,
        len: u64,
        dst: usize,
        spin: Duration,
        on_piece: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<(), ErrorKind> {
        // SAFETY: the caller's contract.
        unsafe { recv_pieces(self.stream()?, len, dst, spin, on_piece) }.await?;
        self.clean = true;
        Ok(())
    }

    /// Reads and drops the `len` bulk bytes announced by
    /// [`DirectConn::call_head`].
    pub(crate) async fn skip_bulk(&mut self, len: u64) -> Result<(), ErrorKind> {
        crate::rawio::discard(self.stream()?, len)
            .await
            .map_err(|_| ErrorKind::ConnectionLost)?;
        self.clean = true;
        Ok(())
    }
}

/// Receives `len` bytes into a new vector.
async fn recv_vec(s: &TcpStream, len: usize, spin: Duration) -> Result<Vec<u8>, ErrorKind> {
    let mut v = vec![0u8; len];
    // SAFETY: `v` is ours for the call.
    unsafe { read_exact_raw_spin(s, v.as_mut_ptr() as usize, len, spin) }
        .await
        .map_err(|_| ErrorKind::ConnectionLost)?;
    Ok(v)
}

/// Receives `len` bytes into `dst..dst+len` in pieces of [`PIECE_BYTES`],
/// calling `on_piece(offset, len)` after each.
///
/// # Safety
/// `dst..dst+len` must be valid for writes for the whole call.
async unsafe fn recv_pieces(
    s: &TcpStream,
    len: u64,
    dst: usize,
    spin: Duration,
    on_piece: &mut (dyn FnMut(usize, usize) + Send),
) -> Result<(), ErrorKind> {
    let mut done = 0usize;
    while done < len as usize {
        let n = (len as usize - done).min(PIECE_BYTES);
        // SAFETY: inside the caller's range.
        unsafe { read_exact_raw_spin(s, dst + done, n, spin) }
            .await
            .map_err(|_| ErrorKind::ConnectionLost)?;
        on_piece(done, n);
        done += n;
    }
    Ok(())
}

/// Bytes received before each hand-over to the caller's `on_piece`: small
/// enough to still be in this core's cache when the caller reads them.
pub(crate) const PIECE_BYTES: usize = 256 << 10;

impl DirectConn {
    /// Sends an `OP_READ` request for `len` bytes at `offset` of the peer's
    /// `region`; returns its id for [`DirectConn::recv_read`].
    pub(crate) async fn send_read(
        &mut self,
        region: u64,
        offset: u64,
        len: u64,
    ) -> Result<u64, ErrorKind> {
        self.clean = false;
        let c = self.conn.as_mut().ok_or(ErrorKind::ConnectionLost)?;
        let id = c.next();
        let s = &c.s;
        let h = ReqHeader::new(wire::OP_READ, id, region, offset, len);
        crate::rawio::write_all(s, h.as_bytes())
            .await
            .map_err(|_| ErrorKind::ConnectionLost)?;
        Ok(id)
    }

    /// Receives the answer to [`DirectConn::send_read`] `id` into
    /// `dst..dst+len`, calling `on_piece(offset, len)` for each landed
    /// piece, in order, while the rest is still arriving.
    ///
    /// # Safety
    /// `dst..dst+len` must be valid for writes for the whole call and not be
    /// referenced by any live Rust reference except through `on_piece`'s
    /// ranges after they are handed over.
    pub(crate) async unsafe fn recv_read(
        &mut self,
        id: u64,
        len: u64,
        dst: usize,
        spin: Duration,
        on_piece: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<(), ErrorKind> {
        let s = &self.conn.as_ref().ok_or(ErrorKind::ConnectionLost)?.s;
        let (status, n) = read_answer(s, id, wire::OP_READ, spin).await?;
        if let Some(k) = status {
            // A refused read carries no payload: the connection stays usable.
            self.clean = n == 0;
            return Err(k);
        }
        if n != len {
            return Err(ErrorKind::Protocol);
        }
        // SAFETY: the caller's contract.
        unsafe { recv_pieces(s, len, dst, spin, on_piece) }.await?;
        self.clean = true;
        Ok(())
    }
}

impl DirectConn {
    /// One acknowledged `OP_WRITE` of `src..src+len` to `offset` of the
    /// peer's `region`. Sends in pieces and calls `on_piece(offset, len)`
    /// after each piece is in the socket, so the caller works on it (hashes
    /// it) while the peer receives it. Returns once the peer acknowledged.
    ///
    /// # Safety
    /// `src..src+len` must be valid for reads and stay mapped and unchanged
    /// for the whole call (its pages may be sent by reference).
    pub(crate) async unsafe fn write(
        &mut self,
        region: u64,
        offset: u64,
        src: usize,
        len: u64,
        spin: Duration,
        on_piece: &mut (dyn FnMut(usize, usize) + Send),
    ) -> Result<(), ErrorKind> {
        self.clean = false;
        let c = self.conn.as_mut().ok_or(ErrorKind::ConnectionLost)?;
        let id = c.next();
        if c.pipe.is_none() && len as usize >= SPLICE_MIN {
            c.pipe = SplicePipe::new().ok();
        }
        let mut h = ReqHeader::new(wire::OP_WRITE, id, region, offset, len);
        h.flags = wire::FLAG_ACK;
        let mut hdr: &[u8] = h.as_bytes();
        let mut done = 0usize;
        loop {
            let n = (len as usize - done).min(PIECE_BYTES);
            let at = src + done;
            let sent = match &c.pipe {
                // SAFETY: the caller keeps the range mapped and unchanged.
                Some(p) if n >= SPLICE_MIN => unsafe { write_spliced(&c.s, p, hdr, at, n) }.await,
                _ => {
                    let parts = [(hdr.as_ptr() as usize, hdr.len()), (at, n)];
                    // SAFETY: the header lives on this frame; the range is
                    // the caller's (contract above).
                    unsafe { write_all_raw(&c.s, &parts) }.await
                }
            };
            sent.map_err(|_| ErrorKind::ConnectionLost)?;
            hdr = &[];
            if n > 0 {
                on_piece(done, n);
            }
            done += n;
            if done >= len as usize {
                break;
            }
        }
        let (status, n) = read_answer(&c.s, id, wire::OP_WRITE, spin).await?;
        if n != 0 {
            return Err(ErrorKind::Protocol);
        }
        // A refused write was discarded by the peer: the connection stays
        // usable.
        self.clean = true;
        status.map_or(Ok(()), Err)
    }
}
