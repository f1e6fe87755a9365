//! Errors of expert-parallel operations. Every failure caused by another
//! rank names that rank, so the caller knows whom to leave out when it
//! rebuilds the group.

use std::time::Duration;

use kvmesh_gpu::ErrorKind;

/// Errors returned by [`crate::EpGroup`] and the rendezvous.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or the group's shape is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An argument does not fit the group (shape, routing, handle).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// `rank` did not deliver its part of an operation before the deadline.
    #[error("rank {rank} did not answer {op} #{seq} within {waited:?} (also missing: {others:?})")]
    PeerTimeout {
        rank: usize,
        op: &'static str,
        seq: u64,
        waited: Duration,
        /// Further ranks missing at the same deadline.
        others: Vec<usize>,
    },
    /// Moving bytes to `rank` failed (it died, refused, or timed out).
    #[error("{op} #{seq}: transfer to rank {rank} failed: {kind}")]
    Transfer {
        rank: usize,
        op: &'static str,
        seq: u64,
        kind: ErrorKind,
    },
    /// `rank` sent something this rank cannot accept.
    #[error("{op}: rank {rank} sent a bad message: {reason}")]
    Protocol {
        rank: usize,
        op: &'static str,
        reason: String,
    },
    /// Another rank (`reported_by`) gave up on the group because of `rank`;
    /// this rank stops waiting at once instead of running into its own
    /// timeout.
    #[error("rank {reported_by} gave up on the group because of rank {rank}")]
    PeerFailed { rank: usize, reported_by: usize },
    /// An earlier operation failed; the group must be rebuilt.
    #[error("the group is unusable after an earlier failure ({0}); rebuild it")]
    Broken(String),
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    #[error("engine: {0}")]
    Engine(#[from] kvmesh_gpu::Error),
}

impl Error {
    /// The rank this error blames, if any.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Error::PeerTimeout { rank, .. }
            | Error::Transfer { rank, .. }
            | Error::Protocol { rank, .. }
            | Error::PeerFailed { rank, .. } => Some(*rank),
            _ => None,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
