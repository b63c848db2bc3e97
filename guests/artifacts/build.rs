//! Builds every guest under `guests/` (each its own crate and workspace) for
//! `wasm32-wasip2`, in release mode, into a target directory of its own
//! next to the outer one (a nested cargo on the outer target directory would
//! wait forever on its lock), and copies each component to OUT_DIR.
//!
//! This is the pattern wasmtime uses for its test programs: guests build as
//! part of the normal build and test flow, with no manual step.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Guests to build: (crate directory under guests/, artifact file stem).
const GUESTS: &[(&str, &str)] = &[
    ("kv", "kv_guest"),
    ("counter", "counter_guest"),
    ("counter-v2", "counter_v2_guest"),
    ("bank", "bank_guest"),
    ("hostile", "hostile_guest"),
    ("other-world", "other_world_guest"),
    ("extra-import", "extra_import_guest"),
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guests_dir = manifest_dir.parent().expect("guests/").to_path_buf();
    let root = guests_dir.parent().expect("repository root").to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    // OUT_DIR is <target>/<profile>/build/<crate>-<hash>/out.
    let outer_target = out_dir.ancestors().nth(4).expect("OUT_DIR is inside the target directory").to_path_buf();
    let guest_target = outer_target.join("wasm-guests");

    println!("cargo:rerun-if-changed={}", root.join("wit").display());
    println!("cargo:rerun-if-changed={}", root.join("guest-sdk").display());
    for (dir, stem) in GUESTS {
        let crate_dir = guests_dir.join(dir);
        println!("cargo:rerun-if-changed={}", crate_dir.display());
        build_guest(&crate_dir, &guest_target);
        let built = guest_target.join("wasm32-wasip2/release").join(format!("{stem}.wasm"));
        let dest = out_dir.join(format!("{stem}.wasm"));
        std::fs::copy(&built, &dest).unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), dest.display()));
    }
}

fn build_guest(crate_dir: &Path, target_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--target=wasm32-wasip2")
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(crate_dir);
    // The outer build's settings (its target, flags, jobserver) must not leak
    // into the guest build.
    for (key, _) in std::env::vars() {
        let keep = key == "CARGO_HOME" || key == "CARGO_NET_OFFLINE" || key == "CARGO_REGISTRIES_CRATES_IO_PROTOCOL";
        if (key.starts_with("CARGO_") && !keep)
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOCFLAGS"
        {
            command.env_remove(&key);
        }
    }
    let status = command.status().unwrap_or_else(|e| panic!("cannot run cargo for {}: {e}", crate_dir.display()));
    assert!(
        status.success(),
        "building the guest in {} for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`)",
        crate_dir.display()
    );
}
