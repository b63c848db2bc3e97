//! A cache of the guests' latest values, in front of the `state` keyspace.
//!
//! Every guest call that reads a key goes through here; most write a key
//! they have just read (the kv guest answers a put with the value it
//! replaced). A read that misses in an LSM tree searches each memtable and
//! probes each table's filter and blocks: ~3-4 us here, the largest cost of
//! applying a command. A hit is a hash lookup and a copy.
//!
//! Entries are the values as stored (with their checksum, which was made or
//! verified here), shared with the store's own copies: caching a value
//! allocates nothing.
//!
//! Invariants: an entry is the committed value of its key (or that it has
//! none), or the value the batch now being committed writes there.
//! [`Store::apply`] swaps each write's value in before its batch commits
//! ([`StateCache::swap`]): the value it takes out is what the change history
//! records as replaced, found with the same search. Every reader is the
//! apply thread (guest calls and queries both run there), which reads
//! nothing between the swaps and the commit; a batch that fails to commit
//! clears the cache (and stops the member). The generation moves before the
//! swaps and after the commit, and a miss fills the cache only if it did not
//! move since the miss began reading, so a value read before a commit is
//! never cached after it. A snapshot install or restore clears it. Bounded
//! by the bytes of its keys and values plus a per-entry overhead; 0 turns it
//! off.
//!
//! [`Store::apply`]: super::Store::apply

use fjall::Slice;
use std::sync::atomic::{AtomicU64, Ordering};

/// What an entry costs beyond its key and value (hash table slot, the
/// slices' headers and counts), for the byte bound.
const ENTRY_OVERHEAD_BYTES: u64 = 64;

/// A value as stored (sealed), or `None` if the key has none.
type Value = Option<Slice>;

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<Slice, Value> for Weigh {
    fn weight(&self, key: &Slice, value: &Value) -> u64 {
        key.len() as u64 + value.as_ref().map_or(0, |v| v.len() as u64) + ENTRY_OVERHEAD_BYTES
    }
}

type Entries = quick_cache::sync::Cache<Slice, Value, Weigh, rustc_hash::FxBuildHasher>;

/// See the module documentation.
pub(super) struct StateCache {
    entries: Option<Entries>,
    /// Commits that changed the state, so far.
    generation: AtomicU64,
}

/// Where a miss started, for [`StateCache::fill`].
#[derive(Clone, Copy)]
pub(super) struct MissStart(u64);

impl StateCache {
    /// A cache of at most `bytes` (none at 0).
    pub fn new(bytes: u64) -> StateCache {
        let entries = (bytes > 0).then(|| {
            let items = (bytes / (ENTRY_OVERHEAD_BYTES + 256)).max(16) as usize;
            Entries::with(items, bytes, Weigh, rustc_hash::FxBuildHasher, Default::default())
        });
        StateCache { entries, generation: AtomicU64::new(0) }
    }

    /// The cached value of the state key `key` (without its checksum):
    /// `Some(None)` if it is known to have none, `None` if not cached; and
    /// where a miss starts.
    pub fn get(&self, key: &[u8]) -> (Option<Option<Vec<u8>>>, MissStart) {
        let start = MissStart(self.generation.load(Ordering::Acquire));
        let found = self.entries.as_ref().and_then(|entries| entries.get(key));
        let body = |sealed: Slice| super::codec::sealed_body(&sealed).to_vec();
        (found.map(|value| value.map(body)), start)
    }

    /// Caches what a miss that began at `start` read from the store (the
    /// stored value, checksum verified), unless a commit happened since.
    pub fn fill(&self, key: impl Into<Slice>, value: Option<Slice>, start: MissStart) {
        let Some(entries) = &self.entries else { return };
        if self.generation.load(Ordering::Acquire) != start.0 {
            return;
        }
        let key = key.into();
        entries.insert(key.clone(), value);
        // A commit slipped in while inserting: the value may be older than
        // its write-through, so neither stays.
        if self.generation.load(Ordering::Acquire) != start.0 {
            entries.remove(&key);
        }
    }

    /// Before a batch's writes are swapped in: misses under way are no
    /// longer cached.
    pub fn begin_writes(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Puts a write of the batch about to commit (state key, value as
    /// stored) in the cache, between [`StateCache::begin_writes`] and
    /// [`StateCache::committed`], and returns the value it replaced if that
    /// was cached: `Some(None)` if the key was known to have none, `None`
    /// if it was not cached (or the cache is off).
    pub fn swap(&self, key: Slice, value: Value) -> Option<Value> {
        let entries = self.entries.as_ref()?;
        let mut value = Some(value);
        let swap = |_: &Slice, cached: &mut Value| {
            quick_cache::sync::EntryAction::Retain(std::mem::replace(cached, value.take().unwrap_or_default()))
        };
        match entries.entry(&key, None, swap) {
            quick_cache::sync::EntryResult::Retained(previous) => Some(previous),
            quick_cache::sync::EntryResult::Vacant(place) => {
                let _ = place.insert(value.take().unwrap_or_default());
                None
            }
            // Neither is asked for (no placeholder waits, nothing is removed).
            _ => {
                if let Some(value) = value {
                    entries.insert(key, value);
                }
                None
            }
        }
    }

    /// After the batch whose writes were swapped in committed.
    pub fn committed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// After a commit: its writes, as `(state key, value as stored)`; for
    /// writes not swapped in before it.
    #[cfg(test)]
    pub fn write_through(&self, writes: impl Iterator<Item = (Slice, Option<Slice>)>) {
        self.begin_writes();
        for (key, value) in writes {
            self.swap(key, value);
        }
        self.committed();
    }

    /// After the state was replaced wholesale.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(entries) = &self.entries {
            entries.clear();
        }
    }

