//! KV-cache layouts: where each byte of each block lives, and the pure
//! planning functions that turn "these blocks, these layers" into lists of
//! contiguous byte segments.
//!
//! A [`KvLayout`] describes a paged KV cache by its logical axes and a byte
//! stride for each:
//!
//! ```text
//!   layer  (per-layer base regions, or a stride inside one region)
//!   block  (num_blocks pages)
//!   kv     (2 planes: K and V; 1 for MLA's latent vector)
//!   token  (block_size tokens per page)
//!   head   (num_kv_heads)
//!   ------ innermost: one head vector of head_size elements, always contiguous
//! ```
//!
//! No shape is hard-coded: vLLM's FlashAttention `(2, num_blocks, block_size,
//! heads, head_size)` per layer (NHD or HND), its blocks-first variant, the
//! packed `(num_blocks, heads, block_size, 2*head_size)`, MLA `(num_blocks,
//! block_size, 576)`, TensorRT-LLM's single pool `[blocks, layers, kv,
//! heads*tokens*head_size]` and vLLM's cross-layer tensor are constructors
//! over the same strides ([`KvLayout::vllm_flash_attn`] and friends).
//!
//! Plan, then execute: [`KvLayout::plan_save`], [`KvLayout::plan_load`] and
//! [`plan_copy`] are pure functions returning [`CopySegment`]s, merged where
//! both sides are contiguous; executors (the engine, a memcpy loop, a GPU
//! gather kernel) only move bytes.
//!
//! The packed block: the bytes of one block as stored in an object or a
//! staging buffer are layer-major, then the layout's own inner axes from the
//! largest stride to the smallest (its "native order"). For most layouts a
//! block's bytes in one layer are one or two runs of memory, so packing and
//! unpacking is a handful of large copies. Two layouts with the same
//! [`KvLayout::fingerprint`] use the same packed format, so a block saved
//! from one instance loads into another (other block ids, other
//! `num_blocks`, other base addresses).
//!
//! Must not depend on: the transfer engine, I/O, the clock.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F16,
    Bf16,
    /// 8-bit float, 4 exponent bits (e4m3).
    Fp8E4m3,
    /// 8-bit float, 5 exponent bits (e5m2).
    Fp8E5m2,
}

impl DType {
    /// All element types, in code order.
    pub const ALL: [DType; 5] = [
        DType::F32,
        DType::F16,
        DType::Bf16,
        DType::Fp8E4m3,
        DType::Fp8E5m2,
    ];

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::Fp8E4m3 | DType::Fp8E5m2 => 1,
        }
    }

    /// Stable short name (used in key namespaces and messages).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::Fp8E4m3 => "fp8_e4m3",
            DType::Fp8E5m2 => "fp8_e5m2",
        }
    }

    /// Stable numeric code (the C ABI's `KVMESH_DTYPE_*`).
    pub fn code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Bf16 => 2,
            DType::Fp8E4m3 => 3,
            DType::Fp8E5m2 => 4,
        }
    }

    /// Inverse of [`DType::code`].
    pub fn from_code(code: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a token's entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvKind {
    /// A key and a value vector per head (2 planes).
    KeyValue,
    /// One latent vector per token (MLA): 1 plane, 1 head.
    Latent,
}

impl KvKind {
    /// Number of planes (the extent of the kv axis).
    pub fn planes(self) -> u32 {
        match self {
            KvKind::KeyValue => 2,
            KvKind::Latent => 1,
        }
    }
}

/// Order of the head and token axes inside a block (vLLM's naming).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadOrder {
    /// Tokens outside heads: `(block_size, heads, head_size)`.
    Nhd,
    /// Heads outside tokens: `(heads, block_size, head_size)`.
    Hnd,
}

/// A logical axis of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Axis {
    Layer,
    Block,
    Kv,
    Token,
    Head,
}

impl Axis {
    fn name(self) -> &'static str {
        match self {
            Axis::Layer => "layer",
            Axis::Block => "block",
            Axis::Kv => "kv",
            Axis::Token => "token",
            Axis::Head => "head",
        }
    }

    fn code(self) -> u8 {
        match self {
            Axis::Layer => 0,
            Axis::Block => 1,
            Axis::Kv => 2,
            Axis::Token => 3,
            Axis::Head => 4,
        }
    }
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The shape of one block, independent of where blocks live. Two caches
/// can exchange blocks iff their shapes are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockShape {
    pub num_layers: u32,
    /// Tokens per block.
    pub block_size: u32,
    pub num_kv_heads: u32,
    /// Elements per head vector (the latent dimension for MLA, e.g. 576).
    pub head_size: u32,
    pub dtype: DType,
    pub kind: KvKind,
}

