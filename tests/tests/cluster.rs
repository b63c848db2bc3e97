//! A 3-member cluster of real `raft-host serve` processes: writes through
//! every member, a leader killed with SIGKILL, a restart that catches up,
//! exactly-once retries, bad requests, a member of another cluster, and a
//! graceful stop.

use raft_host::client::{ClusterClient, Consistency, outcome_of};
use raft_host::process::thread_nice_values;
use raft_host::wire::client_pb::{WatchRequest, WriteRequest, client_client::ClientClient};
use raft_host::wire::pb::{Envelope, Message, RequestVote, message::Body, raft_peer_client::RaftPeerClient};
use raft_host_e2e::{Cluster, binary, put, read_value, run};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(120);
const SETTLE: Duration = Duration::from_secs(20);

fn value_of(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("JSON answer")
}

#[test]
fn writes_through_every_member_survive_a_leader_kill_and_all_replicas_agree() {
    run(LIMIT, async {
        let mut cluster = Cluster::start(3, "e2e-main");
        let first_leader = cluster.leader(SETTLE).await;
        let mut acknowledged = BTreeMap::new();

        // Every member takes writes (followers forward them to the leader).
        for id in 1..=3 {
            let mut client = cluster.client_of(id);
            for n in 0..20 {
                let key = format!("m{id}-{n}");
                let response = client.write("kv", put(&key, &n.to_string())).await.expect("write");
                assert!(outcome_of(response.outcome).is_ok());
                acknowledged.insert(key, n.to_string());
            }
        }
        // Linearizable reads from every member see the latest writes.
        for id in 1..=3 {
            let mut client = cluster.client_of(id);
            assert_eq!(read_value(&mut client, "m3-19", Consistency::Linearizable).await.as_deref(), Some("19"));
        }

        // A client following leadership through Watch on a follower.
        let watcher_id = (1..=3).find(|&id| id != first_leader).expect("a follower");
        let channel = cluster.channel(watcher_id);
        let mut events = ClientClient::new(channel).watch(WatchRequest {}).await.expect("watch").into_inner();
        let current = events.message().await.expect("stream").expect("the current view comes first");
        assert_eq!(current.leader_id, first_leader);

        // SIGKILL the leader; a new one takes over within seconds.
        cluster.kill(first_leader);
        let killed_at = Instant::now();
        let second_leader = cluster.leader(SETTLE).await;
        let failover = killed_at.elapsed();
        assert_ne!(second_leader, first_leader);
        assert!(failover < Duration::from_secs(10), "failover took {failover:?}");
        eprintln!("new leader {second_leader} {failover:?} after the kill");
        loop {
            let event = events.message().await.expect("stream").expect("the stream stays open");
            if event.leader_id == second_leader {
                assert_eq!(event.leader_address, cluster.address(second_leader));
                break;
            }
        }

        let mut client = cluster.client();
        for n in 0..30 {
            let key = format!("after-{n}");
            let response = client.write("kv", put(&key, "x")).await.expect("write after failover");
            assert!(outcome_of(response.outcome).is_ok());
            acknowledged.insert(key, "x".to_string());
        }

        // The killed member restarts from its data directory and catches up.
        cluster.spawn(first_leader);
        let statuses = cluster.agreed(SETTLE).await;
        assert!(statuses.iter().all(|s| s.members.len() == 3));

        // No acknowledged write is missing, on any member (stale reads show
        // each member's own state).
        for id in 1..=3 {
            let mut client = cluster.client_of(id);
            for (key, value) in &acknowledged {
                let seen = read_value(&mut client, key, Consistency::Stale).await;
                assert_eq!(seen.as_deref(), Some(value.as_str()), "member {id} lost {key}");
            }
        }
        // A lease read goes to (or is forwarded to) the leader.
        let mut follower = cluster.client_of(first_leader);
        assert_eq!(read_value(&mut follower, "after-29", Consistency::Lease).await.as_deref(), Some("x"));
    });
}

