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
use crate::storage::{StateChange, StateWrite, Store, StoreError};
use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow};
use std::sync::Arc;
use wasmtime::Trap;
use wasmtime::component::ResourceTable;

pub use super::raft::host::context::EntryInfo;

/// Longest guest log line kept; the rest is cut.
const GUEST_LOG_LINE_MAX_BYTES: usize = 4096;

/// `message` cut to at most `limit` bytes (on a character boundary), saying
/// how much was cut.
fn cut(mut message: String, limit: usize) -> String {
    if message.len() <= limit {
        return message;
    }
    let total = message.len();
    let mut end = limit.saturating_sub(64);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(&format!("… ({} of {total} bytes cut)", total - end));
    message
}

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
    /// The guest went over a budget on what it makes the host do (bytes
    /// written, read or scanned, the size of its reply): the same on every
    /// replica, and the call fails as if it had trapped.
    OverBudget(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Returned(message) => write!(f, "{message}"),
            CallError::OutOfFuel => write!(f, "the state machine ran out of fuel (it ran too long) and was stopped"),
            CallError::OutOfMemory(what) => write!(f, "the state machine exceeded its memory limit: {what}"),
            CallError::Trapped(what) => write!(f, "the state machine trapped: {what}"),
            CallError::OverBudget(what) => write!(f, "the state machine went over a host-call budget: {what}"),
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
    /// What an apply call read from the store (keys neither it nor the
    /// batch had written): the values its writes replace, for the change
    /// history, which then needs no second lookup.
    store_reads: Overlay,
    writable: bool,
    entry: EntryInfo,
    entropy: EntryEntropy,
    /// A store failure inside a host call: not the guest's fault, and not
    /// deterministic, so it fails the node instead of the entry.
    store_failure: Option<StoreError>,
    /// Bytes the call has written (its overlay's keys and values) and read.
    written_bytes: usize,
    read_bytes: usize,
    /// The budget the call went over, which ended it.
    over_budget: Option<String>,
}

/// Hands an overlay's pair to `emit`; a deletion hides the stored pair and
/// yields nothing.
fn emit_written(
    emit: &mut impl FnMut(Vec<u8>, Vec<u8>) -> ControlFlow<()>,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
) -> ControlFlow<()> {
    value.map_or(ControlFlow::Continue(()), |value| emit(key, value))
}

/// Bytes a key and its value (or its deletion) hold in an overlay.
fn pair_bytes(key: &[u8], value: &Option<Vec<u8>>) -> usize {
    key.len() + value.as_ref().map_or(0, Vec::len)
}

/// The writes of the commands applied so far in one batch: later commands
/// of the batch see them, and the caller makes them durable together.
#[derive(Default)]
pub struct WriteBatch {
    overlay: Overlay,
    bytes: usize,
    /// Each command's writes, in apply order, with its entry's index and,
    /// when known here, the value each replaced: the overlay keeps only
    /// each key's last value, a watcher sees them all.
    changes: Vec<BatchChange>,
}

/// A [`StateChange`] before its state machine is named.
struct BatchChange {
    index: u64,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    previous: Option<Option<Vec<u8>>>,
}

impl WriteBatch {
    /// Bytes of keys and values the batch holds and will write: each key's
    /// last value, and each change with the value it replaced.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds a command's `writes` (made at `index`); `reads` are the values
    /// it read from the store, which its writes replace.
    fn extend(&mut self, index: u64, writes: Overlay, mut reads: Overlay) {
        for (key, value) in writes {
            // Every change is kept (and made a history record with the
            // value it replaced), not only each key's last: a run of
            // commands rewriting the same keys is bounded by all of them.
            let added = pair_bytes(&key, &value);
            self.bytes += 2 * added;
            // The overlay's last value for the key is what this write
            // replaced, else the value the command read from the store.
            let previous = match self.overlay.insert(key.clone(), value.clone()) {
                Some(earlier) => {
                    self.bytes -= pair_bytes(&key, &earlier);
                    Some(earlier)
                }
                None => reads.remove(&key),
            };
            self.bytes += added;
            self.changes.push(BatchChange { index, key, value, previous });
        }
    }

