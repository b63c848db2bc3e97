//! The server side of the peer protocol.

use super::pb::raft_peer_server::RaftPeer;
use super::pb::{DeliverReply, Envelope, InstallSnapshotReply, SnapshotChunk};
use super::{EnvelopeError, open_envelope};
use crate::node::CoreHandle;
use crate::raft::NodeId;
use std::collections::BTreeSet;
use tonic::{Request, Response, Status, Streaming};

/// Checks every envelope against this member and its cluster, then hands
/// the messages to the core task.
pub struct PeerService {
    cluster_id: String,
    me: NodeId,
    members: BTreeSet<NodeId>,
    core: CoreHandle,
}

impl PeerService {
    pub fn new(cluster_id: String, me: NodeId, members: BTreeSet<NodeId>, core: CoreHandle) -> PeerService {
        PeerService { cluster_id, me, members, core }
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn deliver(&self, request: Request<Envelope>) -> Result<Response<DeliverReply>, Status> {
        let peer = request.remote_addr();
        let messages = open_envelope(request.into_inner(), &self.cluster_id, self.me, &self.members).map_err(|e| {
            tracing::warn!(remote = ?peer, error = %e, "refused a peer envelope");
            match e {
                EnvelopeError::WrongCluster { .. } | EnvelopeError::UnknownSender(_) => {
                    Status::permission_denied(e.to_string())
                }
                _ => Status::invalid_argument(e.to_string()),
            }
        })?;
        self.core.deliver(messages).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(DeliverReply {}))
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
