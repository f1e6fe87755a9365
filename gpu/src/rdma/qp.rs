//! The RC queue-pair state machine as pure logic.
//!
//! ```text
//!            init_attrs           rtr_attrs(remote)        rts_attrs
//!   RESET ───────────────► INIT ───────────────────► RTR ─────────────► RTS
//!     ▲                                                                  │
//!     │ reset (reconnect)            any failed completion / to_error    ▼
//!     └──────────────────────────────────────────────────────────── ERROR
//! ```
//!
//! [`QpAttrs`] is a plain description of one `ibv_modify_qp` call (the
//! attribute values and the mask); the functions here compute it from our
//! [`LocalPath`], the peer's [`QpEndpoint`] and [`QpConfig`], and the verbs
//! layer only copies it into `struct ibv_qp_attr`. Mask bit values are the
//! verbs ABI values (checked against the bindings in the verbs tests).

use super::device::{LinkLayer, LocalPath, Mtu};
use super::endpoint::QpEndpoint;
use super::error::{RdmaError, Result};

/// State of a queue pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QpState {
    /// Created, or reset; nothing can be posted.
    Reset,
    /// Receives may be posted.
    Init,
    /// Ready to receive.
    Rtr,
    /// Ready to send.
    Rts,
    /// Failed: outstanding requests are flushed; only a reset helps.
    Error,
}

impl QpState {
    /// The `ibv_qp_state` value.
    pub fn to_verbs(self) -> u32 {
        match self {
            QpState::Reset => 0,
            QpState::Init => 1,
            QpState::Rtr => 2,
            QpState::Rts => 3,
            QpState::Error => 6,
        }
    }
}

/// Whether `ibv_modify_qp` may move a QP from `from` to `to` (the subset of
/// the verbs state diagram an RC connection uses).
pub fn transition_allowed(from: QpState, to: QpState) -> bool {
    use QpState::*;
    matches!(
        (from, to),
        (Reset, Init) | (Init, Rtr) | (Rtr, Rts) | (_, Reset) | (_, Error)
    )
}

/// Tracks the state of one queue pair; the verbs layer asks it before every
/// modify and reports the result back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpStateMachine {
    state: QpState,
}

impl Default for QpStateMachine {
    fn default() -> Self {
        QpStateMachine {
            state: QpState::Reset,
        }
    }
}

impl QpStateMachine {
    /// Current state.
    pub fn state(&self) -> QpState {
        self.state
    }

    /// Checks that `to` is reachable in one step.
    pub fn check(&self, to: QpState) -> Result<()> {
        if transition_allowed(self.state, to) {
            Ok(())
        } else {
            Err(RdmaError::BadTransition {
                from: self.state,
                to,
            })
        }
    }

    /// Records a successful modify.
    pub fn apply(&mut self, to: QpState) -> Result<()> {
        self.check(to)?;
        self.state = to;
        Ok(())
    }

    /// Records that a completion reported an error: the hardware moved the
    /// QP to the error state on its own.
    pub fn failed(&mut self) {
        self.state = QpState::Error;
    }

    /// Can work requests be posted to the send queue?
    pub fn can_send(&self) -> bool {
        self.state == QpState::Rts
    }
}

