//! One state machine: a module, a name (its key space in the store), and a
//! live instance that is created on demand and thrown away after any trap.
//!
//! Writes go to overlays: `current` holds the call in progress; when `apply`
//! returns `Ok` it moves into `batch`, which later entries of the same batch
//! see; the caller makes the batch durable in one store transaction with the
//! applied index. An `Err` or a trap drops `current` only.

use super::wasi::{self, EntryEntropy};
use super::{GuestState, Limits, Module, Runtime, RuntimeError, StateMachine};
use crate::runtime::raft::host::{context, kv};
use crate::storage::{StateWrite, Store, StoreError};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use wasmtime::Trap;
use wasmtime::component::ResourceTable;

pub use super::raft::host::context::EntryInfo;

/// Longest guest log line kept; the rest is cut.
const GUEST_LOG_LINE_MAX_BYTES: usize = 4096;

/// Why a guest call did not produce a result. Every variant is
/// deterministic: the same entry fails the same way on every replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The guest returned an error.
    Returned(String),
    /// The guest used its whole fuel budget.
    OutOfFuel,
    /// The guest asked for more memory or table space than allowed.
    OutOfMemory(String),
    /// The guest trapped (a panic, an unreachable, a stack overflow, ...).
    Trapped(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Returned(message) => write!(f, "{message}"),
            CallError::OutOfFuel => write!(f, "the state machine ran out of fuel (it ran too long) and was stopped"),
            CallError::OutOfMemory(what) => write!(f, "the state machine exceeded its memory limit: {what}"),
            CallError::Trapped(what) => write!(f, "the state machine trapped: {what}"),
        }
    }
}

/// The reply to one applied command.
pub type ApplyOutcome = Result<Vec<u8>, CallError>;

/// Per-instance resource limits; records what was refused so a trap can be
/// reported as "out of memory" rather than a bare error.
pub(crate) struct Limiter {
    limits: Limits,
    refused: Option<String>,
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limits.memory_bytes {
            let what = format!("memory growing from {current} to {desired} bytes, limit {}", self.limits.memory_bytes);
            self.refused = Some(what.clone());
            return Err(wasmtime::Error::msg(what));
        }
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limits.table_elements {
            let what =
                format!("table growing from {current} to {desired} elements, limit {}", self.limits.table_elements);
            self.refused = Some(what.clone());
            return Err(wasmtime::Error::msg(what));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.limits.instances
    }

    fn tables(&self) -> usize {
        self.limits.tables
    }

    fn memories(&self) -> usize {
        self.limits.memories
    }
}

type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What the host functions of one call see.
pub(crate) struct CallContext {
    store: Store,
    state_machine: String,
    limits: Limits,
    batch: Overlay,
    current: Overlay,
    writable: bool,
    entry: EntryInfo,
    entropy: EntryEntropy,
    /// A store failure inside a host call: not the guest's fault, and not
    /// deterministic, so it fails the node instead of the entry.
    store_failure: Option<StoreError>,
}

impl CallContext {
    fn lookup(&mut self, key: &[u8]) -> wasmtime::Result<Option<Vec<u8>>> {
        if let Some(value) = self.current.get(key).or_else(|| self.batch.get(key)) {
            return Ok(value.clone());
        }
        self.store.state_get(&self.state_machine, key).map_err(|e| self.fail(e))
    }

