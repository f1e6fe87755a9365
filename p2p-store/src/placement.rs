//! Weighted rendezvous (highest-random-weight) placement.
//!
//! Every peer computes the same R target peers of a key from the same member
//! list, without asking anyone. For each member with weight `w > 0`:
//!
//! ```text
//!   h     = unit(BLAKE3-keyed(PLACEMENT_CONTEXT, key || peer_id))   in (0, 1)
//!   score = -w / ln(h)
//! ```
//!
//! and the targets are the R members with the highest score (ties, which
//! need equal 52-bit hashes, broken by peer id bytes). With this formula a
//! member's chance of being the first target is `w / sum(w)`, and a member
//! leaving only moves the keys it was a target of.
//!
//! Members with weight 0 are never chosen. Duplicate peer ids count once
//! (with their highest score), so the result never repeats a peer and does
//! not depend on the order of `members`.
//!
//! The hash input and the formula are part of the wire contract: peers on
//! different versions must place keys identically, so the golden test at
//! the bottom pins them. `f64::ln` is not guaranteed bit-identical across
//! platforms' math libraries; two scores within a few ulps of each other
//! can then rank differently on two machines. That needs two hashes of one
//! key to collide within ~1e-15, and lookups fall back to provider records
//! anyway.
//!
//! Must not depend on: membership state, networking, the clock.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::key::ObjectKey;
use crate::peer::PeerId;

/// Derive-key context for the placement hash. Changing it re-places every key.
const PLACEMENT_CONTEXT: &str = "kvmesh p2p-store placement v1";

/// A member as placement sees it: who, and how much of the load it should get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The peer.
    pub peer: PeerId,
    /// Relative share of keys; 0 means "never place here".
    pub weight: u64,
}

impl Candidate {
    /// A candidate with the given weight.
    pub fn new(peer: PeerId, weight: u64) -> Candidate {
        Candidate { peer, weight }
    }
}

fn placement_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(|| blake3::derive_key(PLACEMENT_CONTEXT, b""))
}

/// Hasher primed with `key`; clone it per peer.
fn key_hasher(key: &ObjectKey) -> blake3::Hasher {
    let mut hasher = blake3::Hasher::new_keyed(placement_key());
    hasher.update(key.as_bytes());
    hasher
}

