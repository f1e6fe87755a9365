//! GPU KV caches in the prefix store: blocks move between HBM and the host
//! staging slots with the engine's copy kernels, so the many small pieces of
//! a paged layout become one kernel launch and one DMA copy per contiguous
//! staging range.
//!
//! ```text
//!  save:  cache (HBM, any layout) ─gather kernel─► mirror (HBM, staging offsets)
//!                                  ─D2H per run─► host staging slots ─► store.put_from
//!  load:  store.read_leased ─► host staging slots ─H2D per run─► mirror
//!                                  ─scatter kernel─► cache (HBM)
//! ```
//!
//! The mirror is a device buffer with the host staging region's size, so a
//! plan's staging offsets name the same bytes on both sides. Everything runs
//! on one stream of this module; a save is first ordered after the caller's
//! compute stream (when one is configured), so the kernel reads the KV the
//! model wrote. A copy returns only after its work completed on the GPU
//! (awaited through the engine's event poller, no thread blocks), so a layer
//! reported loaded is in HBM before the caller's next kernel is enqueued.
//!
//! This module only runs where the cache's regions are GPU memory; it does
//! not touch the store or the engine's transports.

use kvmesh_gpu::cuda::{
    DeviceBuffer, GpuDevice, GpuKernels, GpuMemory, GpuStream, HostRegistration, Segment,
    SegmentTable,
};
use kvmesh_gpu::{MemoryKind, Region};

use crate::error::{Error, Result};
use crate::layout::CopySegment;

/// Which way a plan moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Cache (GPU) to staging (host).
    Save,
    /// Staging (host) to cache (GPU).
    Load,
}

/// Device-side staging for one GPU KV cache.
pub(crate) struct GpuStaging {
    kernels: GpuKernels,
    stream: GpuStream,
    /// Same size as the host staging region.
    mirror: DeviceBuffer,
    /// The host staging region, page-locked for DMA.
    host: HostRegistration,
    /// The caller's compute stream a save is ordered after.
    order_after: Option<GpuStream>,
    /// One copy at a time (the mirror is shared by every operation), with
    /// the segment table each copy reloads.
    busy: tokio::sync::Mutex<SegmentTable>,
}

impl std::fmt::Debug for GpuStaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuStaging")
            .field("device", &self.kernels.device().ordinal())
            .field("mirror", &self.mirror)
            .finish()
    }
}

/// The device of `regions` when all of them are GPU memory of one device;
/// `None` when all are host memory; an error for a mix.
pub(crate) fn cache_device(regions: &[Region]) -> Result<Option<u32>> {
    let mut dev = None;
    let mut host = false;
    for r in regions {
        match r.kind() {
            MemoryKind::Gpu { device } => match dev {
                None => dev = Some(device),
                Some(d) if d == device => {}
                Some(d) => {
                    return Err(Error::Invalid(format!(
                        "KV cache regions on GPUs {d} and {device}: one cache lives on one GPU"
                    )))
                }
            },
            _ => host = true,
        }
    }
    if host && dev.is_some() {
        return Err(Error::Invalid(
            "KV cache regions mix host and GPU memory".into(),
        ));
    }
    Ok(dev)
}

impl GpuStaging {
    /// Sets up staging for a cache on GPU `device`; `host` is the engine's
    /// host staging region (it stays registered until this value drops).
    ///
    /// # Safety
    /// `order_after`, when given, must be a live `CUstream` of `device`'s
    /// primary context (0 is the legacy default stream) that outlives this
    /// value.
    pub(crate) unsafe fn new(
        device: u32,
        host: &Region,
        order_after: Option<u64>,
    ) -> Result<GpuStaging> {
        let gpu = |e: kvmesh_gpu::Error| Error::Invalid(format!("GPU KV cache: {e}"));
        let dev = GpuDevice::open(device).map_err(gpu)?;
        let kernels = GpuKernels::load(&dev).map_err(gpu)?;
        let stream = GpuStream::new(&dev).map_err(gpu)?;
        let mirror = DeviceBuffer::alloc(&dev, host.len()).map_err(gpu)?;
        // SAFETY: the staging region is engine memory that the prefix store
        // keeps registered for its whole life, longer than this value.
        let host =
            unsafe { HostRegistration::new(&dev, host.as_ptr(), host.len()) }.map_err(gpu)?;
        // SAFETY: forwarded from the caller's contract.
        let order_after = order_after.map(|raw| unsafe { GpuStream::from_raw(&dev, raw) });
        Ok(GpuStaging {
            kernels,
            stream,
            mirror,
            host,
            order_after,
            busy: tokio::sync::Mutex::new(SegmentTable::default()),
        })
    }

