//! NCCL point-to-point collectives for benchmarks and baselines: a
//! communicator over one GPU per rank, and an all-to-all-v of device bytes
//! built from grouped `ncclSend`/`ncclRecv`.
//!
//! ```text
//!  rank 0: NcclId::new() --(128 bytes, out of band: rendezvous, file, ...)--> ranks 1..N
//!  every rank: NcclComm::init_rank(dev, N, rank, &id)     (blocks until all N joined)
//!  every rank: comm.all_to_all_v(stream, send, send_spans, recv, recv_spans)
//!                 ncclGroupStart
//!                   for peer: ncclSend(send[peer]) ncclRecv(recv[peer])   (zero spans skipped)
//!                 ncclGroupEnd              -> queued on `stream`, ordered by access events
//!  drop: ncclCommDestroy, or ncclCommAbort after a failure
//! ```
//!
//! libnccl is loaded at run time through cudarc's `nccl::sys`. cudarc opens
//! it only under the names of `cudarc::get_lib_name_candidates("nccl")`
//! (`libnccl.so`, `libnccl.so.12`, ...), not under the `libnccl.so.2` that
//! NCCL packages install, and it panics when no candidate loads. So the
//! library is probed first (as [`super::available`] does for the driver):
//! absence is [`Error::NoCuda`] with "NCCL not found (libnccl.so.2)", and a
//! machine that has only `libnccl.so.2` needs a directory holding a
//! `libnccl.so -> libnccl.so.2` link on `LD_LIBRARY_PATH`
//! (`scripts/gpu-check.sh --remote` makes one). The probe also checks that
//! every symbol used here exists (NCCL 2.7 or newer), because cudarc panics
//! on a missing symbol too.
//!
//! Without the `cuda` feature every call fails with "built without the
//! cuda feature"; the pure plan check ([`validate_all_to_all_v`]) works
//! everywhere.
//!
//! This module must not depend on the engine or any transport.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::device::{record_drop_error, GpuDevice};
use super::memory::GpuMemory;
use super::stream::{GpuEvent, GpuStream};
use crate::error::{Error, Result};

/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Whether NCCL can be used here: CUDA is available ([`super::available`]),
/// libnccl loads and has every symbol this module calls.
pub fn available() -> Result<()> {
    super::raw::init()?;
    ffi::probe().map(|_| ())
}

/// The loaded NCCL's version (major, minor, patch).
pub fn version() -> Result<(u32, u32, u32)> {
    available()?;
    Ok(decode_version(ffi::probe()?))
}

/// NCCL's version code: `major*10000 + minor*100 + patch` since 2.9,
/// `major*1000 + minor*100 + patch` before.
fn decode_version(v: i32) -> (u32, u32, u32) {
    let v = v.max(0) as u32;
    if v >= 10000 {
        (v / 10000, v / 100 % 100, v % 100)
    } else {
        (v / 1000, v / 100 % 10, v % 100)
    }
}

/// The rendezvous token of a communicator (`ncclUniqueId`): created once by
/// one rank and handed to every rank out of band. It carries the creator's
/// bootstrap address; the creating process must stay alive until every rank
/// has called [`NcclComm::init_rank`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; UNIQUE_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.to_hex();
        write!(f, "NcclId({}..)", &h[..16])
    }
}

impl NcclId {
    /// Creates a new id (`ncclGetUniqueId`; starts NCCL's bootstrap root in
    /// this process).
    pub fn new() -> Result<NcclId> {
        available()?;
        Ok(NcclId(ffi::unique_id()?))
    }

    /// An id received from another process.
    pub fn from_bytes(b: &[u8]) -> Result<NcclId> {
        <[u8; UNIQUE_ID_BYTES]>::try_from(b)
            .map(NcclId)
            .map_err(|_| {
                Error::Invalid(format!(
                    "an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}",
                    b.len()
                ))
            })
    }

    /// The bytes to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.0
    }

    /// Lower-case hex (256 characters), for line-based channels.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`NcclId::to_hex`] output.
    pub fn from_hex(s: &str) -> Result<NcclId> {
        let bad = || Error::Invalid(format!("not a hex NCCL unique id: {s:.32}"));
        if s.len() != 2 * UNIQUE_ID_BYTES || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; UNIQUE_ID_BYTES];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(NcclId(out))
    }
}

/// One peer's part of a buffer in an all-to-all-v: `len` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerSpan {
    pub offset: u64,
    pub len: u64,
}

impl PeerSpan {
    /// One span per peer, back to back from offset 0, of `lens[peer]` bytes.
    pub fn packed(lens: &[u64]) -> Vec<PeerSpan> {
        let mut at = 0u64;
        lens.iter()
            .map(|&len| {
                let s = PeerSpan { offset: at, len };
                at = at.saturating_add(len);
                s
            })
            .collect()
    }

