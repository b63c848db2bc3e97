//! What one member's node needs to run: identity, timing, limits. The
//! server's own settings (where it listens, metrics, admission) live in
//! `server::ServerConfig`, which wraps this.

use super::error::NodeError;
use super::sessions::SessionLimits;
use crate::process::BackgroundPriority;
use crate::raft::NodeId;
use crate::runtime::Limits;
use crate::storage::{Durability, HistoryLimits, StoreMemory};
use crate::wire::{Principal, Transport};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Everything one member's node needs to run.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Every message between members carries it; a member of another cluster
    /// is refused.
    pub cluster_id: String,
    /// The address other members and clients use for this one.
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
    /// How long a client request may wait for its answer.
    pub request_timeout: Duration,
    /// Committed entry bytes handed to the apply task and not yet applied;
    /// past it the core stops handing out more (replication goes on).
    pub max_apply_backlog_bytes: u64,
    pub sessions: SessionLimits,
    /// How long a deploy waits for every live member to compile a module
    /// before it activates it.
    pub module_ready_timeout: Duration,
    /// Applied entries the log holds before it is compacted (the applied
    /// state is the snapshot a follower too far behind receives).
    pub snapshot_threshold_entries: u64,
    /// Applied entries kept after a compaction, so followers a little
    /// behind catch up from the log rather than by snapshot.
    pub snapshot_keep_entries: u64,
    /// How much log (estimated from the average entry size) a leader keeps
    /// beyond the kept tail for followers catching up from it, or about to
    /// continue from it after a snapshot. Past it they are sent a snapshot
    /// instead; it bounds what a stalled transfer or a slow follower costs
    /// the leader's disk.
    pub catch_up_log_bytes: u64,
    /// Versions one state machine may hold (built-ins aside); a deploy past
    /// it is refused until one is removed.
    pub max_module_versions: usize,
    /// An upload begun through the log whose latest chunk is older than
    /// this is dropped through the log (the deploy was abandoned).
    pub upload_expiry: Duration,
    /// Free bytes kept on the data disk: below it the member takes no new
    /// entries (see `node::disk`).
    pub min_free_disk_bytes: u64,
    /// What the store keeps in memory (cache, memtables, journals).
    pub store_memory: StoreMemory,
    /// How much change history the store keeps for watchers.
    pub store_history: HistoryLimits,
    /// How far below the write path the storage's background threads and
    /// a follower's apply task run (see [`BackgroundPriority`]).
    pub background: BackgroundPriority,
    /// Largest snapshot a member accepts, as its sender announces it.
    pub max_snapshot_bytes: u64,
    /// How long a snapshot or deploy stream may go without a message
    /// before it is dropped (and what it staged with it).
    pub stream_idle_timeout: Duration,
    /// Where this member dials some others, instead of the address the
    /// membership records for them (a network where one member reaches
    /// another by another address; the fault suite's proxies). Local.
    pub routes: BTreeMap<NodeId, String>,
    /// Join a running cluster through this member (host:port) instead of
    /// bootstrapping one: start with no configuration, ask to be added as a
    /// learner, catch up, then ask to be promoted.
    pub join: Vec<String>,
    /// With `join`: stay a learner (promote later with `members promote`).
    pub join_as_learner: bool,
    /// How members reach each other, and who this one is to them: TLS with
    /// this member's certificate, or plaintext (only when chosen).
    pub transport: Transport,
}

impl NodeConfig {
    /// Defaults for member `id` of `cluster_id`, reached at `advertise`,
    /// with its data in `data_dir`.
    pub fn new(id: NodeId, cluster_id: impl Into<String>, advertise: impl Into<String>, data_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            cluster_id: cluster_id.into(),
            advertise: advertise.into(),
            peers: BTreeMap::new(),
            data_dir,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            durability: Durability::Fsync,
            limits: Limits::default(),
            max_command_bytes: 1 << 20,
            request_timeout: Duration::from_secs(10),
            max_apply_backlog_bytes: 64 << 20,
            sessions: SessionLimits::default(),
            module_ready_timeout: Duration::from_secs(300),
            snapshot_threshold_entries: 10_000,
            snapshot_keep_entries: 1_000,
            catch_up_log_bytes: 256 << 20,
            max_module_versions: 16,
            upload_expiry: Duration::from_secs(3600),
            max_snapshot_bytes: 256 << 30,
            min_free_disk_bytes: 128 << 20,
            store_memory: crate::process::memory_available_bytes()
                .map_or_else(StoreMemory::default, StoreMemory::for_memory),
            store_history: HistoryLimits::default(),
            background: BackgroundPriority::new(crate::process::DEFAULT_BACKGROUND_NICE),
            routes: BTreeMap::new(),
            stream_idle_timeout: Duration::from_secs(30),
            join: Vec::new(),
            join_as_learner: false,
            transport: Transport::Plaintext,
        }
    }

    /// What is wrong with these settings, before anything is opened.
    pub fn validate(&self) -> Result<(), NodeError> {
        let fail = |reason: String| Err(NodeError::Config(reason));
        if self.id == 0 {
            return fail("--id must be a positive number".into());
        }
        if self.peers.contains_key(&self.id) {
            return fail(format!("--peer lists this member's own id {}", self.id));
        }
        if self.cluster_id.is_empty() || self.cluster_id.len() > 128 {
            return fail("the cluster id must be 1 to 128 bytes".into());
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return fail("the election timeout must be longer than the heartbeat interval".into());
        }
        if self.tick.is_zero() {
            return fail("the tick must be longer than zero".into());
        }
        for seed in &self.join {
            if let Err(error) = crate::client::check_address(seed) {
                return fail(format!("--join: {error}"));
            }
        }
        if let Some(tls) = self.transport.tls() {
            let expected = Principal::Member { cluster: self.cluster_id.clone(), id: self.id };
            let found = tls.principal();
            if found != expected {
                return fail(format!("the certificate names {found}, but this is {expected}"));
            }
        }
        Ok(())
    }
}
