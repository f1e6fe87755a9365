//! Lookup, save and load against a real in-process swarm (store peers on
//! loopback): round trips for staged and direct layouts, per-layer saves
//! and loads, leases that keep blocks stored under memory pressure, leases
//! that expire and release them, cancellation, deadlines and misuse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_gpu::MemoryKind;
use kvmesh_p2p_store::ObjectKey;
use kvmesh_plugin::{BlockErrorKind, BlockKey, KvCache, KvLayout, PrefixStore, PrefixStoreConfig};

mod common;
use common::*;

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