#[test]
fn a_retried_write_is_applied_once_and_answered_with_the_first_answer() {
    run(LIMIT, async {
        let cluster = Cluster::start(3, "e2e-sessions");
        cluster.leader(SETTLE).await;
        let add = |client_id: &[u8], sequence| WriteRequest {
            state_machine: "counter".into(),
            command: br#"{"op":"add","by":5}"#.to_vec().into(),
            client_id: client_id.to_vec().into(),
            sequence,
            lowest_unanswered: 0,
        };
        let mut via_one = cluster.client_of(1);
        let first = via_one.write_request(add(b"client-a", 1)).await.expect("write");
        assert_eq!(outcome_of(first.outcome.clone()), Ok(b"5".to_vec()));
        // The same write again, through another member: same answer, same
        // index, and the counter did not move.
        let mut via_two = cluster.client_of(2);
        let retry = via_two.write_request(add(b"client-a", 1)).await.expect("retry");
        assert_eq!(retry, first);
        let next = via_two.write_request(add(b"client-a", 2)).await.expect("next write");
        assert_eq!(outcome_of(next.outcome), Ok(b"10".to_vec()));
        // Without a client id there is no session: a repeat applies again.
        let anonymous = via_one.write_request(add(b"", 0)).await.expect("anonymous");
        assert_eq!(outcome_of(anonymous.outcome), Ok(b"15".to_vec()));
        let read = via_one.read("counter", br#"{"op":"get"}"#.to_vec(), Consistency::Linearizable).await.expect("read");
        assert_eq!(outcome_of(read.outcome), Ok(b"15".to_vec()));

        // A write whose answer fell out of the session window is refused,
        // never re-applied.
        for sequence in 3..40 {
            via_one.write_request(add(b"client-b", sequence)).await.expect("write");
        }
        let error = via_one.write_request(add(b"client-b", 3)).await.expect_err("expired");
        assert_eq!(error.code(), Some(Code::FailedPrecondition), "{error}");
        assert!(error.to_string().contains("outcome is unknown"), "{error}");
        // A client that says which answers it has keeps only the others; a
        // write it already has the answer to is refused, not re-applied.
        let acknowledging =
            |sequence, lowest_unanswered| WriteRequest { lowest_unanswered, ..add(b"client-c", sequence) };
        via_one.write_request(acknowledging(1, 1)).await.expect("write");
        let second = via_one.write_request(acknowledging(2, 2)).await.expect("write");
        assert_eq!(via_two.write_request(acknowledging(2, 2)).await.expect("retry"), second);
        let error = via_two.write_request(acknowledging(1, 1)).await.expect_err("answered before");
        assert_eq!(error.code(), Some(Code::FailedPrecondition), "{error}");

        // Sessions are replicated state: every member ends with the same
        // counter and the same session table behind it.
        cluster.agreed(SETTLE).await;
    });
}

#[test]
fn malformed_oversized_and_unknown_requests_get_clear_errors_and_change_nothing() {
    run(LIMIT, async {
        let cluster = Cluster::start(3, "e2e-errors");
        cluster.leader(SETTLE).await;
        let mut client = cluster.client();
        client.write("kv", put("keep", "1")).await.expect("write");

        let refused = |result: Result<_, raft_host::client::ClientError>| -> (Code, String) {
            let error = result.expect_err("refused");
            (error.code().expect("a refusal, not a timeout"), error.to_string())
        };
        let (code, message) = refused(client.write("nope", put("a", "1")).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("no state machine named \"nope\""), "{message}");

        let (code, message) = refused(client.write("", put("a", "1")).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("state_machine is empty"), "{message}");

        let huge = vec![b'x'; (1 << 20) + 1];
        let (code, message) = refused(client.write("kv", huge).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("above the limit"), "{message}");

        let too_big_for_the_wire = vec![b'x'; 3 << 20];
        let (code, _) = refused(client.write("kv", too_big_for_the_wire).await);
        assert_eq!(code, Code::OutOfRange, "the transport refuses messages past its size limit");

        let no_sequence = WriteRequest {
            state_machine: "kv".into(),
            command: put("a", "1").into(),
            client_id: b"c".to_vec().into(),
            sequence: 0,
            lowest_unanswered: 0,
        };
        let (code, message) = refused(client.write_request(no_sequence).await);
        assert_eq!(code, Code::InvalidArgument);
        assert!(message.contains("sequence number"), "{message}");

        // A command the guest cannot parse is committed and fails as its
        // outcome, identically everywhere.
        let response = client.write("kv", b"not json".to_vec()).await.expect("committed");
        let outcome = outcome_of(response.outcome).expect_err("the guest refuses it");
        assert!(outcome.contains("invalid JSON"), "{outcome}");

        // Bytes that are not a protobuf WriteRequest at all.
        let mut grpc = tonic::client::Grpc::new(cluster.channel(1));
        grpc.ready().await.expect("ready");
        let path = tonic::codegen::http::uri::PathAndQuery::from_static("/raft.client.v1.Client/Write");
        let garbage = Garbage { state_machine: 7, command: 9 };
        let codec: tonic_prost::ProstCodec<Garbage, Garbage> = tonic_prost::ProstCodec::default();
        let status = grpc.unary(tonic::Request::new(garbage), path, codec).await.expect_err("undecodable");
        assert_eq!(status.code(), Code::Internal);
        assert!(status.message().contains("decode"), "{}", status.message());

        // Nothing of it changed the state, and the cluster still serves.
        assert_eq!(read_value(&mut client, "keep", Consistency::Linearizable).await.as_deref(), Some("1"));
        assert_eq!(read_value(&mut client, "a", Consistency::Linearizable).await, None);
        let bad_query = client.read("kv", b"{".to_vec(), Consistency::Stale).await.expect("answered");
        assert!(outcome_of(bad_query.outcome).is_err());
    });
}

/// A message with the field numbers of WriteRequest but the wrong wire types.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(uint64, tag = "1")]
    state_machine: u64,
    #[prost(uint64, tag = "2")]
    command: u64,
}

