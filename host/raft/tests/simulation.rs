//! Deterministic simulation of whole clusters running the real consensus core.
//!
//! Each seed builds a 3- or 5-node cluster and drives it through a random
//! schedule: messages are delivered out of order, delayed, duplicated and
//! dropped; links are cut (symmetrically or one way); nodes crash between
//! receiving a `Ready` and finishing it, losing everything not yet persisted,
//! and restart from their durable store; clients propose writes and
//! linearizable reads throughout. Members compact their logs at random, so
//! lagging followers catch up by snapshot; the leader adds learners, promotes
//! and removes members one at a time (each cluster has two spare nodes that
//! start outside it), hands leadership over, and nodes go offline for
//! maintenance and come back. After every step the checker verifies:
//!
//! - election safety: at most one leader per term;
//! - log matching: two durable logs with the same term at an index are equal
//!   up to it (checked incrementally, with prefix hashes);
//! - state machine safety: every node commits and applies the same entry at
//!   each index;
//! - leader completeness: a new leader holds every entry committed in an
//!   earlier term (so every acknowledged write is in every later leader's log);
//! - ReadIndex linearizability: a read's index covers every write committed
//!   before the read was requested;
//! - lease reads: in the seeds whose nodes' clocks run at one rate (every
//!   tick reaches every live node), a leader's lease read index covers every
//!   write committed anywhere, whatever the message delays, crashes and
//!   leadership transfers;
//! - snapshots: an installed snapshot's point is a committed entry;
//! - liveness: once the network heals and every member is up and online, a
//!   leader is elected and a new write commits on every member within a
//!   bounded number of ticks (nodes outside the committed configuration are
//!   stopped, as an operator would).
//!
//! `RAFT_SIM_SEEDS=N` runs seeds 0..N (default 10,000 in release, 1,000 in a
//! debug build), `RAFT_SIM_SEED=S` replays
//! one seed and prints its trace. A failure prints the seed and the last
//! steps of its trace.

use bytes::Bytes;
use raft_core::{
    ConfChange, ConfChangeEntry, ConfChangeKind, ConfState, Config, Entry, EntryKind, Index, LogStore, MemLogStore,
    Message, MessageBody, NodeId, ProposeError, Raft, ReadIndexError, Ready, Role, SnapshotMeta, Term,
};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

const CHAOS_STEPS: usize = 20_000;
const LIVENESS_ROUNDS_MAX: usize = 400;
const TRACE_LINES_SHOWN: usize = 80;
const SPARE_NODES: u64 = 2;

/// A node's durable state, which survives crashes.
struct Durable {
    /// (term, prefix hash) of each durable log entry, index i at slot i - 1.
    log_hashes: Vec<(Term, u64)>,
    /// The store a (re)start opens: the bootstrap store, then a copy of the
    /// core's store taken at each crash. While the node runs, its core holds
    /// the live one.
    store: MemLogStore,
    applied: Index,
}

struct SimNode {
    id: NodeId,
    raft: Option<Raft<MemLogStore>>,
    /// A `Ready` whose immediate messages left but which is not yet persisted.
    pending: Option<Ready>,
    durable: Durable,
    /// Commit index at the last observation, to spot newly committed entries.
    observed_commit: Index,
    observed_leader_term: Term,
}

/// An entry known to be committed: its term and payload, and the term in
/// which a node was first seen to hold it committed.
#[derive(Clone)]
struct CommittedEntry {
    term: Term,
    kind: EntryKind,
    data: Bytes,
    commit_term: Term,
}

struct Sim {
    rng: ChaCha8Rng,
    nodes: Vec<SimNode>,
    config_template: Config,
    in_flight: Vec<Message>,
    /// Directional links that drop everything: (from, to).
    cut: BTreeSet<(NodeId, NodeId)>,
    drop_percent: u32,
    duplicate_percent: u32,
    weights: Weights,
    /// Chance that an input reaches a node whose last `Ready` is unfinished.
    overlap_percent: u32,
    /// Whether nodes send `take_messages()` while a `Ready` is unfinished,
    /// as raft-host's driver does (half the seeds; the rest wait for it).
    early_messages: bool,
    /// Whether a tick reaches every live node at once (clocks at one rate,
    /// which a lease trusts), rather than one node at a time (unbounded
    /// drift, where only ReadIndex reads are checked).
    synchronized_clocks: bool,
    leaders: BTreeMap<Term, NodeId>,
    initial_conf: ConfState,
    committed: Vec<CommittedEntry>,
    next_payload: u64,
    next_read_ctx: u64,
    /// Read ctx -> committed length when the read was requested.
    reads: HashMap<u64, Index>,
    reads_served: HashSet<u64>,
    trace: Option<VecDeque<String>>,
    stats: Stats,
}

#[derive(Default, Clone, Copy)]
struct Stats {
    proposals_accepted: u64,
    entries_committed: u64,
    reads_served: u64,
    lease_reads_served: u64,
    crashes: u64,
    elections: u64,
    snapshots_installed: u64,
    conf_changes_applied: u64,
}

type Violation = String;

/// What the schedule does next.
#[derive(Clone, Copy, Debug)]
enum Action {
    Deliver,
    Tick,
    Persist,
    Propose,
    Read,
    Crash,
    Restart,
    Network,
    Compact,
    ConfChange,
    Transfer,
    Offline,
}

/// Per-seed action weights ("swarm testing"): each seed stresses a different
/// mix, so rare interleavings (slow disks, crash storms, read floods) each get
/// seeds where they are common.
struct Weights {
    table: Vec<(Action, u32)>,
    total: u32,
}

