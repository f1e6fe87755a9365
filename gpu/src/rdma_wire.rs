//! Descriptors and connect messages of the RDMA transport: plain serde
//! data, compiled into every build (with or without the `rdma` feature) so
//! that the engine's [`crate::PeerDesc`] and [`crate::RegionDesc`] have the
//! same layout everywhere and builds of both kinds exchange descriptors.
//!
//! Only data lives here; the rules over it (validation, NIC pairing,
//! reconnect decisions) are in `rdma::endpoint` and `rdma::notify`, behind
//! the feature. This module depends on nothing else in the crate.

use serde::{Deserialize, Serialize};

/// Link layer of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinkLayer {
    /// InfiniBand: addressed by LID inside a subnet, GID across subnets.
    Infiniband,
    /// Ethernet (RoCE): always addressed by GID.
    Ethernet,
}

/// MTU of an RDMA path (the verbs enum, not bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mtu {
    /// 256 bytes.
    M256 = 1,
    /// 512 bytes.
    M512 = 2,
    /// 1024 bytes.
    M1024 = 3,
    /// 2048 bytes.
    M2048 = 4,
    /// 4096 bytes.
    M4096 = 5,
}

/// Version of the RDMA descriptor and connect messages.
pub const RDMA_DESC_VERSION: u16 = 1;

/// One NIC of a peer, as published in its descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicDesc {
    /// Kernel device name on the peer.
    pub name: String,
    /// Port used.
    pub port_num: u8,
    /// Link layer.
    pub link_layer: LinkLayer,
    /// LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// GID used as source by the peer.
    pub gid: [u8; 16],
    /// Active MTU.
    pub mtu: Mtu,
}

/// The RDMA part of an engine's peer descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaPeerDesc {
    /// [`RDMA_DESC_VERSION`].
    pub version: u16,
    /// Changes every time the peer process starts (random or a start
    /// timestamp); a larger value than the one connected to means the peer
    /// restarted and every queue pair to it is dead.
    pub incarnation: u64,
    /// NICs of the peer, in the peer's order.
    pub nics: Vec<NicDesc>,
}

/// Addressing of one RC queue pair, exchanged in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpEndpoint {
    /// NIC the queue pair lives on.
    pub nic: String,
    /// Port.
    pub port_num: u8,
    /// Link layer of that port.
    pub link_layer: LinkLayer,
    /// LID (InfiniBand).
    pub lid: u16,
    /// GID, network byte order.
    pub gid: [u8; 16],
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// Initial packet sequence number (24 bits) of the QP's send queue.
    pub psn: u32,
    /// MTU the owner can do on this path.
    pub mtu: Mtu,
}

/// The per-peer connect message: the sender's queue pairs for this peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectInfo {
    /// [`RDMA_DESC_VERSION`].
    pub version: u16,
    /// Incarnation of the sender.
    pub incarnation: u64,
    /// Queue pairs; entry `i` pairs with the receiver's entry `i`.
    pub qps: Vec<QpEndpoint>,
    /// The sender's notification ring, which the receiver of this message
    /// writes its notifications into.
    pub notify_ring: Option<NotifyRingDesc>,
}

/// Where a receiver's notification ring is, published in the connect info.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyRingDesc {
    /// Address of slot 0.
    pub addr: u64,
    /// rkey per receiver NIC (index in its descriptor).
    pub rkeys: Vec<u32>,
    /// Number of slots (a power of two is not required).
    pub slots: u32,
    /// Bytes per slot (the largest payload).
    pub slot_bytes: u32,
}

/// What a peer needs to address an `rdma::RdmaRegion`: goes into the engine's
/// `RegionDesc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaRegionDesc {
    /// Address (IOVA) of byte 0.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// rkey per NIC, in the order of the owner's [`RdmaPeerDesc::nics`].
    pub rkeys: Vec<u32>,
}
