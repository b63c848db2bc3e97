//! raft-host: a Raft host whose replicated state machines are sandboxed
//! WebAssembly components.
//!
//! `raft` is the consensus core (pure, deterministic, no I/O): the crate
//! `raft-core` in `host/raft`, re-exported here. Storage, the
//! WebAssembly runtime, the node that wires them together and the gRPC
//! services join it as separate modules; see DESIGN.md for the data flow.

pub mod client;
pub mod node;
pub mod process;
pub use raft_core as raft;
pub mod rpc;
pub mod runtime;
pub mod storage;
