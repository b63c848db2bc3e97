//! Tests of the fjall store: against an in-memory model (proptest), across
//! reopen, against bad identities, and against corrupted and truncated data
//! directories. The crash test with real killed processes is in
//! `storage_crash.rs`.

use bytes::Bytes;
use proptest::prelude::*;
use raft_host::raft::{ConfState, Entry, EntryKind, HardState, Index, LogStore, MemLogStore, StorageError, Term};
use raft_host::storage::{
    ApplyBatch, Durability, Identity, MEMTABLE_BYTES_MIN, Membership, ModuleKey, SessionChanges, StagingStart,
    StateWrite, Store, StoreError, StoreMemory, StoreOptions,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A batch's change to one client's session.
fn one_session(client: &[u8], record: &[u8]) -> SessionChanges {
    let mut changes = SessionChanges::default();
    changes.push(client, Some(record));
    changes
}

fn identity() -> Identity {
    Identity::new("test-cluster", 1)
}

fn options() -> StoreOptions {
    // The model test reopens hundreds of times; syncing adds nothing to what
    // it checks (crash durability is the crash test's job).
    StoreOptions { durability: Durability::UnsafeNoSync, ..StoreOptions::default() }
}

fn open(dir: &Path) -> Store {
    Store::open(dir, &identity(), &options()).expect("store opens")
}

fn entry(index: Index, term: Term, size: usize) -> Entry {
    let data = Bytes::from((0..size).map(|i| (index as usize + i) as u8).collect::<Vec<u8>>());
    Entry { term, index, kind: if index.is_multiple_of(7) { EntryKind::ConfChange } else { EntryKind::Normal }, data }
}

// ---- Model-based property test ----------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// Append `count` entries of `term` starting `back` entries before the end
    /// (0 = right after the last entry), replacing what follows.
    Append {
        back: u64,
        count: u64,
        term_step: u64,
        size: usize,
    },
    /// Apply up to `back` entries before the last.
    Apply {
        back: u64,
    },
    /// Compact up to `back` entries before the applied index.
    Compact {
        back: u64,
    },
    HardState {
        term: Term,
        commit_back: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..6, 1u64..8, 0u64..2, 0usize..300).prop_map(|(back, count, term_step, size)| Op::Append { back, count, term_step, size }),
        2 => (0u64..5).prop_map(|back| Op::Apply { back }),
        1 => (0u64..5).prop_map(|back| Op::Compact { back }),
        1 => (0u64..4, 0u64..4).prop_map(|(term, commit_back)| Op::HardState { term, commit_back }),
        1 => Just(Op::Reopen),
    ]
}

/// The model: a MemLogStore (already trusted by the core's tests) plus the
/// applied index and a compaction point.
struct Model {
    log: MemLogStore,
    first: Index,
    applied: Index,
    hard_state: HardState,
}

impl Model {
    fn last(&self) -> Index {
        self.first - 1 + self.log.all_entries().iter().filter(|e| e.index >= self.first).count() as u64
    }

    fn term(&self, index: Index) -> Option<Term> {
        self.log.all_entries().iter().find(|e| e.index == index).map(|e| e.term)
    }
}

