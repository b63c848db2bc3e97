//! A member run in this process through the library: back-pressure and the
//! refusal of a data directory that belongs to another member.

use raft_host::client::{ClientError, ClusterClient, Consistency, outcome_of};
use raft_host::node::NodeError;
use raft_host::server::{Server, ServerConfig, ServerError};
use raft_host::storage::StoreError;
use std::time::Duration;
use tonic::Code;

fn single_member(dir: &std::path::Path) -> ServerConfig {
    let mut config = ServerConfig::new(1, "in-process", "127.0.0.1:0".parse().expect("address"), dir.to_path_buf());
    config.node.tick = Duration::from_millis(10);
    config
}

/// A single member that also serves metrics, on a port of its choosing.
async fn start_with_metrics(dir: &std::path::Path) -> Server {
    let mut config = single_member(dir);
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    Server::start(config).await.expect("starts")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime")
}

#[test]
fn a_full_member_answers_busy_and_the_client_gives_up_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let mut config = single_member(dir.path());
        config.max_pending_requests = 0;
        let node = Server::start(config).await.expect("starts");
        let mut client = ClusterClient::new(vec![node.local_addr().to_string()]).expect("client");
        client.deadline = Duration::from_millis(300);
        let error = client.write("kv", br#"{"op":"put","key":"a","value":"1"}"#.to_vec()).await.expect_err("busy");
        match &error {
            ClientError::GaveUp { attempts, last, .. } => {
                assert!(*attempts > 1, "busy is retried");
                assert!(last.contains("busy"), "{last}");
            }
            other => panic!("expected retries to run out, got {other}"),
        }
        node.shutdown();
        node.wait().await.expect("clean stop");
    });
}

