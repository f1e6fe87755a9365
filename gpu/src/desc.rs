//! Peer descriptors: how to reach an engine, and the versioned encoding used
//! for every descriptor that crosses a process boundary.
//!
//! A descriptor carries the data-plane secret. Whoever holds it can read and
//! write the engine's registered regions, so hand it only to cluster members
//! (the p2p store sends it inside its pre-shared-key network).

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the descriptor encoding; bumped on incompatible change.
///
/// - 1: first release.
/// - 2: region descriptors carry CUDA IPC reachability of GPU regions.
///   Peer descriptors are unchanged; both still decode version 1.
/// - 3: peer descriptors carry the RDMA NICs (`None` where the engine runs
///   without RDMA, in every build without the `rdma` feature too) and
///   region descriptors the rkeys. Versions 1 and 2 decode with `None`.
pub const DESC_VERSION: u16 = 3;
/// Oldest version this build decodes.
pub const DESC_VERSION_MIN: u16 = 1;
const DESC_MAGIC: [u8; 2] = *b"KM";
/// Largest descriptor we accept from outside.
pub const MAX_DESC_BYTES: usize = 64 * 1024;

/// Identity of an engine instance (random per process start).
pub type EngineId = [u8; 16];

/// How to reach one engine.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerDesc {
    /// Random per engine start; also tells a restarted peer from the old one.
    pub engine_id: EngineId,
    /// Same value on two engines iff they share a host *and* a network
    /// namespace (boot id + netns inode), i.e. `shm` can work between them.
    pub host_id: String,
    /// TCP data-plane listen addresses.
    pub tcp: Vec<SocketAddr>,
    /// Abstract unix-socket name of the `shm` control channel, if enabled.
    pub shm: Option<String>,
    /// Number of TCP connections the peer suggests per initiator.
    pub tcp_conns: u16,
    /// Data-plane secret; proves the holder was handed this descriptor.
    pub secret: [u8; 32],
    /// The engine's RDMA NICs when it runs the `rdma` transport.
    pub rdma: Option<crate::rdma_wire::RdmaPeerDesc>,
}

/// The peer layout of descriptor versions 1 and 2 (before RDMA).
#[derive(Serialize, Deserialize)]
pub(crate) struct PeerDescV2 {
    engine_id: EngineId,
    host_id: String,
    tcp: Vec<SocketAddr>,
    shm: Option<String>,
    tcp_conns: u16,
    secret: [u8; 32],
}

impl From<PeerDescV2> for PeerDesc {
    fn from(v: PeerDescV2) -> PeerDesc {
        PeerDesc {
            engine_id: v.engine_id,
            host_id: v.host_id,
            tcp: v.tcp,
            shm: v.shm,
            tcp_conns: v.tcp_conns,
            secret: v.secret,
            rdma: None,
        }
    }
}

impl std::fmt::Debug for PeerDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerDesc")
            .field("engine_id", &hex_encode(&self.engine_id))
            .field("host_id", &self.host_id)
            .field("tcp", &self.tcp)
            .field("shm", &self.shm)
            .field("tcp_conns", &self.tcp_conns)
            .field("rdma", &self.rdma.as_ref().map(|r| r.nics.len()))
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl PeerDesc {
    /// Versioned binary encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    /// Decodes [`PeerDesc::to_bytes`] output of this or an earlier version
    /// (versions 1 and 2 share the peer layout and carry no RDMA NICs).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let (version, body) = split_versioned(b)?;
        match version {
            DESC_VERSION => decode_body(body),
            DESC_VERSION_MIN..DESC_VERSION => Ok(decode_body::<PeerDescV2>(body)?.into()),
            v => Err(unknown_version(v)),
        }
    }

    /// Short printable id (first 8 bytes of the engine id in hex).
    pub fn short_id(&self) -> String {
        hex_encode(&self.engine_id[..8])
    }
}

pub(crate) fn encode_versioned<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&DESC_MAGIC);
    out.extend_from_slice(&DESC_VERSION.to_le_bytes());
    // Serialising plain structs into a Vec cannot fail.
    out.extend_from_slice(&postcard::to_allocvec(v).unwrap_or_default());
    out
}

/// Checks size and magic; returns the version and the body.
pub(crate) fn split_versioned(b: &[u8]) -> Result<(u16, &[u8])> {
    if b.len() > MAX_DESC_BYTES {
        return Err(Error::BadDescriptor(format!(
            "{} bytes, more than the {MAX_DESC_BYTES} allowed",
            b.len()
        )));
    }
    if b.len() < 4 || b[..2] != DESC_MAGIC {
        return Err(Error::BadDescriptor(
            "not a kvmesh descriptor (bad magic)".into(),
        ));
    }
    Ok((u16::from_le_bytes([b[2], b[3]]), &b[4..]))
}

pub(crate) fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    postcard::from_bytes(body).map_err(|e| Error::BadDescriptor(format!("decode: {e}")))
}

pub(crate) fn unknown_version(v: u16) -> Error {
    Error::BadDescriptor(format!(
        "descriptor version {v}, this build understands {DESC_VERSION_MIN} to {DESC_VERSION}"
    ))
}

