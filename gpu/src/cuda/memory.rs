//! Memory the GPU reaches: device allocations, page-locked host memory, and
//! registrations of existing host memory. Each remembers the events of its
//! last GPU read and write so work on another stream is ordered after it,
//! and its drop waits for that work before releasing the memory.

use parking_lot::Mutex;

use super::device::{record_drop_error, GpuDevice};
use super::raw;
use super::stream::{GpuEvent, GpuStream};
use crate::error::{Error, Result};

/// The last GPU read and write of a buffer.
#[derive(Debug, Default)]
pub struct AccessEvents {
    read: Mutex<Option<GpuEvent>>,
    write: Mutex<Option<GpuEvent>>,
}

impl AccessEvents {
    /// Orders `s` after the last write (read-after-write).
    pub(crate) fn before_read(&self, s: &GpuStream) -> Result<()> {
        let w = self.write.lock().clone();
        if let Some(w) = w {
            s.wait(&w)?;
        }
        Ok(())
    }

    /// Orders `s` after the last read and write (write-after-read/write).
    pub(crate) fn before_write(&self, s: &GpuStream) -> Result<()> {
        let (r, w) = (self.read.lock().clone(), self.write.lock().clone());
        for e in [r, w].into_iter().flatten() {
            s.wait(&e)?;
        }
        Ok(())
    }

    pub(crate) fn read(&self, ev: &GpuEvent) {
        *self.read.lock() = Some(ev.clone());
    }

    pub(crate) fn wrote(&self, ev: &GpuEvent) {
        *self.write.lock() = Some(ev.clone());
    }

    /// Blocks until every recorded access finished.
    pub fn synchronize(&self) -> Result<()> {
        let (r, w) = (self.read.lock().take(), self.write.lock().take());
        for e in [r, w].into_iter().flatten() {
            e.synchronize()?;
        }
        Ok(())
    }

    /// The end of a buffer's life: waits for its recorded GPU work, then
    /// releases it with `free` on `dev`'s context; failures are recorded
    /// for [`super::take_drop_errors`], never panicked.
    fn release(&self, dev: &GpuDevice, what: &str, free: impl FnOnce() -> Result<()>) {
        if let Err(e) = self.synchronize() {
            record_drop_error(&format!("{what} (waiting for its work)"), e);
        }
        if let Err(e) = dev.bind().and_then(|()| free()) {
            record_drop_error(what, e);
        }
    }
}

/// Memory that GPU copies and kernels can address (unified addressing).
pub trait GpuMemory: Send + Sync {
    /// The address of the first byte.
    fn addr(&self) -> u64;
    /// Length in bytes.
    fn byte_len(&self) -> u64;
    /// The buffer's last read and write.
    fn access(&self) -> &AccessEvents;

    /// The address of `off..off+len`, checked against the buffer.
    fn range(&self, what: &'static str, off: u64, len: u64) -> Result<u64> {
        match off.checked_add(len) {
            Some(end) if end <= self.byte_len() => Ok(self.addr() + off),
            _ => Err(Error::OutOfBounds {
                what,
                offset: off,
                len,
                region_len: self.byte_len(),
            }),
        }
    }
}

/// `GpuMemory` for a buffer with `ptr`, `len` and `access` fields.
macro_rules! gpu_memory {
    ($t:ty) => {
        impl GpuMemory for $t {
            fn addr(&self) -> u64 {
                self.ptr as u64
            }
            fn byte_len(&self) -> u64 {
                self.len
            }
            fn access(&self) -> &AccessEvents {
                &self.access
            }
        }
    };
}

/// An owned device allocation (`cuMemAlloc`), freed on drop after the GPU
/// work recorded on it finished.
pub struct DeviceBuffer {
    dev: GpuDevice,
    ptr: u64,
    len: u64,
    access: AccessEvents,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("device", &self.dev.ordinal())
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl DeviceBuffer {
    /// Allocates `len` bytes (uninitialised) on `dev`.
    pub fn alloc(dev: &GpuDevice, len: u64) -> Result<DeviceBuffer> {
        if len == 0 {
            return Err(Error::Invalid("device buffer length must be > 0".into()));
        }
        dev.bind()?;
        Ok(DeviceBuffer {
            dev: dev.clone(),
            ptr: raw::mem_alloc(len as usize)?,
            len,
            access: AccessEvents::default(),
        })
    }

    /// Allocates `len` zeroed bytes on `dev` (waits for the fill).
    pub fn zeroed(dev: &GpuDevice, len: u64) -> Result<DeviceBuffer> {
        let b = Self::alloc(dev, len)?;
        let s = GpuStream::new(dev)?;
        s.fill(&b, 0, len, 0)?;
        s.synchronize()?;
        Ok(b)
    }

    /// The device it lives on.
    pub fn device(&self) -> &GpuDevice {
        &self.dev
    }

    /// Copies `data` to `off` and waits (a convenience for tests and setup).
    pub fn write_from_host(&self, off: u64, data: &[u8]) -> Result<()> {
        let d = self.range("write_from_host", off, data.len() as u64)?;
        self.access.synchronize()?;
        self.dev.bind()?;
        // SAFETY: destination checked against the allocation; the source is a
        // live slice; cuMemcpy returns once the copy is done.
        unsafe { raw::memcpy(d, data.as_ptr() as u64, data.len()) }
    }

    /// Copies bytes at `off` into `out` and waits.
    pub fn read_to_host(&self, off: u64, out: &mut [u8]) -> Result<()> {
        let s = self.range("read_to_host", off, out.len() as u64)?;
        self.access.synchronize()?;
        self.dev.bind()?;
        // SAFETY: source checked; destination is a live exclusive slice.
        unsafe { raw::memcpy(out.as_mut_ptr() as u64, s, out.len()) }
    }
}

gpu_memory!(DeviceBuffer);

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: we own the allocation and its recorded work finished.
        self.access.release(&self.dev, "device buffer", || unsafe {
            raw::mem_free(self.ptr)
        });
    }
}