#[test]
fn a_member_of_another_cluster_is_refused_and_cannot_disturb_this_one() {
    run(LIMIT, async {
        // Plaintext, chosen explicitly: only the envelope's own fields say
        // who sent it (over TLS the certificate does; see security.rs).
        let cluster = Cluster::start_plaintext(3, "e2e-home");
        let leader = cluster.leader(SETTLE).await;
        let before = cluster.status(leader).await.expect("status");

        // A forged vote request from a member of another cluster, with a huge term.
        let mut peer = RaftPeerClient::new(cluster.channel(leader));
        let vote = Message {
            term: 1_000,
            body: Some(Body::RequestVote(RequestVote {
                pre_vote: false,
                last_log_index: 1_000,
                last_log_term: 999,
                transfer: false,
            })),
        };
        let envelope = |cluster_id: &str, from| Envelope {
            cluster_id: cluster_id.into(),
            from,
            to: leader,
            messages: vec![vote.clone()],
        };
        let status = peer.deliver(envelope("elsewhere", 2)).await.expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("elsewhere"), "{}", status.message());
        // The right cluster name but a member id this cluster does not have.
        let status = peer.deliver(envelope("e2e-home", 9)).await.expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(status.message().contains("node 9"), "{}", status.message());

        // A whole process configured for another cluster, pointed at ours.
        let stranger_dir = tempfile::tempdir().expect("tempdir");
        let port = raft_host_e2e::free_port();
        let peers: Vec<String> =
            (1..=3).filter(|&id| id != 2).map(|id| format!("{id}={}", cluster.address(id))).collect();
        let mut stranger = std::process::Command::new(binary())
            .args(["serve", "--id", "2", "--cluster", "elsewhere", "--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--data-dir",
                stranger_dir.path().to_str().expect("utf-8"),
                "--tick-ms",
                "50",
                "--plaintext",
                "true",
            ])
            .args(["--peer", &peers[0], "--peer", &peers[1]])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("stranger starts");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = stranger.kill();
        let _ = stranger.wait();

        let after = cluster.status(leader).await.expect("status");
        assert_eq!(after.role, "leader", "the leader kept its role");
        assert_eq!(after.term, before.term, "no foreign message moved the term");
        let log = cluster.log_of(leader);
        assert!(log.contains("refused a peer envelope"), "refusals are logged");
        let mut client = cluster.client();
        client.write("kv", put("still", "works")).await.expect("the cluster still takes writes");
    });
}

