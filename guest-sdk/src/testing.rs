//! A host in memory, so `cargo test` runs a state machine's logic on the
//! machine, with no cluster and no WebAssembly build (as CosmWasm's
//! `mock_dependencies` does for its contracts).
//!
//! [`TestHost`] keeps the store, the log position and the clock the way a
//! member would for the calls it makes: each `apply` is a transaction that
//! sees its own writes and keeps them only if it returns `Ok` (a panic, the
//! stand-in for a trap, keeps none either); `query` cannot write; keys,
//! values and scans are held to the host's default limits. Time and
//! randomness come from the entry, as on a member, though the random
//! numbers are not the host's sequence. The store is per thread: tests
//! running side by side each have their own.
//!
//! ```
//! use raft_guest::{StateMachine, kv, testing::TestHost};
//!
//! struct Greeter;
//! impl StateMachine for Greeter {
//!     fn apply(name: &[u8]) -> Result<Vec<u8>, String> {
//!         kv::set(b"last", name)?;
//!         Ok([b"hello ", name].concat())
//!     }
//!     fn query(_: &[u8]) -> Result<Vec<u8>, String> {
//!         Ok(kv::get(b"last").unwrap_or_default())
//!     }
//! }
//!
//! let mut host = TestHost::<Greeter>::new();
//! assert_eq!(host.apply(b"ann"), Ok(b"hello ann".to_vec()));
//! assert_eq!(host.query(b""), Ok(b"ann".to_vec()));
//! assert_eq!(host.entry().index, 1);
//! ```

use crate::StateMachine;
use crate::bindings::raft::host::context::{EntryInfo, Level};
use crate::bindings::raft::host::kv::{KvError, Pair};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::marker::PhantomData;

/// The host's default limits (see the rules in `wit/raft-host.wit`).
pub const KEY_MAX_BYTES: usize = 4 << 10;
pub const VALUE_MAX_BYTES: usize = 4 << 20;
pub const SCAN_PAIRS_MAX: u32 = 10_000;

/// What one thread's host holds.
#[derive(Default)]
struct Host {
    committed: BTreeMap<Vec<u8>, Vec<u8>>,
    /// The writes of the call under way (`None`: a delete).
    current: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    writable: bool,
    entry: Option<EntryInfo>,
    /// The clock the next entry is stamped with.
    next_timestamp_ms: u64,
    random_state: u64,
}

thread_local! {
    static HOST: RefCell<Host> = RefCell::new(Host::default());
}

fn with<T>(f: impl FnOnce(&mut Host) -> T) -> T {
    HOST.with(|host| f(&mut host.borrow_mut()))
}

/// A state machine `M` on a host in memory (see the module docs).
pub struct TestHost<M: StateMachine> {
    machine: PhantomData<M>,
}

impl<M: StateMachine> Default for TestHost<M> {
    fn default() -> Self {
        Self::new()
    }
}

/// Ends a call: its writes go unless it committed them.
struct CallGuard;

impl Drop for CallGuard {
    fn drop(&mut self) {
        with(|host| {
            host.current.clear();
            host.writable = false;
        });
    }
}

impl<M: StateMachine> TestHost<M> {
    /// An empty store at log index 0, the clock at 0, for this thread.
    pub fn new() -> Self {
        with(|host| *host = Host::default());
        TestHost { machine: PhantomData }
    }

    /// Applies `command` as the next log entry: its writes stay only if it
    /// returns `Ok`.
    pub fn apply(&mut self, command: &[u8]) -> Result<Vec<u8>, String> {
        self.in_entry(1, M::apply, command)
    }

    /// Runs `migrate(previous)` inside the next log entry, as an activation
    /// does: its writes stay only if it succeeds.
    pub fn migrate(&mut self, previous: &str) -> Result<(), String> {
        self.in_entry(3, |previous: &str| M::migrate(previous), previous)
    }

