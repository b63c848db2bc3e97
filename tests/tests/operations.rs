//! What operators rely on, against real members over TLS: the gRPC health
//! service and reflection, the probes and histograms of the metrics port,
//! `endpoint status|health --cluster`, JSON logs that follow one request
//! across members, and backup and restore after a cluster lost its quorum.

use raft_host::client::{ClusterClient, Consistency, outcome_of};
use raft_host::wire::client_pb::WriteRequest;
use raft_host_e2e::{Cluster, http_get, metric, put, read_value, run, tls_transport};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt as _;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const LIMIT: Duration = Duration::from_secs(120);

/// Runs the CLI with the cluster's admin certificate.
fn cli(cluster: &Cluster, args: &[&str]) -> Output {
    Command::new(raft_host_e2e::binary()).args(args).envs(cluster.cli_env()).output().expect("raft-host runs")
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn health_of(cluster: &Cluster, id: u64, service: &str) -> Option<i32> {
    let mut health = HealthClient::new(cluster.channel(id));
    let request = HealthCheckRequest { service: service.to_string() };
    health.check(request).await.ok().map(|answer| answer.into_inner().status)
}

/// Waits until `check` holds, polling; fails with `what` after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn health_reflection_probes_histograms_and_the_cluster_table_tell_an_operator_what_runs() {
    let mut cluster = Cluster::start(3, "ops-probes");
    run(LIMIT, async {
        let leader = cluster.leader(Duration::from_secs(20)).await;
        let mut client = cluster.client();
        for i in 0..20 {
            client.write("kv", put(&format!("k{i}"), "v")).await.expect("write");
        }
        read_value(&mut client, "k1", Consistency::Linearizable).await;
        cluster.converged(Duration::from_secs(20)).await;

        // gRPC health: SERVING for the server and for the client API; an
        // unknown service is NOT_FOUND, not silently SERVING.
        let cluster_ref = &cluster;
        for id in 1..=3 {
            eventually(Duration::from_secs(10), "every member reports SERVING", || async move {
                health_of(cluster_ref, id, "").await == Some(ServingStatus::Serving as i32)
                    && health_of(cluster_ref, id, "raft.client.v1.Client").await == Some(ServingStatus::Serving as i32)
            })
            .await;
        }
        let mut health = HealthClient::new(cluster.channel(1));
        let unknown = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
        assert_eq!(unknown.expect_err("unknown service").code(), tonic::Code::NotFound);

        // Reflection: the services and their descriptors, with no proto file.
        let mut reflection = ServerReflectionClient::new(cluster.channel(1));
        let asks = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("raft.client.v1.Client".into()),
        ];
        let requests = asks.map(|ask| ServerReflectionRequest { host: String::new(), message_request: Some(ask) });
        let mut answers =
            reflection.server_reflection_info(tokio_stream::iter(requests)).await.expect("reflection").into_inner();
        let listed = match answers.next().await.expect("an answer").expect("listed").message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("list_services answered {other:?}"),
        };
        for service in ["raft.client.v1.Client", "grpc.health.v1.Health"] {
            assert!(listed.iter().any(|s| s == service), "{service} is listed: {listed:?}");
        }
        assert!(!listed.iter().any(|s| s.starts_with("raft.peer")), "the peer protocol is not advertised: {listed:?}");
        match answers.next().await.expect("an answer").expect("described").message_response {
            Some(MessageResponse::FileDescriptorResponse(files)) => {
                assert!(!files.file_descriptor_proto.is_empty());
                let text = String::from_utf8_lossy(&files.file_descriptor_proto[0]).into_owned();
                assert!(text.contains("WriteRequest") && text.contains("BackupHeader"), "the client API's descriptor");
            }
            other => panic!("file_containing_symbol answered {other:?}"),
        }

        // Probes and histograms on the metrics port.
        let metrics_of_leader = cluster.metrics_address(leader);
        let (code, body) = http_get(&metrics_of_leader, "/healthz");
        assert_eq!(code, 200, "{body}");
        assert!(body.starts_with("alive"), "{body}");
        let (code, body) = http_get(&metrics_of_leader, "/readyz");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(&format!("leader {leader}")), "{body}");
        let (code, body) = http_get(&metrics_of_leader, "/nothing");
        assert_eq!(code, 404);
        assert!(body.contains("/readyz"), "the 404 says what the port serves: {body}");
        let (_, metrics) = http_get(&metrics_of_leader, "/metrics");
        for histogram in [
            "raft_host_log_persist_seconds",
            "raft_host_log_persist_entries",
            "raft_host_propose_to_commit_seconds",
            "raft_host_apply_batch_seconds",
            "raft_host_apply_batch_entries",
        ] {
            assert!(metrics.contains(&format!("# TYPE {histogram} histogram")), "{histogram} is exposed");
            let count = metric(&metrics, &format!("{histogram}_count")).expect("a count");
            assert!(count >= 1.0, "{histogram} counted the writes: {count}");
            let inf = format!("{histogram}_bucket{{le=\"+Inf\"}} {count}");
            assert!(metrics.contains(&inf), "the +Inf bucket of {histogram} holds every observation");
        }
        assert!(
            metric(&metrics, "raft_host_propose_to_commit_seconds_count").unwrap_or(0.0) >= 20.0,
            "the leader timed every write from proposal to commit"
        );
        let writes_ok = "raft_host_client_request_duration_seconds_count{method=\"write\",code=\"Ok\"}";
        assert!(metrics.lines().any(|l| l.starts_with(writes_ok)), "request durations by method and code");

        // One table of every member, from one address.
        let first = cluster.address(1);
        let table = cli(&cluster, &["endpoint", "status", "--cluster", "--json", "--addr", &first]);
        assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
        let rows: serde_json::Value = serde_json::from_str(&stdout_of(&table)).expect("JSON");
        let rows = rows["endpoints"].as_array().expect("a row per member").clone();
        assert_eq!(rows.len(), 3, "{rows:?}");
        for row in &rows {
            assert_eq!(row["leader_id"], leader, "{row}");
            assert_eq!(row["lag"], 0, "{row}");
            assert_eq!(row["state_machines"], rows[0]["state_machines"], "digests agree: {row}");
            assert!(row["resident_bytes"].as_u64().unwrap_or(0) > 0, "{row}");
            assert_eq!(row["version"], env!("CARGO_PKG_VERSION"), "{row}");
        }
        let healthy = cli(&cluster, &["endpoint", "health", "--cluster", "--addr", &first]);
        assert!(healthy.status.success(), "all healthy: {}", stdout_of(&healthy));
        let probe = cli(&cluster, &["endpoint", "probe", "--addr", &first]);
        assert!(probe.status.success(), "the container health check passes: {}", stdout_of(&probe));
        assert!(stdout_of(&probe).contains("SERVING"), "{}", stdout_of(&probe));

        // Without a quorum the survivor says why it does not serve.
        let survivor = if leader == 1 { 2 } else { 1 };
        for id in (1..=3).filter(|&id| id != survivor) {
            cluster.kill(id);
        }
        eventually(Duration::from_secs(15), "the survivor stops serving", || async {
            health_of(&cluster, survivor, "").await == Some(ServingStatus::NotServing as i32)
        })
        .await;
        let (code, body) = http_get(&cluster.metrics_address(survivor), "/readyz");
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("no leader"), "{body}");
        assert_eq!(http_get(&cluster.metrics_address(survivor), "/healthz").0, 200, "still alive");
        let at = cluster.address(survivor);
        let unhealthy = cli(&cluster, &["endpoint", "health", "--addr", &at]);
        assert!(!unhealthy.status.success(), "a member with no leader is unhealthy: {}", stdout_of(&unhealthy));
        assert!(stdout_of(&unhealthy).contains("no leader"), "{}", stdout_of(&unhealthy));
        let probe = cli(&cluster, &["endpoint", "probe", "--addr", &at]);
        assert!(!probe.status.success(), "the container health check fails: {}", stdout_of(&probe));
        assert!(stdout_of(&probe).contains("NOT_SERVING"), "{}", stdout_of(&probe));
    });
}

