//! Cluster membership from periodic announcements, with time passed in.
//!
//! Each peer periodically broadcasts an [`Announce`] (capacity, free bytes,
//! load, its engine descriptor, its addresses, an incarnation and a
//! sequence number). [`Membership`] folds those into the list of live
//! members that placement runs over, and reports changes as
//! [`MembershipEvent`]s:
//!
//! ```text
//!                 announce (new peer)                 silent >= dead_after
//!   (unknown) ───────────────────────────► Alive ─────────────────────────► Dead
//!       ▲            Joined                 │  ▲            Dead             │
//!       │                                   │  │ newer incarnation           │ announce, same incarnation,
//!       │                                   │  └── Restarted (replaces)      │ newer seq: Joined again
//!       │                                   │                               │ newer incarnation: Joined
//!       │         tombstone_after           │ leave: Left                    │
//!       └───────────────────────────────────┴────────────────────────────────┘
//! ```
//!
//! Ordering rules, per peer:
//! * `incarnation` must grow across restarts (start time in Unix
//!   milliseconds works). A higher one replaces the entry (`Restarted`: the
//!   old incarnation's DRAM objects are gone, so repair treats it like a
//!   death); a lower one is stale and ignored.
//! * `seq` grows with every announce of one incarnation; an announce whose
//!   seq is not above the last one seen is a late duplicate and ignored, so
//!   reordered gossip never rolls free space back.
//! * A dead peer is remembered as a tombstone (incarnation, seq) for
//!   `tombstone_after`, so delayed gossip from before its death does not
//!   bring it back; a fresh announce of it does (`Joined`).
//!
//! The local peer's own entry (fed by the event loop with its own announces)
//! is never declared dead.
//!
//! Note for the network layer: `Announce::peer` is a claim. The event loop
//! must check it equals the source of the gossip message before calling
//! [`Membership::handle_announce`] (the source is the author's claim
//! relayed by pre-shared-key members, or proven by a signature when gossip
//! signing is on; see `network`).
//!
//! Must not depend on: networking, async runtimes, the system clock (time is
//! always an argument).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::peer::PeerId;
use crate::placement::Candidate;

/// Wire version of [`Announce`] this build encodes and accepts.
pub const ANNOUNCE_VERSION: u16 = 1;
/// Largest encoded announce accepted by [`Announce::decode`].
pub const MAX_ANNOUNCE_BYTES: usize = 32 * 1024;
/// Largest engine descriptor carried in an announce.
pub const MAX_ENGINE_DESC_BYTES: usize = 16 * 1024;
/// Most addresses in one announce.
pub const MAX_ADDRS: usize = 16;
/// Longest single address (multiaddr bytes).
pub const MAX_ADDR_BYTES: usize = 256;

/// One peer's periodic self-description (the gossip payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// Wire version; always [`ANNOUNCE_VERSION`] when built here.
    pub version: u16,
    /// Who is announcing.
    pub peer: PeerId,
    /// Grows across restarts of the peer (e.g. start time in Unix ms).
    pub incarnation: u64,
    /// Grows with each announce of one incarnation.
    pub seq: u64,
    /// Bytes of DRAM pool the peer donates.
    pub capacity: u64,
    /// Bytes a new object can use: capacity minus bytes that cannot be
    /// evicted (hard-pinned, leased, reserved). Placement weight.
    pub free: u64,
    /// Requests in flight on the peer; informational, not used by placement.
    pub load: u32,
    /// The transfer engine's descriptor of the peer's pool (opaque here).
    pub engine_desc: Vec<u8>,
    /// Addresses the peer listens on (multiaddr bytes, opaque here).
    pub addrs: Vec<Vec<u8>>,
}

impl Announce {
    /// An announce at the current wire version, with no addresses.
    pub fn new(
        peer: PeerId,
        incarnation: u64,
        seq: u64,
        capacity: u64,
        free: u64,
        engine_desc: Vec<u8>,
    ) -> Announce {
        Announce {
            version: ANNOUNCE_VERSION,
            peer,
            incarnation,
            seq,
            capacity,
            free,
            load: 0,
            engine_desc,
            addrs: Vec::new(),
        }
    }

