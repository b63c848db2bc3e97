//! A harness for end-to-end tests: real `raft-host serve` processes on free
//! loopback ports, each with its own temporary data directory and log file.
//! Clusters speak TLS, on certificates the harness makes with `raft-host
//! certs`, unless a test asks for plaintext.
//!
//! Every process is killed when its [`Cluster`] is dropped, so a failing
//! test leaves nothing running; every wait has a deadline.

pub mod linearizable;
pub mod network;

use raft_host::client::{ClusterClient, Consistency, outcome_of};
use raft_host::wire::client_pb::StatusResponse;
use raft_host::wire::{Tls, TlsFiles, Transport};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `raft-host` binary under test: `RAFT_HOST_BIN`, or the one cargo
/// built next to this test's executable. `cargo test --workspace` builds it
/// fresh; `cargo test -p raft-host-e2e` alone does not (build it first).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("RAFT_HOST_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join("raft-host");
    assert!(
        binary.exists(),
        "{} is missing: build it first (cargo build --release -p raft-host) or set RAFT_HOST_BIN",
        binary.display()
    );
    binary
}

/// A free loopback port for a member to listen on.
///
/// Taken below the kernel's ephemeral range (32768 and up on Linux): a port
/// the kernel hands out for port 0 may be handed out again, as the local end
/// of some outgoing connection, before the member binds it ("address already
/// in use"). Each test process walks its own stretch of ports, starting
/// from its process id, and skips ports that are taken.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() * 97) % SPAN;
    for _ in 0..SPAN {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(port).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range");
}

/// How a member gets its settings: flags, environment variables, or a
/// config file. The harness uses all three, so each is exercised.
#[derive(Clone, Copy, Debug)]
pub enum Settings {
    Flags,
    Environment,
    ConfigFile,
}

/// One member: its id, address, data directory, and process when running.
pub struct Member {
    pub id: u64,
    pub address: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Where it serves /metrics, /healthz and /readyz.
    pub metrics: String,
    settings: Settings,
    process: Option<Child>,
    /// Joins a running cluster through this address instead of bootstrapping.
    join: Option<String>,
}

/// A cluster of `raft-host serve` processes.
pub struct Cluster {
    pub cluster_id: String,
    pub members: Vec<Member>,
    /// Kept for its lifetime: data directories and logs live here.
    root: tempfile::TempDir,
    /// Extra flags for every member.
    extra: Vec<String>,
    /// The certificates' directory, for a TLS cluster; `None`: plaintext.
    certs: Option<PathBuf>,
    /// How the harness's own clients reach the members (an admin
    /// certificate over TLS).
    transport: Transport,
    /// The proxies members reach each other through, when the test cuts links.
    network: Option<Arc<network::Network>>,
    /// Addresses kept for members that may join later (with a network, the
    /// others' routes to them exist from the start).
    reserved: std::collections::BTreeMap<u64, String>,
    /// Whether members start with fault hooks (`RAFT_HOST_FAULTS`), one
    /// directory each under the root.
    faults: bool,
    /// Environment variables every member starts with (after the harness's
    /// own, so they may replace `RUST_LOG`).
    env: Vec<(String, String)>,
}