/// This machine's identity (boot id), shared by every network namespace:
/// what CUDA IPC needs, where `shm` needs [`local_host_id`].
pub fn machine_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-boot".into())
}

pub(crate) fn hex_encode(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(HEX[(x >> 4) as usize] as char);
        s.push(HEX[(x & 15) as usize] as char);
    }
    s
}

pub(crate) fn hex_decode(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2 * MAX_DESC_BYTES {
        return Err(Error::BadDescriptor(
            "hex text of odd or excessive length".into(),
        ));
    }
    let nib = |c: u8| -> Result<u8> {
        match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(Error::BadDescriptor(format!(
                "non-hex character {:?}",
                c as char
            ))),
        }
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Ok(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

/// This process's host identity: boot id plus network-namespace inode, so two
/// processes in different namespaces of one machine count as different hosts
/// (they cannot reach each other's abstract unix sockets).
pub fn local_host_id() -> String {
    use std::os::unix::fs::MetadataExt;
    let boot = machine_id();
    let netns = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    format!("{boot}/{netns}")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn sample() -> PeerDesc {
        PeerDesc {
            engine_id: [7; 16],
            host_id: local_host_id(),
            tcp: vec!["127.0.0.1:4000".parse().unwrap()],
            shm: Some("kvmesh-x".into()),
            tcp_conns: 2,
            secret: [9; 32],
            rdma: None,
        }
    }

    fn with_rdma() -> PeerDesc {
        use crate::rdma_wire::{LinkLayer, Mtu, NicDesc, RdmaPeerDesc, RDMA_DESC_VERSION};
        PeerDesc {
            rdma: Some(RdmaPeerDesc {
                version: RDMA_DESC_VERSION,
                incarnation: 77,
                nics: vec![NicDesc {
                    name: "mlx5_0".into(),
                    port_num: 1,
                    link_layer: LinkLayer::Ethernet,
                    lid: 0,
                    gid: [0xfe; 16],
                    mtu: Mtu::M4096,
                }],
            }),
            ..sample()
        }
    }

    /// Encodes `d` the way a build of descriptor version 2 did.
    pub(crate) fn encode_v2(d: &PeerDesc) -> Vec<u8> {
        let v2 = PeerDescV2 {
            engine_id: d.engine_id,
            host_id: d.host_id.clone(),
            tcp: d.tcp.clone(),
            shm: d.shm.clone(),
            tcp_conns: d.tcp_conns,
            secret: d.secret,
        };
        let mut b = DESC_MAGIC.to_vec();
        b.extend_from_slice(&2u16.to_le_bytes());
        b.extend_from_slice(&postcard::to_allocvec(&v2).unwrap());
        b
    }

    #[test]
    fn roundtrip_and_version_check() {
        let d = sample();
        let b = d.to_bytes();
        assert_eq!(PeerDesc::from_bytes(&b).unwrap(), d);
        let mut wrong = b.clone();
        wrong[2] = 99;
        let err = PeerDesc::from_bytes(&wrong).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");
        assert!(PeerDesc::from_bytes(&b[..3]).is_err());
        assert!(PeerDesc::from_bytes(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn peer_desc_of_versions_1_and_2_still_decode_without_rdma() {
        // What builds before RDMA sent: the same bytes under version 1 or 2.
        let d = sample();
        let mut b = encode_v2(&d);
        assert_eq!(PeerDesc::from_bytes(&b).unwrap(), d);
        b[2..4].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(PeerDesc::from_bytes(&b).unwrap(), d);
        // An old descriptor of an engine says nothing about RDMA even when
        // this build has it.
        assert_eq!(
            PeerDesc::from_bytes(&encode_v2(&with_rdma())).unwrap().rdma,
            None
        );
        b[2..4].copy_from_slice(&4u16.to_le_bytes());
        let e = PeerDesc::from_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("version 4") && e.contains("1 to 3"), "{e}");
    }

    #[test]
    fn rdma_nics_round_trip_in_every_build() {
        let d = with_rdma();
        let b = d.to_bytes();
        assert_eq!(u16::from_le_bytes([b[2], b[3]]), 3);
        assert_eq!(PeerDesc::from_bytes(&b).unwrap(), d);
        // Without RDMA the version-3 layout still decodes, to `None`.
        let plain = sample().to_bytes();
        assert_eq!(PeerDesc::from_bytes(&plain).unwrap().rdma, None);
        // The RDMA part is a trailing option: one byte when absent.
        assert_eq!(plain.len(), encode_v2(&sample()).len() + 1);
        assert!(format!("{d:?}").contains("rdma: Some(1)"));
    }

    #[test]
    fn hex_roundtrip_and_garbage() {
        let b = sample().to_bytes();
        assert_eq!(hex_decode(&hex_encode(&b)).unwrap(), b);
        assert!(hex_decode("zz").is_err());
        assert!(hex_decode("abc").is_err());
    }

    #[test]
    fn debug_hides_secret() {
        let s = format!("{:?}", sample());
        assert!(s.contains("redacted") && !s.contains("9, 9"));
    }
}
