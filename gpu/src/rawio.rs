//! Raw-pointer socket I/O on tokio streams: payloads go straight between the
//! socket and registered memory (no intermediate buffer and no Rust reference
//! to memory that the engine shares with the caller).

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;

/// A tokio stream we can do readiness-driven raw syscalls on.
pub(crate) trait RawStream: AsRawFd {
    fn try_io_raw<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>)
        -> io::Result<R>;
    fn ready_for(
        &self,
        interest: Interest,
    ) -> impl std::future::Future<Output = io::Result<()>> + Send;
}

impl RawStream for tokio::net::TcpStream {
    fn try_io_raw<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        self.try_io(interest, f)
    }
    async fn ready_for(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(|_| ())
    }
}

impl RawStream for tokio::net::UnixStream {
    fn try_io_raw<R>(
        &self,
        interest: Interest,
        f: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        self.try_io(interest, f)
    }
    async fn ready_for(&self, interest: Interest) -> io::Result<()> {
        self.ready(interest).await.map(|_| ())
    }
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Receives exactly `len` bytes into `addr..addr+len`.
///
/// # Safety
/// The range must be valid for writes for the whole call and not be
/// referenced by any live Rust reference.
pub(crate) async unsafe fn read_exact_raw<S: RawStream>(
    s: &S,
    addr: usize,
    len: usize,
) -> io::Result<()> {
    // SAFETY: same contract.
    unsafe { read_exact_raw_spin(s, addr, len, std::time::Duration::ZERO) }.await
}

/// [`read_exact_raw`] for a caller that expects the bytes within
/// microseconds: while the socket is empty it polls it with non-blocking
/// `recv` for up to `spin` (counted from the last progress) before it parks
/// on readiness (zero: parks at once). Parking costs two thread wake-ups
/// (the reactor's, then this task's) when the bytes come; a short poll
/// costs none.
///
/// # Safety
/// As for [`read_exact_raw`].
pub(crate) async unsafe fn read_exact_raw_spin<S: RawStream>(
    s: &S,
    addr: usize,
    len: usize,
    spin: std::time::Duration,
) -> io::Result<()> {
    let fd: RawFd = s.as_raw_fd();
    let mut done = 0usize;
    let mut until: Option<std::time::Instant> = None;
    while done < len {
        let r = s.try_io_raw(Interest::READABLE, || {
            // SAFETY: the caller guarantees the destination range is valid.
            cvt(unsafe { libc::recv(fd, (addr + done) as *mut libc::c_void, len - done, 0) })
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                done += n;
                until = None;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && spin.is_zero() => {
                s.ready_for(Interest::READABLE).await?
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Polling bypasses the reactor's readiness; readiness was
                // just cleared above, so an edge that arrives while we poll
                // still wakes the `ready_for` below.
                let deadline = *until.get_or_insert_with(|| std::time::Instant::now() + spin);
                let mut got = false;
                while std::time::Instant::now() < deadline {
                    // SAFETY: as above.
                    let n = unsafe {
                        libc::recv(
                            fd,
                            (addr + done) as *mut libc::c_void,
                            len - done,
                            libc::MSG_DONTWAIT,
                        )
                    };
                    match cvt(n) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => {
                            done += n;
                            got = true;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if got {
                    // Progress: the next gap gets a full poll again.
                    until = None;
                } else {
                    s.ready_for(Interest::READABLE).await?
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes into a Rust buffer.
pub(crate) async fn read_exact<S: RawStream>(s: &S, buf: &mut [u8]) -> io::Result<()> {
    // SAFETY: `buf` is an exclusive borrow valid for the call.
    unsafe { read_exact_raw(s, buf.as_mut_ptr() as usize, buf.len()).await }
}

/// Discards exactly `len` bytes.
pub(crate) async fn discard<S: RawStream>(s: &S, mut len: u64) -> io::Result<()> {
    let mut scratch = vec![0u8; 64 * 1024];
    while len > 0 {
        let n = (scratch.len() as u64).min(len) as usize;
        read_exact(s, &mut scratch[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

/// Sends all of the given (address, length) pieces with `writev`.
///
/// # Safety
/// Every range must be valid for reads for the whole call.
pub(crate) async unsafe fn write_all_raw<S: RawStream>(
    s: &S,
    parts: &[(usize, usize)],
) -> io::Result<()> {
    let fd = s.as_raw_fd();
    // (address, length) pairs; iovecs are built inside the closure so the
    // future holds no raw pointers across awaits (and stays `Send`).
    let mut rest: Vec<(usize, usize)> = parts.iter().copied().filter(|p| p.1 > 0).collect();
    let mut first = 0usize;
    while first < rest.len() {
        let cnt = (rest.len() - first).min(64);
        let r = s.try_io_raw(Interest::WRITABLE, || {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 64];
            for (v, &(a, l)) in iov.iter_mut().zip(&rest[first..first + cnt]) {
                *v = libc::iovec {
                    iov_base: a as *mut libc::c_void,
                    iov_len: l,
                };
            }
            // SAFETY: iovecs point to ranges the caller guarantees are valid.
            cvt(unsafe { libc::writev(fd, iov.as_ptr(), cnt as libc::c_int) })
        });
        match r {
            Ok(mut n) => {
                while n > 0 && first < rest.len() {
                    let v = &mut rest[first];
                    if n >= v.1 {
                        n -= v.1;
                        first += 1;
                    } else {
                        v.0 += n;
                        v.1 -= n;
                        n = 0;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.ready_for(Interest::WRITABLE).await?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends a Rust buffer.
pub(crate) async fn write_all<S: RawStream>(s: &S, buf: &[u8]) -> io::Result<()> {
    // SAFETY: `buf` is borrowed for the call.
    unsafe { write_all_raw(s, &[(buf.as_ptr() as usize, buf.len())]).await }
}

/// A pipe used to send payloads without copying them: `vmsplice` puts
/// references to the caller's pages into the pipe, `splice` moves them into
/// the socket. The receiver copies once out of the socket, so a payload
/// crosses the memory bus once on the sending side instead of twice.
///
/// The pages stay referenced until the peer has read them; the engine only
/// reuses a written range after the peer acknowledged it (writes) or treats
/// the bytes of an in-flight read as undefined (reads), as with RDMA.
#[derive(Debug)]
pub(crate) struct SplicePipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
    cap: usize,
}

/// Payloads at least this large go through the pipe; smaller ones through
/// `writev` (the two syscalls per piece would cost more than the copy).
pub(crate) const SPLICE_MIN: usize = 64 << 10;

impl SplicePipe {
    pub(crate) fn new() -> io::Result<SplicePipe> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors we own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // 1 MiB is the default pipe-max-size; keep the default on failure.
        // SAFETY: fcntl on a descriptor we own.
        let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        let cap = if got > 0 {
            got as usize
        } else {
            // SAFETY: fcntl on a descriptor we own.
            unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) }.max(4096) as usize
        };
        Ok(SplicePipe { r, w, cap })
    }
}

/// Sends `hdr` then `len` bytes at `addr`, the payload through `pipe`.
///
/// # Safety
/// `addr..addr+len` must stay mapped for the call (the pages are referenced,
/// not copied, so their content may still be read after it returns until the
/// peer consumed it).
pub(crate) async unsafe fn write_spliced<S: RawStream>(
    s: &S,
    pipe: &SplicePipe,
    hdr: &[u8],
    addr: usize,
    len: usize,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    // Header first; MSG_MORE lets the kernel put it in the payload's segment.
    let mut sent = 0;
    while sent < hdr.len() {
        let r = s.try_io_raw(Interest::WRITABLE, || {
            // SAFETY: the header slice is valid for the call.
            cvt(unsafe {
                libc::send(
                    fd,
                    hdr[sent..].as_ptr().cast(),
                    hdr.len() - sent,
                    libc::MSG_MORE | libc::MSG_NOSIGNAL,
                )
            })
        });
        match r {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.ready_for(Interest::WRITABLE).await?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let (pr, pw) = (pipe.r.as_raw_fd(), pipe.w.as_raw_fd());
    let mut off = 0usize;
    let mut in_pipe = 0usize;
    while off < len || in_pipe > 0 {
        if in_pipe == 0 {
            let iov = libc::iovec {
                iov_base: (addr + off) as *mut libc::c_void,
                iov_len: (len - off).min(pipe.cap),
            };
            // SAFETY: the range is valid (caller); the pipe is empty, so a
            // non-blocking vmsplice of at most its capacity makes progress.
            let n = unsafe { libc::vmsplice(pw, &iov, 1, libc::SPLICE_F_NONBLOCK) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            in_pipe = n as usize;
            off += n as usize;
        }
        let more = if off < len { libc::SPLICE_F_MORE } else { 0 };
        let r = s.try_io_raw(Interest::WRITABLE, || {
            // SAFETY: plain splice between descriptors we own.
            cvt(unsafe {
                libc::splice(
                    pr,
                    std::ptr::null_mut(),
                    fd,
                    std::ptr::null_mut(),
                    in_pipe,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK | more,
                )
            })
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => in_pipe -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.ready_for(Interest::WRITABLE).await?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
