//! The server side of the peer protocol: envelopes of consensus messages,
//! snapshot streams, and deploys asking whether a module is compiled here.
//!
//! Over TLS, [`PeerGate`] lets a call through only if the connection's
//! certificate names a member of this cluster, before any of its messages is
//! decoded; every message must then come from that very member. A member
//! whose removal is applied counts no more, whatever certificate it holds
//! (see `removal_allowance` for the one exception, a removed leader's
//! hand-over).

use super::metrics::PeerCounters;
use crate::node::{NodeHandles, ShutdownSignal};
use crate::raft::{Message, MessageBody, NodeId, Term};
use crate::storage::{Staging, StagingStart, StoreError};
use crate::wire::pb::raft_control_server::RaftControl;
use crate::wire::pb::raft_peer_server::RaftPeer;
use crate::wire::pb::{
    DeliverReply, Envelope, InstallSnapshotReply, ModuleStatusReply, ModuleStatusRequest, SnapshotChunk,
};
use crate::wire::{EnvelopeError, Principal, open_envelope, snapshot_meta_from_pb};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tonic::{Request, Response, Status, Streaming};

/// The member a call's certificate names, put on the call by [`PeerGate`].
#[derive(Clone, Copy, Debug)]
struct CertifiedMember(NodeId);

/// Lets a peer call through only when the TLS connection it came on holds
/// the certificate of another member of this cluster, not removed.
#[derive(Clone)]
pub struct PeerGate {
    /// `None`: plaintext, chosen by the operator; every call passes.
    check: Option<GateCheck>,
}

#[derive(Clone)]
struct GateCheck {
    cluster_id: String,
    node: NodeHandles,
    counters: Arc<PeerCounters>,
}

impl PeerGate {
    /// A gate for the member behind `node`, of `cluster_id`, over TLS.
    pub(super) fn new(cluster_id: String, node: NodeHandles, counters: Arc<PeerCounters>) -> PeerGate {
        PeerGate { check: Some(GateCheck { cluster_id, node, counters }) }
    }

    /// No gate: a member serving plaintext has no certificates to check.
    pub(super) fn open() -> PeerGate {
        PeerGate { check: None }
    }

    fn admit(request: &Request<()>, check: &GateCheck) -> Result<NodeId, String> {
        let (cluster_id, me) = (&check.cluster_id, check.node.members.me());
        match Principal::of_request(request)? {
            Principal::Member { cluster, id } if cluster == *cluster_id && id != me => {
                removal_allowance(&check.node, id).map_err(|e| e.to_string())?;
                Ok(id)
            }
            other => Err(format!("the certificate names {other}, not another member of cluster {cluster_id:?}")),
        }
    }
}

impl tonic::service::Interceptor for PeerGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(check) = &self.check else { return Ok(request) };
        match PeerGate::admit(&request, check) {
            Ok(id) => {
                request.extensions_mut().insert(CertifiedMember(id));
                Ok(request)
            }
            Err(why) => {
                check.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(remote = ?request.remote_addr(), why, "refused a peer call");
                Err(Status::permission_denied(format!("peer calls need a member's certificate: {why}")))
            }
        }
    }
}

/// Whether messages from `id` may count although it was removed: `Ok(None)`
/// when it was not removed; `Ok(Some(term))` when it is the leader this
/// member follows in `term`, finishing its hand-over (thesis §4.2.2: a
/// removed leader leads until its removal commits, and a follower that
/// applies the removal first still needs its last heartbeats and its
/// TimeoutNow); messages from it above that term do not count. Refused
/// otherwise, and for good once the term moves on.
fn removal_allowance(node: &NodeHandles, id: NodeId) -> Result<Option<Term>, EnvelopeError> {
    if !node.members.is_removed(id) {
        return Ok(None);
    }
    let leadership = node.core.current_leadership();
    match leadership.leader {
        Some(leader) if leader == id => Ok(Some(leadership.term)),
        _ => Err(EnvelopeError::RemovedSender(id)),
    }
}

/// The member the gate found on `request`, if it ran (over TLS).
fn certified<T>(request: &Request<T>) -> Option<NodeId> {
    request.extensions().get::<CertifiedMember>().map(|member| member.0)
}

/// Limits on what a peer may make this member take in.
#[derive(Clone, Copy, Debug)]
pub struct PeerLimits {
    /// Largest snapshot accepted, as its sender announces it.
    pub snapshot_bytes_max: u64,
    /// Longest wait for the next chunk of a snapshot stream.
    pub stream_idle_timeout: Duration,
}