/// Bits of `ibv_qp_attr_mask` (verbs ABI values).
pub mod mask {
    /// `IBV_QP_STATE`.
    pub const STATE: u32 = 1;
    /// `IBV_QP_ACCESS_FLAGS`.
    pub const ACCESS_FLAGS: u32 = 1 << 3;
    /// `IBV_QP_PKEY_INDEX`.
    pub const PKEY_INDEX: u32 = 1 << 4;
    /// `IBV_QP_PORT`.
    pub const PORT: u32 = 1 << 5;
    /// `IBV_QP_AV`.
    pub const AV: u32 = 1 << 7;
    /// `IBV_QP_PATH_MTU`.
    pub const PATH_MTU: u32 = 1 << 8;
    /// `IBV_QP_TIMEOUT`.
    pub const TIMEOUT: u32 = 1 << 9;
    /// `IBV_QP_RETRY_CNT`.
    pub const RETRY_CNT: u32 = 1 << 10;
    /// `IBV_QP_RNR_RETRY`.
    pub const RNR_RETRY: u32 = 1 << 11;
    /// `IBV_QP_RQ_PSN`.
    pub const RQ_PSN: u32 = 1 << 12;
    /// `IBV_QP_MAX_QP_RD_ATOMIC`.
    pub const MAX_QP_RD_ATOMIC: u32 = 1 << 13;
    /// `IBV_QP_MIN_RNR_TIMER`.
    pub const MIN_RNR_TIMER: u32 = 1 << 15;
    /// `IBV_QP_SQ_PSN`.
    pub const SQ_PSN: u32 = 1 << 16;
    /// `IBV_QP_MAX_DEST_RD_ATOMIC`.
    pub const MAX_DEST_RD_ATOMIC: u32 = 1 << 17;
    /// `IBV_QP_DEST_QPN`.
    pub const DEST_QPN: u32 = 1 << 20;
}

/// Bits of `ibv_access_flags` (verbs ABI values).
pub mod access {
    /// `IBV_ACCESS_LOCAL_WRITE`.
    pub const LOCAL_WRITE: u32 = 1;
    /// `IBV_ACCESS_REMOTE_WRITE`.
    pub const REMOTE_WRITE: u32 = 1 << 1;
    /// `IBV_ACCESS_REMOTE_READ`.
    pub const REMOTE_READ: u32 = 1 << 2;
    /// `IBV_ACCESS_RELAXED_ORDERING` (an optional flag: ignored by kernels
    /// that do not know it, helps PCIe throughput to GPU memory).
    pub const RELAXED_ORDERING: u32 = 1 << 20;
}

/// Tunables of RC queue pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpConfig {
    /// Partition key index.
    pub pkey_index: u16,
    /// Local ACK timeout exponent: 4.096 µs × 2^timeout (14 ≈ 67 ms).
    pub timeout: u8,
    /// Transport retries before `RETRY_EXC_ERR` (at most 7).
    pub retry_cnt: u8,
    /// RNR retries (7 = infinite, which notification receivers rely on).
    pub rnr_retry: u8,
    /// Minimum RNR NAK timer code (12 ≈ 0.64 ms).
    pub min_rnr_timer: u8,
    /// Outstanding RDMA READs we initiate (clamped to the NIC limit).
    pub max_rd_atomic: u8,
    /// Outstanding RDMA READs we serve (clamped to the NIC limit).
    pub max_dest_rd_atomic: u8,
    /// Service level.
    pub sl: u8,
    /// Traffic class (RoCE DSCP << 2).
    pub traffic_class: u8,
    /// Hop limit for routed (GRH) paths.
    pub hop_limit: u8,
    /// Cap on the path MTU (the minimum of both ends and this is used).
    pub max_mtu: Mtu,
}

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig {
            pkey_index: 0,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            min_rnr_timer: 12,
            max_rd_atomic: 16,
            max_dest_rd_atomic: 16,
            sl: 0,
            traffic_class: 0,
            hop_limit: 64,
            max_mtu: Mtu::M4096,
        }
    }
}

/// Address vector of the remote end (`struct ibv_ah_attr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AddressVector {
    /// Destination LID (InfiniBand, same subnet).
    pub dlid: u16,
    /// Service level.
    pub sl: u8,
    /// Local port.
    pub port_num: u8,
    /// A global route header is used (always on RoCE).
    pub is_global: bool,
    /// Destination GID.
    pub dgid: [u8; 16],
    /// Source GID index.
    pub sgid_index: u8,
    /// Hop limit.
    pub hop_limit: u8,
    /// Traffic class.
    pub traffic_class: u8,
}

