//! Helpers for the engine's tests: an engine, a runtime, a byte pattern, and a target process (`xfer-bench --mode
//! target`) driven over its stdin/stdout for multi-process ones.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use kvmesh_gpu::{Engine, EngineConfig, RegionDesc, TransportKind};

/// A runtime for a test's async part.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `len` bytes that differ from offset to offset and by `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

#[derive(Debug)]
pub struct Target {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub desc: RegionDesc,
}

impl Target {
    /// Starts a target serving `size` bytes filled with pattern `seed`.
    pub fn start(size: u64, seed: u64) -> Target {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xfer-bench"))
            .args(["--mode", "target", "--listen", "127.0.0.1:0"])
            .args([
                "--region-size",
                &size.to_string(),
                "--fill-seed",
                &seed.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start target");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let hex = line
            .strip_prefix("KVMESH_REGION ")
            .expect("descriptor line");
        let desc = RegionDesc::from_hex(hex).unwrap();
        Target {
            child,
            stdin,
            stdout,
            desc,
        }
    }

    /// Sends a command and returns the answer line.
    pub fn cmd(&mut self, c: &str) -> String {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// Asks the target whether `len` bytes at `off` match pattern `seed`.
    pub fn check(&mut self, seed: u64, off: u64, len: u64) -> String {
        self.cmd(&format!("check {seed} {off} {len}"))
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = nix_kill(self.pid(), libc::SIGCONT);
        self.kill();
    }
}

pub fn nix_kill(pid: i32, sig: i32) -> i32 {
    // SAFETY: plain syscall on a child we started.
    unsafe { libc::kill(pid, sig) }
}

/// An engine on `t`: 256 KiB slices, a 20 s default timeout.
pub fn engine(t: TransportKind) -> Engine {
    Engine::new(EngineConfig {
        transport: t,
        slice_size: 256 << 10,
        default_timeout: Duration::from_secs(20),
        ..EngineConfig::default()
    })
    .unwrap()
}
