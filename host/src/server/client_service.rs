//! The server side of the public client API (`proto/client.proto`).
//!
//! Requests are checked here before they reach the node (sizes, names,
//! session fields). A write or lease read that reaches a follower is
//! forwarded once to the leader it knows; a request that was forwarded is
//! never forwarded again, so a stale view of leadership cannot loop.
//!
//! Over TLS, [`ClientGate`] reads the caller's role from its certificate
//! before the request is decoded, and each call needs a role: reads, status,
//! watch and listings `reader`; writes `writer`; deploys, activations,
//! membership changes, leader transfers and maintenance `admin`. Members
//! count as `admin` (they forward writes and join through this API).

mod watch;

use super::config::ServerConfig;
use super::metrics::{Method, MetricsSource, PeerCounters, Probe, RequestCounters};
use crate::client::{BYTES_PER_MESSAGE_MAX, Batcher};
use crate::node::{
    Consistency, DeployStep, Digests, LeadershipView, Members, Membership, NodeHandles, ReadReply, RequestError,
    ShutdownSignal, WriteReply, check_name,
};
use crate::process;
use crate::raft::{ConfChange, ConfChangeKind, NodeId, Role};
use crate::storage::backup_header;
use crate::wire::client_pb::client_server::Client;
use crate::wire::client_pb::{
    self, ActivateRequest, ActivateResponse, BackupChunk, BackupRequest, BatchAnswer, BatchItem, BatchRequest,
    BatchResponse, ChangeMembershipRequest, DeployProgress, DeployRequest, LeadershipEvent, Member, MembersRequest,
    MembersResponse, MembershipChange, ModuleVersionInfo, ModulesRequest, ModulesResponse, ReadRequest, ReadResponse,
    RemoveModuleRequest, RemoveModuleResponse, SetOfflineRequest, SetOfflineResponse, StateMachineStatus,
    StatusRequest, StatusResponse, ThreadCpu, TransferLeaderRequest, TransferLeaderResponse, WatchChangesRequest,
    WatchChangesResponse, WatchRequest, WriteRequest, WriteResponse, backup_chunk, batch_answer, batch_item,
    client_client::ClientClient, outcome,
};
use crate::wire::{
    ClientRole, FORWARDED_KEY, LEADER_ADDR_KEY, LEADER_ID_KEY, NO_RETRY_KEY, Principal, REQUEST_ID_KEY, batch_error_of,
    encode_addresses, hex, parse_hash, pb,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream, wrappers::WatchStream};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

/// Longest client id accepted.
pub const CLIENT_ID_MAX_BYTES: usize = 128;

/// The role a call's certificate gives, put on the call by [`ClientGate`].
#[derive(Clone, Copy, Debug)]
struct CallerRole(ClientRole);

/// Lets a client call through only with a certificate of this cluster, and
/// puts the role it gives on the call.
#[derive(Clone)]
pub struct ClientGate {
    /// `None`: plaintext, chosen by the operator; every call may do anything.
    cluster_id: Option<String>,
}

impl ClientGate {
    /// A gate for a member of `cluster_id` over TLS.
    pub(super) fn new(cluster_id: String) -> ClientGate {
        ClientGate { cluster_id: Some(cluster_id) }
    }

    /// No gate: a member serving plaintext has no certificates to read.
    pub(super) fn open() -> ClientGate {
        ClientGate { cluster_id: None }
    }

    fn role(request: &Request<()>, cluster_id: &str) -> Result<ClientRole, String> {
        let principal = Principal::of_request(request)?;
        if principal.cluster() != cluster_id {
            return Err(format!("the certificate names {principal}, not one of cluster {cluster_id:?}"));
        }
        Ok(match principal {
            Principal::Member { .. } => ClientRole::Admin,
            Principal::Client { role, .. } => role,
        })
    }
}

impl tonic::service::Interceptor for ClientGate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(cluster_id) = &self.cluster_id else { return Ok(request) };
        match ClientGate::role(&request, cluster_id) {
            Ok(role) => {
                request.extensions_mut().insert(CallerRole(role));
                Ok(request)
            }
            Err(why) => {
                tracing::warn!(remote = ?request.remote_addr(), why, "refused a client call");
                Err(Status::permission_denied(why))
            }
        }
    }
}

impl ClientService {
    /// Splits a batch message: on the leader, the writes a writer sent are
    /// proposed together (one message to the core, one answer back for
    /// all), and its linearizable reads share one ReadIndex round;
    /// everything else, and every item on a follower (which forwards), goes
    /// on its own.
    fn together(&self, items: Vec<BatchItem>, write_refusal: &Option<Status>) -> Together {
        let mut together = Together::default();
        if self.node.core.current_leadership().role != Role::Leader {
            together.others = items;
            return together;
        }
        let linearizable = client_pb::Consistency::Linearizable as i32;
        for item in items {
            match item.request {
                Some(batch_item::Request::Write(write)) if write_refusal.is_none() => {
                    together.writes.push((item.id, item.request_id, write));
                }
                Some(batch_item::Request::Read(read)) if read.consistency == linearizable => {
                    together.reads.push((item.id, item.request_id, read));
                }
                request => together.others.push(BatchItem { request, ..item }),
            }
        }
        together
    }

    /// Answers a batch message's linearizable reads, served by one ReadIndex
    /// round. As with writes, each stands alone, and those refused because
    /// leadership moved take the one-by-one path (which forwards).
    async fn answer_reads_together(
        self: Arc<Self>,
        reads: Vec<(u64, String, ReadRequest)>,
        forwarded: bool,
    ) -> Vec<BatchAnswer> {
        let started = std::time::Instant::now();
        let mut answers = Vec::with_capacity(reads.len());
        let mut asked = Vec::with_capacity(reads.len());
        let mut queries = Vec::with_capacity(reads.len());
        for (id, request_id, read) in reads {
            let checked = self
                .check_state_machine(&read.state_machine, false)
                .and_then(|()| self.check_size("query", read.query.len()));
            match checked {
                Ok(()) => {
                    queries.push((read.state_machine.clone(), read.query.clone()));
                    asked.push((id, request_id, read));
                }
                Err(status) => answers.push(self.refused(Method::Read, id, &status, started)),
            }
        }
        if asked.is_empty() {
            return answers;
        }
        let _pending = match self.admit_many(asked.len()) {
            Ok(permits) => permits,
            Err(busy) => return self.refuse_all(Method::Read, &asked, &busy, started, answers),
        };
        let results = match self.node.core.read_many(queries).await {
            Ok(results) => results,
            Err(error) => return self.refuse_all(Method::Read, &asked, &status_of(error), started, answers),
        };
        let mut moved = tokio::task::JoinSet::new();
        for ((id, request_id, read), result) in asked.into_iter().zip(results) {
            match result {
                Ok(reply) => {
                    self.counters.record(Method::Read, tonic::Code::Ok, started.elapsed());
                    answers.push(BatchAnswer {
                        id,
                        answer: Some(batch_answer::Answer::Read(read_response(reply))),
                        leader_addr: String::new(),
                    });
                }
                // Leadership moved between the split and the round.
                Err(RequestError::NotLeader { leader: Some(_) } | RequestError::LeadershipChanged) if !forwarded => {
                    let item = BatchItem { id, request: Some(batch_item::Request::Read(read)), request_id };
                    moved.spawn(self.clone().answer_item(item, forwarded, None));
                }
                Err(error) => answers.push(self.refused(Method::Read, id, &status_of(error), started)),
            }
        }
        answers.extend(moved.join_all().await);
        answers
    }

