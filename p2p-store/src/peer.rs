//! Peer identity as the protocol core sees it: an opaque, bounded byte
//! string.
//!
//! The network layer fills it with the bytes of a libp2p `PeerId`; nothing
//! here interprets them. Ordering and hashing are over the raw bytes, so
//! every peer sorts and places the same ids the same way.
//!
//! Must not depend on: libp2p or any networking crate.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// Longest accepted peer id, in bytes. A libp2p id is a multihash of at most
/// about 50 bytes; the margin leaves room without letting a peer send
/// megabytes as its name.
pub const MAX_PEER_ID_LEN: usize = 128;

/// Opaque peer identifier, 1 to [`MAX_PEER_ID_LEN`] bytes. Cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(Arc<[u8]>);

impl PeerId {
    /// Wraps `bytes`, refusing empty or over-long ids.
    pub fn from_bytes(bytes: &[u8]) -> Result<PeerId, Error> {
        if bytes.is_empty() || bytes.len() > MAX_PEER_ID_LEN {
            return Err(Error::InvalidArgument(format!(
                "peer id must be 1..={MAX_PEER_ID_LEN} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(PeerId(Arc::from(bytes)))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for PeerId {
    /// The last 6 bytes: libp2p ids share their leading multihash header, so
    /// the tail is what tells them apart.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tail = &self.0[self.0.len().saturating_sub(6)..];
        if tail.len() < self.0.len() {
            write!(f, "PeerId(..{})", hex::encode(tail))
        } else {
            write!(f, "PeerId({})", hex::encode(tail))
        }
    }
}

impl FromStr for PeerId {
    type Err = Error;

    fn from_str(s: &str) -> Result<PeerId, Error> {
        let bytes =
            hex::decode(s).map_err(|e| Error::InvalidArgument(format!("peer id hex: {e}")))?;
        PeerId::from_bytes(&bytes)
    }
}

impl Serialize for PeerId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

struct PeerIdVisitor;

impl<'de> Visitor<'de> for PeerIdVisitor {
    type Value = PeerId;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "1..={MAX_PEER_ID_LEN} bytes of peer id")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<PeerId, E> {
        PeerId::from_bytes(v).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PeerId, A::Error> {
        let mut buf = Vec::new();
        while let Some(b) = seq.next_element::<u8>()? {
            if buf.len() == MAX_PEER_ID_LEN {
                return Err(de::Error::custom("peer id too long"));
            }
            buf.push(b);
        }
        PeerId::from_bytes(&buf).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for PeerId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PeerId, D::Error> {
        if deserializer.is_human_readable() {
            let s = String::deserialize(deserializer)?;
            s.parse().map_err(de::Error::custom)
        } else {
            deserializer.deserialize_bytes(PeerIdVisitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced() {
        assert!(PeerId::from_bytes(&[]).is_err());
        assert!(PeerId::from_bytes(&[1; MAX_PEER_ID_LEN]).is_ok());
        assert!(PeerId::from_bytes(&[1; MAX_PEER_ID_LEN + 1]).is_err());
    }

    #[test]
    fn hex_and_serde_round_trip() {
        let id = PeerId::from_bytes(&[0, 36, 8, 1, 18, 32, 9, 9, 9, 9, 9, 9, 0xfe]).unwrap();
        assert_eq!(id.to_string().parse::<PeerId>().unwrap(), id);
        let bin = postcard::to_stdvec(&id).unwrap();
        assert_eq!(bin.len(), 1 + id.as_bytes().len());
        assert_eq!(postcard::from_bytes::<PeerId>(&bin).unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<PeerId>(&json).unwrap(), id);
        assert_eq!(format!("{id:?}"), "PeerId(..0909090909fe)");
    }

    #[test]
    fn oversized_id_on_the_wire_is_rejected() {
        let long = vec![7u8; MAX_PEER_ID_LEN + 1];
        let bin = postcard::to_stdvec(&serde_bytes_like(&long)).unwrap();
        assert!(postcard::from_bytes::<PeerId>(&bin).is_err());
        let empty = postcard::to_stdvec(&serde_bytes_like(&[])).unwrap();
        assert!(postcard::from_bytes::<PeerId>(&empty).is_err());
    }

    /// Encodes raw bytes the way `PeerId` does, bypassing its length check.
    fn serde_bytes_like(bytes: &[u8]) -> RawBytes<'_> {
        RawBytes(bytes)
    }

    struct RawBytes<'a>(&'a [u8]);

    impl Serialize for RawBytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }
}
