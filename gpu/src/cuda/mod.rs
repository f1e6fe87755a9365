//! CUDA for the transfer engine: devices, streams and events, device and
//! pinned memory, run-time compiled copy kernels, and CUDA IPC.
//!
//! ```text
//!  engine / plugin / benchmarks
//!        |  safe RAII types: GpuDevice, GpuStream, GpuEvent, DeviceBuffer,
//!        |  PinnedBuffer, HostRegistration, GpuKernels, IpcMapping
//!        v
//!  raw.rs  one checked function per driver / NVRTC call (cudarc `sys`,
//!        |  loaded at run time)      raw_dummy.rs without the `cuda` feature
//!        v
//!  libcuda.so / libnvrtc.so
//! ```
//!
//! The crate builds and runs with no CUDA installed: the first call probes
//! for the driver and every call then returns [`Error::NoCuda`] ("no CUDA
//! driver found" or "built without the cuda feature") instead of panicking.
//! Errors met while releasing resources in `Drop` are logged and kept for
//! [`take_drop_errors`]; `Drop` never panics.
//!
//! Ordering: a [`DeviceBuffer`] (and pinned or registered host memory)
//! remembers the events of its last read and last write, so an operation on
//! one stream waits for work on another stream that touched the same bytes
//! before it. Work ordered after a caller's stream or event (for example a
//! PyTorch compute stream) goes through [`GpuStream::wait`] with an event
//! wrapped by [`GpuEvent::from_raw`].
//!
//! This module must not depend on the engine or any transport.

#[cfg(feature = "cuda")]
mod raw;
#[cfg(not(feature = "cuda"))]
#[path = "raw_dummy.rs"]
mod raw;

mod device;
mod ipc;
mod kernels;
mod memory;
pub mod nccl;
mod poller;
pub mod segments;
mod stream;

pub use device::{take_drop_errors, GpuDevice};
pub use ipc::{IpcExport, IpcMapping, IPC_HANDLE_BYTES};
pub use kernels::{GpuKernels, SegmentTable, KERNEL_SOURCE};
pub use memory::{DeviceBuffer, GpuMemory, HostRegistration, PinnedBuffer};
pub use poller::EventFuture;
pub use segments::Segment;
pub use stream::{GpuEvent, GpuStream};

pub(crate) use memory::{copy_sync, fill_sync, Bounce};

use crate::error::Result;

/// Whether CUDA can be used here: the crate was built with the `cuda`
/// feature, the driver library loads and `cuInit` succeeds.
pub fn available() -> Result<()> {
    raw::init()
}

/// Whether run-time kernel compilation can be used (libnvrtc loads).
pub fn nvrtc_available() -> Result<()> {
    raw::init()?;
    raw::nvrtc_init()
}

/// Number of visible CUDA devices.
pub fn device_count() -> Result<u32> {
    Ok(raw::device_count()?.max(0) as u32)
}

/// The ordinal of the GPU owning `ptr`, or `None` when `ptr` is not device
/// memory (host memory, or an address the driver does not know).
pub fn pointer_device(ptr: u64) -> Result<Option<u32>> {
    raw::init()?;
    Ok(raw::pointer_device(ptr)?.map(|d| d.max(0) as u32))
}

/// Base and length of the device allocation containing `ptr`.
pub fn allocation_range(ptr: u64) -> Result<(u64, u64)> {
    raw::init()?;
    raw::address_range(ptr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    /// Without a driver (this machine) or without the feature, every entry
    /// point fails with `NoCuda` and a message naming the cause.
    #[test]
    fn absent_cuda_is_a_clear_error() {
        if available().is_ok() {
            return; // a GPU machine: the gpu_* tests cover the real paths
        }
        let e = available().unwrap_err();
        assert!(matches!(e, Error::NoCuda(_)), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("no CUDA driver found (libcuda.so)")
                || msg.contains("built without the cuda feature"),
            "{msg}"
        );
        for e in [
            device_count().unwrap_err(),
            GpuDevice::open(0).unwrap_err(),
            nvrtc_available().unwrap_err(),
        ] {
            assert!(matches!(e, Error::NoCuda(_)), "{e:?}");
        }
    }
}
