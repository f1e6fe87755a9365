//! Network layer on real sockets: 127.0.0.1 with port 0, and a network
//! namespace for mDNS. Every wait is bounded; a bound that is hit fails the test.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kvmesh_p2p_store::network::{
    self, generate_swarm_key, parse_swarm_key, Client, Event, Keypair, Multiaddr, NetError,
    NetworkConfig, PeerId, PreSharedKey,
};

const TOPIC: &str = "kvmesh/test";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn loopback() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().unwrap()
}

fn config(bootstrap: Vec<Multiaddr>, psk: Option<PreSharedKey>) -> NetworkConfig {
    let mut cfg = NetworkConfig::new(Keypair::generate_ed25519());
    cfg.listen = vec![loopback()];
    cfg.bootstrap = bootstrap;
    cfg.psk = psk;
    cfg.request_timeout = Duration::from_secs(5);
    cfg.connect_timeout = Duration::from_secs(5);
    cfg.kad_query_timeout = Duration::from_secs(5);
    cfg
}

/// Maps a request to its response; `None` holds the request unanswered, an
/// empty response to `b"drop"` is not sent (the token is dropped).
type Responder = Arc<dyn Fn(PeerId, Vec<u8>) -> Option<Vec<u8>> + Send + Sync>;

/// What a node's event pump has seen.
#[derive(Default)]
struct Seen {
    /// (publisher, payload) of gossip messages on [`TOPIC`].
    messages: Vec<(PeerId, Vec<u8>)>,
    connected: HashSet<PeerId>,
    ever_connected: HashSet<PeerId>,
    discovered: HashSet<PeerId>,
    inbound_requests: usize,
    held: Vec<network::ResponseToken>,
}

struct Node {
    client: Client,
    id: PeerId,
    addr: Multiaddr,
    seen: Arc<Mutex<Seen>>,
}

impl Node {
    async fn start(cfg: NetworkConfig) -> Node {
        Self::start_with(cfg, Arc::new(echo)).await
    }

    async fn start_with(cfg: NetworkConfig, responder: Responder) -> Node {
        let (client, mut events) = network::start(cfg).await.expect("start");
        let id = client.local_peer_id();
        let addr = client.listen_addrs().await.unwrap()[0].clone();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let pump_seen = seen.clone();
        let pump_client = client.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    Event::InboundRequest { peer, data, token } => {
                        pump_seen.lock().unwrap().inbound_requests += 1;
                        if data == b"drop" {
                            drop(token);
                            continue;
                        }
                        let Some(response) = responder(peer, data) else {
                            pump_seen.lock().unwrap().held.push(token);
                            continue;
                        };
                        let client = pump_client.clone();
                        tokio::spawn(async move {
                            let _ = client.respond(token, response).await;
                        });
                    }
                    Event::Message { from, topic, data } if topic == TOPIC => {
                        pump_seen.lock().unwrap().messages.push((from, data));
                    }
                    Event::PeerConnected(p) => {
                        let mut s = pump_seen.lock().unwrap();
                        s.connected.insert(p);
                        s.ever_connected.insert(p);
                    }
                    Event::PeerDisconnected(p) => {
                        pump_seen.lock().unwrap().connected.remove(&p);
                    }
                    Event::Discovered { peer, .. } => {
                        pump_seen.lock().unwrap().discovered.insert(peer);
                    }
                    _ => {}
                }
            }
        });
        Node {
            client,
            id,
            addr,
            seen,
        }
    }

    fn with_p2p(&self) -> Multiaddr {
        self.addr
            .clone()
            .with(libp2p::multiaddr::Protocol::P2p(self.id))
    }

    fn publishers_seen(&self) -> HashSet<PeerId> {
        self.seen
            .lock()
            .unwrap()
            .messages
            .iter()
            .map(|(p, _)| *p)
            .collect()
    }
}

