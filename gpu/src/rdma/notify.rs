//! Notifications with RDMA WRITE_WITH_IMM: pure bookkeeping of both ends.
//!
//! ```text
//!  sender                                   receiver
//!  reserve(len) -> seq, slot                 ring: slots × slot_bytes, registered
//!  WRITE_WITH_IMM(payload -> ring[slot],     receives pre-posted on the
//!                 imm = seq)  ───────────►   notification QP (no buffer)
//!                                            on_recv(imm, byte_len) -> slot, len
//!                                            read ring[slot], consumed(seq)
//!  on_credit(n)  ◄──── credit() relayed by the engine's control channel
//! ```
//!
//! The immediate is the 32-bit notification sequence (wrapping); the slot is
//! `seq % slots`. Notifications of one peer pair all go over one queue pair,
//! so they arrive in order and a gap is a protocol violation. The sender
//! never has more than `slots` notifications unconsumed (credits), so it
//! never overwrites a slot the receiver has not read.

use super::error::{RdmaError, Result};

pub use crate::rdma_wire::NotifyRingDesc;

impl NotifyRingDesc {
    /// Address of the slot carrying `seq`.
    pub fn slot_addr(&self, seq: u32) -> u64 {
        self.addr + u64::from(seq % self.slots) * u64::from(self.slot_bytes)
    }

    /// Checks a descriptor received from a peer.
    pub fn validate(&self) -> Result<()> {
        if self.slots == 0 || self.slot_bytes == 0 {
            return Err(RdmaError::Endpoint(
                "notification ring without slots".into(),
            ));
        }
        let span = u64::from(self.slots) * u64::from(self.slot_bytes);
        if self.addr.checked_add(span).is_none() {
            return Err(RdmaError::Endpoint(
                "notification ring wraps the address space".into(),
            ));
        }
        Ok(())
    }
}

/// A reserved notification slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifySlot {
    /// Sequence number, carried as the immediate.
    pub seq: u32,
    /// Slot index.
    pub slot: u32,
}

/// Sender side: sequence numbers and credits.
#[derive(Debug, Clone)]
pub struct NotifySender {
    next_seq: u32,
    consumed: u32,
    slots: u32,
    slot_bytes: u32,
}

impl NotifySender {
    /// For a receiver ring of `slots` × `slot_bytes`.
    pub fn new(slots: u32, slot_bytes: u32) -> Self {
        NotifySender {
            next_seq: 0,
            consumed: 0,
            slots,
            slot_bytes,
        }
    }

    /// Notifications sent and not yet consumed by the receiver.
    pub fn in_flight(&self) -> u32 {
        self.next_seq.wrapping_sub(self.consumed)
    }

    /// Reserves the next slot for a payload of `len` bytes.
    pub fn reserve(&mut self, len: usize) -> Result<NotifySlot> {
        if len > self.slot_bytes as usize {
            return Err(RdmaError::Invalid(format!(
                "notification of {len} bytes exceeds the {}-byte slot",
                self.slot_bytes
            )));
        }
        if self.in_flight() >= self.slots {
            return Err(RdmaError::Busy(format!(
                "{} notifications unconsumed by the peer",
                self.in_flight()
            )));
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        Ok(NotifySlot {
            seq,
            slot: seq % self.slots,
        })
    }

    /// The receiver reports it consumed every notification before sequence
    /// `consumed` (a running count, wrapping). Reports that go backwards or
    /// beyond what was sent are refused.
    pub fn on_credit(&mut self, consumed: u32) -> Result<()> {
        let advance = consumed.wrapping_sub(self.consumed);
        if advance > self.in_flight() {
            return Err(RdmaError::Protocol(format!(
                "credit {consumed} outside the window {}..={}",
                self.consumed, self.next_seq
            )));
        }
        self.consumed = consumed;
        Ok(())
    }
}

/// A notification that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Its sequence number.
    pub seq: u32,
    /// Ring slot holding the payload.
    pub slot: u32,
    /// Payload length.
    pub len: u32,
}

/// Receiver side: expected sequence, pre-posted receives, credits.
#[derive(Debug, Clone)]
pub struct NotifyReceiver {
    expected: u32,
    consumed: u32,
    posted: u32,
    depth: u32,
    slots: u32,
    slot_bytes: u32,
}

impl NotifyReceiver {
    /// For a ring of `slots` × `slot_bytes`; keeps `depth` receives posted
    /// (at least `slots`, so a sender within its credits never hits RNR).
    pub fn new(slots: u32, slot_bytes: u32, depth: u32) -> Self {
        NotifyReceiver {
            expected: 0,
            consumed: 0,
            posted: 0,
            depth: depth.max(slots),
            slots,
            slot_bytes,
        }
    }

    /// How many receives to post now to refill the queue.
    pub fn to_post(&self) -> u32 {
        self.depth.saturating_sub(self.posted)
    }

    /// Records that `n` receives were posted.
    pub fn posted(&mut self, n: u32) {
        self.posted += n;
    }