    /// The batch's writes, for `state_machine`'s key space: each key's
    /// last value, and every command's writes in apply order with their
    /// entries' indexes (the change history's records).
    pub fn into_writes(self, state_machine: &str) -> (Vec<StateWrite>, Vec<StateChange>) {
        let name: Arc<str> = Arc::from(state_machine);
        let last = self
            .overlay
            .into_iter()
            .map(|(key, value)| StateWrite { state_machine: name.clone(), key, value })
            .collect();
        let changes = self
            .changes
            .into_iter()
            .map(|BatchChange { index, key, value, previous }| StateChange {
                index,
                write: StateWrite { state_machine: name.clone(), key, value },
                previous,
            })
            .collect();
        (last, changes)
    }
}

impl CallContext {
    fn lookup(&mut self, key: &[u8]) -> wasmtime::Result<Option<Vec<u8>>> {
        let value = match self.current.get(key).or_else(|| self.batch.get(key)) {
            Some(value) => value.clone(),
            None => {
                let stored = self.store.state_get(&self.state_machine, key).map_err(|e| self.fail(e))?;
                if self.writable {
                    self.store_reads.insert(key.to_vec(), stored.clone());
                }
                stored
            }
        };
        self.count_read(value.as_ref().map_or(0, Vec::len))?;
        Ok(value)
    }

    fn fail(&mut self, error: StoreError) -> wasmtime::Error {
        let message = error.to_string();
        self.store_failure = Some(error);
        wasmtime::Error::msg(message)
    }

    /// A new call starts with its budgets whole.
    fn start_call(&mut self) {
        self.written_bytes = 0;
        self.read_bytes = 0;
        self.over_budget = None;
    }

    /// Ends the call: it went over a budget.
    fn over(&mut self, what: String) -> wasmtime::Error {
        self.over_budget = Some(what.clone());
        wasmtime::Error::msg(what)
    }

    fn count_read(&mut self, bytes: usize) -> wasmtime::Result<()> {
        self.read_bytes = self.read_bytes.saturating_add(bytes);
        if self.read_bytes > self.limits.read_bytes_per_call {
            let limit = self.limits.read_bytes_per_call;
            return Err(self.over(format!("it read more than {limit} bytes in one call")));
        }
        Ok(())
    }

    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) -> wasmtime::Result<Result<(), kv::KvError>> {
        if !self.writable {
            return Ok(Err(kv::KvError::ReadOnly));
        }
        if key.len() > self.limits.key_bytes {
            return Ok(Err(kv::KvError::TooLarge(format!(
                "key of {} bytes is above the limit of {}",
                key.len(),
                self.limits.key_bytes
            ))));
        }
        if let Some(value) = &value
            && value.len() > self.limits.value_bytes
        {
            return Ok(Err(kv::KvError::TooLarge(format!(
                "value of {} bytes is above the limit of {}",
                value.len(),
                self.limits.value_bytes
            ))));
        }
        let replaced = self.current.get(&key).map(|old| pair_bytes(&key, old));
        if replaced.is_none() && self.current.len() >= self.limits.writes_per_call {
            return Ok(Err(kv::KvError::TooLarge(format!(
                "more than {} keys written in one call",
                self.limits.writes_per_call
            ))));
        }
        let written = self.written_bytes - replaced.unwrap_or(0) + pair_bytes(&key, &value);
        if written > self.limits.write_bytes_per_call {
            let limit = self.limits.write_bytes_per_call;
            return Err(self.over(format!("it wrote more than {limit} bytes of keys and values in one call")));
        }
        self.written_bytes = written;
        self.current.insert(key, value);
        Ok(Ok(()))
    }

    /// The pairs in `[start, end)`: the call's own writes over the batch's
    /// over the store, merged in key order while the store is read one pair
    /// at a time, so only the answer is ever held.
    fn scan(&mut self, start: Vec<u8>, end: Option<Vec<u8>>, limit: u32) -> wasmtime::Result<Vec<kv::Pair>> {
        if limit > self.limits.scan_pairs_max {
            let most = self.limits.scan_pairs_max;
            return Err(self.over(format!(
                "a scan asked for {limit} pairs, above the limit of {most}; page through the range with a smaller limit"
            )));
        }
        let limit = limit as usize;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let range = (Bound::Included(start.clone()), end.clone().map_or(Bound::Unbounded, Bound::Excluded));
        let mut overlay: Overlay = self.batch.range(range.clone()).map(|(k, v)| (k.clone(), v.clone())).collect();
        overlay.extend(self.current.range(range).map(|(k, v)| (k.clone(), v.clone())));
        let mut overlay = overlay.into_iter().peekable();
        let cap = self.limits.scan_bytes_max;
        let (mut out, mut bytes, mut over_cap) = (Vec::new(), 0usize, false);
        let mut emit = |key: Vec<u8>, value: Vec<u8>| {
            bytes += key.len() + value.len();
            if bytes > cap {
                over_cap = true;
                return ControlFlow::Break(());
            }
            out.push(kv::Pair { key, value });
            if out.len() >= limit { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        };
        let mut stopped = false;
        let scanned = self.store.state_scan_each(&self.state_machine, &start, end.as_deref(), |key, value| {
            while let Some((own, written)) = overlay.next_if(|(own, _)| *own < key) {
                if emit_written(&mut emit, own, written).is_break() {
                    stopped = true;
                    return ControlFlow::Break(());
                }
            }
            let flow = match overlay.next_if(|(own, _)| *own == key) {
                Some((own, written)) => emit_written(&mut emit, own, written),
                None => emit(key, value),
            };
            stopped = flow.is_break();
            flow
        });
        scanned.map_err(|e| self.fail(e))?;
        if !stopped {
            for (own, written) in overlay {
                if emit_written(&mut emit, own, written).is_break() {
                    break;
                }
            }
        }
        if over_cap {
            return Err(self.over(format!(
                "a scan would return more than {cap} bytes; page through the range with a smaller limit"
            )));
        }
        self.count_read(bytes)?;
        Ok(out)
    }
}