fn peer_hash(primed: &blake3::Hasher, peer: &PeerId) -> u64 {
    let mut hasher = primed.clone();
    hasher.update(peer.as_bytes());
    let out = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Maps 64 hash bits to a float strictly inside (0, 1), using the top 52:
/// `(m + 0.5) / 2^52` is exact for every 52-bit `m`, the largest being
/// `1 - 2^-53` (with 53 bits the largest would round up to exactly 1.0,
/// whose logarithm is 0).
fn unit(bits: u64) -> f64 {
    ((bits >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64)
}

fn weighted_score(hash: u64, weight: u64) -> f64 {
    // ln of a value in (0, 1) is negative and finite, so the score is
    // positive and finite for any weight > 0.
    weight as f64 / -unit(hash).ln()
}

/// The uniform value in (0, 1) that `(key, peer)` hashes to.
pub fn unit_hash(key: &ObjectKey, peer: &PeerId) -> f64 {
    unit(peer_hash(&key_hasher(key), peer))
}

/// The rendezvous score of `peer` for `key` at `weight` (0 when weight is 0).
pub fn score(key: &ObjectKey, peer: &PeerId, weight: u64) -> f64 {
    if weight == 0 {
        return 0.0;
    }
    weighted_score(peer_hash(&key_hasher(key), peer), weight)
}

/// All members with positive weight, best first, each peer once.
pub fn ranked(key: &ObjectKey, members: &[Candidate]) -> Vec<PeerId> {
    let primed = key_hasher(key);
    let mut scored: Vec<(f64, &PeerId)> = members
        .iter()
        .filter(|c| c.weight > 0)
        .map(|c| {
            (
                weighted_score(peer_hash(&primed, &c.peer), c.weight),
                &c.peer,
            )
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    let mut out: Vec<PeerId> = Vec::with_capacity(scored.len());
    for (_, peer) in scored {
        // Sorted by score first, so a duplicate id's best entry came first;
        // duplicates are rare, a linear check is fine.
        if !out.contains(peer) {
            out.push(peer.clone());
        }
    }
    out
}

/// The `r` target peers of `key`: the first `r` of [`ranked`]. Fewer when
/// fewer than `r` members have positive weight.
pub fn targets(key: &ObjectKey, members: &[Candidate], r: usize) -> Vec<PeerId> {
    let mut all = ranked(key, members);
    all.truncate(r);
    all
}

/// Groups `keys` by each of their `r` targets, for batched lookups: one
/// request per peer carrying every key that peer should hold.
pub fn batch_by_target<'a>(
    keys: impl IntoIterator<Item = &'a ObjectKey>,
    members: &[Candidate],
    r: usize,
) -> BTreeMap<PeerId, Vec<ObjectKey>> {
    let mut batches: BTreeMap<PeerId, Vec<ObjectKey>> = BTreeMap::new();
    for key in keys {
        for peer in targets(key, members, r) {
            batches.entry(peer).or_default().push(*key);
        }
    }
    batches
}

/// Among `peers`, the one with the highest unweighted hash for `key` (ties
/// broken by id). Depends only on the key and the ids, not on weights, so
/// peers whose views of free capacity differ still agree on it. Used to pick
/// the single repairing holder.
pub fn first_by_hash<'a>(
    key: &ObjectKey,
    peers: impl IntoIterator<Item = &'a PeerId>,
) -> Option<&'a PeerId> {
    let primed = key_hasher(key);
    peers
        .into_iter()
        .map(|p| (peer_hash(&primed, p), p))
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)))
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer(n: u32) -> PeerId {
        let mut bytes = vec![0x00, 0x24, 0x08, 0x01];
        bytes.extend_from_slice(&n.to_be_bytes());
        PeerId::from_bytes(&bytes).unwrap()
    }

    fn key(n: u64) -> ObjectKey {
        ObjectKey::for_content(&n.to_le_bytes())
    }

    fn members(weights: &[u64]) -> Vec<Candidate> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Candidate::new(peer(i as u32), w))
            .collect()
    }

    #[test]
    fn golden_values_are_stable() {
        // Pins the wire contract: if this changes, peers on different
        // versions would place keys differently.
        let k = ObjectKey::from_bytes([7; 32]);
        let p = PeerId::from_bytes(b"peer-a").unwrap();
        let h = unit_hash(&k, &p);
        assert_eq!(h.to_bits(), GOLDEN_UNIT_BITS, "unit hash {h}");
        let m = members(&[10, 20, 30, 40, 50]);
        let order: Vec<u32> = ranked(&k, &m)
            .iter()
            .map(|p| u32::from_be_bytes(p.as_bytes()[4..8].try_into().unwrap()))
            .collect();
        assert_eq!(order, GOLDEN_ORDER);
    }

    const GOLDEN_UNIT_BITS: u64 = 4607083286077973427;
    const GOLDEN_ORDER: [u32; 5] = [3, 4, 2, 0, 1];

    #[test]
    fn unit_is_strictly_inside_zero_one() {
        assert!(unit(0) > 0.0);
        assert!(unit(u64::MAX) < 1.0);
        assert!(unit(u64::MAX).ln() < 0.0);
        assert!(weighted_score(0, 1).is_finite());
        assert!(weighted_score(u64::MAX, u64::MAX).is_finite());
    }

    #[test]
    fn zero_weight_is_never_chosen_and_r_is_capped() {
        let m = members(&[0, 5, 0, 5]);
        for i in 0..200 {
            let t = targets(&key(i), &m, 3);
            assert_eq!(t.len(), 2);
            assert!(!t.contains(&peer(0)) && !t.contains(&peer(2)));
        }
        assert!(targets(&key(1), &members(&[0, 0]), 1).is_empty());
        assert!(targets(&key(1), &[], 1).is_empty());
        assert!(targets(&key(1), &m, 0).is_empty());
    }

    #[test]
    fn duplicate_ids_count_once_with_best_weight() {
        let mut m = members(&[1, 1, 1]);
        m.push(Candidate::new(peer(1), 1_000_000));
        let mut hits = 0;
        for i in 0..200 {
            let t = targets(&key(i), &m, 3);
            let mut sorted = t.clone();
            sorted.sort();
            assert_eq!(sorted, vec![peer(0), peer(1), peer(2)]);
            if t[0] == peer(1) {
                hits += 1;
            }
        }
        // With the heavy duplicate, peer 1 is first for nearly every key.
        assert!(hits > 190, "hits {hits}");
    }

    /// Observed share of first targets vs `w / sum(w)`, within 4.5 standard
    /// deviations of a binomial. Wrong weighting (e.g. ignoring weights, or
    /// using `h^(1/w)` with a bug) is off by hundreds of sigmas.
    fn assert_proportional(weights: &[u64], n: u64) {
        let m = members(weights);
        let mut counts = vec![0u64; weights.len()];
        for i in 0..n {
            let t = targets(&key(i), &m, 1);
            let idx = u32::from_be_bytes(t[0].as_bytes()[4..8].try_into().unwrap()) as usize;
            counts[idx] += 1;
        }
        let total: u64 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let p = w as f64 / total as f64;
            let expect = p * n as f64;
            let sigma = (n as f64 * p * (1.0 - p)).sqrt();
            let dev = (counts[i] as f64 - expect).abs();
            assert!(
                dev <= 4.5 * sigma,
                "member {i} weight {w}: got {} expected {expect:.0} (sigma {sigma:.1}); all {counts:?}",
                counts[i]
            );
        }
    }

    #[test]
    fn shares_follow_weights() {
        assert_proportional(&[1, 2, 3, 4], 20_000);
        assert_proportional(&[1000, 1000, 1000], 9_000);
        assert_proportional(&[1, 9], 10_000);
    }

    #[test]
    fn batching_covers_every_target_once() {
        let m = members(&[3, 3, 3, 3, 3]);
        let keys: Vec<ObjectKey> = (0..100).map(key).collect();
        let batches = batch_by_target(&keys, &m, 2);
        let total: usize = batches.values().map(Vec::len).sum();
        assert_eq!(total, 200);
        for k in &keys {
            for t in targets(k, &m, 2) {
                assert!(batches[&t].contains(k));
            }
        }
    }

    #[test]
    fn first_by_hash_ignores_order_and_weights() {
        let ids: Vec<PeerId> = (0..5).map(peer).collect();
        for i in 0..50 {
            let k = key(i);
            let a = first_by_hash(&k, ids.iter()).unwrap().clone();
            let b = first_by_hash(&k, ids.iter().rev()).unwrap().clone();
            assert_eq!(a, b);
            // It is the top of an equal-weight ranking.
            let eq: Vec<Candidate> = ids.iter().map(|p| Candidate::new(p.clone(), 1)).collect();
            assert_eq!(ranked(&k, &eq)[0], a);
        }
        assert!(first_by_hash(&key(0), std::iter::empty()).is_none());
    }

    fn arb_members() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::btree_map(any::<u32>(), 1u64..1_000_000, 1..12).prop_map(|m| {
            m.into_iter()
                .map(|(id, w)| Candidate::new(peer(id), w))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn order_of_members_does_not_matter(
            m in arb_members(),
            k in any::<[u8; 32]>(),
            r in 1usize..5,
            seed in any::<u64>(),
        ) {
            let k = ObjectKey::from_bytes(k);
            let mut shuffled = m.clone();
            // Deterministic shuffle from the seed.
            let n = shuffled.len();
            for i in (1..n).rev() {
                let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) >> 33) as usize % (i + 1);
                shuffled.swap(i, j);
            }
            shuffled.reverse();
            prop_assert_eq!(targets(&k, &m, r), targets(&k, &shuffled, r));
        }

        #[test]
        fn targets_are_distinct_members(m in arb_members(), k in any::<[u8; 32]>(), r in 0usize..15) {
            let k = ObjectKey::from_bytes(k);
            let t = targets(&k, &m, r);
            prop_assert_eq!(t.len(), r.min(m.len()));
            let set: std::collections::BTreeSet<&PeerId> = t.iter().collect();
            prop_assert_eq!(set.len(), t.len());
            for p in &t {
                prop_assert!(m.iter().any(|c| &c.peer == p));
            }
        }

        #[test]
        fn a_leaving_member_only_moves_its_own_keys(
            m in arb_members(),
            gone in any::<prop::sample::Index>(),
            r in 1usize..4,
        ) {
            let gone = gone.index(m.len());
            let removed = m[gone].peer.clone();
            let rest: Vec<Candidate> = m.iter().filter(|c| c.peer != removed).cloned().collect();
            for i in 0..64 {
                let k = key(i);
                let before = targets(&k, &m, r);
                let after = targets(&k, &rest, r);
                if before.contains(&removed) {
                    // The survivors keep their places, in order; one newcomer
                    // (if any member is left to take it) fills the gap.
                    let kept: Vec<PeerId> = before.iter().filter(|p| **p != removed).cloned().collect();
                    prop_assert_eq!(&after[..kept.len()], &kept[..]);
                    prop_assert_eq!(after.len(), r.min(rest.len()));
                } else {
                    prop_assert_eq!(before, after);
                }
            }
        }

        #[test]
        fn a_joining_member_only_takes_keys(m in arb_members(), w in 1u64..1_000_000, r in 1usize..4) {
            let newcomer = peer(u32::MAX);
            prop_assume!(!m.iter().any(|c| c.peer == newcomer));
            let mut more = m.clone();
            more.push(Candidate::new(newcomer.clone(), w));
            for i in 0..64 {
                let k = key(i);
                let before = targets(&k, &m, r);
                let after = targets(&k, &more, r);
                if before != after {
                    prop_assert!(after.contains(&newcomer));
                }
            }
        }
    }
}
