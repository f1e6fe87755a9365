//! Store RPC messages: the hot-path protocol between a client and a holder.
//!
//! These travel over the transfer engine's authenticated data-plane channel
//! ([`kvmesh_gpu::Engine::call`]: the `shm` control socket on one host, a TCP
//! lane otherwise), not over libp2p request-response: a put or get needs one
//! or two of them per object, and the data-plane round trip costs tens of
//! microseconds where a libp2p stream over noise+yamux costs hundreds (see
//! the crate README for the measurements). libp2p carries membership,
//! provider records and the join handshake (`NetRequest`).
//!
//! ```text
//! put: Reserve ─► (engine WRITE into the holder's pool) ─► Commit{checksum, holders}
//! get: Lease ─► (engine READ from the holder's pool) ─► verify ─► Release
//! get: Fetch ─► (the bytes follow the reply, sent from the pool) ─► verify ─► Release
//! ```
//! A `Fetch` travels with [`kvmesh_gpu::Engine::call_bulk`]: the holder
//! answers with a lease and the object's bytes straight from its pool, and
//! the client receives them into its destination, so a get costs one round
//! trip and no copy besides the socket's.
//! Every message starts with a version; decoding is bounded by the engine's
//! 1 MiB call limit and rejects trailing bytes.

use serde::{Deserialize, Serialize};

use crate::error::ErrorKind;
use crate::key::{Checksum, ObjectKey};
use crate::peer::PeerId;

/// Version of [`Request`]/[`Response`].
pub const RPC_VERSION: u16 = 2;
/// Most keys in one batched request.
pub const MAX_BATCH_KEYS: usize = 4096;

/// How an object is protected from eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PinWire {
    #[default]
    None,
    Soft,
    Hard,
}

/// A request to a holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Reserve `len` bytes for `key` for `ttl_ms`.
    Reserve {
        key: ObjectKey,
        len: u64,
        ttl_ms: u64,
    },
    /// Commit a reservation whose bytes have been written.
    Commit {
        key: ObjectKey,
        reservation: u64,
        checksum: Checksum,
        pin: PinWire,
        ttl_ms: Option<u64>,
        replication: u8,
        holders: Vec<PeerId>,
    },
    /// Give a reservation back.
    Abort { reservation: u64 },
    /// Lease each key for `duration_ms` (batched).
    Lease {
        keys: Vec<ObjectKey>,
        duration_ms: u64,
        /// Leases of the same owner to end first (deferred releases).
        release: Vec<u64>,
    },
    /// Lease one key for `duration_ms` and send its bytes after the reply
    /// ([`Response::Fetched`], only with `Engine::call_bulk`) when it has at
    /// most `max_len` bytes; a larger object is answered as a plain lease
    /// ([`Response::Leases`]), a failure as in `Lease`.
    Fetch {
        key: ObjectKey,
        duration_ms: u64,
        /// Leases of the same owner to end first (deferred releases).
        release: Vec<u64>,
        max_len: u64,
    },
    /// End leases (batched).
    Release { leases: Vec<u64> },
    /// Which of these keys are held here (batched).
    Contains { keys: Vec<ObjectKey> },
    /// Drop an object.
    Remove { key: ObjectKey },
    /// Record the replica set of an object after a repair.
    SetHolders {
        key: ObjectKey,
        replication: u8,
        holders: Vec<PeerId>,
    },
    /// Pin or unpin an object.
    SetPin { key: ObjectKey, pin: PinWire },
    /// The holder's figures.
    Stat,
    /// The holder's same-host location table ([`crate::shm_index`]).
    LocationTable,
}

/// A holder's figures, answered to [`Request::Stat`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderStat {
    pub objects: u64,
    pub bytes_stored: u64,
    pub capacity: u64,
    pub ssd_objects: u64,
    pub ssd_bytes: u64,
    pub evictions: u64,
    pub spills: u64,
    pub repairs: u64,
    pub rpc_served: u64,
    /// Leases outstanding on this holder.
    pub leases: u64,
    /// Reservations outstanding on this holder.
    pub reservations: u64,
    /// Stored copies found damaged here.
    pub integrity_failures: u64,
}