/// One `ibv_modify_qp` call: the values and which of them are valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QpAttrs {
    /// `attr_mask` (see [`mask`]).
    pub mask: u32,
    /// Target state.
    pub qp_state: u32,
    /// `qp_access_flags`.
    pub access_flags: u32,
    /// `pkey_index`.
    pub pkey_index: u16,
    /// `port_num`.
    pub port_num: u8,
    /// `path_mtu` (`ibv_mtu`).
    pub path_mtu: u32,
    /// `dest_qp_num`.
    pub dest_qp_num: u32,
    /// `rq_psn`.
    pub rq_psn: u32,
    /// `sq_psn`.
    pub sq_psn: u32,
    /// `max_dest_rd_atomic`.
    pub max_dest_rd_atomic: u8,
    /// `max_rd_atomic`.
    pub max_rd_atomic: u8,
    /// `min_rnr_timer`.
    pub min_rnr_timer: u8,
    /// `timeout`.
    pub timeout: u8,
    /// `retry_cnt`.
    pub retry_cnt: u8,
    /// `rnr_retry`.
    pub rnr_retry: u8,
    /// `ah_attr`.
    pub av: AddressVector,
}

impl QpAttrs {
    /// The state this call moves to.
    pub fn target(&self) -> QpState {
        match self.qp_state {
            1 => QpState::Init,
            2 => QpState::Rtr,
            3 => QpState::Rts,
            6 => QpState::Error,
            _ => QpState::Reset,
        }
    }
}

/// RESET → INIT: port, partition and remote access (READ and WRITE; local
/// write so READ responses can land).
pub fn init_attrs(cfg: &QpConfig, local: &LocalPath) -> QpAttrs {
    QpAttrs {
        mask: mask::STATE | mask::PKEY_INDEX | mask::PORT | mask::ACCESS_FLAGS,
        qp_state: QpState::Init.to_verbs(),
        access_flags: access::LOCAL_WRITE | access::REMOTE_WRITE | access::REMOTE_READ,
        pkey_index: cfg.pkey_index,
        port_num: local.port_num,
        ..QpAttrs::default()
    }
}

/// INIT → RTR: where the remote QP is and what it expects.
///
/// RoCE always needs a global route (GID addressing). InfiniBand uses the
/// LID, plus a GRH when the GIDs are in different subnets (the first 8
/// bytes, the subnet prefix, differ) or the peer has no LID.
pub fn rtr_attrs(cfg: &QpConfig, local: &LocalPath, remote: &QpEndpoint) -> Result<QpAttrs> {
    remote.validate()?;
    if remote.link_layer != local.link_layer {
        return Err(RdmaError::Endpoint(format!(
            "link layer {:?} on {} cannot reach {:?} on {}",
            local.link_layer, local.nic, remote.link_layer, remote.nic
        )));
    }
    let sgid_index = u8::try_from(local.gid_index)
        .map_err(|_| RdmaError::Invalid(format!("GID index {} above 255", local.gid_index)))?;
    let global = match local.link_layer {
        LinkLayer::Ethernet => true,
        LinkLayer::Infiniband => remote.lid == 0 || remote.gid[..8] != local.gid[..8],
    };
    let mtu = local.mtu.min(remote.mtu).min(cfg.max_mtu);
    Ok(QpAttrs {
        mask: mask::STATE
            | mask::AV
            | mask::PATH_MTU
            | mask::DEST_QPN
            | mask::RQ_PSN
            | mask::MAX_DEST_RD_ATOMIC
            | mask::MIN_RNR_TIMER,
        qp_state: QpState::Rtr.to_verbs(),
        path_mtu: mtu.to_verbs(),
        dest_qp_num: remote.qpn,
        rq_psn: remote.psn,
        max_dest_rd_atomic: cfg.max_dest_rd_atomic.min(local.max_rd_atomic.1).max(1),
        min_rnr_timer: cfg.min_rnr_timer,
        av: AddressVector {
            dlid: if local.link_layer == LinkLayer::Infiniband {
                remote.lid
            } else {
                0
            },
            sl: cfg.sl,
            port_num: local.port_num,
            is_global: global,
            dgid: if global { remote.gid } else { [0; 16] },
            sgid_index: if global { sgid_index } else { 0 },
            hop_limit: if global { cfg.hop_limit } else { 0 },
            traffic_class: if global { cfg.traffic_class } else { 0 },
        },
        ..QpAttrs::default()
    })
}

