//! Wire format of the data plane: fixed little-endian headers (`zerocopy`)
//! and the authentication handshake shared by the `tcp` and `shm` channels.
//!
//! ```text
//! client                                   server
//!   | Hello{magic,version,channel,id,nonce_c} ->|
//!   |<- Challenge{magic,version,id,nonce_s}     |
//!   | Proof{mac_c = H(secret, "c"|nonces|ids)}->|  server checks mac_c
//!   |<- Proof{mac_s = H(secret, "s"|nonces|ids)}|  client checks mac_s
//!   | Req{op,id,region,offset,len} [payload] -> |
//!   |<- Resp{status,op,id,len} [payload]        |
//! ```
//! Both sides prove knowledge of the descriptor's secret without sending it;
//! nonces from both sides prevent replay. Requests on one connection are
//! served in order, so responses come back in request order.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::desc::EngineId;

pub const MAGIC: u32 = 0x4b56_4d48; // "KVMH"
pub const WIRE_VERSION: u16 = 1;

/// Channel kinds announced in [`Hello`].
pub const CHANNEL_TCP: u16 = 1;
pub const CHANNEL_SHM: u16 = 2;

/// Request opcodes.
pub const OP_WRITE: u8 = 1;
pub const OP_READ: u8 = 2;
pub const OP_NOTIFY: u8 = 3;
/// shm: ask for a region's memfd (answered with the fd attached).
pub const OP_OPEN: u8 = 4;
/// shm, server to client: stop using a region, then answer with `OP_REVOKE_ACK`.
pub const OP_REVOKE: u8 = 5;
pub const OP_REVOKE_ACK: u8 = 6;
/// A small request answered by the peer's RPC handler (see `Engine::call`).
pub const OP_CALL: u8 = 7;
/// Always answered; acknowledges every earlier write on the connection.
pub const OP_PING: u8 = 8;
/// Engine-to-engine control message (RDMA connection set-up, notification
/// credits), answered like `OP_CALL`. Only sent to engines whose descriptor
/// advertises RDMA; answered `Unreachable` by engines running without it.
pub const OP_CONTROL: u8 = 9;
/// An RPC like `OP_CALL` whose answer may carry bulk bytes straight from a
/// registered region of the peer (see `Engine::call_bulk`). The answer's
/// payload is always framed: a little-endian `u32` head length, the head
/// (at most [`MAX_CALL_BYTES`]), then the bulk bytes (at most
/// [`MAX_BULK_BYTES`]).
pub const OP_CALL_BULK: u8 = 10;

/// `ReqHeader::flags` of `OP_WRITE`: answer this write even when it succeeds.
/// Successful writes without it are acknowledged by the next answer on the
/// connection (requests are served in order; failures are always answered).
pub const FLAG_ACK: u8 = 1;

/// Largest RPC request or response payload.
pub const MAX_CALL_BYTES: u64 = 1 << 20;

/// Largest bulk part of an `OP_CALL_BULK` answer.
pub const MAX_BULK_BYTES: u64 = 64 << 20;

/// Largest whole `OP_CALL_BULK` answer payload.
pub const MAX_BULK_ANSWER: u64 = 4 + MAX_CALL_BYTES + MAX_BULK_BYTES;

/// Largest notification payload.
pub const MAX_NOTIFY_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Hello {
    pub magic: U32,
    pub version: U16,
    pub channel: U16,
    pub engine_id: EngineId,
    pub nonce: [u8; 16],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Challenge {
    pub magic: U32,
    pub version: U16,
    pub status: u8,
    pub _pad: u8,
    pub engine_id: EngineId,
    pub nonce: [u8; 16],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Proof {
    pub mac: [u8; 32],
}

/// A request; `len` bytes of payload follow for `OP_WRITE`, `OP_NOTIFY`
/// and `OP_CALL`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ReqHeader {
    pub magic: U32,
    pub op: u8,
    pub flags: u8,
    pub _pad: [u8; 2],
    pub id: U64,
    pub region: U64,
    pub offset: U64,
    pub len: U64,
}

/// A response; `len` bytes of payload follow for a successful `OP_READ`
/// and for `OP_CALL` and `OP_CALL_BULK`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RespHeader {
    pub magic: U32,
    /// 0 = ok, else an [`crate::ErrorKind`] code.
    pub status: u8,
    pub op: u8,
    pub _pad: [u8; 2],
    pub id: U64,
    pub len: U64,
}

impl ReqHeader {
    pub fn new(op: u8, id: u64, region: u64, offset: u64, len: u64) -> Self {
        ReqHeader {
            magic: MAGIC.into(),
            op,
            flags: 0,
            _pad: [0; 2],
            id: id.into(),
            region: region.into(),
            offset: offset.into(),
            len: len.into(),
        }
    }
}

impl RespHeader {
    pub fn new(op: u8, status: u8, id: u64, len: u64) -> Self {
        RespHeader {
            magic: MAGIC.into(),
            status,
            op,
            _pad: [0; 2],
            id: id.into(),
            len: len.into(),
        }
    }
}

/// Which side computes a MAC.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Client,
    Server,
}

/// MAC over the handshake transcript, keyed with the descriptor secret.
pub fn handshake_mac(
    secret: &[u8; 32],
    side: Side,
    client: &Hello,
    server: &Challenge,
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(secret);
    h.update(b"kvmesh-dataplane-auth-v1");
    h.update(match side {
        Side::Client => b"client",
        Side::Server => b"server",
    });
    h.update(client.as_bytes());
    h.update(server.as_bytes());
    *h.finalize().as_bytes()
}

/// Constant-time comparison of two MACs.
pub fn mac_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes_are_fixed() {
        assert_eq!(std::mem::size_of::<ReqHeader>(), 40);
        assert_eq!(std::mem::size_of::<RespHeader>(), 24);
        assert_eq!(std::mem::size_of::<Hello>(), 40);
        assert_eq!(std::mem::size_of::<Challenge>(), 40);
    }

    #[test]
    fn mac_depends_on_secret_side_and_nonces() {
        let hello = Hello {
            magic: MAGIC.into(),
            version: WIRE_VERSION.into(),
            channel: CHANNEL_TCP.into(),
            engine_id: [1; 16],
            nonce: [2; 16],
        };
        let ch = Challenge {
            magic: MAGIC.into(),
            version: WIRE_VERSION.into(),
            status: 0,
            _pad: 0,
            engine_id: [3; 16],
            nonce: [4; 16],
        };
        let a = handshake_mac(&[5; 32], Side::Client, &hello, &ch);
        assert!(mac_eq(
            &a,
            &handshake_mac(&[5; 32], Side::Client, &hello, &ch)
        ));
        assert!(!mac_eq(
            &a,
            &handshake_mac(&[6; 32], Side::Client, &hello, &ch)
        ));
        assert!(!mac_eq(
            &a,
            &handshake_mac(&[5; 32], Side::Server, &hello, &ch)
        ));
        let mut ch2 = ch;
        ch2.nonce[0] ^= 1;
        assert!(!mac_eq(
            &a,
            &handshake_mac(&[5; 32], Side::Client, &hello, &ch2)
        ));
    }
}
