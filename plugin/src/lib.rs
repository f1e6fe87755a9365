//! kvmesh-plugin: the KV-cache plugin behind `libkvmesh.so`.
//!
//! ```text
//!   layout  KvLayout: where every byte of every block lives; pure plans
//!   keys    BlockKey: chained prefix hashes in a KeyNamespace
//!   cache   KvCache: a layout over engine-registered memory; KvCacheDesc
//!   push    P/D push of blocks into a remote KvCache, with a notification
//!   prefix  PrefixStore: lookup (leased), save and load of blocks in the peer store
//!   node    StoreNode: a store peer with its own runtime (C ABI, blocking programs)
//!   ffi     the C ABI: one exported symbol returning a function table
//! ```
//!
//! Host-memory caches work today; GPU caches go through the engine's
//! `MemoryKind::Gpu` with no change to this API (the engine answers a clear
//! "no CUDA support" error until it has one).

pub mod cache;
mod error;
pub mod ffi;
mod gpu_staging;
pub mod keys;
pub mod layout;
pub mod node;
pub mod prefix;
pub mod push;

pub use cache::{KvCache, KvCacheDesc, RemoteKvCache};
pub use error::{Error, Result};
pub use keys::{BlockKey, ExtraKeys, KeyNamespace};
pub use layout::{
    plan_copy, Axis, BlockShape, CopySegment, DType, HeadOrder, KvKind, KvLayout, KvLayoutSpec,
    LayerPlacement, LayoutError, LayoutFingerprint, Packed, Place, Strides,
};
pub use node::StoreNode;
pub use prefix::{
    BlockErrorKind, Lookup, PrefixStats, PrefixStore, PrefixStoreConfig, StoreBlockFailure,
    StoreOp, StoreOpKind, StoreOpStatus,
};
pub use push::{BlockFailure, Push, PushInbox, PushNotice, PushStatus, ReceivedPush};
