//! The local object index: what this peer holds, where, and what may be
//! evicted.
//!
//! It owns the DRAM [`Pool`] allocator and one [`ObjectMeta`] per object,
//! keeps the least-recently-used order, and decides eviction and TTL expiry.
//! It performs no I/O: anything that needs bytes moved (spilling to SSD) is
//! returned as an [`EvictAction`] for the I/O layer, which reports back with
//! [`Index::complete_spill`]. The protocol layer ([`crate::holder`]) wraps
//! it with reservations and leases.
//!
//! Life of an object:
//!
//! ```text
//!          insert                 evict (spill on)             complete_spill(ok)
//!   ───────────────► DRAM ───────────────────────► DRAM+spilling ─────────────► SSD (+DRAM
//!                    │  ▲                                │ complete_spill(err)    while leased)
//!                    │  └──── complete_promote(ok) ◄──── │ ─► removed             │
//!                    │        begin_promote ◄────────────┼────────────────────────┘
//!                    │ evict (spill off, or already on SSD): dropped / demoted
//!                    │ expire (TTL) / remove: gone, or `doomed` until its last lease ends
//! ```
//!
//! Eviction (`evict`) runs when allocated bytes exceed the high watermark
//! and frees down to the low watermark, least recently used first, in two
//! passes: objects without a pin, then soft-pinned ones. Leased and
//! hard-pinned objects are never evicted. Bytes of in-flight spills count as
//! already freed, so repeated calls do not over-evict.
//!
//! TTL is independent of pins: an object with a TTL is removed when it
//! expires (after its last lease ends, if it is leased then).
//!
//! Must not depend on: file or network I/O, the system clock (time is an
//! argument), the engine.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::key::{Checksum, ObjectKey};
use crate::peer::PeerId;
use crate::pool::{Allocation, Pool, PoolConfig, PoolStats};
use crate::shm_index::Published;

/// Most replicas of one object (and most holders recorded with it).
pub const MAX_REPLICAS: usize = 16;

/// Eviction protection of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Pin {
    /// Evicted first.
    #[default]
    None,
    /// Evicted only after every unpinned object.
    Soft,
    /// Never evicted (bounded by `max_hard_pinned_bytes`).
    Hard,
}

/// Where the object's bytes are served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Tier {
    /// In the registered DRAM pool (it may also have an SSD copy).
    Dram,
    /// On the SSD tier only; must be promoted before it can be leased.
    Ssd,
}

/// Why an object left the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemovalReason {
    /// Evicted under memory pressure with no SSD copy.
    Evicted,
    /// Its TTL ran out.
    Expired,
    /// Removed on request.
    Deleted,
    /// Spilling to SSD failed, and the DRAM copy had to go.
    SpillFailed,
    /// Its only copy was on SSD and the SSD tier lost it.
    SsdLost,
}

/// An object that left the index. The I/O layer withdraws its provider
/// record and, if `on_ssd`, deletes the SSD copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The object.
    pub key: ObjectKey,
    /// Its length.
    pub len: u64,
    /// Whether an SSD copy exists and must be deleted.
    pub on_ssd: bool,
    /// Why.
    pub reason: RemovalReason,
}

/// What eviction decided for one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictAction {
    /// The DRAM copy is freed and there is no other local copy: the object
    /// is gone from this peer.
    Dropped(Removed),
    /// The DRAM copy is freed; the object stays available from SSD.
    Demoted {
        /// The object.
        key: ObjectKey,
    },
    /// Write the bytes at `location` to the SSD tier, then call
    /// [`Index::complete_spill`]. The DRAM copy stays valid until then.
    Spill {
        /// The object.
        key: ObjectKey,
        /// Its bytes in the pool.
        location: Allocation,
        /// Its checksum (to store in the SSD file header).
        checksum: Checksum,
    },
}

/// Options an object is stored with.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ObjectOptions {
    /// Eviction protection.
    pub pin: Pin,
    /// Lifetime from creation; `None` for no expiry.
    pub ttl: Option<Duration>,
    /// Replicas the object should have (R); 0 is read as 1.
    pub replication: u8,
    /// Peers known to hold it (including this one), at most
    /// [`MAX_REPLICAS`]. Repair reads it.
    pub holders: Vec<PeerId>,
}

impl ObjectOptions {
    fn validate(&self) -> Result<()> {
        if self.holders.len() > MAX_REPLICAS || usize::from(self.replication) > MAX_REPLICAS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_REPLICAS} replicas and holders"
            )));
        }
        if self.ttl.is_some_and(|t| t.is_zero()) {
            return Err(Error::InvalidArgument("ttl must be positive".into()));
        }
        Ok(())
    }
}

/// One object's record.
#[derive(Debug, Clone)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: ObjectKey,
    /// Payload length.
    pub len: u64,
    /// Payload checksum.
    pub checksum: Checksum,
    /// When it was committed (or restored from SSD).
    pub created: Instant,
    /// Last lease or touch.
    pub last_access: Instant,
    /// Eviction protection.
    pub pin: Pin,
    /// When its TTL runs out.
    pub expires_at: Option<Instant>,
    /// Leases now held on it.
    pub leases: u32,
    /// Its DRAM copy, if resident.
    pub location: Option<Allocation>,
    /// Whether an SSD copy exists.
    pub on_ssd: bool,
    /// Whether a spill of it is in flight.
    pub spilling: bool,
    /// DRAM being filled from SSD, if a promotion is in flight.
    pub promoting: Option<Allocation>,
    /// Replicas it should have.
    pub replication: u8,
    /// Peers known to hold it.
    pub holders: Vec<PeerId>,
    /// Removal pending until the last lease ends.
    doomed: Option<RemovalReason>,
    /// Pool bytes behind `location`.
    held: u64,
    /// LRU position (larger = more recent).
    tick: u64,
}

impl ObjectMeta {
    /// Which tier serves it.
    pub fn tier(&self) -> Tier {
        if self.location.is_some() {
            Tier::Dram
        } else {
            Tier::Ssd
        }
    }

    /// Whether it is scheduled for removal once its leases end.
    pub fn is_doomed(&self) -> bool {
        self.doomed.is_some()
    }

