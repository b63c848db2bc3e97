//! Why a node could not start, or had to stop. Each variant names what
//! failed: the store, the core, the runtime, a module, the session table, or
//! one of the node's own tasks and threads. Client-facing refusals are
//! [`super::request::RequestError`] instead.

use super::modules::ModuleError;
use super::sessions::SessionDecodeError;
use crate::raft::{RaftError, StorageError};
use crate::runtime::RuntimeError;
use crate::storage::StoreError;
use std::fmt;
use thiserror::Error;

/// One of the tasks or threads a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// The tokio task that owns the consensus core.
    Consensus,
    /// The thread that applies committed entries through the guests.
    Apply,
    /// A blocking thread doing store work (opening, persisting, compacting,
    /// loading modules) for an async task.
    Storage,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Task::Consensus => "consensus task",
            Task::Apply => "apply thread",
            Task::Storage => "storage thread",
        })
    }
}

/// Why a node could not start or had to stop.
#[derive(Debug, Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("log store: {0}")]
    Log(#[from] StorageError),
    #[error(transparent)]
    Raft(#[from] RaftError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("apply: {0}")]
    Apply(#[from] ApplyError),
    /// A task or thread ended without saying why (it panicked, or was
    /// cancelled); the member cannot go on without it.
    #[error("the {0} stopped unexpectedly")]
    TaskLost(Task),
    #[error("cannot start the {task}: {source}")]
    Spawn { task: Task, source: std::io::Error },
}

/// A failure that stops the apply thread: the store failed, the engine (not
/// a guest) broke, or state it reloads from the store does not load.
/// Replying to clients cannot continue safely after it.
#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error(transparent)]
    Sessions(#[from] SessionDecodeError),
}
