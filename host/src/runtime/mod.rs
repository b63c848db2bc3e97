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

pub use self::machine::{ApplyOutcome, CallError, EntryInfo, Machine, WriteBatch};

use crate::storage::Store;
use crate::wire::hex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
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
    /// Bytes (keys plus values) one call may write. The host's copies of a
    /// guest's writes cost it no fuel, so this, not fuel, bounds them.
    pub write_bytes_per_call: usize,
    /// Bytes (keys plus values) one call may read through `get` and `scan`.
    pub read_bytes_per_call: usize,
    /// Most pairs one `scan` may ask for.
    pub scan_pairs_max: u32,
    /// Bytes one `scan` may return.
    pub scan_bytes_max: usize,
    /// Largest reply of one call; a longer error message is cut to this.
    pub reply_bytes_max: usize,
    /// Bytes the writes of one batch of commands may hold in memory before
    /// the host makes them durable and starts another batch. Not a failure
    /// and not seen by guests: where batches are cut differs from replica to
    /// replica, and nothing a guest observes depends on it.
    pub batch_write_bytes_max: usize,
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
            write_bytes_per_call: 16 << 20,
            read_bytes_per_call: 64 << 20,
            scan_pairs_max: 10_000,
            scan_bytes_max: 8 << 20,
            reply_bytes_max: 1 << 20,
            batch_write_bytes_max: 16 << 20,
        }
    }
}

/// Why a module was refused. Nothing was loaded. Each reason depends only on
/// the bytes and the engine, so every member refuses the same module alike.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
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
    imports: Vec<String>,
    pre: StateMachinePre<GuestState>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module").field("hash", &hex(&self.hash)).field("size_bytes", &self.size_bytes).finish()
    }
}

impl Module {
    /// SHA-256 of the component bytes.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }

    /// The interfaces the component imports (ours and WASI's), by name.
    pub fn imports(&self) -> &[String] {
        &self.imports
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

/// A module's load, shared by everyone who asks for the same bytes: the
/// first caller compiles, the others wait for its result.
type LoadSlot = Arc<OnceLock<Result<Arc<Module>, LoadError>>>;

/// Where a module stands in this runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadState {
    /// Nobody asked for it yet.
    Unknown,
    /// Being compiled or loaded from the compiled cache.
    Loading,
    Ready,
    Refused(LoadError),
}

/// The engine, the linker and a cache of compiled modules (in memory, and
/// on disk in the store when one is given).
pub struct Runtime {
    engine: Engine,
    linker: Linker<GuestState>,
    limits: Limits,
    engine_key: String,
    modules: Mutex<HashMap<[u8; 32], LoadSlot>>,
    /// When each module was last asked for (see [`Runtime::forget_idle`]).
    touched: Mutex<HashMap<[u8; 32], std::time::Instant>>,
    compiled: AtomicU64,
    from_cache: AtomicU64,
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
        let engine_key = engine_key(&engine);
        Ok(Runtime {
            engine,
            linker,
            limits,
            engine_key,
            modules: Mutex::new(HashMap::new()),
            touched: Mutex::new(HashMap::new()),
            compiled: AtomicU64::new(0),
            from_cache: AtomicU64::new(0),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Names this engine and its configuration in the compiled cache: an
    /// artifact is only ever loaded by the engine that made it.
    pub fn engine_key(&self) -> &str {
        &self.engine_key
    }

    /// Modules compiled, and modules loaded from the compiled cache instead,
    /// since this runtime started.
    pub fn load_counts(&self) -> (u64, u64) {
        (self.compiled.load(Ordering::Relaxed), self.from_cache.load(Ordering::Relaxed))
    }

    /// Validates and compiles `bytes`, or returns the loaded module of the
    /// same content. Refuses modules above the size limit.
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Module>, LoadError> {
        self.check_size(bytes.len())?;
        self.load_cached(bytes, None)
    }

    /// Refuses a new module above this runtime's size limit.
    pub fn check_size(&self, bytes: usize) -> Result<(), LoadError> {
        if bytes > self.limits.module_bytes {
            return Err(LoadError::TooLarge { bytes, max: self.limits.module_bytes });
        }
        Ok(())
    }

    /// Validates and compiles `bytes` like [`Runtime::load`], and with a
    /// `cache` store first tries the artifact compiled earlier (a restart
    /// never recompiles) and saves a fresh compilation there. A failure to
    /// use the cache is logged and falls back to compiling: the cache only
    /// saves time.
    ///
    /// No size limit applies here: this also loads modules the cluster
    /// already accepted, and whether one runs must not depend on a member's
    /// own settings. New modules go through [`Runtime::check_size`] first.
    pub fn load_cached(&self, bytes: &[u8], cache: Option<&Store>) -> Result<Arc<Module>, LoadError> {
        use sha2::Digest;
        let hash: [u8; 32] = sha2::Sha256::digest(bytes).into();
        let slot = self.slot(&hash);
        slot.get_or_init(|| self.compile(hash, bytes, cache)).clone()
    }

    /// Drops this runtime's copy of a loaded module (machines that run it
    /// keep theirs): a version nothing runs any more need not hold memory,
    /// and loading it again comes from the compiled cache. A module still
    /// loading is left alone.
    pub fn forget(&self, hash: &[u8; 32]) {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if modules.get(hash).is_some_and(|slot| slot.get().is_some()) {
            modules.remove(hash);
            self.touched.lock().unwrap_or_else(|p| p.into_inner()).remove(hash);
        }
    }

    /// Drops this runtime's copy of every loaded module outside `keep` that
    /// nobody asked for within `idle` (see [`Runtime::forget`]): modules
    /// staged by a deploy and never activated, or activated and replaced
    /// since. A module still loading, or refused, is left alone. Returns
    /// how many were dropped.
    pub fn forget_idle(&self, keep: &std::collections::HashSet<[u8; 32]>, idle: std::time::Duration) -> usize {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        let mut touched = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        let idle_loaded: Vec<[u8; 32]> = modules
            .iter()
            .filter(|(hash, slot)| {
                !keep.contains(*hash)
                    && matches!(slot.get(), Some(Ok(_)))
                    && touched.get(*hash).is_none_or(|at| at.elapsed() >= idle)
            })
            .map(|(hash, _)| *hash)
            .collect();
        for hash in &idle_loaded {
            modules.remove(hash);
        }
        // Questions about modules never loaded leave marks too; they go here.
        touched.retain(|hash, _| modules.contains_key(hash));
        idle_loaded.len()
    }

    /// How many modules this runtime holds compiled in memory.
    pub fn loaded_count(&self) -> usize {
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| matches!(s.get(), Some(Ok(_))))
            .count()
    }

    fn touch(&self, hash: &[u8; 32]) {
        self.touched.lock().unwrap_or_else(|p| p.into_inner()).insert(*hash, std::time::Instant::now());
    }

    /// Module `hash` if it is loaded already (no bytes needed).
    pub fn loaded(&self, hash: &[u8; 32]) -> Option<Arc<Module>> {
        self.touch(hash);
        let slot = self.modules.lock().unwrap_or_else(|p| p.into_inner()).get(hash).cloned()?;
        slot.get().and_then(|result| result.as_ref().ok().cloned())
    }

    /// Where module `hash` stands.
    pub fn state(&self, hash: &[u8; 32]) -> LoadState {
        self.touch(hash);
        let slot = self.modules.lock().unwrap_or_else(|p| p.into_inner()).get(hash).cloned();
        match slot {
            None => LoadState::Unknown,
            Some(slot) => match slot.get() {
                None => LoadState::Loading,
                Some(Ok(_)) => LoadState::Ready,
                Some(Err(error)) => LoadState::Refused(error.clone()),
            },
        }
    }

    fn slot(&self, hash: &[u8; 32]) -> LoadSlot {
        self.touch(hash);
        self.modules.lock().unwrap_or_else(|p| p.into_inner()).entry(*hash).or_default().clone()
    }

    fn compile(&self, hash: [u8; 32], bytes: &[u8], cache: Option<&Store>) -> Result<Arc<Module>, LoadError> {
        check_component_header(bytes)?;
        let started = std::time::Instant::now();
        if let Some(component) = cache.and_then(|store| self.cached_component(store, &hash)) {
            self.from_cache.fetch_add(1, Ordering::Relaxed);
            tracing::info!(module = %hex(&hash), elapsed_ms = started.elapsed().as_millis() as u64, "module loaded from the compiled cache");
            return self.prepare(hash, bytes.len(), &component);
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile(format!("{e:#}")))?;
        self.compiled.fetch_add(1, Ordering::Relaxed);
        tracing::info!(module = %hex(&hash), bytes = bytes.len(), elapsed_ms = started.elapsed().as_millis() as u64, "module compiled");
        let module = self.prepare(hash, bytes.len(), &component)?;
        if let Some(store) = cache {
            match component.serialize() {
                Ok(artifact) => {
                    if let Err(error) = store.put_artifact(&self.engine_key, &hash, &artifact) {
                        tracing::warn!(module = %hex(&hash), %error, "could not save the compiled module");
                    }
                }
                Err(error) => tracing::warn!(module = %hex(&hash), %error, "could not serialize the compiled module"),
            }
        }
        Ok(module)
    }

    fn cached_component(&self, store: &Store, hash: &[u8; 32]) -> Option<Component> {
        let artifact = match store.get_artifact(&self.engine_key, hash) {
            Ok(artifact) => artifact?,
            Err(error) => {
                tracing::warn!(module = %hex(hash), %error, "the compiled cache is unreadable; compiling again");
                return None;
            }
        };
        // SAFETY: the artifact was produced by `Component::serialize` of an
        // engine with this engine key, and written to this member's own
        // store, whose values carry checksums that were verified on read;
        // wasmtime further checks the engine and version it was made for.
        match unsafe { Component::deserialize(&self.engine, &artifact) } {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(module = %hex(hash), error = %format!("{error:#}"), "a compiled artifact does not load; compiling again");
                None
            }
        }
    }

    /// Checks a compiled component's imports and exports against the world.
    fn prepare(&self, hash: [u8; 32], size_bytes: usize, component: &Component) -> Result<Arc<Module>, LoadError> {
        let imports: Vec<String> =
            component.component_type().imports(&self.engine).map(|(name, _)| name.to_string()).collect();
        let unsupported: Vec<String> = imports
            .iter()
            .filter(|name| !PROVIDED_IMPORT_PREFIXES.iter().any(|prefix| name.starts_with(prefix)))
            .cloned()
            .collect();
        if !unsupported.is_empty() {
            return Err(LoadError::UnsupportedImports(unsupported));
        }
        let instance_pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| LoadError::UnsupportedImports(vec![format!("{e:#}")]))?;
        let pre = StateMachinePre::new(instance_pre).map_err(|e| LoadError::WrongWorld(format!("{e:#}")))?;
        Ok(Arc::new(Module { hash, size_bytes, imports, pre }))
    }
}

/// `wasmtime-<digest of the engine's compatibility hash>`.
fn engine_key(engine: &Engine) -> String {
    use sha2::Digest;
    use std::hash::{Hash, Hasher};
    struct Sha(sha2::Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut hasher = Sha(sha2::Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let digest = hasher.0.finalize();
    // wasmtime's compatibility hash covers its version and every setting
    // that changes generated code.
    format!("wasmtime-{}", &hex(&digest)[..16])
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
