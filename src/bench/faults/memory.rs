//! The faults suite's figure: mount memory after a million files.
//! Invariant: the cell it starts is stopped whether it measured or failed (`LocalCell`'s drop).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Files created and stat'ed, in directories of `FILES_PER_DIR`.
const FILES: usize = 1_000_000;
const FILES_PER_DIR: usize = 10_000;
/// Creating threads.
const CREATORS: usize = 4;
/// How long the memory must hold still to count as settled after the kernel forgot.
const SETTLED_FOR: Duration = Duration::from_secs(3);
const SETTLE_MAX: Duration = Duration::from_secs(120);

pub fn run(dir: &Path) -> Result<()> {
    let mut cell = super::single_server_cell(dir)?;
    let mountpoint = dir.join("mnt");
    cell.mount("mount", &mountpoint, &dir.join("cache"), &[])?;
    let pid = cell.pid("mount").context("the mount's process")?;
    drop_kernel_caches()?;
    let start = settled_resident_kib(pid)?;
    let dirs: Vec<_> = (0..FILES.div_ceil(FILES_PER_DIR))
        .map(|d| mountpoint.join(format!("d{d:03}")))
        .collect();
    for dir in &dirs {
        std::fs::create_dir(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let began = Instant::now();
    super::on_threads(CREATORS, |c| {
        for (d, dir) in dirs.iter().enumerate().skip(c).step_by(CREATORS) {
            for i in 0..FILES_PER_DIR.min(FILES - d * FILES_PER_DIR) {
                let path = dir.join(format!("f{i:05}"));
                std::fs::File::create(&path)
                    .with_context(|| format!("create {}", path.display()))?;
                std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?;
            }
        }
        Ok(())
    })?;
    let peak = resident_kib(pid)?;
    let elapsed = began.elapsed();
    drop_kernel_caches()?;
    let end = settled_resident_kib(pid)?;
    let growth_mib = end.saturating_sub(start) as f64 / 1024.0;
    println!(
        "{:<64} {:>10}  <= 64 MiB",
        format!("mount memory growth after {FILES} files and a cache drop (MiB)"),
        format!("{growth_mib:.1}")
    );
    println!(
        "  (resident {:.1} MiB at start, {:.1} MiB with the kernel holding them, {:.1} MiB after; \
         {:.0} creates+stats/s)",
        start as f64 / 1024.0,
        peak as f64 / 1024.0,
        end as f64 / 1024.0,
        FILES as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

/// Makes the kernel forget every inode it does not use: FUSE sends `forget` for each.
fn drop_kernel_caches() -> Result<()> {
    // The dirty pages first, so the drop frees what it can.
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "2")
        .context("write /proc/sys/vm/drop_caches (the figure needs root)")
}

fn resident_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// The resident memory once it has held still for `SETTLED_FOR` (the forgets arrive and
/// the memory is handed back in the background).
fn settled_resident_kib(pid: u32) -> Result<u64> {
    let deadline = Instant::now() + SETTLE_MAX;
    let mut last = (resident_kib(pid)?, Instant::now());
    while last.1.elapsed() < SETTLED_FOR {
        if Instant::now() > deadline {
            bail!("the mount's memory kept changing for {SETTLE_MAX:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
        let now = resident_kib(pid)?;
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    Ok(last.0)
}
