//! libp2p peer store for KV pages (no master).
//!
//! This crate's core is I/O-free protocol logic: plain state machines fed
//! with the current time (`std::time::Instant`, always an argument, never
//! read from the clock here) and drained for what to do next. The libp2p
//! event loop and the engine data path sit on top and only move bytes and
//! messages.
//!
//! ```text
//!   gossip announce ─► membership::Membership ─► candidates() ─► placement::targets()
//!                            │ Dead/Left/Restarted                      (who holds a key)
//!                            ▼
//!                      repair::RepairContext::plan(index objects) ─► copies to make
//!
//!   RPC reserve/commit/lease/release ─► holder::Holder ─► HolderEvent (spill, removed, ...)
//!                                         └ index::Index ─ pool::Pool (offsets in the DRAM region)
//!   HolderEvent::Spill / promote ─► ssd::SsdTier (the only module here doing file I/O)
//! ```
//!
//! Modules:
//! * [`key`]: object keys (BLAKE3) and payload checksums (XXH3-128).
//! * [`peer`]: opaque, bounded peer ids.
//! * [`placement`]: weighted rendezvous hashing.
//! * [`membership`]: announces, liveness, incarnations.
//! * [`pool`]: offset allocator over the registered DRAM region.
//! * [`index`]: local objects, LRU, watermark eviction, TTL, tiers.
//! * [`holder`]: reservations, commits, leases, pins: the holder protocol.
//! * [`ssd`]: the SSD tier (files in a directory).
//! * [`repair`]: who re-replicates what after a failure.
//! * [`error`]: the crate's error type.

pub mod error;
pub mod holder;
pub mod index;
pub mod key;
pub mod membership;
pub mod metrics;
pub mod network;
pub mod peer;
pub mod placement;
pub mod pool;
pub mod repair;
pub mod rpc;
pub mod shm_index;
pub mod ssd;
pub mod store;

pub use error::{Error, ErrorKind, Result};
pub use holder::{Holder, HolderConfig, HolderEvent, Lease, LeaseId, Reservation, ReservationId};
pub use index::{Index, IndexConfig, ObjectMeta, ObjectOptions, Pin, Tier};
pub use key::{Checksum, ObjectKey};
pub use membership::{Announce, Member, Membership, MembershipConfig, MembershipEvent};
pub use peer::PeerId;
pub use placement::Candidate;
pub use pool::{Allocation, Pool, PoolConfig};
pub use repair::{RepairContext, RepairDecision, RepairPlan, RepairTask, ReplicaSet};
pub use ssd::{SsdConfig, SsdTier};
pub use store::{
    multiaddr_ip, multiaddr_text, peer_id_text, Leased, PeerInfo, PutOptions, Store, StoreConfig,
    StoreStats,
};