impl kv::Host for GuestState {
    fn get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        self.call.lookup(&key)
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) -> wasmtime::Result<Result<(), kv::KvError>> {
        self.call.write(key, Some(value))
    }

    fn delete(&mut self, key: Vec<u8>) -> wasmtime::Result<Result<(), kv::KvError>> {
        self.call.write(key, None)
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
    retried_on_fresh: u64,
    last_fuel_used: u64,
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
            retried_on_fresh: 0,
            last_fuel_used: 0,
        }
    }

    /// Fuel the last call used (what `--fuel-per-call` budgets; a call out
    /// of fuel used all of it).
    pub fn last_fuel_used(&self) -> u64 {
        self.last_fuel_used
    }

    /// The module's content hash.
    pub fn module_hash(&self) -> [u8; 32] {
        self.module.hash()
    }

    /// How many instances were created (one, plus one after each trap, plus
    /// one for each call run again on a fresh instance).
    pub fn instantiations(&self) -> u64 {
        self.instantiations
    }

    /// How many failed calls ran again on a fresh instance because the
    /// instance they failed on had served earlier calls.
    pub fn retried_on_fresh(&self) -> u64 {
        self.retried_on_fresh
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
        let mut batch = WriteBatch::default();
        let mut outcomes = Vec::with_capacity(commands.len());
        for (entry, command) in commands {
            outcomes.push(self.apply(*entry, command, &mut batch)?);
        }
        Ok((outcomes, batch.into_writes(&self.name).0))
    }

    /// Applies one committed command over `batch` (the writes of the
    /// commands before it in the same batch); its writes join the batch if
    /// it succeeds.
    pub fn apply(
        &mut self,
        entry: EntryInfo,
        command: &[u8],
        batch: &mut WriteBatch,
    ) -> Result<ApplyOutcome, RuntimeError> {
        let (outcome, writes) =
            self.call(entry, true, CallKind::Apply, &mut batch.overlay, |b, s| b.call_apply(s, command))?;
        let outcome = self.reply_within_limits(outcome);
        if outcome.is_ok() {
            let reads = self.instance.as_mut().map(|i| std::mem::take(&mut i.store.data_mut().call.store_reads));
            batch.extend(entry.index, writes, reads.unwrap_or_default());
        }
        Ok(outcome)
    }

    /// Answers a read at the last applied entry `at`. Writes are refused.
    pub fn query(&mut self, at: EntryInfo, request: &[u8]) -> Result<ApplyOutcome, RuntimeError> {
        let mut none = Overlay::new();
        let (outcome, _) = self.call(at, false, CallKind::Query, &mut none, |b, s| b.call_query(s, request))?;
        Ok(self.reply_within_limits(outcome))
    }

    /// A call's answer under the reply limit: a longer reply fails the call
    /// (it would be kept in the session table and sent to a client), a
    /// longer error message is cut.
    fn reply_within_limits(&self, outcome: Result<Result<Vec<u8>, String>, CallError>) -> ApplyOutcome {
        let limit = self.runtime.limits.reply_bytes_max;
        match outcome {
            Ok(Ok(reply)) if reply.len() > limit => {
                Err(CallError::OverBudget(format!("its reply of {} bytes is above the limit of {limit}", reply.len())))
            }
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(message)) => Err(CallError::Returned(cut(message, limit))),
            Err(failure) => Err(failure),
        }
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
        let limit = self.runtime.limits.reply_bytes_max;
        let outcome = outcome.and_then(|r| r.map_err(|message| CallError::Returned(cut(message, limit))));
        let mut batch = WriteBatch::default();
        if outcome.is_ok() {
            batch.extend(at.index, writes, Overlay::new());
        }
        Ok((outcome, batch.into_writes(&self.name).0))
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
        data.call.start_call();
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
                store_reads: Overlay::new(),
                current: Overlay::new(),
                writable,
                entry,
                entropy: self.entropy.clone(),
                store_failure: None,
                written_bytes: 0,
                read_bytes: 0,
                over_budget: None,
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
    ///
    /// A call that fails on an instance that served earlier calls runs again
    /// on a fresh instance, and that run decides. An old instance carries
    /// what its earlier calls left in its memory (a garbage collector that
    /// fell behind, a cache), so whether it runs out of memory or fuel
    /// depends on its age, and ages differ between replicas (a member that
    /// restarted holds a younger instance). A fresh instance's run depends
    /// only on the module, the entry and the store: the same everywhere.
    fn call<R>(
        &mut self,
        entry: EntryInfo,
        writable: bool,
        kind: CallKind,
        batch: &mut Overlay,
        f: impl Fn(&StateMachine, &mut wasmtime::Store<GuestState>) -> wasmtime::Result<R>,
    ) -> Result<(Result<R, CallError>, Overlay), RuntimeError> {
        let reused = self.instance.is_some();
        let (outcome, writes) = self.call_once(entry, writable, kind, batch, &f)?;
        match outcome {
            Err(CallError::Returned(message)) => Ok((Err(CallError::Returned(message)), writes)),
            Err(failure) if reused => {
                tracing::info!(state_machine = %self.name, index = entry.index, error = %failure, "running the call again on a fresh instance, whose verdict every replica shares");
                self.retried_on_fresh += 1;
                self.call_once(entry, writable, kind, batch, &f)
            }
            outcome => Ok((outcome, writes)),
        }
    }

    fn call_once<R>(
        &mut self,
        entry: EntryInfo,
        writable: bool,
        kind: CallKind,
        batch: &mut Overlay,
        f: &impl Fn(&StateMachine, &mut wasmtime::Store<GuestState>) -> wasmtime::Result<R>,
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
            call.store_reads.clear();
            call.store_failure = None;
            call.start_call();
        }
        instance.store.data_mut().limiter.refused = None;
        instance.store.set_fuel(fuel).map_err(|e| RuntimeError::Engine(e.to_string()))?;
        let result = f(&instance.bindings, &mut instance.store);
        self.last_fuel_used = fuel.saturating_sub(instance.store.get_fuel().unwrap_or(0));
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
                let failure = match data.call.over_budget.take() {
                    Some(what) => CallError::OverBudget(what),
                    None => classify(&error, refused),
                };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{ApplyBatch, Durability, Identity, StoreOptions};

    fn context(limits: Limits) -> (tempfile::TempDir, CallContext) {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = StoreOptions { durability: Durability::UnsafeNoSync, ..StoreOptions::default() };
        let store = Store::open(dir.path(), &Identity::new("c", 1), &options).expect("store");
        let context = CallContext {
            store,
            state_machine: "sm".into(),
            limits,
            batch: Overlay::new(),
            store_reads: Overlay::new(),
            current: Overlay::new(),
            writable: true,
            entry: EntryInfo { index: 1, term: 1, timestamp_ms: 0 },
            entropy: EntryEntropy::new(),
            store_failure: None,
            written_bytes: 0,
            read_bytes: 0,
            over_budget: None,
        };
        (dir, context)
    }

    fn keys(pairs: &[kv::Pair]) -> Vec<&str> {
        pairs.iter().map(|p| std::str::from_utf8(&p.key).expect("utf-8")).collect()
    }

    #[test]
    fn a_scan_merges_the_calls_writes_the_batch_and_the_store_in_key_order() {
        let (_dir, mut call) = context(Limits::default());
        let writes = ["a", "b", "c", "e", "g"]
            .iter()
            .map(|k| StateWrite { state_machine: "sm".into(), key: k.as_bytes().to_vec(), value: Some(b"s".to_vec()) })
            .collect();
        call.store
            .apply(&ApplyBatch { applied_index: 1, applied_term: 1, writes, ..ApplyBatch::default() })
            .expect("store");
        // The batch deletes b and adds d; the call deletes e, adds a0 and overwrites c.
        call.batch.insert(b"b".to_vec(), None);
        call.batch.insert(b"d".to_vec(), Some(b"batch".to_vec()));
        call.write(b"e".to_vec(), None).expect("budget").expect("write");
        call.write(b"a0".to_vec(), Some(b"call".to_vec())).expect("budget").expect("write");
        call.write(b"c".to_vec(), Some(b"call".to_vec())).expect("budget").expect("write");
        let all = call.scan(Vec::new(), None, 100).expect("scan");
        assert_eq!(keys(&all), ["a", "a0", "c", "d", "g"]);
        assert_eq!(all[2].value, b"call", "the call's own write wins");
        assert_eq!(keys(&call.scan(b"a0".to_vec(), Some(b"g".to_vec()), 100).expect("scan")), ["a0", "c", "d"]);
        assert_eq!(keys(&call.scan(Vec::new(), None, 2).expect("scan")), ["a", "a0"], "the limit holds");
        assert_eq!(keys(&call.scan(b"d".to_vec(), None, 100).expect("scan")), ["d", "g"], "past the overlay");
        assert!(call.scan(Vec::new(), None, 0).expect("scan").is_empty());
    }

    #[test]
    fn budgets_end_the_call_with_what_was_exceeded() {
        let limits = Limits {
            write_bytes_per_call: 100,
            read_bytes_per_call: 100,
            scan_bytes_max: 50,
            scan_pairs_max: 5,
            ..Limits::default()
        };
        let (_dir, mut call) = context(limits);
        call.write(b"k".to_vec(), Some(vec![0; 60])).expect("within").expect("write");
        call.write(b"k".to_vec(), Some(vec![0; 90])).expect("overwriting counts once").expect("write");
        assert!(call.write(b"j".to_vec(), Some(vec![0; 20])).is_err(), "91 + 21 bytes is over 100");
        assert!(call.over_budget.take().is_some_and(|m| m.contains("wrote more than 100 bytes")));
        call.start_call();
        assert!(call.scan(Vec::new(), None, 6).is_err(), "6 pairs asked for, 5 allowed");
        call.start_call();
        call.current.clear();
        call.batch.insert(b"a".to_vec(), Some(vec![0; 30]));
        call.batch.insert(b"b".to_vec(), Some(vec![0; 30]));
        assert_eq!(call.scan(Vec::new(), None, 1).expect("31 bytes").len(), 1);
        assert!(call.scan(Vec::new(), None, 5).is_err(), "62 bytes over the scan cap of 50");
        call.start_call();
        call.lookup(b"a").expect("30 bytes");
        call.lookup(b"a").expect("60 bytes");
        call.lookup(b"a").expect("90 bytes");
        assert!(call.lookup(b"a").is_err(), "120 bytes read is over 100");
        assert!(call.over_budget.is_some_and(|m| m.contains("read more than 100 bytes")));
    }
}