/// The snapshot stream being received, which a newer one may replace.
struct Receiving {
    /// Held by the stream that receives; one at a time.
    slot: tokio::sync::Mutex<()>,
    /// Its term, and how to tell it to give way.
    current: std::sync::Mutex<Option<(Term, Arc<Notify>)>>,
}

/// Checks every envelope against this member and its cluster, then hands
/// the messages to the core task.
pub struct PeerService {
    cluster_id: String,
    me: NodeId,
    node: NodeHandles,
    counters: Arc<PeerCounters>,
    limits: PeerLimits,
    receiving: Receiving,
    /// Turns when the member stops: delivery streams end then, so a
    /// graceful shutdown does not wait for peers to hang up.
    stopping: ShutdownSignal,
}

impl PeerService {
    /// The peer side of the node behind `node`, in cluster `cluster_id`.
    pub fn new(
        cluster_id: String,
        node: NodeHandles,
        counters: Arc<PeerCounters>,
        limits: PeerLimits,
        stopping: ShutdownSignal,
    ) -> PeerService {
        let me = node.members.me();
        let receiving = Receiving { slot: tokio::sync::Mutex::new(()), current: std::sync::Mutex::new(None) };
        PeerService { cluster_id, me, node, counters, limits, receiving, stopping }
    }

    /// Checks who is asking, as an envelope with no messages would be, for
    /// a request of `term` (0: outside any term).
    fn check_sender(
        &self,
        (cluster_id, from, to): (String, NodeId, NodeId),
        term: Term,
        certified: Option<NodeId>,
    ) -> Result<(), Status> {
        let envelope = Envelope { cluster_id, from, to, messages: Vec::new() };
        self.open(envelope, certified)?;
        match removal_allowance(&self.node, from) {
            Ok(Some(allowed)) if term == 0 || term > allowed => Err(self.refused(EnvelopeError::RemovedSender(from))),
            _ => Ok(()),
        }
    }

    /// An envelope's messages, if it passes every check; a refusal is counted.
    fn open(&self, envelope: Envelope, certified: Option<NodeId>) -> Result<Vec<Message>, Status> {
        let from = envelope.from;
        let allowed_term = removal_allowance(&self.node, from).map_err(|e| self.refused(e))?;
        let knows = |id| self.node.members.knows(id) || (id == from && allowed_term.is_some());
        let messages =
            open_envelope(envelope, &self.cluster_id, self.me, certified, knows).map_err(|e| self.refused(e))?;
        if let Some(allowed) = allowed_term
            && messages.iter().any(|message| message.term > allowed)
        {
            return Err(self.refused(EnvelopeError::RemovedSender(from)));
        }
        Ok(messages)
    }

    fn refused(&self, error: EnvelopeError) -> Status {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        refusal(error)
    }

    /// Checks one envelope and hands its messages to the core.
    async fn deliver_envelope(
        &self,
        envelope: Envelope,
        certified: Option<NodeId>,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), Status> {
        let mut messages = self.open(envelope, certified).inspect_err(|status| {
            tracing::warn!(remote = ?peer, error = %status.message(), "refused a peer envelope");
        })?;
        if self.node.disk.is_low() {
            // No room for entries: let the leader's appends go unanswered, as
            // if lost (it sends them again); everything else still counts.
            messages.retain(|m| !matches!(&m.body, MessageBody::AppendEntries { entries, .. } if !entries.is_empty()));
            if messages.is_empty() {
                return Ok(());
            }
        }
        self.node.core.deliver(messages).await.map_err(|e| Status::unavailable(e.to_string()))
    }

    /// The next chunk of a snapshot stream, waited for no longer than the
    /// idle timeout.
    async fn next_chunk(&self, stream: &mut Streaming<SnapshotChunk>) -> Result<Option<SnapshotChunk>, Status> {
        let idle = self.limits.stream_idle_timeout;
        match tokio::time::timeout(idle, stream.message()).await {
            Ok(chunk) => chunk,
            Err(_) => Err(Status::deadline_exceeded(format!("the snapshot stream sent nothing for {idle:?}"))),
        }
    }

