//! The faults suite's figure: idle and mid-frame connection floods.

use std::path::Path;

use anyhow::Result;

pub fn run(_dir: &Path) -> Result<()> {
    println!(
        "{:<64} {:>10}",
        "idle and mid-frame connection floods", "not built yet"
    );
    Ok(())
}
