//! kvmesh: moves LLM KV-cache pages from GPU memory to peers and back, with no
//! central master. This root crate re-exports the workspace crates and owns the
//! cross-crate tests and the examples.

pub use kvmesh_ep as ep;
pub use kvmesh_gpu as gpu;
pub use kvmesh_p2p_store as p2p_store;
pub use kvmesh_plugin as plugin;
