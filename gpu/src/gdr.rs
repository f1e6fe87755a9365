//! gdrcopy: small, low-latency CPU reads and writes of GPU memory through a
//! BAR1 mapping, with `libgdrapi` opened at run time.
//!
//! ```text
//!  Gdr::open()            dlopen libgdrapi.so.2 / .so, gdr_open
//!    └ pin(va, len)       gdr_pin_buffer on the 64 KiB-aligned span, gdr_map
//!        GdrBuffer        copy_to / copy_from  (gdr_copy_to/from_mapping)
//!        drop             gdr_unmap, gdr_unpin_buffer
//!    drop                 gdr_close (after every buffer: buffers hold an Arc)
//! ```
//!
//! The C prototypes are declared here from the documented `gdrapi.h` API;
//! no header or library is needed to build. Where the library is absent,
//! [`Gdr::open`] returns [`GdrError::NotInstalled`]. Span arithmetic is pure
//! ([`gpu_page_span`]) and bounds checks happen before any copy. This module
//! does not depend on CUDA: the caller passes GPU virtual addresses.

use std::ffi::{c_int, c_ulong, c_void};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::ErrorKind;

/// GPU page size that gdrcopy pins and maps in (64 KiB).
pub const GPU_PAGE_SIZE: u64 = 1 << 16;

/// Library names tried, in order.
pub const LIBRARY_NAMES: [&str; 2] = ["libgdrapi.so.2", "libgdrapi.so"];

/// Errors of the gdrcopy wrapper.
#[derive(Debug, thiserror::Error)]
pub enum GdrError {
    /// `libgdrapi` could not be loaded (not installed, or missing symbols).
    #[error("gdrcopy is not available: {0}")]
    NotInstalled(String),
    /// `gdr_open` failed (the gdrdrv kernel module is not loaded, or
    /// /dev/gdrdrv is not accessible).
    #[error("gdr_open failed: is the gdrdrv kernel module loaded?")]
    OpenFailed,
    /// A gdrapi call returned an error code.
    #[error("{call} failed with {code}")]
    Call {
        /// The function.
        call: &'static str,
        /// Its return value.
        code: i32,
    },
    /// A copy falls outside the pinned buffer.
    #[error("copy of {len} bytes at offset {offset} exceeds the {size}-byte buffer")]
    OutOfBounds {
        /// Offset in the buffer.
        offset: usize,
        /// Length.
        len: usize,
        /// Buffer size.
        size: usize,
    },
    /// Invalid argument (zero length, address overflow).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

impl GdrError {
    /// The engine's classification.
    pub fn kind(&self) -> ErrorKind {
        match self {
            GdrError::NotInstalled(_) | GdrError::OpenFailed => ErrorKind::Unreachable,
            GdrError::Call { .. } => ErrorKind::Io,
            GdrError::OutOfBounds { .. } => ErrorKind::OutOfBounds,
            GdrError::Invalid(_) => ErrorKind::Invalid,
        }
    }
}

/// Pinned span covering a byte range, in whole GPU pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuPageSpan {
    /// First pinned address (64 KiB aligned).
    pub start: u64,
    /// Pinned length (multiple of 64 KiB).
    pub len: u64,
    /// Offset of the requested address inside the span.
    pub offset: u64,
}

/// The 64 KiB-aligned span gdrcopy must pin to cover `va..va + len`.
pub fn gpu_page_span(va: u64, len: u64) -> Result<GpuPageSpan, GdrError> {
    if len == 0 {
        return Err(GdrError::Invalid("zero-length pin".into()));
    }
    let end = va
        .checked_add(len)
        .ok_or_else(|| GdrError::Invalid("address range overflows".into()))?;
    let start = va & !(GPU_PAGE_SIZE - 1);
    let aligned_end = end
        .checked_add(GPU_PAGE_SIZE - 1)
        .ok_or_else(|| GdrError::Invalid("address range overflows".into()))?
        & !(GPU_PAGE_SIZE - 1);
    Ok(GpuPageSpan {
        start,
        len: aligned_end - start,
        offset: va - start,
    })
}

fn check_copy(offset: usize, len: usize, size: usize) -> Result<(), GdrError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(GdrError::OutOfBounds { offset, len, size }),
    }
}

/// `gdr_mh_t`: a struct wrapping an unsigned long.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GdrMh {
    h: c_ulong,
}

/// `gdr_info_t` (v2 layout; v1 is a prefix of it). Only `va` is read.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct GdrInfo {
    va: u64,
    mapped_size: u64,
    page_size: u32,
    tm_cycles: u64,
    cycles_per_ms: u32,
    flags: u32,
    mapping_type: c_int,
}

