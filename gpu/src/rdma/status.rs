//! Classification of work-completion status codes into engine error kinds.
//!
//! Pure: no verbs call, only the `ibv_wc_status` constants. The mapping
//! depends on a little context the caller knows and the NIC does not
//! (whether the remote range was bounds-checked against the peer's
//! descriptor before posting, whether the queue pair was torn down on
//! purpose), see [`WcContext`].

use ibverbs::ibv_wc_status as st;

use crate::ErrorKind;

/// What the caller knows about the work request whose completion failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WcContext {
    /// The remote range was checked against the peer's region descriptor
    /// before posting. A remote access error is then a region that is gone
    /// (deregistered, or the peer restarted), not an out-of-bounds request.
    pub remote_bounds_checked: bool,
    /// The queue pair was moved to the error state locally (cancel,
    /// deadline, teardown), so flushed requests were cancelled rather than
    /// lost to a broken connection.
    pub local_abort: bool,
}

/// The engine error kind of a completion status; `None` for success.
pub fn wc_status_kind(status: u32, ctx: WcContext) -> Option<ErrorKind> {
    Some(match status {
        st::IBV_WC_SUCCESS => return None,
        // Our own request was malformed or named memory we did not register
        // (wrong lkey, length above the port maximum).
        st::IBV_WC_LOC_LEN_ERR
        | st::IBV_WC_LOC_QP_OP_ERR
        | st::IBV_WC_LOC_PROT_ERR
        | st::IBV_WC_LOC_ACCESS_ERR
        | st::IBV_WC_MW_BIND_ERR => ErrorKind::Invalid,
        st::IBV_WC_WR_FLUSH_ERR => {
            if ctx.local_abort {
                ErrorKind::Cancelled
            } else {
                ErrorKind::ConnectionLost
            }
        }
        st::IBV_WC_REM_ACCESS_ERR => {
            if ctx.remote_bounds_checked {
                ErrorKind::UnknownRegion
            } else {
                ErrorKind::OutOfBounds
            }
        }
        // The responder rejected the request as malformed (opcode not
        // enabled on its QP, length over 2^31) or answered nonsense.
        st::IBV_WC_REM_INV_REQ_ERR | st::IBV_WC_BAD_RESP_ERR => ErrorKind::Protocol,
        // The responder's QP failed, or nobody answered: the connection is
        // gone and a reconnect (or another replica) may succeed.
        st::IBV_WC_REM_OP_ERR
        | st::IBV_WC_RETRY_EXC_ERR
        | st::IBV_WC_RNR_RETRY_EXC_ERR
        | st::IBV_WC_REM_ABORT_ERR
        | st::IBV_WC_RESP_TIMEOUT_ERR => ErrorKind::ConnectionLost,
        // Reliable-datagram and tag-matching codes cannot occur on RC QPs
        // used for READ/WRITE; seeing one means the NIC and we disagree.
        st::IBV_WC_LOC_EEC_OP_ERR
        | st::IBV_WC_LOC_RDD_VIOL_ERR
        | st::IBV_WC_REM_INV_RD_REQ_ERR
        | st::IBV_WC_INV_EECN_ERR
        | st::IBV_WC_INV_EEC_STATE_ERR
        | st::IBV_WC_TM_ERR
        | st::IBV_WC_TM_RNDV_INCOMPLETE => ErrorKind::Protocol,
        // Device failure or a code newer than this table.
        _ => ErrorKind::Io,
    })
}

