//! Registered memory: what a region is, how engine-owned memory is allocated,
//! and the descriptor a peer needs to reach a region.
//!
//! Engine-allocated host memory lives in a `memfd` mapped `MAP_SHARED`, so the
//! `shm` transport can hand the same pages to another process on the host and
//! let it copy in or out with no help from this process. Memory the caller
//! registers from its own pointer is reachable over `tcp` (and, for GPU
//! memory, over the GPU transports) but not over `shm`.
//!
//! GPU regions hold device memory (engine-allocated, or the caller's, such
//! as a tensor) plus its CUDA IPC export, so a same-host peer can open it
//! (`cuda-ipc`); other transports stage GPU bytes through pinned host memory.
//!
//! A region registered with NICs carries that registration as an opaque
//! [`NicRegistration`] (dropped before the memory goes) plus the
//! descriptor part peers need; the registering transport lives elsewhere.
//!
//! This module must not depend on any transport.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use serde::{Deserialize, Serialize};

use crate::desc::PeerDesc;
use crate::error::{Error, Result};

/// Where the bytes of a region live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemoryKind {
    /// Ordinary (pageable) host memory.
    Host,
    /// Host memory locked in RAM (and registered with CUDA when a driver is
    /// present) so DMA engines can reach it.
    HostPinned,
    /// Host memory in a shared-memory object other processes can map.
    Shm,
    /// Memory of the GPU with this ordinal.
    Gpu { device: u32 },
}

impl MemoryKind {
    /// Whether the bytes are addressable by the CPU of this process.
    pub fn is_host(self) -> bool {
        !matches!(self, MemoryKind::Gpu { .. })
    }
}

impl std::fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryKind::Host => f.write_str("host"),
            MemoryKind::HostPinned => f.write_str("host-pinned"),
            MemoryKind::Shm => f.write_str("shm"),
            MemoryKind::Gpu { device } => write!(f, "gpu:{device}"),
        }
    }
}

/// Identifier of a region inside one engine.
pub type RegionId = u64;

enum Backing {
    /// A memfd mapped by us; unmapped on drop.
    Memfd { fd: OwnedFd },
    /// Private anonymous memory mapped by us (engines that serve no `shm`):
    /// the mapping starting at `base` is `map_len` bytes, unmapped on drop.
    Private { base: NonNull<u8>, map_len: usize },
    /// Memory owned by the caller; never freed by us.
    External,
    /// Device memory: ours (`owned`) or the caller's, with its IPC export
    /// when the driver could export it.
    Gpu {
        dev: crate::cuda::GpuDevice,
        /// Engine-allocated memory, freed when the region goes.
        _owned: Option<crate::cuda::DeviceBuffer>,
        ipc: Option<crate::cuda::IpcExport>,
    },
}

/// The shared state behind a [`Region`] handle. The memory stays valid for as
/// long as any `Arc<RegionInner>` lives, which is how in-flight operations
/// keep a deregistered region's memory alive until they finish.
pub(crate) struct RegionInner {
    pub(crate) id: RegionId,
    ptr: NonNull<u8>,
    pub(crate) len: u64,
    pub(crate) kind: MemoryKind,
    backing: Backing,
    locked: bool,
    /// Operations currently using the memory (see [`InUse`]).
    inflight: std::sync::atomic::AtomicUsize,
    /// The region's NIC registration while it has one (RDMA).
    nic: parking_lot::Mutex<Option<NicRegistration>>,
}

/// A registration of a region's memory with a transport that addresses it
/// by key (RDMA memory regions): the descriptor part peers need and the
/// transport's own handle, released when the registration is dropped.
pub(crate) struct NicRegistration {
    pub(crate) desc: crate::rdma_wire::RdmaRegionDesc,
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) handle: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for NicRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NicRegistration")
            .field("desc", &self.desc)
            .finish_non_exhaustive()
    }
}

