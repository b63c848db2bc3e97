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

#[test]
fn serve_refuses_zero_worker_threads_from_a_flag_or_a_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let flag =
        raft_host(&["serve", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir", data, "--worker-threads", "0"]);
    assert_eq!(flag.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&flag.stderr).contains("--worker-threads must be at least 1"));

    let config = dir.path().join("member.toml");
    std::fs::write(&config, format!("id = 1\nlisten = \"127.0.0.1:1\"\ndata-dir = {data:?}\nworker-threads = 0\n"))
        .expect("config file");
    let file = raft_host(&["serve", "--config", config.to_str().expect("utf-8 path")]);
    assert_eq!(file.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&file.stderr).contains("--worker-threads must be at least 1"));
    assert!(!dir.path().join("data").exists(), "refused before touching the data directory");
}

/// A plaintext `serve` on a port already taken: it logs its plaintext
/// warning, then stops. Returns the port's address and what it printed.
fn serve_on_a_taken_port() -> (String, std::process::Output) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let output = raft_host(&["serve", "--id", "1", "--listen", &address, "--data-dir", data, "--plaintext", "true"]);
    (address, output)
}

#[test]
fn serve_on_a_taken_port_says_so_on_one_line_naming_the_cause_once() {
    let (address, output) = serve_on_a_taken_port();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().expect("an error line");
    assert!(last.starts_with(&format!("raft-host: cannot listen on {address}")), "{stderr}");
    assert_eq!(last.matches("in use").count(), 1, "the cause once: {last}");
}

#[test]
fn logs_written_to_a_pipe_are_plain_text_without_colour_codes() {
    let (_, output) = serve_on_a_taken_port();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let warning = stderr.lines().find(|line| line.contains("serving plaintext")).expect("a log line");
    assert!(warning.contains(" WARN raft_host::cli::serve: "), "level and target as plain words: {warning:?}");
    assert!(!stderr.contains('\u{1b}'), "no terminal escape codes in a pipe: {stderr:?}");
}

#[test]
fn serve_speaks_plaintext_only_when_told_and_needs_all_three_tls_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let neither = raft_host(&["serve", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir", data]);
    assert_eq!(neither.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&neither.stderr);
    assert!(stderr.contains("choose TLS") && stderr.contains("--plaintext true"), "{stderr}");
    let partial = raft_host(&["serve", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir", data, "--ca", "ca.pem"]);
    assert_eq!(partial.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&partial.stderr).contains("all three of --ca, --cert and --key"));
    assert!(!dir.path().join("data").exists(), "refused before touching the data directory");
}

#[test]
fn serve_refuses_store_memory_below_what_the_engine_takes_from_a_flag_or_a_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    let base = ["serve", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir", data, "--plaintext", "true"];
    let memtable = raft_host(&[&base[..], &["--memtable-bytes", "1000"]].concat());
    assert_eq!(memtable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&memtable.stderr).contains("--memtable-bytes must be at least 1048576"));

    let config = dir.path().join("member.toml");
    std::fs::write(
        &config,
        format!("id = 1\nlisten = \"127.0.0.1:1\"\ndata-dir = {data:?}\nplaintext = true\njournal-bytes = 1\n"),
    )
    .expect("config file");
    let file = raft_host(&["serve", "--config", config.to_str().expect("utf-8 path")]);
    assert_eq!(file.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&file.stderr).contains("--journal-bytes must be at least 67108864"));
    assert!(!dir.path().join("data").exists(), "refused before touching the data directory");
}

