//! A test cell whose VLDB replicas hold the cell's token key, so that they issue tokens
//! and only administrators change the cell; and `holdfast` run as one user of several,
//! each with a token directory of its own.
//! Invariant: the key lives in `credentials/token.key` beside the cell file, where
//! `--localauth` finds it, mode 0600; every replica is started with it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::pair::CELL;
use crate::vldb::{REPLICAS, replica_name};
use crate::{READY_TIMEOUT, TestCell, VldbKind, run_bounded};

impl TestCell {
    /// Starts a replicated VLDB whose every replica runs with `--token-key`, the key
    /// written to `credentials/token.key` beside the cell file. The group is made as
    /// usual, then stopped and started again with the key; it is whole on return.
    pub fn start_keyed_vldb(bin: &str) -> Result<TestCell> {
        let mut cell = TestCell::start_vldb_as(bin, VldbKind::Replicated)?;
        let key = cell.token_key_path();
        std::fs::create_dir_all(key.parent().context("the key has a directory")?)?;
        let secret: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        std::fs::write(&key, secret)?;
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let names: Vec<String> = (1..=REPLICAS).map(replica_name).collect();
        let (replicas, others) = std::mem::take(&mut cell.procs)
            .into_iter()
            .partition(|p| names.contains(&p.name));
        cell.procs = others;
        cell.stop_procs_together(replicas);
        for id in (1..=REPLICAS).rev() {
            cell.start_keyed_replica(id)?;
        }
        cell.await_whole_group(READY_TIMEOUT)?;
        Ok(cell)
    }

    /// The cell's token key file.
    pub fn token_key_path(&self) -> PathBuf {
        self.dir.path().join("credentials").join("token.key")
    }

    /// Starts replica `id` (stopped) again with the cell's token key.
    fn start_keyed_replica(&mut self, id: u64) -> Result<()> {
        let replica = self.replica(id)?.clone();
        let peers: Vec<String> = self
            .replicas
            .iter()
            .map(|r| format!("{}={}", r.id, r.address))
            .collect();
        let data = replica.data.to_string_lossy().into_owned();
        let key = self.token_key_path().to_string_lossy().into_owned();
        let id_arg = id.to_string();
        let peers = peers.join(",");
        self.spawn_ready(
            &replica_name(id),
            &[
                "vlserver",
                "--data",
                &data,
                "--listen",
                &replica.listen,
                "--cell-name",
                CELL,
                "--id",
                &id_arg,
                "--peers",
                &peers,
                "--token-key",
                &key,
            ],
        )?;
        Ok(())
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
