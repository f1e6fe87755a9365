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
    let fd: RawFd = s.as_raw_fd();
    let mut done = 0usize;
    while done < len {
        let r = s.try_io_raw(Interest::READABLE, || {
            // SAFETY: the caller guarantees the destination range is valid.
            cvt(unsafe { libc::recv(fd, (addr + done) as *mut libc::c_void, len - done, 0) })
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.ready_for(Interest::READABLE).await?
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
