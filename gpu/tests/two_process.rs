//! Two-process tests of the engine on loopback, for both transports: the
//! target is a separate `xfer-bench --mode target` process.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{engine, nix_kill, Target};
use kvmesh_gpu::{pattern, BatchOptions, ErrorKind, MemoryKind, Op, TransportKind};
use rand::{Rng, SeedableRng};

const TRANSPORTS: [TransportKind; 2] = [TransportKind::Tcp, TransportKind::Shm];

fn wait(b: kvmesh_gpu::Batch) -> kvmesh_gpu::BatchStatus {
    b.wait_blocking(Duration::from_secs(60))
        .expect("batch must complete by its deadline")
}

#[test]
fn random_transfers_are_byte_exact() {
    const REGION: u64 = 16 << 20;
    for t in TRANSPORTS {
        let mut target = Target::start(REGION, 11);
        let e = engine(t);
        let remote = e.import(&target.desc);
        let local = e.alloc(REGION, MemoryKind::Host).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // What the target's region must hold: its fill pattern, then our writes.
        let mut model = vec![0u8; REGION as usize];
        pattern::fill(&mut model, 11, 0);
        for round in 0..6 {
            // Reads: random ranges, including 1 byte, unaligned, > slice size,
            // and ending exactly at the region end.
            let mut ops = Vec::new();
            let mut expect = Vec::new();
            let mut lo = 0u64;
            for k in 0..12 {
                let len = match k {
                    0 => 1,
                    1 => 1_000_003,
                    _ => rng.gen_range(1..400_000),
                };
                let roff = if k == 2 {
                    REGION - len
                } else {
                    rng.gen_range(0..REGION - len)
                };
                ops.push(Op::read(local.id(), lo, remote, roff, len));
                expect.push((lo, roff, len));
                lo += len + rng.gen_range(0..13);
            }
            let st = wait(e.submit(&ops, BatchOptions::default()).unwrap());
            assert_eq!(st.result, Ok(()), "{t:?} round {round}: {st:?}");
            for (i, &(lo, roff, len)) in expect.iter().enumerate() {
                assert_eq!(st.ops[i].bytes, len);
                let mut buf = vec![0u8; len as usize];
                local.read_at(lo, &mut buf).unwrap();
                let want = &model[roff as usize..(roff + len) as usize];
                assert!(
                    buf == want,
                    "{t:?} round {round} read op {i} ({roff}+{len})"
                );
            }
            // Writes: disjoint random ranges carrying a new pattern, checked
            // by the target process itself.
            let seed = 100 + round;
            let mut cursor = 0u64;
            let mut writes = Vec::new();
            while writes.len() < 10 {
                let len = rng.gen_range(1..700_000);
                let roff = cursor + rng.gen_range(0..5000);
                if roff + len > REGION {
                    break;
                }
                let lo = rng.gen_range(0..REGION - len);
                let mut buf = vec![0u8; len as usize];
                pattern::fill(&mut buf, seed, roff);
                local.write_at(lo, &buf).unwrap();
                writes.push((Op::write(local.id(), lo, remote, roff, len), roff, len));
                cursor = roff + len;
            }
            // Write ranges overlap locally in general, so send them one by one.
            for (op, roff, len) in &writes {
                let mut buf = vec![0u8; *len as usize];
                pattern::fill(&mut buf, seed, *roff);
                local.write_at(op.local_offset, &buf).unwrap();
                let st = wait(e.submit(&[*op], BatchOptions::default()).unwrap());
                assert_eq!(st.result, Ok(()), "{t:?}: {st:?}");
                assert_eq!(
                    target.check(seed, *roff, *len),
                    "CHECK ok",
                    "{t:?} write {roff}+{len}"
                );
                model[*roff as usize..(*roff + *len) as usize].copy_from_slice(&buf);
            }
        }
        assert!(target.alive());
    }
}

