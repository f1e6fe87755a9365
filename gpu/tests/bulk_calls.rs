//! `Engine::call_bulk`: a handler's `Reply::Bulk` bytes land where the
//! caller's `place` says (a local host region or a new vector), every piece
//! handed over once and in order, over a direct connection and over the
//! fallback channels (lane or `shm` control channel, used when every direct
//! connection is busy); refusals, bad ranges and plain replies behave.

use std::sync::Arc;
use std::time::Duration;

use kvmesh_gpu::{
    BulkAnswer, BulkDest, Engine, ErrorKind, MemoryKind, PeerId, Region, Reply, TransportKind,
};

mod common;
use common::{engine, pattern, rt};

const T: Duration = Duration::from_secs(20);
const SERVED: u64 = 4 << 20;

/// A target whose handler answers "bulk OFFSET LEN HEADLEN" with that range
/// of its served region after a head of HEADLEN pattern bytes, and anything
/// else with the request reversed.
fn target(t: TransportKind) -> (Engine, Region, Vec<u8>) {
    let target = engine(t);
    let served = target.alloc(SERVED, MemoryKind::Host).unwrap();
    let content = pattern(SERVED as usize, 1);
    served.write_at(0, &content).unwrap();
    let id = served.id();
    target.set_rpc_handler(Arc::new(move |_, req: &[u8]| {
        let text = String::from_utf8_lossy(req);
        let words: Vec<&str> = text.split(' ').collect();
        if let ["bulk", off, len, hl] = words.as_slice() {
            return Reply::Bulk {
                head: pattern(hl.parse().unwrap(), 7),
                region: id,
                offset: off.parse().unwrap(),
                len: len.parse().unwrap(),
            };
        }
        let mut r = req.to_vec();
        r.reverse();
        r.into()
    }));
    (target, served, content)
}

fn req(off: u64, len: u64, head: usize) -> Vec<u8> {
    format!("bulk {off} {len} {head}").into_bytes()
}

/// One bulk call into `dest` (a region at offset 0, or a vector); returns
/// the answer, the bytes that landed and the bytes handed over.
async fn bulk(
    e: &Engine,
    peer: PeerId,
    r: Vec<u8>,
    dest: Option<&Region>,
) -> kvmesh_gpu::Result<(BulkAnswer, Vec<u8>, Vec<u8>)> {
    let mut seen = Vec::new();
    let mut heads = 0;
    let ans = e
        .call_bulk(
            peer,
            r,
            T,
            &mut |_, _| {
                heads += 1;
                Some(dest.map_or(BulkDest::Vec, |d| BulkDest::Region(d, 0)))
            },
            &mut |p| seen.extend_from_slice(p),
        )
        .await?;
    // `place` is asked once when bytes follow the head, never otherwise.
    assert_eq!(heads, usize::from(ans.len > 0), "place calls for {ans:?}");
    let landed = match (&ans.bytes, dest) {
        (Some(v), _) => v.clone(),
        (None, Some(d)) if ans.landed => {
            let mut v = vec![0u8; ans.len as usize];
            d.read_at(0, &mut v).unwrap();
            v
        }
        _ => Vec::new(),
    };
    Ok((ans, landed, seen))
}

#[test]
fn bulk_answers_land_in_regions_and_vectors_on_both_channels() {
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        let (_target, served, content) = target(t);
        let e = engine(t);
        let peer = e.import(&served.desc()).peer;
        let local = e.alloc(SERVED, MemoryKind::Host).unwrap();
        rt().block_on(async {
            for (off, len, hl) in [
                (0u64, 1u64, 0usize),
                (3, 4096, 17),
                (4096, 64 << 10, 100),
                (1, (2 << 20) + 3, 5),
                (0, SERVED, 1 << 20),
            ] {
                let want = &content[off as usize..(off + len) as usize];
                for dest in [Some(&local), None] {
                    let (ans, landed, seen) =
                        bulk(&e, peer, req(off, len, hl), dest).await.unwrap();
                    let what = format!(
                        "{t:?} {off}+{len} head {hl} into {}",
                        if dest.is_some() { "region" } else { "vec" }
                    );
                    assert_eq!(ans.head, pattern(hl, 7), "{what}: head");
                    assert!(ans.landed && ans.len == len, "{what}: {ans:?}");
                    assert_eq!(ans.bytes.is_some(), dest.is_none(), "{what}");
                    assert!(landed == want, "{what}: wrong bytes landed");
                    assert!(seen == want, "{what}: pieces differ");
                }
            }
            // A plain reply: no bulk, place never asked.
            let ans = e
                .call_bulk(
                    peer,
                    b"abc".to_vec(),
                    T,
                    &mut |_, _| panic!("no bulk"),
                    &mut |_| panic!("no bulk"),
                )
                .await
                .unwrap();
            assert_eq!(
                (ans.head.as_slice(), ans.len, ans.landed),
                (&b"cba"[..], 0, false)
            );
            // `call` to a bulk answer gets head and bytes concatenated.
            let flat = e.call(peer, req(10, 1000, 3), T).await.unwrap();
            assert_eq!(flat[..3], pattern(3, 7)[..]);
            assert!(flat[3..] == content[10..1010], "{t:?}: flattened bytes");
        });
    }
}

