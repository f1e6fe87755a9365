//! Dedup, handle reuse, masking, determinism, argument checks and the
//! rendezvous, on in-process ranks over real loopback transports.

mod common;

use std::time::Duration;

use kvmesh_ep::rendezvous::{self, Server};
use kvmesh_ep::workload::{self, run_rank, Routing, RunParams};
use kvmesh_ep::{DType, EpBuffers, Error, ExpertOut, Rows};
use kvmesh_gpu::TransportKind;

#[test]
fn a_token_with_two_experts_on_one_rank_is_sent_once() {
    // 8 experts on 2 ranks: 0..4 on rank 0, 4..8 on rank 1.
    let cfg = common::cfg(8, 128, 2, 8);
    let groups = common::form(2, &cfg, TransportKind::Shm);
    let res = common::on_all(groups, |g| {
        let x = workload::tokens(5, g.rank(), 3, 128, DType::Bf16);
        // token 0: experts 1 and 2 (both rank 0); token 1: 4 and 7 (both
        // rank 1); token 2: 3 and 5 (one each).
        let idx = [1, 2, 4, 7, 3, 5];
        let w = [0.5, 0.5, 0.25, 0.75, 0.4, 0.6];
        let recv = g.dispatch(x.as_rows(), &idx, &w).unwrap();
        assert_eq!(recv.handle().send_counts(), vec![2, 2]);
        let srcs: Vec<(usize, usize)> = (0..recv.num_rows()).map(|i| recv.source(i)).collect();
        let experts: Vec<Vec<(usize, f32)>> = (0..recv.num_rows())
            .map(|i| recv.row_experts(i).collect())
            .collect();
        workload::verify_dispatch(&recv, 5, 128, DType::Bf16, kvmesh_ep::WireFormat::Native)
            .unwrap();
        (srcs, experts, recv.expert_counts())
    });
    let (_, (srcs0, ex0, counts0)) = &res[0];
    // Rank 0 gets token 0 and token 2 from each rank, each once.
    assert_eq!(srcs0, &vec![(0, 0), (0, 2), (1, 0), (1, 2)]);
    assert_eq!(ex0[0], vec![(1, 0.5), (2, 0.5)]);
    assert_eq!(ex0[1], vec![(3, 0.4)]);
    assert_eq!(counts0, &vec![0, 2, 2, 2]);
    let (_, (srcs1, ex1, counts1)) = &res[1];
    assert_eq!(srcs1, &vec![(0, 1), (0, 2), (1, 1), (1, 2)]);
    assert_eq!(ex1[0], vec![(0, 0.25), (3, 0.75)]);
    assert_eq!(counts1, &vec![2, 2, 0, 2]);
}

#[test]
fn handle_reuse_dispatches_new_data_with_the_same_routing() {
    let cfg = common::cfg(16, 256, 4, 40);
    let groups = common::form(3, &cfg, TransportKind::Tcp);
    for (_, r) in common::on_all(groups, |g| {
        let rank = g.rank();
        let (idx, w) = workload::routing(Routing::Zipf, 9, rank, 40, 4, 16);
        let x1 = workload::tokens(1, rank, 40, 256, DType::Bf16);
        let x2 = workload::tokens(2, rank, 40, 256, DType::Bf16);
        let h = g.dispatch(x1.as_rows(), &idx, &w)?.into_handle();
        let recv = g.dispatch_with(x2.as_rows(), &h)?;
        workload::verify_dispatch(&recv, 2, 256, DType::Bf16, kvmesh_ep::WireFormat::Native)
            .map_err(Error::Invalid)?;
        let out = workload::run_experts(&recv, DType::Bf16, workload::ExpertMode::PerExpert);
        let h2 = recv.into_handle();
        let y = g.combine(ExpertOut::PerExpert(out.as_rows()), &h2)?;
        let map = kvmesh_ep::layout::ExpertMap {
            num_experts: 16,
            world: 3,
        };
        let want = workload::reference_combine(&x2, &idx, &w, map, kvmesh_ep::WireFormat::Native);
        assert_eq!(y, want);
        // A handle of the wrong size is refused before anything moves.
        let short = workload::tokens(2, rank, 39, 256, DType::Bf16);
        assert!(matches!(
            g.dispatch_with(short.as_rows(), &h),
            Err(Error::Invalid(_))
        ));
        Ok::<_, Error>(())
    }) {
        r.unwrap();
    }
}

