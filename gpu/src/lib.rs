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
//! Transports: `tcp` everywhere, `shm` between processes of one host
//! (engine-allocated memory is memfd-backed and mapped by the initiator).

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
pub mod pattern;
pub mod plan;
mod rawio;
#[cfg(feature = "rdma")]
pub mod rdma;
mod shm;
mod tcp;
mod wire;

pub mod size;

pub use batch::{Batch, BatchId, BatchOptions, BatchStatus, Op, OpKind, OpStatus, RemoteRegion};
pub use desc::{local_host_id, machine_id, EngineId, PeerDesc, DESC_VERSION};
pub use engine::{Engine, EngineConfig, Notification, PeerId, RpcHandler, TransportKind};
pub use error::{Error, ErrorKind, Result};
pub use memory::{GpuRegionDesc, MemoryKind, Region, RegionDesc, RegionId};
pub use tcp::MAX_SLICE_BYTES;
pub use wire::{MAX_CALL_BYTES, MAX_NOTIFY_BYTES};
