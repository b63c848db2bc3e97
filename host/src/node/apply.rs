//! The apply task: committed entries in, guest calls, one store batch per run
//! of entries, answers out.
//!
//! It runs on its own thread (guest calls are synchronous and CPU-bound) and
//! takes its work from a channel the core task feeds in log order. Every
//! decision here depends only on the entries (their order, their bytes, the
//! leader's timestamps), never on this node's clock or batch boundaries, so
//! every replica ends in the same state at the same index.
//!
//! This file batches client writes and keeps the session table; the entries
//! of a deploy go through [`super::module_apply`]. The services reach the
//! task through an [`ApplyHandle`]: stale reads and the applied side of
//! the member's status.

use super::config::NodeConfig;
use super::error::{ApplyError, NodeError, Task};
use super::histograms::NodeHistograms;
use super::members::{Members, Membership};
use super::module_apply::{ModuleApply, Outcome};
use super::modules::ModuleRegistry;
use super::request::{BARRIER, ReadReply, RequestError, WriteReply, await_answer};
use super::sessions::{Admission, SessionLimits, Sessions, session_reply};
use super::shutdown::Shutdown;
use crate::process::{BackgroundPriority, RolePriority};
use crate::raft::{ConfChangeEntry, Entry, EntryKind, Index, SnapshotMeta, Term};
use crate::runtime::{EntryInfo, Machine, WriteBatch};
use crate::storage::{ApplyBatch, SessionChanges, StateChange, StateView, StateWrite, Store, StoreError};
use crate::wire::pb::{self, session_reply::Result as ReplyResult};
use crate::wire::{Payload, StampedPayload, decode_addresses, decode_payload, hex};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, oneshot};

/// Work for the apply task.
pub(super) enum ApplyMsg {
    /// A client waits for the entry proposed at `index` in `term`.
    Await { index: Index, term: Term, reply: oneshot::Sender<Result<WriteReply, RequestError>> },
    /// A client waits for the `count` entries proposed from `first_index`
    /// on in `term`, to be answered with all their outcomes at once.
    AwaitMany {
        first_index: Index,
        term: Term,
        count: u64,
        reply: oneshot::Sender<Vec<Result<WriteReply, RequestError>>>,
    },
    /// Committed entries, in log order, and their size for back-pressure.
    Committed { entries: Vec<Entry>, bytes: u64 },
    /// Serve a query once `index` is applied (0: at once, a stale read).
    Read(ReadJob),
    /// This node became the leader (`true`) or stopped being it. The task
    /// is on the write path only while it leads, and runs at background
    /// priority otherwise (see [`BackgroundPriority`]). When it stops,
    /// proposals still waiting may be committed by the next leader or lost;
    /// their clients retry.
    Leading(bool),
    /// Report applied index and state digests.
    Status(oneshot::Sender<(ApplyStatus, StateView)>),
    /// Replace the state with the staged snapshot (after applying what came
    /// before it), then report. A failure stops the task, which drops
    /// `done` unanswered.
    InstallSnapshot { snapshot: SnapshotMeta, done: oneshot::Sender<()> },
    /// The core task handed out its last entries: finish and stop, even
    /// while handles to this task still exist.
    Stop,
}

/// A read waiting for its index.
pub(super) struct ReadJob {
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

/// One state machine's module and, when asked for, a digest of its state.
#[derive(Clone, Debug)]
pub struct MachineStatus {
    pub name: String,
    pub module_hash: String,
    /// Empty unless digests were asked for ([`Digests::Taken`]).
    pub state_digest: String,
}

/// Whether a status reads every state machine's whole state for its digest.
/// Health checks and metrics ask often and need none; an operator or a test
/// comparing replicas asks for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Digests {
    Taken,
    Skipped,
}