// SAFETY: `ptr` points to memory that this value keeps alive (memfd mapping)
// or that the caller promised to keep alive until deregistration completes
// (`Engine::register`). The engine only touches it through raw-pointer copies;
// concurrent access by the caller to bytes in flight is the documented
// one-sided contract (as with RDMA), never a use-after-free.
unsafe impl Send for RegionInner {}
// SAFETY: see `Send`; shared references only hand out the raw pointer.
unsafe impl Sync for RegionInner {}

impl std::fmt::Debug for RegionInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.id)
            .field("len", &self.len)
            .field("kind", &self.kind)
            .field("shareable", &self.memfd().is_some())
            .finish()
    }
}

impl RegionInner {
    /// Allocates `len` bytes of engine-owned, shareable host memory.
    pub(crate) fn alloc_memfd(id: RegionId, len: u64, kind: MemoryKind) -> Result<Self> {
        if len == 0 {
            return Err(Error::Invalid("region length must be > 0".into()));
        }
        let name = c"kvmesh-region";
        // SAFETY: FFI call with a valid NUL-terminated name.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: FFI call on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(Error::io(
                "ftruncate memfd",
                std::io::Error::last_os_error(),
            ));
        }
        let ptr = map_shared(&fd, len, true)?;
        Self::engine_host(id, ptr, len, kind, Backing::Memfd { fd })
    }

    /// An engine-owned host region of `len` bytes at `ptr`, freed with
    /// `backing`; `HostPinned` memory is locked.
    fn engine_host(
        id: RegionId,
        ptr: NonNull<u8>,
        len: u64,
        kind: MemoryKind,
        backing: Backing,
    ) -> Result<Self> {
        let mut inner = RegionInner {
            id,
            ptr,
            len,
            kind,
            backing,
            locked: false,
            inflight: Default::default(),
            nic: Default::default(),
        };
        if kind == MemoryKind::HostPinned {
            inner.lock()?;
        }
        Ok(inner)
    }

    /// Allocates `len` bytes of engine-owned private host memory, for an
    /// engine that serves no `shm` (nobody else maps its memory).
    ///
    /// Regions of at least one huge page are aligned to it and advised
    /// (`MADV_HUGEPAGE`) onto transparent huge pages where the kernel allows
    /// them for anonymous memory (`always` or `madvise`): socket copies then
    /// walk a few 2 MiB pages instead of thousands of 4 KiB ones, which
    /// measured 1.3-1.5x faster on loopback TCP with 128 MiB regions.
    /// Shared memfds cannot get them unless the host enables shmem huge
    /// pages, so engines serving `shm` keep [`RegionInner::alloc_memfd`].
    pub(crate) fn alloc_private(id: RegionId, len: u64, kind: MemoryKind) -> Result<Self> {
        if len == 0 {
            return Err(Error::Invalid("region length must be > 0".into()));
        }
        let len_us = usize::try_from(len)
            .map_err(|_| Error::Invalid(format!("region of {len} bytes is too large")))?;
        let huge = len_us >= HUGE_PAGE;
        let map_len = if huge {
            len_us
                .checked_add(HUGE_PAGE)
                .ok_or_else(|| Error::Invalid(format!("region of {len} bytes is too large")))?
        } else {
            len_us
        };
        let base = map_rw(map_len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)?;
        let start = if huge {
            let skip = base.as_ptr().align_offset(HUGE_PAGE);
            // SAFETY: `skip < HUGE_PAGE`, inside the mapping; the advice
            // only changes how the range is backed (failure is harmless:
            // the kernel keeps 4 KiB pages).
            unsafe {
                let start = base.as_ptr().add(skip);
                libc::madvise(start.cast(), len_us, libc::MADV_HUGEPAGE);
                start
            }
        } else {
            base.as_ptr()
        };
        // Fault the pages in now (as `MAP_POPULATE` does for memfds), so the
        // first transfers do not pay for it.
        // SAFETY: `start..start+len` lies inside the fresh mapping.
        unsafe { prefault(start, len_us) };
        let ptr = NonNull::new(start).expect("inside a non-null mapping");
        Self::engine_host(id, ptr, len, kind, Backing::Private { base, map_len })
    }

    /// Allocates `len` zeroed bytes on GPU `device` and exports them for IPC.
    pub(crate) fn alloc_gpu(id: RegionId, len: u64, device: u32) -> Result<Self> {
        if len == 0 {
            return Err(Error::Invalid("region length must be > 0".into()));
        }
        let dev = crate::cuda::GpuDevice::open(device)?;
        let buf = crate::cuda::DeviceBuffer::zeroed(&dev, len)?;
        let ptr = crate::cuda::GpuMemory::addr(&buf);
        let ipc = export_or_log(&dev, ptr, len);
        Ok(RegionInner {
            id,
            ptr: NonNull::new(ptr as *mut u8)
                .ok_or_else(|| Error::Invalid("cuMemAlloc returned null".into()))?,
            len,
            kind: MemoryKind::Gpu { device },
            backing: Backing::Gpu {
                dev,
                _owned: Some(buf),
                ipc,
            },
            locked: false,
            inflight: Default::default(),
            nic: Default::default(),
        })
    }

    /// Wraps caller-owned device memory of GPU `device` after checking that
    /// the whole range belongs to one allocation of that device.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay allocated until the region is deregistered
    /// and that call has returned.
    pub(crate) unsafe fn external_gpu(
        id: RegionId,
        ptr: *mut u8,
        len: u64,
        device: u32,
    ) -> Result<Self> {
        let nn = NonNull::new(ptr).ok_or_else(|| Error::Invalid("null region pointer".into()))?;
        if len == 0 {
            return Err(Error::Invalid("region length must be > 0".into()));
        }
        let dev = crate::cuda::GpuDevice::open(device)?;
        match crate::cuda::pointer_device(ptr as u64)? {
            Some(d) if d == device => {}
            Some(d) => {
                return Err(Error::Invalid(format!(
                    "pointer {ptr:p} is memory of GPU {d}, not GPU {device}"
                )))
            }
            None => {
                return Err(Error::Invalid(format!(
                    "pointer {ptr:p} is not device memory of GPU {device}"
                )))
            }
        }
        let (base, alloc_len) = crate::cuda::allocation_range(ptr as u64)?;
        if (ptr as u64 - base)
            .checked_add(len)
            .is_none_or(|e| e > alloc_len)
        {
            return Err(Error::OutOfBounds {
                what: "registered GPU range",
                offset: ptr as u64 - base,
                len,
                region_len: alloc_len,
            });
        }
        let ipc = export_or_log(&dev, ptr as u64, len);
        Ok(RegionInner {
            id,
            ptr: nn,
            len,
            kind: MemoryKind::Gpu { device },
            backing: Backing::Gpu {
                dev,
                _owned: None,
                ipc,
            },
            locked: false,
            inflight: Default::default(),
            nic: Default::default(),
        })
    }

    /// Wraps caller-owned memory.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads and writes until the region
    /// is deregistered and that call has returned.
    pub(crate) unsafe fn external(
        id: RegionId,
        ptr: *mut u8,
        len: u64,
        kind: MemoryKind,
    ) -> Result<Self> {
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::Invalid("null region pointer".into()))?;
        if len == 0 {
            return Err(Error::Invalid("region length must be > 0".into()));
        }
        let mut inner = RegionInner {
            id,
            ptr,
            len,
            kind,
            backing: Backing::External,
            locked: false,
            inflight: Default::default(),
            nic: Default::default(),
        };
        if kind == MemoryKind::HostPinned {
            inner.lock()?;
        }
        Ok(inner)
    }

    fn lock(&mut self) -> Result<()> {
        // SAFETY: the range is valid memory of this region.
        if unsafe { libc::mlock(self.ptr.as_ptr().cast(), self.len as usize) } != 0 {
            return Err(Error::io(
                format!(
                    "mlock of {} bytes for pinned region (check RLIMIT_MEMLOCK)",
                    self.len
                ),
                std::io::Error::last_os_error(),
            ));
        }
        self.locked = true;
        Ok(())
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn memfd(&self) -> Option<&OwnedFd> {
        match &self.backing {
            Backing::Memfd { fd } => Some(fd),
            _ => None,
        }
    }

    /// The device of a GPU region.
    pub(crate) fn gpu_device(&self) -> Option<&crate::cuda::GpuDevice> {
        match &self.backing {
            Backing::Gpu { dev, .. } => Some(dev),
            _ => None,
        }
    }

    fn gpu_desc(&self) -> Option<GpuRegionDesc> {
        let Backing::Gpu { dev, ipc, .. } = &self.backing else {
            return None;
        };
        Some(GpuRegionDesc {
            device: dev.ordinal(),
            host_id: crate::desc::machine_id(),
            pid: std::process::id(),
            ipc_handle: ipc.map(|x| x.handle.to_vec()).unwrap_or_default(),
            ipc_offset: ipc.map_or(0, |x| x.offset),
            addr: self.ptr.as_ptr() as u64,
        })
    }

    /// Checks `offset..offset+len` against the region.
    pub(crate) fn check(&self, what: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds {
                what,
                offset,
                len,
                region_len: self.len,
            }),
        }
    }
}

