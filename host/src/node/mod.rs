//! The node: the tasks that drive the consensus core, the store and the
//! WebAssembly runtime (README, "How a member works").
//!
//! - The core task ([`core`]) owns [`crate::raft::Raft`] over the fjall store
//!   and a bounded inbox. It steps peer messages, ticks, proposals and reads,
//!   and handles each `Ready`: leader messages leave at once, the entries and
//!   hard state are synced on a blocking thread while the core keeps stepping
//!   (so the next batch of proposals gathers meanwhile: group commit), then
//!   the messages that promise durable state leave and the committed entries
//!   go to the apply task.
//! - One pair of lanes per peer ([`peers`]): a control lane (votes,
//!   heartbeats, acknowledgements) and a data lane (appends with entries), so
//!   heartbeats never wait behind a megabyte of entries. Each is a bounded
//!   queue; a full queue drops messages, which Raft recovers from.
//! - The apply task ([`apply`]), on its own thread: applies committed entries
//!   through the guests in batches, writes their effects, the session table
//!   and the applied index in one store batch, then answers waiting clients
//!   and serves reads whose index it reached. Deploy entries go through
//!   [`module_apply`].
//!
//! The layer above (`crate::server`) reaches a running node only through its
//! [`NodeHandles`]. This file only declares the node's files and what they
//! export: each file imports its siblings by name, and those imports form no
//! cycle (`host/tests/layers.rs` checks both).

mod apply;
mod config;
mod core;
mod deploy;
mod disk;
mod error;
mod histograms;
mod join;
mod members;
mod module_apply;
mod modules;
mod peers;
mod request;
mod sessions;
mod shutdown;
mod start;

pub use self::apply::{ApplyHandle, ApplyStatus, Digests, MachineStatus};
pub use self::config::NodeConfig;
pub use self::core::{CoreHandle, CoreStatus, LeadershipView};
pub use self::deploy::{Activated, DeployStep, Deployer};
pub use self::disk::DiskSpace;
pub use self::error::{ApplyError, NodeError, Task};
pub use self::histograms::NodeHistograms;
pub use self::members::{MemberRole, Members, Membership};
pub use self::modules::{MODULE_CHUNK_BYTES, ModuleError, ModuleRegistry, VersionInfo, check_name};
pub use self::peers::SnapshotCounters;
pub use self::request::{Consistency, ReadReply, RequestError, WriteReply};
pub use self::sessions::{REPLIES_PER_SESSION, SessionDecodeError, SessionLimits};
pub use self::shutdown::{Shutdown, ShutdownSignal};
pub use self::start::{Node, NodeHandles, built_in_state_machines};