/// RTR → RTS: retry policy and our send PSN.
pub fn rts_attrs(cfg: &QpConfig, local: &LocalPath, local_psn: u32) -> QpAttrs {
    QpAttrs {
        mask: mask::STATE
            | mask::TIMEOUT
            | mask::RETRY_CNT
            | mask::RNR_RETRY
            | mask::SQ_PSN
            | mask::MAX_QP_RD_ATOMIC,
        qp_state: QpState::Rts.to_verbs(),
        timeout: cfg.timeout.min(31),
        retry_cnt: cfg.retry_cnt.min(7),
        rnr_retry: cfg.rnr_retry.min(7),
        sq_psn: local_psn & 0x00ff_ffff,
        max_rd_atomic: cfg.max_rd_atomic.min(local.max_rd_atomic.0).max(1),
        ..QpAttrs::default()
    }
}

/// Any state → RESET (before reconnecting) or → ERROR (to flush).
pub fn state_only_attrs(to: QpState) -> QpAttrs {
    QpAttrs {
        mask: mask::STATE,
        qp_state: to.to_verbs(),
        ..QpAttrs::default()
    }
}

/// The three modify calls that take a fresh QP to RTS, in order.
pub fn connect_sequence(
    cfg: &QpConfig,
    local: &LocalPath,
    local_psn: u32,
    remote: &QpEndpoint,
) -> Result<[QpAttrs; 3]> {
    Ok([
        init_attrs(cfg, local),
        rtr_attrs(cfg, local, remote)?,
        rts_attrs(cfg, local, local_psn),
    ])
}

