//! Repair decisions: after a holder dies (or restarts and loses its DRAM),
//! which objects must this peer re-replicate, and to whom.
//!
//! For each local object, with `holders` the peers recorded as holding it:
//!
//! ```text
//!   surviving = (holders that are live and not lost) + this peer
//!   if |surviving| >= R                       -> Healthy
//!   leader    = surviving peer with the highest unweighted hash for the key
//!   if leader != this peer                    -> Delegated(leader)
//!   targets   = live members in weighted HRW order, minus surviving,
//!               first R - |surviving| of them
//!   if targets is empty                       -> Unrepairable
//!   else                                      -> Repair { targets }
//! ```
//!
//! Every surviving holder evaluates the same rule on the same inputs, so
//! exactly one of them acts per object. The leader is chosen by an
//! unweighted hash of (key, peer id) on purpose: weights come from free
//! space, which peers may see at slightly different values, while ids and
//! the set of survivors are the same everywhere once membership has
//! settled. If views still differ (a holder list that missed an update) the
//! worst case is an extra copy, or a repair left to the next membership
//! change; never a wrong object, since copies are immutable and keyed by
//! content.
//!
//! The plan is a pure function; the event loop runs it on `Dead`, `Left` and
//! `Restarted` events (passing the restarted peer in `lost`), executes the
//! tasks with bounded concurrency (reserve on target, engine write, commit
//! with `holders` = the task's new holder list), and records the new list
//! with [`crate::holder::Holder::set_holders`].
//!
//! Must not depend on: networking, the engine, the clock, membership state
//! (it takes the live list as an argument).

use std::collections::BTreeSet;

use crate::index::ObjectMeta;
use crate::key::ObjectKey;
use crate::peer::PeerId;
use crate::placement::{self, Candidate};

/// An object's replication facts as this peer knows them.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaSet<'a> {
    /// The object.
    pub key: ObjectKey,
    /// How many copies it should have (R).
    pub replication: usize,
    /// Peers recorded as holding it (this peer may or may not be listed).
    pub holders: &'a [PeerId],
}

impl<'a> From<&'a ObjectMeta> for ReplicaSet<'a> {
    fn from(meta: &'a ObjectMeta) -> ReplicaSet<'a> {
        ReplicaSet {
            key: meta.key,
            replication: usize::from(meta.replication),
            holders: &meta.holders,
        }
    }
}

/// Copy one object from this peer to `targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairTask {
    /// The object.
    pub key: ObjectKey,
    /// Peers to copy it to, best HRW rank first.
    pub targets: Vec<PeerId>,
    /// Holders once the copies are made (survivors + targets), sorted.
    pub holders: Vec<PeerId>,
    /// R.
    pub replication: usize,
}

/// What this peer should do about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairDecision {
    /// It has R surviving copies.
    Healthy,
    /// Copies are missing, and another surviving holder is the one to act.
    Delegated {
        /// The holder that acts.
        leader: PeerId,
    },
    /// This peer must make the copies.
    Repair(RepairTask),
    /// Copies are missing and no live peer without one is left to take them.
    Unrepairable {
        /// Copies short of R.
        missing: usize,
    },
}

/// The repair work for a batch of objects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairPlan {
    /// Copies this peer must make.
    pub tasks: Vec<RepairTask>,
    /// Objects this peer leads whose R cannot be met with the live members.
    pub unrepairable: Vec<ObjectKey>,
}

/// The inputs that do not change from object to object.
#[derive(Debug, Clone)]
pub struct RepairContext<'a> {
    local: &'a PeerId,
    live: &'a [Candidate],
    live_ids: BTreeSet<&'a PeerId>,
    lost: BTreeSet<&'a PeerId>,
}

