//! What a client request gets back from the node: an answer (a write's or a
//! read's), or why there is none. The server maps these onto gRPC statuses.

use super::sessions::REPLIES_PER_SESSION;
use crate::raft::NodeId;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::oneshot;

/// Why one client request was not answered with an outcome. Each maps to a
/// gRPC status in the server; the retryable ones say so.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("this member is not the leader{}", leader_hint(.leader))]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("no leader is known yet; retry shortly")]
    NoLeader,
    #[error("busy: {0}; retry with backoff")]
    Busy(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no state machine named {0:?} runs in this cluster")]
    UnknownStateMachine(String),
    #[error(
        "sequence number {sequence} is older than the {window} answers this client's session keeps (highest: {highest}); its outcome is unknown",
        window = REPLIES_PER_SESSION
    )]
    SessionExpired { sequence: u64, highest: u64 },
    #[error("{0}; the write may or may not have been applied: retry with the same client id and sequence number")]
    OutcomeUnknown(String),
    #[error("leadership changed while the request waited; retry")]
    LeadershipChanged,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("this member is shutting down")]
    ShuttingDown,
    /// The cluster decided against the request (an activation whose
    /// migrate hook failed, a module a member refused); retrying as is will
    /// not help.
    #[error("{0}")]
    Rejected(String),
    /// Over a quota the client can only lift by removing something (a
    /// version, say); retrying as is will not help.
    #[error("{0}")]
    QuotaExceeded(String),
    /// This member leads on a nearly full disk: it takes no new entries
    /// until space returns, and hands leadership to a member with room
    /// within seconds, so a client retrying gets through there.
    #[error("{0}")]
    DiskFull(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn leader_hint(leader: &Option<(NodeId, String)>) -> String {
    match leader {
        Some((id, addr)) => format!(" (the leader is {id} at {addr})"),
        None => " and no leader is known".to_string(),
    }
}

/// What the state machine answered to a write, and where it sits in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteReply {
    pub outcome: Result<Vec<u8>, String>,
    pub index: u64,
    pub term: u64,
}

/// The state machine name a read barrier goes by: no guest is asked, the
/// read only waits for its index to be applied. No state machine has it
/// (names are never empty).
pub(super) const BARRIER: &str = "";

/// What the state machine answered to a read, and the applied index it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadReply {
    pub outcome: Result<Vec<u8>, String>,
    pub index: u64,
}

/// Read consistency levels (see `proto/client.proto`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    Linearizable,
    Lease,
    Stale,
}

/// Waits at most `limit` for a task's answer; a dropped sender means the
/// task is gone, which only happens when the member stops.
pub(super) async fn await_answer<T>(limit: Duration, answer: oneshot::Receiver<T>) -> Result<T, RequestError> {
    match tokio::time::timeout(limit, answer).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(RequestError::ShuttingDown),
        Err(_) => Err(RequestError::Timeout(limit)),
    }
}