    /// Bytes covered by `spans` end to end (the buffer length [`PeerSpan::packed`] needs).
    pub fn extent(spans: &[PeerSpan]) -> u64 {
        spans
            .iter()
            .map(|s| s.offset.saturating_add(s.len))
            .max()
            .unwrap_or(0)
    }
}

/// Checks an all-to-all-v plan of rank `rank` in a group of `world` before
/// anything reaches NCCL. `send_buf` and `recv_buf` are (address, length)
/// of the two buffers; `send[p]` is what goes to peer `p`, `recv[p]` where
/// the bytes of peer `p` land.
///
/// Refused: span lists not of length `world`; a span outside its buffer
/// (offset overflow included); two receive spans sharing a byte; a receive
/// span sharing a byte with a send span (the buffers may be the same
/// memory); a send-to-self length different from the receive-from-self one.
/// Zero-length spans are never sent and may sit anywhere inside the buffer.
/// Whether peer `p` sends `recv[p].len` bytes is the caller's contract
/// (NCCL fails or hangs on a mismatch; it cannot be checked locally).
pub fn validate_all_to_all_v(
    world: usize,
    rank: usize,
    send_buf: (u64, u64),
    send: &[PeerSpan],
    recv_buf: (u64, u64),
    recv: &[PeerSpan],
) -> Result<()> {
    if world == 0 || rank >= world {
        return Err(Error::Invalid(format!(
            "rank {rank} does not fit a group of {world}"
        )));
    }
    if send.len() != world || recv.len() != world {
        return Err(Error::Invalid(format!(
            "all-to-all-v needs one span per rank: world {world}, {} send and {} receive spans",
            send.len(),
            recv.len()
        )));
    }
    if send[rank].len != recv[rank].len {
        return Err(Error::Invalid(format!(
            "rank {rank} sends {} bytes to itself but expects {}",
            send[rank].len, recv[rank].len
        )));
    }
    // (start, end, is_receive) in absolute addresses.
    let mut spans = Vec::with_capacity(2 * world);
    for (what, (base, len), list, is_recv) in [
        ("all-to-all-v send span", send_buf, send, false),
        ("all-to-all-v receive span", recv_buf, recv, true),
    ] {
        for s in list {
            match s.offset.checked_add(s.len) {
                Some(end) if end <= len => {}
                _ => {
                    return Err(Error::OutOfBounds {
                        what,
                        offset: s.offset,
                        len: s.len,
                        region_len: len,
                    })
                }
            }
            if s.len > 0 {
                let start = base.checked_add(s.offset).ok_or_else(|| {
                    Error::Invalid(format!("{what} at {base:#x}+{} overflows", s.offset))
                })?;
                spans.push((start, start.saturating_add(s.len), is_recv));
            }
        }
    }
    // Sweep by start address: an interval overlaps an earlier one iff it
    // starts before that one's end. Receive spans may overlap nothing;
    // send spans may overlap each other (the same bytes sent twice).
    spans.sort_unstable();
    let (mut recv_end, mut send_end) = (0u64, 0u64);
    for &(start, end, is_recv) in &spans {
        let clash = start < recv_end || (is_recv && start < send_end);
        if clash {
            return Err(Error::Invalid(format!(
                "all-to-all-v spans overlap at address {start:#x}: a receive span may share \
                 no byte with another receive span or a send span"
            )));
        }
        if is_recv {
            recv_end = recv_end.max(end);
        } else {
            send_end = send_end.max(end);
        }
    }
    Ok(())
}

/// An NCCL communicator: this process's rank in a group of `world` ranks,
/// one GPU each.
///
/// Collectives take `&mut self` (an NCCL communicator must not be used by
/// two threads at once); [`NcclComm::check`] and [`NcclComm::wait`] may run
/// beside them. After a failed call the communicator is unusable and its
/// drop aborts it (`ncclCommAbort`, which does not wait for peers); a
/// healthy one is destroyed (`ncclCommDestroy`). Errors met in `Drop` are
/// recorded ([`super::take_drop_errors`]), never panicked.
pub struct NcclComm {
    dev: GpuDevice,
    /// `ncclComm_t`; 0 once released by [`NcclComm::abort`].
    raw: ffi::Comm,
    world: usize,
    rank: usize,
    failed: AtomicBool,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("device", &self.dev.ordinal())
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish()
    }
}