/// Symbolic name of a completion status, for logs and error messages.
pub fn wc_status_name(status: u32) -> &'static str {
    match status {
        st::IBV_WC_SUCCESS => "SUCCESS",
        st::IBV_WC_LOC_LEN_ERR => "LOC_LEN_ERR",
        st::IBV_WC_LOC_QP_OP_ERR => "LOC_QP_OP_ERR",
        st::IBV_WC_LOC_EEC_OP_ERR => "LOC_EEC_OP_ERR",
        st::IBV_WC_LOC_PROT_ERR => "LOC_PROT_ERR",
        st::IBV_WC_WR_FLUSH_ERR => "WR_FLUSH_ERR",
        st::IBV_WC_MW_BIND_ERR => "MW_BIND_ERR",
        st::IBV_WC_BAD_RESP_ERR => "BAD_RESP_ERR",
        st::IBV_WC_LOC_ACCESS_ERR => "LOC_ACCESS_ERR",
        st::IBV_WC_REM_INV_REQ_ERR => "REM_INV_REQ_ERR",
        st::IBV_WC_REM_ACCESS_ERR => "REM_ACCESS_ERR",
        st::IBV_WC_REM_OP_ERR => "REM_OP_ERR",
        st::IBV_WC_RETRY_EXC_ERR => "RETRY_EXC_ERR",
        st::IBV_WC_RNR_RETRY_EXC_ERR => "RNR_RETRY_EXC_ERR",
        st::IBV_WC_LOC_RDD_VIOL_ERR => "LOC_RDD_VIOL_ERR",
        st::IBV_WC_REM_INV_RD_REQ_ERR => "REM_INV_RD_REQ_ERR",
        st::IBV_WC_REM_ABORT_ERR => "REM_ABORT_ERR",
        st::IBV_WC_INV_EECN_ERR => "INV_EECN_ERR",
        st::IBV_WC_INV_EEC_STATE_ERR => "INV_EEC_STATE_ERR",
        st::IBV_WC_FATAL_ERR => "FATAL_ERR",
        st::IBV_WC_RESP_TIMEOUT_ERR => "RESP_TIMEOUT_ERR",
        st::IBV_WC_GENERAL_ERR => "GENERAL_ERR",
        st::IBV_WC_TM_ERR => "TM_ERR",
        st::IBV_WC_TM_RNDV_INCOMPLETE => "TM_RNDV_INCOMPLETE",
        _ => "UNKNOWN",
    }
}

/// Whether a failed completion leaves the queue pair in the error state
/// (every RC send-queue error does; the QP must be reset and reconnected).
pub fn wc_status_breaks_qp(status: u32) -> bool {
    status != st::IBV_WC_SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: WcContext = WcContext {
        remote_bounds_checked: true,
        local_abort: false,
    };

    #[test]
    fn success_is_no_error() {
        assert_eq!(wc_status_kind(st::IBV_WC_SUCCESS, PEER), None);
        assert!(!wc_status_breaks_qp(st::IBV_WC_SUCCESS));
    }

    #[test]
    fn remote_access_error_depends_on_local_bounds_check() {
        assert_eq!(
            wc_status_kind(st::IBV_WC_REM_ACCESS_ERR, PEER),
            Some(ErrorKind::UnknownRegion)
        );
        assert_eq!(
            wc_status_kind(st::IBV_WC_REM_ACCESS_ERR, WcContext::default()),
            Some(ErrorKind::OutOfBounds)
        );
    }

    #[test]
    fn transport_failures_are_connection_lost_and_retryable() {
        for s in [
            st::IBV_WC_RETRY_EXC_ERR,
            st::IBV_WC_RNR_RETRY_EXC_ERR,
            st::IBV_WC_REM_OP_ERR,
            st::IBV_WC_RESP_TIMEOUT_ERR,
        ] {
            let k = wc_status_kind(s, PEER).unwrap();
            assert_eq!(k, ErrorKind::ConnectionLost, "{}", wc_status_name(s));
            assert!(k.is_retryable());
        }
    }

    #[test]
    fn flush_is_cancelled_only_after_a_local_abort() {
        assert_eq!(
            wc_status_kind(st::IBV_WC_WR_FLUSH_ERR, PEER),
            Some(ErrorKind::ConnectionLost)
        );
        let aborted = WcContext {
            local_abort: true,
            ..PEER
        };
        assert_eq!(
            wc_status_kind(st::IBV_WC_WR_FLUSH_ERR, aborted),
            Some(ErrorKind::Cancelled)
        );
    }

    #[test]
    fn local_errors_are_invalid_and_not_retryable() {
        for s in [
            st::IBV_WC_LOC_PROT_ERR,
            st::IBV_WC_LOC_LEN_ERR,
            st::IBV_WC_LOC_QP_OP_ERR,
            st::IBV_WC_LOC_ACCESS_ERR,
        ] {
            let k = wc_status_kind(s, PEER).unwrap();
            assert_eq!(k, ErrorKind::Invalid);
            assert!(!k.is_retryable());
        }
    }

    #[test]
    fn every_known_status_has_a_name_and_an_error_kind() {
        for s in 1..=st::IBV_WC_TM_RNDV_INCOMPLETE {
            assert_ne!(wc_status_name(s), "UNKNOWN", "status {s}");
            assert!(wc_status_kind(s, PEER).is_some());
            assert!(wc_status_breaks_qp(s));
        }
        assert_eq!(wc_status_kind(999, PEER), Some(ErrorKind::Io));
        assert_eq!(
            wc_status_kind(st::IBV_WC_FATAL_ERR, PEER),
            Some(ErrorKind::Io)
        );
        assert_eq!(
            wc_status_kind(st::IBV_WC_BAD_RESP_ERR, PEER),
            Some(ErrorKind::Protocol)
        );
    }
}
