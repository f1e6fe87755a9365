//! Shared by the prefix-store tests: a loopback swarm, KV caches with
//! seeded random bytes, and byte comparisons through the layout's own
//! places (not through the planners under test).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use kvmesh_gpu::{Engine, MemoryKind};
use kvmesh_p2p_store::{Store, StoreConfig};
use kvmesh_plugin::{
    BlockKey, BlockShape, DType, ExtraKeys, HeadOrder, KeyNamespace, KvCache, KvLayout,
};
use rand::{Rng, SeedableRng};

pub const T: Duration = Duration::from_secs(20);

pub fn shape() -> BlockShape {
    // 4 layers, 4 tokens, 2 heads of 16 bf16: 512 B per block and layer.
    BlockShape::kv(4, 4, 2, 16, DType::Bf16)
}

pub fn flash(blocks: u32) -> KvLayout {
    KvLayout::vllm_flash_attn(shape(), blocks, HeadOrder::Nhd).unwrap()
}

pub fn ns(layout: &KvLayout) -> KeyNamespace {
    KeyNamespace {
        model_id: "test-model".into(),
        dtype: DType::Bf16,
        layout_fingerprint: layout.fingerprint(),
        tp_rank: 0,
        weight_version: "1".into(),
    }
}

/// Keys of `n` full blocks of a token sequence picked by `seed`.
pub fn keys(layout: &KvLayout, seed: u32, n: usize) -> Vec<BlockKey> {
    let bs = layout.shape().block_size;
    let tokens: Vec<u32> = (0..n as u32 * bs)
        .map(|i| i.wrapping_mul(2654435761) ^ seed)
        .collect();
    ns(layout).token_keys(&tokens, bs, &ExtraKeys::new())
}

pub fn store_config(mem: u64, bootstrap: Vec<kvmesh_p2p_store::network::Multiaddr>) -> StoreConfig {
    StoreConfig {
        mem_bytes: mem,
        bootstrap,
        announce_interval: Duration::from_millis(100),
        op_timeout: Duration::from_secs(5),
        ..StoreConfig::default()
    }
}

/// `holders` store peers donating `mem` bytes each, and a worker peer that
/// holds nothing.
pub async fn swarm(holders: usize, mem: u64) -> (Vec<Store>, Store) {
    let first = Store::start(store_config(mem, Vec::new())).await.unwrap();
    let boot = first.listen_addrs().await;
    let mut hs = vec![first];
    for _ in 1..holders {
        hs.push(Store::start(store_config(mem, boot.clone())).await.unwrap());
    }
    let worker = Store::start(store_config(0, boot)).await.unwrap();
    worker.wait_for_members(holders, T).await.unwrap();
    (hs, worker)
}

/// A host KV cache registered with the worker's engine, filled with
/// seeded random bytes.
pub fn cache(worker: &Store, layout: KvLayout, seed: u64) -> Arc<KvCache> {
    cache_in(worker.engine(), layout, seed, MemoryKind::Host)
}

/// A KV cache of `engine` in memory of `kind`, filled like [`cache`].
pub fn cache_in(engine: &Engine, layout: KvLayout, seed: u64, kind: MemoryKind) -> Arc<KvCache> {
    let c = KvCache::alloc(engine, layout, kind).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for r in c.regions() {
        let mut v = vec![0u8; r.len() as usize];
        rng.fill(&mut v[..]);
        r.write_at(0, &v).unwrap();
    }
    Arc::new(c)
}

/// Bytes of one head vector (read through the layout's own places, not
/// through the planners under test).
pub fn vector(c: &KvCache, layer: u32, block: u32, kv: u32, t: u32, h: u32) -> Vec<u8> {
    let p = c.layout().vector_place(layer, block, kv, t, h);
    let mut v = vec![0u8; c.layout().shape().vector_bytes() as usize];
    c.regions()[p.region as usize]
        .read_at(p.offset, &mut v)
        .unwrap();
    v
}

/// Layer `layer` of `dst[i]` in `d` equals layer `layer` of `src[i]` in `s`.
pub fn same_layer(s: &KvCache, src: &[u32], d: &KvCache, dst: &[u32], layer: u32) -> bool {
    let sh = *s.layout().shape();
    src.iter().zip(dst).all(|(&a, &b)| {
        (0..sh.kind.planes()).all(|kv| {
            (0..sh.block_size).all(|t| {
                (0..sh.num_kv_heads)
                    .all(|h| vector(s, layer, a, kv, t, h) == vector(d, layer, b, kv, t, h))
            })
        })
    })
}

pub fn same_blocks(s: &KvCache, src: &[u32], d: &KvCache, dst: &[u32]) -> bool {
    (0..s.layout().num_layers()).all(|l| same_layer(s, src, d, dst, l))
}

pub fn snapshot(c: &KvCache) -> Vec<Vec<u8>> {
    c.regions()
        .iter()
        .map(|r| {
            let mut v = vec![0u8; r.len() as usize];
            r.read_at(0, &mut v).unwrap();
            v
        })
        .collect()
}

/// `before` with blocks `src[i]` copied over `dst[i]`, head vector by head vector.
pub fn after_copy(c: &KvCache, before: &[Vec<u8>], src: &[u32], dst: &[u32]) -> Vec<Vec<u8>> {
    let sh = *c.layout().shape();
    let vb = sh.vector_bytes() as usize;
    let mut out = before.to_vec();
    for (&s, &d) in src.iter().zip(dst) {
        for layer in 0..sh.num_layers {
            for kv in 0..sh.kind.planes() {
                for t in 0..sh.block_size {
                    for h in 0..sh.num_kv_heads {
                        let a = c.layout().vector_place(layer, s, kv, t, h);
                        let b = c.layout().vector_place(layer, d, kv, t, h);
                        let (ao, bo) = (a.offset as usize, b.offset as usize);
                        out[b.region as usize][bo..bo + vb]
                            .copy_from_slice(&before[a.region as usize][ao..ao + vb]);
                    }
                }
            }
        }
    }
    out
}