impl BlockShape {
    /// A K/V cache shape.
    pub fn kv(
        num_layers: u32,
        block_size: u32,
        num_kv_heads: u32,
        head_size: u32,
        dtype: DType,
    ) -> Self {
        BlockShape {
            num_layers,
            block_size,
            num_kv_heads,
            head_size,
            dtype,
            kind: KvKind::KeyValue,
        }
    }

    /// An MLA shape: one latent vector of `latent_dim` elements per token.
    pub fn mla(num_layers: u32, block_size: u32, latent_dim: u32, dtype: DType) -> Self {
        BlockShape {
            num_layers,
            block_size,
            num_kv_heads: 1,
            head_size: latent_dim,
            dtype,
            kind: KvKind::Latent,
        }
    }

    /// Bytes of one head vector.
    pub fn vector_bytes(&self) -> u64 {
        self.head_size as u64 * self.dtype.size()
    }

    /// Bytes of one block in one layer.
    pub fn block_layer_bytes(&self) -> u64 {
        self.kind.planes() as u64
            * self.block_size as u64
            * self.num_kv_heads as u64
            * self.vector_bytes()
    }

    /// Bytes of one block across all layers (one packed block).
    pub fn block_bytes(&self) -> u64 {
        self.num_layers as u64 * self.block_layer_bytes()
    }

    fn count(&self, axis: Axis) -> u64 {
        match axis {
            Axis::Layer => self.num_layers as u64,
            Axis::Block => 0,
            Axis::Kv => self.kind.planes() as u64,
            Axis::Token => self.block_size as u64,
            Axis::Head => self.num_kv_heads as u64,
        }
    }
}

/// Where the layers of the cache live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LayerPlacement {
    /// One base region per layer (region `l` holds layer `l`), as with
    /// vLLM's per-layer KV tensors.
    PerLayerRegions,
    /// All layers in one region (a cross-layer tensor or a pool), layer `l`
    /// at `l * layer_stride`.
    OneRegion { layer_stride: u64 },
}

/// Byte strides of the axes inside a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Strides {
    pub block: u64,
    pub kv: u64,
    pub token: u64,
    pub head: u64,
}

/// Everything a [`KvLayout`] is made of, unvalidated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KvLayoutSpec {
    pub shape: BlockShape,
    pub num_blocks: u32,
    pub layers: LayerPlacement,
    pub strides: Strides,
}

/// Why a layout, a block list or a layer range was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("{field} must be at least 1")]
    Zero { field: &'static str },
    #[error("an MLA (latent) layout has one vector per token: num_kv_heads must be 1, got {got}")]
    LatentHeads { got: u32 },
    #[error("{axis} stride {stride} B is not a multiple of the {elem} B {dtype} element")]
    Misaligned {
        axis: Axis,
        stride: u64,
        elem: u64,
        dtype: DType,
    },
    #[error(
        "{axis} stride {stride} B is smaller than the {extent} B spanned by the axes inside it \
         ({inner}): {axis}s would overlap"
    )]
    Overlap {
        axis: Axis,
        stride: u64,
        extent: u64,
        inner: String,
    },
    #[error("the layout spans more than 2^64 bytes")]
    TooLarge,
    #[error("the layout has {need} base region(s), {got} were given")]
    RegionCount { need: usize, got: usize },
    #[error("region {region} holds {got} B, the layout needs {need} B")]
    RegionTooSmall { region: usize, need: u64, got: u64 },
    #[error("{side} block {block} (entry {index}) is outside the cache's {num_blocks} blocks")]
    BlockOutOfRange {
        side: &'static str,
        index: usize,
        block: u32,
        num_blocks: u32,
    },
    #[error("{side} block {block} appears twice (entries {first} and {second})")]
    DuplicateBlock {
        side: &'static str,
        block: u32,
        first: usize,
        second: usize,
    },
    #[error("{what}: {src} on the source side, {dst} on the destination side")]
    CountMismatch {
        what: &'static str,
        src: usize,
        dst: usize,
    },
    #[error("layer range {start}..{end} is empty or outside the {num_layers} layers")]
    LayerRange {
        start: u32,
        end: u32,
        num_layers: u32,
    },
    #[error("packed buffers start at layer {first_layer}, but layers {start}.. were requested")]
    PackedFirstLayer { first_layer: u32, start: u32 },
    #[error("block shapes differ: {0}")]
    ShapeMismatch(String),
}