impl Weights {
    fn draw(rng: &mut ChaCha8Rng) -> Weights {
        let table = vec![
            (Action::Deliver, rng.random_range(200..600)),
            (Action::Tick, rng.random_range(100..350)),
            (Action::Persist, rng.random_range(20..250)),
            (Action::Propose, rng.random_range(20..200)),
            (Action::Read, rng.random_range(0..80)),
            (Action::Crash, rng.random_range(0..15)),
            (Action::Restart, rng.random_range(2..30)),
            (Action::Network, rng.random_range(1..20)),
            (Action::Compact, rng.random_range(0..30)),
            (Action::ConfChange, rng.random_range(0..12)),
            (Action::Transfer, rng.random_range(0..6)),
            (Action::Offline, rng.random_range(0..6)),
        ];
        let total = table.iter().map(|(_, w)| w).sum();
        Weights { table, total }
    }

    fn pick(&self, rng: &mut ChaCha8Rng) -> Action {
        let mut roll = rng.random_range(0..self.total);
        for &(action, weight) in &self.table {
            if roll < weight {
                return action;
            }
            roll -= weight;
        }
        unreachable!("roll is below the total weight")
    }
}

impl Sim {
    fn new(seed: u64, traced: bool) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let size = if seed.is_multiple_of(2) { 3 } else { 5 };
        let mut config = Config::new(1);
        config.election_tick = 10;
        config.heartbeat_tick = rng.random_range(1..=3);
        // Small limits so batching, windows and back-pressure are exercised.
        config.max_message_bytes = rng.random_range(40..400);
        config.max_inflight_messages = rng.random_range(1..=8);
        config.max_inflight_bytes = rng.random_range(200..4000);
        config.max_apply_bytes = rng.random_range(40..400);
        // Room for a membership change naming all seven nodes.
        config.max_entry_bytes = 128;
        config.max_uncommitted_bytes = 2048;
        config.max_pending_reads = 16;
        config.pre_vote = rng.random_ratio(3, 4);
        config.check_quorum = rng.random_ratio(3, 4);
        let voters = ConfState::with_voters(1..=size);
        // Two spare nodes start outside the configuration, to be added.
        let nodes = (1..=size + SPARE_NODES)
            .map(|id| SimNode {
                id,
                raft: None,
                pending: None,
                durable: Durable {
                    log_hashes: Vec::new(),
                    store: MemLogStore::new_with_conf_state(if id <= size {
                        voters.clone()
                    } else {
                        ConfState::default()
                    }),
                    applied: 0,
                },
                observed_commit: 0,
                observed_leader_term: 0,
            })
            .collect();
        let mut sim = Sim {
            nodes,
            config_template: config,
            in_flight: Vec::new(),
            cut: BTreeSet::new(),
            drop_percent: 0,
            duplicate_percent: 0,
            weights: Weights::draw(&mut rng),
            overlap_percent: *[0, 30, 90].choose(&mut rng).expect("non-empty"),
            // Drawn from the seed, not the schedule's generator: the other
            // half replays exactly as before this option existed.
            early_messages: (seed / 2).is_multiple_of(2),
            synchronized_clocks: (seed / 4).is_multiple_of(2),
            leaders: BTreeMap::new(),
            initial_conf: voters.clone(),
            committed: Vec::new(),
            next_payload: 0,
            next_read_ctx: 0,
            reads: HashMap::new(),
            reads_served: HashSet::new(),
            trace: traced.then(VecDeque::new),
            rng,
            stats: Stats::default(),
        };
        for slot in 0..(size + SPARE_NODES) as usize {
            sim.start(slot).expect("fresh nodes start");
        }
        let c = sim.config_template.clone();
        let (early, synchronized) = (sim.early_messages, sim.synchronized_clocks);
        sim.log(|| {
            format!(
                "seed {seed}: {size} nodes, heartbeat_tick {}, pre_vote {}, check_quorum {}, max_message_bytes {}, inflight {} msgs / {} bytes, early messages {}, synchronized clocks {}",
                c.heartbeat_tick, c.pre_vote, c.check_quorum, c.max_message_bytes, c.max_inflight_messages, c.max_inflight_bytes, early, synchronized
            )
        });
        sim
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push_back(line());
        }
    }

    fn start(&mut self, slot: usize) -> Result<(), Violation> {
        let node = &mut self.nodes[slot];
        let mut config = self.config_template.clone();
        config.id = node.id;
        config.seed = self.rng.random();
        config.applied = node.durable.applied;
        let raft = Raft::new(config, node.durable.store.clone())
            .map_err(|e| format!("node {} failed to start: {e}", node.id))?;
        node.observed_commit = raft.log().committed();
        node.raft = Some(raft);
        Ok(())
    }

    fn crash(&mut self, slot: usize) {
        let node = &mut self.nodes[slot];
        // The core's store only ever receives persisted writes (in
        // `finish_ready`), so it is exactly what survives the crash.
        if let Some(mut raft) = node.raft.take() {
            node.durable.store = raft.store_mut().clone();
        }
        node.pending = None;
        self.stats.crashes += 1;
        let id = node.id;
        self.log(|| format!("crash {id} (unpersisted state lost)"));
    }

    fn live_slots(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&s| self.nodes[s].raft.is_some()).collect()
    }

    fn slot_of(&self, id: NodeId) -> usize {
        (id - 1) as usize
    }

    // ---- Driving one node through its Ready --------------------------------

    /// Phase one: take the Ready and let immediate messages leave.
    fn take_ready(&mut self, slot: usize) -> Result<(), Violation> {
        let node = &mut self.nodes[slot];
        let Some(raft) = node.raft.as_mut() else { return Ok(()) };
        if node.pending.is_some() && self.early_messages {
            let early = raft.take_messages();
            self.in_flight.extend(early);
        }
        if node.pending.is_some() || !raft.has_ready() {
            return self.observe();
        }
        let mut ready = raft.ready().map_err(|e| format!("node {}: ready failed: {e}", node.id))?;
        let messages = std::mem::take(&mut ready.messages);
        node.pending = Some(ready);
        self.in_flight.extend(messages);
        // Every input that can change commit or leadership ends here: check
        // now, before any later input in the same step can build on it.
        self.observe()
    }

    /// Phase two: persist, send the rest, apply, advance.
    fn finish_ready(&mut self, slot: usize) -> Result<(), Violation> {
        let Some(mut ready) = self.nodes[slot].pending.take() else { return Ok(()) };
        let id = self.nodes[slot].id;
        if let Some(snapshot) = ready.snapshot.take() {
            self.install_snapshot(slot, snapshot)?;
        }
        if !ready.entries.is_empty() {
            self.persist_entries(slot, &ready.entries)?;
        }
        let node = &mut self.nodes[slot];
        let raft = node.raft.as_mut().expect("pending ready implies a live node");
        if let Some(hs) = ready.hard_state {
            raft.store_mut().set_hard_state(hs);
        }
        self.in_flight.append(&mut ready.persisted_messages);
        for entry in &ready.committed_entries {
            self.apply(slot, entry)?;
        }
        for read in &ready.read_states {
            let Some(floor) = self.reads.remove(&read.ctx) else {
                // The network may duplicate a forwarded read's answer.
                if self.reads_served.contains(&read.ctx) {
                    continue;
                }
                return Err(format!("node {id}: read state for unknown ctx {}", read.ctx));
            };
            self.reads_served.insert(read.ctx);
            if read.index < floor {
                return Err(format!(
                    "node {id}: read {} served at index {} but {floor} entries were committed when it was requested (stale read)",
                    read.ctx, read.index
                ));
            }
            self.stats.reads_served += 1;
        }
        let node = &mut self.nodes[slot];
        node.raft.as_mut().expect("live").advance().map_err(|e| format!("node {id}: advance failed: {e}"))?;
        // advance() may commit (a leader's own write became durable) and
        // produce more work; take it now like a real driver loop would.
        self.take_ready(slot)
    }

    fn persist_entries(&mut self, slot: usize, entries: &[Entry]) -> Result<(), Violation> {
        let id = self.nodes[slot].id;
        {
            let node = &mut self.nodes[slot];
            let raft = node.raft.as_mut().expect("live");
            raft.store_mut().append(entries);
            let first = entries[0].index as usize;
            node.durable.log_hashes.truncate(first - 1);
            for entry in entries {
                let prev = node.durable.log_hashes.last().map_or(0, |&(_, h)| h);
                let mut hasher = DefaultHasher::new();
                (prev, entry.term, entry.index, &entry.data[..]).hash(&mut hasher);
                node.durable.log_hashes.push((entry.term, hasher.finish()));
            }
        }
        // Log matching, checked at the moment an index is (re)written: both
        // sides' prefixes up to it are final until either rewrites it again.
        for entry in entries {
            let slot_index = (entry.index - 1) as usize;
            let (term, hash) = self.nodes[slot].durable.log_hashes[slot_index];
            for other in &self.nodes {
                if other.id == id {
                    continue;
                }
                if let Some(&(other_term, other_hash)) = other.durable.log_hashes.get(slot_index)
                    && other_term == term
                    && other_hash != hash
                {
                    return Err(format!(
                        "log matching: nodes {id} and {} both have term {term} at index {} but different prefixes",
                        other.id, entry.index
                    ));
                }
            }
        }
        Ok(())
    }

    /// Step 0 of a Ready: the snapshot's data replaces the state machine (here:
    /// the applied prefix) and the whole log.
    fn install_snapshot(&mut self, slot: usize, snapshot: SnapshotMeta) -> Result<(), Violation> {
        let id = self.nodes[slot].id;
        let Some(known) = self.committed.get((snapshot.index - 1) as usize) else {
            return Err(format!("node {id}: installed a snapshot at {} which no node has committed", snapshot.index));
        };
        if known.term != snapshot.term {
            return Err(format!(
                "snapshot safety: node {id} installed a snapshot at {} with term {} but term {} was committed there",
                snapshot.index, snapshot.term, known.term
            ));
        }
        let hashes = self.canonical_hashes(snapshot.index);
        self.log(|| format!("install snapshot at {id}: ({}, {})", snapshot.index, snapshot.term));
        let node = &mut self.nodes[slot];
        node.durable.log_hashes = hashes;
        node.durable.applied = snapshot.index;
        node.raft.as_mut().expect("live").store_mut().install_snapshot(snapshot);
        self.stats.snapshots_installed += 1;
        Ok(())
    }

    /// Prefix hashes of the committed log up to `index`, as `persist_entries`
    /// computes them.
    fn canonical_hashes(&self, index: Index) -> Vec<(Term, u64)> {
        let mut out = Vec::with_capacity(index as usize);
        for (offset, known) in self.committed.iter().take(index as usize).enumerate() {
            let prev = out.last().map_or(0, |&(_, h)| h);
            let mut hasher = DefaultHasher::new();
            (prev, known.term, offset as Index + 1, &known.data[..]).hash(&mut hasher);
            out.push((known.term, hasher.finish()));
        }
        out
    }

    fn apply(&mut self, slot: usize, entry: &Entry) -> Result<(), Violation> {
        let node = &mut self.nodes[slot];
        // What a node applied must survive its crash with the log under it.
        if entry.index > node.durable.log_hashes.len() as Index {
            return Err(format!(
                "node {}: applied index {} but holds only {} entries durably",
                node.id,
                entry.index,
                node.durable.log_hashes.len()
            ));
        }
        if entry.index != node.durable.applied + 1 {
            return Err(format!("node {}: applied index {} after {}", node.id, entry.index, node.durable.applied));
        }
        let Some(known) = self.committed.get((entry.index - 1) as usize) else {
            return Err(format!("node {}: applied index {} which no node has committed", node.id, entry.index));
        };
        if known.term != entry.term || known.data != entry.data {
            return Err(format!(
                "state machine safety: node {} applied (term {}, {:?}) at index {} but (term {}, {:?}) was committed",
                node.id, entry.term, entry.data, entry.index, known.term, known.data
            ));
        }
        node.durable.applied = entry.index;
        if entry.kind == EntryKind::ConfChange {
            let raft = node.raft.as_mut().expect("live");
            let change = ConfChangeEntry::decode(&entry.data).map_err(|e| format!("bad conf change: {e}"))?;
            raft.store_mut().set_conf_state(change.conf);
            self.stats.conf_changes_applied += 1;
        }
        Ok(())
    }

    // ---- Inputs ------------------------------------------------------------

    /// Before an input, a driver with a synchronous disk finishes its pending
    /// `Ready`; one that persists in the background (as the node's leader
    /// does) lets inputs through while the write is in flight. Each seed mixes
    /// the two.
    fn before_input(&mut self, slot: usize) -> Result<(), Violation> {
        if self.rng.random_range(0..100) < self.overlap_percent {
            return Ok(());
        }
        self.finish_ready(slot)
    }

    fn deliver(&mut self, mut message: Message) -> Result<(), Violation> {
        if self.cut.contains(&(message.from, message.to)) {
            self.log(|| format!("cut   {} -> {} {}", message.from, message.to, message.body.name()));
            return self.report_snapshot(&message, false);
        }
        let slot = self.slot_of(message.to);
        if self.nodes[slot].raft.is_none() {
            return self.report_snapshot(&message, false);
        }
        if let MessageBody::InstallSnapshot { snapshot } = &mut message.body
            && let Some(later) = self.later_snapshot_point(message.from, snapshot.index)
        {
            // A driver may ship any later applied point of the sender.
            *snapshot = later;
        }
        self.before_input(slot)?;
        self.log(|| format!("deliver {} -> {} t{} {:?}", message.from, message.to, message.term, short(&message)));
        let to = message.to;
        let raft = self.nodes[slot].raft.as_mut().expect("live");
        raft.step(message.clone()).map_err(|e| format!("node {to}: step failed: {e}"))?;
        self.take_ready(slot)?;
        self.report_snapshot(&message, true)
    }

    /// The sender's current applied point, sometimes, when it is past `index`.
    fn later_snapshot_point(&mut self, sender: NodeId, index: Index) -> Option<SnapshotMeta> {
        if !self.rng.random_bool(0.5) {
            return None;
        }
        let node = &self.nodes[self.slot_of(sender)];
        let applied = node.durable.applied;
        let raft = node.raft.as_ref()?;
        if applied <= index {
            return None;
        }
        let term = self.committed.get((applied - 1) as usize)?.term;
        let (_, conf_state) = raft.log().store().initial_state().ok()?;
        Some(SnapshotMeta { index: applied, term, conf_state })
    }

    /// Tells the sender of a snapshot that its stream ended (`_delivered`
    /// says how, for the trace; the core treats both alike).
    fn report_snapshot(&mut self, message: &Message, _delivered: bool) -> Result<(), Violation> {
        if !matches!(message.body, MessageBody::InstallSnapshot { .. }) {
            return Ok(());
        }
        let slot = self.slot_of(message.from);
        let Some(raft) = self.nodes[slot].raft.as_mut() else { return Ok(()) };
        let from = message.from;
        raft.report_snapshot(message.to).map_err(|e| format!("node {from}: report failed: {e}"))?;
        self.take_ready(slot)
    }

    fn tick(&mut self, slot: usize) -> Result<(), Violation> {
        self.before_input(slot)?;
        let Some(raft) = self.nodes[slot].raft.as_mut() else { return Ok(()) };
        let id = raft.id();
        raft.tick().map_err(|e| format!("node {id}: tick failed: {e}"))?;
        self.take_ready(slot)
    }

    /// Proposes a few writes at `slot`; returns where the last one landed.
    fn propose(&mut self, slot: usize) -> Result<Option<(Index, Term)>, Violation> {
        self.before_input(slot)?;
        let count = self.rng.random_range(1..=3);
        let payloads: Vec<Bytes> = (0..count)
            .map(|_| {
                self.next_payload += 1;
                Bytes::from(format!("w{}", self.next_payload))
            })
            .collect();
        let Some(raft) = self.nodes[slot].raft.as_mut() else { return Ok(None) };
        let id = raft.id();
        let landed = match raft.propose(payloads) {
            Ok(p) => {
                self.stats.proposals_accepted += 1;
                self.log(|| format!("propose at {id}: {}..={} in term {}", p.first_index, p.last_index, p.term));
                Some((p.last_index, p.term))
            }
            Err(ProposeError::NotLeader { .. } | ProposeError::Busy { .. } | ProposeError::Transferring { .. }) => None,
            Err(e) => return Err(format!("node {id}: proposal failed unexpectedly: {e}")),
        };
        self.take_ready(slot)?;
        Ok(landed)
    }

    fn request_read(&mut self, slot: usize) -> Result<(), Violation> {
        self.before_input(slot)?;
        self.next_read_ctx += 1;
        let ctx = self.next_read_ctx;
        let floor = self.committed.len() as Index;
        let Some(raft) = self.nodes[slot].raft.as_mut() else { return Ok(()) };
        let id = raft.id();
        match raft.read_index(ctx) {
            Ok(()) => {
                self.reads.insert(ctx, floor);
                self.log(|| format!("read at {id}: ctx {ctx}, floor {floor}"));
            }
            Err(ReadIndexError::NoLeader | ReadIndexError::Busy) => {}
            Err(e) => return Err(format!("node {id}: read failed unexpectedly: {e}")),
        }
        self.take_ready(slot)
    }

    /// A lease read at `slot`, served at once if the node holds a lease: its
    /// index must cover every write committed anywhere so far.
    fn lease_read(&mut self, slot: usize) -> Result<(), Violation> {
        self.before_input(slot)?;
        let floor = self.committed.len() as Index;
        let Some(raft) = self.nodes[slot].raft.as_ref() else { return Ok(()) };
        let (id, term) = (raft.id(), raft.term());
        let Some(index) = raft.lease_read_index() else { return Ok(()) };
        self.log(|| format!("lease read at {id} (term {term}): index {index}, floor {floor}"));
        if index < floor {
            return Err(format!(
                "node {id}: lease read in term {term} served at index {index} but {floor} entries were committed (stale read)"
            ));
        }
        self.stats.lease_reads_served += 1;
        Ok(())
    }

    fn change_network(&mut self) {
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        self.cut.clear();
        match self.rng.random_range(0..4) {
            0 => {
                self.log(|| "heal network".to_string());
            }
            1 => {
                // Split into two sides.
                let side: BTreeSet<NodeId> = ids.iter().copied().filter(|_| self.rng.random_bool(0.5)).collect();
                for &a in &ids {
                    for &b in &ids {
                        if side.contains(&a) != side.contains(&b) {
                            self.cut.insert((a, b));
                        }
                    }
                }
                self.log(|| format!("partition {side:?} | rest"));
            }
            2 => {
                // Isolate one node, in one direction only.
                let &node = ids.choose(&mut self.rng).expect("non-empty");
                let outbound = self.rng.random_bool(0.5);
                for &other in &ids {
                    if other != node {
                        self.cut.insert(if outbound { (node, other) } else { (other, node) });
                    }
                }
                self.log(|| format!("node {node} can{} send only", if outbound { "not" } else { "" }));
            }
            _ => {
                // Random one-way link cuts.
                for &a in &ids {
                    for &b in &ids {
                        if a != b && self.rng.random_ratio(1, 4) {
                            self.cut.insert((a, b));
                        }
                    }
                }
                let cut = self.cut.clone();
                self.log(|| format!("cut links {cut:?}"));
            }
        }
        self.drop_percent = *[0, 0, 5, 20].choose(&mut self.rng).expect("non-empty");
        self.duplicate_percent = *[0, 2, 10].choose(&mut self.rng).expect("non-empty");
    }

    /// Picks a message, mostly among the oldest (so most traffic is roughly
    /// in order) but sometimes anywhere (reordering, long delays).
    fn pick_message(&mut self) -> Option<Result<Message, Violation>> {
        if self.in_flight.is_empty() {
            return None;
        }
        let window = if self.rng.random_ratio(1, 10) { self.in_flight.len() } else { self.in_flight.len().min(4) };
        let at = self.rng.random_range(0..window);
        let message = if self.rng.random_range(0..100) < self.duplicate_percent {
            self.in_flight[at].clone()
        } else {
            self.in_flight.remove(at)
        };
        if self.rng.random_range(0..100) < self.drop_percent {
            self.log(|| format!("drop  {} -> {} {}", message.from, message.to, message.body.name()));
            // A lost snapshot stream fails at its sender.
            if let Err(v) = self.report_snapshot(&message, false) {
                return Some(Err(v));
            }
            return None;
        }
        Some(Ok(message))
    }

    fn chaos_step(&mut self) -> Result<(), Violation> {
        let live = self.live_slots();
        match self.weights.pick(&mut self.rng) {
            Action::Deliver => {
                if let Some(m) = self.pick_message() {
                    self.deliver(m?)?;
                }
            }
            Action::Tick if self.synchronized_clocks => {
                // Every clock advances together, as often on average as one
                // node's clock does otherwise.
                if !live.is_empty() && self.rng.random_ratio(1, live.len() as u32) {
                    let mut order = live.clone();
                    order.shuffle(&mut self.rng);
                    for slot in order {
                        self.tick(slot)?;
                    }
                }
            }
            Action::Tick => {
                if let Some(&slot) = live.choose(&mut self.rng) {
                    self.tick(slot)?;
                }
            }
            Action::Persist => {
                if let Some(&slot) = live.choose(&mut self.rng) {
                    self.finish_ready(slot)?;
                }
            }
            Action::Propose => {
                // Clients mostly find the leader; sometimes they ask anyone.
                let leader = live
                    .iter()
                    .copied()
                    .find(|&s| self.nodes[s].raft.as_ref().is_some_and(|r| r.role() == Role::Leader));
                let target = if self.rng.random_ratio(4, 5) { leader } else { live.choose(&mut self.rng).copied() };
                if let Some(slot) = target {
                    self.propose(slot)?;
                }
            }
            Action::Read if self.synchronized_clocks && self.rng.random_bool(0.5) => {
                // Every node that thinks it leads, a deposed one included.
                let leaders: Vec<usize> = live.iter().copied().filter(|&s| self.is_leader(s)).collect();
                if let Some(&slot) = leaders.choose(&mut self.rng) {
                    self.lease_read(slot)?;
                }
            }
            Action::Read => {
                if let Some(&slot) = live.choose(&mut self.rng) {
                    self.request_read(slot)?;
                }
            }
            Action::Crash => {
                if let Some(&slot) = live.choose(&mut self.rng) {
                    self.crash(slot);
                }
            }
            Action::Restart => {
                let down: Vec<usize> = (0..self.nodes.len()).filter(|&s| self.nodes[s].raft.is_none()).collect();
                if let Some(&slot) = down.choose(&mut self.rng) {
                    let id = self.nodes[slot].id;
                    self.log(|| format!("restart {id}"));
                    self.start(slot)?;
                }
            }
            Action::Network => self.change_network(),
            Action::Compact => {
                if let Some(&slot) = live.choose(&mut self.rng) {
                    self.compact(slot);
                }
            }
            Action::ConfChange => self.change_membership()?,
            Action::Transfer => {
                let leader = live.iter().copied().find(|&s| self.is_leader(s));
                if let Some(slot) = leader {
                    self.before_input(slot)?;
                    let voters: Vec<NodeId> =
                        self.nodes[slot].raft.as_ref().expect("live").voters().into_iter().collect();
                    if let Some(&to) = voters.choose(&mut self.rng) {
                        let raft = self.nodes[slot].raft.as_mut().expect("live");
                        let from = raft.id();
                        match raft.transfer_leader(to) {
                            Ok(()) => self.log(|| format!("transfer leadership {from} -> {to}")),
                            Err(ProposeError::NotLeader { .. }) => {}
                            Err(e) => return Err(format!("node {from}: transfer failed unexpectedly: {e}")),
                        }
                        self.take_ready(slot)?;
                    }
                }
            }
            Action::Offline => {
                if let Some(&slot) = live.choose(&mut self.rng) {
                    self.before_input(slot)?;
                    let raft = self.nodes[slot].raft.as_mut().expect("live");
                    let (id, offline) = (raft.id(), !raft.is_offline());
                    raft.set_offline(offline).map_err(|e| format!("node {id}: set_offline failed: {e}"))?;
                    self.log(|| format!("node {id} {}", if offline { "offline" } else { "online" }));
                    self.take_ready(slot)?;
                }
            }
        }
        self.observe()
    }

    fn is_leader(&self, slot: usize) -> bool {
        self.nodes[slot].raft.as_ref().is_some_and(|r| r.role() == Role::Leader)
    }

    /// Compacts a node's log up to what it has applied.
    fn compact(&mut self, slot: usize) {
        let node = &mut self.nodes[slot];
        let applied = node.durable.applied;
        let Some(raft) = node.raft.as_mut() else { return };
        let store = raft.store_mut();
        let first = store.first_index().unwrap_or(1);
        // The store's membership is the one as of `applied`; compacting
        // elsewhere would record another point's membership.
        if applied < first {
            return;
        }
        let (_, conf) = store.initial_state().expect("in-memory store");
        store.compact(applied, conf);
        let id = node.id;
        self.log(|| format!("compact {id} to {applied}"));
    }

    /// Proposes a random membership change at the leader.
    fn change_membership(&mut self) -> Result<(), Violation> {
        let live = self.live_slots();
        let Some(slot) = live.iter().copied().find(|&s| self.is_leader(s)) else { return Ok(()) };
        self.before_input(slot)?;
        let raft = self.nodes[slot].raft.as_ref().expect("live");
        let conf = raft.conf_state();
        let everyone: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        let outside: Vec<NodeId> = everyone.iter().copied().filter(|id| !conf.members().contains(id)).collect();
        let learners: Vec<NodeId> = conf.learners.iter().copied().collect();
        let members: Vec<NodeId> = conf.members().into_iter().collect();
        let change = match self.rng.random_range(0..3) {
            0 => outside.choose(&mut self.rng).map(|&node| (ConfChangeKind::AddLearner, node)),
            1 => learners.choose(&mut self.rng).map(|&node| (ConfChangeKind::Promote, node)),
            _ => members.choose(&mut self.rng).map(|&node| (ConfChangeKind::Remove, node)),
        };
        let Some((kind, node)) = change else { return Ok(()) };
        let raft = self.nodes[slot].raft.as_mut().expect("live");
        let id = raft.id();
        match raft.propose_conf_change(ConfChange { kind, node, context: Bytes::new() }) {
            Ok(p) => self.log(|| format!("propose at {id}: {kind:?} {node} at {}", p.last_index)),
            Err(
                ProposeError::NotLeader { .. }
                | ProposeError::Busy { .. }
                | ProposeError::Transferring { .. }
                | ProposeError::ConfChangePending(_)
                | ProposeError::InvalidConfChange(_),
            ) => {}
            Err(e) => return Err(format!("node {id}: conf change failed unexpectedly: {e}")),
        }
        self.take_ready(slot)
    }

    // ---- Checks ------------------------------------------------------------

    fn observe(&mut self) -> Result<(), Violation> {
        for slot in 0..self.nodes.len() {
            let Some(raft) = self.nodes[slot].raft.as_ref() else { continue };
            let (id, term) = (raft.id(), raft.term());
            if raft.role() == Role::Leader {
                match self.leaders.get(&term) {
                    Some(&other) if other != id => {
                        return Err(format!("election safety: nodes {other} and {id} both lead term {term}"));
                    }
                    Some(_) => {}
                    None => {
                        self.leaders.insert(term, id);
                        self.stats.elections += 1;
                        self.log(|| format!("node {id} leads term {term}"));
                    }
                }
                if self.nodes[slot].observed_leader_term != term {
                    self.nodes[slot].observed_leader_term = term;
                    self.check_leader_completeness(slot)?;
                }
            }
            self.observe_commit(slot)?;
        }
        Ok(())
    }

    fn check_leader_completeness(&self, slot: usize) -> Result<(), Violation> {
        let raft = self.nodes[slot].raft.as_ref().expect("live");
        let term = raft.term();
        // Compacted entries were applied, and applying checks each of them.
        let first = raft.log().first_index().map_err(|e| e.to_string())?;
        for (offset, known) in self.committed.iter().enumerate() {
            let index = offset as Index + 1;
            if known.commit_term >= term || index < first {
                continue;
            }
            let held = raft.log().entries(index, index + 1, u64::MAX).ok().and_then(|mut v| v.pop());
            if held.as_ref().is_none_or(|e| e.term != known.term || e.data != known.data) {
                return Err(format!(
                    "leader completeness: node {} leads term {term} without entry {index} (term {}) committed in term {}",
                    raft.id(),
                    known.term,
                    known.commit_term
                ));
            }
        }
        Ok(())
    }

    fn observe_commit(&mut self, slot: usize) -> Result<(), Violation> {
        let raft = self.nodes[slot].raft.as_ref().expect("live");
        let commit = raft.log().committed();
        let mut from = self.nodes[slot].observed_commit + 1;
        if commit < from {
            return Ok(());
        }
        let first = raft.log().first_index().map_err(|e| e.to_string())?;
        if from < first {
            // The commit index jumped over a snapshot: its point must be an
            // entry already known to be committed with the same term.
            let snapshot = raft.log().snapshot_meta().map_err(|e| e.to_string())?;
            match self.committed.get((snapshot.index - 1) as usize) {
                Some(known) if known.term == snapshot.term => {}
                _ => {
                    return Err(format!(
                        "snapshot safety: node {} holds snapshot ({}, {}) which is not a committed entry",
                        raft.id(),
                        snapshot.index,
                        snapshot.term
                    ));
                }
            }
            from = first;
            if commit < from {
                self.nodes[slot].observed_commit = commit;
                return Ok(());
            }
        }
        let entries = raft
            .log()
            .entries(from, commit + 1, u64::MAX)
            .map_err(|e| format!("node {}: read failed: {e}", raft.id()))?;
        let (id, term) = (raft.id(), raft.term());
        for entry in entries {
            match self.committed.get((entry.index - 1) as usize) {
                Some(known) if known.term != entry.term || known.data != entry.data => {
                    return Err(format!(
                        "state machine safety: node {id} committed (term {}, {:?}) at index {} but (term {}, {:?}) was committed before",
                        entry.term, entry.data, entry.index, known.term, known.data
                    ));
                }
                Some(_) => {}
                None => {
                    assert_eq!(entry.index as usize, self.committed.len() + 1, "commit observations are contiguous");
                    self.committed.push(CommittedEntry {
                        term: entry.term,
                        kind: entry.kind,
                        data: entry.data.clone(),
                        commit_term: term,
                    });
                    self.stats.entries_committed += 1;
                }
            }
        }
        self.nodes[slot].observed_commit = commit;
        Ok(())
    }

    // ---- Liveness ----------------------------------------------------------

    /// Heals everything, then requires a leader and a new write applied on
    /// every node within a bounded number of rounds (one tick each).
    fn check_liveness(&mut self) -> Result<(), Violation> {
        self.cut.clear();
        self.drop_percent = 0;
        self.duplicate_percent = 0;
        self.overlap_percent = 0;
        self.log(|| "liveness: heal network, restart all members, all online".to_string());
        self.restart_members()?;
        // First the cluster must converge on heartbeats alone: a leader, and
        // every node holding, committing and applying the leader's whole log.
        // Then a new write must commit and apply everywhere.
        let mut converged_at: Option<usize> = None;
        let mut proposed: Option<(Index, Term)> = None;
        for round in 0..LIVENESS_ROUNDS_MAX {
            // A change committed meanwhile may add or remove members.
            self.restart_members()?;
            for slot in self.live_slots() {
                self.tick(slot)?;
            }
            self.drain_network()?;
            self.observe()?;
            let leader_slot =
                (0..self.nodes.len()).find(|&s| self.nodes[s].raft.as_ref().is_some_and(|r| r.role() == Role::Leader));
            let Some(leader_slot) = leader_slot else { continue };
            let leader = self.nodes[leader_slot].raft.as_ref().expect("live");
            let leader_term = leader.term();
            if converged_at.is_none() {
                let last = leader.log().last_index().map_err(|e| e.to_string())?;
                let caught_up = self.nodes.iter().filter(|n| n.raft.is_some()).all(|n| {
                    let r = n.raft.as_ref().expect("live");
                    r.log().last_index().ok() == Some(last) && r.log().committed() == last && n.durable.applied == last
                });
                if caught_up {
                    self.log(|| format!("liveness: converged at index {last} after {round} rounds"));
                    converged_at = Some(round);
                } else {
                    continue;
                }
            }
            if let Some((index, term)) = proposed {
                match self.committed.get((index - 1) as usize) {
                    Some(entry) if entry.term == term => {
                        let applied_everywhere =
                            self.nodes.iter().filter(|n| n.raft.is_some()).all(|n| n.durable.applied >= index);
                        if applied_everywhere {
                            self.log(|| format!("liveness: write applied everywhere after {round} rounds"));
                            return Ok(());
                        }
                    }
                    // Another leader's entry took its place: write again.
                    Some(_) => proposed = None,
                    None => {}
                }
            }
            if proposed.is_none_or(|(_, t)| t < leader_term) {
                proposed = self.propose(leader_slot)?.or(proposed);
            }
        }
        let state: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.raft.is_some())
            .map(|n| {
                let r = n.raft.as_ref().expect("live");
                format!(
                    "node {} {} term {} {:?} last {:?} commit {} applied {} (core: {}), pending ready: {}",
                    n.id,
                    r.role().as_str(),
                    r.term(),
                    r.conf_state(),
                    r.log().last_index().ok(),
                    r.log().committed(),
                    n.durable.applied,
                    r.log().applied(),
                    n.pending.is_some()
                )
            })
            .collect();
        let phase = if converged_at.is_some() {
            "a new write was not applied everywhere"
        } else {
            "the cluster did not converge"
        };
        Err(format!("liveness: {phase} within {LIVENESS_ROUNDS_MAX} rounds after healing: {state:?}"))
    }

    /// The configuration after every committed membership change, and the
    /// index of the last one.
    fn committed_conf(&self) -> (ConfState, Index) {
        let mut conf = self.initial_conf.clone();
        let mut last_change = 0;
        for (offset, entry) in self.committed.iter().enumerate() {
            if entry.kind != EntryKind::ConfChange {
                continue;
            }
            if let Ok(change) = ConfChangeEntry::decode(&entry.data) {
                conf = change.conf;
                last_change = offset as Index + 1;
            }
        }
        (conf, last_change)
    }

    /// Runs every member of the committed configuration, all online. A node
    /// outside it is stopped once every member has applied the last change,
    /// as an operator retires a removed node only after the rest of the
    /// cluster took the change in (until then its vote may still count for
    /// members that do not know the change committed).
    fn restart_members(&mut self) -> Result<(), Violation> {
        let (conf, last_change) = self.committed_conf();
        let members = conf.members();
        let settled = self
            .nodes
            .iter()
            .filter(|n| members.contains(&n.id))
            .all(|n| n.raft.is_some() && n.durable.applied >= last_change);
        for slot in 0..self.nodes.len() {
            let id = self.nodes[slot].id;
            match (members.contains(&id), self.nodes[slot].raft.is_some()) {
                // A node outside the configuration runs until the change
                // that removed it is applied everywhere.
                (true, false) | (false, false) if !settled || members.contains(&id) => self.start(slot)?,
                (false, true) if settled => {
                    self.log(|| format!("liveness: stop {id}, which is not a member"));
                    self.crash(slot);
                }
                _ => {}
            }
            if let Some(raft) = self.nodes[slot].raft.as_mut()
                && raft.is_offline()
            {
                raft.set_offline(false).map_err(|e| format!("node {id}: set_offline failed: {e}"))?;
            }
        }
        Ok(())
    }

    /// Delivers every message in order until the network is quiet.
    fn drain_network(&mut self) -> Result<(), Violation> {
        for _ in 0..100_000 {
            // A real driver loops until the core has nothing left to hand out.
            for slot in 0..self.nodes.len() {
                self.finish_ready(slot)?;
            }
            if self.nodes.iter().any(|n| n.pending.is_some()) {
                continue;
            }
            if self.in_flight.is_empty() {
                return Ok(());
            }
            let batch = std::mem::take(&mut self.in_flight);
            for m in batch {
                self.deliver(m)?;
            }
        }
        Err("network never quiesced".to_string())
    }
}