fn check_same(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    let (first, last) = (model.first, model.last());
    prop_assert_eq!(store.first_index().expect("first"), first);
    prop_assert_eq!(store.last_index().expect("last"), last);
    prop_assert_eq!(store.hard_state(), model.hard_state);
    prop_assert_eq!(store.applied().0, model.applied);
    for index in first..=last {
        prop_assert_eq!(store.term(index).expect("term"), model.term(index).expect("model term"), "term of {}", index);
    }
    prop_assert!(matches!(store.term(last + 1), Err(StorageError::Unavailable(_))));
    if first > 1 {
        prop_assert!(matches!(store.term(first - 2), Err(StorageError::Compacted(_))) || first == 1);
        prop_assert!(matches!(store.entries(first - 1, last + 1, u64::MAX), Err(StorageError::Compacted(_))));
    }
    if first <= last {
        let got = store.entries(first, last + 1, u64::MAX).expect("entries");
        let want: Vec<Entry> = model.log.all_entries().iter().filter(|e| e.index >= first).cloned().collect();
        prop_assert_eq!(&got, &want);
        // A byte budget returns a non-empty prefix within the budget.
        let budget = 200;
        let bounded = store.entries(first, last + 1, budget).expect("bounded entries");
        prop_assert!(!bounded.is_empty());
        prop_assert_eq!(&bounded[..], &want[..bounded.len()]);
        let bytes: u64 = bounded.iter().map(Entry::size_bytes).sum();
        prop_assert!(bounded.len() == 1 || bytes <= budget);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_in_memory_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(dir.path());
        let mut model = Model { log: MemLogStore::default(), first: 1, applied: 0, hard_state: HardState::default() };
        let mut term = 1;
        for op in ops {
            match op {
                Op::Append { back, count, term_step, size } => {
                    let last = model.last();
                    // Raft never rewrites committed entries (nor anything before the snapshot).
                    let start = (last + 1).saturating_sub(back).max(model.hard_state.commit + 1).max(model.first);
                    term += term_step;
                    let entries: Vec<Entry> = (start..start + count).map(|i| entry(i, term, size)).collect();
                    store.persist(&entries, None).expect("persist");
                    model.log.append(&entries);
                }
                Op::Apply { back } => {
                    let to = model.last().saturating_sub(back).max(model.applied);
                    if to > model.applied {
                        let term = model.term(to).expect("applied entry exists");
                        store.apply(&ApplyBatch { applied_index: to, applied_term: term, ..ApplyBatch::default() }).expect("apply");
                        model.applied = to;
                        // Applied entries are committed.
                        model.hard_state.commit = model.hard_state.commit.max(to);
                        store.persist(&[], Some(&model.hard_state)).expect("hard state");
                    }
                }
                Op::Compact { back } => {
                    let to = model.applied.saturating_sub(back);
                    if to >= model.first {
                        store.compact(to).expect("compact");
                        model.first = to + 1;
                    }
                }
                Op::HardState { term: t, commit_back } => {
                    let commit = model.last().saturating_sub(commit_back).max(model.hard_state.commit).max(model.applied);
                    model.hard_state = HardState { term: model.hard_state.term + t, vote: Some(1 + t), commit };
                    store.persist(&[], Some(&model.hard_state)).expect("hard state");
                }
                Op::Reopen => {
                    drop(store);
                    store = open(dir.path());
                }
            }
            check_same(&store, &model)?;
        }
        drop(store);
        check_same(&open(dir.path()), &model)?;
    }
}

// ---- Ordinary tests ---------------------------------------------------------------

#[test]
fn persist_replaces_a_conflicting_suffix_and_refuses_gaps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store.persist(&[entry(1, 1, 4), entry(2, 1, 4), entry(3, 1, 4), entry(4, 1, 4)], None).expect("append");
    store.persist(&[entry(3, 2, 4)], None).expect("replace from 3");
    assert_eq!(store.last_index().expect("last"), 3);
    assert_eq!(store.term(3).expect("term"), 2);
    let err = store.persist(&[entry(9, 2, 4)], None).expect_err("gap");
    assert!(matches!(err, StoreError::InvalidAppend { first: 9, log_first: 1, log_last: 3 }), "{err}");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.last_index().expect("last"), 3, "index 4 stayed deleted across reopen");
}

