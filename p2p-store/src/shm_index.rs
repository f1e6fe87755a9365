//! Same-host gets without a round trip: a holder publishes where its
//! resident objects are in a table in shared memory, and a client on the
//! same host reads it with one-sided `shm` READs instead of asking for a
//! lease.
//!
//! ```text
//! table = buckets × 4 slots × 128 B         slot (little endian)
//!   bucket of a key = key bytes 0..8 mod n    0..8    seq: even stable, odd being written
//!                                             8..16   state: 1 occupied, 0 empty
//!                                             16..48  key
//!                                             48..56  pool offset
//!                                             56..64  length
//!                                             64..96  checksum
//!
//! client: READ bucket ─► slot with the key, seq even ─► READ the bytes
//!         ─► READ the slot's seq again ─► same seq and checksum matches: done
//!         anything else ─► the lease path (RPC), which is always correct
//! ```
//!
//! Why no lease is needed: the holder rewrites a slot (seq odd, fields, seq
//! even, a seqlock) *before* the object's memory can be reserved again (the
//! update runs inside the index operation that frees it, under the holder's
//! lock, and a new reservation is granted only after). A client whose copy
//! overlapped a reuse therefore sees a different seq on its second read. A
//! slot copied while being written (the copy is a plain `memcpy`) is caught
//! by the seq check or, at worst, by the checksum, which must match the
//! bytes read; bytes are never reported without both. An object that does
//! not fit its bucket is simply not published: gets of it take the lease
//! path.
//!
//! The writer side is [`ShmIndexWriter`] (an [`crate::index::LocationObserver`]);
//! the reader side is [`find`] and [`seq_at`] over bytes the client copied.
//! This module does no I/O of its own.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use kvmesh_gpu::Region;

use crate::index::LocationObserver;
use crate::key::{Checksum, ObjectKey};

/// Bytes of one slot.
pub const SLOT_BYTES: usize = 128;
/// Slots per bucket.
pub const SLOTS_PER_BUCKET: usize = 4;
/// Bytes of one bucket (what a client reads first).
pub const BUCKET_BYTES: usize = SLOT_BYTES * SLOTS_PER_BUCKET;

const SEQ: usize = 0;
const STATE: usize = 8;
const KEY: usize = 16;
const OFFSET: usize = 48;
const LEN: usize = 56;
const CHECKSUM: usize = 64;

/// Where an object's bytes are, as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Offset in the holder's pool region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Checksum of the bytes.
    pub checksum: Checksum,
}

/// A slot found for a key: its seq at the time of the read and what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Byte offset of the slot in the table (to read its seq again).
    pub slot_offset: u64,
    /// The slot's seq (even).
    pub seq: u64,
    /// Where the bytes are.
    pub at: Published,
}

/// Buckets for a pool of `pool_bytes`: one slot per 16 KiB of pool, at
/// least 1024 and at most 2^20 buckets.
pub fn buckets_for(pool_bytes: u64) -> u32 {
    let slots = pool_bytes / (16 << 10);
    (slots / SLOTS_PER_BUCKET as u64).clamp(1024, 1 << 20) as u32
}

/// The bucket of `key` in a table of `buckets`.
pub fn bucket_of(key: &ObjectKey, buckets: u32) -> u32 {
    let b = key.as_bytes();
    let h = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    (h % u64::from(buckets.max(1))) as u32
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Looks `key` up in a copy of its bucket (`bucket` = [`BUCKET_BYTES`]
/// bytes read from byte `bucket_offset` of the table). `None` when no
/// stable occupied slot holds the key.
pub fn find(bucket: &[u8], bucket_offset: u64, key: &ObjectKey) -> Option<Found> {
    if bucket.len() < BUCKET_BYTES {
        return None;
    }
    (0..SLOTS_PER_BUCKET).find_map(|i| {
        let s = &bucket[i * SLOT_BYTES..(i + 1) * SLOT_BYTES];
        let seq = u64_at(s, SEQ);
        if seq % 2 == 1 || u64_at(s, STATE) != 1 || &s[KEY..KEY + 32] != key.as_bytes() {
            return None;
        }
        let checksum = Checksum::from_slice(&s[CHECKSUM..CHECKSUM + 32]).ok()?;
        Some(Found {
            slot_offset: bucket_offset + (i * SLOT_BYTES) as u64,
            seq,
            at: Published {
                offset: u64_at(s, OFFSET),
                len: u64_at(s, LEN),
                checksum,
            },
        })
    })
}

/// The seq in 8 bytes read back from a slot's start.
pub fn seq_at(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?))
}

