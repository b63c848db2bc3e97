//! Crash test of snapshot installs with real processes. A child process
//! stages a leader's snapshot (about 8 MB of state) on a follower's data
//! directory and installs it; the parent SIGKILLs it at a random moment,
//! reopens the directory, and checks that the follower holds either its own
//! old state (killed before the install began) or exactly the snapshot
//! (the install was finished, by the child or by the reopen's redo), never
//! a mix, and that the applied position, the log and the state agree.
//!
//! The binary plays both roles: with `RAFT_SNAPSHOT_CHILD` set it is the child.

use bytes::Bytes;
use raft_host::raft::{ConfState, Entry, EntryKind, LogStore, SnapshotMeta};
use raft_host::storage::{ApplyBatch, Identity, StagingStart, StateWrite, Store, StoreOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROUNDS: usize = 12;
const TIME_BUDGET: Duration = Duration::from_secs(60);
const CHILD_ENV: &str = "RAFT_SNAPSHOT_CHILD";
const LEADER_KEYS: u64 = 1000;
const FOLLOWER_KEYS: u64 = 300;
const SNAPSHOT_INDEX: u64 = 50;

fn identity() -> Identity {
    Identity::new("snapshot-crash", 1)
}

fn open(dir: &Path) -> Store {
    Store::open(dir, &identity(), &StoreOptions::default()).expect("store opens")
}

fn write(key: String, value: Vec<u8>) -> StateWrite {
    StateWrite { state_machine: "kv".into(), key: key.into_bytes(), value: Some(value) }
}

fn entries(upto: u64) -> Vec<Entry> {
    (1..=upto).map(|index| Entry { term: 1, index, kind: EntryKind::Normal, data: Bytes::from_static(b"e") }).collect()
}

/// A store at applied index `applied` holding `keys` keys named `prefix-N`.
fn prepare(dir: &Path, applied: u64, prefix: &str, keys: u64) -> Store {
    let store = open(dir);
    store.bootstrap(&ConfState::with_voters([1, 2, 3]), &Default::default()).expect("bootstrap");
    store.persist(&entries(applied), None).expect("persist");
    let writes = (0..keys).map(|i| write(format!("{prefix}-{i}"), vec![i as u8; 8 << 10])).collect();
    store
        .apply(&ApplyBatch { applied_index: applied, applied_term: 1, writes, ..ApplyBatch::default() })
        .expect("apply");
    store
}

/// Stages the chunks in `chunks` (length-prefixed) and installs them.
fn child(dir: &Path, chunks: &Path) {
    let store = open(dir);
    let meta = SnapshotMeta { index: SNAPSHOT_INDEX, term: 1, conf_state: ConfState::with_voters([1, 2, 3]) };
    let StagingStart::Fresh(mut staging) = store.begin_staging(meta.clone()).expect("begin") else {
        panic!("a fresh directory has nothing staged");
    };
    let mut file = std::io::BufReader::new(std::fs::File::open(chunks).expect("chunks file"));
    let mut len = [0u8; 4];
    while file.read_exact(&mut len).is_ok() {
        let mut chunk = vec![0u8; u32::from_be_bytes(len) as usize];
        file.read_exact(&mut chunk).expect("chunk");
        staging.write_chunk(&chunk).expect("stage");
    }
    let meta = staging.finish().expect("finish");
    println!("staged");
    std::io::stdout().flush().expect("flush");
    store.install_snapshot(&meta).expect("install");
    println!("installed");
    std::io::stdout().flush().expect("flush");
    std::thread::sleep(Duration::from_secs(60));
}

/// Old state or new state, whole; never a mix.
fn verify(dir: &Path, installed: bool) -> Result<&'static str, String> {
    let store = open(dir);
    let leader_keys =
        store.state_scan("kv", b"leader-", Some(b"leader.".as_slice()), usize::MAX).map_err(|e| e.to_string())?;
    let follower_keys =
        store.state_scan("kv", b"follower-", Some(b"follower.".as_slice()), usize::MAX).map_err(|e| e.to_string())?;
    let (applied, _) = store.applied();
    let (first, last) =
        (store.first_index().map_err(|e| e.to_string())?, store.last_index().map_err(|e| e.to_string())?);
    let new = leader_keys.len() as u64 == LEADER_KEYS && follower_keys.is_empty() && applied == SNAPSHOT_INDEX;
    let old = leader_keys.is_empty() && follower_keys.len() as u64 == FOLLOWER_KEYS && applied == 10;
    match (new, old) {
        (true, _) if first == SNAPSHOT_INDEX + 1 && last == SNAPSHOT_INDEX => Ok("snapshot installed"),
        (_, true) if !installed && first == 1 && last == 10 => Ok("old state kept"),
        _ => Err(format!(
            "mixed state: {} leader keys, {} follower keys, applied {applied}, log {first}..={last}, child said installed: {installed}",
            leader_keys.len(),
            follower_keys.len()
        )),
    }
}

fn main() {
    if let Ok(dirs) = std::env::var(CHILD_ENV) {
        let (dir, chunks) = dirs.split_once('|').expect("dir|chunks");
        child(Path::new(dir), Path::new(chunks));
        return;
    }
    let root = tempfile::tempdir().expect("tempdir");
    let leader = prepare(&root.path().join("leader"), SNAPSHOT_INDEX, "leader", LEADER_KEYS);
    let chunks_path = root.path().join("chunks.bin");
    let mut chunks = std::io::BufWriter::new(std::fs::File::create(&chunks_path).expect("chunks file"));
    leader
        .snapshot_reader()
        .expect("reader")
        .for_each_chunk(256 << 10, |chunk| {
            chunks.write_all(&(chunk.len() as u32).to_be_bytes()).expect("write");
            chunks.write_all(&chunk).expect("write");
            true
        })
        .expect("stream");
    drop(chunks);
    drop(leader);

    let exe = std::env::current_exe().expect("own path");
    let mut rng = ChaCha8Rng::seed_from_u64(0x5EED);
    let started = Instant::now();
    let (mut rounds, mut failures, mut outcomes) = (0, 0, std::collections::BTreeMap::new());
    while rounds < ROUNDS && started.elapsed() < TIME_BUDGET {
        rounds += 1;
        let dir = root.path().join(format!("follower-{rounds}"));
        drop(prepare(&dir, 10, "follower", FOLLOWER_KEYS));
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, format!("{}|{}", dir.display(), chunks_path.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("child starts");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        if rng.random_bool(0.25) {
            // Kill while the stream is still being staged.
            std::thread::sleep(Duration::from_micros(rng.random_range(0..20_000)));
        } else {
            // Kill somewhere inside the install: right after staging, or a
            // little later.
            let staged = lines.next().and_then(Result::ok);
            assert_eq!(staged.as_deref(), Some("staged"), "the child staged the snapshot");
            std::thread::sleep(Duration::from_micros(rng.random_range(0..40_000)));
        }
        child.kill().expect("SIGKILL the child");
        child.wait().expect("reap the child");
        let installed = lines.map_while(Result::ok).any(|line| line == "installed");
        match verify(&dir, installed) {
            Ok(outcome) => {
                *outcomes.entry(outcome).or_insert(0) += 1;
                println!("round {rounds}: {outcome} (child finished the install: {installed})");
            }
            Err(problem) => {
                failures += 1;
                println!("round {rounds}: FAILED: {problem}");
            }
        }
    }
    println!("snapshot crash: {} passed, {failures} failed, outcomes {outcomes:?}", rounds - failures);
    if failures > 0 {
        std::process::exit(1);
    }
}
