use super::*;
use proptest::prelude::*;

/// Row-major strides (bytes) of a tensor of `dims` with `elem`-byte elements.
fn c_strides(dims: &[u64], elem: u64) -> Vec<u64> {
    let mut out = vec![0; dims.len()];
    let mut s = elem;
    for i in (0..dims.len()).rev() {
        out[i] = s;
        s *= dims[i];
    }
    out
}

fn llama_shape() -> BlockShape {
    BlockShape::kv(32, 16, 8, 128, DType::Bf16)
}

#[test]
fn constructors_match_the_named_tensor_shapes() {
    let s = llama_shape();
    let (n, t, h, d, e) = (1000u64, 16, 8, 128, 2);
    let st = |l: &KvLayout| l.spec().strides;

    let c = c_strides(&[2, n, t, h, d], e);
    let l = KvLayout::vllm_flash_attn(s, 1000, HeadOrder::Nhd).unwrap();
    assert_eq!(
        st(&l),
        Strides {
            kv: c[0],
            block: c[1],
            token: c[2],
            head: c[3]
        }
    );
    assert_eq!(l.required_region_len(0), 2 * n * t * h * d * e);
    assert_eq!(l.region_count(), 32);

    let c = c_strides(&[2, n, h, t, d], e);
    let l = KvLayout::vllm_flash_attn(s, 1000, HeadOrder::Hnd).unwrap();
    assert_eq!(
        st(&l),
        Strides {
            kv: c[0],
            block: c[1],
            head: c[2],
            token: c[3]
        }
    );

    let c = c_strides(&[n, 2, t, h, d], e);
    let l = KvLayout::vllm_blocks_first(s, 1000, HeadOrder::Nhd).unwrap();
    assert_eq!(
        st(&l),
        Strides {
            block: c[0],
            kv: c[1],
            token: c[2],
            head: c[3]
        }
    );

    let c = c_strides(&[n, 2, h, t, d], e);
    let l = KvLayout::vllm_blocks_first(s, 1000, HeadOrder::Hnd).unwrap();
    assert_eq!(
        st(&l),
        Strides {
            block: c[0],
            kv: c[1],
            head: c[2],
            token: c[3]
        }
    );

    // (num_blocks, heads, block_size, 2 * head_size): K at [..d], V at [d..].
    let c = c_strides(&[n, h, t, 2 * d], e);
    let l = KvLayout::packed_kv(s, 1000).unwrap();
    assert_eq!(
        st(&l),
        Strides {
            block: c[0],
            head: c[1],
            token: c[2],
            kv: d * e
        }
    );
    assert!(l.kv_packed());
    assert_eq!(l.required_region_len(0), n * h * t * 2 * d * e);

    let m = BlockShape::mla(61, 64, 576, DType::Bf16);
    let c = c_strides(&[n, 64, 576], e);
    let l = KvLayout::mla(m, 1000).unwrap();
    assert_eq!((st(&l).block, st(&l).token), (c[0], c[1]));
    assert_eq!(l.required_region_len(0), n * 64 * 576 * e);

    // [blocks, layers, kv, heads * tokens * head_size], one region.
    let c = c_strides(&[n, 32, 2, h, t, d], e);
    let l = KvLayout::trtllm_pool(s, 1000).unwrap();
    assert_eq!(
        l.spec().layers,
        LayerPlacement::OneRegion { layer_stride: c[1] }
    );
    assert_eq!(
        st(&l),
        Strides {
            block: c[0],
            kv: c[2],
            head: c[3],
            token: c[4]
        }
    );
    assert_eq!(l.region_count(), 1);
    assert_eq!(l.required_region_len(0), n * 32 * 2 * h * t * d * e);

    let c = c_strides(&[n, 32, 2, t, h, d], e);
    let l = KvLayout::vllm_cross_layer(s, 1000).unwrap();
    assert_eq!(
        l.spec().layers,
        LayerPlacement::OneRegion { layer_stride: c[1] }
    );
    assert_eq!(
        st(&l),
        Strides {
            block: c[0],
            kv: c[2],
            token: c[3],
            head: c[4]
        }
    );
}

fn spec(strides: Strides) -> KvLayoutSpec {
    KvLayoutSpec {
        shape: BlockShape::kv(2, 4, 2, 8, DType::F16),
        num_blocks: 10,
        layers: LayerPlacement::PerLayerRegions,
        strides,
    }
}

