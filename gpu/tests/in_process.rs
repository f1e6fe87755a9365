//! Engine behaviour that needs no second process: deregistration waiting for
//! in-flight operations, revocation of shm mappings, cancel, bad arguments.

use std::time::{Duration, Instant};

use kvmesh_gpu::{BatchOptions, Engine, EngineConfig, ErrorKind, MemoryKind, Op, TransportKind};

fn engine(t: TransportKind) -> Engine {
    Engine::new(EngineConfig {
        transport: t,
        ..EngineConfig::default()
    })
    .unwrap()
}

const BIG: u64 = 64 << 20;

#[test]
fn deregistering_a_local_region_waits_for_its_batch() {
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        let target = engine(t);
        let remote_region = target.alloc(BIG, MemoryKind::Host).unwrap();
        let e = engine(t);
        let remote = e.import(&remote_region.desc());
        let local = e.alloc(BIG, MemoryKind::Host).unwrap();
        let ops: Vec<Op> = (0..8)
            .map(|_| Op::read(local.id(), 0, remote, 0, BIG))
            .collect();
        let b = e.submit(&ops, BatchOptions::default()).unwrap();
        e.deregister(&local, Duration::from_secs(30)).unwrap();
        assert!(
            b.poll().is_some(),
            "{t:?}: deregister returned while the batch was in flight"
        );
        // The region is gone for new batches.
        let err = e
            .submit(
                &[Op::read(local.id(), 0, remote, 0, 1)],
                BatchOptions::default(),
            )
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownRegion);
    }
}

#[test]
fn deregistering_a_served_region_stops_remote_access() {
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        let target = engine(t);
        let served = target.alloc(BIG, MemoryKind::Host).unwrap();
        let e = engine(t);
        let remote = e.import(&served.desc());
        let local = e.alloc(BIG, MemoryKind::Host).unwrap();
        let st = e
            .submit(
                &[Op::read(local.id(), 0, remote, 0, 4096)],
                BatchOptions::default(),
            )
            .unwrap();
        assert_eq!(
            st.wait_blocking(Duration::from_secs(10)).unwrap().result,
            Ok(())
        );
        assert_eq!(target.region_count(), 1);
        target.deregister(&served, Duration::from_secs(10)).unwrap();
        assert_eq!(target.region_count(), 0);
        let st = e
            .submit(
                &[Op::write(local.id(), 0, remote, 0, 4096)],
                BatchOptions::default(),
            )
            .unwrap();
        assert_eq!(
            st.wait_blocking(Duration::from_secs(10)).unwrap().result,
            Err(ErrorKind::UnknownRegion),
            "{t:?}"
        );
        assert!(
            target.deregister(&served, Duration::from_secs(1)).is_err(),
            "double deregister"
        );
    }
}

