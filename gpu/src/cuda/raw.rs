//! The bottom layer: one thin function per CUDA driver or NVRTC call, over
//! cudarc's dynamically loaded `sys` bindings.
//!
//! Every function checks its status code and turns it into an [`Error`];
//! nothing here owns a resource. Handles cross this layer as plain integers
//! (`usize` for opaque driver objects, `u64` for device addresses) so the
//! build without the `cuda` feature (`raw_dummy.rs`) has the same signatures
//! and the safe layer above is written once.
//!
//! cudarc panics when it cannot load a library; [`init`] and
//! [`nvrtc_init`] probe for the libraries first, and no other function here
//! may be called before `init` succeeded (the safe layer guarantees it: every
//! handle is created through a [`super::GpuDevice`], which calls `init`).

use std::ffi::{c_void, CStr, CString};
use std::sync::OnceLock;

use cudarc::driver::sys;
use cudarc::nvrtc::sys as nvrtc;

use crate::error::{Error, Result};

/// Opaque driver handle (context, stream, event, module, function).
pub(crate) type Handle = usize;

fn cu_error_string(r: sys::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver is loaded (callers ran `init`); `p` is an out-pointer.
    let ok = unsafe { sys::cuGetErrorString(r, &mut p) } == sys::CUresult::CUDA_SUCCESS;
    if ok && !p.is_null() {
        // SAFETY: the driver returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        format!("{r:?}")
    }
}

fn check(call: &'static str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda {
            call,
            code: r as i32,
            message: cu_error_string(r),
        })
    }
}

/// Loads libcuda and runs `cuInit` once per process; later calls return the
/// cached outcome. Absence of the driver is [`Error::NoCuda`].
pub(crate) fn init() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), (bool, String)>> = OnceLock::new();
    let r = INIT.get_or_init(|| {
        // SAFETY: only probes dlopen of the candidate names.
        if !unsafe { sys::is_culib_present() } {
            return Err((
                true,
                format!(
                    "no CUDA driver found (libcuda.so): tried {:?}; install the NVIDIA driver \
                     or put its directory on LD_LIBRARY_PATH",
                    cudarc::get_lib_name_candidates("cuda")
                ),
            ));
        }
        // SAFETY: the library is present, so loading cannot panic; cuInit
        // takes flags 0 and is safe to call from any thread, any number of times.
        let r = std::panic::catch_unwind(|| unsafe { sys::cuInit(0) });
        match r {
            Ok(sys::CUresult::CUDA_SUCCESS) => Ok(()),
            Ok(r) => Err((
                r == sys::CUresult::CUDA_ERROR_NO_DEVICE,
                format!("cuInit failed: {} ({})", cu_error_string(r), r as i32),
            )),
            Err(_) => Err((
                true,
                "no CUDA driver found (libcuda.so): loading it failed".into(),
            )),
        }
    });
    match r {
        Ok(()) => Ok(()),
        Err((true, m)) => Err(Error::NoCuda(m.clone())),
        Err((false, m)) => Err(Error::Cuda {
            call: "cuInit",
            code: -1,
            message: m.clone(),
        }),
    }
}

/// Checks once that libnvrtc can be loaded.
pub(crate) fn nvrtc_init() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: only probes dlopen of the candidate names.
        if unsafe { nvrtc::is_culib_present() } {
            Ok(())
        } else {
            Err(format!(
                "no NVRTC library found (libnvrtc.so): tried {:?}; put the CUDA toolkit's lib64 \
                 (with an unversioned libnvrtc.so link) on LD_LIBRARY_PATH",
                cudarc::get_lib_name_candidates("nvrtc")
            ))
        }
    })
    .clone()
    .map_err(Error::NoCuda)
}

pub(crate) fn device_count() -> Result<i32> {
    init()?;
    let mut n = 0;
    // SAFETY: out-pointer to a local.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    Ok(n)
}

pub(crate) fn device_get(ordinal: i32) -> Result<i32> {
    init()?;
    let mut d = 0;
    // SAFETY: out-pointer to a local.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut d, ordinal) })?;
    Ok(d)
}

