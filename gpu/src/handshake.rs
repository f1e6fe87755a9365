//! The data-plane handshake (see [`crate::wire`]) for both sides, over any
//! raw stream (TCP or unix socket).

use zerocopy::{FromBytes, IntoBytes};

use crate::desc::{EngineId, PeerDesc};
use crate::error::ErrorKind;
use crate::rawio::{read_exact, write_all, RawStream};
use crate::wire::{self, Challenge, Hello, Proof, Side};

fn nonce() -> [u8; 16] {
    rand::random()
}

/// Client side: proves we hold `peer`'s secret and checks that the server
/// holds it too. Errors are `AuthFailed` (refused or bad proof),
/// `Protocol` (not a kvmesh peer) or `ConnectionLost`.
pub(crate) async fn client<S: RawStream>(
    s: &S,
    channel: u16,
    me: EngineId,
    peer: &PeerDesc,
) -> Result<(), ErrorKind> {
    let hello = Hello {
        magic: wire::MAGIC.into(),
        version: wire::WIRE_VERSION.into(),
        channel: channel.into(),
        engine_id: me,
        nonce: nonce(),
    };
    write_all(s, hello.as_bytes())
        .await
        .map_err(|_| ErrorKind::ConnectionLost)?;
    let mut buf = [0u8; std::mem::size_of::<Challenge>()];
    read_exact(s, &mut buf)
        .await
        .map_err(|_| ErrorKind::ConnectionLost)?;
    let ch = Challenge::read_from_bytes(&buf).map_err(|_| ErrorKind::Protocol)?;
    if ch.magic.get() != wire::MAGIC || ch.version.get() != wire::WIRE_VERSION {
        return Err(ErrorKind::Protocol);
    }
    if ch.engine_id != peer.engine_id {
        // A different engine answers at this address (e.g. the peer restarted).
        return Err(ErrorKind::ConnectionLost);
    }
    let proof = Proof {
        mac: wire::handshake_mac(&peer.secret, Side::Client, &hello, &ch),
    };
    write_all(s, proof.as_bytes())
        .await
        .map_err(|_| ErrorKind::ConnectionLost)?;
    let mut pb = [0u8; 32];
    // The server closes without answering when our proof is wrong.
    read_exact(s, &mut pb)
        .await
        .map_err(|_| ErrorKind::AuthFailed)?;
    let expect = wire::handshake_mac(&peer.secret, Side::Server, &hello, &ch);
    if !wire::mac_eq(&pb, &expect) {
        return Err(ErrorKind::AuthFailed);
    }
    Ok(())
}

/// Server side: returns the client's engine id, or the reason to close.
pub(crate) async fn server<S: RawStream>(
    s: &S,
    channel: u16,
    me: &PeerDesc,
) -> Result<EngineId, String> {
    let mut buf = [0u8; std::mem::size_of::<Hello>()];
    read_exact(s, &mut buf)
        .await
        .map_err(|e| format!("reading hello: {e}"))?;
    let hello = Hello::read_from_bytes(&buf).map_err(|_| "short hello".to_string())?;
    if hello.magic.get() != wire::MAGIC {
        return Err(format!(
            "bad magic {:#x}: not a kvmesh peer",
            hello.magic.get()
        ));
    }
    if hello.version.get() != wire::WIRE_VERSION {
        return Err(format!("wire version {} unsupported", hello.version.get()));
    }
    if hello.channel.get() != channel {
        return Err(format!(
            "channel {} on a channel-{channel} listener",
            hello.channel.get()
        ));
    }
    let ch = Challenge {
        magic: wire::MAGIC.into(),
        version: wire::WIRE_VERSION.into(),
        status: 0,
        _pad: 0,
        engine_id: me.engine_id,
        nonce: nonce(),
    };
    write_all(s, ch.as_bytes())
        .await
        .map_err(|e| format!("sending challenge: {e}"))?;
    let mut pb = [0u8; 32];
    read_exact(s, &mut pb)
        .await
        .map_err(|e| format!("reading proof: {e}"))?;
    let expect = wire::handshake_mac(&me.secret, Side::Client, &hello, &ch);
    if !wire::mac_eq(&pb, &expect) {
        return Err("authentication failed: wrong secret".into());
    }
    let mine = wire::handshake_mac(&me.secret, Side::Server, &hello, &ch);
    write_all(s, &mine)
        .await
        .map_err(|e| format!("sending proof: {e}"))?;
    Ok(hello.engine_id)
}