type GdrOpen = unsafe extern "C" fn() -> *mut c_void;
type GdrClose = unsafe extern "C" fn(*mut c_void) -> c_int;
type GdrPinBuffer =
    unsafe extern "C" fn(*mut c_void, c_ulong, usize, u64, u32, *mut GdrMh) -> c_int;
type GdrUnpinBuffer = unsafe extern "C" fn(*mut c_void, GdrMh) -> c_int;
type GdrGetInfo = unsafe extern "C" fn(*mut c_void, GdrMh, *mut GdrInfo) -> c_int;
type GdrMap = unsafe extern "C" fn(*mut c_void, GdrMh, *mut *mut c_void, usize) -> c_int;
type GdrUnmap = unsafe extern "C" fn(*mut c_void, GdrMh, *mut c_void, usize) -> c_int;
type GdrCopyTo = unsafe extern "C" fn(GdrMh, *mut c_void, *const c_void, usize) -> c_int;
type GdrCopyFrom = unsafe extern "C" fn(GdrMh, *mut c_void, *const c_void, usize) -> c_int;

/// The loaded library and its entry points.
struct Api {
    open: GdrOpen,
    close: GdrClose,
    pin_buffer: GdrPinBuffer,
    unpin_buffer: GdrUnpinBuffer,
    get_info: GdrGetInfo,
    map: GdrMap,
    unmap: GdrUnmap,
    copy_to_mapping: GdrCopyTo,
    copy_from_mapping: GdrCopyFrom,
    // Last: the function pointers above are valid while it is loaded.
    _lib: libloading::Library,
}

impl Api {
    fn load() -> Result<Api, GdrError> {
        let mut errors = Vec::new();
        for name in LIBRARY_NAMES {
            // SAFETY: loading runs the library's initialisers; libgdrapi's
            // only open the gdrdrv device lazily in gdr_open.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return Api::resolve(lib, name),
                Err(e) => errors.push(format!("{name}: {e}")),
            }
        }
        Err(GdrError::NotInstalled(errors.join("; ")))
    }

    fn resolve(lib: libloading::Library, name: &str) -> Result<Api, GdrError> {
        fn sym<T: Copy>(
            lib: &libloading::Library,
            lib_name: &str,
            sym: &str,
        ) -> Result<T, GdrError> {
            // SAFETY: `T` is the documented prototype of `sym` in gdrapi.h;
            // the pointer is used only while `lib` stays loaded (Api owns it).
            unsafe { lib.get::<T>(sym.as_bytes()) }
                .map(|s| *s)
                .map_err(|e| GdrError::NotInstalled(format!("{lib_name}: {sym}: {e}")))
        }
        // Prefer the v2 info call (gdrcopy 2.1+); older builds only have v1,
        // whose layout is a prefix of v2.
        let get_info = sym::<GdrGetInfo>(&lib, name, "gdr_get_info_v2")
            .or_else(|_| sym::<GdrGetInfo>(&lib, name, "gdr_get_info"))?;
        Ok(Api {
            open: sym(&lib, name, "gdr_open")?,
            close: sym(&lib, name, "gdr_close")?,
            pin_buffer: sym(&lib, name, "gdr_pin_buffer")?,
            unpin_buffer: sym(&lib, name, "gdr_unpin_buffer")?,
            get_info,
            map: sym(&lib, name, "gdr_map")?,
            unmap: sym(&lib, name, "gdr_unmap")?,
            copy_to_mapping: sym(&lib, name, "gdr_copy_to_mapping")?,
            copy_from_mapping: sym(&lib, name, "gdr_copy_from_mapping")?,
            _lib: lib,
        })
    }
}

struct Handle {
    api: Api,
    g: NonNull<c_void>,
}

// SAFETY: a gdr_t may be used from several threads (gdrapi locks its
// internal lists); pin/map/unmap/unpin take the handle by value.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: opened by gdr_open, closed once, after every buffer (they
        // hold an Arc of this handle).
        let rc = unsafe { (self.api.close)(self.g.as_ptr()) };
        if rc != 0 {
            tracing::warn!(rc, "gdr_close failed");
        }
    }
}

/// An open gdrcopy handle.
#[derive(Clone)]
pub struct Gdr {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for Gdr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gdr").finish_non_exhaustive()
    }
}

impl Gdr {
    /// Loads `libgdrapi` and opens the gdrdrv device.
    pub fn open() -> Result<Gdr, GdrError> {
        let api = Api::load()?;
        // SAFETY: no arguments; returns NULL on failure.
        let g = unsafe { (api.open)() };
        let g = NonNull::new(g).ok_or(GdrError::OpenFailed)?;
        Ok(Gdr {
            inner: Arc::new(Handle { api, g }),
        })
    }