/// Runs `raft-host certs ARGS`, which must succeed.
fn certs_command(args: &[&str]) {
    let output = Command::new(binary()).arg("certs").args(args).output().expect("raft-host certs runs");
    assert!(output.status.success(), "raft-host certs {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// The TLS files of `name` (`member-1`, `client-admin`) in `dir`.
pub fn tls_files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles { ca: dir.join("ca.pem"), cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
}

/// A transport over TLS with `name`'s certificate from `dir`.
pub fn tls_transport(dir: &Path, name: &str) -> Transport {
    Transport::Tls(Arc::new(Tls::load(tls_files(dir, name)).expect("TLS files load")))
}

/// The tick the tests run with: short, so elections take well under a second.
pub const TICK_MS: u64 = 50;

impl Cluster {
    /// Starts `size` members of cluster `cluster_id`.
    pub fn start(size: u64, cluster_id: &str) -> Cluster {
        Cluster::start_with(size, cluster_id, &[])
    }

    /// Starts `size` members with extra `serve` flags, over TLS.
    pub fn start_with(size: u64, cluster_id: &str, extra: &[&str]) -> Cluster {
        Cluster::start_as(size, cluster_id, extra, true)
    }

    /// Starts `size` members that serve plaintext (`--plaintext true`).
    pub fn start_plaintext(size: u64, cluster_id: &str) -> Cluster {
        Cluster::start_as(size, cluster_id, &[], false)
    }

    /// Starts `size` members over TLS whose links run through proxies the
    /// test can cut ([`Cluster::network`]), with fault hooks on (see
    /// [`Cluster::fault`]), and addresses kept for `spares` more members
    /// (ids after `size`) that may join later.
    pub fn start_faulty(size: u64, spares: u64, cluster_id: &str, extra: &[&str]) -> Cluster {
        Cluster::start_faulty_at(size, spares, cluster_id, extra, None)
    }

    /// As [`Cluster::start_faulty`], with member 1's data in `data_dir_1`
    /// when given (a small filesystem, for a full disk).
    pub fn start_faulty_at(
        size: u64,
        spares: u64,
        cluster_id: &str,
        extra: &[&str],
        data_dir_1: Option<PathBuf>,
    ) -> Cluster {
        let mut cluster = Cluster::prepare(size, cluster_id, extra, true);
        if let Some(dir) = data_dir_1 {
            cluster.member_mut(1).data_dir = dir;
        }
        cluster.reserved = (size + 1..=size + spares).map(|id| (id, format!("127.0.0.1:{}", free_port()))).collect();
        let mut addresses: std::collections::BTreeMap<u64, String> =
            cluster.members.iter().map(|m| (m.id, m.address.clone())).collect();
        addresses.extend(cluster.reserved.clone());
        cluster.network = Some(Arc::new(network::Network::start(&addresses)));
        cluster.faults = true;
        for id in 1..=size {
            cluster.spawn(id);
        }
        cluster
    }

    /// The network between the members, for a cluster started with one.
    pub fn network(&self) -> Option<Arc<network::Network>> {
        self.network.clone()
    }

    /// Sets fault hook `name` of member `id` to `value` (it reads its hooks
    /// about every 100 ms); `None` clears it. See `raft_host::faults`.
    pub fn fault(&self, id: u64, name: &str, value: Option<&str>) {
        let dir = self.faults_dir(id);
        std::fs::create_dir_all(&dir).expect("fault hooks directory");
        match value {
            Some(value) => std::fs::write(dir.join(name), value).expect("fault hook"),
            None => {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
    }

    fn faults_dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("faults-{id}"))
    }

    /// Where files that outlive the cluster's run may go (a history for a
    /// failed check): the root is removed when the cluster is dropped.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    fn start_as(size: u64, cluster_id: &str, extra: &[&str], tls: bool) -> Cluster {
        let mut cluster = Cluster::prepare(size, cluster_id, extra, tls);
        for id in 1..=size {
            cluster.spawn(id);
        }
        cluster
    }

    /// A cluster of `size` members, none started yet.
    fn prepare(size: u64, cluster_id: &str, extra: &[&str], tls: bool) -> Cluster {
        let root = tempfile::Builder::new().prefix("raft-e2e-").tempdir().expect("temporary directory");
        let (certs, transport) = if tls {
            let dir = root.path().join("certs");
            let dir_text = dir.to_str().expect("utf-8 path");
            certs_command(&["ca", "--dir", dir_text, "--cluster", cluster_id]);
            certs_command(&["client", "--dir", dir_text, "--name", "admin", "--role", "admin"]);
            let transport = tls_transport(&dir, "client-admin");
            (Some(dir), transport)
        } else {
            (None, Transport::Plaintext)
        };
        let members = (1..=size)
            .map(|id| {
                let settings = match id % 3 {
                    1 => Settings::ConfigFile,
                    2 => Settings::Environment,
                    _ => Settings::Flags,
                };
                Member {
                    id,
                    address: format!("127.0.0.1:{}", free_port()),
                    data_dir: root.path().join(format!("node-{id}")),
                    log: root.path().join(format!("node-{id}.log")),
                    metrics: format!("127.0.0.1:{}", free_port()),
                    settings,
                    process: None,
                    join: None,
                }
            })
            .collect();
        Cluster {
            cluster_id: cluster_id.to_string(),
            members,
            root,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            certs,
            transport,
            network: None,
            reserved: std::collections::BTreeMap::new(),
            faults: false,
            env: Vec::new(),
        }
    }

    /// `size` members of cluster `cluster_id` over TLS, none started yet:
    /// set their environment ([`Cluster::set_env`]) or fill their data
    /// directories ([`Cluster::data_dir`]) first, then
    /// [`Cluster::spawn_all`].
    pub fn prepared(size: u64, cluster_id: &str, extra: &[&str]) -> Cluster {
        Cluster::prepare(size, cluster_id, extra, true)
    }

    /// Starts every member that is not running.
    pub fn spawn_all(&mut self) {
        let idle: Vec<u64> = self.members.iter().filter(|m| m.process.is_none()).map(|m| m.id).collect();
        for id in idle {
            self.spawn(id);
        }
    }

    /// Sets environment variable `key` for every member started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The data directory of member `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.member(id).data_dir.clone()
    }

    /// Where member `id` serves /metrics, /healthz and /readyz.
    pub fn metrics_address(&self, id: u64) -> String {
        self.member(id).metrics.clone()
    }

    /// Member `id`'s metrics, as a scrape gets them.
    pub fn metrics(&self, id: u64) -> String {
        http_get(&self.metrics_address(id), "/metrics").1
    }

    fn member(&self, id: u64) -> &Member {
        self.members.iter().find(|m| m.id == id).expect("member exists")
    }

    fn member_mut(&mut self, id: u64) -> &mut Member {
        self.members.iter_mut().find(|m| m.id == id).expect("member exists")
    }

    /// Starts a new member `id` (with a fresh data directory) that joins the
    /// running cluster through member `through` (`serve --join`), with
    /// `extra` flags.
    pub fn join(&mut self, id: u64, through: u64, extra: &[&str]) {
        let seeds = [self.address(through)];
        self.join_through(id, &seeds, extra);
    }

    /// As [`Cluster::join`], with `--join` listing `seeds` (any of which may
    /// be down, or not a member at all).
    pub fn join_through(&mut self, id: u64, seeds: &[String], extra: &[&str]) {
        let join = seeds.join(",");
        self.members.retain(|m| m.id != id);
        let address = self.reserved.remove(&id).unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let member = Member {
            id,
            address,
            data_dir: self.root.path().join(format!("node-{id}-{}", free_port())),
            log: self.root.path().join(format!("node-{id}.log")),
            metrics: format!("127.0.0.1:{}", free_port()),
            settings: Settings::Flags,
            process: None,
            join: Some(join),
        };
        self.members.push(member);
        let combined: Vec<String> = self.extra.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect();
        let saved = std::mem::replace(&mut self.extra, combined);
        self.spawn(id);
        self.extra = saved;
    }

    /// Whether member `id` was started and not retired since.
    pub fn has_member(&self, id: u64) -> bool {
        self.members.iter().any(|m| m.id == id)
    }

    /// Forgets member `id` (stopping it first): it was removed from the cluster.
    pub fn retire(&mut self, id: u64) {
        self.kill(id);
        self.members.retain(|m| m.id != id);
    }

    /// Starts (or restarts) member `id` with its data directory.
    pub fn spawn(&mut self, id: u64) {
        let joining = self.member(id).join.clone();
        let peers: Vec<String> = match joining {
            Some(_) => Vec::new(),
            None => self.members.iter().filter(|m| m.id != id).map(|m| format!("{}={}", m.id, m.address)).collect(),
        };
        let cluster_id = self.cluster_id.clone();
        let (extra, env) = (self.extra.clone(), self.env.clone());
        let config_path = self.root.path().join(format!("node-{id}.toml"));
        // A member's certificate, made on its first start.
        let tls = self.certs.as_ref().map(|dir| {
            let files = tls_files(dir, &format!("member-{id}"));
            if !files.cert.exists() {
                let dir_text = dir.to_str().expect("utf-8 path");
                certs_command(&["member", "--dir", dir_text, "--id", &id.to_string(), "--host", "127.0.0.1"]);
            }
            files
        });
        let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        let tls_text = tls.as_ref().map(|files| (path(&files.ca), path(&files.cert), path(&files.key)));
        let routes = self.network.as_ref().map(|network| network.routes_of(id)).unwrap_or_default();
        let faults = self.faults.then(|| self.faults_dir(id));
        if let Some(dir) = &faults {
            std::fs::create_dir_all(dir).expect("fault hooks directory");
        }
        let member = self.member_mut(id);
        assert!(member.process.is_none(), "member {id} is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&member.log).expect("log file");
        let mut command = Command::new(binary());
        // Members log with the binary's own default filter (which keeps the
        // store's per-file INFO lines out of failure messages' log tails),
        // not with whatever RUST_LOG the test runner has; `set_env` may
        // still set one.
        command.arg("serve").env_remove("RUST_LOG").stdout(Stdio::null()).stderr(log);
        let tick = TICK_MS.to_string();
        match member.settings {
            Settings::Flags => {
                command.args(["--id", &id.to_string(), "--cluster", &cluster_id, "--listen", &member.address]).args([
                    "--data-dir",
                    member.data_dir.to_str().expect("utf-8 path"),
                    "--tick-ms",
                    &tick,
                    // Members share the machine (see README, Performance).
                    "--worker-threads",
                    "1",
                ]);
                for peer in &peers {
                    command.args(["--peer", peer]);
                }
                if let Some(join) = &member.join {
                    command.args(["--join", join]);
                }
                match &tls_text {
                    Some((ca, cert, key)) => command.args(["--ca", ca, "--cert", cert, "--key", key]),
                    None => command.args(["--plaintext", "true"]),
                };
            }
            Settings::Environment => {
                command
                    .env("RAFT_HOST_ID", id.to_string())
                    .env("RAFT_HOST_CLUSTER", &cluster_id)
                    .env("RAFT_HOST_LISTEN", &member.address)
                    .env("RAFT_HOST_DATA_DIR", &member.data_dir)
                    .env("RAFT_HOST_PEERS", peers.join(","))
                    .env("RAFT_HOST_TICK_MS", &tick)
                    .env("RAFT_HOST_WORKER_THREADS", "1");
                match &tls_text {
                    Some((ca, cert, key)) => {
                        command.env("RAFT_HOST_CA", ca).env("RAFT_HOST_CERT", cert).env("RAFT_HOST_KEY", key)
                    }
                    None => command.env("RAFT_HOST_PLAINTEXT", "true"),
                };
            }
            Settings::ConfigFile => {
                let quoted: Vec<String> = peers.iter().map(|p| format!("{p:?}")).collect();
                let mut toml = format!(
                    "id = {id}\ncluster = {cluster_id:?}\nlisten = {:?}\ndata-dir = {:?}\ntick-ms = {tick}\nworker-threads = 1\npeer = [{}]\n",
                    member.address,
                    member.data_dir.to_str().expect("utf-8 path"),
                    quoted.join(", ")
                );
                match &tls_text {
                    Some((ca, cert, key)) => toml.push_str(&format!("ca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n")),
                    None => toml.push_str("plaintext = true\n"),
                }
                std::fs::write(&config_path, toml).expect("config file");
                command.args(["--config", config_path.to_str().expect("utf-8 path")]);
            }
        }
        command.args(&extra).args(["--metrics-listen", &member.metrics]);
        for (key, value) in &env {
            command.env(key, value);
        }
        for route in routes {
            command.args(["--route", &route]);
        }
        if let Some(dir) = faults {
            command.env("RAFT_HOST_FAULTS", dir);
        }
        member.process = Some(command.spawn().expect("raft-host starts"));
    }

    /// Kills member `id` with SIGKILL (no chance to flush anything).
    pub fn kill(&mut self, id: u64) {
        if let Some(mut process) = self.member_mut(id).process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    /// The process id of member `id`, if it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.member(id).process.as_ref().map(|process| process.id())
    }

    /// Sends SIGTERM to member `id` and returns its exit status, waiting at
    /// most `limit`.
    pub fn terminate(&mut self, id: u64, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut process = self.member_mut(id).process.take()?;
        let pid = process.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = process.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = process.kill();
        let _ = process.wait();
        None
    }

    /// Sends `signal` (a name `kill` takes: `HUP`, `STOP`, `CONT`) to
    /// member `id`, if it runs.
    pub fn signal(&self, id: u64, signal: &str) {
        if let Some(process) = &self.member(id).process {
            let status = Command::new("kill").args([&format!("-{signal}"), &process.id().to_string()]).status();
            assert!(status.is_ok_and(|s| s.success()), "kill -{signal} member {id}");
        }
    }

    /// Addresses of the running members.
    pub fn addresses(&self) -> Vec<String> {
        self.members.iter().filter(|m| m.process.is_some()).map(|m| m.address.clone()).collect()
    }

    /// The address of member `id`.
    pub fn address(&self, id: u64) -> String {
        self.member(id).address.clone()
    }

    /// How the harness's clients reach the members: TLS with an admin
    /// client certificate, or plaintext for a plaintext cluster.
    pub fn transport(&self) -> Transport {
        self.transport.clone()
    }

    /// The certificates' directory, for a TLS cluster.
    pub fn certs_dir(&self) -> Option<&Path> {
        self.certs.as_deref()
    }

    /// The environment that gives the CLI the harness's admin certificate
    /// (nothing for a plaintext cluster).
    pub fn cli_env(&self) -> Vec<(&'static str, PathBuf)> {
        let Some(dir) = &self.certs else { return Vec::new() };
        let files = tls_files(dir, "client-admin");
        vec![("RAFT_HOST_CA", files.ca), ("RAFT_HOST_CERT", files.cert), ("RAFT_HOST_KEY", files.key)]
    }

    /// A client of the members at `addresses`, as the harness reaches them.
    pub fn client_at(&self, addresses: Vec<String>) -> ClusterClient {
        ClusterClient::with_transport(addresses, self.transport()).expect("client")
    }

    /// A client of every running member.
    pub fn client(&self) -> ClusterClient {
        self.client_at(self.addresses())
    }

    /// A client of member `id` alone.
    pub fn client_of(&self, id: u64) -> ClusterClient {
        self.client_at(vec![self.address(id)])
    }

    /// A gRPC channel to member `id`, as the harness reaches it.
    pub fn channel(&self, id: u64) -> tonic::transport::Channel {
        self.transport.channel(&self.address(id)).expect("channel")
    }

    /// The status of member `id`, if it answers.
    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        ClusterClient::status_at(&self.address(id), &self.transport).await.ok()
    }

    /// Waits until the running members agree on a leader among them; returns its id.
    pub async fn leader(&self, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let mut seen = Vec::new();
            for member in self.members.iter().filter(|m| m.process.is_some()) {
                if let Some(status) = self.status(member.id).await {
                    seen.push(status.leader_id);
                }
            }
            let running: Vec<u64> = self.members.iter().filter(|m| m.process.is_some()).map(|m| m.id).collect();
            let agreed = seen.len() == running.len() && seen.iter().all(|&l| l == seen[0]);
            if agreed && running.contains(&seen[0]) {
                return seen[0];
            }
            assert!(Instant::now() < deadline, "no agreed leader within {within:?} (seen {seen:?})\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every running member applied the same index, and returns
    /// their statuses taken at that point.
    pub async fn converged(&self, within: Duration) -> Vec<StatusResponse> {
        let deadline = Instant::now() + within;
        loop {
            let mut statuses = Vec::new();
            for member in self.members.iter().filter(|m| m.process.is_some()) {
                if let Some(status) = self.status(member.id).await {
                    statuses.push(status);
                }
            }
            let running = self.members.iter().filter(|m| m.process.is_some()).count();
            let same_index = statuses.windows(2).all(|w| w[0].applied_index == w[1].applied_index);
            let caught_up = statuses.iter().all(|s| s.applied_index == s.commit_index);
            if statuses.len() == running && same_index && caught_up {
                return statuses;
            }
            let seen: Vec<_> = statuses.iter().map(|s| (s.id, s.applied_index, s.commit_index)).collect();
            assert!(Instant::now() < deadline, "members did not converge within {within:?}: {seen:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits as [`Cluster::converged`] does, then asserts that every member
    /// runs the same modules with the same state digests.
    pub async fn agreed(&self, within: Duration) -> Vec<StatusResponse> {
        let statuses = self.converged(within).await;
        for status in &statuses[1..] {
            assert_eq!(
                status.state_machines, statuses[0].state_machines,
                "members {} and {} differ",
                status.id, statuses[0].id
            );
        }
        statuses
    }

    /// One line per running member with what its status says (or that it
    /// did not answer), for failure messages: which member is behind, and
    /// how far, before the logs' tails.
    pub async fn describe(&self) -> String {
        let mut out = String::new();
        for member in self.members.iter().filter(|m| m.process.is_some()) {
            let line = match self.status(member.id).await {
                Some(s) => {
                    let members: Vec<String> = s.members.iter().map(|m| format!("{}:{}", m.id, m.kind)).collect();
                    format!(
                        "member {}: {} term {} leader {} commit {} applied {} last {} snapshot {} members [{}]",
                        s.id,
                        s.role,
                        s.term,
                        s.leader_id,
                        s.commit_index,
                        s.applied_index,
                        s.last_log_index,
                        s.snapshot_index,
                        members.join(" ")
                    )
                }
                None => format!("member {}: no status", member.id),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }

    /// Every member's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for member in &self.members {
            let text = std::fs::read_to_string(&member.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- member {} ({}) ---\n", member.id, member.log.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// The log of member `id`.
    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(&self.member(id).log).unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(mut process) = member.process.take() {
                let _ = process.kill();
                let _ = process.wait();
            }
        }
    }
}

/// `GET path` on `address` (plain HTTP/1.1): the status code and the body.
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(address).expect("metrics port answers");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let code = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    (code, body)
}

/// The value of sample `name` (labels included, as written) in a metrics
/// exposition.
pub fn metric(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A kv put command.
pub fn put(key: &str, value: &str) -> Vec<u8> {
    format!(r#"{{"op":"put","key":"{key}","value":"{value}"}}"#).into_bytes()
}

/// A kv get query.
pub fn get(key: &str) -> Vec<u8> {
    format!(r#"{{"op":"get","key":"{key}"}}"#).into_bytes()
}

/// The value a kv get returned (None when the key is missing).
pub async fn read_value(client: &mut ClusterClient, key: &str, consistency: Consistency) -> Option<String> {
    let response = client.read("kv", get(key), consistency).await.expect("read");
    let bytes = outcome_of(response.outcome).expect("the guest answers gets");
    let value: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON answer");
    value["value"].as_str().map(str::to_string)
}

/// Runs a future on a fresh runtime, bounded by `limit` (a hung cluster
/// fails the test instead of hanging CI).
pub fn run<F: std::future::Future<Output = ()>>(limit: Duration, test: F) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        tokio::time::timeout(limit, test).await.expect("the test finished within its time limit");
    });
}

/// A guest built by its own language's toolchain: `guests/DIR/build.sh`
/// installs the pinned toolchain (pip, npm) on first use and writes `FILE`
/// into a directory under the target directory. Tests running at once wait
/// for one build; an unchanged guest is not rebuilt.
pub fn polyglot_guest(dir: &str, file: &str) -> Vec<u8> {
    let repository = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root").to_path_buf();
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>
    let target = exe.ancestors().nth(3).expect("inside the target directory").to_path_buf();
    let out = target.join("polyglot-guests");
    std::fs::create_dir_all(&out).expect("output directory");
    let script = repository.join("guests").join(dir).join("build.sh");
    let started = Instant::now();
    let output = Command::new("flock")
        .arg(out.join(".lock"))
        .arg("bash")
        .arg(&script)
        .arg(&out)
        // C and C++ guests take their bindings and componentize step from
        // the raft-host under test.
        .env("RAFT_HOST", binary())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{dir}: ready after {:.1?}", started.elapsed());
    std::fs::read(out.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Answers with their log index, and failures, as writers saw them.
pub type Seen = (Vec<(u64, Vec<u8>)>, Vec<String>);

/// Clients that write to a state machine until told to stop, each through
/// its own client (which retries through leader changes); every answer is
/// kept with its log index, every failure counted.
pub struct Writers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
}

impl Writers {
    /// `count` writers sending `command(writer, n)` to `state_machine`, each
    /// a client of `cluster`'s members at `addresses`.
    pub fn start(
        cluster: &Cluster,
        addresses: Vec<String>,
        count: usize,
        state_machine: &str,
        command: fn(usize, u64) -> Vec<u8>,
    ) -> Writers {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..count)
            .map(|writer| {
                let (stop, answered, state_machine) = (stop.clone(), answered.clone(), state_machine.to_string());
                let mut client = cluster.client_at(addresses.clone());
                tokio::spawn(async move {
                    client.deadline = Duration::from_secs(60);
                    let (mut answers, mut failures) = (Vec::new(), Vec::new());
                    let mut n = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n += 1;
                        match client.write(&state_machine, command(writer, n)).await {
                            Ok(response) => match outcome_of(response.outcome) {
                                Ok(bytes) => {
                                    answers.push((response.index, bytes));
                                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                Err(refused) => failures.push(format!("refused at {}: {refused}", response.index)),
                            },
                            Err(error) => failures.push(error.to_string()),
                        }
                    }
                    (answers, failures)
                })
            })
            .collect();
        Writers { stop, answered, tasks }
    }

    /// Waits until the writers have had `more` answers beyond those they had
    /// when called: proof that writes go on at this point of a test, without
    /// a guess at how many a slow machine manages in a fixed time.
    pub async fn progressed(&self, more: usize, within: Duration) {
        let ordering = std::sync::atomic::Ordering::Relaxed;
        let target = self.answered.load(ordering) + more;
        let deadline = std::time::Instant::now() + within;
        while self.answered.load(ordering) < target {
            assert!(
                std::time::Instant::now() < deadline,
                "writes stalled: {} answered, {target} awaited within {within:?}",
                self.answered.load(ordering)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the writers; every answer (sorted by index) and failure.
    pub async fn finish(self) -> Seen {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut answers, mut failures) = (Vec::new(), Vec::new());
        for task in self.tasks {
            let (a, f) = task.await.expect("writer task");
            answers.extend(a);
            failures.extend(f);
        }
        answers.sort();
        (answers, failures)
    }
}

/// `component` with a custom section named `label` of `pad_bytes` bytes
/// appended: the same guest, under another hash and size (custom sections
/// are skipped by compilers), for tests that need many or large modules.
pub fn padded_module(component: &[u8], label: &str, pad_bytes: usize) -> Vec<u8> {
    fn leb128(mut value: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut content = Vec::with_capacity(label.len() + pad_bytes + 8);
    leb128(label.len(), &mut content);
    content.extend_from_slice(label.as_bytes());
    content.resize(content.len() + pad_bytes, 0x5a);
    let mut module = component.to_vec();
    module.push(0); // a custom section
    leb128(content.len(), &mut module);
    module.extend_from_slice(&content);
    module
}