#[test]
fn apply_batches_are_atomic_and_scoped_by_state_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .persist(&[entry(1, 1, 4), entry(2, 1, 4)], Some(&HardState { term: 1, vote: Some(1), commit: 2 }))
        .expect("persist");
    let write = |sm: &str, k: &str, v: Option<&str>| StateWrite {
        state_machine: sm.into(),
        key: k.as_bytes().to_vec(),
        value: v.map(|v| v.as_bytes().to_vec()),
    };
    store
        .apply(&ApplyBatch {
            applied_index: 2,
            applied_term: 1,
            clock_ms: 1_700_000_000_000,
            writes: vec![write("kv", "a", Some("1")), write("kv", "b", Some("2")), write("bank", "a", Some("100"))],
            changes: vec![],
            sessions_checkpoint: None,
            sessions: one_session(b"client-7", b"seq 3"),
            modules: vec![],
            membership: None,
        })
        .expect("apply");
    assert_eq!(store.state_get("kv", b"a").expect("get"), Some(b"1".to_vec()));
    assert_eq!(store.state_get("bank", b"a").expect("get"), Some(b"100".to_vec()));
    let kv = store.state_scan("kv", b"", None, 10).expect("scan");
    assert_eq!(
        kv,
        vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())],
        "no key of bank leaks into kv"
    );
    assert_eq!(store.state_scan("kv", b"a", Some(b"b"), 10).expect("scan").len(), 1);
    assert_eq!(store.state_scan("kv", b"", None, 1).expect("scan").len(), 1);
    assert_eq!(store.session_get(b"client-7").expect("session"), Some(b"seq 3".to_vec()));
    assert_eq!(store.session_scan().expect("sessions"), vec![(b"client-7".to_vec(), b"seq 3".to_vec())]);
    assert_eq!(store.apply_clock_ms().expect("clock"), 1_700_000_000_000);
    let digest = store.state_digest("kv").expect("digest");
    assert_ne!(store.state_digest("bank").expect("digest"), digest);
    store
        .apply(&ApplyBatch {
            applied_index: 2,
            applied_term: 1,
            clock_ms: 1_700_000_000_000,
            writes: vec![write("kv-copy", "a", Some("1")), write("kv-copy", "b", Some("2"))],
            changes: vec![],
            ..ApplyBatch::default()
        })
        .expect("apply");
    assert_eq!(store.state_digest("kv-copy").expect("digest"), digest, "the same pairs under another name");
    store
        .apply(&ApplyBatch {
            applied_index: 2,
            applied_term: 1,
            clock_ms: 1_700_000_000_000,
            writes: vec![write("kv", "b", None)],
            changes: vec![],
            sessions_checkpoint: None,
            sessions: SessionChanges::default(),
            modules: vec![],
            membership: None,
        })
        .expect("delete");
    assert_ne!(store.state_digest("kv").expect("digest"), digest);
    let err =
        store.apply(&ApplyBatch { applied_index: 1, applied_term: 1, ..ApplyBatch::default() }).expect_err("back");
    assert!(matches!(err, StoreError::AppliedBackwards { from: 2, to: 1 }), "{err}");
    let err = store.state_get("", b"a").expect_err("empty name");
    assert!(matches!(err, StoreError::InvalidStateMachineName(_)), "{err}");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.applied(), (2, 1));
    assert_eq!(store.state_get("kv", b"b").expect("get"), None);
}

#[test]
fn bootstrap_records_members_once_and_membership_changes_land_with_their_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let conf = ConfState::with_voters([1, 2, 3]);
    let addresses: BTreeMap<u64, String> = (1..=3).map(|id| (id, format!("127.0.0.1:700{id}"))).collect();
    store.bootstrap(&conf, &addresses).expect("bootstrap");
    // A restart with other flags keeps what the store holds: membership
    // changes, not the command line, decide it from then on.
    store.bootstrap(&ConfState::with_voters([1, 2]), &BTreeMap::new()).expect("restart");
    assert_eq!(store.conf_state(), conf);
    assert_eq!(store.membership().expect("membership").addresses, addresses);
    let grown = ConfState { learners: [4].into(), ..conf.clone() };
    let mut grown_addresses = addresses.clone();
    grown_addresses.insert(4, "127.0.0.1:7004".into());
    let grown = Membership { conf: grown, addresses: grown_addresses, removed: [7].into() };
    store.persist(&[entry(1, 1, 8)], None).expect("persist");
    store
        .apply(&ApplyBatch {
            applied_index: 1,
            applied_term: 1,
            membership: Some(grown.clone()),
            ..ApplyBatch::default()
        })
        .expect("apply");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.conf_state(), grown.conf);
    assert_eq!(store.membership().expect("membership"), grown);
    assert!(!store.offline().expect("offline"));
    store.set_offline(true).expect("set");
    drop(store);
    assert!(open(dir.path()).offline().expect("offline"), "maintenance mode survives a restart");
}