impl NcclComm {
    /// Joins the communicator of `id` as `rank` of `world`, on `device`
    /// (`ncclCommInitRank`). Blocks until all `world` ranks have called it,
    /// with no deadline of its own: callers bound it from outside (a
    /// launcher that kills its ranks). Each rank needs its own GPU: NCCL
    /// refuses two ranks of one communicator on the same device.
    pub fn init_rank(
        device: &GpuDevice,
        world: usize,
        rank: usize,
        id: &NcclId,
    ) -> Result<NcclComm> {
        if world == 0 || rank >= world || world > i32::MAX as usize {
            return Err(Error::Invalid(format!(
                "rank {rank} does not fit a group of {world}"
            )));
        }
        available()?;
        device.bind()?;
        let raw = ffi::comm_init_rank(world as i32, &id.0, rank as i32)?;
        Ok(NcclComm {
            dev: device.clone(),
            raw,
            world,
            rank,
            failed: AtomicBool::new(false),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The GPU of this rank.
    pub fn device(&self) -> &GpuDevice {
        &self.dev
    }

    fn usable(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) || self.raw == 0 {
            return Err(Error::Invalid(
                "NCCL communicator unusable after an earlier failure".into(),
            ));
        }
        Ok(())
    }

    fn mark<T>(&self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        r
    }

    /// Queues an all-to-all-v on `stream`: `send[p]` of `send_buf` goes to
    /// rank `p`, the bytes from rank `p` land in `recv[p]` of `recv_buf`.
    /// One NCCL group of a send and a receive per peer with bytes (self
    /// included); zero-length spans are skipped, so every peer must agree
    /// on the lengths (rank `p`'s `send[self]` is this rank's `recv[p]`).
    ///
    /// Asynchronous: returns once queued. Ordered after earlier GPU work on
    /// either buffer (their access events); later work on them waits for it.
    /// Wait with [`GpuStream::synchronize`], or [`NcclComm::wait`] on an
    /// event recorded after it (bounded, and notices a failed peer).
    pub fn all_to_all_v(
        &mut self,
        stream: &GpuStream,
        send_buf: &dyn GpuMemory,
        send: &[PeerSpan],
        recv_buf: &dyn GpuMemory,
        recv: &[PeerSpan],
    ) -> Result<()> {
        self.usable()?;
        if stream.device() != &self.dev {
            return Err(Error::Invalid(format!(
                "stream of GPU {} used with an NCCL communicator of GPU {}",
                stream.device().ordinal(),
                self.dev.ordinal()
            )));
        }
        validate_all_to_all_v(
            self.world,
            self.rank,
            (send_buf.addr(), send_buf.byte_len()),
            send,
            (recv_buf.addr(), recv_buf.byte_len()),
            recv,
        )?;
        self.dev.bind()?;
        recv_buf.access().before_write(stream)?;
        send_buf.access().before_read(stream)?;
        let queued = self.mark(self.queue_group(stream, send_buf, send, recv_buf, recv));
        queued?;
        let ev = stream.record()?;
        recv_buf.access().wrote(&ev);
        send_buf.access().read(&ev);
        Ok(())
    }

    fn queue_group(
        &self,
        stream: &GpuStream,
        send_buf: &dyn GpuMemory,
        send: &[PeerSpan],
        recv_buf: &dyn GpuMemory,
        recv: &[PeerSpan],
    ) -> Result<()> {
        ffi::group_start()?;
        let mut first_err = None;
        for peer in 0..self.world {
            let (s, r) = (send[peer], recv[peer]);
            let res = (|| {
                if s.len > 0 {
                    // SAFETY: the span was checked against the live buffer,
                    // which outlives the operation (its drop waits for the
                    // access event recorded after the group); the
                    // communicator and stream are live and of one device.
                    unsafe {
                        ffi::send(
                            send_buf.addr() + s.offset,
                            s.len as usize,
                            peer as i32,
                            self.raw,
                            stream.raw(),
                        )
                    }?;
                }
                if r.len > 0 {
                    // SAFETY: as above; receive spans overlap nothing else
                    // (validated), so no two writers share a byte.
                    unsafe {
                        ffi::recv(
                            recv_buf.addr() + r.offset,
                            r.len as usize,
                            peer as i32,
                            self.raw,
                            stream.raw(),
                        )
                    }?;
                }
                Ok(())
            })();
            if let Err(e) = res {
                first_err = Some(e);
                break;
            }
        }
        // Always close the group, even after a failed call inside it.
        let end = ffi::group_end();
        match (first_err, end) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(())) => Ok(()),
        }
    }

