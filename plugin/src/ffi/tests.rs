//! The C ABI driven through its function table, in process: a loopback
//! push between two contexts, and misuse that must answer an error status.

use super::*;
use std::ptr::{null, null_mut};

pub(super) fn api() -> KvmeshApi {
    let mut t = std::mem::MaybeUninit::<KvmeshApi>::uninit();
    // SAFETY: `t` has room for a whole table.
    let s = unsafe {
        kvmesh_get_api(
            KVMESH_ABI_MAJOR,
            std::mem::size_of::<KvmeshApi>() as u32,
            t.as_mut_ptr(),
        )
    };
    assert_eq!(s, KvmeshStatus::Ok);
    // SAFETY: filled by a successful call.
    unsafe { t.assume_init() }
}

pub(super) fn last_error(api: &KvmeshApi) -> String {
    let mut buf = vec![0u8; 1024];
    let mut n = 0usize;
    // SAFETY: valid buffer and length pointer.
    unsafe { (api.last_error)(buf.as_mut_ptr().cast(), buf.len(), &mut n) };
    String::from_utf8_lossy(&buf[..n.min(1023)]).into_owned()
}

/// Asserts a status and that the last error mentions `needle`.
#[track_caller]
pub(super) fn expect(api: &KvmeshApi, got: KvmeshStatus, want: KvmeshStatus, needle: &str) {
    assert_eq!(got, want, "last error: {}", last_error(api));
    if !needle.is_empty() {
        let e = last_error(api);
        assert!(e.contains(needle), "{e:?} does not mention {needle:?}");
    }
}

pub(super) fn spec_flash(num_blocks: u32) -> KvmeshLayoutSpec {
    // FlashAttention NHD per layer: (2, N, 4 tokens, 2 heads, 8) f16.
    let (v, t, h) = (16u64, 4u64, 2u64);
    KvmeshLayoutSpec {
        struct_size: std::mem::size_of::<KvmeshLayoutSpec>() as u32,
        num_layers: 3,
        num_blocks,
        block_size: 4,
        num_kv_heads: 2,
        head_size: 8,
        dtype: KVMESH_DTYPE_F16,
        kind: KVMESH_KIND_KEY_VALUE,
        placement: KVMESH_PLACEMENT_PER_LAYER,
        reserved: 0,
        layer_stride: 0,
        block_stride: t * h * v,
        kv_stride: num_blocks as u64 * t * h * v,
        token_stride: h * v,
        head_stride: v,
    }
}

pub(super) struct HostCache {
    pub(super) mem: Vec<Vec<u8>>,
    pub(super) handle: KvmeshKvCache,
}

pub(super) fn register(
    api: &KvmeshApi,
    ctx: KvmeshContext,
    layout: KvmeshLayout,
    seed: u8,
) -> HostCache {
    let mut lens = [0u64; 8];
    let mut n = 0usize;
    // SAFETY: valid output pointers.
    let s = unsafe { (api.layout_region_lens)(layout, lens.as_mut_ptr(), lens.len(), &mut n) };
    expect(api, s, KvmeshStatus::Ok, "");
    let mut mem: Vec<Vec<u8>> = (0..n)
        .map(|r| {
            (0..lens[r])
                .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ r as u8)
                .collect()
        })
        .collect();
    let bases: Vec<*mut c_void> = mem.iter_mut().map(|m| m.as_mut_ptr().cast()).collect();
    let mut h = 0;
    // SAFETY: the vectors outlive the registration (deregistered below or
    // by context_destroy before they drop).
    let s = unsafe {
        (api.kv_cache_register)(
            ctx,
            layout,
            bases.as_ptr(),
            lens.as_ptr(),
            n,
            KVMESH_MEMORY_HOST,
            0,
            &mut h,
        )
    };
    expect(api, s, KvmeshStatus::Ok, "");
    HostCache { mem, handle: h }
}

