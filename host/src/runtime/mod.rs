//! The WebAssembly runtime: loads state machines (components of the world in
//! `wit/raft-host.wit`), and runs their `apply`, `query` and `migrate`
//! deterministically and in a sandbox.
//!
//! Determinism is configured engine-wide (NaN canonicalization, deterministic
//! relaxed SIMD, no threads) and per call: the same fuel budget on every node,
//! so a runaway guest fails the same entry everywhere; a fixed memory ceiling
//! and stack limit; time and randomness derived from the entry. No wall-clock
//! timeout ever bounds `apply`: it would fire differently on different nodes.
//!
//! Each `apply` is a transaction over an overlay of the store: its writes are
//! kept only if it returns `Ok`. A trap (including running out of fuel or
//! memory) discards them and the instance, which is re-created for the next
//! call; state lives in the store, so nothing is lost.

mod machine;
mod wasi;

pub use self::machine::{ApplyOutcome, CallError, EntryInfo, Machine};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({
    world: "state-machine",
    path: "../wit",
    imports: { default: trappable },
});

pub use self::raft::host::context::Level;

/// Bounds on what a guest may use. Identical on every node of a cluster (the
/// node checks this), since they decide which entries fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel (roughly, WebAssembly instructions) per call.
    pub fuel_per_call: u64,
    /// Linear memory per instance.
    pub memory_bytes: usize,
    /// Table elements per table.
    pub table_elements: usize,
    /// Instances, tables and memories per store (a component instantiates
    /// several core modules).
    pub instances: usize,
    pub tables: usize,
    pub memories: usize,
    /// WebAssembly stack per call.
    pub stack_bytes: usize,
    /// Size of a module (component) accepted for loading.
    pub module_bytes: usize,
    /// Key and value sizes a guest may write.
    pub key_bytes: usize,
    pub value_bytes: usize,
    /// Distinct keys one `apply` may write.
    pub writes_per_call: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            fuel_per_call: 100_000_000,
            memory_bytes: 64 << 20,
            table_elements: 100_000,
            instances: 32,
            tables: 32,
            memories: 8,
            stack_bytes: 512 << 10,
            module_bytes: 64 << 20,
            key_bytes: crate::storage::STATE_KEY_MAX_BYTES,
            value_bytes: crate::storage::STATE_VALUE_MAX_BYTES,
            writes_per_call: 100_000,
        }
    }
}

/// Why a module was refused. Nothing was loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("module of {bytes} bytes is above the limit of {max} bytes")]
    TooLarge { bytes: usize, max: usize },
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("the component imports what raft-host does not provide: {}", .0.join(", "))]
    UnsupportedImports(Vec<String>),
    #[error("the component does not fit the raft:host/state-machine world: {0}")]
    WrongWorld(String),
    #[error("the component failed to compile: {0}")]
    Compile(String),
}

/// A failure of the runtime itself (not of a guest): fatal for the node.
#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("WebAssembly engine: {0}")]
    Engine(String),
    #[error(transparent)]
    Store(#[from] crate::storage::StoreError),
}

/// A validated, compiled state machine module, ready to instantiate.
pub struct Module {
    hash: [u8; 32],
    size_bytes: usize,
    pre: StateMachinePre<GuestState>,
}

impl Module {
    /// SHA-256 of the component bytes.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }
}

/// Interfaces the host provides, by name prefix (versions are matched
/// semver-compatibly by the linker).
const PROVIDED_IMPORT_PREFIXES: &[&str] = &[
    "raft:host/kv@0.1.",
    "raft:host/context@0.1.",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:filesystem/",
    "wasi:io/",
    "wasi:random/",
    "wasi:sockets/",
];

/// The engine, the linker and a cache of compiled modules.
pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestState>,
    limits: Limits,
    modules: Mutex<HashMap<[u8; 32], Arc<Module>>>,
}

impl Runtime {
    pub fn new(limits: Limits) -> Result<Runtime, RuntimeError> {
        // Threads are impossible by construction: wasmtime's `threads`
        // feature is not compiled in.
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .cranelift_nan_canonicalization(true)
            .relaxed_simd_deterministic(true)
            .max_wasm_stack(limits.stack_bytes)
            .concurrency_support(false);
        let engine = Engine::new(&config).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        StateMachine::add_to_linker::<_, HasSelf<GuestState>>(&mut linker, |state| state)
            .map_err(|e| RuntimeError::Engine(e.to_string()))?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        Ok(Runtime { engine, linker, limits, modules: Mutex::new(HashMap::new()) })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Validates and compiles `bytes`, or returns the cached module of the
    /// same content.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Module>, LoadError> {
        use sha2::Digest;
        if bytes.len() > self.limits.module_bytes {
            return Err(LoadError::TooLarge { bytes: bytes.len(), max: self.limits.module_bytes });
        }
        let hash: [u8; 32] = sha2::Sha256::digest(bytes).into();
        if let Some(module) = self.cached(&hash) {
            return Ok(module);
        }
        check_component_header(bytes)?;
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        let unsupported: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .filter(|name| !PROVIDED_IMPORT_PREFIXES.iter().any(|prefix| name.starts_with(prefix)))
            .collect();
        if !unsupported.is_empty() {
            return Err(LoadError::UnsupportedImports(unsupported));
        }
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::UnsupportedImports(vec![format!("{e:#}")]))?;
        let pre = StateMachinePre::new(instance_pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        let module = Arc::new(Module { hash, size_bytes: bytes.len(), pre });
        self.modules.lock().unwrap_or_else(|p| p.into_inner()).insert(hash, module.clone());
        Ok(module)
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<Arc<Module>> {
        self.modules.lock().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()
    }
}

/// A clear refusal for core modules and other non-components, before the
/// parser's less friendly message.
fn check_component_header(bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(LoadError::NotAComponent("the bytes are not WebAssembly (no \\0asm header)".into()));
    }
    // Core modules are version 1 with layer 0; components have layer 1.
    if bytes[6..8] == [0, 0] {
        return Err(LoadError::NotAComponent(
            "this is a core WebAssembly module; build a component (for example with the wasm32-wasip2 target or `wasm-tools component new`)".into(),
        ));
    }
    Ok(())
}

/// Everything an instance's host functions reach.
pub(crate) struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: machine::Limiter,
    pub(crate) call: machine::CallContext,
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}
