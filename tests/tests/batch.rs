//! The batched client protocol against real members over TLS: many callers
//! coalesced onto one stream per connection, each answered exactly as the
//! unary call would answer it, and a raw stream in which items fail one by
//! one without ending the stream.

use raft_host::client::{ClusterClient, Consistency, outcome_of};
use raft_host::wire::client_pb::{
    BatchItem, BatchRequest, BatchResponse, ReadRequest, WriteRequest, batch_answer, batch_item,
    client_client::ClientClient,
};
use raft_host_e2e::{Cluster, get, metric, put, read_value, run, tls_transport};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

/// Reads a raw batch stream until `count` items are answered, by item id.
async fn answers_by_id(
    answers: &mut tonic::Streaming<BatchResponse>,
    count: usize,
) -> BTreeMap<u64, batch_answer::Answer> {
    let mut got = BTreeMap::new();
    while got.len() < count {
        let response = answers.message().await.expect("answers").expect("more answers");
        for answer in response.answers {
            got.insert(answer.id, answer.answer.expect("an answer"));
        }
    }
    got
}

/// The code and message of item `id`'s error answer.
fn error_of(got: &BTreeMap<u64, batch_answer::Answer>, id: u64) -> (tonic::Code, String) {
    match &got[&id] {
        batch_answer::Answer::Error(error) => (tonic::Code::from(error.code), error.message.clone()),
        other => panic!("item {id} should have failed: {other:?}"),
    }
}

#[test]
fn many_callers_on_one_connection_share_batch_messages_and_every_write_is_applied_once() {
    let cluster = Cluster::start(3, "batch-callers");
    run(LIMIT, async {
        let leader = cluster.leader(Duration::from_secs(20)).await;
        // Start at a follower: its answers name the leader, and the callers
        // move there, batching all the way.
        let follower = if leader == 1 { 2 } else { 1 };
        let mut first = cluster.client_at(vec![cluster.address(follower), cluster.address(leader)]);
        assert!(first.batching, "batching is the default");
        let mut tasks = Vec::new();
        for caller in 0..128 {
            let mut client = first.sharing_connections().expect("a client on the same connection");
            tasks.push(tokio::spawn(async move {
                for n in 0..25 {
                    let answer = client.write("kv", put(&format!("c{caller}-{n}"), &format!("{n}"))).await;
                    assert!(answer.is_ok(), "caller {caller} write {n}: {answer:?}");
                }
                let value = read_value(&mut client, &format!("c{caller}-24"), Consistency::Linearizable).await;
                assert_eq!(value.as_deref(), Some("24"), "caller {caller} reads its last write");
            }));
        }
        for task in tasks {
            task.await.expect("a caller");
        }
        let statuses = cluster.agreed(Duration::from_secs(20)).await;
        // 128 × 25 writes, one entry each (plus the leader's own entries).
        assert!(statuses[0].applied_index >= 3_200, "{}", statuses[0].applied_index);
        for key in ["c0-0", "c77-13", "c127-24"] {
            assert!(read_value(&mut first, key, Consistency::Linearizable).await.is_some(), "{key}");
        }
        // The leader took them in far fewer messages than items.
        let metrics = cluster.metrics(leader);
        let messages = metric(&metrics, "raft_host_client_batch_items_count").unwrap_or(0.0);
        let items = metric(&metrics, "raft_host_client_batch_items_sum").unwrap_or(0.0);
        assert!(items >= 3_000.0, "the leader answered the writes over Batch: {items} items");
        assert!(messages * 2.0 < items, "{items} items came in {messages} messages: coalesced");
        let writes_ok = "raft_host_client_requests_total{method=\"write\",code=\"Ok\"}";
        assert!(metric(&metrics, writes_ok).unwrap_or(0.0) >= 3_000.0, "batched items are counted as writes");
        // And proposed to the core a message at a time, not one by one.
        let proposals = metric(&metrics, "raft_host_client_batch_writes_proposed_together_count").unwrap_or(0.0);
        let together = metric(&metrics, "raft_host_client_batch_writes_proposed_together_sum").unwrap_or(0.0);
        assert!(together >= 3_000.0, "the leader proposed the batched writes together: {together}");
        assert!(proposals * 2.0 < together, "{together} writes in {proposals} proposals");
    });
}

