//! Object keys and checksums.
//!
//! * [`ObjectKey`]: the 256-bit name of an immutable object. KV blocks are
//!   keyed by the chained prefix hash the plugin computes; other objects can
//!   use [`ObjectKey::for_content`]. 256 bits rather than 128 so that a
//!   birthday collision stays out of reach even for a peer that crafts keys.
//! * [`Checksum`]: the full 32-byte BLAKE3 hash of an object's bytes (the
//!   same hash the transfer engine uses), stored with every object and
//!   checked on every read. It is not truncated: 32 bytes per object is
//!   cheap next to KV blocks of tens of KiB or more.
//!
//! Both print as 64 lowercase hex digits, parse from hex, and serialise as
//! a hex string in human-readable formats (JSON) and as 32 raw bytes in
//! binary ones (postcard).
//!
//! Must not depend on: networking, async runtimes, the clock.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::Error;

/// Context string for [`ObjectKey::for_content`] (BLAKE3 derive-key mode, so
/// a content key never equals the plain checksum of the same bytes).
const CONTENT_KEY_CONTEXT: &str = "kvmesh p2p-store object key v1";

macro_rules! hash32_type {
    ($name:ident) => {
        impl $name {
            /// Length in bytes.
            pub const LEN: usize = 32;

            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            /// Builds one from a slice that must be exactly 32 bytes long.
            pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
                let arr: [u8; 32] = bytes.try_into().map_err(|_| {
                    Error::InvalidArgument(format!(
                        "{} needs 32 bytes, got {}",
                        stringify!($name),
                        bytes.len()
                    ))
                })?;
                Ok(Self(arr))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; 64];
                // Encoding 32 bytes into a 64-byte buffer cannot fail.
                hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
                // Hex digits are ASCII.
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(
                    f,
                    concat!(stringify!($name), "({})"),
                    hex::encode(&self.0[..8])
                )
            }
        }

        impl FromStr for $name {
            type Err = Error;

            fn from_str(s: &str) -> Result<Self, Error> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "{} must be 64 hex digits: {e}",
                        stringify!($name)
                    ))
                })?;
                Ok(Self(out))
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.collect_str(self)
                } else {
                    self.0.serialize(serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let s = String::deserialize(deserializer)?;
                    s.parse().map_err(serde::de::Error::custom)
                } else {
                    <[u8; 32]>::deserialize(deserializer).map(Self)
                }
            }
        }
    };
}

/// The name of an immutable object: 32 bytes, normally a hash of what the
/// object contains (or, for KV blocks, of the token prefix it caches).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey([u8; 32]);

hash32_type!(ObjectKey);

impl ObjectKey {
    /// A content key: BLAKE3 in derive-key mode over `data`.
    pub fn for_content(data: &[u8]) -> ObjectKey {
        let mut hasher = blake3::Hasher::new_derive_key(CONTENT_KEY_CONTEXT);
        hasher.update(data);
        ObjectKey(*hasher.finalize().as_bytes())
    }
}

/// Integrity checksum of an object's payload, 32 bytes:
///
/// ```text
/// 0..16   XXH3-128 of the payload (little endian)
/// 16..24  payload length (little endian)
/// 24..32  algorithm tag b"kvxxh3\0\1"
/// ```
/// It guards against corruption (bit flips, torn or misplaced writes, stale
/// reuse of a pool slot), not against forgery: every byte reaches a holder
/// over an authenticated channel inside the pre-shared-key network. XXH3
/// runs at memory speed, so verifying every get costs little next to the
/// copy (BLAKE3 would add about half a millisecond per 2 MiB object on one
/// core). Keys stay BLAKE3.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum([u8; 32]);

hash32_type!(Checksum);

const CHECKSUM_TAG: [u8; 8] = *b"kvxxh3\0\x01";

fn checksum_bytes(h: u128, len: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&h.to_le_bytes());
    out[16..24].copy_from_slice(&len.to_le_bytes());
    out[24..].copy_from_slice(&CHECKSUM_TAG);
    out
}

impl Checksum {
    /// Checksums `data`.
    pub fn compute(data: &[u8]) -> Checksum {
        Checksum(checksum_bytes(
            twox_hash::XxHash3_128::oneshot(data),
            data.len() as u64,
        ))
    }

    /// Whether `data` hashes to `self`.
    pub fn matches(&self, data: &[u8]) -> bool {
        Checksum::compute(data) == *self
    }

    /// `Ok` when `data` hashes to `self`, else [`Error::ChecksumMismatch`].
    pub fn verify(&self, data: &[u8]) -> Result<(), Error> {
        let actual = Checksum::compute(data);
        if actual == *self {
            Ok(())
        } else {
            Err(Error::ChecksumMismatch {
                expected: *self,
                actual,
            })
        }
    }
}