#[test]
fn validation_names_what_is_inconsistent() {
    // vector 16 B; token stride 2 * 16 = 32 (NHD), kv plane 4 * 32 = 128.
    let good = Strides {
        block: 256,
        kv: 128,
        token: 32,
        head: 16,
    };
    assert!(KvLayout::new(spec(good)).is_ok());

    let err = |s: KvLayoutSpec| KvLayout::new(s).unwrap_err().to_string();
    let mut s = spec(good);
    s.shape.num_kv_heads = 0;
    assert_eq!(err(s), "num_kv_heads must be at least 1");
    s = spec(good);
    s.num_blocks = 0;
    assert_eq!(err(s), "num_blocks must be at least 1");
    assert_eq!(
        err(spec(Strides { block: 200, ..good })),
        "block stride 200 B is smaller than the 256 B spanned by the axes inside it \
         (head, token, kv and the 16 B head vector): blocks would overlap"
    );
    assert_eq!(
        err(spec(Strides { head: 8, ..good })),
        "head stride 8 B is smaller than the 16 B spanned by the axes inside it \
         (one 16 B head vector): heads would overlap"
    );
    assert_eq!(
        err(spec(Strides { token: 16, ..good })),
        "head stride 16 B is smaller than the 64 B spanned by the axes inside it \
         (token and the 16 B head vector): heads would overlap"
    );
    assert_eq!(
        err(spec(Strides {
            kv: 33,
            block: 512,
            ..good
        })),
        "kv stride 33 B is not a multiple of the 2 B f16 element"
    );
    let mut s = spec(good);
    s.shape = BlockShape {
        kind: KvKind::Latent,
        ..s.shape
    };
    assert_eq!(
        err(s),
        "an MLA (latent) layout has one vector per token: num_kv_heads must be 1, got 2"
    );
    // One region: the layer stride must step over a whole layer of blocks.
    let mut s = spec(good);
    s.layers = LayerPlacement::OneRegion { layer_stride: 2048 };
    assert_eq!(
        err(s),
        "layer stride 2048 B is smaller than the 2560 B spanned by the axes inside it \
         (head, token, kv, block and the 16 B head vector): layers would overlap"
    );
    s.layers = LayerPlacement::OneRegion { layer_stride: 2560 };
    let l = KvLayout::new(s).unwrap();
    assert_eq!(l.required_region_len(0), 2 * 2560);
    assert_eq!(
        l.check_regions(&[5119]).unwrap_err().to_string(),
        "region 0 holds 5119 B, the layout needs 5120 B"
    );
    assert_eq!(
        l.check_regions(&[5120, 5120]).unwrap_err().to_string(),
        "the layout has 1 base region(s), 2 were given"
    );
    assert_eq!(
        l.check_blocks("destination", &[1, 10], true)
            .unwrap_err()
            .to_string(),
        "destination block 10 (entry 1) is outside the cache's 10 blocks"
    );
    assert_eq!(
        l.check_blocks("destination", &[3, 1, 3], true)
            .unwrap_err()
            .to_string(),
        "destination block 3 appears twice (entries 0 and 2)"
    );
    assert_eq!(
        l.check_layers(&(1..3)).unwrap_err().to_string(),
        "layer range 1..3 is empty or outside the 2 layers"
    );
    let other =
        KvLayout::vllm_flash_attn(BlockShape::kv(2, 4, 2, 8, DType::Bf16), 4, HeadOrder::Nhd)
            .unwrap();
    assert_eq!(
        plan_copy(&l, &[0], &other, &[0], 0..2)
            .unwrap_err()
            .to_string(),
        "block shapes differ: dtype f16 vs bf16"
    );
}

#[test]
fn layouts_round_trip_through_serde_and_are_revalidated() {
    let l = KvLayout::trtllm_pool(llama_shape(), 77).unwrap();
    let bytes = postcard::to_allocvec(&l).unwrap();
    assert_eq!(postcard::from_bytes::<KvLayout>(&bytes).unwrap(), l);
    let mut bad = *l.spec();
    bad.strides.block = 1;
    let bytes = postcard::to_allocvec(&bad).unwrap();
    assert!(postcard::from_bytes::<KvLayout>(&bytes).is_err());
}