#[test]
fn refused_and_bad_bulk_answers_fail_cleanly_and_the_next_call_works() {
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        let (target, served, content) = target(t);
        let e = engine(t);
        let peer = e.import(&served.desc()).peer;
        let small = e.alloc(4096, MemoryKind::Host).unwrap();
        let other = engine(t).alloc(1 << 20, MemoryKind::Host).unwrap();
        rt().block_on(async {
            // Refused by `place`: read and dropped, nothing handed over.
            let ans = e
                .call_bulk(
                    peer,
                    req(0, 1 << 20, 8),
                    T,
                    &mut |h, n| {
                        assert_eq!((h, n), (&pattern(8, 7)[..], 1 << 20));
                        None
                    },
                    &mut |_| panic!("refused bytes handed over"),
                )
                .await
                .unwrap();
            assert!(!ans.landed && ans.len == 1 << 20 && ans.bytes.is_none());
            // A handler range past the served region: the head comes alone.
            let (ans, _, seen) = bulk(&e, peer, req(SERVED - 10, 20, 4), None).await.unwrap();
            assert_eq!(ans.head, pattern(4, 7), "{t:?}");
            assert!(
                !ans.landed && ans.len == 0 && seen.is_empty(),
                "{t:?}: {ans:?}"
            );
            // Bulk past the end of the destination region, or a region of
            // another engine: refused locally.
            let err = bulk(&e, peer, req(0, 8192, 0), Some(&small))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("bulk destination"), "{t:?}: {err}");
            let err = bulk(&e, peer, req(0, 100, 0), Some(&other))
                .await
                .unwrap_err();
            assert!(err.to_string().contains("another engine"), "{t:?}: {err}");
            // Everything still works.
            for _ in 0..3 {
                let (_, landed, seen) = bulk(&e, peer, req(5, 300_000, 2), None).await.unwrap();
                assert!(landed == content[5..300_005] && seen == landed, "{t:?}");
            }
            // A deregistered region's bytes are left out, the head is not.
            target.deregister(&served, T).unwrap();
            let (ans, _, _) = bulk(&e, peer, req(0, 10, 3), None).await.unwrap();
            assert!(ans.head == pattern(3, 7) && ans.len == 0, "{t:?}: {ans:?}");
            let flat = e.call(peer, req(0, 10, 3), T).await.unwrap();
            assert_eq!(flat, pattern(3, 7), "{t:?}");
            // A peer without a handler refuses, as for `call`.
            let bare = engine(t);
            let bare_peer = e
                .import(&bare.alloc(4096, MemoryKind::Host).unwrap().desc())
                .peer;
            let err = bulk(&e, bare_peer, req(0, 10, 0), None).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unreachable, "{t:?}: {err}");
        });
    }
}

#[test]
fn more_concurrent_bulk_calls_than_direct_connections_stay_correct() {
    // Past the direct connections' limit the calls take the lane (tcp) or
    // the shm control channel (shm), which frame the whole answer.
    const N: u64 = 20;
    const LEN: u64 = (SERVED / N) - 1;
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        let (_target, served, content) = target(t);
        let e = engine(t);
        let peer = e.import(&served.desc()).peer;
        let locals: Vec<Region> = (0..N)
            .map(|_| e.alloc(LEN, MemoryKind::Host).unwrap())
            .collect();
        // Every fifth call gets a plain reply (no bulk), on either channel.
        let plain = |i: usize| i % 5 == 4;
        let results = rt().block_on(futures::future::join_all(locals.iter().enumerate().map(
            |(i, l)| {
                let dest = (i % 2 == 0).then_some(l);
                let r = if plain(i) {
                    format!("plain {i}").into_bytes()
                } else {
                    req(i as u64 * LEN, LEN, i)
                };
                bulk(&e, peer, r, dest)
            },
        )));
        for (i, r) in results.into_iter().enumerate() {
            let (ans, landed, seen) = r.unwrap();
            if plain(i) {
                let mut want = format!("plain {i}").into_bytes();
                want.reverse();
                assert_eq!(ans.head, want, "{t:?} call {i}");
                assert!(
                    ans.len == 0 && !ans.landed && seen.is_empty(),
                    "{t:?} call {i}"
                );
                continue;
            }
            let want = &content[i * LEN as usize..(i + 1) * LEN as usize];
            assert_eq!(ans.head, pattern(i, 7), "{t:?} call {i}");
            assert!(landed == want && seen == want, "{t:?} call {i}");
        }
    }
}