    /// The communicator's asynchronous error, if any (`ncclCommGetAsyncError`:
    /// a peer failed, a network error). Marks the communicator failed.
    pub fn check(&self) -> Result<()> {
        if self.raw == 0 {
            return self.usable();
        }
        // SAFETY: the communicator is live while `self` is.
        let r = unsafe { ffi::comm_async_error(self.raw) };
        self.mark(r)
    }

    /// Waits until `ev` (recorded after NCCL work of this communicator)
    /// completed, checking the communicator's asynchronous error meanwhile.
    /// At `timeout` returns [`Error::Timeout`] and marks the communicator
    /// failed, so its drop aborts it instead of waiting for peers.
    pub fn wait(&self, ev: &GpuEvent, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            if self.mark(ev.query())? {
                return Ok(());
            }
            self.check()?;
            if start.elapsed() >= timeout {
                self.failed.store(true, Ordering::Release);
                return Err(Error::Timeout(format!(
                    "NCCL operation of rank {} of {} not complete after {timeout:?}",
                    self.rank, self.world
                )));
            }
            polls += 1;
            if polls < 1000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Aborts the communicator now (`ncclCommAbort`): pending operations are
    /// cancelled and peers see an error. For giving up on a group.
    pub fn abort(mut self) -> Result<()> {
        let raw = std::mem::take(&mut self.raw);
        self.dev.bind()?;
        // SAFETY: we own the communicator; `raw` is cleared so drop skips it.
        unsafe { ffi::comm_abort(raw) }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if self.raw == 0 {
            return;
        }
        let failed = self.failed.load(Ordering::Acquire) || self.check().is_err();
        let r = self.dev.bind().and_then(|()| {
            // SAFETY: we own the communicator and nothing uses it after us.
            unsafe {
                if failed {
                    ffi::comm_abort(self.raw)
                } else {
                    ffi::comm_destroy(self.raw)
                }
            }
        });
        if let Err(e) = r {
            record_drop_error("NCCL communicator", e);
        }
    }
}

/// The raw NCCL calls, over cudarc's dynamically loaded `nccl::sys`. Each
/// checks its status; nothing here owns a resource. No function but
/// [`ffi::probe`] may run before `probe` succeeded (the safe layer calls
/// [`available`] first).
#[cfg(feature = "cuda")]
mod ffi {
    use std::ffi::{c_char, c_int, c_void, CStr};
    use std::sync::OnceLock;

    use cudarc::nccl::sys;

    use super::UNIQUE_ID_BYTES;
    use crate::cuda::raw::Handle;
    use crate::error::{Error, Result};

    /// `ncclComm_t` as an integer (0 = none).
    pub(super) type Comm = usize;

    /// Oldest NCCL with point-to-point send/recv (2.7.0 in NCCL's version code).
    const MIN_VERSION: c_int = 2700;

    /// Every symbol called here: cudarc panics on a missing one.
    const SYMBOLS: &[&str] = &[
        "ncclGetVersion",
        "ncclGetErrorString",
        "ncclGetUniqueId",
        "ncclCommInitRank",
        "ncclCommDestroy",
        "ncclCommAbort",
        "ncclCommGetAsyncError",
        "ncclGroupStart",
        "ncclGroupEnd",
        "ncclSend",
        "ncclRecv",
    ];

    struct Probe {
        version: i32,
        /// `ncclGetLastError` exists (NCCL 2.13+).
        last_error: bool,
    }

    fn probed() -> &'static std::result::Result<Probe, String> {
        static PROBE: OnceLock<std::result::Result<Probe, String>> = OnceLock::new();
        PROBE.get_or_init(|| {
            // SAFETY: only dlopen of cudarc's candidate names.
            if !unsafe { sys::is_culib_present() } {
                let names = cudarc::get_lib_name_candidates("nccl");
                return Err(if so2_loads() {
                    format!(
                        "NCCL not found (libnccl.so.2): libnccl.so.2 is installed, but cudarc \
                         opens NCCL only as one of {names:?}; put a directory holding a link \
                         libnccl.so -> libnccl.so.2 on LD_LIBRARY_PATH"
                    )
                } else {
                    format!(
                        "NCCL not found (libnccl.so.2): tried libnccl.so.2 and {names:?}; \
                         install NCCL 2.7+ (libnccl2, or pip nvidia-nccl-cu12) and put a \
                         directory holding a link libnccl.so -> libnccl.so.2 on LD_LIBRARY_PATH"
                    )
                });
            }
            // SAFETY: a candidate loads, so opening it cannot panic.
            let lib = unsafe { sys::culib() };
            // SAFETY: only looks the names up; nothing is called.
            let has =
                |name: &str| unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_ok();
            if let Some(missing) = SYMBOLS.iter().find(|s| !has(s)) {
                return Err(format!(
                    "the loaded libnccl lacks {missing}: NCCL 2.7 or newer is needed"
                ));
            }
            let mut v: c_int = 0;
            // SAFETY: the symbol exists; out-pointer to a local.
            let r = unsafe { sys::ncclGetVersion(&mut v) };
            if r != sys::ncclResult_t::ncclSuccess {
                return Err(format!("ncclGetVersion failed: {r:?}"));
            }
            if v < MIN_VERSION {
                return Err(format!(
                    "NCCL version code {v} is too old: 2.7 or newer is needed"
                ));
            }
            Ok(Probe {
                version: v,
                last_error: has("ncclGetLastError"),
            })
        })
    }

