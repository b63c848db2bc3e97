//! The apply task: committed entries in, guest calls, one store batch per run
//! of entries, answers out.
//!
//! It runs on its own thread (guest calls are synchronous and CPU-bound) and
//! takes its work from a channel the core task feeds in log order. Every
//! decision here depends only on the entries (their order, their bytes, the
//! leader's timestamps), never on this node's clock or batch boundaries, so
//! every replica ends in the same state at the same index.

use super::members::{Members, Membership, decode_addresses};
use super::modules::{ModuleRegistry, Ranges, assemble, check_name};
use super::sessions::{Admission, SessionLimits, Sessions, session_reply};
use super::{NodeError, ReadReply, RequestError, WriteReply};
use crate::raft::{ConfChangeEntry, Entry, EntryKind, Index, SnapshotMeta, Term};
use crate::rpc::pb::{self, entry_payload, session_reply::Result as ReplyResult};
use crate::runtime::{EntryInfo, Machine, RuntimeError};
use crate::storage::{ApplyBatch, ModuleKey, StateWrite, Store, StoreError, hex};
use prost::Message as _;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use thiserror::Error;
use tokio::sync::{Notify, oneshot};

/// Largest module an upload may announce, whatever the members' settings.
const MODULE_BYTES_HARD_MAX: u64 = 1 << 30;

/// Work for the apply task.
pub enum ApplyMsg {
    /// A client waits for the entry proposed at `index` in `term`.
    Await { index: Index, term: Term, reply: oneshot::Sender<Result<WriteReply, RequestError>> },
    /// Committed entries, in log order, and their size for back-pressure.
    Committed { entries: Vec<Entry>, bytes: u64 },
    /// Serve a query once `index` is applied (0: at once, a stale read).
    Read(ReadJob),
    /// This node stopped being the leader: proposals still waiting may be
    /// committed by the next leader or lost; their clients retry.
    LeadershipLost,
    /// Report applied index and state digests.
    Status(oneshot::Sender<Result<ApplyStatus, RequestError>>),
    /// Replace the state with the staged snapshot (after applying what came
    /// before it), then report.
    InstallSnapshot { snapshot: SnapshotMeta, done: oneshot::Sender<Result<(), StoreError>> },
}

/// A read waiting for its index.
pub struct ReadJob {
    pub index: Index,
    pub state_machine: String,
    pub query: Vec<u8>,
    pub reply: oneshot::Sender<Result<ReadReply, RequestError>>,
}

/// The apply side of a member's status, taken at one applied index.
#[derive(Clone, Debug)]
pub struct ApplyStatus {
    pub applied_index: Index,
    pub state_machines: Vec<MachineStatus>,
}

/// One state machine's module and a digest of its state.
#[derive(Clone, Debug)]
pub struct MachineStatus {
    pub name: String,
    pub module_hash: String,
    pub state_digest: String,
}

/// How many handed-out bytes wait to be applied. The core stops handing out
/// committed entries past a limit and waits for the backlog to drain.
#[derive(Default)]
pub struct ApplyProgress {
    backlog_bytes: AtomicU64,
    /// Set while the core waits for the backlog to drain. Only then does an
    /// applied batch wake it: a wake-up per batch is a context switch per
    /// write on a lightly loaded member, for nothing.
    core_waiting: AtomicBool,
    /// Woken when the backlog shrinks while the core waits.
    pub drained: Notify,
}

impl ApplyProgress {
    /// The core hands out `bytes` more.
    pub fn handed_out(&self, bytes: u64) {
        self.backlog_bytes.fetch_add(bytes, Ordering::SeqCst);
    }

    /// The apply task applied (or dropped) `bytes` of what it was handed.
    pub fn applied(&self, bytes: u64) {
        self.backlog_bytes.fetch_sub(bytes, Ordering::SeqCst);
        if self.core_waiting.load(Ordering::SeqCst) {
            self.drained.notify_one();
        }
    }

