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

#[test]
fn a_removed_members_certificate_counts_no_more_and_its_id_never_comes_back() {
    run(LIMIT, async {
        let mut cluster = Cluster::start(3, "e2e-sec-removed");
        let leader = cluster.leader(SETTLE).await;
        let removed = (1..=3).find(|&id| id != leader).expect("a follower");
        let remaining: Vec<u64> = (1..=3).filter(|&id| id != removed).collect();
        cluster.retire(removed);
        let mut admin = cluster.client();
        admin.change_membership(MembershipChange::Remove, removed, "").await.expect("removed");
        admin.write("kv", br#"{"op":"put","key":"a","value":"1"}"#.to_vec()).await.expect("write");
        let before = cluster.agreed(SETTLE).await;
        let term = before[0].term;

        // Its certificate is still signed by the CA, and names its old id.
        let certs = cluster.certs_dir().expect("a TLS cluster");
        let as_removed = tls_transport(certs, &format!("member-{removed}"));
        for &target in &remaining {
            let mut peer = RaftPeerClient::new(as_removed.channel(&cluster.address(target)).expect("channel"));
            let envelope = Envelope {
                cluster_id: "e2e-sec-removed".into(),
                from: removed,
                to: target,
                messages: vec![Message {
                    term: term + 1,
                    body: Some(Body::Heartbeat(Heartbeat { commit: 1_000, read_seq: 0 })),
                }],
            };
            let status = peer.deliver(envelope).await.expect_err("refused");
            assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
            assert!(status.message().contains("removed"), "{}", status.message());
        }

        // Its id cannot be added back, whatever address it comes with.
        let address = format!("127.0.0.1:{}", raft_host_e2e::free_port());
        let refused = admin.change_membership(MembershipChange::AddLearner, removed, &address).await;
        let refused = refused.expect_err("a removed id never comes back");
        assert_eq!(refused.code(), Some(Code::FailedPrecondition), "{refused}");
        assert!(refused.to_string().contains("new id"), "{refused}");

        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = cluster.agreed(SETTLE).await;
        for (was, is) in before.iter().zip(&after) {
            assert_eq!((is.id, is.term, is.leader_id), (was.id, was.term, was.leader_id), "nothing moved");
            assert_eq!(is.commit_index, was.commit_index, "no forged commit index was taken");
            assert_eq!(is.state_machines, was.state_machines);
        }
        let members = admin.members().await.expect("members").members;
        assert_eq!(members.iter().map(|m| m.id).collect::<Vec<_>>(), remaining);
    });
}

/// Runs `raft-host dev ARGS` until it prints `marker`; the child and what it printed.
fn start_dev(args: &[&str], marker: &str) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(binary())
        .arg("dev")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("dev starts");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.contains(marker)) {
        match lines_rx.recv_timeout(SETTLE) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("dev never printed {marker:?}: {lines:?}");
            }
        }
    }
    (child, lines)
}