fn echo(_: PeerId, data: Vec<u8>) -> Option<Vec<u8>> {
    Some([b"echo:".as_slice(), &data].concat())
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `bound`.
async fn wait_until(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < bound, "timed out after {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// A, then B, C, D bootstrapped by A: B and D with `/p2p/<A>`, C without.
async fn four_node_cluster() -> Vec<Node> {
    let a = Node::start(config(vec![], None)).await;
    let b = Node::start(config(vec![a.with_p2p()], None)).await;
    let c = Node::start(config(vec![a.addr.clone()], None)).await;
    let d = Node::start(config(vec![a.with_p2p()], None)).await;
    vec![a, b, c, d]
}

/// Every node publishes every 250 ms until every node has a message from
/// every other node; returns the time that took.
async fn all_to_all_gossip(nodes: &[Node], bound: Duration) -> Duration {
    for n in nodes {
        n.client.subscribe(TOPIC).await.unwrap();
    }
    let start = Instant::now();
    let mut seq = 0u32;
    loop {
        let done = nodes.iter().all(|n| {
            let seen = n.publishers_seen();
            nodes.iter().all(|o| o.id == n.id || seen.contains(&o.id))
        });
        if done {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "gossip mesh did not form within {bound:?}"
        );
        for n in nodes {
            match n
                .client
                .publish(TOPIC, format!("{}:{seq}", n.id).into_bytes())
                .await
            {
                Ok(()) | Err(NetError::NoSubscribers { .. }) => {}
                Err(e) => panic!("publish: {e}"),
            }
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_mesh_forms_and_non_bootstrap_peers_exchange_requests() {
    init_tracing();
    let nodes = four_node_cluster().await;
    let took = all_to_all_gossip(&nodes, Duration::from_secs(20)).await;
    eprintln!("4 peers: all-to-all gossip delivered {took:?} after subscribing");
    assert!(
        took < Duration::from_secs(5),
        "mesh formation took {took:?}"
    );

    // B and C were only given A's address; they reach each other through
    // identify + Kademlia (direct connection from the DHT bootstrap, or a
    // DHT lookup when the request is sent).
    let (b, c, d) = (&nodes[1], &nodes[2], &nodes[3]);
    let start = Instant::now();
    let resp = b.client.request(c.id, b"ping-c".to_vec()).await.unwrap();
    assert_eq!(resp, b"echo:ping-c");
    let resp = c.client.request(d.id, b"ping-d".to_vec()).await.unwrap();
    assert_eq!(resp, b"echo:ping-d");
    eprintln!("B->C and C->D requests done in {:?}", start.elapsed());

    // The bootstrap peer was connected by all three.
    let a_peers: HashSet<_> = nodes[0]
        .client
        .connected_peers()
        .await
        .unwrap()
        .into_iter()
        .collect();
    for n in &nodes[1..] {
        assert!(a_peers.contains(&n.id));
    }
    for n in &nodes {
        n.client.shutdown().await.unwrap();
    }
    assert!(matches!(
        b.client.connected_peers().await,
        Err(NetError::Shutdown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_record_is_found_by_another_peer() {
    init_tracing();
    let nodes = four_node_cluster().await;
    let (a, d) = (&nodes[0], &nodes[3]);
    // Wait until A has identified all peers (their addresses are in its DHT).
    wait_until("A discovers B, C, D", Duration::from_secs(10), || {
        let seen = a.seen.lock().unwrap();
        nodes[1..].iter().all(|n| seen.discovered.contains(&n.id))
    })
    .await;
    wait_until("D discovers A", Duration::from_secs(10), || {
        d.seen.lock().unwrap().discovered.contains(&a.id)
    })
    .await;

    let key = b"block:0123456789abcdef".to_vec();
    let start = Instant::now();
    a.client.start_providing(key.clone()).await.unwrap();
    let announced = start.elapsed();
    let start = Instant::now();
    let providers = d.client.get_providers(key.clone()).await.unwrap();
    let found = start.elapsed();
    eprintln!("start_providing took {announced:?}, get_providers took {found:?}");
    assert!(providers.contains(&a.id), "providers: {providers:?}");

    // A key nobody provides: the lookup terminates, empty, within its bound.
    let none = d
        .client
        .get_providers(b"block:absent".to_vec())
        .await
        .unwrap();
    assert!(none.is_empty());

    // The provider finds itself locally.
    let own = a.client.get_providers(key).await.unwrap();
    assert!(own.contains(&a.id));
    for n in &nodes {
        n.client.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_network_rejects_other_keys() {
    init_tracing();
    let key1 = parse_swarm_key(&generate_swarm_key()).unwrap();
    let key2 = parse_swarm_key(&generate_swarm_key()).unwrap();
    // A mismatched key fails the marker check right after the PSK
    // handshake; no key fails multistream negotiation, at worst at the
    // connect timeout.
    let cfg = |bootstrap, psk| {
        let mut cfg = config(bootstrap, psk);
        cfg.connect_timeout = Duration::from_secs(2);
        cfg
    };
    let a = Node::start(cfg(vec![], Some(key1))).await;
    let b = Node::start(cfg(vec![a.with_p2p()], Some(key1))).await;
    let other_key = Node::start(cfg(vec![a.with_p2p()], Some(key2))).await;
    let no_key = Node::start(cfg(vec![a.addr.clone()], None)).await;
    let members = [a, b];
    let outsiders = [other_key, no_key];
    for n in outsiders.iter() {
        n.client.subscribe(TOPIC).await.unwrap();
    }

    // Same key: joins and gossips.
    all_to_all_gossip(&members, Duration::from_secs(15)).await;

    // Other key / no key: explicit dials fail in the handshake, both ways.
    for n in &outsiders {
        let err = n.client.dial(members[0].with_p2p()).await.unwrap_err();
        eprintln!("outsider dial refused: {err}");
        assert!(matches!(err, NetError::Dial { .. }), "{err}");
        let err = members[0].client.dial(n.with_p2p()).await.unwrap_err();
        assert!(matches!(err, NetError::Dial { .. }), "{err}");
    }

    // For 3 s the members keep publishing; outsiders see nothing.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for m in &members {
            m.client
                .publish(TOPIC, b"members only".to_vec())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in &outsiders {
        {
            let seen = n.seen.lock().unwrap();
            assert!(seen.messages.is_empty(), "outsider received gossip");
            assert!(
                seen.ever_connected.is_empty(),
                "outsider connected: {:?}",
                seen.ever_connected
            );
        }
        assert!(n.client.connected_peers().await.unwrap().is_empty());
    }
    let a_peers = members[0].client.connected_peers().await.unwrap();
    assert_eq!(a_peers, vec![members[1].id]);
    let a_seen = members[0].seen.lock().unwrap();
    for n in &outsiders {
        assert!(!a_seen.ever_connected.contains(&n.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused_and_receiver_keeps_working() {
    init_tracing();
    const MIB: usize = 1 << 20;
    // Receiver: default 4 MiB request limit, may send responses up to 16 MiB.
    let mut rcfg = config(vec![], None);
    rcfg.max_response_size = 16 * MIB;
    let receiver = Node::start_with(
        rcfg,
        Arc::new(|peer, data: Vec<u8>| {
            if data == b"big-response" {
                Some(vec![1u8; 5 * MIB])
            } else if data.len() > 1024 {
                Some(format!("len:{}", data.len()).into_bytes())
            } else {
                echo(peer, data)
            }
        }),
    )
    .await;
    // Sender that is allowed to send 16 MiB (so the receiver must enforce).
    let mut scfg = config(vec![], None);
    scfg.max_request_size = 16 * MIB;
    let sender = Node::start(scfg).await;
    // Sender with default limits.
    let polite = Node::start(config(vec![], None)).await;
    assert_eq!(
        sender.client.dial(receiver.with_p2p()).await.unwrap(),
        receiver.id
    );
    // Without a /p2p suffix the dial learns the peer id from the handshake.
    assert_eq!(
        polite.client.dial(receiver.addr.clone()).await.unwrap(),
        receiver.id
    );

    // Exactly at the limit is accepted.
    let resp = sender
        .client
        .request(receiver.id, vec![0u8; 4 * MIB])
        .await
        .unwrap();
    assert_eq!(resp, format!("len:{}", 4 * MIB).into_bytes());

    // Over the receiver's limit: the receiver refuses the stream.
    let start = Instant::now();
    let err = sender
        .client
        .request(receiver.id, vec![0u8; 5 * MIB])
        .await
        .unwrap_err();
    eprintln!(
        "oversized request refused by receiver after {:?}: {err}",
        start.elapsed()
    );
    assert!(matches!(err, NetError::Request { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "refusal took {:?}",
        start.elapsed()
    );

    // Over the sender's own limit: refused locally, nothing sent.
    let before = receiver.seen.lock().unwrap().inbound_requests;
    let err = polite
        .client
        .request(receiver.id, vec![0u8; 5 * MIB])
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetError::RequestTooLarge { size, limit } if size == 5 * MIB && limit == 4 * MIB),
        "{err}"
    );

    // A response over the sender's 4 MiB response limit is refused on read.
    let err = sender
        .client
        .request(receiver.id, b"big-response".to_vec())
        .await
        .unwrap_err();
    eprintln!("oversized response refused by requester: {err}");
    assert!(matches!(err, NetError::Request { .. }), "{err}");

    // The receiver keeps working, on the same connections.
    for n in [&sender, &polite] {
        let resp = n
            .client
            .request(receiver.id, b"still there?".to_vec())
            .await
            .unwrap();
        assert_eq!(resp, b"echo:still there?");
    }
    let peers: HashSet<_> = receiver
        .client
        .connected_peers()
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert!(peers.contains(&sender.id) && peers.contains(&polite.id));
    assert_eq!(
        receiver.seen.lock().unwrap().inbound_requests,
        before + 3,
        "the locally refused request must not reach the receiver"
    );
    assert!(matches!(
        sender.client.request(sender.id, vec![]).await,
        Err(NetError::SelfRequest)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_and_dropped_requests_fail_within_bounds() {
    init_tracing();
    // The responder's own timeout for answering is 2 s, the requester waits 1 s.
    let mut rcfg = config(vec![], None);
    rcfg.request_timeout = Duration::from_secs(2);
    let responder = Node::start_with(
        rcfg,
        Arc::new(|peer, data: Vec<u8>| (data != b"hold").then(|| echo(peer, data)).flatten()),
    )
    .await;
    let mut cfg = config(vec![], None);
    cfg.request_timeout = Duration::from_secs(1);
    let requester = Node::start(cfg).await;
    requester.client.dial(responder.with_p2p()).await.unwrap();

    let start = Instant::now();
    let err = requester
        .client
        .request(responder.id, b"hold".to_vec())
        .await
        .unwrap_err();
    let held_for = start.elapsed();
    eprintln!("unanswered request failed after {held_for:?}: {err}");
    assert!(
        matches!(
            err,
            NetError::Request {
                source: network::OutboundFailure::Timeout,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    assert!(held_for >= Duration::from_millis(900) && held_for < Duration::from_secs(3));

    let start = Instant::now();
    let err = requester
        .client
        .request(responder.id, b"drop".to_vec())
        .await
        .unwrap_err();
    eprintln!(
        "dropped-token request failed after {:?}: {err}",
        start.elapsed()
    );
    assert!(matches!(err, NetError::Request { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_millis(900));

    // The held token expires with the responder's own timeout and can then no
    // longer be answered.
    let token = responder
        .seen
        .lock()
        .unwrap()
        .held
        .pop()
        .expect("held token");
    assert_eq!(token.peer(), requester.id);
    wait_until("held token expires", Duration::from_secs(3), || {
        !token.is_open()
    })
    .await;
    let err = responder
        .client
        .respond(token, b"late".to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetError::ResponseChannelClosed { .. }),
        "{err}"
    );

    let resp = requester
        .client
        .request(responder.id, b"ok".to_vec())
        .await
        .unwrap();
    assert_eq!(resp, b"echo:ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_application_does_not_stall_the_event_loop() {
    init_tracing();
    // The stalled peer never reads its events and has room for only two.
    let mut cfg = config(vec![], None);
    cfg.event_queue = 2;
    let (stalled, _events_never_read) = network::start(cfg).await.unwrap();
    let busy = Node::start(config(vec![], None)).await;
    let stalled_addr = stalled.listen_addrs().await.unwrap()[0].clone();
    assert_eq!(
        busy.client.dial(stalled_addr).await.unwrap(),
        stalled.local_peer_id()
    );

    // Requests to the stalled peer overflow its event queue: they are dropped
    // there and fail here quickly instead of waiting for the timeout.
    let start = Instant::now();
    let mut failed = 0;
    for i in 0..20u8 {
        if busy
            .client
            .request(stalled.local_peer_id(), vec![i])
            .await
            .is_err()
        {
            failed += 1;
        }
    }
    eprintln!(
        "20 requests to a stalled peer: {failed} failed in {:?}",
        start.elapsed()
    );
    assert_eq!(failed, 20, "nobody answers on the stalled peer");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );

    // The stalled peer's own commands and outbound requests still work.
    assert_eq!(stalled.connected_peers().await.unwrap(), vec![busy.id]);
    let resp = stalled.request(busy.id, b"alive".to_vec()).await.unwrap();
    assert_eq!(resp, b"echo:alive");
}

// ---------------------------------------------------------------------------
// mDNS inside a network namespace.
//
// mDNS ignores loopback interfaces, so the namespace gets a veth pair with an
// address and a multicast route; the test binary re-executes itself inside the
// namespace. Creating the namespace is part of the test: if it fails, the
// test fails.

const NETNS_CHILD_ENV: &str = "KVMESH_MDNS_NETNS_CHILD";
const NETNS_ADDR: &str = "10.77.0.1";

struct Netns(String);

impl Netns {
    fn create(name: &str) -> Netns {
        run_ok("ip", &["netns", "add", name]);
        let ns = Netns(name.to_owned());
        let setup = format!(
            "ip link set lo up && \
             ip link add veth0 type veth peer name veth1 && \
             ip addr add {NETNS_ADDR}/24 dev veth0 && \
             ip link set veth0 up multicast on && \
             ip link set veth1 up multicast on && \
             ip route add 224.0.0.0/4 dev veth0"
        );
        run_ok("ip", &["netns", "exec", name, "sh", "-c", &setup]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn run_ok(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mdns_discovery_in_netns() {
    if std::env::var_os(NETNS_CHILD_ENV).is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(mdns_peers_find_each_other());
        return;
    }
    let ns = Netns::create(&format!("kvmesh-mdns-{}", std::process::id()));
    let exe = std::env::current_exe().unwrap();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(exe)
        .args([
            "--exact",
            "mdns_discovery_in_netns",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(NETNS_CHILD_ENV, "1")
        .spawn()
        .expect("spawn test binary inside the namespace");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mDNS child did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "mDNS child failed: {status}");
}

async fn mdns_peers_find_each_other() {
    init_tracing();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let mut cfg = NetworkConfig::new(Keypair::generate_ed25519());
        // Listening on the veth address also proves we are inside the namespace.
        cfg.listen = vec![format!("/ip4/{NETNS_ADDR}/tcp/0").parse().unwrap()];
        cfg.mdns = true;
        nodes.push(Node::start(cfg).await);
    }
    // No bootstrap addresses and no dials: every connection comes from mDNS.
    let took = wait_until("mDNS: all peers connected", Duration::from_secs(20), || {
        nodes.iter().all(|n| {
            let seen = n.seen.lock().unwrap();
            nodes
                .iter()
                .all(|o| o.id == n.id || seen.ever_connected.contains(&o.id))
        })
    })
    .await;
    eprintln!("mDNS: 3 peers discovered and connected each other in {took:?}");
    let gossip = all_to_all_gossip(&nodes, Duration::from_secs(15)).await;
    eprintln!("mDNS: all-to-all gossip after {gossip:?}");
    let resp = nodes[0]
        .client
        .request(nodes[2].id, b"hi".to_vec())
        .await
        .unwrap();
    assert_eq!(resp, b"echo:hi");
    let by_id: HashMap<_, _> = nodes.iter().map(|n| (n.id, n.addr.to_string())).collect();
    for addr in by_id.values() {
        assert!(addr.contains(NETNS_ADDR), "{addr}");
    }
}
