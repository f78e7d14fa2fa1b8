//! Where time goes: histograms of latencies and sizes in log-scale buckets of atomic
//! counters, their mergeable snapshots with percentiles, and the named `Figures` a
//! fileserver (`Request::ServerFigures`) or a cache manager (`holdfast fs counters`) shows.
//! Invariant: a value is counted in the one bucket whose bounds hold it, so a percentile
//! is never below the true value and at most one eighth above it (or the maximum seen).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Buckets per doubling of the value (2^3): a bucket is at most 1/8 of its value wide.
const SUB_BUCKET_BITS: u32 = 3;
const SUB_BUCKETS: usize = 1 << SUB_BUCKET_BITS;
/// Enough buckets for every `u64`: values below `SUB_BUCKETS` each have their own, then
/// `SUB_BUCKETS` per power of two up to 2^64.
pub const BUCKETS: usize = (64 - SUB_BUCKET_BITS as usize + 1) * SUB_BUCKETS;

/// The bucket that counts `value`.
fn bucket_of(value: u64) -> usize {
    if value < SUB_BUCKETS as u64 {
        return value as usize;
    }
    let top_bit = 63 - value.leading_zeros();
    let shift = top_bit - SUB_BUCKET_BITS;
    // The bits just below the top one pick the bucket within its power of two.
    let sub = (value >> shift) as usize - SUB_BUCKETS;
    (shift as usize + 1) * SUB_BUCKETS + sub
}

/// The largest value bucket `index` counts (`u64::MAX` for an index past the last).
fn bucket_top(index: usize) -> u64 {
    if index < SUB_BUCKETS {
        return index as u64;
    }
    if index >= BUCKETS {
        return u64::MAX;
    }
    let shift = (index / SUB_BUCKETS - 1) as u32;
    let sub = (index % SUB_BUCKETS) as u64;
    // One below the next bucket's first value; the last bucket ends at u64::MAX.
    ((SUB_BUCKETS as u64 + sub + 1) << shift).wrapping_sub(1)
}

/// A live histogram: recording is a few relaxed atomic adds, with no lock, so any
/// thread of a server may record while another takes a snapshot.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.snapshot().fmt(f)
    }
}

impl Histogram {
    /// Counts one `value`.
    pub fn record(&self, value: u64) {
        self.buckets[bucket_of(value)].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.max.fetch_max(value, Ordering::Relaxed);
    }

    /// Counts one latency, in microseconds.
    pub fn record_duration(&self, duration: Duration) {
        self.record(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
    }

    /// What the histogram holds now. Taken while others record, it may count a value in
    /// its bucket but not yet in the sum: figures read after the fact are exact.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(index, count)| {
                let count = count.load(Ordering::Relaxed);
                // At most `BUCKETS` (496): fits a u16.
                (count > 0).then_some((index as u16, count))
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum: self.sum.load(Ordering::Relaxed),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment: the non-empty buckets by index, with the sum and
/// the largest value. Two snapshots merge into the histogram of both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// `(bucket index, count)` of every non-empty bucket, by index.
    pub buckets: Vec<(u16, u64)>,
    pub sum: u64,
    pub max: u64,
}

impl HistogramSnapshot {
    /// Values counted.
    pub fn count(&self) -> u64 {
        self.buckets
            .iter()
            .fold(0u64, |total, (_, count)| total.saturating_add(*count))
    }

    /// The mean value, 0 when empty.
    pub fn mean(&self) -> u64 {
        self.sum.checked_div(self.count()).unwrap_or(0)
    }

    /// The value at or below which `quantile` (0.0 to 1.0) of the values lie, as the
    /// top of its bucket, never above the largest value seen; 0 when empty.
    pub fn percentile(&self, quantile: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        // The rank of the wanted value, 1 to count.
        let rank = ((quantile.clamp(0.0, 1.0) * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0u64;
        for (index, bucket) in self.sorted() {
            seen = seen.saturating_add(bucket);
            if seen >= rank {
                return bucket_top(usize::from(index)).min(self.max);
            }
        }
        self.max
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &HistogramSnapshot) {
        let mut buckets: BTreeMap<u16, u64> = BTreeMap::new();
        for (index, count) in self.buckets.iter().chain(&other.buckets) {
            let total = buckets.entry(*index).or_default();
            *total = total.saturating_add(*count);
        }
        self.buckets = buckets.into_iter().collect();
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }

    /// The buckets by index, duplicates added, whatever order a peer sent them in.
    fn sorted(&self) -> BTreeMap<u16, u64> {
        let mut sorted = BTreeMap::new();
        for (index, count) in &self.buckets {
            let total: &mut u64 = sorted.entry(*index).or_default();
            *total = total.saturating_add(*count);
        }
        sorted
    }
}

/// What a histogram's values measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FigureUnit {
    Microseconds,
    /// A plain number of things (records in a flush, for instance).
    Count,
}

/// A histogram with its name and unit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedHistogram {
    pub name: String,
    pub unit: FigureUnit,
    pub histogram: HistogramSnapshot,
}

/// A component's figures: named counters, then named histograms, each in a stable order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub counters: Vec<(String, u64)>,
    pub histograms: Vec<NamedHistogram>,
}