impl RegionInner {
    /// Attaches a NIC registration (before the region is shared).
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn set_nic(&mut self, r: NicRegistration) {
        *self.nic.get_mut() = Some(r);
    }

    /// Drops the NIC registration: peers' keys stop working. Called once no
    /// operation uses the region any more.
    pub(crate) fn release_nic(&self) {
        drop(self.nic.lock().take());
    }

    /// Runs `f` on the NIC registration, if any.
    pub(crate) fn with_nic<T>(&self, f: impl FnOnce(&NicRegistration) -> T) -> Option<T> {
        self.nic.lock().as_ref().map(f)
    }

    /// Operations currently using the memory.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Marks a region as used by an operation for as long as it lives;
/// deregistration waits until no `InUse` remains.
#[derive(Debug)]
pub(crate) struct InUse(std::sync::Arc<RegionInner>);

impl InUse {
    pub(crate) fn new(r: std::sync::Arc<RegionInner>) -> Self {
        r.inflight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InUse(r)
    }
}

impl std::ops::Deref for InUse {
    type Target = RegionInner;
    fn deref(&self) -> &RegionInner {
        &self.0
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0
            .inflight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for RegionInner {
    fn drop(&mut self) {
        // NICs stop addressing the memory before it is unlocked or unmapped.
        drop(self.nic.get_mut().take());
        if self.locked {
            // SAFETY: the range was locked by us and is still mapped.
            unsafe { libc::munlock(self.ptr.as_ptr().cast(), self.len as usize) };
        }
        let mapping = match self.backing {
            Backing::Memfd { .. } => Some((self.ptr, self.len as usize)),
            Backing::Private { base, map_len } => Some((base, map_len)),
            Backing::External | Backing::Gpu { .. } => None,
        };
        if let Some((base, map_len)) = mapping {
            // SAFETY: we mapped exactly this range in `alloc_memfd` or
            // `alloc_private`; every user of the pointer holds an `Arc` to
            // us, so none remain.
            let rc = unsafe { libc::munmap(base.as_ptr().cast(), map_len) };
            if rc != 0 {
                tracing::warn!(
                    region = self.id,
                    "munmap failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

fn export_or_log(
    dev: &crate::cuda::GpuDevice,
    ptr: u64,
    len: u64,
) -> Option<crate::cuda::IpcExport> {
    match crate::cuda::IpcExport::new(dev, ptr, len) {
        Ok(x) => Some(x),
        Err(e) => {
            tracing::warn!("GPU region at {ptr:#x} cannot be exported for CUDA IPC: {e}");
            None
        }
    }
}

/// Size of a transparent huge page on the platforms kvmesh runs on.
const HUGE_PAGE: usize = 2 << 20;

/// Writes one zero byte per 4 KiB page of fresh anonymous memory, so every
/// page (or huge page) is faulted in; the memory reads as zeros either way.
///
/// # Safety
/// `ptr..ptr+len` must be writable memory nobody else uses yet.
unsafe fn prefault(ptr: *mut u8, len: usize) {
    let mut off = 0;
    while off < len {
        // SAFETY: `off < len`, inside the range the caller owns.
        unsafe { ptr.add(off).write_volatile(0) };
        off += 4096;
    }
}

/// Maps a shared-memory descriptor read-write.
pub(crate) fn map_shared(fd: &OwnedFd, len: u64, populate: bool) -> Result<NonNull<u8>> {
    let flags = libc::MAP_SHARED | if populate { libc::MAP_POPULATE } else { 0 };
    map_rw(len as usize, flags, fd.as_raw_fd())
}

/// A fresh read-write mapping of `len` bytes (`fd` -1 for anonymous memory).
fn map_rw(len: usize, flags: libc::c_int, fd: libc::c_int) -> Result<NonNull<u8>> {
    // SAFETY: FFI call; a fresh mapping chosen by the kernel aliases nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::io(
            format!("mmap of {len} bytes"),
            std::io::Error::last_os_error(),
        ));
    }
    NonNull::new(p.cast()).ok_or_else(|| Error::Invalid("mmap returned null".into()))
}

/// A registered memory region: a cheap, cloneable handle.
///
/// The engine moves bytes in and out of the region one-sidedly: while a batch
/// that touches a range is in flight, the caller must not rely on the bytes
/// of that range (same contract as RDMA memory regions).
#[derive(Debug, Clone)]
pub struct Region {
    pub(crate) inner: std::sync::Arc<RegionInner>,
    pub(crate) peer: std::sync::Arc<PeerDesc>,
}

impl Region {
    /// The region's id in its engine.
    pub fn id(&self) -> RegionId {
        self.inner.id
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether the region is empty (never true for a registered region).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// Where the bytes live.
    pub fn kind(&self) -> MemoryKind {
        self.inner.kind
    }

    /// Base address (a device pointer for GPU regions).
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.ptr()
    }

    /// Whether another process on this host can map the region (`shm`).
    pub fn is_shareable(&self) -> bool {
        self.inner.memfd().is_some()
    }

    /// The descriptor a peer needs to reach this region.
    pub fn desc(&self) -> RegionDesc {
        RegionDesc {
            peer: (*self.peer).clone(),
            region: self.inner.id,
            len: self.inner.len,
            kind: self.inner.kind,
            shareable: self.is_shareable(),
            gpu: self.inner.gpu_desc(),
            rdma: self.inner.with_nic(|n| n.desc.clone()),
        }
    }

    /// Copies `data` into the region at `offset` (for GPU regions a
    /// synchronous copy to the device).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if let Some(dev) = self.inner.gpu_device() {
            self.inner.check("write_at", offset, data.len() as u64)?;
            // SAFETY: destination checked against the region (alive while
            // `self` is); the source is a live slice.
            return unsafe {
                crate::cuda::copy_sync(
                    dev,
                    self.inner.ptr() as u64 + offset,
                    data.as_ptr() as u64,
                    data.len() as u64,
                )
            };
        }
        self.host_check("write_at", offset, data.len() as u64)?;
        // SAFETY: bounds checked above; the region keeps the memory alive; raw
        // copy into memory we do not hold a Rust reference to.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.inner.ptr().add(offset as usize),
                data.len(),
            )
        };
        Ok(())
    }