/// How many handed-out bytes wait to be applied. The core stops handing out
/// committed entries past a limit and waits for the backlog to drain.
#[derive(Default)]
pub(super) struct ApplyProgress {
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

/// Consecutive client writes to one state machine: each applied by the
/// guest as it is admitted, over the writes of those before it, and all of
/// them made durable in one store batch.
#[derive(Default)]
struct WriteRun {
    machine: Option<String>,
    batch: WriteBatch,
}

/// A write's result, sent once the run that decided it is durable.
struct Decided {
    index: Index,
    term: Term,
    result: Result<WriteReply, RequestError>,
}

/// The link from the core task to the apply thread: the channel it hands
/// committed entries and waiting clients through, and the backlog gauge.
pub(super) struct ApplyLink {
    pub(super) tx: mpsc::Sender<ApplyMsg>,
    pub(super) progress: Arc<ApplyProgress>,
}

/// How the services reach the apply thread: reads served from what this
/// member has applied, and the applied side of its status.
#[derive(Clone)]
pub struct ApplyHandle {
    tx: mpsc::Sender<ApplyMsg>,
    request_timeout: Duration,
    store: Store,
    applied_index: tokio::sync::watch::Receiver<Index>,
}

impl ApplyHandle {
    /// The index this member has applied and made durable, updated after
    /// every applied batch: watchers wait on it for new changes.
    pub fn applied_index(&self) -> tokio::sync::watch::Receiver<Index> {
        self.applied_index.clone()
    }

    /// A stale read: answered from this member's applied state, with no
    /// round trip to the leader.
    pub async fn stale_read(&self, state_machine: String, query: Vec<u8>) -> Result<ReadReply, RequestError> {
        let (reply, answer) = oneshot::channel();
        // A closed channel drops the job, whose dropped sender reads as a
        // shutdown to the waiter.
        let _ = self.tx.send(ApplyMsg::Read(ReadJob { index: 0, state_machine, query, reply }));
        await_answer(self.request_timeout, answer).await?
    }

    /// The applied index and every state machine's module (and with
    /// [`Digests::Taken`], state digest), taken at one applied index. The
    /// apply thread only names the modules and pins a view of the state; the
    /// digests read that view on a blocking thread, so applying goes on.
    pub async fn status(&self, digests: Digests) -> Result<ApplyStatus, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(ApplyMsg::Status(reply)).map_err(|_| RequestError::ShuttingDown)?;
        let (mut status, view) = await_answer(self.request_timeout, answer).await?;
        if digests == Digests::Skipped {
            return Ok(status);
        }
        let store = self.store.clone();
        let digested = tokio::task::spawn_blocking(move || {
            for machine in &mut status.state_machines {
                machine.state_digest = hex(&store.state_digest_in(&view, &machine.name)?);
            }
            Ok::<_, StoreError>(status)
        });
        match digested.await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(error)) => Err(RequestError::Internal(error.to_string())),
            Err(_) => Err(RequestError::Internal("the digest thread was lost".into())),
        }
    }
}

/// The apply thread, once started.
pub(super) type ApplyThread = std::thread::JoinHandle<Result<(), ApplyError>>;

/// Starts `applier` on a thread of its own. A failure there stops the
/// member: it begins the shutdown before the thread ends.
pub(super) fn spawn(
    mut applier: Applier,
    histograms: Arc<NodeHistograms>,
    config: &NodeConfig,
    shutdown: Shutdown,
) -> Result<(ApplyLink, ApplyHandle, ApplyThread), NodeError> {
    let (id, request_timeout, background) = (config.id, config.request_timeout, config.background);
    applier.histograms = histograms;
    let (tx, inbox) = mpsc::channel();
    let link = ApplyLink { tx: tx.clone(), progress: applier.progress.clone() };
    let store = applier.store.clone();
    let applied_index = applier.applied_index.subscribe();
    let thread = std::thread::Builder::new()
        .name(format!("apply-{id}"))
        .spawn(move || {
            let result = applier.run(inbox, background);
            if let Err(error) = &result {
                tracing::error!(%error, "the apply task failed; stopping the member");
                shutdown.begin();
            }
            result
        })
        .map_err(|source| NodeError::Spawn { task: Task::Apply, source })?;
    Ok((link, ApplyHandle { tx, request_timeout, store, applied_index }, thread))
}

