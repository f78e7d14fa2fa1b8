//! Smoke tests of the benchmark functions with tiny parameters, so that they keep working;
//! the figures themselves are for `holdfast bench`, not asserted here.

use std::time::Duration;

use fileserver::bench;
use state::JournalMode;

const SHORT: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_pairs_bench_runs() {
    let rate = bench::lock_pairs_per_second(JournalMode::Sync, 4, SHORT)
        .await
        .unwrap();
    assert!(rate > 0.0, "{rate}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_status_bench_runs() {
    let rate = bench::fetch_status_per_second(JournalMode::None, SHORT)
        .await
        .unwrap();
    assert!(rate > 0.0, "{rate}");
}

#[test]
fn recovery_bench_runs() {
    let figures = bench::recovery(1000, 50, 10).unwrap();
    assert_eq!(
        (figures.callbacks, figures.locks, figures.clients),
        (1000, 50, 10)
    );
    assert!(figures.recovery > Duration::ZERO);
    assert!(figures.snapshot_bytes > 0);
}
