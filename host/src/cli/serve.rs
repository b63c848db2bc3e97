//! `raft-host serve` (one member) and `raft-host dev` (a local cluster).

use anyhow::{Context, bail};
use clap::Args;
use raft_host::process::BackgroundPriority;
use raft_host::raft::NodeId;
use raft_host::server::{Server, ServerConfig};
use raft_host::storage::{Durability, JOURNAL_BYTES_MIN, MEMTABLE_BYTES_MIN};
use raft_host::wire::certs;
use raft_host::wire::{ClientRole, Tls, TlsFiles, Transport};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Flags of `serve`. Each is optional here so that a value from the config
/// file can fill what neither a flag nor the environment gave.
#[derive(Args, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// A TOML file with any of these settings (kebab-case keys, for example
    /// `id = 1`, `listen = "127.0.0.1:7001"`, `peer = ["2=127.0.0.1:7002"]`).
    #[arg(long, env = "RAFT_HOST_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// This member's id (a positive number, unique in the cluster).
    #[arg(long, env = "RAFT_HOST_ID")]
    id: Option<NodeId>,
    /// The cluster's name; members of other clusters are refused.
    #[arg(long, env = "RAFT_HOST_CLUSTER")]
    cluster: Option<String>,
    /// Address to serve peers and clients on.
    #[arg(long, env = "RAFT_HOST_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address the others reach this member at (default: --listen).
    #[arg(long, env = "RAFT_HOST_ADVERTISE")]
    advertise: Option<String>,
    /// Another member, as ID=HOST:PORT; repeat for each (or comma-separate).
    #[arg(long = "peer", env = "RAFT_HOST_PEERS", value_delimiter = ',')]
    #[serde(default)]
    peer: Vec<String>,
    /// Dial member ID at HOST:PORT instead of the address the membership
    /// records for it (a local override, never replicated), as ID=HOST:PORT;
    /// repeat for each (or comma-separate).
    #[arg(long = "route", env = "RAFT_HOST_ROUTES", value_delimiter = ',')]
    #[serde(default)]
    route: Vec<String>,
    /// Where this member keeps its log and state.
    #[arg(long, env = "RAFT_HOST_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Length of one tick in milliseconds (default 100).
    #[arg(long, env = "RAFT_HOST_TICK_MS")]
    tick_ms: Option<u64>,
    /// Election timeout in ticks (default 10; the actual one is randomized
    /// between this and twice this).
    #[arg(long, env = "RAFT_HOST_ELECTION_TICKS")]
    election_ticks: Option<u32>,
    /// Heartbeat interval in ticks (default 1).
    #[arg(long, env = "RAFT_HOST_HEARTBEAT_TICKS")]
    heartbeat_ticks: Option<u32>,
    /// Largest command or query in bytes (default 1 MiB).
    #[arg(long, env = "RAFT_HOST_MAX_COMMAND_BYTES")]
    max_command_bytes: Option<usize>,
    /// Seconds a client request may wait for its answer (default 10).
    #[arg(long, env = "RAFT_HOST_REQUEST_TIMEOUT_SECS")]
    request_timeout_secs: Option<u64>,
    /// Largest state machine module a deploy accepts, in bytes (default 64
    /// MiB). Must be the same on every member.
    #[arg(long, env = "RAFT_HOST_MAX_MODULE_BYTES")]
    max_module_bytes: Option<usize>,
    /// Seconds a deploy waits for every live member to compile a module
    /// before it gives up activating it (default 300).
    #[arg(long, env = "RAFT_HOST_MODULE_READY_TIMEOUT_SECS")]
    module_ready_timeout_secs: Option<u64>,
    /// Serve Prometheus metrics over HTTP at this address (path /metrics).
    #[arg(long, env = "RAFT_HOST_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Do not fsync. A crash can lose acknowledged writes and break Raft's
    /// guarantees: for benchmarks only.
    #[arg(long, env = "RAFT_HOST_UNSAFE_NO_FSYNC")]
    unsafe_no_fsync: Option<bool>,
    /// Join a running cluster through these members (host:port; repeat or
    /// comma-separate; any of them may be down) instead of bootstrapping one
    /// with --peer: start empty, be added as a learner, catch up (from the
    /// log or a snapshot), then be promoted to voter.
    #[arg(long, env = "RAFT_HOST_JOIN", value_delimiter = ',')]
    #[serde(default)]
    join: Vec<String>,
    /// With --join: stay a learner (promote later with `members promote`).
    #[arg(long, env = "RAFT_HOST_JOIN_AS_LEARNER")]
    join_as_learner: Option<bool>,
    /// Compact the log once it holds this many applied entries beyond the
    /// kept tail (default 10000).
    #[arg(long, env = "RAFT_HOST_SNAPSHOT_THRESHOLD_ENTRIES")]
    snapshot_threshold_entries: Option<u64>,
    /// Applied entries kept after a compaction for followers slightly
    /// behind (default 1000); further behind, they get a snapshot.
    #[arg(long, env = "RAFT_HOST_SNAPSHOT_KEEP_ENTRIES")]
    snapshot_keep_entries: Option<u64>,
    /// Bytes of log a leader keeps beyond the kept tail for followers
    /// catching up, or installing a snapshot, before it compacts what they
    /// still need (default 256 MiB).
    #[arg(long, env = "RAFT_HOST_CATCH_UP_LOG_BYTES")]
    catch_up_log_bytes: Option<u64>,
    /// Versions one state machine may hold, built-ins aside (default 16); a
    /// deploy past it is refused until one is removed (`modules remove`).
    #[arg(long, env = "RAFT_HOST_MAX_MODULE_VERSIONS")]
    max_module_versions: Option<usize>,
    /// Seconds after its latest chunk an unfinished upload (an abandoned
    /// deploy) is dropped, through the log (default 3600).
    #[arg(long, env = "RAFT_HOST_UPLOAD_EXPIRY_SECS")]
    upload_expiry_secs: Option<u64>,
    /// Free bytes kept on the data disk (default 128 MiB): below it the
    /// member takes no new entries (as leader it answers writes with
    /// RESOURCE_EXHAUSTED, which clients retry, and hands leadership to a
    /// member with room) but still serves reads, until space is freed.
    #[arg(long, env = "RAFT_HOST_MIN_FREE_DISK_BYTES")]
    min_free_disk_bytes: Option<u64>,
    /// The storage's block cache, in bytes (default 16 MiB): on-disk blocks
    /// read again without the disk.
    #[arg(long, env = "RAFT_HOST_CACHE_BYTES")]
    cache_bytes: Option<u64>,
    /// The guests' latest values kept in memory in front of the storage, in
    /// bytes (default: 1/512 of the machine's or container's memory, from
    /// 16 MiB to 256 MiB; 0 turns it off): a read of a hot key skips the
    /// storage's search of memtables and tables.
    #[arg(long, env = "RAFT_HOST_STATE_CACHE_BYTES")]
    state_cache_bytes: Option<u64>,
    /// Each keyspace's memtable (the log, sessions, ...) is flushed past
    /// this many bytes (default 8 MiB, at least 1 MiB), the guests' state's
    /// past twice as many. Fixed when the data directory is created: an
    /// existing one keeps its sizes.
    #[arg(long, env = "RAFT_HOST_MEMTABLE_BYTES")]
    memtable_bytes: Option<u64>,
    /// The storage's write-ahead journals in all, in bytes (default and
    /// least 64 MiB): past it, memtables are flushed so old journals can
    /// go. A restart replays at most this much.
    #[arg(long, env = "RAFT_HOST_JOURNAL_BYTES")]
    journal_bytes: Option<u64>,
    /// Log indexes of change history kept for watchers behind the applied
    /// index (default 100000; 0 keeps none and refuses watches). A watch
    /// from further back is told to re-read ("compacted").
    #[arg(long, env = "RAFT_HOST_WATCH_HISTORY_ENTRIES")]
    watch_history_entries: Option<u64>,
    /// Bytes of change history kept at most (default 64 MiB): past it the
    /// oldest indexes go first. It travels in snapshots and backups.
    #[arg(long, env = "RAFT_HOST_WATCH_HISTORY_BYTES")]
    watch_history_bytes: Option<u64>,
    /// Largest snapshot this member accepts from a leader, in bytes, as the
    /// leader announces it (default 256 GiB).
    #[arg(long, env = "RAFT_HOST_MAX_SNAPSHOT_BYTES")]
    max_snapshot_bytes: Option<u64>,
    /// Seconds a snapshot or deploy stream may send nothing before it is
    /// dropped, with what it staged (default 30).
    #[arg(long, env = "RAFT_HOST_STREAM_IDLE_TIMEOUT_SECS")]
    stream_idle_timeout_secs: Option<u64>,
    /// Threads running this member's network and consensus tasks (default:
    /// one per core). When several members share a machine, giving each
    /// its share of the cores cuts wake-ups between threads: lower latency
    /// and less CPU per write (see README, Performance).
    #[arg(long, env = "RAFT_HOST_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// How many nice steps below the write path the storage's flushes and
    /// compactions, and the apply task while this member follows, run
    /// (0 to 19, default 10; 0 turns it off). No write waits for them, so
    /// on busy cores they give way to the threads a write does wait for.
    /// Linux only; giving the apply task its priority back when the member
    /// becomes leader needs CAP_SYS_NICE or RLIMIT_NICE (else only the
    /// storage's threads are lowered).
    #[arg(long, env = "RAFT_HOST_BACKGROUND_NICE")]
    background_nice: Option<i32>,
    /// The cluster CA's certificate (PEM): peers and clients must hold a
    /// certificate it signed. With --cert and --key, the port speaks TLS only.
    #[arg(long, env = "RAFT_HOST_CA")]
    ca: Option<PathBuf>,
    /// This member's certificate (PEM), naming its cluster and id (`raft-host certs member`).
    #[arg(long, env = "RAFT_HOST_CERT")]
    cert: Option<PathBuf>,
    /// This member's private key (PEM).
    #[arg(long, env = "RAFT_HOST_KEY")]
    key: Option<PathBuf>,
    /// Serve without TLS: anyone who reaches the port can do everything.
    /// Must be chosen explicitly when --ca, --cert and --key are not given.
    #[arg(long, env = "RAFT_HOST_PLAINTEXT")]
    plaintext: Option<bool>,
}

