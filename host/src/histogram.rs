//! Fixed-bucket histograms for the Prometheus text format.
//!
//! Observing is a bucket search over a dozen bounds and three relaxed atomic
//! additions: no lock, no allocation, nothing shared but cache lines, so
//! the write path may observe every persist, commit and request. (The
//! `prometheus-client` crate's histogram takes a lock per observation, and
//! the rest of `/metrics` is rendered from the member's status anyway.)
//! Bounds are fixed when the histogram is made; the rendering is cumulative,
//! as the format wants.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds for durations, in nanoseconds: 50 µs to 10 s, roughly
/// doubling (an fsync on this kind of machine takes 0.3 to 3 ms; a commit
/// across three members 1 to 100 ms).
pub const DURATION_BOUNDS_NS: &[u64] = &[
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Upper bounds for batch sizes (entries per batch).
pub const SIZE_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

/// What a histogram counts, which decides how its bounds and sum print.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Durations, kept in nanoseconds and printed in seconds.
    Seconds,
    /// Plain counts (entries, bytes), printed as they are.
    Count,
}

/// A histogram with fixed upper bounds (and the implicit `+Inf`).
#[derive(Debug)]
pub struct Histogram {
    unit: Unit,
    bounds: &'static [u64],
    /// One counter per bound, and one for values above the last.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram of durations ([`DURATION_BOUNDS_NS`]).
    pub fn durations() -> Histogram {
        Histogram::new(Unit::Seconds, DURATION_BOUNDS_NS)
    }

    /// A histogram of batch sizes ([`SIZE_BOUNDS`]).
    pub fn sizes() -> Histogram {
        Histogram::new(Unit::Count, SIZE_BOUNDS)
    }

    /// A histogram with `bounds` (ascending) in the histogram's own unit
    /// (nanoseconds for [`Unit::Seconds`]).
    pub fn new(unit: Unit, bounds: &'static [u64]) -> Histogram {
        debug_assert!(bounds.windows(2).all(|pair| pair[0] < pair[1]), "bounds must ascend");
        Histogram {
            unit,
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Counts one value.
    pub fn observe(&self, value: u64) {
        self.observe_many(value, 1);
    }

    /// Counts `times` values of `value` each (one batch's entries, all of
    /// which took the same time).
    pub fn observe_many(&self, value: u64, times: u64) {
        if times == 0 {
            return;
        }
        let bucket = self.bounds.partition_point(|&bound| bound < value);
        self.buckets[bucket].fetch_add(times, Ordering::Relaxed);
        self.sum.fetch_add(value.saturating_mul(times), Ordering::Relaxed);
        self.count.fetch_add(times, Ordering::Relaxed);
    }

    /// Counts one duration.
    pub fn observe_duration(&self, elapsed: Duration) {
        self.observe(u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Values counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the series of this histogram as `name` with `labels` (`""`
    /// or `key="value",...` without braces). The HELP and TYPE lines are the
    /// caller's ([`write_header`]), since labelled series share them.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let separator = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (bound, bucket) in self.bounds.iter().zip(self.buckets.iter()) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ =
                writeln!(out, "{name}_bucket{{{labels}{separator}le=\"{}\"}} {cumulative}", self.format_value(*bound));
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{separator}le=\"+Inf\"}} {cumulative}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.format_value(self.sum.load(Ordering::Relaxed)));
        // The count printed is the +Inf bucket's, so the two always agree even
        // while observations land during the rendering.
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }

    fn format_value(&self, value: u64) -> String {
        match self.unit {
            Unit::Seconds => format!("{}", value as f64 / 1e9),
            Unit::Count => value.to_string(),
        }
    }
}

/// The HELP and TYPE lines of histogram `name`.
pub fn write_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_whose_bound_holds_them_and_render_cumulatively() {
        let histogram = Histogram::new(Unit::Count, &[1, 10, 100]);
        for value in [0, 1, 2, 10, 11, 1000] {
            histogram.observe(value);
        }
        histogram.observe_many(50, 3);
        let mut out = String::new();
        histogram.render(&mut out, "x", "method=\"write\"");
        let expected = "x_bucket{method=\"write\",le=\"1\"} 2\n\
                        x_bucket{method=\"write\",le=\"10\"} 4\n\
                        x_bucket{method=\"write\",le=\"100\"} 8\n\
                        x_bucket{method=\"write\",le=\"+Inf\"} 9\n\
                        x_sum{method=\"write\"} 1174\n\
                        x_count{method=\"write\"} 9\n";
        assert_eq!(out, expected);
        assert_eq!(histogram.count(), 9);
    }

    #[test]
    fn durations_print_in_seconds() {
        let histogram = Histogram::durations();
        histogram.observe_duration(Duration::from_micros(700));
        let mut out = String::new();
        histogram.render(&mut out, "d", "");
        assert!(out.contains("d_bucket{le=\"0.0005\"} 0\n"), "{out}");
        assert!(out.contains("d_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("d_sum 0.0007\n"), "{out}");
        assert!(out.contains("d_count 1\n"), "{out}");
    }
}