    /// Whether the backlog is at `limit` or over. When it is, the core is
    /// registered for a `drained` wake-up before this returns.
    pub fn over(&self, limit: u64) -> bool {
        if self.backlog_bytes.load(Ordering::SeqCst) < limit {
            self.core_waiting.store(false, Ordering::SeqCst);
            return false;
        }
        self.core_waiting.store(true, Ordering::SeqCst);
        // The apply task may have drained between the load and the store
        // without seeing the flag; with both sides sequentially consistent,
        // this second look sees its subtraction if it missed the flag.
        let over = self.backlog_bytes.load(Ordering::SeqCst) >= limit;
        if !over {
            self.core_waiting.store(false, Ordering::SeqCst);
        }
        over
    }
}

/// A failure that stops the node: the store failed or the engine (not a
/// guest) broke. Replying to clients cannot continue safely after it.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("after installing a snapshot: {0}")]
    Reload(String),
}

/// One client write waiting in the current run.
struct RunItem {
    index: Index,
    term: Term,
    info: EntryInfo,
    command: Vec<u8>,
    client: Vec<u8>,
    sequence: u64,
    lowest_unanswered: u64,
}

/// A write's result, sent once the run that decided it is durable.
struct Decided {
    index: Index,
    term: Term,
    result: Result<WriteReply, RequestError>,
}

/// The apply task's state.
pub struct Applier {
    store: Store,
    registry: Arc<ModuleRegistry>,
    machines: BTreeMap<String, Machine>,
    sessions: Sessions,
    /// Index and term of the last applied entry.
    applied: (Index, Term),
    /// The replicated clock: the latest entry timestamp applied.
    clock_ms: u64,
    waiters: BTreeMap<Index, (Term, oneshot::Sender<Result<WriteReply, RequestError>>)>,
    reads: BTreeMap<Index, Vec<ReadJob>>,
    progress: Arc<ApplyProgress>,
    /// Writes of the current run, all for `run_machine`.
    run: Vec<RunItem>,
    run_machine: Option<String>,
    /// `(client, sequence)` of the run's writes, to catch a retry of a write
    /// in the same run (it must see that write's answer, not apply twice).
    run_keys: HashSet<(Vec<u8>, u64)>,
    decided: Vec<Decided>,
    /// Writes and module records of a deploy entry, for the next flush.
    pending_writes: Vec<StateWrite>,
    module_changes: Vec<(ModuleKey, Option<Vec<u8>>)>,
    /// Modules completed by the last flush, to compile once it is durable.
    completed_modules: Vec<[u8; 32]>,
    /// Uploads whose chunks arrived in order so far: the next offset and the
    /// hash of the bytes before it, so completing a module does not read
    /// it back (after a restart, or out of order, it is read back instead).
    hashing: HashMap<[u8; 32], (u64, Sha256)>,
    members: Arc<Members>,
    /// A membership change applied in this run, for the next flush.
    pending_membership: Option<Membership>,
    session_limits: SessionLimits,
}

impl Applier {
    /// The apply state of `store` as of its applied index.
    pub fn new(
        store: Store,
        registry: Arc<ModuleRegistry>,
        machines: BTreeMap<String, Machine>,
        (sessions, session_limits): (Sessions, SessionLimits),
        progress: Arc<ApplyProgress>,
        members: Arc<Members>,
    ) -> Result<Applier, StoreError> {
        let applied = store.applied();
        let clock_ms = store.apply_clock_ms()?;
        registry.set_names(machines.keys().cloned().collect());
        Ok(Applier {
            store,
            registry,
            machines,
            sessions,
            applied,
            clock_ms,
            waiters: BTreeMap::new(),
            reads: BTreeMap::new(),
            progress,
            run: Vec::new(),
            run_machine: None,
            run_keys: HashSet::new(),
            decided: Vec::new(),
            pending_writes: Vec::new(),
            module_changes: Vec::new(),
            completed_modules: Vec::new(),
            hashing: HashMap::new(),
            members,
            pending_membership: None,
            session_limits,
        })
    }