    /// Where a reader may copy the object from: its DRAM copy, unless it is
    /// doomed (a removal waits only for the leases already granted).
    pub fn readable(&self) -> Option<Published> {
        match (self.location, self.doomed) {
            (Some(l), None) => Some(Published {
                offset: l.offset,
                len: self.len,
                checksum: self.checksum,
            }),
            _ => None,
        }
    }

    /// Pool bytes that eviction can never take (hard-pinned or leased).
    fn protected_held(&self) -> u64 {
        if self.location.is_some() && (self.pin == Pin::Hard || self.leases > 0) {
            self.held
        } else {
            0
        }
    }

    fn resident_held(&self) -> u64 {
        if self.location.is_some() {
            self.held
        } else {
            0
        }
    }

    fn hard_held(&self) -> u64 {
        if self.location.is_some() && self.pin == Pin::Hard {
            self.held
        } else {
            0
        }
    }
}

/// Index tunables.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// The DRAM pool's geometry.
    pub pool: PoolConfig,
    /// Eviction starts above this fraction of the pool.
    pub high_watermark: f64,
    /// ... and frees down to this fraction.
    pub low_watermark: f64,
    /// Spill evicted objects to the SSD tier instead of dropping them.
    pub spill_to_ssd: bool,
    /// Most pool bytes that hard-pinned objects may hold.
    pub max_hard_pinned_bytes: u64,
}

impl IndexConfig {
    /// Watermarks 0.90 / 0.80, no SSD, hard pins up to half the pool.
    pub fn new(pool: PoolConfig) -> IndexConfig {
        let max_hard_pinned_bytes = pool.capacity / 2;
        IndexConfig {
            pool,
            high_watermark: 0.90,
            low_watermark: 0.80,
            spill_to_ssd: false,
            max_hard_pinned_bytes,
        }
    }
}

/// Occupancy and object counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    /// The pool's figures.
    pub pool: PoolStats,
    /// Objects indexed.
    pub objects: u64,
    /// Objects with a DRAM copy.
    pub dram_objects: u64,
    /// Objects with an SSD copy.
    pub ssd_objects: u64,
    /// Pool bytes held by DRAM copies of objects.
    pub resident_bytes: u64,
    /// Pool bytes held by hard-pinned or leased DRAM copies.
    pub protected_bytes: u64,
    /// Pool bytes held by hard-pinned DRAM copies.
    pub hard_pinned_bytes: u64,
    /// Pool bytes whose spill is in flight.
    pub spilling_bytes: u64,
}

/// Told where each object's readable DRAM copy is whenever that changes
/// (`None`: no longer readable there: removed, doomed, demoted, moved).
/// Called inside the index operation that made the change, so before any
/// memory it freed can be allocated again. [`crate::shm_index`] mirrors the
/// locations for same-host clients.
pub trait LocationObserver: Send + std::fmt::Debug {
    fn located(&mut self, key: &ObjectKey, at: Option<Published>);
}

/// The index. See the module docs.
#[derive(Debug)]
pub struct Index {
    config: IndexConfig,
    observer: Option<Box<dyn LocationObserver>>,
    pool: Pool,
    objects: HashMap<ObjectKey, ObjectMeta>,
    /// LRU of evictable DRAM copies with `Pin::None`, tick -> key.
    lru_unpinned: BTreeMap<u64, ObjectKey>,
    /// LRU of evictable DRAM copies with `Pin::Soft`.
    lru_soft: BTreeMap<u64, ObjectKey>,
    expiries: BTreeSet<(Instant, ObjectKey)>,
    next_tick: u64,
    resident_bytes: u64,
    protected_bytes: u64,
    hard_bytes: u64,
    spilling_bytes: u64,
    ssd_objects: u64,
}

impl Index {
    /// Reports every later change of where objects are readable to
    /// `observer` (objects indexed so far are reported now).
    pub fn set_observer(&mut self, mut observer: Box<dyn LocationObserver>) {
        for m in self.objects.values() {
            if let Some(at) = m.readable() {
                observer.located(&m.key, Some(at));
            }
        }
        self.observer = Some(observer);
    }