    /// Pins and maps the GPU memory at `va..va + len` for CPU access.
    ///
    /// # Safety
    ///
    /// `va..va + len` must be a device allocation of this process (cuMemAlloc
    /// memory) that stays allocated until the returned buffer is dropped;
    /// freeing it earlier makes the driver revoke the mapping under the CPU.
    pub unsafe fn pin(&self, va: u64, len: usize) -> Result<GdrBuffer, GdrError> {
        let span = gpu_page_span(va, len as u64)?;
        let api = &self.inner.api;
        let g = self.inner.g.as_ptr();
        let pin_len =
            usize::try_from(span.len).map_err(|_| GdrError::Invalid("span too large".into()))?;
        let addr = c_ulong::try_from(span.start)
            .map_err(|_| GdrError::Invalid("address too large".into()))?;
        let mut mh = GdrMh::default();
        // SAFETY: open handle; the caller guarantees the range is a live
        // device allocation; `mh` is an out-pointer. Tokens 0/0: no legacy
        // P2P token.
        let rc = unsafe { (api.pin_buffer)(g, addr, pin_len, 0, 0, &mut mh) };
        if rc != 0 {
            return Err(GdrError::Call {
                call: "gdr_pin_buffer",
                code: rc,
            });
        }
        // From here on the pin is owned by `pinned` and released on error.
        let mut pinned = GdrBuffer {
            gdr: self.inner.clone(),
            mh,
            map: None,
            map_len: pin_len,
            user_offset: 0,
            len,
        };
        let mut info = GdrInfo::default();
        // SAFETY: `mh` was just pinned; `info` is large enough for v1 and v2.
        let rc = unsafe { (api.get_info)(g, mh, &mut info) };
        if rc != 0 {
            return Err(GdrError::Call {
                call: "gdr_get_info",
                code: rc,
            });
        }
        // The driver may pin from an earlier page than asked.
        let user_offset = va
            .checked_sub(info.va)
            .ok_or_else(|| GdrError::Invalid(format!("pinned at {:#x}, above {va:#x}", info.va)))?;
        // gdr_map wants exactly the pinned size.
        let map_len = pin_len;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: pinned handle; `ptr` is an out-pointer; the mapping length
        // is the pinned size.
        let rc = unsafe { (api.map)(g, mh, &mut ptr, map_len) };
        if rc != 0 || ptr.is_null() {
            return Err(GdrError::Call {
                call: "gdr_map",
                code: rc,
            });
        }
        pinned.map = NonNull::new(ptr);
        pinned.map_len = map_len;
        pinned.user_offset =
            usize::try_from(user_offset).map_err(|_| GdrError::Invalid("offset".into()))?;
        check_copy(pinned.user_offset, len, map_len)?;
        Ok(pinned)
    }
}

/// GPU memory pinned and mapped for CPU access; unmapped and unpinned on
/// drop.
pub struct GdrBuffer {
    gdr: Arc<Handle>,
    mh: GdrMh,
    map: Option<NonNull<c_void>>,
    map_len: usize,
    user_offset: usize,
    len: usize,
}

impl std::fmt::Debug for GdrBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GdrBuffer")
            .field("len", &self.len)
            .field("map_len", &self.map_len)
            .field("user_offset", &self.user_offset)
            .finish_non_exhaustive()
    }
}

// SAFETY: the mapping is device memory reachable from any thread; copies
// go through gdrapi, which needs no thread affinity.
unsafe impl Send for GdrBuffer {}
// SAFETY: `&GdrBuffer` copies in and out; concurrent copies to overlapping
// bytes race on device memory like any shared buffer, never on Rust state.
unsafe impl Sync for GdrBuffer {}

impl GdrBuffer {
    /// Bytes addressable (the length asked for at pin time).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never: zero-length pins are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mapped_at(&self, offset: usize, len: usize) -> Result<*mut c_void, GdrError> {
        check_copy(offset, len, self.len)?;
        let base = self
            .map
            .ok_or_else(|| GdrError::Invalid("buffer is not mapped".into()))?;
        // SAFETY: user_offset + offset + len <= map_len (checked at pin
        // time and above), so the pointer stays inside the mapping.
        Ok(unsafe { base.as_ptr().cast::<u8>().add(self.user_offset + offset) }.cast())
    }

    /// Writes `src` to GPU memory at `offset`.
    pub fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), GdrError> {
        let dst = self.mapped_at(offset, src.len())?;
        // SAFETY: `dst..dst+len` is inside the live mapping; `src` is a valid
        // slice of that length.
        let rc =
            unsafe { (self.gdr.api.copy_to_mapping)(self.mh, dst, src.as_ptr().cast(), src.len()) };
        if rc != 0 {
            return Err(GdrError::Call {
                call: "gdr_copy_to_mapping",
                code: rc,
            });
        }
        Ok(())
    }

    /// Reads GPU memory at `offset` into `dst`.
    pub fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), GdrError> {
        let src = self.mapped_at(offset, dst.len())?;
        // SAFETY: `src..src+len` is inside the live mapping; `dst` is a valid
        // writable slice of that length.
        let rc = unsafe {
            (self.gdr.api.copy_from_mapping)(self.mh, dst.as_mut_ptr().cast(), src, dst.len())
        };
        if rc != 0 {
            return Err(GdrError::Call {
                call: "gdr_copy_from_mapping",
                code: rc,
            });
        }
        Ok(())
    }
}