#[test]
fn masked_entries_and_empty_ranks_give_zeros_where_nothing_was_selected() {
    let cfg = common::cfg(8, 64, 2, 4);
    let groups = common::form(2, &cfg, TransportKind::Shm);
    for (_, r) in common::on_all(groups, |g| {
        let rank = g.rank();
        let ntok = if rank == 0 { 3 } else { 0 };
        let x = workload::tokens(4, rank, ntok, 64, DType::F32);
        // Token 0 masked entirely; token 1 one live expert; token 2 both.
        let idx: Vec<i32> = [-1, -1, 6, -1, 0, 5][..2 * ntok].to_vec();
        let w: Vec<f32> = [0.0, 0.0, 1.0, 0.0, 0.5, 0.5][..2 * ntok].to_vec();
        let xr = Rows::new(&x.bytes, 64, DType::F32).unwrap();
        let recv = g.dispatch(xr, &idx, &w);
        recv.map(|r| r.into_handle()).err()
    }) {
        // The group is bf16; f32 rows are refused on every rank.
        assert!(matches!(r, Some(Error::Invalid(_))), "{r:?}");
    }
    let mut cfg = common::cfg(8, 64, 2, 4);
    cfg.dtype = DType::F32;
    let groups = common::form(2, &cfg, TransportKind::Shm);
    for (g, y) in common::on_all(groups, |g| {
        let rank = g.rank();
        let ntok = if rank == 0 { 3 } else { 0 };
        let x = workload::tokens(4, rank, ntok, 64, DType::F32);
        let idx: Vec<i32> = [-1, -1, 6, -1, 0, 5][..2 * ntok].to_vec();
        let w: Vec<f32> = [0.0, 0.0, 1.0, 0.0, 0.5, 0.5][..2 * ntok].to_vec();
        let recv = g.dispatch(x.as_rows(), &idx, &w).unwrap();
        let out = workload::run_experts(&recv, DType::F32, workload::ExpertMode::Reduced);
        let h = recv.into_handle();
        let y = g.combine(ExpertOut::Reduced(out.as_rows()), &h).unwrap();
        let map = kvmesh_ep::layout::ExpertMap {
            num_experts: 8,
            world: 2,
        };
        assert_eq!(
            y,
            workload::reference_combine(&x, &idx, &w, map, kvmesh_ep::WireFormat::Native)
        );
        y
    }) {
        if g.rank() == 0 {
            let f = y.to_f32();
            assert!(
                f[..64].iter().all(|v| *v == 0.0),
                "masked token is not zero"
            );
            assert!(f[64..].iter().any(|v| *v != 0.0));
        } else {
            assert_eq!(y.rows, 0);
        }
    }
}

#[test]
fn twenty_runs_of_one_seed_hash_identically_across_groups_and_transports() {
    let cfg = common::cfg(32, 512, 6, 64);
    let p = RunParams {
        tokens: 64,
        routing: "zipf".into(),
        seed: 42,
        iters: 20,
        warmup: 0,
        verify: true,
        expert_mode: "per-expert".into(),
        reuse_handle: false,
        send_buffers: false,
    };
    let mut per_transport = Vec::new();
    for t in [TransportKind::Shm, TransportKind::Tcp] {
        let groups = common::form(3, &cfg, t);
        let p = p.clone();
        let res = common::on_all(groups, move |g| run_rank(g, &p));
        let hashes: Vec<Vec<String>> = res
            .into_iter()
            .map(|(_, (rep, err))| {
                assert!(err.is_none() && rep.verified, "{:?}", rep.error);
                assert_eq!(rep.combines_checked, 20);
                rep.hashes
            })
            .collect();
        for h in &hashes {
            assert_eq!(h.len(), 1, "20 runs gave {} different outputs", h.len());
        }
        per_transport.push(hashes);
    }
    assert_eq!(per_transport[0], per_transport[1]);
}

#[test]
fn bad_arguments_are_refused_and_leave_the_group_usable() {
    let cfg = common::cfg(8, 64, 2, 4);
    let groups = common::form(2, &cfg, TransportKind::Shm);
    for (_, r) in common::on_all(groups, |g| {
        let x = workload::tokens(1, g.rank(), 4, 64, DType::Bf16);
        let w = [0.5f32; 8];
        assert!(matches!(
            g.dispatch(x.as_rows(), &[0, 8, 1, 2, 3, 4, 5, 6], &w),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            g.dispatch(x.as_rows(), &[0, 0, 1, 2, 3, 4, 5, 6], &w),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            g.dispatch(x.as_rows(), &[0, 1], &w[..2]),
            Err(Error::Invalid(_))
        ));
        let big = workload::tokens(1, g.rank(), 5, 64, DType::Bf16);
        assert!(matches!(
            g.dispatch(big.as_rows(), &[0; 10], &[0.5; 10]),
            Err(Error::Invalid(_))
        ));
        // Still usable: a valid collective works afterwards.
        let recv = g.dispatch(x.as_rows(), &[0, 4, 1, 5, 2, 6, 3, 7], &w)?;
        let h = recv.into_handle();
        let wrong = workload::tokens(1, g.rank(), 1, 64, DType::Bf16);
        assert!(matches!(
            g.combine(ExpertOut::Reduced(wrong.as_rows()), &h),
            Err(Error::Invalid(_))
        ));
        g.barrier()
    }) {
        r.unwrap();
    }
}