pub(super) fn context(api: &KvmeshApi) -> KvmeshContext {
    let mut c = 0;
    // SAFETY: valid output pointer; NULL config means defaults.
    let s = unsafe { (api.context_create)(null(), &mut c) };
    expect(api, s, KvmeshStatus::Ok, "");
    c
}

pub(super) fn layout(api: &KvmeshApi, spec: &KvmeshLayoutSpec) -> KvmeshLayout {
    let mut l = 0;
    // SAFETY: valid pointers.
    let s = unsafe { (api.layout_create)(spec, &mut l) };
    expect(api, s, KvmeshStatus::Ok, "");
    l
}

#[test]
fn table_reports_version_and_capabilities() {
    let api = api();
    assert_eq!(api.abi_major as u32, KVMESH_ABI_MAJOR);
    assert_eq!(api.abi_minor as u32, KVMESH_ABI_MINOR);
    assert_eq!(api.struct_size as usize, std::mem::size_of::<KvmeshApi>());
    for cap in [
        KVMESH_CAP_PUSH,
        KVMESH_CAP_HOST_MEMORY,
        KVMESH_CAP_LOOKUP,
        KVMESH_CAP_SAVE,
        KVMESH_CAP_LOAD,
    ] {
        assert_ne!(api.capabilities & cap, 0);
    }
    assert_eq!(api.capabilities & KVMESH_CAP_GPU_MEMORY, 0);
    // A caller built against ABI 1.0 gets the 1.0 table.
    let old = TABLE_1_0_SIZE as u32;
    let mut table = std::mem::MaybeUninit::<KvmeshApi>::uninit();
    // SAFETY: `table` has room for a whole table (aligned); it is then
    // only read as bytes.
    let t = unsafe {
        table.as_mut_ptr().write_bytes(0xAA, 1);
        let s = kvmesh_get_api(1, old, table.as_mut_ptr());
        assert_eq!(s, KvmeshStatus::Ok);
        std::slice::from_raw_parts(
            table.as_ptr().cast::<u8>(),
            std::mem::size_of::<KvmeshApi>(),
        )
    };
    assert_eq!(u32::from_ne_bytes(t[..4].try_into().unwrap()), old);
    assert!(
        t[old as usize..].iter().all(|&b| b == 0xAA),
        "wrote past the 1.0 table"
    );
    let mut name: *const c_char = null();
    // SAFETY: valid output pointer.
    let s = unsafe { (api.status_name)(KvmeshStatus::PeerLost as i32, &mut name) };
    assert_eq!(s, KvmeshStatus::Ok);
    // SAFETY: a static NUL-terminated name.
    assert_eq!(unsafe { CStr::from_ptr(name) }, c"KVMESH_STATUS_PEER_LOST");
}

