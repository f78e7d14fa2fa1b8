//! Flooding a test cell's servers: starting them with small connection limits, watching a
//! server's resident memory, and finding the WARN lines it wrote about a peer.
//! Invariant: a restarted VLDB keeps its address and data, so the cell file stays right;
//! every process is still the cell's, stopped on drop.

use std::time::Duration;

use proto::resources::PeakResident;

use anyhow::{Context, Result, bail};

use crate::{TestCell, wait_until};

impl TestCell {
    /// A cell like `start`'s, with `vlserver_flags` and `fileserver_flags` added to the
    /// single VLDB's and the fileserver's command lines (`--connections-max 8`...).
    pub fn start_with_flags(
        bin: &str,
        vlserver_flags: &[&str],
        fileserver_flags: &[&str],
    ) -> Result<TestCell> {
        let mut cell = TestCell::start_vldb(bin)?;
        if !vlserver_flags.is_empty() {
            // Again on its address and data, now with the flags.
            cell.stop("vlserver");
            let data = cell.path("vldb");
            let listen = cell.vl_address.clone();
            let credentials = cell.credentials_arg();
            let mut args = vec![
                "vlserver",
                "--data",
                &data,
                "--listen",
                &listen,
                "--cell-name",
                "e2e.test",
                "--credentials",
                &credentials,
            ];
            args.extend_from_slice(vlserver_flags);
            cell.spawn_ready("vlserver", &args)?;
        }
        cell.start_fileserver_with(fileserver_flags)?;
        cell.create_root_volume()?;
        Ok(cell)
    }

    /// The resident memory of the process started under `name`, in bytes.
    pub fn resident_bytes(&self, name: &str) -> Result<u64> {
        let pid = self.pid(name)? as u32;
        proto::resources::resident_bytes(pid).with_context(|| format!("read {name}'s VmRSS"))
    }

    /// `name`'s resident memory once two readings 500 ms apart agree within 1 %.
    pub fn settled_resident_bytes(&self, name: &str) -> Result<u64> {
        let mut last = self.resident_bytes(name)?;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(500));
            let now = self.resident_bytes(name)?;
            if now.abs_diff(last) * 100 <= last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    /// The WARN lines `name` logged that name `peer` and contain `phrase`.
    pub fn warnings_about(&self, name: &str, peer: &str, phrase: &str) -> Vec<String> {
        self.log(name)
            .lines()
            .filter(|line| line.contains(" WARN ") && line.contains(phrase))
            .filter(|line| line.contains(&format!("peer={peer}")))
            .map(str::to_owned)
            .collect()
    }
}

/// Watches the resident memory of the process started under `name`, keeping its peak.
pub fn watch_peak_resident(cell: &TestCell, name: &str) -> Result<PeakResident> {
    Ok(PeakResident::watch(cell.pid(name)? as u32))
}

/// Waits up to `limit` for `name`'s resident memory to come within `percent` of
/// `baseline`; fails saying where it stayed.
pub fn await_memory_back(
    cell: &TestCell,
    name: &str,
    baseline: u64,
    percent: u64,
    limit: Duration,
) -> Result<u64> {
    let mut last = 0;
    let back = wait_until(limit, || {
        last = cell.resident_bytes(name).unwrap_or(u64::MAX);
        last * 100 <= baseline * (100 + percent)
    });
    if !back {
        bail!(
            "{name}'s memory stayed at {} KiB, more than {percent} % over its baseline of {} KiB",
            last >> 10,
            baseline >> 10
        );
    }
    Ok(last)
}
