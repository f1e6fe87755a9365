//! Store behaviour that needs no separate processes: in-process peers on
//! 127.0.0.1. Every wait is bounded.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::{init_tracing, key, payload};
use kvmesh_gpu::EngineConfig;
use kvmesh_p2p_store::membership::quantize_weight;
use kvmesh_p2p_store::network::Multiaddr;
use kvmesh_p2p_store::{placement, Candidate, Error, PeerId, PutOptions, Store, StoreConfig};

fn config(mem: u64, bootstrap: Vec<Multiaddr>) -> StoreConfig {
    StoreConfig {
        bootstrap,
        mem_bytes: mem,
        dead_after: Duration::from_millis(1500),
        announce_interval: Duration::from_millis(250),
        repair_delay: Duration::from_millis(200),
        engine: EngineConfig {
            io_threads: 1,
            shm_threads: 1,
            ..EngineConfig::default()
        },
        op_timeout: Duration::from_secs(5),
        ..StoreConfig::default()
    }
}

async fn addr(s: &Store) -> Multiaddr {
    s.listen_addrs().await[0]
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(
            s.peer_id_text().parse().unwrap(),
        ))
}

async fn until(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < bound, "timed out after {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

/// A goodbye makes the others drop the peer, release what it held and
/// repair its copies at once, long before `dead_after`; and the leaving
/// store stops every task it ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_peer_is_dropped_at_once_and_its_leases_released() {
    init_tracing();
    let mut cfg = config(32 << 20, Vec::new());
    cfg.dead_after = Duration::from_secs(20);
    let a = Store::start(cfg.clone()).await.unwrap();
    cfg.bootstrap = vec![addr(&a).await];
    let b = Store::start(cfg.clone()).await.unwrap();
    let c = Store::start(cfg).await.unwrap();
    for s in [&a, &b, &c] {
        s.wait_for_members(3, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let opts = PutOptions {
        replicas: 2,
        ..PutOptions::default()
    };
    let keys: Vec<_> = (0..12).map(|i| key(&format!("leave-{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        a.put(*k, &payload(i as u64, 64 << 10), opts).await.unwrap();
    }
    // B leases every object it can find on another holder; those holders
    // now count leases owned by B.
    let leases: Vec<_> = b
        .lease_many(&keys, Duration::from_secs(30))
        .await
        .into_iter()
        .flatten()
        .filter(|l| l.holder != *b.peer_id())
        .collect();
    assert!(!leases.is_empty());
    let held = |s: &Store| s.stats().leases;
    assert_eq!(held(&a) + held(&c), leases.len());

    let t0 = Instant::now();
    b.shutdown().await;
    assert_eq!(b.running_tasks(), 0, "tasks left after shutdown");
    let gone = until("A and C drop B", Duration::from_secs(5), || {
        a.peers().len() == 2 && c.peers().len() == 2
    })
    .await;
    assert!(gone < Duration::from_secs(5));
    eprintln!("B left; the others dropped it after {:?}", t0.elapsed());
    until("B's leases released", Duration::from_secs(5), || {
        held(&a) + held(&c) == 0
    })
    .await;
    // Every object has two copies again, on A and C.
    let t1 = Instant::now();
    loop {
        let mut ok = true;
        for k in &keys {
            if a.locate(*k).await.unwrap().len() != 2 {
                ok = false;
            }
        }
        if ok {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(10), "not repaired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(c.get(*k).await.unwrap(), Some(payload(i as u64, 64 << 10)));
    }
    // A stopped store refuses holder work and a second shutdown is a no-op.
    b.shutdown().await;
    for s in [&a, &c] {
        s.shutdown().await;
        assert_eq!(s.running_tasks(), 0);
    }
}

/// A put whose first HRW target refuses the object (too large for it)
/// stores the copy on the next peer, and records where it really is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_moves_on_when_a_target_refuses() {
    init_tracing();
    let big = Store::start(config(64 << 20, Vec::new())).await.unwrap();
    let boot = vec![addr(&big).await];
    // 1 MiB of memory: objects up to 256 KiB.
    let small = Store::start(config(1 << 20, boot.clone())).await.unwrap();
    let client = Store::start(config(0, boot)).await.unwrap();
    client
        .wait_for_members(2, Duration::from_secs(10))
        .await
        .unwrap();
    let members: Vec<Candidate> = client
        .peers()
        .iter()
        .map(|p| {
            let id: libp2p::PeerId = p.peer_id.parse().unwrap();
            Candidate::new(
                PeerId::from_bytes(&id.to_bytes()).unwrap(),
                quantize_weight(p.free, 3),
            )
        })
        .collect();
    // A key the small peer ranks first for.
    let k = (0..1000)
        .map(|i| key(&format!("refused-{i}")))
        .find(|k| placement::ranked(k, &members)[0] == *small.peer_id())
        .expect("some key ranks the small peer first");
    let data = payload(5, 512 << 10);
    client
        .put(
            k,
            &data,
            PutOptions {
                replicas: 2,
                ..PutOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(client.locate(k).await.unwrap(), vec![big.peer_id().clone()]);
    assert_eq!(client.get(k).await.unwrap(), Some(data));
    for s in [&client, &small, &big] {
        s.shutdown().await;
    }
}

/// Objects spilled to the SSD tier survive a restart of their holder: the
/// new incarnation indexes the files, announces them, and serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_objects_are_served_after_a_restart() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(2 << 20, Vec::new());
    cfg.ssd = Some((dir.path().to_path_buf(), 32 << 20));
    let holder = Store::start(cfg.clone()).await.unwrap();
    let keys: Vec<_> = (0..24).map(|i| key(&format!("restart-{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        holder
            .put(*k, &payload(i as u64, 256 << 10), PutOptions::default())
            .await
            .unwrap();
    }
    until("spills", Duration::from_secs(5), || {
        holder.stats().ssd_objects >= 12
    })
    .await;
    let spilled = holder.stats().ssd_objects;
    holder.shutdown().await;
    drop(holder);

    let again = Store::start(cfg).await.unwrap();
    // A spill in flight at shutdown may still have landed.
    let restored = again.stats().ssd_objects;
    assert!(
        restored >= spilled,
        "{restored} restored, {spilled} spilled"
    );
    let client = Store::start(config(0, vec![addr(&again).await]))
        .await
        .unwrap();
    client
        .wait_for_members(1, Duration::from_secs(10))
        .await
        .unwrap();
    let mut served = 0;
    for (i, k) in keys.iter().enumerate() {
        if let Some(v) = client.get(*k).await.unwrap() {
            assert!(v == payload(i as u64, 256 << 10), "object {i}");
            served += 1;
        }
    }
    assert_eq!(served, restored, "every restored object is served");
    client.shutdown().await;
    again.shutdown().await;
}

/// Clear errors: a client with nothing to join, and settings that cannot
/// work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unjoinable_client_and_bad_settings_fail_clearly() {
    init_tracing();
    let alone = Store::start(config(0, Vec::new())).await.unwrap();
    let err = alone
        .wait_for_members(1, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotJoined(_)), "{err}");
    assert!(err.to_string().contains("no bootstrap address"), "{err}");
    assert_eq!(alone.get(key("x")).await.unwrap(), None);
    let put = alone
        .put(key("x"), b"data", PutOptions::default())
        .await
        .unwrap_err();
    assert!(put.to_string().contains("no live holder"), "{put}");
    alone.shutdown().await;

    // Nothing listens at the bootstrap address.
    let mut cfg = config(0, vec!["/ip4/127.0.0.1/tcp/1".parse().unwrap()]);
    cfg.op_timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let lost = Store::start(cfg).await.unwrap();
    let err = lost
        .wait_for_members(1, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Connection refused"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    lost.shutdown().await;

    let mut bad = config(1 << 20, Vec::new());
    bad.announce_interval = bad.dead_after;
    let err = Store::start(bad).await.unwrap_err();
    assert!(err.to_string().contains("announce_interval"), "{err}");
}

/// Copies on a key's first HRW holders get no DHT record (placement finds
/// them). When peers join that outrank the holder so far that a get no
/// longer asks it, the holder publishes provider records, and a new
/// client's get finds the copies through the DHT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_placement_no_longer_finds_are_found_through_the_dht() {
    init_tracing();
    let a = Store::start(config(64 << 20, Vec::new())).await.unwrap();
    let boot = vec![addr(&a).await];
    let keys: Vec<_> = (0..64).map(|i| key(&format!("displaced-{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        a.put(*k, &payload(i as u64, 4096), PutOptions::default())
            .await
            .unwrap();
    }
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(Store::start(config(64 << 20, boot.clone())).await.unwrap());
    }
    let client = Store::start(config(0, boot)).await.unwrap();
    client
        .wait_for_members(4, Duration::from_secs(10))
        .await
        .unwrap();
    let members: Vec<Candidate> = client
        .peers()
        .iter()
        .map(|p| {
            let id: libp2p::PeerId = p.peer_id.parse().unwrap();
            Candidate::new(
                PeerId::from_bytes(&id.to_bytes()).unwrap(),
                quantize_weight(p.free, 3),
            )
        })
        .collect();
    // Keys whose only copy is on `a`, ranked last of four: a get asks three
    // peers by placement, so only a provider record leads to `a`.
    let last: Vec<(usize, _)> = keys
        .iter()
        .enumerate()
        .filter(|(_, k)| placement::ranked(k, &members)[3] == *a.peer_id())
        .map(|(i, k)| (i, *k))
        .collect();
    assert!(!last.is_empty(), "no key ranks the first holder last");
    let t0 = Instant::now();
    for (i, k) in last {
        loop {
            match client.get(k).await.unwrap() {
                Some(v) => {
                    assert_eq!(v, payload(i as u64, 4096));
                    break;
                }
                None => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(15),
                        "{k} not found through the DHT"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    for s in others.iter().chain([&client, &a]) {
        s.shutdown().await;
    }
}

/// Same-host gets read the holder's location table (no round trip, bytes
/// checked); removed and evicted objects are never served from it, and
/// every get returns the bytes that were put or nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_host_gets_use_the_location_table_and_never_serve_stale_bytes() {
    init_tracing();
    // 4 MiB of pool: about 60 objects of 64 KiB before eviction.
    let holder = Store::start(config(4 << 20, Vec::new())).await.unwrap();
    let client = Store::start(config(0, vec![addr(&holder).await]))
        .await
        .unwrap();
    client
        .wait_for_members(1, Duration::from_secs(10))
        .await
        .unwrap();
    let local = || client.metrics().local_reads.load(Relaxed);
    let k = |i: u64| key(&format!("table-{i}"));
    for i in 0..8 {
        client
            .put(k(i), &payload(i, 64 << 10), PutOptions::default())
            .await
            .unwrap();
    }
    for i in 0..8 {
        assert_eq!(client.get(k(i)).await.unwrap(), Some(payload(i, 64 << 10)));
    }
    assert_eq!(local(), 8, "same-host gets did not use the location table");
    // A removed object is gone from the table at once.
    assert_eq!(client.remove(k(0)).await.unwrap(), 1);
    assert_eq!(client.get(k(0)).await.unwrap(), None);
    // Churn: later puts evict earlier objects and reuse their memory.
    for i in 8..200 {
        client
            .put(k(i), &payload(i, 64 << 10), PutOptions::default())
            .await
            .unwrap();
    }
    let before = local();
    let mut found = 0;
    for i in 1..200 {
        if let Some(v) = client.get(k(i)).await.unwrap() {
            assert_eq!(v, payload(i, 64 << 10), "object {i}");
            found += 1;
        }
    }
    assert!(found >= 40, "only {found} objects left");
    assert!(
        local() - before >= found,
        "resident objects were not read locally"
    );
    for s in [&client, &holder] {
        s.shutdown().await;
    }
}

/// Over tcp a get is one round trip: the holder's reply to a fetch carries
/// a lease and the object's bytes, sent from its pool and received straight
/// into the destination (a vector or a registered region). A destination
/// too small is refused, not truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gets_over_tcp_bring_the_bytes_with_the_reply() {
    init_tracing();
    let tcp = |mem, boot| {
        let mut c = config(mem, boot);
        c.engine.transport = kvmesh_gpu::TransportKind::Tcp;
        c
    };
    let holder = Store::start(tcp(16 << 20, Vec::new())).await.unwrap();
    let client = Store::start(tcp(0, vec![addr(&holder).await]))
        .await
        .unwrap();
    client
        .wait_for_members(1, Duration::from_secs(10))
        .await
        .unwrap();
    let one_trip = || client.metrics().inline_reads.load(Relaxed);
    let sizes = [1usize, 4096, 64 << 10, (256 << 10) + 1, 1 << 20, 3 << 20];
    let r = client
        .engine()
        .alloc(4 << 20, kvmesh_gpu::MemoryKind::Host)
        .unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let k = key(&format!("fetch-{i}"));
        client
            .put(k, &payload(i as u64, n), PutOptions::default())
            .await
            .unwrap();
        let before = one_trip();
        assert_eq!(
            client.get(k).await.unwrap(),
            Some(payload(i as u64, n)),
            "{n} B"
        );
        // Into a registered region too, with room to spare.
        assert_eq!(
            client.get_into(k, &r, 3, 4 << 20).await.unwrap(),
            Some(n as u64)
        );
        let mut back = vec![0u8; n];
        r.read_at(3, &mut back).unwrap();
        assert_eq!(back, payload(i as u64, n), "{n} B into a region");
        assert_eq!(one_trip() - before, 2, "{n} B: one round trip each");
        // Too little room: a clear error, the region's bytes untouched.
        if n > 1 {
            let err = client.get_into(k, &r, 3, n as u64 - 1).await.unwrap_err();
            assert!(
                matches!(err, kvmesh_p2p_store::Error::InvalidArgument(_)),
                "{err}"
            );
            r.read_at(3, &mut back).unwrap();
            assert_eq!(back, payload(i as u64, n), "{n} B: region changed");
        }
    }
    // Every lease ends.
    until("leases end", Duration::from_secs(5), || {
        holder.stats().leases == 0
    })
    .await;
    for s in [&client, &holder] {
        s.shutdown().await;
    }
}