    /// Checks version, size limits and `free <= capacity`.
    pub fn validate(&self) -> Result<()> {
        if self.version != ANNOUNCE_VERSION {
            return Err(Error::UnsupportedVersion {
                found: self.version,
                supported: ANNOUNCE_VERSION,
            });
        }
        if self.free > self.capacity {
            return Err(Error::InvalidMessage(format!(
                "announce free {} exceeds capacity {}",
                self.free, self.capacity
            )));
        }
        if self.engine_desc.len() > MAX_ENGINE_DESC_BYTES {
            return Err(Error::InvalidMessage(format!(
                "engine descriptor of {} bytes exceeds {MAX_ENGINE_DESC_BYTES}",
                self.engine_desc.len()
            )));
        }
        if self.addrs.len() > MAX_ADDRS {
            return Err(Error::InvalidMessage(format!(
                "{} addresses exceed {MAX_ADDRS}",
                self.addrs.len()
            )));
        }
        if let Some(a) = self.addrs.iter().find(|a| a.len() > MAX_ADDR_BYTES) {
            return Err(Error::InvalidMessage(format!(
                "address of {} bytes exceeds {MAX_ADDR_BYTES}",
                a.len()
            )));
        }
        Ok(())
    }

    /// Validates and encodes (postcard; the version is the first field).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let bytes = postcard::to_stdvec(self)
            .map_err(|e| Error::InvalidMessage(format!("encode announce: {e}")))?;
        if bytes.len() > MAX_ANNOUNCE_BYTES {
            return Err(Error::InvalidMessage(format!(
                "announce of {} bytes exceeds {MAX_ANNOUNCE_BYTES}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Decodes and validates bytes from a peer. Rejects oversized input
    /// before parsing, other versions before parsing the rest, and trailing
    /// bytes after it.
    pub fn decode(bytes: &[u8]) -> Result<Announce> {
        if bytes.len() > MAX_ANNOUNCE_BYTES {
            return Err(Error::InvalidMessage(format!(
                "announce of {} bytes exceeds {MAX_ANNOUNCE_BYTES}",
                bytes.len()
            )));
        }
        let (version, _) = postcard::take_from_bytes::<u16>(bytes)
            .map_err(|e| Error::InvalidMessage(format!("announce version: {e}")))?;
        if version != ANNOUNCE_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: ANNOUNCE_VERSION,
            });
        }
        let (announce, rest) = postcard::take_from_bytes::<Announce>(bytes)
            .map_err(|e| Error::InvalidMessage(format!("announce: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::InvalidMessage(format!(
                "{} trailing bytes after announce",
                rest.len()
            )));
        }
        announce.validate()?;
        Ok(announce)
    }
}

/// Tunables of [`Membership`].
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// This process's own peer id (never declared dead).
    pub local: PeerId,
    /// Silence after which a peer is declared dead.
    pub dead_after: Duration,
    /// How long a dead peer's last (incarnation, seq) is remembered.
    pub tombstone_after: Duration,
    /// Most peers tracked (live and tombstoned together).
    pub max_members: usize,
    /// Significant bits kept of `free` when it becomes a placement weight;
    /// fewer bits mean placement changes less often as free space drifts.
    pub weight_precision_bits: u32,
}

impl MembershipConfig {
    /// Defaults: dead after 5 s, tombstones for 60 s, 4096 members, 3-bit
    /// weights (steps of 12.5 % to 25 %).
    pub fn new(local: PeerId) -> MembershipConfig {
        MembershipConfig {
            local,
            dead_after: Duration::from_secs(5),
            tombstone_after: Duration::from_secs(60),
            max_members: 4096,
            weight_precision_bits: 3,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.dead_after.is_zero() {
            return Err(Error::InvalidConfig("dead_after must be positive".into()));
        }
        if self.max_members == 0 {
            return Err(Error::InvalidConfig("max_members must be positive".into()));
        }
        if !(1..=64).contains(&self.weight_precision_bits) {
            return Err(Error::InvalidConfig(
                "weight_precision_bits must be 1..=64".into(),
            ));
        }
        Ok(())
    }
}

/// A live member as last announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The peer.
    pub peer: PeerId,
    /// Its current incarnation.
    pub incarnation: u64,
    /// Sequence number of the last accepted announce.
    pub seq: u64,
    /// Pool capacity in bytes.
    pub capacity: u64,
    /// Bytes available to new objects.
    pub free: u64,
    /// Requests in flight.
    pub load: u32,
    /// Engine descriptor (opaque).
    pub engine_desc: Vec<u8>,
    /// Listen addresses (opaque).
    pub addrs: Vec<Vec<u8>>,
    /// When this incarnation was first seen.
    pub joined_at: Instant,
    /// When the last accepted announce arrived.
    pub last_seen: Instant,
}