#[test]
fn loopback_push_lands_in_the_named_blocks_only() {
    let api = api();
    let (a, b) = (context(&api), context(&api));
    let la = layout(&api, &spec_flash(10));
    let lb = layout(&api, &spec_flash(12)); // other num_blocks, same shape
    let mut fa = [0u8; 32];
    let mut fb = [0u8; 32];
    // SAFETY: 32-byte outputs.
    unsafe {
        (api.layout_fingerprint)(la, fa.as_mut_ptr());
        (api.layout_fingerprint)(lb, fb.as_mut_ptr());
    }
    assert_eq!(fa, fb);
    let src = register(&api, a, la, 1);
    let dst = register(&api, b, lb, 2);
    let before = dst.mem.clone();

    // Export from b, import into a.
    let mut n = 0usize;
    // SAFETY: NULL buffer with cap 0 asks for the length.
    let s = unsafe { (api.kv_cache_export)(dst.handle, null_mut(), 0, &mut n) };
    expect(
        &api,
        s,
        KvmeshStatus::BufferTooSmall,
        "descriptor bytes, room for 0",
    );
    let mut desc = vec![0u8; n];
    // SAFETY: buffer of the announced length.
    let s = unsafe { (api.kv_cache_export)(dst.handle, desc.as_mut_ptr(), desc.len(), &mut n) };
    expect(&api, s, KvmeshStatus::Ok, "");
    let mut remote = 0;
    // SAFETY: valid pointers.
    let s = unsafe { (api.remote_cache_import)(a, desc.as_ptr(), desc.len(), &mut remote) };
    expect(&api, s, KvmeshStatus::Ok, "");

    let (sb, db) = ([1u32, 2, 7], [11u32, 0, 5]);
    let tid = b"req-7";
    let mut op = 0;
    // SAFETY: valid arrays of n_blocks entries.
    let s = unsafe {
        (api.push)(
            src.handle,
            remote,
            sb.as_ptr(),
            db.as_ptr(),
            3,
            tid.as_ptr(),
            tid.len(),
            10_000,
            &mut op,
        )
    };
    expect(&api, s, KvmeshStatus::Ok, "");
    // SAFETY: valid context.
    expect(
        &api,
        unsafe { (api.fence)(a, 10_000) },
        KvmeshStatus::Ok,
        "",
    );
    let mut st = KvmeshOpStatus {
        struct_size: std::mem::size_of::<KvmeshOpStatus>() as u32,
        state: 99,
        status: KvmeshStatus::Internal,
        reserved: 0,
        bytes: 0,
        failed_blocks: 9,
    };
    // SAFETY: valid pointers.
    let s = unsafe { (api.op_wait)(op, 10_000, &mut st) };
    expect(&api, s, KvmeshStatus::Ok, "");
    assert_eq!(
        (st.state, st.status, st.failed_blocks),
        (KVMESH_OP_DONE, KvmeshStatus::Ok, 0)
    );
    let block_layer = 2 * 4 * 2 * 16u64;
    assert_eq!(st.bytes, 3 * 3 * block_layer);
    let mut done = [0u64; 4];
    // SAFETY: valid pointers.
    let s = unsafe { (api.poll)(a, done.as_mut_ptr(), 4, &mut n) };
    expect(&api, s, KvmeshStatus::Ok, "");
    assert_eq!(&done[..n], &[op]);
    // SAFETY: reported once only.
    unsafe { (api.poll)(a, done.as_mut_ptr(), 4, &mut n) };
    assert_eq!(n, 0);

    // The receiver learns the transfer id (after the bytes landed).
    let mut rx = [KvmeshReceived {
        from_engine: [0; 16],
        blocks: 0,
        transfer_id_len: 0,
        transfer_id: [0; 256],
    }; 2];
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: valid pointers.
        let s = unsafe { (api.poll_received)(b, rx.as_mut_ptr(), 2, &mut n) };
        expect(&api, s, KvmeshStatus::Ok, "");
        if n > 0 || Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(n, 1);
    assert_eq!(&rx[0].transfer_id[..rx[0].transfer_id_len as usize], tid);
    assert_eq!(rx[0].blocks, 3);
    let mut id_a = [0u8; 16];
    // SAFETY: 16-byte output.
    unsafe { (api.context_engine_id)(a, id_a.as_mut_ptr()) };
    assert_eq!(rx[0].from_engine, id_a);

    // Bytes: the named destination blocks hold the source blocks, every
    // other byte is unchanged.
    let sl = get_layout(la).unwrap();
    let dl = get_layout(lb).unwrap();
    let mut want = before.clone();
    for (&s, &d) in sb.iter().zip(&db) {
        for l in 0..3 {
            for kv in 0..2 {
                for t in 0..4 {
                    for h in 0..2 {
                        let p = sl.vector_place(l, s, kv, t, h);
                        let q = dl.vector_place(l, d, kv, t, h);
                        let v = &src.mem[p.region as usize][p.offset as usize..][..16];
                        want[q.region as usize][q.offset as usize..][..16].copy_from_slice(v);
                    }
                }
            }
        }
    }
    assert!(
        dst.mem == want,
        "destination cache differs from the expected bytes"
    );
    assert!(dst.mem != before);

    let mut stats = KvmeshStats {
        struct_size: std::mem::size_of::<KvmeshStats>() as u32,
        reserved: 0,
        pushes_submitted: 0,
        pushes_succeeded: 0,
        pushes_failed: 0,
        bytes_pushed: 0,
        blocks_pushed: 0,
        pushes_received: 0,
        ops_in_flight: 9,
        kv_caches: 0,
    };
    // SAFETY: valid pointer.
    unsafe { (api.stats)(a, &mut stats) };
    assert_eq!(
        (
            stats.pushes_submitted,
            stats.pushes_succeeded,
            stats.blocks_pushed,
            stats.ops_in_flight,
            stats.kv_caches
        ),
        (1, 1, 3, 0, 1)
    );

    // Refused before any byte moves: a destination block outside the cache.
    let bad = [12u32];
    // SAFETY: valid arrays.
    let s = unsafe {
        (api.push)(
            src.handle,
            remote,
            sb.as_ptr(),
            bad.as_ptr(),
            1,
            tid.as_ptr(),
            5,
            0,
            &mut op,
        )
    };
    expect(
        &api,
        s,
        KvmeshStatus::OutOfRange,
        "destination block 12 (entry 0) is outside the cache's 12 blocks",
    );

    // SAFETY: valid handles.
    unsafe {
        expect(&api, (api.op_release)(done[0]), KvmeshStatus::Ok, "");
        expect(
            &api,
            (api.remote_cache_release)(remote),
            KvmeshStatus::Ok,
            "",
        );
        expect(
            &api,
            (api.kv_cache_deregister)(src.handle, 5000),
            KvmeshStatus::Ok,
            "",
        );
        expect(&api, (api.context_destroy)(a, 5000), KvmeshStatus::Ok, "");
        // b still has a registered cache: destroy deregisters it.
        expect(&api, (api.context_destroy)(b, 5000), KvmeshStatus::Ok, "");
        expect(
            &api,
            (api.kv_cache_deregister)(dst.handle, 0),
            KvmeshStatus::InvalidHandle,
            "already destroyed",
        );
        expect(&api, (api.layout_destroy)(la), KvmeshStatus::Ok, "");
        expect(&api, (api.layout_destroy)(lb), KvmeshStatus::Ok, "");
    }
}