impl ServeArgs {
    /// Fills what the command line and environment left unset from `file`.
    fn merge(mut self, file: ServeArgs) -> ServeArgs {
        self.id = self.id.or(file.id);
        self.cluster = self.cluster.or(file.cluster);
        self.listen = self.listen.or(file.listen);
        self.advertise = self.advertise.or(file.advertise);
        if self.peer.is_empty() {
            self.peer = file.peer;
        }
        if self.route.is_empty() {
            self.route = file.route;
        }
        self.data_dir = self.data_dir.or(file.data_dir);
        self.tick_ms = self.tick_ms.or(file.tick_ms);
        self.election_ticks = self.election_ticks.or(file.election_ticks);
        self.heartbeat_ticks = self.heartbeat_ticks.or(file.heartbeat_ticks);
        self.max_command_bytes = self.max_command_bytes.or(file.max_command_bytes);
        self.request_timeout_secs = self.request_timeout_secs.or(file.request_timeout_secs);
        self.max_module_bytes = self.max_module_bytes.or(file.max_module_bytes);
        self.module_ready_timeout_secs = self.module_ready_timeout_secs.or(file.module_ready_timeout_secs);
        self.metrics_listen = self.metrics_listen.or(file.metrics_listen);
        self.unsafe_no_fsync = self.unsafe_no_fsync.or(file.unsafe_no_fsync);
        if self.join.is_empty() {
            self.join = file.join;
        }
        self.join_as_learner = self.join_as_learner.or(file.join_as_learner);
        self.snapshot_threshold_entries = self.snapshot_threshold_entries.or(file.snapshot_threshold_entries);
        self.snapshot_keep_entries = self.snapshot_keep_entries.or(file.snapshot_keep_entries);
        self.catch_up_log_bytes = self.catch_up_log_bytes.or(file.catch_up_log_bytes);
        self.max_module_versions = self.max_module_versions.or(file.max_module_versions);
        self.upload_expiry_secs = self.upload_expiry_secs.or(file.upload_expiry_secs);
        self.max_snapshot_bytes = self.max_snapshot_bytes.or(file.max_snapshot_bytes);
        self.min_free_disk_bytes = self.min_free_disk_bytes.or(file.min_free_disk_bytes);
        self.cache_bytes = self.cache_bytes.or(file.cache_bytes);
        self.state_cache_bytes = self.state_cache_bytes.or(file.state_cache_bytes);
        self.memtable_bytes = self.memtable_bytes.or(file.memtable_bytes);
        self.journal_bytes = self.journal_bytes.or(file.journal_bytes);
        self.watch_history_entries = self.watch_history_entries.or(file.watch_history_entries);
        self.watch_history_bytes = self.watch_history_bytes.or(file.watch_history_bytes);
        self.stream_idle_timeout_secs = self.stream_idle_timeout_secs.or(file.stream_idle_timeout_secs);
        self.worker_threads = self.worker_threads.or(file.worker_threads);
        self.background_nice = self.background_nice.or(file.background_nice);
        self.ca = self.ca.or(file.ca);
        self.cert = self.cert.or(file.cert);
        self.key = self.key.or(file.key);
        self.plaintext = self.plaintext.or(file.plaintext);
        self
    }