    /// Room for `n` requests at once, or the status that turns them away.
    fn admit_many(&self, n: usize) -> Result<OwnedSemaphorePermit, Status> {
        let permits = u32::try_from(n).ok().and_then(|n| self.admission.clone().try_acquire_many_owned(n).ok());
        permits.ok_or_else(|| self.busy())
    }

    /// `answers` with every one of `items` refused with `status`.
    fn refuse_all<T>(
        &self,
        method: Method,
        items: &[(u64, String, T)],
        status: &Status,
        started: std::time::Instant,
        mut answers: Vec<BatchAnswer>,
    ) -> Vec<BatchAnswer> {
        answers.extend(items.iter().map(|(id, _, _)| self.refused(method, *id, status, started)));
        answers
    }

    /// The status a request turned away for want of room gets.
    fn busy(&self) -> Status {
        status_of(RequestError::Busy(format!(
            "{} requests are waiting on this member (limit {})",
            self.pending(),
            self.admission_max
        )))
    }

    /// Answers a batch message's writes proposed together. Each stands
    /// alone: one refused or failed does not touch the others, and those
    /// refused because leadership moved meanwhile take the one-by-one path
    /// (which forwards).
    async fn answer_writes_together(
        self: Arc<Self>,
        writes: Vec<(u64, String, WriteRequest)>,
        forwarded: bool,
    ) -> Vec<BatchAnswer> {
        let started = std::time::Instant::now();
        let mut answers = Vec::with_capacity(writes.len());
        let mut proposed = Vec::with_capacity(writes.len());
        let mut commands = Vec::with_capacity(writes.len());
        for (id, request_id, write) in writes {
            match self.command_of(&write) {
                Ok(command) => {
                    commands.push(command);
                    proposed.push((id, request_id, write));
                }
                Err(status) => answers.push(self.refused(Method::Write, id, &status, started)),
            }
        }
        if proposed.is_empty() {
            return answers;
        }
        let _pending = match self.admit_many(proposed.len()) {
            Ok(permits) => permits,
            Err(busy) => return self.refuse_all(Method::Write, &proposed, &busy, started, answers),
        };
        self.counters.batch_writes_proposed_together.observe(proposed.len() as u64);
        let span = tracing::info_span!(
            "write_batch",
            writes = proposed.len(),
            first_request = %proposed[0].1,
            forwarded
        );
        let results = match self.node.core.write_many(commands).instrument(span).await {
            Ok(results) => results,
            Err(error) => return self.refuse_all(Method::Write, &proposed, &status_of(error), started, answers),
        };
        let mut moved = tokio::task::JoinSet::new();
        for ((id, request_id, write), result) in proposed.into_iter().zip(results) {
            match result {
                Ok(reply) => {
                    self.counters.record(Method::Write, tonic::Code::Ok, started.elapsed());
                    // The one-by-one path's span and line, for following a
                    // request across members; paid only when debug is on.
                    if tracing::enabled!(tracing::Level::DEBUG) {
                        let span = tracing::info_span!(
                            "write",
                            request = %request_id,
                            state_machine = %write.state_machine,
                            client = %hex(&write.client_id),
                            sequence = write.sequence,
                            forwarded
                        );
                        span.in_scope(|| tracing::debug!(index = reply.index, term = reply.term, "write applied"));
                    }
                    answers.push(BatchAnswer {
                        id,
                        answer: Some(batch_answer::Answer::Write(write_response(reply))),
                        leader_addr: String::new(),
                    });
                }
                // Leadership moved between the split and the proposal.
                Err(RequestError::NotLeader { leader: Some(_) }) if !forwarded => {
                    let item = BatchItem { id, request: Some(batch_item::Request::Write(write)), request_id };
                    moved.spawn(self.clone().answer_item(item, forwarded, None));
                }
                Err(error) => answers.push(self.refused(Method::Write, id, &status_of(error), started)),
            }
        }
        answers.extend(moved.join_all().await);
        answers
    }

    /// A batch item's error answer, counted in the request metrics.
    fn refused(&self, method: Method, id: u64, status: &Status, started: std::time::Instant) -> BatchAnswer {
        self.counters.record(method, status.code(), started.elapsed());
        error_answer(id, status)
    }

    /// The answer to one item of a batch stream: exactly what the unary
    /// call would have answered, as the item's outcome or error.
    async fn answer_item(
        self: Arc<Self>,
        item: BatchItem,
        forwarded: bool,
        write_refusal: Option<Status>,
    ) -> BatchAnswer {
        let started = std::time::Instant::now();
        let request_id = Some(item.request_id)
            .filter(|id| !id.is_empty() && id.len() <= REQUEST_ID_BYTES_MAX)
            .unwrap_or_else(new_request_id);
        let (method, result) = match item.request {
            Some(batch_item::Request::Write(write)) => {
                let result = match write_refusal {
                    Some(refusal) => Err(refusal),
                    None => self.traced_write(write, forwarded, request_id).await.map(|response| {
                        let leader = leader_of(&response);
                        (batch_answer::Answer::Write(response.into_inner()), leader)
                    }),
                };
                (Some(Method::Write), result)
            }
            Some(batch_item::Request::Read(read)) => {
                let result = self.traced_read(read, forwarded, request_id).await.map(|response| {
                    let leader = leader_of(&response);
                    (batch_answer::Answer::Read(response.into_inner()), leader)
                });
                (Some(Method::Read), result)
            }
            None => {
                (None, Err(Status::invalid_argument("a batch item holds a write or a read; this one holds neither")))
            }
        };
        if let Some(method) = method {
            let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
            self.counters.record(method, code, started.elapsed());
        }
        match result {
            Ok((answer, leader_addr)) => BatchAnswer { id: item.id, answer: Some(answer), leader_addr },
            Err(status) => error_answer(item.id, &status),
        }
    }