    fn fail(&mut self, error: StoreError) -> wasmtime::Error {
        let message = error.to_string();
        self.store_failure = Some(error);
        wasmtime::Error::msg(message)
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> Result<(), kv::KvError> {
        if !self.writable {
            return Err(kv::KvError::ReadOnly);
        }
        if key.len() > self.limits.key_bytes {
            return Err(kv::KvError::TooLarge(format!(
                "key of {} bytes is above the limit of {}",
                key.len(),
                self.limits.key_bytes
            )));
        }
        if let Some(value) = &value
            && value.len() > self.limits.value_bytes
        {
            return Err(kv::KvError::TooLarge(format!(
                "value of {} bytes is above the limit of {}",
                value.len(),
                self.limits.value_bytes
            )));
        }
        if !self.current.contains_key(&key) && self.current.len() >= self.limits.writes_per_call {
            return Err(kv::KvError::TooLarge(format!(
                "more than {} keys written in one call",
                self.limits.writes_per_call
            )));
        }
        self.current.insert(key, value);
        Ok(())
    }

    fn scan(&mut self, start: Vec<u8>, end: Option<Vec<u8>>, limit: u32) -> wasmtime::Result<Vec<kv::Pair>> {
        let limit = limit as usize;
        let in_range = |key: &Vec<u8>| end.as_ref().is_none_or(|end| key < end);
        let range = (Bound::Included(start.clone()), end.clone().map_or(Bound::Unbounded, Bound::Excluded));
        let overlaid: Vec<(Vec<u8>, Option<Vec<u8>>)> = {
            let mut merged: Overlay = self.batch.range(range.clone()).map(|(k, v)| (k.clone(), v.clone())).collect();
            merged.extend(self.current.range(range).map(|(k, v)| (k.clone(), v.clone())));
            merged.into_iter().collect()
        };
        // Fetch enough from the store that deletions in the overlay cannot
        // leave us short of `limit` (see the module docs of `storage`).
        let fetch = limit.saturating_add(overlaid.len());
        let stored =
            self.store.state_scan(&self.state_machine, &start, end.as_deref(), fetch).map_err(|e| self.fail(e))?;
        let complete = stored.len() < fetch;
        let horizon = stored.last().map(|(k, _)| k.clone());
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
        for (key, value) in overlaid {
            // Past the last stored key we fetched, the store may hold keys we
            // did not see; only overlay keys up to it are comparable.
            if !complete && horizon.as_ref().is_some_and(|h| &key > h) {
                continue;
            }
            match value {
                Some(value) if in_range(&key) => {
                    merged.insert(key, value);
                }
                _ => {
                    merged.remove(&key);
                }
            }
        }
        Ok(merged.into_iter().take(limit).map(|(key, value)| kv::Pair { key, value }).collect())
    }
}

impl kv::Host for GuestState {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        self.call.lookup(&key)
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<Result<(), kv::KvError>> {
        Ok(self.call.write(key, Some(value)))
    }

    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<Result<(), kv::KvError>> {
        Ok(self.call.write(key, None))
    }

    fn scan(&mut self, start: Vec<u8>, end: Option<Vec<u8>>, limit: u32) -> wasmtime::Result<Vec<kv::Pair>> {
        self.call.scan(start, end, limit)
    }
}

impl context::Host for GuestState {
    fn entry(&mut self) -> wasmtime::Result<EntryInfo> {
        Ok(self.call.entry)
    }

    fn random_u64(&mut self) -> wasmtime::Result<u64> {
        Ok(self.call.entropy.next_u64())
    }

    fn log(&mut self, level: context::Level, message: String) -> wasmtime::Result<()> {
        let mut message = message;
        if message.len() > GUEST_LOG_LINE_MAX_BYTES {
            let mut cut = GUEST_LOG_LINE_MAX_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let (sm, index) = (self.call.state_machine.as_str(), self.call.entry.index);
        match level {
            context::Level::Trace => tracing::trace!(state_machine = sm, index, message, "guest"),
            context::Level::Debug => tracing::debug!(state_machine = sm, index, message, "guest"),
            context::Level::Info => tracing::info!(state_machine = sm, index, message, "guest"),
            context::Level::Warn => tracing::warn!(state_machine = sm, index, message, "guest"),
            context::Level::Error => tracing::error!(state_machine = sm, index, message, "guest"),
        }
        Ok(())
    }
}

struct Instance {
    store: wasmtime::Store<GuestState>,
    bindings: StateMachine,
}

/// A state machine bound to its module and its key space.
pub struct Machine {
    runtime: Arc<Runtime>,
    module: Arc<Module>,
    name: String,
    store: Store,
    entropy: EntryEntropy,
    instance: Option<Instance>,
    instantiations: u64,
}

/// Which export a call runs; also salts the entry's random seed so `apply`
/// and `migrate` in the same entry draw different numbers.
#[derive(Clone, Copy)]
enum CallKind {
    Apply = 1,
    Query = 2,
    Migrate = 3,
    WarmUp = 4,
}

impl Machine {
    /// A machine named `name` (its key space) running `module` over `store`.
    pub fn new(runtime: Arc<Runtime>, module: Arc<Module>, name: impl Into<String>, store: Store) -> Machine {
        Machine {
            runtime,
            module,
            name: name.into(),
            store,
            entropy: EntryEntropy::new(),
            instance: None,
            instantiations: 0,
        }
    }

    /// The module's content hash.
    pub fn module_hash(&self) -> [u8; 32] {
        self.module.hash()
    }