/// Page-locked host memory (`cuMemHostAlloc`, portable to every context):
/// the fast path between host and device.
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: u64,
    dev: GpuDevice,
    access: AccessEvents,
}

// SAFETY: the buffer owns its allocation; shared access only hands out the
// address (GPU work is ordered by `access`); `&mut` methods are exclusive.
unsafe impl Send for PinnedBuffer {}
// SAFETY: as above.
unsafe impl Sync for PinnedBuffer {}

impl std::fmt::Debug for PinnedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedBuffer")
            .field("len", &self.len)
            .finish()
    }
}

impl PinnedBuffer {
    /// Allocates `len` zeroed bytes of page-locked memory.
    pub fn alloc(dev: &GpuDevice, len: u64) -> Result<PinnedBuffer> {
        if len == 0 {
            return Err(Error::Invalid("pinned buffer length must be > 0".into()));
        }
        dev.bind()?;
        let ptr = raw::mem_host_alloc(len as usize)?;
        // SAFETY: a fresh allocation of `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, 0, len as usize) };
        Ok(PinnedBuffer {
            ptr,
            len,
            dev: dev.clone(),
            access: AccessEvents::default(),
        })
    }

    /// The bytes, after waiting for GPU work on the buffer.
    pub fn as_slice(&mut self) -> Result<&[u8]> {
        self.access.synchronize()?;
        // SAFETY: we own `len` bytes; `&mut self` excludes new GPU work.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len as usize) })
    }

    /// The bytes, mutably, after waiting for GPU work on the buffer.
    pub fn as_mut_slice(&mut self) -> Result<&mut [u8]> {
        self.access.synchronize()?;
        // SAFETY: as above, exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len as usize) })
    }

    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

gpu_memory!(PinnedBuffer);

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: we own the allocation and its recorded work finished.
        self.access.release(&self.dev, "pinned buffer", || unsafe {
            raw::mem_free_host(self.ptr)
        });
    }
}

/// Existing host memory page-locked for the GPU (`cuMemHostRegister`),
/// unregistered on drop.
pub struct HostRegistration {
    ptr: *mut u8,
    len: u64,
    dev: GpuDevice,
    access: AccessEvents,
}

// SAFETY: see `PinnedBuffer`; the caller keeps the memory alive (contract of `new`).
unsafe impl Send for HostRegistration {}
// SAFETY: as above.
unsafe impl Sync for HostRegistration {}

impl std::fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostRegistration")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl HostRegistration {
    /// Page-locks `ptr..ptr+len`.
    ///
    /// # Safety
    /// The range must be valid host memory that outlives the returned value.
    pub unsafe fn new(dev: &GpuDevice, ptr: *mut u8, len: u64) -> Result<HostRegistration> {
        if ptr.is_null() || len == 0 {
            return Err(Error::Invalid("null or empty host range".into()));
        }
        dev.bind()?;
        // SAFETY: forwarded from the caller's contract.
        unsafe { raw::mem_host_register(ptr, len as usize) }?;
        Ok(HostRegistration {
            ptr,
            len,
            dev: dev.clone(),
            access: AccessEvents::default(),
        })
    }
}

gpu_memory!(HostRegistration);

impl Drop for HostRegistration {
    fn drop(&mut self) {
        // SAFETY: we registered exactly this start address.
        self.access
            .release(&self.dev, "host registration", || unsafe {
                raw::mem_host_unregister(self.ptr)
            });
    }
}

/// A page-locked bounce buffer for staging copies between device memory and
/// host memory the GPU cannot reach directly (sockets, shared-memory
/// mappings). One per lane, connection or copy thread; grows on demand.
#[derive(Debug, Default)]
pub(crate) struct Bounce {
    buf: Option<PinnedBuffer>,
}

/// Smallest bounce buffer allocated.
const BOUNCE_MIN: u64 = 1 << 20;
/// Staged copies larger than this go through the buffer in pieces.
pub(crate) const BOUNCE_MAX: u64 = 64 << 20;

