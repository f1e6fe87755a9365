//! Offset allocator over one contiguous registered region.
//!
//! The DRAM pool is registered with the transfer engine once; objects live
//! at offsets inside it. This module hands out `(offset, len)` ranges and
//! takes them back. It never touches memory.
//!
//! Layout:
//!
//! ```text
//!  region [0, usable)
//!  ┌─────────┬───────────────────────┬──────┬───────────────────────┬─────────┐
//!  │ general │ slab (class 64 KiB)   │ free │ slab (class 256 KiB)  │  free   │
//!  │  alloc  │ [s0][s1][  ][s3]...   │      │ [s0][  ][s2]...       │         │
//!  └─────────┴───────────────────────┴──────┴───────────────────────┴─────────┘
//! ```
//!
//! * Size classes (configured: the KV block sizes in use) are served from
//!   slabs: runs of equal slots carved from the free extents, one bitmap
//!   each. A request goes to a class when it fits a slot with at most 1/8
//!   of the slot wasted. Allocating and freeing a slot is O(log slabs) and
//!   leaves no holes: any freed slot is reusable by the next block of that
//!   class.
//! * Everything else (odd sizes, and class requests when no slab can be
//!   carved) is served best-fit from the free extents, which are coalesced
//!   with their neighbours on free.
//! * A slab whose last slot is freed goes back to the free extents.
//!
//! Fragmentation: slot reuse means a steady stream of equal-size blocks
//! never fragments. Costs to know about: a slab stays carved while any one
//! of its slots is live, so a few long-lived blocks scattered over many
//! slabs can pin those slabs' free slots to their class
//! ([`Pool::stats`] reports them as `slab_free_bytes`); odd-size requests
//! can leave extent holes smaller than a slab, after which a class request
//! falls back to the extents; all sizes are rounded up to `align`.
//!
//! Must not depend on: the memory it describes, the engine, the clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::{Error, Result};

/// Allocator geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes in the region (rounded down to `align`).
    pub capacity: u64,
    /// Alignment of every offset and size; a power of two.
    pub align: u64,
    /// Target bytes per slab; every class slot must fit in it.
    pub slab_size: u64,
    /// Slot sizes served from slabs (rounded up to `align`).
    pub size_classes: Vec<u64>,
}

impl PoolConfig {
    /// A pool of `capacity` bytes with 64-byte alignment, 2 MiB slabs and
    /// no size classes.
    pub fn new(capacity: u64) -> PoolConfig {
        PoolConfig {
            capacity,
            align: 64,
            slab_size: 2 << 20,
            size_classes: Vec::new(),
        }
    }

    /// Adds slot sizes to serve from slabs.
    pub fn with_size_classes(mut self, classes: impl IntoIterator<Item = u64>) -> PoolConfig {
        self.size_classes.extend(classes);
        self
    }
}

/// A granted range. `len` is what was asked for; the pool may hold a few
/// more bytes behind it (rounding, slot size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Allocation {
    /// Offset in the region.
    pub offset: u64,
    /// Requested length.
    pub len: u64,
}

/// Occupancy figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Usable bytes (capacity rounded down to `align`).
    pub capacity: u64,
    /// Bytes held by live allocations (after rounding to slot or `align`).
    pub allocated_bytes: u64,
    /// Bytes in free extents (usable by any request).
    pub extent_free_bytes: u64,
    /// Bytes in free slots of carved slabs (usable by their class only).
    pub slab_free_bytes: u64,
    /// Largest free extent.
    pub largest_free_extent: u64,
    /// Live allocations.
    pub allocations: u64,
    /// Carved slabs.
    pub slabs: u64,
}

#[derive(Debug)]
struct SizeClass {
    slot: u64,
    slots_per_slab: u32,
    /// Starts of this class's slabs that have a free slot.
    partial: BTreeSet<u64>,
}

#[derive(Debug)]
struct Slab {
    class: usize,
    /// Bit set = slot free.
    free_bits: Vec<u64>,
    free_count: u32,
}

impl Slab {
    fn new(class: usize, slots: u32) -> Slab {
        let words = (slots as usize).div_ceil(64);
        let mut free_bits = vec![u64::MAX; words];
        let tail = slots as usize % 64;
        if tail != 0 {
            free_bits[words - 1] = (1u64 << tail) - 1;
        }
        Slab {
            class,
            free_bits,
            free_count: slots,
        }
    }

