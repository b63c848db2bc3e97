//! The server side of the peer protocol.

use super::pb::raft_peer_server::RaftPeer;
use super::pb::{DeliverReply, Envelope, InstallSnapshotReply, ModuleStatusReply, ModuleStatusRequest, SnapshotChunk};
use super::{EnvelopeError, open_envelope};
use crate::node::CoreHandle;
use crate::node::modules::ModuleRegistry;
use crate::raft::NodeId;
use std::collections::BTreeSet;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// Checks every envelope against this member and its cluster, then hands
/// the messages to the core task.
pub struct PeerService {
    cluster_id: String,
    me: NodeId,
    members: BTreeSet<NodeId>,
    core: CoreHandle,
    registry: Arc<ModuleRegistry>,
}

impl PeerService {
    pub fn new(
        cluster_id: String,
        me: NodeId,
        members: BTreeSet<NodeId>,
        core: CoreHandle,
        registry: Arc<ModuleRegistry>,
    ) -> PeerService {
        PeerService { cluster_id, me, members, core, registry }
    }

    /// Checks who is asking, as an envelope with no messages would be.
    fn check_sender(&self, cluster_id: String, from: NodeId, to: NodeId) -> Result<(), Status> {
        let envelope = Envelope { cluster_id, from, to, messages: Vec::new() };
        open_envelope(envelope, &self.cluster_id, self.me, &self.members).map(|_| ()).map_err(refusal)
    }
}

fn refusal(error: EnvelopeError) -> Status {
    match error {
        EnvelopeError::WrongCluster { .. } | EnvelopeError::UnknownSender(_) => {
            Status::permission_denied(error.to_string())
        }
        _ => Status::invalid_argument(error.to_string()),
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn deliver(&self, request: Request<Envelope>) -> Result<Response<DeliverReply>, Status> {
        let peer = request.remote_addr();
        let messages = open_envelope(request.into_inner(), &self.cluster_id, self.me, &self.members).map_err(|e| {
            tracing::warn!(remote = ?peer, error = %e, "refused a peer envelope");
            refusal(e)
        })?;
        self.core.deliver(messages).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(DeliverReply {}))
    }

    async fn module_status(
        &self,
        request: Request<ModuleStatusRequest>,
    ) -> Result<Response<ModuleStatusReply>, Status> {
        let request = request.into_inner();
        self.check_sender(request.cluster_id, request.from, request.to)?;
        let hash: [u8; 32] =
            request.hash.as_slice().try_into().map_err(|_| Status::invalid_argument("a module hash is 32 bytes"))?;
        let (state, error) = self.registry.status(&hash).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ModuleStatusReply { state: state as i32, error }))
    }

    async fn install_snapshot(
        &self,
        _request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<InstallSnapshotReply>, Status> {
        Err(Status::unimplemented(
            "this member does not accept snapshots yet (raft-host log compaction is not enabled)",
        ))
    }
}