#[test]
fn fingerprint_covers_shape_and_packed_order_only() {
    let s = llama_shape();
    let a = KvLayout::vllm_flash_attn(s, 1000, HeadOrder::Nhd).unwrap();
    let b = KvLayout::vllm_flash_attn(s, 3000, HeadOrder::Nhd).unwrap();
    // Same packed format (kv, token, head) as FlashAttention NHD.
    let c = KvLayout::vllm_blocks_first(s, 10, HeadOrder::Nhd).unwrap();
    let hnd = KvLayout::vllm_flash_attn(s, 1000, HeadOrder::Hnd).unwrap();
    let f8 = KvLayout::vllm_flash_attn(
        BlockShape {
            dtype: DType::Fp8E4m3,
            ..s
        },
        1000,
        HeadOrder::Nhd,
    )
    .unwrap();
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_eq!(a.fingerprint(), c.fingerprint());
    assert_ne!(a.fingerprint(), hnd.fingerprint());
    assert_ne!(a.fingerprint(), f8.fingerprint());
    // Pinned: stored objects are keyed under this value; changing it
    // orphans every stored block.
    assert_eq!(
        a.fingerprint().to_string(),
        GOLDEN_FLASH_NHD_FINGERPRINT,
        "layout fingerprint changed"
    );
}

const GOLDEN_FLASH_NHD_FINGERPRINT: &str = "b8166b24394d50cb";

#[test]
fn plans_merge_into_few_large_segments() {
    let s = llama_shape();
    let blocks = [3, 4, 5, 9];
    let dst = [10, 11, 12, 20];
    // FlashAttention per layer: K and V planes are apart, consecutive
    // blocks are adjacent in each plane: 2 runs per layer per block run.
    let l = KvLayout::vllm_flash_attn(s, 100, HeadOrder::Nhd).unwrap();
    let p = plan_copy(&l, &blocks, &l, &dst, 0..32).unwrap();
    assert_eq!(p.len(), 32 * 2 * 2);
    assert_eq!(p[0].len, 3 * s.block_layer_bytes() / 2);
    assert_eq!(p[0].blocks, 0..3);
    // TensorRT-LLM pool: a block's layers are adjacent, and so are blocks.
    let l = KvLayout::trtllm_pool(s, 100).unwrap();
    let p = plan_copy(&l, &blocks, &l, &dst, 0..32).unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!((p[0].len, p[0].blocks.clone()), (3 * s.block_bytes(), 0..3));
    // Saving a block of the pool into a packed buffer is one copy.
    let pk = Packed::contiguous(&s, 0, 0, 1, 0..32);
    let p = l.plan_save(&[7], 0..32, &pk).unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].len, s.block_bytes());
    // Per-layer save of FlashAttention HND: 2 runs per block.
    let l = KvLayout::vllm_flash_attn(s, 100, HeadOrder::Hnd).unwrap();
    let pk = Packed::contiguous(&s, 0, 0, 2, 5..6);
    assert_eq!(l.plan_save(&[1, 2], 5..6, &pk).unwrap().len(), 2 * 2);
}

// ---- property tests: save -> load into another instance, byte for byte ----

#[derive(Debug, Clone, Copy)]
enum Family {
    FlashNhd,
    FlashHnd,
    BlocksFirstNhd,
    BlocksFirstHnd,
    Packed,
    Mla,
    TrtllmPool,
    TrtllmPoolMla,
    CrossLayer,
}

const FAMILIES: [Family; 9] = [
    Family::FlashNhd,
    Family::FlashHnd,
    Family::BlocksFirstNhd,
    Family::BlocksFirstHnd,
    Family::Packed,
    Family::Mla,
    Family::TrtllmPool,
    Family::TrtllmPoolMla,
    Family::CrossLayer,
];

impl Family {
    fn mla(self) -> bool {
        matches!(self, Family::Mla | Family::TrtllmPoolMla)
    }

