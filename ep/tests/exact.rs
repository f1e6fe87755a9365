//! Dispatch and combine against the single-process reference, bit for bit,
//! over shm and tcp, 2 to 4 in-process ranks, every routing and dtype.

mod common;

use kvmesh_ep::workload::{run_rank, RunParams};
use kvmesh_ep::{DType, Exchange, WireFormat};
use kvmesh_gpu::TransportKind;

fn params(tokens: usize, routing: &str, mode: &str, send_buffers: bool) -> RunParams {
    RunParams {
        tokens,
        routing: routing.into(),
        seed: 7,
        iters: 3,
        warmup: 0,
        verify: true,
        expert_mode: mode.into(),
        reuse_handle: false,
        send_buffers,
    }
}

fn check(
    world: usize,
    dtype: DType,
    transport: TransportKind,
    routing: &str,
    mode: &str,
    send_buffers: bool,
) {
    let mut cfg = common::cfg(16, 256, 4, 48);
    cfg.dtype = dtype;
    let groups = common::form(world, &cfg, transport);
    let p = params(40, routing, mode, send_buffers);
    for (g, (rep, err)) in common::on_all(groups, move |g| run_rank(g, &p)) {
        assert!(err.is_none(), "rank {}: {err:?}", g.rank());
        assert!(rep.verified, "rank {}: {:?}", g.rank(), rep.error);
        assert_eq!(rep.combines_checked, 3);
        assert!(rep.rows_checked > 0);
        assert_eq!(rep.hashes.len(), 1, "combine not deterministic");
    }
}

#[test]
fn bf16_shm_two_ranks_uniform() {
    check(
        2,
        DType::Bf16,
        TransportKind::Shm,
        "uniform",
        "per-expert",
        false,
    );
}

#[test]
fn f32_tcp_three_ranks_zipf() {
    check(
        3,
        DType::F32,
        TransportKind::Tcp,
        "zipf",
        "per-expert",
        true,
    );
}

#[test]
fn bf16_tcp_four_ranks_hot_reduced() {
    check(
        4,
        DType::Bf16,
        TransportKind::Tcp,
        "hot-expert",
        "reduced",
        false,
    );
}

#[test]
fn f32_shm_four_ranks_uniform_reduced() {
    check(
        4,
        DType::F32,
        TransportKind::Shm,
        "uniform",
        "reduced",
        true,
    );
}

#[test]
fn bf16_shm_three_ranks_hot() {
    check(
        3,
        DType::Bf16,
        TransportKind::Shm,
        "hot-expert",
        "per-expert",
        true,
    );
}

#[test]
fn bf16_shm_two_ranks_reduced_from_send_buffers() {
    check(2, DType::Bf16, TransportKind::Shm, "zipf", "reduced", true);
}

#[test]
fn fp8_dispatch_matches_its_reference_and_stays_near_the_input() {
    let mut cfg = common::cfg(16, 384, 4, 48);
    cfg.dispatch_format = WireFormat::Fp8E4M3;
    let groups = common::form(2, &cfg, TransportKind::Shm);
    let p = params(32, "uniform", "per-expert", true);
    for (g, (rep, err)) in common::on_all(groups, move |g| run_rank(g, &p)) {
        assert!(
            err.is_none() && rep.verified,
            "rank {}: {err:?} {:?}",
            g.rank(),
            rep.error
        );
    }
    // The dequantized rows stay within e4m3's error of the bf16 input.
    let groups = common::form(2, &cfg, TransportKind::Shm);
    let res = common::on_all(groups, |g| {
        let x = kvmesh_ep::workload::tokens(3, g.rank(), 20, 384, DType::Bf16);
        let (idx, w) = kvmesh_ep::workload::routing(
            kvmesh_ep::workload::Routing::Uniform,
            3,
            g.rank(),
            20,
            4,
            16,
        );
        let recv = g.dispatch(x.as_rows(), &idx, &w).unwrap();
        let mut worst = 0f32;
        let mut f = vec![0f32; 384];
        let mut orig = vec![0f32; 384];
        let mut raw = vec![0u8; 768];
        for i in 0..recv.num_rows() {
            let (s, t) = recv.source(i);
            recv.row_f32(i, &mut f);
            kvmesh_ep::workload::token_row(3, s, t, 384, DType::Bf16, &mut raw);
            kvmesh_ep::dtype::to_f32(&raw, DType::Bf16, &mut orig);
            for b in 0..3 {
                let r = b * 128..(b + 1) * 128;
                let amax = orig[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, y) in orig[r.clone()].iter().zip(&f[r]) {
                    let tol = a.abs() / 16.0 + amax / 448.0 / 1024.0;
                    assert!((a - y).abs() <= tol, "{a} vs {y}");
                    worst = worst.max((a - y).abs() / a.abs());
                }
            }
        }
        worst
    });
    for (_, worst) in res {
        assert!(
            worst > 0.0,
            "FP8 rows equal the input: quantization did not happen"
        );
    }
}

#[test]
fn two_sided_baseline_gives_the_same_bits() {
    let mut cfg = common::cfg(16, 256, 4, 48);
    let p = params(40, "zipf", "reduced", true);
    let one = common::on_all(common::form(3, &cfg, TransportKind::Shm), {
        let p = p.clone();
        move |g| run_rank(g, &p)
    });
    cfg.exchange = Exchange::TwoSided;
    let two = common::on_all(common::form(3, &cfg, TransportKind::Shm), move |g| {
        run_rank(g, &p)
    });
    for ((_, (a, ea)), (_, (b, eb))) in one.iter().zip(&two) {
        assert!(ea.is_none() && eb.is_none() && a.verified && b.verified);
        assert_eq!(a.hashes, b.hashes);
    }
}