    /// A membership change, in the request's span.
    async fn change_membership_in(
        &self,
        request: ChangeMembershipRequest,
    ) -> Result<Response<MembersResponse>, Status> {
        let id = request.id;
        if id == 0 {
            return Err(Status::invalid_argument("member id 0 is not valid; ids start at 1"));
        }
        let mut addresses = self.node.members.current().addresses;
        let kind = match MembershipChange::try_from(request.change) {
            Ok(MembershipChange::AddLearner) => {
                check_address(&request.address)?;
                if self.node.members.is_removed(id) {
                    return Err(Status::failed_precondition(format!(
                        "member {id} was removed from this cluster, and a removed id never comes back (so its old \
                         certificate and data cannot speak for it again): add the member under a new id, with a \
                         certificate for that id (raft-host certs member --id N)"
                    )));
                }
                addresses.insert(id, request.address.clone());
                ConfChangeKind::AddLearner
            }
            Ok(MembershipChange::Promote) => {
                self.check_caught_up(id).await?;
                ConfChangeKind::Promote
            }
            Ok(MembershipChange::Remove) => {
                addresses.remove(&id);
                ConfChangeKind::Remove
            }
            _ => return Err(Status::invalid_argument("change must be ADD_LEARNER, PROMOTE or REMOVE")),
        };
        let change = ConfChange { kind, node: id, context: encode_addresses(&addresses) };
        let reply = self.node.core.change_membership(change).await.map_err(status_of)?;
        if let Err(why) = reply.outcome {
            return Err(Status::failed_precondition(why));
        }
        Ok(Response::new(MembersResponse { members: members_pb(&self.node.members.current()), index: reply.index }))
    }
}

/// Refuses `request` unless its caller's role is `needed` or above. A call
/// with no role on it came through an open gate (plaintext): anything goes.
fn require<T>(request: &Request<T>, needed: ClientRole, what: &str) -> Result<(), Status> {
    match request.extensions().get::<CallerRole>() {
        Some(CallerRole(role)) if *role < needed => Err(Status::permission_denied(format!(
            "{what} needs the {needed} role; this caller's certificate gives {role}"
        ))),
        _ => Ok(()),
    }
}

/// The client API of one member.
pub struct ClientService {
    /// The service itself, for the tasks of batch streams.
    me: std::sync::Weak<ClientService>,
    /// Turns when the member starts stopping: batch streams end then, so
    /// a graceful stop does not wait for clients to close them.
    stop: ShutdownSignal,
    /// Per leader id (and the address it had): the batcher that carries
    /// requests this member forwards to it.
    forwarders: std::sync::Mutex<std::collections::HashMap<u64, (String, Arc<Batcher>)>>,
    config: Arc<ServerConfig>,
    node: NodeHandles,
    counters: RequestCounters,
    peers: Arc<PeerCounters>,
    /// One permit per client request waiting for its answer; none left
    /// means busy.
    admission: Arc<Semaphore>,
    /// The permits there are in all.
    admission_max: usize,
    /// One permit per deploy being received or carried out: each may hold
    /// a module of up to the size limit in memory.
    deploys: Arc<Semaphore>,
}

/// Deploys a member takes at once.
const DEPLOYS_AT_ONCE_MAX: usize = 4;

/// A learner may be promoted once its log is this close to the leader's.
const PROMOTE_LAG_MAX: u64 = 1_000;

impl ClientService {
    /// The client API of the node behind `node`; `peers` counts the peer
    /// protocol's refusals, for the metrics.
    pub fn new(
        config: Arc<ServerConfig>,
        node: NodeHandles,
        peers: Arc<PeerCounters>,
        stop: ShutdownSignal,
    ) -> Arc<ClientService> {
        let admission_max = config.max_pending_requests.min(Semaphore::MAX_PERMITS);
        let admission = Arc::new(Semaphore::new(admission_max));
        let deploys = Arc::new(Semaphore::new(DEPLOYS_AT_ONCE_MAX));
        Arc::new_cyclic(|me| ClientService {
            me: me.clone(),
            stop,
            forwarders: std::sync::Mutex::default(),
            config,
            node,
            counters: RequestCounters::default(),
            peers,
            admission,
            admission_max,
            deploys,
        })
    }

    /// Client requests waiting for an answer now.
    fn pending(&self) -> usize {
        self.admission_max - self.admission.available_permits()
    }

    /// A permit for one more waiting request, held until it is answered.
    fn admit(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.admission.clone().try_acquire_owned().map_err(|_| self.busy())
    }

    /// A name is checked against the active versions only where they are
    /// certain to be current for this request: on the leader, for writes
    /// (a follower may not have applied an activation yet, and forwards).
    /// Reads of an unknown name are refused by the apply task.
    fn check_state_machine(&self, name: &str, write: bool) -> Result<(), Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "state_machine is empty; name the state machine (for example \"kv\")",
            ));
        }
        let leads = self.node.core.current_leadership().role == Role::Leader;
        if write && leads && !self.node.modules.is_known(name) {
            return Err(status_of(RequestError::UnknownStateMachine(name.to_string())));
        }
        Ok(())
    }

    /// Refuses new entries while this member leads on a nearly full disk
    /// (a follower forwards to its leader, whose disk decides).
    fn check_disk(&self) -> Result<(), Status> {
        let leads = self.node.core.current_leadership().role == Role::Leader;
        if leads && self.node.disk.is_low() {
            return Err(status_of(RequestError::DiskFull(self.node.disk.refusal())));
        }
        Ok(())
    }

    fn check_size(&self, what: &str, len: usize) -> Result<(), Status> {
        let limit = self.config.node.max_command_bytes;
        if len > limit {
            return Err(Status::invalid_argument(format!("{what} of {len} bytes is above the limit of {limit} bytes")));
        }
        Ok(())
    }

    /// The leader to forward to (its unary client and the batcher that
    /// carries forwarded items to it), and its address for the client to
    /// use next time.
    fn forward_target(
        &self,
        error: &RequestError,
        forwarded: bool,
    ) -> Option<(ClientClient<Channel>, Arc<Batcher>, String)> {
        match error {
            RequestError::NotLeader { leader: Some((id, address)) } if !forwarded => {
                let channel = self.node.members.channel(*id).ok()?;
                let limit = self.config.client_message_bytes_max();
                let client =
                    ClientClient::new(channel).max_decoding_message_size(limit).max_encoding_message_size(limit);
                let mut forwarders = self.forwarders.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let batcher = match forwarders.get(id) {
                    Some((known, batcher)) if known == address => batcher.clone(),
                    _ => {
                        let batcher = Arc::new(Batcher::forwarding(client.clone()));
                        forwarders.insert(*id, (address.clone(), batcher.clone()));
                        batcher
                    }
                };
                Some((client, batcher, address.clone()))
            }
            _ => None,
        }
    }
}