pub(crate) fn device_name(dev: i32) -> Result<String> {
    let mut buf = [0 as std::ffi::c_char; 256];
    // SAFETY: the buffer holds `len` bytes; the driver NUL-terminates.
    check("cuDeviceGetName", unsafe {
        sys::cuDeviceGetName(buf.as_mut_ptr(), buf.len() as i32, dev)
    })?;
    // SAFETY: NUL-terminated by the driver within the buffer.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// Device attributes the engine uses.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Attr {
    CcMajor,
    CcMinor,
    SmCount,
}

pub(crate) fn device_attr(dev: i32, a: Attr) -> Result<i32> {
    use sys::CUdevice_attribute as A;
    let attr = match a {
        Attr::CcMajor => A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        Attr::CcMinor => A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
        Attr::SmCount => A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    };
    let mut v = 0;
    // SAFETY: out-pointer to a local.
    check("cuDeviceGetAttribute", unsafe {
        sys::cuDeviceGetAttribute(&mut v, attr, dev)
    })?;
    Ok(v)
}

pub(crate) fn primary_ctx_retain(dev: i32) -> Result<Handle> {
    let mut c: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuDevicePrimaryCtxRetain", unsafe {
        sys::cuDevicePrimaryCtxRetain(&mut c, dev)
    })?;
    Ok(c as Handle)
}

/// # Safety
/// Balances one successful [`primary_ctx_retain`] of `dev`.
pub(crate) unsafe fn primary_ctx_release(dev: i32) -> Result<()> {
    // SAFETY: the caller balances a retain.
    check("cuDevicePrimaryCtxRelease", unsafe {
        sys::cuDevicePrimaryCtxRelease_v2(dev)
    })
}

/// # Safety
/// `ctx` must be a live (retained) context.
pub(crate) unsafe fn ctx_set_current(ctx: Handle) -> Result<()> {
    // SAFETY: the caller guarantees the context is live.
    check("cuCtxSetCurrent", unsafe {
        sys::cuCtxSetCurrent(ctx as sys::CUcontext)
    })
}

/// Waits for all work of the current context.
pub(crate) fn ctx_synchronize() -> Result<()> {
    // SAFETY: no arguments; needs a current context (the safe layer binds one).
    check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
}

/// Creates a non-blocking stream in the current context.
pub(crate) fn stream_create() -> Result<Handle> {
    let mut s: sys::CUstream = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; flags are a valid constant.
    check("cuStreamCreate", unsafe {
        sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
    })?;
    Ok(s as Handle)
}

/// # Safety
/// `s` must be a stream created by [`stream_create`] and not used afterwards.
pub(crate) unsafe fn stream_destroy(s: Handle) -> Result<()> {
    // SAFETY: the caller owns the stream.
    check("cuStreamDestroy", unsafe {
        sys::cuStreamDestroy_v2(s as sys::CUstream)
    })
}

/// # Safety
/// `s` must be a live stream (0 = the legacy default stream).
pub(crate) unsafe fn stream_sync(s: Handle) -> Result<()> {
    // SAFETY: the caller guarantees the stream is live.
    check("cuStreamSynchronize", unsafe {
        sys::cuStreamSynchronize(s as sys::CUstream)
    })
}

/// # Safety
/// `s` and `e` must be live.
pub(crate) unsafe fn stream_wait_event(s: Handle, e: Handle) -> Result<()> {
    // SAFETY: the caller guarantees both handles are live.
    check("cuStreamWaitEvent", unsafe {
        sys::cuStreamWaitEvent(s as sys::CUstream, e as sys::CUevent, 0)
    })
}

pub(crate) fn event_create(timing: bool) -> Result<Handle> {
    let flags = if timing {
        sys::CUevent_flags::CU_EVENT_DEFAULT as u32
    } else {
        sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
    };
    let mut e: sys::CUevent = std::ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuEventCreate", unsafe {
        sys::cuEventCreate(&mut e, flags)
    })?;
    Ok(e as Handle)
}

/// # Safety
/// `e` must be an event created by [`event_create`] and not used afterwards.
pub(crate) unsafe fn event_destroy(e: Handle) -> Result<()> {
    // SAFETY: the caller owns the event.
    check("cuEventDestroy", unsafe {
        sys::cuEventDestroy_v2(e as sys::CUevent)
    })
}

