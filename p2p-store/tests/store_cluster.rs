//! The peer store end to end: real `p2pctl node` processes on 127.0.0.1
//! (and in a network namespace for mDNS), driven by the `p2pctl` client
//! commands and by in-test `Store` clients. Nodes are killed on drop, also
//! when a test fails; every wait is bounded.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{init_tracing, key, payload, run_ctl, wait_until, Cluster, Netns, NETNS_ADDR};
use kvmesh_gpu::TransportKind;
use kvmesh_p2p_store::{ErrorKind, ObjectKey, Pin, PutOptions, Store};

/// Liveness settings that keep failure detection and repair quick.
const FAST: [&str; 6] = [
    "--dead-after",
    "1.5",
    "--announce-interval",
    "0.25",
    "--repair-delay",
    "0.3",
];

fn args<'a>(base: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(more).copied().collect()
}

fn block<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

// ---------------------------------------------------------------------------
// Discovery by bootstrap: put from one, get from every other.

#[test]
fn bootstrap_peers_find_each_other_and_serve_every_get() {
    init_tracing();
    let mut c = Cluster::new();
    c.spawn_bootstrapped(4, &args(&FAST, &["--mem", "64MiB"]));
    let mut want: Vec<String> = c.nodes.iter().map(|n| n.peer_id.clone()).collect();
    want.sort();
    // Every node's member list (which a client joining through it gets)
    // names all four.
    let took = wait_until(
        "every node lists all 4 peers",
        Duration::from_secs(20),
        || (0..c.nodes.len()).all(|i| c.peer_ids(i) == want),
    );
    eprintln!("4 peers by bootstrap: every member list complete after {took:?}");

    // Put through node 0, R=1 and R=2; get through every other node.
    let src = c.path("in.bin");
    let objects = [
        ("r1-object", 1usize, 300_000usize),
        ("r2-object", 2, 1 << 20),
    ];
    for (i, (name, r, len)) in objects.iter().enumerate() {
        let data = payload(i as u64, *len);
        std::fs::write(&src, &data).unwrap();
        let k = key(name);
        let out = c.ctl_ok(
            0,
            &[
                "put",
                &k.to_string(),
                src.to_str().unwrap(),
                "--replicas",
                &r.to_string(),
                "--json",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["bytes"].as_u64(), Some(*len as u64), "{out}");
        let holders = c.locate(0, &k);
        assert_eq!(holders.len(), *r, "{name}: holders {holders:?}");
        for via in 1..c.nodes.len() {
            let dst = c.path(&format!("out-{name}-{via}.bin"));
            c.ctl_ok(via, &["get", &k.to_string(), dst.to_str().unwrap()]);
            assert!(
                std::fs::read(&dst).unwrap() == data,
                "{name} via node {via}"
            );
            assert_eq!(c.locate(via, &k), holders, "{name}: locate via node {via}");
        }
    }

    // A key nobody stored: non-zero exit, a clear message, no output file.
    let dst = c.path("missing.bin");
    let out = c.ctl(
        2,
        &["get", &key("never-put").to_string(), dst.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not stored on any live peer"), "{err}");
    assert!(!dst.exists());
    // And `peers --json` objects carry more than the id.
    let text = c.ctl_ok(3, &["peers", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for p in v.as_array().unwrap() {
        assert!(p["capacity"].as_u64() == Some(64 << 20), "{p}");
        assert!(!p["addrs"].as_array().unwrap().is_empty(), "{p}");
    }
}

// ---------------------------------------------------------------------------
// Discovery by mDNS, inside a network namespace.

const MDNS_CHILD_ENV: &str = "KVMESH_STORE_MDNS_NETNS_CHILD";

#[test]
fn mdns_peers_find_each_other_and_serve_every_get() {
    if std::env::var_os(MDNS_CHILD_ENV).is_some() {
        mdns_cluster_inside_namespace();
        return;
    }
    let ns = Netns::create(&format!("kvmesh-store-mdns-{}", std::process::id()));
    ns.rerun_test_inside(
        "mdns_peers_find_each_other_and_serve_every_get",
        MDNS_CHILD_ENV,
        Duration::from_secs(60),
    );
}

fn mdns_cluster_inside_namespace() {
    init_tracing();
    let mut c = Cluster::new();
    let listen = format!("/ip4/{NETNS_ADDR}/tcp/0");
    // No bootstrap address anywhere: nodes and clients find each other by mDNS.
    for _ in 0..3 {
        c.spawn(
            &args(&FAST, &["--mem", "32MiB", "--mdns", "--listen", &listen]),
            None,
        );
    }
    let mut want: Vec<String> = c.nodes.iter().map(|n| n.peer_id.clone()).collect();
    want.sort();
    for n in &c.nodes {
        // Listening on the veth address proves the node is in the namespace.
        assert!(n.addr.contains(NETNS_ADDR), "{}", n.addr);
    }
    let mdns_run = |a: &[&str]| {
        let mut all = a.to_vec();
        all.extend(["--mdns", "--timeout", "10"]);
        run_ctl(&all, &[], Duration::from_secs(30))
    };
    let mdns = |a: &[&str]| {
        let out = mdns_run(a);
        assert!(
            out.status.success(),
            "p2pctl {a:?} --mdns: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let ids = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let mut ids: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["peer_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let took = wait_until(
        "an mDNS client sees all 3 peers",
        Duration::from_secs(25),
        || {
            let out = mdns_run(&["peers", "--json"]);
            out.status.success() && ids(&String::from_utf8_lossy(&out.stdout)) == want
        },
    );
    eprintln!("mDNS: a client saw all 3 peers after {took:?}");

    let data = payload(7, 200_000);
    let src = c.path("in.bin");
    std::fs::write(&src, &data).unwrap();
    let k = key("mdns-object");
    mdns(&[
        "put",
        &k.to_string(),
        src.to_str().unwrap(),
        "--replicas",
        "2",
    ]);
    // Every node knows where the copies are: a client joining through each
    // one (its member list came to it over the mDNS-formed mesh) reads them.
    for via in 0..c.nodes.len() {
        let dst = c.path(&format!("out{via}.bin"));
        c.ctl_ok(via, &["get", &k.to_string(), dst.to_str().unwrap()]);
        assert!(std::fs::read(&dst).unwrap() == data, "get via node {via}");
    }
    let dst = c.path("out-mdns.bin");
    mdns(&["get", &k.to_string(), dst.to_str().unwrap()]);
    assert!(std::fs::read(&dst).unwrap() == data);
}

// ---------------------------------------------------------------------------
// R=2: kill -9 a holder; gets keep working; repair restores two copies.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_gets_fail_over_and_repair_restores_two_copies() {
    init_tracing();
    let mut c = Cluster::new();
    block(|| c.spawn_bootstrapped(4, &args(&FAST, &["--mem", "64MiB"])));
    // TCP: a read from a killed holder fails on the wire and must fail over.
    let client = c.client(0, TransportKind::Tcp).await;
    const N: u64 = 24;
    const LEN: usize = 256 << 10;
    let keys: Vec<ObjectKey> = (0..N).map(|i| key(&format!("r2-{i}"))).collect();
    let opts = PutOptions {
        replicas: 2,
        ..PutOptions::default()
    };
    for (i, k) in keys.iter().enumerate() {
        client.put(*k, &payload(i as u64, LEN), opts).await.unwrap();
    }
    // `locate` shows two holders on distinct peers for every object (the
    // CLI for a few, the library for all).
    let locate = |k: ObjectKey| {
        let client = client.clone();
        async move {
            let mut h: Vec<String> = client
                .locate(k)
                .await
                .unwrap()
                .iter()
                .map(kvmesh_p2p_store::peer_id_text)
                .collect();
            h.sort();
            h
        }
    };
    let mut held_by: HashMap<String, usize> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        let holders = locate(*k).await;
        let distinct: HashSet<&String> = holders.iter().collect();
        assert_eq!(distinct.len(), 2, "{k}: {holders:?}");
        if i < 3 {
            let mut cli = block(|| c.locate(1 + i, k));
            cli.sort();
            assert_eq!(cli, holders, "p2pctl locate via node {}", 1 + i);
        }
        for h in holders {
            *held_by.entry(h).or_default() += 1;
        }
    }
    // The victim: the holder of most objects other than the bootstrap node.
    let (victim_id, victim_objects) = held_by
        .iter()
        .filter(|(id, _)| **id != c.nodes[0].peer_id)
        .max_by_key(|(_, n)| **n)
        .map(|(id, n)| (id.clone(), *n))
        .unwrap();
    let victim = c.index_of(&victim_id);
    eprintln!("killing node {victim} ({victim_objects} of {N} objects)");

    // Readers run through the kill: every get must return the right bytes.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (client, keys, stop, reads) =
            (client.clone(), keys.clone(), stop.clone(), reads.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Relaxed) {
                let n = i % keys.len();
                let got = client.get(keys[n]).await;
                match got {
                    Ok(Some(v)) if v == payload(n as u64, LEN) => {}
                    other => panic!("get {n} returned {:?}", other.map(|o| o.map(|v| v.len()))),
                }
                reads.fetch_add(1, Relaxed);
                i += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.nodes[victim].kill9();
    let killed_at = Instant::now();
    // A fresh client process right after the kill: its member list still
    // names the dead holder.
    let survivor = (1..c.nodes.len()).find(|&i| i != victim).unwrap();
    for (i, k) in keys.iter().enumerate().take(6) {
        let dst = c.path(&format!("after-kill-{i}.bin"));
        block(|| c.ctl_ok(survivor, &["get", &k.to_string(), dst.to_str().unwrap()]));
        assert!(std::fs::read(&dst).unwrap() == payload(i as u64, LEN));
    }
    // Keep reading through death detection and repair.
    let repaired_after = loop {
        let mut done = true;
        for k in &keys {
            let h = locate(*k).await;
            if h.len() != 2 || h.contains(&victim_id) {
                done = false;
                break;
            }
        }
        if done {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "objects still short of two live holders 20 s after the kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The CLI agrees, through another node.
    for k in keys.iter().take(4) {
        let h = block(|| c.locate(survivor, k));
        assert!(h.len() == 2 && !h.contains(&victim_id), "{k}: {h:?}");
    }
    stop.store(true, Relaxed);
    reader.await.expect("reader saw only correct bytes");
    eprintln!(
        "repaired {victim_objects} objects {repaired_after:?} after the kill \
         (dead-after 1.5 s, repair delay 0.3 s); {} gets during the failure, all correct",
        reads.load(Relaxed)
    );
    assert!(reads.load(Relaxed) > 0);
    // Repairs are counted by the surviving holders.
    let stats = block(|| c.stat(0));
    assert_eq!(stats.len(), 3, "{stats:?}");
    let repairs: u64 = stats.iter().map(|s| s["repairs"].as_u64().unwrap()).sum();
    assert!(
        repairs >= victim_objects as u64,
        "{repairs} repairs for {victim_objects} lost copies"
    );
    // Every object still reads back correctly, from a fresh client too.
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(client.get(*k).await.unwrap(), Some(payload(i as u64, LEN)));
    }
    client.shutdown().await;
}

// ---------------------------------------------------------------------------
// Pre-shared key: an outsider cannot join or read.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pre_shared_key_cannot_join_or_read() {
    init_tracing();
    let mut c = Cluster::with_psk();
    block(|| c.spawn_bootstrapped(3, &args(&FAST, &["--mem", "32MiB"])));
    let data = payload(42, 100_000);
    let src = c.path("secret.bin");
    std::fs::write(&src, &data).unwrap();
    let k = key("members-only");
    block(|| {
        c.ctl_ok(
            0,
            &[
                "put",
                &k.to_string(),
                src.to_str().unwrap(),
                "--replicas",
                "2",
            ],
        )
    });
    let dst = c.path("ok.bin");
    block(|| c.ctl_ok(1, &["get", &k.to_string(), dst.to_str().unwrap()]));
    assert!(std::fs::read(&dst).unwrap() == data);

    // Clients with another key, or none: non-zero exit, a clear message,
    // nothing written.
    let other_key = common::write_psk(c.dir.path(), "other.key");
    for psk in [Some(other_key.display().to_string()), None] {
        let dst = c.path("stolen.bin");
        let env = [
            ("KVMESH_BOOTSTRAP", Some(c.nodes[0].addr.clone())),
            ("KVMESH_PSK_FILE", psk.clone()),
        ];
        for cmd in [
            vec![
                "get",
                &k.to_string(),
                dst.to_str().unwrap(),
                "--timeout",
                "3",
            ],
            vec!["peers", "--timeout", "3"],
        ] {
            let cmd: Vec<&str> = cmd.iter().map(|s| s.as_ref()).collect();
            let out = block(|| run_ctl(&cmd, &env, Duration::from_secs(30)));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{cmd:?} with key {psk:?} succeeded");
            assert!(
                err.contains("cannot join the swarm") && err.contains("pre-shared key"),
                "{cmd:?} with key {psk:?}: {err}"
            );
            assert!(out.stdout.is_empty());
            assert!(!dst.exists());
        }
    }

    // A node with another key, given a member's address, stays outside: it
    // never appears in the members' lists and its own lists only itself.
    let boot = c.nodes[0].addr.clone();
    let outsider = block(|| {
        c.spawn(
            &args(&FAST, &["--mem", "32MiB", "--bootstrap", &boot]),
            Some(&other_key),
        )
    });
    let outsider_id = c.nodes[outsider].peer_id.clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for via in 0..3 {
        let ids = block(|| c.peer_ids(via));
        assert!(!ids.contains(&outsider_id), "outsider listed: {ids:?}");
        assert_eq!(ids.len(), 3);
    }
    let env = [
        ("KVMESH_BOOTSTRAP", Some(c.nodes[outsider].addr.clone())),
        ("KVMESH_PSK_FILE", Some(other_key.display().to_string())),
    ];
    let out = block(|| run_ctl(&["peers", "--json"], &env, Duration::from_secs(30)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seen: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap())
        .collect();
    assert_eq!(seen, vec![outsider_id.as_str()], "outsider sees members");
    let dst = c.path("outsider.bin");
    let out = block(|| {
        run_ctl(
            &["get", &k.to_string(), dst.to_str().unwrap()],
            &env,
            Duration::from_secs(30),
        )
    });
    assert!(!out.status.success());
    assert!(!dst.exists());

    // The library view: a store with the wrong key is told why it is alone
    // and finds nothing.
    let mut cfg = common::client_config(
        vec![c.nodes[1].multiaddr()],
        Some(std::fs::read_to_string(&other_key).unwrap()),
        TransportKind::Auto,
    );
    cfg.op_timeout = Duration::from_secs(3);
    let intruder = Store::start(cfg).await.unwrap();
    let err = intruder
        .wait_for_members(1, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kvmesh_p2p_store::Error::NotJoined(_)),
        "{err}"
    );
    assert!(intruder.peers().is_empty());
    assert_eq!(intruder.get(k).await.unwrap(), None);
    assert!(intruder.locate(k).await.unwrap().is_empty());
    intruder.shutdown().await;
}

// ---------------------------------------------------------------------------
// Memory pressure: only unleased, unpinned objects are evicted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pressure_evicts_only_unleased_unpinned_objects() {
    init_tracing();
    let mut c = Cluster::new();
    // 16 MiB of DRAM: objects up to 4 MiB, hard pins up to 8 MiB.
    block(|| c.spawn(&args(&FAST, &["--mem", "16MiB"]), None));
    let client = c.client(0, TransportKind::Auto).await;
    const LEN: usize = 512 << 10;
    let put = |name: &str, n: u64, pin: Pin| {
        let client = client.clone();
        let k = key(name);
        async move {
            client
                .put(
                    k,
                    &payload(n, LEN),
                    PutOptions {
                        replicas: 1,
                        pin,
                        ttl: None,
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("put {n}: {e}"));
            k
        }
    };
    let mut protected = Vec::new();
    for n in 0..4 {
        protected.push((put(&format!("hard-{n}"), n, Pin::Hard).await, n));
    }
    for n in 4..8 {
        protected.push((put(&format!("soft-{n}"), n, Pin::Soft).await, n));
    }
    let leased_key = put("leased", 8, Pin::None).await;
    let lease = client
        .lease_many(&[leased_key], Duration::from_secs(30))
        .await
        .pop()
        .flatten()
        .expect("lease");
    protected.push((leased_key, 8));

    // Unpinned puts, 4x the pool, while a reader checks every object
    // already put: each get is the right bytes or a clean miss.
    let unpinned: Arc<parking_lot::Mutex<Vec<(ObjectKey, u64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (hits, misses) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (client, unpinned, stop, hits, misses) = (
            client.clone(),
            unpinned.clone(),
            stop.clone(),
            hits.clone(),
            misses.clone(),
        );
        let protected = protected.clone();
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Relaxed) {
                let list = unpinned.lock().clone();
                let all: Vec<(ObjectKey, u64)> =
                    list.into_iter().chain(protected.clone()).collect();
                let (k, n) = all[i % all.len()];
                match client.get(k).await {
                    Ok(Some(v)) => {
                        assert!(v == payload(n, LEN), "get {n}: wrong bytes");
                        hits.fetch_add(1, Relaxed);
                    }
                    Ok(None) => {
                        misses.fetch_add(1, Relaxed);
                    }
                    Err(e) => panic!("get {n} during eviction: {e}"),
                }
                i += 1;
            }
        })
    };
    for n in 100..228u64 {
        let k = put(&format!("bulk-{n}"), n, Pin::None).await;
        unpinned.lock().push((k, n));
    }
    stop.store(true, Relaxed);
    reader.await.expect("reader saw only right bytes or misses");

    // Protected objects are all still there, intact.
    for (k, n) in &protected {
        assert_eq!(
            client.get(*k).await.unwrap(),
            Some(payload(*n, LEN)),
            "protected object {n} was evicted"
        );
    }
    let bulk = unpinned.lock().clone();
    let mut present = 0;
    for (k, n) in bulk {
        if let Some(v) = client.get(k).await.unwrap() {
            assert!(v == payload(n, LEN), "object {n}: wrong bytes");
            present += 1;
        }
    }
    let stats = block(|| c.stat(0));
    let evictions = stats[0]["evictions"].as_u64().unwrap();
    eprintln!(
        "128 unpinned puts into 16 MiB: {present} still held, {evictions} evictions; \
         reader: {} hits, {} misses",
        hits.load(Relaxed),
        misses.load(Relaxed)
    );
    assert!(
        present < 128 && present > 0,
        "{present} of 128 unpinned held"
    );
    assert!(evictions >= (128 - present) as u64);
    assert!(stats[0]["bytes_stored"].as_u64().unwrap() <= 16 << 20);
    // The lease still pins its object; once released it can go.
    client.release(vec![lease]);
    client.shutdown().await;
}

// ---------------------------------------------------------------------------
// SSD tier: spill, promote, corruption.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssd_spill_promotes_intact_and_corruption_is_never_returned() {
    init_tracing();
    let mut c = Cluster::new();
    for i in 0..2 {
        let dir = c.path(&format!("ssd{i}"));
        block(|| {
            let boot = c.nodes.first().map(|n| n.addr.clone());
            let mut a = args(
                &FAST,
                &[
                    "--mem",
                    "4MiB",
                    "--ssd-size",
                    "64MiB",
                    "--ssd-dir",
                    dir.to_str().unwrap(),
                ],
            );
            if let Some(b) = &boot {
                a.extend(["--bootstrap", b]);
            }
            c.spawn(&a, None)
        });
    }
    let client = c.client(0, TransportKind::Auto).await;
    const LEN: usize = 256 << 10;
    let r2 = PutOptions {
        replicas: 2,
        ..PutOptions::default()
    };
    // The object whose first-asked copy gets corrupted, and the holder
    // asked first for it (a lease goes where a get goes first).
    let k0 = key("ssd-k0");
    client.put(k0, &payload(0, LEN), r2).await.unwrap();
    let lease = client
        .lease_many(&[k0], Duration::from_secs(5))
        .await
        .pop()
        .flatten()
        .expect("lease k0");
    let first = kvmesh_p2p_store::peer_id_text(&lease.holder);
    client.release(vec![lease]);
    // Objects with one copy, to be corrupted too.
    let (k1, k2) = (key("ssd-k1"), key("ssd-k2"));
    for (n, k) in [(1, k1), (2, k2)] {
        client
            .put(k, &payload(n, LEN), PutOptions::default())
            .await
            .unwrap();
    }
    // 48 more objects on both peers (12 MiB each, 3x DRAM): the early ones
    // are spilled, then dropped from DRAM.
    let fillers: Vec<ObjectKey> = (0..48).map(|i| key(&format!("ssd-fill-{i}"))).collect();
    for (i, k) in fillers.iter().enumerate() {
        client
            .put(*k, &payload(100 + i as u64, LEN), r2)
            .await
            .unwrap_or_else(|e| panic!("put filler {i}: {e}"));
    }
    let file_of = |node: usize, k: &ObjectKey| {
        let hex = k.to_string();
        c.nodes[node]
            .ssd_dir
            .as_ref()
            .unwrap()
            .join(&hex[..2])
            .join(format!("{hex}.kvo"))
    };
    block(|| {
        wait_until("k0 and k1 are spilled", Duration::from_secs(10), || {
            (0..2).all(|n| file_of(n, &k0).exists())
                && [k1, k2]
                    .iter()
                    .all(|k| (0..2).any(|n| file_of(n, k).exists()))
        })
    });
    // Everything comes back intact, most of it promoted from SSD.
    for (i, k) in fillers.iter().enumerate() {
        assert_eq!(
            client.get(*k).await.unwrap(),
            Some(payload(100 + i as u64, LEN)),
            "filler {i}"
        );
    }
    let stats = block(|| c.stat(0));
    for s in &stats {
        assert!(s["spills"].as_u64().unwrap() > 0, "{s}");
        assert!(s["ssd_objects"].as_u64().unwrap() > 0, "{s}");
        assert!(s["bytes_stored"].as_u64().unwrap() <= 4 << 20, "{s}");
    }

    // A flipped byte in the first-asked holder's file of k0: the get falls
    // back to the other replica and returns the right bytes.
    let h = c.index_of(&first);
    flip_byte(&file_of(h, &k0), 88 + 12_345);
    assert_eq!(client.get(k0).await.unwrap(), Some(payload(0, LEN)));
    let stats = block(|| c.stat(0));
    let detected = stats
        .iter()
        .find(|s| s["peer_id"] == first)
        .map(|s| s["integrity_failures"].as_u64().unwrap())
        .unwrap();
    assert_eq!(detected, 1, "holder {first} read its damaged file");
    assert!(!file_of(h, &k0).exists(), "damaged file is deleted");
    assert_eq!(block(|| c.locate(0, &k0)).len(), 1);

    // The only copy of k1 damaged: the get reports corruption, no bytes.
    let n1 = (0..2).find(|&n| file_of(n, &k1).exists()).unwrap();
    flip_byte(&file_of(n1, &k1), 88 + 7);
    let dst = c.path("k1.bin");
    let out = block(|| c.ctl(0, &["get", &k1.to_string(), dst.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "get of a corrupt object succeeded");
    assert!(err.contains("corrupt"), "{err}");
    assert!(!dst.exists(), "bytes of a corrupt object were written");
    // Once detected, the damaged copy is gone: later gets are clean misses.
    assert_eq!(client.get(k1).await.unwrap(), None);
    // The library reports the damage as an integrity error.
    let n2 = (0..2).find(|&n| file_of(n, &k2).exists()).unwrap();
    flip_byte(&file_of(n2, &k2), 88 + LEN as u64 - 1);
    let err = client.get(k2).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err}");
    client.shutdown().await;
}

fn flip_byte(path: &std::path::Path, at: u64) {
    let mut bytes = std::fs::read(path).expect("spilled file");
    assert!((at as usize) < bytes.len());
    bytes[at as usize] ^= 0x40;
    std::fs::write(path, bytes).expect("write damaged file");
}
