//! The server side of the public client API (`proto/client.proto`).
//!
//! Requests are checked here before they reach the core (sizes, names,
//! session fields). A write or lease read that reaches a follower is
//! forwarded once to the leader it knows; a request that was forwarded is
//! never forwarded again, so a stale view of leadership cannot loop.

use super::client_pb::client_server::Client;
use super::client_pb::{
    self, LeadershipEvent, Member, ReadRequest, ReadResponse, StateMachineStatus, StatusRequest, StatusResponse,
    WatchRequest, WriteRequest, WriteResponse, client_client::ClientClient, outcome,
};
use super::pb;
use crate::node::apply::{ApplyMsg, ReadJob};
use crate::node::{Consistency, CoreHandle, LeadershipView, NodeConfig, ReadReply, RequestError, await_answer};
use crate::raft::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio_stream::{Stream, StreamExt, wrappers::WatchStream};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Metadata key naming the leader's id on a "not the leader" error.
pub const LEADER_ID_KEY: &str = "raft-leader-id";
/// Metadata key naming the leader's address on a "not the leader" error.
pub const LEADER_ADDR_KEY: &str = "raft-leader-addr";
/// Set on a request a member forwarded to the leader.
const FORWARDED_KEY: &str = "raft-forwarded";
/// Longest client id accepted.
pub const CLIENT_ID_MAX_BYTES: usize = 128;

/// The client API of one member.
pub struct ClientService {
    config: Arc<NodeConfig>,
    core: CoreHandle,
    apply: Mutex<std::sync::mpsc::Sender<ApplyMsg>>,
    state_machines: BTreeSet<String>,
    leaders: BTreeMap<NodeId, ClientClient<Channel>>,
    pending: Arc<AtomicUsize>,
}

/// Counts a request as pending for as long as it lives.
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ClientService {
    pub fn new(
        config: Arc<NodeConfig>,
        core: CoreHandle,
        apply: std::sync::mpsc::Sender<ApplyMsg>,
        state_machines: BTreeSet<String>,
    ) -> Result<ClientService, String> {
        let mut leaders = BTreeMap::new();
        for (&id, address) in &config.peers {
            let client = ClientClient::new(crate::node::peer_channel(address)?)
                .max_decoding_message_size(config.max_command_bytes + (64 << 10))
                .max_encoding_message_size(config.max_command_bytes + (64 << 10));
            leaders.insert(id, client);
        }
        Ok(ClientService {
            config,
            core,
            apply: Mutex::new(apply),
            state_machines,
            leaders,
            pending: Arc::new(AtomicUsize::new(0)),
        })
    }

    fn admit(&self) -> Result<Pending, Status> {
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        let guard = Pending(self.pending.clone());
        if before >= self.config.max_pending_requests {
            return Err(status_of(RequestError::Busy(format!(
                "{before} requests are waiting on this member (limit {})",
                self.config.max_pending_requests
            ))));
        }
        Ok(guard)
    }

    fn check_state_machine(&self, name: &str) -> Result<(), Status> {
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "state_machine is empty; name the state machine (for example \"kv\")",
            ));
        }
        if !self.state_machines.contains(name) {
            return Err(status_of(RequestError::UnknownStateMachine(name.to_string())));
        }
        Ok(())
    }

    fn check_size(&self, what: &str, len: usize) -> Result<(), Status> {
        if len > self.config.max_command_bytes {
            return Err(Status::invalid_argument(format!(
                "{what} of {len} bytes is above the limit of {} bytes",
                self.config.max_command_bytes
            )));
        }
        Ok(())
    }

    /// The leader to forward to, and its address for the client to use next time.
    fn forward_target(&self, error: &RequestError, forwarded: bool) -> Option<(ClientClient<Channel>, String)> {
        match error {
            RequestError::NotLeader { leader: Some((id, address)) } if !forwarded => {
                self.leaders.get(id).cloned().map(|client| (client, address.clone()))
            }
            _ => None,
        }
    }

    fn stale_read(&self, state_machine: String, query: Vec<u8>) -> oneshot::Receiver<Result<ReadReply, RequestError>> {
        let (reply, answer) = oneshot::channel();
        let job = ReadJob { index: 0, state_machine, query, reply };
        // A closed channel drops the job, whose dropped sender reads as a
        // shutdown to the waiter.
        let _ = self.apply.lock().unwrap_or_else(|p| p.into_inner()).send(ApplyMsg::Read(job));
        answer
    }
}

fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_KEY)
}

/// Tells the client, on a forwarded answer, where the leader is, so its
/// next request skips the extra hop.
fn with_leader<T>(mut response: Response<T>, address: &str) -> Response<T> {
    if let Ok(value) = address.parse() {
        response.metadata_mut().insert(LEADER_ADDR_KEY, value);
    }
    response
}

fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(FORWARDED_KEY, MetadataValue::from_static("1"));
    request
}

