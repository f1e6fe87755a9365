//! What peers exchange to connect RC queue pairs, and when to reconnect.
//!
//! Two levels, both serde-serialisable:
//!
//! - [`RdmaPeerDesc`]: published once per engine inside the engine's peer
//!   descriptor: the engine incarnation and the NICs (name, link layer, LID,
//!   GID, MTU). It says whether and how a peer can be reached over RDMA.
//! - [`QpEndpoint`] lists inside a [`ConnectInfo`]: exchanged per peer pair in
//!   the handshake, because RC queue pairs are point to point. Entry `i` of
//!   one side's list is connected to entry `i` of the other's.
//!
//! [`reconnect_decision`] is the pure rule for a descriptor update: keep the
//! connection, connect for the first time, ignore a stale descriptor, or tear
//! down and reconnect because the peer restarted.

use super::device::{LinkLayer, LocalPath};
use super::error::{RdmaError, Result};

pub use crate::rdma_wire::{ConnectInfo, NicDesc, QpEndpoint, RdmaPeerDesc, RDMA_DESC_VERSION};

impl NicDesc {
    /// The published form of a local path.
    pub fn from_path(p: &LocalPath) -> NicDesc {
        NicDesc {
            name: p.nic.clone(),
            port_num: p.port_num,
            link_layer: p.link_layer,
            lid: p.lid,
            gid: p.gid,
            mtu: p.mtu,
        }
    }
}

impl QpEndpoint {
    /// Checks the fields a peer could send wrong.
    pub fn validate(&self) -> Result<()> {
        if self.qpn == 0 || self.qpn > 0x00ff_ffff {
            return Err(RdmaError::Endpoint(format!(
                "qpn {:#x} out of range",
                self.qpn
            )));
        }
        if self.psn > 0x00ff_ffff {
            return Err(RdmaError::Endpoint(format!(
                "psn {:#x} out of range",
                self.psn
            )));
        }
        if self.link_layer == LinkLayer::Ethernet && self.gid.iter().all(|&b| b == 0) {
            return Err(RdmaError::Endpoint("RoCE endpoint without a GID".into()));
        }
        if self.link_layer == LinkLayer::Infiniband
            && self.lid == 0
            && self.gid.iter().all(|&b| b == 0)
        {
            return Err(RdmaError::Endpoint(
                "InfiniBand endpoint with neither LID nor GID".into(),
            ));
        }
        Ok(())
    }
}

impl ConnectInfo {
    /// Checks version, every endpoint, and that the queue pair count matches
    /// ours.
    pub fn validate(&self, expected_qps: usize) -> Result<()> {
        if self.version != RDMA_DESC_VERSION {
            return Err(RdmaError::Endpoint(format!(
                "connect info version {} (we speak {})",
                self.version, RDMA_DESC_VERSION
            )));
        }
        if self.qps.len() != expected_qps {
            return Err(RdmaError::Endpoint(format!(
                "peer offers {} queue pairs, we created {}",
                self.qps.len(),
                expected_qps
            )));
        }
        if let Some(r) = &self.notify_ring {
            r.validate()?;
        }
        self.qps.iter().try_for_each(QpEndpoint::validate)
    }
}

/// Pairs local paths with the peer's NICs for `qps_per_pair` queue pairs
/// each. Returns `(local path index, remote NIC index)` per queue pair.
///
/// Every local NIC is used; remote NICs of the same link layer are assigned
/// round robin so that two hosts with N NICs each get N disjoint rails.
/// Both sides run this with the roles swapped and get mirrored lists, so
/// entry `i` on both sides refers to the same NIC pair.
pub fn pair_nics(
    local: &[LocalPath],
    remote: &[NicDesc],
    qps_per_pair: usize,
    initiator: bool,
) -> Result<Vec<(usize, usize)>> {
    if qps_per_pair == 0 {
        return Err(RdmaError::Invalid("qps_per_pair must be at least 1".into()));
    }
    // Pair in a canonical order so both sides agree: the initiator's NICs
    // drive the round robin.
    let (a_len, b_ll): (usize, Vec<LinkLayer>) = if initiator {
        (local.len(), remote.iter().map(|n| n.link_layer).collect())
    } else {
        (remote.len(), local.iter().map(|p| p.link_layer).collect())
    };
    let a_ll = |i: usize| {
        if initiator {
            local[i].link_layer
        } else {
            remote[i].link_layer
        }
    };
    let mut pairs = Vec::new();
    let mut cursor = 0usize;
    for a in 0..a_len {
        let candidates: Vec<usize> = (0..b_ll.len()).filter(|&b| b_ll[b] == a_ll(a)).collect();
        if candidates.is_empty() {
            continue;
        }
        let b = candidates[cursor % candidates.len()];
        cursor += 1;
        for _ in 0..qps_per_pair {
            pairs.push(if initiator { (a, b) } else { (b, a) });
        }
    }
    if pairs.is_empty() {
        return Err(RdmaError::Endpoint(
            "no NIC of the peer shares a link layer with ours".into(),
        ));
    }
    Ok(pairs)
}

/// State of our connection to a peer, as far as reconnection cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectedPeer {
    /// The peer incarnation the queue pairs were connected to.
    pub incarnation: u64,
    /// Some queue pair of the connection is in the error state.
    pub any_qp_failed: bool,
}

/// What to do with a peer's queue pairs after seeing its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectDecision {
    /// Connected to this incarnation and healthy.
    Keep,
    /// Not connected yet.
    Connect,
    /// The descriptor is older than the connection: ignore it.
    IgnoreStale,
    /// Tear every queue pair down (in-flight work fails with
    /// `ConnectionLost`) and connect again.
    Reconnect(ReconnectReason),
}