    /// TLS from --ca, --cert and --key, or plaintext if --plaintext says so;
    /// anything else is refused, so plaintext is never an accident.
    fn transport(&self) -> anyhow::Result<Transport> {
        let plaintext = self.plaintext == Some(true);
        match super::client::tls_transport(&self.ca, &self.cert, &self.key)? {
            Some(_) if plaintext => {
                bail!("--plaintext true and TLS (--ca, --cert, --key) do not go together: choose one")
            }
            Some(tls) => Ok(tls),
            None if plaintext => {
                tracing::warn!("serving plaintext (--plaintext true): anyone who can reach the port can do everything");
                Ok(Transport::Plaintext)
            }
            None => bail!(
                "choose TLS (--ca, --cert and --key; `raft-host certs` makes them) or plaintext (--plaintext true)"
            ),
        }
    }

    /// The arguments with the config file's settings filled in.
    fn resolved(self) -> anyhow::Result<ServeArgs> {
        Ok(match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let file: ServeArgs =
                    toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
                self.merge(file)
            }
            None => self,
        })
    }

    /// The member's configuration, or what is missing or wrong.
    fn server_config(self) -> anyhow::Result<ServerConfig> {
        let args = self.resolved()?;
        let transport = args.transport()?;
        let id = args.id.context("--id is required (or RAFT_HOST_ID, or `id` in the config file)")?;
        let listen = args.listen.context("--listen is required, for example --listen 127.0.0.1:7001")?;
        let data_dir = args.data_dir.context("--data-dir is required")?;
        let mut server =
            ServerConfig::new(id, args.cluster.unwrap_or_else(|| "raft-host".to_string()), listen, data_dir);
        server.metrics_listen = args.metrics_listen;
        let config = &mut server.node;
        config.transport = transport;
        if let Some(advertise) = args.advertise {
            config.advertise = advertise;
        }
        config.peers = parse_peers(&args.peer, "--peer")?;
        config.routes = parse_peers(&args.route, "--route")?;
        if let Some(ms) = args.tick_ms {
            config.tick = Duration::from_millis(ms);
        }
        config.election_ticks = args.election_ticks.unwrap_or(config.election_ticks);
        config.heartbeat_ticks = args.heartbeat_ticks.unwrap_or(config.heartbeat_ticks);
        config.max_command_bytes = args.max_command_bytes.unwrap_or(config.max_command_bytes);
        if let Some(secs) = args.request_timeout_secs {
            config.request_timeout = Duration::from_secs(secs);
        }
        config.limits.module_bytes = args.max_module_bytes.unwrap_or(config.limits.module_bytes);
        if let Some(secs) = args.module_ready_timeout_secs {
            config.module_ready_timeout = Duration::from_secs(secs);
        }
        if args.unsafe_no_fsync == Some(true) {
            config.durability = Durability::UnsafeNoSync;
        }
        if !args.join.is_empty() && !config.peers.is_empty() {
            bail!("--join and --peer do not go together: --peer bootstraps a new cluster, --join enters a running one");
        }
        config.join = args.join;
        config.join_as_learner = args.join_as_learner == Some(true);
        config.snapshot_threshold_entries =
            args.snapshot_threshold_entries.unwrap_or(config.snapshot_threshold_entries);
        config.snapshot_keep_entries = args.snapshot_keep_entries.unwrap_or(config.snapshot_keep_entries);
        config.catch_up_log_bytes = args.catch_up_log_bytes.unwrap_or(config.catch_up_log_bytes);
        config.max_snapshot_bytes = args.max_snapshot_bytes.unwrap_or(config.max_snapshot_bytes);
        config.min_free_disk_bytes = args.min_free_disk_bytes.unwrap_or(config.min_free_disk_bytes);
        let memory = &mut config.store_memory;
        memory.cache_bytes = args.cache_bytes.unwrap_or(memory.cache_bytes);
        memory.state_cache_bytes = args.state_cache_bytes.unwrap_or(memory.state_cache_bytes);
        memory.memtable_bytes = args.memtable_bytes.unwrap_or(memory.memtable_bytes);
        memory.journal_bytes = args.journal_bytes.unwrap_or(memory.journal_bytes);
        if memory.memtable_bytes < MEMTABLE_BYTES_MIN {
            bail!("--memtable-bytes must be at least {MEMTABLE_BYTES_MIN} (1 MiB), got {}", memory.memtable_bytes);
        }
        let history = &mut config.store_history;
        history.entries = args.watch_history_entries.unwrap_or(history.entries);
        history.bytes = args.watch_history_bytes.unwrap_or(history.bytes);
        if memory.journal_bytes < JOURNAL_BYTES_MIN {
            bail!("--journal-bytes must be at least {JOURNAL_BYTES_MIN} (64 MiB), got {}", memory.journal_bytes);
        }
        match args.max_module_versions {
            Some(0) => bail!("--max-module-versions must be at least 1"),
            Some(most) => config.max_module_versions = most,
            None => {}
        }
        match args.upload_expiry_secs {
            Some(0) => bail!("--upload-expiry-secs must be at least 1"),
            Some(secs) => config.upload_expiry = Duration::from_secs(secs),
            None => {}
        }
        match args.background_nice {
            Some(nice @ 0..=19) => config.background = BackgroundPriority::new(nice),
            Some(nice) => bail!("--background-nice must be 0 to 19, got {nice}"),
            None => {}
        }
        match args.stream_idle_timeout_secs {
            Some(0) => bail!("--stream-idle-timeout-secs must be at least 1"),
            Some(secs) => config.stream_idle_timeout = Duration::from_secs(secs),
            None => {}
        }
        Ok(server)
    }
}