#[test]
fn misuse_returns_error_statuses() {
    let api = api();
    let size = std::mem::size_of::<KvmeshApi>() as u32;
    let mut t = std::mem::MaybeUninit::<KvmeshApi>::uninit();
    // SAFETY: every call below passes either valid pointers or NULL.
    unsafe {
        expect(
            &api,
            kvmesh_get_api(2, size, t.as_mut_ptr()),
            KvmeshStatus::AbiMismatch,
            "ABI 2.x",
        );
        expect(
            &api,
            kvmesh_get_api(0, size, t.as_mut_ptr()),
            KvmeshStatus::AbiMismatch,
            "ABI 0.x",
        );
        expect(
            &api,
            kvmesh_get_api(1, TABLE_1_0_SIZE as u32 - 8, t.as_mut_ptr()),
            KvmeshStatus::AbiMismatch,
            "bytes requested",
        );
        expect(
            &api,
            kvmesh_get_api(1, size + 8, t.as_mut_ptr()),
            KvmeshStatus::AbiMismatch,
            "bytes requested",
        );
        expect(
            &api,
            kvmesh_get_api(1, size, null_mut()),
            KvmeshStatus::NullPointer,
            "out is NULL",
        );

        // Null pointers.
        expect(
            &api,
            (api.context_create)(null(), null_mut()),
            KvmeshStatus::NullPointer,
            "out is NULL",
        );
        let mut l = 0;
        expect(
            &api,
            (api.layout_create)(null(), &mut l),
            KvmeshStatus::NullPointer,
            "spec is NULL",
        );
        // Wrong struct sizes.
        let mut spec = spec_flash(4);
        spec.struct_size -= 8;
        expect(
            &api,
            (api.layout_create)(&spec, &mut l),
            KvmeshStatus::AbiMismatch,
            "spec->struct_size",
        );
        let cfg = KvmeshContextConfig {
            struct_size: 4,
            transport: 0,
            tcp_listen: null(),
            tcp_conns: 0,
            io_threads: 0,
            default_timeout_ms: 0,
        };
        let mut c = 0;
        expect(
            &api,
            (api.context_create)(&cfg, &mut c),
            KvmeshStatus::AbiMismatch,
            "config->struct_size",
        );
        let cfg = KvmeshContextConfig {
            struct_size: std::mem::size_of::<KvmeshContextConfig>() as u32,
            transport: 7,
            ..cfg
        };
        expect(
            &api,
            (api.context_create)(&cfg, &mut c),
            KvmeshStatus::InvalidArgument,
            "transport 7",
        );
        // Inconsistent layout: the message says what.
        let mut spec = spec_flash(4);
        spec.block_stride = 10;
        expect(
            &api,
            (api.layout_create)(&spec, &mut l),
            KvmeshStatus::Layout,
            "block stride 10 B",
        );
        spec = spec_flash(4);
        spec.dtype = 99;
        expect(
            &api,
            (api.layout_create)(&spec, &mut l),
            KvmeshStatus::InvalidArgument,
            "dtype 99",
        );

        // Unknown, wrong-type and stale handles; double free.
        expect(
            &api,
            (api.layout_destroy)(0),
            KvmeshStatus::InvalidHandle,
            "null layout handle",
        );
        expect(
            &api,
            (api.layout_destroy)(12345),
            KvmeshStatus::InvalidHandle,
            "not a kvmesh handle",
        );
        expect(
            &api,
            (api.layout_destroy)((2u64 << 56) | (1 << 32) | 999_999),
            KvmeshStatus::InvalidHandle,
            "unknown layout handle",
        );
        let ctx = context(&api);
        expect(
            &api,
            (api.layout_destroy)(ctx),
            KvmeshStatus::InvalidHandle,
            "is a context, expected a layout",
        );
        let lay = layout(&api, &spec_flash(4));
        expect(&api, (api.layout_destroy)(lay), KvmeshStatus::Ok, "");
        expect(
            &api,
            (api.layout_destroy)(lay),
            KvmeshStatus::InvalidHandle,
            "already destroyed",
        );
        let mut fp = [0u8; 32];
        expect(
            &api,
            (api.layout_fingerprint)(lay, fp.as_mut_ptr()),
            KvmeshStatus::InvalidHandle,
            "already destroyed",
        );
        // A new object in the recycled slot does not answer to the old handle.
        let lay2 = layout(&api, &spec_flash(4));
        assert_ne!(lay2, lay);
        expect(
            &api,
            (api.layout_destroy)(lay),
            KvmeshStatus::InvalidHandle,
            "already destroyed",
        );

        // Registration misuse.
        let mut h = 0;
        let mut mem = vec![0u8; 1 << 12];
        let bases = [mem.as_mut_ptr().cast::<c_void>(); 3];
        let lens = [mem.len() as u64; 3];
        expect(
            &api,
            (api.kv_cache_register)(ctx, lay2, null(), lens.as_ptr(), 3, 0, 0, &mut h),
            KvmeshStatus::NullPointer,
            "bases is NULL",
        );
        let nulls = [null_mut::<c_void>(); 3];
        expect(
            &api,
            (api.kv_cache_register)(ctx, lay2, nulls.as_ptr(), lens.as_ptr(), 3, 0, 0, &mut h),
            KvmeshStatus::NullPointer,
            "bases[0] is NULL",
        );
        expect(
            &api,
            (api.kv_cache_register)(ctx, lay2, bases.as_ptr(), lens.as_ptr(), 2, 0, 0, &mut h),
            KvmeshStatus::Layout,
            "3 base region(s), 2 were given",
        );
        let short = [64u64; 3];
        expect(
            &api,
            (api.kv_cache_register)(ctx, lay2, bases.as_ptr(), short.as_ptr(), 3, 0, 0, &mut h),
            KvmeshStatus::Layout,
            "region 0 holds 64 B",
        );
        expect(
            &api,
            (api.kv_cache_register)(ctx, lay2, bases.as_ptr(), lens.as_ptr(), 3, 9, 0, &mut h),
            KvmeshStatus::InvalidArgument,
            "memory_kind 9",
        );
        // GPU memory is accepted by the API and refused clearly by this build.
        expect(
            &api,
            (api.kv_cache_register)(
                ctx,
                lay2,
                bases.as_ptr(),
                lens.as_ptr(),
                3,
                KVMESH_MEMORY_GPU,
                0,
                &mut h,
            ),
            KvmeshStatus::Unsupported,
            "GPU",
        );

        // Descriptors: garbage, truncated.
        let mut r = 0;
        expect(
            &api,
            (api.remote_cache_import)(ctx, b"nope".as_ptr(), 4, &mut r),
            KvmeshStatus::InvalidArgument,
            "bad magic",
        );
        expect(
            &api,
            (api.remote_cache_import)(ctx, null(), 4, &mut r),
            KvmeshStatus::NullPointer,
            "desc is NULL",
        );

        // Ops and outputs.
        let mut st = std::mem::zeroed::<KvmeshOpStatus>();
        expect(
            &api,
            (api.op_wait)(0, 0, &mut st),
            KvmeshStatus::InvalidHandle,
            "null operation handle",
        );
        expect(
            &api,
            (api.poll)(ctx, null_mut(), 0, null_mut()),
            KvmeshStatus::NullPointer,
            "len_out is NULL",
        );
        let mut stats = std::mem::zeroed::<KvmeshStats>();
        expect(
            &api,
            (api.stats)(ctx, &mut stats),
            KvmeshStatus::AbiMismatch,
            "out->struct_size is 0",
        );
        expect(
            &api,
            (api.status_name)(12345, &mut null()),
            KvmeshStatus::InvalidArgument,
            "not a kvmesh status",
        );

        // last_error truncates and says so.
        let mut small = [0u8; 8];
        let mut n = 0;
        assert_eq!(
            (api.last_error)(small.as_mut_ptr().cast(), 8, &mut n),
            KvmeshStatus::BufferTooSmall
        );
        assert!(n > 8 && small[7] == 0);

        expect(&api, (api.context_destroy)(ctx, 1000), KvmeshStatus::Ok, "");
        expect(
            &api,
            (api.context_destroy)(ctx, 1000),
            KvmeshStatus::InvalidHandle,
            "already destroyed",
        );
        expect(&api, (api.layout_destroy)(lay2), KvmeshStatus::Ok, "");
        drop(mem);
    }
}

#[test]
fn last_error_is_per_thread_and_handles_are_thread_safe() {
    let api = api();
    // SAFETY: NULL spec is refused.
    let s = unsafe { (api.layout_create)(null(), &mut 0) };
    assert_eq!(s, KvmeshStatus::NullPointer);
    let mine = last_error(&api);
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(move || {
                assert_eq!(last_error(&api), "", "a new thread starts with no error");
                for _ in 0..200 {
                    let l = layout(&api, &spec_flash(4));
                    // SAFETY: valid handle, destroyed twice on purpose.
                    unsafe {
                        assert_eq!((api.layout_destroy)(l), KvmeshStatus::Ok);
                        assert_eq!((api.layout_destroy)(l), KvmeshStatus::InvalidHandle);
                    }
                }
            });
        }
    });
    assert_eq!(last_error(&api), mine);
}

#[test]
fn panics_become_internal_errors() {
    let api = api();
    let s = guard("test_entry", || panic!("boom"));
    assert_eq!(s, KvmeshStatus::Internal);
    let e = last_error(&api);
    assert!(e.contains("test_entry: internal error: boom"), "{e}");
}
