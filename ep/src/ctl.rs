//! The small tagged messages ranks exchange through engine notifications.
//!
//! Notifications of different operations and ranks interleave in one engine
//! queue, so each carries the group id, the operation kind and its sequence
//! number, and the sender's rank; the receiver buffers early arrivals and
//! drops stale ones. Layout (little endian, 40 bytes, then the payload):
//!
//! ```text
//! magic "KEP1" | group u64 | kind u8 | pad 3 | seq u64 | src u32 | count u32 | offset u64
//! ```

/// What a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// Group formation: the sender's one-sided probe write has landed.
    Hello = 1,
    /// Dispatch rows from `src` have landed (or, two-sided, a chunk of them).
    Dispatch = 2,
    /// Combine rows from `src` have landed (or a chunk of them).
    Combine = 3,
    Barrier = 4,
    /// The sender gave up on the group and names the rank it blames
    /// (doorbells only).
    Abort = 5,
    /// The sender has finished reading the rows this rank exposed in place
    /// for a combine (doorbells only).
    Release = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Dispatch,
            3 => Kind::Combine,
            4 => Kind::Barrier,
            5 => Kind::Abort,
            6 => Kind::Release,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Hello => "group formation",
            Kind::Dispatch => "dispatch",
            Kind::Combine => "combine",
            Kind::Barrier => "barrier",
            Kind::Abort => "abort",
            Kind::Release => "combine release",
        }
    }
}

const MAGIC: [u8; 4] = *b"KEP1";
pub(crate) const HEADER: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ctl {
    pub group: u64,
    pub kind: Kind,
    pub seq: u64,
    pub src: u32,
    /// Rows the sender moves in this operation.
    pub count: u32,
    /// Byte offset of the attached payload inside the destination slot
    /// (two-sided chunks only).
    pub offset: u64,
}

impl Ctl {
    pub(crate) fn encode(&self, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + payload.len());
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&self.group.to_le_bytes());
        v.extend_from_slice(&[self.kind as u8, 0, 0, 0]);
        v.extend_from_slice(&self.seq.to_le_bytes());
        v.extend_from_slice(&self.src.to_le_bytes());
        v.extend_from_slice(&self.count.to_le_bytes());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Splits a message into header and payload; `None` if it is not ours.
    pub(crate) fn decode(b: &[u8]) -> Option<(Ctl, &[u8])> {
        if b.len() < HEADER || b[..4] != MAGIC {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        Some((
            Ctl {
                group: u64_at(4),
                kind: Kind::from_u8(b[12])?,
                seq: u64_at(16),
                src: u32_at(24),
                count: u32_at(28),
                offset: u64_at(32),
            },
            &b[HEADER..],
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects_foreign() {
        let c = Ctl {
            group: 0xdead_beef_1234,
            kind: Kind::Combine,
            seq: 99,
            src: 3,
            count: 17,
            offset: 1 << 33,
        };
        let b = c.encode(b"xyz");
        let (d, p) = Ctl::decode(&b).unwrap();
        assert_eq!((d, p), (c, &b"xyz"[..]));
        assert!(Ctl::decode(&b[..HEADER - 1]).is_none());
        assert!(Ctl::decode(b"not ours at all, not ours at all, not ours").is_none());
        let mut bad = b.clone();
        bad[12] = 42;
        assert!(Ctl::decode(&bad).is_none());
    }
}