/// `ID=HOST:PORT` pairs, given with `flag`.
pub(super) fn parse_peers(specs: &[String], flag: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    let mut peers = BTreeMap::new();
    for spec in specs {
        let (id, address) = spec.split_once('=').with_context(|| format!("{flag} {spec:?}: expected ID=HOST:PORT"))?;
        let id: NodeId = id.trim().parse().with_context(|| format!("{flag} {spec:?}: {id:?} is not a member id"))?;
        if id == 0 {
            bail!("{flag} {spec:?}: member ids start at 1");
        }
        if !address.contains(':') {
            bail!("{flag} {spec:?}: expected HOST:PORT after the '='");
        }
        if peers.insert(id, address.trim().to_string()).is_some() {
            bail!("{flag} lists member {id} twice");
        }
    }
    Ok(peers)
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let args = args.resolved()?;
    let workers = args.worker_threads;
    if workers == Some(0) {
        bail!("--worker-threads must be at least 1");
    }
    let config = args.server_config()?;
    let runtime = super::runtime_with(workers)?;
    runtime.block_on(async {
        let server = Server::start(config).await?;
        run_until_signal(vec![server]).await
    })
}

#[derive(Args)]
pub struct DevArgs {
    /// Members to run (1, 3 or 5).
    #[arg(long, env = "RAFT_DEV_NODES", default_value_t = 3)]
    nodes: u64,
    /// Port of the first member; the others take the next ones.
    #[arg(long, env = "RAFT_DEV_PORT", default_value_t = 7001)]
    port: u16,
    /// Keep data here (one folder per member) instead of a temporary
    /// directory that is removed on exit.
    #[arg(long, env = "RAFT_DEV_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Serve TLS on certificates made in the data directory's `certs`
    /// folder (a CA, one per member, an admin client's), as a real cluster
    /// does; without it the cluster is plaintext.
    #[arg(long, env = "RAFT_DEV_TLS")]
    tls: bool,
}