impl<'a> RepairContext<'a> {
    /// `live`: every live member with its placement weight (weight 0 ones
    /// still count as holders, they are just never new targets). `lost`:
    /// live peers whose copies are gone anyway (restarted ones).
    pub fn new(local: &'a PeerId, live: &'a [Candidate], lost: &'a [PeerId]) -> RepairContext<'a> {
        RepairContext {
            local,
            live,
            live_ids: live.iter().map(|c| &c.peer).collect(),
            lost: lost.iter().collect(),
        }
    }

    /// The decision for one object held by this peer.
    pub fn decide(&self, object: ReplicaSet<'_>) -> RepairDecision {
        let r = object.replication.max(1);
        let mut surviving: BTreeSet<&PeerId> = object
            .holders
            .iter()
            .filter(|p| self.live_ids.contains(p) && !self.lost.contains(p))
            .collect();
        surviving.insert(self.local);
        if surviving.len() >= r {
            return RepairDecision::Healthy;
        }
        let leader =
            placement::first_by_hash(&object.key, surviving.iter().copied()).unwrap_or(self.local);
        if leader != self.local {
            return RepairDecision::Delegated {
                leader: leader.clone(),
            };
        }
        let missing = r - surviving.len();
        let targets: Vec<PeerId> = placement::ranked(&object.key, self.live)
            .into_iter()
            .filter(|p| !surviving.contains(p))
            .take(missing)
            .collect();
        if targets.is_empty() {
            return RepairDecision::Unrepairable { missing };
        }
        let mut holders: Vec<PeerId> = surviving.into_iter().cloned().collect();
        holders.extend(targets.iter().cloned());
        holders.sort();
        RepairDecision::Repair(RepairTask {
            key: object.key,
            targets,
            holders,
            replication: r,
        })
    }

    /// Decisions for many objects, keeping only the work for this peer.
    /// Tasks come out sorted by key.
    pub fn plan<'o>(&self, objects: impl IntoIterator<Item = ReplicaSet<'o>>) -> RepairPlan {
        let mut plan = RepairPlan::default();
        for object in objects {
            match self.decide(object) {
                RepairDecision::Repair(task) => plan.tasks.push(task),
                RepairDecision::Unrepairable { .. } => plan.unrepairable.push(object.key),
                RepairDecision::Healthy | RepairDecision::Delegated { .. } => {}
            }
        }
        plan.tasks.sort_by_key(|t| t.key);
        plan.unrepairable.sort();
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn peer(n: u8) -> PeerId {
        PeerId::from_bytes(&[0x12, 0x20, n]).unwrap()
    }

    fn key(n: u32) -> ObjectKey {
        ObjectKey::for_content(&n.to_le_bytes())
    }

    type Counts = BTreeMap<ObjectKey, usize>;
    type PeersByKey = BTreeMap<ObjectKey, Vec<PeerId>>;

    /// A simulated cluster: which peer holds which objects, and the holder
    /// list each copy was stored with.
    struct Cluster {
        members: Vec<Candidate>,
        /// peer -> key -> recorded holders
        stores: BTreeMap<PeerId, BTreeMap<ObjectKey, Vec<PeerId>>>,
        replication: usize,
    }

    impl Cluster {
        fn new(weights: &[u64], replication: usize, objects: u32) -> Cluster {
            let members: Vec<Candidate> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Candidate::new(peer(i as u8), w))
                .collect();
            let mut stores: BTreeMap<PeerId, BTreeMap<ObjectKey, Vec<PeerId>>> = members
                .iter()
                .map(|c| (c.peer.clone(), BTreeMap::new()))
                .collect();
            for n in 0..objects {
                let k = key(n);
                let targets = placement::targets(&k, &members, replication);
                for t in &targets {
                    stores.get_mut(t).unwrap().insert(k, targets.clone());
                }
            }
            Cluster {
                members,
                stores,
                replication,
            }
        }

        fn copies(&self, k: &ObjectKey) -> usize {
            self.stores.values().filter(|s| s.contains_key(k)).count()
        }

        /// Kills `dead` (their stores vanish) and `restarted` (their stores
        /// empty, they stay members); every survivor plans, and the tasks
        /// are applied. Returns, per key, the copies left right after the
        /// failure, the peers that planned a task, and the peers that
        /// reported it unrepairable.
        fn fail_and_repair(
            &mut self,
            dead: &[PeerId],
            restarted: &[PeerId],
        ) -> (Counts, PeersByKey, PeersByKey) {
            self.members.retain(|c| !dead.contains(&c.peer));
            for d in dead {
                self.stores.remove(d);
            }
            for r in restarted {
                self.stores.insert(r.clone(), BTreeMap::new());
            }
            let mut survivors: BTreeMap<ObjectKey, usize> = BTreeMap::new();
            for store in self.stores.values() {
                for k in store.keys() {
                    *survivors.entry(*k).or_default() += 1;
                }
            }
            let mut actors = PeersByKey::new();
            let mut short = PeersByKey::new();
            let mut all_tasks = Vec::new();
            for (p, store) in &self.stores {
                let ctx = RepairContext::new(p, &self.members, restarted);
                let plan = ctx.plan(store.iter().map(|(k, holders)| ReplicaSet {
                    key: *k,
                    replication: self.replication,
                    holders,
                }));
                for task in plan.tasks {
                    actors.entry(task.key).or_default().push(p.clone());
                    all_tasks.push(task);
                }
                for k in plan.unrepairable {
                    short.entry(k).or_default().push(p.clone());
                }
            }
            for task in all_tasks {
                for t in &task.targets {
                    assert!(self.members.iter().any(|c| &c.peer == t), "target not live");
                    let store = self.stores.get_mut(t).unwrap();
                    assert!(!store.contains_key(&task.key), "target already held it");
                    store.insert(task.key, task.holders.clone());
                }
            }
            (survivors, actors, short)
        }
    }

