//! raft-host: a Raft host whose replicated state machines are sandboxed
//! WebAssembly components.
//!
//! The modules form layers; each uses only those below it (the test
//! `host/tests/layers.rs` fails on an import that breaks this):
//!
//! - [`raft`]: the consensus core, the crate `raft-core` (`host/raft`),
//!   re-exported here. Pure, deterministic, no I/O: its own manifest names
//!   no crate that could do any.
//! - [`wire`]: what crosses the network and the disk as bytes: the protobuf
//!   types, their conversions to the core's types, the log entry codec.
//! - [`storage`]: the fjall store (log, hard state, guest state, sessions,
//!   modules).
//! - [`runtime`]: wasmtime: loading, validating and running guests.
//! - [`node`]: the tasks that drive the core, the store and the runtime, and
//!   the handles through which the layer above reaches them.
//! - [`server`]: the gRPC services, the metrics endpoint and the start-up of a
//!   whole member on its port.
//!
//! Beside them: [`client`] (the Rust client of a cluster, on top of `wire`)
//! and [`process`] (this process's CPU and memory), and at the bottom
//! [`histogram`] (lock-free histograms for the metrics).

pub mod client;
pub mod faults;
pub mod histogram;
pub mod node;
pub mod process;
pub use raft_core as raft;
pub mod runtime;
pub mod server;
pub mod storage;
pub mod wire;