/// The holder's side: keeps the table in step with the index.
#[derive(Debug)]
pub struct ShmIndexWriter {
    table: Region,
    buckets: u32,
}

impl ShmIndexWriter {
    /// A writer over `table`, which must hold `buckets` buckets and start
    /// zeroed (engine-allocated memory is).
    pub fn new(table: Region, buckets: u32) -> Option<ShmIndexWriter> {
        if buckets == 0 || table.len() < u64::from(buckets) * BUCKET_BYTES as u64 {
            return None;
        }
        if !table.kind().is_host() || !(table.as_ptr() as usize).is_multiple_of(8) {
            return None;
        }
        Some(ShmIndexWriter { table, buckets })
    }

    /// The table region (its descriptor goes to clients).
    pub fn table(&self) -> &Region {
        &self.table
    }

    /// Buckets in the table.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    fn slot_ptr(&self, bucket: u32, i: usize) -> *mut u8 {
        let off = bucket as usize * BUCKET_BYTES + i * SLOT_BYTES;
        // SAFETY: `new` checked that every bucket lies inside the region.
        unsafe { self.table.as_ptr().add(off) }
    }

    fn seq(&self, slot: *mut u8) -> &AtomicU64 {
        // SAFETY: slots are 128-byte aligned inside an 8-byte aligned
        // mapping that lives as long as `self.table`; the seq word is only
        // written through this atomic (clients read it with plain copies,
        // which the protocol tolerates).
        unsafe { &*(slot as *const AtomicU64) }
    }

    fn read_u64(slot: *mut u8, at: usize) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: `at + 8 <= SLOT_BYTES`; only this writer changes the slot.
        unsafe { std::ptr::copy_nonoverlapping(slot.add(at), b.as_mut_ptr(), 8) };
        u64::from_le_bytes(b)
    }

    fn key_is(slot: *mut u8, key: &ObjectKey) -> bool {
        let mut k = [0u8; 32];
        // SAFETY: as in `read_u64`.
        unsafe { std::ptr::copy_nonoverlapping(slot.add(KEY), k.as_mut_ptr(), 32) };
        &k == key.as_bytes()
    }

    /// Rewrites one slot under its seqlock.
    fn write_slot(&self, slot: *mut u8, key: &ObjectKey, at: Option<Published>) {
        let seq = self.seq(slot);
        let s = seq.load(Ordering::Relaxed);
        seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        let mut body = [0u8; SLOT_BYTES - STATE];
        if let Some(p) = at {
            body[..8].copy_from_slice(&1u64.to_le_bytes());
            body[KEY - STATE..KEY - STATE + 32].copy_from_slice(key.as_bytes());
            body[OFFSET - STATE..OFFSET - STATE + 8].copy_from_slice(&p.offset.to_le_bytes());
            body[LEN - STATE..LEN - STATE + 8].copy_from_slice(&p.len.to_le_bytes());
            body[CHECKSUM - STATE..CHECKSUM - STATE + 32].copy_from_slice(p.checksum.as_bytes());
        }
        // SAFETY: the slot's body lies inside the table; only this writer
        // (serialised by the holder's lock) writes it.
        unsafe { std::ptr::copy_nonoverlapping(body.as_ptr(), slot.add(STATE), body.len()) };
        seq.store(s.wrapping_add(2), Ordering::Release);
    }
}

