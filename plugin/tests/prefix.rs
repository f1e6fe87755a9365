//! Lookup, save and load against a real in-process swarm (store peers on
//! loopback): round trips for staged and direct layouts, per-layer saves
//! and loads, leases that keep blocks stored under memory pressure, leases
//! that expire and release them, cancellation, deadlines and misuse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_gpu::MemoryKind;
use kvmesh_p2p_store::{ObjectKey, Store, StoreConfig};
use kvmesh_plugin::{
    BlockErrorKind, BlockKey, BlockShape, DType, ExtraKeys, HeadOrder, KeyNamespace, KvCache,
    KvLayout, PrefixStore, PrefixStoreConfig,
};
use rand::{Rng, SeedableRng};

const T: Duration = Duration::from_secs(20);

fn shape() -> BlockShape {
    // 4 layers, 4 tokens, 2 heads of 16 bf16: 512 B per block and layer.
    BlockShape::kv(4, 4, 2, 16, DType::Bf16)
}

fn flash(blocks: u32) -> KvLayout {
    KvLayout::vllm_flash_attn(shape(), blocks, HeadOrder::Nhd).unwrap()
}

fn ns(layout: &KvLayout) -> KeyNamespace {
    KeyNamespace {
        model_id: "test-model".into(),
        dtype: DType::Bf16,
        layout_fingerprint: layout.fingerprint(),
        tp_rank: 0,
        weight_version: "1".into(),
    }
}

/// Keys of `n` full blocks of a token sequence picked by `seed`.
fn keys(layout: &KvLayout, seed: u32, n: usize) -> Vec<BlockKey> {
    let bs = layout.shape().block_size;
    let tokens: Vec<u32> = (0..n as u32 * bs)
        .map(|i| i.wrapping_mul(2654435761) ^ seed)
        .collect();
    ns(layout).token_keys(&tokens, bs, &ExtraKeys::new())
}

