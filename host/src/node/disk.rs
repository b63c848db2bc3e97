//! Free space on the data disk, watched so the member never runs it out.
//!
//! The storage engine treats a failed write as fatal (it poisons itself,
//! rightly: a write that failed half-way cannot be trusted), so waiting for
//! ENOSPC would stop the member. Instead, once free space falls below the
//! reserve (`--min-free-disk-bytes`), the member takes no new entries: as
//! leader it refuses proposals (`RESOURCE_EXHAUSTED`, naming the disk; a
//! client retries it, as it would a busy member) and soon hands leadership
//! to a voter with room, so the cluster goes on taking writes; as
//! follower it lets the leader's appends with entries go unanswered (the
//! leader retries, as for a lost message) and refuses snapshots too large
//! for what is left (a snapshot replaces the state, so one that fits is the
//! way out when the member's own stale state fills the disk). It still
//! answers heartbeats and votes, serves reads and applies what it already
//! holds; the reserve is the room that needs. When space comes back, it
//! takes entries again and catches up by the ordinary means, as etcd does
//! with its NOSPACE alarm.

use super::shutdown::ShutdownSignal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How often free space is read.
const POLL: Duration = Duration::from_millis(250);

/// The data disk's free space as last read, and whether it is below the
/// reserve.
#[derive(Debug)]
pub struct DiskSpace {
    reserve_bytes: u64,
    free_bytes: AtomicU64,
    low: AtomicBool,
}

impl DiskSpace {
    /// A disk assumed roomy until first read, with `reserve_bytes` kept free.
    pub fn new(reserve_bytes: u64) -> DiskSpace {
        DiskSpace { reserve_bytes, free_bytes: AtomicU64::new(u64::MAX), low: AtomicBool::new(false) }
    }

    /// Whether free space is below the reserve: no new entries are taken.
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// Whether a snapshot stream of `total_bytes` may be staged. A member
    /// with room takes any; a low one takes a snapshot that fits twice (its
    /// records pass through the journal, then into tables) in what is free
    /// above a quarter of the reserve. Refusing every snapshot while low
    /// would leave a member stuck for good whenever its own stale state is
    /// what fills the disk: installing a snapshot replaces that state.
    pub fn admits_snapshot(&self, total_bytes: u64) -> bool {
        let needed = total_bytes.saturating_mul(2).saturating_add(self.reserve_bytes / 4);
        !self.is_low() || self.free_bytes() >= needed
    }

    /// Why a snapshot of `total_bytes` is refused while the disk is low.
    pub fn snapshot_refusal(&self, total_bytes: u64) -> String {
        format!(
            "this member's data disk is nearly full ({} bytes free, below the reserve of {} bytes): a snapshot of \
             {total_bytes} bytes needs twice its size free, above a quarter of the reserve",
            self.free_bytes(),
            self.reserve_bytes
        )
    }

    /// Free bytes as last read (`u64::MAX` before the first reading).
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// Why a proposal is refused while the disk is low.
    pub fn refusal(&self) -> String {
        format!(
            "this member's data disk is nearly full ({} bytes free, below the reserve of {} bytes): it takes no \
             new entries until space is freed, and hands leadership to a member with room",
            self.free_bytes(),
            self.reserve_bytes
        )
    }

    fn record(&self, free: u64) {
        self.free_bytes.store(free, Ordering::Relaxed);
        let low = free < self.reserve_bytes;
        if self.low.swap(low, Ordering::Relaxed) != low {
            match low {
                true => {
                    tracing::error!(free, reserve = self.reserve_bytes, "data disk nearly full: taking no new entries")
                }
                false => tracing::warn!(free, reserve = self.reserve_bytes, "data disk has room again: taking entries"),
            }
        }
    }
}

/// The free bytes of the filesystem that holds `dir`, as an unprivileged
/// writer may use them.
fn free_bytes_of(dir: &std::path::Path) -> std::io::Result<u64> {
    let stats = rustix::fs::statvfs(dir)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Reads the free space of `dir`'s disk into `space` every so often, until
/// the member stops. A fault hook may stand in for the disk.
pub(super) async fn watch(space: Arc<DiskSpace>, dir: PathBuf, mut stop: ShutdownSignal) {
    let mut failing = false;
    loop {
        let measured = match crate::faults::free_bytes() {
            Some(free) => Ok(free),
            None => free_bytes_of(&dir),
        };
        match measured {
            Ok(free) => {
                space.record(free);
                failing = false;
            }
            Err(error) if !failing => {
                tracing::warn!(dir = %dir.display(), %error, "cannot read the data disk's free space");
                failing = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = stop.wait() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_below_the_reserve_is_low_and_room_again_is_not() {
        let space = DiskSpace::new(100);
        assert!(!space.is_low(), "roomy until read");
        space.record(99);
        assert!(space.is_low());
        assert!(space.refusal().contains("99 bytes free"), "{}", space.refusal());
        space.record(100);
        assert!(!space.is_low());
        let real = free_bytes_of(std::path::Path::new(".")).expect("statvfs");
        assert!(real > 0);
    }

    #[test]
    fn a_low_disk_takes_a_snapshot_that_fits_twice_above_a_quarter_of_the_reserve() {
        let space = DiskSpace::new(1000);
        space.record(5000);
        assert!(space.admits_snapshot(1 << 30), "room: the disk is not low, no guess at what a snapshot frees");
        space.record(650);
        assert!(space.is_low());
        assert!(space.admits_snapshot(200), "2 x 200 + 250 = 650 fits");
        assert!(!space.admits_snapshot(201));
        assert!(space.snapshot_refusal(201).contains("650 bytes free"), "{}", space.snapshot_refusal(201));
        assert!(!space.admits_snapshot(u64::MAX), "no overflow");
    }
}