impl LocationObserver for ShmIndexWriter {
    fn located(&mut self, key: &ObjectKey, at: Option<Published>) {
        let b = bucket_of(key, self.buckets);
        let slots: [*mut u8; SLOTS_PER_BUCKET] = std::array::from_fn(|i| self.slot_ptr(b, i));
        let mine = slots
            .iter()
            .copied()
            .find(|&s| Self::read_u64(s, STATE) == 1 && Self::key_is(s, key));
        match (mine, at) {
            (Some(s), at) => self.write_slot(s, key, at),
            (None, Some(p)) => {
                if let Some(s) = slots.into_iter().find(|&s| Self::read_u64(s, STATE) != 1) {
                    self.write_slot(s, key, Some(p));
                }
                // A full bucket: not published, gets take the lease path.
            }
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_gpu::{Engine, EngineConfig, MemoryKind};

    fn key(i: u32) -> ObjectKey {
        ObjectKey::for_content(&i.to_le_bytes())
    }

    fn at(i: u64) -> Published {
        Published {
            offset: i * 4096,
            len: 1000 + i,
            checksum: Checksum::compute(&i.to_le_bytes()),
        }
    }

    fn bucket(w: &ShmIndexWriter, k: &ObjectKey) -> (Vec<u8>, u64) {
        let off = u64::from(bucket_of(k, w.buckets())) * BUCKET_BYTES as u64;
        let mut b = vec![0u8; BUCKET_BYTES];
        w.table().read_at(off, &mut b).unwrap();
        (b, off)
    }

    #[test]
    fn publish_move_and_withdraw_bump_the_seq_and_are_found() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let buckets = 4;
        let t = e
            .alloc(u64::from(buckets) * BUCKET_BYTES as u64, MemoryKind::Host)
            .unwrap();
        let mut w = ShmIndexWriter::new(t, buckets).unwrap();
        let k = key(1);
        let (b, off) = bucket(&w, &k);
        assert_eq!(find(&b, off, &k), None);
        w.located(&k, Some(at(3)));
        let (b, off) = bucket(&w, &k);
        let f = find(&b, off, &k).unwrap();
        assert_eq!(f.at, at(3));
        assert_eq!(f.seq % 2, 0);
        // Moved (promoted elsewhere): same slot, new seq.
        w.located(&k, Some(at(7)));
        let (b, _) = bucket(&w, &k);
        let g = find(&b, off, &k).unwrap();
        assert_eq!((g.slot_offset, g.at), (f.slot_offset, at(7)));
        assert!(g.seq > f.seq);
        // Withdrawn: gone, and the slot's seq moved again.
        w.located(&k, None);
        let (b, _) = bucket(&w, &k);
        assert_eq!(find(&b, off, &k), None);
        let rel = (g.slot_offset - off) as usize;
        assert!(seq_at(&b[rel..]).unwrap() > g.seq);
    }

    #[test]
    fn a_full_bucket_publishes_nothing_more_and_a_torn_slot_is_not_found() {
        let e = Engine::new(EngineConfig::default()).unwrap();
        let t = e.alloc(BUCKET_BYTES as u64, MemoryKind::Host).unwrap();
        let mut w = ShmIndexWriter::new(t, 1).unwrap();
        let keys: Vec<_> = (0..6).map(key).collect();
        for (i, k) in keys.iter().enumerate() {
            w.located(k, Some(at(i as u64)));
        }
        let (b, off) = bucket(&w, &keys[0]);
        let found: Vec<_> = keys.iter().filter(|k| find(&b, off, k).is_some()).collect();
        assert_eq!(found.len(), SLOTS_PER_BUCKET);
        // An odd seq (a write in progress) hides the slot.
        let mut torn = b.clone();
        torn[SEQ] |= 1;
        assert_eq!(find(&torn, off, &keys[0]), None);
        // Withdrawing one makes room for another.
        w.located(&keys[1], None);
        w.located(&keys[5], Some(at(5)));
        let (b, off) = bucket(&w, &keys[5]);
        assert_eq!(find(&b, off, &keys[5]).unwrap().at, at(5));
        assert_eq!(find(&b, off, &keys[1]), None);
        // Short input and bad tables are refused, not misread.
        assert_eq!(find(&b[..100], off, &keys[5]), None);
        let small = e.alloc(4096, MemoryKind::Host).unwrap();
        assert!(ShmIndexWriter::new(small, 9).is_none());
    }

    #[test]
    fn bucket_counts_follow_the_pool() {
        assert_eq!(buckets_for(0), 1024);
        assert_eq!(buckets_for(2 << 30), (2u64 << 30) as u32 / (16 << 10) / 4);
        assert_eq!(buckets_for(u64::MAX), 1 << 20);
        let k = key(9);
        assert!(bucket_of(&k, 1000) < 1000);
        assert_eq!(bucket_of(&k, 0), 0);
    }
}