    fn take_first_free(&mut self) -> Option<u32> {
        for (w, word) in self.free_bits.iter_mut().enumerate() {
            if *word != 0 {
                let bit = word.trailing_zeros();
                *word &= !(1u64 << bit);
                self.free_count -= 1;
                return Some(w as u32 * 64 + bit);
            }
        }
        None
    }

    fn is_free(&self, slot: u32) -> bool {
        self.free_bits[slot as usize / 64] & (1u64 << (slot % 64)) != 0
    }

    fn put_back(&mut self, slot: u32) {
        self.free_bits[slot as usize / 64] |= 1u64 << (slot % 64);
        self.free_count += 1;
    }
}

/// The allocator. See the module docs.
#[derive(Debug)]
pub struct Pool {
    align: u64,
    usable: u64,
    /// Free extents: start -> len.
    extents: BTreeMap<u64, u64>,
    /// The same extents by (len, start), for best fit.
    extents_by_len: BTreeSet<(u64, u64)>,
    /// Live extent allocations: offset -> rounded len.
    general: HashMap<u64, u64>,
    classes: Vec<SizeClass>,
    /// Carved slabs by start.
    slabs: BTreeMap<u64, Slab>,
    allocated: u64,
    allocations: u64,
}

fn round_up(len: u64, align: u64) -> Option<u64> {
    len.checked_add(align - 1).map(|v| v & !(align - 1))
}