/// Why a reconnect was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectReason {
    /// The peer restarted (new incarnation).
    PeerRestarted,
    /// A queue pair went to the error state (retry exceeded, remote error).
    QpFailed,
}

/// Decides what a descriptor update means for the connection to that peer.
pub fn reconnect_decision(
    current: Option<ConnectedPeer>,
    advertised_incarnation: u64,
) -> ReconnectDecision {
    match current {
        None => ReconnectDecision::Connect,
        Some(c) if advertised_incarnation > c.incarnation => {
            ReconnectDecision::Reconnect(ReconnectReason::PeerRestarted)
        }
        Some(c) if advertised_incarnation < c.incarnation => ReconnectDecision::IgnoreStale,
        Some(c) if c.any_qp_failed => ReconnectDecision::Reconnect(ReconnectReason::QpFailed),
        Some(_) => ReconnectDecision::Keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma_wire::{Mtu, NotifyRingDesc};

    fn path(nic: &str, ll: LinkLayer) -> LocalPath {
        LocalPath {
            nic: nic.into(),
            port_num: 1,
            link_layer: ll,
            lid: 1,
            gid_index: 0,
            gid: [1; 16],
            mtu: Mtu::M4096,
            max_qp_wr: 1024,
            max_rd_atomic: (16, 16),
        }
    }

    fn ep(qpn: u32) -> QpEndpoint {
        QpEndpoint {
            nic: "mlx5_0".into(),
            port_num: 1,
            link_layer: LinkLayer::Ethernet,
            lid: 0,
            gid: [7; 16],
            qpn,
            psn: 0x12345,
            mtu: Mtu::M1024,
        }
    }

    #[test]
    fn reconnect_rules() {
        use ReconnectDecision::*;
        assert_eq!(reconnect_decision(None, 5), Connect);
        let ok = ConnectedPeer {
            incarnation: 5,
            any_qp_failed: false,
        };
        assert_eq!(reconnect_decision(Some(ok), 5), Keep);
        assert_eq!(
            reconnect_decision(Some(ok), 6),
            Reconnect(ReconnectReason::PeerRestarted)
        );
        assert_eq!(reconnect_decision(Some(ok), 4), IgnoreStale);
        let failed = ConnectedPeer {
            any_qp_failed: true,
            ..ok
        };
        assert_eq!(
            reconnect_decision(Some(failed), 5),
            Reconnect(ReconnectReason::QpFailed)
        );
        // A restart wins over a failed QP as the reason.
        assert_eq!(
            reconnect_decision(Some(failed), 9),
            Reconnect(ReconnectReason::PeerRestarted)
        );
        // A stale descriptor does not trigger a reconnect even when broken:
        // the fresh one will.
        assert_eq!(reconnect_decision(Some(failed), 1), IgnoreStale);
    }

    #[test]
    fn endpoints_round_trip_through_postcard_and_json() {
        let info = ConnectInfo {
            version: RDMA_DESC_VERSION,
            incarnation: 42,
            qps: vec![ep(0x11), ep(0x12)],
            notify_ring: Some(NotifyRingDesc {
                addr: 0x1000,
                rkeys: vec![5, 6],
                slots: 8,
                slot_bytes: 256,
            }),
        };
        let bytes = postcard::to_allocvec(&info).unwrap();
        let back: ConnectInfo = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, info);
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<ConnectInfo>(&json).unwrap(), info);
        back.validate(2).unwrap();
    }

    #[test]
    fn malformed_endpoints_are_refused() {
        assert!(ep(0).validate().is_err());
        assert!(ep(0x0100_0000).validate().is_err());
        let mut e = ep(5);
        e.psn = 0x0100_0000;
        assert!(e.validate().is_err());
        let mut e = ep(5);
        e.gid = [0; 16];
        assert!(e.validate().is_err());
        e.link_layer = LinkLayer::Infiniband;
        e.lid = 3;
        assert!(e.validate().is_ok());
        let info = ConnectInfo {
            version: RDMA_DESC_VERSION,
            incarnation: 1,
            qps: vec![ep(1)],
            notify_ring: None,
        };
        assert!(matches!(info.validate(2), Err(RdmaError::Endpoint(_))));
        let info = ConnectInfo {
            version: 99,
            ..info
        };
        assert!(info.validate(1).is_err());
    }

    #[test]
    fn pairing_is_mirrored_between_the_two_sides() {
        let a = vec![
            path("a0", LinkLayer::Ethernet),
            path("a1", LinkLayer::Ethernet),
        ];
        let b = vec![
            path("b0", LinkLayer::Ethernet),
            path("b1", LinkLayer::Infiniband),
            path("b2", LinkLayer::Ethernet),
        ];
        let a_desc: Vec<NicDesc> = a.iter().map(NicDesc::from_path).collect();
        let b_desc: Vec<NicDesc> = b.iter().map(NicDesc::from_path).collect();
        let from_a = pair_nics(&a, &b_desc, 2, true).unwrap();
        let from_b = pair_nics(&b, &a_desc, 2, false).unwrap();
        assert_eq!(from_a, vec![(0, 0), (0, 0), (1, 2), (1, 2)]);
        let mirrored: Vec<(usize, usize)> = from_b.iter().map(|&(l, r)| (r, l)).collect();
        assert_eq!(mirrored, from_a);
    }

    #[test]
    fn pairing_without_common_link_layer_fails() {
        let a = vec![path("a0", LinkLayer::Ethernet)];
        let b = vec![NicDesc::from_path(&path("b0", LinkLayer::Infiniband))];
        assert!(matches!(
            pair_nics(&a, &b, 1, true),
            Err(RdmaError::Endpoint(_))
        ));
        assert!(matches!(
            pair_nics(&a, &b, 0, true),
            Err(RdmaError::Invalid(_))
        ));
    }
}
