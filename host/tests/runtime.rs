//! The WebAssembly runtime against real guests built from `guests/`: the kv,
//! counter and bank examples, hostile guests, modules that must be refused,
//! transactional applies, and determinism across instance reuse.

use raft_host::runtime::{CallError, EntryInfo, Limits, LoadError, LoadState, Machine, Runtime};
use raft_host::storage::{ApplyBatch, Durability, Identity, Store, StoreOptions};
use std::sync::Arc;
use std::time::Duration;

struct Harness {
    machine: Machine,
    store: Store,
    next_index: u64,
    _dir: tempfile::TempDir,
}

fn limits() -> Limits {
    // A smaller fuel budget keeps the runaway-loop tests quick.
    Limits { fuel_per_call: 20_000_000, memory_bytes: 32 << 20, ..Limits::default() }
}

/// A store without fsync in a temporary directory (kept alive by the first).
fn temporary_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions { durability: Durability::UnsafeNoSync, ..StoreOptions::default() };
    let store = Store::open(dir.path(), &Identity::new("rt", 1), &options).expect("store");
    (dir, store)
}

fn harness_with(runtime: Arc<Runtime>, bytes: &[u8], name: &str) -> Harness {
    let (dir, store) = temporary_store();
    let module = runtime.load(bytes).expect("module loads");
    Harness { machine: Machine::new(runtime, module, name, store.clone()), store, next_index: 1, _dir: dir }
}

fn harness(bytes: &[u8]) -> Harness {
    harness_with(Arc::new(Runtime::new(limits()).expect("runtime")), bytes, "sm")
}

fn entry(index: u64) -> EntryInfo {
    EntryInfo { index, term: 1, timestamp_ms: 1_700_000_000_000 + index * 10 }
}

impl Harness {
    /// Applies commands as one batch and makes the writes durable.
    fn apply_all(&mut self, commands: &[&[u8]]) -> Vec<Result<Vec<u8>, CallError>> {
        let batch: Vec<(EntryInfo, &[u8])> =
            commands.iter().enumerate().map(|(i, c)| (entry(self.next_index + i as u64), *c)).collect();
        let (outcomes, writes) = self.machine.apply_batch(&batch).expect("runtime works");
        let last = self.next_index + commands.len() as u64 - 1;
        self.store
            .apply(&ApplyBatch { applied_index: last, applied_term: 1, clock_ms: 0, writes, ..ApplyBatch::default() })
            .expect("store");
        self.next_index = last + 1;
        outcomes
    }

    fn apply(&mut self, command: &str) -> Result<String, CallError> {
        let outcome = self.apply_all(&[command.as_bytes()]).remove(0);
        outcome.map(|bytes| String::from_utf8(bytes).expect("utf-8 reply"))
    }

    fn query(&mut self, request: &str) -> Result<String, CallError> {
        let at = entry(self.next_index - 1);
        let outcome = self.machine.query(at, request.as_bytes()).expect("runtime works");
        outcome.map(|bytes| String::from_utf8(bytes).expect("utf-8 reply"))
    }
}

