//! Counters a running fileserver shows tests, benchmarks and `ServerCounters` requests.
//! Invariant: counters only grow, so relaxed ordering is enough for figures read after
//! the fact.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-server counters, shared between the caller of `run` and the service.
#[derive(Debug, Default)]
pub struct Stats {
    fetch_data_calls: AtomicU64,
    fetch_data_bytes: AtomicU64,
    snapshot_pause_max_us: AtomicU64,
}

impl Stats {
    /// `FetchData` requests answered with data.
    pub fn fetch_data_calls(&self) -> u64 {
        self.fetch_data_calls.load(Ordering::Relaxed)
    }

    /// Bytes returned by `FetchData`.
    pub fn fetch_data_bytes(&self) -> u64 {
        self.fetch_data_bytes.load(Ordering::Relaxed)
    }

    /// The longest time the lock tables were held to capture a state snapshot, in µs.
    pub fn snapshot_pause_max_us(&self) -> u64 {
        self.snapshot_pause_max_us.load(Ordering::Relaxed)
    }

    /// Every counter by name, for `ServerCounters`.
    pub fn counters(&self) -> Vec<(String, u64)> {
        vec![
            ("fetch_data_calls".into(), self.fetch_data_calls()),
            ("fetch_data_bytes".into(), self.fetch_data_bytes()),
            ("snapshot_pause_max_us".into(), self.snapshot_pause_max_us()),
        ]
    }

    pub(crate) fn record_snapshot_pause(&self, micros: u64) {
        self.snapshot_pause_max_us
            .fetch_max(micros, Ordering::Relaxed);
    }

    pub(crate) fn record_fetch_data(&self, bytes: usize) {
        self.fetch_data_calls.fetch_add(1, Ordering::Relaxed);
        self.fetch_data_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}