#[test]
fn out_of_bounds_and_unknown_regions_are_refused_and_target_keeps_serving() {
    for t in TRANSPORTS {
        let mut target = Target::start(1 << 20, 3);
        let e = engine(t);
        let real = e.import(&target.desc);
        let local = e.alloc(4 << 20, MemoryKind::Host).unwrap();
        // The initiator's own check refuses what the descriptor says is outside.
        let err = e.submit(
            &[Op::read(local.id(), 0, real, (1 << 20) - 10, 11)],
            BatchOptions::default(),
        );
        assert_eq!(err.unwrap_err().kind(), ErrorKind::OutOfBounds);
        // A lying descriptor gets past the initiator; the serving side (tcp)
        // or the mapping bound (shm) must refuse it.
        let mut lie = real;
        lie.len = 4 << 20;
        for op in [
            Op::read(local.id(), 0, lie, (1 << 20) - 10, 11),
            Op::write(local.id(), 0, lie, 1 << 20, 1),
            Op::write(local.id(), 0, lie, 3 << 20, 1 << 20),
        ] {
            let st = wait(e.submit(&[op], BatchOptions::default()).unwrap());
            assert_eq!(st.result, Err(ErrorKind::OutOfBounds), "{t:?} {op:?}");
        }
        // A refused write between accepted ones: only it fails, and the
        // writes around it land (acknowledgements are grouped on tcp).
        let mut pat = vec![0u8; 3 << 16];
        pattern::fill(&mut pat, 77, 0);
        local.write_at(0, &pat).unwrap();
        let mixed = [
            Op::write(local.id(), 0, real, 0, 1 << 16),
            Op::write(local.id(), 0, lie, 2 << 20, 10),
            Op::write(local.id(), 2 << 16, real, 2 << 16, 1 << 16),
        ];
        let st = wait(e.submit(&mixed, BatchOptions::default()).unwrap());
        assert_eq!(st.result, Err(ErrorKind::OutOfBounds), "{t:?}");
        assert_eq!(
            st.ops[0],
            kvmesh_gpu::OpStatus {
                bytes: 1 << 16,
                error: None
            },
            "{t:?}"
        );
        assert_eq!(st.ops[1].error, Some(ErrorKind::OutOfBounds), "{t:?}");
        assert_eq!(
            st.ops[2],
            kvmesh_gpu::OpStatus {
                bytes: 1 << 16,
                error: None
            },
            "{t:?}"
        );
        assert_eq!(target.check(77, 0, 1 << 16), "CHECK ok");
        assert_eq!(target.check(77, 2 << 16, 1 << 16), "CHECK ok");
        assert_eq!(
            target.check(3, 1 << 16, 1 << 16),
            "CHECK ok",
            "the range between must be untouched"
        );
        // Restore the target's fill pattern for the checks below.
        let mut fillp = vec![0u8; 3 << 16];
        pattern::fill(&mut fillp, 3, 0);
        local.write_at(0, &fillp).unwrap();
        let st = wait(
            e.submit(
                &[Op::write(local.id(), 0, real, 0, 3 << 16)],
                BatchOptions::default(),
            )
            .unwrap(),
        );
        assert_eq!(st.result, Ok(()));
        let mut ghost = real;
        ghost.region += 1000;
        let st = wait(
            e.submit(
                &[Op::read(local.id(), 0, ghost, 0, 10)],
                BatchOptions::default(),
            )
            .unwrap(),
        );
        assert_eq!(st.result, Err(ErrorKind::UnknownRegion), "{t:?}");
        // The target still serves correct requests on the same engine.
        let st = wait(
            e.submit(
                &[Op::read(local.id(), 0, real, 0, 1 << 20)],
                BatchOptions::default(),
            )
            .unwrap(),
        );
        assert_eq!(st.result, Ok(()), "{t:?}");
        let mut buf = vec![0u8; 1 << 20];
        local.read_at(0, &mut buf).unwrap();
        assert_eq!(pattern::check(&buf, 3, 0), None);
        assert_eq!(
            target.check(3, 0, 1 << 20),
            "CHECK ok",
            "refused writes must not land"
        );
        assert!(target.alive());
    }
}