    /// How many instances were created (one, plus one after each trap).
    pub fn instantiations(&self) -> u64 {
        self.instantiations
    }

    /// Throws the instance away; the next call creates a fresh one. (Tests
    /// use this to show replies do not depend on instance reuse.)
    pub fn reset_instance(&mut self) {
        self.instance = None;
    }

    /// Applies a batch of committed commands in order. Returns one outcome per
    /// command and the writes of those that succeeded, to be made durable by
    /// the caller together with the applied index.
    pub fn apply_batch(
        &mut self,
        commands: &[(EntryInfo, &[u8])],
    ) -> Result<(Vec<ApplyOutcome>, Vec<StateWrite>), RuntimeError> {
        let mut outcomes = Vec::with_capacity(commands.len());
        let mut batch = Overlay::new();
        for (entry, command) in commands {
            let (outcome, writes) =
                self.call(*entry, true, CallKind::Apply, &mut batch, |b, s| b.call_apply(s, command))?;
            let outcome = outcome.and_then(|reply| reply.map_err(CallError::Returned));
            if outcome.is_ok() {
                batch.extend(writes);
            }
            outcomes.push(outcome);
        }
        Ok((outcomes, self.writes_of(batch)))
    }

    /// Answers a read at the last applied entry `at`. Writes are refused.
    pub fn query(&mut self, at: EntryInfo, request: &[u8]) -> Result<ApplyOutcome, RuntimeError> {
        let mut none = Overlay::new();
        let (outcome, _) = self.call(at, false, CallKind::Query, &mut none, |b, s| b.call_query(s, request))?;
        Ok(outcome.and_then(|reply| reply.map_err(CallError::Returned)))
    }

    /// Runs the migrate hook inside the activating entry; its writes apply
    /// only if it succeeds.
    pub fn migrate(
        &mut self,
        at: EntryInfo,
        previous: &str,
    ) -> Result<(Result<(), CallError>, Vec<StateWrite>), RuntimeError> {
        let mut none = Overlay::new();
        let (outcome, writes) =
            self.call(at, true, CallKind::Migrate, &mut none, |b, s| b.call_migrate(s, previous))?;
        let outcome = outcome.and_then(|r| r.map_err(CallError::Returned));
        let writes = if outcome.is_ok() { self.writes_of(writes) } else { Vec::new() };
        Ok((outcome, writes))
    }

    fn writes_of(&self, overlay: Overlay) -> Vec<StateWrite> {
        overlay.into_iter().map(|(key, value)| StateWrite { state_machine: self.name.clone(), key, value }).collect()
    }

    /// A fresh instance, its context already set to `entry`. Instantiation
    /// runs guest start code under the same fuel and limits as a call; its
    /// failure is the module's, identical on every node, so it is reported
    /// as that entry's error rather than failing the node.
    fn create_instance(
        &mut self,
        entry: EntryInfo,
        writable: bool,
    ) -> Result<Result<Instance, CallError>, RuntimeError> {
        let mut instance = match self.instantiate_plain(entry, writable)? {
            Ok(instance) => instance,
            Err(failure) => return Ok(Err(failure)),
        };
        if !self.warm_up(&mut instance, entry, writable)? {
            // A guest that traps on an empty query does so on every replica;
            // it runs without the warm-up, alike everywhere.
            return self.instantiate_plain(entry, writable);
        }
        Ok(Ok(instance))
    }

    /// Calls `query` with an empty request on a fresh instance, under a
    /// fixed context (entry 0, its own random seed), and throws the answer
    /// away. Language runtimes initialize lazily on their first call (CPython
    /// draws random bytes there); without this, the first real call of a
    /// fresh instance would see another random sequence than the same call
    /// on a replica whose instance is older. Returns false if it trapped.
    fn warm_up(&mut self, instance: &mut Instance, entry: EntryInfo, writable: bool) -> Result<bool, RuntimeError> {
        let fixed = EntryInfo { index: 0, term: 0, timestamp_ms: 0 };
        self.entropy.enter(0, 0, 0, CallKind::WarmUp as u8);
        {
            let call = &mut instance.store.data_mut().call;
            call.entry = fixed;
            call.writable = false;
        }
        instance.store.set_fuel(self.runtime.limits.fuel_per_call).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let result = instance.bindings.call_query(&mut instance.store, &[]);
        let data = instance.store.data_mut();
        if let Some(failure) = data.call.store_failure.take() {
            return Err(RuntimeError::Store(failure));
        }
        data.call.entry = entry;
        data.call.writable = writable;
        data.call.current.clear();
        data.limiter.refused = None;
        Ok(result.is_ok())
    }