    /// Copies bytes of the region at `offset` into `out` (for GPU regions a
    /// synchronous copy from the device).
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        if let Some(dev) = self.inner.gpu_device() {
            self.inner.check("read_at", offset, out.len() as u64)?;
            // SAFETY: source checked against the region; `out` is exclusive.
            return unsafe {
                crate::cuda::copy_sync(
                    dev,
                    out.as_mut_ptr() as u64,
                    self.inner.ptr() as u64 + offset,
                    out.len() as u64,
                )
            };
        }
        self.host_check("read_at", offset, out.len() as u64)?;
        // SAFETY: bounds checked above; the region keeps the memory alive.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.inner.ptr().add(offset as usize),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte` (synchronously for GPU regions).
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<()> {
        if let Some(dev) = self.inner.gpu_device() {
            self.inner.check("fill", offset, len)?;
            // SAFETY: range checked against the region's device memory.
            return unsafe {
                crate::cuda::fill_sync(dev, self.inner.ptr() as u64 + offset, len, byte)
            };
        }
        self.host_check("fill", offset, len)?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::write_bytes(self.inner.ptr().add(offset as usize), byte, len as usize) };
        Ok(())
    }

    /// Borrows `len` bytes at `offset` (host regions only), e.g. to hash them
    /// without a copy.
    ///
    /// # Safety
    /// While the borrow lives, no engine batch may write the range and
    /// nothing else may write it through another pointer.
    pub unsafe fn slice(&self, offset: u64, len: u64) -> Result<&[u8]> {
        self.host_check("slice", offset, len)?;
        // SAFETY: in bounds (checked above) and alive while `self` is; the
        // caller guarantees no concurrent writer.
        Ok(unsafe {
            std::slice::from_raw_parts(self.inner.ptr().add(offset as usize), len as usize)
        })
    }