impl ClientService {
    /// A request forwarded to the leader, waited for no longer than any
    /// request waits here (a paused leader must not hold it for ever).
    async fn forwarding<T>(
        &self,
        call: impl std::future::Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Response<T>, Status> {
        let limit = self.config.node.request_timeout;
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!("the leader did not answer the forwarded request within {limit:?}")))
        })
    }
}

fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_KEY)
}

/// The leader a forwarded answer names, if it was forwarded.
fn leader_of<T>(response: &Response<T>) -> String {
    response.metadata().get(LEADER_ADDR_KEY).and_then(|value| value.to_str().ok()).unwrap_or_default().to_string()
}

/// Tells the client, on a forwarded answer, where the leader is, so its
/// next request skips the extra hop.
fn with_leader<T>(mut response: Response<T>, address: &str) -> Response<T> {
    if let Ok(value) = address.parse() {
        response.metadata_mut().insert(LEADER_ADDR_KEY, value);
    }
    response
}

/// `message` as a request forwarded to the leader, under the same request id.
fn forwarded<T>(message: T, id: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED_KEY, MetadataValue::from_static("1"));
    if let Ok(value) = id.parse() {
        request.metadata_mut().insert(REQUEST_ID_KEY, value);
    }
    request
}

/// The id a request is logged under on every member it crosses: the one its
/// client or the member that forwarded it gave, or a new one.
fn request_id<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get(REQUEST_ID_KEY)
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= REQUEST_ID_BYTES_MAX)
        .map(str::to_string)
        .unwrap_or_else(new_request_id)
}

/// Longest request id taken from a client; a longer one is replaced.
const REQUEST_ID_BYTES_MAX: usize = 64;

/// A request id no other request of this process has.
fn new_request_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{:08x}-{n}", process::instance_id() as u32)
}

/// Whether a status answer carries the process's CPU (by kind of thread)
/// and memory, read from `/proc`, one file per thread: `Status` and the
/// metrics do; the health checks, which poll every member twice a second
/// and look at none of them, do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessFigures {
    Read,
    Skipped,
}

/// The gRPC status for a request error; retryable ones are UNAVAILABLE or
/// RESOURCE_EXHAUSTED (unless marked not to be retried), and "not the
/// leader" names the leader in metadata.
pub(super) fn status_of(error: RequestError) -> Status {
    let message = error.to_string();
    match error {
        RequestError::NotLeader { leader } => {
            let mut status = Status::unavailable(message);
            if let Some((id, address)) = leader {
                let metadata = status.metadata_mut();
                if let Ok(value) = id.to_string().parse() {
                    metadata.insert(LEADER_ID_KEY, value);
                }
                if let Ok(value) = address.parse() {
                    metadata.insert(LEADER_ADDR_KEY, value);
                }
            }
            status
        }
        RequestError::NoLeader | RequestError::LeadershipChanged | RequestError::ShuttingDown => {
            Status::unavailable(message)
        }
        // A leader's full disk is this member's condition, not the
        // cluster's: it hands leadership to a member with room (see
        // `hand_over_while_disk_low`), so clients retry as they would
        // through an election, and one that runs out of time reports this
        // refusal as its last error. Failing each write at once failed
        // every write of the seconds before the handover.
        RequestError::Busy(_) | RequestError::DiskFull(_) => Status::resource_exhausted(message),
        RequestError::Invalid(_) | RequestError::UnknownStateMachine(_) => Status::invalid_argument(message),
        RequestError::SessionExpired { .. } | RequestError::Rejected(_) => Status::failed_precondition(message),
        RequestError::OutcomeUnknown(_) => Status::aborted(message),
        RequestError::Timeout(_) => Status::deadline_exceeded(message),
        RequestError::QuotaExceeded(_) => {
            let mut status = Status::resource_exhausted(message);
            status.metadata_mut().insert(NO_RETRY_KEY, MetadataValue::from_static("1"));
            status
        }
        RequestError::Internal(_) => Status::internal(message),
    }
}

/// What a client is sent for an applied write.
fn write_response(reply: WriteReply) -> WriteResponse {
    WriteResponse { outcome: Some(outcome_pb(reply.outcome)), index: reply.index, term: reply.term }
}

/// What a client is sent for an answered read.
fn read_response(reply: ReadReply) -> ReadResponse {
    ReadResponse { outcome: Some(outcome_pb(reply.outcome)), index: reply.index }
}

/// A batch item's error answer.
fn error_answer(id: u64, status: &Status) -> BatchAnswer {
    BatchAnswer { id, answer: Some(batch_answer::Answer::Error(batch_error_of(status))), leader_addr: String::new() }
}

fn outcome_pb(outcome: Result<Vec<u8>, String>) -> client_pb::Outcome {
    client_pb::Outcome {
        result: Some(match outcome {
            Ok(bytes) => outcome::Result::Ok(bytes),
            Err(message) => outcome::Result::Error(message),
        }),
    }
}

fn event_of(view: &LeadershipView, members: &Members) -> LeadershipEvent {
    LeadershipEvent {
        role: view.role.as_str().to_string(),
        term: view.term,
        leader_id: view.leader.unwrap_or(0),
        leader_address: view.leader.and_then(|id| members.address_of(id)).unwrap_or_default(),
    }
}

fn members_pb(membership: &Membership) -> Vec<Member> {
    membership
        .list()
        .into_iter()
        .map(|(id, role, address)| Member { id, address, kind: role.as_str().to_string() })
        .collect()
}

