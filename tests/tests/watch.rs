//! Change streams against real members over TLS: the events a watcher sees
//! are the committed writes, in log order, exactly once, across a member's
//! death and on any member; a start the history no longer holds is told to
//! re-read; a watcher that stops reading costs a member no memory.

use raft_host::client::{ClientError, ClusterClient, Consistency, WatchSpec, outcome_of};
use raft_host::wire::client_pb::{Change, WatchChangesRequest, client_client::ClientClient};
use raft_host_e2e::{Cluster, polyglot_guest, run};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(150);
const SETTLE: Duration = Duration::from_secs(20);

/// A committed change as the writer saw it: index, key, new value (`None`:
/// deleted).
type Written = (u64, String, Option<String>);

/// `count` writers, each `per_writer` puts and deletes on a few keys of its
/// own through `client`'s members; every acknowledged change with its index.
async fn write_concurrently(
    cluster: &Cluster,
    addresses: Vec<String>,
    state_machine: &str,
    count: usize,
    per_writer: u64,
) -> Vec<Written> {
    let tasks: Vec<_> = (0..count)
        .map(|writer| {
            let mut client = cluster.client_at(addresses.clone());
            let state_machine = state_machine.to_string();
            tokio::spawn(async move {
                client.deadline = Duration::from_secs(60);
                let mut written = Vec::new();
                for n in 0..per_writer {
                    let key = format!("w{writer}-{}", n % 3);
                    let delete = n % 4 == 3;
                    let command = if delete {
                        format!(r#"{{"op":"delete","key":"{key}"}}"#)
                    } else if n % 2 == 0 {
                        format!(r#"{{"op":"put","key":"{key}","value":"{writer}.{n}"}}"#)
                    } else {
                        // The guest does not read the key: the history
                        // still records the value it replaced.
                        format!(r#"{{"op":"put","key":"{key}","value":"{writer}.{n}","return_previous":false}}"#)
                    };
                    let response = client.write(&state_machine, command.into_bytes()).await.expect("write");
                    let answer = outcome_of(response.outcome).expect("the guest's answer");
                    let answer: serde_json::Value = serde_json::from_slice(&answer).expect("JSON answer");
                    if delete {
                        // A delete of a key that is not there is no change.
                        if answer["deleted"] == true {
                            written.push((response.index, key, None));
                        }
                    } else {
                        written.push((response.index, key, Some(format!("{writer}.{n}"))));
                    }
                }
                written
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("writer"));
    }
    all.sort();
    all
}

fn as_written(change: &Change) -> Written {
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).expect("UTF-8");
    (change.index, text(&change.key), (!change.deleted).then(|| text(&change.value)))
}

/// Reads `watch` until it has covered `index`.
async fn collect_until(watch: &mut raft_host::client::ChangeWatch, index: u64) -> Vec<Change> {
    let mut changes = Vec::new();
    while watch.covered_index() < index {
        changes.extend(watch.next().await.expect("the watch goes on").changes);
    }
    changes
}

/// Every change's previous value is the value the change before it on the
/// same key left (the watch started before the first write).
fn check_previous_values(changes: &[Change]) {
    let mut last: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
    for change in changes {
        let before = last.get(&change.key).cloned().flatten();
        assert_eq!(change.previous, before, "previous value of {:?} at {}", change.key, change.index);
        last.insert(change.key.clone(), (!change.deleted).then(|| change.value.clone()));
    }
}

fn spec(state_machine: &str, from_index: u64) -> WatchSpec {
    WatchSpec { from_index, previous_values: true, ..WatchSpec::prefix(state_machine, b"w") }
}

#[test]
fn a_watch_sees_exactly_the_committed_writes_in_log_order_on_a_follower_and_resumes_from_covered() {
    run(LIMIT, async {
        let cluster = Cluster::start(3, "e2e-watch");
        let leader = cluster.leader(SETTLE).await;
        let follower = (1..=3).find(|&id| id != leader).expect("a follower");
        // From now, linearizable, on a follower: it starts after a ReadIndex
        // taken from the leader, and before any of the writes below.
        let mut client = cluster.client_of(follower);
        let mut watch = client.watch(spec("kv", 0)).expect("watch");
        let first = watch.next().await.expect("the opening message");
        assert!(first.changes.is_empty());
        let start = watch.start_index().expect("the start is named at once");

        let written = write_concurrently(&cluster, cluster.addresses(), "kv", 6, 60).await;
        let last = written.last().expect("writes").0;
        assert!(written.iter().all(|w| w.0 >= start), "every write came after the start {start}");
        let changes = collect_until(&mut watch, last).await;
        let seen: Vec<Written> = changes.iter().map(as_written).collect();
        assert_eq!(seen, written, "the committed changes, in log order, each once");
        check_previous_values(&changes);

        // Resume by hand at a covered index + 1 on another member: the rest,
        // no gap and no repeat.
        let cut = written[written.len() / 2].0;
        let mut head_watch =
            cluster.client_of(leader).watch(WatchSpec { from_index: start, ..spec("kv", 0) }).expect("watch");
        let mut head = Vec::new();
        while head_watch.covered_index() < cut {
            head.extend(head_watch.next().await.expect("watch").changes);
        }
        let covered = head_watch.covered_index();
        drop(head_watch);
        let other = (1..=3).find(|&id| id != leader && id != follower).expect("a third member");
        let mut rest_watch = cluster.client_of(other).watch(spec("kv", covered + 1)).expect("watch");
        let mut joined = head;
        joined.extend(collect_until(&mut rest_watch, last).await);
        assert_eq!(joined, changes, "resumed at covered + 1 on another member: the same changes");

        // The CLI prints the same, as JSON, from any member.
        let output = Command::new(raft_host_e2e::binary())
            .envs(cluster.cli_env())
            .args(["watch", "--addr", &cluster.address(other), "--json", "--prefix", "w"])
            .args(["--from-index", &start.to_string(), "--count", &written.len().to_string()])
            .output()
            .expect("raft-host watch runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let printed: Vec<Written> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| {
                let event: serde_json::Value = serde_json::from_str(line).expect("one JSON object a line");
                let value = event["value"].as_str().map(str::to_string);
                assert_eq!(event["type"], if value.is_some() { "put" } else { "delete" }, "{line}");
                (event["index"].as_u64().expect("index"), event["key"].as_str().expect("key").to_string(), value)
            })
            .collect();
        assert_eq!(printed, written);
    });
}

#[test]
fn a_watch_goes_on_from_its_index_on_another_member_when_its_member_is_killed() {
    run(LIMIT, async {
        let mut cluster = Cluster::start(3, "e2e-watch-kill");
        let leader = cluster.leader(SETTLE).await;
        let others: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
        // Connected to the leader first; the others to fall back on.
        let mut addresses = vec![cluster.address(leader)];
        addresses.extend(others.iter().map(|&id| cluster.address(id)));
        let mut client = cluster.client_at(addresses);
        let mut watch = client.watch(spec("kv", 1)).expect("watch");
        watch.next().await.expect("the opening message");

        let before = write_concurrently(&cluster, cluster.addresses(), "kv", 4, 40).await;
        let mut changes = collect_until(&mut watch, before.last().expect("writes").0).await;
        cluster.kill(leader);
        let survivors: Vec<String> = others.iter().map(|&id| cluster.address(id)).collect();
        let after = write_concurrently(&cluster, survivors, "kv", 4, 40).await;
        changes.extend(collect_until(&mut watch, after.last().expect("writes").0).await);
        assert!(watch.reconnects >= 1, "the watch moved to another member");

        let mut written = before;
        written.extend(after);
        let seen: Vec<Written> = changes.iter().map(as_written).collect();
        assert_eq!(seen, written, "no gap, no repeat across the kill");
        check_previous_values(&changes);
    });
}

#[test]
fn a_watch_from_before_the_history_is_told_to_re_read_and_bad_watches_are_refused() {
    run(LIMIT, async {
        let cluster = Cluster::start_with(3, "e2e-watch-compacted", &["--watch-history-entries", "20"]);
        cluster.leader(SETTLE).await;
        let written = write_concurrently(&cluster, cluster.addresses(), "kv", 8, 60).await;
        let last = written.last().expect("writes").0;
        cluster.converged(SETTLE).await;

        let mut client = cluster.client();
        let mut old = client.watch(spec("kv", 1)).expect("watch");
        let floor = match old.next().await {
            Err(ClientError::Compacted { floor, message }) => {
                assert!(message.contains("compacted") && message.contains("re-read"), "{message}");
                floor
            }
            other => panic!("a start the history no longer holds is refused, not {other:?}"),
        };
        assert!(floor > 1 && floor < last, "floor {floor} of {last}");
        // From the floor on, the history answers: exactly the writes after it.
        let mut kept = client.watch(spec("kv", floor + 1)).expect("watch");
        let seen: Vec<Written> = collect_until(&mut kept, last).await.iter().map(as_written).collect();
        let expected: Vec<Written> = written.iter().filter(|w| w.0 > floor).cloned().collect();
        assert_eq!(seen, expected);

        let output = Command::new(raft_host_e2e::binary())
            .envs(cluster.cli_env())
            .args(["watch", "--addr", &cluster.address(1), "--from-index", "1"])
            .output()
            .expect("raft-host watch runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains("compacted"), "{stderr}");

        // Malformed watches: a clear INVALID_ARGUMENT each.
        let mut raw = ClientClient::new(cluster.channel(1));
        let good = WatchChangesRequest { state_machine: "kv".into(), ..Default::default() };
        let bad = [
            WatchChangesRequest { state_machine: String::new(), ..good.clone() },
            WatchChangesRequest { state_machine: "x".repeat(65), ..good.clone() },
            WatchChangesRequest { prefix: b"a".to_vec(), range_start: b"b".to_vec(), ..good.clone() },
            WatchChangesRequest { range_start: b"b".to_vec(), range_end: b"a".to_vec(), ..good.clone() },
            WatchChangesRequest { prefix: vec![b'k'; 5000], ..good.clone() },
            WatchChangesRequest { consistency: Consistency::Lease.into(), ..good.clone() },
            WatchChangesRequest { consistency: 99, ..good.clone() },
        ];
        for request in bad {
            let status = raw.watch_changes(request.clone()).await.expect_err("refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{request:?}: {}", status.message());
        }
    });
}

/// The size of each value [`write_big_values`] writes.
const BIG_VALUE_BYTES: usize = 16 << 10;

/// `count` puts of 16 KiB values (keys `{prefix}-{writer}-{n}`) by 16
/// concurrent clients; returns once every member has applied them.
async fn write_big_values(cluster: &Cluster, prefix: &str, count: usize) {
    let value = "v".repeat(BIG_VALUE_BYTES);
    let mut writers = Vec::new();
    for writer in 0..16 {
        let mut client = cluster.client();
        let (value, prefix) = (value.clone(), prefix.to_string());
        writers.push(tokio::spawn(async move {
            for n in 0..count / 16 {
                let command = format!(r#"{{"op":"put","key":"{prefix}-{writer}-{n}","value":"{value}"}}"#);
                client.write("kv", command.into_bytes()).await.expect("write");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    cluster.converged(SETTLE).await;
}

/// A member's resident memory once background flushes have settled: the
/// median of five readings a second apart (one reading swings by the
/// memtables being flushed at that moment).
async fn settled_resident(cluster: &Cluster, id: u64) -> i64 {
    let mut readings = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        readings.push(cluster.status(id).await.expect("status").process_resident_bytes as i64);
    }
    readings.sort_unstable();
    readings[2]
}

#[test]
fn a_watcher_that_stops_reading_costs_no_memory_and_is_then_served_from_the_store() {
    run(LIMIT, async {
        let cluster = Cluster::start_with(3, "e2e-watch-slow", &["--watch-history-bytes", "536870912"]);
        let leader = cluster.leader(SETTLE).await;
        let (stalled, idle) = {
            let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
            (followers[0], followers[1])
        };
        let mut raw = ClientClient::new(cluster.channel(stalled)).max_decoding_message_size(16 << 20);
        let request = WatchChangesRequest { state_machine: "kv".into(), previous_values: true, ..Default::default() };
        let mut stream = raw.watch_changes(request).await.expect("watch").into_inner();
        let opening = stream.message().await.expect("message").expect("the opening message");
        let start = opening.start_index;

        // The watcher reads nothing from here on. A first 32 MiB brings both
        // followers' memtables, caches and allocator to their working size;
        // then the next 128 MiB is what a server that kept a stalled
        // watcher's changes would hold on to, on one follower only. Members
        // that keep nothing still differ by up to ~30 MiB (what the
        // allocator and the stream's buffers happen to hold at a reading),
        // so the lag is four times that and half of it is allowed.
        const WARM_UP: usize = 2048;
        const WRITES: usize = 8192;
        const LAG_BYTES: i64 = (WRITES * BIG_VALUE_BYTES) as i64;
        write_big_values(&cluster, "warm", WARM_UP).await;
        let (stalled_before, idle_before) =
            (settled_resident(&cluster, stalled).await, settled_resident(&cluster, idle).await);
        write_big_values(&cluster, "big", WRITES).await;
        let stalled_growth = settled_resident(&cluster, stalled).await - stalled_before;
        let idle_growth = settled_resident(&cluster, idle).await - idle_before;
        eprintln!(
            "resident growth over {} MiB of lag: stalled watcher's member {} MiB, idle member {} MiB",
            LAG_BYTES >> 20,
            stalled_growth >> 20,
            idle_growth >> 20
        );
        assert!(
            stalled_growth < idle_growth + LAG_BYTES / 2,
            "a stalled watcher's member grew {stalled_growth} bytes, one without {idle_growth}: changes piled up in memory"
        );

        // Reading again, the watcher gets every change, from the store.
        let started = Instant::now();
        let mut seen = 0;
        while seen < WARM_UP + WRITES {
            let message = stream.message().await.expect("message").expect("more changes");
            for change in &message.changes {
                assert!(change.index >= start && change.value.len() == BIG_VALUE_BYTES);
                assert!(change.key.starts_with(b"warm-") || change.key.starts_with(b"big-"));
                assert_eq!(change.previous, None, "every key was new");
            }
            seen += message.changes.len();
        }
        assert_eq!(seen, WARM_UP + WRITES);
        eprintln!("{seen} changes of 16 KiB read back in {:?}", started.elapsed());
    });
}

#[test]
fn a_python_guest_s_changes_are_watched_like_the_rust_kv_s() {
    let module = polyglot_guest("python-kv", "python_kv.wasm");
    run(LIMIT, async move {
        let cluster = Cluster::start(3, "e2e-watch-python");
        cluster.leader(SETTLE).await;
        let mut client: ClusterClient = cluster.client();
        let deployed = client.deploy("pykv", &module, true, |_| {}).await.expect("deploy the Python guest");
        assert_eq!(deployed.phase, "activated");
        let mut watch = client.watch(spec("pykv", 0)).expect("watch");
        watch.next().await.expect("the opening message");
        let written = write_concurrently(&cluster, cluster.addresses(), "pykv", 4, 30).await;
        let changes = collect_until(&mut watch, written.last().expect("writes").0).await;
        let seen: Vec<Written> = changes.iter().map(as_written).collect();
        assert_eq!(seen, written, "every committed change of the Python guest, in order, once");
        check_previous_values(&changes);
    });
}
