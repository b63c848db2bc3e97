//! A client of a raft-host cluster, as the CLI and the tests use it.
//!
//! It knows several member addresses, sends to the one it believes leads,
//! follows "not the leader" answers to the leader they name, moves on to the
//! next member when one is down, and backs off when the cluster is busy.
//! Writes carry a client id and sequence number, so a retry after a lost
//! answer is applied once (the member answers it from the session table).
//! Writes and reads of every client sharing a connection travel together on
//! one `Batch` stream ([`batch`]), unless `batching` is turned off.

mod batch;
mod watch;

pub use batch::{BYTES_PER_MESSAGE_MAX, Batcher};
pub use watch::{ChangeBatch, ChangeWatch, WatchSpec};

use crate::wire::client_pb::{
    self, ActivateRequest, ActivateResponse, BackupChunk, BackupHeader, BackupRequest, ChangeMembershipRequest,
    DeployProgress, DeployRequest, MembersRequest, MembersResponse, MembershipChange, ModulesRequest, ModulesResponse,
    ReadRequest, ReadResponse, RemoveModuleRequest, SetOfflineRequest, SetOfflineResponse, StatusRequest,
    StatusResponse, TransferLeaderRequest, TransferLeaderResponse, WriteRequest, WriteResponse, backup_chunk,
    client_client::ClientClient,
};
use crate::wire::{LEADER_ADDR_KEY, NO_RETRY_KEY, Transport, client_pb::outcome};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Largest request or answer this client sends or accepts.
const MESSAGE_BYTES_MAX: usize = 16 << 20;
/// How long one call may take before it counts as lost.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one member's status may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Module bytes per message of a deploy stream.
const DEPLOY_MESSAGE_BYTES: usize = 256 << 10;

/// Why a request failed for good.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress { address: String, reason: String },
    #[error("no member address given")]
    NoAddress,
    /// The cluster refused the request itself; retrying will not help.
    #[error("{message}")]
    Refused { code: Code, message: String },
    /// A watch asked for changes the member's history no longer holds: it
    /// holds those above `floor`. Re-read the state, then watch from the
    /// index after that read.
    #[error("{message}")]
    Compacted { floor: u64, message: String },
    /// Retrying did not succeed before the deadline.
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    GaveUp { attempts: u32, elapsed: Duration, last: String },
}

impl ClientError {
    /// The gRPC code of a refusal, if this is one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            ClientError::Compacted { .. } => Some(Code::OutOfRange),
            _ => None,
        }
    }
}

/// Read consistency, as the client asks for it.
pub use crate::wire::client_pb::Consistency;

/// A state machine's answer.
pub type Outcome = Result<Vec<u8>, String>;

/// Turns the wire outcome into a `Result`.
pub fn outcome_of(outcome: Option<client_pb::Outcome>) -> Outcome {
    match outcome.and_then(|o| o.result) {
        Some(outcome::Result::Ok(bytes)) => Ok(bytes),
        Some(outcome::Result::Error(message)) => Err(message),
        None => Err("the member sent no outcome".to_string()),
    }
}

/// The connections of a family of clients (one and those made by
/// `sharing_connections`), by member address: the gRPC client and the
/// batcher on it.
type Connections = Arc<std::sync::Mutex<std::collections::HashMap<String, (ClientClient<Channel>, Arc<Batcher>)>>>;

/// A client of one cluster.
pub struct ClusterClient {
    addresses: Vec<String>,
    /// Per member, once dialed: the gRPC client and the batcher on its
    /// connection (shared with clients made by `sharing_connections`).
    connections: Connections,
    /// This client's own copy of the batchers it has used, by position in
    /// `addresses`: a shared connection, once made, is never replaced, so
    /// each write skips the shared map's lock and look-up.
    batchers: Vec<Option<Arc<Batcher>>>,
    /// Plaintext, or TLS with this client's certificate.
    transport: Transport,
    /// The member tried first.
    current: usize,
    client_id: bytes::Bytes,
    next_sequence: u64,
    /// How long one call keeps retrying.
    pub deadline: Duration,
    /// Whether writes and reads go through the `Batch` stream, coalesced
    /// with those of every client sharing the connection (on by default),
    /// or one unary call each. A member without `Batch` turns it off.
    pub batching: bool,
}

