//! ABI 1.1 through the function table, in process: two store contexts form
//! a swarm (one holds objects), a worker saves, looks up and loads blocks
//! of a host KV cache, and misuse answers error statuses.

use super::tests::{api, context, expect, last_error, layout, register, spec_flash, HostCache};
use super::*;
use std::ffi::CString;
use std::ptr::{null, null_mut};

fn store_context(api: &KvmeshApi, mem: u64, bootstrap: Option<&CString>) -> KvmeshContext {
    let cfg = KvmeshStoreConfig {
        struct_size: std::mem::size_of::<KvmeshStoreConfig>() as u32,
        replicas: 0,
        engine: null(),
        listen: null(),
        bootstrap: bootstrap.map_or(null(), |b| b.as_ptr()),
        psk: null(),
        mem_bytes: mem,
        staging_bytes: 0,
        default_lease_ms: 0,
        op_timeout_ms: 5000,
        mdns: 0,
        threads: 0,
    };
    let mut c = 0;
    // SAFETY: valid config and output pointer.
    let s = unsafe { (api.store_context_create)(&cfg, &mut c) };
    expect(api, s, KvmeshStatus::Ok, "");
    c
}

fn addrs(api: &KvmeshApi, ctx: KvmeshContext) -> CString {
    let mut n = 0usize;
    // SAFETY: NULL buffer of capacity 0: asks for the length.
    let s = unsafe { (api.store_addrs)(ctx, null_mut(), 0, &mut n) };
    expect(api, s, KvmeshStatus::BufferTooSmall, "");
    let mut buf = vec![0u8; n + 1];
    // SAFETY: `buf` holds `n + 1` bytes.
    let s = unsafe { (api.store_addrs)(ctx, buf.as_mut_ptr().cast(), buf.len(), &mut n) };
    expect(api, s, KvmeshStatus::Ok, "");
    CString::from_vec_with_nul(buf).unwrap()
}

fn keys_of_tokens(api: &KvmeshApi, lay: KvmeshLayout, tokens: &[u32]) -> Vec<KvmeshBlockKey> {
    let model = c"test-model";
    let ns = KvmeshNamespace {
        struct_size: std::mem::size_of::<KvmeshNamespace>() as u32,
        tp_rank: 0,
        model_id: model.as_ptr(),
        weight_version: null(),
    };
    let mut out = vec![KvmeshBlockKey { bytes: [0; 32] }; tokens.len()];
    let mut n = 0;
    // SAFETY: valid pointers and capacities.
    let s = unsafe {
        (api.block_keys_from_tokens)(
            lay,
            &ns,
            tokens.as_ptr(),
            tokens.len(),
            out.as_mut_ptr(),
            out.len(),
            &mut n,
        )
    };
    expect(api, s, KvmeshStatus::Ok, "");
    out.truncate(n);
    out
}

/// The 16-byte head vector `(layer, block, kv, token, head)` of a cache
/// registered with `spec_flash(blocks)`.
fn vector(c: &HostCache, blocks: u32, layer: usize, block: u32, kv: u32, t: u32, h: u32) -> &[u8] {
    let s = spec_flash(blocks);
    let o = (block as u64 * s.block_stride
        + kv as u64 * s.kv_stride
        + t as u64 * s.token_stride
        + h as u64 * s.head_stride) as usize;
    &c.mem[layer][o..o + 16]
}

fn same_blocks(c: &HostCache, blocks: u32, src: &[u32], dst: &[u32]) -> bool {
    src.iter().zip(dst).all(|(&a, &b)| {
        (0..3).all(|l| {
            (0..2).all(|kv| {
                (0..4).all(|t| {
                    (0..2).all(|h| {
                        vector(c, blocks, l, a, kv, t, h) == vector(c, blocks, l, b, kv, t, h)
                    })
                })
            })
        })
    })
}

