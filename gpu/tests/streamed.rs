//! `Engine::read_streamed` / `write_streamed`: over tcp (direct
//! connections) and shm (reads copy out of the mapping once a first batch
//! mapped it; writes are batches) they move the right bytes, hand every
//! piece over exactly once and in order, fail cleanly on bad ranges without
//! spoiling the connection, and stay correct with more concurrent calls
//! than direct connections (the rest run as batches).

use std::time::Duration;

use kvmesh_gpu::{Engine, MemoryKind, Op, Region, RemoteRegion, TransportKind};

mod common;
use common::{engine, pattern, rt};

const T: Duration = Duration::from_secs(20);

/// Reads `len` bytes and returns (bytes landed, bytes handed over).
async fn read(
    e: &Engine,
    dst: &Region,
    src: &RemoteRegion,
    src_off: u64,
    len: u64,
) -> kvmesh_gpu::Result<(Vec<u8>, Vec<u8>)> {
    let mut seen = Vec::new();
    e.read_streamed(Op::read(dst.id(), 0, *src, src_off, len), T, &mut |p| {
        seen.extend_from_slice(p)
    })
    .await?;
    let mut landed = vec![0u8; len as usize];
    dst.read_at(0, &mut landed).unwrap();
    Ok((landed, seen))
}

#[test]
fn streamed_reads_and_writes_move_every_byte_once_and_in_order() {
    const LEN: u64 = 3 << 20;
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        let target = engine(t);
        let served = target.alloc(LEN, MemoryKind::Host).unwrap();
        let content = pattern(LEN as usize, 1);
        served.write_at(0, &content).unwrap();
        let e = engine(t);
        let remote = e.import(&served.desc());
        let local = e.alloc(LEN, MemoryKind::Host).unwrap();
        rt().block_on(async {
            for (off, len) in [
                (0u64, 1u64),
                (5, 4096),
                (4096, (256 << 10) + 1),
                (1, LEN - 1),
                (0, LEN),
            ] {
                let (landed, seen) = read(&e, &local, &remote, off, len).await.unwrap();
                let want = &content[off as usize..(off + len) as usize];
                assert!(landed == want, "{t:?} read {off}+{len}: wrong bytes");
                assert!(seen == want, "{t:?} read {off}+{len}: pieces differ");
            }
            // Writes: every piece of the source handed over in order, and
            // the bytes landed at the target.
            let fresh = pattern(LEN as usize, 9);
            local.write_at(0, &fresh).unwrap();
            for (off, len) in [(0u64, 7u64), (100, (512 << 10) + 3), (0, LEN)] {
                let mut seen = Vec::new();
                e.write_streamed(Op::write(local.id(), off, remote, off, len), T, &mut |p| {
                    seen.extend_from_slice(p)
                })
                .await
                .unwrap();
                let want = &fresh[off as usize..(off + len) as usize];
                assert!(seen == want, "{t:?} write {off}+{len}: pieces differ");
                let mut got = vec![0u8; len as usize];
                served.read_at(off, &mut got).unwrap();
                assert!(got == want, "{t:?} write {off}+{len}: wrong bytes landed");
            }
        });
    }
}

#[test]
fn a_refused_streamed_read_fails_cleanly_and_the_next_one_works() {
    let target = engine(TransportKind::Tcp);
    let served = target.alloc(1 << 20, MemoryKind::Host).unwrap();
    let content = pattern(1 << 20, 3);
    served.write_at(0, &content).unwrap();
    let e = engine(TransportKind::Tcp);
    let remote = e.import(&served.desc());
    let local = e.alloc(2 << 20, MemoryKind::Host).unwrap();
    rt().block_on(async {
        // Past the end of the remote region (the descriptor says so, and
        // a forged one is refused by the server).
        assert!(read(&e, &local, &remote, (1 << 20) - 10, 20).await.is_err());
        let forged = RemoteRegion {
            len: 2 << 20,
            ..remote
        };
        let err = read(&e, &local, &forged, 1 << 20, 4096).await.unwrap_err();
        assert!(!err.to_string().is_empty());
        let err = e
            .write_streamed(
                Op::write(local.id(), 0, forged, 1 << 20, 4096),
                T,
                &mut |_| {},
            )
            .await
            .unwrap_err();
        assert!(!err.to_string().is_empty());
        // Past the end of the local region: refused before anything moves.
        let mut handed = 0;
        assert!(e
            .read_streamed(Op::read(local.id(), 2 << 20, remote, 0, 1), T, &mut |_| {
                handed += 1
            })
            .await
            .is_err());
        assert_eq!(handed, 0);
        // The wrong kind of op.
        assert!(e
            .read_streamed(Op::write(local.id(), 0, remote, 0, 1), T, &mut |_| {})
            .await
            .is_err());
        // The connections are still good.
        for _ in 0..3 {
            let (landed, seen) = read(&e, &local, &remote, 0, 1 << 20).await.unwrap();
            assert!(landed == content && seen == content);
        }
        // A deregistered region is refused.
        target.deregister(&served, T).unwrap();
        assert!(read(&e, &local, &remote, 0, 4096).await.is_err());
    });
}

#[test]
fn more_concurrent_streamed_reads_than_direct_connections_stay_correct() {
    const N: usize = 20;
    const LEN: u64 = 256 << 10;
    let target = engine(TransportKind::Tcp);
    let served = target.alloc(N as u64 * LEN, MemoryKind::Host).unwrap();
    let content = pattern(N * LEN as usize, 5);
    served.write_at(0, &content).unwrap();
    let e = engine(TransportKind::Tcp);
    let remote = e.import(&served.desc());
    let locals: Vec<Region> = (0..N)
        .map(|_| e.alloc(LEN, MemoryKind::Host).unwrap())
        .collect();
    let results = rt().block_on(futures::future::join_all(
        locals
            .iter()
            .enumerate()
            .map(|(i, l)| read(&e, l, &remote, i as u64 * LEN, LEN)),
    ));
    for (i, r) in results.into_iter().enumerate() {
        let (landed, seen) = r.unwrap();
        let want = &content[i * LEN as usize..(i + 1) * LEN as usize];
        assert!(landed == want && seen == want, "read {i}");
    }
}
