//! Prefix-store save, lookup and load on KV caches in GPU memory (the
//! gather/scatter kernels and the device staging mirror), and a P/D push
//! between two GPU caches. Needs a GPU: `scripts/gpu-check.sh` runs these
//! on one; without a driver they are ignored.

use std::time::Duration;

use kvmesh_gpu::{Engine, EngineConfig, MemoryKind, TransportKind};
use kvmesh_plugin::{HeadOrder, KvLayout, PrefixStore, PrefixStoreConfig, RemoteKvCache};

mod common;
use common::*;

const GPU: MemoryKind = MemoryKind::Gpu { device: 0 };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
async fn gpu_cache_per_layer_save_then_load_moves_exactly_the_named_blocks() {
    let (_holders, worker) = swarm(1, 32 << 20).await;
    for (name, layout) in [
        ("flash NHD", flash(24)),
        (
            "flash HND",
            KvLayout::vllm_flash_attn(shape(), 24, HeadOrder::Hnd).unwrap(),
        ),
        (
            "blocks first",
            KvLayout::vllm_blocks_first(shape(), 24, HeadOrder::Nhd).unwrap(),
        ),
        ("trtllm pool", KvLayout::trtllm_pool(shape(), 24).unwrap()),
    ] {
        let c = cache_in(worker.engine(), layout, 11, GPU);
        assert!(c.regions().iter().all(|r| r.kind() == GPU), "{name}");
        // Staging for 3 blocks: 6 blocks take two chunks.
        let cfg = PrefixStoreConfig {
            staging_bytes: 3 * shape().block_bytes(),
            ..PrefixStoreConfig::default()
        };
        let p = PrefixStore::new(worker.clone(), c.clone(), cfg).unwrap();
        assert!(!p.is_direct(), "{name}: GPU caches go through staging");
        let k = keys(c.layout(), 21, 6);
        let src = [3u32, 0, 9, 4, 5, 11];
        let op = p.save(&src, &k, true).unwrap();
        for l in 0..shape().num_layers {
            op.layer_saved(l).unwrap();
        }
        let st = op.wait_async().await;
        assert_eq!(st.result, Ok(()), "{name}: {:?}", st.message);
        assert_eq!(st.blocks_done, 6, "{name}");

        let l = p.lookup(&k, Duration::from_secs(10)).await.unwrap();
        assert_eq!(l.blocks(), 6, "{name}");
        let dst = [20u32, 13, 14, 23, 12, 1];
        let before = snapshot(&c);
        let op = p.load(&l, 0, &dst).unwrap();
        for layer in 0..shape().num_layers {
            op.layer_ready_async(layer).await.unwrap();
            assert!(
                same_layer(&c, &src, &c, &dst, layer),
                "{name}: layer {layer}"
            );
        }
        let st = op.wait_async().await;
        assert_eq!(st.result, Ok(()), "{name}: {:?}", st.message);
        assert_eq!(
            snapshot(&c),
            after_copy(&c, &before, &src, &dst),
            "{name}: bytes outside the loaded blocks changed"
        );
        drop(l);
        assert!(p.fence(T), "{name}");
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn gpu_to_gpu_push_lands_in_the_named_blocks_only() {
    for t in [
        TransportKind::CudaIpc,
        TransportKind::Shm,
        TransportKind::Tcp,
    ] {
        let engine = || {
            Engine::new(EngineConfig {
                transport: t,
                ..EngineConfig::default()
            })
            .unwrap()
        };
        let (ea, eb) = (engine(), engine());
        let a = cache_in(&ea, flash(16), 5, GPU);
        let b = cache_in(
            &eb,
            KvLayout::vllm_blocks_first(shape(), 16, HeadOrder::Hnd).unwrap(),
            6,
            GPU,
        );
        let remote = RemoteKvCache::import(&ea, &b.desc()).unwrap();
        let before = snapshot(&b);
        let src = [2u32, 7, 8, 15];
        let dst = [0u32, 9, 3, 4];
        let push = a.push(&remote, &src, &dst, b"gpu", None).unwrap();
        let st = push.wait(T).expect("push deadline");
        assert_eq!(st.result, Ok(()), "{t:?}: {:?}", st.message);
        assert!(same_blocks(&a, &src, &b, &dst), "{t:?}");
        // Every other byte of the destination is as it was.
        let after = snapshot(&b);
        let sh = *b.layout().shape();
        let vb = sh.vector_bytes() as usize;
        let mut expect = before.clone();
        for &d in &dst {
            for layer in 0..sh.num_layers {
                for kv in 0..sh.kind.planes() {
                    for tok in 0..sh.block_size {
                        for h in 0..sh.num_kv_heads {
                            let p = b.layout().vector_place(layer, d, kv, tok, h);
                            let o = p.offset as usize;
                            expect[p.region as usize][o..o + vb]
                                .copy_from_slice(&after[p.region as usize][o..o + vb]);
                        }
                    }
                }
            }
        }
        assert_eq!(after, expect, "{t:?}");
    }
}