    fn check_repair(weights: &[u64], r: usize, dead: &[u8], restarted: &[u8]) {
        let mut c = Cluster::new(weights, r, 300);
        let dead: Vec<PeerId> = dead.iter().map(|&n| peer(n)).collect();
        let restarted: Vec<PeerId> = restarted.iter().map(|&n| peer(n)).collect();
        let before: BTreeMap<ObjectKey, usize> =
            (0..300).map(|n| (key(n), c.copies(&key(n)))).collect();
        let lost_holder: BTreeMap<ObjectKey, bool> = (0..300)
            .map(|n| {
                let k = key(n);
                let hit = dead
                    .iter()
                    .chain(&restarted)
                    .any(|p| c.stores[p].contains_key(&k));
                (k, hit)
            })
            .collect();
        let (survivors, actors, short) = c.fail_and_repair(&dead, &restarted);
        let live = c.members.len();
        for n in 0..300 {
            let k = key(n);
            let after = c.copies(&k);
            let acted = actors.get(&k).map_or(0, Vec::len);
            if !lost_holder[&k] {
                assert_eq!(acted, 0, "untouched key {n} repaired");
                assert_eq!(after, before[&k]);
                continue;
            }
            let left = survivors.get(&k).copied().unwrap_or(0);
            if left == 0 {
                // Every copy died with its holders: nothing anyone can do.
                assert_eq!(acted, 0);
                continue;
            }
            if left >= live {
                // Every live peer already has it: short of R, but no one
                // can help; exactly one peer reports that.
                assert_eq!(acted, 0);
                assert_eq!(after, left);
                assert_eq!(short.get(&k).map_or(0, Vec::len), 1, "key {n}");
                continue;
            }
            assert!(!short.contains_key(&k));
            assert_eq!(acted, 1, "key {n}: {acted} peers acted");
            assert_eq!(after, r.min(live), "key {n}: {after} copies");
        }
    }

    #[test]
    fn three_peers_one_dies() {
        check_repair(&[100, 100, 100], 2, &[1], &[]);
    }

    #[test]
    fn four_peers_r3_one_dies_weighted() {
        check_repair(&[100, 400, 200, 300], 3, &[3], &[]);
    }

    #[test]
    fn five_peers_two_die() {
        check_repair(&[100, 100, 100, 100, 100], 3, &[0, 4], &[]);
    }

    #[test]
    fn five_peers_one_restarts() {
        check_repair(&[100, 200, 300, 400, 500], 2, &[], &[2]);
    }

