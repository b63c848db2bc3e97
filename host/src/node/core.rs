//! The core task: the only owner of the consensus core.
//!
//! It waits on its inbox, the ticker, the end of an fsync and apply progress,
//! and after each wake-up drains its inbox without waiting (so a burst of
//! client writes becomes one proposal, one append, one fsync) and then hands
//! out `Ready`s. At most one `Ready` is being persisted at a time; the core
//! keeps stepping meanwhile, which the Ready contract allows, and sends the
//! messages that need no fsync at once (a leader's appends of the entries
//! proposed during its own fsync: the followers write them in parallel
//! instead of after it).
//!
//! The rest of the node and the server reach it through a [`CoreHandle`];
//! the peer lanes report finished snapshot streams on their own channel.

use super::apply::{ApplyLink, ApplyMsg, ReadJob};
use super::config::NodeConfig;
use super::error::{NodeError, Task};
use super::histograms::NodeHistograms;
use super::members::Members;
use super::peers::{Peers, SnapshotReports};
use super::request::{BARRIER, Consistency, ReadReply, RequestError, WriteReply, await_answer};
use super::shutdown::ShutdownSignal;
use crate::raft::{
    ConfChange, ConfState, Entry, HardState, Index, LogStore, Message, NodeId, Progress, ProgressState, ProposeError,
    Raft, RaftError, ReadIndexError, ReadState, Role, Term,
};
use crate::storage::{Store, StoreError};
use crate::wire::{Payload, encode_payload, pb};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Messages a core task takes at most per wake-up before handling a Ready,
/// so that ticks and fsync completions are never starved by a flood.
const DRAIN_MAX: usize = 4096;

/// Messages the core's inbox holds; past it clients get "busy" and peers wait.
const INBOX_CAPACITY: usize = 16_384;

/// Work for the core task.
pub(super) enum CoreMsg {
    Peer(Vec<Message>),
    Propose {
        payload: Payload,
        reply: oneshot::Sender<Result<WriteReply, RequestError>>,
    },
    /// Writes that arrived together (one client batch): proposed in one go,
    /// at consecutive indexes, and answered together.
    ProposeMany {
        payloads: Vec<Payload>,
        reply: oneshot::Sender<Vec<Result<WriteReply, RequestError>>>,
    },
    ConfChange {
        change: ConfChange,
        reply: oneshot::Sender<Result<WriteReply, RequestError>>,
    },
    TransferLeader {
        to: NodeId,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    SetOffline {
        offline: bool,
        reply: oneshot::Sender<Result<(), RequestError>>,
    },
    Read(ReadRequest),
    /// Reads that arrived together (one client batch): one ReadIndex round.
    ReadMany(Vec<ReadRequest>),
    Status(oneshot::Sender<CoreStatus>),
}

pub(super) struct ReadRequest {
    pub state_machine: String,
    pub query: Vec<u8>,
    pub consistency: Consistency,
    pub reply: oneshot::Sender<Result<ReadReply, RequestError>>,
}

/// Role, term and leader as this member sees them; what `Watch` streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeadershipView {
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
}

/// The consensus side of a member's status.
#[derive(Clone, Debug)]
pub struct CoreStatus {
    pub role: Role,
    pub term: Term,
    pub leader: Option<NodeId>,
    pub commit_index: Index,
    pub last_log_index: Index,
    /// The index the log starts after.
    pub snapshot_index: Index,
    /// Voters and learners, as of the last membership change handed out.
    pub conf: ConfState,
    pub offline: bool,
    /// How far each member's log is known to match (on the leader).
    pub matched: BTreeMap<NodeId, Index>,
}

/// The receiving end of the core's inbox, handed to [`CoreTask::run`].
pub(super) type CoreInbox = mpsc::Receiver<CoreMsg>;

/// How the rest of the node and the server reach the core task.
#[derive(Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<CoreMsg>,
    leadership: watch::Receiver<LeadershipView>,
    request_timeout: Duration,
    /// How long a leader transfer is waited for: two election timeouts
    /// (the core itself gives up after one).
    transfer_limit: Duration,
}

impl CoreHandle {
    /// Hands peer messages to the core, waiting for room (back-pressure on
    /// the sending peer's lane).
    pub async fn deliver(&self, messages: Vec<Message>) -> Result<(), RequestError> {
        self.tx.send(CoreMsg::Peer(messages)).await.map_err(|_| RequestError::ShuttingDown)
    }

    /// Proposes a client command and waits for its outcome.
    pub async fn write(&self, command: pb::Command) -> Result<WriteReply, RequestError> {
        self.propose(Payload::Command(command)).await
    }

    /// Proposes client commands that arrived together and waits for all
    /// their outcomes, one per command in order. Each command stands alone
    /// (one may fail while the others apply); what they save over as many
    /// [`CoreHandle::write`]s is a message, a reply channel and a wake-up
    /// for each.
    pub async fn write_many(
        &self,
        commands: Vec<pb::Command>,
    ) -> Result<Vec<Result<WriteReply, RequestError>>, RequestError> {
        let payloads = commands.into_iter().map(Payload::Command).collect();
        self.ask(|reply| CoreMsg::ProposeMany { payloads, reply }).await
    }

