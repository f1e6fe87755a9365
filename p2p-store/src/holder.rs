//! The holder side of the put/get protocol, as a state machine with time
//! passed in: reservations, commits, leases, pins, expiry.
//!
//! ```text
//!  put:  reserve ──► (engine writes into `location`) ──► commit ──► indexed
//!          │ ttl passes / abort / owner dies: space freed
//!  get:  lease ──► (engine reads from `location`, checks checksum) ──► release
//!          │ duration passes / owner dies: released
//!          │ NotResident: begin_promote ─► (read SSD into `location`) ─► complete_promote ─► lease
//! ```
//!
//! The network layer calls the `handle`-style methods (`reserve`, `commit`,
//! `lease`, ...) with the authenticated peer that sent the request as
//! `owner`, calls [`Holder::handle_timeout`] when [`Holder::poll_timeout`]
//! says, and after every call drains [`Holder::poll_event`] and acts on
//! each [`HolderEvent`] (withdraw a provider record, spill to SSD, delete an
//! SSD file).
//!
//! Rules:
//! * Reservations and leases are bounded in number and lifetime; a longer
//!   lifetime than allowed is clamped (the grant says when it ends).
//! * A reservation or lease is bound to the peer it was granted to; another
//!   peer using its id gets [`Error::NotOwner`].
//! * A put of a key already held fails with [`Error::AlreadyExists`] (puts
//!   are idempotent; the caller treats it as done). Two concurrent puts of
//!   one key may both reserve; the first commit wins, the second gets
//!   `AlreadyExists` and its space is freed.
//! * The holder does not see bytes. Before `commit`, the I/O layer may hash
//!   the reserved range and refuse a mismatch with [`Holder::abort`]; the
//!   reader verifies the checksum on every get in any case.
//! * Watermark eviction runs inside every call that can change what is
//!   evictable, so the I/O layer never has to ask for it.
//!
//! Must not depend on: sockets, async runtimes, the system clock, the SSD
//! tier's file I/O (it only emits events for it).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::index::{EvictAction, Index, IndexConfig, ObjectOptions, Pin, Removed};
use crate::key::{Checksum, ObjectKey};
use crate::peer::PeerId;
use crate::pool::Allocation;

/// Id of a reservation, unique per holder process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReservationId(pub u64);

/// Id of a lease, unique per holder process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub u64);

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}", self.0)
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "l{}", self.0)
    }
}

/// Space held for a put until it is committed or expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Its id.
    pub id: ReservationId,
    /// The peer it was granted to.
    pub owner: PeerId,
    /// The key being put.
    pub key: ObjectKey,
    /// Where the writer must put the bytes.
    pub location: Allocation,
    /// When it lapses if not committed.
    pub expires_at: Instant,
}

/// A granted lease: the object will not be evicted or freed until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Its id.
    pub id: LeaseId,
    /// The peer it was granted to.
    pub owner: PeerId,
    /// The object.
    pub key: ObjectKey,
    /// Where the reader finds the bytes.
    pub location: Allocation,
    /// What the bytes must hash to.
    pub checksum: Checksum,
    /// When it ends unless released earlier.
    pub expires_at: Instant,
}

/// Something the I/O layer must act on (or may count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderEvent {
    /// The object is no longer held here: withdraw its provider record, and
    /// delete its SSD copy if `on_ssd`.
    Removed(Removed),
    /// The DRAM copy was freed; the object is still served from SSD.
    Demoted {
        /// The object.
        key: ObjectKey,
    },
    /// Copy `location` to the SSD tier, then call [`Holder::complete_spill`].
    Spill {
        /// The object.
        key: ObjectKey,
        /// Its bytes in the pool.
        location: Allocation,
        /// Its checksum.
        checksum: Checksum,
    },
    /// A reservation lapsed uncommitted; its space is free again.
    ReservationExpired {
        /// The reservation.
        id: ReservationId,
        /// Its key.
        key: ObjectKey,
        /// Its owner.
        owner: PeerId,
    },
    /// A lease ran out without being released.
    LeaseExpired {
        /// The lease.
        id: LeaseId,
        /// Its object.
        key: ObjectKey,
        /// Its owner.
        owner: PeerId,
    },
}

impl From<EvictAction> for HolderEvent {
    fn from(action: EvictAction) -> HolderEvent {
        match action {
            EvictAction::Dropped(r) => HolderEvent::Removed(r),
            EvictAction::Demoted { key } => HolderEvent::Demoted { key },
            EvictAction::Spill {
                key,
                location,
                checksum,
            } => HolderEvent::Spill {
                key,
                location,
                checksum,
            },
        }
    }
}