impl ClusterClient {
    /// A plaintext client of the members at `addresses` (host:port), with a
    /// fresh random client id.
    pub fn new(addresses: Vec<String>) -> Result<ClusterClient, ClientError> {
        ClusterClient::with_transport(addresses, Transport::Plaintext)
    }

    /// A client of the members at `addresses` that reaches them over
    /// `transport` (TLS with a client certificate, for a member that asks
    /// for one).
    pub fn with_transport(addresses: Vec<String>, transport: Transport) -> Result<ClusterClient, ClientError> {
        if addresses.is_empty() {
            return Err(ClientError::NoAddress);
        }
        for address in &addresses {
            endpoint(address)?;
        }
        let connections = Connections::default();
        Ok(ClusterClient {
            addresses,
            connections,
            batchers: Vec::new(),
            transport,
            current: 0,
            client_id: random_client_id().into(),
            next_sequence: 1,
            deadline: Duration::from_secs(30),
            batching: true,
        })
    }

    /// Another client of the same members, with its own id and sequence,
    /// that shares this one's connections, and those either opens later (to
    /// a leader it learns of): HTTP/2 carries both clients' calls side by
    /// side, and their writes and reads travel in the same batches, as a
    /// pool of connections does for many callers.
    pub fn sharing_connections(&mut self) -> Result<ClusterClient, ClientError> {
        for at in 0..self.addresses.len() {
            self.channel(at)?;
        }
        Ok(ClusterClient {
            addresses: self.addresses.clone(),
            connections: self.connections.clone(),
            batchers: Vec::new(),
            transport: self.transport.clone(),
            current: self.current,
            client_id: random_client_id().into(),
            next_sequence: 1,
            deadline: self.deadline,
            batching: self.batching,
        })
    }

    /// This client's id (writes carry it with their sequence number).
    pub fn client_id(&self) -> &[u8] {
        &self.client_id
    }

    /// Replicates `command` on `state_machine` and returns the response,
    /// retrying (with the same sequence number) until the deadline.
    pub async fn write(&mut self, state_machine: &str, command: Vec<u8>) -> Result<WriteResponse, ClientError> {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let request = WriteRequest {
            state_machine: state_machine.to_string(),
            command: command.into(),
            client_id: self.client_id.clone(),
            sequence,
            // One write at a time: every earlier one was answered or given up.
            lowest_unanswered: sequence,
        };
        self.write_request(request).await
    }

    /// Sends a prepared write (any client id and sequence), with retries.
    pub async fn write_request(&mut self, request: WriteRequest) -> Result<WriteResponse, ClientError> {
        let fits = request.command.len() < batch::BYTES_PER_MESSAGE_MAX;
        self.send(
            request,
            fits,
            |batcher, request| async move { batcher.write(request).await },
            |mut client, request| async move { client.write(request).await },
        )
        .await
    }

    /// Answers `query` on `state_machine` with the given consistency.
    pub async fn read(
        &mut self,
        state_machine: &str,
        query: Vec<u8>,
        consistency: Consistency,
    ) -> Result<ReadResponse, ClientError> {
        let request = ReadRequest { state_machine: state_machine.to_string(), query, consistency: consistency.into() };
        let fits = request.query.len() < batch::BYTES_PER_MESSAGE_MAX;
        self.send(
            request,
            fits,
            |batcher, request| async move { batcher.read(request).await },
            |mut client, request| async move { client.read(request).await },
        )
        .await
    }