/// A change in membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// A peer became live (new, or back after being declared dead).
    Joined {
        /// The peer.
        peer: PeerId,
        /// Its incarnation.
        incarnation: u64,
    },
    /// A live peer came back with a new incarnation: it restarted, and what
    /// it held in DRAM under the old one is gone.
    Restarted {
        /// The peer.
        peer: PeerId,
        /// The incarnation that ended.
        old_incarnation: u64,
        /// The one that replaced it.
        new_incarnation: u64,
    },
    /// A peer was silent for `dead_after`.
    Dead {
        /// The peer.
        peer: PeerId,
        /// The incarnation that died.
        incarnation: u64,
    },
    /// A peer said goodbye.
    Left {
        /// The peer.
        peer: PeerId,
        /// The incarnation that left.
        incarnation: u64,
    },
}

impl MembershipEvent {
    /// The peer the event is about.
    pub fn peer(&self) -> &PeerId {
        match self {
            MembershipEvent::Joined { peer, .. }
            | MembershipEvent::Restarted { peer, .. }
            | MembershipEvent::Dead { peer, .. }
            | MembershipEvent::Left { peer, .. } => peer,
        }
    }

    /// Whether objects held by the peer (under the incarnation that ended)
    /// are lost, so repair should run.
    pub fn loses_objects(&self) -> bool {
        !matches!(self, MembershipEvent::Joined { .. })
    }
}

#[derive(Debug, Clone)]
enum Entry {
    Alive(Member),
    Tombstone {
        incarnation: u64,
        seq: u64,
        since: Instant,
    },
}

/// The membership state machine. See the module docs.
#[derive(Debug)]
pub struct Membership {
    config: MembershipConfig,
    entries: HashMap<PeerId, Entry>,
    generation: u64,
}

/// Keeps the top `bits` significant bits of `free` (0 stays 0).
pub fn quantize_weight(free: u64, bits: u32) -> u64 {
    let width = 64 - free.leading_zeros();
    if width <= bits {
        return free;
    }
    let shift = width - bits;
    (free >> shift) << shift
}

