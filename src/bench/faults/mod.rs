//! `holdfast bench --suite faults`: how the cell rides out what goes wrong: a dead or
//! stopped fileserver under cached and uncached reads, floods of idle and stalled
//! connections, the mount's memory over a million files, and creates in a large directory
//! that other workstations are changing.
//! Invariant: each figure runs its own cell under the suite's directory and stops it,
//! whether it measured or failed.

use anyhow::Result;

use super::BenchDir;

mod bigdir;
mod cached;
mod floods;
mod memory;
mod stopped;

pub fn run(dir: &BenchDir) -> Result<()> {
    println!("holdfast bench: faults");
    println!("{:<64} {:>10}  target", "figure", "value");
    let dir = dir.path();
    cached::run(&dir.join("cached"))?;
    stopped::run(&dir.join("stopped"))?;
    floods::run(&dir.join("floods"))?;
    memory::run(&dir.join("memory"))?;
    bigdir::run(&dir.join("bigdir"))?;
    Ok(())
}
