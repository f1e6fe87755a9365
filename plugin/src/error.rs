//! Errors of the plugin crate.

use crate::layout::LayoutError;

/// Errors returned by plugin calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A layout, block list or layer range was refused (nothing moved).
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The transfer engine refused or failed the request.
    #[error(transparent)]
    Engine(#[from] kvmesh_gpu::Error),
    /// The peer store refused or failed the request.
    #[error(transparent)]
    Store(#[from] kvmesh_p2p_store::Error),
    /// A KV cache descriptor could not be decoded or is inconsistent.
    #[error("bad KV cache descriptor: {0}")]
    Descriptor(String),
    /// Any other invalid argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The object was already deregistered or closed.
    #[error("{0} was already deregistered")]
    Closed(&'static str),
}

/// Result alias for plugin calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