impl Pool {
    /// A pool with every byte free.
    pub fn new(config: PoolConfig) -> Result<Pool> {
        let align = config.align;
        if align == 0 || !align.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "pool align {align} must be a power of two"
            )));
        }
        let usable = config.capacity & !(align - 1);
        let mut slots: Vec<u64> = Vec::new();
        for &c in &config.size_classes {
            let slot = round_up(c.max(1), align)
                .ok_or_else(|| Error::InvalidConfig(format!("size class {c} too large")))?;
            if slot > config.slab_size {
                return Err(Error::InvalidConfig(format!(
                    "size class {c} does not fit a slab of {} bytes",
                    config.slab_size
                )));
            }
            slots.push(slot);
        }
        slots.sort_unstable();
        slots.dedup();
        let classes = slots
            .into_iter()
            .map(|slot| SizeClass {
                slot,
                slots_per_slab: u32::try_from(config.slab_size / slot).unwrap_or(u32::MAX),
                partial: BTreeSet::new(),
            })
            .collect();
        let mut pool = Pool {
            align,
            usable,
            extents: BTreeMap::new(),
            extents_by_len: BTreeSet::new(),
            general: HashMap::new(),
            classes,
            slabs: BTreeMap::new(),
            allocated: 0,
            allocations: 0,
        };
        if usable > 0 {
            pool.insert_extent(0, usable);
        }
        Ok(pool)
    }

    /// Usable bytes.
    pub fn capacity(&self) -> u64 {
        self.usable
    }

    /// Bytes held by live allocations.
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated
    }

    /// Bytes not held by live allocations (some may be class-only slots).
    pub fn free_bytes(&self) -> u64 {
        self.usable - self.allocated
    }

    /// Bytes the pool would hold for a request of `len` (slot or rounded
    /// size), or `None` if `len` is 0 or absurd.
    pub fn footprint(&self, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        match self.class_for(len) {
            Some(c) => Some(self.classes[c].slot),
            None => round_up(len, self.align),
        }
    }

    /// Bytes the pool holds for the live allocation at `offset`.
    pub fn held_len(&self, offset: u64) -> Option<u64> {
        if let Some((start, slab)) = self.slab_containing(offset) {
            let class = &self.classes[slab.class];
            let rel = offset - start;
            if rel.is_multiple_of(class.slot) && !slab.is_free((rel / class.slot) as u32) {
                return Some(class.slot);
            }
            return None;
        }
        self.general.get(&offset).copied()
    }

    /// Occupancy figures (walks the slabs and extents: O(n)).
    pub fn stats(&self) -> PoolStats {
        let extent_free_bytes: u64 = self.extents.values().sum();
        let slab_free_bytes = self
            .slabs
            .values()
            .map(|s| u64::from(s.free_count) * self.classes[s.class].slot)
            .sum();
        PoolStats {
            capacity: self.usable,
            allocated_bytes: self.allocated,
            extent_free_bytes,
            slab_free_bytes,
            largest_free_extent: self.largest_free_extent(),
            allocations: self.allocations,
            slabs: self.slabs.len() as u64,
        }
    }

    /// The largest free extent.
    pub fn largest_free_extent(&self) -> u64 {
        self.extents_by_len.last().map_or(0, |&(len, _)| len)
    }

    /// Allocates `len` bytes; `None` when no free slot or extent fits (or
    /// `len` is 0).
    pub fn alloc(&mut self, len: u64) -> Option<Allocation> {
        if len == 0 || len > self.usable {
            return None;
        }
        let (offset, held) = match self.class_for(len) {
            Some(c) => {
                let slot = self.classes[c].slot;
                match self.alloc_slot(c) {
                    Some(offset) => (offset, slot),
                    None => {
                        // No slab to carve: serve the slot size from the extents.
                        let offset = self.alloc_extent(slot)?;
                        self.general.insert(offset, slot);
                        (offset, slot)
                    }
                }
            }
            None => {
                let size = round_up(len, self.align)?;
                let offset = self.alloc_extent(size)?;
                self.general.insert(offset, size);
                (offset, size)
            }
        };
        self.allocated += held;
        self.allocations += 1;
        Some(Allocation { offset, len })
    }

    /// Frees the allocation at `offset`; returns the bytes given back.
    /// Unknown offsets (never allocated, already freed, inside a range) are
    /// an error and change nothing.
    pub fn free(&mut self, offset: u64) -> Result<u64> {
        let unknown = || Error::InvalidArgument(format!("no live allocation at offset {offset}"));
        let held = if let Some((start, _)) = self.slab_containing(offset) {
            self.free_slot(start, offset).ok_or_else(unknown)?
        } else {
            let held = self.general.remove(&offset).ok_or_else(unknown)?;
            self.release_extent(offset, held);
            held
        };
        self.allocated -= held;
        self.allocations -= 1;
        Ok(held)
    }

    fn class_for(&self, len: u64) -> Option<usize> {
        let idx = self.classes.partition_point(|c| c.slot < len);
        let class = self.classes.get(idx)?;
        // At most 1/8 of the slot wasted.
        (u128::from(len) * 8 >= u128::from(class.slot) * 7).then_some(idx)
    }

    fn slab_containing(&self, offset: u64) -> Option<(u64, &Slab)> {
        let (&start, slab) = self.slabs.range(..=offset).next_back()?;
        let class = &self.classes[slab.class];
        let end = start + u64::from(class.slots_per_slab) * class.slot;
        (offset < end).then_some((start, slab))
    }

    fn alloc_slot(&mut self, c: usize) -> Option<u64> {
        let start = match self.classes[c].partial.first() {
            Some(&s) => s,
            None => {
                let bytes = u64::from(self.classes[c].slots_per_slab) * self.classes[c].slot;
                let start = self.alloc_extent(bytes)?;
                self.slabs
                    .insert(start, Slab::new(c, self.classes[c].slots_per_slab));
                self.classes[c].partial.insert(start);
                start
            }
        };
        let slab = self.slabs.get_mut(&start)?;
        let slot = slab.take_first_free()?;
        if slab.free_count == 0 {
            self.classes[c].partial.remove(&start);
        }
        Some(start + u64::from(slot) * self.classes[c].slot)
    }

    fn free_slot(&mut self, start: u64, offset: u64) -> Option<u64> {
        let slab = self.slabs.get_mut(&start)?;
        let c = slab.class;
        let class = &mut self.classes[c];
        let rel = offset - start;
        if !rel.is_multiple_of(class.slot) {
            return None;
        }
        let slot = (rel / class.slot) as u32;
        if slab.is_free(slot) {
            return None;
        }
        slab.put_back(slot);
        let held = class.slot;
        if slab.free_count == class.slots_per_slab {
            class.partial.remove(&start);
            let bytes = u64::from(class.slots_per_slab) * class.slot;
            self.slabs.remove(&start);
            self.release_extent(start, bytes);
        } else {
            class.partial.insert(start);
        }
        Some(held)
    }

    fn insert_extent(&mut self, start: u64, len: u64) {
        self.extents.insert(start, len);
        self.extents_by_len.insert((len, start));
    }

    fn remove_extent(&mut self, start: u64, len: u64) {
        self.extents.remove(&start);
        self.extents_by_len.remove(&(len, start));
    }

    /// Best fit: the smallest free extent that holds `size`, lowest start
    /// among equals; the remainder stays free.
    fn alloc_extent(&mut self, size: u64) -> Option<u64> {
        let &(len, start) = self.extents_by_len.range((size, 0)..).next()?;
        self.remove_extent(start, len);
        if len > size {
            self.insert_extent(start + size, len - size);
        }
        Some(start)
    }

    /// Returns `[start, start+len)` to the free extents, merging neighbours.
    fn release_extent(&mut self, mut start: u64, mut len: u64) {
        if let Some((&prev, &prev_len)) = self.extents.range(..start).next_back() {
            if prev + prev_len == start {
                self.remove_extent(prev, prev_len);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.extents.get(&(start + len)) {
            self.remove_extent(start + len, next_len);
            len += next_len;
        }
        self.insert_extent(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KIB: u64 = 1024;

    fn pool(capacity: u64, classes: &[u64]) -> Pool {
        let mut cfg = PoolConfig::new(capacity).with_size_classes(classes.iter().copied());
        cfg.slab_size = 256 * KIB;
        Pool::new(cfg).unwrap()
    }

    #[test]
    fn equal_blocks_fill_the_pool_exactly_and_reuse_freed_slots() {
        let mut p = pool(1024 * KIB, &[64 * KIB]);
        let blocks: Vec<Allocation> = std::iter::from_fn(|| p.alloc(64 * KIB)).collect();
        assert_eq!(blocks.len(), 16);
        assert_eq!(p.free_bytes(), 0);
        assert_eq!(p.stats().slabs, 4);
        // Free every other block; the same number fit again, in those holes.
        let mut freed = BTreeSet::new();
        for b in blocks.iter().step_by(2) {
            assert_eq!(p.free(b.offset).unwrap(), 64 * KIB);
            freed.insert(b.offset);
        }
        assert_eq!(p.stats().slab_free_bytes, 8 * 64 * KIB);
        for _ in 0..8 {
            let a = p.alloc(64 * KIB).unwrap();
            assert!(freed.remove(&a.offset), "reused {a:?}");
        }
        assert!(p.alloc(64 * KIB).is_none());
        assert!(p.alloc(1).is_none());
    }

    #[test]
    fn near_class_sizes_use_the_slot_and_far_ones_do_not() {
        let mut p = pool(1024 * KIB, &[64 * KIB]);
        let a = p.alloc(60 * KIB).unwrap();
        assert_eq!(p.held_len(a.offset), Some(64 * KIB));
        assert_eq!(p.stats().slabs, 1);
        let b = p.alloc(40 * KIB).unwrap();
        assert_eq!(p.held_len(b.offset), Some(40 * KIB));
        let c = p.alloc(100).unwrap();
        assert_eq!(p.held_len(c.offset), Some(128));
        assert_eq!(p.footprint(60 * KIB), Some(64 * KIB));
        assert_eq!(p.footprint(100), Some(128));
        assert_eq!(p.footprint(0), None);
        assert_eq!(p.allocated_bytes(), 64 * KIB + 40 * KIB + 128);
    }

    #[test]
    fn empty_slab_returns_to_extents() {
        let mut p = pool(1024 * KIB, &[64 * KIB]);
        let a = p.alloc(64 * KIB).unwrap();
        assert_eq!(p.largest_free_extent(), 768 * KIB);
        p.free(a.offset).unwrap();
        let s = p.stats();
        assert_eq!(
            (s.slabs, s.largest_free_extent, s.allocations),
            (0, 1024 * KIB, 0)
        );
    }

    #[test]
    fn class_request_falls_back_when_no_slab_can_be_carved() {
        // 512 KiB region, 256 KiB slabs: fragment it so no 256 KiB run is
        // left, yet 64 KiB holes are.
        let mut p = pool(512 * KIB, &[64 * KIB]);
        let odd: Vec<Allocation> = (0..8).map(|_| p.alloc(40 * KIB).unwrap()).collect();
        for a in odd.iter().step_by(2) {
            p.free(a.offset).unwrap();
        }
        assert!(p.largest_free_extent() < 256 * KIB);
        let b = p.alloc(64 * KIB).unwrap();
        assert_eq!(p.stats().slabs, 0);
        assert_eq!(p.held_len(b.offset), Some(64 * KIB));
        p.free(b.offset).unwrap();
        assert_eq!(p.held_len(b.offset), None);
    }

    #[test]
    fn bad_frees_are_refused_and_change_nothing() {
        let mut p = pool(1024 * KIB, &[64 * KIB]);
        let a = p.alloc(64 * KIB).unwrap();
        let b = p.alloc(1000).unwrap();
        let before = p.stats();
        assert!(p.free(a.offset + 64).is_err());
        assert!(p.free(b.offset + 64).is_err());
        assert!(p.free(999 * KIB).is_err());
        assert_eq!(p.stats(), before);
        p.free(a.offset).unwrap();
        assert!(p.free(a.offset).is_err());
        p.free(b.offset).unwrap();
        assert!(p.free(b.offset).is_err());
        assert_eq!(p.allocated_bytes(), 0);
    }

    #[test]
    fn bad_config_and_requests() {
        let mut cfg = PoolConfig::new(1 << 20);
        cfg.align = 48;
        assert!(Pool::new(cfg).is_err());
        let mut cfg = PoolConfig::new(1 << 20).with_size_classes([4 << 20]);
        cfg.slab_size = 1 << 20;
        assert!(Pool::new(cfg).is_err());
        let mut p = pool(1000, &[]);
        assert_eq!(p.capacity(), 960);
        assert!(p.alloc(0).is_none());
        assert!(p.alloc(961).is_none());
        assert!(p.alloc(u64::MAX).is_none());
        assert!(p.alloc(960).is_some());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64),
        Free(prop::sample::Index),
    }

    fn op() -> impl Strategy<Value = Op> {
        let sizes = prop_oneof![
            Just(16 * KIB),
            Just(64 * KIB),
            (57 * KIB..=64 * KIB),
            (1u64..200 * KIB),
        ];
        prop_oneof![
            3 => sizes.prop_map(Op::Alloc),
            2 => any::<prop::sample::Index>().prop_map(Op::Free),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn random_workload_keeps_invariants(ops in prop::collection::vec(op(), 1..250)) {
            let cap = 2048 * KIB + 100;
            let mut p = pool(cap, &[16 * KIB, 64 * KIB]);
            // offset -> (len, held)
            let mut live: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Alloc(len) => match p.alloc(len) {
                        Some(a) => {
                            prop_assert_eq!(a.len, len);
                            prop_assert_eq!(a.offset % 64, 0);
                            let held = p.held_len(a.offset).unwrap();
                            prop_assert!(held >= len);
                            prop_assert!(a.offset + held <= p.capacity());
                            if let Some((&prev, &(_, prev_held))) = live.range(..a.offset).next_back() {
                                prop_assert!(prev + prev_held <= a.offset, "overlaps previous");
                            }
                            if let Some((&next, _)) = live.range(a.offset..).next() {
                                prop_assert!(a.offset + held <= next, "overlaps next");
                            }
                            live.insert(a.offset, (len, held));
                        }
                        None => {
                            // Refused only when nothing fits.
                            let need = p.footprint(len).unwrap();
                            prop_assert!(p.largest_free_extent() < need);
                            if let Some(c) = p.class_for(len) {
                                prop_assert!(p.classes[c].partial.is_empty());
                            }
                        }
                    },
                    Op::Free(idx) => {
                        if live.is_empty() {
                            continue;
                        }
                        let offset = *live.keys().nth(idx.index(live.len())).unwrap();
                        let (_, held) = live.remove(&offset).unwrap();
                        prop_assert_eq!(p.free(offset).unwrap(), held);
                    }
                }
                let total: u64 = live.values().map(|&(_, h)| h).sum();
                prop_assert_eq!(p.allocated_bytes(), total);
                let s = p.stats();
                prop_assert_eq!(s.allocations, live.len() as u64);
                prop_assert_eq!(s.extent_free_bytes + s.slab_free_bytes + total, p.capacity());
            }
            // Everything back: one extent spanning the whole region.
            for offset in live.keys().copied().collect::<Vec<_>>() {
                p.free(offset).unwrap();
            }
            let s = p.stats();
            prop_assert_eq!(s.allocated_bytes, 0);
            prop_assert_eq!(s.slabs, 0);
            prop_assert_eq!(s.largest_free_extent, p.capacity());
        }
    }
}
