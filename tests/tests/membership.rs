//! Membership, snapshots and leadership on clusters of real processes: grow
//! 3 -> 5 and shrink back under writes, remove the leader, move leadership
//! (by request and on SIGTERM), take a member offline, wipe a member and
//! bring it back by snapshot, and move a state of over 100 MB by snapshot.
//! Every scenario ends with equal state digests and no failed write.

use raft_host::client::Consistency;
use raft_host::wire::client_pb::{MembershipChange, StatusResponse};
use raft_host_e2e::{Cluster, Writers, binary, put, read_value, run};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(300);
const SETTLE: Duration = Duration::from_secs(60);
/// Compact early, so that joining members catch up by snapshot.
const SMALL_LOG: [&str; 4] = ["--snapshot-threshold-entries", "200", "--snapshot-keep-entries", "20"];

fn keyed_put(writer: usize, n: u64) -> Vec<u8> {
    put(&format!("w{writer}-{n}"), &n.to_string())
}

fn voters_and_learners(status: &StatusResponse) -> (Vec<u64>, Vec<u64>) {
    let ids = |kind: &str| status.members.iter().filter(|m| m.kind == kind).map(|m| m.id).collect();
    (ids("voter"), ids("learner"))
}

/// Waits until member `id` reports `voters` as the voters and no learners.
async fn wait_for_voters(cluster: &Cluster, id: u64, voters: &[u64], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = cluster.status(id).await
            && voters_and_learners(&status) == (voters.to_vec(), Vec::new())
        {
            return;
        }
        if Instant::now() >= deadline {
            panic!("member {id} never saw voters {voters:?}\n{}{}", cluster.describe().await, cluster.logs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_no_failures(failures: &[String], what: &str) {
    assert!(
        failures.is_empty(),
        "{} writes failed during {what}: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn grow_to_five_and_shrink_to_three_under_writes() {
    run(LIMIT, async {
        let mut cluster = Cluster::start_with(3, "grow", &SMALL_LOG);
        cluster.leader(SETTLE).await;
        let writers = Writers::start(&cluster, cluster.addresses(), 4, "kv", keyed_put);
        tokio::time::sleep(Duration::from_secs(2)).await;
        // New members join through any member; they catch up (by snapshot:
        // the log was compacted meanwhile) and are promoted.
        cluster.join(4, 2, &[]);
        wait_for_voters(&cluster, 1, &[1, 2, 3, 4], SETTLE).await;
        cluster.join(5, 3, &[]);
        wait_for_voters(&cluster, 1, &[1, 2, 3, 4, 5], SETTLE).await;
        assert!(cluster.log_of(4).contains("snapshot installed"), "member 4 caught up by snapshot\n{}", cluster.logs());
        // One snapshot catches a member up: a leader that compacted away the
        // entries a member continues from after its snapshot would send it
        // another, and another, for as long as the writes go on.
        for id in [4, 5] {
            let installs = cluster.log_of(id).matches("snapshot installed").count();
            assert!(installs <= 2, "member {id} installed {installs} snapshots to catch up\n{}", cluster.log_of(id));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut admin = cluster.client();
        for id in [4, 5] {
            admin.change_membership(MembershipChange::Remove, id, "").await.expect("removed");
        }
        wait_for_voters(&cluster, 1, &[1, 2, 3], SETTLE).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (answers, failures) = writers.finish().await;
        assert_no_failures(&failures, "3 -> 5 -> 3");
        assert!(answers.len() > 100, "writes went on throughout ({} answered)", answers.len());
        cluster.retire(4);
        cluster.retire(5);
        let statuses = cluster.agreed(SETTLE).await;
        assert!(statuses[0].snapshot_index > 0, "the log was compacted");
        // Every acknowledged write is there.
        let mut reader = cluster.client();
        let (_, last) = answers.last().expect("answers").clone();
        assert!(!last.is_empty());
        assert_eq!(read_value(&mut reader, "w0-1", Consistency::Linearizable).await.as_deref(), Some("1"));
    });
}

#[test]
fn leadership_moves_on_request_on_sigterm_and_when_the_leader_is_removed() {
    run(LIMIT, async {
        let mut cluster = Cluster::start(3, "leadership");
        let first = cluster.leader(SETTLE).await;
        let writers = Writers::start(&cluster, cluster.addresses(), 4, "kv", keyed_put);
        tokio::time::sleep(Duration::from_secs(1)).await;

        // transfer-leader, under load.
        let target = if first == 1 { 2 } else { 1 };
        let moved = cluster.client().transfer_leader(target).await.expect("transfer");
        assert_eq!(moved.leader_id, target);
        assert_eq!(cluster.leader(SETTLE).await, target);

        // A leader stopped by SIGTERM hands over before it exits.
        let started = Instant::now();
        let status = cluster.terminate(target, Duration::from_secs(10)).expect("exits on SIGTERM");
        assert!(status.success(), "clean exit: {status:?}");
        let next = cluster.leader(SETTLE).await;
        assert_ne!(next, target);
        assert!(cluster.log_of(target).contains("handing leadership over"), "{}", cluster.log_of(target));
        eprintln!("leadership moved on SIGTERM within {:?}", started.elapsed());
        cluster.spawn(target);
        cluster.leader(SETTLE).await;

        // Maintenance: an offline member says so, and keeps saying so
        // across a restart, until it is brought back online.
        let spare = (1..=3).find(|&id| id != next).expect("another member");
        cluster.client_of(spare).set_offline(0, true).await.expect("offline");
        assert!(cluster.status(spare).await.expect("status").offline);
        cluster.kill(spare);
        cluster.spawn(spare);
        cluster.leader(SETTLE).await;
        let status = cluster.status(spare).await.expect("status");
        assert!(status.offline && status.role == "follower", "{status:?}");
        cluster.client_of(spare).set_offline(0, false).await.expect("online");
        assert!(!cluster.status(spare).await.expect("status").offline);

        // Remove the current leader: it hands over and the other two go on.
        let leader = cluster.leader(SETTLE).await;
        cluster.client().change_membership(MembershipChange::Remove, leader, "").await.expect("leader removed");
        let rest: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
        wait_for_voters(&cluster, rest[0], &rest, SETTLE).await;
        cluster.retire(leader);
        let new_leader = cluster.leader(SETTLE).await;
        assert!(rest.contains(&new_leader));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (answers, failures) = writers.finish().await;
        assert_no_failures(&failures, "transfers, SIGTERM and the removal of the leader");
        assert!(answers.len() > 50, "writes went on throughout ({} answered)", answers.len());
        cluster.agreed(SETTLE).await;

        // The CLI: members list, and a transfer back.
        let all = cluster.addresses().join(",");
        let listed = std::process::Command::new(binary())
            .args(["members", "--addr", &all, "--json", "list"])
            .envs(cluster.cli_env())
            .output()
            .expect("members runs");
        assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
        let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
        let ids: Vec<u64> =
            listed["members"].as_array().expect("members").iter().map(|m| m["id"].as_u64().expect("id")).collect();
        assert_eq!(ids, rest);
        let other = rest.iter().copied().find(|&id| id != new_leader).expect("the other voter");
        let moved = std::process::Command::new(binary())
            .args(["transfer-leader", "--addr", &all, "--to", &other.to_string()])
            .envs(cluster.cli_env())
            .output()
            .expect("transfer-leader runs");
        assert!(moved.status.success(), "{}", String::from_utf8_lossy(&moved.stderr));
        assert_eq!(cluster.leader(SETTLE).await, other);
        let bad = std::process::Command::new(binary())
            .args(["members", "--addr", &all, "add", "9", "not-an-address"])
            .envs(cluster.cli_env())
            .output()
            .expect("members runs");
        assert!(!bad.status.success());
        assert!(String::from_utf8_lossy(&bad.stderr).contains("host:port"), "{}", String::from_utf8_lossy(&bad.stderr));
    });
}

#[test]
fn a_wiped_member_comes_back_by_snapshot_and_a_big_state_moves_too() {
    run(LIMIT, async {
        let mut cluster = Cluster::start_with(3, "wiped", &SMALL_LOG);
        cluster.leader(SETTLE).await;
        let mut client = cluster.client();
        // Over 100 MB of state: 110 values of about 1 MB each.
        let big = "x".repeat(1_000_000);
        for i in 0..110 {
            client.write("kv", put(&format!("big-{i}"), &big)).await.expect("big write");
        }
        for i in 0..400 {
            client.write("kv", put(&format!("small-{i}"), "v")).await.expect("small write");
        }
        // Member 3 loses its disk: remove it, and a fresh member takes its
        // place under a new id (a removed id never comes back).
        cluster.retire(3);
        cluster.client().change_membership(MembershipChange::Remove, 3, "").await.expect("removed");
        let started = Instant::now();
        cluster.join(4, 1, &[]);
        wait_for_voters(&cluster, 1, &[1, 2, 4], SETTLE * 2).await;
        let statuses = cluster.agreed(SETTLE * 2).await;
        eprintln!("a wiped member came back with {} MB of state in {:?}", 110, started.elapsed());
        let log = cluster.log_of(4);
        assert!(log.contains("snapshot installed"), "caught up by snapshot\n{log}");
        let received = log.lines().find(|l| l.contains("snapshot received and staged")).expect("a snapshot arrived");
        let bytes: u64 = received
            .split("bytes=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("the log names the snapshot's size");
        assert!(bytes > 100_000_000, "the snapshot carried {bytes} bytes");
        assert!(statuses.iter().all(|s| s.applied_index == statuses[0].applied_index));
        let mut reader = cluster.client_of(4);
        assert_eq!(read_value(&mut reader, "small-399", Consistency::Stale).await.as_deref(), Some("v"));
        let value = read_value(&mut reader, "big-109", Consistency::Stale).await.expect("big value");
        assert_eq!(value.len(), big.len());
    });
}
