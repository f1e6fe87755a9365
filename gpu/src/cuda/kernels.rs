//! Run-time compiled copy kernels (NVRTC): one launch copies a whole
//! segment list, which is what gathering scattered KV blocks into a staging
//! buffer (offload) or scattering them back (load) reduces to.
//!
//! Compiled once per device for its compute capability
//! (`--gpu-architecture=compute_XY`) and cached for the process.
//!
//! ```text
//!  [Segment] --split into <= 64 KiB pieces--> pinned staging --H2D--> SegmentTable (device)
//!  launch: block b copies pieces b, b+grid, ...; 256 threads per piece,
//!          16-byte vectors when src and dst share 16-byte alignment, else 8/4/2/1
//! ```

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use super::device::{record_drop_error, GpuDevice};
use super::memory::{DeviceBuffer, GpuMemory, PinnedBuffer};
use super::raw::{self, Handle, Launch};
use super::segments::{self, Segment};
use super::stream::{GpuEvent, GpuStream};
use crate::error::{Error, Result};

/// The CUDA C++ source of the copy kernels.
pub const KERNEL_SOURCE: &str = r#"
struct KvSeg { unsigned long long src, dst, len; };

__device__ __forceinline__ void kv_copy_bytes(const unsigned char* s, unsigned char* d,
                                              unsigned long long n) {
    for (unsigned long long i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}

// s and d aligned to sizeof(T); m elements. Four loads in flight per thread.
template <typename T>
__device__ __forceinline__ void kv_copy_vec(const T* __restrict__ s, T* __restrict__ d,
                                            unsigned long long m) {
    const unsigned long long b = blockDim.x;
    unsigned long long i = threadIdx.x;
    for (; i + 3 * b < m; i += 4 * b) {
        T x0 = s[i], x1 = s[i + b], x2 = s[i + 2 * b], x3 = s[i + 3 * b];
        d[i] = x0; d[i + b] = x1; d[i + 2 * b] = x2; d[i + 3 * b] = x3;
    }
    for (; i < m; i += b) d[i] = s[i];
}

// Copies with A-byte vectors if src and dst agree modulo A: bytes up to the
// first aligned address, then vectors, then the tail.
template <unsigned A, typename T>
__device__ __forceinline__ bool kv_try_copy(const unsigned char* s, unsigned char* d,
                                            unsigned long long n) {
    unsigned long long sa = (unsigned long long)s, da = (unsigned long long)d;
    if (((sa ^ da) & (A - 1)) != 0) return false;
    unsigned long long head = (A - (sa & (A - 1))) & (A - 1);
    if (head > n) head = n;
    unsigned long long body = ((n - head) / A) * A;
    kv_copy_bytes(s, d, head);
    kv_copy_vec<T>((const T*)(s + head), (T*)(d + head), body / A);
    kv_copy_bytes(s + head + body, d + head + body, n - head - body);
    return true;
}

extern "C" __global__ void kvmesh_copy_segments(const KvSeg* __restrict__ segs,
                                                unsigned int count) {
    for (unsigned int i = blockIdx.x; i < count; i += gridDim.x) {
        const KvSeg g = segs[i];
        const unsigned char* s = (const unsigned char*)g.src;
        unsigned char* d = (unsigned char*)g.dst;
        if (kv_try_copy<16, uint4>(s, d, g.len)) continue;
        if (kv_try_copy<8, uint2>(s, d, g.len)) continue;
        if (kv_try_copy<4, unsigned int>(s, d, g.len)) continue;
        if (kv_try_copy<2, unsigned short>(s, d, g.len)) continue;
        kv_copy_bytes(s, d, g.len);
    }
}
"#;

const KERNEL_NAME: &std::ffi::CStr = c"kvmesh_copy_segments";
/// Bytes one block copies per piece.
pub const PIECE_BYTES: u64 = 64 << 10;
const THREADS: u32 = 256;
/// Blocks per SM in a launch (grid-stride beyond that).
const BLOCKS_PER_SM: u32 = 8;

struct Module {
    dev: GpuDevice,
    module: Handle,
    func: Handle,
}

// SAFETY: module and function handles may be used from any thread.
unsafe impl Send for Module {}
// SAFETY: as above; launches only pass the handles to the driver.
unsafe impl Sync for Module {}

impl Drop for Module {
    fn drop(&mut self) {
        let r = self.dev.bind().and_then(|()| {
            // SAFETY: the last user of the module is gone (it is only reached
            // through the `Arc` being dropped).
            unsafe { raw::module_unload(self.module) }
        });
        if let Err(e) = r {
            record_drop_error("kernel module", e);
        }
    }
}

static CACHE: OnceLock<Mutex<HashMap<u32, Arc<Module>>>> = OnceLock::new();

/// The copy kernels of one device.
#[derive(Clone)]
pub struct GpuKernels {
    m: Arc<Module>,
}

impl std::fmt::Debug for GpuKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuKernels")
            .field("device", &self.m.dev.ordinal())
            .finish()
    }
}

