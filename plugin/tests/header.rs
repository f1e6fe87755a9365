//! `include/kvmesh.h` must be what cbindgen generates from `src/ffi.rs`.

use std::path::Path;

#[test]
fn checked_in_header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(dir.join("src/ffi.rs"))
        .generate()
        .expect("cbindgen parses src/ffi.rs")
        .write(&mut generated);
    let path = dir.join("include/kvmesh.h");
    if std::env::var_os("KVMESH_REGENERATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/kvmesh.h");
    }
    let current = std::fs::read(&path).unwrap_or_default();
    assert!(
        current == generated,
        "plugin/include/kvmesh.h is stale (it differs from what src/ffi.rs generates).\n\
         Regenerate it with:\n  \
         KVMESH_REGENERATE_HEADER=1 cargo test -p kvmesh-plugin --test header"
    );
}
