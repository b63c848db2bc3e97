//! Deploying and activating modules, as the leader does it (DESIGN.md, "Hot
//! deploy"): validate and compile the module first, so a bad one is refused
//! before anything is committed; replicate its bytes through the log in
//! chunks; wait until every live member has compiled it; then commit the
//! small activation entry, which every replica applies at the same index.

use super::config::NodeConfig;
use super::core::CoreHandle;
use super::members::Members;
use super::modules::{MODULE_CHUNK_BYTES, ModuleRegistry, check_name};
use super::request::RequestError;
use crate::raft::{NodeId, Role};
use crate::storage::StoreError;
use crate::wire::pb::{self, ModuleState, raft_peer_client::RaftPeerClient};
use crate::wire::{Payload, hex, parse_hash};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// How long one member may take to answer whether it has a module.
const STATUS_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// How often members are asked again while they compile.
const READY_POLL: Duration = Duration::from_millis(100);
/// A member that has not answered for this long counts as down: the deploy
/// goes on without it (it compiles the module when it catches up).
const UNREACHABLE_AFTER: Duration = Duration::from_secs(3);

/// A step of a deploy, reported to the client as it happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeployStep {
    /// The module is valid and compiled here.
    Validated { hash: [u8; 32] },
    /// `done` of `total` bytes are committed.
    Replicating { done: u64, total: u64 },
    /// `ready` of `members` live members have compiled it.
    Compiling { ready: usize, members: usize },
}

/// The end of an activation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activated {
    pub index: u64,
    /// The version that ran before (none for a new state machine).
    pub previous: Option<[u8; 32]>,
    /// Members that did not answer; they compile it when they catch up.
    pub unreachable: Vec<NodeId>,
}

/// Deploys and activates modules on behalf of clients; used on the leader.
pub struct Deployer {
    config: Arc<NodeConfig>,
    core: CoreHandle,
    registry: Arc<ModuleRegistry>,
    members: Arc<Members>,
}

impl Deployer {
    pub(super) fn new(
        config: Arc<NodeConfig>,
        core: CoreHandle,
        registry: Arc<ModuleRegistry>,
        members: Arc<Members>,
    ) -> Deployer {
        Deployer { config, core, registry, members }
    }

    /// Refuses unless this member leads: deploys and activations are
    /// decided in one place, and the client is told where that is.
    pub fn check_leader(&self) -> Result<(), RequestError> {
        let view = self.core.current_leadership();
        if view.role == Role::Leader {
            return Ok(());
        }
        match view.leader {
            Some(id) => Err(RequestError::NotLeader { leader: self.members.address_of(id).map(|addr| (id, addr)) }),
            None => Err(RequestError::NoLeader),
        }
    }

    /// Deploys `bytes` for state machine `name` and, if `activate`, switches
    /// to it. Steps are reported through `progress` as they happen.
    pub async fn deploy(
        &self,
        name: &str,
        bytes: Vec<u8>,
        activate: bool,
        progress: impl Fn(DeployStep),
    ) -> Result<([u8; 32], Option<Activated>), RequestError> {
        self.check_leader()?;
        check_name(name).map_err(RequestError::Invalid)?;
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        self.check_quota(name, &hash)?;
        let bytes = Arc::new(bytes);
        {
            let (registry, bytes) = (self.registry.clone(), bytes.clone());
            tokio::task::spawn_blocking(move || registry.validate(&bytes))
                .await
                .map_err(|_| RequestError::Internal("the module check stopped".into()))?
                .map_err(|e| RequestError::Invalid(format!("module refused: {e}")))?;
        }
        progress(DeployStep::Validated { hash });
        self.replicate(name, hash, &bytes, &progress).await?;
        if !activate {
            self.wait_ready(hash, &progress).await?;
            return Ok((hash, None));
        }
        let activated = self.activate_with(name, hash, &progress).await?;
        Ok((hash, Some(activated)))
    }