    /// Proposes an entry (a command, a module chunk, an activation) and waits
    /// until it is applied here.
    pub async fn propose(&self, payload: Payload) -> Result<WriteReply, RequestError> {
        self.ask(|reply| CoreMsg::Propose { payload, reply }).await?
    }

    /// A linearizable or lease read, through the core.
    pub async fn read(
        &self,
        state_machine: String,
        query: Vec<u8>,
        consistency: Consistency,
    ) -> Result<ReadReply, RequestError> {
        self.ask(|reply| CoreMsg::Read(ReadRequest { state_machine, query, consistency, reply })).await?
    }

    /// Linearizable reads that arrived together, served by one ReadIndex
    /// round; their answers in order, each on its own.
    pub async fn read_many(
        &self,
        reads: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<Result<ReadReply, RequestError>>, RequestError> {
        let (mut requests, mut answers) = (Vec::with_capacity(reads.len()), Vec::with_capacity(reads.len()));
        for (state_machine, query) in reads {
            let (reply, answer) = oneshot::channel();
            requests.push(ReadRequest { state_machine, query, consistency: Consistency::Linearizable, reply });
            answers.push(answer);
        }
        self.offer(CoreMsg::ReadMany(requests))?;
        // One deadline for all: they are answered at about the same time.
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut out = Vec::with_capacity(answers.len());
        for answer in answers {
            out.push(match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(RequestError::ShuttingDown),
                Err(_) => Err(RequestError::Timeout(self.request_timeout)),
            });
        }
        Ok(out)
    }

    /// Waits until this member has applied everything committed when it was
    /// called (a ReadIndex round confirms the leader's commit index first);
    /// the applied index it reached. What this member then reads of its
    /// store includes every write acknowledged before the call.
    pub async fn barrier(&self) -> Result<Index, RequestError> {
        let reply = self.read(BARRIER.to_string(), Vec::new(), Consistency::Linearizable).await?;
        Ok(reply.index)
    }

    /// Proposes a membership change and waits until it is applied here.
    pub async fn change_membership(&self, change: ConfChange) -> Result<WriteReply, RequestError> {
        self.ask(|reply| CoreMsg::ConfChange { change, reply }).await?
    }

    /// Hands leadership to `to` and waits until `moved` holds of this
    /// member's view of leadership; `Timeout` if it does not in time.
    pub async fn transfer_leader(
        &self,
        to: NodeId,
        moved: impl Fn(&LeadershipView) -> bool,
    ) -> Result<LeadershipView, RequestError> {
        let mut leadership = self.leadership.clone();
        self.ask(|reply| CoreMsg::TransferLeader { to, reply }).await??;
        match tokio::time::timeout(self.transfer_limit, leadership.wait_for(|view| moved(view))).await {
            Ok(Ok(view)) => Ok(view.clone()),
            Ok(Err(_)) => Err(RequestError::ShuttingDown),
            Err(_) => Err(RequestError::Timeout(self.transfer_limit)),
        }
    }

    /// Takes this member offline for maintenance, or back online.
    pub async fn set_offline(&self, offline: bool) -> Result<(), RequestError> {
        self.ask(|reply| CoreMsg::SetOffline { offline, reply }).await?
    }

    /// The core's status.
    pub async fn status(&self) -> Result<CoreStatus, RequestError> {
        self.ask(CoreMsg::Status).await
    }

    /// Follows role, term and leader changes.
    pub fn leadership(&self) -> watch::Receiver<LeadershipView> {
        self.leadership.clone()
    }

    /// Role, term and leader as of now, without subscribing.
    pub fn current_leadership(&self) -> LeadershipView {
        self.leadership.borrow().clone()
    }

    fn offer(&self, message: CoreMsg) -> Result<(), RequestError> {
        self.tx.try_send(message).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RequestError::Busy("the consensus inbox is full".into()),
            mpsc::error::TrySendError::Closed(_) => RequestError::ShuttingDown,
        })
    }

    /// Sends the core the message `make` builds around a reply channel and
    /// waits for the answer (up to the request timeout).
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> CoreMsg) -> Result<T, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.offer(make(reply))?;
        await_answer(self.request_timeout, answer).await
    }
}

/// Who waits on gathered proposals: one caller, or a caller of `count`
/// consecutive ones (answered together by the apply task).
enum ProposalReply {
    One(oneshot::Sender<Result<WriteReply, RequestError>>),
    Many { count: u64, reply: oneshot::Sender<Vec<Result<WriteReply, RequestError>>> },
}

impl ProposalReply {
    fn fail(self, error: impl Fn() -> RequestError) {
        match self {
            ProposalReply::One(reply) => {
                let _ = reply.send(Err(error()));
            }
            ProposalReply::Many { count, reply } => {
                let _ = reply.send((0..count).map(|_| Err(error())).collect());
            }
        }
    }
}

/// A ReadIndex round under way and the reads it will serve.
struct ReadRound {
    /// Past it, the round's reads are answered with a timeout.
    deadline: Instant,
    reads: Vec<ReadRequest>,
}