    /// Whether `libnccl.so.2` loads under that name (to say why cudarc did not find it).
    fn so2_loads() -> bool {
        // SAFETY: dlopen of a NUL-terminated name; the handle is closed at once.
        unsafe {
            let h = libc::dlopen(c"libnccl.so.2".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if h.is_null() {
                false
            } else {
                libc::dlclose(h);
                true
            }
        }
    }

    /// Loads libnccl once and returns its version code; absence is `NoCuda`.
    pub(super) fn probe() -> Result<i32> {
        match probed() {
            Ok(p) => Ok(p.version),
            Err(m) => Err(Error::NoCuda(m.clone())),
        }
    }

    fn check(call: &'static str, r: sys::ncclResult_t) -> Result<()> {
        if r == sys::ncclResult_t::ncclSuccess {
            return Ok(());
        }
        // SAFETY: callers ran `probe`; NCCL returns static NUL-terminated strings.
        let mut message = unsafe { c_str(sys::ncclGetErrorString(r)) };
        if matches!(probed(), Ok(p) if p.last_error) {
            // SAFETY: the symbol exists (probed); NULL asks for this
            // thread's last error.
            let last = unsafe { c_str(sys::ncclGetLastError(std::ptr::null_mut())) };
            if !last.is_empty() {
                message = format!("{message}: {last}");
            }
        }
        Err(Error::Cuda {
            call,
            code: r as i32,
            message,
        })
    }

    /// # Safety
    /// `p` is NULL or a NUL-terminated string alive for the call.
    unsafe fn c_str(p: *const c_char) -> String {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: the caller guarantees the string.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    }

    pub(super) fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
        probe()?;
        // SAFETY: a plain C struct of bytes; all-zero is a valid value.
        let mut id: sys::ncclUniqueId = unsafe { std::mem::zeroed() };
        // SAFETY: out-pointer to a local.
        check("ncclGetUniqueId", unsafe { sys::ncclGetUniqueId(&mut id) })?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Needs the rank's device context current on this thread.
    pub(super) fn comm_init_rank(
        world: i32,
        id: &[u8; UNIQUE_ID_BYTES],
        rank: i32,
    ) -> Result<Comm> {
        probe()?;
        // SAFETY: a plain C struct of bytes.
        let mut uid: sys::ncclUniqueId = unsafe { std::mem::zeroed() };
        uid.internal = id.map(|b| b as c_char);
        let mut c: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; NCCL validates the id and ranks.
        check("ncclCommInitRank", unsafe {
            sys::ncclCommInitRank(&mut c, world, uid, rank)
        })?;
        Ok(c as Comm)
    }

    /// # Safety
    /// `c` came from [`comm_init_rank`] and is not used afterwards.
    pub(super) unsafe fn comm_destroy(c: Comm) -> Result<()> {
        // SAFETY: the caller owns the communicator.
        check("ncclCommDestroy", unsafe {
            sys::ncclCommDestroy(c as sys::ncclComm_t)
        })
    }

    /// # Safety
    /// `c` came from [`comm_init_rank`] and is not used afterwards.
    pub(super) unsafe fn comm_abort(c: Comm) -> Result<()> {
        // SAFETY: the caller owns the communicator.
        check("ncclCommAbort", unsafe {
            sys::ncclCommAbort(c as sys::ncclComm_t)
        })
    }

    /// # Safety
    /// `c` must be live.
    pub(super) unsafe fn comm_async_error(c: Comm) -> Result<()> {
        let mut e = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the caller guarantees the communicator; out-pointer to a local.
        check("ncclCommGetAsyncError", unsafe {
            sys::ncclCommGetAsyncError(c as sys::ncclComm_t, &mut e)
        })?;
        check("ncclCommGetAsyncError (asynchronous error)", e)
    }

    pub(super) fn group_start() -> Result<()> {
        probe()?;
        // SAFETY: no arguments.
        check("ncclGroupStart", unsafe { sys::ncclGroupStart() })
    }

    pub(super) fn group_end() -> Result<()> {
        probe()?;
        // SAFETY: no arguments; balances `group_start`.
        check("ncclGroupEnd", unsafe { sys::ncclGroupEnd() })
    }

    /// # Safety
    /// `buf..buf+len` is device memory of the communicator's GPU, valid
    /// until the operation completed on `s`; `c` and `s` are live.
    pub(super) unsafe fn send(buf: u64, len: usize, peer: i32, c: Comm, s: Handle) -> Result<()> {
        // SAFETY: forwarded from the caller's contract.
        check("ncclSend", unsafe {
            sys::ncclSend(
                buf as *const c_void,
                len,
                sys::ncclDataType_t::ncclUint8,
                peer,
                c as sys::ncclComm_t,
                s as sys::cudaStream_t,
            )
        })
    }

    /// # Safety
    /// As [`send`], and nothing else writes `buf..buf+len` meanwhile.
    pub(super) unsafe fn recv(buf: u64, len: usize, peer: i32, c: Comm, s: Handle) -> Result<()> {
        // SAFETY: forwarded from the caller's contract.
        check("ncclRecv", unsafe {
            sys::ncclRecv(
                buf as *mut c_void,
                len,
                sys::ncclDataType_t::ncclUint8,
                peer,
                c as sys::ncclComm_t,
                s as sys::cudaStream_t,
            )
        })
    }
}

/// The same calls in a build without the `cuda` feature, each failing with
/// "built without the cuda feature".
#[cfg(not(feature = "cuda"))]
#[allow(clippy::missing_safety_doc, clippy::unnecessary_wraps)]
mod ffi {
    use super::UNIQUE_ID_BYTES;
    use crate::cuda::raw::Handle;
    use crate::error::{Error, Result};