fn short(m: &Message) -> String {
    use raft_core::MessageBody as B;
    match &m.body {
        B::AppendEntries { prev_log_index, prev_log_term, entries, leader_commit } => format!(
            "AppendEntries prev ({prev_log_index},{prev_log_term}) {} entries{} commit {leader_commit}",
            entries.len(),
            entries.last().map(|e| format!(" to ({},{})", e.index, e.term)).unwrap_or_default()
        ),
        other => format!("{other:?}"),
    }
}

/// Runs one seed to completion; Err carries the violation.
fn run_seed(seed: u64, traced: bool) -> (Result<Stats, Violation>, Option<VecDeque<String>>) {
    let mut sim = Sim::new(seed, traced);
    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), Violation> {
        for _ in 0..CHAOS_STEPS {
            sim.chaos_step()?;
        }
        sim.check_liveness()
    }));
    let result = match outcome {
        Ok(Ok(())) => Ok(sim.stats),
        Ok(Err(v)) => Err(v),
        Err(panic) => {
            let text =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("core panicked: {}", text.unwrap_or_else(|| "(no message)".into())))
        }
    };
    (result, sim.trace)
}

fn report_failure(seed: u64, violation: &str) {
    eprintln!("\nVIOLATION at seed {seed}: {violation}");
    let (_, trace) = run_seed(seed, true);
    if let Some(trace) = trace {
        let skip = trace.len().saturating_sub(TRACE_LINES_SHOWN);
        eprintln!("last {} of {} steps (replay with RAFT_SIM_SEED={seed}):", trace.len() - skip, trace.len());
        for line in trace.iter().skip(skip) {
            eprintln!("  {line}");
        }
    }
}