    /// Refuses a new version of `name` past the versions it may hold.
    fn check_quota(&self, name: &str, hash: &[u8; 32]) -> Result<(), RequestError> {
        let versions: Vec<[u8; 32]> = self
            .registry
            .versions()
            .map_err(internal)?
            .into_iter()
            .filter(|v| v.name == name && !v.built_in)
            .map(|v| v.hash)
            .collect();
        let most = self.config.max_module_versions;
        if versions.len() < most || versions.contains(hash) {
            return Ok(());
        }
        Err(RequestError::QuotaExceeded(format!(
            "state machine {name:?} holds {} versions, the most it may (--max-module-versions {most}); remove one \
             it does not run first: `raft-host modules` lists them, `raft-host modules remove --name {name} --hash \
             HASH` removes one",
            versions.len()
        )))
    }

    /// Removes version `hash` of state machine `name` through the log; the
    /// index of the removal.
    pub async fn remove(&self, name: &str, hash: [u8; 32]) -> Result<u64, RequestError> {
        self.check_leader()?;
        check_name(name).map_err(RequestError::Invalid)?;
        let remove = pb::RemoveVersion { state_machine: name.to_string(), hash: hash.to_vec() };
        let reply = self.core.propose(Payload::RemoveVersion(remove)).await?;
        match reply.outcome {
            Ok(_) => Ok(reply.index),
            Err(why) => Err(RequestError::Rejected(format!("the removal at index {} failed: {why}", reply.index))),
        }
    }