/// A validated KV-cache layout. Serialises as its [`KvLayoutSpec`] and is
/// validated again when deserialised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "KvLayoutSpec", into = "KvLayoutSpec")]
pub struct KvLayout {
    spec: KvLayoutSpec,
    /// Inner axes with extent > 1, largest stride first: the packed order.
    native: Vec<Axis>,
}

impl From<KvLayout> for KvLayoutSpec {
    fn from(l: KvLayout) -> Self {
        l.spec
    }
}

impl TryFrom<KvLayoutSpec> for KvLayout {
    type Error = LayoutError;
    fn try_from(spec: KvLayoutSpec) -> Result<Self, LayoutError> {
        KvLayout::new(spec)
    }
}

/// A position in a set of base regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Place {
    pub region: u32,
    pub offset: u64,
}

impl Place {
    pub fn new(region: u32, offset: u64) -> Self {
        Place { region, offset }
    }
}

/// One contiguous copy of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySegment {
    pub src: Place,
    pub dst: Place,
    pub len: u64,
    /// Entries of the caller's block list this segment carries bytes of
    /// (several when adjacent blocks merged into one run).
    pub blocks: Range<u32>,
}

/// Where packed blocks live: `places[i]` is the start of the packed block
/// of entry `i`, holding layers `first_layer..` (layer `l` at
/// `(l - first_layer) * block_layer_bytes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    pub places: Vec<Place>,
    pub first_layer: u32,
}

impl Packed {
    /// Packed blocks back to back in one buffer (region `region`, from
    /// `offset`), each holding the layers of `layers`.
    pub fn contiguous(
        shape: &BlockShape,
        region: u32,
        offset: u64,
        n_blocks: usize,
        layers: Range<u32>,
    ) -> Packed {
        let per = (layers.end.saturating_sub(layers.start)) as u64 * shape.block_layer_bytes();
        Packed {
            places: (0..n_blocks as u64)
                .map(|i| Place::new(region, offset + i * per))
                .collect(),
            first_layer: layers.start,
        }
    }
}

const LAYOUT_FINGERPRINT_CONTEXT: &str = "kvmesh plugin layout fingerprint v1";

/// A stable 32-byte hash of a layout's block shape and packed format.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayoutFingerprint(pub [u8; 32]);

impl fmt::Debug for LayoutFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayoutFingerprint({self})")
    }
}

impl fmt::Display for LayoutFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl KvLayout {
    /// Validates a spec.
    pub fn new(spec: KvLayoutSpec) -> Result<KvLayout, LayoutError> {
        let s = &spec.shape;
        for (field, v) in [
            ("num_layers", s.num_layers),
            ("num_blocks", spec.num_blocks),
            ("block_size", s.block_size),
            ("num_kv_heads", s.num_kv_heads),
            ("head_size", s.head_size),
        ] {
            if v == 0 {
                return Err(LayoutError::Zero { field });
            }
        }
        if s.kind == KvKind::Latent && s.num_kv_heads != 1 {
            return Err(LayoutError::LatentHeads {
                got: s.num_kv_heads,
            });
        }
        // Every axis with extent > 1 (the layer axis only inside one region).
        let mut axes: Vec<(Axis, u64, u64)> = Vec::new();
        if let LayerPlacement::OneRegion { layer_stride } = spec.layers {
            axes.push((Axis::Layer, layer_stride, s.num_layers as u64));
        }
        axes.push((Axis::Block, spec.strides.block, spec.num_blocks as u64));
        for a in [Axis::Kv, Axis::Token, Axis::Head] {
            axes.push((a, stride_of(&spec.strides, a), s.count(a)));
        }
        axes.retain(|a| a.2 > 1);
        let elem = s.dtype.size();
        for &(axis, stride, _) in &axes {
            if stride % elem != 0 {
                return Err(LayoutError::Misaligned {
                    axis,
                    stride,
                    elem,
                    dtype: s.dtype,
                });
            }
        }
        // No two element vectors may share a byte: sorted by stride, each
        // axis must step over everything the smaller ones span.
        axes.sort_by_key(|a| (a.1, a.0));
        let mut extent = s.vector_bytes();
        let mut inner: Vec<&'static str> = Vec::new();
        for &(axis, stride, count) in &axes {
            if stride < extent {
                return Err(LayoutError::Overlap {
                    axis,
                    stride,
                    extent,
                    inner: if inner.is_empty() {
                        format!("one {} B head vector", s.vector_bytes())
                    } else {
                        format!(
                            "{} and the {} B head vector",
                            inner.join(", "),
                            s.vector_bytes()
                        )
                    },
                });
            }
            extent = (count - 1)
                .checked_mul(stride)
                .and_then(|x| x.checked_add(extent))
                .ok_or(LayoutError::TooLarge)?;
            inner.push(axis.name());
        }
        let mut native: Vec<(Axis, u64)> = [Axis::Kv, Axis::Token, Axis::Head]
            .into_iter()
            .filter(|&a| s.count(a) > 1)
            .map(|a| (a, stride_of(&spec.strides, a)))
            .collect();
        native.sort_by_key(|&(a, st)| (std::cmp::Reverse(st), a));
        Ok(KvLayout {
            spec,
            native: native.into_iter().map(|x| x.0).collect(),
        })
    }

