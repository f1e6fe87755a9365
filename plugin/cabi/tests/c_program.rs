//! Builds `libkvmesh.so`, compiles `plugin/tests/c/abi_test.c` with the
//! system C compiler (`cc`, or `$CC`) against the checked-in header, and runs
//! it: dlopen, function table, loopback push with byte checks, the peer
//! store (two store contexts; save, lookup, layer-by-layer load, byte
//! checks), misuse.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `target/<profile>` of this test binary (`target/<profile>/deps/<test>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// Builds the cdylib with the same profile and target directory (cargo
/// does not build a cdylib-only library for integration tests).
fn build_library() -> PathBuf {
    let dir = profile_dir();
    let target = dir.parent().expect("target dir");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-p", "kvmesh-cabi", "--lib", "--target-dir"])
        .arg(target);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let st = cmd.status().expect("run cargo build");
    assert!(st.success(), "cargo build -p kvmesh-cabi failed");
    let so = dir.join("libkvmesh.so");
    assert!(so.exists(), "{} was not built", so.display());
    so
}

#[test]
fn c_program_uses_the_abi_through_dlopen() {
    let so = build_library();
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("plugin/");
    let out = std::env::temp_dir().join(format!("kvmesh-abi-test-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-I"])
        .arg(plugin.join("include"))
        .arg(plugin.join("tests/c/abi_test.c"))
        .arg("-o")
        .arg(&out)
        .arg("-ldl")
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?}: {e}"));
    assert!(st.success(), "compiling tests/c/abi_test.c failed");
    let run = Command::new(&out).arg(&so).output().expect("run abi_test");
    let _ = std::fs::remove_file(&out);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "abi_test failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(stdout.contains("checks ok"), "{stdout}");
}

#[test]
fn the_library_exports_exactly_one_symbol() {
    let so = build_library();
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&so)
        .output()
        .expect("nm (binutils) is needed to list the exported symbols");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // Function and data symbols (T/D/B/R); weak and absolute ones are the
    // toolchain's, not ours.
    let exported: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().rev();
            let name = w.next()?;
            let kind = w.next()?;
            matches!(kind, "T" | "D" | "B" | "R").then_some(name)
        })
        .collect();
    assert_eq!(exported, ["kvmesh_get_api"], "exported symbols:\n{text}");
}