#[test]
fn a_follower_forwards_the_items_it_is_sent_to_the_leader_on_a_batch_stream_of_its_own() {
    let cluster = Cluster::start(3, "batch-forward");
    run(LIMIT, async {
        let leader = cluster.leader(Duration::from_secs(20)).await;
        let follower = if leader == 1 { 2 } else { 1 };
        let mut grpc = ClientClient::new(cluster.channel(follower));
        let (sender, requests) = tokio::sync::mpsc::channel(8);
        let mut answers =
            grpc.batch(tokio_stream::wrappers::ReceiverStream::new(requests)).await.expect("stream").into_inner();
        let item = |id: u64| BatchItem {
            id,
            request_id: String::new(),
            request: Some(batch_item::Request::Write(WriteRequest {
                state_machine: "kv".into(),
                command: put(&format!("f{id}"), "x").into(),
                // A session of its own per item: one session keeps only 32
                // answers, and these are all under way at once.
                client_id: format!("forwarding-test-{id}").into_bytes().into(),
                sequence: 1,
                lowest_unanswered: 1,
            })),
        };
        for message in 0..5u64 {
            let items = (1..=200).map(|n| item(message * 200 + n)).collect();
            sender.send(BatchRequest { items }).await.expect("send");
        }
        let mut answered = 0;
        while answered < 1_000 {
            let response = answers.message().await.expect("answers").expect("more answers");
            for answer in response.answers {
                match answer.answer {
                    Some(batch_answer::Answer::Write(write)) => assert!(write.index > 0),
                    other => panic!("item {}: {other:?}", answer.id),
                }
                assert_eq!(answer.leader_addr, cluster.address(leader), "the answer names the leader");
                answered += 1;
            }
        }
        drop(sender);
        cluster.agreed(Duration::from_secs(20)).await;
        let leader_metrics = cluster.metrics(leader);
        let items = metric(&leader_metrics, "raft_host_client_batch_items_sum").unwrap_or(0.0);
        let messages = metric(&leader_metrics, "raft_host_client_batch_items_count").unwrap_or(0.0);
        assert!(items >= 1_000.0, "the leader took the forwarded writes over Batch: {items}");
        assert!(messages * 4.0 < items, "{items} forwarded items in {messages} messages: coalesced");
        let mut client = cluster.client();
        for key in ["f1", "f777", "f1000"] {
            assert_eq!(read_value(&mut client, key, Consistency::Linearizable).await.as_deref(), Some("x"), "{key}");
        }
    });
}