    /// Checks a snapshot stream's header before anything is staged: who
    /// sends it, that it comes from the leader of a current term, and that
    /// its announced size is within the limit.
    fn check_snapshot_header(&self, first: &SnapshotChunk, certified: Option<NodeId>) -> Result<(), Status> {
        self.check_sender((first.cluster_id.clone(), first.from, first.to), first.term, certified)?;
        let view = self.node.core.current_leadership();
        if first.term < view.term {
            return Err(Status::failed_precondition(format!(
                "a snapshot of term {}, but this member is in term {}",
                first.term, view.term
            )));
        }
        if first.term == view.term
            && let Some(leader) = view.leader.filter(|&leader| leader != first.from)
        {
            return Err(Status::failed_precondition(format!(
                "member {} is not the leader of term {} (member {leader} is)",
                first.from, first.term
            )));
        }
        if !self.node.disk.admits_snapshot(first.total_bytes) {
            return Err(Status::resource_exhausted(self.node.disk.snapshot_refusal(first.total_bytes)));
        }
        let limit = self.limits.snapshot_bytes_max;
        if first.total_bytes == 0 || first.total_bytes > limit {
            return Err(Status::resource_exhausted(format!(
                "a snapshot announced as {} bytes; this member takes 1 to {limit} bytes",
                first.total_bytes
            )));
        }
        Ok(())
    }

    /// Receives, verifies and stages a snapshot stream whose first chunk
    /// is `first`; returns the message that hands it to the core. Gives way
    /// when `replaced` is notified; what it staged is dropped unless the
    /// snapshot is complete.
    async fn receive_snapshot(
        &self,
        first: SnapshotChunk,
        stream: &mut Streaming<SnapshotChunk>,
        replaced: &Notify,
    ) -> Result<Message, Status> {
        let (from, term, total) = (first.from, first.term, first.total_bytes);
        let meta = first.meta.clone().map(snapshot_meta_from_pb).ok_or_else(|| {
            Status::invalid_argument("the first snapshot chunk must carry the snapshot's index, term and membership")
        })?;
        let started = Instant::now();
        let store = self.node.store.clone();
        let header = meta.clone();
        let staging = match blocking(move || store.begin_staging(header)).await? {
            StagingStart::Fresh(staging) => staging,
            StagingStart::AlreadyStaged(meta) => {
                // A retry of a snapshot waiting for its install: hand it over
                // again without receiving (and so without disturbing) it.
                return Ok(Message { from, to: self.me, term, body: MessageBody::InstallSnapshot { snapshot: meta } });
            }
        };
        let received = tokio::select! {
            received = self.stage_chunks(first, stream, staging) => received,
            _ = replaced.notified() => Err(Status::aborted("a newer snapshot stream from the leader replaced this one")),
        };
        let bytes = match received {
            Ok(bytes) => bytes,
            Err(status) => {
                let (store, partial) = (self.node.store.clone(), meta.clone());
                if let Err(error) = blocking(move || store.discard_staging(&partial)).await {
                    tracing::warn!(error = %error.message(), "dropping a broken snapshot's staging failed");
                }
                return Err(status);
            }
        };
        self.node.snapshots.received.fetch_add(1, Ordering::Relaxed);
        self.node.snapshots.received_bytes.fetch_add(bytes, Ordering::Relaxed);
        tracing::info!(
            from,
            index = meta.index,
            term = meta.term,
            bytes,
            announced = total,
            seconds = started.elapsed().as_secs_f64(),
            "snapshot received and staged"
        );
        Ok(Message { from, to: self.me, term, body: MessageBody::InstallSnapshot { snapshot: meta } })
    }

    /// Stages the chunks from `first` on, checking each against the stream's
    /// header; returns the bytes received once the last one is verified and
    /// the snapshot marked complete.
    async fn stage_chunks(
        &self,
        first: SnapshotChunk,
        stream: &mut Streaming<SnapshotChunk>,
        mut staging: Staging,
    ) -> Result<u64, Status> {
        let (from, term, total) = (first.from, first.term, first.total_bytes);
        let mut digest = Sha256::new();
        let mut expected_offset = 0u64;
        let mut chunk = first;
        loop {
            if chunk.from != from || chunk.term != term {
                return Err(Status::invalid_argument("a snapshot stream changed sender or term midway"));
            }
            if chunk.offset != expected_offset {
                return Err(Status::invalid_argument(format!(
                    "snapshot chunk at offset {} where {expected_offset} was expected",
                    chunk.offset
                )));
            }
            let end = expected_offset + chunk.data.len() as u64;
            if end > total {
                return Err(Status::invalid_argument(format!(
                    "the snapshot stream carries more than the {total} bytes it announced"
                )));
            }
            if crc32fast::hash(&chunk.data) != chunk.checksum {
                return Err(Status::data_loss(format!("snapshot chunk at offset {} fails its checksum", chunk.offset)));
            }
            digest.update(&chunk.data);
            expected_offset = end;
            self.node.snapshots.receiving_bytes.store(expected_offset, Ordering::Relaxed);
            let last = chunk.last;
            let (data, received_digest) = (chunk.data, chunk.digest);
            staging = blocking(move || staging.write_chunk(&data).map(|()| staging)).await?;
            if last {
                if expected_offset != total {
                    return Err(Status::invalid_argument(format!(
                        "the snapshot stream ended after {expected_offset} of the {total} bytes it announced"
                    )));
                }
                if digest.finalize().as_slice() != received_digest.as_slice() {
                    return Err(Status::data_loss("the snapshot's SHA-256 does not match its data"));
                }
                break;
            }
            chunk = self
                .next_chunk(stream)
                .await?
                .ok_or_else(|| Status::invalid_argument("the snapshot stream ended before its last chunk"))?;
        }
        blocking(move || Staging::finish(staging)).await?;
        Ok(expected_offset)
    }
}

