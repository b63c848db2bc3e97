//! Hot deploys on a cluster of real processes: a new version under
//! continuous writes switches every replica at one log index, a rollback
//! the same way, a member that was down catches up to the right version, a
//! restart loads from the compiled cache, bad modules are refused before
//! anything is committed, and state machines side by side keep apart.

use raft_host::client::{Consistency, outcome_of};
use raft_host::wire::client_pb::StatusResponse;
use raft_host_e2e::{Cluster, Writers, binary, put, run};
use std::time::Duration;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(240);
const SETTLE: Duration = Duration::from_secs(30);

fn add_one() -> Vec<u8> {
    br#"{"op":"add","by":1}"#.to_vec()
}

/// The counter value of a reply and the version that gave it (v1 answers a
/// bare number, v2 `{"value":N,"version":2}`).
fn counter_reply(bytes: &[u8]) -> (i64, u32) {
    let value: serde_json::Value = serde_json::from_slice(bytes).expect("JSON answer");
    match value {
        serde_json::Value::Number(n) => (n.as_i64().expect("an integer"), 1),
        object => {
            let version = object["version"].as_u64().expect("a version") as u32;
            (object["value"].as_i64().expect("a value"), version)
        }
    }
}

fn module_of<'a>(status: &'a StatusResponse, name: &str) -> &'a str {
    let machine = status.state_machines.iter().find(|m| m.name == name);
    &machine.unwrap_or_else(|| panic!("member {} runs no {name}", status.id)).module_hash
}

