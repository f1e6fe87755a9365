//! GPU tests of the NCCL communicator: all-to-all-v round trips with every
//! byte checked, in one process (a world of one: send to self) and between
//! two processes. They need a GPU and libnccl; `scripts/gpu-check.sh` runs
//! them with `--include-ignored` and puts a `libnccl.so` link on
//! `LD_LIBRARY_PATH`. Without NCCL they fail, naming what is missing.
//!
//! Two processes on one GPU: NCCL refuses two ranks of one communicator on
//! the same device ("Duplicate GPU detected", invalid usage). The two-process
//! test then checks that both ranks get that error cleanly (no hang, no
//! panic) and reports it; with two GPUs it moves and checks real bytes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use kvmesh_gpu::cuda::nccl::{self, NcclComm, NcclId, PeerSpan};
use kvmesh_gpu::cuda::{self, DeviceBuffer, GpuDevice, GpuStream};
use kvmesh_gpu::Error;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "KVMESH_NCCL_CHILD_ID";
const WAIT: Duration = Duration::from_secs(60);

/// Panics with the reason unless NCCL is usable.
fn require_nccl() {
    if let Err(e) = nccl::available() {
        panic!("this test needs a GPU and NCCL: {e}");
    }
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen()).collect()
}

fn upload(dev: &GpuDevice, data: &[u8]) -> DeviceBuffer {
    let b = DeviceBuffer::alloc(dev, data.len() as u64).unwrap();
    b.write_from_host(0, data).unwrap();
    b
}