#[test]
fn json_logs_follow_one_write_from_the_follower_that_took_it_to_the_leader() {
    let mut cluster = Cluster::prepared(3, "ops-logs", &["--log-format", "json"]);
    cluster.set_env("RUST_LOG", "info,raft_host::server=debug");
    cluster.spawn_all();
    run(LIMIT, async {
        let leader = cluster.leader(Duration::from_secs(20)).await;
        let follower = if leader == 1 { 2 } else { 1 };
        let mut client = cluster.client_of(follower);
        let answer = client.write("kv", put("traced", "1")).await.expect("write through a follower");
        // Lines are whole JSON objects; the write's span names its request.
        let spans_with_write = |log: &str| -> Vec<serde_json::Value> {
            log.lines()
                .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}")))
                .filter(|line| line["span"]["name"] == "write")
                .collect()
        };
        let on_follower = spans_with_write(&cluster.log_of(follower));
        let forwarded = on_follower
            .iter()
            .find(|line| line["fields"]["message"] == "forwarding the write to the leader")
            .unwrap_or_else(|| panic!("the follower logs the forward: {on_follower:?}"));
        let request = forwarded["span"]["request"].as_str().expect("a request id").to_string();
        assert_eq!(forwarded["span"]["forwarded"], false);
        assert_eq!(forwarded["span"]["state_machine"], "kv");
        assert!(forwarded["timestamp"].is_string() && forwarded["level"] == "DEBUG", "{forwarded}");
        let on_leader = spans_with_write(&cluster.log_of(leader));
        let applied = on_leader
            .iter()
            .find(|line| line["span"]["request"] == request.as_str())
            .unwrap_or_else(|| panic!("the leader logs request {request}: {on_leader:?}"));
        assert_eq!(applied["span"]["forwarded"], true);
        assert_eq!(applied["fields"]["index"], answer.index, "{applied}");
    });
}