    /// While this member leads, drops uploads whose deploy was abandoned
    /// (a leader lost midway, a client that gave up): every so often, if an
    /// upload's latest chunk is older than the upload expiry, an entry
    /// drops every such upload on every replica at its index.
    pub(super) async fn expire_abandoned_uploads(self: Arc<Self>, mut stop: super::shutdown::ShutdownSignal) {
        let every = (self.config.upload_expiry / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.wait() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if self.check_leader().is_err() {
                continue;
            }
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64);
            let before_ms = now_ms.saturating_sub(self.config.upload_expiry.as_millis() as u64);
            let registry = self.registry.clone();
            let stale = tokio::task::spawn_blocking(move || registry.uploads_in_progress()).await;
            let Ok(Ok(uploads)) = stale else { continue };
            if !uploads.iter().any(|upload| upload.last_chunk_ms < before_ms) {
                continue;
            }
            let expire = pb::ExpireUploads { before_ms };
            match self.core.propose(Payload::ExpireUploads(expire)).await {
                Ok(reply) => tracing::info!(index = reply.index, "proposed to drop abandoned module uploads"),
                Err(error) => tracing::warn!(%error, "could not propose to drop abandoned module uploads"),
            }
        }
    }

    /// Switches state machine `name` to the stored version `hash`.
    pub async fn activate(&self, name: &str, hash: [u8; 32]) -> Result<Activated, RequestError> {
        self.activate_with(name, hash, &|_| {}).await
    }

    async fn activate_with(
        &self,
        name: &str,
        hash: [u8; 32],
        progress: &impl Fn(DeployStep),
    ) -> Result<Activated, RequestError> {
        self.check_leader()?;
        check_name(name).map_err(RequestError::Invalid)?;
        if !self.registry.is_stored(&hash).map_err(internal)? {
            return Err(RequestError::Invalid(format!(
                "no module {} is stored in this cluster; deploy it first (raft-host modules lists what is)",
                hex(&hash)
            )));
        }
        let unreachable = self.wait_ready(hash, progress).await?;
        let activate = pb::Activate { state_machine: name.to_string(), hash: hash.to_vec() };
        let reply = self.core.propose(Payload::Activate(activate)).await?;
        match reply.outcome {
            Ok(previous) => {
                let previous = String::from_utf8_lossy(&previous);
                let previous = if previous.is_empty() { None } else { parse_hash(&previous).ok() };
                Ok(Activated { index: reply.index, previous, unreachable })
            }
            Err(why) => Err(RequestError::Rejected(format!("the activation at index {} failed: {why}", reply.index))),
        }
    }

    /// Proposes the module's chunks that are not committed yet, in order.
    async fn replicate(
        &self,
        name: &str,
        hash: [u8; 32],
        bytes: &[u8],
        progress: &impl Fn(DeployStep),
    ) -> Result<(), RequestError> {
        let total = bytes.len() as u64;
        if self.registry.is_stored(&hash).map_err(internal)? {
            progress(DeployStep::Replicating { done: total, total });
            return Ok(());
        }
        for (number, chunk) in bytes.chunks(MODULE_CHUNK_BYTES).enumerate() {
            let offset = (number * MODULE_CHUNK_BYTES) as u64;
            let entry = pb::ModuleChunk {
                state_machine: name.to_string(),
                hash: hash.to_vec(),
                total_bytes: total,
                offset,
                data: chunk.to_vec(),
            };
            let reply = self.core.propose(Payload::ModuleChunk(entry)).await?;
            if let Err(why) = reply.outcome {
                return Err(RequestError::Rejected(format!("chunk at {offset} was refused: {why}")));
            }
            progress(DeployStep::Replicating { done: offset + chunk.len() as u64, total });
        }
        Ok(())
    }

    /// Waits until this member and every peer that answers has compiled
    /// `hash`; returns the peers that did not answer.
    async fn wait_ready(&self, hash: [u8; 32], progress: &impl Fn(DeployStep)) -> Result<Vec<NodeId>, RequestError> {
        let deadline = Instant::now() + self.config.module_ready_timeout;
        // Every current member, learners included: each runs the module once
        // it is activated.
        let mut waiting: BTreeMap<NodeId, Option<RaftPeerClient<Channel>>> = self
            .members
            .current()
            .conf
            .members()
            .into_iter()
            .filter(|&id| id != self.config.id)
            .map(|id| (id, self.members.channel(id).ok().map(RaftPeerClient::new)))
            .collect();
        waiting.insert(self.config.id, None);
        let members = waiting.len();
        let mut unreachable = Vec::new();
        let mut silent_since: BTreeMap<NodeId, Instant> = BTreeMap::new();
        let mut reported = usize::MAX;
        loop {
            let mut still = BTreeMap::new();
            for (id, client) in waiting {
                let answer = match &client {
                    None if id == self.config.id => self.registry.status(&hash).map_err(internal).map(Some)?,
                    None => None,
                    Some(client) => self.ask(client.clone(), id, hash).await,
                };
                if answer.is_some() {
                    silent_since.remove(&id);
                }
                match answer {
                    None if silent_since.entry(id).or_insert_with(Instant::now).elapsed() >= UNREACHABLE_AFTER => {
                        tracing::warn!(member = id, module = %hex(&hash), "member did not answer; it will compile the module when it catches up");
                        unreachable.push(id);
                    }
                    Some((ModuleState::Ready, _)) => {}
                    Some((ModuleState::Failed, why)) => {
                        return Err(RequestError::Rejected(format!(
                            "member {id} refused module {}: {why}",
                            hex(&hash)
                        )));
                    }
                    // Still compiling or catching up, or silent for a moment.
                    Some(_) | None => {
                        still.insert(id, client);
                    }
                }
            }
            waiting = still;
            let ready = members - waiting.len() - unreachable.len();
            if ready != reported {
                progress(DeployStep::Compiling { ready, members: members - unreachable.len() });
                reported = ready;
            }
            if waiting.is_empty() {
                return Ok(unreachable);
            }
            if Instant::now() >= deadline {
                let late: Vec<String> = waiting.keys().map(ToString::to_string).collect();
                return Err(RequestError::Rejected(format!(
                    "members {} have not compiled module {} within {:?}; it stays stored, activate it later",
                    late.join(", "),
                    hex(&hash),
                    self.config.module_ready_timeout
                )));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// One member's answer about `hash`; `None` if it does not answer.
    async fn ask(
        &self,
        mut client: RaftPeerClient<Channel>,
        id: NodeId,
        hash: [u8; 32],
    ) -> Option<(ModuleState, String)> {
        let request = pb::ModuleStatusRequest {
            cluster_id: self.config.cluster_id.clone(),
            from: self.config.id,
            to: id,
            hash: hash.to_vec(),
        };
        let reply = tokio::time::timeout(STATUS_CALL_TIMEOUT, client.module_status(request)).await.ok()?.ok()?;
        let reply = reply.into_inner();
        Some((ModuleState::try_from(reply.state).unwrap_or(ModuleState::Absent), reply.error))
    }
}

fn internal(error: StoreError) -> RequestError {
    RequestError::Internal(error.to_string())
}