#[test]
fn run_answers_each_line_through_the_runtime_and_ends_with_the_members_state_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("commands.jsonl");
    let lines = [
        r#"{"apply": {"op":"put","key":"a","value":"1"}}"#,
        "# a comment, and an empty line, are skipped",
        "",
        r#"{"apply": {"op":"put","key":"a","value":"2"}}"#,
        r#"{"query": {"op":"get","key":"a"}}"#,
        r#"{"apply": "not json"}"#,
        r#"{"query": {"op":"put","key":"b","value":"no"}}"#,
        "garbage",
        r#"{"apply": {"op":"put","key":"b","value":"x"}, "time_ms": 1800000000000}"#,
    ];
    std::fs::write(&input, lines.join("\n")).expect("write");
    let output = raft_host(&["run", "--input", input.to_str().expect("utf-8 path")]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object a line"))
        .collect();
    assert_eq!(printed.len(), 8, "{printed:?}");
    assert_eq!(printed[0]["ok"], serde_json::json!({"previous": null}));
    assert_eq!((printed[1]["ok"]["previous"].as_str(), printed[1]["index"].as_u64()), (Some("1"), Some(2)));
    assert_eq!((printed[2]["ok"]["value"].as_str(), printed[2]["query_at"].as_u64()), (Some("2"), Some(2)));
    assert!(printed[3]["error"].as_str().is_some_and(|e| e.contains("invalid JSON")), "{}", printed[3]);
    assert!(printed[4]["error"].is_string(), "a query cannot write: {}", printed[4]);
    assert!(printed[5]["input_error"].as_str().is_some_and(|e| e.contains("not a JSON object")), "{}", printed[5]);
    for answer in &printed[..5] {
        assert!(answer["fuel"].as_u64().is_some_and(|fuel| fuel > 0), "fuel is counted: {answer}");
    }
    // The digest is the one a member holding the same pairs reports.
    let store_dir = tempfile::tempdir().expect("tempdir");
    let store = raft_host::storage::Store::open(
        store_dir.path(),
        &raft_host::storage::Identity::new("digest", 1),
        &raft_host::storage::StoreOptions::default(),
    )
    .expect("store");
    let write = |key: &str, value: &str| raft_host::storage::StateWrite {
        state_machine: "kv".into(),
        key: key.into(),
        value: Some(value.into()),
    };
    store
        .apply(&raft_host::storage::ApplyBatch {
            applied_index: 1,
            applied_term: 1,
            writes: vec![write("a", "2"), write("b", "x")],
            ..Default::default()
        })
        .expect("apply");
    let expected = raft_host::wire::hex(&store.state_digest("kv").expect("digest"));
    assert_eq!(printed[7], serde_json::json!({"applied": 4, "keys": 2, "state_digest": expected}));

    let missing = raft_host(&["run", "/no/such/guest.wasm"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/guest.wasm"));
}

/// `cargo ARGS` in `dir` on `target`, without the outer build's settings
/// (its target, flags and jobserver must not leak into a nested build).
fn nested_cargo(dir: &std::path::Path, target: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(args).arg("--target-dir").arg(target).current_dir(dir);
    for (key, _) in std::env::vars() {
        let keep = key == "CARGO_HOME" || key == "CARGO_NET_OFFLINE";
        if (key.starts_with("CARGO_") && !keep) || key.starts_with("RUSTC") || key == "RUSTFLAGS" {
            command.env_remove(&key);
        }
    }
    command.output().expect("cargo runs")
}

#[test]
fn new_makes_a_rust_guest_whose_tests_pass_and_whose_component_validates_and_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let project = dir.path().join("tally");
    let made = raft_host(&["new", "tally", "--lang", "rust", "--dir", project.to_str().expect("utf-8 path")]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    for file in ["Cargo.toml", "Cargo.lock", "src/lib.rs", "README.md", "wit/raft-host.wit"] {
        assert!(project.join(file).exists(), "{file} is created");
    }
    let again = raft_host(&["new", "tally", "--dir", project.to_str().expect("utf-8 path")]);
    assert!(!again.status.success(), "an existing project is never overwritten");
    let bad = raft_host(&["new", "Not A Name"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a project name"));

    // target/<profile>/deps/<test>: the guests' nested builds share one
    // target directory next to the outer one.
    let exe = std::env::current_exe().expect("test executable");
    let target = exe.ancestors().nth(3).expect("inside the target directory").join("guest-native");
    let tested = nested_cargo(&project, &target, &["test", "--release"]);
    let stdout = String::from_utf8_lossy(&tested.stdout);
    assert!(tested.status.success(), "cargo test: {stdout}{}", String::from_utf8_lossy(&tested.stderr));
    assert!(stdout.contains("test result: ok. 2 passed"), "{stdout}");
    let built = nested_cargo(&project, &target, &["build", "--release", "--target", "wasm32-wasip2"]);
    assert!(built.status.success(), "cargo build: {}", String::from_utf8_lossy(&built.stderr));
    let component = target.join("wasm32-wasip2/release/tally.wasm");
    let component = component.to_str().expect("utf-8 path");
    let valid = raft_host(&["validate", component]);
    assert!(valid.status.success(), "{}", String::from_utf8_lossy(&valid.stderr));
    let input = dir.path().join("commands.jsonl");
    std::fs::write(
        &input,
        "{\"apply\": {\"op\":\"add\",\"key\":\"a\",\"by\":2}}\n{\"query\": {\"op\":\"get\",\"key\":\"a\"}}\n",
    )
    .expect("write");
    let ran = raft_host(&["run", component, "--sm", "tally", "--input", input.to_str().expect("utf-8 path")]);
    let printed = String::from_utf8_lossy(&ran.stdout);
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let lines: Vec<serde_json::Value> = printed.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!((lines[0]["ok"].as_i64(), lines[1]["ok"].as_i64()), (Some(2), Some(2)), "{printed}");
}