impl Drop for GdrBuffer {
    fn drop(&mut self) {
        let api = &self.gdr.api;
        let g = self.gdr.g.as_ptr();
        if let Some(map) = self.map.take() {
            // SAFETY: mapped by gdr_map with this handle and length; unmapped once.
            let rc = unsafe { (api.unmap)(g, self.mh, map.as_ptr(), self.map_len) };
            if rc != 0 {
                tracing::warn!(rc, "gdr_unmap failed");
            }
        }
        // SAFETY: pinned by gdr_pin_buffer, unpinned once, after unmapping.
        let rc = unsafe { (api.unpin_buffer)(g, self.mh) };
        if rc != 0 {
            tracing::warn!(rc, "gdr_unpin_buffer failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_the_range_in_whole_gpu_pages() {
        let s = gpu_page_span(0x7f00_0001_2345, 100).unwrap();
        assert_eq!(s.start, 0x7f00_0001_0000);
        assert_eq!(s.len, GPU_PAGE_SIZE);
        assert_eq!(s.offset, 0x2345);

        let s = gpu_page_span(0x10000, 0x10000).unwrap();
        assert_eq!((s.start, s.len, s.offset), (0x10000, 0x10000, 0));

        // Crossing a page boundary pins both pages.
        let s = gpu_page_span(0x1fff0, 0x20).unwrap();
        assert_eq!((s.start, s.len, s.offset), (0x10000, 0x20000, 0xfff0));

        assert!(gpu_page_span(0x1000, 0).is_err());
        assert!(gpu_page_span(u64::MAX - 4, 10).is_err());
        assert!(
            gpu_page_span(u64::MAX - 100, 10).is_err(),
            "rounding up overflows"
        );
    }

    #[test]
    fn span_property_holds_for_many_ranges() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let va = x >> 20;
            let len = (x % (1 << 22)) + 1;
            let s = gpu_page_span(va, len).unwrap();
            assert_eq!(s.start % GPU_PAGE_SIZE, 0);
            assert_eq!(s.len % GPU_PAGE_SIZE, 0);
            assert!(s.start <= va && va + len <= s.start + s.len);
            assert_eq!(s.offset, va - s.start);
            assert!(s.len - len < 2 * GPU_PAGE_SIZE);
        }
    }

    #[test]
    fn copy_bounds_are_checked() {
        assert!(check_copy(0, 10, 10).is_ok());
        assert!(check_copy(10, 0, 10).is_ok());
        assert!(matches!(
            check_copy(5, 6, 10),
            Err(GdrError::OutOfBounds { .. })
        ));
        assert!(check_copy(usize::MAX, 2, 10).is_err());
    }

    /// Where libgdrapi is not installed (here), opening must be a clear
    /// `NotInstalled` naming what was tried; where it is but the kernel
    /// module is missing, `OpenFailed`.
    #[test]
    fn open_without_gdrcopy_is_a_clear_error() {
        match Gdr::open() {
            Err(GdrError::NotInstalled(msg)) => {
                assert!(msg.contains("libgdrapi.so.2"), "{msg}");
                assert!(msg.contains("libgdrapi.so:"), "{msg}");
                let e = GdrError::NotInstalled(msg);
                assert_eq!(e.kind(), ErrorKind::Unreachable);
                assert!(e.to_string().starts_with("gdrcopy is not available"));
            }
            Err(GdrError::OpenFailed) => {}
            Ok(g) => drop(g),
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }

    #[test]
    fn info_struct_has_the_v2_layout() {
        assert_eq!(std::mem::size_of::<GdrMh>(), 8);
        assert_eq!(std::mem::offset_of!(GdrInfo, tm_cycles), 24);
        assert_eq!(std::mem::offset_of!(GdrInfo, mapping_type), 40);
        assert_eq!(std::mem::size_of::<GdrInfo>(), 48);
    }
}
