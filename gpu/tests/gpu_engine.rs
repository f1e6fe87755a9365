//! GPU tests of the engine: READ/WRITE between GPU regions over `cuda-ipc`
//! (same process and two processes), `tcp` (staged on both sides) and `shm`
//! (staged on the initiator), byte-checked. They need a GPU;
//! `scripts/gpu-check.sh` runs them with `--include-ignored`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use kvmesh_gpu::{
    pattern, BatchOptions, Engine, EngineConfig, MemoryKind, Op, Region, RegionDesc, RemoteRegion,
    TransportKind,
};

const GPU0: MemoryKind = MemoryKind::Gpu { device: 0 };
const LEN: u64 = 8 << 20;

fn engine(t: TransportKind) -> Engine {
    Engine::new(EngineConfig {
        transport: t,
        slice_size: 256 << 10,
        default_timeout: Duration::from_secs(30),
        ..EngineConfig::default()
    })
    .unwrap()
}

fn filled(seed: u64, len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    pattern::fill(&mut v, seed, 0);
    v
}

/// Ranges (local offset, remote offset, len): odd sizes, unaligned, one
/// larger than a slice, one ending at the region end.
fn ranges() -> Vec<(u64, u64, u64)> {
    vec![
        (0, 0, 1),
        (17, 4099, 1_000_003),
        (2 << 20, 3 << 20, 4096),
        (5 << 20, LEN - 777_777, 777_777),
        (LEN - 300_001, 1 << 20, 300_001),
    ]
}

