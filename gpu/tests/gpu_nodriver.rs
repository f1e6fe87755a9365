//! GPU entry points on a machine without CUDA (or a build without the
//! `cuda` feature): each fails with a clear `NoCuda` error, and host paths
//! are unaffected. On a GPU machine these checks are skipped.

use kvmesh_gpu::cuda::{self, GpuDevice};
use kvmesh_gpu::{Engine, EngineConfig, Error, MemoryKind};

fn no_cuda() -> bool {
    cuda::available().is_err()
}

fn assert_no_cuda(e: Error) {
    let msg = e.to_string();
    assert!(matches!(e, Error::NoCuda(_)), "{e:?}");
    assert!(
        msg.contains("no CUDA driver found (libcuda.so)")
            || msg.contains("built without the cuda feature"),
        "{msg}"
    );
}

#[test]
fn gpu_memory_without_a_driver_is_a_clear_error() {
    if !no_cuda() {
        return;
    }
    let e = Engine::new(EngineConfig::default()).unwrap();
    let err = e.alloc(4096, MemoryKind::Gpu { device: 0 }).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot allocate 4096 bytes on GPU 0"),
        "{err}"
    );
    assert_no_cuda(err);
    let mut buf = vec![0u8; 4096];
    // SAFETY: refused before the pointer is used.
    let err =
        unsafe { e.register(buf.as_mut_ptr(), 4096, MemoryKind::Gpu { device: 0 }) }.unwrap_err();
    assert_no_cuda(err);
    assert_eq!(e.region_count(), 0);
    // Host memory still works.
    let r = e.alloc(4096, MemoryKind::Host).unwrap();
    r.write_at(0, b"still fine").unwrap();
    assert!(r.desc().gpu.is_none());
}

#[test]
fn cuda_layer_without_a_driver_is_a_clear_error() {
    if !no_cuda() {
        return;
    }
    assert_no_cuda(cuda::available().unwrap_err());
    assert_no_cuda(cuda::device_count().unwrap_err());
    assert_no_cuda(GpuDevice::open(0).unwrap_err());
    assert_no_cuda(cuda::nvrtc_available().unwrap_err());
    assert_no_cuda(cuda::pointer_device(0x1000).unwrap_err());
    // The kernels' source is part of the crate whatever the machine.
    assert!(cuda::KERNEL_SOURCE.contains("kvmesh_copy_segments"));
    assert!("cuda-ipc".parse::<kvmesh_gpu::TransportKind>().is_ok());
}
