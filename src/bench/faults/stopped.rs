//! The faults suite's figure: uncached and cached reads with the fileserver stopped.

use std::path::Path;

use anyhow::Result;

pub fn run(_dir: &Path) -> Result<()> {
    println!(
        "{:<64} {:>10}",
        "uncached and cached reads with the fileserver stopped", "not built yet"
    );
    Ok(())
}