impl Membership {
    /// An empty membership (the local peer joins with its first announce).
    pub fn new(config: MembershipConfig) -> Result<Membership> {
        config.validate()?;
        Ok(Membership {
            config,
            entries: HashMap::new(),
            generation: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// Counter that changes whenever the result of [`Membership::candidates`]
    /// may have changed; cache placement against it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Folds in one announce received at `now`.
    ///
    /// `Ok(Some(event))` for a join or restart, `Ok(None)` for a refresh or
    /// an ignored stale announce, `Err` for an invalid one (the caller should
    /// treat its sender as misbehaving) or a full table.
    pub fn handle_announce(
        &mut self,
        now: Instant,
        announce: Announce,
    ) -> Result<Option<MembershipEvent>> {
        announce.validate()?;
        let fresh_member = |a: Announce| Member {
            peer: a.peer,
            incarnation: a.incarnation,
            seq: a.seq,
            capacity: a.capacity,
            free: a.free,
            load: a.load,
            engine_desc: a.engine_desc,
            addrs: a.addrs,
            joined_at: now,
            last_seen: now,
        };
        let bits = self.config.weight_precision_bits;
        match self.entries.get_mut(&announce.peer) {
            Some(Entry::Alive(m)) => {
                if announce.incarnation < m.incarnation
                    || (announce.incarnation == m.incarnation && announce.seq <= m.seq)
                {
                    return Ok(None);
                }
                if announce.incarnation > m.incarnation {
                    let old = m.incarnation;
                    let peer = announce.peer.clone();
                    let new = announce.incarnation;
                    *m = fresh_member(announce);
                    self.generation += 1;
                    return Ok(Some(MembershipEvent::Restarted {
                        peer,
                        old_incarnation: old,
                        new_incarnation: new,
                    }));
                }
                if quantize_weight(m.free, bits) != quantize_weight(announce.free, bits) {
                    self.generation += 1;
                }
                m.seq = announce.seq;
                m.capacity = announce.capacity;
                m.free = announce.free;
                m.load = announce.load;
                m.engine_desc = announce.engine_desc;
                m.addrs = announce.addrs;
                m.last_seen = m.last_seen.max(now);
                Ok(None)
            }
            Some(Entry::Tombstone {
                incarnation, seq, ..
            }) => {
                if announce.incarnation < *incarnation
                    || (announce.incarnation == *incarnation && announce.seq <= *seq)
                {
                    return Ok(None);
                }
                Ok(Some(self.insert_alive(fresh_member(announce))))
            }
            None => {
                self.make_room(now)?;
                Ok(Some(self.insert_alive(fresh_member(announce))))
            }
        }
    }

    fn insert_alive(&mut self, member: Member) -> MembershipEvent {
        let event = MembershipEvent::Joined {
            peer: member.peer.clone(),
            incarnation: member.incarnation,
        };
        self.entries
            .insert(member.peer.clone(), Entry::Alive(member));
        self.generation += 1;
        event
    }

    /// Makes room for one more entry: collects expired tombstones, then drops
    /// the oldest tombstone; fails when every slot holds a live member.
    fn make_room(&mut self, now: Instant) -> Result<()> {
        if self.entries.len() < self.config.max_members {
            return Ok(());
        }
        self.collect_tombstones(now);
        if self.entries.len() < self.config.max_members {
            return Ok(());
        }
        let oldest = self
            .entries
            .iter()
            .filter_map(|(p, e)| match e {
                Entry::Tombstone { since, .. } => Some((*since, p.clone())),
                Entry::Alive(_) => None,
            })
            .min();
        match oldest {
            Some((_, peer)) => {
                self.entries.remove(&peer);
                Ok(())
            }
            None => Err(Error::LimitExceeded {
                what: "members",
                max: self.config.max_members as u64,
            }),
        }
    }

    fn collect_tombstones(&mut self, now: Instant) {
        let keep = self.config.tombstone_after;
        self.entries.retain(|_, e| match e {
            Entry::Tombstone { since, .. } => now.saturating_duration_since(*since) < keep,
            Entry::Alive(_) => true,
        });
    }

    /// A peer's goodbye. Ignored unless it names the live incarnation.
    pub fn handle_leave(
        &mut self,
        now: Instant,
        peer: &PeerId,
        incarnation: u64,
    ) -> Option<MembershipEvent> {
        match self.entries.get(peer) {
            Some(Entry::Alive(m)) if m.incarnation == incarnation => {
                let seq = m.seq;
                self.entries.insert(
                    peer.clone(),
                    Entry::Tombstone {
                        incarnation,
                        seq,
                        since: now,
                    },
                );
                self.generation += 1;
                Some(MembershipEvent::Left {
                    peer: peer.clone(),
                    incarnation,
                })
            }
            _ => None,
        }
    }

    /// Declares dead every peer (other than the local one) silent for at
    /// least `dead_after` at `now`, and forgets old tombstones. Returns the
    /// `Dead` events, sorted by peer id.
    pub fn poll_dead(&mut self, now: Instant) -> Vec<MembershipEvent> {
        let dead_after = self.config.dead_after;
        let mut dead: Vec<(PeerId, u64, u64)> = self
            .entries
            .values()
            .filter_map(|e| match e {
                Entry::Alive(m)
                    if m.peer != self.config.local
                        && now.saturating_duration_since(m.last_seen) >= dead_after =>
                {
                    Some((m.peer.clone(), m.incarnation, m.seq))
                }
                _ => None,
            })
            .collect();
        dead.sort();
        self.collect_tombstones(now);
        if !dead.is_empty() {
            self.generation += 1;
        }
        dead.into_iter()
            .map(|(peer, incarnation, seq)| {
                self.entries.insert(
                    peer.clone(),
                    Entry::Tombstone {
                        incarnation,
                        seq,
                        since: now,
                    },
                );
                MembershipEvent::Dead { peer, incarnation }
            })
            .collect()
    }

    /// The next instant at which [`Membership::poll_dead`] has work: a peer
    /// going dead or a tombstone expiring. `None` when nothing is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| match e {
                Entry::Alive(m) if m.peer == self.config.local => None,
                Entry::Alive(m) => m.last_seen.checked_add(self.config.dead_after),
                Entry::Tombstone { since, .. } => since.checked_add(self.config.tombstone_after),
            })
            .min()
    }

    /// The live member `peer`, if any.
    pub fn get(&self, peer: &PeerId) -> Option<&Member> {
        match self.entries.get(peer) {
            Some(Entry::Alive(m)) => Some(m),
            _ => None,
        }
    }