type WatchEvents = Pin<Box<dyn Stream<Item = Result<LeadershipEvent, Status>> + Send>>;
type ChangeStream = Pin<Box<dyn Stream<Item = Result<WatchChangesResponse, Status>> + Send>>;
type DeployEvents = Pin<Box<dyn Stream<Item = Result<DeployProgress, Status>> + Send>>;
type BackupChunks = Pin<Box<dyn Stream<Item = Result<BackupChunk, Status>> + Send>>;
type BatchAnswers = Pin<Box<dyn Stream<Item = Result<BatchResponse, Status>> + Send>>;

/// Items of one batch stream worked on at once; past it the stream is not
/// read until some are answered, so a client's sends wait (its HTTP/2
/// window fills) instead of the member's memory growing.
const BATCH_ITEMS_IN_FLIGHT_MAX: usize = 16_384;

/// Answers in one response message at most.
const BATCH_ANSWERS_PER_MESSAGE_MAX: usize = 4_096;

/// Response messages queued for a batch stream's client.
const BATCH_RESPONSE_QUEUE: usize = 16;

/// Bytes of records per backup message.
const BACKUP_CHUNK_BYTES: usize = 1 << 20;

/// Backup messages queued for a slow client: the memory a backup holds.
const BACKUP_QUEUE: usize = 4;

/// Progress messages queued for a deploy's client; past it, progress is
/// dropped (the final message never is).
const DEPLOY_PROGRESS_QUEUE: usize = 256;

fn progress_of(step: DeployStep) -> DeployProgress {
    match step {
        DeployStep::Validated { hash } => {
            DeployProgress { phase: "validated".into(), module_hash: hex(&hash), ..DeployProgress::default() }
        }
        DeployStep::Replicating { done, total } => {
            DeployProgress { phase: "replicating".into(), done, total, ..DeployProgress::default() }
        }
        DeployStep::Compiling { ready, members } => DeployProgress {
            phase: "compiling".into(),
            done: ready as u64,
            total: members as u64,
            ..DeployProgress::default()
        },
    }
}

fn unreachable_detail(unreachable: &[NodeId]) -> String {
    if unreachable.is_empty() {
        return String::new();
    }
    let ids: Vec<String> = unreachable.iter().map(ToString::to_string).collect();
    format!("members {} did not answer; they compile it when they catch up", ids.join(", "))
}

impl ClientService {
    /// Reads a deploy's bytes from the stream: the first message names the
    /// state machine and the size, which is checked before any byte is kept.
    async fn receive_module(&self, stream: &mut Streaming<DeployRequest>) -> Result<(String, Vec<u8>, bool), Status> {
        let idle = self.config.node.stream_idle_timeout;
        let mut next = async || match tokio::time::timeout(idle, stream.message()).await {
            Ok(message) => message,
            Err(_) => Err(Status::deadline_exceeded(format!("the deploy stream sent nothing for {idle:?}"))),
        };
        let first =
            next().await?.ok_or_else(|| Status::invalid_argument("the deploy stream is empty; send the module"))?;
        check_name(&first.state_machine).map_err(Status::invalid_argument)?;
        let limit = self.node.modules.runtime().limits().module_bytes as u64;
        if first.total_bytes > limit {
            return Err(Status::invalid_argument(format!(
                "module refused: module of {} bytes is above the limit of {limit} bytes",
                first.total_bytes
            )));
        }
        if first.total_bytes == 0 {
            return Err(Status::invalid_argument("total_bytes is 0; a module is not empty"));
        }
        let total = first.total_bytes as usize;
        // Memory follows what arrives, never what is announced.
        let mut bytes = Vec::new();
        let mut data = first.data;
        loop {
            if bytes.len() + data.len() > total {
                return Err(Status::invalid_argument(format!(
                    "the stream carries more than the {total} bytes announced"
                )));
            }
            bytes.extend_from_slice(&data);
            if bytes.len() == total {
                break;
            }
            data = match next().await? {
                Some(next) => next.data,
                None => {
                    return Err(Status::invalid_argument(format!(
                        "the stream ended after {} of the {total} bytes announced",
                        bytes.len()
                    )));
                }
            };
        }
        Ok((first.state_machine, bytes, !first.no_activate))
    }
}

/// A batch message's items, split by how the leader serves them.
#[derive(Default)]
struct Together {
    writes: Vec<(u64, String, WriteRequest)>,
    reads: Vec<(u64, String, ReadRequest)>,
    others: Vec<BatchItem>,
}

