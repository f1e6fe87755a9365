//! RDMA transport: ibverbs RC queue pairs with one-sided READ/WRITE,
//! GPUDirect registration (dma-buf or nvidia-peermem), and notifications by
//! WRITE_WITH_IMM.
//!
//! Layers, bottom up (only `verbs` contains `unsafe` verbs calls):
//!
//! ```text
//!  transport   RdmaTransport: NICs, regions, peers; sequences the calls    (executor)
//!  ───────────────────────────────────────────────────────────────────────────────
//!  plan        ops -> slices -> work requests over QPs/NICs within budgets  (pure)
//!  completion  wr_id -> slice -> batch; error/flush rules; notify trigger   (pure)
//!  notify      WRITE_WITH_IMM sequence, ring slots, receive depth, credits  (pure)
//!  qp          RESET->INIT->RTR->RTS attributes and state machine           (pure)
//!  endpoint    descriptors exchanged with peers; NIC pairing; reconnects    (pure)
//!  device      NIC/port/GID data and GID choice; discovery entry point      (pure + probe)
//!  status      ibv_wc_status -> engine ErrorKind                            (pure)
//!  ───────────────────────────────────────────────────────────────────────────────
//!  verbs       RAII over ibverbs-sys: Context, PD, CQ, QP, MR; post/poll    (FFI)
//! ```
//!
//! This module does not depend on the engine's internals (only on the public
//! [`crate::ErrorKind`]): the engine drives it through [`RdmaTransport`] and
//! the serialisable descriptors. None of it has run on RDMA hardware yet;
//! see `gpu/RDMA.md`.

pub mod completion;
pub mod device;
pub mod endpoint;
mod error;
pub mod notify;
pub mod plan;
pub mod qp;
pub mod status;
pub mod transport;
pub mod verbs;

pub use completion::{BatchOutcome, BatchTag, OpOutcome};
pub use device::{discover, GidPolicy, LinkLayer, LocalPath, Mtu, NicInfo};
pub use endpoint::{ConnectInfo, QpEndpoint, RdmaPeerDesc, ReconnectDecision};
pub use error::{RdmaError, Result};
pub use plan::{RdmaOp, RdmaOpKind};
pub use status::{wc_status_kind, WcContext};
pub use transport::{
    rdma_op, GpuMemory, GpuRegPath, RdmaConfig, RdmaEvent, RdmaRegion, RdmaRegionDesc,
    RdmaTransport,
};
