//! A virtual, deterministic WASI for guests whose toolchains import it (Rust's
//! std, Python, JavaScript). Nothing ambient reaches the guest: no files
//! (no preopens), no sockets, no environment, no arguments, empty stdin;
//! both clocks read the timestamp of the entry being applied; both random
//! sources draw from a generator seeded by the entry; stdout and stderr are
//! forwarded line by line to the host's log. The output streams never fail
//! and never block: a stream that could fail when full would make replicas
//! diverge, since instances are re-created at different moments on
//! different nodes. Bytes past a bounded line buffer are dropped instead.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder};

/// What the guest may observe about "now" and "random", set before each call
/// from the entry and shared with the WASI implementations.
#[derive(Clone)]
pub struct EntryEntropy {
    inner: Arc<Mutex<EntropyState>>,
}

struct EntropyState {
    timestamp_ms: u64,
    seed: [u8; 32],
    /// Built from `seed` on the first draw: most calls never draw, and
    /// seeding a generator per command showed in the apply profile.
    rng: Option<ChaCha8Rng>,
}

impl EntropyState {
    fn rng(&mut self) -> &mut ChaCha8Rng {
        let seed = self.seed;
        self.rng.get_or_insert_with(|| ChaCha8Rng::from_seed(seed))
    }
}

impl EntryEntropy {
    pub fn new() -> EntryEntropy {
        EntryEntropy { inner: Arc::new(Mutex::new(EntropyState { timestamp_ms: 0, seed: [0; 32], rng: None })) }
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
        state.seed = seed;
        state.rng = None;
    }

    pub fn timestamp_ms(&self) -> u64 {
        self.state().timestamp_ms
    }

    pub fn next_u64(&self) -> u64 {
        self.state().rng().next_u64()
    }

    fn fill(&self, dst: &mut [u8]) {
        self.state().rng().fill_bytes(dst);
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
        .stdout(LogStream::new("stdout"))
        .stderr(LogStream::new("stderr"))
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

/// Longest line kept from a guest's stdout or stderr; the rest of a longer
/// line is dropped.
const OUTPUT_LINE_MAX_BYTES: usize = 4096;

/// A guest's stdout or stderr: complete lines go to the host's log.
#[derive(Clone)]
struct LogStream {
    name: &'static str,
    line: Arc<Mutex<Vec<u8>>>,
}

impl LogStream {
    fn new(name: &'static str) -> LogStream {
        LogStream { name, line: Arc::new(Mutex::new(Vec::new())) }
    }

    fn accept(&self, bytes: &[u8]) {
        let mut line = self.line.lock().unwrap_or_else(|p| p.into_inner());
        for &byte in bytes {
            if byte == b'\n' {
                tracing::info!(stream = self.name, line = %String::from_utf8_lossy(&line), "guest output");
                line.clear();
            } else if line.len() < OUTPUT_LINE_MAX_BYTES {
                line.push(byte);
            }
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        // Only WASIp3 guests use this path, and the host links WASIp2 only.
        Box::new(tokio::io::sink())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.accept(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::EntryEntropy;

    /// Members running different host versions replay the same entries: the
    /// numbers an entry draws are part of the replicated contract, so they
    /// are pinned here rather than derived from the implementation.
    #[test]
    fn an_entry_draws_the_same_pinned_sequence_every_time_it_is_entered() {
        let entropy = EntryEntropy::new();
        entropy.enter(42, 7, 1_700_000_000_000, 1);
        let first = [entropy.next_u64(), entropy.next_u64()];
        entropy.enter(43, 7, 1_700_000_000_001, 1);
        let other_entry = entropy.next_u64();
        entropy.enter(42, 7, 1_700_000_000_000, 1);
        let again = [entropy.next_u64(), entropy.next_u64()];
        assert_eq!(first, again, "re-entering an entry restarts its sequence");
        assert_ne!(first[0], other_entry);
        assert_eq!(first, [PINNED_FIRST, PINNED_SECOND], "the sequence of an entry changed: {first:?}");
        assert_eq!(entropy.timestamp_ms(), 1_700_000_000_000);
    }

    const PINNED_FIRST: u64 = 10_124_932_097_698_748_581;
    const PINNED_SECOND: u64 = 8_442_441_915_293_646_512;
}