    fn build(self, shape: BlockShape, n: u32) -> KvLayout {
        let r = match self {
            Family::FlashNhd => KvLayout::vllm_flash_attn(shape, n, HeadOrder::Nhd),
            Family::FlashHnd => KvLayout::vllm_flash_attn(shape, n, HeadOrder::Hnd),
            Family::BlocksFirstNhd => KvLayout::vllm_blocks_first(shape, n, HeadOrder::Nhd),
            Family::BlocksFirstHnd => KvLayout::vllm_blocks_first(shape, n, HeadOrder::Hnd),
            Family::Packed => KvLayout::packed_kv(shape, n),
            Family::Mla => KvLayout::mla(shape, n),
            Family::TrtllmPool | Family::TrtllmPoolMla => KvLayout::trtllm_pool(shape, n),
            Family::CrossLayer => KvLayout::vllm_cross_layer(shape, n),
        };
        r.unwrap()
    }

    /// Most segments one (block, layer) may need after merging.
    fn max_runs(self) -> usize {
        match self {
            Family::FlashNhd | Family::FlashHnd => 2,
            _ => 1,
        }
    }
}

/// Host memory for a layout's regions, filled with a pattern.
fn host_regions(l: &KvLayout, seed: u64) -> Vec<Vec<u8>> {
    (0..l.region_count())
        .map(|r| {
            let mut v = vec![0u8; l.required_region_len(r) as usize];
            kvmesh_gpu::pattern::fill(&mut v, seed + r as u64, 0);
            v
        })
        .collect()
}

/// The executor: one memcpy per segment.
fn run(plan: &[CopySegment], src: &[Vec<u8>], dst: &mut [Vec<u8>]) {
    for s in plan {
        let from = &src[s.src.region as usize][s.src.offset as usize..][..s.len as usize];
        dst[s.dst.region as usize][s.dst.offset as usize..][..s.len as usize].copy_from_slice(from);
    }
}

/// Every head vector of (entry, layer): (layer, kv, token, head).
fn vectors(shape: &BlockShape, layers: Range<u32>) -> Vec<(u32, u32, u32, u32)> {
    let mut v = Vec::new();
    for l in layers {
        for kv in 0..shape.kind.planes() {
            for t in 0..shape.block_size {
                for h in 0..shape.num_kv_heads {
                    v.push((l, kv, t, h));
                }
            }
        }
    }
    v
}

fn slice(mem: &[Vec<u8>], p: Place, len: u64) -> &[u8] {
    &mem[p.region as usize][p.offset as usize..][..len as usize]
}

/// The reference result: `dst` with each vector of `src_blocks[i]` copied
/// into `dst_blocks[i]`, computed vector by vector from the layouts.
fn reference(
    sl: &KvLayout,
    src: &[Vec<u8>],
    src_blocks: &[u32],
    dl: &KvLayout,
    dst: &[Vec<u8>],
    dst_blocks: &[u32],
    layers: Range<u32>,
) -> Vec<Vec<u8>> {
    let mut out = dst.to_vec();
    let vb = sl.shape().vector_bytes();
    for (i, (&sb, &db)) in src_blocks.iter().zip(dst_blocks).enumerate() {
        let _ = i;
        for (l, kv, t, h) in vectors(sl.shape(), layers.clone()) {
            let from = slice(src, sl.vector_place(l, sb, kv, t, h), vb).to_vec();
            let to = dl.vector_place(l, db, kv, t, h);
            out[to.region as usize][to.offset as usize..][..vb as usize].copy_from_slice(&from);
        }
    }
    out
}

fn dtype() -> impl Strategy<Value = DType> {
    prop::sample::select(DType::ALL.to_vec())
}

