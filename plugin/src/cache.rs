//! A KV cache registered with the transfer engine, and the descriptor a
//! peer needs to write into it.
//!
//! ```text
//!   decode worker                                  prefill worker
//!   KvCache::register(layout, caller memory)
//!   cache.desc().to_bytes()  ----- out of band ---->  KvCacheDesc::from_bytes
//!                                                     RemoteKvCache::import
//!                                                     KvCache::push(..)  (push.rs)
//! ```
//!
//! A cache is a [`KvLayout`] over one engine region per base region of the
//! layout. Host memory works today; GPU memory goes through
//! `MemoryKind::Gpu`, which the engine refuses with a clear error until it
//! has CUDA support.

use std::time::{Duration, Instant};

use kvmesh_gpu::{Batch, Engine, EngineId, MemoryKind, PeerId, Region, RegionDesc, RemoteRegion};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout::KvLayout;

const DESC_MAGIC: [u8; 2] = *b"KC";
/// Version of the [`KvCacheDesc`] encoding.
pub const KV_CACHE_DESC_VERSION: u16 = 1;
/// Largest encoded descriptor accepted.
pub const MAX_KV_CACHE_DESC_BYTES: usize = 1 << 20;
/// How long `Drop` waits for a cache that was not deregistered explicitly.
const DROP_DEREGISTER_TIMEOUT: Duration = Duration::from_secs(1);

/// A KV cache whose base regions are registered with an engine.
#[derive(Debug)]
pub struct KvCache {
    engine: Engine,
    layout: KvLayout,
    regions: Vec<Region>,
    state: Mutex<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    /// Set by the first deregistration attempt: new pushes are refused.
    closing: bool,
    /// Per region: removed from the engine.
    removed: Vec<bool>,
    /// A region the engine removed while operations on it were still in
    /// flight at the deadline (the engine cannot wait for them again).
    busy: Option<u64>,
    /// Pushes from this cache that may still be running.
    pushes: Vec<Batch>,
}

impl KvCache {
    fn from_regions(engine: &Engine, layout: KvLayout, regions: Vec<Region>) -> KvCache {
        let n = regions.len();
        KvCache {
            engine: engine.clone(),
            layout,
            regions,
            state: Mutex::new(CacheState {
                removed: vec![false; n],
                ..Default::default()
            }),
        }
    }

    /// Registers caller memory: `bases[r]` = (pointer, length) of base
    /// region `r` of the layout (one per layer, or one for the whole pool).
    ///
    /// # Safety
    /// Each range must be valid for reads and writes from any thread until
    /// [`KvCache::deregister`] has returned `Ok`.
    pub unsafe fn register(
        engine: &Engine,
        layout: KvLayout,
        bases: &[(*mut u8, u64)],
        kind: MemoryKind,
    ) -> Result<KvCache> {
        let lens: Vec<u64> = bases.iter().map(|b| b.1).collect();
        layout.check_regions(&lens)?;
        let mut regions = Vec::with_capacity(bases.len());
        for (r, &(ptr, len)) in bases.iter().enumerate() {
            // SAFETY: forwarded from the caller's contract.
            match unsafe { engine.register(ptr, len, kind) } {
                Ok(reg) => regions.push(reg),
                Err(e) => {
                    for reg in &regions {
                        // No operation can use them yet: this returns at once.
                        let _ = engine.deregister(reg, Duration::ZERO);
                    }
                    return Err(match e {
                        kvmesh_gpu::Error::Invalid(m) => {
                            Error::Invalid(format!("base region {r}: {m}"))
                        }
                        e => Error::Engine(e),
                    });
                }
            }
        }
        Ok(KvCache::from_regions(engine, layout, regions))
    }

