//! RDMA NICs, their ports and GID tables, and which port/GID to use.
//!
//! [`discover`] asks the verbs layer for every device and returns plain data
//! ([`NicInfo`]); everything else here is pure: [`choose_gid_index`] picks the
//! source GID (RoCE v2 with an IPv4 address first), [`select_paths`] turns
//! the discovered NICs into the [`LocalPath`]s queue pairs are created on.
//! No type here holds a verbs resource.

use serde::{Deserialize, Serialize};

use super::error::{RdmaError, Result};
use super::verbs;

pub use crate::rdma_wire::{LinkLayer, Mtu};

impl LinkLayer {
    /// From `ibv_port_attr.link_layer` (0 "unspecified" means InfiniBand by
    /// the verbs convention).
    pub fn from_verbs(v: u8) -> LinkLayer {
        match v {
            2 => LinkLayer::Ethernet,
            _ => LinkLayer::Infiniband,
        }
    }
}

/// Type of a GID table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GidType {
    /// InfiniBand GID.
    Ib,
    /// RoCE v1 (Ethernet L2 only, not routable).
    RoceV1,
    /// RoCE v2 (UDP/IP, routable).
    RoceV2,
}

impl GidType {
    /// From `ibv_gid_entry.gid_type`.
    pub fn from_verbs(v: u32) -> Option<GidType> {
        Some(match v {
            0 => GidType::Ib,
            1 => GidType::RoceV1,
            2 => GidType::RoceV2,
            _ => return None,
        })
    }
}

/// One valid entry of a port's GID table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GidInfo {
    /// Index in the port's GID table (the `sgid_index` of an address vector).
    pub index: u32,
    /// The GID, network byte order.
    pub gid: [u8; 16],
    /// Its type.
    pub gid_type: GidType,
}

