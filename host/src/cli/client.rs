//! `raft-host write`, `read` and `status`: a client of a running cluster.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use raft_host::client::{ClusterClient, Consistency, outcome_of};
use raft_host::wire::client_pb::StatusResponse;
use raft_host::wire::{Tls, TlsFiles, Transport};
use serde_json::json;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub(super) struct Target {
    /// Members to talk to (host:port), comma-separated or repeated; the
    /// client finds the leader among them.
    #[arg(long = "addr", env = "RAFT_HOST_ADDR", value_delimiter = ',', default_value = "127.0.0.1:7001")]
    addresses: Vec<String>,
    /// Give up retrying after this many seconds.
    #[arg(long, env = "RAFT_HOST_TIMEOUT_SECS", default_value_t = 30)]
    timeout_secs: u64,
    /// The cluster CA's certificate (PEM); with --cert and --key, talk TLS.
    #[arg(long, env = "RAFT_HOST_CA")]
    ca: Option<PathBuf>,
    /// This client's certificate (PEM), naming its role (`raft-host certs client`).
    #[arg(long, env = "RAFT_HOST_CERT")]
    cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "RAFT_HOST_KEY")]
    key: Option<PathBuf>,
}

impl Target {
    /// How many member addresses were given.
    pub(super) fn len(&self) -> usize {
        self.addresses.len()
    }

    /// The member addresses given.
    pub(super) fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// TLS with the client certificate given, or plaintext without one.
    pub(super) fn transport(&self) -> anyhow::Result<Transport> {
        Ok(tls_transport(&self.ca, &self.cert, &self.key)?.unwrap_or(Transport::Plaintext))
    }

    pub(super) fn client(&self) -> anyhow::Result<ClusterClient> {
        let mut client = ClusterClient::with_transport(self.addresses.clone(), self.transport()?)?;
        client.deadline = std::time::Duration::from_secs(self.timeout_secs);
        Ok(client)
    }
}

#[derive(Args)]
pub struct WriteArgs {
    #[command(flatten)]
    target: Target,
    /// The state machine that applies the command.
    #[arg(long = "sm", env = "RAFT_HOST_SM", default_value = "kv")]
    state_machine: String,
    /// The command, in the state machine's format (for kv, JSON such as
    /// '{"op":"put","key":"a","value":"1"}').
    command: String,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum ConsistencyArg {
    Linearizable,
    Lease,
    Stale,
}

#[derive(Args)]
pub struct ReadArgs {
    #[command(flatten)]
    target: Target,
    #[arg(long = "sm", env = "RAFT_HOST_SM", default_value = "kv")]
    state_machine: String,
    /// linearizable (a quorum round), lease (the leader's lease) or stale
    /// (whatever the member has applied).
    #[arg(long, value_enum, default_value = "linearizable")]
    consistency: ConsistencyArg,
    /// The query, in the state machine's format (for kv, '{"op":"get","key":"a"}').
    query: String,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    target: Target,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn write(args: WriteArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let response = runtime.block_on(async {
        let mut client = args.target.client()?;
        client.write(&args.state_machine, args.command.into_bytes()).await.context("write failed")
    })?;
    print_outcome(outcome_of(response.outcome))
}

impl From<ConsistencyArg> for Consistency {
    fn from(arg: ConsistencyArg) -> Consistency {
        match arg {
            ConsistencyArg::Linearizable => Consistency::Linearizable,
            ConsistencyArg::Lease => Consistency::Lease,
            ConsistencyArg::Stale => Consistency::Stale,
        }
    }
}

pub fn read(args: ReadArgs) -> anyhow::Result<()> {
    let consistency = args.consistency.into();
    let runtime = super::runtime()?;
    let response = runtime.block_on(async {
        let mut client = args.target.client()?;
        client.read(&args.state_machine, args.query.into_bytes(), consistency).await.context("read failed")
    })?;
    print_outcome(outcome_of(response.outcome))
}

fn print_outcome(outcome: Result<Vec<u8>, String>) -> anyhow::Result<()> {
    match outcome {
        Ok(bytes) => {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&bytes)?;
            if bytes.last() != Some(&b'\n') {
                stdout.write_all(b"\n")?;
            }
            Ok(())
        }
        Err(message) => bail!("the state machine refused: {message}"),
    }
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let runtime = super::runtime()?;
    let status = runtime.block_on(async { args.target.client()?.status().await.context("status failed") })?;
    if args.json {
        println!("{}", status_json(&status));
    } else {
        print_status(&status);
    }
    Ok(())
}

/// The status as one JSON object.
pub fn status_json(s: &StatusResponse) -> serde_json::Value {
    json!({
        "cluster_id": s.cluster_id,
        "id": s.id,
        "role": s.role,
        "term": s.term,
        "leader_id": (s.leader_id != 0).then_some(s.leader_id),
        "leader_address": (!s.leader_address.is_empty()).then_some(&s.leader_address),
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "last_log_index": s.last_log_index,
        "members": s.members.iter().map(|m| json!({"id": m.id, "address": m.address, "kind": m.kind})).collect::<Vec<_>>(),
        "state_machines": s.state_machines.iter().map(|m| json!({
            "name": m.name, "module_hash": m.module_hash, "state_digest": m.state_digest,
        })).collect::<Vec<_>>(),
        "modules_compiled": s.modules_compiled,
        "modules_loaded_from_cache": s.modules_loaded_from_cache,
        "offline": s.offline,
        "snapshot_index": s.snapshot_index,
    })
}

fn print_status(s: &StatusResponse) {
    let leader =
        if s.leader_id == 0 { "none known".to_string() } else { format!("{} at {}", s.leader_id, s.leader_address) };
    let offline = if s.offline { " (OFFLINE for maintenance: neither votes nor campaigns)" } else { "" };
    println!("member {} of cluster {:?}: {} in term {}{offline}", s.id, s.cluster_id, s.role, s.term);
    println!("leader: {leader}");
    println!(
        "log: last index {}, commit index {}, applied index {}, compacted up to {}",
        s.last_log_index, s.commit_index, s.applied_index, s.snapshot_index
    );
    for m in &s.members {
        println!("member {}: {} ({})", m.id, m.address, m.kind);
    }
    println!(
        "modules since start: {} compiled, {} loaded from the compiled cache",
        s.modules_compiled, s.modules_loaded_from_cache
    );
    for m in &s.state_machines {
        println!(
            "state machine {}: module {}, state digest {}",
            m.name,
            m.module_hash.get(..16).unwrap_or(&m.module_hash),
            m.state_digest
        );
    }
}

/// TLS from a CA, a certificate and its key, when all three are given;
/// `None` when none is; an error for some but not all.
pub(super) fn tls_transport(
    ca: &Option<PathBuf>,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> anyhow::Result<Option<Transport>> {
    match (ca, cert, key) {
        (Some(ca), Some(cert), Some(key)) => {
            let files = TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
            Ok(Some(Transport::Tls(Arc::new(Tls::load(files)?))))
        }
        (None, None, None) => Ok(None),
        _ => bail!("TLS needs all three of --ca, --cert and --key"),
    }
}