#[test]
fn module_records_land_with_the_apply_batch_and_artifacts_are_per_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let hash = [7u8; 32];
    let batch = ApplyBatch {
        applied_index: 0,
        modules: vec![
            (ModuleKey::Chunk { hash, offset: 4 }, Some(b"5678".to_vec())),
            (ModuleKey::Chunk { hash, offset: 0 }, Some(b"1234".to_vec())),
            (ModuleKey::Upload(hash), Some(b"upload record".to_vec())),
            (ModuleKey::Version { name: "kv".into(), hash }, Some(b"version record".to_vec())),
            (ModuleKey::Active("kv".into()), Some(hash.to_vec())),
        ],
        ..ApplyBatch::default()
    };
    store.apply(&batch).expect("apply");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.module_chunks(&hash).expect("chunks"), vec![(0, b"1234".to_vec()), (4, b"5678".to_vec())]);
    assert_eq!(store.module_chunks(&[0; 32]).expect("chunks"), vec![]);
    assert_eq!(store.module_record(&ModuleKey::Upload(hash)).expect("upload"), Some(b"upload record".to_vec()));
    let versions = store.module_versions().expect("versions");
    assert_eq!(versions.len(), 1);
    assert_eq!((versions[0].name.as_str(), versions[0].hash), ("kv", hash));
    assert_eq!(store.active_modules().expect("active"), vec![("kv".to_string(), hash)]);

    let deleting = ApplyBatch { modules: vec![(ModuleKey::Chunk { hash, offset: 4 }, None)], ..ApplyBatch::default() };
    store.apply(&deleting).expect("apply");
    assert_eq!(store.module_chunks(&hash).expect("chunks").len(), 1);

    store.put_artifact("wasmtime-aaaa", &hash, b"compiled").expect("put artifact");
    store.put_artifact("wasmtime-bbbb", &hash, b"older").expect("put artifact");
    assert_eq!(store.get_artifact("wasmtime-aaaa", &hash).expect("get"), Some(b"compiled".to_vec()));
    assert_eq!(store.drop_stale_artifacts("wasmtime-aaaa").expect("drop"), 1);
    assert_eq!(store.get_artifact("wasmtime-bbbb", &hash).expect("get"), None, "another engine's artifact is gone");
    assert_eq!(store.get_artifact("wasmtime-aaaa", &hash).expect("get"), Some(b"compiled".to_vec()));
}

#[test]
fn compaction_keeps_the_tail_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1 + i / 4, 8)).collect();
    store.persist(&entries, Some(&HardState { term: 3, vote: None, commit: 10 })).expect("persist");
    let err = store.compact(5).expect_err("not applied yet");
    assert!(matches!(err, StoreError::InvalidCompaction { .. }), "{err}");
    store.apply(&ApplyBatch { applied_index: 8, applied_term: 3, ..ApplyBatch::default() }).expect("apply");
    store.compact(6).expect("compact");
    assert_eq!(store.first_index().expect("first"), 7);
    assert_eq!(store.term(6).expect("snapshot term"), 2);
    assert!(matches!(store.term(5), Err(StorageError::Compacted(5))));
    drop(store);
    let store = open(dir.path());
    assert_eq!((store.first_index().expect("first"), store.last_index().expect("last")), (7, 10));
    assert_eq!(store.snapshot_meta().expect("meta").index, 6);
    assert_eq!(store.entries(7, 11, u64::MAX).expect("tail"), entries[6..].to_vec());
}

#[test]
fn wrong_node_wrong_cluster_and_missing_identity_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(dir.path()));
    let err = Store::open(dir.path(), &Identity::new("test-cluster", 2), &options()).expect_err("other node");
    assert!(matches!(err, StoreError::WrongNode { found: 1, expected: 2, .. }), "{err}");
    let err = Store::open(dir.path(), &Identity::new("other", 1), &options()).expect_err("other cluster");
    assert!(matches!(err, StoreError::WrongCluster { .. }), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()), "the error names the directory: {err}");
    std::fs::remove_file(dir.path().join("IDENTITY")).expect("remove");
    let err = Store::open(dir.path(), &identity(), &options()).expect_err("no identity");
    assert!(matches!(err, StoreError::MissingIdentity { .. }), "{err}");
}