#[test]
fn dev_tls_serves_on_certificates_it_makes_and_prints_how_to_reach_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dev");
    let port = raft_host_e2e::free_port().to_string();
    let args = ["--tls", "--nodes", "1", "--port", &port, "--data-dir", data.to_str().expect("utf-8 path")];
    let (mut child, lines) = start_dev(&args, "export RAFT_HOST_CA=");
    let export = lines.iter().find(|l| l.contains("export RAFT_HOST_CA=")).expect("the export line");
    let env: Vec<(String, String)> = export
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    assert_eq!(env.len(), 3, "{export}");
    assert!(data.join("certs/ca.pem").exists() && data.join("certs/member-1.pem").exists());
    let address = format!("127.0.0.1:{port}");
    let cli = |with_env: bool| {
        let mut command = std::process::Command::new(binary());
        command.args(["write", "--addr", &address, "--timeout-secs", "5", r#"{"op":"put","key":"a","value":"1"}"#]);
        for name in ["RAFT_HOST_CA", "RAFT_HOST_CERT", "RAFT_HOST_KEY"] {
            command.env_remove(name);
        }
        if with_env {
            command.envs(env.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        }
        command.output().expect("write runs")
    };
    let written = cli(true);
    let plaintext = cli(false);
    let _ = child.kill();
    let _ = child.wait();
    assert!(written.status.success(), "{}", String::from_utf8_lossy(&written.stderr));
    assert_eq!(String::from_utf8_lossy(&written.stdout).trim(), r#"{"previous":null}"#);
    assert!(!plaintext.status.success(), "a plaintext client is refused");
}

/// Runs `raft-host certs ARGS` in `dir`.
fn certs_in(dir: &std::path::Path, args: &[&str]) {
    let path = dir.to_str().expect("utf-8 path");
    let output = std::process::Command::new(binary())
        .arg("certs")
        .args(&args[..1])
        .args(["--dir", path])
        .args(&args[1..])
        .output()
        .expect("certs runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// Waits until member `id`'s log holds `text` `count` times.
async fn log_shows(cluster: &Cluster, id: u64, text: &str, count: usize) {
    let deadline = std::time::Instant::now() + SETTLE;
    while cluster.log_of(id).matches(text).count() < count {
        assert!(std::time::Instant::now() < deadline, "member {id} never logged {text:?}\n{}", cluster.log_of(id));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client_with(files: raft_host::wire::TlsFiles, addresses: Vec<String>) -> ClusterClient {
    let tls = raft_host::wire::Tls::load(files).expect("TLS files load");
    let mut client =
        ClusterClient::with_transport(addresses, Transport::Tls(std::sync::Arc::new(tls))).expect("client");
    client.deadline = Duration::from_secs(5);
    client
}

#[test]
fn certificates_rotate_to_a_new_ca_by_sighup_and_a_rolling_restart_with_no_failed_write() {
    run(LIMIT, async {
        let mut cluster = Cluster::start(3, "e2e-sec-rotate");
        cluster.leader(SETTLE).await;
        let old = cluster.certs_dir().expect("a TLS cluster").to_path_buf();
        let new_dir = tempfile::tempdir().expect("tempdir");
        let new = new_dir.path();
        certs_in(new, &["ca", "--cluster", "e2e-sec-rotate"]);
        certs_in(new, &["client", "--name", "admin", "--role", "admin"]);
        let (old_ca, new_ca) =
            (std::fs::read(old.join("ca.pem")).expect("old CA"), std::fs::read(new.join("ca.pem")).expect("new CA"));
        let both = new.join("both.pem");
        std::fs::write(&both, [old_ca.as_slice(), new_ca.as_slice()].concat()).expect("bundle");
        let new_admin = |ca: &std::path::Path, addresses: Vec<String>| {
            let files = raft_host::wire::TlsFiles {
                ca: ca.to_path_buf(),
                cert: new.join("client-admin.pem"),
                key: new.join("client-admin.key"),
            };
            client_with(files, addresses)
        };
        let write = br#"{"op":"put","key":"k","value":"v"}"#.to_vec();
        assert!(new_admin(&both, cluster.addresses()).write("kv", write.clone()).await.is_err(), "not trusted yet");

        // 1. Members trust both CAs: the bundle, read again on SIGHUP.
        std::fs::write(old.join("ca.pem"), std::fs::read(&both).expect("bundle")).expect("members' CA file");
        for id in 1..=3 {
            cluster.signal(id, "HUP");
            log_shows(&cluster, id, "certificates read again", 1).await;
        }
        new_admin(&both, cluster.addresses()).write("kv", write.clone()).await.expect("the new CA's client is let in");

        // A certificate that names another member is not taken on reload.
        let member_1 = (old.join("member-1.pem"), old.join("member-1.key"));
        let kept = (std::fs::read(&member_1.0).expect("cert"), std::fs::read(&member_1.1).expect("key"));
        std::fs::copy(old.join("member-2.pem"), &member_1.0).expect("copy");
        std::fs::copy(old.join("member-2.key"), &member_1.1).expect("copy");
        cluster.signal(1, "HUP");
        log_shows(&cluster, 1, "certificates not reloaded", 1).await;
        std::fs::write(&member_1.0, &kept.0).expect("restore");
        std::fs::write(&member_1.1, &kept.1).expect("restore");

        // 2. A rolling restart onto member certificates of the new CA, under
        // writes (the harness's own client trusts both CAs from here on).
        cluster.transport().tls().expect("TLS").reload().expect("the harness reloads");
        let writers = raft_host_e2e::Writers::start(&cluster, cluster.addresses(), 3, "kv", |writer, n| {
            raft_host_e2e::put(&format!("w{writer}-{n}"), "v")
        });
        writers.progressed(5, SETTLE).await;
        for id in 1..=3 {
            certs_in(new, &["member", "--id", &id.to_string(), "--host", "127.0.0.1"]);
            std::fs::copy(new.join(format!("member-{id}.pem")), old.join(format!("member-{id}.pem"))).expect("copy");
            std::fs::copy(new.join(format!("member-{id}.key")), old.join(format!("member-{id}.key"))).expect("copy");
            assert!(cluster.terminate(id, SETTLE).is_some_and(|s| s.success()), "member {id} stops cleanly");
            cluster.spawn(id);
            cluster.leader(SETTLE).await;
            writers.progressed(5, SETTLE).await;
        }
        let (answers, failures) = writers.finish().await;
        assert!(failures.is_empty(), "writes failed during the rolling restart: {failures:?}");
        assert!(answers.len() >= 20, "every step of the restart saw writes ({} answered)", answers.len());

        // 3. The old CA goes: its clients are refused, the new one's go on,
        // and members (new connections after a restart) still reach each other.
        std::fs::write(old.join("ca.pem"), &new_ca).expect("members' CA file");
        for id in 1..=3 {
            cluster.signal(id, "HUP");
            log_shows(&cluster, id, "certificates read again", if id == 1 { 2 } else { 1 }).await;
        }
        let old_admin = raft_host::wire::TlsFiles {
            ca: new.join("ca.pem"),
            cert: old.join("client-admin.pem"),
            key: old.join("client-admin.key"),
        };
        assert!(client_with(old_admin, cluster.addresses()).write("kv", write.clone()).await.is_err());
        new_admin(&new.join("ca.pem"), cluster.addresses()).write("kv", write.clone()).await.expect("new CA");
        assert!(cluster.terminate(1, SETTLE).is_some_and(|s| s.success()));
        cluster.spawn(1);
        new_admin(&new.join("ca.pem"), cluster.addresses()).write("kv", write).await.expect("after a restart");
        let files = raft_host::wire::TlsFiles {
            ca: new.join("ca.pem"),
            cert: new.join("client-admin.pem"),
            key: new.join("client-admin.key"),
        };
        let checker = Transport::Tls(std::sync::Arc::new(raft_host::wire::Tls::load(files).expect("TLS files")));
        let deadline = std::time::Instant::now() + SETTLE;
        loop {
            let mut applied = Vec::new();
            for address in cluster.addresses() {
                let status = ClusterClient::status_at(&address, &checker).await;
                applied.push(status.map(|s| (s.applied_index, s.commit_index)).ok());
            }
            let first = applied[0];
            if first.is_some() && applied.iter().all(|a| *a == first && a.is_some_and(|(x, c)| x == c)) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "members did not converge: {applied:?}\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