impl ClientService {
    async fn handle_write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        require(&request, ClientRole::Writer, "a write")?;
        let (was_forwarded, id) = (is_forwarded(&request), request_id(&request));
        self.traced_write(request.into_inner(), was_forwarded, id).await
    }

    /// A write in its span (the fields that follow it across members).
    async fn traced_write(
        &self,
        write: WriteRequest,
        was_forwarded: bool,
        id: String,
    ) -> Result<Response<WriteResponse>, Status> {
        let span = tracing::info_span!(
            "write",
            request = %id,
            state_machine = %write.state_machine,
            client = %hex(&write.client_id),
            sequence = write.sequence,
            forwarded = was_forwarded
        );
        self.write_in_span(write, was_forwarded, id).instrument(span).await
    }

    async fn write_in_span(
        &self,
        write: WriteRequest,
        was_forwarded: bool,
        id: String,
    ) -> Result<Response<WriteResponse>, Status> {
        let command = self.command_of(&write)?;
        let _pending = self.admit()?;
        match self.node.core.write(command).await {
            Ok(reply) => {
                tracing::debug!(index = reply.index, term = reply.term, "write applied");
                Ok(Response::new(write_response(reply)))
            }
            Err(error) => match self.forward_target(&error, was_forwarded) {
                Some((mut leader, batcher, address)) => {
                    tracing::debug!(leader = %address, "forwarding the write to the leader");
                    let answer = if write.command.len() < BYTES_PER_MESSAGE_MAX {
                        self.forwarding(batcher.write_as(write, id)).await?
                    } else {
                        self.forwarding(leader.write(forwarded(write, &id))).await?
                    };
                    Ok(with_leader(answer, &address))
                }
                None => Err(status_of(error)),
            },
        }
    }

    /// The log entry a client write becomes, once it passes the checks a
    /// write gets before it is proposed.
    fn command_of(&self, write: &WriteRequest) -> Result<pb::Command, Status> {
        self.check_state_machine(&write.state_machine, true)?;
        self.check_size("command", write.command.len())?;
        if write.client_id.len() > CLIENT_ID_MAX_BYTES {
            return Err(Status::invalid_argument(format!(
                "client_id of {} bytes is above the limit of {CLIENT_ID_MAX_BYTES} bytes",
                write.client_id.len()
            )));
        }
        if !write.client_id.is_empty() && write.sequence == 0 {
            return Err(Status::invalid_argument("a write with a client_id needs a sequence number from 1 on"));
        }
        self.check_disk()?;
        Ok(pb::Command {
            state_machine: write.state_machine.clone(),
            command: write.command.clone(),
            client_id: write.client_id.clone(),
            sequence: write.sequence,
            lowest_unanswered: write.lowest_unanswered,
        })
    }

    async fn handle_read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        require(&request, ClientRole::Reader, "a read")?;
        if Self::is_forwarded_barrier(&request) {
            return self.forwarded_barrier().await.map(Response::new);
        }
        let (was_forwarded, id) = (is_forwarded(&request), request_id(&request));
        self.traced_read(request.into_inner(), was_forwarded, id).await
    }

    /// A read in its span.
    async fn traced_read(
        &self,
        read: ReadRequest,
        was_forwarded: bool,
        id: String,
    ) -> Result<Response<ReadResponse>, Status> {
        let span = tracing::info_span!(
            "read",
            request = %id,
            state_machine = %read.state_machine,
            consistency = read.consistency,
            forwarded = was_forwarded
        );
        self.read_in_span(read, was_forwarded, id).instrument(span).await
    }

    async fn read_in_span(
        &self,
        read: ReadRequest,
        was_forwarded: bool,
        id: String,
    ) -> Result<Response<ReadResponse>, Status> {
        self.check_state_machine(&read.state_machine, false)?;
        self.check_size("query", read.query.len())?;
        let consistency = match client_pb::Consistency::try_from(read.consistency) {
            Ok(client_pb::Consistency::Linearizable) => Consistency::Linearizable,
            Ok(client_pb::Consistency::Lease) => Consistency::Lease,
            Ok(client_pb::Consistency::Stale) => Consistency::Stale,
            Err(_) => return Err(Status::invalid_argument(format!("unknown consistency {}", read.consistency))),
        };
        let _pending = self.admit()?;
        let result = match consistency {
            Consistency::Stale => self.node.applied.stale_read(read.state_machine.clone(), read.query.clone()).await,
            _ => self.node.core.read(read.state_machine.clone(), read.query.clone(), consistency).await,
        };
        match result {
            Ok(reply) => Ok(Response::new(read_response(reply))),
            Err(error) => match self.forward_target(&error, was_forwarded) {
                Some((mut leader, batcher, address)) => {
                    let answer = if read.query.len() < BYTES_PER_MESSAGE_MAX {
                        self.forwarding(batcher.read_as(read, id)).await?
                    } else {
                        self.forwarding(leader.read(forwarded(read, &id))).await?
                    };
                    Ok(with_leader(answer, &address))
                }
                None => Err(status_of(error)),
            },
        }
    }

    /// This member's status, as `Status` and the metrics report it; the
    /// state digests (which read all the state) and the process's figures
    /// only when asked for.
    pub async fn status_now(&self, digests: Digests, figures: ProcessFigures) -> Result<StatusResponse, Status> {
        let core = self.node.core.status().await.map_err(status_of)?;
        let applied = self.node.applied.status(digests).await.map_err(status_of)?;
        let members = members_pb(&self.node.members.current());
        let state_machines = applied
            .state_machines
            .into_iter()
            .map(|m| StateMachineStatus { name: m.name, module_hash: m.module_hash, state_digest: m.state_digest })
            .collect();
        let (modules_compiled, modules_loaded_from_cache) = self.node.modules.runtime().load_counts();
        let (thread_cpu, usage) = match figures {
            // Threads first, so the process's figure read after covers at
            // least the time theirs do.
            ProcessFigures::Read => (process::thread_cpu().unwrap_or_default(), process::usage().unwrap_or_default()),
            ProcessFigures::Skipped => Default::default(),
        };
        Ok(StatusResponse {
            cluster_id: self.config.node.cluster_id.clone(),
            id: self.config.node.id,
            role: core.role.as_str().to_string(),
            term: core.term,
            leader_id: core.leader.unwrap_or(0),
            leader_address: core.leader.and_then(|id| self.node.members.address_of(id)).unwrap_or_default(),
            commit_index: core.commit_index,
            applied_index: applied.applied_index,
            last_log_index: core.last_log_index,
            members,
            state_machines,
            modules_compiled,
            modules_loaded_from_cache,
            offline: core.offline,
            snapshot_index: core.snapshot_index,
            process_cpu_seconds: usage.cpu_seconds,
            process_resident_bytes: usage.resident_bytes,
            process_instance: process::instance_id(),
            thread_cpu: thread_cpu
                .into_iter()
                .map(|(kind, cpu_seconds)| ThreadCpu { kind: kind.to_string(), cpu_seconds })
                .collect(),
            modules_in_memory: self.node.modules.runtime().loaded_count() as u64,
            snapshot_staged_bytes: self.node.store.staged_bytes(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            disk_free_bytes: self.node.disk.free_bytes(),
            disk_low: self.node.disk.is_low(),
            uploads_in_progress: self
                .node
                .modules
                .uploads_in_progress()
                .map_err(|e| Status::internal(e.to_string()))?
                .len() as u64,
        })
    }
}

impl MetricsSource for ClientService {
    async fn probe(&self, probe: Probe) -> Result<String, String> {
        let status = self
            .status_now(Digests::Skipped, ProcessFigures::Skipped)
            .await
            .map_err(|status| status.message().to_string())?;
        match probe {
            Probe::Alive => Ok(format!("alive: member {} in term {}", status.id, status.term)),
            Probe::Ready => super::health::ready(&status).map(|()| {
                format!(
                    "ready: member {} ({}), leader {}, applied {}",
                    status.id, status.role, status.leader_id, status.applied_index
                )
            }),
        }
    }

    async fn render(&self) -> Result<String, String> {
        let status = self
            .status_now(Digests::Skipped, ProcessFigures::Read)
            .await
            .map_err(|status| status.message().to_string())?;
        Ok(super::metrics::render(
            &status,
            &self.counters,
            &self.node.snapshots,
            &self.peers,
            &self.node.histograms,
            self.pending() as u64,
        ))
    }
}

