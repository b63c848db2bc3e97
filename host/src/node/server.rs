//! Starting and stopping a member: open the store, load the state machines,
//! start the tasks, serve gRPC on one port for peers and clients.

use super::apply::{Applier, ApplyProgress};
use super::core::CoreTask;
use super::deploy::Deployer;
use super::members::{Members, Membership};
use super::modules::{BuiltIn, ModuleRegistry};
use super::peers::{PEER_MESSAGE_BYTES_MAX, Peers};
use super::sessions::Sessions;
use super::{NodeConfig, NodeError, RequestError};
use crate::raft::{ConfState, Config, ENTRY_OVERHEAD_BYTES, NodeId, Raft};
use crate::rpc::client_pb::client_server::ClientServer;
use crate::rpc::metrics::SnapshotCounters;
use crate::rpc::pb::raft_peer_server::RaftPeerServer;
use crate::rpc::{ClientService, PeerService};
use crate::runtime::{Machine, Runtime};
use crate::storage::{Identity, Store, StoreOptions, hex};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

/// The state machines every member starts with, built into the binary;
/// deploys through the log add others and replace these.
pub const BUILT_IN_STATE_MACHINES: &[BuiltIn] =
    &[BuiltIn { name: "kv", bytes: raft_guests::KV }, BuiltIn { name: "counter", bytes: raft_guests::COUNTER }];

/// Messages the core's inbox holds; past it clients get "busy" and peers wait.
const CORE_INBOX_CAPACITY: usize = 16_384;

/// Starts members.
pub struct Node;

/// A started member. Dropping it does not stop it; call
/// [`RunningNode::shutdown`] and then [`RunningNode::wait`].
pub struct RunningNode {
    id: NodeId,
    core_handle: super::CoreHandle,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), NodeError>>,
    core: JoinHandle<Result<(), NodeError>>,
    apply: std::thread::JoinHandle<Result<(), super::apply::ApplyError>>,
}