    pub(super) type Comm = usize;

    fn off<T>() -> Result<T> {
        Err(Error::NoCuda(
            "kvmesh-gpu was built without the cuda feature".into(),
        ))
    }

    pub(super) fn probe() -> Result<i32> {
        off()
    }
    pub(super) fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
        off()
    }
    pub(super) fn comm_init_rank(_w: i32, _id: &[u8; UNIQUE_ID_BYTES], _r: i32) -> Result<Comm> {
        off()
    }
    pub(super) unsafe fn comm_destroy(_c: Comm) -> Result<()> {
        off()
    }
    pub(super) unsafe fn comm_abort(_c: Comm) -> Result<()> {
        off()
    }
    pub(super) unsafe fn comm_async_error(_c: Comm) -> Result<()> {
        off()
    }
    pub(super) fn group_start() -> Result<()> {
        off()
    }
    pub(super) fn group_end() -> Result<()> {
        off()
    }
    pub(super) unsafe fn send(_b: u64, _l: usize, _p: i32, _c: Comm, _s: Handle) -> Result<()> {
        off()
    }
    pub(super) unsafe fn recv(_b: u64, _l: usize, _p: i32, _c: Comm, _s: Handle) -> Result<()> {
        off()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEND: (u64, u64) = (0x10_0000, 4096);
    const RECV: (u64, u64) = (0x20_0000, 4096);

    fn spans(v: &[(u64, u64)]) -> Vec<PeerSpan> {
        v.iter()
            .map(|&(offset, len)| PeerSpan { offset, len })
            .collect()
    }

    fn invalid(r: Result<()>, needle: &str) {
        let e = r.unwrap_err();
        assert!(e.to_string().contains(needle), "{e}");
    }

    #[test]
    fn packed_spans_sit_back_to_back() {
        let s = PeerSpan::packed(&[3, 0, 5]);
        assert_eq!(s, spans(&[(0, 3), (3, 0), (3, 5)]));
        assert_eq!(PeerSpan::extent(&s), 8);
        assert_eq!(PeerSpan::extent(&[]), 0);
    }

    #[test]
    fn a_packed_plan_is_accepted() {
        let send = PeerSpan::packed(&[10, 0, 30]);
        let recv = PeerSpan::packed(&[7, 0, 30]);
        validate_all_to_all_v(3, 2, SEND, &send, RECV, &recv).unwrap();
        // World of one: send to self.
        let one = PeerSpan::packed(&[4096]);
        validate_all_to_all_v(1, 0, SEND, &one, RECV, &one).unwrap();
        // Zero-length spans may sit anywhere inside, even on other spans.
        let recv = spans(&[(0, 7), (3, 0), (7, 30)]);
        validate_all_to_all_v(3, 2, SEND, &send, RECV, &recv).unwrap();
        // Send spans may read the same bytes twice.
        let send = spans(&[(0, 10), (0, 10), (0, 30)]);
        let recv = PeerSpan::packed(&[10, 10, 30]);
        validate_all_to_all_v(3, 2, SEND, &send, RECV, &recv).unwrap();
    }

    #[test]
    fn wrong_span_counts_and_ranks_are_refused() {
        let two = PeerSpan::packed(&[1, 1]);
        let three = PeerSpan::packed(&[1, 1, 1]);
        invalid(
            validate_all_to_all_v(3, 0, SEND, &two, RECV, &three),
            "one span per rank",
        );
        invalid(
            validate_all_to_all_v(3, 0, SEND, &three, RECV, &two),
            "one span per rank",
        );
        invalid(
            validate_all_to_all_v(3, 3, SEND, &three, RECV, &three),
            "does not fit",
        );
        invalid(
            validate_all_to_all_v(0, 0, SEND, &[], RECV, &[]),
            "does not fit",
        );
    }

    #[test]
    fn a_self_length_mismatch_is_refused() {
        let send = PeerSpan::packed(&[4, 8]);
        let recv = PeerSpan::packed(&[4, 9]);
        invalid(
            validate_all_to_all_v(2, 1, SEND, &send, RECV, &recv),
            "sends 8 bytes to itself but expects 9",
        );
        // Rank 0's self spans agree, the others are the peers' business.
        validate_all_to_all_v(2, 0, SEND, &send, RECV, &recv).unwrap();
    }

    #[test]
    fn spans_outside_their_buffer_are_refused() {
        let ok = PeerSpan::packed(&[16, 16]);
        for bad in [
            spans(&[(0, 16), (4090, 7)]),
            spans(&[(0, 16), (4097, 0)]),
            spans(&[(0, 16), (u64::MAX, 2)]),
        ] {
            let e = validate_all_to_all_v(2, 0, SEND, &bad, RECV, &ok).unwrap_err();
            assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
            let e = validate_all_to_all_v(2, 0, SEND, &ok, RECV, &bad).unwrap_err();
            assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
        }
        // Exactly up to the end is inside.
        let edge = spans(&[(0, 16), (4080, 16)]);
        validate_all_to_all_v(2, 0, SEND, &ok, RECV, &edge).unwrap();
    }

    #[test]
    fn overlapping_receive_spans_are_refused() {
        let send = PeerSpan::packed(&[8, 8, 8]);
        let recv = spans(&[(0, 8), (16, 8), (7, 8)]);
        invalid(
            validate_all_to_all_v(3, 0, SEND, &send, RECV, &recv),
            "overlap",
        );
        let recv = spans(&[(0, 8), (0, 8), (16, 8)]);
        invalid(
            validate_all_to_all_v(3, 0, SEND, &send, RECV, &recv),
            "overlap",
        );
    }

    #[test]
    fn receiving_over_send_bytes_of_the_same_buffer_is_refused() {
        // One buffer for both directions: sends from the first half,
        // receives into the second half is fine...
        let buf = (0x30_0000, 64);
        let send = spans(&[(0, 8), (8, 8)]);
        let recv = spans(&[(32, 8), (40, 8)]);
        validate_all_to_all_v(2, 0, buf, &send, buf, &recv).unwrap();
        // ...receiving over bytes being sent is not.
        let recv = spans(&[(32, 8), (12, 8)]);
        invalid(
            validate_all_to_all_v(2, 0, buf, &send, buf, &recv),
            "overlap",
        );
        // Different buffers at different addresses never alias.
        validate_all_to_all_v(2, 0, SEND, &send, RECV, &spans(&[(0, 8), (8, 8)])).unwrap();
    }

    proptest! {
        /// Packed plans of any lengths fit buffers of their extent; moving
        /// one receive span onto its neighbour is always caught.
        #[test]
        fn packed_plans_validate_and_shifted_ones_do_not(
            lens in prop::collection::vec(0u64..5000, 1..12),
            pick in any::<prop::sample::Index>(),
        ) {
            let world = lens.len();
            let rank = pick.index(world);
            let send = PeerSpan::packed(&lens);
            let recv = PeerSpan::packed(&lens);
            let ext = PeerSpan::extent(&send);
            validate_all_to_all_v(world, rank, (1 << 20, ext), &send, (1 << 40, ext), &recv)
                .unwrap();
            let nonzero: Vec<usize> = (0..world).filter(|&i| lens[i] > 0).collect();
            if nonzero.len() >= 2 {
                let (a, b) = (nonzero[0], nonzero[1]);
                let mut bad = recv.clone();
                bad[b].offset = bad[a].offset + bad[a].len - 1;
                let bad_ext = PeerSpan::extent(&bad).max(ext);
                let r = validate_all_to_all_v(
                    world, rank, (1 << 20, ext), &send, (1 << 40, bad_ext), &bad,
                );
                prop_assert!(r.is_err());
            }
        }
    }

    #[test]
    fn versions_decode_in_both_schemes() {
        assert_eq!(decode_version(22703), (2, 27, 3));
        assert_eq!(decode_version(2708), (2, 7, 8));
        assert_eq!(decode_version(21903), (2, 19, 3));
    }

    #[test]
    fn ids_round_trip_through_hex_and_bytes() {
        let mut b = [0u8; UNIQUE_ID_BYTES];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i * 37 + 5) as u8;
        }
        let id = NcclId::from_bytes(&b).unwrap();
        assert_eq!(id.as_bytes(), &b);
        let h = id.to_hex();
        assert_eq!(h.len(), 256);
        assert_eq!(NcclId::from_hex(&h).unwrap(), id);
        assert!(format!("{id:?}").starts_with("NcclId(052a"));
        assert!(NcclId::from_bytes(&b[..127]).is_err());
        assert!(NcclId::from_hex(&h[..254]).is_err());
        assert!(NcclId::from_hex(&format!("zz{}", &h[2..])).is_err());
        assert!(NcclId::from_hex(&format!("é{}", &h[2..])).is_err());
    }

    #[cfg(feature = "cuda")]
    const PROBE_CHILD: &str = "KVMESH_NCCL_PROBE_CHILD";

    /// With only `libnccl.so.2` (a stand-in library here) the error names
    /// the link to add; a `libnccl.so` without NCCL's symbols is refused by
    /// name instead of panicking inside cudarc. Needs a C compiler (`cc`).
    #[cfg(feature = "cuda")]
    #[test]
    fn probe_explains_a_versioned_only_or_foreign_libnccl() {
        if std::env::var_os(PROBE_CHILD).is_some() {
            match ffi::probe() {
                Ok(v) => println!("KVMESH_PROBE ok {v}"),
                Err(e) => println!("KVMESH_PROBE {e}"),
            }
            return;
        }
        if ffi::probe().is_ok() {
            return; // a real NCCL is loaded here
        }
        let dir = std::env::temp_dir().join(format!("kvmesh-nccl-probe-{}", std::process::id()));
        // A left-over folder of an earlier run with the same pid would hold
        // the link already.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("stand_in.c");
        std::fs::write(&src, "int kvmesh_stand_in(void) { return 0; }\n").unwrap();
        let so2 = dir.join("libnccl.so.2");
        let built = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&so2)
            .arg(&src)
            .status();
        if !matches!(built, Ok(s) if s.success()) {
            eprintln!("skipped: no C compiler to build a stand-in libnccl.so.2");
            return;
        }
        let probe = || {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "cuda::nccl::tests::probe_explains_a_versioned_only_or_foreign_libnccl",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(PROBE_CHILD, "1")
                .env("LD_LIBRARY_PATH", &dir)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.split_once("KVMESH_PROBE ").map(|(_, m)| m.to_string()))
                .expect("the child's verdict")
        };
        let m = probe();
        assert!(m.contains("NCCL not found (libnccl.so.2)"), "{m}");
        assert!(m.contains("libnccl.so.2 is installed"), "{m}");
        assert!(m.contains("libnccl.so -> libnccl.so.2"), "{m}");
        std::os::unix::fs::symlink("libnccl.so.2", dir.join("libnccl.so")).unwrap();
        let m = probe();
        assert!(m.contains("lacks ncclGetVersion"), "{m}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Where libnccl is missing (this build machine), the probe says so by
    /// name, every entry point fails with `NoCuda`, and nothing panics.
    #[test]
    fn absent_nccl_is_a_clear_error() {
        if available().is_ok() {
            return; // NCCL is here: gpu_nccl covers the real paths
        }
        let e = available().unwrap_err();
        assert!(matches!(e, Error::NoCuda(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("NCCL not found (libnccl.so.2)")
                || msg.contains("no CUDA driver found (libcuda.so)")
                || msg.contains("built without the cuda feature"),
            "{msg}"
        );
        // The library probe alone, whatever the driver: names the file
        // unless this machine has NCCL but no driver.
        if let Err(e) = ffi::probe() {
            let msg = e.to_string();
            assert!(
                msg.contains("NCCL not found (libnccl.so.2)")
                    || msg.contains("built without the cuda feature"),
                "{msg}"
            );
        }
        for e in [NcclId::new().unwrap_err(), version().unwrap_err()] {
            assert!(matches!(e, Error::NoCuda(_)), "{e:?}");
        }
    }
}