    /// Runs until the channel closes (the core task stopped) or a fatal error.
    pub fn run(mut self, inbox: mpsc::Receiver<ApplyMsg>) -> Result<(), ApplyError> {
        while let Ok(message) = inbox.recv() {
            self.handle(message)?;
        }
        self.fail_waiters(|| RequestError::ShuttingDown);
        Ok(())
    }

    /// Handles one message.
    pub fn handle(&mut self, message: ApplyMsg) -> Result<(), ApplyError> {
        match message {
            ApplyMsg::Await { index, term, reply } => {
                if index <= self.applied.0 {
                    // Cannot happen in order, but never leave a client hanging.
                    let _ = reply.send(Err(RequestError::OutcomeUnknown(format!(
                        "entry {index} was applied before its client started waiting"
                    ))));
                } else {
                    self.waiters.insert(index, (term, reply));
                }
            }
            ApplyMsg::Committed { entries, bytes } => {
                let result = self.apply_entries(entries);
                self.progress.applied(bytes);
                result?;
                self.serve_due_reads()?;
            }
            ApplyMsg::Read(job) => {
                if job.index <= self.applied.0 {
                    self.serve_read(job)?;
                } else {
                    self.reads.entry(job.index).or_default().push(job);
                }
            }
            ApplyMsg::LeadershipLost => {
                self.fail_waiters(|| {
                    RequestError::OutcomeUnknown("leadership changed before the write committed".into())
                });
            }
            ApplyMsg::Status(reply) => {
                let _ = reply.send(self.status().map_err(|e| RequestError::Internal(e.to_string())));
            }
            ApplyMsg::InstallSnapshot { snapshot, done } => {
                let result = self.install_snapshot(&snapshot);
                let _ = done.send(match &result {
                    Ok(()) => Ok(()),
                    Err(error) => Err(StoreError::Limit(error.to_string())),
                });
                result?;
                self.serve_due_reads()?;
            }
        }
        Ok(())
    }

    /// Replaces this member's state with the leader's snapshot and reloads
    /// everything kept in memory from the store.
    fn install_snapshot(&mut self, snapshot: &SnapshotMeta) -> Result<(), ApplyError> {
        self.flush()?;
        self.store.install_snapshot(snapshot)?;
        let reload = |e: NodeError| ApplyError::Reload(e.to_string());
        self.machines = super::server::load_active(&self.registry, &self.store).map_err(reload)?;
        self.registry.set_names(self.machines.keys().cloned().collect());
        self.sessions = Sessions::load(self.session_limits, self.store.session_scan()?)
            .map_err(|e| ApplyError::Reload(e.to_string()))?;
        self.applied = (snapshot.index, snapshot.term);
        self.clock_ms = self.store.apply_clock_ms()?;
        self.hashing.clear();
        self.fail_waiters(|| RequestError::OutcomeUnknown("this member installed a snapshot from the leader".into()));
        self.members.publish(Membership::stored(&self.store)?);
        tracing::info!(index = snapshot.index, term = snapshot.term, "snapshot installed");
        Ok(())
    }

    fn fail_waiters(&mut self, error: impl Fn() -> RequestError) {
        for (_, (_, reply)) in std::mem::take(&mut self.waiters) {
            let _ = reply.send(Err(error()));
        }
    }