    /// Bytes held, for metrics and tests.
    pub fn bytes(&self) -> u64 {
        self.entries.as_ref().map_or(0, |entries| entries.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value as the store keeps it: the bytes and a checksum.
    fn sealed(value: &[u8]) -> Option<Slice> {
        Some(Slice::from(crate::storage::codec::seal(value.to_vec())))
    }

    fn key(bytes: &[u8]) -> Slice {
        Slice::from(bytes)
    }

    #[test]
    fn hits_give_the_value_or_its_absence_and_writes_go_through() {
        let cache = StateCache::new(1 << 20);
        let (found, start) = cache.get(b"k");
        assert_eq!(found, None, "nothing cached yet");
        cache.fill(b"k".to_vec(), sealed(b"v1"), start);
        cache.fill(b"absent".to_vec(), None, cache.get(b"absent").1);
        assert_eq!(cache.get(b"k").0, Some(Some(b"v1".to_vec())));
        assert_eq!(cache.get(b"absent").0, Some(None));
        cache.write_through([(key(b"k"), sealed(b"v2")), (key(b"absent"), sealed(b"now"))].into_iter());
        assert_eq!(cache.get(b"k").0, Some(Some(b"v2".to_vec())));
        assert_eq!(cache.get(b"absent").0, Some(Some(b"now".to_vec())));
        cache.write_through([(key(b"k"), None)].into_iter());
        assert_eq!(cache.get(b"k").0, Some(None), "a delete is cached as absent");
        // A swap hands back what it replaced, for the change history.
        cache.begin_writes();
        assert_eq!(cache.swap(key(b"k"), sealed(b"v3")), Some(None), "known to have had none");
        assert_eq!(cache.swap(key(b"absent"), None), Some(sealed(b"now")));
        assert_eq!(cache.swap(key(b"fresh"), sealed(b"n")), None, "not cached: not known");
        cache.committed();
        assert_eq!(cache.get(b"k").0, Some(Some(b"v3".to_vec())));
        assert_eq!(cache.get(b"absent").0, Some(None));
        assert_eq!(cache.get(b"fresh").0, Some(Some(b"n".to_vec())));
        cache.clear();
        assert_eq!(cache.get(b"k").0, None);
    }

    #[test]
    fn a_value_read_before_a_commit_is_not_cached_after_it() {
        let cache = StateCache::new(1 << 20);
        let (_, start) = cache.get(b"k");
        // The reader read "old" from the store; a commit then wrote "new"
        // (it was not cached, so the write-through put it there)...
        cache.write_through([(key(b"other"), sealed(b"x"))].into_iter());
        // ...and the reader's fill comes last.
        cache.fill(b"k".to_vec(), sealed(b"old"), start);
        assert_eq!(cache.get(b"k").0, None, "the stale read is not kept");
        let (_, after_clear) = cache.get(b"k");
        cache.clear();
        cache.fill(b"k".to_vec(), sealed(b"old"), after_clear);
        assert_eq!(cache.get(b"k").0, None, "nor one read before a snapshot replaced the state");
    }

    #[test]
    fn a_working_set_that_fits_is_served_from_the_cache_under_uniform_writes() {
        // The apply path: read the key, then write it through. New entries
        // enter a probationary queue first; with every key read again
        // before long they must all make it to the main one.
        let cache = StateCache::new(16 << 20);
        let keys = 20_000u64;
        let mut seed = 12345u64;
        let (mut hits, mut reads) = (0u64, 0u64);
        for round in 0..10 * keys {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = key(&((seed >> 33) % keys).to_be_bytes());
            let (found, start) = cache.get(&key);
            if found.is_none() {
                cache.fill(key.to_vec(), None, start);
            }
            if round >= 5 * keys {
                reads += 1;
                hits += u64::from(found.is_some());
            }
            cache.write_through([(key, sealed(&[7u8; 256]))].into_iter());
        }
        assert!(hits * 100 >= reads * 99, "{hits} hits in {reads} reads");
    }

    #[test]
    fn the_cache_holds_at_most_its_bytes_and_zero_turns_it_off() {
        let cache = StateCache::new(64 << 10);
        for i in 0..10_000u32 {
            let start = cache.get(&i.to_be_bytes()).1;
            cache.fill(i.to_be_bytes().to_vec(), sealed(&[7u8; 200]), start);
        }
        assert!(cache.bytes() <= 64 << 10, "{} bytes", cache.bytes());
        assert!(cache.bytes() > 32 << 10, "and it is used: {} bytes", cache.bytes());
        let off = StateCache::new(0);
        assert_eq!(off.swap(key(b"k"), sealed(b"v")), None);
        off.fill(b"k".to_vec(), sealed(b"v"), off.get(b"k").1);
        assert_eq!(off.get(b"k").0, None);
        assert_eq!(off.bytes(), 0);
    }
}
