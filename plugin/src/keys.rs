//! Keys of KV blocks: chained prefix hashes inside a namespace.
//!
//! ```text
//!   root = H_ns(model_id, dtype, layout fingerprint, tp_rank, weight_version)
//!   key0 = H_blk(root, tokens[0..B],   extras of block 0)
//!   key1 = H_blk(key0, tokens[B..2B],  extras of block 1)
//!   ...    only full blocks; a partial last block has no key
//! ```
//!
//! A block's key therefore names its whole prefix: two requests share key
//! `i` iff they share the namespace, every token of blocks `0..=i` and every
//! extra key (LoRA adapter, multimodal input hash, cache salt) of those
//! blocks. Callers that already hash blocks (vLLM's `request.block_hashes`)
//! pass their per-block bytes instead; they are chained into the namespace
//! the same way under a separate domain, so they cannot collide with token
//! keys or with the same hashes in another namespace.
//!
//! Every field is length-prefixed, so no two different inputs share an
//! encoding. BLAKE3 in derive-key mode, 32-byte output (the width of the
//! peer store's object keys).
//!
//! Must not depend on: the transfer engine, I/O.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::layout::{DType, LayoutFingerprint};

const NAMESPACE_CONTEXT: &str = "kvmesh plugin key namespace v1";
const TOKEN_BLOCK_CONTEXT: &str = "kvmesh plugin token block key v1";
const EXTERNAL_BLOCK_CONTEXT: &str = "kvmesh plugin external block key v1";

/// The 32-byte key of one KV block (and of its whole prefix).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockKey(pub [u8; 32]);

impl BlockKey {
    pub const LEN: usize = 32;

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<BlockKey> {
        let s = s.as_bytes();
        if s.len() != 64 {
            return None;
        }
        let nib = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = nib(s[2 * i])? << 4 | nib(s[2 * i + 1])?;
        }
        Some(BlockKey(out))
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({self})")
    }
}

/// What makes KV bytes of the same tokens differ: keys from different
/// namespaces never match.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyNamespace {
    /// Model identity (e.g. the Hugging Face repo id or a path).
    pub model_id: String,
    pub dtype: DType,
    /// [`crate::KvLayout::fingerprint`]: block shape and packed format.
    pub layout_fingerprint: LayoutFingerprint,
    /// Tensor-parallel rank: each rank holds different heads.
    pub tp_rank: u32,
    /// Weight revision; bump it when the weights change.
    pub weight_version: String,
}

/// Extra inputs that change a block's KV bytes besides its tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtraKeys {
    every_block: Vec<Vec<u8>>,
    per_block: BTreeMap<u32, Vec<Vec<u8>>>,
}

impl ExtraKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// An extra key for every block (e.g. a LoRA adapter id).
    pub fn every_block(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.every_block.push(key.into());
        self
    }

    /// An extra key for block `index` only (e.g. the hash of a multimodal
    /// input whose placeholder tokens fall in that block, or a cache salt
    /// on block 0).
    pub fn for_block(mut self, index: u32, key: impl Into<Vec<u8>>) -> Self {
        self.per_block.entry(index).or_default().push(key.into());
        self
    }

    /// The extra keys of block `index`, in a fixed order.
    pub fn of_block(&self, index: u32) -> Vec<&[u8]> {
        self.every_block
            .iter()
            .chain(self.per_block.get(&index).into_iter().flatten())
            .map(|v| v.as_slice())
            .collect()
    }
}

fn put_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

impl KeyNamespace {
    /// The parent key of block 0.
    pub fn root(&self) -> BlockKey {
        let mut h = blake3::Hasher::new_derive_key(NAMESPACE_CONTEXT);
        put_bytes(&mut h, self.model_id.as_bytes());
        put_bytes(&mut h, self.dtype.name().as_bytes());
        h.update(&self.layout_fingerprint.0);
        h.update(&self.tp_rank.to_le_bytes());
        put_bytes(&mut h, self.weight_version.as_bytes());
        BlockKey(*h.finalize().as_bytes())
    }