#[test]
fn each_item_of_a_raw_batch_stream_gets_its_own_answer_or_error_and_the_stream_goes_on() {
    let cluster = Cluster::start(3, "batch-raw");
    run(LIMIT, async {
        let leader = cluster.leader(Duration::from_secs(20)).await;
        let mut admin = cluster.client();
        admin.write("kv", put("seen", "yes")).await.expect("write");
        // A reader may read through Batch, but its writes are refused, item by item.
        let dir = cluster.certs_dir().expect("TLS").to_path_buf();
        let made = Command::new(raft_host_e2e::binary())
            .args(["certs", "client", "--dir", dir.to_str().expect("utf-8"), "--name", "viewer", "--role", "reader"])
            .output()
            .expect("certs");
        assert!(made.status.success());
        let channel = tls_transport(&dir, "client-viewer").channel(&cluster.address(leader)).expect("channel");
        let mut grpc = ClientClient::new(channel);
        let (sender, requests) = tokio::sync::mpsc::channel(4);
        let mut answers =
            grpc.batch(tokio_stream::wrappers::ReceiverStream::new(requests)).await.expect("stream").into_inner();
        let read = |id, state_machine: &str| BatchItem {
            id,
            request_id: format!("raw-{id}"),
            request: Some(batch_item::Request::Read(ReadRequest {
                state_machine: state_machine.into(),
                query: get("seen"),
                consistency: Consistency::Linearizable as i32,
            })),
        };
        let write = BatchItem {
            id: 2,
            request_id: String::new(),
            request: Some(batch_item::Request::Write(WriteRequest {
                state_machine: "kv".into(),
                command: put("seen", "overwritten").into(),
                ..WriteRequest::default()
            })),
        };
        let items = vec![
            read(1, "kv"),
            write,
            BatchItem { id: 3, request: None, request_id: String::new() },
            read(4, "no-such-machine"),
        ];
        sender.send(BatchRequest { items }).await.expect("send");
        let got = answers_by_id(&mut answers, 4).await;
        match &got[&1] {
            batch_answer::Answer::Read(response) => {
                assert_eq!(outcome_of(response.outcome.clone()), Ok(br#"{"value":"yes"}"#.to_vec()));
            }
            other => panic!("item 1: {other:?}"),
        }
        let error = |id: u64| error_of(&got, id);
        let (code, message) = error(2);
        assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
        assert!(message.contains("writer"), "names the role it needs: {message}");
        assert_eq!(error(3).0, tonic::Code::InvalidArgument);
        let (code, message) = error(4);
        assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
        assert!(message.contains("no-such-machine"), "{message}");
        // The stream carries on after the errors.
        sender.send(BatchRequest { items: vec![read(5, "kv")] }).await.expect("send again");
        let response = answers.message().await.expect("answers").expect("an answer");
        assert_eq!(response.answers[0].id, 5);
        drop(sender);
        assert!(
            answers.message().await.expect("clean end").is_none(),
            "the member ends the stream when the client does"
        );
        assert_eq!(read_value(&mut admin, "seen", Consistency::Linearizable).await.as_deref(), Some("yes"));
    });
}

#[test]
fn the_unary_path_still_serves_a_client_that_turns_batching_off() {
    let cluster = Cluster::start(3, "batch-unary");
    run(LIMIT, async {
        let leader = cluster.leader(Duration::from_secs(20)).await;
        // The leader itself, so nothing is forwarded (a follower forwards
        // over Batch whatever path its client took).
        let mut client: ClusterClient = cluster.client_of(leader);
        client.batching = false;
        client.write("kv", put("plain", "1")).await.expect("unary write");
        assert_eq!(read_value(&mut client, "plain", Consistency::Lease).await.as_deref(), Some("1"));
        let metrics = cluster.metrics(leader);
        assert_eq!(
            metric(&metrics, "raft_host_client_batch_items_count").unwrap_or(0.0),
            0.0,
            "nothing came over Batch"
        );
    });
}

#[test]
fn the_bench_against_etcd_refuses_what_it_cannot_measure_with_a_clear_error() {
    let bench = |extra: &[&str]| {
        let output = Command::new(raft_host_e2e::binary())
            .args(["bench", "--etcd", "--clients", "1", "--duration-secs", "1"])
            .args(extra)
            .output()
            .expect("raft-host runs");
        assert!(!output.status.success(), "{extra:?} should fail");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let reads = bench(&["--read-ratio", "0.5", "--addr", "127.0.0.1:1"]);
    assert!(reads.contains("--etcd measures writes only"), "{reads}");
    // Nothing listens on port 1 of loopback.
    let nobody = bench(&["--addr", "127.0.0.1:1"]);
    assert!(nobody.contains("connecting to etcd at 127.0.0.1:1"), "{nobody}");
}

/// `tests/compare-etcd.sh` (Debian's etcd-server, installed if missing, and
/// three `raft-host serve` members, side by side) when `RAFT_ETCD_COMPARE=1` asks for it:
/// it installs a package and runs for a while, so not in the default suite.
#[test]
fn etcd_and_raft_host_run_side_by_side_when_asked() {
    if std::env::var_os("RAFT_ETCD_COMPARE").is_none() {
        eprintln!("skipped: set RAFT_ETCD_COMPARE=1 to run tests/compare-etcd.sh");
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("compare-etcd.sh");
    let output = Command::new(script)
        .env("RAFT_HOST_BIN", raft_host_e2e::binary())
        .env("RAFT_COMPARE_SECS", "2")
        .env("RAFT_COMPARE_CLIENTS", "1 16")
        .env("RAFT_COMPARE_PATHS", "batched")
        .output()
        .expect("the script runs");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}\n{}", String::from_utf8_lossy(&output.stderr));
    for system in ["| etcd |", "| raft-host (batched) |"] {
        let rows: Vec<&str> = table.lines().filter(|line| line.contains(system)).collect();
        assert_eq!(rows.len(), 2, "one row per client count for {system}:\n{table}");
        for row in rows {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let writes: f64 = cells[3].replace(',', "").parse().expect("writes/s");
            assert!(writes > 0.0, "{row}");
            assert_eq!(cells[7], "0", "no errors: {row}");
        }
    }
    assert!(table.contains("x etcd's writes/s"), "{table}");
}

#[test]
fn writes_of_one_message_proposed_together_are_each_answered_on_their_own() {
    let cluster = Cluster::start(3, "batch-together");
    run(LIMIT, async {
        let leader = cluster.leader(Duration::from_secs(20)).await;
        let dir = cluster.certs_dir().expect("TLS").to_path_buf();
        let channel = tls_transport(&dir, "client-admin").channel(&cluster.address(leader)).expect("channel");
        let mut grpc = ClientClient::new(channel);
        let (sender, requests) = tokio::sync::mpsc::channel(4);
        let mut answers =
            grpc.batch(tokio_stream::wrappers::ReceiverStream::new(requests)).await.expect("stream").into_inner();
        let write = |id: u64, state_machine: &str, key: &str, client_id: &[u8], sequence: u64| BatchItem {
            id,
            request_id: format!("together-{id}"),
            request: Some(batch_item::Request::Write(WriteRequest {
                state_machine: state_machine.into(),
                command: put(key, &format!("v{id}")).into(),
                client_id: client_id.to_vec().into(),
                sequence,
                ..WriteRequest::default()
            })),
        };
        // Good writes around refused ones, and a retry of a session's
        // write inside the same message.
        let items = vec![
            write(1, "kv", "t1", b"", 0),
            write(2, "no-such-machine", "t2", b"", 0),
            write(3, "kv", "t3", b"session-a", 0),
            write(4, "kv", "t4", b"session-b", 1),
            write(5, "kv", "t4", b"session-b", 1),
            write(6, "kv", "t6", b"", 0),
        ];
        sender.send(BatchRequest { items }).await.expect("send");
        let got = answers_by_id(&mut answers, 6).await;
        let written = |id: u64| match &got[&id] {
            batch_answer::Answer::Write(response) => response.clone(),
            other => panic!("item {id} should have been written: {other:?}"),
        };
        let refused = |id: u64| error_of(&got, id);
        let (code, message) = refused(2);
        assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
        assert!(message.contains("no-such-machine"), "{message}");
        let (code, message) = refused(3);
        assert_eq!(code, tonic::Code::InvalidArgument, "{message}");
        assert!(message.contains("sequence number"), "{message}");
        let (first, retry) = (written(4), written(5));
        assert_eq!((first.index, first.outcome.clone()), (retry.index, retry.outcome.clone()), "one entry, one answer");
        let (one, six) = (written(1), written(6));
        assert!(one.index < first.index && first.index < six.index, "in the message's order");
        drop(sender);
        let mut client = cluster.client();
        assert_eq!(read_value(&mut client, "t1", Consistency::Linearizable).await.as_deref(), Some("v1"));
        assert_eq!(read_value(&mut client, "t4", Consistency::Linearizable).await.as_deref(), Some("v4"));
        assert_eq!(read_value(&mut client, "t2", Consistency::Linearizable).await, None);
        assert_eq!(read_value(&mut client, "t3", Consistency::Linearizable).await, None);
    });
}

#[test]
fn concurrent_linearizable_reads_share_read_index_rounds() {
    let cluster = Cluster::start(3, "batch-reads");
    run(LIMIT, async {
        let leader = cluster.leader(Duration::from_secs(20)).await;
        let mut first = cluster.client_at(vec![cluster.address(leader)]);
        first.write("kv", put("shared", "v")).await.expect("write");
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let mut client = first.sharing_connections().expect("a client on the same connection");
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    let value = read_value(&mut client, "shared", Consistency::Linearizable).await;
                    assert_eq!(value.as_deref(), Some("v"), "every read sees the write");
                }
            }));
        }
        for task in tasks {
            task.await.expect("a reader");
        }
        let metrics = cluster.metrics(leader);
        let rounds = metric(&metrics, "raft_host_read_index_reads_count").unwrap_or(0.0);
        let reads = metric(&metrics, "raft_host_read_index_reads_sum").unwrap_or(0.0);
        assert!(reads >= 64.0 * 20.0, "the leader ran the reads through ReadIndex: {reads}");
        assert!(rounds * 2.0 < reads, "{reads} reads took {rounds} rounds");
    });
}