    /// Answers `request` at the last applied entry; writes are refused.
    pub fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let _guard = CallGuard;
        with(|host| {
            let entry = host.entry.unwrap_or(EntryInfo { index: 0, term: 1, timestamp_ms: host.next_timestamp_ms });
            host.random_state = seed(&entry, 2);
        });
        M::query(request)
    }

    /// Stamps the next entries with this time (milliseconds since the Unix
    /// epoch); the host's clock never goes back, so neither does this one.
    pub fn set_time_ms(&mut self, timestamp_ms: u64) {
        with(|host| host.next_timestamp_ms = host.next_timestamp_ms.max(timestamp_ms));
    }

    /// The last applied entry (index 0 before the first).
    pub fn entry(&self) -> EntryInfo {
        with(|host| host.entry.unwrap_or(EntryInfo { index: 0, term: 1, timestamp_ms: host.next_timestamp_ms }))
    }

    /// A key's committed value.
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        with(|host| host.committed.get(key).cloned())
    }

    /// Writes a key directly, as earlier entries would have (to set a test up).
    pub fn insert(&mut self, key: &[u8], value: &[u8]) {
        with(|host| host.committed.insert(key.to_vec(), value.to_vec()));
    }

    /// Every committed pair, in key order.
    pub fn state(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        with(|host| host.committed.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn in_entry<A: ?Sized, R>(
        &mut self,
        kind: u64,
        call: impl FnOnce(&A) -> Result<R, String>,
        arg: &A,
    ) -> Result<R, String> {
        let _guard = CallGuard;
        with(|host| {
            let index = host.entry.map_or(1, |entry| entry.index + 1);
            let entry = EntryInfo { index, term: 1, timestamp_ms: host.next_timestamp_ms };
            host.entry = Some(entry);
            host.random_state = seed(&entry, kind);
            host.current.clear();
            host.writable = true;
        });
        let result = call(arg);
        if result.is_ok() {
            with(|host| {
                for (key, value) in std::mem::take(&mut host.current) {
                    match value {
                        Some(value) => host.committed.insert(key, value),
                        None => host.committed.remove(&key),
                    };
                }
            });
        }
        result
    }
}

/// The seed of an entry's random sequence (splitmix64 over its position).
fn seed(entry: &EntryInfo, kind: u64) -> u64 {
    let mut state = entry.index ^ entry.term.rotate_left(21) ^ entry.timestamp_ms.rotate_left(42) ^ kind;
    next(&mut state)
}

fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `kv` import, in memory.
pub(crate) mod kv {
    use super::*;

    pub fn get(key: &[u8]) -> Option<Vec<u8>> {
        with(|host| match host.current.get(key) {
            Some(written) => written.clone(),
            None => host.committed.get(key).cloned(),
        })
    }

    fn check_write(host: &Host, key: &[u8], value: Option<&[u8]>) -> Result<(), KvError> {
        if !host.writable {
            return Err(KvError::ReadOnly);
        }
        if key.len() > KEY_MAX_BYTES {
            return Err(KvError::TooLarge(format!("key of {} bytes is above the limit of {KEY_MAX_BYTES}", key.len())));
        }
        if let Some(value) = value
            && value.len() > VALUE_MAX_BYTES
        {
            return Err(KvError::TooLarge(format!(
                "value of {} bytes is above the limit of {VALUE_MAX_BYTES}",
                value.len()
            )));
        }
        Ok(())
    }

    pub fn set(key: &[u8], value: &[u8]) -> Result<(), KvError> {
        with(|host| {
            check_write(host, key, Some(value))?;
            host.current.insert(key.to_vec(), Some(value.to_vec()));
            Ok(())
        })
    }

    pub fn delete(key: &[u8]) -> Result<(), KvError> {
        with(|host| {
            check_write(host, key, None)?;
            host.current.insert(key.to_vec(), None);
            Ok(())
        })
    }

    pub fn scan(start: &[u8], end: Option<&[u8]>, limit: u32) -> Vec<Pair> {
        // The host ends a call that asks for more; a test sees it as a panic.
        assert!(limit <= SCAN_PAIRS_MAX, "scan asked for {limit} pairs, above the limit of {SCAN_PAIRS_MAX}");
        with(|host| {
            let in_range = |key: &[u8]| key >= start && end.is_none_or(|end| key < end);
            let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = host
                .committed
                .iter()
                .filter(|(key, _)| in_range(key))
                .map(|(key, value)| (key.clone(), Some(value.clone())))
                .collect();
            for (key, value) in host.current.iter().filter(|(key, _)| in_range(key)) {
                merged.insert(key.clone(), value.clone());
            }
            merged
                .into_iter()
                .filter_map(|(key, value)| Some(Pair { key, value: value? }))
                .take(limit as usize)
                .collect()
        })
    }
}

/// The `context` import, in memory.
pub(crate) mod context {
    use super::*;

    pub fn entry() -> EntryInfo {
        with(|host| host.entry.unwrap_or(EntryInfo { index: 0, term: 1, timestamp_ms: host.next_timestamp_ms }))
    }

    pub fn random_u64() -> u64 {
        with(|host| next(&mut host.random_state))
    }

    pub fn log(level: Level, message: &str) {
        eprintln!("[guest {level:?}] {message}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv as guest_kv;

    struct Ledger;

    impl StateMachine for Ledger {
        fn apply(command: &[u8]) -> Result<Vec<u8>, String> {
            let text = std::str::from_utf8(command).map_err(|e| e.to_string())?;
            let (op, key) = text.split_once(' ').unwrap_or((text, ""));
            match op {
                "put" => guest_kv::set(key.as_bytes(), b"1")?,
                "del" => guest_kv::delete(key.as_bytes())?,
                "put-then-fail" => {
                    guest_kv::set(key.as_bytes(), b"1")?;
                    assert_eq!(guest_kv::get(key.as_bytes()), Some(b"1".to_vec()), "a call sees its own writes");
                    return Err("refused".into());
                }
                "random" => return Ok(crate::context::random_u64().to_be_bytes().to_vec()),
                _ => return Err(format!("unknown op {op}")),
            }
            Ok(Vec::new())
        }

        fn query(request: &[u8]) -> Result<Vec<u8>, String> {
            if request == b"write" {
                return guest_kv::set(b"x", b"1").map(|()| Vec::new());
            }
            let keys: Vec<Vec<u8>> = guest_kv::scan(b"", None, 100).into_iter().map(|(k, _)| k).collect();
            Ok(keys.join(&b','))
        }
    }

    #[test]
    fn applies_are_transactions_queries_are_read_only_and_entries_move_on() {
        let mut host = TestHost::<Ledger>::new();
        host.apply(b"put a").expect("put");
        host.apply(b"put b").expect("put");
        assert_eq!(host.apply(b"put-then-fail c"), Err("refused".into()));
        assert_eq!(host.get(b"c"), None, "a failed apply's writes are discarded");
        host.apply(b"del a").expect("delete");
        assert_eq!(host.query(b""), Ok(b"b".to_vec()));
        assert!(host.query(b"write").expect_err("read-only").contains("read-only"));
        assert_eq!(host.entry().index, 4, "every apply is an entry, failed or not");
        let key = vec![b'k'; KEY_MAX_BYTES + 1];
        assert!(guest_kv::get(&key).is_none());
        let err = host.apply(&[b"put ".as_slice(), &key].concat()).expect_err("too large");
        assert!(err.contains("above the limit"), "{err}");
    }

    #[test]
    fn randomness_and_time_come_from_the_entry() {
        let mut host = TestHost::<Ledger>::new();
        host.set_time_ms(1_000);
        let first = host.apply(b"random").expect("random");
        let second = host.apply(b"random").expect("random");
        assert_ne!(first, second, "each entry draws its own");
        assert_eq!(host.entry().timestamp_ms, 1_000);
        host.set_time_ms(10);
        assert_eq!(host.entry().timestamp_ms, 1_000, "the clock never goes back");
        let mut again = TestHost::<Ledger>::new();
        again.set_time_ms(1_000);
        assert_eq!(again.apply(b"random").expect("random"), first, "the same entry, the same numbers");
    }
}