/// The apply task's state.
pub(super) struct Applier {
    store: Store,
    registry: Arc<ModuleRegistry>,
    machines: BTreeMap<String, Machine>,
    sessions: Sessions,
    session_limits: SessionLimits,
    /// Index and term of the last applied entry.
    applied: (Index, Term),
    /// The replicated clock: the latest entry timestamp applied.
    clock_ms: u64,
    waiters: BTreeMap<Index, (Term, Waiter)>,
    groups: Groups,
    reads: BTreeMap<Index, Vec<ReadJob>>,
    progress: Arc<ApplyProgress>,
    run: WriteRun,
    decided: Vec<Decided>,
    /// Writes of a migrate hook, for the next flush.
    pending_writes: Vec<StateWrite>,
    modules: ModuleApply,
    members: Arc<Members>,
    /// A membership change applied in this run, for the next flush.
    pending_membership: Option<Membership>,
    histograms: Arc<NodeHistograms>,
    /// The durable applied index, published for watchers.
    applied_index: tokio::sync::watch::Sender<Index>,
}

impl Applier {
    /// The apply state of `store` as of its applied index: the active
    /// version of every state machine loaded, the session table read back.
    /// Loading may compile, so call it on a blocking thread.
    pub(super) fn open(
        store: Store,
        registry: Arc<ModuleRegistry>,
        members: Arc<Members>,
        session_limits: SessionLimits,
    ) -> Result<Applier, ApplyError> {
        let machines = registry.load_active()?;
        let sessions = Sessions::load(session_limits, store.session_scan()?)?;
        let applied = store.applied();
        let clock_ms = store.apply_clock_ms()?;
        Ok(Applier {
            modules: ModuleApply::new(registry.clone(), store.clone()),
            store,
            registry,
            machines,
            sessions,
            session_limits,
            applied,
            clock_ms,
            waiters: BTreeMap::new(),
            groups: Groups::default(),
            reads: BTreeMap::new(),
            progress: Arc::new(ApplyProgress::default()),
            run: WriteRun::default(),
            decided: Vec::new(),
            pending_writes: Vec::new(),
            members,
            pending_membership: None,
            histograms: Arc::default(),
            applied_index: tokio::sync::watch::Sender::new(applied.0),
        })
    }

    /// Runs until the core says stop (or every sender is gone) or a fatal
    /// error.
    fn run(mut self, inbox: mpsc::Receiver<ApplyMsg>, background: BackgroundPriority) -> Result<(), ApplyError> {
        // Every node starts as a follower.
        let mut priority = RolePriority::for_current_thread(background);
        priority.set_background(true);
        while let Ok(message) = inbox.recv() {
            match message {
                ApplyMsg::Stop => break,
                message => self.handle(message, &mut priority)?,
            }
        }
        self.fail_waiters(|| RequestError::ShuttingDown);
        Ok(())
    }

