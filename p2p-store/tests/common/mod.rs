//! Shared harness of the store integration tests: `p2pctl node` processes
//! on loopback (killed on drop, even when a test panics), bounded runs of
//! the `p2pctl` client commands, in-test `Store` clients, and a network
//! namespace for mDNS.
//!
//! Every wait is bounded; a bound that is hit fails the test.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvmesh_gpu::{EngineConfig, TransportKind};
use kvmesh_p2p_store::network::Multiaddr;
use kvmesh_p2p_store::{ObjectKey, Store, StoreConfig};

/// The `p2pctl` binary under test.
pub const P2PCTL: &str = env!("CARGO_BIN_EXE_p2pctl");

/// How long a node may take to print its `KVMESH_NODE` line.
const NODE_START_BOUND: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Deterministic test bytes for object `n` of `len` bytes.
pub fn payload(n: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    kvmesh_gpu::pattern::fill(&mut v, 0x5eed_0000 ^ n, 0);
    v
}

/// The key of test object `name` (the hex form is what `p2pctl` takes).
pub fn key(name: &str) -> ObjectKey {
    ObjectKey::for_content(name.as_bytes())
}

/// A running `p2pctl node`.
#[derive(Debug)]
pub struct Node {
    child: Option<Child>,
    /// libp2p peer id (base58 text).
    pub peer_id: String,
    /// Its first listen address with `/p2p/<id>`.
    pub addr: String,
    /// Where its stderr goes.
    pub log: PathBuf,
    /// Its SSD tier directory, if any.
    pub ssd_dir: Option<PathBuf>,
}

impl Node {
    /// Kills the process with SIGKILL (no goodbye, no cleanup) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn multiaddr(&self) -> Multiaddr {
        self.addr.parse().expect("node address")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `p2pctl node` processes and the files they use; all killed on drop. On
/// a panic the tail of every node's log is printed.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Node>,
    /// Pre-shared key file the nodes (and, by default, clients) use.
    pub psk: Option<PathBuf>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("---- log of node {} ----\n{}", n.peer_id, tail.join("\n"));
            }
        }
    }
}