    #[test]
    fn decisions_in_detail() {
        let live: Vec<Candidate> = (0..4).map(|n| Candidate::new(peer(n), 10)).collect();
        let holders = [peer(0), peer(1), peer(9)]; // peer 9 is dead
        let k = key(7);
        let set = ReplicaSet {
            key: k,
            replication: 3,
            holders: &holders,
        };
        let leader = placement::first_by_hash(&k, [&peer(0), &peer(1)])
            .unwrap()
            .clone();
        let other = if leader == peer(0) { peer(1) } else { peer(0) };
        let task = match RepairContext::new(&leader, &live, &[]).decide(set) {
            RepairDecision::Repair(task) => task,
            other => panic!("leader got {other:?}"),
        };
        assert_eq!(task.targets.len(), 1);
        assert!(task.targets[0] == peer(2) || task.targets[0] == peer(3));
        assert_eq!(task.holders.len(), 3);
        assert_eq!(
            RepairContext::new(&other, &live, &[]).decide(set),
            RepairDecision::Delegated {
                leader: leader.clone()
            }
        );
        // Enough copies: healthy, whoever asks.
        let set2 = ReplicaSet {
            replication: 2,
            ..set
        };
        assert_eq!(
            RepairContext::new(&other, &live, &[]).decide(set2),
            RepairDecision::Healthy
        );
        // No live peer left to take a copy.
        let few: Vec<Candidate> = live[..2].to_vec();
        assert_eq!(
            RepairContext::new(&leader, &few, &[]).decide(set),
            RepairDecision::Unrepairable { missing: 1 }
        );
        // Weight-0 members hold copies but never receive new ones.
        let mut zero = live.clone();
        zero[2].weight = 0;
        zero[3].weight = 0;
        assert_eq!(
            RepairContext::new(&leader, &zero, &[]).decide(set),
            RepairDecision::Unrepairable { missing: 1 }
        );
        // A lost (restarted) holder does not count but may be a target.
        let lost = [other.clone()];
        match RepairContext::new(&leader, &live[..3], &lost).decide(set2) {
            RepairDecision::Repair(t) => assert_eq!(t.targets.len(), 1),
            d => panic!("{d:?}"),
        }
        // The local peer counts as a holder even when not listed.
        let unlisted = ReplicaSet {
            key: k,
            replication: 1,
            holders: &[],
        };
        assert_eq!(
            RepairContext::new(&peer(3), &live, &[]).decide(unlisted),
            RepairDecision::Healthy
        );
    }

    #[test]
    fn plan_ignores_order_of_inputs() {
        let live: Vec<Candidate> = (0..5)
            .map(|n| Candidate::new(peer(n), 10 + u64::from(n)))
            .collect();
        let mut rev = live.clone();
        rev.reverse();
        let holders: Vec<Vec<PeerId>> = (0..50)
            .map(|n| vec![peer(0), peer(7), peer((n % 4) as u8 + 1)])
            .collect();
        let sets = |rev_holders: bool| -> Vec<(ObjectKey, Vec<PeerId>)> {
            holders
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let mut h = h.clone();
                    if rev_holders {
                        h.reverse();
                    }
                    (key(i as u32), h)
                })
                .collect()
        };
        let a = sets(false);
        let b = sets(true);
        let plan_a =
            RepairContext::new(&peer(0), &live, &[]).plan(a.iter().map(|(k, h)| ReplicaSet {
                key: *k,
                replication: 3,
                holders: h,
            }));
        let plan_b =
            RepairContext::new(&peer(0), &rev, &[]).plan(b.iter().rev().map(|(k, h)| ReplicaSet {
                key: *k,
                replication: 3,
                holders: h,
            }));
        assert_eq!(plan_a, plan_b);
        assert!(!plan_a.tasks.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn exactly_one_actor_and_r_restored(
            weights in prop::collection::vec(1u64..1000, 3..6),
            r in 1usize..4,
            dead_mask in any::<u8>(),
        ) {
            let n = weights.len();
            let dead: Vec<u8> = (0..n as u8).filter(|i| dead_mask & (1 << i) != 0).collect();
            prop_assume!(dead.len() < n);
            check_repair(&weights, r, &dead, &[]);
        }
    }
}