    /// A receive completion with immediate `imm` and `byte_len` arrived.
    pub fn on_recv(&mut self, imm: u32, byte_len: u32) -> Result<Delivered> {
        self.posted = self.posted.saturating_sub(1);
        if imm != self.expected {
            return Err(RdmaError::Protocol(format!(
                "notification {imm} arrived, expected {}",
                self.expected
            )));
        }
        if byte_len > self.slot_bytes {
            return Err(RdmaError::Protocol(format!(
                "notification of {byte_len} bytes in a {}-byte slot",
                self.slot_bytes
            )));
        }
        if self.expected.wrapping_sub(self.consumed) >= self.slots {
            return Err(RdmaError::Protocol(
                "notification beyond the sender's credits".into(),
            ));
        }
        self.expected = self.expected.wrapping_add(1);
        Ok(Delivered {
            seq: imm,
            slot: imm % self.slots,
            len: byte_len,
        })
    }

    /// The payload of `seq` was copied out; its slot may be reused. Must be
    /// called in sequence order.
    pub fn consumed(&mut self, seq: u32) -> Result<()> {
        if seq != self.consumed || self.expected.wrapping_sub(self.consumed) == 0 {
            return Err(RdmaError::Invalid(format!(
                "consumed {seq} out of order (next is {})",
                self.consumed
            )));
        }
        self.consumed = self.consumed.wrapping_add(1);
        Ok(())
    }

    /// The credit to send to the sender ([`NotifySender::on_credit`]).
    pub fn credit(&self) -> u32 {
        self.consumed
    }
}

/// `wr_id` bit marking receive work requests (the send side's ids never
/// reach it).
pub const RECV_WR_FLAG: u64 = 1 << 63;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_and_receiver_agree_on_slots_and_credits() {
        let mut tx = NotifySender::new(4, 64);
        let mut rx = NotifyReceiver::new(4, 64, 2);
        assert_eq!(rx.to_post(), 4, "depth is raised to the slot count");
        rx.posted(4);
        assert_eq!(rx.to_post(), 0);
        for round in 0..3u32 {
            let mut got = Vec::new();
            for _ in 0..4 {
                let s = tx.reserve(10).unwrap();
                let d = rx.on_recv(s.seq, 10).unwrap();
                assert_eq!((d.seq, d.slot), (s.seq, s.slot));
                got.push(d);
            }
            assert!(matches!(tx.reserve(1), Err(RdmaError::Busy(_))));
            assert_eq!(rx.to_post(), 4);
            rx.posted(4);
            for d in got {
                rx.consumed(d.seq).unwrap();
            }
            tx.on_credit(rx.credit()).unwrap();
            assert_eq!(tx.in_flight(), 0, "round {round}");
        }
    }

    #[test]
    fn receiver_refuses_gaps_oversize_and_overruns() {
        let mut rx = NotifyReceiver::new(2, 8, 2);
        assert!(matches!(rx.on_recv(1, 0), Err(RdmaError::Protocol(_))));
        let mut rx = NotifyReceiver::new(2, 8, 2);
        assert!(matches!(rx.on_recv(0, 9), Err(RdmaError::Protocol(_))));
        let mut rx = NotifyReceiver::new(2, 8, 2);
        rx.on_recv(0, 1).unwrap();
        rx.on_recv(1, 1).unwrap();
        assert!(matches!(rx.on_recv(2, 1), Err(RdmaError::Protocol(_))));
        assert!(rx.consumed(1).is_err());
        rx.consumed(0).unwrap();
        assert_eq!(rx.credit(), 1);
    }

    #[test]
    fn sender_refuses_bad_credits_and_oversize_payloads() {
        let mut tx = NotifySender::new(3, 16);
        assert!(matches!(tx.reserve(17), Err(RdmaError::Invalid(_))));
        tx.reserve(0).unwrap();
        assert!(matches!(tx.on_credit(2), Err(RdmaError::Protocol(_))));
        tx.on_credit(1).unwrap();
        assert!(tx.on_credit(0).is_err(), "credits never go backwards");
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut tx = NotifySender::new(3, 16);
        let mut rx = NotifyReceiver::new(3, 16, 3);
        tx.next_seq = u32::MAX - 1;
        tx.consumed = u32::MAX - 1;
        rx.expected = u32::MAX - 1;
        rx.consumed = u32::MAX - 1;
        for _ in 0..6 {
            let s = tx.reserve(4).unwrap();
            let d = rx.on_recv(s.seq, 4).unwrap();
            assert_eq!(d.slot, s.seq % 3);
            rx.consumed(d.seq).unwrap();
            tx.on_credit(rx.credit()).unwrap();
        }
        assert_eq!(tx.next_seq, 4);
    }

    #[test]
    fn ring_descriptor_addresses_and_validation() {
        let r = NotifyRingDesc {
            addr: 0x1000,
            rkeys: vec![1],
            slots: 4,
            slot_bytes: 256,
        };
        r.validate().unwrap();
        assert_eq!(r.slot_addr(0), 0x1000);
        assert_eq!(r.slot_addr(5), 0x1100);
        let bad = NotifyRingDesc {
            slots: 0,
            ..r.clone()
        };
        assert!(bad.validate().is_err());
        let wrap = NotifyRingDesc {
            addr: u64::MAX - 10,
            ..r
        };
        assert!(wrap.validate().is_err());
    }
}