    fn handle(&mut self, message: ApplyMsg, priority: &mut RolePriority) -> Result<(), ApplyError> {
        match message {
            ApplyMsg::Await { index, term, reply } => self.wait_for(index, term, Waiter::One(reply)),
            ApplyMsg::AwaitMany { first_index, term, count, reply } => {
                let group = self.groups.open(count as usize, reply);
                for (slot, index) in (first_index..first_index + count).enumerate() {
                    self.wait_for(index, term, Waiter::InGroup { group, slot });
                }
            }
            ApplyMsg::Committed { entries, bytes } => {
                let (started, count) = (Instant::now(), entries.len() as u64);
                let result = self.apply_entries(entries);
                self.histograms.apply_batch.observe_duration(started.elapsed());
                self.histograms.apply_batch_entries.observe(count);
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
            ApplyMsg::Leading(leading) => {
                priority.set_background(!leading);
                if !leading {
                    self.fail_waiters(|| {
                        RequestError::OutcomeUnknown("leadership changed before the write committed".into())
                    });
                }
            }
            ApplyMsg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            ApplyMsg::InstallSnapshot { snapshot, done } => {
                self.install_snapshot(&snapshot)?;
                let _ = done.send(());
                self.serve_due_reads()?;
            }
            // `run` stops before handing it here.
            ApplyMsg::Stop => {}
        }
        Ok(())
    }

    /// Replaces this member's state with the leader's snapshot and reloads
    /// everything kept in memory from the store.
    fn install_snapshot(&mut self, snapshot: &SnapshotMeta) -> Result<(), ApplyError> {
        self.flush()?;
        self.store.install_snapshot(snapshot)?;
        self.machines = self.registry.load_active()?;
        self.sessions = Sessions::load(self.session_limits, self.store.session_scan()?)?;
        self.applied = (snapshot.index, snapshot.term);
        self.clock_ms = self.store.apply_clock_ms()?;
        self.modules.forget_progress();
        self.fail_waiters(|| RequestError::OutcomeUnknown("this member installed a snapshot from the leader".into()));
        self.members.publish(self.store.membership()?);
        self.publish_applied();
        tracing::info!(index = snapshot.index, term = snapshot.term, "snapshot installed");
        Ok(())
    }

    /// Tells watchers how far the store has applied (only when it moved:
    /// a wake-up per batch is all they cost the apply thread).
    fn publish_applied(&self) {
        let durable = self.store.applied().0;
        self.applied_index.send_if_modified(|published| {
            let moved = *published != durable;
            *published = durable;
            moved
        });
    }

    fn wait_for(&mut self, index: Index, term: Term, waiter: Waiter) {
        if index <= self.applied.0 {
            // Cannot happen in order, but never leave a client hanging.
            let early = format!("entry {index} was applied before its client started waiting");
            self.groups.answer(waiter, Err(RequestError::OutcomeUnknown(early)));
        } else {
            self.waiters.insert(index, (term, waiter));
        }
    }

    fn fail_waiters(&mut self, error: impl Fn() -> RequestError) {
        for (_, (_, waiter)) in std::mem::take(&mut self.waiters) {
            self.groups.answer(waiter, Err(error()));
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
            match decode_payload(&entry) {
                Some(StampedPayload { timestamp_ms, payload }) => {
                    self.clock_ms = self.clock_ms.max(timestamp_ms);
                    self.sessions.expire(self.clock_ms);
                    match payload {
                        Payload::Command(command) => self.admit(position, command)?,
                        Payload::ModuleChunk(chunk) => self.apply_alone(position, |applier| {
                            Ok(applier.modules.store_chunk(position.0, applier.clock_ms, chunk)?)
                        })?,
                        Payload::Activate(activate) => self.apply_activation(position, activate)?,
                        Payload::RemoveVersion(remove) => self.apply_alone(position, |applier| {
                            Ok(applier.modules.remove_version(&applier.machines, remove)?)
                        })?,
                        Payload::ExpireUploads(expire) => self.apply_alone(position, |applier| {
                            Ok(applier.modules.expire_uploads(position.0, expire)?)
                        })?,
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
        if self.run.machine.as_deref().is_some_and(|m| m != command.state_machine) {
            // The position so far belongs to the run being flushed.
            self.flush()?;
        }
        let info = EntryInfo { index, term, timestamp_ms: self.clock_ms };
        if !command.client_id.is_empty() {
            // A retry of a write applied earlier, even earlier in this run,
            // finds its answer here: every write records it as it is applied.
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
        let session = (&command.client_id[..], command.sequence, command.lowest_unanswered);
        let Some(machine) = self.machines.get_mut(&command.state_machine) else {
            let outcome = Err(format!("no state machine named {:?}", command.state_machine));
            self.finish_write(index, term, session, outcome);
            return Ok(());
        };
        let outcome = machine.apply(info, &command.command, &mut self.run.batch)?.map_err(|e| e.to_string());
        if self.run.machine.is_none() {
            self.run.machine = Some(command.state_machine);
        }
        self.finish_write(index, term, session, outcome);
        if self.run.batch.bytes() >= self.registry.runtime().limits().batch_write_bytes_max {
            // Bound what waits in memory: this entry and those before it go
            // down now. The next entry is not decoded yet, so the clock and
            // the sessions written with them are exactly as of this entry.
            self.applied = (index, term);
            self.flush()?;
        }
        Ok(())
    }

    /// `session` is the write's client id, sequence number and the client's
    /// lowest unanswered sequence number.
    fn finish_write(
        &mut self,
        index: Index,
        term: Term,
        (client, sequence, lowest_unanswered): (&[u8], u64, u64),
        outcome: Outcome,
    ) {
        // On a follower (or for a write whose client is gone) nobody waits:
        // the session keeps the outcome itself rather than a copy.
        if !self.waiters.contains_key(&index) {
            if !client.is_empty() {
                let reply = session_reply(sequence, index, term, outcome);
                self.sessions.record(client, reply, lowest_unanswered, self.clock_ms);
            }
            return;
        }
        if !client.is_empty() {
            let reply = session_reply(sequence, index, term, outcome.clone());
            self.sessions.record(client, reply, lowest_unanswered, self.clock_ms);
        }
        self.decided.push(Decided { index, term, result: Ok(WriteReply { outcome, index, term }) });
    }

    /// Makes the current run's effects, the session changes and the applied
    /// position durable in one batch, then answers the clients.
    fn flush(&mut self) -> Result<(), ApplyError> {
        let run = std::mem::take(&mut self.run);
        let (mut writes, mut changes) = match &run.machine {
            Some(name) => run.batch.into_writes(name),
            None => (Vec::new(), Vec::new()),
        };
        let index = self.applied.0;
        changes.extend(self.pending_writes.iter().map(|write| StateChange {
            index,
            write: write.clone(),
            previous: None,
        }));
        writes.append(&mut self.pending_writes);
        let modules = self.modules.take_changes();
        let membership = self.pending_membership.take();
        // The guests' outcomes are fixed by the committed log: a crash
        // before the store batch below re-applies these entries, with the
        // same outcomes. So their writers are answered now, and the next
        // round of requests overlaps this batch's store writes (at 256
        // clients, 3-10% more writes/s in alternating runs). Nothing
        // that could observe the batch is served before it is written:
        // reads, barriers and status go through this thread, watchers and
        // backups wait for the applied index published below. Membership
        // and module changes, which other threads read from the store and
        // the published book, are answered after it, as before.
        let answered_early = membership.is_none() && modules.is_empty();
        if answered_early {
            self.answer_writes();
        }
        if self.applied.0 > self.store.applied().0 || !writes.is_empty() || !modules.is_empty() {
            // Now and then the whole table, so the store's log of session
            // changes stays short.
            let (sessions, sessions_checkpoint) = match self.store.session_checkpoint_due() {
                true => (SessionChanges::default(), Some(self.sessions.take_checkpoint())),
                false => (self.sessions.take_changes(), None),
            };
            self.store.apply(&ApplyBatch {
                applied_index: self.applied.0,
                applied_term: self.applied.1,
                clock_ms: self.clock_ms,
                writes,
                changes,
                sessions,
                sessions_checkpoint,
                modules,
                membership: membership.clone(),
            })?;
        }
        if let Some(membership) = membership {
            self.members.publish(membership);
        }
        self.publish_applied();
        self.modules.prepare_completed();
        if !answered_early {
            self.answer_writes();
        }
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
                    // Members the entry's book does not name keep the
                    // address this member knew (a leader whose view lagged,
                    // or a joiner that never saw the bootstrap).
                    let addresses = decode_addresses(&entry.change.context);
                    applier.pending_membership = Some(applier.members.current().changed(entry.conf, addresses));
                    Ok(Vec::new())
                }
                Err(why) => Err(why),
            })
        })
    }

    /// Applies an entry in a batch of its own: what came before is made
    /// durable first, and the entry's outcome and changes land with its
    /// position.
    fn apply_alone(
        &mut self,
        (index, term): (Index, Term),
        decide: impl FnOnce(&mut Self) -> Result<Outcome, ApplyError>,
    ) -> Result<(), ApplyError> {
        self.flush()?;
        let outcome = decide(self)?;
        self.applied = (index, term);
        self.decided.push(Decided { index, term, result: Ok(WriteReply { outcome, index, term }) });
        self.flush()
    }

    /// Switches a state machine to a stored version. Entries before this one
    /// ran on the old version (the run is flushed first); the new version's
    /// migrate hook runs inside this entry, and if it fails the old version
    /// stays, on every replica alike.
    fn apply_activation(&mut self, (index, term): (Index, Term), activate: pb::Activate) -> Result<(), ApplyError> {
        let info = EntryInfo { index, term, timestamp_ms: self.clock_ms };
        self.apply_alone((index, term), |applier| {
            let (outcome, writes) = applier.modules.activate(&mut applier.machines, info, activate)?;
            applier.pending_writes.extend(writes);
            Ok(outcome)
        })
    }

    fn answer_writes(&mut self) {
        for decided in std::mem::take(&mut self.decided) {
            if let Some((term, waiter)) = self.waiters.remove(&decided.index) {
                let result = if term == decided.term { decided.result } else { Err(slot_taken(decided.index)) };
                self.groups.answer(waiter, result);
            }
        }
        // Waiters at applied indexes that held no write of theirs (a new
        // leader's no-op took the slot).
        let applied = self.applied.0;
        while let Some(entry) = self.waiters.first_entry() {
            if *entry.key() > applied {
                break;
            }
            let (index, (_, waiter)) = entry.remove_entry();
            self.groups.answer(waiter, Err(slot_taken(index)));
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
        if job.state_machine == BARRIER {
            let _ = job.reply.send(Ok(ReadReply { outcome: Ok(Vec::new()), index: self.applied.0 }));
            return Ok(());
        }
        let Some(machine) = self.machines.get_mut(&job.state_machine) else {
            let _ = job.reply.send(Err(RequestError::UnknownStateMachine(job.state_machine)));
            return Ok(());
        };
        let at = EntryInfo { index: self.applied.0, term: self.applied.1, timestamp_ms: self.clock_ms };
        let outcome = machine.query(at, &job.query)?.map_err(|e| e.to_string());
        let _ = job.reply.send(Ok(ReadReply { outcome, index: self.applied.0 }));
        Ok(())
    }

    fn status(&self) -> (ApplyStatus, StateView) {
        let state_machines = self
            .machines
            .iter()
            .map(|(name, machine)| MachineStatus {
                name: name.clone(),
                module_hash: hex(&machine.module_hash()),
                state_digest: String::new(),
            })
            .collect();
        (ApplyStatus { applied_index: self.applied.0, state_machines }, self.store.state_view())
    }
}

/// Who waits on one proposed entry.
enum Waiter {
    One(oneshot::Sender<Result<WriteReply, RequestError>>),
    /// Slot `slot` of an open group (see [`Groups`]).
    InGroup {
        group: u64,
        slot: usize,
    },
}

type GroupReply = oneshot::Sender<Vec<Result<WriteReply, RequestError>>>;

/// Callers of several consecutive entries (a client batch's writes), each
/// answered once, when the last of its entries is.
#[derive(Default)]
struct Groups {
    next: u64,
    open: HashMap<u64, Group>,
}

struct Group {
    answers: Vec<Option<Result<WriteReply, RequestError>>>,
    missing: usize,
    reply: GroupReply,
}

impl Groups {
    fn open(&mut self, size: usize, reply: GroupReply) -> u64 {
        let id = self.next;
        self.next += 1;
        self.open.insert(id, Group { answers: (0..size).map(|_| None).collect(), missing: size, reply });
        id
    }

    fn answer(&mut self, waiter: Waiter, result: Result<WriteReply, RequestError>) {
        match waiter {
            Waiter::One(reply) => {
                let _ = reply.send(result);
            }
            Waiter::InGroup { group, slot } => {
                let Some(open) = self.open.get_mut(&group) else { return };
                if let Some(answer) = open.answers.get_mut(slot)
                    && answer.is_none()
                {
                    *answer = Some(result);
                    open.missing -= 1;
                }
                if open.missing == 0
                    && let Some(done) = self.open.remove(&group)
                {
                    let answers = done.answers.into_iter().map(|a| a.unwrap_or(Err(RequestError::ShuttingDown)));
                    let _ = done.reply.send(answers.collect());
                }
            }
        }
    }
}

/// A waiting write lost its log index to another leader's entry.
fn slot_taken(index: Index) -> RequestError {
    RequestError::OutcomeUnknown(format!("another leader's entry took index {index} of the write"))
}

fn reply_from_session(reply: pb::SessionReply) -> WriteReply {
    let outcome = match reply.result {
        Some(ReplyResult::Ok(bytes)) => Ok(bytes),
        Some(ReplyResult::Error(message)) => Err(message),
        None => Err("the stored answer is empty".to_string()),
    };
    WriteReply { outcome, index: reply.index, term: reply.term }
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
