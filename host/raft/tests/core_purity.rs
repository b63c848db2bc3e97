//! The consensus core (`host/raft`, the crate `raft-core`) stays pure: no I/O,
//! no clock, no threads, no async runtime. Its manifest names no crate that
//! could do any of that, so Cargo refuses such an import; this test also
//! reads the source and fails on the parts of `std` that could, so the rule
//! cannot erode one convenient import at a time.

use std::path::Path;

/// External crates the core may use: data types, errors and a seeded RNG.
const ALLOWED_CRATES: &[&str] =
    &["bytes", "thiserror", "rand_core", "rand_chacha", "std", "core", "super", "self", "crate"];

/// Parts of `std` that touch the outside world or wall-clock time.
const FORBIDDEN_STD: &[&str] =
    &["std::fs", "std::net", "std::io", "std::time", "std::thread", "std::process", "std::env", "std::sync", "std::os"];

/// The host's modules: the core cannot reach them (they are in another
/// crate, which depends on this one), and a path naming one means it tried.
const FORBIDDEN_CRATE_PATHS: &[&str] =
    &["raft_host", "crate::storage", "crate::runtime", "crate::node", "crate::wire", "crate::server", "crate::cli"];

#[test]
fn consensus_core_imports_no_io_and_no_other_host_module() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("src exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        let source = std::fs::read_to_string(&path).expect("readable source");
        for (number, line) in source.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("").trim();
            let place = format!("{}:{}", path.display(), number + 1);
            for forbidden in FORBIDDEN_STD.iter().chain(FORBIDDEN_CRATE_PATHS) {
                if code.contains(forbidden) {
                    problems.push(format!("{place}: uses {forbidden}"));
                }
            }
            if let Some(rest) = code.strip_prefix("use ").or_else(|| code.strip_prefix("pub use ")) {
                let root = rest.trim_start_matches("::").split("::").next().unwrap_or("").trim_end_matches(';');
                if !ALLOWED_CRATES.contains(&root) {
                    problems.push(format!("{place}: imports crate `{root}`"));
                }
            }
            for word in ["tokio", "fjall", "wasmtime", "tonic", "tracing"] {
                if code.contains(&format!("{word}::")) {
                    problems.push(format!("{place}: refers to {word}"));
                }
            }
        }
    }
    assert!(files >= 5, "expected the core's source files in {}", dir.display());
    assert!(problems.is_empty(), "the consensus core must stay pure:\n{}", problems.join("\n"));
}
