//! The crate's error type.
//!
//! One enum for every failure of the protocol core, the allocator, the SSD
//! tier and the wire decoders. [`Error::kind`] gives a small, serialisable
//! [`ErrorKind`] that an RPC reply can carry to the remote side, so a remote
//! caller can tell "try again later" from "never going to work" without
//! seeing our internals.
//!
//! Must not depend on: networking or async crates.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::key::{Checksum, ObjectKey};

/// Everything that can go wrong in the peer store's core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Not enough room in the DRAM pool (or SSD tier) right now; eviction
    /// may make room.
    #[error("no space: {needed} bytes needed, {free} bytes free")]
    NoSpace {
        /// Bytes the request needed.
        needed: u64,
        /// Bytes free when it was refused.
        free: u64,
    },
    /// The object is larger than this store accepts at all.
    #[error("object of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Requested length.
        len: u64,
        /// Largest accepted length.
        limit: u64,
    },
    /// The object is not held here.
    #[error("object {0} not found")]
    NotFound(ObjectKey),
    /// The object is already committed here (puts are idempotent: a caller
    /// may treat this as success).
    #[error("object {0} already exists")]
    AlreadyExists(ObjectKey),
    /// The object is held only on the SSD tier; it must be promoted to DRAM
    /// before it can be leased.
    #[error("object {0} is on SSD only; promote it first")]
    NotResident(ObjectKey),
    /// The object is in a transition (promotion or spill) that blocks this
    /// request for a moment.
    #[error("object {0} is busy")]
    Busy(ObjectKey),
    /// No reservation with this id (never existed, committed, aborted or
    /// expired and collected).
    #[error("unknown reservation {0}")]
    UnknownReservation(u64),
    /// The reservation outlived its deadline.
    #[error("reservation {0} expired")]
    ReservationExpired(u64),
    /// No lease with this id.
    #[error("unknown lease {0}")]
    UnknownLease(u64),
    /// A reservation or lease was used by a peer other than the one it was
    /// granted to.
    #[error("reservation or lease {0} belongs to another peer")]
    NotOwner(u64),
    /// A bounded table is full (reservations, leases, members, hard pins).
    #[error("limit reached: {what} (max {max})")]
    LimitExceeded {
        /// Which limit.
        what: &'static str,
        /// The limit.
        max: u64,
    },
    /// Data did not match its checksum.
    #[error("checksum mismatch: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The checksum the object was stored with.
        expected: Checksum,
        /// The checksum of the bytes actually seen.
        actual: Checksum,
    },
    /// Stored data is damaged (bad header, wrong length, bad checksum).
    #[error("corrupt data in {path}: {reason}")]
    Corrupt {
        /// The file holding it.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A wire message used a version this build does not speak.
    #[error("unsupported message version {found} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version found in the message.
        found: u16,
        /// Version this build encodes.
        supported: u16,
    },
    /// A wire message was malformed or broke a size limit.
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// A configuration value makes no sense.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An argument was outside what the call accepts.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A peer answered a request with an error, or could not be reached.
    #[error("remote {kind:?}: {message}")]
    Remote {
        /// What kind of failure.
        kind: ErrorKind,
        /// The peer's (or transport's) message.
        message: String,
    },
    /// This peer could not join the swarm (nothing reachable, or every
    /// handshake refused, e.g. another pre-shared key).
    #[error("cannot join the swarm: {0}")]
    NotJoined(String),
    /// A file-system operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// The shape of an [`Error`] that crosses the wire in an RPC reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// See [`Error::NoSpace`].
    NoSpace,
    /// See [`Error::TooLarge`].
    TooLarge,
    /// See [`Error::NotFound`].
    NotFound,
    /// See [`Error::AlreadyExists`].
    AlreadyExists,
    /// See [`Error::NotResident`].
    NotResident,
    /// See [`Error::Busy`].
    Busy,
    /// Unknown, expired or foreign reservation or lease.
    BadHandle,
    /// See [`Error::LimitExceeded`].
    LimitExceeded,
    /// Checksum mismatch or corrupt data.
    Integrity,
    /// Malformed, oversized or wrong-version message, or invalid argument.
    Invalid,
    /// Local I/O failure or configuration problem on the serving peer.
    Internal,
}

impl ErrorKind {
    /// Whether sending the same request to the same peer later may succeed.
    ///
    /// This is not the fail-over decision: a `get` that hits `NotFound` or
    /// `Integrity` on one replica should still try the next replica.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::NoSpace
                | ErrorKind::NotResident
                | ErrorKind::Busy
                | ErrorKind::LimitExceeded
                | ErrorKind::Internal
        )
    }
}

impl Error {
    /// The wire-level kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NoSpace { .. } => ErrorKind::NoSpace,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::AlreadyExists(_) => ErrorKind::AlreadyExists,
            Error::NotResident(_) => ErrorKind::NotResident,
            Error::Busy(_) => ErrorKind::Busy,
            Error::UnknownReservation(_)
            | Error::ReservationExpired(_)
            | Error::UnknownLease(_)
            | Error::NotOwner(_) => ErrorKind::BadHandle,
            Error::LimitExceeded { .. } => ErrorKind::LimitExceeded,
            Error::ChecksumMismatch { .. } | Error::Corrupt { .. } => ErrorKind::Integrity,
            Error::UnsupportedVersion { .. }
            | Error::InvalidMessage(_)
            | Error::InvalidArgument(_) => ErrorKind::Invalid,
            Error::InvalidConfig(_) | Error::Io { .. } | Error::NotJoined(_) => ErrorKind::Internal,
            Error::Remote { kind, .. } => *kind,
        }
    }

    /// Whether sending the same request to the same peer later may succeed
    /// (see [`ErrorKind::is_retryable`]).
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_split() {
        let key = ObjectKey::from_bytes([1; 32]);
        assert!(Error::NoSpace { needed: 1, free: 0 }.is_retryable());
        assert!(Error::Busy(key).is_retryable());
        assert!(Error::NotResident(key).is_retryable());
        assert!(!Error::NotFound(key).is_retryable());
        assert!(!Error::AlreadyExists(key).is_retryable());
        assert!(!Error::UnknownLease(3).is_retryable());
        assert!(!Error::InvalidMessage("x".into()).is_retryable());
        let mismatch = Error::ChecksumMismatch {
            expected: Checksum::compute(b"a"),
            actual: Checksum::compute(b"b"),
        };
        assert_eq!(mismatch.kind(), ErrorKind::Integrity);
        assert!(!mismatch.is_retryable());
    }

    #[test]
    fn kind_round_trips_on_the_wire() {
        for kind in [
            ErrorKind::NoSpace,
            ErrorKind::BadHandle,
            ErrorKind::Integrity,
        ] {
            let bytes = postcard::to_stdvec(&kind).unwrap();
            assert_eq!(postcard::from_bytes::<ErrorKind>(&bytes).unwrap(), kind);
        }
    }
}
