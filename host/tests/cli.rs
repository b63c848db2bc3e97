//! The `raft-host` binary as a user runs it.

use std::process::Command;

fn raft_host(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_raft-host")).args(args).env("RUST_LOG", "warn").output().expect("binary runs")
}

#[test]
fn validate_accepts_the_built_in_guest_and_refuses_other_files_with_one_clear_line() {
    let ok = raft_host(&["validate"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("fits raft:host/state-machine"));

    let dir = tempfile::tempdir().expect("tempdir");
    let not_wasm = dir.path().join("notes.txt");
    std::fs::write(&not_wasm, "hello").expect("write");
    let refused = raft_host(&["validate", not_wasm.to_str().expect("utf-8 path")]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("not a WebAssembly component"), "{stderr}");

    let missing = raft_host(&["validate", "/no/such/file.wasm"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/file.wasm"));
}

#[test]
fn demo_elects_survives_a_leader_crash_and_converges() {
    let out = raft_host(&["demo", "--writes", "200", "--seed", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("crashed the leader"), "{stdout}");
    assert!(stdout.contains("every member applied the same entries"), "{stdout}");
    let bad = raft_host(&["demo", "--nodes", "0"]);
    assert_eq!(bad.status.code(), Some(1));
}