/// # Safety
/// `e` and `s` must be live.
pub(crate) unsafe fn event_record(e: Handle, s: Handle) -> Result<()> {
    // SAFETY: the caller guarantees both handles are live.
    check("cuEventRecord", unsafe {
        sys::cuEventRecord(e as sys::CUevent, s as sys::CUstream)
    })
}

/// Whether the work before the event's last record has finished.
///
/// # Safety
/// `e` must be live.
pub(crate) unsafe fn event_query(e: Handle) -> Result<bool> {
    // SAFETY: the caller guarantees the event is live.
    let r = unsafe { sys::cuEventQuery(e as sys::CUevent) };
    if r == sys::CUresult::CUDA_ERROR_NOT_READY {
        return Ok(false);
    }
    check("cuEventQuery", r).map(|()| true)
}

/// # Safety
/// `e` must be live.
pub(crate) unsafe fn event_sync(e: Handle) -> Result<()> {
    // SAFETY: the caller guarantees the event is live.
    check("cuEventSynchronize", unsafe {
        sys::cuEventSynchronize(e as sys::CUevent)
    })
}

/// Milliseconds between two completed timing events.
///
/// # Safety
/// Both events must be live and created with timing enabled.
pub(crate) unsafe fn event_elapsed_ms(start: Handle, end: Handle) -> Result<f32> {
    let mut ms = 0f32;
    // Newer drivers export only the `_v2` name as current; older ones only
    // the plain one. Loading a missing symbol panics inside cudarc.
    let v2 = std::panic::catch_unwind(|| {
        let mut ms = 0f32;
        // SAFETY: out-pointer to a local; the caller guarantees the events.
        let r = unsafe {
            sys::cuEventElapsedTime_v2(&mut ms, start as sys::CUevent, end as sys::CUevent)
        };
        (r, ms)
    });
    let r = match v2 {
        Ok((r, v)) => {
            ms = v;
            r
        }
        // SAFETY: as above.
        Err(_) => unsafe {
            sys::cuEventElapsedTime(&mut ms, start as sys::CUevent, end as sys::CUevent)
        },
    };
    check("cuEventElapsedTime", r)?;
    Ok(ms)
}

pub(crate) fn mem_alloc(len: usize) -> Result<u64> {
    let mut p: sys::CUdeviceptr = 0;
    // SAFETY: out-pointer to a local; needs a current context (the safe layer binds one).
    check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut p, len) })?;
    Ok(p)
}

/// # Safety
/// `p` came from [`mem_alloc`], no work on it is pending and it is not used afterwards.
pub(crate) unsafe fn mem_free(p: u64) -> Result<()> {
    // SAFETY: the caller owns the allocation.
    check("cuMemFree", unsafe { sys::cuMemFree_v2(p) })
}

/// Page-locked host memory, mapped for every context (portable).
pub(crate) fn mem_host_alloc(len: usize) -> Result<*mut u8> {
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: out-pointer to a local.
    check("cuMemHostAlloc", unsafe {
        sys::cuMemHostAlloc(&mut p, len, sys::CU_MEMHOSTALLOC_PORTABLE)
    })?;
    Ok(p.cast())
}

/// # Safety
/// `p` came from [`mem_host_alloc`] and is not used afterwards.
pub(crate) unsafe fn mem_free_host(p: *mut u8) -> Result<()> {
    // SAFETY: the caller owns the allocation.
    check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(p.cast()) })
}

/// # Safety
/// `p..p+len` must be valid host memory until [`mem_host_unregister`].
pub(crate) unsafe fn mem_host_register(p: *mut u8, len: usize) -> Result<()> {
    // SAFETY: the caller guarantees the range.
    check("cuMemHostRegister", unsafe {
        sys::cuMemHostRegister_v2(p.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE)
    })
}

/// # Safety
/// `p` is the start of a range registered with [`mem_host_register`].
pub(crate) unsafe fn mem_host_unregister(p: *mut u8) -> Result<()> {
    // SAFETY: the caller guarantees the registration.
    check("cuMemHostUnregister", unsafe {
        sys::cuMemHostUnregister(p.cast())
    })
}