#[test]
fn deploy_and_rollback_under_writes_switch_every_replica_at_one_index() {
    run(LIMIT, async {
        let mut cluster = Cluster::start(3, "e2e-deploy");
        let leader = cluster.leader(SETTLE).await;
        let v1 = module_of(&cluster.status(leader).await.expect("status"), "counter").to_string();

        // Member 3 (or another follower) is down during the deploy.
        let away = (1..=3).rev().find(|&id| id != leader).expect("a follower");
        cluster.kill(away);
        let live = cluster.addresses();
        let writers = Writers::start(&cluster, live.clone(), 4, "counter", |_, _| add_one());
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut client = cluster.client_at(live);
        let mut phases = Vec::new();
        let deployed = client
            .deploy("counter", raft_guests::COUNTER_V2, true, |p| phases.push(p.phase.clone()))
            .await
            .expect("deploy v2");
        assert_eq!(deployed.phase, "activated");
        for phase in ["received", "validated", "replicating", "compiling"] {
            assert!(phases.iter().any(|p| p == phase), "no {phase:?} progress in {phases:?}");
        }
        let v2 = deployed.module_hash.clone();
        let switched = deployed.index;
        assert!(deployed.detail.contains(&away.to_string()), "the member that is down is named: {}", deployed.detail);

        // The member that was away comes back and, from the log, runs v2
        // (writes go on, so digests are compared once they stop).
        cluster.spawn(away);
        let deadline = std::time::Instant::now() + SETTLE;
        loop {
            let status = cluster.status(away).await;
            if let Some(status) = status.filter(|s| s.applied_index > switched) {
                assert_eq!(module_of(&status, "counter"), v2, "the returning member runs v2 past the switch");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "member {away} did not catch up\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Roll back to v1, by hash, while the writers keep going.
        let rolled = client.activate("counter", &v1).await.expect("rollback");
        assert_eq!(rolled.previous_hash, v2);
        let rolled_back = rolled.index;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (answers, failures) = writers.finish().await;
        assert!(failures.is_empty(), "failed writes: {failures:?}");

        // Every write before the switch was answered by v1, every write
        // between the switch and the rollback by v2, every later one by v1;
        // and the counts say no write was lost or applied twice.
        let mut previous: Option<i64> = None;
        let (mut by_v1_before, mut by_v2, mut by_v1_after) = (0, 0, 0);
        for (index, bytes) in &answers {
            let (value, version) = counter_reply(bytes);
            let expected = if *index < switched || *index > rolled_back { 1 } else { 2 };
            assert_eq!(version, expected, "write at index {index} answered by v{version}");
            match (*index < switched, *index > rolled_back) {
                (true, _) => by_v1_before += 1,
                (_, true) => by_v1_after += 1,
                _ => by_v2 += 1,
            }
            if let Some(previous) = previous {
                assert_eq!(value, previous + 1, "the count at index {index} skips or repeats");
            }
            previous = Some(value);
        }
        eprintln!("writes answered: {by_v1_before} by v1, {by_v2} by v2, {by_v1_after} by v1 again");
        assert!(by_v1_before > 0 && by_v2 > 0 && by_v1_after > 0, "writes ran through both switches");

        let statuses = cluster.agreed(SETTLE).await;
        assert!(statuses.iter().all(|s| module_of(s, "counter") == v1), "every member is back on v1");
        let mut check = cluster.client();
        let read = check.read("counter", br#"{"op":"get"}"#.to_vec(), Consistency::Linearizable).await.expect("read");
        assert_eq!(counter_reply(&outcome_of(read.outcome).expect("get")), (previous.expect("writes"), 1));

        // Back to v2 (already compiled everywhere), then a restart: the
        // restarted member loads both its modules from the compiled cache.
        client.activate("counter", &v2).await.expect("activate v2 again");
        let current_leader = cluster.leader(SETTLE).await;
        let restarted = (1..=3).find(|&id| id != current_leader).expect("a follower");
        cluster.kill(restarted);
        cluster.spawn(restarted);
        let statuses = cluster.agreed(SETTLE).await;
        let status = statuses.iter().find(|s| s.id == restarted).expect("restarted member");
        assert_eq!(module_of(status, "counter"), v2);
        assert_eq!(status.modules_compiled, 0, "a restart compiles nothing");
        assert!(status.modules_loaded_from_cache >= 2, "kv and counter v2 come from the cache: {status:?}");
    });
}

#[test]
fn bad_modules_are_refused_before_anything_is_committed() {
    run(LIMIT, async {
        let cluster = Cluster::start_with(3, "e2e-deploy-bad", &["--max-module-bytes", "1048576"]);
        let leader = cluster.leader(SETTLE).await;
        let mut client = cluster.client();
        client.write("kv", put("before", "1")).await.expect("write");
        let before = cluster.agreed(SETTLE).await;

        let core_module = b"\0asm\x01\0\0\0".to_vec();
        let truncated = raft_guests::KV[..raft_guests::KV.len() / 2].to_vec();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("random bytes", b"this is not WebAssembly at all".to_vec(), "not a WebAssembly component"),
            ("a core module", core_module, "core WebAssembly module"),
            ("another world", raft_guests::OTHER_WORLD.to_vec(), "does not fit the raft:host/state-machine world"),
            ("an import we lack", raft_guests::EXTRA_IMPORT.to_vec(), "imports what raft-host does not provide"),
            ("a truncated component", truncated, "failed to compile"),
            ("too large", vec![0u8; 1_500_000], "above the limit"),
        ];
        for (what, bytes, reason) in cases {
            let error = client.deploy("kv", &bytes, true, |_| {}).await.expect_err(what);
            assert_eq!(error.code(), Some(Code::InvalidArgument), "{what}: {error}");
            assert!(error.to_string().contains(reason), "{what}: {error:?} does not say {reason:?}");
        }
        let error = client.deploy("bad name!", raft_guests::KV, true, |_| {}).await.expect_err("bad name");
        assert_eq!(error.code(), Some(Code::InvalidArgument), "{error}");
        let error = client.activate("kv", &"ab".repeat(32)).await.expect_err("unknown hash");
        assert!(error.to_string().contains("deploy it first"), "{error}");

        // Nothing reached the log, and the cluster serves as before.
        let after = cluster.agreed(SETTLE).await;
        assert_eq!(after[0].last_log_index, before[0].last_log_index, "nothing was committed");
        let modules = client.modules().await.expect("modules");
        assert!(modules.versions.iter().all(|v| v.built_in), "only the built-ins: {:?}", modules.versions);
        client.write("kv", put("after", "2")).await.expect("write after the refusals");
        assert_eq!(cluster.leader(SETTLE).await, leader, "leadership never moved");
    });
}

#[test]
fn state_machines_side_by_side_a_failed_migrate_and_the_cli() {
    run(LIMIT, async {
        let cluster = Cluster::start(3, "e2e-deploy-cli");
        cluster.leader(SETTLE).await;
        let mut client = cluster.client();
        let address = cluster.addresses().join(",");
        let cli = |args: &[&str]| {
            let output = std::process::Command::new(binary())
                .args(args)
                .envs(cluster.cli_env())
                .output()
                .expect("raft-host runs");
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).to_string(),
                String::from_utf8_lossy(&output.stderr).to_string(),
            )
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let kv_path = dir.path().join("kv.wasm");
        let v2_path = dir.path().join("counter-v2.wasm");
        std::fs::write(&kv_path, raft_guests::KV).expect("write module");
        std::fs::write(&v2_path, raft_guests::COUNTER_V2).expect("write module");

        // A second kv, deployed under a new name with the CLI, keeps its own keys.
        let (ok, out, err) =
            cli(&["deploy", "--addr", &address, "--name", "inventory", kv_path.to_str().expect("path")]);
        assert!(ok, "deploy failed: {err}");
        assert!(out.contains("active at index"), "{out}");
        client.write("kv", put("a", "from-kv")).await.expect("write kv");
        client.write("inventory", put("a", "from-inventory")).await.expect("write inventory");
        client.write("inventory", put("only-here", "x")).await.expect("write inventory");
        for (name, expected) in [("kv", "from-kv"), ("inventory", "from-inventory")] {
            let read = client.read(name, raft_host_e2e::get("a"), Consistency::Linearizable).await.expect("read");
            let value: serde_json::Value =
                serde_json::from_slice(&outcome_of(read.outcome).expect("get")).expect("json");
            assert_eq!(value["value"], expected, "{name}");
        }
        let range = br#"{"op":"range","start":"","end":null,"limit":100}"#.to_vec();
        let read = client.read("kv", range, Consistency::Linearizable).await.expect("range");
        let items: serde_json::Value = serde_json::from_slice(&outcome_of(read.outcome).expect("range")).expect("json");
        assert_eq!(items["items"].as_array().map(Vec::len), Some(1), "kv sees only its own key: {items}");

        // A migrate hook that refuses: the activation fails on every replica
        // and v1 keeps serving.
        let answer = client.write("counter", br#"{"op":"add","by":-5}"#.to_vec()).await.expect("write");
        assert_eq!(outcome_of(answer.outcome).expect("add"), b"-5");
        let error = client.deploy("counter", raft_guests::COUNTER_V2, true, |_| {}).await.expect_err("migrate refuses");
        assert_eq!(error.code(), Some(Code::FailedPrecondition), "{error}");
        assert!(error.to_string().contains("negative count"), "{error}");
        let answer = client.write("counter", add_one()).await.expect("write");
        assert_eq!(outcome_of(answer.outcome).expect("add"), b"-4", "v1 still answers");
        cluster.agreed(SETTLE).await;

        // Stage without activating, list, then activate by a hash prefix.
        client.write("counter", br#"{"op":"add","by":10}"#.to_vec()).await.expect("write");
        let (ok, out, err) =
            cli(&["deploy", "--addr", &address, "--name", "counter", "--no-activate", v2_path.to_str().expect("path")]);
        assert!(ok && out.contains("stored and compiled"), "{out}{err}");
        let (ok, out, err) = cli(&["modules", "--addr", &address, "--json"]);
        assert!(ok, "{err}");
        let listed: serde_json::Value = serde_json::from_str(&out).expect("modules --json");
        let versions = listed["versions"].as_array().expect("versions");
        let staged = versions
            .iter()
            .find(|v| v["state_machine"] == "counter" && v["built_in"] == false)
            .expect("counter v2 is listed");
        assert_eq!(staged["active"], false);
        assert!(staged["deploy_index"].as_u64().expect("index") > 0);
        assert!(versions.iter().any(|v| v["state_machine"] == "inventory" && v["active"] == true));
        let hash = staged["module_hash"].as_str().expect("hash");
        let (ok, out, err) = cli(&["activate", "--addr", &address, "--name", "counter", "--hash", &hash[..12]]);
        assert!(ok, "activate failed: {err}");
        assert!(out.contains(hash), "{out}");
        let answer = client.write("counter", add_one()).await.expect("write");
        assert_eq!(counter_reply(&outcome_of(answer.outcome).expect("add")), (7, 2));
        let (ok, _, err) = cli(&["activate", "--addr", &address, "--name", "counter", "--hash", "0000"]);
        assert!(!ok && err.contains("at least 8 hex digits"), "{err}");
        cluster.agreed(SETTLE).await;

        // The deploy benchmark runs against a live cluster and reports figures.
        let (ok, out, err) = cli(&[
            "bench-deploy",
            "--addr",
            &address,
            "--sizes-mb",
            "1",
            "--clients",
            "2",
            "--steady-secs",
            "1",
            "--json",
        ]);
        assert!(ok, "bench-deploy failed: {err}");
        let figures: serde_json::Value = serde_json::from_str(&out).expect("bench-deploy --json");
        assert_eq!(figures["errors"], 0, "{figures}");
        let deploy = &figures["deploys"][0];
        assert!(deploy["module_bytes"].as_u64().expect("bytes") >= 1 << 20, "{figures}");
        assert!(deploy["active_on_all_members_ms"].as_u64().is_some(), "{figures}");
        assert!(figures["steady"]["p99_us"].as_u64().is_some(), "{figures}");
        cluster.agreed(SETTLE).await;
    });
}
