//! This process's own resource use, for the metrics endpoint, `Status`, and
//! `raft-host bench` (which turns it into CPU per operation). Read from
//! Linux's `/proc/self`; elsewhere the figures are absent, never made up.
//!
//! Also the CPU priority of threads whose work is off the write path
//! ([`BackgroundPriority`]): on Linux a thread's nice value is its own.

/// CPU time and memory of this process so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProcessUsage {
    /// User plus system CPU time of every thread, in seconds.
    pub cpu_seconds: f64,
    /// Resident set size now, in bytes.
    pub resident_bytes: u64,
}

/// A number drawn once per process: members that report the same one share
/// a process (as under `raft-host dev`), and so share its CPU and memory
/// figures, which must then be counted once.
pub fn instance_id() -> u64 {
    static INSTANCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *INSTANCE.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's randomness once per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish().max(1)
    })
}

/// Units of the times in `/proc/<pid>/stat`: the kernel reports them in
/// USER_HZ, which is 100 on every architecture Linux exposes to user space.
const USER_HZ: f64 = 100.0;

/// This process's usage, or `None` where `/proc/self` is not readable.
pub fn usage() -> Option<ProcessUsage> {
    usage_at("/proc/self")
}

/// Another process's usage (the bench reads etcd's this way), or `None`
/// where it is gone or not readable.
pub fn usage_of(pid: u32) -> Option<ProcessUsage> {
    usage_at(&format!("/proc/{pid}"))
}

fn usage_at(dir: &str) -> Option<ProcessUsage> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    Some(ProcessUsage { cpu_seconds: cpu_seconds_of(&stat)?, resident_bytes: resident_bytes_of(&status)? })
}

/// What a member's threads do, told apart by the names they are given:
/// the kinds [`thread_cpu`] reports.
pub const THREAD_KINDS: [&str; 4] = ["apply", "runtime", "storage", "other"];

/// The kind (one of [`THREAD_KINDS`]) of a thread named `name`: `apply` runs
/// a member's guests (`apply-N`, one per member), `runtime` the network,
/// consensus and the log's writes and syncs (tokio's workers and blocking
/// pool), `storage` the storage's flushes and compactions (fjall's pool),
/// `other` the rest (the main thread, module compiles).
pub fn thread_kind(name: &str) -> &'static str {
    if name.starts_with("apply-") {
        "apply"
    } else if name.starts_with("tokio-") {
        "runtime"
    } else if name.starts_with("fjall") {
        "storage"
    } else {
        "other"
    }
}

