//! The guests under `guests/`, built for `wasm32-wasip2` by this crate's build
//! script, as component bytes.

/// The built-in key-value state machine (JSON commands); raft-host's default.
pub const KV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kv_guest.wasm"));
/// A counter: `{"op":"add","by":N}`, query `{"op":"get"}`.
pub const COUNTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter_guest.wasm"));
/// Version 2 of the counter: answers carry `"version":2`; its migrate hook
/// records the version it replaced and refuses a negative count.
pub const COUNTER_V2: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter_v2_guest.wasm"));
/// Accounts, deposits and transfers that never overdraw and conserve money.
pub const BANK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bank_guest.wasm"));
/// Test fixture: loops, allocates without bound, recurses without bound,
/// traps, or behaves, depending on the command.
pub const HOSTILE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hostile_guest.wasm"));
/// Test fixture: a component of another world (exports `run`, not ours).
pub const OTHER_WORLD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/other_world_guest.wasm"));
/// Test fixture: our world plus an import the host does not provide.
pub const EXTRA_IMPORT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/extra_import_guest.wasm"));