impl Node {
    /// Opens the member's data directory (creating and bootstrapping it on
    /// first start), loads the state machines, binds the listen address and
    /// starts every task. Must run inside a tokio runtime.
    pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
        validate(&config)?;
        let config = Arc::new(config);
        let identity = Identity::new(config.cluster_id.clone(), config.id);
        let options = StoreOptions { durability: config.durability, ..StoreOptions::default() };
        let store = {
            let dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || Store::open(&dir, &identity, &options))
                .await
                .map_err(|_| NodeError::TaskLost("store open"))??
        };
        if config.join.is_none() {
            let voters: BTreeSet<NodeId> = config.peers.keys().copied().chain([config.id]).collect();
            let mut addresses = config.peers.clone();
            addresses.insert(config.id, config.advertise.clone());
            store.bootstrap(&ConfState::with_voters(voters), &addresses)?;
        }
        let members = Members::new(config.id, config.advertise.clone(), Membership::stored(&store)?, &config.peers);

        let runtime = Arc::new(Runtime::new(config.limits.clone())?);
        let registry = Arc::new(ModuleRegistry::new(runtime.clone(), store.clone(), BUILT_IN_STATE_MACHINES));
        let stale = store.drop_stale_artifacts(runtime.engine_key())?;
        if stale > 0 {
            tracing::info!(artifacts = stale, "dropped modules compiled by another engine version");
        }
        let machines = {
            let (registry, store) = (registry.clone(), store.clone());
            tokio::task::spawn_blocking(move || load_active(&registry, &store))
                .await
                .map_err(|_| NodeError::TaskLost("module load"))??
        };
        let sessions = Sessions::load(config.sessions, store.session_scan()?)?;

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
            tracing::warn!(
                node = config.id,
                "starting offline for maintenance: this member neither votes nor campaigns"
            );
        }
        tracing::info!(
            node = config.id,
            cluster = %config.cluster_id,
            term = raft.term(),
            commit = raft.log().committed(),
            applied = store.applied().0,
            "member starting"
        );

        let progress = Arc::new(ApplyProgress::default());
        let applier = Applier::new(
            store.clone(),
            registry.clone(),
            machines,
            (sessions, config.sessions),
            progress.clone(),
            members.clone(),
        )?;
        let (apply_tx, apply_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let apply_shutdown = shutdown.clone();
        let apply = std::thread::Builder::new()
            .name(format!("apply-{}", config.id))
            .spawn(move || {
                let result = applier.run(apply_rx);
                if let Err(error) = &result {
                    tracing::error!(%error, "the apply task failed; stopping the member");
                    let _ = apply_shutdown.send(true);
                }
                result
            })
            .map_err(|_| NodeError::TaskLost("apply thread spawn"))?;

        let (core_tx, core_rx) = tokio::sync::mpsc::channel(CORE_INBOX_CAPACITY);
        let snapshots = Arc::new(SnapshotCounters::default());
        let peers = Peers::new(&config.cluster_id, members.clone(), store.clone(), core_tx.clone(), snapshots.clone());
        let (core_task, core, inbox) = CoreTask::new(
            raft,
            store.clone(),
            config.clone(),
            peers,
            members.clone(),
            apply_tx.clone(),
            progress,
            (core_tx, core_rx),
        );
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| NodeError::Listen { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| NodeError::Listen { addr: config.listen, source })?;

        let core_shutdown = shutdown.clone();
        let core_handle = tokio::spawn({
            let rx = shutdown_rx.clone();
            async move {
                let result = core_task.run(inbox, rx).await;
                if let Err(error) = &result {
                    tracing::error!(%error, "the consensus task failed; stopping the member");
                }
                // Whatever ended the core ends the member.
                let _ = core_shutdown.send(true);
                result
            }
        });

        let peer_service = PeerService::new(
            config.cluster_id.clone(),
            members.clone(),
            core.clone(),
            registry.clone(),
            store.clone(),
            snapshots.clone(),
            shutdown_rx.clone(),
        );
        let deployer =
            Deployer::new(config.clone(), core.clone(), registry.clone(), members.clone(), config.module_ready_timeout);
        let registry_for_sweep = registry.clone();
        let client_service = Arc::new(ClientService::new(
            config.clone(),
            core.clone(),
            apply_tx,
            registry,
            deployer,
            members.clone(),
            snapshots,
        ));
        tokio::spawn(sweep_idle_modules(registry_for_sweep, shutdown_rx.clone()));
        let metrics_addr = match config.metrics_listen {
            Some(addr) => {
                let listener =
                    tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Listen { addr, source })?;
                let bound = listener.local_addr().map_err(|source| NodeError::Listen { addr, source })?;
                let mut stop = shutdown_rx.clone();
                let stopped = async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                tokio::spawn(crate::rpc::metrics::serve(listener, client_service.clone(), stopped));
                tracing::info!(address = %bound, "serving metrics at /metrics");
                Some(bound)
            }
            None => None,
        };
        let client_limit = config.max_command_bytes + (64 << 10);
        let mut server_shutdown = shutdown_rx;
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(
                    RaftPeerServer::new(peer_service)
                        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
                )
                .add_service(
                    ClientServer::from_arc(client_service)
                        .max_decoding_message_size(client_limit)
                        .max_encoding_message_size(client_limit),
                )
                // The builder's nodelay applies only to listeners it binds itself;
                // without it, small answers wait out delayed ACKs (~40 ms).
                .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
                    let _ = server_shutdown.wait_for(|stop| *stop).await;
                })
                .await
                .map_err(NodeError::from)
        });
        tracing::info!(node = config.id, address = %local_addr, "serving peers and clients");
        if let Some(join) = config.join.clone()
            && !members.current().conf.members().contains(&config.id)
        {
            let stop = shutdown.subscribe();
            tokio::spawn(super::join::join(config.clone(), members.clone(), join, stop));
        }
        Ok(RunningNode {
            id: config.id,
            core_handle: core,
            local_addr,
            metrics_addr,
            shutdown,
            server,
            core: core_handle,
            apply,
        })
    }
}

