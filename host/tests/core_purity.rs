//! The consensus core (`host/src/raft`) stays pure: no I/O, no clock, no
//! threads, no async runtime, and none of the host's other modules. This test
//! reads its source and fails on any path outside the allowed set, so the rule
//! in DESIGN.md cannot erode one convenient import at a time.

use std::path::Path;

/// External crates the core may use: data types, errors and a seeded RNG.
const ALLOWED_CRATES: &[&str] =
    &["bytes", "thiserror", "rand_core", "rand_chacha", "std", "core", "super", "self", "crate"];

/// Parts of `std` that touch the outside world or wall-clock time.
const FORBIDDEN_STD: &[&str] =
    &["std::fs", "std::net", "std::io", "std::time", "std::thread", "std::process", "std::env", "std::sync", "std::os"];

/// Host modules the core must not reach into.
const FORBIDDEN_CRATE_PATHS: &[&str] = &["crate::storage", "crate::runtime", "crate::node", "crate::rpc", "crate::cli"];

#[test]
fn consensus_core_imports_no_io_and_no_other_host_module() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/raft");
    let mut problems = Vec::new();
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).expect("src/raft exists") {
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