impl PeerService {
    /// Delivers each envelope of a lane's stream, in order, until the stream
    /// ends, an envelope is refused, or the member stops.
    async fn deliver_each(&self, request: Request<Streaming<Envelope>>) -> Result<Response<DeliverReply>, Status> {
        let (peer, certified) = (request.remote_addr(), certified(&request));
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        loop {
            let envelope = tokio::select! {
                _ = stopping.wait() => break,
                envelope = stream.message() => envelope?,
            };
            let Some(envelope) = envelope else { break };
            self.deliver_envelope(envelope, certified, peer).await?;
        }
        Ok(Response::new(DeliverReply {}))
    }
}

#[tonic::async_trait]
impl RaftControl for PeerService {
    async fn deliver_stream(&self, request: Request<Streaming<Envelope>>) -> Result<Response<DeliverReply>, Status> {
        self.deliver_each(request).await
    }
}

/// Runs a store call on a blocking thread; its failure is this member's.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Status::internal(error.to_string())),
        Err(_) => Err(Status::internal("a storage thread was lost")),
    }
}

fn refusal(error: EnvelopeError) -> Status {
    match error {
        EnvelopeError::WrongCluster { .. }
        | EnvelopeError::UnknownSender(_)
        | EnvelopeError::RemovedSender(_)
        | EnvelopeError::NotTheCertificateHolder { .. } => Status::permission_denied(error.to_string()),
        _ => Status::invalid_argument(error.to_string()),
    }
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn deliver(&self, request: Request<Envelope>) -> Result<Response<DeliverReply>, Status> {
        let (peer, certified) = (request.remote_addr(), certified(&request));
        self.deliver_envelope(request.into_inner(), certified, peer).await?;
        Ok(Response::new(DeliverReply {}))
    }

    async fn deliver_stream(&self, request: Request<Streaming<Envelope>>) -> Result<Response<DeliverReply>, Status> {
        self.deliver_each(request).await
    }

    async fn module_status(
        &self,
        request: Request<ModuleStatusRequest>,
    ) -> Result<Response<ModuleStatusReply>, Status> {
        let certified = certified(&request);
        let request = request.into_inner();
        self.check_sender((request.cluster_id, request.from, request.to), 0, certified)?;
        let hash: [u8; 32] =
            request.hash.as_slice().try_into().map_err(|_| Status::invalid_argument("a module hash is 32 bytes"))?;
        let (state, error) = self.node.modules.status(&hash).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ModuleStatusReply { state: state as i32, error }))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<InstallSnapshotReply>, Status> {
        let (remote, certified) = (request.remote_addr(), certified(&request));
        let mut stream = request.into_inner();
        let received = async {
            let first =
                self.next_chunk(&mut stream).await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
            self.check_snapshot_header(&first, certified)?;
            // A stream of the same or a newer term takes over from one that
            // is stalled or slow (the leader retried); an older one waits
            // for nothing and is refused.
            let replaced = Arc::new(Notify::new());
            {
                let mut current = self.receiving.current.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((running_term, running)) = current.as_ref() {
                    if first.term < *running_term {
                        return Err(Status::unavailable("a snapshot of a newer term is being received"));
                    }
                    running.notify_one();
                }
                *current = Some((first.term, replaced.clone()));
            }
            let _slot = self.receiving.slot.lock().await;
            let received = self.receive_snapshot(first, &mut stream, &replaced).await;
            let mut current = self.receiving.current.lock().unwrap_or_else(|p| p.into_inner());
            if current.as_ref().is_some_and(|(_, running)| Arc::ptr_eq(running, &replaced)) {
                *current = None;
            }
            received
        };
        let received = received.await;
        self.node.snapshots.receiving_bytes.store(0, Ordering::Relaxed);
        let message = received.inspect_err(|status| {
            self.node.snapshots.receive_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(remote = ?remote, error = %status.message(), "refused a snapshot stream");
        })?;
        self.node.core.deliver(vec![message]).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(InstallSnapshotReply { accepted: true }))
    }
}