#[test]
fn store_contexts_save_lookup_and_load_blocks() {
    let api = api();
    let holder = store_context(&api, 16 << 20, None);
    let boot = addrs(&api, holder);
    assert!(boot.to_str().unwrap().contains("/p2p/"), "{boot:?}");
    let worker = store_context(&api, 0, Some(&boot));
    // SAFETY: every call below passes valid pointers, or NULL on purpose.
    unsafe {
        expect(
            &api,
            (api.store_wait_members)(worker, 1, 10_000),
            KvmeshStatus::Ok,
            "",
        );
        let lay = layout(&api, &spec_flash(16));
        let cache = register(&api, worker, lay, 7);
        let tokens: Vec<u32> = (0..4 * 6 + 3).map(|i| i * 7 + 1).collect();
        let keys = keys_of_tokens(&api, lay, &tokens);
        assert_eq!(keys.len(), 6);

        // Per-layer save of 4 blocks.
        let src = [2u32, 5, 0, 9];
        let mut op = 0;
        expect(
            &api,
            (api.save)(
                cache.handle,
                src.as_ptr(),
                keys.as_ptr(),
                4,
                KVMESH_SAVE_PER_LAYER,
                0,
                &mut op,
            ),
            KvmeshStatus::Ok,
            "",
        );
        let mut st = KvmeshOpStatus {
            struct_size: std::mem::size_of::<KvmeshOpStatus>() as u32,
            state: 0,
            status: KvmeshStatus::Ok,
            reserved: 0,
            bytes: 0,
            failed_blocks: 0,
        };
        for l in 0..3 {
            expect(&api, (api.save_layer)(op, l), KvmeshStatus::Ok, "");
        }
        expect(
            &api,
            (api.op_wait)(op, 10_000, &mut st),
            KvmeshStatus::Ok,
            "",
        );
        assert_eq!((st.bytes, st.failed_blocks), (4 * 768, 0));
        expect(
            &api,
            (api.save_layer)(op, 3),
            KvmeshStatus::InvalidArgument,
            "outside",
        );

        // Lookup: the first 4 of the 6 keys are stored.
        let mut lk = 0;
        let mut found = 0;
        expect(
            &api,
            (api.lookup)(
                cache.handle,
                keys.as_ptr(),
                6,
                0,
                10_000,
                &mut lk,
                &mut found,
            ),
            KvmeshStatus::Ok,
            "",
        );
        assert_eq!(found, 4);

        // Load entries 1..4 into other blocks, layer by layer.
        let dst = [11u32, 12, 15];
        let mut ld = 0;
        expect(
            &api,
            (api.load)(lk, 1, dst.as_ptr(), 3, &mut ld),
            KvmeshStatus::Ok,
            "",
        );
        for l in 0..3 {
            expect(&api, (api.layer_ready)(ld, l, 10_000), KvmeshStatus::Ok, "");
        }
        expect(
            &api,
            (api.op_wait)(ld, 10_000, &mut st),
            KvmeshStatus::Ok,
            "",
        );
        assert_eq!((st.bytes, st.failed_blocks), (3 * 768, 0));
        assert!(same_blocks(&cache, 16, &src[1..], &dst));

        // Both operations come out of poll; fence returns at once.
        let mut done = [0u64; 8];
        let mut n = 0;
        expect(
            &api,
            (api.poll)(worker, done.as_mut_ptr(), 8, &mut n),
            KvmeshStatus::Ok,
            "",
        );
        assert_eq!(n, 2);
        expect(&api, (api.fence)(worker, 1000), KvmeshStatus::Ok, "");

        // Small objects.
        let key = KvmeshBlockKey { bytes: [9; 32] };
        let data = b"decode plan";
        expect(
            &api,
            (api.store_put)(worker, &key, data.as_ptr(), data.len(), 10_000),
            KvmeshStatus::Ok,
            "",
        );
        let mut buf = [0u8; 4];
        let mut len = 0;
        expect(
            &api,
            (api.store_get)(worker, &key, buf.as_mut_ptr(), 4, &mut len, 10_000),
            KvmeshStatus::BufferTooSmall,
            "room for 4",
        );
        let mut buf = vec![0u8; len];
        expect(
            &api,
            (api.store_get)(worker, &key, buf.as_mut_ptr(), len, &mut len, 10_000),
            KvmeshStatus::Ok,
            "",
        );
        assert_eq!(&buf, data);
        let missing = KvmeshBlockKey { bytes: [8; 32] };
        expect(
            &api,
            (api.store_get)(worker, &missing, buf.as_mut_ptr(), len, &mut len, 10_000),
            KvmeshStatus::NotFound,
            "no live store peer holds",
        );

        let mut stats: KvmeshStoreStats = std::mem::zeroed();
        stats.struct_size = std::mem::size_of::<KvmeshStoreStats>() as u32;
        expect(
            &api,
            (api.store_stats)(worker, &mut stats),
            KvmeshStatus::Ok,
            "",
        );
        assert_eq!((stats.peers_alive, stats.capacity), (1, 0));
        assert_eq!(
            (stats.lookups, stats.lookup_blocks, stats.hit_blocks),
            (1, 6, 4)
        );
        assert_eq!((stats.blocks_saved, stats.bytes_saved), (4, 4 * 768));
        assert_eq!((stats.blocks_loaded, stats.bytes_loaded), (3, 3 * 768));
        assert_eq!((stats.blocks_failed, stats.lookups_open), (0, 1));
        let mut hs: KvmeshStoreStats = std::mem::zeroed();
        hs.struct_size = stats.struct_size;
        expect(
            &api,
            (api.store_stats)(holder, &mut hs),
            KvmeshStatus::Ok,
            "",
        );
        assert_eq!(hs.objects, 5);
        assert_eq!(hs.capacity, 16 << 20);

        // ---- misuse ----
        expect(
            &api,
            (api.save)(
                cache.handle,
                src.as_ptr(),
                keys.as_ptr(),
                4,
                0,
                0xdead,
                &mut op,
            ),
            KvmeshStatus::Unsupported,
            "CUDA",
        );
        expect(
            &api,
            (api.save)(cache.handle, src.as_ptr(), keys.as_ptr(), 4, 8, 0, &mut op),
            KvmeshStatus::InvalidArgument,
            "flags",
        );
        expect(
            &api,
            (api.save)(cache.handle, src.as_ptr(), null(), 4, 0, 0, &mut op),
            KvmeshStatus::NullPointer,
            "keys",
        );
        let bad = [16u32];
        expect(
            &api,
            (api.save)(cache.handle, bad.as_ptr(), keys.as_ptr(), 1, 0, 0, &mut op),
            KvmeshStatus::OutOfRange,
            "source block 16",
        );
        expect(
            &api,
            (api.load)(lk, 2, dst.as_ptr(), 3, &mut ld),
            KvmeshStatus::InvalidArgument,
            "blocks 2..5 of a lookup that found 4",
        );
        expect(
            &api,
            (api.layer_ready)(op, 0, 0),
            KvmeshStatus::InvalidArgument,
            "layer_ready on a save",
        );
        expect(&api, (api.lookup_release)(lk), KvmeshStatus::Ok, "");
        expect(
            &api,
            (api.load)(lk, 0, dst.as_ptr(), 1, &mut ld),
            KvmeshStatus::InvalidHandle,
            "lookup",
        );
        let ns = KvmeshNamespace {
            struct_size: std::mem::size_of::<KvmeshNamespace>() as u32,
            tp_rank: 0,
            model_id: null(),
            weight_version: null(),
        };
        let mut k = [KvmeshBlockKey { bytes: [0; 32] }; 1];
        expect(
            &api,
            (api.block_keys_from_tokens)(lay, &ns, tokens.as_ptr(), 8, k.as_mut_ptr(), 1, &mut n),
            KvmeshStatus::NullPointer,
            "model_id",
        );
        // A plain context has no store.
        let plain = context(&api);
        let pc = register(&api, plain, lay, 1);
        expect(
            &api,
            (api.lookup)(pc.handle, keys.as_ptr(), 1, 0, 1000, &mut lk, &mut found),
            KvmeshStatus::InvalidArgument,
            "no peer store",
        );
        expect(
            &api,
            (api.store_wait_members)(plain, 1, 0),
            KvmeshStatus::InvalidArgument,
            "no peer store",
        );
        assert!(!last_error(&api).is_empty());
        expect(
            &api,
            (api.context_destroy)(plain, 5000),
            KvmeshStatus::Ok,
            "",
        );

        expect(
            &api,
            (api.context_destroy)(worker, 5000),
            KvmeshStatus::Ok,
            "",
        );
        expect(
            &api,
            (api.context_destroy)(holder, 5000),
            KvmeshStatus::Ok,
            "",
        );
        expect(&api, (api.layout_destroy)(lay), KvmeshStatus::Ok, "");
        drop((cache, pc));
    }
}
