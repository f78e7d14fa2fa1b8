//! Where a mount's time goes: the latency of each FUSE operation, from the kernel's
//! request to the reply, and the data path's counters, shown by `holdfast fs counters`.
//! Invariant: recording takes no lock but a shared read of the map of operations (written
//! once per operation name, a fixed set), and counters only grow.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::RwLock;
use proto::histogram::{FigureUnit, Figures, Histogram, NamedHistogram};

/// Each FUSE operation's histogram is named this prefix and the operation (`read`,
/// `lookup`, `create`...).
pub const OPERATION_FIGURE_PREFIX: &str = "fuse ";

/// A mount's figures, held by its manager.
#[derive(Debug, Default)]
pub struct MountFigures {
    /// Request to reply, by operation. Bounded by the `Filesystem` methods there are.
    operations: RwLock<BTreeMap<&'static str, Histogram>>,
    data_path: DataPathFigures,
}

/// What the data path did, as counts the reading, opening and caching code fills in.
#[derive(Debug, Default)]
pub struct DataPathFigures {
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    passthrough_opens: AtomicU64,
    passthrough_fallbacks: AtomicU64,
}

impl DataPathFigures {
    /// A read answered from the local cache without asking a server.
    pub fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A read that had to fetch from a server.
    pub fn cache_miss(&self) {
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
    }

    /// An open answered with a kernel passthrough backing file.
    pub fn passthrough_open(&self) {
        self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// An open that took the ordinary path where passthrough was wanted (no
    /// capability, a partial file, the inode open the other way already).
    pub fn passthrough_fallback(&self) {
        self.passthrough_fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter by name, in a stable order.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        vec![
            ("cache_hits".into(), load(&self.cache_hits)),
            ("cache_misses".into(), load(&self.cache_misses)),
            ("passthrough_opens".into(), load(&self.passthrough_opens)),
            (
                "passthrough_fallbacks".into(),
                load(&self.passthrough_fallbacks),
            ),
        ]
    }
}

impl MountFigures {
    /// The data path's counters, for the code that reads, opens and caches to fill in.
    pub fn data_path(&self) -> &DataPathFigures {
        &self.data_path
    }

    /// Starts timing one FUSE `operation` (`read`, `create`...); the time is recorded
    /// when the timer is dropped, after the reply.
    pub fn time_operation(self: &Arc<Self>, operation: &'static str) -> OperationTimer {
        OperationTimer {
            figures: self.clone(),
            operation,
            started: Instant::now(),
        }
    }

    /// The counters, then each operation's latency by name.
    pub fn figures(&self) -> Figures {
        let histograms = self
            .operations
            .read()
            .iter()
            .map(|(operation, histogram)| NamedHistogram {
                name: format!("{OPERATION_FIGURE_PREFIX}{operation}"),
                unit: FigureUnit::Microseconds,
                histogram: histogram.snapshot(),
            })
            .collect();
        Figures {
            counters: self.data_path.counters(),
            histograms,
        }
    }

    fn record(&self, operation: &'static str, started: Instant) {
        let latency = started.elapsed();
        if let Some(histogram) = self.operations.read().get(operation) {
            histogram.record_duration(latency);
            return;
        }
        self.operations
            .write()
            .entry(operation)
            .or_default()
            .record_duration(latency);
    }
}

/// One FUSE operation in flight; dropping it records its latency.
pub struct OperationTimer {
    figures: Arc<MountFigures>,
    operation: &'static str,
    started: Instant,
}

impl Drop for OperationTimer {
    fn drop(&mut self) {
        self.figures.record(self.operation, self.started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_show_counters_and_each_operation() {
        let figures = Arc::new(MountFigures::default());
        figures.data_path().cache_hit();
        figures.data_path().cache_hit();
        figures.data_path().passthrough_fallback();
        drop(figures.time_operation("read"));
        let shown = figures.figures();
        assert_eq!(shown.counter("cache_hits"), Some(2));
        assert_eq!(shown.counter("cache_misses"), Some(0));
        assert_eq!(shown.counter("passthrough_fallbacks"), Some(1));
        assert_eq!(shown.histogram("fuse read").map(|h| h.count()), Some(1));
    }
}
