//! Starting and stopping a member's node: open the store, load the state
//! machines, start the apply thread and the core task, and hand out the
//! handles through which the server reaches them. Each step of the start is
//! a function of its own below. Listening on a port is the server's job
//! (`server::Server`), which starts a node and serves it.

use super::apply::{self, Applier, ApplyHandle, ApplyThread};
use super::config::NodeConfig;
use super::core::{CoreHandle, CoreInbox, CoreTask};
use super::deploy::Deployer;
use super::disk::{self, DiskSpace};
use super::error::{NodeError, Task};
use super::histograms::NodeHistograms;
use super::join::join;
use super::members::Members;
use super::modules::{BuiltIn, ModuleRegistry};
use super::peers::{Peers, SnapshotCounters, SnapshotReports};
use super::request::RequestError;
use super::shutdown::{Shutdown, ShutdownSignal};
use crate::raft::{ConfState, Config, ENTRY_OVERHEAD_BYTES, NodeId, Raft, Role};
use crate::runtime::Runtime;
use crate::storage::{Identity, Store, StoreOptions};
use crate::wire::PEER_MESSAGE_BYTES_MAX;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinHandle;

/// The state machines every member starts with, built into the binary;
/// deploys through the log add others and replace these.
const BUILT_IN_STATE_MACHINES: &[BuiltIn] =
    &[BuiltIn { name: "kv", bytes: raft_guests::KV }, BuiltIn { name: "counter", bytes: raft_guests::COUNTER }];

/// The names of the state machines built into the binary (every member
/// runs them until a deploy replaces them).
pub fn built_in_state_machines() -> impl Iterator<Item = &'static str> {
    BUILT_IN_STATE_MACHINES.iter().map(|built_in| built_in.name)
}

/// How long a loaded module version that nothing runs may go unasked for
/// before its compiled code is freed.
const IDLE_MODULE_KEPT: Duration = Duration::from_secs(600);
/// How often idle module versions are looked for.
const IDLE_MODULE_SWEEP: Duration = Duration::from_secs(60);

