//! CUDA IPC: exporting a device allocation to other processes of the host
//! and opening theirs.
//!
//! An exported pointer is described by the 64-byte handle of the allocation
//! that contains it plus the pointer's offset inside that allocation (caller
//! memory, e.g. a tensor, rarely starts an allocation of PyTorch's caching
//! allocator). Opened mappings are cached per (device, handle) in the process
//! and closed when the last user drops them. A process cannot open its own
//! handles; callers use the pointer directly then.
//!
//! Memory from the virtual-memory API (`cuMemCreate`, PyTorch's expandable
//! segments) has no legacy IPC handle; exporting it fails with the driver's
//! error.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use super::device::{record_drop_error, GpuDevice};
use super::raw;
use crate::error::{Error, Result};

/// Size of a CUDA IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;

/// What another process needs to reach a device pointer of this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcExport {
    /// Handle of the containing allocation.
    pub handle: [u8; IPC_HANDLE_BYTES],
    /// Start of the containing allocation in this process.
    pub base: u64,
    /// Length of the containing allocation.
    pub alloc_len: u64,
    /// Offset of the exported pointer inside the allocation.
    pub offset: u64,
}

impl IpcExport {
    /// Exports `ptr..ptr+len` of `dev`'s memory.
    pub fn new(dev: &GpuDevice, ptr: u64, len: u64) -> Result<IpcExport> {
        dev.bind()?;
        let (base, alloc_len) = raw::address_range(ptr)?;
        let offset = ptr - base;
        if offset.checked_add(len).is_none_or(|e| e > alloc_len) {
            return Err(Error::OutOfBounds {
                what: "exported range",
                offset,
                len,
                region_len: alloc_len,
            });
        }
        let handle = raw::ipc_get_handle(base)?;
        Ok(IpcExport {
            handle,
            base,
            alloc_len,
            offset,
        })
    }
}

/// Another process's allocation, opened in this one; closed on drop.
pub struct IpcMapping {
    dev: GpuDevice,
    ptr: u64,
}

impl std::fmt::Debug for IpcMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpcMapping")
            .field("device", &self.dev.ordinal())
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .finish()
    }
}

type Key = (u32, [u8; IPC_HANDLE_BYTES]);
static OPEN: OnceLock<Mutex<HashMap<Key, Weak<IpcMapping>>>> = OnceLock::new();

impl IpcMapping {
    /// Opens `handle` on `dev` (peer access to the exporter's device is
    /// enabled lazily), or returns the mapping this process already has.
    pub fn open(dev: &GpuDevice, handle: &[u8; IPC_HANDLE_BYTES]) -> Result<Arc<IpcMapping>> {
        let map = OPEN.get_or_init(Default::default);
        let mut g = map.lock();
        let key = (dev.ordinal(), *handle);
        if let Some(m) = g.get(&key).and_then(Weak::upgrade) {
            return Ok(m);
        }
        g.retain(|_, w| w.strong_count() > 0);
        dev.bind()?;
        let ptr = raw::ipc_open(handle)?;
        let m = Arc::new(IpcMapping {
            dev: dev.clone(),
            ptr,
        });
        g.insert(key, Arc::downgrade(&m));
        Ok(m)
    }

    /// Start of the opened allocation in this process.
    pub fn base(&self) -> u64 {
        self.ptr
    }

    /// The device it was opened on.
    pub fn device(&self) -> &GpuDevice {
        &self.dev
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        let r = self.dev.bind().and_then(|()| {
            // SAFETY: we opened this mapping; users hold an `Arc` to us and
            // keep it until their copies completed, so none remain.
            unsafe { raw::ipc_close(self.ptr) }
        });
        if let Err(e) = r {
            record_drop_error("IPC mapping", e);
        }
    }
}