/// What is left of a Ready once its entries and hard state went to disk.
struct AfterPersist {
    persisted_messages: Vec<Message>,
    committed_entries: Vec<Entry>,
    read_states: Vec<ReadState>,
}

/// The total size and count of the entries a member wrote to its log.
#[derive(Default)]
struct AppendedEntries {
    bytes: u64,
    entries: u64,
}

impl AppendedEntries {
    fn add(&mut self, entries: &[Entry]) {
        self.entries += entries.len() as u64;
        self.bytes += entries.iter().map(Entry::size_bytes).sum::<u64>();
    }

    /// How many entries, of the average size seen so far, weigh `bytes`.
    /// Before any were seen, entries are taken to weigh 1 KiB.
    fn entries_in(&self, bytes: u64) -> u64 {
        let average = self.bytes.checked_div(self.entries).unwrap_or(1024).max(1);
        bytes / average
    }
}

/// See [`CoreTask::compaction_point`]: `wanted`, held back by what the
/// `followers` still need, never below `floor`.
fn compaction_point<'a>(wanted: Index, floor: Index, followers: impl IntoIterator<Item = &'a Progress>) -> Index {
    let mut upto = wanted;
    for progress in followers {
        let needs_after = match progress.state {
            ProgressState::Snapshot { pending } => pending,
            // Silent or not: it may be installing the snapshot, which takes
            // as long as it takes.
            ProgressState::Probe if progress.snapshot_sent > 0 => progress.snapshot_sent,
            ProgressState::Probe if progress.answering() => progress.next - 1,
            ProgressState::Replicate if progress.answering() => progress.matched,
            _ => continue,
        };
        upto = upto.min(needs_after.max(floor));
    }
    upto
}

/// Step 1 of a Ready (persist), running in the background.
type PersistWrite = Pin<Box<dyn Future<Output = Result<(), NodeError>> + Send>>;

/// Says how many ticks the core is owed by the monotonic clock, rather than
/// counting timer fires: a process that was paused (SIGSTOP, a stalled VM, a
/// starved runtime) catches up on the ticks it missed before it acts, so a
/// leader never answers from a lease that its followers' clocks have let run
/// out meanwhile (a lease is counted in ticks).
struct TickClock {
    origin: tokio::time::Instant,
    period: Duration,
    owed_until: u64,
    /// Past two election timeouts more ticks change nothing (every timer
    /// and lease has run out), so a long pause does not flood the peers
    /// with one heartbeat per missed tick.
    most_at_once: u64,
}

impl TickClock {
    fn new(origin: tokio::time::Instant, period: Duration, election_ticks: u32) -> TickClock {
        TickClock { origin, period, owed_until: 0, most_at_once: 2 * u64::from(election_ticks) + 1 }
    }

    /// The ticks due at `now` that were not handed out yet.
    fn due(&mut self, now: tokio::time::Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_nanos();
        let owed = u64::try_from(elapsed / self.period.as_nanos().max(1)).unwrap_or(u64::MAX);
        let due = owed.saturating_sub(self.owed_until);
        self.owed_until = self.owed_until.max(owed);
        due.min(self.most_at_once)
    }
}

/// The task that owns the consensus core.
pub(super) struct CoreTask {
    raft: Raft<Store>,
    store: Store,
    config: Arc<NodeConfig>,
    peers: Peers,
    members: Arc<Members>,
    /// A log compaction is running on a blocking thread.
    compacting: Option<JoinHandle<Result<(), StoreError>>>,
    /// What the entries this member wrote to its log weigh, to turn
    /// `catch_up_log_bytes` into a count of entries.
    appended: AppendedEntries,
    apply: ApplyLink,
    leadership: watch::Sender<LeadershipView>,
    /// ReadIndex rounds under way, by context: each serves every read
    /// gathered before it started.
    reads: HashMap<u64, ReadRound>,
    /// Reads that arrived since the last round started.
    gathered_reads: Vec<ReadRequest>,
    next_read_ctx: u64,
    /// The last timestamp stamped into an entry; stamps never go back.
    last_stamp_ms: u64,
    /// Gathered since the last proposal, in order; `proposal_replies` says
    /// who waits on them (one reply may cover several).
    proposals: Vec<Payload>,
    proposal_replies: Vec<ProposalReply>,
    /// Batches proposed while leading and not yet seen committed: the last
    /// index of each, when it was proposed and how many entries it held.
    uncommitted: VecDeque<(Index, Instant, u64)>,
    histograms: Arc<NodeHistograms>,
    clock: TickClock,
}

