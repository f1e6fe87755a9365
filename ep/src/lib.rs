//! kvmesh-ep: MoE expert-parallel dispatch and combine on the kvmesh
//! transfer engine.
//!
//! An [`EpGroup`] is N ranks (processes on one host or several), each with
//! one [`kvmesh_gpu::Engine`]. [`EpGroup::dispatch`] sends every token's
//! hidden state once to each rank that holds at least one of its top-k
//! experts (one-sided writes into symmetric receive buffers, then a doorbell
//! per peer carrying the row count) and returns the received
//! rows with their grouping by local expert; [`EpGroup::combine`] brings the
//! expert outputs back and sums them with the gate weights in `f32`, in a
//! fixed order, so results are reproducible bit for bit.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use kvmesh_ep::{rendezvous, EpBuffers, EpConfig, EpGroup, ExpertOut, Rows};
//! use kvmesh_gpu::{Engine, EngineConfig};
//! use std::time::Duration;
//! let (rank, world) = (0, 2);
//! let engine = Engine::new(EngineConfig::default())?;
//! let cfg = EpConfig::new(8, 256, 2, 64); // 8 experts, hidden 256, top-2, ≤64 tokens
//! let bufs = EpBuffers::alloc(&engine, &cfg, rank, world)?;
//! // Every rank joins the rendezvous that rank 0 (or a launcher) serves.
//! let joined = rendezvous::join("127.0.0.1:29500", rank, world, &cfg.fingerprint(),
//!                               &bufs.desc(), Duration::from_secs(30))?;
//! let mut group = EpGroup::new(bufs, &joined.descs)?;
//! let x = vec![half::bf16::ZERO; 64 * 256];
//! let (idx, w) = (vec![0i32, 5].repeat(64), vec![0.5f32; 128]);
//! let recv = group.dispatch(Rows::from_bf16(&x, 256)?, &idx, &w)?;
//! let expert_in = recv.permute(); // [entries, hidden], grouped by local expert
//! let handle = recv.into_handle();
//! let y = group.combine(ExpertOut::PerExpert(kvmesh_ep::Rows::new(&expert_in, 256,
//!                       kvmesh_ep::DType::Bf16)?), &handle)?;
//! assert_eq!(y.rows, 64);
//! # Ok(()) }
//! ```
//!
//! Host path only for now: `shm` between processes of a host, `tcp`
//! everywhere. The GPU path (NVRTC permute kernels, cuda-ipc, RDMA) fits
//! under the same API once the engine's CUDA transports exist; a GPU
//! [`EpConfig::memory`] is refused with a clear error until then.
//!
//! Group formation uses a rendezvous the caller already has: a list of
//! addresses ([`rendezvous`]). Forming a group through the p2p-store swarm is
//! not available yet.

pub mod alltoallv;
mod ctl;
pub mod dtype;
mod error;
mod group;
pub mod layout;
pub mod rendezvous;
mod rows;
mod wait;
pub mod workload;

pub use dtype::{DType, WireFormat};
pub use error::{Error, Result};
pub use group::{Dispatched, EpBuffers, EpConfig, EpGroup, Exchange, Handle, OpTimings};
pub use rows::{ExpertOut, Rows, SendBuf, Tensor};