// ---- Corruption -----------------------------------------------------------------

/// A data directory with some log, state and hard state, closed cleanly.
fn populated_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &identity(), &StoreOptions::default()).expect("open");
    for batch in 0..20u64 {
        let entries: Vec<Entry> = (batch * 10 + 1..=batch * 10 + 10).map(|i| entry(i, 1, 100)).collect();
        store.persist(&entries, Some(&HardState { term: 1, vote: Some(1), commit: batch * 10 + 10 })).expect("persist");
        let writes = vec![StateWrite {
            state_machine: "kv".into(),
            key: batch.to_be_bytes().to_vec(),
            value: Some(vec![7; 64]),
        }];
        store
            .apply(&ApplyBatch {
                applied_index: batch * 10 + 10,
                applied_term: 1,
                clock_ms: 0,
                writes,
                changes: vec![],
                sessions_checkpoint: None,
                sessions: SessionChanges::default(),
                modules: vec![],
                membership: None,
            })
            .expect("apply");
    }
    dir
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::metadata(&path).map(|m| m.len() > 0).unwrap_or(false) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for file in files_under(from) {
        let target = to.join(file.strip_prefix(from).expect("under"));
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&file, &target).expect("copy");
    }
}

/// Everything a reopened store says about its contents, to compare an
/// undamaged copy with one that opened despite damage.
/// Everything compared between an undamaged and a damaged copy.
type Contents = (Vec<Entry>, HardState, (Index, Term), [u8; 32]);

fn contents(store: &Store) -> Result<Contents, String> {
    let (first, last) =
        (store.first_index().map_err(|e| e.to_string())?, store.last_index().map_err(|e| e.to_string())?);
    let entries = store.entries(first, last + 1, u64::MAX).map_err(|e| e.to_string())?;
    let digest = store.state_digest("kv").map_err(|e| e.to_string())?;
    Ok((entries, store.hard_state(), store.applied(), digest))
}

/// Damages a copy of the directory with `damage`, reopens it, and requires a
/// clear error or the exact original contents: never a panic, never other data.
fn reopen_damaged(original: &Path, expected: &Contents, damage: impl Fn(&Path)) -> Outcome {
    let copy = tempfile::tempdir().expect("tempdir");
    copy_dir(original, copy.path());
    damage(copy.path());
    let result = std::panic::catch_unwind(|| match Store::open(copy.path(), &identity(), &options()) {
        Ok(store) => match contents(&store) {
            Ok(found) => Outcome::Opened { same: &found == expected },
            Err(e) => Outcome::Refused(e),
        },
        Err(e) => Outcome::Refused(e.to_string()),
    });
    result.unwrap_or(Outcome::Panicked)
}

#[derive(Debug)]
enum Outcome {
    Refused(String),
    Opened { same: bool },
    Panicked,
}

#[test]
fn flipped_bytes_in_any_file_give_an_error_or_the_original_data() {
    let original = populated_dir();
    let expected = contents(&Store::open(original.path(), &identity(), &options()).expect("open")).expect("contents");
    let mut refused = 0;
    for file in files_under(original.path()) {
        let len = std::fs::metadata(&file).expect("meta").len();
        for position in [0, len / 3, len / 2, len - 1] {
            let relative = file.strip_prefix(original.path()).expect("under").to_path_buf();
            let outcome = reopen_damaged(original.path(), &expected, |dir| {
                let path = dir.join(&relative);
                let mut bytes = std::fs::read(&path).expect("read");
                bytes[position as usize] ^= 0x5a;
                std::fs::write(&path, bytes).expect("write");
            });
            match outcome {
                Outcome::Refused(message) => {
                    refused += 1;
                    assert!(!message.is_empty());
                }
                Outcome::Opened { same: true } => {}
                Outcome::Opened { same: false } => {
                    panic!("flipping byte {position} of {} silently changed the data", relative.display())
                }
                Outcome::Panicked => panic!("flipping byte {position} of {} panicked", relative.display()),
            }
        }
    }
    assert!(refused > 0, "at least some damage must be detected");
}

