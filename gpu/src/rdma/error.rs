//! Errors of the RDMA transport.
//!
//! [`RdmaError`] is self-contained (the engine's error type is not used
//! here); [`RdmaError::kind`] classifies every variant into the engine's
//! [`ErrorKind`] so the engine can put it into per-operation status.

use std::io;

use crate::ErrorKind;

use super::qp::QpState;

/// Errors returned by the RDMA transport.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No RDMA device can be used on this machine: the kernel has no RDMA
    /// support, no NIC is present, or none has an active port.
    #[error("no RDMA devices: {reason}")]
    NoDevices {
        /// Why none was found (the errno text of the device query, or what
        /// was filtered out).
        reason: String,
    },
    /// A NIC named in the configuration is not present.
    #[error("RDMA device {0:?} not found")]
    UnknownDevice(String),
    /// A verbs call failed.
    #[error("{call} on {device}: {source}")]
    Verbs {
        /// The verbs function that failed.
        call: &'static str,
        /// The NIC it was called on.
        device: String,
        /// errno of the call.
        #[source]
        source: io::Error,
    },
    /// No GID on the port fits the link layer (RoCE without an IP
    /// address on its netdev, for instance).
    #[error("no usable GID on {device} port {port}")]
    NoGid {
        /// The NIC.
        device: String,
        /// The port number (1-based).
        port: u8,
    },
    /// A queue pair was asked for a state change the verbs state machine
    /// does not allow.
    #[error("invalid QP state transition {from:?} -> {to:?}")]
    BadTransition {
        /// The state it is in.
        from: QpState,
        /// The state requested.
        to: QpState,
    },
    /// The peer's endpoint cannot be connected to ours (link layers differ,
    /// QP counts differ, malformed GID).
    #[error("incompatible remote endpoint: {0}")]
    Endpoint(String),
    /// A caller-supplied argument is invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// An operation falls outside its registered region.
    #[error("{what}: offset {offset} + len {len} exceeds region length {region_len}")]
    OutOfBounds {
        /// Which side of the operation.
        what: &'static str,
        /// Offset of the operation inside the region.
        offset: u64,
        /// Length of the operation.
        len: u64,
        /// Length of the region.
        region_len: u64,
    },
    /// No send-queue slot (or notification credit) is free; retry after
    /// completions have been polled.
    #[error("no free work-request slot: {0}")]
    Busy(String),
    /// The peer is not connected (never, or torn down after a failure).
    #[error("peer {0} not connected over RDMA")]
    NotConnected(u64),
    /// A work completion reported an error.
    #[error(
        "work completion {status_name} (status {status}, vendor {vendor_err:#x}) for wr {wr_id}"
    )]
    Completion {
        /// `ibv_wc_status` value.
        status: u32,
        /// Its symbolic name.
        status_name: &'static str,
        /// The work request it completed.
        wr_id: u64,
        /// Vendor syndrome.
        vendor_err: u32,
        /// The engine classification.
        kind: ErrorKind,
    },
    /// The peer sent something the protocol does not allow (notification
    /// sequence gap, unknown immediate).
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl RdmaError {
    pub(crate) fn verbs(call: &'static str, device: &str, source: io::Error) -> Self {
        RdmaError::Verbs {
            call,
            device: device.to_owned(),
            source,
        }
    }

    /// The engine's classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RdmaError::NoDevices { .. } | RdmaError::UnknownDevice(_) | RdmaError::NoGid { .. } => {
                ErrorKind::Unreachable
            }
            RdmaError::Verbs { .. } => ErrorKind::Io,
            RdmaError::BadTransition { .. } | RdmaError::Invalid(_) => ErrorKind::Invalid,
            RdmaError::Endpoint(_) | RdmaError::Protocol(_) => ErrorKind::Protocol,
            RdmaError::OutOfBounds { .. } => ErrorKind::OutOfBounds,
            RdmaError::Busy(_) => ErrorKind::Busy,
            RdmaError::NotConnected(_) => ErrorKind::ConnectionLost,
            RdmaError::Completion { kind, .. } => *kind,
        }
    }
}

/// Result alias of the RDMA transport.
pub type Result<T, E = RdmaError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_engine_classification() {
        let no_dev = RdmaError::NoDevices { reason: "x".into() };
        assert_eq!(no_dev.kind(), ErrorKind::Unreachable);
        assert!(!no_dev.kind().is_retryable());
        assert_eq!(RdmaError::Busy("sq".into()).kind(), ErrorKind::Busy);
        assert_eq!(RdmaError::NotConnected(3).kind(), ErrorKind::ConnectionLost);
        let e = RdmaError::verbs("ibv_reg_mr", "mlx5_0", io::Error::from_raw_os_error(12));
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("ibv_reg_mr on mlx5_0"));
    }
}