/// The gRPC status for a request error; retryable ones are UNAVAILABLE or
/// RESOURCE_EXHAUSTED, and "not the leader" names the leader in metadata.
pub fn status_of(error: RequestError) -> Status {
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
        RequestError::Busy(_) => Status::resource_exhausted(message),
        RequestError::Invalid(_) | RequestError::UnknownStateMachine(_) => Status::invalid_argument(message),
        RequestError::SessionExpired { .. } => Status::failed_precondition(message),
        RequestError::OutcomeUnknown(_) => Status::aborted(message),
        RequestError::Timeout(_) => Status::deadline_exceeded(message),
        RequestError::Internal(_) => Status::internal(message),
    }
}

fn outcome_pb(outcome: Result<Vec<u8>, String>) -> client_pb::Outcome {
    client_pb::Outcome {
        result: Some(match outcome {
            Ok(bytes) => outcome::Result::Ok(bytes),
            Err(message) => outcome::Result::Error(message),
        }),
    }
}

fn event_of(view: &LeadershipView, config: &NodeConfig) -> LeadershipEvent {
    LeadershipEvent {
        role: view.role.as_str().to_string(),
        term: view.term,
        leader_id: view.leader.unwrap_or(0),
        leader_address: view.leader.and_then(|id| config.address_of(id)).unwrap_or_default().to_string(),
    }
}

type WatchEvents = Pin<Box<dyn Stream<Item = Result<LeadershipEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Client for ClientService {
    async fn write(&self, request: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        let was_forwarded = is_forwarded(&request);
        let write = request.into_inner();
        self.check_state_machine(&write.state_machine)?;
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
        let _pending = self.admit()?;
        let command = pb::Command {
            state_machine: write.state_machine.clone(),
            command: write.command.clone(),
            client_id: write.client_id.clone(),
            sequence: write.sequence,
        };
        match self.core.write(command).await {
            Ok(reply) => Ok(Response::new(WriteResponse {
                outcome: Some(outcome_pb(reply.outcome)),
                index: reply.index,
                term: reply.term,
            })),
            Err(error) => match self.forward_target(&error, was_forwarded) {
                Some((mut leader, address)) => leader.write(forwarded(write)).await.map(|r| with_leader(r, &address)),
                None => Err(status_of(error)),
            },
        }
    }

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let was_forwarded = is_forwarded(&request);
        let read = request.into_inner();
        self.check_state_machine(&read.state_machine)?;
        self.check_size("query", read.query.len())?;
        let consistency = match client_pb::Consistency::try_from(read.consistency) {
            Ok(client_pb::Consistency::Linearizable) => Consistency::Linearizable,
            Ok(client_pb::Consistency::Lease) => Consistency::Lease,
            Ok(client_pb::Consistency::Stale) => Consistency::Stale,
            Err(_) => return Err(Status::invalid_argument(format!("unknown consistency {}", read.consistency))),
        };
        let _pending = self.admit()?;
        let result = match consistency {
            Consistency::Stale => {
                let answer = self.stale_read(read.state_machine.clone(), read.query.clone());
                await_answer(self.config.request_timeout, answer).await.and_then(|result| result)
            }
            _ => self.core.read(read.state_machine.clone(), read.query.clone(), consistency).await,
        };
        match result {
            Ok(reply) => {
                Ok(Response::new(ReadResponse { outcome: Some(outcome_pb(reply.outcome)), index: reply.index }))
            }
            Err(error) => match self.forward_target(&error, was_forwarded) {
                Some((mut leader, address)) => leader.read(forwarded(read)).await.map(|r| with_leader(r, &address)),
                None => Err(status_of(error)),
            },
        }
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let core = self.core.status().await.map_err(status_of)?;
        let (reply, answer) = oneshot::channel();
        self.apply
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(ApplyMsg::Status(reply))
            .map_err(|_| status_of(RequestError::ShuttingDown))?;
        let applied = await_answer(self.config.request_timeout, answer).await.and_then(|r| r).map_err(status_of)?;
        let members = core
            .voters
            .iter()
            .map(|&id| Member {
                id,
                address: self.config.address_of(id).unwrap_or_default().to_string(),
                kind: "voter".to_string(),
            })
            .collect();
        let state_machines = applied
            .state_machines
            .into_iter()
            .map(|m| StateMachineStatus { name: m.name, module_hash: m.module_hash, state_digest: m.state_digest })
            .collect();
        Ok(Response::new(StatusResponse {
            cluster_id: self.config.cluster_id.clone(),
            id: self.config.id,
            role: core.role.as_str().to_string(),
            term: core.term,
            leader_id: core.leader.unwrap_or(0),
            leader_address: core.leader.and_then(|id| self.config.address_of(id)).unwrap_or_default().to_string(),
            commit_index: core.commit_index,
            applied_index: applied.applied_index,
            last_log_index: core.last_log_index,
            members,
            state_machines,
        }))
    }

    type WatchStream = WatchEvents;

    async fn watch(&self, _request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let config = self.config.clone();
        let events = WatchStream::new(self.core.leadership()).map(move |view| Ok(event_of(&view, &config)));
        Ok(Response::new(Box::pin(events)))
    }
}
