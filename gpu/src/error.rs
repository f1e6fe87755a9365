//! Errors of the transfer engine.
//!
//! [`Error`] is what engine calls return; [`ErrorKind`] is the small `Copy`
//! classification carried in per-operation status and across the wire, so a
//! remote refusal arrives as the same kind the local check would produce.

use std::io;

/// Classification of a failure, carried per operation and on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorKind {
    /// The batch deadline passed before the operation completed.
    Timeout = 1,
    /// The batch was cancelled by the caller.
    Cancelled = 2,
    /// The request fell outside the registered region (offset or length).
    OutOfBounds = 3,
    /// The remote peer does not know (or no longer has) the region.
    UnknownRegion = 4,
    /// The connection to the peer broke (peer died, reset, closed).
    ConnectionLost = 5,
    /// The peer refused our credentials, or we refused its.
    AuthFailed = 6,
    /// A malformed or unexpected message.
    Protocol = 7,
    /// The chosen transport cannot reach this region (e.g. `shm` to memory
    /// that is not shareable).
    Unreachable = 8,
    /// Invalid argument supplied by the caller.
    Invalid = 9,
    /// An operating-system error on the local side.
    Io = 10,
    /// The peer is busy (queue full); the operation may be retried.
    Busy = 11,
}

impl ErrorKind {
    /// Whether repeating the operation (possibly on another replica or after
    /// reconnecting) can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Timeout | ErrorKind::ConnectionLost | ErrorKind::Busy | ErrorKind::Io
        )
    }

    /// Decodes a wire status code; `None` for 0 (success) or unknown codes.
    pub fn from_code(code: u8) -> Option<ErrorKind> {
        use ErrorKind::*;
        Some(match code {
            1 => Timeout,
            2 => Cancelled,
            3 => OutOfBounds,
            4 => UnknownRegion,
            5 => ConnectionLost,
            6 => AuthFailed,
            7 => Protocol,
            8 => Unreachable,
            9 => Invalid,
            10 => Io,
            11 => Busy,
            _ => return None,
        })
    }

    /// The wire status code (never 0).
    pub fn code(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorKind::Timeout => "deadline exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::OutOfBounds => "outside the registered region",
            ErrorKind::UnknownRegion => "unknown region",
            ErrorKind::ConnectionLost => "connection to peer lost",
            ErrorKind::AuthFailed => "authentication failed",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Unreachable => "region not reachable over this transport",
            ErrorKind::Invalid => "invalid argument",
            ErrorKind::Io => "local I/O error",
            ErrorKind::Busy => "peer busy",
        };
        f.write_str(s)
    }
}

/// Errors returned by engine calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("unknown local region {0}")]
    UnknownRegion(u64),
    #[error("unknown peer {0}")]
    UnknownPeer(u64),
    #[error("unknown batch {0}")]
    UnknownBatch(u64),
    #[error("{what}: offset {offset} + len {len} exceeds region length {region_len}")]
    OutOfBounds {
        what: &'static str,
        offset: u64,
        len: u64,
        region_len: u64,
    },
    #[error("bad descriptor: {0}")]
    BadDescriptor(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// CUDA cannot be used here: no driver, no NVRTC, or a build without
    /// the `cuda` feature.
    #[error("{0}")]
    NoCuda(String),
    /// A CUDA driver or NVRTC call failed.
    #[error("CUDA call {call} failed: {message} (code {code})")]
    Cuda {
        call: &'static str,
        code: i32,
        message: String,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("region {0} still has operations in flight after the deadline")]
    RegionBusy(u64),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("transfer failed: {0}")]
    Transfer(ErrorKind),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The kind this error maps to in per-operation status.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Invalid(_) | Error::BadDescriptor(_) => ErrorKind::Invalid,
            Error::UnknownRegion(_) => ErrorKind::UnknownRegion,
            Error::UnknownPeer(_) | Error::UnknownBatch(_) => ErrorKind::Invalid,
            Error::OutOfBounds { .. } => ErrorKind::OutOfBounds,
            Error::Unsupported(_) | Error::NoCuda(_) => ErrorKind::Unreachable,
            Error::Timeout(_) => ErrorKind::Timeout,
            Error::RegionBusy(_) => ErrorKind::Busy,
            Error::Io { .. } | Error::Cuda { .. } => ErrorKind::Io,
            Error::Transfer(k) => *k,
        }
    }

    /// Whether repeating the call can succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Result alias for engine calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