/// Incremental checksum over data that arrives in pieces.
#[derive(Clone, Default)]
pub struct ChecksumHasher {
    state: twox_hash::XxHash3_128,
    len: u64,
}

impl std::fmt::Debug for ChecksumHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChecksumHasher")
            .field("len", &self.len)
            .finish()
    }
}

impl ChecksumHasher {
    /// A fresh hasher.
    pub fn new() -> ChecksumHasher {
        ChecksumHasher::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) -> &mut Self {
        self.state.write(data);
        self.len += data.len() as u64;
        self
    }

    /// The checksum of everything fed so far.
    pub fn finalize(&self) -> Checksum {
        Checksum(checksum_bytes(self.state.finish_128(), self.len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hex_round_trip_and_format() {
        let key = ObjectKey::from_bytes([0xab; 32]);
        let s = key.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(&s[..4], "abab");
        assert_eq!(s.parse::<ObjectKey>().unwrap(), key);
        assert_eq!(format!("{key:?}"), "ObjectKey(abababababababab)");
    }

    #[test]
    fn bad_hex_is_rejected() {
        assert!("zz".parse::<ObjectKey>().is_err());
        assert!("ab".repeat(31).parse::<ObjectKey>().is_err());
        assert!("ab".repeat(33).parse::<Checksum>().is_err());
        assert!(ObjectKey::from_slice(&[0; 31]).is_err());
        assert!(ObjectKey::from_slice(&[0; 32]).is_ok());
    }

    #[test]
    fn serde_binary_is_32_raw_bytes_and_json_is_hex() {
        let key = ObjectKey::for_content(b"hello");
        let bin = postcard::to_stdvec(&key).unwrap();
        assert_eq!(bin.len(), 32);
        assert_eq!(postcard::from_bytes::<ObjectKey>(&bin).unwrap(), key);
        let json = serde_json::to_string(&key).unwrap();
        assert_eq!(json, format!("\"{key}\""));
        assert_eq!(serde_json::from_str::<ObjectKey>(&json).unwrap(), key);
        assert!(serde_json::from_str::<ObjectKey>("\"00\"").is_err());
    }

    #[test]
    fn content_key_differs_from_checksum() {
        let data = b"some kv block";
        assert_ne!(
            ObjectKey::for_content(data).as_bytes(),
            Checksum::compute(data).as_bytes()
        );
    }

    #[test]
    fn checksum_detects_a_flipped_bit() {
        let mut data = vec![7u8; 4096];
        let sum = Checksum::compute(&data);
        assert!(sum.matches(&data));
        assert!(sum.verify(&data).is_ok());
        data[1234] ^= 0x10;
        assert!(!sum.matches(&data));
        assert!(matches!(
            sum.verify(&data),
            Err(Error::ChecksumMismatch { expected, .. }) if expected == sum
        ));
    }

    #[test]
    fn incremental_hash_equals_one_shot() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut h = ChecksumHasher::new();
        for chunk in data.chunks(777) {
            h.update(chunk);
        }
        assert_eq!(h.finalize(), Checksum::compute(&data));
    }

    /// The checksum format is stored (SSD files, commits on other peers):
    /// its hash must stay the reference XXH3-128 (values from the reference
    /// implementation, seed 0, default secret).
    #[test]
    fn checksum_is_reference_xxh3_128() {
        let big: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for (data, want) in [
            (&b""[..], 0x99aa06d3014798d86001c324468d497fu128),
            (&b"kvmesh"[..], 0xbab7ac139309da62115d45f3d6a592f2),
            (&big[..], 0x48029c5ca2eb3748ae771702cc2e882f),
        ] {
            assert_eq!(
                Checksum::compute(data).as_bytes()[..16],
                want.to_le_bytes(),
                "{} bytes",
                data.len()
            );
            let mut h = ChecksumHasher::new();
            for piece in data.chunks(65_537) {
                h.update(piece);
            }
            assert_eq!(h.finalize(), Checksum::compute(data));
        }
    }

    proptest! {
        #[test]
        fn any_key_round_trips(bytes in any::<[u8; 32]>()) {
            let key = ObjectKey::from_bytes(bytes);
            prop_assert_eq!(key.to_string().parse::<ObjectKey>().unwrap(), key);
            let bin = postcard::to_stdvec(&key).unwrap();
            prop_assert_eq!(postcard::from_bytes::<ObjectKey>(&bin).unwrap(), key);
        }
    }
}
