//! The container files: linted and checked on every run (`deploy/lint.sh`:
//! hadolint, yamllint, and what the files must say); built and run as a
//! three-member compose cluster when `RAFT_CONTAINER_TEST=1` asks for it
//! (`deploy/container-test.sh`; it needs docker or podman that can run
//! containers, which not every machine has).

use std::path::Path;
use std::process::Command;

fn repository() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root")
}

/// The target directory this test runs from (`target/<profile>/deps/<test>`).
fn target_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors().nth(3).expect("inside the target directory").to_path_buf()
}

#[test]
fn the_dockerfile_compose_file_and_kubernetes_manifest_lint_clean_and_say_what_readme_promises() {
    let output = Command::new(repository().join("deploy/lint.sh"))
        .env("CARGO_TARGET_DIR", target_dir())
        .output()
        .expect("deploy/lint.sh runs");
    assert!(
        output.status.success(),
        "deploy/lint.sh failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_image_builds_and_a_compose_cluster_serves_when_asked() {
    if std::env::var_os("RAFT_CONTAINER_TEST").is_none() {
        eprintln!("skipped: set RAFT_CONTAINER_TEST=1 to build the image and run the compose cluster");
        return;
    }
    let status = Command::new(repository().join("deploy/container-test.sh")).status().expect("runs");
    assert!(status.success(), "deploy/container-test.sh failed");
}
