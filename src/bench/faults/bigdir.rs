//! The faults suite's figure: creates in a 100,000-entry directory under concurrent change.

use std::path::Path;

use anyhow::Result;

pub fn run(_dir: &Path) -> Result<()> {
    println!(
        "{:<64} {:>10}",
        "creates in a 100,000-entry directory under concurrent change", "not built yet"
    );
    Ok(())
}