impl CoreTask {
    /// The task, the handle that reaches it, and the inbox the handle feeds
    /// (for [`CoreTask::run`]).
    pub(super) fn new(
        raft: Raft<Store>,
        store: Store,
        config: Arc<NodeConfig>,
        members: Arc<Members>,
        peers: Peers,
        apply: ApplyLink,
        histograms: Arc<NodeHistograms>,
    ) -> (CoreTask, CoreHandle, CoreInbox) {
        let view = LeadershipView { role: raft.role(), term: raft.term(), leader: raft.leader() };
        let (leadership, leadership_rx) = watch::channel(view);
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
        let handle = CoreHandle {
            tx,
            leadership: leadership_rx,
            request_timeout: config.request_timeout,
            transfer_limit: config.tick * config.election_ticks * 2,
        };
        let clock = TickClock::new(tokio::time::Instant::now(), config.tick, config.election_ticks);
        let task = CoreTask {
            raft,
            store,
            config,
            peers,
            members,
            compacting: None,
            appended: AppendedEntries::default(),
            apply,
            leadership,
            reads: HashMap::new(),
            gathered_reads: Vec::new(),
            next_read_ctx: 0,
            last_stamp_ms: 0,
            proposals: Vec::new(),
            proposal_replies: Vec::new(),
            uncommitted: VecDeque::new(),
            histograms,
            clock,
        };
        (task, handle, rx)
    }

    /// Runs until the member stops or a fatal error. On shutdown it
    /// finishes the Ready being persisted (so what was acknowledged to peers
    /// is durable and committed entries reach the apply task) and returns.
    /// Either way it tells the apply task that nothing more will come.
    pub(super) async fn run(
        mut self,
        inbox: CoreInbox,
        snapshot_reports: SnapshotReports,
        shutdown: ShutdownSignal,
    ) -> Result<(), NodeError> {
        let result = self.drive(inbox, snapshot_reports, shutdown).await;
        // Best effort: a gone apply task is stopped already.
        let _ = self.apply.tx.send(ApplyMsg::Stop);
        result
    }