#[test]
fn truncated_files_give_an_error_or_the_original_data() {
    let original = populated_dir();
    let expected = contents(&Store::open(original.path(), &identity(), &options()).expect("open")).expect("contents");
    for file in files_under(original.path()) {
        let relative = file.strip_prefix(original.path()).expect("under").to_path_buf();
        let len = std::fs::metadata(&file).expect("meta").len();
        for keep in [0, len / 2, len.saturating_sub(1)] {
            let outcome = reopen_damaged(original.path(), &expected, |dir| {
                let f = std::fs::OpenOptions::new().write(true).open(dir.join(&relative)).expect("open");
                f.set_len(keep).expect("truncate");
            });
            match outcome {
                Outcome::Refused(_) | Outcome::Opened { same: true } => {}
                Outcome::Opened { same: false } => {
                    panic!("truncating {} to {keep} bytes silently changed the data", relative.display())
                }
                Outcome::Panicked => panic!("truncating {} to {keep} bytes panicked", relative.display()),
            }
        }
    }
}

// ---- The core on the fjall store ---------------------------------------------------

/// Drives a single-member core over the store like the node will: persist,
/// apply (one guest key per entry), advance.
fn drive(raft: &mut raft_host::raft::Raft<Store>, store: &Store) -> u64 {
    let mut applied = 0;
    while raft.has_ready() {
        let ready = raft.ready().expect("ready");
        store.persist(&ready.entries, ready.hard_state.as_ref()).expect("persist");
        if let Some(last) = ready.committed_entries.last() {
            let writes = ready
                .committed_entries
                .iter()
                .filter(|e| !e.is_noop())
                .map(|e| StateWrite {
                    state_machine: "kv".into(),
                    key: e.data.to_vec(),
                    value: Some(e.index.to_be_bytes().to_vec()),
                })
                .collect::<Vec<_>>();
            applied += writes.len() as u64;
            store
                .apply(&ApplyBatch {
                    applied_index: last.index,
                    applied_term: last.term,
                    clock_ms: 0,
                    writes,
                    changes: vec![],
                    sessions_checkpoint: None,
                    sessions: SessionChanges::default(),
                    modules: vec![],
                    membership: None,
                })
                .expect("apply");
        }
        raft.advance().expect("advance");
    }
    applied
}

#[test]
fn the_core_runs_on_the_store_and_restarts_from_it_without_reapplying() {
    use raft_host::raft::{Config, Raft, Role};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &identity(), &StoreOptions::default()).expect("open");
    store.bootstrap(&ConfState::with_voters([1]), &BTreeMap::new()).expect("bootstrap");
    let mut raft = Raft::new(Config::new(1), store.clone()).expect("core starts");
    raft.campaign().expect("campaign");
    drive(&mut raft, &store);
    for i in 0..50u32 {
        raft.propose(vec![Bytes::from(format!("key-{i:03}"))]).expect("propose");
    }
    assert_eq!(drive(&mut raft, &store), 50);
    let term = raft.term();
    drop(raft);
    drop(store);

    let store = Store::open(dir.path(), &identity(), &StoreOptions::default()).expect("reopen");
    let mut config = Config::new(1);
    config.applied = store.applied().0;
    let mut raft = Raft::new(config, store.clone()).expect("core restarts");
    assert_eq!(raft.term(), term, "the term survived");
    assert_eq!(raft.log().last_index().expect("last"), 51);
    assert_eq!(drive(&mut raft, &store), 0, "nothing is applied twice after a restart");
    raft.campaign().expect("campaign");
    // A sole voter leads once its vote is on disk, which `drive` does.
    drive(&mut raft, &store);
    assert_eq!(raft.role(), Role::Leader);
    raft.propose(vec![Bytes::from_static(b"after-restart")]).expect("propose");
    assert_eq!(drive(&mut raft, &store), 1);
    assert_eq!(store.state_scan("kv", b"", None, 1000).expect("scan").len(), 51);
}