#[test]
fn gpu_buffers_are_refused_with_a_clear_error() {
    let mut cfg = common::cfg(8, 64, 2, 4);
    cfg.memory = kvmesh_gpu::MemoryKind::Gpu { device: 0 };
    let e = common::engine(TransportKind::Shm);
    let err = EpBuffers::alloc(&e, &cfg, 0, 2).unwrap_err();
    assert!(
        matches!(err, Error::Config(_)) && err.to_string().contains("GPU path"),
        "{err}"
    );
}

#[test]
fn rendezvous_forms_the_group_and_rejects_mismatched_configs() {
    let cfg = common::cfg(8, 64, 2, 4);
    let server = Server::bind("127.0.0.1:0", 2).unwrap();
    let addr = server.local_addr().unwrap();
    let s = std::thread::spawn(move || server.run(Duration::from_secs(10)));
    let joins: Vec<_> = (0..2)
        .map(|r| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let e = common::engine(TransportKind::Auto);
                let b = EpBuffers::alloc(&e, &cfg, r, 2).unwrap();
                let j = rendezvous::join(
                    addr,
                    r,
                    2,
                    &cfg.fingerprint(),
                    &b.desc(),
                    Duration::from_secs(10),
                )
                .unwrap();
                let mut g = kvmesh_ep::EpGroup::new(b, &j.descs).unwrap();
                g.barrier().unwrap();
                g.group_id()
            })
        })
        .collect();
    let ids: Vec<u64> = joins.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(ids[0], ids[1]);
    assert_eq!(s.join().unwrap().unwrap().len(), 2);

    // Different configs: both ranks are told why, nobody forms a group.
    let server = Server::bind("127.0.0.1:0", 2).unwrap();
    let addr = server.local_addr().unwrap();
    let s = std::thread::spawn(move || server.run(Duration::from_secs(10)));
    let joins: Vec<_> = (0..2)
        .map(|r| {
            std::thread::spawn(move || {
                let cfg = common::cfg(8, 64 * (r + 1), 2, 4);
                let e = common::engine(TransportKind::Auto);
                let b = EpBuffers::alloc(&e, &cfg, r, 2).unwrap();
                rendezvous::join(
                    addr,
                    r,
                    2,
                    &cfg.fingerprint(),
                    &b.desc(),
                    Duration::from_secs(10),
                )
                .map(|_| ())
            })
        })
        .collect();
    for h in joins {
        let err = h.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("config"), "{err}");
    }
    assert!(s.join().unwrap().is_err());

    // A rank that never joins: the server names it within its timeout.
    let server = Server::bind("127.0.0.1:0", 2).unwrap();
    let err = server
        .run(Duration::from_millis(200))
        .unwrap_err()
        .to_string();
    assert!(err.contains("[0, 1]"), "{err}");
}

#[test]
fn send_buffers_of_another_group_are_treated_as_plain_memory() {
    // Every engine numbers its regions from 1, so another group's send
    // buffer has the same region id as ours: it must not be taken for ours.
    let cfg = common::cfg(8, 128, 2, 16);
    let mut other = common::form(2, &cfg, TransportKind::Shm);
    let foreign: Vec<_> = other
        .iter_mut()
        .map(|g| std::sync::Mutex::new(Some(g.take_send_buffers().unwrap().0)))
        .collect();
    let foreign = std::sync::Arc::new(foreign);
    let groups = common::form(2, &cfg, TransportKind::Shm);
    for (_, r) in common::on_all(groups, move |g| {
        let rank = g.rank();
        let mut buf = foreign[rank].lock().unwrap().take().unwrap();
        let x = workload::tokens(8, rank, 16, 128, DType::Bf16);
        buf.as_mut_slice()[..x.bytes.len()].copy_from_slice(&x.bytes);
        let (idx, w) = workload::routing(Routing::Uniform, 8, rank, 16, 2, 8);
        let recv = g.dispatch(buf.rows(16)?, &idx, &w)?;
        workload::verify_dispatch(&recv, 8, 128, DType::Bf16, kvmesh_ep::WireFormat::Native)
            .map_err(Error::Invalid)
    }) {
        r.unwrap();
    }
    drop(other);
}
