//! TLS and member identity against real processes: who may connect, and
//! whose messages count. (Every other end-to-end test runs over TLS too.)

use raft_host::client::{ClientError, ClusterClient, Consistency, outcome_of};
use raft_host::wire::Transport;
use raft_host::wire::client_pb::MembershipChange;
use raft_host::wire::pb::{Envelope, Heartbeat, Message, message::Body, raft_peer_client::RaftPeerClient};
use raft_host_e2e::{Cluster, binary, run, tls_transport};
use std::time::Duration;
use tonic::Code;

const SETTLE: Duration = Duration::from_secs(20);
const LIMIT: Duration = Duration::from_secs(120);

/// A CA of its own for `cluster`, with an admin client and member 2, in a
/// fresh directory: certificates this cluster never signed.
fn foreign_certificates(cluster: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path");
    for args in [
        vec!["ca", "--dir", path, "--cluster", cluster],
        vec!["client", "--dir", path, "--name", "admin", "--role", "admin"],
        vec!["member", "--dir", path, "--id", "2", "--host", "127.0.0.1"],
    ] {
        let output = std::process::Command::new(binary()).arg("certs").args(&args).output().expect("certs runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    dir
}

#[test]
fn a_tls_member_refuses_plaintext_clients_and_certificates_of_another_ca() {
    run(LIMIT, async {
        let cluster = Cluster::start(3, "e2e-sec-clients");
        let leader = cluster.leader(SETTLE).await;
        let address = vec![cluster.address(leader)];

        let mut plaintext = ClusterClient::with_transport(address.clone(), Transport::Plaintext).expect("client");
        plaintext.deadline = Duration::from_secs(2);
        let refused = plaintext.status().await.expect_err("plaintext is refused");
        assert!(!refused.to_string().is_empty());

        // The same cluster name and an admin role, but signed by another CA.
        let foreign = foreign_certificates("e2e-sec-clients");
        let impostor = tls_transport(foreign.path(), "client-admin");
        let mut impostor = ClusterClient::with_transport(address, impostor).expect("client");
        impostor.deadline = Duration::from_secs(2);
        let refused = impostor.write("kv", br#"{"op":"put","key":"x","value":"1"}"#.to_vec()).await;
        assert!(refused.is_err(), "a certificate of another CA does not get past the handshake");

        // The cluster's own admin certificate works, and nothing was written.
        let mut client = cluster.client();
        let read = client.read("kv", br#"{"op":"get","key":"x"}"#.to_vec(), Consistency::Linearizable);
        let read = outcome_of(read.await.expect("read").outcome);
        assert_eq!(read, Ok(br#"{"value":null}"#.to_vec()));
        client.write("kv", br#"{"op":"put","key":"y","value":"1"}"#.to_vec()).await.expect("an admin writes");
    });
}

#[test]
fn a_member_certificate_speaks_only_for_its_own_member_and_cluster() {
    run(LIMIT, async {
        let cluster = Cluster::start(3, "e2e-sec-peers");
        let leader = cluster.leader(SETTLE).await;
        cluster.client().write("kv", br#"{"op":"put","key":"a","value":"1"}"#.to_vec()).await.expect("write");
        let before = cluster.agreed(SETTLE).await;
        let followers: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
        let (holder, claimed) = (followers[0], followers[1]);
        let certs = cluster.certs_dir().expect("a TLS cluster");
        let term = before[0].term;

        // A process holding member `holder`'s certificate sends the leader a
        // heartbeat that claims to come from member `claimed`, one term on,
        // with a commit index no quorum holds.
        let as_holder = tls_transport(certs, &format!("member-{holder}"));
        let mut peer = RaftPeerClient::new(as_holder.channel(&cluster.address(leader)).expect("channel"));
        let heartbeat =
            Message { term: term + 1, body: Some(Body::Heartbeat(Heartbeat { commit: 1_000, read_seq: 0 })) };
        let envelope = |cluster_id: &str, from: u64| Envelope {
            cluster_id: cluster_id.into(),
            from,
            to: leader,
            messages: vec![heartbeat.clone()],
        };
        let status = peer.deliver(envelope("e2e-sec-peers", claimed)).await.expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("certificate"), "{}", status.message());
        // Its own id, but another cluster's name.
        let status = peer.deliver(envelope("elsewhere", holder)).await.expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

        // A client's certificate is no member's, whatever the envelope says.
        let mut as_client = RaftPeerClient::new(cluster.channel(leader));
        let status = as_client.deliver(envelope("e2e-sec-peers", holder)).await.expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("member"), "{}", status.message());

        // Member 2's certificate from another cluster's CA: no handshake.
        let foreign = foreign_certificates("elsewhere");
        let as_foreigner = tls_transport(foreign.path(), "member-2");
        let mut foreigner = RaftPeerClient::new(as_foreigner.channel(&cluster.address(leader)).expect("channel"));
        assert!(foreigner.deliver(envelope("elsewhere", 2)).await.is_err());

        // Nothing moved: the same leader, term and state everywhere.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = cluster.agreed(SETTLE).await;
        for (was, is) in before.iter().zip(&after) {
            assert_eq!((is.id, is.term, is.leader_id), (was.id, was.term, was.leader_id), "nothing moved");
            assert_eq!(is.state_machines, was.state_machines);
            assert_eq!(is.commit_index, was.commit_index, "no forged commit index was taken");
        }
        let log = cluster.log_of(leader);
        assert!(log.contains("refused a peer"), "refusals are logged");
    });
}

/// Issues a client certificate with `role` in the cluster's certificate
/// directory; a client of every member that holds it.
fn client_with_role(cluster: &Cluster, name: &str, role: &str) -> ClusterClient {
    let dir = cluster.certs_dir().expect("a TLS cluster");
    let path = dir.to_str().expect("utf-8 path");
    let output = std::process::Command::new(binary())
        .args(["certs", "client", "--dir", path, "--name", name, "--role", role])
        .output()
        .expect("certs runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let transport = tls_transport(dir, &format!("client-{name}"));
    let mut client = ClusterClient::with_transport(cluster.addresses(), transport).expect("client");
    client.deadline = Duration::from_secs(10);
    client
}

fn denied(result: Result<impl std::fmt::Debug, ClientError>, what: &str) {
    match result {
        Err(error) => {
            assert_eq!(error.code(), Some(Code::PermissionDenied), "{what}: {error}");
            assert!(error.to_string().contains("needs the admin role"), "{what}: {error}");
        }
        Ok(answer) => panic!("{what} was allowed: {answer:?}"),
    }
}

#[test]
fn a_writer_certificate_cannot_administer_and_changes_nothing_while_an_admin_can() {
    run(LIMIT, async {
        let cluster = Cluster::start(3, "e2e-sec-roles");
        let leader = cluster.leader(SETTLE).await;
        let follower = (1..=3).find(|&id| id != leader).expect("a follower");
        let mut admin = cluster.client();
        let modules_before = admin.modules().await.expect("modules").versions;
        let members_before = admin.members().await.expect("members").members;

        let mut writer = client_with_role(&cluster, "app", "writer");
        writer.write("kv", br#"{"op":"put","key":"w","value":"1"}"#.to_vec()).await.expect("a writer writes");
        let hash = &modules_before[0].module_hash;
        denied(writer.deploy("counter", raft_guests::COUNTER_V2, true, |_| {}).await, "a deploy");
        denied(writer.activate("counter", hash).await, "an activation");
        denied(writer.change_membership(MembershipChange::Remove, follower, "").await, "a removal");
        denied(writer.transfer_leader(follower).await, "a leader transfer");
        denied(writer.set_offline(0, true).await, "taking a member offline");

        let mut reader = client_with_role(&cluster, "dashboard", "reader");
        let refused = reader.write("kv", br#"{"op":"put","key":"r","value":"1"}"#.to_vec()).await;
        let refused = refused.expect_err("a reader cannot write");
        assert_eq!(refused.code(), Some(Code::PermissionDenied), "{refused}");
        assert!(refused.to_string().contains("needs the writer role"), "{refused}");
        let read = reader.read("kv", br#"{"op":"get","key":"w"}"#.to_vec(), Consistency::Linearizable).await;
        assert_eq!(outcome_of(read.expect("a reader reads").outcome), Ok(br#"{"value":"1"}"#.to_vec()));

        // Nothing the writer tried changed anything.
        assert_eq!(admin.modules().await.expect("modules").versions, modules_before);
        assert_eq!(admin.members().await.expect("members").members, members_before);
        for id in 1..=3 {
            let status = cluster.status(id).await.expect("status");
            assert!(!status.offline, "member {id} is online");
            assert_eq!(status.leader_id, leader, "leadership did not move");
        }
        // An admin certificate may.
        let moved = admin.transfer_leader(follower).await.expect("an admin transfers leadership");
        assert_eq!(moved.leader_id, follower);
    });
}