fn kv_write(key: &str, value: Option<&str>) -> StateWrite {
    StateWrite { state_machine: "kv".into(), key: key.as_bytes().to_vec(), value: value.map(|v| v.as_bytes().to_vec()) }
}

#[test]
fn a_snapshot_moves_the_replicated_state_at_one_point_and_leaves_local_artifacts() {
    let (leader_dir, follower_dir) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let leader = open(leader_dir.path());
    let conf = ConfState::with_voters([1, 2, 3]);
    let addresses: BTreeMap<u64, String> = (1..=3).map(|id| (id, format!("h:{id}"))).collect();
    leader.bootstrap(&conf, &addresses).expect("bootstrap");
    leader.persist(&(1..=4).map(|i| entry(i, 1, 8)).collect::<Vec<_>>(), None).expect("persist");
    let hash = [9u8; 32];
    leader
        .apply(&ApplyBatch {
            applied_index: 3,
            applied_term: 1,
            clock_ms: 1234,
            writes: vec![kv_write("a", Some("1")), kv_write("b", Some("2"))],
            changes: vec![],
            sessions_checkpoint: None,
            sessions: one_session(b"client", b"session"),
            modules: vec![(ModuleKey::Active("kv".into()), Some(hash.to_vec()))],
            membership: Some(Membership { conf: conf.clone(), addresses: addresses.clone(), removed: [5].into() }),
        })
        .expect("apply");
    leader.put_artifact("engine", &hash, b"leader's compiled code").expect("artifact");
    let reader = leader.snapshot_reader().expect("reader");
    let digest_at_view = leader.state_digest("kv").expect("digest");
    // Writes after the view was taken are not in it.
    leader
        .apply(&ApplyBatch {
            applied_index: 4,
            applied_term: 1,
            writes: vec![kv_write("c", Some("3"))],
            changes: vec![],
            ..ApplyBatch::default()
        })
        .expect("apply");
    assert_eq!((reader.meta().index, reader.meta().term), (3, 1));
    let mut chunks = Vec::new();
    reader
        .for_each_chunk(48, |chunk| {
            chunks.push(chunk);
            true
        })
        .expect("stream");
    assert!(chunks.len() > 3, "a small chunk size splits the stream: {} chunks", chunks.len());

    let follower = open(follower_dir.path());
    follower.bootstrap(&conf, &addresses).expect("bootstrap");
    follower.persist(&[entry(1, 1, 8), entry(2, 1, 8)], None).expect("persist");
    follower
        .apply(&ApplyBatch {
            applied_index: 1,
            applied_term: 1,
            writes: vec![kv_write("z", Some("old"))],
            changes: vec![],
            membership: Some(Membership { conf: conf.clone(), addresses: addresses.clone(), removed: [6].into() }),
            ..ApplyBatch::default()
        })
        .expect("apply");
    follower.put_artifact("engine", &hash, b"follower's compiled code").expect("artifact");
    let StagingStart::Fresh(mut staging) = follower.begin_staging(reader.meta().clone()).expect("begin") else {
        panic!("nothing was staged before");
    };
    assert!(staging.write_chunk(&chunks[0][..chunks[0].len() - 1]).is_err(), "a cut record is refused");
    for chunk in &chunks {
        staging.write_chunk(chunk).expect("stage");
    }
    let meta = staging.finish().expect("complete");
    assert!(matches!(follower.begin_staging(meta.clone()).expect("again"), StagingStart::AlreadyStaged(_)));
    follower.install_snapshot(&meta).expect("install");
    let check = |store: &Store| {
        assert_eq!(store.state_get("kv", b"a").expect("get"), Some(b"1".to_vec()));
        assert_eq!(store.state_get("kv", b"z").expect("get"), None, "the follower's own state is replaced");
        assert_eq!(store.state_get("kv", b"c").expect("get"), None, "written after the view");
        assert_eq!(store.session_get(b"client").expect("session"), Some(b"session".to_vec()));
        assert_eq!(store.active_modules().expect("active"), vec![("kv".to_string(), hash)]);
        assert_eq!(store.get_artifact("engine", &hash).expect("artifact"), Some(b"follower's compiled code".to_vec()));
        assert_eq!(store.applied(), (3, 1));
        assert_eq!(store.apply_clock_ms().expect("clock"), 1234);
        assert_eq!((store.first_index().expect("first"), store.last_index().expect("last")), (4, 3));
        assert_eq!(store.term(3).expect("term"), 1);
        let membership = store.membership().expect("membership");
        assert_eq!((membership.conf, membership.addresses), (conf.clone(), addresses.clone()));
        assert_eq!(membership.removed, [5].into(), "the snapshot's removed ids replace the follower's");
        assert_eq!(store.state_digest("kv").expect("digest"), digest_at_view);
    };
    check(&follower);
    drop(follower);
    check(&open(follower_dir.path()));
    assert!(leader.install_snapshot(&meta).is_err(), "only a staged snapshot installs");
}