impl Bounce {
    /// A pinned buffer of at least `len` bytes (at most [`BOUNCE_MAX`]).
    pub(crate) fn get(&mut self, dev: &GpuDevice, len: u64) -> Result<&PinnedBuffer> {
        let want = len.clamp(BOUNCE_MIN, BOUNCE_MAX).next_power_of_two();
        if self
            .buf
            .as_ref()
            .is_none_or(|b| b.len < len.min(BOUNCE_MAX))
        {
            self.buf = None;
            self.buf = Some(PinnedBuffer::alloc(dev, want)?);
        }
        Ok(self.buf.as_ref().expect("allocated above"))
    }

    /// Fills the buffer's first `len` bytes from device memory `src` and
    /// returns the buffer's address.
    ///
    /// # Safety
    /// `src..src+len` must be device memory of `dev` not written meanwhile;
    /// `len` at most [`BOUNCE_MAX`].
    pub(crate) unsafe fn fill_from_device(
        &mut self,
        dev: &GpuDevice,
        src: u64,
        len: u64,
    ) -> Result<*mut u8> {
        let b = self.get(dev, len)?.as_mut_ptr();
        dev.bind()?;
        // SAFETY: the bounce holds `len` bytes; the source is the caller's contract.
        unsafe { raw::memcpy(b as u64, src, len as usize) }?;
        Ok(b)
    }

    /// The address of a buffer of at least `len` bytes to receive into.
    pub(crate) fn receive_area(&mut self, dev: &GpuDevice, len: u64) -> Result<*mut u8> {
        Ok(self.get(dev, len)?.as_mut_ptr())
    }

    /// Copies the buffer's first `len` bytes (received through
    /// [`Bounce::receive_area`]) to device memory `dst`.
    ///
    /// # Safety
    /// `dst..dst+len` must be device memory of `dev` nobody else uses meanwhile.
    pub(crate) unsafe fn drain_to_device(
        &mut self,
        dev: &GpuDevice,
        dst: u64,
        len: u64,
    ) -> Result<()> {
        let b = self.get(dev, len)?.as_mut_ptr();
        dev.bind()?;
        // SAFETY: the bounce holds `len` received bytes (same buffer as the
        // receive area: `get` reallocates only for a larger `len`).
        unsafe { raw::memcpy(dst, b as u64, len as usize) }
    }

    /// Copies device bytes `src..src+len` to host memory `dst` through the buffer.
    ///
    /// # Safety
    /// `src` must be a device range of `dev` and `dst` a host range, both
    /// valid for `len` bytes and not written by anyone else meanwhile.
    pub(crate) unsafe fn device_to_host(
        &mut self,
        dev: &GpuDevice,
        dst: *mut u8,
        src: u64,
        len: u64,
    ) -> Result<()> {
        let b = self.get(dev, len)?.as_mut_ptr();
        let piece = len.clamp(1, BOUNCE_MAX);
        dev.bind()?;
        let mut done = 0;
        while done < len {
            let n = piece.min(len - done);
            // SAFETY: the bounce holds at least `piece` bytes; ranges per the
            // caller's contract; cuMemcpy returns when the copy finished.
            unsafe {
                raw::memcpy(b as u64, src + done, n as usize)?;
                std::ptr::copy_nonoverlapping(b, dst.add(done as usize), n as usize);
            }
            done += n;
        }
        Ok(())
    }

    /// Copies host bytes `src..src+len` to device memory `dst` through the buffer.
    ///
    /// # Safety
    /// As [`Bounce::device_to_host`], directions swapped.
    pub(crate) unsafe fn host_to_device(
        &mut self,
        dev: &GpuDevice,
        dst: u64,
        src: *const u8,
        len: u64,
    ) -> Result<()> {
        let b = self.get(dev, len)?.as_mut_ptr();
        let piece = len.clamp(1, BOUNCE_MAX);
        dev.bind()?;
        let mut done = 0;
        while done < len {
            let n = piece.min(len - done);
            // SAFETY: as in `device_to_host`; cuMemcpy from pinned memory is
            // complete when it returns, so the bounce can be refilled.
            unsafe {
                std::ptr::copy_nonoverlapping(src.add(done as usize), b, n as usize);
                raw::memcpy(dst + done, b as u64, n as usize)?;
            }
            done += n;
        }
        Ok(())
    }
}

/// Synchronous copy between two addresses of any kind (device, pinned,
/// pageable host), with `dev`'s context current.
///
/// # Safety
/// Both ranges must be valid for `len` bytes for the duration of the call.
pub(crate) unsafe fn copy_sync(dev: &GpuDevice, dst: u64, src: u64, len: u64) -> Result<()> {
    dev.bind()?;
    // SAFETY: forwarded from the caller's contract.
    unsafe { raw::memcpy(dst, src, len as usize) }
}

/// Fills a device range synchronously.
///
/// # Safety
/// The range must be valid device memory of `dev`.
pub(crate) unsafe fn fill_sync(dev: &GpuDevice, dst: u64, len: u64, byte: u8) -> Result<()> {
    let s = GpuStream::new(dev)?;
    // SAFETY: forwarded; the stream is synchronised before returning.
    unsafe { raw::memset_d8_async(dst, byte, len as usize, s.raw()) }?;
    s.synchronize()
}
