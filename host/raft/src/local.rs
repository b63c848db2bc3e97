//! An in-process cluster of cores over in-memory stores and a perfect
//! network, driven synchronously. It backs the core benchmark and the
//! `raft-host demo` command: the real algorithm, with the disk and network
//! taken out, so what it measures is the core's own cost. (Fault injection
//! lives in the simulator in the test tree, not here.)

use super::core::{Proposed, Raft};
use super::log_store::MemLogStore;
use super::types::{ConfState, Entry, Index, Message, NodeId, Role};
use super::{Config, ProposeError, RaftError};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

/// Bound on message deliveries per `run_until_idle`, so a bug that makes
/// nodes chatter forever fails loudly instead of hanging.
const DELIVERIES_PER_RUN_MAX: usize = 10_000_000;

/// The applied state of one member: a running digest of the entries it
/// applied, in order, so replicas can be compared cheaply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct AppliedState {
    pub index: Index,
    pub digest: u64,
}

/// A cluster of cores connected by a lossless in-memory network.
pub struct LocalCluster {
    nodes: BTreeMap<NodeId, Raft<MemLogStore>>,
    /// Durable stores of crashed members.
    crashed: BTreeMap<NodeId, MemLogStore>,
    applied: BTreeMap<NodeId, AppliedState>,
    inbox: VecDeque<Message>,
    seed: u64,
}

impl LocalCluster {
    /// A new cluster of `size` voters (ids 1..=size), none yet elected.
    pub fn new(size: u64, seed: u64) -> Result<LocalCluster, RaftError> {
        let conf = ConfState::with_voters(1..=size);
        let mut cluster = LocalCluster {
            nodes: BTreeMap::new(),
            crashed: BTreeMap::new(),
            applied: BTreeMap::new(),
            inbox: VecDeque::new(),
            seed,
        };
        for id in 1..=size {
            cluster.start(id, MemLogStore::new_with_conf_state(conf.clone()))?;
        }
        Ok(cluster)
    }

    fn start(&mut self, id: NodeId, store: MemLogStore) -> Result<(), RaftError> {
        let mut config = Config::new(id);
        config.seed = self.seed.wrapping_mul(31).wrapping_add(id);
        config.applied = self.applied.get(&id).map_or(0, |a| a.index);
        self.nodes.insert(id, Raft::new(config, store)?);
        Ok(())
    }

    /// The ids of running members.
    pub fn running(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// The running member that leads the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes.values().filter(|r| r.role() == Role::Leader).max_by_key(|r| r.term()).map(|r| r.id())
    }

    /// A running member's core.
    pub fn node(&self, id: NodeId) -> Option<&Raft<MemLogStore>> {
        self.nodes.get(&id)
    }

    /// What member `id` has applied.
    pub fn applied(&self, id: NodeId) -> AppliedState {
        self.applied.get(&id).copied().unwrap_or_default()
    }

    /// Ticks every running member once and lets the network settle.
    pub fn tick(&mut self) -> Result<(), RaftError> {
        for raft in self.nodes.values_mut() {
            raft.tick()?;
        }
        self.run_until_idle()
    }

    /// Ticks until some member leads and has committed its first entry;
    /// returns the number of ticks, or `None` after `max_ticks`.
    pub fn elect(&mut self, max_ticks: u32) -> Result<Option<u32>, RaftError> {
        for ticks in 1..=max_ticks {
            self.tick()?;
            if let Some(leader) = self.leader() {
                let raft = &self.nodes[&leader];
                if raft.log().term(raft.log().committed())? == raft.term() {
                    return Ok(Some(ticks));
                }
            }
        }
        Ok(None)
    }

    /// Proposes `payloads` at the current leader (without waiting).
    pub fn propose(&mut self, payloads: Vec<Bytes>) -> Result<Proposed, ProposeError> {
        let Some(leader) = self.leader() else { return Err(ProposeError::NotLeader { leader: None }) };
        let proposed = self.nodes.get_mut(&leader).expect("leader is running").propose(payloads)?;
        Ok(proposed)
    }

    /// Proposes and runs the cluster until the leader has applied the entries.
    /// Returns where they landed.
    pub fn write(&mut self, payloads: Vec<Bytes>) -> Result<Proposed, ProposeError> {
        let proposed = self.propose(payloads)?;
        self.run_until_idle()?;
        let leader = self.leader().ok_or(ProposeError::NotLeader { leader: None })?;
        if self.applied(leader).index < proposed.last_index {
            return Err(ProposeError::NotLeader { leader: Some(leader) });
        }
        Ok(proposed)
    }

    /// Stops member `id`, keeping only its durable store.
    pub fn crash(&mut self, id: NodeId) {
        if let Some(mut raft) = self.nodes.remove(&id) {
            self.crashed.insert(id, raft.store_mut().clone());
        }
        self.inbox.retain(|m| m.to != id);
    }

    /// Restarts a crashed member from its durable store.
    pub fn restart(&mut self, id: NodeId) -> Result<(), RaftError> {
        match self.crashed.remove(&id) {
            Some(store) => self.start(id, store),
            None => Ok(()),
        }
    }

    /// Handles every Ready and delivers every message until nothing moves.
    pub fn run_until_idle(&mut self) -> Result<(), RaftError> {
        let mut deliveries = 0;
        loop {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.handle_ready(id)?;
            }
            if self.inbox.is_empty() {
                return Ok(());
            }
            while let Some(message) = self.inbox.pop_front() {
                deliveries += 1;
                assert!(deliveries < DELIVERIES_PER_RUN_MAX, "the local cluster never went quiet");
                if let Some(raft) = self.nodes.get_mut(&message.to) {
                    raft.step(message)?;
                }
            }
        }
    }

    fn handle_ready(&mut self, id: NodeId) -> Result<(), RaftError> {
        let raft = self.nodes.get_mut(&id).expect("running");
        while raft.has_ready() {
            let ready = raft.ready()?;
            raft.store_mut().append(&ready.entries);
            if let Some(hard_state) = ready.hard_state {
                raft.store_mut().set_hard_state(hard_state);
            }
            self.inbox.extend(ready.messages);
            self.inbox.extend(ready.persisted_messages);
            let applied = self.applied.entry(id).or_default();
            for entry in &ready.committed_entries {
                apply(applied, entry);
            }
            raft.advance()?;
        }
        Ok(())
    }

    /// Whether every running member applied the same entries up to the same
    /// index.
    pub fn converged(&self) -> bool {
        let states: BTreeSet<AppliedState> = self.nodes.keys().map(|id| self.applied(*id)).collect();
        states.len() == 1
    }
}

fn apply(state: &mut AppliedState, entry: &Entry) {
    assert_eq!(entry.index, state.index + 1, "entries are applied in order, once");
    let mut hasher = DefaultHasher::new();
    (state.digest, entry.term, entry.index, &entry.data[..]).hash(&mut hasher);
    state.digest = hasher.finish();
    state.index = entry.index;
}
