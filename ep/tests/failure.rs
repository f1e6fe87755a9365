//! A rank that stops (SIGSTOP) or dies (SIGKILL) makes the others fail
//! within the timeout with an error naming it; the survivors then rebuild
//! the group without it and carry on. Rank 2 is a real `moe-bench` rank
//! process; ranks 0 and 1 run in this process with engines of their own.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvmesh_ep::rendezvous::{self, Server};
use kvmesh_ep::workload::{run_rank, RunParams};
use kvmesh_ep::{EpBuffers, EpConfig, EpGroup};
use kvmesh_gpu::{Engine, TransportKind};

const TIMEOUT: Duration = Duration::from_millis(1500);

fn cfg() -> EpConfig {
    let mut c = EpConfig::new(12, 256, 3, 32);
    c.timeout = TIMEOUT;
    c
}

fn params(iters: usize) -> RunParams {
    RunParams {
        tokens: 32,
        routing: "uniform".into(),
        seed: 11,
        iters,
        warmup: 0,
        verify: true,
        expert_mode: "per-expert".into(),
        reuse_handle: false,
        send_buffers: true,
    }
}

fn spawn_rank2(addr: &str, transport: &str) -> Child {
    let case = serde_json::json!({
        "config": "test", "ranks": 3, "experts": 12, "hidden": 256, "topk": 3,
        "dtype": "Bf16", "fp8": false, "transport": transport, "implementation": "kvmesh",
        "timeout_ms": TIMEOUT.as_millis() as u64, "run": params(1_000_000),
    });
    Command::new(env!("CARGO_BIN_EXE_moe-bench"))
        .args([
            "--rank",
            "2",
            "--rendezvous",
            addr,
            "--case",
            &case.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rank 2")
}

fn scenario(signal: i32, transport: TransportKind, tname: &str) {
    let server = Server::bind("127.0.0.1:0", 3).unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let serve = std::thread::spawn(move || server.run(Duration::from_secs(30)));
    let mut child = spawn_rank2(&addr, tname);
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let engine = common::engine(transport);
                let bufs = EpBuffers::alloc(&engine, &cfg(), r, 3).unwrap();
                let j = rendezvous::join(
                    &addr,
                    r,
                    3,
                    &cfg().fingerprint(),
                    &bufs.desc(),
                    Duration::from_secs(30),
                )
                .unwrap();
                let mut g = EpGroup::new(bufs, &j.descs).unwrap();
                let (rep, err) = run_rank(&mut g, &params(1_000_000));
                let at = Instant::now();
                let err = err.expect("the loop can only end with an error");
                (engine, g, rep, err, at, j)
            })
        })
        .collect();
    let _members = serve.join().unwrap().expect("rendezvous");
    // Let the three ranks run a while, then stop or kill rank 2.
    std::thread::sleep(Duration::from_millis(600));
    let stopped_at = Instant::now();
    // SAFETY: plain FFI call on the pid of a child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    let mut engines = Vec::new();
    let mut old = Vec::new();
    for h in ranks {
        let (engine, g, rep, err, at, _conn) = h.join().unwrap();
        old.push(g);
        assert!(
            rep.combines_checked > 0,
            "no iteration completed before the failure"
        );
        assert!(rep.verified, "{:?}", rep.error);
        let named = err.rank() == Some(2);
        assert!(named, "error does not name rank 2: {err}");
        assert!(err.to_string().contains("rank 2"), "{err}");
        let took = at.duration_since(stopped_at);
        assert!(
            took <= TIMEOUT * 2 + Duration::from_millis(500),
            "failed after {took:?}: {err}"
        );
        engines.push(engine);
    }
    // Both survivors saw the failure: release the broken group's buffers
    // (closing earlier would make a survivor still inside an operation of
    // the old group blame the one that closed).
    for (g, e) in old.into_iter().zip(&engines) {
        let regions = e.region_count();
        g.close(Duration::from_millis(300)).unwrap();
        // Receive (with the send buffers) and staging.
        assert_eq!(e.region_count(), regions - 2);
    }
    // Rebuild with the two survivors (same engines, new buffers and ranks).
    let bufs: Vec<EpBuffers> = engines
        .iter()
        .enumerate()
        .map(|(r, e): (usize, &Engine)| EpBuffers::alloc(e, &cfg(), r, 2).unwrap())
        .collect();
    let groups = common::form_from(bufs);
    for (g, (rep, err)) in common::on_all(groups, |g| run_rank(g, &params(3))) {
        assert!(err.is_none(), "rebuilt rank {}: {err:?}", g.rank());
        assert!(rep.verified && rep.combines_checked == 3, "{:?}", rep.error);
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn stopped_rank_is_named_and_group_rebuilds_shm() {
    scenario(libc::SIGSTOP, TransportKind::Shm, "shm");
}

#[test]
fn killed_rank_is_named_and_group_rebuilds_tcp() {
    scenario(libc::SIGKILL, TransportKind::Tcp, "tcp");
}

/// A rank that gives up tells the others whom it blames, so they fail at
/// once (naming the same rank) instead of each running into its own
/// timeout, and never blame the rank that told them.
#[test]
fn a_rank_that_gives_up_makes_the_others_fail_at_once_naming_the_culprit() {
    // Rank 1 waits 300 ms, rank 0 would wait 20 s; rank 2 never shows up
    // after formation (its thread just holds the group).
    let bufs: Vec<EpBuffers> = (0..3)
        .map(|r| {
            let mut c = cfg();
            c.timeout = if r == 1 {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(20)
            };
            EpBuffers::alloc(&common::engine(TransportKind::Shm), &c, r, 3).unwrap()
        })
        .collect();
    let mut groups = common::form_from(bufs);
    let hung = groups.pop().unwrap();
    let t0 = Instant::now();
    let res = common::on_all(groups, |g| {
        let r = g.barrier();
        (r, Instant::now())
    });
    for (g, (r, at)) in res {
        let err = r.unwrap_err();
        assert_eq!(err.rank(), Some(2), "rank {} blamed: {err}", g.rank());
        assert!(
            at - t0 < Duration::from_secs(3),
            "rank {} took {:?}",
            g.rank(),
            at - t0
        );
        if g.rank() == 0 {
            assert!(
                matches!(
                    err,
                    kvmesh_ep::Error::PeerFailed {
                        rank: 2,
                        reported_by: 1
                    }
                ),
                "{err}"
            );
        }
    }
    drop(hung);
}