    async fn drive(
        &mut self,
        mut inbox: CoreInbox,
        mut snapshot_reports: SnapshotReports,
        mut shutdown: ShutdownSignal,
    ) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let progress = self.apply.progress.clone();
        let mut persisting: Option<(AfterPersist, PersistWrite)> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                done = async { (&mut persisting.as_mut().expect("guarded").1).await }, if persisting.is_some() => {
                    let (rest, _) = persisting.take().expect("guarded");
                    done?;
                    self.after_persist(rest)?;
                }
                _ = ticker.tick() => {
                    self.tick_by_clock()?;
                    self.expire_reads();
                    self.maybe_compact()?;
                }
                message = inbox.recv() => {
                    let Some(message) = message else { break };
                    self.handle(message)?;
                    for _ in 0..DRAIN_MAX {
                        match inbox.try_recv() {
                            Ok(message) => self.handle(message)?,
                            Err(_) => break,
                        }
                    }
                    self.propose_gathered()?;
                    self.read_gathered()?;
                }
                Some(to) = snapshot_reports.next() => self.raft.report_snapshot(to)?,
                _ = progress.drained.notified() => {}
            }
            self.raft.set_apply_paused(self.apply.progress.over(self.config.max_apply_backlog_bytes));
            while persisting.is_none() && self.raft.has_ready() {
                let ready = self.raft.ready()?;
                if let Some(soft) = ready.soft_state {
                    self.on_leadership_change(soft.role, soft.leader);
                }
                self.publish_leadership();
                self.peers.send(ready.messages);
                let rest = AfterPersist {
                    persisted_messages: ready.persisted_messages,
                    committed_entries: ready.committed_entries,
                    read_states: ready.read_states,
                };
                if let Some(snapshot) = ready.snapshot {
                    // Step 0: the apply task installs the staged snapshot in
                    // log order (after what it was handed before), then the
                    // entries that continue the log are persisted.
                    tracing::info!(
                        index = snapshot.index,
                        term = snapshot.term,
                        "installing a snapshot from the leader"
                    );
                    let (done, installed) = oneshot::channel();
                    self.send_apply(ApplyMsg::InstallSnapshot { snapshot, done })?;
                    let (store, histograms) = (self.store.clone(), self.histograms.clone());
                    let (entries, hard_state) = (ready.entries, ready.hard_state);
                    let write = Box::pin(async move {
                        // The apply task drops `done` when the install fails,
                        // and stops: its own error says why.
                        installed.await.map_err(|_| NodeError::TaskLost(Task::Apply))?;
                        persisted(tokio::task::spawn_blocking(move || {
                            timed_persist(&store, &entries, hard_state.as_ref(), &histograms)
                        }))
                        .await
                    });
                    persisting = Some((rest, write));
                } else if ready.entries.is_empty() && ready.hard_state.is_none_or(|hs| self.only_commit_moved(&hs)) {
                    // Nothing that needs the disk: the committed entries were
                    // made durable by earlier Readys (one at a time), and a
                    // new commit index alone need not be synced.
                    if let Some(hard_state) = ready.hard_state {
                        self.store.record_commit(&hard_state)?;
                    }
                    self.after_persist(rest)?;
                } else {
                    let (store, histograms) = (self.store.clone(), self.histograms.clone());
                    let (entries, hard_state) = (ready.entries, ready.hard_state);
                    self.appended.add(&entries);
                    let write = tokio::task::spawn_blocking(move || {
                        timed_persist(&store, &entries, hard_state.as_ref(), &histograms)
                    });
                    persisting = Some((rest, Box::pin(persisted(write))));
                }
            }
            if persisting.is_some() {
                let early = self.raft.take_messages();
                if !early.is_empty() {
                    self.peers.send(early);
                }
            }
        }
        if let Some((rest, write)) = persisting {
            write.await?;
            self.after_persist(rest)?;
        }
        self.fail_proposals(|| RequestError::ShuttingDown);
        for read in self.reads.drain().flat_map(|(_, round)| round.reads).chain(self.gathered_reads.drain(..)) {
            let _ = read.reply.send(Err(RequestError::ShuttingDown));
        }
        Ok(())
    }

    fn handle(&mut self, message: CoreMsg) -> Result<(), NodeError> {
        match message {
            CoreMsg::Peer(messages) => {
                for message in messages {
                    if let Err(error) = self.raft.step(message) {
                        match error {
                            RaftError::InvalidMessage { from, reason } => {
                                tracing::warn!(from, %reason, "dropped an invalid message from a peer");
                            }
                            fatal => return Err(fatal.into()),
                        }
                    }
                }
            }
            CoreMsg::Propose { payload, reply } => {
                self.proposals.push(payload);
                self.proposal_replies.push(ProposalReply::One(reply));
            }
            CoreMsg::ProposeMany { payloads, reply } => {
                if payloads.is_empty() {
                    let _ = reply.send(Vec::new());
                } else {
                    self.proposal_replies.push(ProposalReply::Many { count: payloads.len() as u64, reply });
                    self.proposals.extend(payloads);
                }
            }
            CoreMsg::ConfChange { change, reply } => {
                // Writes gathered so far go first, in their own batch.
                self.propose_gathered()?;
                match self.raft.propose_conf_change(change) {
                    Ok(proposed) => {
                        self.send_apply(ApplyMsg::Await { index: proposed.last_index, term: proposed.term, reply })?
                    }
                    Err(error) => {
                        let _ = reply.send(Err(self.refusal(error)?));
                    }
                }
            }
            CoreMsg::TransferLeader { to, reply } => {
                let outcome = match self.raft.transfer_leader(to) {
                    Ok(()) => Ok(()),
                    Err(error) => Err(self.refusal(error)?),
                };
                let _ = reply.send(outcome);
            }
            CoreMsg::SetOffline { offline, reply } => {
                // A tiny synced write, inline: it is rare, and the member is
                // being serviced anyway.
                let outcome = self.store.set_offline(offline).map_err(|e| RequestError::Internal(e.to_string()));
                if outcome.is_ok() {
                    self.raft.set_offline(offline)?;
                    tracing::info!(node = self.config.id, offline, "maintenance mode changed");
                }
                let _ = reply.send(outcome);
            }
            CoreMsg::Read(request) => self.start_read(request)?,
            CoreMsg::ReadMany(requests) => {
                for request in requests {
                    self.start_read(request)?;
                }
            }
            CoreMsg::Status(reply) => {
                let _ = reply.send(CoreStatus {
                    role: self.raft.role(),
                    term: self.raft.term(),
                    leader: self.raft.leader(),
                    commit_index: self.raft.log().committed(),
                    last_log_index: self.raft.log().last_index()?,
                    snapshot_index: self.raft.log().first_index()? - 1,
                    conf: self.raft.conf_state(),
                    offline: self.raft.is_offline(),
                    matched: self
                        .raft
                        .conf_state()
                        .members()
                        .into_iter()
                        .filter_map(|id| Some((id, self.raft.progress(id)?.matched)))
                        .collect(),
                });
            }
        }
        Ok(())
    }

    /// Proposes every write gathered in this wake-up as one batch: one
    /// append, one fsync, one AppendEntries per follower.
    fn propose_gathered(&mut self) -> Result<(), NodeError> {
        if self.proposals.is_empty() {
            return Ok(());
        }
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let now_ms = now_ms.saturating_add_signed(crate::faults::clock_offset_ms());
        let stamp = now_ms.max(self.last_stamp_ms);
        let payloads = std::mem::take(&mut self.proposals).into_iter().map(|p| encode_payload(stamp, p)).collect();
        let replies = std::mem::take(&mut self.proposal_replies);
        match self.raft.propose(payloads) {
            Ok(proposed) => {
                self.last_stamp_ms = stamp;
                let mut index = proposed.first_index;
                for reply in replies {
                    match reply {
                        ProposalReply::One(reply) => {
                            self.send_apply(ApplyMsg::Await { index, term: proposed.term, reply })?;
                            index += 1;
                        }
                        ProposalReply::Many { count, reply } => {
                            let (first_index, term) = (index, proposed.term);
                            self.send_apply(ApplyMsg::AwaitMany { first_index, term, count, reply })?;
                            index += count;
                        }
                    }
                }
                let count = index - proposed.first_index;
                self.uncommitted.push_back((index - 1, Instant::now(), count));
                Ok(())
            }
            Err(error) => {
                let refusal = self.refusal(error)?;
                for reply in replies {
                    reply.fail(|| refusal.clone());
                }
                Ok(())
            }
        }
    }

    /// What a client is told when the core refuses a proposal; a failure of
    /// the core itself is fatal for the member instead.
    fn refusal(&self, error: ProposeError) -> Result<RequestError, NodeError> {
        Ok(match error {
            ProposeError::NotLeader { leader } => self.not_leader(leader),
            ProposeError::Busy { .. } | ProposeError::Transferring { .. } => RequestError::Busy(error.to_string()),
            ProposeError::ConfChangePending(_) => RequestError::Busy(error.to_string()),
            ProposeError::TooLarge { .. }
            | ProposeError::Empty
            | ProposeError::InvalidConfChange(_)
            | ProposeError::InvalidTransfer(_) => RequestError::Invalid(error.to_string()),
            ProposeError::Raft(fatal) => return Err(fatal.into()),
        })
    }

    /// Compacts the log once it holds more applied entries than the
    /// threshold, keeping a tail for followers that are a little behind
    /// (they catch up from the log; further behind, by snapshot).
    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        if let Some(running) = &self.compacting {
            if !running.is_finished() {
                return Ok(());
            }
            if let Some(running) = self.compacting.take()
                && let Some(Err(error)) = finished_result(running)
            {
                return Err(error.into());
            }
        }
        let applied = self.store.applied().0;
        let first = self.store.first_index()?;
        let (keep, threshold) = (self.config.snapshot_keep_entries, self.config.snapshot_threshold_entries);
        if applied < first + threshold + keep {
            return Ok(());
        }
        let catch_up_held = self.appended.entries_in(self.config.catch_up_log_bytes);
        let upto = self.compaction_point(applied - keep, applied.saturating_sub(catch_up_held));
        if upto < first + threshold / 4 {
            // Held back: compacting a few entries at a time is churn.
            return Ok(());
        }
        let store = self.store.clone();
        tracing::debug!(upto, "compacting the log");
        self.compacting = Some(tokio::task::spawn_blocking(move || store.compact(upto)));
        Ok(())
    }

    /// Where a leader may compact its log to: `wanted`, or less while a
    /// follower still needs the entries after it. A follower being sent a
    /// snapshot continues from the log after the snapshot's index; had the
    /// log been compacted past it meanwhile (a steady write rate passes the
    /// kept tail during a transfer), it would be sent another snapshot, and
    /// another, forever. A follower that answers and is catching up from
    /// the log (after its snapshot, what was written during the transfer)
    /// holds it back too, from its last answer in the previous CheckQuorum
    /// period on (the current one's start wipes `recent_active` before any
    /// follower could answer). Neither holds it past `floor`: a stalled transfer
    /// or a follower slower than the writes must not grow the log without
    /// bound; further behind, a follower gets another snapshot.
    fn compaction_point(&self, wanted: Index, floor: Index) -> Index {
        let members = self.raft.conf_state().members();
        let followers = members.iter().filter(|&&id| id != self.config.id).filter_map(|&id| self.raft.progress(id));
        compaction_point(wanted, floor, followers)
    }

    fn not_leader(&self, leader: Option<NodeId>) -> RequestError {
        let leader = leader.filter(|&id| id != self.config.id);
        RequestError::NotLeader { leader: leader.and_then(|id| self.members.address_of(id).map(|addr| (id, addr))) }
    }

    /// Ticks the core as many times as the clock says it is owed.
    fn tick_by_clock(&mut self) -> Result<(), NodeError> {
        for _ in 0..self.clock.due(tokio::time::Instant::now()) {
            self.raft.tick()?;
        }
        Ok(())
    }

    fn start_read(&mut self, request: ReadRequest) -> Result<(), NodeError> {
        if request.consistency == Consistency::Lease {
            // The lease is counted in ticks: bring them up to the clock first.
            self.tick_by_clock()?;
            if self.raft.role() != Role::Leader {
                let _ = request.reply.send(Err(self.not_leader(self.raft.leader())));
                return Ok(());
            }
            if let Some(index) = self.raft.lease_read_index() {
                return self.send_apply(ApplyMsg::Read(ReadJob {
                    index,
                    state_machine: request.state_machine,
                    query: request.query,
                    reply: request.reply,
                }));
            }
            // No lease right now (a new leader, or acks are late): a ReadIndex
            // round gives the same guarantee, a round trip later.
        }
        self.gathered_reads.push(request);
        Ok(())
    }

    /// Starts one ReadIndex round for every read gathered since the last:
    /// each arrived before the round began, so the index it confirms is at
    /// least every one of them needs, and a burst of reads costs one
    /// heartbeat round instead of one each.
    fn read_gathered(&mut self) -> Result<(), NodeError> {
        if self.gathered_reads.is_empty() {
            return Ok(());
        }
        let reads = std::mem::take(&mut self.gathered_reads);
        self.next_read_ctx += 1;
        let ctx = self.next_read_ctx;
        let refusal = match self.raft.read_index(ctx) {
            Ok(()) => {
                self.histograms.read_index_reads.observe(reads.len() as u64);
                let deadline = Instant::now() + self.config.request_timeout;
                self.reads.insert(ctx, ReadRound { deadline, reads });
                return Ok(());
            }
            Err(ReadIndexError::NoLeader) => RequestError::NoLeader,
            Err(ReadIndexError::Busy) => RequestError::Busy("too many reads are waiting".into()),
            Err(ReadIndexError::Raft(fatal)) => return Err(fatal.into()),
        };
        for read in reads {
            let _ = read.reply.send(Err(refusal.clone()));
        }
        Ok(())
    }

    fn expire_reads(&mut self) {
        let now = Instant::now();
        let timeout = self.config.request_timeout;
        self.reads.retain(|_, round| {
            if round.deadline > now {
                return true;
            }
            // The senders may be gone already (the service timed out first).
            for read in round.reads.drain(..) {
                let _ = read.reply.send(Err(RequestError::Timeout(timeout)));
            }
            false
        });
    }

    /// Whether `hard_state` differs from the durable one only in the commit
    /// index (the term and the vote must be synced before acting on them).
    fn only_commit_moved(&self, hard_state: &HardState) -> bool {
        let durable = self.store.hard_state();
        (durable.term, durable.vote) == (hard_state.term, hard_state.vote)
    }

    /// Steps 2-5 of the Ready contract, once step 1 (persist) is done.
    fn after_persist(&mut self, rest: AfterPersist) -> Result<(), NodeError> {
        self.peers.send(rest.persisted_messages);
        if let Some(last) = rest.committed_entries.last() {
            self.observe_commits(last.index);
            let bytes: u64 = rest.committed_entries.iter().map(Entry::size_bytes).sum();
            self.apply.progress.handed_out(bytes);
            self.send_apply(ApplyMsg::Committed { entries: rest.committed_entries, bytes })?;
        }
        for state in rest.read_states {
            for read in self.reads.remove(&state.ctx).into_iter().flat_map(|round| round.reads) {
                self.send_apply(ApplyMsg::Read(ReadJob {
                    index: state.index,
                    state_machine: read.state_machine,
                    query: read.query,
                    reply: read.reply,
                }))?;
            }
        }
        self.raft.advance()?;
        Ok(())
    }

    /// Counts the proposals committed up to `committed` (their whole batch
    /// took the same time to commit).
    fn observe_commits(&mut self, committed: Index) {
        while let Some(&(last, proposed_at, count)) = self.uncommitted.front() {
            if last > committed {
                break;
            }
            self.uncommitted.pop_front();
            self.histograms.propose_to_commit.observe_many(duration_ns(proposed_at.elapsed()), count);
        }
    }

    /// The core drops its ReadIndex rounds and a new leader may overwrite
    /// uncommitted proposals: fail what waits on them, so clients retry.
    fn on_leadership_change(&mut self, role: Role, leader: Option<NodeId>) {
        let was = self.leadership.borrow().clone();
        tracing::info!(node = self.config.id, role = role.as_str(), leader = ?leader, term = self.raft.term(), "leadership changed");
        for read in self.reads.drain().flat_map(|(_, round)| round.reads) {
            let _ = read.reply.send(Err(RequestError::LeadershipChanged));
        }
        let leading = role == Role::Leader;
        if was.role == Role::Leader && !leading {
            self.uncommitted.clear();
        }
        if (was.role == Role::Leader) != leading {
            // Best effort: if the apply task is gone the node is stopping anyway.
            let _ = self.apply.tx.send(ApplyMsg::Leading(leading));
        }
    }

    fn publish_leadership(&self) {
        let view = LeadershipView { role: self.raft.role(), term: self.raft.term(), leader: self.raft.leader() };
        self.leadership.send_if_modified(|current| {
            let changed = *current != view;
            *current = view;
            changed
        });
    }

    fn fail_proposals(&mut self, error: impl Fn() -> RequestError) {
        self.proposals.clear();
        for reply in self.proposal_replies.drain(..) {
            reply.fail(&error);
        }
    }

    fn send_apply(&self, message: ApplyMsg) -> Result<(), NodeError> {
        self.apply.tx.send(message).map_err(|_| NodeError::TaskLost(Task::Apply))
    }
}