/// Holder tunables.
#[derive(Debug, Clone)]
pub struct HolderConfig {
    /// The local index and pool.
    pub index: IndexConfig,
    /// Largest object accepted.
    pub max_object_len: u64,
    /// Most reservations outstanding at once.
    pub max_reservations: usize,
    /// Longest reservation lifetime granted.
    pub max_reservation_ttl: Duration,
    /// Most leases outstanding at once.
    pub max_leases: usize,
    /// Longest lease granted.
    pub max_lease_duration: Duration,
}

impl HolderConfig {
    /// Objects up to a quarter of the pool, 4096 reservations of at most
    /// 10 s, 65536 leases of at most 30 s.
    pub fn new(index: IndexConfig) -> HolderConfig {
        let max_object_len = (index.pool.capacity / 4).max(1);
        HolderConfig {
            index,
            max_object_len,
            max_reservations: 4096,
            max_reservation_ttl: Duration::from_secs(10),
            max_leases: 65536,
            max_lease_duration: Duration::from_secs(30),
        }
    }
}

/// The holder state machine. See the module docs.
#[derive(Debug)]
pub struct Holder {
    config: HolderConfig,
    index: Index,
    reservations: HashMap<ReservationId, Reservation>,
    reservation_deadlines: BTreeSet<(Instant, ReservationId)>,
    leases: HashMap<LeaseId, Lease>,
    lease_deadlines: BTreeSet<(Instant, LeaseId)>,
    next_id: u64,
    events: VecDeque<HolderEvent>,
}

fn clamp(requested: Duration, max: Duration, what: &str) -> Result<Duration> {
    if requested.is_zero() {
        return Err(Error::InvalidArgument(format!("{what} must be positive")));
    }
    Ok(requested.min(max))
}