    /// Applies committed entries in order. Consecutive writes to one state
    /// machine go to the guest in one batch and to the store in one atomic
    /// write with their session records and the applied position.
    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), ApplyError> {
        for entry in entries {
            if entry.index <= self.applied.0 {
                continue;
            }
            let position = (entry.index, entry.term);
            if entry.kind == EntryKind::ConfChange {
                self.apply_conf_change(position, &entry.data)?;
                continue;
            }
            match decode_entry(&entry) {
                Some((timestamp_ms, kind)) => {
                    self.clock_ms = self.clock_ms.max(timestamp_ms);
                    self.sessions.expire(self.clock_ms);
                    match kind {
                        entry_payload::Kind::Command(command) => self.admit(position, command)?,
                        entry_payload::Kind::ModuleChunk(chunk) => self.apply_chunk(position, chunk)?,
                        entry_payload::Kind::Activate(activate) => self.apply_activation(position, activate)?,
                    }
                }
                None => {
                    if entry.kind == EntryKind::Normal && !entry.is_noop() {
                        tracing::warn!(index = entry.index, "skipping an entry this version cannot decode");
                    }
                }
            }
            // The position moves with every entry; it is written with the
            // next flush, so a crash re-applies from the last durable one.
            self.applied = position;
        }
        self.flush()
    }

    fn admit(&mut self, (index, term): (Index, Term), command: pb::Command) -> Result<(), ApplyError> {
        let key = (command.client_id.clone(), command.sequence);
        let other_machine = self.run_machine.as_deref().is_some_and(|m| m != command.state_machine);
        if other_machine || (!key.0.is_empty() && self.run_keys.contains(&key)) {
            // The position so far belongs to the run being flushed.
            self.flush()?;
        }
        let info = EntryInfo { index, term, timestamp_ms: self.clock_ms };
        if !command.client_id.is_empty() {
            match self.sessions.admit(&command.client_id, command.sequence) {
                Admission::Apply => {}
                Admission::Duplicate(reply) => {
                    let result = Ok(reply_from_session(reply));
                    self.decided.push(Decided { index, term, result });
                    return Ok(());
                }
                Admission::Expired { highest } => {
                    let result = Err(RequestError::SessionExpired { sequence: command.sequence, highest });
                    self.decided.push(Decided { index, term, result });
                    return Ok(());
                }
            }
        }
        if !self.machines.contains_key(&command.state_machine) {
            let outcome = Err(format!("no state machine named {:?}", command.state_machine));
            let session = (command.client_id.as_slice(), command.sequence, command.lowest_unanswered);
            self.finish_write(index, term, session, outcome);
            return Ok(());
        }
        self.run_machine = Some(command.state_machine);
        if !key.0.is_empty() {
            self.run_keys.insert(key);
        }
        self.run.push(RunItem {
            index,
            term,
            info,
            command: command.command,
            client: command.client_id,
            sequence: command.sequence,
            lowest_unanswered: command.lowest_unanswered,
        });
        Ok(())
    }

    /// `session` is the write's client id, sequence number and the client's
    /// lowest unanswered sequence number.
    fn finish_write(
        &mut self,
        index: Index,
        term: Term,
        (client, sequence, lowest_unanswered): (&[u8], u64, u64),
        outcome: Result<Vec<u8>, String>,
    ) {
        if !client.is_empty() {
            let reply = session_reply(sequence, index, term, &outcome);
            self.sessions.record(client, reply, lowest_unanswered, self.clock_ms);
        }
        self.decided.push(Decided { index, term, result: Ok(WriteReply { outcome, index, term }) });
    }

    /// Runs the current run through its guest, makes its effects, the
    /// session changes and the applied position durable in one batch, then
    /// answers the clients.
    fn flush(&mut self) -> Result<(), ApplyError> {
        let mut writes = Vec::new();
        if let Some(name) = self.run_machine.take() {
            let run = std::mem::take(&mut self.run);
            self.run_keys.clear();
            if let Some(machine) = self.machines.get_mut(&name) {
                let commands: Vec<(EntryInfo, &[u8])> = run.iter().map(|i| (i.info, i.command.as_slice())).collect();
                let (outcomes, run_writes) = machine.apply_batch(&commands)?;
                writes = run_writes;
                for (item, outcome) in run.iter().zip(outcomes) {
                    let outcome = outcome.map_err(|e| e.to_string());
                    let session = (item.client.as_slice(), item.sequence, item.lowest_unanswered);
                    self.finish_write(item.index, item.term, session, outcome);
                }
            }
        }
        writes.append(&mut self.pending_writes);
        let modules = std::mem::take(&mut self.module_changes);
        let membership = self.pending_membership.take();
        if self.applied.0 > self.store.applied().0 || !writes.is_empty() || !modules.is_empty() {
            self.store.apply(&ApplyBatch {
                applied_index: self.applied.0,
                applied_term: self.applied.1,
                clock_ms: self.clock_ms,
                writes,
                sessions: self.sessions.take_changes(),
                modules,
                membership: membership.as_ref().map(|m| (m.conf.clone(), m.addresses.clone())),
            })?;
        }
        if let Some(membership) = membership {
            self.members.publish(membership);
        }
        for hash in std::mem::take(&mut self.completed_modules) {
            self.registry.prepare_in_background(hash);
        }
        self.answer_writes();
        Ok(())
    }

    /// A membership change: the configuration and addresses it carries
    /// become this member's, durably with its position. An entry this
    /// version cannot decode changes nothing, on every member alike.
    fn apply_conf_change(&mut self, position: (Index, Term), data: &[u8]) -> Result<(), ApplyError> {
        self.apply_alone(position, |applier| {
            Ok(match ConfChangeEntry::decode(data) {
                Ok(entry) => {
                    tracing::info!(change = ?entry.change.kind, node = entry.change.node, index = position.0, "membership change applied");
                    // The entry's book wins; members it does not name keep
                    // the address this member knew (a leader whose view
                    // lagged, or a joiner that never saw the bootstrap).
                    let mut addresses = applier.members.current().addresses;
                    addresses.extend(decode_addresses(&entry.change.context));
                    let members = entry.conf.members();
                    addresses.retain(|id, _| members.contains(id));
                    applier.pending_membership = Some(Membership { conf: entry.conf, addresses });
                    Ok(Vec::new())
                }
                Err(why) => Err(why),
            })
        })
    }

    /// A chunk of a module being deployed: stored with the applied position;
    /// the chunk that completes the module also verifies it against its hash
    /// and records it as a version of its state machine.
    fn apply_chunk(&mut self, position: (Index, Term), chunk: pb::ModuleChunk) -> Result<(), ApplyError> {
        self.apply_alone(position, |applier| Ok(applier.store_chunk(position.0, chunk)?))
    }

    /// Applies an entry in a batch of its own: what came before is made
    /// durable first, and the entry's outcome and changes land with its
    /// position.
    fn apply_alone(
        &mut self,
        (index, term): (Index, Term),
        decide: impl FnOnce(&mut Self) -> Result<Result<Vec<u8>, String>, ApplyError>,
    ) -> Result<(), ApplyError> {
        self.flush()?;
        let outcome = decide(self)?;
        self.applied = (index, term);
        self.decided.push(Decided { index, term, result: Ok(WriteReply { outcome, index, term }) });
        self.flush()
    }

    /// The chunk's outcome (refusals are decided by the entries alone, so
    /// every replica decides alike); a store failure is this member's, and
    /// fatal.
    fn store_chunk(&mut self, index: Index, chunk: pb::ModuleChunk) -> Result<Result<Vec<u8>, String>, StoreError> {
        let Ok(hash) = <[u8; 32]>::try_from(chunk.hash.as_slice()) else {
            return Ok(Err("a module hash is 32 bytes".to_string()));
        };
        if let Err(why) = check_name(&chunk.state_machine) {
            return Ok(Err(why));
        }
        // The configurable limit was the leader's to enforce; what applies
        // here must not depend on this member's settings.
        if chunk.total_bytes > MODULE_BYTES_HARD_MAX {
            return Ok(Err(format!(
                "module of {} bytes is above the limit of {MODULE_BYTES_HARD_MAX} bytes",
                chunk.total_bytes
            )));
        }
        let end = chunk.offset.checked_add(chunk.data.len() as u64).filter(|&end| end <= chunk.total_bytes);
        let Some(end) = end else {
            return Ok(Err(format!("chunk at {} runs past the module's {} bytes", chunk.offset, chunk.total_bytes)));
        };
        let mut upload = self.registry.upload(&hash)?.unwrap_or(pb::ModuleUpload {
            state_machine: chunk.state_machine.clone(),
            total_bytes: chunk.total_bytes,
            ..pb::ModuleUpload::default()
        });
        if upload.complete {
            return Ok(Ok(b"stored".to_vec()));
        }
        if upload.total_bytes != chunk.total_bytes {
            return Ok(Err(format!(
                "module {} is being uploaded with {} bytes, not {}",
                hex(&hash),
                upload.total_bytes,
                chunk.total_bytes
            )));
        }
        let mut received = Ranges::from_pb(&upload.received);
        received.add(chunk.offset, end);
        self.hash_in_order(hash, chunk.offset, &chunk.data);
        if !received.covers(upload.total_bytes) {
            upload.received = received.to_pb();
            self.module_changes.push((ModuleKey::Upload(hash), Some(upload.encode_to_vec())));
            self.module_changes.push((ModuleKey::Chunk { hash, offset: chunk.offset }, Some(chunk.data)));
            return Ok(Ok(b"received".to_vec()));
        }
        let matches = match self.hashing.remove(&hash) {
            Some((next, hasher)) if next == upload.total_bytes => hasher.finalize().as_slice() == hash,
            _ => {
                let stored = self.store.module_chunks(&hash)?;
                let whole = assemble(upload.total_bytes, stored, Some((chunk.offset, &chunk.data)));
                whole.is_some_and(|bytes| Sha256::digest(bytes).as_slice() == hash)
            }
        };
        if !matches {
            // Every replica holds the same chunks, so every replica drops them.
            for (offset, _) in self.store.module_chunks(&hash)? {
                self.module_changes.push((ModuleKey::Chunk { hash, offset }, None));
            }
            self.module_changes.push((ModuleKey::Upload(hash), None));
            return Ok(Err(format!("the uploaded bytes do not match module hash {}; upload it again", hex(&hash))));
        }
        upload.received = received.to_pb();
        upload.complete = true;
        upload.complete_index = index;
        let version = pb::ModuleVersion { size_bytes: upload.total_bytes, deploy_index: index, activated_index: 0 };
        let name = upload.state_machine.clone();
        self.module_changes.push((ModuleKey::Chunk { hash, offset: chunk.offset }, Some(chunk.data)));
        self.module_changes.push((ModuleKey::Upload(hash), Some(upload.encode_to_vec())));
        self.module_changes.push((ModuleKey::Version { name, hash }, Some(version.encode_to_vec())));
        self.completed_modules.push(hash);
        tracing::info!(module = %hex(&hash), bytes = version.size_bytes, index, "module upload complete");
        Ok(Ok(b"complete".to_vec()))
    }

    /// Feeds a chunk to its upload's running hash if it continues it.
    fn hash_in_order(&mut self, hash: [u8; 32], offset: u64, data: &[u8]) {
        if offset == 0 {
            self.hashing.insert(hash, (0, Sha256::new()));
        }
        match self.hashing.get_mut(&hash) {
            Some((next, hasher)) if *next == offset => {
                hasher.update(data);
                *next += data.len() as u64;
            }
            Some(_) => {
                self.hashing.remove(&hash);
            }
            None => {}
        }
    }

    /// Switches a state machine to a stored version. Entries before this one
    /// ran on the old version (the run is flushed first); the new version's
    /// migrate hook runs inside this entry, and if it fails the old version
    /// stays, on every replica alike.
    fn apply_activation(&mut self, (index, term): (Index, Term), activate: pb::Activate) -> Result<(), ApplyError> {
        let info = EntryInfo { index, term, timestamp_ms: self.clock_ms };
        self.apply_alone((index, term), |applier| applier.activate(info, activate))
    }

    /// The outcome is the previous version's hash (hex; empty for a new
    /// state machine) or why the activation failed.
    fn activate(&mut self, info: EntryInfo, activate: pb::Activate) -> Result<Result<Vec<u8>, String>, ApplyError> {
        let Ok(hash) = <[u8; 32]>::try_from(activate.hash.as_slice()) else {
            return Ok(Err("a module hash is 32 bytes".into()));
        };
        let name = activate.state_machine;
        if let Err(why) = check_name(&name) {
            return Ok(Err(why));
        }
        let previous = self.machines.get(&name).map(Machine::module_hash);
        if previous == Some(hash) {
            return Ok(Ok(hex(&hash).into_bytes()));
        }
        // Whether the module is stored is decided by the log alone; only then
        // may the copy compiled ahead of time stand in for reading it back.
        if !self.registry.is_stored(&hash)? {
            return Ok(Err(format!("no module {} is stored in this cluster; deploy it first", hex(&hash))));
        }
        let loaded = match self.registry.runtime().loaded(&hash) {
            Some(module) => Ok(module),
            None => {
                let bytes = self.registry.bytes(&hash)?.ok_or_else(|| StoreError::Corrupt {
                    dir: self.store.dir().to_path_buf(),
                    what: format!("module {} is recorded complete but its bytes are missing", hex(&hash)),
                })?;
                self.registry.load(&bytes)
            }
        };
        let module = match loaded {
            Ok(module) => module,
            Err(error) => return Ok(Err(format!("module {} cannot run: {error}", hex(&hash)))),
        };
        let mut machine = Machine::new(self.registry.runtime().clone(), module, name.clone(), self.store.clone());
        if let Some(previous) = previous {
            let (result, writes) = machine.migrate(info, &hex(&previous))?;
            if let Err(error) = result {
                tracing::warn!(state_machine = %name, module = %hex(&hash), index = info.index, %error, "activation failed in migrate");
                return Ok(Err(format!("the migrate hook of module {} refused: {error}", hex(&hash))));
            }
            self.pending_writes.extend(writes);
        }
        let mut version = self.registry.version_record(&name, &hash)?;
        version.activated_index = info.index;
        self.module_changes.push((ModuleKey::Version { name: name.clone(), hash }, Some(version.encode_to_vec())));
        self.module_changes.push((ModuleKey::Active(name.clone()), Some(hash.to_vec())));
        tracing::info!(state_machine = %name, module = %hex(&hash), previous = %previous.map(|p| hex(&p)).unwrap_or_default(), index = info.index, "state machine version activated");
        let replaced = self.machines.insert(name, machine).map(|old| old.module_hash());
        if let Some(old) = replaced.filter(|old| self.machines.values().all(|m| m.module_hash() != *old)) {
            // Its compiled code is cached on disk; a rollback reloads it fast.
            self.registry.runtime().forget(&old);
        }
        self.registry.set_names(self.machines.keys().cloned().collect());
        Ok(Ok(previous.map(|p| hex(&p)).unwrap_or_default().into_bytes()))
    }

    fn answer_writes(&mut self) {
        for decided in std::mem::take(&mut self.decided) {
            if let Some((term, reply)) = self.waiters.remove(&decided.index) {
                let result = if term == decided.term { decided.result } else { Err(slot_taken(decided.index)) };
                let _ = reply.send(result);
            }
        }
        // Waiters at applied indexes that held no write of theirs (a new
        // leader's no-op took the slot).
        let applied = self.applied.0;
        while let Some(entry) = self.waiters.first_entry() {
            if *entry.key() > applied {
                break;
            }
            let (index, (_, reply)) = entry.remove_entry();
            let _ = reply.send(Err(slot_taken(index)));
        }
    }

    fn serve_due_reads(&mut self) -> Result<(), ApplyError> {
        while let Some(entry) = self.reads.first_entry() {
            if *entry.key() > self.applied.0 {
                break;
            }
            for job in entry.remove() {
                self.serve_read(job)?;
            }
        }
        Ok(())
    }

    fn serve_read(&mut self, job: ReadJob) -> Result<(), ApplyError> {
        let Some(machine) = self.machines.get_mut(&job.state_machine) else {
            let _ = job.reply.send(Err(RequestError::UnknownStateMachine(job.state_machine)));
            return Ok(());
        };
        let at = EntryInfo { index: self.applied.0, term: self.applied.1, timestamp_ms: self.clock_ms };
        let outcome = machine.query(at, &job.query)?.map_err(|e| e.to_string());
        let _ = job.reply.send(Ok(ReadReply { outcome, index: self.applied.0 }));
        Ok(())
    }

    fn status(&self) -> Result<ApplyStatus, StoreError> {
        let mut state_machines = Vec::new();
        for (name, machine) in &self.machines {
            state_machines.push(MachineStatus {
                name: name.clone(),
                module_hash: hex(&machine.module_hash()),
                state_digest: hex(&self.store.state_digest(name)?),
            });
        }
        Ok(ApplyStatus { applied_index: self.applied.0, state_machines })
    }
}