    fn per_layer(
        shape: BlockShape,
        num_blocks: u32,
        strides: Strides,
    ) -> Result<Self, LayoutError> {
        KvLayout::new(KvLayoutSpec {
            shape,
            num_blocks,
            layers: LayerPlacement::PerLayerRegions,
            strides,
        })
    }

    /// vLLM FlashAttention: per layer `(2, num_blocks, block_size, heads,
    /// head_size)`; with [`HeadOrder::Hnd`] the memory order is `(2,
    /// num_blocks, heads, block_size, head_size)`.
    pub fn vllm_flash_attn(
        shape: BlockShape,
        num_blocks: u32,
        order: HeadOrder,
    ) -> Result<Self, LayoutError> {
        let (v, t, h, n) = dims(&shape, num_blocks);
        let (token, head) = token_head(order, v, t, h);
        let block = t * h * v;
        Self::per_layer(
            shape,
            num_blocks,
            Strides {
                block,
                kv: n * block,
                token,
                head,
            },
        )
    }

    /// vLLM blocks-first (FlashInfer): per layer `(num_blocks, 2,
    /// block_size, heads, head_size)`, or `(num_blocks, 2, heads,
    /// block_size, head_size)` with [`HeadOrder::Hnd`].
    pub fn vllm_blocks_first(
        shape: BlockShape,
        num_blocks: u32,
        order: HeadOrder,
    ) -> Result<Self, LayoutError> {
        let (v, t, h, _) = dims(&shape, num_blocks);
        let (token, head) = token_head(order, v, t, h);
        let kv = t * h * v;
        Self::per_layer(
            shape,
            num_blocks,
            Strides {
                block: shape.kind.planes() as u64 * kv,
                kv,
                token,
                head,
            },
        )
    }

    /// K and V packed in the last dimension: per layer `(num_blocks, heads,
    /// block_size, 2 * head_size)`.
    pub fn packed_kv(shape: BlockShape, num_blocks: u32) -> Result<Self, LayoutError> {
        let (v, t, h, _) = dims(&shape, num_blocks);
        let p = shape.kind.planes() as u64;
        Self::per_layer(
            shape,
            num_blocks,
            Strides {
                block: h * t * p * v,
                kv: v,
                token: p * v,
                head: t * p * v,
            },
        )
    }

    /// MLA: per layer `(num_blocks, block_size, latent_dim)`; `shape` from
    /// [`BlockShape::mla`].
    pub fn mla(shape: BlockShape, num_blocks: u32) -> Result<Self, LayoutError> {
        let (v, t, _, _) = dims(&shape, num_blocks);
        Self::per_layer(
            shape,
            num_blocks,
            Strides {
                block: t * v,
                kv: t * v,
                token: v,
                head: v,
            },
        )
    }

