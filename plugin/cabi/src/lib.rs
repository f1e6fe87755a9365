//! `libkvmesh.so`: the kvmesh C ABI as a shared library.
//!
//! Its one exported symbol is `kvmesh_get_api`, defined in
//! [`kvmesh_plugin::ffi`] together with the function table it returns; the
//! header is `plugin/include/kvmesh.h`. Build with
//! `cargo build --release -p kvmesh-cabi` (gives `target/release/libkvmesh.so`).

pub use kvmesh_plugin::ffi::kvmesh_get_api;