/// A waiting write lost its log index to another leader's entry.
fn slot_taken(index: Index) -> RequestError {
    RequestError::OutcomeUnknown(format!("another leader's entry took index {index} of the write"))
}

/// The entry's timestamp and what it carries, if it is the node's.
fn decode_entry(entry: &Entry) -> Option<(u64, entry_payload::Kind)> {
    if entry.kind != EntryKind::Normal || entry.is_noop() {
        return None;
    }
    let payload = pb::EntryPayload::decode(entry.data.as_ref()).ok()?;
    Some((payload.timestamp_ms, payload.kind?))
}

fn reply_from_session(reply: pb::SessionReply) -> WriteReply {
    let outcome = match reply.result {
        Some(ReplyResult::Ok(bytes)) => Ok(bytes),
        Some(ReplyResult::Error(message)) => Err(message),
        None => Err("the stored answer is empty".to_string()),
    };
    WriteReply { outcome, index: reply.index, term: reply.term }
}

/// Encodes what an entry carries, stamped with the leader's clock.
pub fn encode_payload(timestamp_ms: u64, kind: entry_payload::Kind) -> bytes::Bytes {
    let payload = pb::EntryPayload { timestamp_ms, kind: Some(kind) };
    bytes::Bytes::from(payload.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::ApplyProgress;
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    /// Whether a `drained` wake-up is waiting for the core.
    fn woken(progress: &ApplyProgress) -> bool {
        let mut notified = pin!(progress.drained.notified());
        notified.as_mut().poll(&mut Context::from_waker(Waker::noop())) == Poll::Ready(())
    }

    #[test]
    fn applied_batches_wake_the_core_only_while_it_waits_for_the_backlog() {
        let progress = ApplyProgress::default();
        progress.handed_out(100);
        assert!(!progress.over(1_000));
        progress.applied(60);
        assert!(!woken(&progress), "a core that is not waiting is left asleep");

        progress.handed_out(1_000);
        assert!(progress.over(1_000), "1,040 bytes wait against a limit of 1,000");
        progress.applied(100);
        assert!(woken(&progress), "the core waits for the backlog, so a drained batch wakes it");
        assert!(!progress.over(1_000), "940 bytes wait");
        progress.applied(940);
        assert!(!woken(&progress), "once under the limit the core stops asking");
    }
}
