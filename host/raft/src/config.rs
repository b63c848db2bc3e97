//! Tuning and limits of one consensus core. Every queue and batch the core
//! keeps has a bound here.

use super::types::{Index, NodeId};
use thiserror::Error;

/// Configuration of one node's consensus core.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id (non-zero).
    pub id: NodeId,
    /// Ticks without hearing from a leader before a follower campaigns. The
    /// actual timeout is drawn from `[election_tick, 2 * election_tick)` anew
    /// at every term change, so that split votes resolve.
    pub election_tick: u32,
    /// Ticks between a leader's heartbeats; must be below `election_tick`.
    pub heartbeat_tick: u32,
    /// Run a pre-vote round before a real election (thesis §9.6), so that a
    /// node cut off from the cluster does not inflate terms and depose a
    /// healthy leader when it returns.
    pub pre_vote: bool,
    /// A leader steps down when it has not heard from a quorum within an
    /// election timeout, and followers ignore vote requests while they hear
    /// from a leader (thesis §6.2, §9.6).
    pub check_quorum: bool,
    /// Entry bytes per AppendEntries message (at least one entry is always sent).
    pub max_message_bytes: u64,
    /// AppendEntries messages in flight to one follower.
    pub max_inflight_messages: usize,
    /// Entry bytes in flight to one follower.
    pub max_inflight_bytes: u64,
    /// Largest payload of one proposed entry.
    pub max_entry_bytes: u64,
    /// Proposed but uncommitted bytes a leader accepts before refusing new
    /// proposals as busy.
    pub max_uncommitted_bytes: u64,
    /// Committed entry bytes handed out for applying in one `Ready`.
    pub max_apply_bytes: u64,
    /// ReadIndex requests a leader queues while waiting to commit its first
    /// entry of the term, and confirmation rounds it keeps in flight.
    pub max_pending_reads: usize,
    /// The last index the driver's state machine applied, when restarting.
    pub applied: Index,
    /// Seed of the random election timeouts.
    pub seed: u64,
}

impl Config {
    /// Defaults for node `id`: etcd-like tick counts (10 / 1) and limits sized
    /// for a host that moves WebAssembly modules through the log in chunks.
    pub fn new(id: NodeId) -> Config {
        Config {
            id,
            election_tick: 10,
            heartbeat_tick: 1,
            pre_vote: true,
            check_quorum: true,
            max_message_bytes: 1 << 20,
            max_inflight_messages: 256,
            max_inflight_bytes: 32 << 20,
            max_entry_bytes: 4 << 20,
            max_uncommitted_bytes: 64 << 20,
            max_apply_bytes: 16 << 20,
            max_pending_reads: 4096,
            applied: 0,
            seed: id,
        }
    }

    /// Checks that the values make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |reason: &'static str| Err(ConfigError { reason });
        if self.id == 0 {
            return fail("id must be non-zero");
        }
        if self.heartbeat_tick == 0 {
            return fail("heartbeat_tick must be at least 1");
        }
        if self.election_tick <= self.heartbeat_tick {
            return fail("election_tick must be greater than heartbeat_tick");
        }
        if self.max_inflight_messages == 0 {
            return fail("max_inflight_messages must be at least 1");
        }
        if self.max_message_bytes == 0 || self.max_inflight_bytes == 0 || self.max_apply_bytes == 0 {
            return fail("byte limits must be non-zero");
        }
        if self.max_entry_bytes > self.max_uncommitted_bytes {
            return fail("max_entry_bytes must not exceed max_uncommitted_bytes");
        }
        Ok(())
    }
}

/// A configuration that cannot work.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid raft configuration: {reason}")]
pub struct ConfigError {
    pub reason: &'static str,
}