/// The cluster name `dev` runs under.
const DEV_CLUSTER: &str = "raft-host-dev";

/// Makes what is missing of the dev cluster's certificates in `dir` (kept
/// across runs with `--data-dir`); the admin client's files.
fn dev_certificates(dir: &Path, ids: &[NodeId]) -> anyhow::Result<certs::CertPaths> {
    const DAYS: u32 = 365;
    if !certs::ca_paths(dir).cert.exists() {
        certs::create_ca(dir, DEV_CLUSTER, DAYS)?;
    }
    for &id in ids {
        if !certs::member_paths(dir, id).cert.exists() {
            certs::issue_member(dir, id, &["127.0.0.1".to_string(), "localhost".to_string()], DAYS)?;
        }
    }
    let admin = certs::client_paths(dir, "admin");
    if !admin.cert.exists() {
        certs::issue_client(dir, "admin", ClientRole::Admin, DAYS)?;
    }
    Ok(admin)
}

pub fn dev(args: DevArgs) -> anyhow::Result<()> {
    if ![1, 3, 5].contains(&args.nodes) {
        bail!("--nodes must be 1, 3 or 5, got {}", args.nodes);
    }
    let temporary = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new().prefix("raft-host-dev-").tempdir().context("creating a temporary directory")?,
        ),
    };
    let root: &Path = match (&args.data_dir, &temporary) {
        (Some(dir), _) => dir,
        (None, Some(temporary)) => temporary.path(),
        (None, None) => unreachable!("one of them is set"),
    };
    let ids: Vec<NodeId> = (1..=args.nodes).collect();
    let address = |id: NodeId| format!("127.0.0.1:{}", u64::from(args.port) + id - 1);
    let certs_dir = root.join("certs");
    let admin = match args.tls {
        true => Some(dev_certificates(&certs_dir, &ids).context("making the dev cluster's certificates")?),
        false => None,
    };
    let mut configs = Vec::new();
    for &id in &ids {
        let listen: SocketAddr = address(id).parse().context("the port range does not fit")?;
        let mut config = ServerConfig::new(id, DEV_CLUSTER, listen, root.join(format!("node-{id}")));
        if args.tls {
            let own = certs::member_paths(&certs_dir, id);
            let files = TlsFiles { ca: certs::ca_paths(&certs_dir).cert, cert: own.cert, key: own.key };
            config.node.transport = Transport::Tls(Arc::new(Tls::load(files)?));
        }
        config.node.peers = ids.iter().filter(|&&peer| peer != id).map(|&peer| (peer, address(peer))).collect();
        // Metrics 1000 ports above the member's (8001, 8002, ... by default).
        let metrics_port = u16::try_from(u64::from(listen.port()) + 1000).context("the metrics port does not fit")?;
        config.metrics_listen = Some(SocketAddr::new(listen.ip(), metrics_port));
        configs.push(config);
    }
    let addresses: Vec<String> = ids.iter().map(|&id| address(id)).collect();
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let mut servers = Vec::new();
        for config in configs {
            servers.push(Server::start(config).await?);
        }
        // The instructions come after the election's log lines, last.
        if let Some(first) = servers.first()
            && !first.wait_for_leader(std::time::Duration::from_secs(10)).await
        {
            tracing::warn!("no leader after 10 s; the members keep trying");
        }
        let all = addresses.join(",");
        println!("raft-host dev: {} member(s) on {all}, data in {}", ids.len(), root.display());
        match &admin {
            Some(admin) => {
                let ca = certs::ca_paths(&certs_dir).cert;
                println!("TLS on certificates in {}; the CLI needs the admin client's:", certs_dir.display());
                println!(
                    "  export RAFT_HOST_CA={} RAFT_HOST_CERT={} RAFT_HOST_KEY={}",
                    ca.display(),
                    admin.cert.display(),
                    admin.key.display()
                );
                println!("  (or pass --ca, --cert and --key; `raft-host certs client` makes more, with other roles)");
            }
            None => {
                println!("plaintext, for trying things out: anyone who can reach these ports can do everything");
                println!("(`raft-host dev --tls` runs it on certificates, as a real cluster)");
            }
        }
        println!("state machines: kv (JSON commands), counter");
        println!("try, from another terminal:");
        println!("  raft-host write --addr {all} '{{\"op\":\"put\",\"key\":\"a\",\"value\":\"1\"}}'");
        println!("  raft-host read --addr {all} '{{\"op\":\"get\",\"key\":\"a\"}}'");
        println!("  raft-host status --addr {}", addresses[0]);
        if let Some(metrics) = servers.first().and_then(Server::metrics_addr) {
            println!("  curl http://{metrics}/metrics   (each member's metrics: its port + 1000)");
        }
        println!("(cargo run --release -p raft-host -- <command> works the same; Ctrl-C stops the cluster)");
        run_until_signal(servers).await
    })
}

