//! The faults suite's figure: creates in a 100,000-entry directory under concurrent change.
//! Invariant: the cell it starts is stopped whether it measured or failed (`LocalCell`'s drop).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Entries in the directory before the writers start.
const PREFILLED: usize = 100_000;
/// Writers per mount (two mounts).
const WRITERS_PER_MOUNT: usize = 4;
const DURATION: Duration = Duration::from_secs(180);
const PREFILL_THREADS: usize = 8;

/// What one writer did.
#[derive(Default)]
struct Tally {
    creates: u64,
    opens: u64,
    failures: u64,
    first_failure: Option<String>,
}

pub fn run(dir: &Path) -> Result<()> {
    let mut cell = super::single_server_cell(dir)?;
    let mounts = [dir.join("mnt-a"), dir.join("mnt-b")];
    cell.mount("mount-a", &mounts[0], &dir.join("cache-a"), &[])?;
    cell.mount("mount-b", &mounts[1], &dir.join("cache-b"), &[])?;
    let big = [mounts[0].join("big"), mounts[1].join("big")];
    std::fs::create_dir(&big[0]).context("create the directory")?;
    prefill(&big[0])?;

    let stop = AtomicBool::new(false);
    let began = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..2 * WRITERS_PER_MOUNT)
            .map(|w| {
                let (dir, stop) = (big[w % 2].clone(), &stop);
                scope.spawn(move || writer(dir, format!("w{w}"), stop))
            })
            .collect();
        while began.elapsed() < DURATION {
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        writers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let elapsed = began.elapsed().as_secs_f64();
    let creates: u64 = tallies.iter().map(|t| t.creates).sum();
    let opens: u64 = tallies.iter().map(|t| t.opens).sum();
    let failures: u64 = tallies.iter().map(|t| t.failures).sum();
    println!(
        "{:<64} {:>10}  0",
        "failed creates or opens, 8 writers, 100,000-entry directory", failures
    );
    println!(
        "{:<64} {:>10}",
        "  creates/s (two mounts, 8 writers, 3 minutes)",
        format!("{:.0}", creates as f64 / elapsed)
    );
    println!("  ({creates} creates, {opens} opens)");
    if let Some(first) = tallies.iter().find_map(|t| t.first_failure.clone()) {
        println!("  first failure: {first}");
    }
    Ok(())
}

fn prefill(dir: &Path) -> Result<()> {
    super::on_threads(PREFILL_THREADS, |t| {
        for i in (t..PREFILLED).step_by(PREFILL_THREADS) {
            let path = dir.join(format!("pre-{i:06}"));
            std::fs::File::create(&path).with_context(|| format!("prefill {}", path.display()))?;
        }
        Ok(())
    })
}

/// Creates files until told to stop, opening a pre-filled file and one of its own after
/// each.
fn writer(dir: PathBuf, tag: String, stop: &AtomicBool) -> Tally {
    let mut tally = Tally::default();
    let fail = |tally: &mut Tally, what: String| {
        tally.failures += 1;
        tally.first_failure.get_or_insert(what);
    };
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("{tag}-{i:07}");
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(dir.join(&name))
        {
            Ok(_) => tally.creates += 1,
            Err(e) => fail(&mut tally, format!("create {name}: {e}")),
        }
        let old = format!("pre-{:06}", (i * 7919) % PREFILLED as u64);
        let own = format!("{tag}-{:07}", i / 2);
        for name in [old, own] {
            match std::fs::File::open(dir.join(&name)) {
                Ok(_) => tally.opens += 1,
                Err(e) => fail(&mut tally, format!("open {name}: {e}")),
            }
        }
        i += 1;
    }
    tally
}
