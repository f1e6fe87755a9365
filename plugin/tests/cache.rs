//! KV caches in one process: descriptors, registration checks, the
//! deregistration contract, and a loopback push over both transports.

use std::time::Duration;

use kvmesh_gpu::{Engine, EngineConfig, MemoryKind, TransportKind};
use kvmesh_plugin::{
    BlockShape, DType, Error, HeadOrder, KvCache, KvCacheDesc, KvLayout, LayoutError, RemoteKvCache,
};

fn layout(blocks: u32) -> KvLayout {
    KvLayout::vllm_flash_attn(
        BlockShape::kv(2, 4, 2, 8, DType::F16),
        blocks,
        HeadOrder::Nhd,
    )
    .unwrap()
}

fn engine(t: TransportKind) -> Engine {
    Engine::new(EngineConfig {
        transport: t,
        ..EngineConfig::default()
    })
    .unwrap()
}

#[test]
fn descriptors_round_trip_and_reject_garbage() {
    let e = engine(TransportKind::Auto);
    let c = KvCache::alloc(&e, layout(8), MemoryKind::Host).unwrap();
    let d = c.desc();
    let b = d.to_bytes();
    assert_eq!(KvCacheDesc::from_bytes(&b).unwrap(), d);
    assert_eq!(d.engine_id(), Some(e.descriptor().engine_id));
    let msg = |b: &[u8]| KvCacheDesc::from_bytes(b).unwrap_err().to_string();
    assert_eq!(
        msg(b"xx"),
        "bad KV cache descriptor: not a KV cache descriptor (bad magic)"
    );
    let mut v = b.clone();
    v[2] = 9;
    assert_eq!(
        msg(&v),
        "bad KV cache descriptor: version 9, this build understands 1"
    );
    assert!(msg(&b[..b.len() - 3]).starts_with("bad KV cache descriptor: decode:"));
    assert!(msg(&vec![b'K'; 2 << 20]).contains("more than the"));
    // Regions of two different engines in one descriptor.
    let e2 = engine(TransportKind::Auto);
    let c2 = KvCache::alloc(&e2, layout(8), MemoryKind::Host).unwrap();
    let mut mixed = d.clone();
    mixed.regions[1] = c2.desc().regions[1].clone();
    assert!(mixed
        .check()
        .unwrap_err()
        .to_string()
        .contains("belongs to engine"));
}

#[test]
fn registration_checks_the_regions_against_the_layout() {
    let e = engine(TransportKind::Auto);
    let l = layout(8);
    let need = l.required_region_len(0);
    let mut a = vec![0u8; need as usize];
    let mut b = vec![0u8; need as usize - 1];
    // SAFETY: refused before registration; nothing keeps the pointers.
    let err = unsafe {
        KvCache::register(
            &e,
            l.clone(),
            &[(a.as_mut_ptr(), need), (b.as_mut_ptr(), need - 1)],
            MemoryKind::Host,
        )
    }
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Layout(LayoutError::RegionTooSmall { region: 1, .. })
        ),
        "{err}"
    );
    // SAFETY: as above.
    let err =
        unsafe { KvCache::register(&e, l.clone(), &[(a.as_mut_ptr(), need)], MemoryKind::Host) }
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the layout has 2 base region(s), 1 were given"
    );
    // GPU memory: accepted by the API, refused clearly by an engine without CUDA.
    // SAFETY: as above.
    let err = unsafe {
        KvCache::register(
            &e,
            l,
            &[(a.as_mut_ptr(), need), (b.as_mut_ptr(), need)],
            MemoryKind::Gpu { device: 0 },
        )
    }
    .unwrap_err();
    assert!(err.to_string().contains("GPU"), "{err}");
    assert_eq!(
        e.region_count(),
        0,
        "failed registrations leave nothing behind"
    );
}

#[test]
fn loopback_push_over_tcp_and_shm_then_deregistration() {
    for t in [TransportKind::Tcp, TransportKind::Shm] {
        let (a, b) = (engine(t), engine(t));
        let src = KvCache::alloc(&a, layout(6), MemoryKind::Host).unwrap();
        let dst = KvCache::alloc(&b, layout(9), MemoryKind::Host).unwrap();
        for (r, reg) in src.regions().iter().enumerate() {
            reg.fill(0, reg.len(), 0x10 + r as u8).unwrap();
        }
        let remote = RemoteKvCache::import(&a, &dst.desc()).unwrap();
        let p = src.push(&remote, &[0, 5], &[8, 1], b"x", None).unwrap();
        let st = p.wait(Duration::from_secs(10)).unwrap();
        assert_eq!(st.result, Ok(()), "{t:?}: {:?}", st.message);
        // Block 8 of layer 1 now holds layer 1's fill byte.
        let place = dst.layout().vector_place(1, 8, 1, 3, 1);
        let mut v = [0u8; 16];
        dst.regions()[place.region as usize]
            .read_at(place.offset, &mut v)
            .unwrap();
        assert_eq!(v, [0x11; 16], "{t:?}");

        src.deregister(Duration::from_secs(5)).unwrap();
        assert!(src.is_deregistered());
        src.deregister(Duration::from_secs(5)).unwrap(); // idempotent
        let err = src.push(&remote, &[0], &[0], b"y", None).unwrap_err();
        assert_eq!(err.to_string(), "KV cache was already deregistered");
        // Pushes into a deregistered cache fail on the serving side.
        dst.deregister(Duration::from_secs(5)).unwrap();
        let src2 = KvCache::alloc(&a, layout(6), MemoryKind::Host).unwrap();
        let p = src2.push(&remote, &[0], &[0], b"z", None).unwrap();
        let st = p.wait(Duration::from_secs(10)).unwrap();
        assert!(
            st.result.is_err(),
            "{t:?}: push into a deregistered cache succeeded"
        );
        assert_eq!(st.failed.len(), 1);
    }
}