    /// `request` over the member's `Batch` stream when batching is on and
    /// it `fits` in a shared message (a larger one gains nothing from
    /// batching, and alone it gets the member's own size check), else over
    /// the unary call; with retries either way. A member without `Batch`
    /// (an older version) turns batching off for this client.
    async fn send<Q, T, B, BF, U, UF>(&mut self, request: Q, fits: bool, batched: B, unary: U) -> Result<T, ClientError>
    where
        Q: Clone,
        B: Fn(Arc<Batcher>, Q) -> BF,
        BF: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
        U: Fn(ClientClient<Channel>, Q) -> UF,
        UF: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        if self.batching && fits {
            let result = self.retry_on(ClusterClient::batcher, |batcher| batched(batcher, request.clone())).await;
            if !matches!(result, Err(ClientError::Refused { code: Code::Unimplemented, .. })) {
                return result;
            }
            self.batching = false;
        }
        self.retry(|client| unary(client, request.clone())).await
    }

    /// Deploys `module` for `state_machine` through the leader, and with
    /// `activate` switches to it. `on_progress` sees every progress message;
    /// the last one ("activated" or "staged") is returned. A deploy cut off
    /// by a change of leader is sent again to the new one: chunks already
    /// committed are recognized by the module's hash.
    pub async fn deploy(
        &mut self,
        state_machine: &str,
        module: &[u8],
        activate: bool,
        mut on_progress: impl FnMut(&DeployProgress),
    ) -> Result<DeployProgress, ClientError> {
        let started = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut messages: Vec<DeployRequest> = module
                .chunks(DEPLOY_MESSAGE_BYTES)
                .map(|data| DeployRequest { data: data.to_vec(), ..DeployRequest::default() })
                .collect();
            if let Some(first) = messages.first_mut() {
                first.state_machine = state_machine.to_string();
                first.total_bytes = module.len() as u64;
                first.no_activate = !activate;
            }
            let mut client = self.channel(self.current)?;
            let status = match client.deploy(tokio_stream::iter(messages)).await {
                Ok(response) => {
                    let mut stream = response.into_inner();
                    loop {
                        match stream.message().await {
                            Ok(Some(progress)) => {
                                on_progress(&progress);
                                if progress.phase == "activated" || progress.phase == "staged" {
                                    return Ok(progress);
                                }
                            }
                            Ok(None) => break Status::unavailable("the deploy stream ended without a result"),
                            Err(status) => break status,
                        }
                    }
                }
                Err(status) => status,
            };
            let last = format!("{}: {}", self.addresses[self.current], status.message());
            self.route(&status)?;
            if started.elapsed() >= self.deadline {
                return Err(ClientError::GaveUp { attempts, elapsed: started.elapsed(), last });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Switches `state_machine` to its stored version `module_hash` (hex).
    pub async fn activate(&mut self, state_machine: &str, module_hash: &str) -> Result<ActivateResponse, ClientError> {
        let request =
            ActivateRequest { state_machine: state_machine.to_string(), module_hash: module_hash.to_string() };
        self.retry(|mut client| {
            let request = request.clone();
            async move { client.activate(request).await }
        })
        .await
    }

    /// Removes version `module_hash` (hex) of `state_machine`, which must not
    /// be the one it runs, through the leader; the removal's index.
    pub async fn remove_module(&mut self, state_machine: &str, module_hash: &str) -> Result<u64, ClientError> {
        let request =
            RemoveModuleRequest { state_machine: state_machine.to_string(), module_hash: module_hash.to_string() };
        let response = self
            .retry(|mut client| {
                let request = request.clone();
                async move { client.remove_module(request).await }
            })
            .await?;
        Ok(response.index)
    }

    /// Every state machine's versions, as the first member that answers has
    /// applied them.
    pub async fn modules(&mut self) -> Result<ModulesResponse, ClientError> {
        self.retry(|mut client| async move { client.modules(ModulesRequest {}).await }).await
    }

    /// The members as the first member that answers has applied them.
    pub async fn members(&mut self) -> Result<MembersResponse, ClientError> {
        self.retry(|mut client| async move { client.members(MembersRequest {}).await }).await
    }

    /// Adds a learner, promotes one, or removes a member, at the leader;
    /// retries while another change is being applied.
    pub async fn change_membership(
        &mut self,
        change: MembershipChange,
        id: u64,
        address: &str,
    ) -> Result<MembersResponse, ClientError> {
        let request = ChangeMembershipRequest { change: change as i32, id, address: address.to_string() };
        self.retry(|mut client| {
            let request = request.clone();
            async move { client.change_membership(request).await }
        })
        .await
    }

    /// Hands leadership to voter `to`; answers once it leads.
    pub async fn transfer_leader(&mut self, to: u64) -> Result<TransferLeaderResponse, ClientError> {
        self.retry(|mut client| async move { client.transfer_leader(TransferLeaderRequest { to }).await }).await
    }

    /// Takes the member at position `at` of the address list offline for
    /// maintenance, or back online.
    pub async fn set_offline(&mut self, at: usize, offline: bool) -> Result<SetOfflineResponse, ClientError> {
        let mut client = self.channel(at)?;
        call_once(CALL_TIMEOUT, client.set_offline(SetOfflineRequest { offline })).await
    }

    /// Opens a consistent backup at the first member that serves one (it
    /// includes every write acknowledged before the call): its header, and
    /// the stream of messages with its records that follows.
    pub async fn backup(&mut self) -> Result<(BackupHeader, tonic::Streaming<BackupChunk>), ClientError> {
        let mut stream = self.retry(|mut client| async move { client.backup(BackupRequest {}).await }).await?;
        match stream.message().await {
            Ok(Some(BackupChunk { part: Some(backup_chunk::Part::Header(header)) })) => Ok((header, stream)),
            Ok(_) => Err(ClientError::Refused {
                code: Code::Internal,
                message: "the backup stream did not start with its header".into(),
            }),
            Err(status) => Err(ClientError::Refused { code: status.code(), message: status.message().to_string() }),
        }
    }

    /// The status of the first member that answers, trying each once.
    pub async fn status(&mut self) -> Result<StatusResponse, ClientError> {
        let mut last = String::new();
        for offset in 0..self.addresses.len() {
            let at = (self.current + offset) % self.addresses.len();
            match self.status_of(at).await {
                Ok(status) => return Ok(status),
                Err(error) => last = format!("{}: {error}", self.addresses[at]),
            }
        }
        Err(ClientError::GaveUp { attempts: self.addresses.len() as u32, elapsed: Duration::ZERO, last })
    }

    /// The status of the one member at `address`, asked once.
    pub async fn status_at(address: &str, transport: &Transport) -> Result<StatusResponse, ClientError> {
        ClusterClient::with_transport(vec![address.to_string()], transport.clone())?.status_of(0).await
    }

    /// The status of the member at position `at` of the address list.
    pub async fn status_of(&mut self, at: usize) -> Result<StatusResponse, ClientError> {
        let mut client = self.channel(at)?;
        call_once(STATUS_TIMEOUT, client.status(StatusRequest {})).await
    }

    fn channel(&mut self, at: usize) -> Result<ClientClient<Channel>, ClientError> {
        Ok(self.connection(at)?.0)
    }

    fn batcher(&mut self, at: usize) -> Result<Arc<Batcher>, ClientError> {
        if let Some(Some(batcher)) = self.batchers.get(at) {
            return Ok(batcher.clone());
        }
        let batcher = self.connection(at)?.1;
        if self.batchers.len() <= at {
            self.batchers.resize(at + 1, None);
        }
        self.batchers[at] = Some(batcher.clone());
        Ok(batcher)
    }

    fn connection(&mut self, at: usize) -> Result<(ClientClient<Channel>, Arc<Batcher>), ClientError> {
        let address = &self.addresses[at];
        let mut open = self.connections.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(connection) = open.get(address) {
            return Ok(connection.clone());
        }
        let channel = self.transport.connect(endpoint(address)?);
        let client = ClientClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        let connection = (client.clone(), Arc::new(Batcher::new(client)));
        open.insert(address.clone(), connection.clone());
        Ok(connection)
    }

    /// Calls `call` on the current member until it succeeds, fails for
    /// good, or the deadline passes; follows leader hints (on refusals and on
    /// forwarded answers) and moves on from members that do not answer.
    async fn retry<T, F, Fut>(&mut self, call: F) -> Result<T, ClientError>
    where
        F: Fn(ClientClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retry_on(ClusterClient::channel, call).await
    }

    /// As [`ClusterClient::retry`], with `call` given what `connect` makes
    /// of the member it goes to (its gRPC client, or its batcher).
    async fn retry_on<C, T, F, Fut>(
        &mut self,
        connect: fn(&mut ClusterClient, usize) -> Result<C, ClientError>,
        call: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(C) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut attempts = 0;
        let mut backoff = Duration::from_millis(20);
        loop {
            attempts += 1;
            let client = connect(self, self.current)?;
            let status = match tokio::time::timeout(CALL_TIMEOUT, call(client)).await {
                Ok(Ok(response)) => {
                    // A follower that forwarded the request names the leader.
                    if let Some(leader) = response.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()) {
                        let leader = leader.to_string();
                        self.prefer(&leader)?;
                    }
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!("no answer within {CALL_TIMEOUT:?}")),
            };
            let last = format!("{}: {}", self.addresses[self.current], status.message());
            self.route(&status)?;
            if started.elapsed() >= self.deadline {
                return Err(ClientError::GaveUp { attempts, elapsed: started.elapsed(), last });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Where to try next after `status`: the leader it names, the next
    /// member, or the same one after a pause; an error if retrying cannot help.
    fn route(&mut self, status: &Status) -> Result<(), ClientError> {
        match status.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled => {
                match status.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()) {
                    Some(leader) => self.prefer(leader)?,
                    None => self.current = (self.current + 1) % self.addresses.len(),
                }
                Ok(())
            }
            // Over a quota: only the caller can change that.
            Code::ResourceExhausted if status.metadata().contains_key(NO_RETRY_KEY) => {
                Err(ClientError::Refused { code: status.code(), message: status.message().to_string() })
            }
            // Busy, or the outcome of a write is unknown: retry (with the
            // same sequence number) after a pause.
            Code::ResourceExhausted | Code::Aborted | Code::DeadlineExceeded => Ok(()),
            code => Err(ClientError::Refused { code, message: status.message().to_string() }),
        }
    }

    fn prefer(&mut self, address: &str) -> Result<(), ClientError> {
        match self.addresses.iter().position(|a| a == address) {
            Some(at) => self.current = at,
            None => {
                endpoint(address)?;
                self.addresses.push(address.to_string());
                self.current = self.addresses.len() - 1;
            }
        }
        Ok(())
    }
}

/// One call to one member, without retries, within `limit`.
async fn call_once<R>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
) -> Result<R, ClientError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(ClientError::Refused { code: status.code(), message: status.message().to_string() }),
        Err(_) => Err(ClientError::GaveUp { attempts: 1, elapsed: limit, last: "timed out".into() }),
    }
}