impl RunningNode {
    /// The bound address (useful when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// If this member leads, hands leadership to the voter whose log is
    /// furthest along and waits (at most two election timeouts) until it
    /// has. Best effort: stopping goes on regardless.
    pub async fn hand_over_leadership(&self) {
        let Ok(status) = self.core_handle.status().await else { return };
        if status.role != crate::raft::Role::Leader {
            return;
        }
        let target = status
            .matched
            .iter()
            .filter(|(id, _)| **id != self.id && status.conf.voters.contains(id))
            .max_by_key(|(_, matched)| **matched)
            .map(|(id, _)| *id);
        let Some(to) = target else { return };
        tracing::info!(node = self.id, to, "handing leadership over before stopping");
        let moved = self.core_handle.transfer_leader(to, |view| view.role != crate::raft::Role::Leader).await;
        if let Err(RequestError::Timeout(_)) = moved {
            tracing::warn!(node = self.id, to, "leadership did not move in time; stopping anyway");
        }
    }

    /// Asks every task to stop: the server stops accepting, the core
    /// finishes its in-flight write, the apply task applies what it was
    /// handed.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// A future that resolves when the member starts stopping, from a
    /// shutdown request or a fatal error.
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// Waits until every task has stopped; the first failure, if any.
    pub async fn wait(self) -> Result<(), NodeError> {
        let server = self.server.await.map_err(|_| NodeError::TaskLost("server"))?;
        let core = self.core.await.map_err(|_| NodeError::TaskLost("consensus"))?;
        let apply = tokio::task::spawn_blocking(move || self.apply.join())
            .await
            .map_err(|_| NodeError::TaskLost("apply"))?
            .map_err(|_| NodeError::TaskLost("apply"))?;
        core?;
        apply?;
        server?;
        Ok(())
    }
}

/// How long a loaded module version that nothing runs may go unasked for
/// before its compiled code is freed.
const IDLE_MODULE_KEPT: std::time::Duration = std::time::Duration::from_secs(600);
/// How often idle module versions are looked for.
const IDLE_MODULE_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

/// Frees idle module versions now and then until the member stops (see
/// [`ModuleRegistry::forget_idle`]).
async fn sweep_idle_modules(registry: Arc<ModuleRegistry>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(IDLE_MODULE_SWEEP);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
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

/// The version each state machine runs, loaded (from the compiled cache
/// when it was compiled before).
pub(crate) fn load_active(registry: &ModuleRegistry, store: &Store) -> Result<BTreeMap<String, Machine>, NodeError> {
    let mut machines = BTreeMap::new();
    for (name, hash) in registry.active_versions()? {
        let bytes = registry.bytes(&hash)?.ok_or_else(|| {
            NodeError::Store(crate::storage::StoreError::Corrupt {
                dir: store.dir().to_path_buf(),
                what: format!("module {} of the active version of {name:?} is missing", hex(&hash)),
            })
        })?;
        let module = registry.load(&bytes).map_err(|source| NodeError::Module { name: name.clone(), source })?;
        tracing::info!(state_machine = %name, module = %hex(&module.hash()), "state machine loaded");
        machines.insert(name.clone(), Machine::new(registry.runtime().clone(), module, name, store.clone()));
    }
    Ok(machines)
}

fn validate(config: &NodeConfig) -> Result<(), NodeError> {
    let fail = |reason: String| Err(NodeError::Config(reason));
    if config.id == 0 {
        return fail("--id must be a positive number".into());
    }
    if config.peers.contains_key(&config.id) {
        return fail(format!("--peer lists this member's own id {}", config.id));
    }
    if config.cluster_id.is_empty() || config.cluster_id.len() > 128 {
        return fail("the cluster id must be 1 to 128 bytes".into());
    }
    if config.election_ticks <= config.heartbeat_ticks {
        return fail("the election timeout must be longer than the heartbeat interval".into());
    }
    if config.tick.is_zero() {
        return fail("the tick must be longer than zero".into());
    }
    Ok(())
}
