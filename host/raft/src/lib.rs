//! The consensus core: pure, synchronous, deterministic Raft.
//!
//! No I/O, no clock, no threads, no global state. Time is [`Raft::tick`];
//! randomness (election timeouts) comes from a generator seeded by
//! [`Config::seed`]. The same inputs in the same order always give the same
//! outputs, which is what lets the simulator in `host/raft/tests/simulation.rs`
//! replay any run from its seed.
//!
//! # Driving the core
//! Inputs: [`Raft::step`] (a message from a peer), [`Raft::tick`],
//! [`Raft::propose`], [`Raft::read_index`], [`Raft::campaign`]. After any of
//! them, while [`Raft::has_ready`], the driver takes a [`Ready`] and handles it
//! in the order documented there:
//!
//! 1. persist `entries` and `hard_state` durably; `messages` may leave at once
//!    (they are a leader's AppendEntries and heartbeats, which the thesis
//!    §10.2.1 allows before the leader's own write completes);
//! 2. then send `persisted_messages` (votes, append acknowledgements: each one
//!    promises durable state);
//! 3. then apply `committed_entries`, and serve `read_states` once applied;
//! 4. then call [`Raft::advance`].
//!
//! While a `Ready` is being persisted the core keeps taking inputs, and
//! [`Raft::take_messages`] hands out the `messages` the next `Ready` would
//! carry, so a leader's new entries reach the followers during its own fsync.
//!
//! A leader counts its own log towards a quorum only after `advance()`, so an
//! entry is never committed on the strength of a copy that is not durable.
//!
//! A single-member cluster, driven by hand:
//!
//! ```
//! use bytes::Bytes;
//! use raft_core::{Config, ConfState, Entry, MemLogStore, Raft, RaftError, Role};
//!
//! /// The driver's loop; returns what was applied.
//! fn drive(raft: &mut Raft<MemLogStore>) -> Result<Vec<Entry>, RaftError> {
//!     let mut applied = Vec::new();
//!     while raft.has_ready() {
//!         let ready = raft.ready()?;
//!         // 1. persist (a real driver fsyncs here); `ready.messages` may leave now
//!         raft.store_mut().append(&ready.entries);
//!         if let Some(hard_state) = ready.hard_state {
//!             raft.store_mut().set_hard_state(hard_state);
//!         }
//!         // 2. send `ready.persisted_messages` (none: there are no peers)
//!         // 3. apply
//!         applied.extend(ready.committed_entries.into_iter().filter(|e| !e.is_noop()));
//!         // 4. advance
//!         raft.advance()?;
//!     }
//!     Ok(applied)
//! }
//!
//! let store = MemLogStore::new_with_conf_state(ConfState::with_voters([1]));
//! let mut raft = Raft::new(Config::new(1), store)?;
//! raft.campaign()?;
//! drive(&mut raft)?; // its vote for itself is durable: it leads
//! assert_eq!(raft.role(), Role::Leader);
//! let proposed = raft.propose(vec![Bytes::from_static(b"hello")])?;
//! let applied = drive(&mut raft)?;
//! assert_eq!(applied.len(), 1);
//! assert_eq!(applied[0].index, proposed.first_index);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # What is here
//! Elections with randomized timeouts, PreVote and CheckQuorum; a no-op entry
//! per new leader and commitment by counting current-term replicas;
//! AppendEntries with the consistency check and fast backtracking hints;
//! per-follower progress (probe / replicate) with a bounded in-flight window
//! and pipelining; heartbeats carrying the commit index; ReadIndex reads.
//! Membership changes, snapshots and leader transfer extend the same types
//! ([`ConfState`], [`SnapshotMeta`]).

mod config;
mod core;
mod local;
mod log;
mod log_store;
mod progress;
mod quorum;
mod types;

pub use self::config::{Config, ConfigError};
pub use self::core::{Proposed, Raft, Ready};
pub use self::local::{AppliedState, LocalCluster};
pub use self::log::RaftLog;
pub use self::log_store::{LogStore, MemLogStore, StorageError};
pub use self::progress::{Inflights, Progress, ProgressState};
pub use self::quorum::{JointConfig, MajorityConfig, VoteResult};
pub use self::types::{
    ConfChange, ConfChangeEntry, ConfChangeKind, ConfState, ENTRY_OVERHEAD_BYTES, Entry, EntryKind, HardState, Index,
    Message, MessageBody, NodeId, ReadState, Role, SnapshotMeta, SoftState, Term,
};

use thiserror::Error;

/// A failure of the core itself: its store failed, or a peer sent something
/// that cannot be right. The core's state is unchanged by a rejected message.
#[derive(Debug, Error)]
pub enum RaftError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("invalid message from node {from}: {reason}")]
    InvalidMessage { from: NodeId, reason: String },
}

/// Why a proposal was refused. Nothing was appended.
#[derive(Debug, Error)]
pub enum ProposeError {
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("an empty proposal carries nothing to replicate")]
    Empty,
    #[error("entry of {bytes} bytes is above the limit of {max} bytes")]
    TooLarge { bytes: u64, max: u64 },
    #[error("leadership is being transferred to node {to}; retry shortly")]
    Transferring { to: NodeId },
    #[error("another membership change is in progress: {0}; retry once it is applied")]
    ConfChangePending(String),
    #[error("invalid membership change: {0}")]
    InvalidConfChange(String),
    #[error("invalid leader transfer: {0}")]
    InvalidTransfer(String),
    #[error("busy: {uncommitted_bytes} bytes are proposed and not yet committed (limit {max}); retry later")]
    Busy { uncommitted_bytes: u64, max: u64 },
    #[error(transparent)]
    Raft(#[from] RaftError),
}

impl From<StorageError> for ProposeError {
    fn from(e: StorageError) -> ProposeError {
        ProposeError::Raft(RaftError::Storage(e))
    }
}

/// Why a read request was refused.
#[derive(Debug, Error)]
pub enum ReadIndexError {
    #[error("no leader is known; retry once one is elected")]
    NoLeader,
    #[error("busy: too many reads are waiting; retry later")]
    Busy,
    #[error(transparent)]
    Raft(#[from] RaftError),
}