/// Writes a fresh `swarm.key` file.
pub fn write_psk(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, kvmesh_p2p_store::network::generate_swarm_key()).expect("write psk");
    path
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster {
            dir: tempfile::tempdir().expect("tempdir"),
            nodes: Vec::new(),
            psk: None,
        }
    }

    pub fn with_psk() -> Cluster {
        let mut c = Cluster::new();
        c.psk = Some(write_psk(c.dir.path(), "swarm.key"));
        c
    }

    /// Starts a node with `extra` arguments after `node`; waits for its
    /// `KVMESH_NODE` line. `psk` overrides the cluster's key file (`Some`)
    /// for this one node.
    pub fn spawn(&mut self, extra: &[&str], psk: Option<&Path>) -> usize {
        let i = self.nodes.len();
        let log = self.dir.path().join(format!("node{i}.log"));
        let mut cmd = Command::new(P2PCTL);
        cmd.arg("node").args(extra);
        if let Some(p) = psk.or(self.psk.as_deref()) {
            cmd.arg("--psk-file").arg(p);
        }
        let ssd_dir = extra
            .iter()
            .position(|a| *a == "--ssd-dir")
            .map(|j| PathBuf::from(extra[j + 1]));
        cmd.env_remove("KVMESH_BOOTSTRAP")
            .env_remove("KVMESH_PSK_FILE")
            .env(
                "RUST_LOG",
                std::env::var("KVMESH_TEST_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("node log"));
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn p2pctl node");
        let stdout = child.stdout.take().expect("node stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut node = Node {
            child: Some(child),
            peer_id: String::new(),
            addr: String::new(),
            log,
            ssd_dir,
        };
        let line = match rx.recv_timeout(NODE_START_BOUND) {
            Ok(l) => l,
            Err(_) => {
                node.kill9();
                panic!("node {i} printed no KVMESH_NODE line within {NODE_START_BOUND:?}");
            }
        };
        let parts: Vec<&str> = line.split_whitespace().collect();
        assert!(
            parts.len() >= 3 && parts[0] == "KVMESH_NODE",
            "node {i} first line: {line:?} (log: {})",
            std::fs::read_to_string(&node.log).unwrap_or_default()
        );
        node.peer_id = parts[1].to_string();
        node.addr = format!("{}/p2p/{}", parts[2], parts[1]);
        self.nodes.push(node);
        i
    }

    /// Starts `n` nodes, the first alone and the others bootstrapped by it;
    /// `extra` goes to every one.
    pub fn spawn_bootstrapped(&mut self, n: usize, extra: &[&str]) {
        let first = self.spawn(extra, None);
        let boot = self.nodes[first].addr.clone();
        for _ in 1..n {
            let mut args: Vec<&str> = extra.to_vec();
            args.extend(["--bootstrap", &boot]);
            self.spawn(&args, None);
        }
    }

    /// Runs a `p2pctl` client command that joins through node `via`,
    /// bounded by `bound`; the environment carries the bootstrap address
    /// and the cluster's key file, as a user's shell would.
    pub fn ctl(&self, via: usize, args: &[&str]) -> Output {
        let env = [
            ("KVMESH_BOOTSTRAP", Some(self.nodes[via].addr.clone())),
            (
                "KVMESH_PSK_FILE",
                self.psk.as_ref().map(|p| p.display().to_string()),
            ),
        ];
        run_ctl(args, &env, Duration::from_secs(30))
    }

    /// [`Cluster::ctl`] that must succeed; returns stdout.
    pub fn ctl_ok(&self, via: usize, args: &[&str]) -> String {
        let out = self.ctl(via, args);
        assert!(
            out.status.success(),
            "p2pctl {args:?} via node {via} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// `p2pctl peers --json` through node `via`: the peer ids.
    pub fn peer_ids(&self, via: usize) -> Vec<String> {
        let text = self.ctl_ok(via, &["peers", "--json", "--timeout", "5"]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("peers json");
        let mut ids: Vec<String> = v
            .as_array()
            .expect("peers --json prints a list")
            .iter()
            .map(|p| p["peer_id"].as_str().expect("peer_id").to_string())
            .collect();
        ids.sort();
        ids
    }

    /// `p2pctl locate KEY --json` through node `via`: the holders.
    pub fn locate(&self, via: usize, key: &ObjectKey) -> Vec<String> {
        let text = self.ctl_ok(via, &["locate", &key.to_string(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("locate json");
        assert_eq!(v["key"].as_str(), Some(key.to_string().as_str()), "{text}");
        v["holders"]
            .as_array()
            .expect("holders list")
            .iter()
            .map(|h| h.as_str().expect("holder id").to_string())
            .collect()
    }

    /// `p2pctl stat --json` through node `via`.
    pub fn stat(&self, via: usize) -> Vec<serde_json::Value> {
        let text = self.ctl_ok(via, &["stat", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("stat json");
        v.as_array().expect("stat list").clone()
    }

    /// Index of the node with this peer id.
    pub fn index_of(&self, peer_id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.peer_id == peer_id)
            .unwrap_or_else(|| panic!("no node {peer_id}"))
    }

    /// A path in the cluster's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `Store` client (holds nothing) joined through node `via`.
    pub async fn client(&self, via: usize, transport: TransportKind) -> Store {
        let psk = self
            .psk
            .as_ref()
            .map(|p| std::fs::read_to_string(p).expect("psk"));
        let store = Store::start(client_config(
            vec![self.nodes[via].multiaddr()],
            psk,
            transport,
        ))
        .await
        .expect("start client");
        store
            .wait_for_members(self.nodes.len(), Duration::from_secs(15))
            .await
            .expect("client sees every node");
        store
    }
}

/// Makes the child get SIGKILL when the thread that spawned it ends, so no
/// node outlives a test process that was itself killed.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl, which is async-signal-safe; it touches no memory of the
    // parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Configuration of an in-test client: no memory, small engine.
pub fn client_config(
    bootstrap: Vec<Multiaddr>,
    psk: Option<String>,
    transport: TransportKind,
) -> StoreConfig {
    StoreConfig {
        bootstrap,
        psk,
        mem_bytes: 0,
        engine: EngineConfig {
            transport,
            io_threads: 1,
            shm_threads: 1,
            ..EngineConfig::default()
        },
        op_timeout: Duration::from_secs(5),
        dead_after: Duration::from_millis(1500),
        ..StoreConfig::default()
    }
}

/// Runs `p2pctl args` with `env` (a `None` value removes the variable),
/// killing it after `bound`.
pub fn run_ctl(args: &[&str], env: &[(&str, Option<String>)], bound: Duration) -> Output {
    let mut cmd = Command::new(P2PCTL);
    die_with_parent(&mut cmd);
    cmd.args(args)
        .env_remove("KVMESH_BOOTSTRAP")
        .env_remove("KVMESH_PSK_FILE")
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = cmd.spawn().expect("spawn p2pctl");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait p2pctl").is_some() {
            return child.wait_with_output().expect("p2pctl output");
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let out = child.wait_with_output().expect("p2pctl output");
            panic!(
                "p2pctl {args:?} ran past {bound:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` every 100 ms until it holds; panics with `what` after
/// `bound`. Returns how long it took.
pub fn wait_until(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < bound, "timed out after {bound:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------
// Network namespace for mDNS (libp2p's mDNS ignores loopback interfaces).

/// Address of the veth end the nodes listen on inside the namespace.
pub const NETNS_ADDR: &str = "10.77.1.1";

/// A network namespace with a veth pair carrying an address and a multicast
/// route; deleted on drop.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// Creates it; panics (failing the test) if it cannot.
    pub fn create(name: &str) -> Netns {
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

    /// Re-runs the current test binary's test `test` inside the namespace
    /// with `env_flag` set, bounded by `bound`; panics if it fails.
    pub fn rerun_test_inside(&self, test: &str, env_flag: &str, bound: Duration) {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new("ip");
        die_with_parent(&mut cmd);
        let mut child = cmd
            .args(["netns", "exec", &self.0])
            .arg(exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(env_flag, "1")
            .spawn()
            .expect("spawn the test binary inside the namespace");
        let deadline = Instant::now() + bound;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait child") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{test} inside the namespace did not finish within {bound:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            status.success(),
            "{test} inside the namespace failed: {status}"
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run_ok(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
