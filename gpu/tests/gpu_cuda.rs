//! GPU tests of the CUDA layer: copy kernels against a CPU reference,
//! host/device round trips, stream ordering after foreign events, and CUDA
//! IPC between two processes. They need a GPU; `scripts/gpu-check.sh`
//! runs them with `--include-ignored`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use kvmesh_gpu::cuda::{
    segments, DeviceBuffer, GpuDevice, GpuEvent, GpuKernels, GpuMemory, GpuStream,
    HostRegistration, IpcExport, IpcMapping, PinnedBuffer, Segment,
};
use kvmesh_gpu::pattern;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const NEEDS_GPU: &str = "needs a GPU: scripts/gpu-check.sh runs it";

fn dev() -> GpuDevice {
    GpuDevice::open(0).expect("GPU 0 (this test needs a GPU)")
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen()).collect()
}

/// Disjoint pieces `(offset, len)` inside `cap` bytes: odd lengths,
/// unaligned offsets, a few large aligned ones, in shuffled order.
fn pieces(cap: u64, seed: u64) -> Vec<(u64, u64)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut at = rng.gen_range(0..16);
    loop {
        let len = match rng.gen_range(0..20) {
            0 => 256 << 10,                  // several kernel pieces
            1 => 1,                          // one byte
            2 => rng.gen_range(1..16) * 16,  // aligned
            _ => rng.gen_range(1..6000) | 1, // odd
        };
        if at + len > cap {
            break;
        }
        out.push((at, len));
        at += len + rng.gen_range(0..70);
        if rng.gen_range(0..10) == 0 {
            at = at.next_multiple_of(16); // aligned starts too
        }
    }
    out.shuffle(&mut rng);
    out
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn gather_and_scatter_match_the_cpu_reference() {
    let _ = NEEDS_GPU;
    let d = dev();
    let k = GpuKernels::load(&d).unwrap();
    let s = GpuStream::new(&d).unwrap();
    const CAP: u64 = 16 << 20;
    for seed in 0..4u64 {
        let src_host = random_bytes(CAP as usize, seed);
        let src = DeviceBuffer::alloc(&d, CAP).unwrap();
        src.write_from_host(0, &src_host).unwrap();
        let ps = pieces(CAP, 100 + seed);
        let total: u64 = ps.iter().map(|p| p.1).sum();
        assert!(ps.len() > 1000, "{} pieces", ps.len());
        // Gather into a poisoned staging buffer at an unaligned start.
        let start = seed % 16;
        let staging = DeviceBuffer::alloc(&d, total + 64).unwrap();
        let poison = vec![0xA5u8; (total + 64) as usize];
        staging.write_from_host(0, &poison).unwrap();
        let abs: Vec<(u64, u64)> = ps.iter().map(|&(o, l)| (src.addr() + o, l)).collect();
        let g = segments::gather(&abs, staging.addr() + start);
        k.gather(&s, &g, &src, &staging)
            .unwrap()
            .synchronize()
            .unwrap();
        let mut got = vec![0u8; (total + 64) as usize];
        staging.read_to_host(0, &mut got).unwrap();
        let mut want = poison.clone();
        segments::copy_on_host(&g, &src_host, src.addr(), &mut want, staging.addr());
        assert!(
            got == want,
            "gather seed {seed}: first difference at {:?}",
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
        // Scatter it back into a poisoned copy of the source layout.
        let back = DeviceBuffer::alloc(&d, CAP).unwrap();
        let poison2 = vec![0x5Au8; CAP as usize];
        back.write_from_host(0, &poison2).unwrap();
        let abs: Vec<(u64, u64)> = ps.iter().map(|&(o, l)| (back.addr() + o, l)).collect();
        let sc = segments::scatter(staging.addr() + start, &abs);
        k.scatter(&s, &sc, &staging, &back)
            .unwrap()
            .synchronize()
            .unwrap();
        let mut got = vec![0u8; CAP as usize];
        back.read_to_host(0, &mut got).unwrap();
        let mut want = poison2;
        for &(o, l) in &ps {
            want[o as usize..(o + l) as usize]
                .copy_from_slice(&src_host[o as usize..(o + l) as usize]);
        }
        assert!(
            got == want,
            "scatter seed {seed}: first difference at {:?}",
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
    }
    // Misaligned relative offsets (src and dst differ mod 16) take the
    // narrow paths.
    let src_host = random_bytes(1 << 20, 9);
    let src = DeviceBuffer::alloc(&d, 1 << 20).unwrap();
    src.write_from_host(0, &src_host).unwrap();
    let dst = DeviceBuffer::zeroed(&d, 1 << 20).unwrap();
    let segs: Vec<Segment> = (0..200u64)
        .map(|i| Segment {
            src: src.addr() + i * 5000 + (i % 7),
            dst: dst.addr() + i * 5000 + (i % 5),
            len: 4000 + i,
        })
        .collect();
    k.gather(&s, &segs, &src, &dst)
        .unwrap()
        .synchronize()
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    dst.read_to_host(0, &mut got).unwrap();
    let mut want = vec![0u8; 1 << 20];
    segments::copy_on_host(&segs, &src_host, src.addr(), &mut want, dst.addr());
    assert!(got == want, "misaligned segments");
    // Out-of-buffer and overlapping lists are refused before any launch.
    let bad = [Segment {
        src: src.addr(),
        dst: dst.addr() + (1 << 20) - 1,
        len: 2,
    }];
    assert!(k.gather(&s, &bad, &src, &dst).is_err());
    assert!(k.gather(&s, &segs[..1], &src, &src).is_err());
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn host_device_round_trips() {
    let d = dev();
    let s1 = GpuStream::new(&d).unwrap();
    let s2 = GpuStream::new(&d).unwrap();
    const N: u64 = (32 << 20) + 13;
    let data = random_bytes(N as usize, 1);
    let mut pin = PinnedBuffer::alloc(&d, N).unwrap();
    pin.as_mut_slice().unwrap().copy_from_slice(&data);
    let a = DeviceBuffer::alloc(&d, N).unwrap();
    let b = DeviceBuffer::alloc(&d, N).unwrap();
    // H2D on one stream, D2D on another, D2H on a third: ordering comes from
    // the buffers' recorded events alone.
    s1.copy(&a, 0, &pin, 0, N).unwrap();
    s2.copy(&b, 0, &a, 0, N).unwrap();
    let mut out = PinnedBuffer::alloc(&d, N).unwrap();
    s1.copy(&out, 0, &b, 0, N).unwrap();
    assert!(out.as_slice().unwrap() == &data[..]);
    // Registered pageable memory, unaligned offsets.
    let mut v = vec![0u8; N as usize];
    // SAFETY: `v` outlives the registration (dropped first below).
    let reg = unsafe { HostRegistration::new(&d, v.as_mut_ptr(), N) }.unwrap();
    s2.copy(&reg, 7, &b, 3, N - 10).unwrap();
    reg.access().synchronize().unwrap();
    drop(reg);
    assert!(v[7..(N - 3) as usize] == data[3..(N - 7) as usize]);
    // Bounds are checked.
    assert!(s1.copy(&a, 1, &b, 0, N).is_err());
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn copies_wait_for_foreign_events() {
    let d = dev();
    let k = GpuKernels::load(&d).unwrap();
    let compute = GpuStream::new(&d).unwrap(); // plays the model's stream
    let copy = GpuStream::new(&d).unwrap();
    const N: u64 = 256 << 20; // large enough that a racing copy sees old bytes
    let src_host = random_bytes(N as usize, 3);
    let src = DeviceBuffer::alloc(&d, N).unwrap();
    src.write_from_host(0, &src_host).unwrap();
    let kv = DeviceBuffer::zeroed(&d, N).unwrap();
    let segs = segments::gather(&[(src.addr(), N)], kv.addr());
    let table = k.upload(&compute, &segs).unwrap();
    compute.synchronize().unwrap();
    for round in 0..3 {
        // 1. A kernel writes `kv` on the compute stream; the copy stream
        //    copies it out after the compute stream's event, passed as a raw
        //    handle the way a PyTorch event would be.
        // SAFETY: the table's segments lie inside `src` and `kv`, disjoint.
        let ev = unsafe { k.launch(&compute, &table) }.unwrap();
        // SAFETY: `ev` outlives `foreign`.
        let foreign = unsafe { GpuEvent::from_raw(&d, ev.as_raw()) };
        copy.wait(&foreign).unwrap();
        let mut out = PinnedBuffer::alloc(&d, N).unwrap();
        // SAFETY: both ranges are live buffers of N bytes until the sync below.
        unsafe { copy.copy_raw(out.addr(), kv.addr(), N) }.unwrap();
        copy.synchronize().unwrap();
        assert!(
            out.as_slice().unwrap() == &src_host[..],
            "round {round}: copy saw stale bytes"
        );
        // 2. A load lands in `kv` on the copy stream; a kernel on the compute
        //    stream waits for the load's event and copies `kv` onward.
        let new = random_bytes(N as usize, 10 + round);
        let mut pin = PinnedBuffer::alloc(&d, N).unwrap();
        pin.as_mut_slice().unwrap().copy_from_slice(&new);
        // SAFETY: live buffers of N bytes until the syncs below.
        unsafe { copy.copy_raw(kv.addr(), pin.addr(), N) }.unwrap();
        let loaded = copy.record().unwrap();
        compute.wait(&loaded).unwrap();
        let onward = DeviceBuffer::zeroed(&d, N).unwrap();
        let segs2 = segments::gather(&[(kv.addr(), N)], onward.addr());
        let t2 = k.upload(&compute, &segs2).unwrap();
        // SAFETY: segments inside `kv` and `onward`, disjoint.
        unsafe { k.launch(&compute, &t2) }
            .unwrap()
            .synchronize()
            .unwrap();
        let mut got = vec![0u8; N as usize];
        onward.read_to_host(0, &mut got).unwrap();
        assert!(
            got == new,
            "round {round}: kernel saw bytes from before the load"
        );
        copy.synchronize().unwrap();
    }
    let mut ev = compute.record().unwrap();
    let fut = ev.completed();
    fut.wait_blocking(std::time::Duration::from_secs(10))
        .unwrap();
    ev = compute.record_timed().unwrap();
    let end = compute.record_timed().unwrap();
    end.synchronize().unwrap();
    assert!(ev.elapsed_ms(&end).unwrap() >= 0.0);
}

const CHILD_ENV: &str = "KVMESH_GPU_IPC_CHILD";

/// The exporting side of `ipc_between_two_processes`, run as a re-executed
/// copy of this test binary.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn ipc_child() {
    if std::env::var(CHILD_ENV).is_err() {
        return; // only meaningful as the child of ipc_between_two_processes
    }
    let d = dev();
    const N: u64 = 8 << 20;
    let buf = DeviceBuffer::alloc(&d, N).unwrap();
    let mut host = vec![0u8; (N - 4096) as usize];
    pattern::fill(&mut host, 77, 0);
    buf.write_from_host(4096, &host).unwrap();
    let x = IpcExport::new(&d, buf.addr() + 4096, N - 4096).unwrap();
    let hex: String = x.handle.iter().map(|b| format!("{b:02x}")).collect();
    println!("KVMESH_IPC {hex} {}", x.offset);
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap(); // parent wrote: check
    let mut got = vec![0u8; (N - 4096) as usize];
    buf.read_to_host(4096, &mut got).unwrap();
    let ok = pattern::check(&got, 78, 0).is_none();
    println!("KVMESH_CHECK {}", if ok { "ok" } else { "bad" });
    std::io::stdout().flush().unwrap();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn ipc_between_two_processes() {
    let d = dev();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "ipc_child",
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
    let mut line = String::new();
    let (handle, offset) = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
        if let Some(rest) = line.trim().strip_prefix("KVMESH_IPC ") {
            let (h, o) = rest.split_once(' ').unwrap();
            let bytes: Vec<u8> = (0..64)
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            break (
                <[u8; 64]>::try_from(bytes).unwrap(),
                o.parse::<u64>().unwrap(),
            );
        }
    };
    assert_eq!(offset, 4096);
    let m = IpcMapping::open(&d, &handle).unwrap();
    // Opening twice gives the cached mapping.
    let m2 = IpcMapping::open(&d, &handle).unwrap();
    assert_eq!(m.base(), m2.base());
    const LEN: u64 = (8 << 20) - 4096;
    let s = GpuStream::new(&d).unwrap();
    let mut pin = PinnedBuffer::alloc(&d, LEN).unwrap();
    // SAFETY: the mapping covers the child's allocation; pinned buffer live.
    unsafe { s.copy_raw(pin.addr(), m.base() + offset, LEN) }.unwrap();
    s.synchronize().unwrap();
    assert_eq!(
        pattern::check(pin.as_slice().unwrap(), 77, 0),
        None,
        "read through IPC"
    );
    // Push new bytes from a device buffer of ours (device to device).
    let mut host = vec![0u8; LEN as usize];
    pattern::fill(&mut host, 78, 0);
    let mine = DeviceBuffer::alloc(&d, LEN).unwrap();
    mine.write_from_host(0, &host).unwrap();
    // SAFETY: as above.
    unsafe { s.copy_raw(m.base() + offset, mine.addr(), LEN) }.unwrap();
    s.synchronize().unwrap();
    writeln!(stdin, "check").unwrap();
    stdin.flush().unwrap();
    let verdict = loop {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child exited early");
        if let Some(v) = line.trim().strip_prefix("KVMESH_CHECK ") {
            break v.to_string();
        }
    };
    drop((m, m2));
    assert_eq!(verdict, "ok", "child saw the pushed bytes");
    assert!(child.wait().unwrap().success());
    assert!(kvmesh_gpu::cuda::take_drop_errors().is_empty());
}
