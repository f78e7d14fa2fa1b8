//! Group commit: concurrent appenders in `sync` mode all get durable records while
//! sharing syncs; and the append throughput figures on the real file system.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use proto::Epoch;
use state::journal::MemVfs;
use state::{Journal, JournalConfig, JournalMode, Lsn};

fn sync_config() -> JournalConfig {
    JournalConfig {
        mode: JournalMode::Sync,
        epoch: Epoch(1),
        ..JournalConfig::default()
    }
}

fn payload(thread: usize, i: usize) -> Vec<u8> {
    format!("thread {thread} record {i}").into_bytes()
}

/// Runs `threads` appenders of `per_thread` records each; returns every (lsn, payload).
fn append_concurrently(
    journal: &Arc<Journal>,
    threads: usize,
    per_thread: usize,
) -> Vec<(Lsn, Vec<u8>)> {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let journal = journal.clone();
            thread::spawn(move || {
                (0..per_thread)
                    .map(|i| {
                        let bytes = payload(t, i);
                        let lsn = journal.append(&bytes).unwrap();
                        // Sync mode: durable on return, whoever led the sync.
                        assert!(journal.span().durable >= lsn);
                        (lsn, bytes)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<(Lsn, Vec<u8>)> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    all
}

#[test]
fn concurrent_sync_appends_are_durable_and_share_syncs() {
    const THREADS: usize = 16;
    const PER_THREAD: usize = 25;
    let vfs = MemVfs::new();
    // A disk whose sync takes a millisecond, so appenders queue behind the leader.
    vfs.set_sync_delay(Duration::from_millis(1));
    let (journal, _) =
        Journal::open_with(Arc::new(vfs.clone()), Path::new("/j"), sync_config()).unwrap();
    let journal = Arc::new(journal);
    let appended = append_concurrently(&journal, THREADS, PER_THREAD);
    let total = (THREADS * PER_THREAD) as u64;
    let lsns: Vec<u64> = appended.iter().map(|(lsn, _)| lsn.0).collect();
    assert_eq!(lsns, (1..=total).collect::<Vec<_>>());
    let stats = journal.stats();
    assert_eq!(stats.appends, total);
    assert!(stats.syncs < stats.appends, "no sync was shared: {stats:?}");
    println!(
        "{THREADS} threads x {PER_THREAD} appends: {} syncs for {} appends",
        stats.syncs, stats.appends
    );

    // Power loss with every unsynced byte lost: every record is still there.
    let image = vfs.crash_image(&mut |_, _| 0);
    let (_journal, recovered) =
        Journal::open_with(Arc::new(image), Path::new("/j"), sync_config()).unwrap();
    assert_eq!(recovered.records, appended);
}

fn measure(threads: usize, per_thread: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), sync_config()).unwrap();
    let journal = Arc::new(journal);
    let started = Instant::now();
    let appended = append_concurrently(&journal, threads, per_thread);
    let elapsed = started.elapsed();
    let stats = journal.stats();
    assert_eq!(appended.len(), threads * per_thread);
    println!(
        "sync mode, {threads:>2} threads: {} appends in {:.3} s = {:.0} appends/s, {} fsyncs ({:.1} appends per fsync)",
        stats.appends,
        elapsed.as_secs_f64(),
        stats.appends as f64 / elapsed.as_secs_f64(),
        stats.syncs,
        stats.appends as f64 / stats.syncs.max(1) as f64,
    );
    if threads > 1 {
        assert!(stats.syncs < stats.appends, "{stats:?}");
    }
}

/// Prints throughput figures (run with `--nocapture` to see them).
#[test]
fn sync_mode_append_throughput_on_disk() {
    measure(1, 300);
    measure(64, 30);
}