/// Whether `address` is one a client can dial (host:port), without dialing.
pub fn check_address(address: &str) -> Result<(), ClientError> {
    endpoint(address).map(|_| ())
}

fn endpoint(address: &str) -> Result<Endpoint, ClientError> {
    let invalid = |reason: String| ClientError::InvalidAddress { address: address.to_string(), reason };
    if address.contains("://") || !address.contains(':') {
        return Err(invalid("expected host:port, for example 127.0.0.1:7001".into()));
    }
    Endpoint::from_shared(format!("http://{address}"))
        .map(|e| e.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true))
        .map_err(|e| invalid(e.to_string()))
}

/// A client id unique enough across processes: time, process id and a
/// counter, hashed.
fn random_client_id() -> Vec<u8> {
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut hasher = Sha256::new();
    hasher.update(nanos.to_be_bytes());
    hasher.update(std::process::id().to_be_bytes());
    hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    hasher.finalize()[..16].to_vec()
}

#[cfg(test)]
mod tests {
    use super::ClusterClient;

    #[test]
    fn clients_sharing_connections_keep_their_own_identity_and_sequence() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let mut first = ClusterClient::new(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]).expect("client");
            first.next_sequence = 9;
            let second = first.sharing_connections().expect("shared");
            assert_ne!(second.client_id(), first.client_id(), "a session of its own");
            assert_eq!(second.next_sequence, 1);
            assert_eq!(second.addresses, first.addresses);
            let open = |client: &ClusterClient| client.connections.lock().map(|open| open.len()).unwrap_or(0);
            assert_eq!(open(&second), 2, "every connection is shared, not opened anew");
            assert!(std::sync::Arc::ptr_eq(&first.connections, &second.connections));
        });
    }

    #[test]
    fn a_client_keeps_the_shared_batcher_of_each_member_including_one_it_learns_of() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let mut first = ClusterClient::new(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]).expect("client");
            let mut second = first.sharing_connections().expect("shared");
            let shared = |client: &mut ClusterClient, at| client.connection(at).expect("connection").1;
            for at in 0..2 {
                let kept = first.batcher(at).expect("batcher");
                assert!(std::sync::Arc::ptr_eq(&kept, &first.batcher(at).expect("again")), "kept, not looked up anew");
                assert!(std::sync::Arc::ptr_eq(&kept, &shared(&mut first, at)), "the connection's own batcher");
                assert!(std::sync::Arc::ptr_eq(&kept, &second.batcher(at).expect("other client")), "shared");
            }
            // A leader named by an answer joins the list past the end.
            second.prefer("127.0.0.1:3").expect("valid address");
            let learned = second.batcher(2).expect("batcher of the new member");
            assert!(std::sync::Arc::ptr_eq(&learned, &shared(&mut second, 2)));
            assert!(!std::sync::Arc::ptr_eq(&learned, &second.batcher(0).expect("first member")));
        });
    }
}
