//! Devices: the primary context of a GPU, shared by every handle that uses
//! it, and the record of errors met while releasing CUDA resources.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use super::raw::{self, Attr, Handle};
use crate::error::{Error, Result};

/// Errors kept from `Drop` implementations, newest last (bounded).
static DROP_ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());
const MAX_DROP_ERRORS: usize = 64;

/// Logs and keeps an error met while releasing a resource in `Drop`.
pub(crate) fn record_drop_error(what: &str, e: Error) {
    tracing::warn!("releasing {what}: {e}");
    let mut v = DROP_ERRORS.lock();
    if v.len() == MAX_DROP_ERRORS {
        v.remove(0);
    }
    v.push(format!("{what}: {e}"));
}

/// Takes the errors recorded while releasing CUDA resources (streams,
/// events, memory, IPC mappings) since the last call.
pub fn take_drop_errors() -> Vec<String> {
    std::mem::take(&mut *DROP_ERRORS.lock())
}

pub(crate) struct DeviceInner {
    ordinal: u32,
    dev: i32,
    ctx: Handle,
    name: String,
    cc: (u32, u32),
    sm_count: u32,
}

impl Drop for DeviceInner {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `GpuDevice::open`; every handle
        // created in this context held an `Arc` to us and is gone.
        if let Err(e) = unsafe { raw::primary_ctx_release(self.dev) } {
            record_drop_error("primary context", e);
        }
    }
}

/// One GPU, through its primary context (the one the CUDA runtime and
/// PyTorch use, so pointers and events are shared with them).
///
/// Cheap to clone; handles are shared per ordinal within the process.
#[derive(Clone)]
pub struct GpuDevice {
    pub(crate) inner: Arc<DeviceInner>,
}

// SAFETY: a context handle may be used from any thread (the driver API is
// thread-safe); `DeviceInner` holds only that handle and plain data.
unsafe impl Send for DeviceInner {}
// SAFETY: as above; shared references only read plain data.
unsafe impl Sync for DeviceInner {}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("ordinal", &self.inner.ordinal)
            .field("name", &self.inner.name)
            .field("cc", &self.inner.cc)
            .finish()
    }
}

impl PartialEq for GpuDevice {
    fn eq(&self, other: &Self) -> bool {
        self.inner.ordinal == other.inner.ordinal
    }
}
impl Eq for GpuDevice {}

static DEVICES: OnceLock<Mutex<HashMap<u32, Weak<DeviceInner>>>> = OnceLock::new();

impl GpuDevice {
    /// Opens GPU `ordinal`: retains its primary context and makes it current
    /// on the calling thread.
    pub fn open(ordinal: u32) -> Result<GpuDevice> {
        raw::init()?;
        let devices = DEVICES.get_or_init(Default::default);
        let mut map = devices.lock();
        if let Some(inner) = map.get(&ordinal).and_then(Weak::upgrade) {
            let d = GpuDevice { inner };
            d.bind()?;
            return Ok(d);
        }
        let count = raw::device_count()?;
        if ordinal as i64 >= count as i64 {
            return Err(Error::Invalid(format!(
                "GPU {ordinal} does not exist: {count} CUDA device(s) visible"
            )));
        }
        let dev = raw::device_get(ordinal as i32)?;
        let name = raw::device_name(dev)?;
        let cc = (
            raw::device_attr(dev, Attr::CcMajor)? as u32,
            raw::device_attr(dev, Attr::CcMinor)? as u32,
        );
        let sm_count = raw::device_attr(dev, Attr::SmCount)?.max(1) as u32;
        let ctx = raw::primary_ctx_retain(dev)?;
        let inner = Arc::new(DeviceInner {
            ordinal,
            dev,
            ctx,
            name,
            cc,
            sm_count,
        });
        map.insert(ordinal, Arc::downgrade(&inner));
        let d = GpuDevice { inner };
        d.bind()?;
        Ok(d)
    }

    /// Makes this device's context current on the calling thread. Every
    /// method of the safe layer does this itself; call it before handing the
    /// thread to other CUDA code that expects it.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for as long as `inner` lives.
        unsafe { raw::ctx_set_current(self.inner.ctx) }
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> u32 {
        self.inner.ordinal
    }

    /// The marketing name (e.g. "NVIDIA H100 80GB HBM3").
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (u32, u32) {
        self.inner.cc
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.inner.sm_count
    }

    /// Waits until all work on the device finished.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        raw::ctx_synchronize()
    }
}