#[test]
fn peer_without_the_secret_is_refused() {
    for t in TRANSPORTS {
        let mut target = Target::start(1 << 20, 5);
        let e = engine(t);
        let mut forged = target.desc.clone();
        forged.peer.secret[0] ^= 0x55;
        let remote = e.import(&forged);
        let local = e.alloc(1 << 20, MemoryKind::Host).unwrap();
        local.fill(0, 1 << 20, 0xAB).unwrap();
        let st = wait(
            e.submit(
                &[Op::write(local.id(), 0, remote, 0, 4096)],
                BatchOptions::default(),
            )
            .unwrap(),
        );
        assert_eq!(st.result, Err(ErrorKind::AuthFailed), "{t:?}");
        let st = wait(
            e.submit(
                &[Op::read(local.id(), 0, remote, 0, 4096)],
                BatchOptions::default(),
            )
            .unwrap(),
        );
        // A retry after a refused handshake is refused again; under heavy
        // load the server's close can reach the client as a reset while it
        // still writes its proof, which reads as a lost connection.
        assert!(
            matches!(
                st.result,
                Err(ErrorKind::AuthFailed | ErrorKind::ConnectionLost)
            ),
            "{t:?}: {:?}",
            st.result
        );
        let mut buf = vec![0u8; 4096];
        local.read_at(0, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0xAB),
            "nothing may be read without the secret"
        );
        assert_eq!(
            target.check(5, 0, 1 << 20),
            "CHECK ok",
            "nothing may be written without the secret"
        );
        // The rightful holder still gets in.
        let e2 = engine(t);
        let ok = e2.import(&target.desc);
        let l2 = e2.alloc(4096, MemoryKind::Host).unwrap();
        assert_eq!(
            wait(
                e2.submit(
                    &[Op::read(l2.id(), 0, ok, 0, 4096)],
                    BatchOptions::default()
                )
                .unwrap()
            )
            .result,
            Ok(())
        );
    }
}

#[test]
fn garbage_on_the_data_ports_does_not_crash_the_target() {
    let mut target = Target::start(1 << 20, 9);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let addr = target.desc.peer.tcp[0];
    let shm_name = target.desc.peer.shm.clone().unwrap();
    for i in 0..40 {
        let n = rng.gen_range(1..5000);
        let mut junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        if i % 4 == 0 && junk.len() >= 4 {
            junk[..4].copy_from_slice(&0x4b56_4d48u32.to_le_bytes()); // valid magic, junk after
        }
        if i % 2 == 0 {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                let _ = s.write_all(&junk);
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut sink = [0u8; 256];
                let _ = s.read(&mut sink);
            }
        } else {
            use std::os::linux::net::SocketAddrExt;
            let a =
                std::os::unix::net::SocketAddr::from_abstract_name(shm_name.as_bytes()).unwrap();
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect_addr(&a) {
                let _ = s.write_all(&junk);
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut sink = [0u8; 256];
                let _ = s.read(&mut sink);
            }
        }
    }
    assert!(target.alive(), "target died from garbage input");
    for t in TRANSPORTS {
        let e = engine(t);
        let remote = e.import(&target.desc);
        let local = e.alloc(1 << 20, MemoryKind::Host).unwrap();
        let st = wait(
            e.submit(
                &[Op::read(local.id(), 0, remote, 0, 1 << 20)],
                BatchOptions::default(),
            )
            .unwrap(),
        );
        assert_eq!(st.result, Ok(()), "{t:?}");
    }
    assert_eq!(target.check(9, 0, 1 << 20), "CHECK ok");
}