    /// An empty index over a fresh pool.
    pub fn new(config: IndexConfig) -> Result<Index> {
        let (lo, hi) = (config.low_watermark, config.high_watermark);
        if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) || lo > hi {
            return Err(Error::InvalidConfig(format!(
                "watermarks must satisfy 0 <= low ({lo}) <= high ({hi}) <= 1"
            )));
        }
        let pool = Pool::new(config.pool.clone())?;
        Ok(Index {
            config,
            observer: None,
            pool,
            objects: HashMap::new(),
            lru_unpinned: BTreeMap::new(),
            lru_soft: BTreeMap::new(),
            expiries: BTreeSet::new(),
            next_tick: 0,
            resident_bytes: 0,
            protected_bytes: 0,
            hard_bytes: 0,
            spilling_bytes: 0,
            ssd_objects: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// The pool (read-only; allocate through the index).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Allocated bytes above which eviction starts.
    pub fn high_watermark_bytes(&self) -> u64 {
        (self.pool.capacity() as f64 * self.config.high_watermark) as u64
    }

    /// Allocated bytes eviction frees down to.
    pub fn low_watermark_bytes(&self) -> u64 {
        (self.pool.capacity() as f64 * self.config.low_watermark) as u64
    }

    /// Pool bytes a new object could get if everything evictable were
    /// evicted: capacity minus hard-pinned and leased copies, reservations
    /// and promotions. This is the `free` a peer announces for placement.
    pub fn placement_free(&self) -> u64 {
        let evictable = self.resident_bytes - self.protected_bytes;
        let unavailable = self.pool.allocated_bytes() - evictable;
        self.pool.capacity() - unavailable
    }

    /// Figures for stats and metrics.
    pub fn stats(&self) -> IndexStats {
        IndexStats {
            pool: self.pool.stats(),
            objects: self.objects.len() as u64,
            dram_objects: self
                .objects
                .values()
                .filter(|o| o.location.is_some())
                .count() as u64,
            ssd_objects: self.ssd_objects,
            resident_bytes: self.resident_bytes,
            protected_bytes: self.protected_bytes,
            hard_pinned_bytes: self.hard_bytes,
            spilling_bytes: self.spilling_bytes,
        }
    }

    /// The object's record.
    pub fn get(&self, key: &ObjectKey) -> Option<&ObjectMeta> {
        self.objects.get(key)
    }

    /// Whether the object is indexed (any tier; doomed ones count until gone).
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.objects.contains_key(key)
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// All records, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &ObjectMeta> + '_ {
        self.objects.values()
    }

    /// Allocates pool space for a reservation or similar; the caller frees
    /// it with [`Index::free_allocation`] or hands it to [`Index::insert`].
    pub fn allocate(&mut self, len: u64) -> Option<Allocation> {
        self.pool.alloc(len)
    }

    /// Returns space from [`Index::allocate`] that did not become an object.
    pub fn free_allocation(&mut self, location: Allocation) -> Result<()> {
        self.pool.free(location.offset).map(|_| ())
    }

    /// Pool bytes a request of `len` would take.
    pub fn footprint(&self, len: u64) -> Option<u64> {
        self.pool.footprint(len)
    }

    /// Indexes a committed object whose bytes are at `location` (from
    /// [`Index::allocate`]). On error the allocation stays the caller's.
    pub fn insert(
        &mut self,
        now: Instant,
        key: ObjectKey,
        location: Allocation,
        checksum: Checksum,
        options: ObjectOptions,
    ) -> Result<&ObjectMeta> {
        options.validate()?;
        if self.objects.contains_key(&key) {
            return Err(Error::AlreadyExists(key));
        }
        let held = self
            .pool
            .held_len(location.offset)
            .ok_or_else(|| Error::InvalidArgument(format!("{location:?} is not allocated")))?;
        if options.pin == Pin::Hard {
            self.check_hard_room(held)?;
        }
        let expires_at = options.ttl.and_then(|t| now.checked_add(t));
        let tick = self.next_tick;
        self.next_tick += 1;
        let meta = ObjectMeta {
            key,
            len: location.len,
            checksum,
            created: now,
            last_access: now,
            pin: options.pin,
            expires_at,
            leases: 0,
            // Set through `account` below so the counters and LRU follow.
            location: None,
            on_ssd: false,
            spilling: false,
            promoting: None,
            replication: options.replication.max(1),
            holders: options.holders,
            doomed: None,
            held,
            tick,
        };
        if let Some(at) = expires_at {
            self.expiries.insert((at, key));
        }
        self.objects.insert(key, meta);
        self.account(&key, |m, _| m.location = Some(location));
        Ok(&self.objects[&key])
    }

    /// Indexes an object found on the SSD tier at startup.
    pub fn insert_ssd(
        &mut self,
        now: Instant,
        key: ObjectKey,
        len: u64,
        checksum: Checksum,
    ) -> Result<()> {
        if self.objects.contains_key(&key) {
            return Err(Error::AlreadyExists(key));
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        self.objects.insert(
            key,
            ObjectMeta {
                key,
                len,
                checksum,
                created: now,
                last_access: now,
                pin: Pin::None,
                expires_at: None,
                leases: 0,
                location: None,
                on_ssd: true,
                spilling: false,
                promoting: None,
                replication: 1,
                holders: Vec::new(),
                doomed: None,
                held: 0,
                tick,
            },
        );
        self.ssd_objects += 1;
        Ok(())
    }

    /// Updates the known holders (and R) of an object, e.g. after repair.
    pub fn set_holders(
        &mut self,
        key: &ObjectKey,
        replication: u8,
        holders: Vec<PeerId>,
    ) -> Result<()> {
        if holders.len() > MAX_REPLICAS || usize::from(replication) > MAX_REPLICAS {
            return Err(Error::InvalidArgument(format!(
                "at most {MAX_REPLICAS} replicas and holders"
            )));
        }
        let meta = self.objects.get_mut(key).ok_or(Error::NotFound(*key))?;
        meta.replication = replication.max(1);
        meta.holders = holders;
        Ok(())
    }

    /// Marks the object as just used (moves it to the LRU's recent end).
    pub fn touch(&mut self, now: Instant, key: &ObjectKey) {
        let tick = self.next_tick;
        let Some(meta) = self.objects.get_mut(key) else {
            return;
        };
        self.next_tick += 1;
        Self::unlink(&mut self.lru_unpinned, &mut self.lru_soft, meta);
        meta.tick = tick;
        meta.last_access = meta.last_access.max(now);
        Self::link(&mut self.lru_unpinned, &mut self.lru_soft, meta);
    }

    fn unlink(
        unpinned: &mut BTreeMap<u64, ObjectKey>,
        soft: &mut BTreeMap<u64, ObjectKey>,
        meta: &ObjectMeta,
    ) {
        match meta.pin {
            Pin::None => unpinned.remove(&meta.tick),
            Pin::Soft => soft.remove(&meta.tick),
            Pin::Hard => None,
        };
    }

    /// Puts an object in its LRU if it is an eviction candidate at all: a
    /// DRAM copy, not hard-pinned, not already spilling, not doomed. Leased
    /// objects stay linked and are skipped by `evict`.
    fn link(
        unpinned: &mut BTreeMap<u64, ObjectKey>,
        soft: &mut BTreeMap<u64, ObjectKey>,
        meta: &ObjectMeta,
    ) {
        if meta.location.is_none() || meta.spilling || meta.doomed.is_some() {
            return;
        }
        match meta.pin {
            Pin::None => unpinned.insert(meta.tick, meta.key),
            Pin::Soft => soft.insert(meta.tick, meta.key),
            Pin::Hard => None,
        };
    }

    /// Runs `f` on the object's record and keeps the byte counters and LRU
    /// membership in step with whatever it changed.
    fn account<R>(
        &mut self,
        key: &ObjectKey,
        f: impl FnOnce(&mut ObjectMeta, &mut Pool) -> R,
    ) -> Option<R> {
        let meta = self.objects.get_mut(key)?;
        let readable = meta.readable();
        Self::unlink(&mut self.lru_unpinned, &mut self.lru_soft, meta);
        let (p0, r0, h0, s0) = (
            meta.protected_held(),
            meta.resident_held(),
            meta.hard_held(),
            meta.on_ssd,
        );
        let out = f(meta, &mut self.pool);
        let (p1, r1, h1, s1) = (
            meta.protected_held(),
            meta.resident_held(),
            meta.hard_held(),
            meta.on_ssd,
        );
        Self::link(&mut self.lru_unpinned, &mut self.lru_soft, meta);
        let now_readable = meta.readable();
        if now_readable != readable {
            if let Some(o) = &mut self.observer {
                o.located(key, now_readable);
            }
        }
        self.protected_bytes = self.protected_bytes - p0 + p1;
        self.resident_bytes = self.resident_bytes - r0 + r1;
        self.hard_bytes = self.hard_bytes - h0 + h1;
        self.ssd_objects = self.ssd_objects - u64::from(s0) + u64::from(s1);
        Some(out)
    }

    fn check_hard_room(&self, more: u64) -> Result<()> {
        if self.hard_bytes + more > self.config.max_hard_pinned_bytes {
            return Err(Error::LimitExceeded {
                what: "hard-pinned bytes",
                max: self.config.max_hard_pinned_bytes,
            });
        }
        Ok(())
    }

    /// Changes an object's pin.
    pub fn set_pin(&mut self, key: &ObjectKey, pin: Pin) -> Result<()> {
        let meta = self.objects.get(key).ok_or(Error::NotFound(*key))?;
        if pin == Pin::Hard && meta.pin != Pin::Hard && meta.location.is_some() {
            self.check_hard_room(meta.held)?;
        }
        self.account(key, |m, _| m.pin = pin);
        Ok(())
    }

    /// Takes a lease reference: the object must have a DRAM copy and not be
    /// doomed. Returns where its bytes are and their checksum.
    pub fn acquire(&mut self, now: Instant, key: &ObjectKey) -> Result<(Allocation, Checksum)> {
        let meta = self.objects.get(key).ok_or(Error::NotFound(*key))?;
        if meta.doomed.is_some() {
            return Err(Error::NotFound(*key));
        }
        let Some(location) = meta.location else {
            return Err(if meta.promoting.is_some() {
                Error::Busy(*key)
            } else {
                Error::NotResident(*key)
            });
        };
        let checksum = meta.checksum;
        self.account(key, |m, _| m.leases += 1);
        self.touch(now, key);
        Ok((location, checksum))
    }

    /// Drops a lease reference. Returns the removal that was waiting for it,
    /// if this was the last lease of a doomed object.
    pub fn release(&mut self, key: &ObjectKey) -> Option<Removed> {
        let meta = self.objects.get(key)?;
        if meta.leases == 0 {
            return None;
        }
        self.account(key, |m, _| m.leases -= 1);
        // An unleased object with both copies (its spill completed while it
        // was leased) is back in the LRU; eviction demotes it without I/O.
        // A spill or promotion in flight finishes the removal when it ends
        // (`complete_spill` / `complete_promotion`): the record must outlive
        // it, or its bytes stay counted as spilling forever.
        let meta = &self.objects[key];
        match meta.doomed {
            Some(reason) if meta.leases == 0 && !meta.spilling && meta.promoting.is_none() => {
                self.finish_removal(key, reason)
            }
            _ => None,
        }
    }

    /// Removes an object on request. A leased object is doomed and goes when
    /// its last lease ends (then `release` returns the removal).
    pub fn remove(&mut self, key: &ObjectKey) -> Result<Option<Removed>> {
        if !self.objects.contains_key(key) {
            return Err(Error::NotFound(*key));
        }
        Ok(self.doom(key, RemovalReason::Deleted))
    }

    fn doom(&mut self, key: &ObjectKey, reason: RemovalReason) -> Option<Removed> {
        let meta = self.objects.get(key)?;
        if meta.leases > 0 || meta.spilling || meta.promoting.is_some() {
            self.account(key, |m, _| {
                m.doomed.get_or_insert(reason);
            });
            return None;
        }
        self.finish_removal(key, reason)
    }

    fn finish_removal(&mut self, key: &ObjectKey, reason: RemovalReason) -> Option<Removed> {
        self.account(key, |m, pool| {
            if let Some(loc) = m.location.take() {
                // The record owns this allocation; freeing it cannot fail.
                let _ = pool.free(loc.offset);
            }
        })?;
        let meta = self.objects.remove(key)?;
        if let Some(at) = meta.expires_at {
            self.expiries.remove(&(at, *key));
        }
        if meta.on_ssd {
            self.ssd_objects -= 1;
        }
        Some(Removed {
            key: *key,
            len: meta.len,
            on_ssd: meta.on_ssd,
            reason: meta.doomed.unwrap_or(reason),
        })
    }

    /// Removes objects whose TTL has run out at `now` (leased ones are
    /// doomed and go at their last release).
    pub fn expire(&mut self, now: Instant) -> Vec<Removed> {
        let due: Vec<ObjectKey> = self
            .expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|&(_, k)| k)
            .collect();
        let mut out = Vec::new();
        for key in due {
            if let Some(meta) = self.objects.get(&key) {
                let at = meta.expires_at;
                if let Some(at) = at {
                    self.expiries.remove(&(at, key));
                }
                if let Some(r) = self.doom(&key, RemovalReason::Expired) {
                    out.push(r);
                }
            }
        }
        out
    }

    /// The next TTL expiry.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first().map(|&(at, _)| at)
    }

