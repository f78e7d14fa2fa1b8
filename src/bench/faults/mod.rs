//! `holdfast bench --suite faults`: how the cell rides out what goes wrong: a dead or
//! stopped fileserver under cached and uncached reads, floods of idle and stalled
//! connections, the mount's memory over a million files, and creates in a large directory
//! that other workstations are changing.
//! Invariant: each figure runs its own cell under the suite's directory and stops it,
//! whether it measured or failed.

use std::path::Path;

use anyhow::{Context, Result};

use super::BenchDir;
use crate::cell::{LocalCell, Servers};

mod bigdir;
mod cached;
mod floods;
mod memory;
mod stopped;

/// One figure: it runs its own cell under the directory it is given.
type Figure = fn(&Path) -> Result<()>;

/// The suite's figures by name, in the order they run (`--figure` picks one).
pub const FIGURES: [&str; 5] = ["cached", "stopped", "floods", "memory", "bigdir"];

/// Runs every figure, or only `only`, each in its own directory named after it.
pub fn run(dir: &BenchDir, only: Option<&str>) -> Result<()> {
    println!("holdfast bench: faults");
    println!("{:<64} {:>10}  target", "figure", "value");
    let figures: [(&str, Figure); 5] = [
        ("cached", cached::run),
        ("stopped", stopped::run),
        ("floods", floods::run),
        ("memory", memory::run),
        ("bigdir", bigdir::run),
    ];
    for (name, run) in figures {
        if only.is_none_or(|only| only == name) {
            run(&dir.path().join(name))?;
        }
    }
    Ok(())
}

/// A cell of one fileserver (and the VLDB) under `dir`, with `root.cell`; no mount yet.
fn single_server_cell(dir: &Path) -> Result<LocalCell> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    LocalCell::start(dir, "bench.holdfast", Servers::Single, &runtime)
}

/// Runs `work(t)` for `t` in `0..threads`, each on its own thread, and waits for all;
/// the first error (or panic) is the answer.
fn on_threads(threads: usize, work: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                scope.spawn(move || work(t))
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        }
        Ok(())
    })
}