#[test]
fn target_killed_mid_batch_fails_the_batch_before_its_deadline() {
    const REGION: u64 = 128 << 20;
    for t in TRANSPORTS {
        let target = Target::start(REGION, 1);
        let e = engine(t);
        let remote = e.import(&target.desc);
        let local = e.alloc(REGION, MemoryKind::Host).unwrap();
        // Warm up (connect, map) so the kill lands during the data transfer.
        assert_eq!(
            wait(
                e.submit(
                    &[Op::read(local.id(), 0, remote, 0, 4096)],
                    BatchOptions::default()
                )
                .unwrap()
            )
            .result,
            Ok(())
        );
        // Many gigabytes: far longer than the kill delay on any machine.
        let ops: Vec<Op> = (0..64)
            .map(|_| Op::read(local.id(), 0, remote, 0, REGION))
            .collect();
        let deadline = Duration::from_secs(30);
        let t0 = Instant::now();
        let b = e
            .submit(
                &ops,
                BatchOptions {
                    timeout: Some(deadline),
                    notify: None,
                },
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            b.poll().is_none(),
            "{t:?}: batch finished before the kill; make it larger"
        );
        nix_kill(target.pid(), libc::SIGKILL);
        let st = wait(b);
        let took = t0.elapsed();
        assert_eq!(
            st.result,
            Err(ErrorKind::ConnectionLost),
            "{t:?}: {:?}",
            st.result
        );
        assert!(took < deadline, "{t:?}: took {took:?}");
        assert!(st.bytes < 64 * REGION);
        drop(target);
    }
}

#[test]
fn stalled_target_times_out_instead_of_hanging() {
    let target = Target::start(64 << 20, 1);
    let e = engine(TransportKind::Tcp);
    let remote = e.import(&target.desc);
    let local = e.alloc(64 << 20, MemoryKind::Host).unwrap();
    assert_eq!(
        wait(
            e.submit(
                &[Op::read(local.id(), 0, remote, 0, 4096)],
                BatchOptions::default()
            )
            .unwrap()
        )
        .result,
        Ok(())
    );
    nix_kill(target.pid(), libc::SIGSTOP);
    let ops: Vec<Op> = (0..8)
        .map(|_| Op::read(local.id(), 0, remote, 0, 64 << 20))
        .collect();
    let t0 = Instant::now();
    let b = e
        .submit(
            &ops,
            BatchOptions {
                timeout: Some(Duration::from_millis(800)),
                notify: None,
            },
        )
        .unwrap();
    let st = wait(b);
    assert_eq!(st.result, Err(ErrorKind::Timeout));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t0.elapsed()
    );
    nix_kill(target.pid(), libc::SIGCONT);
}

#[test]
fn notifications_arrive_only_after_the_bytes() {
    const REGION: u64 = 32 << 20;
    for t in TRANSPORTS {
        let mut target = Target::start(REGION, 2);
        let e = engine(t);
        let remote = e.import(&target.desc);
        let local = e.alloc(REGION, MemoryKind::Host).unwrap();
        for round in 0..5u64 {
            let seed = 1000 + round;
            let mut buf = vec![0u8; REGION as usize];
            pattern::fill(&mut buf, seed, 0);
            local.write_at(0, &buf).unwrap();
            // Many slices over several lanes; the target checks the whole
            // range the moment the notification arrives.
            let ops: Vec<Op> = (0..32)
                .map(|i| Op::write(local.id(), i << 20, remote, i << 20, 1 << 20))
                .collect();
            let msg = format!("{seed} 0 {REGION}");
            let b = e
                .submit(
                    &ops,
                    BatchOptions {
                        timeout: None,
                        notify: Some(msg.clone().into_bytes()),
                    },
                )
                .unwrap();
            let answer = target.cmd("notify-check 20");
            assert_eq!(answer, format!("NOTIFY ok {msg}"), "{t:?} round {round}");
            assert_eq!(wait(b).result, Ok(()));
        }
        // A notification-only batch is delivered too.
        assert!(e
            .submit(
                &[],
                BatchOptions {
                    timeout: None,
                    notify: Some(b"x".to_vec())
                }
            )
            .is_err());
        let b = e.notify(remote.peer, b"2 0 16".to_vec(), None).unwrap();
        assert_eq!(wait(b).result, Ok(()));
        assert_eq!(target.cmd("notify 5"), "NOTIFY 2 0 16");
    }
}
