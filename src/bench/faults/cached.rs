//! The faults suite's figure: cached reads with the volume's only fileserver killed.

use std::path::Path;

use anyhow::Result;

pub fn run(_dir: &Path) -> Result<()> {
    println!(
        "{:<64} {:>10}",
        "cached reads with the volume's only fileserver killed", "not built yet"
    );
    Ok(())
}
