//! Crash test with real processes: a child process appends and applies in a
//! loop on a data directory, printing each index it has acknowledged (after
//! `persist` returned) and applied. The parent SIGKILLs it at a random moment,
//! reopens the store, and checks that every acknowledged entry is there and
//! intact, that the guest state holds exactly the entries up to the applied
//! index (no batch half applied, none applied twice), and that the applied
//! index is at least what the child reported. Then it starts the child again
//! on the same directory. Bounded in rounds and time.
//!
//! The binary plays both roles: with `RAFT_CRASH_CHILD_DIR` set it is the child.

use bytes::Bytes;
use raft_host::raft::{Entry, EntryKind, HardState, Index, LogStore};
use raft_host::storage::{ApplyBatch, Identity, SessionChanges, StateWrite, Store, StoreOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 30;
const TIME_BUDGET: Duration = Duration::from_secs(60);
const CHILD_ENV: &str = "RAFT_CRASH_CHILD_DIR";
const SM: &str = "crash";

fn identity() -> Identity {
    Identity::new("crash-test", 1)
}

/// The deterministic entry at `index`, so the parent can check contents.
fn entry(index: Index) -> Entry {
    let size = (index % 97) as usize * 13;
    Entry { term: 1 + index / 1000, index, kind: EntryKind::Normal, data: Bytes::from(vec![(index % 251) as u8; size]) }
}

fn child(dir: &Path) {
    let store = Store::open(dir, &identity(), &StoreOptions::default()).expect("child opens the store");
    let mut rng = ChaCha8Rng::seed_from_u64(std::process::id().into());
    let mut next = store.last_index().expect("last") + 1;
    let mut applied = store.applied().0;
    let stdout = std::io::stdout();
    loop {
        let count = rng.random_range(1..=16);
        let entries: Vec<Entry> = (next..next + count).map(entry).collect();
        let last = next + count - 1;
        let hard_state = HardState { term: entries[0].term, vote: Some(1), commit: last };
        store.persist(&entries, Some(&hard_state)).expect("persist");
        writeln!(stdout.lock(), "acked {last}").expect("stdout");
        // Apply what was not applied yet, in one atomic batch: one key per
        // entry, plus a running count the parent checks against the keys.
        let writes: Vec<StateWrite> = (applied + 1..=last)
            .map(|i| StateWrite {
                state_machine: SM.into(),
                key: i.to_be_bytes().to_vec(),
                value: Some(i.to_be_bytes().to_vec()),
            })
            .chain(std::iter::once(StateWrite {
                state_machine: SM.into(),
                key: b"~count".to_vec(),
                value: Some(last.to_be_bytes().to_vec()),
            }))
            .collect();
        store
            .apply(&ApplyBatch {
                applied_index: last,
                applied_term: entries[entries.len() - 1].term,
                clock_ms: last,
                writes,
                changes: vec![],
                sessions_checkpoint: None,
                sessions: SessionChanges::default(),
                modules: vec![],
                membership: None,
            })
            .expect("apply");
        applied = last;
        writeln!(stdout.lock(), "applied {last}").expect("stdout");
        next = last + 1;
    }
}

/// Checks the reopened store against what the child reported.
fn verify(dir: &Path, acked: Index, reported_applied: Index) -> Result<Index, String> {
    let store = Store::open(dir, &identity(), &StoreOptions::default()).map_err(|e| format!("reopen failed: {e}"))?;
    let last = store.last_index().map_err(|e| e.to_string())?;
    if last < acked {
        return Err(format!("acknowledged index {acked} lost: the log ends at {last}"));
    }
    let entries = store.entries(1, last + 1, u64::MAX).map_err(|e| e.to_string())?;
    for (offset, got) in entries.iter().enumerate() {
        let want = entry(offset as Index + 1);
        if *got != want {
            return Err(format!("entry {} differs from what was written", want.index));
        }
    }
    let (applied, _) = store.applied();
    if applied < reported_applied {
        return Err(format!("applied index went back from reported {reported_applied} to {applied}"));
    }
    if applied > last {
        return Err(format!("applied index {applied} is past the log end {last}"));
    }
    let state = store.state_scan(SM, b"", None, usize::MAX).map_err(|e| e.to_string())?;
    let count = state
        .iter()
        .find(|(k, _)| k == b"~count")
        .map(|(_, v)| u64::from_be_bytes(v[..8].try_into().expect("8 bytes")));
    let keys: Vec<Index> = state
        .iter()
        .filter(|(k, _)| k.len() == 8)
        .map(|(k, _)| u64::from_be_bytes(k[..].try_into().expect("8 bytes")))
        .collect();
    let expected_keys: Vec<Index> = (1..=applied).collect();
    if keys != expected_keys || count.unwrap_or(0) != applied {
        return Err(format!(
            "guest state does not match applied index {applied}: {} keys, count {:?} (a batch was half applied or lost)",
            keys.len(),
            count
        ));
    }
    Ok(applied)
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("own path");
    let mut rng = ChaCha8Rng::seed_from_u64(0xC0FFEE);
    let started = Instant::now();
    let (mut rounds, mut failures, mut max_acked) = (0, 0, 0);
    while rounds < ROUNDS && started.elapsed() < TIME_BUDGET {
        rounds += 1;
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("child starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(50..400)));
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("reap the child");
        reader.join().expect("reader thread");
        let (mut acked, mut applied) = (0, 0);
        for line in rx.try_iter() {
            match line.split_once(' ') {
                Some(("acked", n)) => acked = n.parse().expect("index"),
                Some(("applied", n)) => applied = n.parse().expect("index"),
                _ => {}
            }
        }
        match verify(dir.path(), acked, applied) {
            Ok(recovered) => {
                max_acked = max_acked.max(acked);
                println!("round {rounds}: killed ({status}) after ack {acked}; recovered applied {recovered}");
            }
            Err(problem) => {
                failures += 1;
                println!("round {rounds}: FAILED: {problem}");
            }
        }
    }
    assert!(max_acked > 0, "the child never acknowledged anything; the test checked nothing");
    println!("storage crash: {} passed, {failures} failed", rounds - failures);
    if failures > 0 {
        std::process::exit(1);
    }
}