    /// Mutably borrows `len` bytes at `offset` (host regions only), e.g. to
    /// fill them without a copy.
    ///
    /// # Safety
    /// While the borrow lives, no engine batch may read or write the range
    /// and nothing else may access it through another pointer.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, offset: u64, len: u64) -> Result<&mut [u8]> {
        self.host_check("slice_mut", offset, len)?;
        // SAFETY: in bounds and alive; exclusivity is the caller's contract.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.inner.ptr().add(offset as usize), len as usize)
        })
    }

    fn host_check(&self, what: &'static str, offset: u64, len: u64) -> Result<()> {
        if !self.inner.kind.is_host() {
            return Err(Error::Unsupported(format!(
                "{what} on {} memory",
                self.inner.kind
            )));
        }
        self.inner.check(what, offset, len)
    }
}

/// How a same-host peer reaches a GPU region through CUDA IPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRegionDesc {
    /// Ordinal of the GPU in the owner's process.
    pub device: u32,
    /// The owner's machine (boot id): CUDA IPC works between processes of
    /// one machine whatever their network namespace.
    pub host_id: String,
    /// The owner's process id.
    pub pid: u32,
    /// CUDA IPC handle of the allocation containing the region (64 bytes);
    /// empty when the driver could not export it (then only staged
    /// transports reach the region).
    pub ipc_handle: Vec<u8>,
    /// Offset of the region inside that allocation.
    pub ipc_offset: u64,
    /// Start of the region in the owner's address space (engines of the
    /// same process use it directly: a process cannot open its own handles).
    pub addr: u64,
}

