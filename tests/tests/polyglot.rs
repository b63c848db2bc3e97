//! Guests written in Python, JavaScript, C and C++, built by their own
//! toolchains (componentize-py, componentize-qjs, clang with wasi-libc and
//! libc++) with no manual step, deployed through
//! the ordinary deploy path into a 3-member cluster of real processes.

use raft_host::client::{ClusterClient, Consistency, outcome_of};
use raft_host::wire::client_pb::StatusResponse;
use raft_host_e2e::{Cluster, polyglot_guest, run};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const LIMIT: Duration = Duration::from_secs(600);
const SETTLE: Duration = Duration::from_secs(60);

fn digest_of<'a>(status: &'a StatusResponse, name: &str) -> &'a str {
    let machine = status.state_machines.iter().find(|m| m.name == name);
    &machine.unwrap_or_else(|| panic!("member {} runs no {name}", status.id)).state_digest
}

async fn write(client: &mut ClusterClient, name: &str, command: &str) -> Result<String, String> {
    let response = client.write(name, command.as_bytes().to_vec()).await.expect("write reaches the cluster");
    outcome_of(response.outcome).map(|bytes| String::from_utf8(bytes).expect("UTF-8 answer"))
}

async fn read(client: &mut ClusterClient, name: &str, query: &str) -> Result<String, String> {
    let response = client
        .read(name, query.as_bytes().to_vec(), Consistency::Linearizable)
        .await
        .expect("read reaches the cluster");
    outcome_of(response.outcome).map(|bytes| String::from_utf8(bytes).expect("UTF-8 answer"))
}

