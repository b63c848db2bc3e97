//! The Rust guests' own unit tests, run on the machine against the SDK's
//! host in memory (`raft_guest::testing`), as a guest author runs them with
//! `cargo test` in the guest's folder. Each guest is a workspace of its own,
//! so its tests run through a nested cargo, on a target directory of its
//! own (the outer one is locked by the build running this test).

use std::path::Path;
use std::process::Command;

/// Guests whose crates have unit tests.
const GUESTS_WITH_TESTS: &[&str] = &["counter"];

#[test]
fn the_guests_unit_tests_pass_on_a_host_in_memory() {
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("guests/");
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test>
    let target = exe.ancestors().nth(3).expect("inside the target directory").join("guest-native");
    for guest in GUESTS_WITH_TESTS {
        let manifest = guests.join(guest).join("Cargo.toml");
        let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        command.args(["test", "--release", "--manifest-path"]).arg(&manifest).arg("--target-dir").arg(&target);
        for (key, _) in std::env::vars() {
            let keep = key == "CARGO_HOME" || key == "CARGO_NET_OFFLINE";
            if (key.starts_with("CARGO_") && !keep) || key.starts_with("RUSTC") || key == "RUSTFLAGS" {
                command.env_remove(&key);
            }
        }
        let output = command.output().unwrap_or_else(|e| panic!("cannot run cargo for {guest}: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "`cargo test` in guests/{guest} failed:\n{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let passed: u64 = stdout
            .lines()
            .filter_map(|line| line.strip_prefix("test result: ok. ")?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(passed > 0, "guests/{guest} ran no test:\n{stdout}");
    }
}