#[test]
fn a_new_commit_index_rides_with_the_next_append_and_a_new_term_is_synced_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path(), &identity(), &StoreOptions::default()).expect("open");
    store
        .persist(&[entry(1, 1, 8), entry(2, 1, 8)], Some(&HardState { term: 1, vote: Some(1), commit: 0 }))
        .expect("persist");
    store.record_commit(&HardState { term: 1, vote: Some(1), commit: 2 }).expect("commit");
    assert_eq!(store.hard_state().commit, 2);
    drop(store);
    // Nothing was written for it: losing a commit index is safe.
    let store = open(dir.path());
    assert_eq!(store.hard_state(), HardState { term: 1, vote: Some(1), commit: 0 });
    store.record_commit(&HardState { term: 1, vote: Some(1), commit: 2 }).expect("commit");
    store.persist(&[entry(3, 1, 8)], None).expect("append");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.hard_state(), HardState { term: 1, vote: Some(1), commit: 2 }, "it went down with the append");
    // A new term or vote is never written lazily.
    store.record_commit(&HardState { term: 2, vote: None, commit: 2 }).expect("term");
    assert_eq!(store.hard_state(), HardState { term: 2, vote: None, commit: 2 });
    drop(store);
    assert_eq!(open(dir.path()).hard_state(), HardState { term: 2, vote: None, commit: 2 });
}

/// Table files fjall has flushed for the store's keyspaces
/// (`db/keyspaces/<id>/tables/`; id 0 is fjall's own, which flushes its
/// little records on a schedule of its own).
fn flushed_tables(dir: &Path) -> usize {
    let keyspaces = dir.join("db").join("keyspaces");
    files_under(dir)
        .iter()
        .filter_map(|path| path.strip_prefix(&keyspaces).ok())
        .filter(|rest| {
            let parts: Vec<_> = rest.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            parts.len() == 3 && parts[0] != "0" && parts[1] == "tables"
        })
        .count()
}

#[test]
fn the_memtable_size_a_store_is_made_with_decides_when_it_flushes() {
    let write_4_mib = |store: &Store| {
        let entries: Vec<Entry> = (1..=64).map(|i| entry(i, 1, 64 << 10)).collect();
        store.persist(&entries, None).expect("persist");
    };
    let small = tempfile::tempdir().expect("tempdir");
    let mut options = options();
    options.memory.memtable_bytes = MEMTABLE_BYTES_MIN;
    let store = Store::open(small.path(), &identity(), &options).expect("store opens");
    write_4_mib(&store);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while flushed_tables(small.path()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a 1 MiB memtable was never flushed: {:?}",
            files_under(small.path())
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(store);

    // The default (8 MiB) holds the same 4 MiB in memory.
    let default = tempfile::tempdir().expect("tempdir");
    let store = open(default.path());
    write_4_mib(&store);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(flushed_tables(default.path()), 0, "{:?}", files_under(default.path()));
    assert_eq!(StoreMemory::default().memtable_bytes, 8 << 20);
}
