//! kvmesh-gpu: the kvmesh transfer engine.
//!
//! One [`Engine`] per process owns registered memory ([`Region`]) and the
//! transports, and executes batches of one-sided READ/WRITE operations
//! ([`Op`]) against regions of peer engines, described by [`RegionDesc`].
//!
//! ```no_run
//! # fn main() -> Result<(), kvmesh_gpu::Error> {
//! use kvmesh_gpu::{Engine, EngineConfig, MemoryKind, Op, BatchOptions};
//! use std::time::Duration;
//! let target = Engine::new(EngineConfig::default())?;
//! let remote_buf = target.alloc(1 << 20, MemoryKind::Host)?;
//! let desc = remote_buf.desc(); // sent to the initiator out of band
//!
//! let engine = Engine::new(EngineConfig::default())?;
//! let local = engine.alloc(1 << 20, MemoryKind::Host)?;
//! let remote = engine.import(&desc);
//! let batch = engine.submit(&[Op::write(local.id(), 0, remote, 0, 4096)], BatchOptions::default())?;
//! let status = batch.wait_blocking(Duration::from_secs(5)).expect("batch deadline");
//! assert!(status.result.is_ok());
//! # Ok(()) }
//! ```
//!
//! Transports, chosen per peer pair and region, fastest first (see
//! [`TransportKind::Auto`]):
//!
//! - `cuda-ipc`: GPU regions of an engine on the same machine, copied
//!   device to device through CUDA IPC mappings;
//! - `shm`: same host, engine-allocated host memory (memfd-backed, mapped
//!   by the initiator and copied one-sidedly);
//! - `rdma` (cargo feature `rdma`): ibverbs RC queue pairs, one-sided READ
//!   and WRITE against the peer's registered regions, host memory and GPU
//!   memory through nvidia-peermem; used when both engines run RDMA and the
//!   region carries rkeys. It has not run on RDMA hardware yet
//!   (`gpu/RDMA.md`);
//! - `tcp`: everywhere; also the control channel of every peer pair (RPC
//!   calls, notifications not carried by the data path, RDMA connection
//!   set-up and notification credits).

mod batch;
pub mod cuda;
mod deadline;
mod desc;
mod engine;
mod error;
#[cfg(feature = "gdrcopy")]
pub mod gdr;
mod handshake;
mod memory;
mod ntcopy;
pub mod pattern;
pub mod plan;
mod rawio;
#[cfg(feature = "rdma")]
pub mod rdma;
#[cfg(feature = "rdma")]
mod rdma_link;
pub mod rdma_wire;
mod route;
mod shm;
mod tcp;
mod tcp_direct;
mod wire;

pub mod size;

pub use batch::{Batch, BatchId, BatchOptions, BatchStatus, Op, OpKind, OpStatus, RemoteRegion};
pub use desc::{local_host_id, machine_id, EngineId, PeerDesc, DESC_VERSION};
pub use engine::{
    BulkAnswer, BulkDest, Engine, EngineConfig, Notification, PeerId, RdmaSettings, Reply,
    RpcHandler, TransportKind,
};
pub use error::{Error, ErrorKind, Result};
pub use memory::{GpuRegionDesc, MemoryKind, Region, RegionDesc, RegionId};
pub use rdma_wire::{RdmaPeerDesc, RdmaRegionDesc};
pub use shm::ShmView;
pub use tcp::MAX_SLICE_BYTES;
pub use wire::{MAX_BULK_BYTES, MAX_CALL_BYTES, MAX_NOTIFY_BYTES};
