//! This process's own resource use, for the metrics endpoint, `Status`, and
//! `raft-host bench` (which turns it into CPU per operation). Read from
//! Linux's `/proc/self`; elsewhere the figures are absent, never made up.

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

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may hold spaces, so the
/// fields are counted from the last `)`.
fn cpu_seconds_of(stat: &str) -> Option<f64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / USER_HZ)
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
fn resident_bytes_of(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name_even_with_spaces_in_it() {
        let stat = "4242 (raft host) S 1 4242 4242 0 -1 4194560 7000 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(cpu_seconds_of(stat), Some(3.25));
        assert_eq!(cpu_seconds_of("garbage"), None);
        assert_eq!(cpu_seconds_of("1 (x) S 1"), None);
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