/// What the layer above reaches a running node through. Each handle is
/// narrow: it offers requests, never the channels behind them.
#[derive(Clone)]
pub struct NodeHandles {
    /// Proposals, linearizable and lease reads, membership, leadership.
    pub core: CoreHandle,
    /// Stale reads and the applied side of the status.
    pub applied: ApplyHandle,
    /// Deploys and activations (on the leader).
    pub deployer: Arc<Deployer>,
    /// The modules this member holds and their compiled state.
    pub modules: Arc<ModuleRegistry>,
    /// The membership and the address book.
    pub members: Arc<Members>,
    /// Snapshot transfers, for metrics and for the receiving side.
    pub snapshots: Arc<SnapshotCounters>,
    /// The store, for the receiving side of snapshot streams.
    pub store: Store,
    /// Free space on the data disk: below the reserve, no new entries.
    pub disk: Arc<DiskSpace>,
    /// Latencies and batch sizes of the write path, for metrics.
    pub histograms: Arc<NodeHistograms>,
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`]
/// and then [`Node::wait`].
pub struct Node {
    config: Arc<NodeConfig>,
    handles: NodeHandles,
    shutdown: Shutdown,
    core: JoinHandle<Result<(), NodeError>>,
    apply: ApplyThread,
}

impl Node {
    /// Opens the member's data directory (creating and bootstrapping it on
    /// first start), loads the state machines and starts every task. A
    /// member told to join a cluster starts asking to be added. Must run
    /// inside a tokio runtime.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        config.validate()?;
        crate::faults::start_from_env();
        let config = Arc::new(config);
        let store = open_store(&config).await?;
        let stored = store.membership()?;
        let (routes, transport) = (config.routes.clone(), config.transport.clone());
        let members = Members::new(config.id, config.advertise.clone(), stored, &config.peers, routes, transport);
        let modules = open_modules(&config, &store)?;
        let applier = open_applier(&config, &store, &modules, &members).await?;
        let raft = open_raft(&config, &store)?;

        let shutdown = Shutdown::new();
        let histograms = Arc::new(NodeHistograms::default());
        let (apply_link, applied, apply) = apply::spawn(applier, histograms.clone(), &config, shutdown.clone())?;
        let snapshots = Arc::new(SnapshotCounters::default());
        let (peers, snapshot_reports) =
            Peers::new(&config.cluster_id, members.clone(), store.clone(), snapshots.clone());
        let (core_task, core, inbox) =
            CoreTask::new(raft, store.clone(), config.clone(), members.clone(), peers, apply_link, histograms.clone());
        let core_task = spawn_core(core_task, inbox, snapshot_reports, shutdown.clone());
        tokio::spawn(sweep_idle_modules(modules.clone(), shutdown.signal()));

        let deployer = Arc::new(Deployer::new(config.clone(), core.clone(), modules.clone(), members.clone()));
        tokio::spawn(deployer.clone().expire_abandoned_uploads(shutdown.signal()));
        let disk = Arc::new(DiskSpace::new(config.min_free_disk_bytes));
        tokio::spawn(disk::watch(disk.clone(), config.data_dir.clone(), shutdown.signal()));
        tokio::spawn(hand_over_while_disk_low(core.clone(), disk.clone(), config.id, shutdown.signal()));
        let handles = NodeHandles { core, applied, deployer, modules, members, snapshots, store, disk, histograms };
        let node = Node { config, handles, shutdown, core: core_task, apply };
        node.join_if_asked();
        Ok(node)
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The handles the services reach the node through.
    pub fn handles(&self) -> &NodeHandles {
        &self.handles
    }

    /// A signal that turns when the member starts stopping.
    pub fn shutdown_signal(&self) -> ShutdownSignal {
        self.shutdown.signal()
    }

    /// If this member leads, hands leadership to the voter whose log is
    /// furthest along and waits (at most two election timeouts) until it
    /// has. Best effort: stopping goes on regardless.
    pub async fn hand_over_leadership(&self) {
        hand_over(&self.handles.core, self.config.id, "stopping").await;
    }

    /// Asks every task to stop: the core finishes its in-flight write, the
    /// apply task applies what it was handed.
    pub fn shutdown(&self) {
        self.shutdown.begin();
    }

    /// A future that resolves when the member starts stopping, from a
    /// shutdown request or a fatal error.
    pub fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut signal = self.shutdown.signal();
        async move { signal.wait().await }
    }

    /// Waits until the core task and the apply thread have stopped; the
    /// first failure, if any.
    pub async fn wait(self) -> Result<(), NodeError> {
        let Node { core, apply, handles, .. } = self;
        // The apply thread stops once nothing can send it work, and the
        // handles can.
        drop(handles);
        let core = core.await.map_err(|_| NodeError::TaskLost(Task::Consensus))?;
        let apply = tokio::task::spawn_blocking(move || apply.join())
            .await
            .map_err(|_| NodeError::TaskLost(Task::Apply))?
            .map_err(|_| NodeError::TaskLost(Task::Apply))?;
        core?;
        apply?;
        Ok(())
    }

    /// Starts joining the cluster named by `--join`, unless this member
    /// already belongs to it (a restart after joining).
    fn join_if_asked(&self) {
        if self.config.join.is_empty() {
            return;
        }
        let through = self.config.join.clone();
        if self.handles.members.current().conf.members().contains(&self.config.id) {
            return;
        }
        tokio::spawn(join(self.config.clone(), self.handles.members.clone(), through, self.shutdown.signal()));
    }
}

/// Opens (or creates) the data directory; a member that starts a cluster
/// records its initial configuration, one that joins starts with none.
async fn open_store(config: &NodeConfig) -> Result<Store, NodeError> {
    let identity = Identity::new(config.cluster_id.clone(), config.id);
    let options = StoreOptions {
        durability: config.durability,
        memory: config.store_memory,
        history: config.store_history,
        background: config.background,
        ..StoreOptions::default()
    };
    let dir = config.data_dir.clone();
    let started = std::time::Instant::now();
    let store = on_storage_thread(move || Store::open(&dir, &identity, &options)).await??;
    tracing::info!(
        node = config.id,
        applied = store.applied().0,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "store opened"
    );
    if config.join.is_empty() {
        let voters: BTreeSet<NodeId> = config.peers.keys().copied().chain([config.id]).collect();
        let mut addresses = config.peers.clone();
        addresses.insert(config.id, config.advertise.clone());
        store.bootstrap(&ConfState::with_voters(voters), &addresses)?;
    }
    Ok(store)
}

/// The runtime and the modules the member holds; compiled artifacts of
/// another engine version are dropped.
fn open_modules(config: &NodeConfig, store: &Store) -> Result<Arc<ModuleRegistry>, NodeError> {
    let runtime = Arc::new(Runtime::new(config.limits.clone())?);
    let stale = store.drop_stale_artifacts(runtime.engine_key())?;
    if stale > 0 {
        tracing::info!(artifacts = stale, "dropped modules compiled by another engine version");
    }
    Ok(Arc::new(ModuleRegistry::new(runtime, store.clone(), BUILT_IN_STATE_MACHINES)))
}

/// The apply state as of the applied index; loading the state machines may
/// compile them, so it runs on a blocking thread.
async fn open_applier(
    config: &NodeConfig,
    store: &Store,
    modules: &Arc<ModuleRegistry>,
    members: &Arc<Members>,
) -> Result<Applier, NodeError> {
    let (store, modules, members, limits) = (store.clone(), modules.clone(), members.clone(), config.sessions);
    Ok(on_storage_thread(move || Applier::open(store, modules, members, limits)).await??)
}

/// The consensus core over the store, configured from `config`.
fn open_raft(config: &NodeConfig, store: &Store) -> Result<Raft<Store>, NodeError> {
    let mut raft_config = Config::new(config.id);
    raft_config.election_tick = config.election_ticks;
    raft_config.heartbeat_tick = config.heartbeat_ticks;
    raft_config.applied = store.applied().0;
    raft_config.max_entry_bytes = raft_config.max_entry_bytes.max(config.max_command_bytes as u64 + 4096);
    raft_config.max_uncommitted_bytes = raft_config.max_uncommitted_bytes.max(raft_config.max_entry_bytes);
    // Members restarting together must not draw the same timeouts.
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    raft_config.seed = config.id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ nanos;
    debug_assert!(raft_config.max_message_bytes + ENTRY_OVERHEAD_BYTES < PEER_MESSAGE_BYTES_MAX as u64);
    let mut raft = Raft::new(raft_config, store.clone())?;
    if store.offline()? {
        raft.set_offline(true)?;
        tracing::warn!(node = config.id, "starting offline for maintenance: this member neither votes nor campaigns");
    }
    tracing::info!(
        node = config.id,
        cluster = %config.cluster_id,
        term = raft.term(),
        commit = raft.log().committed(),
        applied = store.applied().0,
        "member starting"
    );
    Ok(raft)
}

/// Runs the core task; whatever ends it (a shutdown or a fatal error) ends
/// the member.
fn spawn_core(
    task: CoreTask,
    inbox: CoreInbox,
    snapshot_reports: SnapshotReports,
    shutdown: Shutdown,
) -> JoinHandle<Result<(), NodeError>> {
    let signal = shutdown.signal();
    tokio::spawn(async move {
        let result = task.run(inbox, snapshot_reports, signal).await;
        if let Err(error) = &result {
            tracing::error!(%error, "the consensus task failed; stopping the member");
        }
        shutdown.begin();
        result
    })
}

/// Runs store work on a blocking thread; losing the thread is an error of
/// its own, apart from the work's.
async fn on_storage_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(work).await.map_err(|_| NodeError::TaskLost(Task::Storage))
}

/// Frees idle module versions now and then until the member stops (see
/// [`ModuleRegistry::forget_idle`]).
async fn sweep_idle_modules(registry: Arc<ModuleRegistry>, mut stop: ShutdownSignal) {
    let mut every = tokio::time::interval(IDLE_MODULE_SWEEP);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = every.tick() => {}
        }
        let registry = registry.clone();
        match tokio::task::spawn_blocking(move || registry.forget_idle(IDLE_MODULE_KEPT)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(freed)) => tracing::info!(modules = freed, "freed the compiled code of idle module versions"),
            Ok(Err(error)) => tracing::warn!(%error, "cannot look for idle module versions"),
            Err(_) => return,
        }
    }
}

/// How long a leader's disk stays below the reserve before it hands
/// leadership over: a leader that takes no entries stops every write while
/// the other members may have room.
const LOW_DISK_HANDOVER_AFTER: Duration = Duration::from_secs(2);
/// Between two handovers tried by a leader whose disk stays low (a voter
/// not caught up, low itself, is not taken).
const LOW_DISK_HANDOVER_EVERY: Duration = Duration::from_secs(5);

/// Hands leadership over while this member leads with a low disk.
async fn hand_over_while_disk_low(core: CoreHandle, disk: Arc<DiskSpace>, me: NodeId, mut stop: ShutdownSignal) {
    let (mut low_since, mut tried) = (None::<Instant>, None::<Instant>);
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        if !disk.is_low() {
            low_since = None;
            continue;
        }
        let since = *low_since.get_or_insert_with(Instant::now);
        if since.elapsed() < LOW_DISK_HANDOVER_AFTER || tried.is_some_and(|at| at.elapsed() < LOW_DISK_HANDOVER_EVERY) {
            continue;
        }
        tried = Some(Instant::now());
        hand_over(&core, me, "the data disk is nearly full").await;
    }
}

/// If this member leads, hands leadership to the voter whose log is
/// furthest along and waits (at most two election timeouts) until it has.
/// Best effort: a voter not caught up does not take it.
async fn hand_over(core: &CoreHandle, me: NodeId, reason: &'static str) {
    let Ok(status) = core.status().await else { return };
    if status.role != Role::Leader {
        return;
    }
    let target = status
        .matched
        .iter()
        .filter(|(id, _)| **id != me && status.conf.voters.contains(id))
        .max_by_key(|(_, matched)| **matched)
        .map(|(id, _)| *id);
    let Some(to) = target else { return };
    tracing::info!(node = me, to, reason, "handing leadership over");
    let moved = core.transfer_leader(to, |view| view.role != Role::Leader).await;
    if let Err(RequestError::Timeout(_)) = moved {
        tracing::warn!(node = me, to, reason, "leadership did not move in time");
    }
}