    /// Runs a save or load plan: segments between `cache` regions (GPU)
    /// and the staging region (`Place::region` 0), returning once the bytes
    /// are where the plan says.
    pub(crate) async fn copy(
        &self,
        dir: Direction,
        segs: &[CopySegment],
        cache: &[&Region],
    ) -> Result<()> {
        if segs.is_empty() {
            return Ok(());
        }
        let gpu = |e: kvmesh_gpu::Error| Error::Invalid(format!("GPU copy: {e}"));
        let mirror = self.mirror.addr();
        let mut kernel_segs = Vec::with_capacity(segs.len());
        let mut runs = Vec::with_capacity(segs.len());
        for s in segs {
            let (cache_place, staging_place) = match dir {
                Direction::Save => (s.src, s.dst),
                Direction::Load => (s.dst, s.src),
            };
            let region = cache
                .get(cache_place.region as usize)
                .ok_or_else(|| Error::Invalid("plan names a region the cache lacks".into()))?;
            check_range(region.len(), cache_place.offset, s.len, "cache")?;
            check_range(
                self.mirror.byte_len(),
                staging_place.offset,
                s.len,
                "staging",
            )?;
            let c = region.as_ptr() as u64 + cache_place.offset;
            let m = mirror + staging_place.offset;
            kernel_segs.push(match dir {
                Direction::Save => Segment {
                    src: c,
                    dst: m,
                    len: s.len,
                },
                Direction::Load => Segment {
                    src: m,
                    dst: c,
                    len: s.len,
                },
            });
            runs.push((staging_place.offset, s.len));
        }
        let runs = merge_runs(runs);
        let mut table = self.busy.lock().await;
        let st = &self.stream;
        match dir {
            Direction::Save => {
                if let Some(caller) = &self.order_after {
                    st.wait(&caller.record().map_err(gpu)?).map_err(gpu)?;
                }
                self.kernels
                    .upload_into(st, &kernel_segs, &mut table)
                    .map_err(gpu)?;
                // SAFETY: every segment was checked against its cache region
                // (device memory registered with the engine for the cache's
                // life) and the mirror; plans never write one byte twice, and
                // sources (cache) and destinations (mirror) are different
                // allocations.
                unsafe { self.kernels.launch(st, &table) }.map_err(gpu)?;
                for &(off, len) in &runs {
                    st.copy(&self.host, off, &self.mirror, off, len)
                        .map_err(gpu)?;
                }
                let ev = st.record().map_err(gpu)?;
                ev.completed().await.map_err(gpu)?;
            }
            Direction::Load => {
                for &(off, len) in &runs {
                    st.copy(&self.mirror, off, &self.host, off, len)
                        .map_err(gpu)?;
                }
                self.kernels
                    .upload_into(st, &kernel_segs, &mut table)
                    .map_err(gpu)?;
                // SAFETY: as for a save, with the roles swapped; the cache
                // blocks are the caller's to overwrite (load contract).
                unsafe { self.kernels.launch(st, &table) }.map_err(gpu)?;
                let ev = st.record().map_err(gpu)?;
                ev.completed().await.map_err(gpu)?;
            }
        }
        Ok(())
    }
}

fn check_range(len: u64, off: u64, n: u64, what: &str) -> Result<()> {
    match off.checked_add(n) {
        Some(end) if end <= len => Ok(()),
        _ => Err(Error::Invalid(format!(
            "plan reaches {off}+{n} past the {what}'s {len} bytes"
        ))),
    }
}

/// Sorts `(offset, len)` runs and merges touching or overlapping ones: the
/// DMA copies a plan needs between the mirror and host staging.
pub(crate) fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.retain(|r| r.1 > 0);
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (off, len) in runs {
        match out.last_mut() {
            Some((o, l)) if off <= *o + *l => *l = (*l).max(off + len - *o),
            _ => out.push((off, len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_when_they_touch_or_overlap() {
        assert_eq!(merge_runs(vec![]), vec![]);
        assert_eq!(
            merge_runs(vec![(100, 10), (0, 50), (50, 10), (105, 20), (200, 0)]),
            vec![(0, 60), (100, 25)]
        );
        assert_eq!(merge_runs(vec![(0, 100), (10, 5)]), vec![(0, 100)]);
    }

    #[test]
    fn host_caches_need_no_gpu_and_mixed_caches_are_refused() {
        let e = kvmesh_gpu::Engine::new(kvmesh_gpu::EngineConfig::default()).unwrap();
        let a = e.alloc(4096, MemoryKind::Host).unwrap();
        let b = e.alloc(4096, MemoryKind::HostPinned).unwrap();
        assert_eq!(cache_device(&[a, b]).unwrap(), None);
        assert_eq!(cache_device(&[]).unwrap(), None);
    }

    #[test]
    fn setup_works_with_a_driver_and_fails_clearly_without() {
        let e = kvmesh_gpu::Engine::new(kvmesh_gpu::EngineConfig::default()).unwrap();
        let host = e.alloc(1 << 20, MemoryKind::Host).unwrap();
        // SAFETY: no stream is given.
        let r = unsafe { GpuStaging::new(0, &host, None) };
        match kvmesh_gpu::cuda::available() {
            Ok(()) => {
                r.unwrap();
            }
            Err(_) => {
                let text = r.unwrap_err().to_string();
                assert!(text.contains("GPU KV cache"), "{text}");
                assert!(text.to_lowercase().contains("cuda"), "{text}");
            }
        }
    }
}