    /// Allocates engine-owned memory for the layout (host kinds are
    /// reachable by same-host peers over `shm`).
    pub fn alloc(engine: &Engine, layout: KvLayout, kind: MemoryKind) -> Result<KvCache> {
        let mut regions = Vec::with_capacity(layout.region_count());
        for r in 0..layout.region_count() {
            match engine.alloc(layout.required_region_len(r), kind) {
                Ok(reg) => regions.push(reg),
                Err(e) => {
                    for reg in &regions {
                        let _ = engine.deregister(reg, Duration::ZERO);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(KvCache::from_regions(engine, layout, regions))
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The engine regions, one per base region of the layout.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The descriptor a peer imports to push into this cache.
    pub fn desc(&self) -> KvCacheDesc {
        KvCacheDesc {
            layout: self.layout.clone(),
            regions: self.regions.iter().map(|r| r.desc()).collect(),
        }
    }

    /// Whether deregistration has started (the cache takes no new pushes).
    pub fn is_closing(&self) -> bool {
        self.state.lock().closing
    }

    /// Runs `submit` unless the cache is closing, and tracks the batch it
    /// returns so deregistration waits for it.
    pub(crate) fn track(&self, submit: impl FnOnce() -> Result<Batch>) -> Result<Batch> {
        let mut st = self.state.lock();
        if st.closing {
            return Err(Error::Closed("KV cache"));
        }
        let b = submit()?;
        st.pushes.retain(|b| b.poll().is_none());
        st.pushes.push(b.clone());
        Ok(b)
    }

    /// Deregisters the cache: new pushes from it and transfers into it are
    /// refused, then waits up to `timeout` for those in flight. After `Ok`
    /// the engine no longer touches the memory. Blocks the calling thread,
    /// never past the deadline. Idempotent once it has succeeded.
    pub fn deregister(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let pushes = {
            let mut st = self.state.lock();
            st.closing = true;
            std::mem::take(&mut st.pushes)
        };
        // Our own pushes first: they complete by their deadlines.
        for (i, b) in pushes.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if b.wait_blocking(left).is_none() {
                self.state.lock().pushes.extend(pushes[i..].iter().cloned());
                return Err(Error::Engine(kvmesh_gpu::Error::Timeout(format!(
                    "KV cache deregistration: {} push(es) still running after {timeout:?}",
                    pushes.len() - i
                ))));
            }
        }
        for (r, reg) in self.regions.iter().enumerate() {
            if self.state.lock().removed[r] {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let res = self.engine.deregister(reg, left);
            let mut st = self.state.lock();
            st.removed[r] = true;
            match res {
                Ok(()) => {}
                Err(kvmesh_gpu::Error::RegionBusy(id)) => {
                    st.busy = Some(id);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(id) = self.state.lock().busy {
            // The engine has removed the region but cannot be asked again
            // whether its last operations finished.
            return Err(Error::Engine(kvmesh_gpu::Error::RegionBusy(id)));
        }
        Ok(())
    }

    /// Whether [`KvCache::deregister`] has fully succeeded.
    pub fn is_deregistered(&self) -> bool {
        let st = self.state.lock();
        st.closing && st.busy.is_none() && st.removed.iter().all(|&r| r)
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        if !self.is_deregistered() {
            if let Err(e) = self.deregister(DROP_DEREGISTER_TIMEOUT) {
                tracing::warn!("dropping a KV cache that is still in use: {e}");
            }
        }
    }
}

/// What a peer needs to write into a [`KvCache`]: its layout and the
/// descriptors of its regions. Versioned binary encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheDesc {
    pub layout: KvLayout,
    pub regions: Vec<RegionDesc>,
}

impl KvCacheDesc {
    /// Versioned binary encoding (carries the owner's data-plane secret:
    /// hand it only to the peers that may write into the cache).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + 160 * self.regions.len());
        out.extend_from_slice(&DESC_MAGIC);
        out.extend_from_slice(&KV_CACHE_DESC_VERSION.to_le_bytes());
        // Serialising plain structs into a Vec cannot fail.
        out.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes and checks [`KvCacheDesc::to_bytes`] output.
    pub fn from_bytes(b: &[u8]) -> Result<KvCacheDesc> {
        let bad = |m: String| Error::Descriptor(m);
        if b.len() > MAX_KV_CACHE_DESC_BYTES {
            return Err(bad(format!(
                "{} bytes, more than the {MAX_KV_CACHE_DESC_BYTES} allowed",
                b.len()
            )));
        }
        if b.len() < 4 || b[..2] != DESC_MAGIC {
            return Err(bad("not a KV cache descriptor (bad magic)".into()));
        }
        let v = u16::from_le_bytes([b[2], b[3]]);
        if v != KV_CACHE_DESC_VERSION {
            return Err(bad(format!(
                "version {v}, this build understands {KV_CACHE_DESC_VERSION}"
            )));
        }
        let d: KvCacheDesc =
            postcard::from_bytes(&b[4..]).map_err(|e| bad(format!("decode: {e}")))?;
        d.check()?;
        Ok(d)
    }

    /// Checks the regions against the layout.
    pub fn check(&self) -> Result<()> {
        let lens: Vec<u64> = self.regions.iter().map(|r| r.len).collect();
        self.layout
            .check_regions(&lens)
            .map_err(|e| Error::Descriptor(e.to_string()))?;
        if let Some(r) = self
            .regions
            .iter()
            .find(|r| r.peer.engine_id != self.regions[0].peer.engine_id)
        {
            return Err(Error::Descriptor(format!(
                "region {} belongs to engine {}, region {} to engine {}",
                self.regions[0].region,
                self.regions[0].peer.short_id(),
                r.region,
                r.peer.short_id()
            )));
        }
        Ok(())
    }

    /// Engine id of the cache's owner (`None` for a descriptor with no
    /// regions, which [`KvCacheDesc::check`] refuses).
    pub fn engine_id(&self) -> Option<EngineId> {
        self.regions.first().map(|r| r.peer.engine_id)
    }
}

/// A peer's KV cache imported into a local engine.
#[derive(Debug, Clone)]
pub struct RemoteKvCache {
    layout: KvLayout,
    regions: Vec<RemoteRegion>,
    peer: PeerId,
    engine_id: EngineId,
}

impl RemoteKvCache {
    /// Makes the cache's owner known to `engine` (connections are opened by
    /// the first transfer).
    pub fn import(engine: &Engine, desc: &KvCacheDesc) -> Result<RemoteKvCache> {
        desc.check()?;
        let regions: Vec<RemoteRegion> = desc.regions.iter().map(|r| engine.import(r)).collect();
        // `check` guarantees at least one region (layouts have >= 1).
        let first = &desc.regions[0];
        Ok(RemoteKvCache {
            layout: desc.layout.clone(),
            peer: regions[0].peer,
            engine_id: first.peer.engine_id,
            regions,
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn regions(&self) -> &[RemoteRegion] {
        &self.regions
    }

    /// The owner, as a peer of the importing engine.
    pub fn peer(&self) -> PeerId {
        self.peer
    }

    pub fn engine_id(&self) -> EngineId {
        self.engine_id
    }
}