impl Figures {
    /// The counter called `name`.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.counters
            .iter()
            .find_map(|(n, value)| (n == name).then_some(*value))
    }

    /// The histogram called `name`.
    pub fn histogram(&self, name: &str) -> Option<&HistogramSnapshot> {
        self.histograms
            .iter()
            .find_map(|h| (h.name == name).then_some(&h.histogram))
    }

    /// The counters as `name value` lines, then a table of the histograms that counted
    /// anything: count, p50, p90, p99 and max.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for (name, value) in &self.counters {
            let _ = writeln!(text, "{name:<32} {value}");
        }
        let counted: Vec<&NamedHistogram> = self
            .histograms
            .iter()
            .filter(|h| h.histogram.count() > 0)
            .collect();
        if counted.is_empty() {
            return text;
        }
        let _ = writeln!(
            text,
            "{:<32} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "histogram", "count", "p50", "p90", "p99", "max"
        );
        for named in counted {
            let h = &named.histogram;
            let show = |value: u64| show_value(named.unit, value);
            let _ = writeln!(
                text,
                "{:<32} {:>9} {:>9} {:>9} {:>9} {:>9}",
                named.name,
                h.count(),
                show(h.percentile(0.5)),
                show(h.percentile(0.9)),
                show(h.percentile(0.99)),
                show(h.max),
            );
        }
        text
    }
}

/// A value for a person: microseconds as µs, ms or s with three figures; counts as they are.
fn show_value(unit: FigureUnit, value: u64) -> String {
    match unit {
        FigureUnit::Count => value.to_string(),
        FigureUnit::Microseconds if value < 1_000 => format!("{value}µs"),
        FigureUnit::Microseconds if value < 1_000_000 => {
            format!("{:.3}ms", value as f64 / 1e3)
        }
        FigureUnit::Microseconds => format!("{:.3}s", value as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lies_within_its_bucket_and_buckets_are_ordered() {
        let mut values: Vec<u64> = (0..5000).collect();
        for shift in 0..64 {
            let power = 1u64 << shift;
            values.extend([power - 1, power, power + 1, power.saturating_mul(3) / 2]);
        }
        values.push(u64::MAX);
        for value in values {
            let index = bucket_of(value);
            assert!(index < BUCKETS, "{value} -> {index}");
            assert!(value <= bucket_top(index), "{value} above bucket {index}");
            let below = if index == 0 {
                0
            } else {
                bucket_top(index - 1) + 1
            };
            assert!(value >= below, "{value} below bucket {index}");
            // At most an eighth of the value wide.
            assert!(
                bucket_top(index) - below <= below / 8,
                "bucket {index} too wide"
            );
        }
        assert_eq!(bucket_top(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn percentiles_are_within_an_eighth_of_the_true_values() {
        let histogram = Histogram::default();
        for value in 1..=1000u64 {
            histogram.record(value * 100);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count(), 1000);
        assert_eq!(snapshot.max, 100_000);
        assert_eq!(snapshot.mean(), 50_050);
        for (quantile, exact) in [(0.5, 50_000u64), (0.9, 90_000), (0.99, 99_000)] {
            let got = snapshot.percentile(quantile);
            assert!(
                got >= exact && got <= exact + exact / 8,
                "p{quantile}: {got}"
            );
        }
        assert_eq!(snapshot.percentile(1.0), 100_000);
        assert_eq!(HistogramSnapshot::default().percentile(0.5), 0);
    }

    #[test]
    fn merged_snapshots_equal_one_histogram_of_both() {
        let (a, b, both) = (
            Histogram::default(),
            Histogram::default(),
            Histogram::default(),
        );
        for value in [3u64, 90, 4_000, 4_100, 1 << 40] {
            a.record(value);
            both.record(value);
        }
        for value in [3u64, 7, 95, 1_000_000] {
            b.record(value);
            both.record(value);
        }
        let mut merged = a.snapshot();
        merged.merge(&b.snapshot());
        assert_eq!(merged, both.snapshot());
    }

    #[test]
    fn a_snapshot_from_a_peer_in_any_order_is_read_safely() {
        let snapshot = HistogramSnapshot {
            buckets: vec![(9000, 1), (2, 2), (2, 1), (u16::MAX, 5)],
            sum: 10,
            max: 7,
        };
        assert_eq!(snapshot.count(), 9);
        assert_eq!(snapshot.percentile(0.1), 2);
        assert_eq!(snapshot.percentile(1.0), 7);
    }

    #[test]
    fn render_shows_counters_and_counted_histograms_only() {
        let latency = Histogram::default();
        latency.record_duration(Duration::from_micros(1500));
        let figures = Figures {
            counters: vec![("hits".into(), 4)],
            histograms: vec![
                NamedHistogram {
                    name: "request FetchData".into(),
                    unit: FigureUnit::Microseconds,
                    histogram: latency.snapshot(),
                },
                NamedHistogram {
                    name: "log group size".into(),
                    unit: FigureUnit::Count,
                    histogram: HistogramSnapshot::default(),
                },
            ],
        };
        let text = figures.render();
        assert!(text.starts_with("hits"), "{text}");
        assert!(text.contains("request FetchData"), "{text}");
        assert!(text.contains("1.500ms"), "{text}");
        assert!(!text.contains("log group size"), "{text}");
        assert_eq!(figures.counter("hits"), Some(4));
        assert_eq!(
            figures.histogram("request FetchData").map(|h| h.count()),
            Some(1)
        );
    }
}