fn main() {
    // Keep core panics from printing twice: the report below says it all.
    std::panic::set_hook(Box::new(|_| {}));
    if let Ok(seed) = std::env::var("RAFT_SIM_SEED") {
        let seed: u64 = seed.parse().expect("RAFT_SIM_SEED must be an integer");
        let (result, trace) = run_seed(seed, true);
        for line in trace.unwrap_or_default() {
            println!("{line}");
        }
        match result {
            Ok(_) => println!("simulated 1 seeds, 0 violations"),
            Err(v) => {
                println!("VIOLATION at seed {seed}: {v}");
                println!("simulated 1 seeds, 1 violations");
                std::process::exit(1);
            }
        }
        return;
    }
    let seeds: u64 = std::env::var("RAFT_SIM_SEEDS")
        .ok()
        .map(|s| s.parse().expect("RAFT_SIM_SEEDS must be an integer"))
        // Seeds beyond the first thousand found real bugs; a release run
        // (the README's test command) does ten thousand in ~20 s.
        .unwrap_or(if cfg!(debug_assertions) { 1_000 } else { 10_000 });
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let violations = AtomicUsize::new(0);
    let totals = std::sync::Mutex::new(Stats::default());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds {
                        break;
                    }
                    match run_seed(seed, false).0 {
                        Ok(stats) => {
                            let mut t = totals.lock().expect("no poisoned lock");
                            t.proposals_accepted += stats.proposals_accepted;
                            t.entries_committed += stats.entries_committed;
                            t.reads_served += stats.reads_served;
                            t.lease_reads_served += stats.lease_reads_served;
                            t.crashes += stats.crashes;
                            t.elections += stats.elections;
                            t.snapshots_installed += stats.snapshots_installed;
                            t.conf_changes_applied += stats.conf_changes_applied;
                        }
                        Err(v) => {
                            violations.fetch_add(1, Ordering::Relaxed);
                            report_failure(seed, &v);
                        }
                    }
                }
            });
        }
    });
    let t = totals.into_inner().expect("no poisoned lock");
    let violations = violations.into_inner();
    println!(
        "{} s: {} elections, {} proposals accepted, {} entries committed, {} reads served, {} lease reads served, {} crashes, {} snapshots installed, {} membership changes applied",
        started.elapsed().as_secs_f64().round(),
        t.elections,
        t.proposals_accepted,
        t.entries_committed,
        t.reads_served,
        t.lease_reads_served,
        t.crashes,
        t.snapshots_installed,
        t.conf_changes_applied
    );
    println!("simulation: {} passed, {violations} failed", seeds as usize - violations);
    println!("simulated {seeds} seeds, {violations} violations");
    if violations > 0 {
        std::process::exit(1);
    }
}