    /// TensorRT-LLM's pool: one region `[num_blocks, layers, kv,
    /// heads * block_size * head_size]` (kv = 1 for an MLA shape).
    pub fn trtllm_pool(shape: BlockShape, num_blocks: u32) -> Result<Self, LayoutError> {
        let (v, t, h, _) = dims(&shape, num_blocks);
        let kv = h * t * v;
        let layer = shape.kind.planes() as u64 * kv;
        KvLayout::new(KvLayoutSpec {
            shape,
            num_blocks,
            layers: LayerPlacement::OneRegion {
                layer_stride: layer,
            },
            strides: Strides {
                block: shape.num_layers as u64 * layer,
                kv,
                token: v,
                head: t * v,
            },
        })
    }

    /// vLLM's cross-layer tensor: one region `(num_blocks, layers, 2,
    /// block_size, heads, head_size)`.
    pub fn vllm_cross_layer(shape: BlockShape, num_blocks: u32) -> Result<Self, LayoutError> {
        let (v, t, h, _) = dims(&shape, num_blocks);
        let kv = t * h * v;
        let layer = shape.kind.planes() as u64 * kv;
        KvLayout::new(KvLayoutSpec {
            shape,
            num_blocks,
            layers: LayerPlacement::OneRegion {
                layer_stride: layer,
            },
            strides: Strides {
                block: shape.num_layers as u64 * layer,
                kv,
                token: h * v,
                head: v,
            },
        })
    }

    pub fn spec(&self) -> &KvLayoutSpec {
        &self.spec
    }

    pub fn shape(&self) -> &BlockShape {
        &self.spec.shape
    }

    pub fn num_blocks(&self) -> u32 {
        self.spec.num_blocks
    }

    pub fn num_layers(&self) -> u32 {
        self.spec.shape.num_layers
    }

    /// Whether K and V of a head sit side by side in the last dimension.
    pub fn kv_packed(&self) -> bool {
        self.spec.shape.kind == KvKind::KeyValue
            && self.spec.strides.kv == self.spec.shape.vector_bytes()
    }

    /// The inner axes with extent > 1, outermost first (the packed order).
    pub fn native_order(&self) -> &[Axis] {
        &self.native
    }

    /// Number of base regions.
    pub fn region_count(&self) -> usize {
        match self.spec.layers {
            LayerPlacement::PerLayerRegions => self.spec.shape.num_layers as usize,
            LayerPlacement::OneRegion { .. } => 1,
        }
    }

    /// Where layer `l` of block 0 starts.
    pub fn layer_place(&self, layer: u32) -> Place {
        match self.spec.layers {
            LayerPlacement::PerLayerRegions => Place::new(layer, 0),
            LayerPlacement::OneRegion { layer_stride } => {
                Place::new(0, layer as u64 * layer_stride)
            }
        }
    }

    /// Where `(layer, block, kv, token, head)`'s head vector starts.
    pub fn vector_place(&self, layer: u32, block: u32, kv: u32, token: u32, head: u32) -> Place {
        let st = &self.spec.strides;
        let p = self.layer_place(layer);
        Place::new(
            p.region,
            p.offset
                + block as u64 * st.block
                + kv as u64 * st.kv
                + token as u64 * st.token
                + head as u64 * st.head,
        )
    }

    /// Bytes region `region` must hold (one past the last byte the layout
    /// touches in it).
    pub fn required_region_len(&self, region: usize) -> u64 {
        let s = &self.spec.shape;
        let st = &self.spec.strides;
        let last = |count: u64, stride: u64| count.saturating_sub(1) * stride;
        let inner = last(self.spec.num_blocks as u64, st.block)
            + last(s.count(Axis::Kv), st.kv)
            + last(s.count(Axis::Token), st.token)
            + last(s.count(Axis::Head), st.head)
            + s.vector_bytes();
        match self.spec.layers {
            LayerPlacement::PerLayerRegions => {
                if region < self.region_count() {
                    inner
                } else {
                    0
                }
            }
            LayerPlacement::OneRegion { layer_stride } if region == 0 => {
                last(s.num_layers as u64, layer_stride) + inner
            }
            LayerPlacement::OneRegion { .. } => 0,
        }
    }

    /// Checks the lengths of the base regions a cache registers.
    pub fn check_regions(&self, lens: &[u64]) -> Result<(), LayoutError> {
        if lens.len() != self.region_count() {
            return Err(LayoutError::RegionCount {
                need: self.region_count(),
                got: lens.len(),
            });
        }
        for (region, &got) in lens.iter().enumerate() {
            let need = self.required_region_len(region);
            if got < need {
                return Err(LayoutError::RegionTooSmall { region, need, got });
            }
        }
        Ok(())
    }