fn download(b: &DeviceBuffer, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    b.read_to_host(0, &mut out).unwrap();
    out
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn one_rank_all_to_all_v_round_trips_every_byte() {
    require_nccl();
    let (major, minor, patch) = nccl::version().unwrap();
    println!("NCCL {major}.{minor}.{patch}");
    let dev = GpuDevice::open(0).unwrap();
    let id = NcclId::new().unwrap();
    let mut comm = NcclComm::init_rank(&dev, 1, 0, &id).unwrap();
    assert_eq!((comm.rank(), comm.world()), (0, 1));
    let s = GpuStream::new(&dev).unwrap();
    for (i, &n) in [1usize, 4097, (1 << 20) + 3, 64 << 20].iter().enumerate() {
        let seed = 100 + i as u64;
        // Unaligned offsets on both sides; sentinels around the receive span.
        let (src_off, dst_off) = (13u64, 4099u64);
        let mut src = random_bytes(n + 64, seed);
        src[..13].fill(0);
        let send = upload(&dev, &src);
        let pad = 0x5Au8;
        let recv = upload(&dev, &vec![pad; n + 8192]);
        let sspan = [PeerSpan {
            offset: src_off,
            len: n as u64,
        }];
        let rspan = [PeerSpan {
            offset: dst_off,
            len: n as u64,
        }];
        let t0 = s.record_timed().unwrap();
        comm.all_to_all_v(&s, &send, &sspan, &recv, &rspan).unwrap();
        let t1 = s.record_timed().unwrap();
        comm.wait(&t1, WAIT).unwrap();
        let us = t0.elapsed_ms(&t1).unwrap() as f64 * 1e3;
        println!("{n} bytes to self: {us:.1} µs");
        let got = download(&recv, n + 8192);
        assert_eq!(
            &got[dst_off as usize..dst_off as usize + n],
            &src[src_off as usize..src_off as usize + n],
            "{n} bytes"
        );
        assert!(
            got[..dst_off as usize].iter().all(|&b| b == pad),
            "{n}: before the span"
        );
        assert!(
            got[dst_off as usize + n..].iter().all(|&b| b == pad),
            "{n}: after the span"
        );
        // And back: the received bytes, sent again, land as the original.
        let back = DeviceBuffer::zeroed(&dev, n as u64).unwrap();
        comm.all_to_all_v(&s, &recv, &rspan, &back, &PeerSpan::packed(&[n as u64]))
            .unwrap();
        // Access events order the read-back after the collective.
        assert_eq!(
            download(&back, n),
            &src[src_off as usize..src_off as usize + n],
            "{n} bytes, second hop"
        );
    }
    // A bad plan is refused before NCCL sees it, and the communicator
    // stays usable.
    let a = upload(&dev, &[1u8; 64]);
    let b = DeviceBuffer::zeroed(&dev, 64).unwrap();
    let e = comm
        .all_to_all_v(
            &s,
            &a,
            &PeerSpan::packed(&[8, 8]),
            &b,
            &PeerSpan::packed(&[8, 8]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::Invalid(_)), "{e:?}");
    let e = comm
        .all_to_all_v(
            &s,
            &a,
            &PeerSpan::packed(&[65]),
            &b,
            &PeerSpan::packed(&[65]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
    // Zero bytes: nothing queued, still fine.
    comm.all_to_all_v(&s, &a, &PeerSpan::packed(&[0]), &b, &PeerSpan::packed(&[0]))
        .unwrap();
    comm.all_to_all_v(
        &s,
        &a,
        &PeerSpan::packed(&[64]),
        &b,
        &PeerSpan::packed(&[64]),
    )
    .unwrap();
    assert_eq!(download(&b, 64), vec![1u8; 64]);
    comm.check().unwrap();
    drop(comm);
    // A healthy communicator is destroyed without errors.
    let errs: Vec<String> = cuda::take_drop_errors()
        .into_iter()
        .filter(|e| e.contains("NCCL"))
        .collect();
    assert!(errs.is_empty(), "{errs:?}");
    // An explicit abort works too.
    let id = NcclId::new().unwrap();
    NcclComm::init_rank(&dev, 1, 0, &id)
        .unwrap()
        .abort()
        .unwrap();
}

/// Both ranks' plans: rank r sends `LENS[r][p]` bytes to p (asymmetric,
/// odd, one empty), generated from (seed, r, p).
const LENS: [[u64; 2]; 2] = [[1_000_003, 0], [777_777, 5]];

fn pair_bytes(src: usize, dst: usize) -> Vec<u8> {
    random_bytes(LENS[src][dst] as usize, 1000 + 10 * src as u64 + dst as u64)
}

/// One rank of the two-process test; `Ok(None)` when NCCL refused the
/// group (two ranks on one GPU).
fn two_rank_side(rank: usize, id: &NcclId) -> Result<Option<()>, String> {
    let gpus = cuda::device_count().unwrap().max(1);
    let dev = GpuDevice::open(rank as u32 % gpus).unwrap();
    let mut comm = match NcclComm::init_rank(&dev, 2, rank, id) {
        Ok(c) => c,
        Err(e) if gpus < 2 && e.to_string().contains("invalid usage") => {
            println!("rank {rank}: NCCL refused two ranks on one GPU: {e}");
            return Ok(None);
        }
        Err(e) => return Err(format!("rank {rank}: init: {e}")),
    };
    let send_lens = LENS[rank].to_vec();
    let recv_lens: Vec<u64> = (0..2).map(|p| LENS[p][rank]).collect();
    let data: Vec<u8> = (0..2).flat_map(|p| pair_bytes(rank, p)).collect();
    let want: Vec<u8> = (0..2).flat_map(|p| pair_bytes(p, rank)).collect();
    let send = upload(&dev, &data);
    let recv = DeviceBuffer::zeroed(&dev, want.len() as u64).unwrap();
    let s = GpuStream::new(&dev).unwrap();
    for round in 0..3 {
        s.fill(&recv, 0, want.len() as u64, round as u8).unwrap();
        comm.all_to_all_v(
            &s,
            &send,
            &PeerSpan::packed(&send_lens),
            &recv,
            &PeerSpan::packed(&recv_lens),
        )
        .map_err(|e| format!("rank {rank}: all-to-all-v: {e}"))?;
        comm.wait(&s.record().unwrap(), WAIT)
            .map_err(|e| format!("rank {rank}: wait: {e}"))?;
        if download(&recv, want.len()) != want {
            return Err(format!("rank {rank}: round {round}: received bytes differ"));
        }
    }
    Ok(Some(()))
}

/// The second rank, started by `two_processes_all_to_all_v`.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn nccl_child() {
    let Ok(hex) = std::env::var(CHILD_ENV) else {
        return; // only meaningful when started by the parent test
    };
    let id = NcclId::from_hex(&hex).unwrap();
    let verdict = match two_rank_side(1, &id) {
        Ok(Some(())) => "ok".to_string(),
        Ok(None) => "refused".to_string(),
        Err(e) => format!("bad {e}"),
    };
    // After libtest's "test nccl_child ... " on the same line.
    println!("KVMESH_NCCL_CHILD {verdict}");
    std::io::stdout().flush().unwrap();
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn two_processes_all_to_all_v() {
    require_nccl();
    let id = NcclId::new().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "nccl_child",
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, id.to_hex())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mine = two_rank_side(0, &id);
    let out = BufReader::new(child.stdout.take().unwrap());
    let verdict = out
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.split_once("KVMESH_NCCL_CHILD ")
                .map(|(_, v)| v.to_string())
        })
        .unwrap_or_else(|| "no verdict (child died)".into());
    assert!(child.wait().unwrap().success(), "child failed: {verdict}");
    match mine {
        Ok(Some(())) => assert_eq!(verdict, "ok"),
        Ok(None) => {
            assert_eq!(verdict, "refused", "both ranks see the refusal");
            println!(
                "one GPU: NCCL refused two ranks on it; the one-rank test covers the data path"
            );
        }
        Err(e) => panic!("{e}; child: {verdict}"),
    }
}