fn store_config(mem: u64, bootstrap: Vec<kvmesh_p2p_store::network::Multiaddr>) -> StoreConfig {
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
async fn swarm(holders: usize, mem: u64) -> (Vec<Store>, Store) {
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
fn cache(worker: &Store, layout: KvLayout, seed: u64) -> Arc<KvCache> {
    let c = KvCache::alloc(worker.engine(), layout, MemoryKind::Host).unwrap();
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
fn vector(c: &KvCache, layer: u32, block: u32, kv: u32, t: u32, h: u32) -> Vec<u8> {
    let p = c.layout().vector_place(layer, block, kv, t, h);
    let mut v = vec![0u8; c.layout().shape().vector_bytes() as usize];
    c.regions()[p.region as usize]
        .read_at(p.offset, &mut v)
        .unwrap();
    v
}

/// Layer `layer` of `dst[i]` in `d` equals layer `layer` of `src[i]` in `s`.
fn same_layer(s: &KvCache, src: &[u32], d: &KvCache, dst: &[u32], layer: u32) -> bool {
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

fn same_blocks(s: &KvCache, src: &[u32], d: &KvCache, dst: &[u32]) -> bool {
    (0..s.layout().num_layers()).all(|l| same_layer(s, src, d, dst, l))
}

fn snapshot(c: &KvCache) -> Vec<Vec<u8>> {
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
fn after_copy(c: &KvCache, before: &[Vec<u8>], src: &[u32], dst: &[u32]) -> Vec<Vec<u8>> {
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

fn okeys(k: &[BlockKey]) -> Vec<ObjectKey> {
    k.iter().map(|k| ObjectKey::from_bytes(k.0)).collect()
}

async fn save_all(p: &PrefixStore, blocks: &[u32], keys: &[BlockKey]) {
    let st = p.save(blocks, keys, false).unwrap().wait_async().await;
    assert_eq!(st.result, Ok(()), "{:?}", st.message);
}

/// Saves `n` blocks of fresh sequences (seeds from `seed`), `per` blocks
/// per save, ignoring failures: memory pressure on the holders.
async fn pressure(p: &PrefixStore, layout: &KvLayout, seed: u32, n: usize, per: usize) {
    let blocks: Vec<u32> = (0..per as u32).collect();
    for s in 0..n / per {
        let k = keys(layout, seed + s as u32, per);
        p.save(&blocks, &k, false).unwrap().wait_async().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_layer_save_then_lookup_and_layer_by_layer_load() {
    let (_holders, worker) = swarm(2, 16 << 20).await;
    let c = cache(&worker, flash(24), 1);
    // Staging for 3 blocks: saves and loads of 6 blocks take 2 chunks.
    let cfg = PrefixStoreConfig {
        staging_bytes: 3 * shape().block_bytes(),
        ..PrefixStoreConfig::default()
    };
    let p = PrefixStore::new(worker.clone(), c.clone(), cfg).unwrap();
    assert!(!p.is_direct());
    assert_eq!(p.staging_blocks(), 3);
    let k = keys(c.layout(), 7, 8);
    let src = [3u32, 0, 9, 4, 5, 11];

    // Per-layer save: nothing completes before the last layer is signalled.
    let op = p.save(&src, &k[..6], true).unwrap();
    for l in [0, 2, 1] {
        op.layer_saved(l).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        op.poll().is_none(),
        "a save completed before its last layer"
    );
    op.layer_saved(3).unwrap();
    let st = op.wait_async().await;
    assert_eq!(st.result, Ok(()), "{:?}", st.message);
    assert_eq!((st.blocks_done, st.blocks_skipped), (6, 0));
    assert_eq!(st.bytes, 6 * shape().block_bytes());

    // The stored prefix is 6 of the 8 keys.
    let l = p.lookup(&k, Duration::from_secs(10)).await.unwrap();
    assert_eq!(l.blocks(), 6);
    assert_eq!(l.keys(), &k[..6]);
    let none = p
        .lookup(&keys(c.layout(), 8, 4), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(none.blocks(), 0);

    // Load blocks 1..6 of the lookup into other blocks, layer by layer.
    let dst = [20u32, 13, 14, 23, 12];
    let before = snapshot(&c);
    let op = p.load(&l, 1, &dst).unwrap();
    for layer in 0..4 {
        op.layer_ready_async(layer).await.unwrap();
        assert!(same_layer(&c, &src[1..], &c, &dst, layer), "layer {layer}");
    }
    let st = op.wait_async().await;
    assert_eq!(st.result, Ok(()), "{:?}", st.message);
    assert_eq!(st.blocks_done, 5);
    // The destination blocks hold the source blocks; no other byte changed.
    assert_eq!(snapshot(&c), after_copy(&c, &before, &src[1..], &dst));

    // Saving the same blocks again sends nothing.
    let st = p.save(&src, &k[..6], false).unwrap().wait_async().await;
    assert_eq!(st.result, Ok(()));
    assert_eq!((st.blocks_done, st.blocks_skipped, st.bytes), (0, 6, 0));

    let s = p.stats();
    assert_eq!((s.lookups, s.lookup_blocks, s.hit_blocks), (2, 12, 6));
    assert_eq!((s.saves, s.blocks_saved, s.blocks_save_skipped), (2, 6, 6));
    assert_eq!((s.loads, s.blocks_loaded, s.blocks_failed), (1, 5, 0));
    assert_eq!(s.bytes_loaded, 5 * shape().block_bytes());
    assert_eq!(s.lookups_open, 2);
    drop((l, none));
    assert_eq!(p.stats().lookups_open, 0);
    assert!(p.fence(T));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contiguous_blocks_skip_staging() {
    let (_holders, worker) = swarm(1, 16 << 20).await;
    let layout = KvLayout::trtllm_pool(shape(), 10).unwrap();
    let c = cache(&worker, layout, 2);
    let p = PrefixStore::new(worker.clone(), c.clone(), PrefixStoreConfig::default()).unwrap();
    assert!(p.is_direct());
    let k = keys(c.layout(), 1, 4);
    save_all(&p, &[1, 2, 3, 4], &k).await;
    let l = p.lookup(&k, Duration::ZERO).await.unwrap();
    assert_eq!(l.blocks(), 4);
    let op = p.load(&l, 0, &[9, 8, 7, 6]).unwrap();
    // Released while the load runs: the load keeps its leases to the end;
    // new loads are refused.
    l.release();
    let e = p.load(&l, 0, &[5]).unwrap_err().to_string();
    assert!(e.contains("the lookup was released"), "{e}");
    assert!(op.layer_ready(3, T).unwrap());
    assert_eq!(op.wait(T).unwrap().result, Ok(()));
    p.fence_async().await;
    assert_eq!(p.stats().lookups_open, 0);
    assert!(same_blocks(&c, &[1, 2, 3, 4], &c, &[9, 8, 7, 6]));
}

/// A holder pool small enough that a few dozen blocks evict older ones.
const SMALL_POOL: u64 = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_never_reports_a_block_that_the_load_cannot_deliver() {
    let (holders, worker) = swarm(1, SMALL_POOL).await;
    let c = cache(&worker, flash(16), 3);
    let p = PrefixStore::new(worker.clone(), c.clone(), PrefixStoreConfig::default()).unwrap();
    let k = keys(c.layout(), 100, 8);
    let src: Vec<u32> = (0..8).collect();
    save_all(&p, &src, &k).await;
    let l = p.lookup(&k, Duration::from_secs(20)).await.unwrap();
    assert_eq!(l.blocks(), 8);

    // Far more new blocks than the pool holds: the leased ones must stay.
    pressure(&p, c.layout(), 1000, 96, 8).await;
    // (The pool took more than twice its size: it evicted.)
    assert!(p.stats().bytes_saved > 2 * SMALL_POOL);
    assert!(holders[0].stats().objects < 32);
    let dst: Vec<u32> = (8..16).collect();
    let st = p.load(&l, 0, &dst).unwrap().wait_async().await;
    assert_eq!(st.result, Ok(()), "{:?}", st.message);
    assert!(same_blocks(&c, &src, &c, &dst));

    // Without the lease the same pressure evicts them: the lease was what
    // kept them.
    l.release();
    pressure(&p, c.layout(), 2000, 96, 8).await;
    let left = worker.contains_prefix(&okeys(&k)).await.unwrap();
    assert!(left < 8, "unleased blocks survived the pressure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_releases_the_pin_and_the_load_fails_cleanly() {
    let (_holders, worker) = swarm(1, SMALL_POOL).await;
    let c = cache(&worker, flash(16), 4);
    let p = PrefixStore::new(worker.clone(), c.clone(), PrefixStoreConfig::default()).unwrap();
    let k = keys(c.layout(), 200, 8);
    let src: Vec<u32> = (0..8).collect();
    save_all(&p, &src, &k).await;
    let l = p.lookup(&k, Duration::from_millis(300)).await.unwrap();
    assert_eq!(l.blocks(), 8);
    assert!(l.expires() <= Instant::now() + Duration::from_millis(300));
    // Past the lease, and past the holder's next expiry tick.
    tokio::time::sleep(Duration::from_millis(900)).await;
    pressure(&p, c.layout(), 3000, 96, 8).await;
    let left = worker.contains_prefix(&okeys(&k)).await.unwrap();
    assert!(left < 8, "the expired lease still pins the blocks");

    let dst: Vec<u32> = (8..16).collect();
    let before = snapshot(&c);
    let st = p.load(&l, 0, &dst).unwrap().wait_async().await;
    assert_eq!(st.result, Err(BlockErrorKind::NotFound));
    assert_eq!(st.failed.len(), 8);
    assert!(st
        .failed
        .iter()
        .all(|f| f.error == BlockErrorKind::NotFound && f.message.contains("lease expired")));
    assert_eq!(st.blocks_done, 0);
    // No byte of the cache changed.
    assert_eq!(snapshot(&c), before);
    assert_eq!(p.stats().blocks_failed, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_deadlines_and_misuse() {
    let (_holders, worker) = swarm(1, 16 << 20).await;
    let c = cache(&worker, flash(8), 5);
    let cfg = PrefixStoreConfig {
        op_timeout: Duration::from_millis(400),
        ..PrefixStoreConfig::default()
    };
    let p = PrefixStore::new(worker.clone(), c.clone(), cfg).unwrap();
    let k = keys(c.layout(), 300, 3);

    // A per-layer save whose layers never come: cancel, or the deadline.
    let op = p.save(&[0, 1, 2], &k, true).unwrap();
    op.layer_saved(0).unwrap();
    op.cancel();
    let st = op.wait_async().await;
    assert_eq!(st.result, Err(BlockErrorKind::Cancelled));
    assert_eq!(st.failed.len(), 3);
    let t0 = Instant::now();
    let st = p.save(&[0, 1, 2], &k, true).unwrap().wait(T).unwrap();
    assert_eq!(st.result, Err(BlockErrorKind::Timeout));
    assert!(t0.elapsed() < Duration::from_secs(3));
    // Nothing of either was stored.
    assert_eq!(worker.contains_prefix(&okeys(&k)).await.unwrap(), 0);

    // Misuse is refused before anything starts.
    let err = |r: kvmesh_plugin::Result<kvmesh_plugin::StoreOp>| r.unwrap_err().to_string();
    assert!(err(p.save(&[0, 1], &k, false)).contains("2 blocks and 3 keys"));
    assert!(err(p.save(&[0, 1, 8], &k, false)).contains("source block 8"));
    save_all(&p, &[0, 1, 2], &k).await;
    let l = p.lookup(&k, Duration::ZERO).await.unwrap();
    assert_eq!(l.blocks(), 3);
    assert!(err(p.load(&l, 1, &[4, 5, 6])).contains("blocks 1..4 of a lookup that found 3"));
    assert!(err(p.load(&l, 0, &[4, 4])).contains("appears twice"));
    let op = p.load(&l, 0, &[5]).unwrap();
    assert!(op.layer_saved(0).is_err());
    assert!(op.layer_ready(4, T).is_err());
    assert_eq!(op.wait(T).unwrap().result, Ok(()));
    let save = p.save(&[0], &k[..1], false).unwrap();
    assert!(save.layer_ready(0, T).is_err());
    assert!(save.wait(T).is_some());
    // Another cache's lookup, a cache of another engine.
    let other = PrefixStore::new(worker.clone(), c.clone(), PrefixStoreConfig::default()).unwrap();
    assert!(err(other.load(&l, 0, &[5])).contains("another prefix store"));
    let foreign = Arc::new(
        KvCache::alloc(
            &kvmesh_gpu::Engine::new(Default::default()).unwrap(),
            flash(8),
            MemoryKind::Host,
        )
        .unwrap(),
    );
    let e = PrefixStore::new(worker.clone(), foreign, PrefixStoreConfig::default()).unwrap_err();
    assert!(e.to_string().contains("another engine"));
    // A blocking call from inside the runtime is refused, not deadlocked.
    assert!(p
        .lookup_blocking(&k, Duration::ZERO, T)
        .unwrap_err()
        .to_string()
        .contains("inside an async runtime"));
    // Closed: no new operations.
    assert!(p.close(T));
    assert!(err(p.save(&[0], &k[..1], false)).contains("prefix store"));
}