    /// Checks block ids against the cache (and, for blocks written to,
    /// that none repeats).
    pub fn check_blocks(
        &self,
        side: &'static str,
        blocks: &[u32],
        unique: bool,
    ) -> Result<(), LayoutError> {
        let n = self.spec.num_blocks;
        for (index, &block) in blocks.iter().enumerate() {
            if block >= n {
                return Err(LayoutError::BlockOutOfRange {
                    side,
                    index,
                    block,
                    num_blocks: n,
                });
            }
        }
        if unique {
            let mut seen = std::collections::HashMap::with_capacity(blocks.len());
            for (i, &b) in blocks.iter().enumerate() {
                if let Some(first) = seen.insert(b, i) {
                    return Err(LayoutError::DuplicateBlock {
                        side,
                        block: b,
                        first,
                        second: i,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks a layer range.
    pub fn check_layers(&self, layers: &Range<u32>) -> Result<(), LayoutError> {
        if layers.start >= layers.end || layers.end > self.num_layers() {
            return Err(LayoutError::LayerRange {
                start: layers.start,
                end: layers.end,
                num_layers: self.num_layers(),
            });
        }
        Ok(())
    }

    /// Stable hash of what the packed format depends on: the block shape
    /// and the native axis order (not `num_blocks`, strides or addresses).
    pub fn fingerprint(&self) -> LayoutFingerprint {
        let s = &self.spec.shape;
        let mut h = blake3::Hasher::new_derive_key(LAYOUT_FINGERPRINT_CONTEXT);
        for v in [s.num_layers, s.block_size, s.num_kv_heads, s.head_size] {
            h.update(&v.to_le_bytes());
        }
        h.update(&s.dtype.code().to_le_bytes());
        h.update(&s.kind.planes().to_le_bytes());
        h.update(&[self.native.len() as u8]);
        for a in &self.native {
            h.update(&[a.code()]);
        }
        LayoutFingerprint(*h.finalize().as_bytes())
    }

    /// Byte stride of an inner axis inside one packed block.
    pub fn packed_stride(&self, axis: Axis) -> u64 {
        let s = &self.spec.shape;
        match axis {
            Axis::Layer => s.block_layer_bytes(),
            Axis::Block => s.block_bytes(),
            _ => {
                let mut stride = s.vector_bytes();
                for &a in self.native.iter().rev() {
                    if a == axis {
                        return stride;
                    }
                    stride *= s.count(a);
                }
                0 // extent 1: never stepped
            }
        }
    }

    /// Plans copying `blocks` (layers `layers`) out of the cache into
    /// packed blocks. Source places are cache regions, destinations are
    /// `packed`'s.
    pub fn plan_save(
        &self,
        blocks: &[u32],
        layers: Range<u32>,
        packed: &Packed,
    ) -> Result<Vec<CopySegment>, LayoutError> {
        self.check_blocks("source", blocks, false)?;
        self.check_packed(blocks.len(), &layers, packed)?;
        let cache = Side::Cache {
            layout: self,
            blocks,
        };
        let pk = Side::Packed {
            layout: self,
            packed,
        };
        Ok(plan(&cache, &pk, self, blocks.len(), layers))
    }

    /// Plans copying packed blocks into `blocks` of the cache (layers
    /// `layers`). Refuses repeated destination blocks.
    pub fn plan_load(
        &self,
        blocks: &[u32],
        layers: Range<u32>,
        packed: &Packed,
    ) -> Result<Vec<CopySegment>, LayoutError> {
        self.check_blocks("destination", blocks, true)?;
        self.check_packed(blocks.len(), &layers, packed)?;
        let cache = Side::Cache {
            layout: self,
            blocks,
        };
        let pk = Side::Packed {
            layout: self,
            packed,
        };
        Ok(plan(&pk, &cache, self, blocks.len(), layers))
    }

    fn check_packed(
        &self,
        n: usize,
        layers: &Range<u32>,
        packed: &Packed,
    ) -> Result<(), LayoutError> {
        self.check_layers(layers)?;
        if packed.places.len() != n {
            return Err(LayoutError::CountMismatch {
                what: "packed buffers per block",
                src: n,
                dst: packed.places.len(),
            });
        }
        if layers.start < packed.first_layer {
            return Err(LayoutError::PackedFirstLayer {
                first_layer: packed.first_layer,
                start: layers.start,
            });
        }
        Ok(())
    }
}

/// Plans copying `src_blocks` of one cache into `dst_blocks` of another
/// (entry `i` to entry `i`), layers `layers`. The layouts may differ in
/// everything but the block shape.
pub fn plan_copy(
    src: &KvLayout,
    src_blocks: &[u32],
    dst: &KvLayout,
    dst_blocks: &[u32],
    layers: Range<u32>,
) -> Result<Vec<CopySegment>, LayoutError> {
    check_same_shape(src.shape(), dst.shape())?;
    if src_blocks.len() != dst_blocks.len() {
        return Err(LayoutError::CountMismatch {
            what: "number of blocks",
            src: src_blocks.len(),
            dst: dst_blocks.len(),
        });
    }
    src.check_blocks("source", src_blocks, false)?;
    dst.check_blocks("destination", dst_blocks, true)?;
    src.check_layers(&layers)?;
    let s = Side::Cache {
        layout: src,
        blocks: src_blocks,
    };
    let d = Side::Cache {
        layout: dst,
        blocks: dst_blocks,
    };
    Ok(plan(&s, &d, src, src_blocks.len(), layers))
}

/// Refuses two shapes that cannot exchange blocks, naming what differs.
pub fn check_same_shape(a: &BlockShape, b: &BlockShape) -> Result<(), LayoutError> {
    let mut diff = Vec::new();
    let mut cmp = |what: &str, x: String, y: String| {
        if x != y {
            diff.push(format!("{what} {x} vs {y}"));
        }
    };
    cmp("layers", a.num_layers.to_string(), b.num_layers.to_string());
    cmp(
        "block_size",
        a.block_size.to_string(),
        b.block_size.to_string(),
    );
    cmp(
        "num_kv_heads",
        a.num_kv_heads.to_string(),
        b.num_kv_heads.to_string(),
    );
    cmp(
        "head_size",
        a.head_size.to_string(),
        b.head_size.to_string(),
    );
    cmp("dtype", a.dtype.to_string(), b.dtype.to_string());
    cmp("kind", format!("{:?}", a.kind), format!("{:?}", b.kind));
    if diff.is_empty() {
        Ok(())
    } else {
        Err(LayoutError::ShapeMismatch(diff.join(", ")))
    }
}

fn stride_of(st: &Strides, axis: Axis) -> u64 {
    match axis {
        Axis::Block => st.block,
        Axis::Kv => st.kv,
        Axis::Token => st.token,
        Axis::Head => st.head,
        Axis::Layer => 0,
    }
}

/// (vector bytes, tokens, heads, blocks) as u64.
fn dims(shape: &BlockShape, num_blocks: u32) -> (u64, u64, u64, u64) {
    (
        shape.vector_bytes(),
        shape.block_size as u64,
        shape.num_kv_heads as u64,
        num_blocks as u64,
    )
}

/// (token stride, head stride) inside one kv plane of `t` tokens × `h` heads.
fn token_head(order: HeadOrder, v: u64, t: u64, h: u64) -> (u64, u64) {
    match order {
        HeadOrder::Nhd => (h * v, v),
        HeadOrder::Hnd => (v, t * v),
    }
}

/// One side of a copy: cache blocks, or packed blocks.
enum Side<'a> {
    Cache {
        layout: &'a KvLayout,
        blocks: &'a [u32],
    },
    Packed {
        layout: &'a KvLayout,
        packed: &'a Packed,
    },
}

impl Side<'_> {
    /// Start of entry `i`'s layer `l` (kv, token, head all 0).
    fn place(&self, i: usize, l: u32) -> Place {
        match self {
            Side::Cache { layout, blocks } => {
                let p = layout.layer_place(l);
                Place::new(
                    p.region,
                    p.offset + blocks[i] as u64 * layout.spec.strides.block,
                )
            }
            Side::Packed { layout, packed } => {
                let p = packed.places[i];
                Place::new(
                    p.region,
                    p.offset + (l - packed.first_layer) as u64 * layout.shape().block_layer_bytes(),
                )
            }
        }
    }

    fn stride(&self, axis: Axis) -> u64 {
        match self {
            Side::Cache { layout, .. } => stride_of(&layout.spec.strides, axis),
            Side::Packed { layout, .. } => layout.packed_stride(axis),
        }
    }
}

/// The planner shared by save, load and copy.
///
/// Inner axes are collapsed into one run while both sides are contiguous
/// along them (ascending stride of `lead`, the cache whose memory order
/// decides). The remaining axes, plus the layer and block axes, are
/// enumerated in `lead`'s memory order (largest stride outermost), and
/// consecutive segments adjacent on both sides are merged (across heads,
/// planes, layers and blocks).
fn plan(
    src: &Side<'_>,
    dst: &Side<'_>,
    lead: &KvLayout,
    n: usize,
    layers: Range<u32>,
) -> Vec<CopySegment> {
    #[derive(Clone, Copy)]
    enum Dim {
        Layer,
        Block,
        /// (count, src stride, dst stride)
        Inner(u64, u64, u64),
    }
    let shape = lead.shape();
    // Inner axes, smallest lead stride first.
    let axes: Vec<Axis> = lead.native.iter().rev().copied().collect();
    let mut run = shape.vector_bytes();
    let mut k = 0;
    while k < axes.len() && src.stride(axes[k]) == run && dst.stride(axes[k]) == run {
        run *= shape.count(axes[k]);
        k += 1;
    }
    let lead_stride = |a: Axis| stride_of(&lead.spec.strides, a);
    let mut dims: Vec<(u64, Dim)> = axes[k..]
        .iter()
        .map(|&a| {
            (
                lead_stride(a),
                Dim::Inner(shape.count(a), src.stride(a), dst.stride(a)),
            )
        })
        .collect();
    dims.push((lead.spec.strides.block, Dim::Block));
    dims.push((
        match lead.spec.layers {
            LayerPlacement::PerLayerRegions => u64::MAX,
            LayerPlacement::OneRegion { layer_stride } => layer_stride,
        },
        Dim::Layer,
    ));
    // Outermost first; ties (extent-1 axes) keep layer and block outside.
    dims.sort_by_key(|d| std::cmp::Reverse(d.0));
    let dims: Vec<Dim> = dims.into_iter().map(|d| d.1).collect();
    let count = |d: &Dim| match *d {
        Dim::Layer => (layers.end - layers.start) as u64,
        Dim::Block => n as u64,
        Dim::Inner(c, ..) => c,
    };
    let total: u64 = dims.iter().map(count).product();
    let mut out: Vec<CopySegment> = Vec::with_capacity(total.min(1 << 16) as usize);
    if total == 0 {
        return out;
    }
    let mut idx = vec![0u64; dims.len()];
    loop {
        let (mut i, mut l) = (0usize, layers.start);
        let (mut so, mut doff) = (0u64, 0u64);
        for (d, &x) in dims.iter().zip(&idx) {
            match *d {
                Dim::Layer => l = layers.start + x as u32,
                Dim::Block => i = x as usize,
                Dim::Inner(_, ss, ds) => {
                    so += x * ss;
                    doff += x * ds;
                }
            }
        }
        let (s0, d0) = (src.place(i, l), dst.place(i, l));
        push_merged(
            &mut out,
            CopySegment {
                src: Place::new(s0.region, s0.offset + so),
                dst: Place::new(d0.region, d0.offset + doff),
                len: run,
                blocks: i as u32..i as u32 + 1,
            },
        );
        // Odometer, innermost (last) dimension fastest.
        let mut j = dims.len();
        loop {
            if j == 0 {
                return out;
            }
            j -= 1;
            idx[j] += 1;
            if idx[j] < count(&dims[j]) {
                break;
            }
            idx[j] = 0;
        }
    }
}

fn push_merged(out: &mut Vec<CopySegment>, seg: CopySegment) {
    if let Some(last) = out.last_mut() {
        let i = seg.blocks.start;
        let same_or_next = i + 1 == last.blocks.end || i == last.blocks.end;
        if same_or_next
            && last.src.region == seg.src.region
            && last.dst.region == seg.dst.region
            && last.src.offset + last.len == seg.src.offset
            && last.dst.offset + last.len == seg.dst.offset
        {
            last.len += seg.len;
            last.blocks.end = last.blocks.end.max(i + 1);
            return;
        }
    }
    out.push(seg);
}

#[cfg(test)]
mod tests;