/// CPU time of this process's threads by kind, kept so that each kind's
/// figure only grows: a thread's time stays counted after it exits (as of
/// the last read that saw it; tokio's blocking threads come and go).
#[derive(Default)]
struct ThreadLedger {
    /// Live threads by (id, start time: ids are reused) -> (kind, clock
    /// ticks; whole ticks, so sums do not depend on their order).
    live: std::collections::HashMap<(u32, u64), (&'static str, u64)>,
    /// Ticks of threads gone since, by kind.
    retired: std::collections::BTreeMap<&'static str, u64>,
}

/// This process's CPU time by kind of thread ([`thread_kind`]), in seconds,
/// every kind of [`THREAD_KINDS`] once, in that order; each figure only
/// grows from one call to the next. `None` where `/proc/self/task` is not
/// readable. A thread's time between the last call and its exit is not
/// counted, so the kinds may add up to a little less than
/// [`ProcessUsage::cpu_seconds`].
pub fn thread_cpu() -> Option<Vec<(&'static str, f64)>> {
    static LEDGER: std::sync::Mutex<Option<ThreadLedger>> = std::sync::Mutex::new(None);
    // Held across the read: a caller with an older reading must not put it
    // in after a newer one.
    let mut ledger = LEDGER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut seen = std::collections::HashMap::new();
    for (tid, stat) in thread_stats("/proc/self")? {
        let Some((name, ticks, started)) = thread_stat_of(&stat) else { continue };
        seen.insert((tid, started), (thread_kind(name), ticks));
    }
    let ledger = ledger.get_or_insert_with(ThreadLedger::default);
    let gone: Vec<(u32, u64)> = ledger.live.keys().filter(|key| !seen.contains_key(key)).copied().collect();
    for key in gone {
        if let Some((kind, ticks)) = ledger.live.remove(&key) {
            *ledger.retired.entry(kind).or_default() += ticks;
        }
    }
    ledger.live.extend(seen);
    Some(
        THREAD_KINDS
            .iter()
            .map(|&kind| {
                let live: u64 = ledger.live.values().filter(|(k, _)| *k == kind).map(|(_, ticks)| ticks).sum();
                (kind, (live + ledger.retired.get(kind).copied().unwrap_or(0)) as f64 / USER_HZ)
            })
            .collect(),
    )
}

/// Each thread of the process at `dir` (`/proc/self`, `/proc/<pid>`) by id,
/// with its `stat` line; `None` where the process's threads cannot be
/// listed. A thread that exits between the listing and the read is left out.
fn thread_stats(dir: &str) -> Option<Vec<(u32, String)>> {
    let tasks = std::fs::read_dir(format!("{dir}/task")).ok()?;
    Some(
        tasks
            .flatten()
            .filter_map(|task| {
                let tid = task.file_name().to_str()?.parse().ok()?;
                Some((tid, std::fs::read_to_string(task.path().join("stat")).ok()?))
            })
            .collect(),
    )
}

/// The command name (field 2) of a `/proc/<pid>/stat` line: what is
/// between the first `(` and the last `)`, since it may hold either.
fn name_of(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// A thread's name, CPU time (utime + stime) and start time (field 22,
/// since boot), both in clock ticks, from its `/proc/self/task/<tid>/stat`.
fn thread_stat_of(stat: &str) -> Option<(&str, u64, u64)> {
    let name = name_of(stat)?;
    let ticks = cpu_ticks_of(stat)?;
    let started = fields_after_name(stat)?.nth(19)?.parse().ok()?;
    Some((name, ticks, started))
}

/// The ids of the processes on this machine whose command name is `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == name))
        .collect();
    pids.sort_unstable();
    pids
}

/// The memory this process may use: the machine's (`MemTotal`), or its
/// control group's limit where that is lower (a container's). `None` where
/// neither is readable.
pub fn memory_available_bytes() -> Option<u64> {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| mem_total_of(&text));
    let group = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|text| text.trim().parse().ok());
    match (machine, group) {
        (Some(machine), Some(group)) => Some(machine.min(group)),
        (machine, group) => machine.or(group),
    }
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total_of(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.trim_start_matches("MemTotal:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The fields of a `/proc/<pid>/stat` line from field 3 on. The command
/// name (field 2) is in parentheses and may hold spaces, so the fields are
/// counted from the last `)`.
fn fields_after_name(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in seconds.
fn cpu_seconds_of(stat: &str) -> Option<f64> {
    Some(cpu_ticks_of(stat)? as f64 / USER_HZ)
}

/// utime + stime of a `/proc/<pid>/stat` line, in clock ticks.
fn cpu_ticks_of(stat: &str) -> Option<u64> {
    let mut fields = fields_after_name(stat)?.skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// The nice value (field 19 of its `stat`) of each thread of process `pid`
/// whose name starts with `prefix`; empty where `/proc` is not readable.
/// For checking [`BackgroundPriority`] from outside the process.
pub fn thread_nice_values(pid: u32, prefix: &str) -> Vec<i32> {
    thread_stats(&format!("/proc/{pid}"))
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, stat)| name_of(stat).is_some_and(|name| name.starts_with(prefix)))
        .filter_map(|(_, stat)| fields_after_name(&stat)?.nth(16)?.parse().ok())
        .collect()
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
fn resident_bytes_of(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// How much lower than the write path background work runs by default, in
/// nice steps (see [`BackgroundPriority`]).
pub const DEFAULT_BACKGROUND_NICE: i32 = 10;

/// The highest nice value Linux has.
const NICE_MAX: i32 = 19;

/// Lowers the CPU priority of threads whose work a write does not wait for:
/// the storage's flushes and compactions, and the apply task of a member
/// that is not the leader (a follower's write is acknowledged once its log
/// is durable; applying it later delays no client). When the cores are
/// busy, the threads that carry a write from proposal to answer (network,
/// consensus, the log's fsync, the leader's apply) then run first, which
/// shortens every write's wait in the run queue. RocksDB lowers its
/// compaction threads for the same reason.
///
/// Linux only, and relative to the priority the threads start with; a
/// nice of 0 turns it off. Elsewhere a process's threads share one
/// priority, so nothing is changed there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackgroundPriority {
    /// Nice steps below the write path (0 to 19).
    pub nice: i32,
}

impl BackgroundPriority {
    /// Lower by `nice` steps, clamped to what Linux allows.
    pub fn new(nice: i32) -> BackgroundPriority {
        BackgroundPriority { nice: nice.clamp(0, NICE_MAX) }
    }

    /// Runs `start` on a helper thread lowered by this priority and returns
    /// its result: threads that `start` spawns inherit the lower priority
    /// (the storage's worker pool is spawned when its database opens). Fails
    /// only if no thread can be spawned.
    pub fn spawning_lowered<T: Send>(self, start: impl FnOnce() -> T + Send) -> std::io::Result<T> {
        if self.nice == 0 || !cfg!(target_os = "linux") {
            return Ok(start());
        }
        std::thread::scope(|scope| {
            let helper = std::thread::Builder::new().name("lowered-start".into()).spawn_scoped(scope, move || {
                if let Err(error) = lower_current_thread(self.nice) {
                    tracing::warn!(%error, nice = self.nice, "could not lower the priority of background threads");
                }
                start()
            })?;
            Ok(helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        })
    }
}

/// The calling thread's nice value (Linux: the thread's own).
pub fn current_thread_nice() -> std::io::Result<i32> {
    #[cfg(target_os = "linux")]
    {
        Ok(rustix::process::getpriority_process(None)?)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Sets the calling thread's nice value. Raising a thread's priority back
/// (a lower nice value) needs CAP_SYS_NICE or a high enough RLIMIT_NICE;
/// see [`can_raise_priority`].
pub fn set_current_thread_nice(nice: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        Ok(rustix::process::setpriority_process(None, nice.clamp(-20, NICE_MAX))?)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }
}

/// Lowers the calling thread's priority by `steps` from where it is.
fn lower_current_thread(steps: i32) -> std::io::Result<()> {
    set_current_thread_nice(current_thread_nice()? + steps)
}

/// Whether this process may give a thread back the priority it lowered:
/// tried once, on a throwaway thread, so that a thread that could not is
/// never left lowered.
pub fn can_raise_priority() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        let probe = std::thread::Builder::new().name("nice-probe".into()).spawn(|| {
            let Ok(base) = current_thread_nice() else { return false };
            if base >= NICE_MAX {
                return false;
            }
            lower_current_thread(1).is_ok() && set_current_thread_nice(base).is_ok()
        });
        probe.ok().and_then(|probe| probe.join().ok()).unwrap_or(false)
    })
}

/// The priority of a thread that is background work at some times and on
/// the write path at others (the apply task: a follower's, then a
/// leader's). It can move back up only where [`can_raise_priority`]; where
/// it cannot, the thread is never lowered.
#[derive(Debug)]
pub struct RolePriority {
    /// The thread's nice value when it is on the write path.
    base: i32,
    /// Steps it goes down as background work; 0 when it must not.
    steps: i32,
    lowered: bool,
}

impl RolePriority {
    /// For the calling thread, which starts on the write path.
    pub fn for_current_thread(priority: BackgroundPriority) -> RolePriority {
        let base = current_thread_nice().ok();
        let steps = match base {
            Some(_) if priority.nice > 0 && can_raise_priority() => priority.nice,
            Some(_) if priority.nice > 0 => {
                tracing::info!(
                    "a follower's apply task runs at normal priority: giving it back when the member leads needs CAP_SYS_NICE or RLIMIT_NICE"
                );
                0
            }
            _ => 0,
        };
        RolePriority { base: base.unwrap_or(0), steps, lowered: false }
    }

    /// Lowers the calling thread while it does background work, and raises
    /// it back when it does not. A failure leaves the priority as it was.
    pub fn set_background(&mut self, background: bool) {
        if self.steps == 0 || self.lowered == background {
            return;
        }
        let nice = if background { (self.base + self.steps).min(NICE_MAX) } else { self.base };
        match set_current_thread_nice(nice) {
            Ok(()) => self.lowered = background,
            Err(error) => tracing::warn!(%error, nice, "could not change the apply task's priority"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `test` on a fresh thread, so a nice value it sets stays there.
    fn on_own_thread(test: impl FnOnce() + Send + 'static) {
        std::thread::spawn(test).join().expect("test thread");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn threads_started_under_a_lowered_priority_inherit_it_and_the_caller_keeps_its_own() {
        on_own_thread(|| {
            let base = current_thread_nice().expect("nice");
            let (inside, spawned) = BackgroundPriority::new(5)
                .spawning_lowered(|| {
                    let spawned = std::thread::spawn(|| current_thread_nice().expect("nice"));
                    (current_thread_nice().expect("nice"), spawned.join().expect("spawned"))
                })
                .expect("helper thread");
            assert_eq!((inside, spawned), ((base + 5).min(NICE_MAX), (base + 5).min(NICE_MAX)));
            assert_eq!(current_thread_nice().expect("nice"), base);
            // 0 runs where it is called, changing nothing.
            let here = std::thread::current().id();
            assert_eq!(BackgroundPriority::new(0).spawning_lowered(|| std::thread::current().id()).ok(), Some(here));
        });
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_role_priority_lowers_its_thread_as_background_and_gives_it_back_only_where_it_can() {
        on_own_thread(|| {
            let base = current_thread_nice().expect("nice");
            let mut role = RolePriority::for_current_thread(BackgroundPriority::new(7));
            role.set_background(true);
            let lowered = if can_raise_priority() { (base + 7).min(NICE_MAX) } else { base };
            assert_eq!(current_thread_nice().expect("nice"), lowered);
            role.set_background(true);
            assert_eq!(current_thread_nice().expect("nice"), lowered, "twice is once");
            role.set_background(false);
            assert_eq!(current_thread_nice().expect("nice"), base);
            // Off: never touched.
            let mut off = RolePriority::for_current_thread(BackgroundPriority::new(0));
            off.set_background(true);
            assert_eq!(current_thread_nice().expect("nice"), base);
        });
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_threads_nice_value_is_read_from_outside_by_its_name() {
        on_own_thread(|| {
            let lowered = std::thread::Builder::new()
                .name("nice-read-test".into())
                .spawn(|| {
                    let base = current_thread_nice().expect("nice");
                    set_current_thread_nice(base + 3).expect("lowering is always allowed");
                    thread_nice_values(std::process::id(), "nice-read-test")
                })
                .expect("thread")
                .join()
                .expect("thread ran");
            let base = current_thread_nice().expect("nice");
            assert_eq!(lowered, vec![(base + 3).min(NICE_MAX)]);
            assert!(thread_nice_values(std::process::id(), "no-such-thread-name").is_empty());
        });
    }

    #[test]
    fn background_nice_is_clamped_to_what_linux_has() {
        assert_eq!(BackgroundPriority::new(-3).nice, 0);
        assert_eq!(BackgroundPriority::new(40).nice, 19);
        assert_eq!(BackgroundPriority::new(DEFAULT_BACKGROUND_NICE).nice, 10);
    }

    #[test]
    fn stat_fields_are_counted_after_the_command_name_even_with_spaces_in_it() {
        let stat = "4242 (raft host) S 1 4242 4242 0 -1 4194560 7000 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_seconds_of(stat), Some(3.25));
        assert_eq!(cpu_seconds_of("garbage"), None);
        assert_eq!(cpu_seconds_of("1 (x) S 1"), None);
    }

    #[test]
    fn a_thread_stat_gives_its_name_cpu_time_and_start_even_with_parentheses_in_the_name() {
        let stat = "4243 (apply-(1) x) S 1 4242 4242 0 -1 4194560 7000 0 0 0 250 75 0 0 20 0 9 0 8123 0 0";
        assert_eq!(thread_stat_of(stat), Some(("apply-(1) x", 325, 8123)));
        assert_eq!(thread_stat_of("4243 (x) S 1"), None);
        assert_eq!(thread_stat_of("no name here"), None);
    }

    #[test]
    fn threads_are_told_apart_by_the_names_members_give_them() {
        assert_eq!(thread_kind("apply-3"), "apply");
        assert_eq!(thread_kind("tokio-rt-worker"), "runtime");
        assert_eq!(thread_kind("fjall:worker"), "storage");
        assert_eq!(thread_kind("module-compile"), "other");
        assert_eq!(thread_kind("raft-host"), "other");
        assert!(
            ["apply-1", "tokio-rt-worker", "fjall:worker", "main"]
                .iter()
                .all(|n| THREAD_KINDS.contains(&thread_kind(n)))
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_busy_thread_counts_under_its_kind_and_stays_counted_after_it_exits() {
        let before = thread_cpu().expect("readable on Linux");
        assert_eq!(before.iter().map(|(kind, _)| *kind).collect::<Vec<_>>(), THREAD_KINDS);
        let apply = |figures: &[(&str, f64)]| figures.iter().find(|(kind, _)| *kind == "apply").map(|(_, s)| *s);
        let (sender, receiver) = std::sync::mpsc::channel();
        let spinner = std::thread::Builder::new()
            .name("apply-test".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let mut spin = 0u64;
                while started.elapsed() < std::time::Duration::from_millis(200) {
                    spin = std::hint::black_box(spin.wrapping_add(1));
                }
                // Seen alive once it has used its time, then let go.
                let _ = receiver.recv();
            })
            .expect("thread");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let busy = thread_cpu().expect("readable");
        sender.send(()).expect("spinner waits");
        spinner.join().expect("spinner ran");
        let after = thread_cpu().expect("readable");
        let (before, busy, after) = (apply(&before).unwrap(), apply(&busy).unwrap(), apply(&after).unwrap());
        // 200 ms of spinning; the clock ticks at 10 ms and other tests share the cores.
        assert!(busy - before >= 0.05, "apply threads: {before} -> {busy}");
        assert!(after >= busy, "an exited thread's time is kept: {busy} -> {after}");
    }

    #[test]
    fn resident_memory_comes_from_vmrss() {
        let status = "Name:\traft-host\nVmPeak:\t  900 kB\nVmRSS:\t   51200 kB\nThreads:\t9\n";
        assert_eq!(resident_bytes_of(status), Some(51200 * 1024));
        assert_eq!(resident_bytes_of("Name:\tx\n"), None);
    }

    #[test]
    fn memory_comes_from_meminfo_or_the_control_group_whichever_is_lower() {
        assert_eq!(mem_total_of("MemTotal:       24576000 kB\nMemFree: 1 kB\n"), Some(24576000 * 1024));
        assert_eq!(mem_total_of("MemFree: 1 kB\n"), None);
        let here = memory_available_bytes().expect("readable on Linux");
        assert!(here > 64 << 20, "{here}");
    }

    #[test]
    fn the_instance_id_is_stable_within_a_process_and_never_zero() {
        assert_eq!(instance_id(), instance_id());
        assert_ne!(instance_id(), 0, "0 means 'not reported' on the wire");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn another_process_is_found_by_name_and_read_like_this_one() {
        let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let pid = sleeper.id();
        // Until the child has exec'd `sleep`, it still carries our name.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !pids_named("sleep").contains(&pid) {
            assert!(std::time::Instant::now() < deadline, "pid {pid} never showed up as sleep");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let usage = usage_of(pid).expect("its usage");
        assert!(usage.resident_bytes > 0);
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert_eq!(usage_of(pid), None, "a reaped process has no usage");
    }

    #[test]
    fn this_process_reports_its_own_usage_and_cpu_time_only_grows() {
        let before = usage().expect("readable on Linux");
        let mut spin = 0u64;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(60) {
            spin = std::hint::black_box(spin.wrapping_add(1));
        }
        let after = usage().expect("readable on Linux");
        assert!(after.cpu_seconds > before.cpu_seconds, "{before:?} -> {after:?}");
        assert!(after.resident_bytes > 1 << 20, "{after:?}");
    }
}