    /// A wasmtime store for a new instance, with its limits and fuel.
    fn new_store(&self, entry: EntryInfo, writable: bool) -> Result<wasmtime::Store<GuestState>, RuntimeError> {
        let state = GuestState {
            wasi: wasi::build(&self.entropy),
            table: ResourceTable::new(),
            limiter: Limiter { limits: self.runtime.limits.clone(), refused: None },
            call: CallContext {
                store: self.store.clone(),
                state_machine: self.name.clone(),
                limits: self.runtime.limits.clone(),
                batch: Overlay::new(),
                current: Overlay::new(),
                writable,
                entry,
                entropy: self.entropy.clone(),
                store_failure: None,
            },
        };
        let mut store = wasmtime::Store::new(&self.runtime.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_fuel(self.runtime.limits.fuel_per_call).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        Ok(store)
    }

    fn instantiate_plain(
        &mut self,
        entry: EntryInfo,
        writable: bool,
    ) -> Result<Result<Instance, CallError>, RuntimeError> {
        let mut store = self.new_store(entry, writable)?;
        match self.module.pre.instantiate(&mut store) {
            Ok(bindings) => {
                self.instantiations += 1;
                Ok(Ok(Instance { store, bindings }))
            }
            Err(error) => {
                if let Some(failure) = store.data_mut().call.store_failure.take() {
                    return Err(RuntimeError::Store(failure));
                }
                Ok(Err(classify(&error, store.data_mut().limiter.refused.take())))
            }
        }
    }

    /// One guest call with fresh fuel, the entry's context and an empty
    /// `current` overlay over `batch`. Returns the call's result and writes.
    fn call<R>(
        &mut self,
        entry: EntryInfo,
        writable: bool,
        kind: CallKind,
        batch: &mut Overlay,
        f: impl FnOnce(&StateMachine, &mut wasmtime::Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<(Result<R, CallError>, Overlay), RuntimeError> {
        self.entropy.enter(entry.index, entry.term, entry.timestamp_ms, kind as u8);
        let fuel = self.runtime.limits.fuel_per_call;
        if self.instance.is_none() {
            match self.create_instance(entry, writable)? {
                Ok(instance) => {
                    // Start code may draw random numbers or read the clock
                    // (a language runtime seeding itself); the call must
                    // see the same sequence as on a replica whose instance
                    // is older, so it starts over from the entry's seed.
                    self.entropy.enter(entry.index, entry.term, entry.timestamp_ms, kind as u8);
                    self.instance = Some(instance);
                }
                Err(failure) => {
                    tracing::warn!(state_machine = %self.name, index = entry.index, error = %failure, "instantiating the guest failed");
                    return Ok((Err(failure), Overlay::new()));
                }
            }
        }
        let instance = self.instance.as_mut().expect("created above");
        {
            let call = &mut instance.store.data_mut().call;
            call.entry = entry;
            call.writable = writable;
            call.batch = std::mem::take(batch);
            call.current.clear();
            call.store_failure = None;
        }
        instance.store.data_mut().limiter.refused = None;
        instance.store.set_fuel(fuel).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let result = f(&instance.bindings, &mut instance.store);
        let data = instance.store.data_mut();
        *batch = std::mem::take(&mut data.call.batch);
        let writes = std::mem::take(&mut data.call.current);
        if let Some(failure) = data.call.store_failure.take() {
            self.instance = None;
            return Err(RuntimeError::Store(failure));
        }
        match result {
            Ok(value) => Ok((Ok(value), writes)),
            Err(error) => {
                let refused = data.limiter.refused.take();
                let failure = classify(&error, refused);
                tracing::warn!(state_machine = %self.name, index = entry.index, error = %failure, "guest call failed; re-creating its instance");
                // A trapped instance may be in any state: never reuse it.
                self.instance = None;
                Ok((Err(failure), Overlay::new()))
            }
        }
    }
}

fn classify(error: &wasmtime::Error, refused: Option<String>) -> CallError {
    if let Some(what) = refused {
        return CallError::OutOfMemory(what);
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => CallError::OutOfFuel,
        Some(trap) => CallError::Trapped(trap.to_string()),
        // The root cause carries the guest's message without backtraces or
        // addresses, so it is the same on every node.
        None => CallError::Trapped(error.root_cause().to_string()),
    }
}