/// A 24-bit initial PSN from any random value.
pub fn psn_from_random(r: u32) -> u32 {
    r & 0x00ff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(ll: LinkLayer) -> LocalPath {
        LocalPath {
            nic: "mlx5_0".into(),
            port_num: 1,
            link_layer: ll,
            lid: 4,
            gid_index: 3,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            mtu: Mtu::M4096,
            max_qp_wr: 1024,
            max_rd_atomic: (8, 4),
        }
    }

    fn remote(ll: LinkLayer) -> QpEndpoint {
        QpEndpoint {
            nic: "mlx5_1".into(),
            port_num: 1,
            link_layer: ll,
            lid: 9,
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9],
            qpn: 0x1234,
            psn: 0x00ab_cdef,
            mtu: Mtu::M1024,
        }
    }

    #[test]
    fn only_verbs_transitions_are_allowed() {
        use QpState::*;
        let mut sm = QpStateMachine::default();
        assert!(!sm.can_send());
        assert!(matches!(
            sm.apply(Rtr),
            Err(RdmaError::BadTransition {
                from: Reset,
                to: Rtr
            })
        ));
        assert!(sm.apply(Rts).is_err());
        sm.apply(Init).unwrap();
        assert!(sm.apply(Rts).is_err());
        sm.apply(Rtr).unwrap();
        assert!(!sm.can_send());
        sm.apply(Rts).unwrap();
        assert!(sm.can_send());
        assert!(sm.apply(Init).is_err());
        sm.failed();
        assert_eq!(sm.state(), Error);
        assert!(!sm.can_send());
        assert!(sm.apply(Rts).is_err());
        sm.apply(Reset).unwrap();
        sm.apply(Init).unwrap();
        for s in [Reset, Init, Rtr, Rts, Error] {
            assert!(transition_allowed(s, Error));
            assert!(transition_allowed(s, Reset));
        }
    }

    #[test]
    fn roce_rtr_uses_a_global_route_and_the_smaller_mtu() {
        let cfg = QpConfig::default();
        let a = rtr_attrs(
            &cfg,
            &local(LinkLayer::Ethernet),
            &remote(LinkLayer::Ethernet),
        )
        .unwrap();
        assert_eq!(a.target(), QpState::Rtr);
        assert!(a.av.is_global);
        assert_eq!(a.av.dgid, remote(LinkLayer::Ethernet).gid);
        assert_eq!(a.av.sgid_index, 3);
        assert_eq!(a.av.dlid, 0);
        assert_eq!(a.av.hop_limit, 64);
        assert_eq!(a.path_mtu, Mtu::M1024.to_verbs());
        assert_eq!(a.dest_qp_num, 0x1234);
        assert_eq!(a.rq_psn, 0x00ab_cdef);
        // Clamped to what the NIC can serve.
        assert_eq!(a.max_dest_rd_atomic, 4);
        for bit in [
            mask::STATE,
            mask::AV,
            mask::PATH_MTU,
            mask::DEST_QPN,
            mask::RQ_PSN,
        ] {
            assert_ne!(a.mask & bit, 0);
        }
        assert_eq!(a.mask & mask::SQ_PSN, 0);
    }

    #[test]
    fn infiniband_rtr_uses_lid_inside_the_subnet_and_grh_across() {
        let cfg = QpConfig::default();
        let l = local(LinkLayer::Infiniband);
        let r = remote(LinkLayer::Infiniband);
        let a = rtr_attrs(&cfg, &l, &r).unwrap();
        assert!(!a.av.is_global);
        assert_eq!(a.av.dlid, 9);
        assert_eq!(a.av.dgid, [0; 16]);

        let mut other_subnet = r.clone();
        other_subnet.gid[0..8].copy_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 1]);
        let a = rtr_attrs(&cfg, &l, &other_subnet).unwrap();
        assert!(a.av.is_global);
        assert_eq!(a.av.dgid, other_subnet.gid);
        assert_eq!(a.av.dlid, 9);
    }

    #[test]
    fn rtr_refuses_mismatched_or_malformed_peers() {
        let cfg = QpConfig::default();
        let l = local(LinkLayer::Ethernet);
        assert!(matches!(
            rtr_attrs(&cfg, &l, &remote(LinkLayer::Infiniband)),
            Err(RdmaError::Endpoint(_))
        ));
        let mut r = remote(LinkLayer::Ethernet);
        r.qpn = 0;
        assert!(rtr_attrs(&cfg, &l, &r).is_err());
        let mut big = l.clone();
        big.gid_index = 300;
        assert!(matches!(
            rtr_attrs(&cfg, &big, &remote(LinkLayer::Ethernet)),
            Err(RdmaError::Invalid(_))
        ));
    }

    #[test]
    fn connect_sequence_walks_reset_to_rts() {
        let cfg = QpConfig {
            retry_cnt: 12,
            timeout: 40,
            ..QpConfig::default()
        };
        let l = local(LinkLayer::Ethernet);
        let seq = connect_sequence(&cfg, &l, 0xff12_3456, &remote(LinkLayer::Ethernet)).unwrap();
        let mut sm = QpStateMachine::default();
        for a in &seq {
            sm.apply(a.target()).unwrap();
        }
        assert!(sm.can_send());
        let init = seq[0];
        assert_eq!(init.port_num, 1);
        assert_eq!(
            init.access_flags,
            access::LOCAL_WRITE | access::REMOTE_READ | access::REMOTE_WRITE
        );
        let rts = seq[2];
        assert_eq!(rts.sq_psn, 0x12_3456);
        assert_eq!(rts.retry_cnt, 7);
        assert_eq!(rts.timeout, 31);
        assert_eq!(rts.max_rd_atomic, 8);
        assert_ne!(rts.mask & mask::SQ_PSN, 0);
        assert_eq!(state_only_attrs(QpState::Error).target(), QpState::Error);
        assert_eq!(state_only_attrs(QpState::Reset).mask, mask::STATE);
        assert_eq!(psn_from_random(u32::MAX), 0x00ff_ffff);
    }
}