/// Everything a peer needs to reach one region: the owning engine's
/// descriptor plus the region's id, length and kind. Versioned and
/// serialisable (see [`RegionDesc::to_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    pub peer: PeerDesc,
    pub region: RegionId,
    pub len: u64,
    pub kind: MemoryKind,
    /// Reachable through `shm` from the same host.
    pub shareable: bool,
    /// CUDA IPC reachability of a GPU region (`None` for host memory).
    pub gpu: Option<GpuRegionDesc>,
    /// RDMA keys of the region (`None` where the owner runs without RDMA
    /// or could not register the region with its NICs).
    pub rdma: Option<crate::rdma_wire::RdmaRegionDesc>,
}

/// The layout of descriptor version 1 (before GPU regions had IPC fields).
#[derive(Deserialize)]
struct RegionDescV1 {
    peer: crate::desc::PeerDescV2,
    region: RegionId,
    len: u64,
    kind: MemoryKind,
    shareable: bool,
}

/// The layout of descriptor version 2 (before RDMA keys).
#[derive(Serialize, Deserialize)]
struct RegionDescV2 {
    peer: crate::desc::PeerDescV2,
    region: RegionId,
    len: u64,
    kind: MemoryKind,
    shareable: bool,
    gpu: Option<GpuRegionDesc>,
}