/// Serves until SIGINT or SIGTERM (or a member fails), then stops every
/// member gracefully: stop accepting, finish in-flight work, flush.
async fn run_until_signal(members: Vec<Server>) -> anyhow::Result<()> {
    let stopping = futures_any(members.iter().map(Server::stopping).collect());
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let reload = async {
        while hangup.recv().await.is_some() {
            for member in &members {
                match member.reload_tls() {
                    Ok(true) => tracing::info!("SIGHUP: certificates read again; new connections use them"),
                    Ok(false) => tracing::info!("SIGHUP: this member serves plaintext; nothing to read"),
                    Err(error) => tracing::error!(%error, "SIGHUP: certificates not reloaded; the old ones stay"),
                }
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        signal = shutdown_signal() => {
            let name = signal?;
            tracing::info!(signal = name, "stopping");
        }
        () = stopping => tracing::warn!("a member stopped on its own; stopping the others"),
        () = reload => unreachable!("waits for ever"),
    }
    if members.len() == 1 {
        // A leader that is asked to stop hands over first, so the cluster
        // does not wait out an election timeout.
        for member in &members {
            member.hand_over_leadership().await;
        }
    }
    for member in &members {
        member.shutdown();
    }
    let mut first_error = None;
    for member in members {
        if let Err(error) = member.wait().await {
            tracing::error!(%error, "member failed");
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

/// Resolves when any of `futures` does.
async fn futures_any(futures: Vec<impl std::future::Future<Output = ()> + Send + 'static>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    for future in futures {
        let tx = tx.clone();
        tokio::spawn(async move {
            future.await;
            let _ = tx.send(()).await;
        });
    }
    drop(tx);
    let _ = rx.recv().await;
}

async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => { result?; Ok("SIGINT") }
        _ = terminate.recv() => Ok("SIGTERM"),
    }
}