#[test]
fn cancel_completes_the_batch_as_cancelled() {
    let target = engine(TransportKind::Tcp);
    let served = target.alloc(BIG, MemoryKind::Host).unwrap();
    let e = engine(TransportKind::Tcp);
    let remote = e.import(&served.desc());
    let local = e.alloc(BIG, MemoryKind::Host).unwrap();
    let ops: Vec<Op> = (0..64)
        .map(|_| Op::read(local.id(), 0, remote, 0, BIG))
        .collect();
    let t0 = Instant::now();
    let b = e.submit(&ops, BatchOptions::default()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    b.cancel();
    let st = b.wait_blocking(Duration::from_secs(20)).unwrap();
    assert_eq!(st.result, Err(ErrorKind::Cancelled));
    assert!(st.bytes < 64 * BIG);
    assert!(t0.elapsed() < Duration::from_secs(10));
    // The engine keeps working after a cancel.
    let st = e
        .submit(
            &[Op::read(local.id(), 0, remote, 0, 1 << 20)],
            BatchOptions::default(),
        )
        .unwrap();
    assert_eq!(
        st.wait_blocking(Duration::from_secs(10)).unwrap().result,
        Ok(())
    );
}

#[test]
fn bad_arguments_get_clear_errors() {
    let e = engine(TransportKind::Shm);
    let other = engine(TransportKind::Tcp);
    let local = e.alloc(4096, MemoryKind::Host).unwrap();
    let served = other.alloc(4096, MemoryKind::Host).unwrap();
    let remote = e.import(&served.desc());
    let zero = e
        .submit(
            &[Op::read(local.id(), 0, remote, 0, 0)],
            BatchOptions::default(),
        )
        .unwrap_err();
    assert!(zero.to_string().contains("length 0"), "{zero}");
    let oob = e
        .submit(
            &[Op::read(local.id(), 4000, remote, 0, 200)],
            BatchOptions::default(),
        )
        .unwrap_err();
    assert!(oob.to_string().contains("local range"), "{oob}");
    assert!(e.alloc(0, MemoryKind::Host).is_err());
    if kvmesh_gpu::cuda::available().is_err() {
        let gpu = e.alloc(4096, MemoryKind::Gpu { device: 0 }).unwrap_err();
        assert!(gpu.to_string().contains("CUDA"), "{gpu}");
    }
    let big = e.submit(
        &[Op::read(local.id(), 0, remote, 0, 10)],
        BatchOptions {
            timeout: None,
            notify: Some(vec![0; 70_000]),
        },
    );
    assert!(big.is_err());
    // Caller memory is not shareable, so shm-only refuses it with a reason.
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` outlives the region (deregistered below).
    let ext = unsafe { other.register(buf.as_mut_ptr(), 4096, MemoryKind::Host) }.unwrap();
    let r2 = e.import(&ext.desc());
    let err = e
        .submit(
            &[Op::read(local.id(), 0, r2, 0, 10)],
            BatchOptions::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("not shareable"), "{err}");
    other.deregister(&ext, Duration::from_secs(1)).unwrap();
    assert!("nope".parse::<TransportKind>().is_err());
}

#[test]
fn auto_uses_tcp_for_caller_memory_and_shm_for_engine_memory() {
    let target = engine(TransportKind::Auto);
    let mut buf = vec![7u8; 1 << 20];
    // SAFETY: `buf` outlives the region (deregistered below).
    let ext = unsafe { target.register(buf.as_mut_ptr(), 1 << 20, MemoryKind::Host) }.unwrap();
    let shm = target.alloc(1 << 20, MemoryKind::Host).unwrap();
    shm.fill(0, 1 << 20, 9).unwrap();
    let e = engine(TransportKind::Auto);
    let local = e.alloc(2 << 20, MemoryKind::Host).unwrap();
    let (r1, r2) = (e.import(&ext.desc()), e.import(&shm.desc()));
    let st = e
        .submit(
            &[
                Op::read(local.id(), 0, r1, 0, 1 << 20),
                Op::read(local.id(), 1 << 20, r2, 0, 1 << 20),
            ],
            BatchOptions::default(),
        )
        .unwrap()
        .wait_blocking(Duration::from_secs(10))
        .unwrap();
    assert_eq!(st.result, Ok(()));
    let mut out = vec![0u8; 2 << 20];
    local.read_at(0, &mut out).unwrap();
    assert!(out[..1 << 20].iter().all(|&b| b == 7) && out[1 << 20..].iter().all(|&b| b == 9));
    target.deregister(&ext, Duration::from_secs(1)).unwrap();
    drop(buf);
}

#[test]
fn an_engine_without_shm_serves_its_private_huge_page_memory_over_tcp() {
    let target = Engine::new(EngineConfig {
        transport: TransportKind::Tcp,
        shm: false,
        ..EngineConfig::default()
    })
    .unwrap();
    let len: u64 = 6 << 20;
    let served = target.alloc(len, MemoryKind::Host).unwrap();
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    served.write_at(0, &pattern).unwrap();
    // A same-host initiator that would take `shm` if it could.
    let e = engine(TransportKind::Auto);
    let remote = e.import(&served.desc());
    let local = e.alloc(len, MemoryKind::Host).unwrap();
    let run = |op: Op| {
        let st = e.submit(&[op], BatchOptions::default()).unwrap();
        assert_eq!(
            st.wait_blocking(Duration::from_secs(10)).unwrap().result,
            Ok(())
        );
    };
    run(Op::read(local.id(), 0, remote, 0, len - 3));
    let mut got = vec![0u8; len as usize];
    local.read_at(0, &mut got).unwrap();
    assert!(got[..(len - 3) as usize] == pattern[..(len - 3) as usize]);
    // Its last three bytes become the first three.
    run(Op::write(local.id(), 0, remote, len - 3, 3));
    served.read_at(len - 3, &mut got[..3]).unwrap();
    assert_eq!(&got[..3], &pattern[..3]);
}

#[test]
fn notification_to_a_dead_peer_fails() {
    let target = engine(TransportKind::Tcp);
    let served = target.alloc(4096, MemoryKind::Host).unwrap();
    let e = engine(TransportKind::Tcp);
    let remote = e.import(&served.desc());
    drop(served);
    drop(target);
    std::thread::sleep(Duration::from_millis(100));
    let st = e
        .notify(remote.peer, b"hello".to_vec(), Some(Duration::from_secs(5)))
        .unwrap();
    let st = st.wait_blocking(Duration::from_secs(10)).unwrap();
    assert_eq!(st.result, Err(ErrorKind::ConnectionLost));
}

#[test]
fn async_wait_completes_batches() {
    let target = engine(TransportKind::Tcp);
    let served = target.alloc(1 << 20, MemoryKind::Host).unwrap();
    served.fill(0, 1 << 20, 0x5A).unwrap();
    let e = engine(TransportKind::Tcp);
    let remote = e.import(&served.desc());
    let local = e.alloc(1 << 20, MemoryKind::Host).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = rt.block_on(async {
        let b = e
            .submit(
                &[Op::read(local.id(), 0, remote, 0, 1 << 20)],
                BatchOptions::default(),
            )
            .unwrap();
        b.wait().await
    });
    assert_eq!(st.result, Ok(()));
    assert_eq!(st.bytes, 1 << 20);
    let mut out = vec![0u8; 1 << 20];
    local.read_at(0, &mut out).unwrap();
    assert!(out.iter().all(|&b| b == 0x5A));
}

#[test]
fn rpc_calls_reach_the_handler_on_both_channels() {
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        let target = engine(t);
        let served = target.alloc(4096, MemoryKind::Host).unwrap();
        let e = engine(t);
        let remote = e.import(&served.desc());
        // No handler yet: a clear refusal, not a hang.
        let err = e
            .call_blocking(remote.peer, b"x".to_vec(), Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unreachable, "{t:?}: {err}");
        let me = e.descriptor().engine_id;
        target.set_rpc_handler(std::sync::Arc::new(move |from, req: &[u8]| {
            assert_eq!(from, me);
            let mut r = req.to_vec();
            r.reverse();
            r.into()
        }));
        for len in [0usize, 1, 4096, 1 << 20] {
            let req: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut want = req.clone();
            want.reverse();
            let got = e
                .call_blocking(remote.peer, req, Duration::from_secs(5))
                .unwrap();
            assert!(got == want, "{t:?} len {len}");
        }
        assert!(e
            .call_blocking(remote.peer, vec![0; (1 << 20) + 1], Duration::from_secs(5))
            .is_err());
    }
}

#[test]
fn a_timed_out_deregister_can_be_retried() {
    let target = engine(TransportKind::Tcp);
    let served = target.alloc(BIG, MemoryKind::Host).unwrap();
    let e = engine(TransportKind::Tcp);
    let remote = e.import(&served.desc());
    let local = e.alloc(BIG, MemoryKind::Host).unwrap();
    let ops: Vec<Op> = (0..16)
        .map(|_| Op::read(local.id(), 0, remote, 0, BIG))
        .collect();
    let b = e.submit(&ops, BatchOptions::default()).unwrap();
    let first = e.deregister(&local, Duration::from_micros(1));
    assert!(
        matches!(first, Err(kvmesh_gpu::Error::RegionBusy(_))),
        "{first:?}"
    );
    e.deregister(&local, Duration::from_secs(30)).unwrap();
    assert!(b.poll().is_some(), "the retry must wait for the batch");
    assert!(matches!(
        e.deregister(&local, Duration::from_secs(1)),
        Err(kvmesh_gpu::Error::UnknownRegion(_))
    ));
}

#[test]
fn shm_view_shows_a_mapped_same_host_region_and_nothing_else() {
    // shm: no view before the first batch maps the region, then the peer's
    // live bytes; gone once the peer deregisters the region.
    let target = engine(TransportKind::Shm);
    let served = target.alloc(1 << 20, MemoryKind::Host).unwrap();
    served.fill(0, 1 << 20, 3).unwrap();
    let e = engine(TransportKind::Shm);
    let remote = e.import(&served.desc());
    assert!(e.shm_view(&remote).is_none(), "mapped before any batch");
    let local = e.alloc(4096, MemoryKind::Host).unwrap();
    local.fill(0, 4096, 5).unwrap();
    let st = e
        .submit(
            &[Op::write(local.id(), 0, remote, 4096, 4096)],
            BatchOptions::default(),
        )
        .unwrap()
        .wait_blocking(Duration::from_secs(10))
        .unwrap();
    assert_eq!(st.result, Ok(()));
    let view = e.shm_view(&remote).expect("a view once mapped");
    assert_eq!(view.len(), 1 << 20);
    assert!(!view.is_revoked());
    // SAFETY: nobody writes the region while these slices live (the only
    // writers are this test's own batches and `write_at`, done by now).
    let (a, b) = unsafe { (view.bytes(0, 4096), view.bytes(4096, 4096)) };
    assert!(a.iter().all(|&x| x == 3) && b.iter().all(|&x| x == 5));
    // Later writes of the owner show through the same view.
    served
        .write_at(8, &0x0123_4567_89ab_cdefu64.to_le_bytes())
        .unwrap();
    assert_eq!(view.load_u64(8), 0x0123_4567_89ab_cdef);
    // Out of bounds panics instead of reading past the mapping.
    let v2 = view.clone();
    // SAFETY: the range is rejected before any read.
    let r = std::panic::catch_unwind(move || unsafe { v2.bytes(1 << 20, 1).len() });
    assert!(r.is_err());
    drop(view);
    target.deregister(&served, Duration::from_secs(10)).unwrap();
    assert!(
        e.shm_view(&remote).is_none(),
        "view after the region was revoked"
    );

    // tcp: never a view, even after batches.
    let target = engine(TransportKind::Tcp);
    let served = target.alloc(1 << 20, MemoryKind::Host).unwrap();
    let e = engine(TransportKind::Tcp);
    let remote = e.import(&served.desc());
    let local = e.alloc(4096, MemoryKind::Host).unwrap();
    let st = e
        .submit(
            &[Op::write(local.id(), 0, remote, 0, 4096)],
            BatchOptions::default(),
        )
        .unwrap()
        .wait_blocking(Duration::from_secs(10))
        .unwrap();
    assert_eq!(st.result, Ok(()));
    assert!(e.shm_view(&remote).is_none(), "a view over tcp");
}