/// `raft-host snapshot status --json` of `file`.
fn backup_status(cluster: &Cluster, file: &Path) -> serde_json::Value {
    let output = cli(cluster, &["snapshot", "status", "--json", file.to_str().expect("utf-8")]);
    assert!(output.status.success(), "snapshot status: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(&stdout_of(&output)).expect("JSON")
}

/// `raft-host snapshot restore FILE --data-dir DIR --id ID --peer PEERS`.
fn restore(cluster: &Cluster, file: &Path, dir: &Path, id: u64, peers: &str) -> Output {
    let (file, dir) = (file.to_str().expect("utf-8"), dir.to_str().expect("utf-8"));
    cli(cluster, &["snapshot", "restore", file, "--data-dir", dir, "--id", &id.to_string(), "--peer", peers])
}

#[test]
fn a_cluster_that_lost_its_quorum_is_rebuilt_from_a_backup_and_goes_on() {
    let mut old = Cluster::start(3, "ops-backup");
    let backup = old.root().join("cluster.backup");
    let (digests, session_write) = run_and_return(async {
        old.leader(Duration::from_secs(20)).await;
        let mut client = old.client();
        for i in 0..200 {
            client.write("kv", put(&format!("key-{i:03}"), &format!("value-{i}"))).await.expect("write");
        }
        client.write("counter", br#"{"op":"add","by":5}"#.to_vec()).await.expect("counter");
        // A module deployed under a new name, so modules and versions travel too.
        client.deploy("tally", raft_guests::COUNTER, true, |_| {}).await.expect("deploy");
        client.write("tally", br#"{"op":"add","by":3}"#.to_vec()).await.expect("tally");
        // A write under a session: the new cluster remembers its answer.
        let session_write = WriteRequest {
            state_machine: "kv".into(),
            command: put("session-key", "first").into(),
            client_id: b"backup-client".to_vec().into(),
            sequence: 1,
            lowest_unanswered: 1,
        };
        let first = client.write_request(session_write.clone()).await.expect("session write");

        // Only admins back up.
        let dir = old.certs_dir().expect("a TLS cluster").to_path_buf();
        let certs = Command::new(raft_host_e2e::binary())
            .args(["certs", "client", "--dir", dir.to_str().expect("utf-8"), "--name", "app", "--role", "writer"])
            .output()
            .expect("certs");
        assert!(certs.status.success());
        let mut writer =
            ClusterClient::with_transport(old.addresses(), tls_transport(&dir, "client-app")).expect("client");
        let refused = writer.backup().await.expect_err("a writer may not back up");
        assert_eq!(refused.code(), Some(tonic::Code::PermissionDenied), "{refused}");
        assert!(refused.to_string().contains("admin"), "{refused}");

        let addresses = old.addresses().join(",");
        let saved = cli(&old, &["snapshot", "save", backup.to_str().expect("utf-8"), "--addr", &addresses]);
        assert!(saved.status.success(), "snapshot save: {}", String::from_utf8_lossy(&saved.stderr));
        let statuses = old.agreed(Duration::from_secs(20)).await;
        let digests: Vec<(String, String)> =
            statuses[0].state_machines.iter().map(|m| (m.name.clone(), m.state_digest.clone())).collect();
        (digests, (session_write, first))
    });
    assert!(!old.root().join("cluster.backup.partial").exists(), "the partial file took the backup's name");

    // What the file holds, as the cluster reported it.
    let status = backup_status(&old, &backup);
    assert_eq!(status["cluster"], "ops-backup");
    assert_eq!(status["voters"], serde_json::json!([1, 2, 3]));
    assert!(status["sessions"].as_u64().unwrap_or(0) >= 1, "{status}");
    let in_file: Vec<(String, String)> = status["state_machines"]
        .as_array()
        .expect("state machines")
        .iter()
        .map(|m| (m["name"].as_str().unwrap_or("").to_string(), m["state_digest"].as_str().unwrap_or("").to_string()))
        .collect();
    for machine in &digests {
        assert!(in_file.contains(machine), "{machine:?} is in the backup as the cluster had it: {in_file:?}");
    }
    let kv = status["state_machines"].as_array().expect("list").iter().find(|m| m["name"] == "kv").cloned();
    assert_eq!(kv.expect("kv")["keys"], 201, "200 keys and the session's");
    assert!(
        status["module_versions"].as_array().expect("versions").iter().any(|v| v["state_machine"] == "tally"),
        "{status}"
    );

    // Broken copies are refused, with the reason, and restore nothing.
    let bytes = std::fs::read(&backup).expect("backup");
    let truncated = old.root().join("truncated.backup");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let corrupt = old.root().join("corrupt.backup");
    std::fs::write(&corrupt, &flipped).expect("write");
    for (file, why) in [(&truncated, "truncated"), (&corrupt, "SHA-256")] {
        let target = old.root().join("refused-dir");
        let restored = restore(&old, file, &target, 1, "1=127.0.0.1:1");
        assert!(!restored.status.success());
        let stderr = String::from_utf8_lossy(&restored.stderr);
        assert!(stderr.contains(why), "{why}: {stderr}");
        assert!(!target.exists(), "nothing was restored from a broken file");
    }

    // Quorum lost: two members die and their disks are wiped.
    for id in [2, 3] {
        old.kill(id);
        std::fs::remove_dir_all(old.data_dir(id)).expect("wipe");
    }
    old.kill(1);
    // The survivor's directory, stopped, backs up too (no barrier: what it
    // had applied, which here is everything).
    let offline = old.root().join("survivor.backup");
    let dir = old.data_dir(1);
    let saved = cli(
        &old,
        &["snapshot", "save", offline.to_str().expect("utf-8"), "--from-data-dir", dir.to_str().expect("utf-8")],
    );
    assert!(saved.status.success(), "offline save: {}", String::from_utf8_lossy(&saved.stderr));
    let survivor = backup_status(&old, &offline);
    assert_eq!(survivor["state_machines"], status["state_machines"], "the survivor held what the backup holds");
    assert!(survivor["index"].as_u64() >= status["index"].as_u64());

    // A new cluster of three from the backup, on new addresses.
    let mut new = Cluster::prepared(3, "ops-backup", &[]);
    let peers: Vec<String> = (1..=3).map(|id| format!("{id}={}", new.address(id))).collect();
    for id in 1..=3u64 {
        let restored = restore(&old, &backup, &new.data_dir(id), id, &peers.join(","));
        assert!(restored.status.success(), "restore {id}: {}", String::from_utf8_lossy(&restored.stderr));
    }
    new.spawn_all();
    run(LIMIT, async {
        new.leader(Duration::from_secs(20)).await;
        let statuses = new.agreed(Duration::from_secs(20)).await;
        let now: Vec<(String, String)> =
            statuses[0].state_machines.iter().map(|m| (m.name.clone(), m.state_digest.clone())).collect();
        assert_eq!(now, digests, "the new cluster holds exactly what the backup did");
        let index = status["index"].as_u64().expect("index");
        assert!(statuses.iter().all(|s| s.applied_index >= index), "it starts from the backup's index");
        let members = new.client().members().await.expect("members");
        let listed: Vec<String> = members.members.iter().map(|m| m.address.clone()).collect();
        assert_eq!(listed, (1..=3).map(|id| new.address(id)).collect::<Vec<_>>(), "the new addresses");

        let mut client = new.client();
        assert_eq!(read_value(&mut client, "key-123", Consistency::Linearizable).await.as_deref(), Some("value-123"));
        // The session came along: the retried write gets its first answer.
        let (request, first) = session_write.clone();
        let again = client.write_request(request).await.expect("retried write");
        assert_eq!(outcome_of(again.outcome), outcome_of(first.outcome), "answered from the restored session");
        assert_eq!(again.index, first.index);
        // And the cluster goes on.
        client.write("kv", put("after", "restore")).await.expect("a write after the restore");
        client.write("tally", br#"{"op":"add","by":1}"#.to_vec()).await.expect("the deployed module runs");
        let read = client.read("tally", br#"{"op":"get"}"#.to_vec(), Consistency::Linearizable).await.expect("read");
        assert_eq!(outcome_of(read.outcome).expect("tally answers"), b"4".to_vec(), "3 before, 1 after");
        new.agreed(Duration::from_secs(20)).await;
    });
}

/// Runs a future to its value on a fresh runtime, bounded by [`LIMIT`].
fn run_and_return<T>(test: impl std::future::Future<Output = T>) -> T {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async { tokio::time::timeout(LIMIT, test).await.expect("within the time limit") })
}

#[test]
fn a_joiner_takes_a_list_of_seeds_says_when_none_answers_and_refuses_an_address_that_cannot_be_one() {
    // An address that cannot be valid stops the member at start, naming it.
    let scratch = tempfile::tempdir().expect("temporary directory");
    let listen = format!("127.0.0.1:{}", raft_host_e2e::free_port());
    let output = Command::new(raft_host_e2e::binary())
        .args(["serve", "--id", "9", "--cluster", "ops-join", "--listen", &listen, "--plaintext", "true"])
        .args(["--data-dir", scratch.path().join("data").to_str().expect("utf-8")])
        .args(["--join", "127.0.0.1:7001,not-an-address"])
        .output()
        .expect("raft-host runs");
    assert!(!output.status.success(), "an invalid seed is an error at start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--join") && stderr.contains("not-an-address"), "{stderr}");

    let mut cluster = Cluster::start(3, "ops-join");
    run(LIMIT, async {
        cluster.leader(Duration::from_secs(20)).await;
        // The first seed is down; the second is a member.
        let dead = format!("127.0.0.1:{}", raft_host_e2e::free_port());
        cluster.join_through(4, &[dead.clone(), cluster.address(2)], &[]);
        let cluster_ref = &cluster;
        eventually(Duration::from_secs(30), "member 4 joins and is promoted", || async move {
            let members = cluster_ref.client_of(1).members().await;
            members.is_ok_and(|m| m.members.iter().any(|m| m.id == 4 && m.kind == "voter"))
        })
        .await;

        // No seed answers: the joiner says which and why while it retries.
        cluster.join_through(5, std::slice::from_ref(&dead), &[]);
        let (cluster_ref, dead) = (&cluster, &dead);
        eventually(Duration::from_secs(30), "the joiner logs what it could not reach", || async move {
            let log = cluster_ref.log_of(5);
            log.contains("no seed has done the membership change yet") && log.contains(dead.as_str())
        })
        .await;
    });
}

#[test]
fn completions_for_bash_zsh_and_fish_name_every_command_and_bash_parses_them() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(raft_host_e2e::binary()).args(["completions", shell]).output().expect("runs");
        assert!(output.status.success(), "{shell}: {}", String::from_utf8_lossy(&output.stderr));
        let script = stdout_of(&output);
        for command in ["serve", "snapshot", "endpoint", "members", "completions"] {
            assert!(script.contains(command), "{shell} completes {command}");
        }
        // Each shell checks its own script's syntax, where it is installed.
        let check = Command::new(shell).arg("-n").stdin(std::process::Stdio::piped()).spawn();
        if let Ok(mut child) = check {
            child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("script");
            let status = child.wait().expect("shell exits");
            assert!(status.success(), "{shell} -n rejects its completion script");
        } else {
            assert_ne!(shell, "bash", "bash is on every machine this runs on");
        }
    }
}