impl GidInfo {
    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`).
    pub fn ipv4(&self) -> Option<[u8; 4]> {
        let g = &self.gid;
        if g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff {
            Some([g[12], g[13], g[14], g[15]])
        } else {
            None
        }
    }

    /// An IPv6 link-local GID (`fe80::/10`).
    pub fn is_link_local(&self) -> bool {
        self.gid[0] == 0xfe && (self.gid[1] & 0xc0) == 0x80
    }

    /// All-zero GIDs are unused table slots.
    pub fn is_zero(&self) -> bool {
        self.gid.iter().all(|&b| b == 0)
    }
}

impl Mtu {
    /// From the `ibv_mtu` value; `None` for anything else.
    pub fn from_verbs(v: u32) -> Option<Mtu> {
        Some(match v {
            1 => Mtu::M256,
            2 => Mtu::M512,
            3 => Mtu::M1024,
            4 => Mtu::M2048,
            5 => Mtu::M4096,
            _ => return None,
        })
    }

    /// The `ibv_mtu` value.
    pub fn to_verbs(self) -> u32 {
        self as u32
    }

    /// Size in bytes.
    pub fn bytes(self) -> u32 {
        128 << (self as u32)
    }
}

/// One port of a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Port number (1-based).
    pub port_num: u8,
    /// `IBV_PORT_ACTIVE`.
    pub active: bool,
    /// Link layer.
    pub link_layer: LinkLayer,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Active MTU.
    pub active_mtu: Mtu,
    /// Valid GID table entries.
    pub gids: Vec<GidInfo>,
}

/// One RDMA device (HCA / RNIC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicInfo {
    /// Kernel device name (`mlx5_0`).
    pub name: String,
    /// Node GUID, host byte order.
    pub guid: u64,
    /// Maximum outstanding work requests per queue.
    pub max_qp_wr: u32,
    /// Maximum scatter/gather entries per work request.
    pub max_sge: u32,
    /// Maximum outstanding RDMA READs a QP may initiate.
    pub max_qp_init_rd_atom: u8,
    /// Maximum outstanding RDMA READs a QP may serve.
    pub max_qp_rd_atom: u8,
    /// Largest registrable memory region.
    pub max_mr_size: u64,
    /// Ports.
    pub ports: Vec<PortInfo>,
}

/// Which GIDs [`choose_gid_index`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GidPolicy {
    /// RoCE v2 with IPv4 address, then RoCE v2 global IPv6, then RoCE v2
    /// link-local, then RoCE v1.
    #[default]
    PreferRoceV2,
    /// Exactly this table index (for fabrics where the operator knows).
    Index(u32),
}

/// Picks the source GID index of a port, or `None` if none fits.
///
/// InfiniBand ports use GID 0 (the port GID, derived from the subnet prefix
/// and port GUID). RoCE ports rank their non-zero entries as documented on
/// [`GidPolicy::PreferRoceV2`]; the lowest index wins a tie, which is the
/// address the kernel added first.
pub fn choose_gid_index(port: &PortInfo, policy: GidPolicy) -> Option<u32> {
    if let GidPolicy::Index(i) = policy {
        return port
            .gids
            .iter()
            .find(|g| g.index == i && !g.is_zero())
            .map(|g| g.index);
    }
    match port.link_layer {
        LinkLayer::Infiniband => port
            .gids
            .iter()
            .filter(|g| !g.is_zero() && g.gid_type == GidType::Ib)
            .map(|g| g.index)
            .min(),
        LinkLayer::Ethernet => port
            .gids
            .iter()
            .filter(|g| !g.is_zero())
            .filter_map(|g| {
                let rank = match (g.gid_type, g.ipv4().is_some(), g.is_link_local()) {
                    (GidType::RoceV2, true, _) => 0,
                    (GidType::RoceV2, false, false) => 1,
                    (GidType::RoceV2, false, true) => 2,
                    (GidType::RoceV1, _, _) => 3,
                    (GidType::Ib, _, _) => return None,
                };
                Some((rank, g.index))
            })
            .min()
            .map(|(_, i)| i),
    }
}

/// A port chosen for queue pairs, with its addressing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPath {
    /// NIC name.
    pub nic: String,
    /// Port number.
    pub port_num: u8,
    /// Link layer.
    pub link_layer: LinkLayer,
    /// LID (InfiniBand).
    pub lid: u16,
    /// Source GID index.
    pub gid_index: u32,
    /// Source GID.
    pub gid: [u8; 16],
    /// Active MTU.
    pub mtu: Mtu,
    /// Send-queue depth limit of the NIC.
    pub max_qp_wr: u32,
    /// Outstanding-READ limits (initiator, responder).
    pub max_rd_atomic: (u8, u8),
}

/// Chooses one active port per NIC (the first with a usable GID), keeping
/// only NICs named in `allow` when it is non-empty. Errors with
/// [`RdmaError::NoDevices`] when nothing is left, saying why.
pub fn select_paths(
    nics: &[NicInfo],
    allow: &[String],
    policy: GidPolicy,
) -> Result<Vec<LocalPath>> {
    for name in allow {
        if !nics.iter().any(|n| &n.name == name) {
            return Err(RdmaError::UnknownDevice(name.clone()));
        }
    }
    let mut paths = Vec::new();
    let mut skipped = Vec::new();
    for nic in nics {
        if !allow.is_empty() && !allow.contains(&nic.name) {
            continue;
        }
        let chosen = nic.ports.iter().filter(|p| p.active).find_map(|p| {
            let idx = choose_gid_index(p, policy)?;
            let gid = p.gids.iter().find(|g| g.index == idx)?.gid;
            Some(LocalPath {
                nic: nic.name.clone(),
                port_num: p.port_num,
                link_layer: p.link_layer,
                lid: p.lid,
                gid_index: idx,
                gid,
                mtu: p.active_mtu,
                max_qp_wr: nic.max_qp_wr,
                max_rd_atomic: (nic.max_qp_init_rd_atom, nic.max_qp_rd_atom),
            })
        });
        match chosen {
            Some(p) => paths.push(p),
            None => skipped.push(nic.name.clone()),
        }
    }
    if paths.is_empty() {
        let reason = if nics.is_empty() {
            "the verbs library lists no device".to_owned()
        } else {
            format!("no active port with a usable GID on {}", skipped.join(", "))
        };
        return Err(RdmaError::NoDevices { reason });
    }
    Ok(paths)
}

/// Lists the RDMA devices of this machine with their ports and GID tables.
///
/// Returns [`RdmaError::NoDevices`] (never panics) when the kernel has no
/// RDMA support or no device is present.
pub fn discover() -> Result<Vec<NicInfo>> {
    let nics = verbs::probe_devices()?;
    if nics.is_empty() {
        return Err(RdmaError::NoDevices {
            reason: "the verbs library lists no device".into(),
        });
    }
    Ok(nics)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn gid(index: u32, bytes: [u8; 16], gid_type: GidType) -> GidInfo {
        GidInfo {
            index,
            gid: bytes,
            gid_type,
        }
    }

    pub(crate) fn v4(a: u8) -> [u8; 16] {
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, a]
    }

    fn link_local() -> [u8; 16] {
        [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 2, 1, 2, 3, 4, 5, 6, 7]
    }

    fn global6() -> [u8; 16] {
        [0x20, 0x01, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]
    }

    pub(crate) fn roce_port(gids: Vec<GidInfo>) -> PortInfo {
        PortInfo {
            port_num: 1,
            active: true,
            link_layer: LinkLayer::Ethernet,
            lid: 0,
            active_mtu: Mtu::M1024,
            gids,
        }
    }

    pub(crate) fn nic(name: &str, ports: Vec<PortInfo>) -> NicInfo {
        NicInfo {
            name: name.into(),
            guid: 1,
            max_qp_wr: 16384,
            max_sge: 30,
            max_qp_init_rd_atom: 16,
            max_qp_rd_atom: 16,
            max_mr_size: u64::MAX,
            ports,
        }
    }

    #[test]
    fn roce_prefers_v2_ipv4_over_everything() {
        let port = roce_port(vec![
            gid(0, link_local(), GidType::RoceV1),
            gid(1, link_local(), GidType::RoceV2),
            gid(2, v4(7), GidType::RoceV1),
            gid(3, v4(7), GidType::RoceV2),
            gid(4, global6(), GidType::RoceV2),
        ]);
        assert_eq!(choose_gid_index(&port, GidPolicy::PreferRoceV2), Some(3));
    }

    #[test]
    fn roce_falls_back_in_rank_order() {
        let mut port = roce_port(vec![
            gid(0, link_local(), GidType::RoceV1),
            gid(1, link_local(), GidType::RoceV2),
            gid(5, global6(), GidType::RoceV2),
        ]);
        assert_eq!(choose_gid_index(&port, GidPolicy::PreferRoceV2), Some(5));
        port.gids.retain(|g| g.index != 5);
        assert_eq!(choose_gid_index(&port, GidPolicy::PreferRoceV2), Some(1));
        port.gids.retain(|g| g.index != 1);
        assert_eq!(choose_gid_index(&port, GidPolicy::PreferRoceV2), Some(0));
        port.gids.clear();
        assert_eq!(choose_gid_index(&port, GidPolicy::PreferRoceV2), None);
    }

    #[test]
    fn zero_gids_and_missing_indices_are_refused() {
        let port = roce_port(vec![
            gid(0, [0; 16], GidType::RoceV2),
            gid(1, v4(1), GidType::RoceV2),
        ]);
        assert_eq!(choose_gid_index(&port, GidPolicy::PreferRoceV2), Some(1));
        assert_eq!(choose_gid_index(&port, GidPolicy::Index(0)), None);
        assert_eq!(choose_gid_index(&port, GidPolicy::Index(1)), Some(1));
        assert_eq!(choose_gid_index(&port, GidPolicy::Index(9)), None);
    }

    #[test]
    fn infiniband_uses_the_lowest_ib_gid() {
        let mut port = roce_port(vec![
            gid(1, global6(), GidType::Ib),
            gid(
                0,
                [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                GidType::Ib,
            ),
        ]);
        port.link_layer = LinkLayer::Infiniband;
        port.lid = 7;
        assert_eq!(choose_gid_index(&port, GidPolicy::PreferRoceV2), Some(0));
    }

    #[test]
    fn select_paths_skips_inactive_ports_and_filters_names() {
        let mut down = roce_port(vec![gid(0, v4(1), GidType::RoceV2)]);
        down.active = false;
        let mut up = roce_port(vec![gid(3, v4(2), GidType::RoceV2)]);
        up.port_num = 2;
        let nics = vec![
            nic("mlx5_0", vec![down.clone(), up]),
            nic("mlx5_1", vec![down]),
        ];
        let paths = select_paths(&nics, &[], GidPolicy::default()).unwrap();
        assert_eq!(paths.len(), 1);
        assert_eq!(
            (paths[0].nic.as_str(), paths[0].port_num, paths[0].gid_index),
            ("mlx5_0", 2, 3)
        );
        assert_eq!(paths[0].gid, v4(2));

        match select_paths(&nics, &["mlx5_1".into()], GidPolicy::default()) {
            Err(RdmaError::NoDevices { reason }) => assert!(reason.contains("mlx5_1"), "{reason}"),
            other => panic!("expected NoDevices, got {other:?}"),
        }
        assert!(matches!(
            select_paths(&nics, &["mlx5_9".into()], GidPolicy::default()),
            Err(RdmaError::UnknownDevice(n)) if n == "mlx5_9"
        ));
    }

    #[test]
    fn no_nics_is_a_clear_no_devices_error() {
        let err = select_paths(&[], &[], GidPolicy::default()).unwrap_err();
        assert!(matches!(err, RdmaError::NoDevices { .. }));
        assert_eq!(err.kind(), crate::ErrorKind::Unreachable);
        assert!(err.to_string().starts_with("no RDMA devices"), "{err}");
    }

    /// Runs the real verbs device query. On machines without RDMA (the
    /// kernel here has none) it must come back as `NoDevices`, not a panic
    /// or another error; on a machine with NICs it must list them.
    #[test]
    fn discover_without_hardware_reports_no_devices() {
        match discover() {
            Err(RdmaError::NoDevices { reason }) => assert!(!reason.is_empty()),
            Ok(nics) => {
                assert!(!nics.is_empty());
                assert!(nics.iter().all(|n| !n.name.is_empty()));
            }
            Err(other) => panic!("device discovery failed with {other:?}, expected NoDevices"),
        }
    }

    #[test]
    fn mtu_round_trips() {
        for v in 1..=5 {
            let m = Mtu::from_verbs(v).unwrap();
            assert_eq!(m.to_verbs(), v);
        }
        assert_eq!(Mtu::M4096.bytes(), 4096);
        assert_eq!(Mtu::M256.bytes(), 256);
        assert_eq!(Mtu::from_verbs(0), None);
        assert!(Mtu::M1024 < Mtu::M4096);
    }
}