    /// Whether `peer` is live.
    pub fn is_live(&self, peer: &PeerId) -> bool {
        self.get(peer).is_some()
    }

    /// Live members, in no particular order.
    pub fn live_members(&self) -> impl Iterator<Item = &Member> + '_ {
        self.entries.values().filter_map(|e| match e {
            Entry::Alive(m) => Some(m),
            Entry::Tombstone { .. } => None,
        })
    }

    /// Number of live members.
    pub fn live_count(&self) -> usize {
        self.live_members().count()
    }

    /// Live members as placement candidates, weight = `free` quantised to
    /// `weight_precision_bits`, sorted by peer id.
    pub fn candidates(&self) -> Vec<Candidate> {
        let bits = self.config.weight_precision_bits;
        let mut out: Vec<Candidate> = self
            .live_members()
            .map(|m| Candidate::new(m.peer.clone(), quantize_weight(m.free, bits)))
            .collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes(&[0xaa, n]).unwrap()
    }

    fn announce(n: u8, incarnation: u64, seq: u64, free: u64) -> Announce {
        Announce::new(peer(n), incarnation, seq, 1 << 30, free, vec![n; 8])
    }

    fn setup() -> (Membership, Instant) {
        let mut config = MembershipConfig::new(peer(0));
        config.dead_after = Duration::from_secs(3);
        config.tombstone_after = Duration::from_secs(30);
        (Membership::new(config).unwrap(), Instant::now())
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn join_refresh_and_death() {
        let (mut m, t0) = setup();
        let ev = m.handle_announce(t0, announce(1, 10, 1, 100)).unwrap();
        assert_eq!(
            ev,
            Some(MembershipEvent::Joined {
                peer: peer(1),
                incarnation: 10
            })
        );
        assert_eq!(
            m.handle_announce(secs(t0, 2), announce(1, 10, 2, 90))
                .unwrap(),
            None
        );
        assert_eq!(m.get(&peer(1)).unwrap().free, 90);
        assert_eq!(m.poll_timeout(), Some(secs(t0, 5)));
        // Silence just under dead_after: still alive.
        assert!(m
            .poll_dead(secs(t0, 5) - Duration::from_millis(1))
            .is_empty());
        assert!(m.is_live(&peer(1)));
        // At dead_after: dead, once.
        assert_eq!(
            m.poll_dead(secs(t0, 5)),
            vec![MembershipEvent::Dead {
                peer: peer(1),
                incarnation: 10
            }]
        );
        assert!(!m.is_live(&peer(1)));
        assert!(m.poll_dead(secs(t0, 6)).is_empty());
        assert!(m.candidates().is_empty());
    }

    #[test]
    fn local_peer_is_never_declared_dead() {
        let (mut m, t0) = setup();
        m.handle_announce(t0, announce(0, 1, 1, 100)).unwrap();
        m.handle_announce(t0, announce(1, 1, 1, 100)).unwrap();
        let dead = m.poll_dead(secs(t0, 100));
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].peer(), &peer(1));
        assert!(m.is_live(&peer(0)));
    }

    #[test]
    fn new_incarnation_replaces_and_old_one_is_ignored() {
        let (mut m, t0) = setup();
        m.handle_announce(t0, announce(1, 10, 7, 100)).unwrap();
        let ev = m
            .handle_announce(secs(t0, 1), announce(1, 11, 1, 50))
            .unwrap();
        assert_eq!(
            ev,
            Some(MembershipEvent::Restarted {
                peer: peer(1),
                old_incarnation: 10,
                new_incarnation: 11
            })
        );
        assert!(ev.unwrap().loses_objects());
        let member = m.get(&peer(1)).unwrap();
        assert_eq!((member.incarnation, member.seq, member.free), (11, 1, 50));
        assert_eq!(member.joined_at, secs(t0, 1));
        // Late gossip from the old incarnation, even with a higher seq.
        assert_eq!(
            m.handle_announce(secs(t0, 2), announce(1, 10, 99, 1))
                .unwrap(),
            None
        );
        assert_eq!(m.get(&peer(1)).unwrap().free, 50);
        // ... and it does not refresh liveness either.
        assert_eq!(m.poll_dead(secs(t0, 4)).len(), 1);
    }

    #[test]
    fn reordered_announces_never_roll_back() {
        let (mut m, t0) = setup();
        m.handle_announce(t0, announce(1, 1, 5, 500)).unwrap();
        m.handle_announce(t0, announce(1, 1, 4, 400)).unwrap();
        m.handle_announce(t0, announce(1, 1, 5, 300)).unwrap();
        assert_eq!(m.get(&peer(1)).unwrap().free, 500);
        m.handle_announce(t0, announce(1, 1, 6, 600)).unwrap();
        assert_eq!(m.get(&peer(1)).unwrap().free, 600);
    }

    #[test]
    fn tombstone_blocks_stale_gossip_but_not_a_fresh_announce() {
        let (mut m, t0) = setup();
        m.handle_announce(t0, announce(1, 1, 5, 500)).unwrap();
        assert_eq!(m.poll_dead(secs(t0, 3)).len(), 1);
        // Delayed copy of an announce from before the death.
        assert_eq!(
            m.handle_announce(secs(t0, 4), announce(1, 1, 5, 500))
                .unwrap(),
            None
        );
        assert!(!m.is_live(&peer(1)));
        // The peer was only partitioned: newer seq, same incarnation.
        assert_eq!(
            m.handle_announce(secs(t0, 5), announce(1, 1, 6, 500))
                .unwrap(),
            Some(MembershipEvent::Joined {
                peer: peer(1),
                incarnation: 1
            })
        );
        assert!(m.is_live(&peer(1)));
    }

    #[test]
    fn leave_needs_the_live_incarnation() {
        let (mut m, t0) = setup();
        m.handle_announce(t0, announce(1, 2, 1, 100)).unwrap();
        assert_eq!(m.handle_leave(t0, &peer(1), 1), None);
        assert!(m.is_live(&peer(1)));
        assert_eq!(
            m.handle_leave(t0, &peer(1), 2),
            Some(MembershipEvent::Left {
                peer: peer(1),
                incarnation: 2
            })
        );
        assert!(!m.is_live(&peer(1)));
        assert_eq!(m.handle_leave(t0, &peer(1), 2), None);
        assert_eq!(m.handle_announce(t0, announce(1, 2, 1, 100)).unwrap(), None);
    }

    #[test]
    fn tombstones_expire_and_table_is_bounded() {
        let mut config = MembershipConfig::new(peer(0));
        config.max_members = 2;
        config.dead_after = Duration::from_secs(1);
        config.tombstone_after = Duration::from_secs(10);
        let mut m = Membership::new(config).unwrap();
        let t0 = Instant::now();
        m.handle_announce(t0, announce(1, 1, 1, 1)).unwrap();
        m.handle_announce(t0, announce(2, 1, 1, 1)).unwrap();
        let err = m.handle_announce(t0, announce(3, 1, 1, 1)).unwrap_err();
        assert!(matches!(
            err,
            Error::LimitExceeded {
                what: "members",
                ..
            }
        ));
        // Peer 1 dies; its tombstone gives way to a newcomer.
        m.handle_announce(secs(t0, 1), announce(2, 1, 2, 1))
            .unwrap();
        assert_eq!(m.poll_dead(secs(t0, 1)).len(), 1);
        assert_eq!(m.poll_timeout(), Some(secs(t0, 2)));
        assert!(m
            .handle_announce(secs(t0, 1), announce(3, 1, 1, 1))
            .unwrap()
            .is_some());
        assert_eq!(m.live_count(), 2);
        // Tombstones are collected after tombstone_after.
        assert_eq!(m.poll_dead(secs(t0, 2)).len(), 2);
        assert_eq!(m.entries.len(), 2);
        m.poll_dead(secs(t0, 12));
        assert_eq!(m.entries.len(), 0);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn candidates_are_live_sorted_and_quantised() {
        let (mut m, t0) = setup();
        m.handle_announce(t0, announce(2, 1, 1, 1000)).unwrap();
        m.handle_announce(t0, announce(1, 1, 1, 0)).unwrap();
        let c = m.candidates();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], Candidate::new(peer(1), 0));
        // 1000 = 0b1111101000 -> top 3 bits 111 -> 896.
        assert_eq!(c[1], Candidate::new(peer(2), 896));
    }

    #[test]
    fn generation_moves_only_when_candidates_may_change() {
        let (mut m, t0) = setup();
        let g0 = m.generation();
        m.handle_announce(t0, announce(1, 1, 1, 1000)).unwrap();
        let g1 = m.generation();
        assert!(g1 > g0);
        // 1000 -> 990 stays in the 896 bucket.
        m.handle_announce(t0, announce(1, 1, 2, 990)).unwrap();
        assert_eq!(m.generation(), g1);
        m.handle_announce(t0, announce(1, 1, 3, 700)).unwrap();
        assert!(m.generation() > g1);
        let g2 = m.generation();
        m.poll_dead(secs(t0, 1));
        assert_eq!(m.generation(), g2);
        m.poll_dead(secs(t0, 3));
        assert!(m.generation() > g2);
    }

    #[test]
    fn quantize_keeps_top_bits() {
        assert_eq!(quantize_weight(0, 3), 0);
        assert_eq!(quantize_weight(5, 3), 5);
        assert_eq!(quantize_weight(0b1011_0111, 3), 0b1010_0000);
        assert_eq!(quantize_weight(u64::MAX, 64), u64::MAX);
        assert_eq!(quantize_weight(u64::MAX, 1), 1 << 63);
    }

    #[test]
    fn bad_config_is_rejected() {
        let mut c = MembershipConfig::new(peer(0));
        c.dead_after = Duration::ZERO;
        assert!(Membership::new(c).is_err());
        let mut c = MembershipConfig::new(peer(0));
        c.weight_precision_bits = 0;
        assert!(Membership::new(c).is_err());
    }

    #[test]
    fn wire_round_trip() {
        let mut a = announce(3, 1_700_000_000_000, 42, 1 << 20);
        a.load = 17;
        a.addrs = vec![vec![4, 127, 0, 0, 1, 6, 0x1f, 0x90]];
        let bytes = a.encode().unwrap();
        assert_eq!(bytes[0], ANNOUNCE_VERSION as u8);
        assert_eq!(Announce::decode(&bytes).unwrap(), a);
    }

    #[test]
    fn wire_rejects_bad_input() {
        let a = announce(3, 1, 1, 1);
        let bytes = a.encode().unwrap();
        // Truncated.
        assert!(matches!(
            Announce::decode(&bytes[..bytes.len() - 1]),
            Err(Error::InvalidMessage(_))
        ));
        // Trailing garbage.
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            Announce::decode(&long),
            Err(Error::InvalidMessage(_))
        ));
        // Another version, even if the rest would parse.
        let mut v2 = a.clone();
        v2.version = 2;
        let v2_bytes = postcard::to_stdvec(&v2).unwrap();
        assert!(matches!(
            Announce::decode(&v2_bytes),
            Err(Error::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        ));
        // Oversized input is refused before parsing.
        assert!(Announce::decode(&vec![1u8; MAX_ANNOUNCE_BYTES + 1]).is_err());
        // Limits on fields, both when encoding and when decoding.
        let mut big = a.clone();
        big.engine_desc = vec![0; MAX_ENGINE_DESC_BYTES + 1];
        assert!(big.encode().is_err());
        assert!(Announce::decode(&postcard::to_stdvec(&big).unwrap()).is_err());
        let mut many = a.clone();
        many.addrs = vec![vec![1]; MAX_ADDRS + 1];
        assert!(Announce::decode(&postcard::to_stdvec(&many).unwrap()).is_err());
        let mut long_addr = a.clone();
        long_addr.addrs = vec![vec![1; MAX_ADDR_BYTES + 1]];
        assert!(Announce::decode(&postcard::to_stdvec(&long_addr).unwrap()).is_err());
        let mut overfull = a;
        overfull.free = overfull.capacity + 1;
        assert!(Announce::decode(&postcard::to_stdvec(&overfull).unwrap()).is_err());
        // handle_announce validates too.
        let (mut m, t0) = setup();
        assert!(m.handle_announce(t0, overfull).is_err());
        assert_eq!(m.live_count(), 0);
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Announce::decode(&bytes);
        }

        #[test]
        fn flipped_bytes_never_decode_to_something_invalid(
            idx in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut a = announce(9, 77, 3, 1 << 20);
            a.addrs = vec![vec![1, 2, 3]];
            let mut bytes = a.encode().unwrap();
            let i = idx.index(bytes.len());
            bytes[i] ^= 1 << bit;
            if let Ok(decoded) = Announce::decode(&bytes) {
                prop_assert!(decoded.validate().is_ok());
            }
        }
    }
}