/// Asynchronous copy between any two addresses (unified addressing).
///
/// # Safety
/// Both ranges must stay valid until the copy completed on `s`.
pub(crate) unsafe fn memcpy_async(dst: u64, src: u64, len: usize, s: Handle) -> Result<()> {
    // SAFETY: the caller guarantees the ranges and the stream.
    check("cuMemcpyAsync", unsafe {
        sys::cuMemcpyAsync(dst, src, len, s as sys::CUstream)
    })
}

/// Synchronous copy between any two addresses (unified addressing).
///
/// # Safety
/// Both ranges must be valid for the call.
pub(crate) unsafe fn memcpy(dst: u64, src: u64, len: usize) -> Result<()> {
    // SAFETY: the caller guarantees the ranges.
    check("cuMemcpy", unsafe { sys::cuMemcpy(dst, src, len) })
}

/// # Safety
/// The range must stay valid until the fill completed on `s`.
pub(crate) unsafe fn memset_d8_async(dst: u64, byte: u8, len: usize, s: Handle) -> Result<()> {
    // SAFETY: the caller guarantees the range and the stream.
    check("cuMemsetD8Async", unsafe {
        sys::cuMemsetD8Async(dst, byte, len, s as sys::CUstream)
    })
}

/// Base address and size of the allocation containing `p`.
pub(crate) fn address_range(p: u64) -> Result<(u64, u64)> {
    let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
    // SAFETY: out-pointers to locals; an unknown address is an error code.
    check("cuMemGetAddressRange", unsafe {
        sys::cuMemGetAddressRange_v2(&mut base, &mut size, p)
    })?;
    Ok((base, size as u64))
}

/// The ordinal of the device owning `p`, or `None` when `p` is not device memory.
pub(crate) fn pointer_device(p: u64) -> Result<Option<i32>> {
    let mut ty: u32 = 0;
    // SAFETY: MEMORY_TYPE writes one `unsigned int`; unknown pointers give an error code.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ty as *mut u32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            p,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Ok(None);
    }
    if ty != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
        return Ok(None);
    }
    let mut ord: i32 = -1;
    // SAFETY: DEVICE_ORDINAL writes one `int`.
    check("cuPointerGetAttribute", unsafe {
        sys::cuPointerGetAttribute(
            (&mut ord as *mut i32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            p,
        )
    })?;
    Ok(Some(ord))
}

/// The 64-byte IPC handle of the allocation starting at `base`.
pub(crate) fn ipc_get_handle(base: u64) -> Result<[u8; 64]> {
    // SAFETY: a plain C struct of bytes; all-zero is a valid value.
    let mut h: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
    // SAFETY: out-pointer to a local.
    check("cuIpcGetMemHandle", unsafe {
        sys::cuIpcGetMemHandle(&mut h, base)
    })?;
    Ok(h.reserved.map(|c| c as u8))
}

/// Maps another process's allocation into the current context.
pub(crate) fn ipc_open(handle: &[u8; 64]) -> Result<u64> {
    // SAFETY: a plain C struct of bytes.
    let mut h: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
    h.reserved = handle.map(|b| b as std::ffi::c_char);
    let mut p: sys::CUdeviceptr = 0;
    // SAFETY: out-pointer to a local; the driver validates the handle.
    check("cuIpcOpenMemHandle", unsafe {
        sys::cuIpcOpenMemHandle_v2(
            &mut p,
            h,
            sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
        )
    })?;
    Ok(p)
}

/// # Safety
/// `p` came from [`ipc_open`], no work on it is pending and it is not used afterwards.
pub(crate) unsafe fn ipc_close(p: u64) -> Result<()> {
    // SAFETY: the caller owns the mapping.
    check("cuIpcCloseMemHandle", unsafe {
        sys::cuIpcCloseMemHandle(p)
    })
}

/// Loads a PTX or cubin image into the current context.
pub(crate) fn module_load(image: &[u8]) -> Result<Handle> {
    let image = CString::new(image.strip_suffix(&[0]).unwrap_or(image))
        .map_err(|_| Error::Invalid("module image contains NUL bytes".into()))?;
    let mut m: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: NUL-terminated PTX text, out-pointer to a local.
    check("cuModuleLoadData", unsafe {
        sys::cuModuleLoadData(&mut m, image.as_ptr().cast())
    })?;
    Ok(m as Handle)
}

