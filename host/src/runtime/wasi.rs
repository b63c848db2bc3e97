//! A virtual, deterministic WASI for guests whose toolchains import it (Rust's
//! std, Python, JavaScript). Nothing ambient reaches the guest: no files
//! (no preopens), no sockets, no environment, no arguments, empty stdin;
//! both clocks read the timestamp of the entry being applied; both random
//! sources draw from a generator seeded by the entry; stdout and stderr
//! accept every write and discard it. (A stream that can fail when full would
//! be nondeterministic: instances are re-created at different moments on
//! different nodes. Guests log through `context.log`, which reaches the
//! host's log.)

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime_wasi::p2::pipe::SinkOutputStream;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder};

/// What the guest may observe about "now" and "random", set before each call
/// from the entry and shared with the WASI implementations.
#[derive(Clone)]
pub struct EntryEntropy {
    inner: Arc<Mutex<EntropyState>>,
}

struct EntropyState {
    timestamp_ms: u64,
    rng: ChaCha8Rng,
}

impl EntryEntropy {
    pub fn new() -> EntryEntropy {
        EntryEntropy {
            inner: Arc::new(Mutex::new(EntropyState { timestamp_ms: 0, rng: ChaCha8Rng::seed_from_u64(0) })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, EntropyState> {
        // Only plain numbers live behind the lock; a poisoned one is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resets time and randomness for a call on behalf of the entry
    /// `(index, term)` stamped with `timestamp_ms`. The same entry always
    /// yields the same sequence, on every replica and every replay.
    pub fn enter(&self, index: u64, term: u64, timestamp_ms: u64, call_kind: u8) {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&index.to_le_bytes());
        seed[8..16].copy_from_slice(&term.to_le_bytes());
        seed[16..24].copy_from_slice(&timestamp_ms.to_le_bytes());
        seed[24] = call_kind;
        let mut state = self.state();
        state.timestamp_ms = timestamp_ms;
        state.rng = ChaCha8Rng::from_seed(seed);
    }

    pub fn timestamp_ms(&self) -> u64 {
        self.state().timestamp_ms
    }

    pub fn next_u64(&self) -> u64 {
        self.state().rng.next_u64()
    }

    fn fill(&self, dst: &mut [u8]) {
        self.state().rng.fill_bytes(dst);
    }
}

impl Default for EntryEntropy {
    fn default() -> Self {
        Self::new()
    }
}

struct EntryWallClock(EntryEntropy);

impl HostWallClock for EntryWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.0.timestamp_ms())
    }
}

struct EntryMonotonicClock(EntryEntropy);

impl HostMonotonicClock for EntryMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }

    fn now(&self) -> u64 {
        self.0.timestamp_ms().saturating_mul(1_000_000)
    }
}

/// WASI's random interfaces, backed by the entry's generator.
struct EntryRandom(EntryEntropy);

impl rand_core_wasi::TryRng for EntryRandom {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.0.next_u64() as u32)
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(self.0.next_u64())
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.fill(dst);
        Ok(())
    }
}

/// Builds the virtual WASI context of one instance.
pub fn build(entropy: &EntryEntropy) -> WasiCtx {
    WasiCtxBuilder::new()
        .stdout(SinkOutputStream)
        .stderr(SinkOutputStream)
        .wall_clock(EntryWallClock(entropy.clone()))
        .monotonic_clock(EntryMonotonicClock(entropy.clone()))
        .secure_random(EntryRandom(entropy.clone()))
        .insecure_random(EntryRandom(entropy.clone()))
        .insecure_random_seed(0)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .build()
}