/// A segment list uploaded to the device, reusable for many launches (the
/// segments of one layer or one request do not change between them), and
/// reloadable with [`GpuKernels::upload_into`] without allocating again
/// while the new list fits.
#[derive(Debug, Default)]
pub struct SegmentTable {
    buf: Option<DeviceBuffer>,
    count: u32,
    /// Staging of the upload, written again only after its last copy.
    staging: Option<PinnedBuffer>,
    bytes: u64,
}

impl SegmentTable {
    /// Pieces in the table (after splitting).
    pub fn pieces(&self) -> u32 {
        self.count
    }

    /// Bytes the table copies.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl GpuKernels {
    /// Compiles (once per device and process) and loads the kernels.
    pub fn load(dev: &GpuDevice) -> Result<GpuKernels> {
        let cache = CACHE.get_or_init(Default::default);
        let mut g = cache.lock();
        if let Some(m) = g.get(&dev.ordinal()) {
            return Ok(GpuKernels { m: m.clone() });
        }
        raw::nvrtc_init()?;
        let (major, minor) = dev.compute_capability();
        let opts = vec![
            format!("--gpu-architecture=compute_{major}{minor}"),
            "--std=c++14".to_string(),
        ];
        let ptx = raw::nvrtc_compile(KERNEL_SOURCE, "kvmesh_copy.cu", &opts)?;
        dev.bind()?;
        let module = raw::module_load(&ptx)?;
        // SAFETY: `module` is live (just loaded).
        let func = match unsafe { raw::module_function(module, KERNEL_NAME) } {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: loaded above, nothing else uses it.
                let _ = unsafe { raw::module_unload(module) };
                return Err(e);
            }
        };
        let m = Arc::new(Module {
            dev: dev.clone(),
            module,
            func,
        });
        g.insert(dev.ordinal(), m.clone());
        Ok(GpuKernels { m })
    }

    /// The device the kernels run on.
    pub fn device(&self) -> &GpuDevice {
        &self.m.dev
    }

    /// Splits `segs` into pieces and uploads them on `stream` (asynchronous;
    /// a launch on any stream is ordered after the upload).
    pub fn upload(&self, stream: &GpuStream, segs: &[Segment]) -> Result<SegmentTable> {
        let mut t = SegmentTable::default();
        self.upload_into(stream, segs, &mut t)?;
        Ok(t)
    }

    /// [`GpuKernels::upload`] into an existing table, reusing its buffers
    /// when the list fits (a hot path uploads a list per step). Waits for
    /// the table's previous upload to have left its staging memory.
    pub fn upload_into(
        &self,
        stream: &GpuStream,
        segs: &[Segment],
        table: &mut SegmentTable,
    ) -> Result<()> {
        let pieces = segments::split(segs, PIECE_BYTES);
        if pieces.is_empty() {
            return Err(Error::Invalid("empty segment list".into()));
        }
        let count = u32::try_from(pieces.len())
            .map_err(|_| Error::Invalid(format!("{} segment pieces", pieces.len())))?;
        let bytes_len = (pieces.len() * std::mem::size_of::<Segment>()) as u64;
        let fits = table
            .staging
            .as_ref()
            .is_some_and(|b| b.byte_len() >= bytes_len);
        if !fits {
            let cap = bytes_len.max(2 * table.staging.as_ref().map_or(0, |b| b.byte_len()));
            table.staging = Some(PinnedBuffer::alloc(&self.m.dev, cap)?);
            table.buf = Some(DeviceBuffer::alloc(&self.m.dev, cap)?);
        }
        let (Some(staging), Some(buf)) = (table.staging.as_mut(), table.buf.as_ref()) else {
            return Err(Error::Invalid("segment table without buffers".into()));
        };
        {
            let dst = staging.as_mut_slice()?;
            for (k, p) in pieces.iter().enumerate() {
                let o = k * 24;
                dst[o..o + 8].copy_from_slice(&p.src.to_ne_bytes());
                dst[o + 8..o + 16].copy_from_slice(&p.dst.to_ne_bytes());
                dst[o + 16..o + 24].copy_from_slice(&p.len.to_ne_bytes());
            }
        }
        stream.copy(buf, 0, staging, 0, bytes_len)?;
        table.count = count;
        table.bytes = pieces.iter().map(|p| p.len).sum();
        Ok(())
    }

    /// Runs the copies of `table` on `stream` and returns the event after
    /// them.
    ///
    /// # Safety
    /// Every segment must read and write device-accessible memory that stays
    /// valid until the returned event completed; no two segments may write
    /// the same byte and no segment may write bytes another one reads.
    /// [`segments::validate`] checks this against known buffers.
    pub unsafe fn launch(&self, stream: &GpuStream, table: &SegmentTable) -> Result<GpuEvent> {
        if stream.device() != &self.m.dev {
            return Err(Error::Invalid("stream of another device".into()));
        }
        let Some(tbuf) = table.buf.as_ref().filter(|_| table.count > 0) else {
            return Err(Error::Invalid("empty segment table".into()));
        };
        self.m.dev.bind()?;
        tbuf.access().before_read(stream)?;
        let grid = table
            .count
            .min(self.m.dev.sm_count() * BLOCKS_PER_SM)
            .max(1);
        let mut ptr = tbuf.addr();
        let mut count = table.count;
        let mut params = [
            (&mut ptr as *mut u64).cast::<std::ffi::c_void>(),
            (&mut count as *mut u32).cast::<std::ffi::c_void>(),
        ];
        // SAFETY: the parameters match `kvmesh_copy_segments(const KvSeg*, unsigned)`;
        // the table outlives the launch (its drop waits for the read event
        // recorded below); segment targets are the caller's contract.
        unsafe {
            raw::launch(
                self.m.func,
                Launch {
                    grid,
                    block: THREADS,
                },
                stream.raw(),
                &mut params,
            )
        }?;
        let ev = stream.record()?;
        tbuf.access().read(&ev);
        Ok(ev)
    }

    /// Gathers scattered pieces into a staging buffer: checks `segs` against
    /// `src` (read) and `dst` (written), uploads them and launches.
    pub fn gather(
        &self,
        stream: &GpuStream,
        segs: &[Segment],
        src: &dyn GpuMemory,
        dst: &dyn GpuMemory,
    ) -> Result<GpuEvent> {
        self.checked_copy(stream, segs, src, dst)
    }

    /// Scatters a staging buffer back into scattered pieces (same checks as
    /// [`GpuKernels::gather`]; the kernel is the same, only the shape differs).
    pub fn scatter(
        &self,
        stream: &GpuStream,
        segs: &[Segment],
        src: &dyn GpuMemory,
        dst: &dyn GpuMemory,
    ) -> Result<GpuEvent> {
        self.checked_copy(stream, segs, src, dst)
    }

    fn checked_copy(
        &self,
        stream: &GpuStream,
        segs: &[Segment],
        src: &dyn GpuMemory,
        dst: &dyn GpuMemory,
    ) -> Result<GpuEvent> {
        segments::validate(
            segs,
            (src.addr(), src.byte_len()),
            (dst.addr(), dst.byte_len()),
        )?;
        if segs.iter().all(|s| s.len == 0) {
            return stream.record();
        }
        let (s0, s1) = (src.addr(), src.addr() + src.byte_len());
        let (d0, d1) = (dst.addr(), dst.addr() + dst.byte_len());
        if s0 < d1 && d0 < s1 {
            return Err(Error::Invalid(
                "gather/scatter source and destination overlap".into(),
            ));
        }
        let table = self.upload(stream, segs)?;
        dst.access().before_write(stream)?;
        src.access().before_read(stream)?;
        // SAFETY: every segment lies inside `src` (read) or `dst` (written),
        // the two do not overlap and writes do not overlap each other
        // (validated above); both buffers wait for the event below before
        // releasing their memory.
        let ev = unsafe { self.launch(stream, &table) }?;
        dst.access().wrote(&ev);
        src.access().read(&ev);
        // Freed by the poller once the launch finished, so this call does not
        // wait for the kernel.
        ev.on_complete(move |_| drop(table));
        Ok(ev)
    }
}