    /// Whether allocated bytes (less in-flight spills) exceed the high
    /// watermark.
    pub fn over_high_watermark(&self) -> bool {
        self.pool.allocated_bytes() - self.spilling_bytes > self.high_watermark_bytes()
    }

    /// Watermark eviction; see the module docs. Returns what was decided,
    /// in LRU order; `Dropped` and `Demoted` are already done, `Spill`s are
    /// for the I/O layer.
    pub fn evict(&mut self) -> Vec<EvictAction> {
        if !self.over_high_watermark() {
            return Vec::new();
        }
        let low = self.low_watermark_bytes();
        let mut excess = self.pool.allocated_bytes() - self.spilling_bytes - low;
        let mut victims = Vec::new();
        for lru in [&self.lru_unpinned, &self.lru_soft] {
            for key in lru.values() {
                if excess == 0 {
                    break;
                }
                let meta = &self.objects[key];
                if meta.leases > 0 {
                    continue;
                }
                excess = excess.saturating_sub(meta.held);
                victims.push(*key);
            }
        }
        victims
            .into_iter()
            .filter_map(|key| self.evict_one(&key, true))
            .collect()
    }

    /// Evicts one unleased DRAM copy. With `allow_spill`, an object without
    /// an SSD copy is spilled (if the SSD tier is on); without, such an
    /// object is skipped when the SSD tier is on.
    fn evict_one(&mut self, key: &ObjectKey, allow_spill: bool) -> Option<EvictAction> {
        let meta = self.objects.get(key)?;
        let location = meta.location?;
        if meta.leases > 0 || meta.pin == Pin::Hard || meta.spilling {
            return None;
        }
        if meta.on_ssd {
            self.account(key, |m, pool| {
                m.location = None;
                let _ = pool.free(location.offset);
            });
            return Some(EvictAction::Demoted { key: *key });
        }
        if self.config.spill_to_ssd {
            if !allow_spill {
                return None;
            }
            let checksum = meta.checksum;
            let held = meta.held;
            self.account(key, |m, _| m.spilling = true);
            self.spilling_bytes += held;
            return Some(EvictAction::Spill {
                key: *key,
                location,
                checksum,
            });
        }
        self.finish_removal(key, RemovalReason::Evicted)
            .map(EvictAction::Dropped)
    }