/// Writes local pattern bytes to the remote and reads them back into a
/// poisoned local range; `remote_bytes` reads the remote region's bytes.
fn exercise(
    e: &Engine,
    local: &Region,
    remote: RemoteRegion,
    remote_bytes: &mut dyn FnMut(u64, u64) -> Vec<u8>,
    what: &str,
) {
    let src = filled(5, LEN);
    local.write_at(0, &src).unwrap();
    let ops: Vec<Op> = ranges()
        .iter()
        .map(|&(l, r, n)| Op::write(local.id(), l, remote, r, n))
        .collect();
    let st = e
        .submit(&ops, BatchOptions::default())
        .unwrap()
        .wait_blocking(Duration::from_secs(60))
        .unwrap();
    assert_eq!(st.result, Ok(()), "{what} write: {st:?}");
    for &(l, r, n) in &ranges() {
        let got = remote_bytes(r, n);
        assert!(
            got == src[l as usize..(l + n) as usize],
            "{what} write {l}->{r}+{n}"
        );
    }
    // Read back into a poisoned region.
    local.fill(0, LEN, 0xEE).unwrap();
    let ops: Vec<Op> = ranges()
        .iter()
        .map(|&(l, r, n)| Op::read(local.id(), l, remote, r, n))
        .collect();
    let want: Vec<Vec<u8>> = ranges()
        .iter()
        .map(|&(_, r, n)| remote_bytes(r, n))
        .collect();
    let st = e
        .submit(&ops, BatchOptions::default())
        .unwrap()
        .wait_blocking(Duration::from_secs(60))
        .unwrap();
    assert_eq!(st.result, Ok(()), "{what} read: {st:?}");
    for (k, &(l, _, n)) in ranges().iter().enumerate() {
        let mut got = vec![0u8; n as usize];
        local.read_at(l, &mut got).unwrap();
        assert!(got == want[k], "{what} read op {k}");
    }
    // Outside the remote region: refused at submit.
    assert!(e
        .submit(
            &[Op::read(local.id(), 0, remote, LEN - 1, 2)],
            BatchOptions::default()
        )
        .is_err());
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn gpu_to_gpu_in_process_over_every_transport() {
    let target = engine(TransportKind::Auto);
    let remote_gpu = target.alloc(LEN, GPU0).unwrap();
    remote_gpu.write_at(0, &filled(9, LEN)).unwrap();
    let remote_host = target.alloc(LEN, MemoryKind::Host).unwrap();
    for (t, remote_region, name) in [
        (
            TransportKind::CudaIpc,
            &remote_gpu,
            "cuda-ipc (same process)",
        ),
        (TransportKind::Auto, &remote_gpu, "auto (cuda-ipc)"),
        (TransportKind::Tcp, &remote_gpu, "tcp, GPU on both sides"),
        (TransportKind::Shm, &remote_host, "shm, local GPU staged"),
        (TransportKind::Tcp, &remote_host, "tcp, local GPU staged"),
    ] {
        let e = engine(t);
        let local = e.alloc(LEN, GPU0).unwrap();
        let remote = e.import(&remote_region.desc());
        let rr = remote_region.clone();
        exercise(
            &e,
            &local,
            remote,
            &mut |off, n| {
                let mut v = vec![0u8; n as usize];
                rr.read_at(off, &mut v).unwrap();
                v
            },
            name,
        );
        e.deregister(&local, Duration::from_secs(5)).unwrap();
    }
    // Host memory initiator into a remote GPU region (cuda-ipc, host side pageable).
    let e = engine(TransportKind::Auto);
    let local = e.alloc(LEN, MemoryKind::Host).unwrap();
    let remote = e.import(&remote_gpu.desc());
    let rr = remote_gpu.clone();
    exercise(
        &e,
        &local,
        remote,
        &mut |off, n| {
            let mut v = vec![0u8; n as usize];
            rr.read_at(off, &mut v).unwrap();
            v
        },
        "host -> GPU over cuda-ipc",
    );
    // Registered caller memory (a sub-range of an allocation, as a tensor is).
    let dev = kvmesh_gpu::cuda::GpuDevice::open(0).unwrap();
    let buf = kvmesh_gpu::cuda::DeviceBuffer::zeroed(&dev, LEN + 8192).unwrap();
    let ptr = (kvmesh_gpu::cuda::GpuMemory::addr(&buf) + 4096) as *mut u8;
    // SAFETY: `buf` outlives the region (deregistered below).
    let reg = unsafe { target.register(ptr, LEN, GPU0) }.unwrap();
    assert_eq!(reg.desc().gpu.as_ref().unwrap().ipc_offset, 4096);
    let e = engine(TransportKind::Auto);
    let local = e.alloc(LEN, GPU0).unwrap();
    let remote = e.import(&reg.desc());
    let rr = reg.clone();
    exercise(
        &e,
        &local,
        remote,
        &mut |off, n| {
            let mut v = vec![0u8; n as usize];
            rr.read_at(off, &mut v).unwrap();
            v
        },
        "registered GPU memory",
    );
    target.deregister(&reg, Duration::from_secs(5)).unwrap();
    // Registering host memory as GPU memory is refused.
    let mut host = vec![0u8; 4096];
    // SAFETY: refused before use.
    assert!(unsafe { target.register(host.as_mut_ptr(), 4096, GPU0) }.is_err());
}

const CHILD_ENV: &str = "KVMESH_GPU_ENGINE_CHILD";

/// The target engine of `cuda_ipc_between_two_processes` (re-executed copy
/// of this binary): serves one GPU region, answers `check SEED OFF LEN` and
/// `read OFF LEN` (hex) on stdin.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn engine_child() {
    if std::env::var(CHILD_ENV).is_err() {
        return;
    }
    let e = engine(TransportKind::Auto);
    let r = e.alloc(LEN, GPU0).unwrap();
    r.write_at(0, &filled(9, LEN)).unwrap();
    println!("KVMESH_REGION {}", r.desc().to_hex());
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["read", off, n] => {
                let mut v = vec![0u8; n.parse().unwrap()];
                r.read_at(off.parse().unwrap(), &mut v).unwrap();
                let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
                println!("KVMESH_BYTES {hex}");
            }
            ["quit"] => break,
            _ => println!("KVMESH_BYTES ?"),
        }
        std::io::stdout().flush().unwrap();
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn cuda_ipc_between_two_processes() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "engine_child",
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    let mut next_line = |prefix: &str| -> String {
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
            if let Some(rest) = line.trim().strip_prefix(prefix) {
                return rest.to_string();
            }
        }
    };
    let desc = RegionDesc::from_hex(&next_line("KVMESH_REGION ")).unwrap();
    assert!(desc.gpu.is_some());
    for t in [TransportKind::CudaIpc, TransportKind::Tcp] {
        let e = engine(t);
        let local = e.alloc(LEN, GPU0).unwrap();
        let remote = e.import(&desc);
        let mut remote_bytes = |off: u64, n: u64| -> Vec<u8> {
            writeln!(stdin, "read {off} {n}").unwrap();
            stdin.flush().unwrap();
            let hex = next_line("KVMESH_BYTES ");
            (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect()
        };
        exercise(
            &e,
            &local,
            remote,
            &mut remote_bytes,
            &format!("{t:?} two processes"),
        );
        // A notification after the batch arrives after the bytes.
        let st = e
            .submit(
                &[Op::write(local.id(), 0, remote, 0, 4096)],
                BatchOptions {
                    timeout: None,
                    notify: Some(b"done".to_vec()),
                },
            )
            .unwrap()
            .wait_blocking(Duration::from_secs(30))
            .unwrap();
        assert_eq!(st.result, Ok(()));
    }
    writeln!(stdin, "quit").unwrap();
    stdin.flush().unwrap();
    assert!(child.wait().unwrap().success());
}