/// # Safety
/// `m` came from [`module_load`]; its functions are not used afterwards.
pub(crate) unsafe fn module_unload(m: Handle) -> Result<()> {
    // SAFETY: the caller owns the module.
    check("cuModuleUnload", unsafe {
        sys::cuModuleUnload(m as sys::CUmodule)
    })
}

/// # Safety
/// `m` must be a live module.
pub(crate) unsafe fn module_function(m: Handle, name: &CStr) -> Result<Handle> {
    let mut f: sys::CUfunction = std::ptr::null_mut();
    // SAFETY: out-pointer to a local; the caller guarantees the module.
    check("cuModuleGetFunction", unsafe {
        sys::cuModuleGetFunction(&mut f, m as sys::CUmodule, name.as_ptr())
    })?;
    Ok(f as Handle)
}

/// Launch geometry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Launch {
    pub(crate) grid: u32,
    pub(crate) block: u32,
}

/// # Safety
/// `f` and `s` must be live; `params` must match the kernel's parameter list
/// exactly (one pointer to each argument value) and every pointer argument
/// must stay valid until the kernel completed.
pub(crate) unsafe fn launch(
    f: Handle,
    l: Launch,
    s: Handle,
    params: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: the caller guarantees handles and parameters.
    check("cuLaunchKernel", unsafe {
        sys::cuLaunchKernel(
            f as sys::CUfunction,
            l.grid,
            1,
            1,
            l.block,
            1,
            1,
            0,
            s as sys::CUstream,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })
}

fn nvrtc_check(call: &'static str, r: nvrtc::nvrtcResult) -> Result<()> {
    if r == nvrtc::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda {
            call,
            code: r as i32,
            message: format!("{r:?}"),
        })
    }
}

/// Compiles CUDA C++ `src` to PTX with `opts`; the error carries the log.
pub(crate) fn nvrtc_compile(src: &str, name: &str, opts: &[String]) -> Result<Vec<u8>> {
    nvrtc_init()?;
    let src = CString::new(src).map_err(|_| Error::Invalid("kernel source has NUL".into()))?;
    let name = CString::new(name).map_err(|_| Error::Invalid("kernel name has NUL".into()))?;
    let opts: Vec<CString> = opts
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid("NVRTC option has NUL".into()))?;
    let opt_ptrs: Vec<*const std::ffi::c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nvrtc::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: NUL-terminated strings that outlive the call; no headers.
    nvrtc_check("nvrtcCreateProgram", unsafe {
        nvrtc::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        )
    })?;
    let out = (|| {
        // SAFETY: `prog` is live; the option pointers outlive the call.
        let r =
            unsafe { nvrtc::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
        if r != nvrtc::nvrtcResult::NVRTC_SUCCESS {
            let mut n = 0usize;
            // SAFETY: `prog` is live; out-pointer to a local.
            unsafe { nvrtc::nvrtcGetProgramLogSize(prog, &mut n) };
            let mut log = vec![0u8; n.max(1)];
            // SAFETY: the buffer holds `n` bytes as the driver asked.
            unsafe { nvrtc::nvrtcGetProgramLog(prog, log.as_mut_ptr().cast()) };
            let log = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .to_string();
            return Err(Error::Cuda {
                call: "nvrtcCompileProgram",
                code: r as i32,
                message: format!("{r:?}: {log}"),
            });
        }
        let mut n = 0usize;
        // SAFETY: `prog` is live and compiled.
        nvrtc_check("nvrtcGetPTXSize", unsafe {
            nvrtc::nvrtcGetPTXSize(prog, &mut n)
        })?;
        let mut ptx = vec![0u8; n];
        // SAFETY: the buffer holds the size NVRTC reported.
        nvrtc_check("nvrtcGetPTX", unsafe {
            nvrtc::nvrtcGetPTX(prog, ptx.as_mut_ptr().cast())
        })?;
        Ok(ptx)
    })();
    // SAFETY: `prog` is live and not used afterwards.
    unsafe { nvrtc::nvrtcDestroyProgram(&mut prog) };
    out
}