    /// Frees DRAM right now, without I/O, until `len` bytes can be
    /// allocated: drops (or demotes, if already on SSD) unleased unpinned,
    /// then soft-pinned objects in LRU order, giving up after freeing
    /// `2 * footprint + slab_size` bytes. Objects that would need a spill are
    /// skipped. Returns the allocation (if it succeeded) and what was freed.
    pub fn reclaim_for(&mut self, len: u64) -> (Option<Allocation>, Vec<EvictAction>) {
        let mut actions = Vec::new();
        if let Some(a) = self.pool.alloc(len) {
            return (Some(a), actions);
        }
        let Some(footprint) = self.pool.footprint(len) else {
            return (None, actions);
        };
        let budget = footprint
            .saturating_mul(2)
            .saturating_add(self.config.pool.slab_size);
        let mut freed = 0u64;
        let candidates: Vec<ObjectKey> = self
            .lru_unpinned
            .values()
            .chain(self.lru_soft.values())
            .copied()
            .collect();
        for key in candidates {
            if freed >= budget {
                break;
            }
            let held = self.objects.get(&key).map_or(0, |m| m.held);
            if let Some(action) = self.evict_one(&key, false) {
                freed += held;
                actions.push(action);
                if let Some(a) = self.pool.alloc(len) {
                    return (Some(a), actions);
                }
            }
        }
        (None, actions)
    }

    /// Reports the end of a spill. On success the object is on SSD and its
    /// DRAM copy is freed (at once if unleased, otherwise it stays resident
    /// until evicted again, which is then free of I/O). On failure the DRAM
    /// copy is dropped, as eviction wanted (returned as a removal), unless it
    /// is leased, then it simply stays. Also finishes a removal that waited
    /// for the spill.
    pub fn complete_spill(&mut self, key: &ObjectKey, ok: bool) -> Option<EvictAction> {
        let meta = self.objects.get(key)?;
        if !meta.spilling {
            return None;
        }
        let held = meta.held;
        self.spilling_bytes -= held;
        self.account(key, |m, _| {
            m.spilling = false;
            if ok {
                m.on_ssd = true;
            }
        });
        let meta = &self.objects[key];
        if let Some(reason) = meta.doomed {
            if meta.leases == 0 {
                return self.finish_removal(key, reason).map(EvictAction::Dropped);
            }
            return None;
        }
        if meta.leases > 0 {
            return None;
        }
        if ok {
            self.evict_one(key, false)
        } else {
            self.finish_removal(key, RemovalReason::SpillFailed)
                .map(EvictAction::Dropped)
        }
    }

    /// Starts promoting an SSD-only object: allocates its DRAM space. The
    /// I/O layer fills it from SSD (verifying the checksum) and calls
    /// [`Index::complete_promote`].
    pub fn begin_promote(&mut self, key: &ObjectKey) -> Result<Allocation> {
        let meta = self.objects.get(key).ok_or(Error::NotFound(*key))?;
        if meta.doomed.is_some() {
            return Err(Error::NotFound(*key));
        }
        if meta.location.is_some() {
            return Err(Error::AlreadyExists(*key));
        }
        if meta.promoting.is_some() {
            return Err(Error::Busy(*key));
        }
        let len = meta.len;
        let location = self.pool.alloc(len).ok_or(Error::NoSpace {
            needed: self.pool.footprint(len).unwrap_or(len),
            free: self.pool.free_bytes(),
        })?;
        let held = self.pool.held_len(location.offset).unwrap_or(0);
        if let Some(m) = self.objects.get_mut(key) {
            m.promoting = Some(location);
            m.held = held;
        }
        Ok(location)
    }

    /// Ends a promotion. On success the DRAM copy becomes the served one; on
    /// failure its space is freed (the caller should drop the bad SSD copy
    /// with [`Index::forget_ssd`]). Returns a removal that waited for it.
    pub fn complete_promote(&mut self, now: Instant, key: &ObjectKey, ok: bool) -> Option<Removed> {
        let promoting = self.objects.get(key)?.promoting?;
        self.account(key, |m, pool| {
            m.promoting = None;
            if ok {
                m.location = Some(promoting);
            } else {
                let _ = pool.free(promoting.offset);
            }
        });
        let meta = &self.objects[key];
        if let Some(reason) = meta.doomed {
            if meta.leases == 0 {
                return self.finish_removal(key, reason);
            }
        }
        if meta.location.is_none() && !meta.on_ssd {
            return self.finish_removal(key, RemovalReason::SsdLost);
        }
        if ok {
            self.touch(now, key);
        }
        None
    }

