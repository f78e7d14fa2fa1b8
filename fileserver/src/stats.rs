//! Counters and latency histograms a running fileserver shows tests, benchmarks,
//! `ServerCounters` and `ServerFigures` requests (`holdfast vos counters`).
//! Invariant: counters only grow and histograms only count, so relaxed ordering is enough
//! for figures read after the fact; recording takes no lock but a shared read of the map
//! of request kinds (written once per kind).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;
use proto::histogram::{FigureUnit, Figures, Histogram, NamedHistogram};

/// The histogram of each request kind is named this prefix and the kind
/// (`Request::kind_name`).
pub const REQUEST_FIGURE_PREFIX: &str = "request ";
/// Storage commits: one durable metadata transaction (or checkpoint) each, in µs.
pub const STORAGE_COMMIT_FIGURE: &str = "storage commit";
/// The metadata log's flushes: the fsync of one group, in µs.
pub const LOG_FSYNC_FIGURE: &str = "log fsync";
/// The metadata log's flushes: records made durable by one fsync.
pub const LOG_GROUP_FIGURE: &str = "log group records";

/// Per-server counters and histograms, shared between the caller of `run` and the service.
#[derive(Debug, Default)]
pub struct Stats {
    fetch_data_calls: AtomicU64,
    fetch_data_bytes: AtomicU64,
    snapshot_pause_max_us: AtomicU64,
    /// Decode to reply, by request kind. Bounded: one entry per kind of `Request`.
    requests: RwLock<BTreeMap<&'static str, Histogram>>,
    storage_commit: Histogram,
    log_fsync: Histogram,
    log_group_records: Histogram,
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

    /// The counters and every histogram, for `ServerFigures`: the request kinds by name,
    /// then storage commits and the log's flushes (present, if empty, so that a reader
    /// finds every figure it knows of).
    pub fn figures(&self) -> Figures {
        let latency = |name: String, histogram: &Histogram| NamedHistogram {
            name,
            unit: FigureUnit::Microseconds,
            histogram: histogram.snapshot(),
        };
        let mut histograms: Vec<NamedHistogram> = self
            .requests
            .read()
            .iter()
            .map(|(kind, histogram)| latency(format!("{REQUEST_FIGURE_PREFIX}{kind}"), histogram))
            .collect();
        histograms.push(latency(STORAGE_COMMIT_FIGURE.into(), &self.storage_commit));
        histograms.push(latency(LOG_FSYNC_FIGURE.into(), &self.log_fsync));
        histograms.push(NamedHistogram {
            name: LOG_GROUP_FIGURE.into(),
            unit: FigureUnit::Count,
            histogram: self.log_group_records.snapshot(),
        });
        Figures {
            counters: self.counters(),
            histograms,
        }
    }

    /// One request of `kind` answered `latency` after it was decoded.
    pub fn record_request(&self, kind: &'static str, latency: Duration) {
        if let Some(histogram) = self.requests.read().get(kind) {
            histogram.record_duration(latency);
            return;
        }
        self.requests
            .write()
            .entry(kind)
            .or_default()
            .record_duration(latency);
    }

    /// One durable storage commit (a metadata transaction, or a checkpoint of the log
    /// into the tables) that took `latency`.
    pub fn record_storage_commit(&self, latency: Duration) {
        self.storage_commit.record_duration(latency);
    }

    /// One flush of the metadata log: `records` made durable by an fsync of `fsync`.
    pub fn record_log_flush(&self, fsync: Duration, records: usize) {
        self.log_fsync.record_duration(fsync);
        self.log_group_records
            .record(u64::try_from(records).unwrap_or(u64::MAX));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_name_each_request_kind_and_the_log_slots() {
        let stats = Stats::default();
        stats.record_request("FetchData", Duration::from_micros(300));
        stats.record_request("FetchData", Duration::from_micros(500));
        stats.record_request("Create", Duration::from_millis(2));
        stats.record_log_flush(Duration::from_micros(800), 12);
        stats.record_storage_commit(Duration::from_millis(3));
        let figures = stats.figures();
        let count = |name: &str| figures.histogram(name).map(|h| h.count());
        assert_eq!(count("request FetchData"), Some(2));
        assert_eq!(count("request Create"), Some(1));
        assert_eq!(count(STORAGE_COMMIT_FIGURE), Some(1));
        assert_eq!(count(LOG_FSYNC_FIGURE), Some(1));
        let group = figures.histogram(LOG_GROUP_FIGURE).unwrap();
        assert_eq!((group.count(), group.max), (1, 12));
        assert_eq!(figures.counter("fetch_data_calls"), Some(0));
    }
}