/// (family, shape, src num_blocks, dst num_blocks, src blocks, dst blocks, layers)
fn case() -> impl Strategy<Value = (Family, BlockShape, u32, u32, Vec<u32>, Vec<u32>, Range<u32>)> {
    (
        prop::sample::select(FAMILIES.to_vec()),
        1u32..4,
        1u32..5,
        1u32..4,
        1u32..6,
        dtype(),
        1u32..10,
        1u32..12,
    )
        .prop_flat_map(|(fam, layers, t, h, d, dt, ns, nd)| {
            let shape = if fam.mla() {
                BlockShape::mla(layers, t, d * 3, dt)
            } else {
                BlockShape::kv(layers, t, h, d, dt)
            };
            let max = ns.min(nd) as usize;
            (
                Just(fam),
                Just(shape),
                Just(ns),
                Just(nd),
                (1..=max).prop_flat_map(move |k| {
                    (
                        Just((0..ns).collect::<Vec<u32>>()).prop_shuffle(),
                        Just((0..nd).collect::<Vec<u32>>()).prop_shuffle(),
                        Just(k),
                    )
                }),
                (0..layers).prop_flat_map(move |a| (Just(a), a + 1..=layers)),
            )
        })
        .prop_map(|(fam, shape, ns, nd, (s, d, k), (a, b))| {
            (fam, shape, ns, nd, s[..k].to_vec(), d[..k].to_vec(), a..b)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Save random blocks of one instance into packed buffers, load them into
    /// other blocks of another instance (other num_blocks): the named blocks
    /// hold exactly the source bytes, every other byte is untouched, and the
    /// packed buffers follow the documented packed order.
    #[test]
    fn save_then_load_round_trips_byte_for_byte(
        (fam, shape, ns, nd, src_blocks, dst_blocks, layers) in case()
    ) {
        let sl = fam.build(shape, ns);
        let dl = fam.build(shape, nd);
        prop_assert_eq!(sl.fingerprint(), dl.fingerprint());
        let src = host_regions(&sl, 1);
        let dst0 = host_regions(&dl, 100);
        let k = src_blocks.len();
        let per = (layers.end - layers.start) as u64 * shape.block_layer_bytes();
        // Staging: packed blocks back to back, after a 3-byte offset.
        let packed = Packed::contiguous(&shape, 0, 3, k, layers.clone());
        let save = sl.plan_save(&src_blocks, layers.clone(), &packed).unwrap();
        let nl = (layers.end - layers.start) as usize;
        prop_assert!(save.len() <= k * nl * fam.max_runs(), "{} segments", save.len());
        let mut staging = vec![vec![0u8; 3 + k * per as usize]];
        run(&save, &src, &mut staging);
        // The packed order: layer-major, then native axes outermost first.
        let vb = shape.vector_bytes();
        for (i, &b) in src_blocks.iter().enumerate() {
            for (l, kv, t, h) in vectors(&shape, layers.clone()) {
                let off = 3 + i as u64 * per
                    + (l - layers.start) as u64 * shape.block_layer_bytes()
                    + kv as u64 * sl.packed_stride(Axis::Kv)
                    + t as u64 * sl.packed_stride(Axis::Token)
                    + h as u64 * sl.packed_stride(Axis::Head);
                prop_assert_eq!(
                    slice(&staging, Place::new(0, off), vb),
                    slice(&src, sl.vector_place(l, b, kv, t, h), vb)
                );
            }
        }
        let load = dl.plan_load(&dst_blocks, layers.clone(), &packed).unwrap();
        prop_assert!(load.len() <= k * nl * fam.max_runs());
        let mut dst = dst0.clone();
        run(&load, &staging, &mut dst);
        let want = reference(&sl, &src, &src_blocks, &dl, &dst0, &dst_blocks, layers.clone());
        prop_assert!(dst == want, "{:?}: loaded cache differs from the reference", fam);

        // The direct cache-to-cache plan (P/D push) gives the same bytes.
        let copy = plan_copy(&sl, &src_blocks, &dl, &dst_blocks, layers.clone()).unwrap();
        let mut dst = dst0.clone();
        run(&copy, &src, &mut dst);
        prop_assert!(dst == want, "{:?}: copied cache differs from the reference", fam);
        // Each segment names exactly the entries whose bytes it carries.
        for s in &copy {
            prop_assert!(s.blocks.start < s.blocks.end && s.blocks.end as usize <= k);
        }
    }

    /// Copies between two layouts of the same block shape but different
    /// memory orders (e.g. NHD -> HND, per-layer -> pool) are exact too.
    #[test]
    fn copy_across_layout_families_is_exact(
        (fam, shape, ns, nd, src_blocks, dst_blocks, layers) in case(),
        other in prop::sample::select(FAMILIES.to_vec()),
    ) {
        prop_assume!(fam.mla() == other.mla());
        let sl = fam.build(shape, ns);
        let dl = other.build(shape, nd);
        let src = host_regions(&sl, 7);
        let dst0 = host_regions(&dl, 70);
        let copy = plan_copy(&sl, &src_blocks, &dl, &dst_blocks, layers.clone()).unwrap();
        let mut dst = dst0.clone();
        run(&copy, &src, &mut dst);
        let want = reference(&sl, &src, &src_blocks, &dl, &dst0, &dst_blocks, layers);
        prop_assert!(dst == want, "{:?} -> {:?}", fam, other);
    }
}