#[test]
fn the_cli_writes_reads_reports_and_benchmarks_and_sigterm_stops_a_member_gracefully() {
    run(LIMIT, async {
        let mut cluster = Cluster::start(3, "e2e-stop");
        let leader = cluster.leader(SETTLE).await;
        let mut client: ClusterClient = cluster.client();
        client.write("kv", put("a", "1")).await.expect("write");
        cluster.converged(SETTLE).await;

        // The CLI: write, read and status --json against the running cluster.
        let cli = |args: &[&str]| {
            let mut command = std::process::Command::new(binary());
            command.args(args).envs(cluster.cli_env()).env("RUST_LOG", "warn");
            command.output().expect("cli runs")
        };
        let all = cluster.addresses().join(",");
        let written = cli(&["write", "--addr", &all, r#"{"op":"put","key":"b","value":"2"}"#]);
        assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
        assert_eq!(value_of(&written.stdout)["previous"], serde_json::Value::Null);
        let read = cli(&["read", "--addr", &all, "--consistency", "lease", r#"{"op":"get","key":"b"}"#]);
        assert_eq!(value_of(&read.stdout)["value"], "2");
        let status = cli(&["status", "--json", "--addr", &cluster.address(leader)]);
        assert!(status.status.success());
        let status = value_of(&status.stdout);
        assert_eq!(status["role"], "leader");
        assert_eq!(status["id"], leader);
        assert_eq!(status["members"].as_array().map(Vec::len), Some(3));
        assert!(status["state_machines"][1]["state_digest"].as_str().is_some_and(|d| d.len() == 64));
        let refused = cli(&["write", "--addr", &all, "--sm", "nope", "{}"]);
        assert_eq!(refused.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");

        // The benchmark tool: closed-loop clients, figures as JSON, errors counted.
        // Four clients over two shared connections, each with its own session.
        let bench = cli(&[
            "bench",
            "--addr",
            &all,
            "--clients",
            "4",
            "--connections",
            "2",
            "--duration-secs",
            "1",
            "--read-ratio",
            "0.5",
            "--json",
        ]);
        assert!(bench.status.success(), "{}", String::from_utf8_lossy(&bench.stderr));
        // One JSON object per path: batched, then unary, on the same cluster.
        let runs: Vec<serde_json::Value> =
            String::from_utf8_lossy(&bench.stdout).lines().map(|line| value_of(line.as_bytes())).collect();
        let paths: Vec<&str> = runs.iter().filter_map(|run| run["path"].as_str()).collect();
        assert_eq!(paths, ["batched", "unary"], "both paths, in one run");
        for figures in &runs {
            assert_eq!(figures["errors"], 0, "{figures}");
            assert_eq!(figures["connections"], 2, "{figures}");
            assert!(figures["writes_per_sec"].as_f64().is_some_and(|w| w > 0.0), "{figures}");
            assert!(figures["read_latency"]["p99_us"].as_u64().is_some_and(|p| p > 0), "{figures}");
            // Every member process reports the CPU it spent during the run, and
            // the leader's spends some on every write.
            let processes = figures["processes_cpu"].as_array().expect("processes_cpu");
            assert_eq!(processes.len(), 3, "three processes of one member each: {figures}");
            let leader_process =
                processes.iter().find(|p| p["members"][0]["role"] == "leader").expect("the leader's process");
            assert!(leader_process["cpu_us_per_op"].as_f64().is_some_and(|us| us > 0.0), "{figures}");
            // ...split by kind of thread, each kind once, no more than the whole
            // (within the kernel's rounding: 10 ms per thread).
            for process in processes {
                let kinds = process["threads_cpu_us_per_op"].as_object().expect("threads_cpu_us_per_op");
                let mut names: Vec<&str> = kinds.keys().map(String::as_str).collect();
                names.sort_unstable();
                assert_eq!(names, ["apply", "other", "runtime", "storage"], "{figures}");
                let sum: f64 = kinds.values().filter_map(serde_json::Value::as_f64).sum();
                let whole = process["cpu_us_per_op"].as_f64().expect("cpu_us_per_op");
                let count = |of: &str| figures[of]["count"].as_f64().unwrap_or(0.0);
                let tick_per_op = 0.01 * 1e6 / (count("write_latency") + count("read_latency")).max(1.0);
                assert!(sum <= whole + 16.0 * tick_per_op, "{sum} > {whole}: {figures}");
            }
            assert!(processes.iter().all(|p| p["resident_bytes"].as_u64().is_some_and(|b| b > 1 << 20)), "{figures}");
            assert!(figures["bench_cpu_us_per_op"].as_f64().is_some_and(|us| us > 0.0), "{figures}");
        }
        let refused = cli(&["bench", "--addr", &all, "--clients", "2", "--connections", "3"]);
        assert_eq!(refused.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&refused.stderr).contains("--connections must be between 1 and --clients"));
        let unreachable = format!("127.0.0.1:{}", raft_host_e2e::free_port());
        let bench = cli(&[
            "bench",
            "--addr",
            &unreachable,
            "--clients",
            "1",
            "--duration-secs",
            "1",
            "--path",
            "unary",
            "--json",
        ]);
        let figures = value_of(&bench.stdout);
        assert!(figures["errors"].as_u64().is_some_and(|e| e > 0), "failures are counted: {figures}");
        assert!(figures["first_error"].as_str().is_some_and(|e| e.contains("connect")), "{figures}");
        assert_eq!(figures["processes_cpu"].as_array().map(Vec::len), Some(0), "no member answered: {figures}");

        // SIGTERM: the member finishes what it does and exits 0.
        let follower = (1..=3).find(|&id| id != leader).expect("a follower");
        let exit = cluster.terminate(follower, Duration::from_secs(10)).expect("stopped in time");
        assert!(exit.success(), "exit status {exit:?}");
        let exit = cluster.terminate(leader, Duration::from_secs(10)).expect("stopped in time");
        assert!(exit.success(), "exit status {exit:?}");
    });
}

/// Whether this test runs as root, and so may raise a thread's priority back.
fn running_as_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status.lines().any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
}

#[test]
fn flushes_compactions_and_a_followers_apply_run_below_the_write_path_and_the_leaders_apply_does_not() {
    if !cfg!(target_os = "linux") {
        return;
    }
    run(LIMIT, async {
        let cluster = Cluster::start(3, "background-priority");
        let leader = cluster.leader(SETTLE).await;
        let pids: BTreeMap<u64, u32> = (1..=3).map(|id| (id, cluster.pid(id).expect("member runs"))).collect();
        // A member that may not raise a thread back says so and leaves its
        // apply task alone; as root it may, and must.
        let apply_lowered = |id: u64| {
            let unprivileged = cluster.log_of(id).contains("a follower's apply task runs at normal priority");
            assert!(!(unprivileged && running_as_root()), "member {id} thinks root may not raise a thread's priority");
            !unprivileged
        };
        // The apply task hears of leadership through a message: wait for it.
        let settled = |leader: u64| {
            pids.iter().all(|(&id, &pid)| {
                let expected = if id != leader && apply_lowered(id) { 10 } else { 0 };
                thread_nice_values(pid, "apply-") == vec![expected]
            })
        };
        let deadline = Instant::now() + SETTLE;
        while !settled(leader) {
            let seen: Vec<_> = pids.iter().map(|(&id, &pid)| (id, thread_nice_values(pid, "apply-"))).collect();
            assert!(Instant::now() < deadline, "apply threads' nice values with leader {leader}: {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (&id, &pid) in &pids {
            let workers = thread_nice_values(pid, "fjall:worker");
            assert!(!workers.is_empty() && workers.iter().all(|&nice| nice == 10), "member {id}: {workers:?}");
            let network = thread_nice_values(pid, "tokio");
            assert!(!network.is_empty() && network.iter().all(|&nice| nice == 0), "member {id}: {network:?}");
        }

        // Leadership moves: the new leader's apply task is back on the
        // write path, the old one's below it.
        let next = (1..=3).find(|&id| id != leader).expect("a follower");
        cluster.client().transfer_leader(next).await.expect("leader transfer");
        let deadline = Instant::now() + SETTLE;
        while cluster.leader(SETTLE).await != next || !settled(next) {
            let seen: Vec<_> = pids.iter().map(|(&id, &pid)| (id, thread_nice_values(pid, "apply-"))).collect();
            assert!(Instant::now() < deadline, "apply threads' nice values after moving the lead to {next}: {seen:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Writes go on meanwhile, answered by the new leader.
        let mut client = cluster.client();
        let response = client.write("kv", put("after-transfer", "yes")).await.expect("write after the transfer");
        assert!(outcome_of(response.outcome).is_ok());
    });
}