impl Holder {
    /// A holder with an empty index.
    pub fn new(config: HolderConfig) -> Result<Holder> {
        if config.max_object_len == 0 || config.max_reservations == 0 || config.max_leases == 0 {
            return Err(Error::InvalidConfig(
                "holder limits must be positive".into(),
            ));
        }
        let index = Index::new(config.index.clone())?;
        Ok(Holder {
            config,
            index,
            reservations: HashMap::new(),
            reservation_deadlines: BTreeSet::new(),
            leases: HashMap::new(),
            lease_deadlines: BTreeSet::new(),
            next_id: 1,
            events: VecDeque::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HolderConfig {
        &self.config
    }

    /// The object index (read-only).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// See [`Index::set_observer`].
    pub fn set_location_observer(&mut self, observer: Box<dyn crate::index::LocationObserver>) {
        self.index.set_observer(observer);
    }

    /// Outstanding reservations.
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> + '_ {
        self.reservations.values()
    }

    /// Outstanding leases.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> + '_ {
        self.leases.values()
    }

    /// Bytes to announce as `free` (see [`Index::placement_free`]).
    pub fn placement_free(&self) -> u64 {
        self.index.placement_free()
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn run_eviction(&mut self) {
        let actions = self.index.evict();
        self.events
            .extend(actions.into_iter().map(HolderEvent::from));
    }

    /// Reserves `len` bytes for a put of `key` by `owner`, for `ttl`
    /// (clamped to the configured maximum).
    ///
    /// Errors: `AlreadyExists` if the key is held, `TooLarge`,
    /// `LimitExceeded` if too many reservations are outstanding, `NoSpace`
    /// (retryable) if eviction could not make room right now.
    pub fn reserve(
        &mut self,
        now: Instant,
        owner: &PeerId,
        key: ObjectKey,
        len: u64,
        ttl: Duration,
    ) -> Result<Reservation> {
        let ttl = clamp(ttl, self.config.max_reservation_ttl, "reservation ttl")?;
        let expires_at = now
            .checked_add(ttl)
            .ok_or_else(|| Error::InvalidArgument("reservation deadline overflows".into()))?;
        if len == 0 {
            return Err(Error::InvalidArgument(
                "object length must be positive".into(),
            ));
        }
        if len > self.config.max_object_len {
            return Err(Error::TooLarge {
                len,
                limit: self.config.max_object_len,
            });
        }
        if self.index.contains(&key) {
            return Err(Error::AlreadyExists(key));
        }
        if self.reservations.len() >= self.config.max_reservations {
            return Err(Error::LimitExceeded {
                what: "reservations",
                max: self.config.max_reservations as u64,
            });
        }
        self.run_eviction();
        let (location, actions) = self.index.reclaim_for(len);
        self.events
            .extend(actions.into_iter().map(HolderEvent::from));
        let location = location.ok_or_else(|| Error::NoSpace {
            needed: self.index.footprint(len).unwrap_or(len),
            free: self.index.pool().free_bytes(),
        })?;
        let id = ReservationId(self.next_id());
        let reservation = Reservation {
            id,
            owner: owner.clone(),
            key,
            location,
            expires_at,
        };
        self.reservations.insert(id, reservation.clone());
        self.reservation_deadlines.insert((expires_at, id));
        // The new bytes may have crossed the high watermark.
        self.run_eviction();
        Ok(reservation)
    }

    fn take_reservation(
        &mut self,
        now: Instant,
        owner: &PeerId,
        id: ReservationId,
    ) -> Result<Reservation> {
        let r = self
            .reservations
            .get(&id)
            .ok_or(Error::UnknownReservation(id.0))?;
        if &r.owner != owner {
            return Err(Error::NotOwner(id.0));
        }
        let r = self
            .reservations
            .remove(&id)
            .ok_or(Error::UnknownReservation(id.0))?;
        self.reservation_deadlines.remove(&(r.expires_at, id));
        if now >= r.expires_at {
            let _ = self.index.free_allocation(r.location);
            return Err(Error::ReservationExpired(id.0));
        }
        Ok(r)
    }

    /// Commits a reservation: the bytes are written and hash to `checksum`.
    /// The object is indexed and visible from now on; the caller publishes
    /// its provider record.
    pub fn commit(
        &mut self,
        now: Instant,
        owner: &PeerId,
        id: ReservationId,
        checksum: Checksum,
        options: ObjectOptions,
    ) -> Result<Allocation> {
        let r = self.take_reservation(now, owner, id)?;
        let result = self
            .index
            .insert(now, r.key, r.location, checksum, options)
            .map(|m| m.location.unwrap_or(r.location));
        if result.is_err() {
            let _ = self.index.free_allocation(r.location);
        }
        self.run_eviction();
        result
    }

    /// Gives a reservation up (write failed, or the bytes did not match).
    pub fn abort(&mut self, now: Instant, owner: &PeerId, id: ReservationId) -> Result<()> {
        match self.take_reservation(now, owner, id) {
            Ok(r) => {
                let _ = self.index.free_allocation(r.location);
                Ok(())
            }
            // Already gone by expiry: the outcome the caller wanted.
            Err(Error::ReservationExpired(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Leases `key` to `owner` for `duration` (clamped).
    ///
    /// Errors: `NotFound`, `NotResident` (promote from SSD first), `Busy`
    /// (a promotion is in flight), `LimitExceeded`.
    pub fn lease(
        &mut self,
        now: Instant,
        owner: &PeerId,
        key: &ObjectKey,
        duration: Duration,
    ) -> Result<Lease> {
        let duration = clamp(duration, self.config.max_lease_duration, "lease duration")?;
        if self.leases.len() >= self.config.max_leases {
            return Err(Error::LimitExceeded {
                what: "leases",
                max: self.config.max_leases as u64,
            });
        }
        let expires_at = now
            .checked_add(duration)
            .ok_or_else(|| Error::InvalidArgument("lease deadline overflows".into()))?;
        let (location, checksum) = self.index.acquire(now, key)?;
        let id = LeaseId(self.next_id());
        let lease = Lease {
            id,
            owner: owner.clone(),
            key: *key,
            location,
            checksum,
            expires_at,
        };
        self.leases.insert(id, lease.clone());
        self.lease_deadlines.insert((expires_at, id));
        Ok(lease)
    }

    /// Ends a lease early (the normal end of a get).
    pub fn release(&mut self, owner: &PeerId, id: LeaseId) -> Result<()> {
        let lease = self.leases.get(&id).ok_or(Error::UnknownLease(id.0))?;
        if &lease.owner != owner {
            return Err(Error::NotOwner(id.0));
        }
        self.end_lease(id);
        self.run_eviction();
        Ok(())
    }

    fn end_lease(&mut self, id: LeaseId) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.lease_deadlines.remove(&(lease.expires_at, id));
        if let Some(removed) = self.index.release(&lease.key) {
            self.events.push_back(HolderEvent::Removed(removed));
        }
        Some(lease)
    }

    /// Drops every reservation and lease held by `owner` (it died or
    /// disconnected). Returns how many of each were dropped.
    pub fn release_owner(&mut self, owner: &PeerId) -> (usize, usize) {
        let rids: Vec<ReservationId> = self
            .reservations
            .values()
            .filter(|r| &r.owner == owner)
            .map(|r| r.id)
            .collect();
        for id in &rids {
            if let Some(r) = self.reservations.remove(id) {
                self.reservation_deadlines.remove(&(r.expires_at, *id));
                let _ = self.index.free_allocation(r.location);
            }
        }
        let lids: Vec<LeaseId> = self
            .leases
            .values()
            .filter(|l| &l.owner == owner)
            .map(|l| l.id)
            .collect();
        for id in &lids {
            self.end_lease(*id);
        }
        self.run_eviction();
        (rids.len(), lids.len())
    }

    /// Changes an object's pin.
    pub fn set_pin(&mut self, key: &ObjectKey, pin: Pin) -> Result<()> {
        self.index.set_pin(key, pin)?;
        self.run_eviction();
        Ok(())
    }

    /// Updates an object's known holders and R (after a repair).
    pub fn set_holders(
        &mut self,
        key: &ObjectKey,
        replication: u8,
        holders: Vec<PeerId>,
    ) -> Result<()> {
        self.index.set_holders(key, replication, holders)
    }

    /// Marks an object used without leasing it (e.g. a lookup hit).
    pub fn touch(&mut self, now: Instant, key: &ObjectKey) {
        self.index.touch(now, key);
    }

    /// Deletes an object (at once, or when its last lease ends).
    pub fn remove(&mut self, key: &ObjectKey) -> Result<()> {
        if let Some(removed) = self.index.remove(key)? {
            self.events.push_back(HolderEvent::Removed(removed));
        }
        Ok(())
    }

    /// Indexes an object found on the SSD tier at startup.
    pub fn restore_from_ssd(
        &mut self,
        now: Instant,
        key: ObjectKey,
        len: u64,
        checksum: Checksum,
    ) -> Result<()> {
        self.index.insert_ssd(now, key, len, checksum)
    }

    /// Reports the end of a [`HolderEvent::Spill`].
    pub fn complete_spill(&mut self, key: &ObjectKey, ok: bool) {
        if let Some(action) = self.index.complete_spill(key, ok) {
            self.events.push_back(action.into());
        }
        self.run_eviction();
    }

    /// Starts promoting an SSD-only object; fill the returned range from the
    /// SSD tier, then call [`Holder::complete_promote`]. Runs eviction first
    /// if the pool is short of room; `NoSpace` (retryable) if still short.
    pub fn begin_promote(&mut self, key: &ObjectKey) -> Result<Allocation> {
        self.run_eviction();
        match self.index.begin_promote(key) {
            Err(Error::NoSpace { .. }) => {
                let len = self.index.get(key).map_or(0, |m| m.len);
                let (location, actions) = self.index.reclaim_for(len);
                self.events
                    .extend(actions.into_iter().map(HolderEvent::from));
                if let Some(location) = location {
                    self.index.free_allocation(location)?;
                }
                self.index.begin_promote(key)
            }
            other => other,
        }
    }

    /// Ends a promotion (`ok`: the bytes were read and verified).
    pub fn complete_promote(&mut self, now: Instant, key: &ObjectKey, ok: bool) {
        if let Some(removed) = self.index.complete_promote(now, key, ok) {
            self.events.push_back(HolderEvent::Removed(removed));
        }
        self.run_eviction();
    }

    /// The SSD tier lost its copy of `key` (dropped for room, or corrupt).
    pub fn forget_ssd(&mut self, key: &ObjectKey) {
        if let Some(removed) = self.index.forget_ssd(key) {
            self.events.push_back(HolderEvent::Removed(removed));
        }
    }

    /// Expires reservations, leases and TTLs due at `now`, then evicts to
    /// the watermarks.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.reservation_deadlines.first() {
            if at > now {
                break;
            }
            self.reservation_deadlines.remove(&(at, id));
            if let Some(r) = self.reservations.remove(&id) {
                let _ = self.index.free_allocation(r.location);
                self.events.push_back(HolderEvent::ReservationExpired {
                    id,
                    key: r.key,
                    owner: r.owner,
                });
            }
        }
        while let Some(&(at, id)) = self.lease_deadlines.first() {
            if at > now {
                break;
            }
            if let Some(lease) = self.end_lease(id) {
                self.events.push_back(HolderEvent::LeaseExpired {
                    id,
                    key: lease.key,
                    owner: lease.owner,
                });
            } else {
                self.lease_deadlines.remove(&(at, id));
            }
        }
        for removed in self.index.expire(now) {
            self.events.push_back(HolderEvent::Removed(removed));
        }
        self.run_eviction();
    }

    /// When [`Holder::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.reservation_deadlines.first().map(|&(at, _)| at),
            self.lease_deadlines.first().map(|&(at, _)| at),
            self.index.next_expiry(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next event for the I/O layer; drain after every call.
    pub fn poll_event(&mut self) -> Option<HolderEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{RemovalReason, Tier};
    use crate::pool::PoolConfig;

    const BLOCK: u64 = 4096;

    fn holder(blocks: u64, spill: bool) -> Holder {
        let mut pool = PoolConfig::new(blocks * BLOCK).with_size_classes([BLOCK]);
        pool.slab_size = 4 * BLOCK;
        let mut index = IndexConfig::new(pool);
        index.high_watermark = 0.75;
        index.low_watermark = 0.5;
        index.spill_to_ssd = spill;
        Holder::new(HolderConfig::new(index)).unwrap()
    }

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes(&[n]).unwrap()
    }

    fn key(n: u32) -> ObjectKey {
        ObjectKey::for_content(&n.to_le_bytes())
    }

    fn sum(n: u32) -> Checksum {
        Checksum::compute(&n.to_le_bytes())
    }

    fn secs(t: Instant, s: u64) -> Instant {
        t + Duration::from_secs(s)
    }

    fn events(h: &mut Holder) -> Vec<HolderEvent> {
        std::iter::from_fn(|| h.poll_event()).collect()
    }

    fn put(h: &mut Holder, t: Instant, n: u32, pin: Pin) {
        let r = h
            .reserve(t, &peer(1), key(n), BLOCK, Duration::from_secs(5))
            .unwrap();
        let opts = ObjectOptions {
            pin,
            ..ObjectOptions::default()
        };
        h.commit(t, &peer(1), r.id, sum(n), opts).unwrap();
    }

    #[test]
    fn put_then_get() {
        let mut h = holder(16, false);
        let t = Instant::now();
        let r = h
            .reserve(t, &peer(1), key(1), 1000, Duration::from_secs(5))
            .unwrap();
        assert_eq!(r.location.len, 1000);
        assert_eq!(r.expires_at, secs(t, 5));
        // Not visible before commit.
        assert!(matches!(
            h.lease(t, &peer(2), &key(1), Duration::from_secs(1)),
            Err(Error::NotFound(_))
        ));
        let opts = ObjectOptions {
            replication: 2,
            holders: vec![peer(9), peer(8)],
            ..ObjectOptions::default()
        };
        let loc = h.commit(secs(t, 1), &peer(1), r.id, sum(1), opts).unwrap();
        assert_eq!(loc, r.location);
        let meta = h.index().get(&key(1)).unwrap();
        assert_eq!((meta.replication, meta.holders.len()), (2, 2));
        let lease = h
            .lease(secs(t, 2), &peer(2), &key(1), Duration::from_secs(3))
            .unwrap();
        assert_eq!(lease.location, r.location);
        assert_eq!(lease.checksum, sum(1));
        assert_eq!(h.index().get(&key(1)).unwrap().leases, 1);
        h.release(&peer(2), lease.id).unwrap();
        assert_eq!(h.index().get(&key(1)).unwrap().leases, 0);
        assert!(matches!(
            h.release(&peer(2), lease.id),
            Err(Error::UnknownLease(_))
        ));
        assert!(events(&mut h).is_empty());
    }

    #[test]
    fn uncommitted_reservation_expires_and_frees_space() {
        let mut h = holder(16, false);
        let t = Instant::now();
        let r = h
            .reserve(t, &peer(1), key(1), BLOCK, Duration::from_secs(2))
            .unwrap();
        assert_eq!(h.index().pool().allocated_bytes(), BLOCK);
        assert_eq!(h.poll_timeout(), Some(secs(t, 2)));
        h.handle_timeout(secs(t, 1));
        assert!(events(&mut h).is_empty());
        h.handle_timeout(secs(t, 2));
        assert_eq!(
            events(&mut h),
            vec![HolderEvent::ReservationExpired {
                id: r.id,
                key: key(1),
                owner: peer(1)
            }]
        );
        assert_eq!(h.index().pool().allocated_bytes(), 0);
        assert!(matches!(
            h.commit(secs(t, 2), &peer(1), r.id, sum(1), ObjectOptions::default()),
            Err(Error::UnknownReservation(_))
        ));
        assert_eq!(h.poll_timeout(), None);
    }

    #[test]
    fn commit_after_deadline_fails_even_before_the_timer() {
        let mut h = holder(16, false);
        let t = Instant::now();
        let r = h
            .reserve(t, &peer(1), key(1), BLOCK, Duration::from_secs(2))
            .unwrap();
        let err = h
            .commit(secs(t, 2), &peer(1), r.id, sum(1), ObjectOptions::default())
            .unwrap_err();
        assert!(matches!(err, Error::ReservationExpired(_)));
        assert_eq!(h.index().pool().allocated_bytes(), 0);
        assert!(!h.index().contains(&key(1)));
        // The timer finds nothing left to do.
        h.handle_timeout(secs(t, 3));
        assert!(events(&mut h).is_empty());
    }

    #[test]
    fn handles_are_bound_to_their_owner() {
        let mut h = holder(16, false);
        let t = Instant::now();
        let r = h
            .reserve(t, &peer(1), key(1), BLOCK, Duration::from_secs(5))
            .unwrap();
        assert!(matches!(
            h.commit(t, &peer(2), r.id, sum(1), ObjectOptions::default()),
            Err(Error::NotOwner(_))
        ));
        assert!(matches!(
            h.abort(t, &peer(2), r.id),
            Err(Error::NotOwner(_))
        ));
        h.commit(t, &peer(1), r.id, sum(1), ObjectOptions::default())
            .unwrap();
        let l = h
            .lease(t, &peer(3), &key(1), Duration::from_secs(5))
            .unwrap();
        assert!(matches!(h.release(&peer(1), l.id), Err(Error::NotOwner(_))));
        h.release(&peer(3), l.id).unwrap();
    }

    #[test]
    fn abort_frees_and_is_idempotent_after_expiry() {
        let mut h = holder(16, false);
        let t = Instant::now();
        let r = h
            .reserve(t, &peer(1), key(1), BLOCK, Duration::from_secs(5))
            .unwrap();
        h.abort(t, &peer(1), r.id).unwrap();
        assert_eq!(h.index().pool().allocated_bytes(), 0);
        assert!(matches!(
            h.abort(t, &peer(1), r.id),
            Err(Error::UnknownReservation(_))
        ));
        let r = h
            .reserve(t, &peer(1), key(1), BLOCK, Duration::from_secs(5))
            .unwrap();
        h.abort(secs(t, 9), &peer(1), r.id).unwrap();
        assert_eq!(h.index().pool().allocated_bytes(), 0);
    }

    #[test]
    fn duplicate_puts_first_commit_wins() {
        let mut h = holder(16, false);
        let t = Instant::now();
        let a = h
            .reserve(t, &peer(1), key(1), BLOCK, Duration::from_secs(5))
            .unwrap();
        let b = h
            .reserve(t, &peer(2), key(1), BLOCK, Duration::from_secs(5))
            .unwrap();
        assert_ne!(a.location.offset, b.location.offset);
        h.commit(t, &peer(2), b.id, sum(1), ObjectOptions::default())
            .unwrap();
        assert!(matches!(
            h.commit(t, &peer(1), a.id, sum(1), ObjectOptions::default()),
            Err(Error::AlreadyExists(_))
        ));
        assert_eq!(h.index().pool().allocated_bytes(), BLOCK);
        assert!(matches!(
            h.reserve(t, &peer(3), key(1), BLOCK, Duration::from_secs(5)),
            Err(Error::AlreadyExists(_))
        ));
    }

    #[test]
    fn limits_and_bad_arguments() {
        let mut h = holder(16, false);
        let t = Instant::now();
        assert!(matches!(
            h.reserve(t, &peer(1), key(1), 5 * BLOCK, Duration::from_secs(1)),
            Err(Error::TooLarge { .. })
        ));
        assert!(h
            .reserve(t, &peer(1), key(1), 0, Duration::from_secs(1))
            .is_err());
        assert!(h.reserve(t, &peer(1), key(1), 1, Duration::ZERO).is_err());
        // Lifetimes are clamped to the configured maximum.
        let r = h
            .reserve(t, &peer(1), key(1), 1, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(r.expires_at, secs(t, 10));
        h.commit(t, &peer(1), r.id, sum(1), ObjectOptions::default())
            .unwrap();
        let l = h
            .lease(t, &peer(1), &key(1), Duration::from_secs(3600))
            .unwrap();
        assert_eq!(l.expires_at, secs(t, 30));

        let mut cfg = h.config().clone();
        cfg.max_reservations = 2;
        cfg.max_leases = 1;
        let mut h = Holder::new(cfg).unwrap();
        h.reserve(t, &peer(1), key(1), 1, Duration::from_secs(1))
            .unwrap();
        let r = h
            .reserve(t, &peer(1), key(2), 1, Duration::from_secs(1))
            .unwrap();
        let err = h
            .reserve(t, &peer(1), key(3), 1, Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(
            err,
            Error::LimitExceeded {
                what: "reservations",
                ..
            }
        ));
        assert!(err.is_retryable());
        h.commit(t, &peer(1), r.id, sum(2), ObjectOptions::default())
            .unwrap();
        h.lease(t, &peer(1), &key(2), Duration::from_secs(1))
            .unwrap();
        assert!(matches!(
            h.lease(t, &peer(1), &key(2), Duration::from_secs(1)),
            Err(Error::LimitExceeded { what: "leases", .. })
        ));
    }

    #[test]
    fn lease_expiry_and_owner_death_release_references() {
        let mut h = holder(16, false);
        let t = Instant::now();
        put(&mut h, t, 1, Pin::None);
        let a = h
            .lease(t, &peer(2), &key(1), Duration::from_secs(2))
            .unwrap();
        h.lease(t, &peer(3), &key(1), Duration::from_secs(60))
            .unwrap();
        h.reserve(t, &peer(3), key(2), BLOCK, Duration::from_secs(9))
            .unwrap();
        assert_eq!(h.index().get(&key(1)).unwrap().leases, 2);
        h.handle_timeout(secs(t, 2));
        assert_eq!(
            events(&mut h),
            vec![HolderEvent::LeaseExpired {
                id: a.id,
                key: key(1),
                owner: peer(2)
            }]
        );
        assert_eq!(h.index().get(&key(1)).unwrap().leases, 1);
        assert_eq!(h.release_owner(&peer(3)), (1, 1));
        assert_eq!(h.index().get(&key(1)).unwrap().leases, 0);
        assert_eq!(h.index().pool().allocated_bytes(), BLOCK);
        assert_eq!(h.poll_timeout(), None);
    }

    #[test]
    fn reserve_evicts_lru_and_reports_removals() {
        let mut h = holder(16, false);
        let t = Instant::now();
        for n in 0..12 {
            put(&mut h, t, n, Pin::None);
        }
        assert!(events(&mut h).is_empty());
        let lease = h
            .lease(t, &peer(2), &key(0), Duration::from_secs(10))
            .unwrap();
        // The 13th block crosses the high watermark (12): evict to low (8).
        put(&mut h, t, 12, Pin::None);
        let removed: Vec<ObjectKey> = events(&mut h)
            .into_iter()
            .map(|e| match e {
                HolderEvent::Removed(r) => {
                    assert_eq!(r.reason, RemovalReason::Evicted);
                    r.key
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(removed, (1..6).map(key).collect::<Vec<_>>());
        assert!(h.index().contains(&key(0)));
        h.release(&peer(2), lease.id).unwrap();
        assert_eq!(h.index().pool().allocated_bytes(), 8 * BLOCK);
    }

    #[test]
    fn full_pool_of_protected_objects_refuses_with_retryable_no_space() {
        // Watermark at 100 %: only the reserve path frees memory here.
        let mut cfg = holder(8, false).config().clone();
        cfg.index.high_watermark = 1.0;
        cfg.index.low_watermark = 1.0;
        let mut h = Holder::new(cfg).unwrap();
        let t = Instant::now();
        for n in 0..4 {
            put(&mut h, t, n, Pin::Hard);
        }
        for n in 4..8 {
            put(&mut h, t, n, Pin::None);
            h.lease(t, &peer(2), &key(n), Duration::from_secs(10))
                .unwrap();
        }
        assert!(events(&mut h).is_empty());
        let err = h
            .reserve(t, &peer(1), key(99), BLOCK, Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, Error::NoSpace { .. }));
        assert!(err.is_retryable());
        assert_eq!(h.placement_free(), 0);
        // Once the leases lapse, the reserve drops the least recent object.
        h.handle_timeout(secs(t, 10));
        assert_eq!(events(&mut h).len(), 4);
        assert_eq!(h.placement_free(), 4 * BLOCK);
        assert!(h
            .reserve(
                secs(t, 10),
                &peer(1),
                key(99),
                BLOCK,
                Duration::from_secs(1)
            )
            .is_ok());
        assert!(matches!(
            &events(&mut h)[..],
            [HolderEvent::Removed(Removed { reason: RemovalReason::Evicted, key: k, .. })] if *k == key(4)
        ));
    }

    #[test]
    fn ttl_expiry_and_removal_wait_for_leases() {
        let mut h = holder(16, false);
        let t = Instant::now();
        let r = h
            .reserve(t, &peer(1), key(1), BLOCK, Duration::from_secs(5))
            .unwrap();
        let opts = ObjectOptions {
            ttl: Some(Duration::from_secs(20)),
            ..ObjectOptions::default()
        };
        h.commit(t, &peer(1), r.id, sum(1), opts).unwrap();
        put(&mut h, t, 2, Pin::None);
        assert_eq!(h.poll_timeout(), Some(secs(t, 20)));
        let l = h
            .lease(t, &peer(2), &key(1), Duration::from_secs(30))
            .unwrap();
        h.handle_timeout(secs(t, 20));
        assert!(events(&mut h).is_empty());
        h.release(&peer(2), l.id).unwrap();
        let ev = events(&mut h);
        assert!(matches!(
            &ev[..],
            [HolderEvent::Removed(Removed {
                reason: RemovalReason::Expired,
                ..
            })]
        ));
        let l = h
            .lease(t, &peer(2), &key(2), Duration::from_secs(30))
            .unwrap();
        h.remove(&key(2)).unwrap();
        assert!(events(&mut h).is_empty());
        assert!(matches!(
            h.lease(t, &peer(3), &key(2), Duration::from_secs(1)),
            Err(Error::NotFound(_))
        ));
        h.handle_timeout(secs(t, 30));
        let ev = events(&mut h);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev.contains(&HolderEvent::LeaseExpired {
            id: l.id,
            key: key(2),
            owner: peer(2)
        }));
        assert!(ev.iter().any(|e| matches!(
            e,
            HolderEvent::Removed(Removed {
                reason: RemovalReason::Deleted,
                ..
            })
        )));
        assert!(h.index().is_empty());
    }

    #[test]
    fn spill_and_promote_round_trip() {
        let mut h = holder(16, true);
        let t = Instant::now();
        for n in 0..13 {
            put(&mut h, t, n, Pin::None);
        }
        let spills: Vec<(ObjectKey, Allocation)> = events(&mut h)
            .into_iter()
            .map(|e| match e {
                HolderEvent::Spill { key, location, .. } => (key, location),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(spills.len(), 5);
        for (k, _) in &spills {
            h.complete_spill(k, true);
        }
        let demoted = events(&mut h);
        assert_eq!(demoted.len(), 5);
        assert_eq!(h.index().get(&key(0)).unwrap().tier(), Tier::Ssd);
        // Get of a spilled object: promote, then lease.
        assert!(matches!(
            h.lease(t, &peer(2), &key(0), Duration::from_secs(1)),
            Err(Error::NotResident(_))
        ));
        let loc = h.begin_promote(&key(0)).unwrap();
        h.complete_promote(secs(t, 1), &key(0), true);
        let l = h
            .lease(secs(t, 1), &peer(2), &key(0), Duration::from_secs(1))
            .unwrap();
        assert_eq!(l.location, loc);
        assert_eq!(l.checksum, sum(0));
        // The SSD tier dropping an object with no DRAM copy removes it.
        h.forget_ssd(&key(1));
        assert!(matches!(
            &events(&mut h)[..],
            [HolderEvent::Removed(Removed {
                reason: RemovalReason::SsdLost,
                on_ssd: false,
                ..
            })]
        ));
        // Removing an object with an SSD copy asks for the file to go.
        h.release(&peer(2), l.id).unwrap();
        h.remove(&key(0)).unwrap();
        assert!(matches!(
            &events(&mut h)[..],
            [HolderEvent::Removed(Removed {
                on_ssd: true,
                reason: RemovalReason::Deleted,
                ..
            })]
        ));
        h.restore_from_ssd(t, key(50), 10, sum(50)).unwrap();
        assert_eq!(h.index().get(&key(50)).unwrap().tier(), Tier::Ssd);
    }

    #[test]
    fn promotion_makes_room_by_dropping_copies_already_on_ssd() {
        let mut h = holder(8, true);
        let t = Instant::now();
        h.restore_from_ssd(t, key(100), BLOCK, sum(100)).unwrap();
        // Fill the pool with objects that are on SSD too (spilled while
        // leased, so they stayed resident).
        for n in 0..8 {
            put(&mut h, t, n, Pin::Soft);
        }
        let spills: Vec<ObjectKey> = events(&mut h)
            .into_iter()
            .filter_map(|e| match e {
                HolderEvent::Spill { key, .. } => Some(key),
                _ => None,
            })
            .collect();
        assert!(!spills.is_empty());
        assert!(h.index().pool().free_bytes() == 0);
        let leases: Vec<Lease> = spills
            .iter()
            .map(|k| h.lease(t, &peer(2), k, Duration::from_secs(5)).unwrap())
            .collect();
        for k in &spills {
            h.complete_spill(k, true);
        }
        for l in leases {
            h.release(&peer(2), l.id).unwrap();
        }
        events(&mut h);
        assert!(h.begin_promote(&key(100)).is_ok());
    }
}