/// Where a leased object is in the holder's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub lease: u64,
    pub offset: u64,
    pub len: u64,
    pub checksum: Checksum,
}

/// A holder's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Reserved {
        reservation: u64,
        offset: u64,
    },
    Done,
    /// One entry per requested key: the grant, or why not.
    Leases(Vec<Result<Grant, ErrorKind>>),
    Flags(Vec<bool>),
    Stat(HolderStat),
    /// The answer to [`Request::Fetch`]: the object's `grant.len` bytes
    /// follow, under this lease.
    Fetched {
        grant: Grant,
    },
    /// A location table: its region descriptor (empty: none) and buckets.
    LocationTable {
        desc: Vec<u8>,
        buckets: u32,
    },
    /// The request failed as a whole.
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u16,
    body: T,
}

/// Encodes a message with its version.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    postcard::to_allocvec(&Envelope {
        version: RPC_VERSION,
        body,
    })
    .unwrap_or_default()
}

/// Decodes a message, refusing other versions, oversized batches and
/// trailing bytes.
pub fn decode<T: for<'de> Deserialize<'de> + Batched>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() < 2 {
        return Err("empty message".into());
    }
    let (env, rest): (Envelope<T>, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|e| format!("malformed message: {e}"))?;
    if env.version != RPC_VERSION {
        return Err(format!(
            "message version {}, this build speaks {RPC_VERSION}",
            env.version
        ));
    }
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes", rest.len()));
    }
    if env.body.batch_len() > MAX_BATCH_KEYS {
        return Err(format!(
            "batch of {} keys exceeds {MAX_BATCH_KEYS}",
            env.body.batch_len()
        ));
    }
    Ok(env.body)
}

/// Size of the batch a message carries (for the decode limit).
pub trait Batched {
    fn batch_len(&self) -> usize;
}

impl Batched for Request {
    fn batch_len(&self) -> usize {
        match self {
            Request::Lease { keys, release, .. } => keys.len().max(release.len()),
            Request::Fetch { release, .. } => release.len(),
            Request::Contains { keys } => keys.len(),
            Request::Release { leases } => leases.len(),
            Request::Commit { holders, .. } | Request::SetHolders { holders, .. } => holders.len(),
            _ => 0,
        }
    }
}

impl Batched for Response {
    fn batch_len(&self) -> usize {
        match self {
            Response::Leases(v) => v.len(),
            Response::Flags(v) => v.len(),
            _ => 0,
        }
    }
}

/// Requests over libp2p request-response (join and discovery, not the hot path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetRequest {
    /// Send me the announces of every live member you know (yours included).
    Members,
}

impl Batched for NetRequest {
    fn batch_len(&self) -> usize {
        0
    }
}

/// Answers over libp2p request-response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetResponse {
    /// Encoded [`crate::Announce`]s.
    Members(Vec<Vec<u8>>),
    Error(String),
}

impl Batched for NetResponse {
    fn batch_len(&self) -> usize {
        match self {
            NetResponse::Members(v) => v.len(),
            NetResponse::Error(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_limits() {
        let r = Request::Lease {
            keys: vec![ObjectKey::for_content(b"a")],
            duration_ms: 5,
            release: vec![7, 9],
        };
        let b = encode(&r);
        assert_eq!(decode::<Request>(&b).unwrap(), r);
        let mut trailing = b.clone();
        trailing.push(0);
        assert!(decode::<Request>(&trailing)
            .unwrap_err()
            .contains("trailing"));
        let mut wrong = b.clone();
        wrong[0] = 9;
        assert!(decode::<Request>(&wrong).unwrap_err().contains("version"));
        let big = Request::Contains {
            keys: vec![ObjectKey::for_content(b"x"); MAX_BATCH_KEYS + 1],
        };
        assert!(decode::<Request>(&encode(&big))
            .unwrap_err()
            .contains("exceeds"));
        assert!(decode::<Request>(&[]).is_err());
        // Random garbage never panics.
        for i in 0..2000u32 {
            let g: Vec<u8> = (0..(i % 97))
                .map(|j| (j.wrapping_mul(31) ^ i) as u8)
                .collect();
            let _ = decode::<Request>(&g);
            let _ = decode::<Response>(&g);
        }
    }
}