impl RegionDesc {
    /// Versioned binary encoding (version [`crate::DESC_VERSION`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        crate::desc::encode_versioned(self)
    }

    /// Decodes [`RegionDesc::to_bytes`] output of this or an earlier
    /// version (version 1 descriptors carry no GPU reachability, versions 1
    /// and 2 no RDMA keys); rejects other versions with the version in the
    /// message.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let (version, body) = crate::desc::split_versioned(b)?;
        match version {
            1 => {
                let v: RegionDescV1 = crate::desc::decode_body(body)?;
                Ok(RegionDesc {
                    peer: v.peer.into(),
                    region: v.region,
                    len: v.len,
                    kind: v.kind,
                    shareable: v.shareable,
                    gpu: None,
                    rdma: None,
                })
            }
            2 => {
                let v: RegionDescV2 = crate::desc::decode_body(body)?;
                Ok(RegionDesc {
                    peer: v.peer.into(),
                    region: v.region,
                    len: v.len,
                    kind: v.kind,
                    shareable: v.shareable,
                    gpu: v.gpu,
                    rdma: None,
                })
            }
            crate::desc::DESC_VERSION => crate::desc::decode_body(body),
            v => Err(crate::desc::unknown_version(v)),
        }
    }

    /// Hex text form (for command lines and logs).
    pub fn to_hex(&self) -> String {
        crate::desc::hex_encode(&self.to_bytes())
    }

    /// Parses [`RegionDesc::to_hex`] output.
    pub fn from_hex(s: &str) -> Result<Self> {
        Self::from_bytes(&crate::desc::hex_decode(s.trim())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A request is accepted iff it lies wholly inside the region
        /// (including ranges ending exactly at the end), with no overflow.
        #[test]
        fn bounds_check_accepts_exactly_the_inside(
            region_len in 1u64..1 << 20,
            offset in prop_oneof![0u64..1 << 21, Just(u64::MAX - 3), Just(u64::MAX)],
            len in prop_oneof![0u64..1 << 21, Just(u64::MAX)],
        ) {
            let r = RegionInner::alloc_memfd(1, region_len, MemoryKind::Host).unwrap();
            let inside = offset.checked_add(len).is_some_and(|end| end <= region_len);
            prop_assert_eq!(r.check("t", offset, len).is_ok(), inside);
            prop_assert!(r.check("t", region_len - 1, 1).is_ok());
            prop_assert!(r.check("t", region_len, 1).is_err());
        }
    }

    fn peer() -> PeerDesc {
        PeerDesc {
            engine_id: [3; 16],
            host_id: crate::desc::local_host_id(),
            tcp: vec!["127.0.0.1:4000".parse().unwrap()],
            shm: None,
            tcp_conns: 2,
            secret: [5; 32],
            rdma: None,
        }
    }

    #[test]
    fn gpu_region_desc_round_trips_with_ipc_fields() {
        let d = RegionDesc {
            peer: peer(),
            region: 9,
            len: 1 << 30,
            kind: MemoryKind::Gpu { device: 3 },
            shareable: false,
            gpu: Some(GpuRegionDesc {
                device: 3,
                host_id: crate::desc::machine_id(),
                pid: 4242,
                ipc_handle: (0..64).collect(),
                ipc_offset: 4096,
                addr: 0x7f00_0000_1000,
            }),
            rdma: None,
        };
        let b = d.to_bytes();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), crate::DESC_VERSION);
        assert_eq!(RegionDesc::from_bytes(&b).unwrap(), d);
        assert_eq!(RegionDesc::from_hex(&d.to_hex()).unwrap(), d);
        // Truncated or future descriptors fail with a reason.
        assert!(RegionDesc::from_bytes(&b[..b.len() - 3]).is_err());
        let mut future = b.clone();
        future[2..4].copy_from_slice(&7u16.to_le_bytes());
        let e = RegionDesc::from_bytes(&future).unwrap_err().to_string();
        assert!(e.contains("version 7"), "{e}");
    }

    #[test]
    fn version_1_region_desc_decodes_without_gpu_info() {
        #[derive(Serialize)]
        struct V1 {
            peer: crate::desc::PeerDescV2,
            region: RegionId,
            len: u64,
            kind: MemoryKind,
            shareable: bool,
        }
        let old_peer = crate::desc::tests::encode_v2(&peer());
        let v1 = V1 {
            peer: postcard::from_bytes(&old_peer[4..]).unwrap(),
            region: 4,
            len: 4096,
            kind: MemoryKind::Shm,
            shareable: true,
        };
        let mut b = b"KM".to_vec();
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&postcard::to_allocvec(&v1).unwrap());
        let d = RegionDesc::from_bytes(&b).unwrap();
        assert_eq!(
            (d.region, d.len, d.kind, d.shareable),
            (4, 4096, MemoryKind::Shm, true)
        );
        assert_eq!(d.gpu, None);
        assert_eq!(d.peer, peer());
    }

    fn rdma_region(peer: PeerDesc) -> RegionDesc {
        RegionDesc {
            peer,
            region: 11,
            len: 1 << 20,
            kind: MemoryKind::Host,
            shareable: true,
            gpu: None,
            rdma: Some(crate::rdma_wire::RdmaRegionDesc {
                addr: 0x7000_0000,
                len: 1 << 20,
                rkeys: vec![0x1234, 0x5678],
            }),
        }
    }

    #[test]
    fn rdma_keys_round_trip_and_version_2_decodes_without_them() {
        let d = rdma_region(peer());
        let b = d.to_bytes();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 3);
        assert_eq!(RegionDesc::from_bytes(&b).unwrap(), d);
        // A version-2 descriptor (builds before RDMA): same fields, no keys.
        let old_peer = crate::desc::tests::encode_v2(&d.peer);
        let v2 = RegionDescV2 {
            peer: postcard::from_bytes(&old_peer[4..]).unwrap(),
            region: d.region,
            len: d.len,
            kind: d.kind,
            shareable: d.shareable,
            gpu: Some(GpuRegionDesc {
                device: 1,
                host_id: "h".into(),
                pid: 3,
                ipc_handle: vec![1; 64],
                ipc_offset: 0,
                addr: 4096,
            }),
        };
        let mut b2 = b"KM".to_vec();
        b2.extend_from_slice(&2u16.to_le_bytes());
        b2.extend_from_slice(&postcard::to_allocvec(&v2).unwrap());
        let got = RegionDesc::from_bytes(&b2).unwrap();
        assert_eq!(got.rdma, None);
        assert_eq!(got.peer.rdma, None);
        assert_eq!(got.peer, d.peer);
        assert_eq!(got.gpu.map(|g| g.pid), Some(3));
        assert_eq!((got.region, got.len), (d.region, d.len));
    }

    #[test]
    fn pinned_memory_is_locked_and_usable() {
        let r = RegionInner::alloc_memfd(1, 1 << 16, MemoryKind::HostPinned).unwrap();
        assert!(r.locked);
        assert!(r.memfd().is_some());
    }

    #[test]
    fn private_memory_is_zeroed_aligned_and_not_shareable() {
        for len in [1u64, 4097, HUGE_PAGE as u64 - 1, HUGE_PAGE as u64, 5 << 20] {
            let r = RegionInner::alloc_private(1, len, MemoryKind::Host).unwrap();
            assert!(r.memfd().is_none(), "private memory is not shareable");
            if len >= HUGE_PAGE as u64 {
                assert_eq!(r.ptr() as usize % HUGE_PAGE, 0, "{len} bytes");
            }
            // SAFETY: the region owns `len` readable, writable bytes.
            let bytes = unsafe { std::slice::from_raw_parts_mut(r.ptr(), len as usize) };
            assert!(bytes.iter().all(|&b| b == 0), "{len} bytes are zeroed");
            bytes[len as usize - 1] = 7;
            assert_eq!(bytes[len as usize - 1], 7);
        }
        assert!(RegionInner::alloc_private(1, 0, MemoryKind::Host).is_err());
        let pinned = RegionInner::alloc_private(1, 1 << 16, MemoryKind::HostPinned).unwrap();
        assert!(pinned.locked);
    }
}