    /// The SSD tier no longer has the object (dropped for room, or found
    /// corrupt). An object with no other copy leaves the index.
    pub fn forget_ssd(&mut self, key: &ObjectKey) -> Option<Removed> {
        let meta = self.objects.get(key)?;
        if !meta.on_ssd {
            return None;
        }
        self.account(key, |m, _| m.on_ssd = false);
        let meta = &self.objects[key];
        if meta.location.is_none() && meta.promoting.is_none() {
            return self.finish_removal(key, RemovalReason::SsdLost);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BLOCK: u64 = 4096;

    /// A pool of exactly `blocks` 4 KiB slots, watermarks 0.75 / 0.5.
    fn index(blocks: u64, spill: bool) -> Index {
        let mut pool = PoolConfig::new(blocks * BLOCK).with_size_classes([BLOCK]);
        pool.slab_size = BLOCK * 4;
        let mut cfg = IndexConfig::new(pool);
        cfg.high_watermark = 0.75;
        cfg.low_watermark = 0.5;
        cfg.spill_to_ssd = spill;
        Index::new(cfg).unwrap()
    }

    fn key(n: u32) -> ObjectKey {
        ObjectKey::for_content(&n.to_le_bytes())
    }

    fn put(ix: &mut Index, now: Instant, n: u32, pin: Pin) {
        let loc = ix.allocate(BLOCK).expect("room");
        let opts = ObjectOptions {
            pin,
            ..ObjectOptions::default()
        };
        ix.insert(now, key(n), loc, Checksum::compute(&n.to_le_bytes()), opts)
            .unwrap();
    }

    fn dropped_keys(actions: &[EvictAction]) -> Vec<ObjectKey> {
        actions
            .iter()
            .map(|a| match a {
                EvictAction::Dropped(r) => r.key,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn below_high_watermark_nothing_is_evicted() {
        let mut ix = index(16, false);
        let t = Instant::now();
        for n in 0..12 {
            put(&mut ix, t, n, Pin::None);
        }
        assert!(!ix.over_high_watermark());
        assert!(ix.evict().is_empty());
        put(&mut ix, t, 12, Pin::None);
        assert!(ix.over_high_watermark());
    }

    #[test]
    fn lru_unpinned_first_then_soft_never_leased_or_hard() {
        let mut ix = index(16, false);
        let t = Instant::now();
        // 0..4 soft (oldest), 4..8 hard, 8..14 unpinned, 14 leased.
        for n in 0..4 {
            put(&mut ix, t, n, Pin::Soft);
        }
        for n in 4..8 {
            put(&mut ix, t, n, Pin::Hard);
        }
        for n in 8..15 {
            put(&mut ix, t, n, Pin::None);
        }
        ix.acquire(t, &key(8)).unwrap();
        // Touch 9 so it becomes most recent.
        ix.touch(t, &key(9));
        // 15 blocks used, high = 12, low = 8: free 7 blocks.
        let dropped = dropped_keys(&ix.evict());
        let expect: Vec<ObjectKey> = [10, 11, 12, 13, 14, 9, 0].iter().map(|&n| key(n)).collect();
        assert_eq!(dropped, expect);
        assert_eq!(ix.pool().allocated_bytes(), 8 * BLOCK);
        assert!(ix.contains(&key(8)));
        for n in 4..8 {
            assert!(ix.contains(&key(n)));
        }
        assert!(ix.evict().is_empty());
    }

    #[test]
    fn eviction_gives_up_when_only_protected_objects_remain() {
        let mut ix = index(16, false);
        let t = Instant::now();
        for n in 0..8 {
            put(&mut ix, t, n, Pin::Hard);
        }
        for n in 8..14 {
            put(&mut ix, t, n, Pin::None);
            ix.acquire(t, &key(n)).unwrap();
        }
        assert!(ix.over_high_watermark());
        assert!(ix.evict().is_empty());
        assert_eq!(ix.len(), 14);
        assert_eq!(ix.placement_free(), 2 * BLOCK);
        // Releasing makes them evictable again.
        for n in 8..14 {
            assert_eq!(ix.release(&key(n)), None);
        }
        assert_eq!(ix.evict().len(), 6);
        assert_eq!(ix.placement_free(), 8 * BLOCK);
    }

    #[test]
    fn hard_pin_budget_is_enforced() {
        let mut ix = index(16, false);
        let t = Instant::now();
        for n in 0..8 {
            put(&mut ix, t, n, Pin::Hard);
        }
        let loc = ix.allocate(BLOCK).unwrap();
        let opts = ObjectOptions {
            pin: Pin::Hard,
            ..ObjectOptions::default()
        };
        let err = ix
            .insert(t, key(99), loc, Checksum::compute(b""), opts)
            .unwrap_err();
        assert!(matches!(err, Error::LimitExceeded { .. }));
        ix.free_allocation(loc).unwrap();
        put(&mut ix, t, 8, Pin::None);
        assert!(ix.set_pin(&key(8), Pin::Hard).is_err());
        ix.set_pin(&key(0), Pin::Soft).unwrap();
        ix.set_pin(&key(8), Pin::Hard).unwrap();
        assert_eq!(ix.stats().hard_pinned_bytes, 8 * BLOCK);
    }

    #[test]
    fn spill_keeps_dram_until_complete_and_does_not_over_evict() {
        let mut ix = index(16, true);
        let t = Instant::now();
        for n in 0..13 {
            put(&mut ix, t, n, Pin::None);
        }
        let actions = ix.evict();
        // 13 used, low 8: spill 5, oldest first.
        assert_eq!(actions.len(), 5);
        for (i, a) in actions.iter().enumerate() {
            match a {
                EvictAction::Spill {
                    key: k, location, ..
                } => {
                    assert_eq!(*k, key(i as u32));
                    assert_eq!(ix.get(k).unwrap().location, Some(*location));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ix.pool().allocated_bytes(), 13 * BLOCK);
        // In-flight spills count as freed: no second round.
        assert!(ix.evict().is_empty());
        // Still leasable while spilling.
        ix.acquire(t, &key(0)).unwrap();
        // Success: DRAM freed (0 is leased, so it stays resident for now).
        assert_eq!(
            ix.complete_spill(&key(1), true),
            Some(EvictAction::Demoted { key: key(1) })
        );
        assert_eq!(ix.get(&key(1)).unwrap().tier(), Tier::Ssd);
        assert_eq!(ix.complete_spill(&key(0), true), None);
        assert_eq!(ix.get(&key(0)).unwrap().tier(), Tier::Dram);
        assert!(ix.get(&key(0)).unwrap().on_ssd);
        // Failure: dropped.
        let r = ix.complete_spill(&key(2), false).unwrap();
        assert!(matches!(
            r,
            EvictAction::Dropped(Removed {
                reason: RemovalReason::SpillFailed,
                ..
            })
        ));
        assert!(!ix.contains(&key(2)));
        // A duplicate report is ignored.
        assert_eq!(ix.complete_spill(&key(2), true), None);
        assert_eq!(ix.complete_spill(&key(1), true), None);
        assert_eq!(ix.stats().ssd_objects, 2);
    }

    #[test]
    fn spilled_while_leased_is_demoted_later_without_io() {
        let mut ix = index(16, true);
        let t = Instant::now();
        // Key 0 is the only unpinned object, so it goes first.
        put(&mut ix, t, 0, Pin::None);
        for n in 1..13 {
            put(&mut ix, t, n, Pin::Soft);
        }
        let spilled: Vec<ObjectKey> = ix
            .evict()
            .iter()
            .map(|a| match a {
                EvictAction::Spill { key, .. } => *key,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(spilled, (0..5).map(key).collect::<Vec<_>>());
        ix.acquire(t, &key(0)).unwrap();
        assert_eq!(ix.complete_spill(&key(0), true), None);
        assert_eq!(ix.release(&key(0)), None);
        for n in 1..5 {
            assert_eq!(
                ix.complete_spill(&key(n), true),
                Some(EvictAction::Demoted { key: key(n) })
            );
        }
        for n in 20..24 {
            put(&mut ix, t, n, Pin::Soft);
        }
        let actions = ix.evict();
        assert_eq!(actions[0], EvictAction::Demoted { key: key(0) });
        assert_eq!(ix.get(&key(0)).unwrap().tier(), Tier::Ssd);
        assert!(actions[1..]
            .iter()
            .all(|a| matches!(a, EvictAction::Spill { .. })));
    }

    #[test]
    fn promote_round_trip_and_failure() {
        let mut ix = index(16, true);
        let t = Instant::now();
        let sum = Checksum::compute(b"x");
        ix.insert_ssd(t, key(1), 100, sum).unwrap();
        ix.insert_ssd(t, key(2), 100, sum).unwrap();
        assert!(matches!(ix.acquire(t, &key(1)), Err(Error::NotResident(_))));
        let loc = ix.begin_promote(&key(1)).unwrap();
        assert_eq!(loc.len, 100);
        assert!(matches!(ix.acquire(t, &key(1)), Err(Error::Busy(_))));
        assert!(matches!(ix.begin_promote(&key(1)), Err(Error::Busy(_))));
        assert_eq!(ix.complete_promote(t, &key(1), true), None);
        assert_eq!(ix.acquire(t, &key(1)).unwrap(), (loc, sum));
        assert!(matches!(
            ix.begin_promote(&key(1)),
            Err(Error::AlreadyExists(_))
        ));
        // Failed promotion frees its space; dropping the bad SSD copy then
        // removes the object.
        let before = ix.pool().allocated_bytes();
        ix.begin_promote(&key(2)).unwrap();
        assert_eq!(ix.complete_promote(t, &key(2), false), None);
        assert_eq!(ix.pool().allocated_bytes(), before);
        let r = ix.forget_ssd(&key(2)).unwrap();
        assert_eq!(r.reason, RemovalReason::SsdLost);
        assert!(!r.on_ssd);
        assert!(!ix.contains(&key(2)));
        // Forgetting the SSD copy of a resident object keeps it.
        assert_eq!(ix.forget_ssd(&key(1)), None);
        assert!(ix.contains(&key(1)));
        assert_eq!(ix.stats().ssd_objects, 0);
    }

    #[test]
    fn ttl_expiry_waits_for_leases() {
        let mut ix = index(16, false);
        let t = Instant::now();
        for n in 0..3 {
            let loc = ix.allocate(BLOCK).unwrap();
            let opts = ObjectOptions {
                ttl: Some(Duration::from_secs(10 + u64::from(n))),
                pin: Pin::Hard,
                ..ObjectOptions::default()
            };
            ix.insert(t, key(n), loc, Checksum::compute(b""), opts)
                .unwrap();
        }
        assert_eq!(ix.next_expiry(), Some(t + Duration::from_secs(10)));
        ix.acquire(t, &key(1)).unwrap();
        assert!(ix.expire(t + Duration::from_secs(9)).is_empty());
        let gone = ix.expire(t + Duration::from_secs(11));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].key, key(0));
        assert_eq!(gone[0].reason, RemovalReason::Expired);
        // Key 1 is doomed: no new leases, removed at release.
        assert!(ix.get(&key(1)).unwrap().is_doomed());
        assert!(matches!(ix.acquire(t, &key(1)), Err(Error::NotFound(_))));
        let r = ix.release(&key(1)).unwrap();
        assert_eq!((r.key, r.reason), (key(1), RemovalReason::Expired));
        assert_eq!(ix.next_expiry(), Some(t + Duration::from_secs(12)));
        assert_eq!(ix.pool().allocated_bytes(), BLOCK);
    }

    #[test]
    fn reclaim_drops_lru_without_io_and_skips_what_needs_a_spill() {
        let mut ix = index(8, false);
        let t = Instant::now();
        for n in 0..8 {
            put(&mut ix, t, n, Pin::None);
        }
        ix.acquire(t, &key(0)).unwrap();
        let (a, actions) = ix.reclaim_for(BLOCK);
        assert!(a.is_some());
        assert_eq!(dropped_keys(&actions), vec![key(1)]);

        let mut ix = index(8, true);
        for n in 0..8 {
            put(&mut ix, t, n, Pin::None);
        }
        let (a, actions) = ix.reclaim_for(BLOCK);
        assert!(a.is_none() && actions.is_empty());
    }

    #[test]
    fn remove_and_bad_inputs() {
        let mut ix = index(8, false);
        let t = Instant::now();
        put(&mut ix, t, 1, Pin::None);
        let loc = ix.allocate(BLOCK).unwrap();
        assert!(matches!(
            ix.insert(
                t,
                key(1),
                loc,
                Checksum::compute(b""),
                ObjectOptions::default()
            ),
            Err(Error::AlreadyExists(_))
        ));
        let too_many = ObjectOptions {
            holders: vec![PeerId::from_bytes(b"p").unwrap(); MAX_REPLICAS + 1],
            ..ObjectOptions::default()
        };
        assert!(ix
            .insert(t, key(2), loc, Checksum::compute(b""), too_many)
            .is_err());
        let fake = Allocation {
            offset: 7 * BLOCK,
            len: BLOCK,
        };
        assert!(ix
            .insert(
                t,
                key(3),
                fake,
                Checksum::compute(b""),
                ObjectOptions::default()
            )
            .is_err());
        ix.free_allocation(loc).unwrap();
        let r = ix.remove(&key(1)).unwrap().unwrap();
        assert_eq!(r.reason, RemovalReason::Deleted);
        assert!(ix.remove(&key(1)).is_err());
        assert_eq!(ix.pool().allocated_bytes(), 0);
        assert!(ix.is_empty());
        let mut bad = IndexConfig::new(PoolConfig::new(1 << 20));
        bad.low_watermark = 0.95;
        assert!(Index::new(bad).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(Pin),
        Lease(prop::sample::Index),
        Release(prop::sample::Index),
        Evict,
        FinishSpill(prop::sample::Index, bool),
        Remove(prop::sample::Index),
    }

    fn op() -> impl Strategy<Value = Op> {
        let pin = prop_oneof![Just(Pin::None), Just(Pin::Soft), Just(Pin::Hard)];
        let ix = any::<prop::sample::Index>();
        prop_oneof![
            4 => pin.prop_map(Op::Put),
            2 => ix.clone().prop_map(Op::Lease),
            2 => ix.clone().prop_map(Op::Release),
            2 => Just(Op::Evict),
            2 => (ix.clone(), any::<bool>()).prop_map(|(i, ok)| Op::FinishSpill(i, ok)),
            1 => ix.prop_map(Op::Remove),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Whatever happens: leased and hard-pinned objects survive
        /// eviction, pool bytes match the records, and eviction brings
        /// usage to the low watermark whenever enough is evictable.
        #[test]
        fn eviction_invariants(spill in any::<bool>(), ops in prop::collection::vec(op(), 1..200)) {
            let mut ix = index(32, spill);
            let t = Instant::now();
            let mut next = 0u32;
            for op in ops {
                let keys: Vec<ObjectKey> = {
                    let mut k: Vec<ObjectKey> = ix.iter().map(|m| m.key).collect();
                    k.sort();
                    k
                };
                match op {
                    Op::Put(pin) => {
                        if let Some(loc) = ix.allocate(BLOCK) {
                            let opts = ObjectOptions { pin, ..ObjectOptions::default() };
                            if ix.insert(t, key(next), loc, Checksum::compute(b""), opts).is_err() {
                                ix.free_allocation(loc).unwrap();
                            }
                            next += 1;
                        }
                    }
                    Op::Lease(i) if !keys.is_empty() => {
                        let _ = ix.acquire(t, &keys[i.index(keys.len())]);
                    }
                    Op::Release(i) if !keys.is_empty() => {
                        ix.release(&keys[i.index(keys.len())]);
                    }
                    Op::FinishSpill(i, ok) if !keys.is_empty() => {
                        ix.complete_spill(&keys[i.index(keys.len())], ok);
                    }
                    Op::Remove(i) if !keys.is_empty() => {
                        let _ = ix.remove(&keys[i.index(keys.len())]);
                    }
                    Op::Evict => {
                        let protected: Vec<ObjectKey> = ix
                            .iter()
                            .filter(|m| m.leases > 0 || m.pin == Pin::Hard)
                            .map(|m| m.key)
                            .collect();
                        let was_over = ix.over_high_watermark();
                        let actions = ix.evict();
                        for k in &protected {
                            prop_assert!(ix.get(k).is_some_and(|m| m.location.is_some()));
                        }
                        for a in &actions {
                            let k = match a {
                                EvictAction::Dropped(r) => r.key,
                                EvictAction::Demoted { key } | EvictAction::Spill { key, .. } => *key,
                            };
                            prop_assert!(!protected.contains(&k));
                        }
                        let evictable_left = ix.iter().any(|m| {
                            m.location.is_some() && m.leases == 0 && m.pin != Pin::Hard && !m.spilling && !m.is_doomed()
                        });
                        if was_over && evictable_left {
                            let s = ix.stats();
                            prop_assert!(s.pool.allocated_bytes - s.spilling_bytes <= ix.low_watermark_bytes());
                        }
                    }
                    _ => {}
                }
                // Accounting matches a recount.
                let resident: u64 = ix.iter().filter(|m| m.location.is_some()).map(|m| m.held).sum();
                let promoting: u64 = ix.iter().filter(|m| m.promoting.is_some()).map(|m| m.held).sum();
                let s = ix.stats();
                prop_assert_eq!(s.resident_bytes, resident);
                prop_assert_eq!(s.pool.allocated_bytes, resident + promoting);
                let protected: u64 = ix.iter().map(|m| m.protected_held()).sum();
                prop_assert_eq!(s.protected_bytes, protected);
                let spilling: u64 = ix.iter().filter(|m| m.spilling).map(|m| m.held).sum();
                prop_assert_eq!(s.spilling_bytes, spilling);
                prop_assert_eq!(s.ssd_objects, ix.iter().filter(|m| m.on_ssd).count() as u64);
                for m in ix.iter() {
                    prop_assert!(m.location.is_some() || m.on_ssd || m.promoting.is_some());
                }
                prop_assert_eq!(
                    ix.lru_unpinned.len() + ix.lru_soft.len(),
                    ix.iter().filter(|m| m.location.is_some() && m.pin != Pin::Hard && !m.spilling && !m.is_doomed()).count()
                );
            }
        }
    }
}