#[test]
fn a_single_member_serves_writes_and_keeps_them_across_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime();
    let first = rt.block_on(async {
        let node = Server::start(single_member(dir.path())).await.expect("starts");
        let mut client = ClusterClient::new(vec![node.local_addr().to_string()]).expect("client");
        let put = client.write("kv", br#"{"op":"put","key":"a","value":"1"}"#.to_vec()).await.expect("write");
        assert_eq!(outcome_of(put.outcome), Ok(br#"{"previous":null}"#.to_vec()));
        let status = client.status().await.expect("status");
        assert_eq!(status.role, "leader");
        node.shutdown();
        node.wait().await.expect("clean stop");
        status
    });
    rt.block_on(async {
        let node = Server::start(single_member(dir.path())).await.expect("restarts");
        let mut client = ClusterClient::new(vec![node.local_addr().to_string()]).expect("client");
        let read = client.read("kv", br#"{"op":"get","key":"a"}"#.to_vec(), Consistency::Linearizable).await;
        assert_eq!(outcome_of(read.expect("read").outcome), Ok(br#"{"value":"1"}"#.to_vec()));
        let status = client.status().await.expect("status");
        let digest = |s: &raft_host::wire::client_pb::StatusResponse| s.state_machines.clone();
        assert_eq!(digest(&status), digest(&first), "nothing was applied twice or lost");
        assert!(status.term > first.term, "a restart elects anew");
        // Requests the service refuses before the core sees them.
        let refused = client.write("kv", vec![b'x'; (1 << 20) + 1]).await.expect_err("too large");
        assert_eq!(refused.code(), Some(Code::InvalidArgument));
        node.shutdown();
        node.wait().await.expect("clean stop");
    });
    // The same directory as another member, or of another cluster: refused.
    rt.block_on(async {
        let mut other = single_member(dir.path());
        other.node.id = 2;
        let error = Server::start(other).await.err().expect("refused");
        assert!(matches!(error, ServerError::Node(NodeError::Store(StoreError::WrongNode { .. }))), "{error}");
        let mut other = single_member(dir.path());
        other.node.cluster_id = "elsewhere".into();
        let error = Server::start(other).await.err().expect("refused");
        assert!(matches!(error, ServerError::Node(NodeError::Store(StoreError::WrongCluster { .. }))), "{error}");
        // Once bootstrapped, the store decides the membership (changes go
        // through the log), not the --peer flags of a restart.
        let mut grown = single_member(dir.path());
        grown.node.peers.insert(2, "127.0.0.1:1".into());
        let node = Server::start(grown).await.expect("starts with its stored membership");
        let mut client = ClusterClient::new(vec![node.local_addr().to_string()]).expect("client");
        let members = client.members().await.expect("members");
        assert_eq!(members.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![1]);
        node.shutdown();
        node.wait().await.expect("clean stop");
    });
}

#[test]
fn a_member_over_its_apply_backlog_limit_pauses_and_loses_no_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let mut config = single_member(dir.path());
        // Every batch handed to the apply task fills the backlog: the core
        // holds the next back until the apply task reports it drained.
        config.node.max_apply_backlog_bytes = 1;
        let node = Server::start(config).await.expect("starts");
        let address = node.local_addr().to_string();
        let writers: Vec<_> = (0..8)
            .map(|writer| {
                let address = address.clone();
                tokio::spawn(async move {
                    let mut client = ClusterClient::new(vec![address]).expect("client");
                    for i in 0..25 {
                        let command = format!(r#"{{"op":"put","key":"w{writer}-{i}","value":"{i}"}}"#);
                        client.write("kv", command.into_bytes()).await.expect("write");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
        let mut client = ClusterClient::new(vec![address]).expect("client");
        for writer in 0..8 {
            let command = format!(r#"{{"op":"get","key":"w{writer}-24"}}"#);
            let read = client.read("kv", command.into_bytes(), Consistency::Linearizable).await.expect("read");
            assert_eq!(outcome_of(read.outcome), Ok(br#"{"value":"24"}"#.to_vec()));
        }
        node.shutdown();
        node.wait().await.expect("clean stop");
    });
}

#[test]
fn a_member_stops_while_a_scraper_keeps_its_metrics_connection_open() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let node = start_with_metrics(dir.path()).await;
        // A scraper on HTTP/1.1 keep-alive: after its answer, the connection
        // (and what serves it) stays up, waiting for the next scrape.
        let mut scraper = tokio::net::TcpStream::connect(node.metrics_addr().expect("metrics")).await.expect("connect");
        scraper.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").await.expect("send");
        let mut answer = vec![0; 4096];
        let read = scraper.read(&mut answer).await.expect("an answer");
        assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 200"), "a scrape is answered");
        node.shutdown();
        let stopped = tokio::time::timeout(Duration::from_secs(20), node.wait()).await;
        stopped.expect("the member stops although the scraper's connection is open").expect("clean stop");
        drop(scraper);
    });
}

/// `GET path` over plain HTTP/1.0; the status line and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a complete response");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

#[test]
fn metrics_are_served_in_the_prometheus_text_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let node = start_with_metrics(dir.path()).await;
        let metrics = node.metrics_addr().expect("metrics are served");
        let mut client = ClusterClient::new(vec![node.local_addr().to_string()]).expect("client");
        for n in 0..3 {
            client
                .write("kv", format!(r#"{{"op":"put","key":"k{n}","value":"v"}}"#).into_bytes())
                .await
                .expect("write");
        }
        client.write("nope", b"{}".to_vec()).await.expect_err("unknown state machine");
        let (status, body) = http_get(metrics, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        let value = |line_start: &str| -> u64 {
            let line =
                body.lines().find(|l| l.starts_with(line_start)).unwrap_or_else(|| panic!("{line_start}: {body}"));
            line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
        };
        assert_eq!(value("raft_host_role{role=\"leader\"}"), 1);
        assert_eq!(value("raft_host_leader_id "), 1);
        assert!(value("raft_host_applied_index ") >= 4, "three writes and the leader's no-op");
        assert_eq!(value("raft_host_client_requests_total{method=\"write\",code=\"Ok\"}"), 3);
        assert_eq!(value("raft_host_client_requests_total{method=\"write\",code=\"InvalidArgument\"}"), 1);
        assert!(body.contains("raft_host_state_machine_info{name=\"kv\",module=\""), "{body}");
        assert_eq!(value("raft_host_offline "), 0);
        assert_eq!(value("raft_host_modules_in_memory "), 2, "the built-in kv and counter");
        assert_eq!(value("raft_host_learners "), 0);
        assert_eq!(value("raft_host_snapshot_index "), 0, "nothing compacted yet");
        assert_eq!(value("raft_host_snapshots_sent_total "), 0);
        assert_eq!(value("raft_host_snapshot_receiving_bytes "), 0);
        // The process has started a runtime, compiled a guest and served
        // writes: it has used CPU and holds more than a few MB.
        assert!(value("process_resident_memory_bytes ") > 4 << 20);
        let cpu = body.lines().find_map(|l| l.strip_prefix("process_cpu_seconds_total ")).expect("cpu line");
        let cpu: f64 = cpu.parse().expect("seconds");
        assert!(cpu > 0.0, "{cpu}");
        // Each kind of thread once; together about the process's figure or
        // less (that one also holds threads that exited unseen; the kernel
        // rounds each thread's time and the process's apart).
        let kinds: Vec<(&str, f64)> = body
            .lines()
            .filter_map(|l| l.strip_prefix("raft_host_thread_cpu_seconds_total{kind=\""))
            .filter_map(|l| l.split_once("\"} "))
            .map(|(kind, seconds)| (kind, seconds.parse().expect("seconds")))
            .collect();
        assert_eq!(kinds.iter().map(|(kind, _)| *kind).collect::<Vec<_>>(), ["apply", "runtime", "storage", "other"]);
        assert!(kinds.iter().map(|(_, s)| s).sum::<f64>() <= cpu * 1.05 + 0.05, "{kinds:?} vs {cpu}");
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("name and value");
            assert!(name.starts_with("raft_host_") || name.starts_with("process_"), "{line}");
            value.parse::<f64>().unwrap_or_else(|_| panic!("not a number: {line}"));
        }
        let (status, _) = http_get(metrics, "/elsewhere").await;
        assert!(status.contains("404"), "{status}");
        node.shutdown();
        node.wait().await.expect("clean stop");
    });
}
