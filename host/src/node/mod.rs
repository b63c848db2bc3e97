//! The node: tokio tasks that drive the consensus core, the store, the
//! WebAssembly runtime and the network (DESIGN.md, "Data flow").
//!
//! - The core task ([`core`]) owns [`crate::raft::Raft`] over the fjall store
//!   and a bounded inbox. It steps peer messages, ticks, proposals and reads,
//!   and handles each `Ready`: leader messages leave at once, the entries and
//!   hard state are synced on a blocking thread while the core keeps stepping
//!   (so the next batch of proposals gathers meanwhile: group commit), then
//!   the messages that promise durable state leave and the committed entries
//!   go to the apply task.
//! - One pair of lanes per peer ([`peers`]): a control lane (votes,
//!   heartbeats, acknowledgements) and a data lane (appends with entries), so
//!   heartbeats never wait behind a megabyte of entries. Each is a bounded
//!   queue; a full queue drops messages, which Raft recovers from.
//! - The apply task ([`apply`]), on its own thread: applies committed entries
//!   through the guests in batches, writes their effects, the session table
//!   and the applied index in one store batch, then answers waiting clients
//!   and serves reads whose index it reached.
//! - The gRPC services (`crate::rpc`) feed the inbox and wait on oneshots.

pub mod apply;
mod core;
pub mod deploy;
mod join;
pub mod members;
pub mod modules;
mod peers;
pub mod sessions;

pub(crate) use self::core::await_answer;
pub use self::core::{CoreHandle, CoreStatus, LeadershipView};
pub use self::peers::peer_channel;

use crate::raft::{NodeId, StorageError};
use crate::runtime::{Limits, LoadError, RuntimeError};
use crate::storage::{Durability, StoreError};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Everything one member needs to run.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Every message between members carries it; a member of another cluster
    /// is refused.
    pub cluster_id: String,
    /// Where peers and clients connect.
    pub listen: SocketAddr,
    /// The address other members and clients use for this one (defaults to
    /// `listen`).
    pub advertise: String,
    /// The other members of the initial cluster and their addresses (the
    /// first start records them; afterwards membership changes through the
    /// log, and these only add to the address book).
    pub peers: BTreeMap<NodeId, String>,
    pub data_dir: PathBuf,
    /// One tick of the consensus core's clock.
    pub tick: Duration,
    /// Election timeout and heartbeat interval, in ticks.
    pub election_ticks: u32,
    pub heartbeat_ticks: u32,
    pub durability: Durability,
    /// Guest limits (fuel, memory): identical on every member.
    pub limits: Limits,
    /// Largest command or query a client may send.
    pub max_command_bytes: usize,
    /// Client writes and reads waiting for an answer at once; past it,
    /// requests are refused as busy.
    pub max_pending_requests: usize,
    /// How long a client request may wait for its answer.
    pub request_timeout: Duration,
    /// Committed entry bytes handed to the apply task and not yet applied;
    /// past it the core stops handing out more (replication goes on).
    pub max_apply_backlog_bytes: u64,
    pub sessions: sessions::SessionLimits,
    /// How long a deploy waits for every live member to compile a module
    /// before it activates it.
    pub module_ready_timeout: Duration,
    /// Where to serve Prometheus metrics over HTTP (`/metrics`), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Applied entries the log holds before it is compacted (the applied
    /// state is the snapshot a follower too far behind receives).
    pub snapshot_threshold_entries: u64,
    /// Applied entries kept after a compaction, so followers a little
    /// behind catch up from the log rather than by snapshot.
    pub snapshot_keep_entries: u64,
    /// Join a running cluster through this member (host:port) instead of
    /// bootstrapping one: start with no configuration, ask to be added as a
    /// learner, catch up, then ask to be promoted.
    pub join: Option<String>,
    /// With `join`: stay a learner (promote later with `members promote`).
    pub join_as_learner: bool,
}

impl NodeConfig {
    /// Defaults for member `id` of `cluster_id`, listening on `listen`, with
    /// its data in `data_dir`.
    pub fn new(id: NodeId, cluster_id: impl Into<String>, listen: SocketAddr, data_dir: PathBuf) -> NodeConfig {
        NodeConfig {
            id,
            cluster_id: cluster_id.into(),
            listen,
            advertise: listen.to_string(),
            peers: BTreeMap::new(),
            data_dir,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            durability: Durability::Fsync,
            limits: Limits::default(),
            max_command_bytes: 1 << 20,
            max_pending_requests: 65_536,
            request_timeout: Duration::from_secs(10),
            max_apply_backlog_bytes: 64 << 20,
            sessions: sessions::SessionLimits::default(),
            module_ready_timeout: Duration::from_secs(300),
            metrics_listen: None,
            snapshot_threshold_entries: 10_000,
            snapshot_keep_entries: 1_000,
            join: None,
            join_as_learner: false,
        }
    }
}

/// Why a node could not start or had to stop.
#[derive(Debug, Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("log store: {0}")]
    Log(#[from] StorageError),
    #[error(transparent)]
    Raft(#[from] crate::raft::RaftError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("state machine {name:?}: {source}")]
    Module { name: String, source: LoadError },
    #[error("session table: {0}")]
    Sessions(#[from] sessions::SessionDecodeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("apply: {0}")]
    Apply(#[from] apply::ApplyError),
    #[error("the {0} task stopped unexpectedly")]
    TaskLost(&'static str),
}

/// Why one client request was not answered with an outcome. Each maps to a
/// gRPC status in `rpc`; the retryable ones say so.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("this member is not the leader{}", leader_hint(.leader))]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("no leader is known yet; retry shortly")]
    NoLeader,
    #[error("busy: {0}; retry with backoff")]
    Busy(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no state machine named {0:?} runs in this cluster")]
    UnknownStateMachine(String),
    #[error(
        "sequence number {sequence} is older than the {window} answers this client's session keeps (highest: {highest}); its outcome is unknown",
        window = sessions::REPLIES_PER_SESSION
    )]
    SessionExpired { sequence: u64, highest: u64 },
    #[error("{0}; the write may or may not have been applied: retry with the same client id and sequence number")]
    OutcomeUnknown(String),
    #[error("leadership changed while the request waited; retry")]
    LeadershipChanged,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("this member is shutting down")]
    ShuttingDown,
    /// The cluster decided against the request (an activation whose
    /// migrate hook failed, a module a member refused); retrying as is will
    /// not help.
    #[error("{0}")]
    Rejected(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn leader_hint(leader: &Option<(NodeId, String)>) -> String {
    match leader {
        Some((id, addr)) => format!(" (the leader is {id} at {addr})"),
        None => " and no leader is known".to_string(),
    }
}

/// What the state machine answered to a write, and where it sits in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteReply {
    pub outcome: Result<Vec<u8>, String>,
    pub index: u64,
    pub term: u64,
}

/// What the state machine answered to a read, and the applied index it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadReply {
    pub outcome: Result<Vec<u8>, String>,
    pub index: u64,
}

/// Read consistency levels (see `proto/client.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    Linearizable,
    Lease,
    Stale,
}

mod server;
pub use self::server::{Node, RunningNode};
