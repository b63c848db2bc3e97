//! Fault injection for the fault suite (`tests/tests/faults.rs`), off unless
//! the process starts with `RAFT_HOST_FAULTS` naming a directory.
//!
//! Then a thread reads small files from that directory about every 100 ms,
//! each a number, and the member behaves accordingly until the file goes:
//!
//! - `sync-delay-ms`: every durable write of the log waits this long after
//!   its fdatasync (a slow disk);
//! - `clock-offset-ms`: the wall clock the leader stamps entries with is
//!   off by this much, either way (a clock jump);
//! - `free-bytes`: the free space this member sees on its data disk (a
//!   full disk, where the suite cannot mount a small filesystem).
//!
//! With the variable unset nothing reads the directory and every hook reads
//! as "no fault" from one atomic load.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// The environment variable that turns the hooks on.
pub const FAULTS_ENV: &str = "RAFT_HOST_FAULTS";

/// How often the hook files are read.
const POLL: Duration = Duration::from_millis(100);

/// "No fault" for `free-bytes`.
const REAL: u64 = u64::MAX;

struct Hooks {
    sync_delay_ms: AtomicU64,
    clock_offset_ms: AtomicI64,
    free_bytes: AtomicU64,
}

static HOOKS: Hooks =
    Hooks { sync_delay_ms: AtomicU64::new(0), clock_offset_ms: AtomicI64::new(0), free_bytes: AtomicU64::new(REAL) };
static WATCHING: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Starts reading the hooks if `RAFT_HOST_FAULTS` asks for it (once per
/// process; later calls do nothing). Returns the directory watched.
pub fn start_from_env() -> Option<&'static Path> {
    WATCHING
        .get_or_init(|| {
            let dir = PathBuf::from(std::env::var_os(FAULTS_ENV)?);
            tracing::warn!(dir = %dir.display(), "fault hooks are on ({FAULTS_ENV}): this member is under test");
            let watched = dir.clone();
            let spawned = std::thread::Builder::new().name("fault-hooks".into()).spawn(move || {
                loop {
                    read_hooks(&watched);
                    std::thread::sleep(POLL);
                }
            });
            if let Err(error) = spawned {
                tracing::error!(%error, "cannot start reading the fault hooks");
            }
            Some(dir)
        })
        .as_deref()
}

fn read_hooks(dir: &Path) {
    let number = |name: &str| -> Option<i64> { std::fs::read_to_string(dir.join(name)).ok()?.trim().parse().ok() };
    HOOKS.sync_delay_ms.store(number("sync-delay-ms").unwrap_or(0).max(0) as u64, Ordering::Relaxed);
    HOOKS.clock_offset_ms.store(number("clock-offset-ms").unwrap_or(0), Ordering::Relaxed);
    let free = number("free-bytes").map_or(REAL, |n| n.max(0) as u64);
    HOOKS.free_bytes.store(free, Ordering::Relaxed);
}

/// How long a durable log write waits after its sync, if a slow disk is
/// injected.
pub fn sync_delay() -> Option<Duration> {
    let ms = HOOKS.sync_delay_ms.load(Ordering::Relaxed);
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// Milliseconds to add to the wall clock entries are stamped with.
pub fn clock_offset_ms() -> i64 {
    HOOKS.clock_offset_ms.load(Ordering::Relaxed)
}

/// The free space to report instead of the disk's, if a full disk is
/// injected.
pub fn free_bytes() -> Option<u64> {
    let free = HOOKS.free_bytes.load(Ordering::Relaxed);
    (free != REAL).then_some(free)
}