#[test]
fn a_python_kv_answers_like_the_rust_kv_and_sees_only_the_entry() {
    let module = polyglot_guest("python-kv", "python_kv.wasm");
    run(LIMIT, async move {
        let mut cluster = Cluster::start(3, "e2e-python");
        cluster.leader(SETTLE).await;
        let mut client = cluster.client();
        let deployed = client.deploy("pykv", &module, true, |_| {}).await.expect("deploy the Python guest");
        assert_eq!(deployed.phase, "activated");

        // The same commands to the Rust kv and to the Python kv: the same answers.
        let commands = [
            r#"{"op":"put","key":"a","value":"1"}"#,
            r#"{"op":"put","key":"a","value":"2"}"#,
            r#"{"op":"put","key":"ünï \"quoted\"","value":"line\nbreak\ttab é ☃"}"#,
            r#"{"op":"cas","key":"a","expected":"2","value":"3"}"#,
            r#"{"op":"cas","key":"a","expected":"2","value":"4"}"#,
            r#"{"op":"cas","key":"new","expected":null,"value":"x"}"#,
            r#"{"op":"delete","key":"a"}"#,
            r#"{"op":"delete","key":"a"}"#,
            r#"{"op":"put","key":"b","value":""}"#,
            r#"{"op":"put","key":"b","value":"quiet","return_previous":false}"#,
            r#"{"op":"put","key":"b","value":"loud","return_previous":true}"#,
        ];
        for command in commands {
            let rust = write(&mut client, "kv", command).await;
            let python = write(&mut client, "pykv", command).await;
            assert_eq!(python, rust, "{command}");
            assert!(rust.is_ok(), "{command}: {rust:?}");
        }
        for bad in [
            r#"{"op":"put","key":"a"}"#,
            r#"{"op":"nope"}"#,
            "not json",
            r#"{"op":"put","key":"a","value":1}"#,
            r#"{"op":"put","key":"a","value":"1","return_previous":0}"#,
        ] {
            assert!(write(&mut client, "kv", bad).await.is_err(), "kv refuses {bad}");
            assert!(write(&mut client, "pykv", bad).await.is_err(), "pykv refuses {bad}");
        }
        let queries = [
            r#"{"op":"get","key":"a"}"#,
            r#"{"op":"get","key":"ünï \"quoted\""}"#,
            r#"{"op":"range","start":"","end":null,"limit":100}"#,
            r#"{"op":"range","start":"b","end":"z","limit":1}"#,
        ];
        for query in queries {
            assert_eq!(read(&mut client, "pykv", query).await, read(&mut client, "kv", query).await, "{query}");
        }
        let statuses = cluster.agreed(SETTLE).await;
        assert_eq!(digest_of(&statuses[0], "pykv"), digest_of(&statuses[0], "kv"), "the same state, byte for byte");

        // Time and randomness come from the entry: a member that applies the
        // entries later (it was down) computes the same answers.
        let leader = cluster.leader(SETTLE).await;
        let late = (1..=3).find(|&id| id != leader).expect("a follower");
        cluster.kill(late);
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as i64;
        let mut randoms = Vec::new();
        for n in 0..3 {
            let answer = write(&mut client, "pykv", &format!(r#"{{"op":"clock","key":"clock-{n}"}}"#)).await;
            let answer: serde_json::Value = serde_json::from_str(&answer.expect("clock")).expect("JSON");
            let time_ms = answer["time_ms"].as_i64().expect("time_ms");
            assert!((time_ms - now_ms).abs() < 60_000, "time.time() is the leader's stamp: {time_ms} vs {now_ms}");
            randoms.push(answer["random"].as_u64().expect("random"));
        }
        randoms.dedup();
        assert_eq!(randoms.len(), 3, "each entry draws its own random number");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.spawn(late);
        cluster.agreed(SETTLE).await;

        // Nothing ambient: no environment, no files, no sockets.
        let sandbox = read(&mut client, "pykv", r#"{"op":"sandbox"}"#).await.expect("sandbox");
        let sandbox: serde_json::Value = serde_json::from_str(&sandbox).expect("JSON");
        assert_eq!(sandbox["environ"], serde_json::json!([]), "{sandbox}");
        for probe in ["read_file", "list_root", "write_file", "socket"] {
            assert_ne!(sandbox[probe], "allowed", "{probe}: {sandbox}");
        }
    });
}

#[test]
fn a_javascript_counter_replaces_the_rust_counter_in_place_and_back() {
    let module = polyglot_guest("js-counter", "js_counter.wasm");
    run(LIMIT, async move {
        let mut cluster = Cluster::start(3, "e2e-javascript");
        cluster.leader(SETTLE).await;
        let mut client = cluster.client();
        let rust_counter = {
            let status = cluster.status(1).await.expect("status");
            status.state_machines.iter().find(|m| m.name == "counter").expect("counter").module_hash.clone()
        };
        assert_eq!(write(&mut client, "counter", r#"{"op":"add","by":5}"#).await.as_deref(), Ok("5"));

        let deployed = client.deploy("counter", &module, true, |_| {}).await.expect("deploy the JavaScript guest");
        assert_eq!(deployed.phase, "activated");
        assert_eq!(write(&mut client, "counter", r#"{"op":"add","by":2}"#).await.as_deref(), Ok("7"));
        // A member that applies the JavaScript entries later, in a younger
        // instance than its peers', must reach the same state.
        let leader = cluster.leader(SETTLE).await;
        let late = (1..=3).find(|&id| id != leader).expect("a follower");
        cluster.kill(late);
        for _ in 0..50 {
            write(&mut client, "counter", r#"{"op":"add","by":1}"#).await.expect("add");
        }
        assert_eq!(write(&mut client, "counter", r#"{"op":"add","by":-50}"#).await.as_deref(), Ok("7"));
        assert_eq!(read(&mut client, "counter", r#"{"op":"get"}"#).await.as_deref(), Ok("7"));
        let refused = write(&mut client, "counter", r#"{"op":"sub","by":1}"#).await;
        assert!(refused.as_ref().is_err_and(|e| e.contains("unknown variant")), "{refused:?}");
        let big = write(&mut client, "counter", r#"{"op":"add","by":9007199254740991}"#).await;
        assert_eq!(big.as_deref(), Ok("9007199254740998"), "64-bit arithmetic, not doubles");
        cluster.spawn(late);
        cluster.agreed(SETTLE).await;

        // Back to the Rust counter, which reads the state JavaScript wrote.
        client.activate("counter", &rust_counter).await.expect("roll back to the Rust counter");
        assert_eq!(write(&mut client, "counter", r#"{"op":"add","by":-9007199254740991}"#).await.as_deref(), Ok("7"));
        cluster.agreed(SETTLE).await;
    });
}

#[test]
fn new_makes_a_python_guest_whose_tests_pass_and_whose_component_validates_and_runs() {
    // The pinned componentize-py the repository's Python guest is built
    // with, installed once for every test that needs it.
    polyglot_guest("python-kv", "python_kv.wasm");
    let exe = std::env::current_exe().expect("test executable path");
    let venv = exe.ancestors().nth(3).expect("inside the target directory").join("polyglot-guests/python-venv");
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("tally");
    let raft_host = |args: &[&str]| {
        std::process::Command::new(raft_host_e2e::binary()).args(args).output().expect("raft-host runs")
    };
    let made = raft_host(&["new", "tally", "--lang", "python", "--dir", project.to_str().expect("utf-8 path")]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));

    let tested = std::process::Command::new("python3")
        .args(["-m", "unittest", "-v"])
        .current_dir(&project)
        .output()
        .expect("python3 runs");
    let report = String::from_utf8_lossy(&tested.stderr);
    assert!(tested.status.success() && report.contains("Ran 2 tests"), "{report}");

    let built = std::process::Command::new(project.join("build.sh"))
        .env("RAFT_GUEST_PYTHON_VENV", &venv)
        .output()
        .expect("build.sh runs");
    assert!(
        built.status.success(),
        "{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    validate_and_run_tally(&project.join("tally.wasm"));
}

/// Validates a made project's component, then runs the tally commands
/// through it as a member would (`raft-host run`) and checks the answers.
fn validate_and_run_tally(component: &std::path::Path) {
    let raft_host = |args: &[&str]| {
        std::process::Command::new(raft_host_e2e::binary()).args(args).output().expect("raft-host runs")
    };
    let component = component.to_str().expect("utf-8 path");
    let valid = raft_host(&["validate", component]);
    assert!(valid.status.success(), "{}", String::from_utf8_lossy(&valid.stderr));
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("commands.jsonl");
    std::fs::write(
        &input,
        "{\"apply\": {\"op\":\"add\",\"key\":\"a\",\"by\":2}}\n{\"apply\": {\"op\":\"add\",\"key\":\"a\",\"by\":-7}}\n\
         {\"query\": {\"op\":\"get\",\"key\":\"a\"}}\n{\"apply\": \"nope\"}\n",
    )
    .expect("write");
    let ran = raft_host(&["run", component, "--sm", "tally", "--input", input.to_str().expect("utf-8 path")]);
    let printed = String::from_utf8_lossy(&ran.stdout);
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let lines: Vec<serde_json::Value> = printed.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    let answers: Vec<Option<i64>> = lines[..3].iter().map(|line| line["ok"].as_i64()).collect();
    assert_eq!(answers, [Some(2), Some(-5), Some(-5)], "{printed}");
    assert!(lines[3]["error"].as_str().is_some_and(|e| e.contains("invalid JSON")), "{printed}");
}

#[test]
fn new_makes_a_javascript_guest_whose_tests_pass_and_whose_component_validates_and_runs() {
    // The pinned componentize-qjs the repository's JavaScript counter is
    // built with, installed (and in npm's cache) once for both.
    polyglot_guest("js-counter", "js_counter.wasm");
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("tally");
    let made = std::process::Command::new(raft_host_e2e::binary())
        .args(["new", "tally", "--lang", "js", "--dir", project.to_str().expect("utf-8 path")])
        .output()
        .expect("raft-host runs");
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let npm = |args: &[&str]| {
        let output = std::process::Command::new("npm").args(args).current_dir(&project).output().expect("npm runs");
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "npm {args:?}:\n{printed}");
        printed
    };
    // Against the host in memory (test_host.js), before any toolchain.
    let tested = npm(&["test"]);
    assert!(tested.contains("# pass 2") && tested.contains("# fail 0"), "{tested}");
    npm(&["ci", "--no-audit", "--no-fund", "--loglevel=error"]);
    npm(&["run", "build"]);
    validate_and_run_tally(&project.join("tally.wasm"));
}

/// Commands for the kv contract, the awkward ones included: escapes of every
/// kind, a surrogate pair, field order, spacing, null and absent options,
/// empty keys and values; and inputs that must be refused.
const KV_COMMANDS: &[&str] = &[
    r#"{"op":"put","key":"a","value":"1"}"#,
    r#"{"op":"put","key":"a","value":"2"}"#,
    r#"{"op":"put","key":"ünï \"quoted\"","value":"line\nbreak\ttab é ☃ \u0001\u001f\u007f\ud83d\ude00 \/ \b\f\r"}"#,
    r#"{"value":"v","key":"order","op":"put"}"#,
    "  {\"op\" : \"put\" ,\n \"key\":\"spaced\",\"value\":\"x\"}  ",
    r#"{"op":"cas","key":"a","expected":"2","value":"3"}"#,
    r#"{"op":"cas","key":"a","expected":"2","value":"4"}"#,
    r#"{"op":"cas","key":"new","expected":null,"value":"x"}"#,
    r#"{"op":"cas","key":"absent-expected","value":"y"}"#,
    r#"{"op":"delete","key":"a"}"#,
    r#"{"op":"delete","key":"a"}"#,
    r#"{"op":"put","key":"b","value":""}"#,
    r#"{"op":"put","key":"","value":"the empty key"}"#,
    r#"{"op":"put","key":"b","value":"quiet","return_previous":false}"#,
    r#"{"op":"put","key":"b","value":"loud","return_previous":true}"#,
];
const KV_REFUSED: &[&str] = &[
    r#"{"op":"put","key":"a"}"#,
    r#"{"op":"nope"}"#,
    "not json",
    r#"{"op":"put","key":"a","value":1}"#,
    r#"{"op":"put","key":"a","value":"1","extra":{"a":[1,{"b":null}]}}"#,
    r#"{"op":"put","key":"a","key":"b","value":"1"}"#,
    r#"{"op":"put","key":"\ud800","value":"lone surrogate"}"#,
    r#"{"op":"put","key":"a","value":"1"} trailing"#,
    "{\"op\":\"put\",\"key\":\"a\",\"value\":\"raw \u{1} control\"}",
    r#"{"op":"put","key":"a","value":"1",}"#,
    r#"{"op":"put","key":"a","value":"1","return_previous":0}"#,
    r#"{"op":"put","key":"a","value":"1","return_previous":"false"}"#,
    r#"[{"op":"put","key":"a","value":"1"}]"#,
    r#"{"op":1}"#,
    r#"{"key":"a","value":"1"}"#,
    r#"{"op":"delete","key":null}"#,
    r#"{"op":"get","key":"a"}"#,
];
const KV_QUERIES: &[&str] = &[
    r#"{"op":"get","key":"a"}"#,
    r#"{"op":"get","key":"ünï \"quoted\""}"#,
    r#"{"op":"get","key":"new"}"#,
    r#"{"op":"range","start":"","end":null,"limit":100}"#,
    r#"{"op":"range","start":"b","end":"z","limit":1}"#,
    r#"{"op":"range","start":"","limit":4294967295}"#,
];
const KV_QUERIES_REFUSED: &[&str] = &[
    r#"{"op":"range","start":"","limit":4294967296}"#,
    r#"{"op":"range","start":"","limit":-1}"#,
    r#"{"op":"range","start":"","limit":1.0}"#,
    r#"{"op":"range","start":"","limit":1e2}"#,
    r#"{"op":"range","start":"","end":5,"limit":1}"#,
    r#"{"op":"range","limit":1}"#,
    r#"{"op":"put","key":"a","value":"1"}"#,
    r#"{"op":"get","key":"a","extra":null}"#,
];

/// A command's outcome as the state machine returned it, byte for byte.
async fn raw_write(client: &mut ClusterClient, name: &str, command: &str) -> Result<Vec<u8>, String> {
    let response = client.write(name, command.as_bytes().to_vec()).await.expect("write reaches the cluster");
    outcome_of(response.outcome)
}

async fn raw_read(client: &mut ClusterClient, name: &str, query: &str) -> Result<Vec<u8>, String> {
    let response = client
        .read(name, query.as_bytes().to_vec(), Consistency::Linearizable)
        .await
        .expect("read reaches the cluster");
    outcome_of(response.outcome)
}

#[test]
fn c_and_cpp_kv_guests_answer_and_store_like_the_rust_kv_byte_for_byte() {
    let guests = [("ckv", polyglot_guest("c-kv", "c_kv.wasm")), ("cppkv", polyglot_guest("cpp-kv", "cpp_kv.wasm"))];
    for (name, module) in &guests {
        // Small and free of WASI: nothing but raft:host is imported.
        assert!(module.len() < 128 << 10, "{name}: {} bytes", module.len());
        assert!(!module.windows(5).any(|w| w == b"wasi:"), "{name} imports WASI");
    }
    run(LIMIT, async move {
        let cluster = Cluster::start(3, "e2e-c-cpp");
        cluster.leader(SETTLE).await;
        let mut client = cluster.client();
        for (name, module) in &guests {
            let deployed = client.deploy(name, module, true, |_| {}).await.expect("deploy");
            assert_eq!(deployed.phase, "activated", "{name}");
        }
        for command in KV_COMMANDS {
            let rust = raw_write(&mut client, "kv", command).await;
            assert!(rust.is_ok(), "{command}: {rust:?}");
            for (name, _) in &guests {
                assert_eq!(raw_write(&mut client, name, command).await, rust, "{name}: {command}");
            }
        }
        for command in KV_REFUSED {
            assert!(raw_write(&mut client, "kv", command).await.is_err(), "kv refuses {command}");
            for (name, _) in &guests {
                let answer = raw_write(&mut client, name, command).await;
                assert!(answer.is_err(), "{name} refuses {command}: {answer:?}");
            }
        }
        for (queries, refused) in [(KV_QUERIES, false), (KV_QUERIES_REFUSED, true)] {
            for query in queries {
                let rust = raw_read(&mut client, "kv", query).await;
                assert_eq!(rust.is_err(), refused, "kv: {query}: {rust:?}");
                for (name, _) in &guests {
                    let answer = raw_read(&mut client, name, query).await;
                    if refused {
                        assert!(answer.is_err(), "{name} refuses {query}: {answer:?}");
                    } else {
                        assert_eq!(answer, rust, "{name}: {query}");
                    }
                }
            }
        }
        let statuses = cluster.agreed(SETTLE).await;
        for (name, _) in &guests {
            assert_eq!(
                digest_of(&statuses[0], name),
                digest_of(&statuses[0], "kv"),
                "{name}: the same state, byte for byte"
            );
        }
    });
}

#[test]
fn new_makes_a_c_guest_whose_tests_pass_and_whose_component_validates_and_runs() {
    // The toolchain the C kv guest is built with, installed once.
    polyglot_guest("c-kv", "c_kv.wasm");
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("tally");
    let binary = raft_host_e2e::binary();
    let raft_host = |args: &[&str]| std::process::Command::new(&binary).args(args).output().expect("raft-host runs");
    let made = raft_host(&["new", "tally", "--lang", "c", "--dir", project.to_str().expect("utf-8 path")]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let make = |target: &[&str]| {
        let output = std::process::Command::new("make")
            .args(target)
            .env("RAFT_HOST", &binary)
            .current_dir(&project)
            .output()
            .expect("make runs");
        let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "make {target:?}:\n{printed}");
        printed
    };
    let tested = make(&["test"]);
    assert!(tested.contains("all tests passed"), "{tested}");
    make(&[]);
    validate_and_run_tally(&project.join("tally.wasm"));
}