    /// Keys of the full blocks of `tokens` (`block_size` tokens each; a
    /// partial last block gets none). Empty if `block_size` is 0.
    pub fn token_keys(&self, tokens: &[u32], block_size: u32, extra: &ExtraKeys) -> Vec<BlockKey> {
        if block_size == 0 {
            return Vec::new();
        }
        let mut parent = self.root();
        tokens
            .chunks_exact(block_size as usize)
            .enumerate()
            .map(|(i, blk)| {
                parent = next_token_key(&parent, blk, &extra.of_block(i as u32));
                parent
            })
            .collect()
    }

    /// Keys from caller-computed per-block hashes (any bytes, e.g. vLLM's
    /// `request.block_hashes`), chained into this namespace.
    pub fn external_keys<H: AsRef<[u8]>>(&self, hashes: &[H]) -> Vec<BlockKey> {
        let mut parent = self.root();
        hashes
            .iter()
            .map(|b| {
                parent = next_external_key(&parent, b.as_ref());
                parent
            })
            .collect()
    }
}

/// The key of a block of tokens following the block keyed `parent` (or the
/// namespace root).
pub fn next_token_key(parent: &BlockKey, tokens: &[u32], extra: &[&[u8]]) -> BlockKey {
    let mut h = blake3::Hasher::new_derive_key(TOKEN_BLOCK_CONTEXT);
    h.update(&parent.0);
    h.update(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.update(&(extra.len() as u64).to_le_bytes());
    for e in extra {
        put_bytes(&mut h, e);
    }
    BlockKey(*h.finalize().as_bytes())
}

/// The key of a block identified by a caller's hash, following `parent`.
pub fn next_external_key(parent: &BlockKey, hash: &[u8]) -> BlockKey {
    let mut h = blake3::Hasher::new_derive_key(EXTERNAL_BLOCK_CONTEXT);
    h.update(&parent.0);
    put_bytes(&mut h, hash);
    BlockKey(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{BlockShape, HeadOrder, KvLayout};

    fn ns() -> KeyNamespace {
        let l = KvLayout::vllm_flash_attn(
            BlockShape::kv(32, 16, 8, 128, DType::Bf16),
            100,
            HeadOrder::Nhd,
        )
        .unwrap();
        KeyNamespace {
            model_id: "meta-llama/Llama-3.1-8B".into(),
            dtype: DType::Bf16,
            layout_fingerprint: l.fingerprint(),
            tp_rank: 0,
            weight_version: "1".into(),
        }
    }

    fn toks(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| i.wrapping_mul(2654435761) ^ seed)
            .collect()
    }

    #[test]
    fn only_full_blocks_get_keys_and_prefixes_share_them() {
        let ns = ns();
        let t = toks(50, 1);
        let k = ns.token_keys(&t, 16, &ExtraKeys::new());
        assert_eq!(k.len(), 3);
        assert_eq!(ns.token_keys(&t[..47], 16, &ExtraKeys::new()), k[..2]);
        assert_eq!(ns.token_keys(&t[..32], 16, &ExtraKeys::new()), k[..2]);
        assert!(ns.token_keys(&t[..15], 16, &ExtraKeys::new()).is_empty());
        assert!(ns.token_keys(&t, 0, &ExtraKeys::new()).is_empty());
        // Incremental extension gives the same chain.
        assert_eq!(next_token_key(&k[1], &t[32..48], &[]), k[2]);
        // Pinned: stored objects are named by these keys.
        assert_eq!(k[0].to_string(), GOLDEN_KEY0);
        assert_eq!(BlockKey::from_hex(&k[0].to_string()), Some(k[0]));
    }

    const GOLDEN_KEY0: &str = "586b6f706d86e854328373db19005dce31f1373d83542753a39b0b6269980cb8";

    #[test]
    fn a_changed_token_changes_its_block_and_every_later_one() {
        let ns = ns();
        let t = toks(64, 2);
        let a = ns.token_keys(&t, 16, &ExtraKeys::new());
        let mut t2 = t.clone();
        t2[20] ^= 1; // block 1
        let b = ns.token_keys(&t2, 16, &ExtraKeys::new());
        assert_eq!(a[0], b[0]);
        for i in 1..4 {
            assert_ne!(a[i], b[i], "block {i}");
        }
    }

    #[test]
    fn every_namespace_field_separates_keys() {
        let base = ns();
        let t = toks(16, 3);
        let key = |n: &KeyNamespace| n.token_keys(&t, 16, &ExtraKeys::new())[0];
        let k0 = key(&base);
        let mut variants = Vec::new();
        variants.push(KeyNamespace {
            model_id: "other".into(),
            ..base.clone()
        });
        variants.push(KeyNamespace {
            dtype: DType::F16,
            ..base.clone()
        });
        let mut fp = base.layout_fingerprint;
        fp.0[0] ^= 1;
        variants.push(KeyNamespace {
            layout_fingerprint: fp,
            ..base.clone()
        });
        variants.push(KeyNamespace {
            tp_rank: 1,
            ..base.clone()
        });
        variants.push(KeyNamespace {
            weight_version: "2".into(),
            ..base.clone()
        });
        // Length prefixes: moving a byte between fields changes the key.
        variants.push(KeyNamespace {
            model_id: "meta-llama/Llama-3.1-8".into(),
            weight_version: "B1".into(),
            ..base.clone()
        });
        for v in &variants {
            assert_ne!(key(v), k0, "{v:?}");
        }
    }

    #[test]
    fn extra_keys_apply_to_their_blocks() {
        let ns = ns();
        let t = toks(48, 4);
        let plain = ns.token_keys(&t, 16, &ExtraKeys::new());
        let lora = ns.token_keys(&t, 16, &ExtraKeys::new().every_block(b"lora:7".to_vec()));
        assert!(plain.iter().zip(&lora).all(|(a, b)| a != b));
        let mm = ns.token_keys(&t, 16, &ExtraKeys::new().for_block(1, b"img:abc".to_vec()));
        assert_eq!(mm[0], plain[0]);
        assert_ne!(mm[1], plain[1]);
        assert_ne!(mm[2], plain[2]);
        // Two extras are not the same as their concatenation.
        let two = ns.token_keys(
            &t,
            16,
            &ExtraKeys::new().for_block(0, "ab").for_block(0, "c"),
        );
        let one = ns.token_keys(&t, 16, &ExtraKeys::new().for_block(0, "abc"));
        assert_ne!(two[0], one[0]);
    }

    #[test]
    fn external_hashes_are_chained_into_the_namespace() {
        let a = ns();
        let b = KeyNamespace {
            tp_rank: 3,
            ..a.clone()
        };
        let h: Vec<Vec<u8>> = vec![vec![1; 32], vec![2; 32], vec![3; 32]];
        let ka = a.external_keys(&h);
        let kb = b.external_keys(&h);
        assert_eq!(ka.len(), 3);
        assert!(ka.iter().zip(&kb).all(|(x, y)| x != y));
        // Chained: the same hash after a different prefix is another key.
        let h2: Vec<Vec<u8>> = vec![vec![9; 32], vec![2; 32], vec![3; 32]];
        let k2 = a.external_keys(&h2);
        assert_ne!(k2[1], ka[1]);
        // Arbitrary byte lengths (vLLM hashes may be ints or bytes).
        assert_eq!(a.external_keys(&[8u64.to_le_bytes()]).len(), 1);
        // Separate domain from token keys of the same bytes.
        let t: Vec<u32> = vec![0x01010101; 8];
        let tk = a.token_keys(&t, 8, &ExtraKeys::new());
        assert_ne!(tk[0], ka[0]);
    }
}