#[tonic::async_trait]
impl Client for ClientService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.handle_write(request).await;
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.counters.record(Method::Write, code, started.elapsed());
        result
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let started = std::time::Instant::now();
        let result = self.handle_read(request).await;
        let code = result.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.counters.record(Method::Read, code, started.elapsed());
        result
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        require(&request, ClientRole::Reader, "status")?;
        self.status_now(Digests::Taken, ProcessFigures::Read).await.map(Response::new)
    }
    type DeployStream = DeployEvents;

    async fn deploy(&self, request: Request<Streaming<DeployRequest>>) -> Result<Response<Self::DeployStream>, Status> {
        require(&request, ClientRole::Admin, "a deploy")?;
        self.node.deployer.check_leader().map_err(status_of)?;
        self.check_disk()?;
        let permit = self.deploys.clone().try_acquire_owned().map_err(|_| {
            status_of(RequestError::Busy(format!("{DEPLOYS_AT_ONCE_MAX} deploys are under way on this member")))
        })?;
        let id = request_id(&request);
        let mut stream = request.into_inner();
        let (name, bytes, activate) = self.receive_module(&mut stream).await?;
        let span = tracing::info_span!("deploy", request = %id, state_machine = %name, bytes = bytes.len(), activate);
        let (tx, rx) = mpsc::channel(DEPLOY_PROGRESS_QUEUE);
        let received = DeployProgress {
            phase: "received".into(),
            done: bytes.len() as u64,
            total: bytes.len() as u64,
            ..DeployProgress::default()
        };
        let _ = tx.try_send(Ok(received));
        let deployer = self.node.deployer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let progress = |step| {
                let _ = tx.try_send(Ok(progress_of(step)));
            };
            let last = match deployer.deploy(&name, bytes, activate, progress).await {
                Ok((hash, Some(activated))) => Ok(DeployProgress {
                    phase: "activated".into(),
                    module_hash: hex(&hash),
                    index: activated.index,
                    detail: unreachable_detail(&activated.unreachable),
                    ..DeployProgress::default()
                }),
                Ok((hash, None)) => {
                    Ok(DeployProgress { phase: "staged".into(), module_hash: hex(&hash), ..DeployProgress::default() })
                }
                Err(error) => Err(status_of(error)),
            };
            match &last {
                Ok(done) => tracing::info!(phase = %done.phase, module = %done.module_hash, index = done.index, "deploy done"),
                Err(status) => tracing::warn!(error = %status.message(), "deploy failed"),
            }
            let _ = tx.send(last).await;
        }.instrument(span));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn activate(&self, request: Request<ActivateRequest>) -> Result<Response<ActivateResponse>, Status> {
        require(&request, ClientRole::Admin, "an activation")?;
        let request = request.into_inner();
        check_name(&request.state_machine).map_err(Status::invalid_argument)?;
        let hash = parse_hash(&request.module_hash).map_err(Status::invalid_argument)?;
        let activated = self.node.deployer.activate(&request.state_machine, hash).await.map_err(status_of)?;
        Ok(Response::new(ActivateResponse {
            index: activated.index,
            previous_hash: activated.previous.map(|h| hex(&h)).unwrap_or_default(),
            unreachable: activated.unreachable,
        }))
    }

    async fn remove_module(
        &self,
        request: Request<RemoveModuleRequest>,
    ) -> Result<Response<RemoveModuleResponse>, Status> {
        require(&request, ClientRole::Admin, "removing a module version")?;
        let request = request.into_inner();
        check_name(&request.state_machine).map_err(Status::invalid_argument)?;
        let hash = parse_hash(&request.module_hash).map_err(Status::invalid_argument)?;
        let index = self.node.deployer.remove(&request.state_machine, hash).await.map_err(status_of)?;
        Ok(Response::new(RemoveModuleResponse { index }))
    }

    async fn modules(&self, request: Request<ModulesRequest>) -> Result<Response<ModulesResponse>, Status> {
        require(&request, ClientRole::Reader, "listing modules")?;
        let versions = self.node.modules.versions().map_err(|e| Status::internal(e.to_string()))?;
        let versions = versions
            .into_iter()
            .map(|v| ModuleVersionInfo {
                state_machine: v.name,
                module_hash: hex(&v.hash),
                size_bytes: v.size_bytes,
                deploy_index: v.deploy_index,
                activated_index: v.activated_index,
                active: v.active,
                built_in: v.built_in,
            })
            .collect();
        Ok(Response::new(ModulesResponse { versions }))
    }

    type BackupStream = BackupChunks;

    async fn backup(&self, request: Request<BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        require(&request, ClientRole::Admin, "a backup")?;
        let span = tracing::info_span!("backup", request = %request_id(&request));
        let reader = async {
            // Everything acknowledged before this call is applied here
            // before the view is taken.
            let index = self.node.core.barrier().await.map_err(status_of)?;
            let store = self.node.store.clone();
            let reader = tokio::task::spawn_blocking(move || {
                let reader = store.snapshot_reader()?;
                let total = reader.total_bytes()?;
                Ok::<_, crate::storage::StoreError>((reader, total))
            })
            .await
            .map_err(|_| Status::internal("the backup's reader thread was lost"))?
            .map_err(|e| Status::internal(format!("reading the store for a backup: {e}")))?;
            tracing::info!(barrier = index, index = reader.0.meta().index, bytes = reader.1, "backup started");
            Ok::<_, Status>(reader)
        }
        .instrument(span.clone())
        .await?;
        let (reader, total_bytes) = reader;
        let header = backup_header(&reader, &self.config.node.cluster_id, self.config.node.id, total_bytes);
        let (tx, rx) = mpsc::channel(BACKUP_QUEUE);
        let idle = self.config.node.stream_idle_timeout;
        let runtime = tokio::runtime::Handle::current();
        // A client that stops reading holds the view (and the disk space of
        // what it still sees) only until the idle timeout.
        let send = move |chunk: Result<BackupChunk, Status>| {
            runtime.block_on(async { matches!(tokio::time::timeout(idle, tx.send(chunk)).await, Ok(Ok(()))) })
        };
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            if !send(Ok(BackupChunk { part: Some(backup_chunk::Part::Header(header)) })) {
                return;
            }
            let mut sent = true;
            let streamed = reader.for_each_chunk(BACKUP_CHUNK_BYTES, |records| {
                sent = send(Ok(BackupChunk { part: Some(backup_chunk::Part::Records(records)) }));
                sent
            });
            match streamed {
                Err(error) => {
                    tracing::warn!(%error, "backup failed");
                    send(Err(Status::internal(format!("reading the store for a backup: {error}"))));
                }
                Ok(()) if !sent => tracing::warn!(idle = ?idle, "backup abandoned: the client stopped reading"),
                Ok(()) => tracing::info!(bytes = total_bytes, "backup streamed"),
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type BatchStream = BatchAnswers;

    async fn batch(&self, request: Request<Streaming<BatchRequest>>) -> Result<Response<Self::BatchStream>, Status> {
        require(&request, ClientRole::Reader, "a batch")?;
        // Checked once for the stream: the role is the connection's.
        let write_refusal = require(&request, ClientRole::Writer, "a write").err();
        // A follower's stream of forwarded items: they are not forwarded again.
        let forwarded = is_forwarded(&request);
        let service = self.me.upgrade().ok_or_else(|| status_of(RequestError::ShuttingDown))?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(BATCH_RESPONSE_QUEUE);
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut working = tokio::task::JoinSet::new();
            let mut reading = true;
            loop {
                tokio::select! {
                    // Stopping: take nothing more, answer what is under way,
                    // then end the stream (the client opens one elsewhere).
                    _ = stop.wait(), if reading => reading = false,
                    message = inbound.message(), if reading && working.len() < BATCH_ITEMS_IN_FLIGHT_MAX => {
                        match message {
                            Ok(Some(batch)) => {
                                service.counters.batch_items.observe(batch.items.len() as u64);
                                let Together { writes, reads, others } = service.together(batch.items, &write_refusal);
                                if !writes.is_empty() {
                                    working.spawn(service.clone().answer_writes_together(writes, forwarded));
                                }
                                if !reads.is_empty() {
                                    working.spawn(service.clone().answer_reads_together(reads, forwarded));
                                }
                                for item in others {
                                    let (service, refusal) = (service.clone(), write_refusal.clone());
                                    working.spawn(async move { vec![service.answer_item(item, forwarded, refusal).await] });
                                }
                            }
                            // The client is done sending (or gone): answer what is under way.
                            Ok(None) | Err(_) => reading = false,
                        }
                    }
                    Some(done) = working.join_next(), if !working.is_empty() => {
                        let mut answers = Vec::with_capacity(64);
                        answers.extend(done.into_iter().flatten());
                        while answers.len() < BATCH_ANSWERS_PER_MESSAGE_MAX {
                            match working.try_join_next() {
                                Some(done) => answers.extend(done.into_iter().flatten()),
                                None => break,
                            }
                        }
                        if tx.send(Ok(BatchResponse { answers })).await.is_err() {
                            // Nobody reads the answers: the items under way
                            // finish (a write's outcome is kept in its session).
                            working.detach_all();
                            return;
                        }
                    }
                    else => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchChangesStream = ChangeStream;

    async fn watch_changes(
        &self,
        request: Request<WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        require(&request, ClientRole::Reader, "watching changes")?;
        let messages = self.start_watch(request).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(messages))))
    }

    type WatchStream = WatchEvents;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        require(&request, ClientRole::Reader, "watching leadership")?;
        let members = self.node.members.clone();
        let events = WatchStream::new(self.node.core.leadership()).map(move |view| Ok(event_of(&view, &members)));
        Ok(Response::new(Box::pin(events)))
    }

    async fn members(&self, request: Request<MembersRequest>) -> Result<Response<MembersResponse>, Status> {
        require(&request, ClientRole::Reader, "listing members")?;
        Ok(Response::new(MembersResponse { members: members_pb(&self.node.members.current()), index: 0 }))
    }

    async fn change_membership(
        &self,
        request: Request<ChangeMembershipRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        require(&request, ClientRole::Admin, "a membership change")?;
        self.node.deployer.check_leader().map_err(status_of)?;
        let request_id = request_id(&request);
        let request = request.into_inner();
        let span =
            tracing::info_span!("membership", request = %request_id, change = request.change, member = request.id);
        self.change_membership_in(request).instrument(span).await
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        require(&request, ClientRole::Admin, "a leader transfer")?;
        let to = request.into_inner().to;
        let done = |view: &LeadershipView| view.leader == Some(to) && view.term > 0;
        let view = self.node.core.current_leadership();
        if done(&view) {
            return Ok(Response::new(TransferLeaderResponse { leader_id: to, term: view.term }));
        }
        self.node.deployer.check_leader().map_err(status_of)?;
        match self.node.core.transfer_leader(to, done).await {
            Ok(view) => Ok(Response::new(TransferLeaderResponse { leader_id: to, term: view.term })),
            Err(RequestError::Timeout(limit)) => Err(Status::deadline_exceeded(format!(
                "member {to} did not take over within {limit:?}; is it up and caught up?"
            ))),
            Err(error) => Err(status_of(error)),
        }
    }

    async fn set_offline(&self, request: Request<SetOfflineRequest>) -> Result<Response<SetOfflineResponse>, Status> {
        require(&request, ClientRole::Admin, "taking a member offline or online")?;
        let offline = request.into_inner().offline;
        self.node.core.set_offline(offline).await.map_err(status_of)?;
        Ok(Response::new(SetOfflineResponse { offline }))
    }
}

impl ClientService {
    /// A learner is promoted only once the leader's log reaches it.
    async fn check_caught_up(&self, id: NodeId) -> Result<(), Status> {
        let core = self.node.core.status().await.map_err(status_of)?;
        if !core.conf.learners.contains(&id) {
            return Ok(()); // the core refuses it with the precise reason
        }
        let matched = core.matched.get(&id).copied().unwrap_or(0);
        if matched + PROMOTE_LAG_MAX < core.last_log_index {
            return Err(Status::failed_precondition(format!(
                "learner {id} is behind: it holds the log up to {matched} of {}; promote it once it catches up",
                core.last_log_index
            )));
        }
        Ok(())
    }
}

/// A member address must be host:port.
fn check_address(address: &str) -> Result<(), Status> {
    let valid = address.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !valid || address.contains("://") {
        return Err(Status::invalid_argument(format!(
            "member address {address:?} must be host:port, for example 127.0.0.1:7004"
        )));
    }
    Ok(())
}
