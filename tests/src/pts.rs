//! `holdfast` run as one user of several, each with a token directory of its own, in a
//! cell whose VLDB replicas hold the cell's token key.
//! Invariant: the key lives in `credentials/token.key` beside the cell file, where
//! `--localauth` finds it, mode 0600.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::Result;

use crate::{TestCell, VldbKind, run_bounded};

impl TestCell {
    /// Starts a replicated VLDB: every replica holds the cell's token key (as every
    /// VLDB does), so it issues tokens and only administrators change the cell.
    pub fn start_keyed_vldb(bin: &str) -> Result<TestCell> {
        TestCell::start_vldb_as(bin, VldbKind::Replicated)
    }

    /// The cell's token key file.
    pub fn token_key_path(&self) -> PathBuf {
        self.dir.path().join("credentials").join("token.key")
    }

    /// A directory for one user's token files, inside the cell's (mode 0700).
    pub fn token_dir(&self, user: &str) -> Result<PathBuf> {
        let dir = self.dir.path().join(format!("tokens-{user}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(dir)
    }

    /// Runs `holdfast ARGS` with this cell's cell file and `token_dir` as the token
    /// directory, to completion; its ERROR lines count as `holdfast`'s do.
    pub fn holdfast_with_tokens(&self, token_dir: &Path, args: &[&str]) -> Result<Output> {
        let mut command = Command::new(&self.bin);
        command
            .args(args)
            .env("HOLDFAST_CELL", &self.cell_file)
            .env("HOLDFAST_TOKEN_DIR", token_dir);
        let output = run_bounded(command, Duration::from_secs(60))?;
        self.tripwire.record_command(
            &format!("holdfast {}", args.join(" ")),
            &String::from_utf8_lossy(&output.stderr),
        );
        Ok(output)
    }
}