#[test]
fn kv_guest_puts_gets_deletes_and_compares_and_swaps() {
    let mut h = harness(raft_guests::KV);
    assert_eq!(h.apply(r#"{"op":"put","key":"a","value":"1"}"#).unwrap(), r#"{"previous":null}"#);
    assert_eq!(h.apply(r#"{"op":"put","key":"a","value":"2"}"#).unwrap(), r#"{"previous":"1"}"#);
    assert_eq!(h.query(r#"{"op":"get","key":"a"}"#).unwrap(), r#"{"value":"2"}"#);
    // Asked not to, a put answers without the value it replaced.
    assert_eq!(h.apply(r#"{"op":"put","key":"q","value":"1","return_previous":false}"#).unwrap(), "{}");
    assert_eq!(h.apply(r#"{"op":"put","key":"q","value":"2","return_previous":true}"#).unwrap(), r#"{"previous":"1"}"#);
    assert!(h.apply(r#"{"op":"put","key":"q","value":"3","return_previous":"no"}"#).is_err());
    assert_eq!(h.query(r#"{"op":"get","key":"zz"}"#).unwrap(), r#"{"value":null}"#);
    assert_eq!(
        h.apply(r#"{"op":"cas","key":"a","expected":"1","value":"3"}"#).unwrap(),
        r#"{"ok":false,"current":"2"}"#
    );
    assert_eq!(h.apply(r#"{"op":"cas","key":"a","expected":"2","value":"3"}"#).unwrap(), r#"{"ok":true}"#);
    assert_eq!(h.apply(r#"{"op":"cas","key":"new","expected":null,"value":"x"}"#).unwrap(), r#"{"ok":true}"#);
    for (k, v) in [("b", "B"), ("c", "C"), ("d", "D")] {
        h.apply(&format!(r#"{{"op":"put","key":"{k}","value":"{v}"}}"#)).unwrap();
    }
    assert_eq!(
        h.query(r#"{"op":"range","start":"b","end":"d","limit":10}"#).unwrap(),
        r#"{"items":[{"key":"b","value":"B"},{"key":"c","value":"C"}]}"#
    );
    assert_eq!(
        h.query(r#"{"op":"range","start":"a","end":null,"limit":2}"#).unwrap(),
        r#"{"items":[{"key":"a","value":"3"},{"key":"b","value":"B"}]}"#
    );
    assert_eq!(h.apply(r#"{"op":"delete","key":"a"}"#).unwrap(), r#"{"deleted":true}"#);
    assert_eq!(h.apply(r#"{"op":"delete","key":"a"}"#).unwrap(), r#"{"deleted":false}"#);
    let err = h.apply(r#"{"op":"explode"}"#).unwrap_err();
    assert!(matches!(&err, CallError::Returned(m) if m.starts_with("invalid JSON")), "{err}");
    assert_eq!(h.store.state_get("sm", b"b").unwrap(), Some(b"B".to_vec()), "state lives in the host's store");
}

/// The kv guest decodes a plain put in one pass and anything else as
/// before: escapes, field order and every refusal must read the same.
#[test]
fn kv_puts_decode_alike_on_either_path() {
    let mut h = harness(raft_guests::KV);
    let escaped = r#"{"value":"say \"hi\"\n","return_previous":false,"key":"caf\u00e9","op":"put"}"#;
    assert_eq!(h.apply(escaped).unwrap(), "{}");
    assert_eq!(h.store.state_get("sm", "café".as_bytes()).unwrap(), Some(b"say \"hi\"\n".to_vec()));
    assert_eq!(h.apply(r#"{"op":"p\u0075t","key":"café","value":"2"}"#).unwrap(), r#"{"previous":"say \"hi\"\n"}"#);
    for (command, refusal) in [
        (r#"{"op":"put","key":"a","key":"b","value":"1"}"#, "invalid JSON: duplicate field `key`"),
        (r#"{"op":"put","key":"a","value":"1","op":"put"}"#, "invalid JSON: duplicate field `op` at line 1 column 38"),
        (
            r#"{"op":"put","key":"a","value":"1","extra":0}"#,
            "invalid JSON: unknown field `extra`, expected one of `key`, `value`, `return_previous`",
        ),
        (
            r#"{"op":"put","key":"a","value":"1","return_previous":null}"#,
            "invalid JSON: invalid type: null, expected a boolean",
        ),
        (r#"{"op":"put","key":"a"}"#, "invalid JSON: missing field `value`"),
    ] {
        match h.apply(command) {
            Err(CallError::Returned(message)) => assert_eq!(message, refusal, "{command}"),
            other => panic!("{command}: {other:?}"),
        }
    }
    assert_eq!(h.store.state_get("sm", b"a").unwrap(), None, "a refused put writes nothing");
}

#[test]
fn later_entries_of_a_batch_see_earlier_writes_and_failed_ones_write_nothing() {
    let mut h = harness(raft_guests::KV);
    let outcomes = h.apply_all(&[
        br#"{"op":"put","key":"k","value":"1"}"#,
        br#"{"op":"cas","key":"k","expected":"1","value":"2"}"#,
        br#"not json"#,
        br#"{"op":"put","key":"k","value":"3"}"#,
    ]);
    assert_eq!(outcomes[1].as_deref().unwrap(), br#"{"ok":true}"#, "the cas saw the put of the same batch");
    assert!(outcomes[2].is_err());
    assert_eq!(outcomes[3].as_deref().unwrap(), br#"{"previous":"2"}"#);
    assert_eq!(h.store.applied().0, 4);
}

#[test]
fn counter_and_bank_keep_their_invariants() {
    let mut counter = harness(raft_guests::COUNTER);
    assert_eq!(counter.apply(r#"{"op":"add","by":5}"#).unwrap(), "5");
    assert_eq!(counter.apply(r#"{"op":"add","by":-7}"#).unwrap(), "-2");
    assert_eq!(counter.query(r#"{"op":"get"}"#).unwrap(), "-2");
    assert!(counter.apply(&format!(r#"{{"op":"add","by":{}}}"#, i64::MAX)).is_ok());
    assert!(counter.apply(r#"{"op":"add","by":9}"#).unwrap_err().to_string().contains("overflows"));

    let mut bank = harness(raft_guests::BANK);
    bank.apply(r#"{"op":"open","account":"alice"}"#).unwrap();
    bank.apply(r#"{"op":"open","account":"bob"}"#).unwrap();
    assert!(bank.apply(r#"{"op":"open","account":"bob"}"#).is_err());
    bank.apply(r#"{"op":"deposit","account":"alice","amount":100}"#).unwrap();
    assert_eq!(
        bank.apply(r#"{"op":"transfer","from":"alice","to":"bob","amount":30}"#).unwrap(),
        r#"{"from":70,"to":30}"#
    );
    let err = bank.apply(r#"{"op":"transfer","from":"bob","to":"alice","amount":31}"#).unwrap_err();
    assert!(err.to_string().contains("insufficient funds"), "{err}");
    assert_eq!(bank.query(r#"{"op":"total"}"#).unwrap(), r#"{"total":100,"accounts":2}"#);
    assert_eq!(bank.query(r#"{"op":"balance","account":"bob"}"#).unwrap(), r#"{"balance":30}"#);
}

#[test]
fn hostile_guests_fail_cleanly_write_nothing_and_the_next_command_succeeds() {
    let mut h = harness(raft_guests::HOSTILE);
    assert_eq!(h.apply("ok").expect("a healthy guest"), "fine");
    type Expectation = fn(&CallError) -> bool;
    let cases: &[(&str, Expectation)] = &[
        ("loop", |e| *e == CallError::OutOfFuel),
        ("alloc", |e| matches!(e, CallError::OutOfMemory(_))),
        ("recurse", |e| matches!(e, CallError::Trapped(m) if m.contains("stack"))),
        ("trap", |e| matches!(e, CallError::Trapped(_))),
        ("write-then-fail", |e| matches!(e, CallError::Returned(m) if m == "failed after writing")),
        ("write-then-trap", |e| matches!(e, CallError::Trapped(_))),
    ];
    for (command, expected) in cases {
        let before = h.machine.instantiations();
        let err = h.apply(command).expect_err(command);
        assert!(expected(&err), "{command}: unexpected {err:?}");
        assert_eq!(h.store.state_get("sm", b"ghost").unwrap(), None, "{command} left a write behind");
        assert_eq!(h.apply("ok").expect("a healthy command right after"), "fine", "after {command}");
        if !matches!(err, CallError::Returned(_)) {
            // It failed on the instance "ok" had used, ran again on a fresh
            // one (which decided), and the next call made a third.
            assert_eq!(h.machine.instantiations(), before + 2, "{command}: the instance was re-created");
        }
    }
    assert_eq!(h.apply("print").expect("output never fails a guest"), "printed");
    let err = h.query("write").expect_err("queries are read-only");
    assert!(err.to_string().contains("read-only"), "{err}");
    assert_eq!(h.query("read").unwrap(), "yes");
}

#[test]
fn a_guest_that_makes_the_host_work_goes_over_its_budget_cleanly_and_the_next_command_succeeds() {
    let mut h = harness(raft_guests::HOSTILE);
    assert_eq!(h.apply("fill").expect("12 MiB fits the write budget"), "filled");
    let cases = [
        ("flood", "wrote more than 16777216 bytes"),
        ("scan-all", "above the limit of 10000"),
        ("scan-big", "would return more than 8388608 bytes"),
        ("read-loop", "read more than 67108864 bytes"),
        ("huge-reply", "reply of 8388608 bytes"),
    ];
    for (command, what) in cases {
        let err = h.apply(command).expect_err(command);
        assert!(matches!(&err, CallError::OverBudget(m) if m.contains(what)), "{command}: unexpected {err:?}");
        assert!(err.to_string().contains("host-call budget"), "{err}");
        assert_eq!(h.store.state_get("sm", b"flood-0").unwrap(), None, "{command} left a write behind");
        assert_eq!(h.apply("ok").expect("a healthy command right after"), "fine", "after {command}");
    }
    match h.apply("huge-error").expect_err("an error") {
        CallError::Returned(message) => {
            assert!(message.len() <= 1 << 20, "cut to the reply limit: {} bytes", message.len());
            assert!(message.ends_with("bytes cut)"), "says it was cut");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_guest_that_cannot_even_instantiate_fails_each_entry_not_the_node() {
    // A memory ceiling below the guest's initial memory: instantiation itself
    // fails, the same way on every node, so it is that entry's error.
    let runtime = Arc::new(Runtime::new(Limits { memory_bytes: 64 << 10, ..limits() }).expect("runtime"));
    let mut h = harness_with(runtime, raft_guests::KV, "sm");
    for _ in 0..2 {
        let err = h.apply(r#"{"op":"put","key":"a","value":"1"}"#).expect_err("cannot instantiate");
        assert!(matches!(err, CallError::OutOfMemory(_)), "{err:?}");
    }
    assert_eq!(h.store.state_get("sm", b"a").unwrap(), None);
    assert_eq!(h.store.applied().0, 2, "the entries were applied (as errors), so the log moves on");
}

#[test]
fn modules_that_do_not_fit_are_refused_with_the_reason() {
    let runtime = Runtime::new(limits()).expect("runtime");
    let err = runtime.load(raft_guests::EXTRA_IMPORT).expect_err("extra import refused");
    assert!(
        matches!(&err, LoadError::UnsupportedImports(names) if names.iter().any(|n| n.contains("steal-secrets"))),
        "{err}"
    );
    let err = runtime.load(raft_guests::OTHER_WORLD).expect_err("other world refused");
    assert!(matches!(err, LoadError::WrongWorld(_)), "{err}");
    // The smallest valid core module: magic and version 1.
    let err = runtime.load(b"\0asm\x01\0\0\0").expect_err("core module refused");
    assert!(matches!(&err, LoadError::NotAComponent(m) if m.contains("core WebAssembly module")), "{err}");
    let err = runtime.load(b"#!/bin/sh\necho hi\n").expect_err("garbage refused");
    assert!(matches!(err, LoadError::NotAComponent(_)), "{err}");
    let mut truncated = raft_guests::KV.to_vec();
    truncated.truncate(truncated.len() / 2);
    assert!(matches!(runtime.load(&truncated).expect_err("truncated refused"), LoadError::Compile(_)));
    let small = Runtime::new(Limits { module_bytes: 1000, ..limits() }).expect("runtime");
    let err = small.load(raft_guests::KV).expect_err("oversized refused");
    assert!(matches!(err, LoadError::TooLarge { max: 1000, .. }), "{err}");
    assert!(runtime.load(raft_guests::KV).is_ok(), "the runtime is unaffected by what it refused");
}

#[test]
fn the_same_commands_give_identical_replies_and_state_whatever_the_instance_reuse() {
    let commands: Vec<&str> = vec![
        "ok",
        "entropy",
        "loop",
        "entropy",
        "trap",
        "alloc",
        "write-then-fail",
        "entropy",
        "ok",
        "recurse",
        "entropy",
    ];
    // 40 MiB kept by one instance against a 32 MiB ceiling: a long-lived
    // instance runs out where a fresh one does not.
    let commands: Vec<&str> = commands.into_iter().chain(std::iter::repeat_n("leak", 40)).chain(["entropy"]).collect();
    let runtime = Arc::new(Runtime::new(limits()).expect("runtime"));
    let mut long_lived = harness_with(runtime.clone(), raft_guests::HOSTILE, "sm");
    let mut fresh_each_time =
        harness_with(Arc::new(Runtime::new(limits()).expect("runtime")), raft_guests::HOSTILE, "sm");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for command in &commands {
        a.push(long_lived.apply(command));
        fresh_each_time.machine.reset_instance();
        b.push(fresh_each_time.apply(command));
    }
    assert_eq!(a, b, "replies differ between instance strategies");
    assert_eq!(long_lived.store.state_digest("sm").unwrap(), fresh_each_time.store.state_digest("sm").unwrap());
    let entropy = a[1].as_ref().expect("entropy reply");
    assert!(entropy.contains("now=1700000000020"), "time comes from the entry: {entropy}");
    assert_ne!(a[1], a[4], "each entry has its own randomness");
    assert!(fresh_each_time.machine.instantiations() > long_lived.machine.instantiations());
    assert!(a.iter().filter(|reply| reply.as_deref() == Ok("leaked")).count() == 40, "{a:?}");
    assert!(long_lived.machine.retried_on_fresh() >= 1, "the leaking instance ran out and the call ran again");
}

#[test]
fn state_machines_do_not_see_each_others_keys() {
    let runtime = Arc::new(Runtime::new(limits()).expect("runtime"));
    let mut kv = harness_with(runtime.clone(), raft_guests::KV, "kv");
    let module = runtime.load(raft_guests::KV).expect("cached module");
    let mut other = Machine::new(runtime, module, "other", kv.store.clone());
    kv.apply(r#"{"op":"put","key":"secret","value":"1"}"#).unwrap();
    let reply = other.query(entry(1), br#"{"op":"get","key":"secret"}"#).expect("runtime").expect("query");
    assert_eq!(reply, br#"{"value":null}"#);
}

#[test]
fn a_compiled_module_is_cached_on_disk_and_a_new_runtime_loads_it_without_compiling() {
    let (_dir, store) = temporary_store();

    let first = Arc::new(Runtime::new(limits()).expect("runtime"));
    let module = first.load_cached(raft_guests::COUNTER, Some(&store)).expect("compiles");
    assert_eq!(first.load_counts(), (1, 0), "compiled once");
    first.load_cached(raft_guests::COUNTER, Some(&store)).expect("loaded");
    assert_eq!(first.load_counts(), (1, 0), "the second load is the same module, in memory");
    assert_eq!(first.state(&module.hash()), LoadState::Ready);
    assert_eq!(first.state(&[0; 32]), LoadState::Unknown);

    // A restarted member: a new engine of the same configuration.
    let second = Arc::new(Runtime::new(limits()).expect("runtime"));
    assert_eq!(second.engine_key(), first.engine_key());
    let cached = second.load_cached(raft_guests::COUNTER, Some(&store)).expect("loads from the cache");
    assert_eq!(second.load_counts(), (0, 1), "loaded from the compiled cache, not compiled");
    let mut machine = Machine::new(second.clone(), cached, "counter", store.clone());
    let (outcomes, _) = machine.apply_batch(&[(entry(1), br#"{"op":"add","by":3}"#.as_slice())]).expect("runtime");
    assert_eq!(outcomes, vec![Ok(b"3".to_vec())], "the cached module runs");

    // A version nothing runs is forgotten; loading it again takes the cache.
    second.forget(&hash_of(raft_guests::COUNTER));
    assert_eq!(second.state(&hash_of(raft_guests::COUNTER)), LoadState::Unknown);
    second.load_cached(raft_guests::COUNTER, Some(&store)).expect("loads again");
    assert_eq!(second.load_counts(), (0, 2), "from the cache again");

    // A refusal is remembered too: every caller gets the same reason.
    let refused = second.load_cached(raft_guests::OTHER_WORLD, Some(&store)).expect_err("wrong world");
    let again = second.load_cached(raft_guests::OTHER_WORLD, Some(&store)).expect_err("wrong world");
    assert_eq!(refused, again);
}

#[test]
fn idle_versions_outside_the_kept_set_are_freed_and_come_back_from_the_cache() {
    let (_dir, store) = temporary_store();
    let runtime = Arc::new(Runtime::new(limits()).expect("runtime"));
    let (kv, counter) = (hash_of(raft_guests::KV), hash_of(raft_guests::COUNTER));
    let running = runtime.load_cached(raft_guests::KV, Some(&store)).expect("kv");
    let staged = runtime.load_cached(raft_guests::COUNTER, Some(&store)).expect("counter");
    runtime.load_cached(raft_guests::OTHER_WORLD, Some(&store)).expect_err("refused");
    assert_eq!(runtime.loaded_count(), 2);

    let keep: std::collections::HashSet<[u8; 32]> = [kv].into();
    assert_eq!(runtime.state(&[7; 32]), LoadState::Unknown, "a question about a module nobody has");
    assert_eq!(runtime.forget_idle(&keep, Duration::from_secs(3600)), 0, "asked for just now");
    assert_eq!(runtime.forget_idle(&keep, Duration::ZERO), 1, "the staged counter goes");
    assert_eq!(runtime.state(&counter), LoadState::Unknown);
    assert_eq!(runtime.state(&kv), LoadState::Ready, "kept");
    assert!(
        matches!(runtime.state(&hash_of(raft_guests::OTHER_WORLD)), LoadState::Refused(_)),
        "a refusal is remembered, not recompiled on every question"
    );
    assert_eq!(runtime.loaded_count(), 1);
    // Who held it keeps it; a new load takes the compiled cache.
    assert_eq!(staged.hash(), counter);
    let (_, from_cache_before) = runtime.load_counts();
    runtime.load_cached(raft_guests::COUNTER, Some(&store)).expect("counter again");
    assert_eq!(runtime.load_counts().1, from_cache_before + 1);
    let mut machine = Machine::new(runtime.clone(), running, "kv", store.clone());
    let (outcomes, _) =
        machine.apply_batch(&[(entry(1), br#"{"op":"put","key":"a","value":"1"}"#.as_slice())]).expect("runtime");
    assert!(outcomes[0].is_ok(), "the kept version still runs");
}

fn hash_of(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}