/// The outcome of a persist running on a blocking thread.
/// Appends to the log and counts how long the append (and its fsync) took.
fn timed_persist(
    store: &Store,
    entries: &[Entry],
    hard_state: Option<&HardState>,
    histograms: &NodeHistograms,
) -> Result<(), StoreError> {
    let started = Instant::now();
    store.persist(entries, hard_state)?;
    histograms.persist.observe_duration(started.elapsed());
    if !entries.is_empty() {
        histograms.persist_entries.observe(entries.len() as u64);
    }
    Ok(())
}

fn duration_ns(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

async fn persisted(write: JoinHandle<Result<(), StoreError>>) -> Result<(), NodeError> {
    write.await.map_err(|_| NodeError::TaskLost(Task::Storage))?.map_err(NodeError::from)
}

/// The result of a task that `is_finished()`, without awaiting it.
fn finished_result<T>(handle: JoinHandle<T>) -> Option<T> {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut handle = std::pin::pin!(handle);
    match handle.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(value)) => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{AppendedEntries, Entry, Index, Progress, ProgressState, TickClock, compaction_point};
    use crate::raft::EntryKind;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_paused_process_catches_up_on_the_ticks_it_missed_at_once_and_bounded() {
        let origin = tokio::time::Instant::now();
        let mut clock = TickClock::new(origin, ms(100), 10);
        assert_eq!(clock.due(origin + ms(50)), 0);
        assert_eq!(clock.due(origin + ms(100)), 1);
        assert_eq!(clock.due(origin + ms(150)), 0, "each tick is owed once");
        assert_eq!(clock.due(origin + ms(350)), 2, "a late timer fire owes the ticks it missed");
        // Paused for five seconds: two election timeouts and one, at once.
        assert_eq!(clock.due(origin + ms(5350)), 21);
        assert_eq!(clock.due(origin + ms(5450)), 1, "then one per period again");
        assert_eq!(clock.due(origin + ms(5000)), 0, "an instant already counted owes nothing");
    }

    fn follower(state: ProgressState, matched: Index, recent_active: bool) -> Progress {
        let mut progress = Progress::new(matched + 1, 8, 1 << 20);
        (progress.state, progress.matched, progress.recent_active) = (state, matched, recent_active);
        progress
    }

    #[test]
    fn compaction_keeps_what_a_follower_being_sent_a_snapshot_continues_from_down_to_a_floor() {
        let (wanted, floor) = (9_000, 2_000);
        let caught_up = follower(ProgressState::Replicate, 9_500, true);
        assert_eq!(compaction_point(wanted, floor, [&caught_up]), wanted, "nothing held when no one lags");
        let receiving = follower(ProgressState::Snapshot { pending: 5_000 }, 0, true);
        assert_eq!(
            compaction_point(wanted, floor, [&caught_up, &receiving]),
            5_000,
            "the entries after the snapshot stay"
        );
        let catching_up = follower(ProgressState::Replicate, 6_000, true);
        assert_eq!(compaction_point(wanted, floor, [&catching_up]), 6_000, "so do those a catching-up follower lacks");
        let stalled = follower(ProgressState::Snapshot { pending: 100 }, 0, false);
        assert_eq!(
            compaction_point(wanted, floor, [&stalled, &caught_up]),
            floor,
            "a stalled transfer holds to the floor only"
        );
        let silent = follower(ProgressState::Probe, 10, false);
        assert_eq!(compaction_point(wanted, floor, [&silent]), wanted, "a follower that does not answer holds nothing");
    }

    #[test]
    fn compaction_keeps_what_a_follower_continues_from_while_it_installs_a_delivered_snapshot() {
        let (wanted, floor) = (9_000, 2_000);
        let mut installing = follower(ProgressState::Snapshot { pending: 5_000 }, 0, true);
        installing.become_probe();
        assert_eq!(installing.next, 5_001, "probed from past the snapshot, not from its old match");
        assert_eq!(compaction_point(wanted, floor, [&installing]), 5_000, "the entries after the snapshot stay");
        // An install may outlast CheckQuorum periods in which the follower
        // says nothing.
        installing.start_period();
        installing.start_period();
        assert!(!installing.answering());
        assert_eq!(compaction_point(wanted, floor, [&installing]), 5_000, "held while it installs, silent or not");
        assert_eq!(compaction_point(wanted, 6_000, [&installing]), 6_000, "down to the floor only");
        // Installed and acknowledged: it holds what it has matched.
        installing.maybe_update(5_000);
        installing.become_replicate();
        installing.recent_active = true;
        assert_eq!(installing.snapshot_sent, 0);
        assert_eq!(compaction_point(wanted, floor, [&installing]), 5_000);
        installing.maybe_update(8_000);
        assert_eq!(compaction_point(wanted, floor, [&installing]), 8_000);
        // A follower that lacks the snapshot it was sent (its install
        // failed) says so by rejecting the probe past it, and holds no more.
        let mut failed = follower(ProgressState::Snapshot { pending: 5_000 }, 0, true);
        failed.become_probe();
        assert!(failed.maybe_decrease_to(5_000, 0));
        assert_eq!(failed.snapshot_sent, 0);
        failed.start_period();
        failed.start_period();
        assert_eq!(compaction_point(wanted, floor, [&failed]), wanted);
    }

    #[test]
    fn the_log_kept_for_catching_up_is_counted_in_bytes() {
        let mut appended = AppendedEntries::default();
        assert_eq!(appended.entries_in(1 << 20), 1024, "1 KiB each before any is seen");
        let small: Vec<Entry> = (1..=100)
            .map(|index| Entry { term: 1, index, kind: EntryKind::Normal, data: vec![0; 100].into() })
            .collect();
        appended.add(&small);
        let each = small[0].size_bytes();
        assert_eq!(appended.entries_in(1 << 20), (1 << 20) / each);
        let large: Vec<Entry> = (101..=200)
            .map(|index| Entry { term: 1, index, kind: EntryKind::Normal, data: vec![0; 1 << 20].into() })
            .collect();
        appended.add(&large);
        assert!(appended.entries_in(256 << 20) < 600, "large entries: few of them");
    }
}
