//! `holdfast bench --suite identity`: what identity costs. `tls`: write+close and cold read
//! through a mount of a cell whose connections are mutual TLS, against a cell made alike
//! whose processes run with TLS off (`PLAINTEXT_ENV`, the benchmarks-only switch), both up
//! at once and measured in turns, as ratios.
//! Invariant: the plaintext switch is set only while the plaintext cell's processes start,
//! while this process has no other thread, and is unset before anything else runs.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::tls::PLAINTEXT_ENV;

use super::{Across, BenchDir, MountedCell, mount_runtime};

/// One rate of the mount figures, picked from a measurement.
type Rate = fn(&Across) -> f64;

/// The suite's figures by name (`--figure` picks one).
pub const FIGURES: [&str; 2] = ["tls", super::identity_access::FIGURE];
/// Each cell's figures are measured this many times, in turns with the other's; the
/// best of each counts, so that a moment of a busy machine does not.
const ROUNDS: usize = 3;

/// Runs every figure, or only `only`.
pub fn run(dir: &BenchDir, size_mib: u64, files: usize, only: Option<&str>) -> Result<()> {
    if only.is_none_or(|only| only == "tls") {
        tls(&dir.path().join("identity"), size_mib)?;
    }
    if only.is_none_or(|only| only == super::identity_access::FIGURE) {
        super::identity_access::run(&dir.path().join("access"), files)?;
    }
    Ok(())
}

/// A cell in DIR/plaintext and one in DIR/tls, each with two mounts: write+close and the
/// cold read through each, in turns.
fn tls(dir: &Path, size_mib: u64) -> Result<()> {
    if std::env::var_os(PLAINTEXT_ENV).is_some() {
        bail!("{PLAINTEXT_ENV} is set: unset it, this figure compares TLS with plaintext itself");
    }
    let size_bytes = size_mib * (1 << 20);
    // Each start on a runtime of its own, dropped (its threads ended) before the switch
    // changes; the cells' processes outlive it.
    let plaintext =
        with_plaintext(|| MountedCell::start(&dir.join("plaintext"), size_mib, &mount_runtime()?))
            .context("start the cell with TLS off")?;
    let tls = MountedCell::start(&dir.join("tls"), size_mib, &mount_runtime()?)
        .context("start the cell with TLS")?;
    eprintln!("bench cells up in {}; measuring...", dir.display());
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let name = format!("round-{round}.bin");
        without.push(plaintext.write_then_cold_read(&name, size_bytes)?);
        with.push(tls.write_then_cold_read(&name, size_bytes)?);
    }
    for mut cell in [plaintext, tls] {
        cell.cell.check_children()?;
    }
    let best =
        |rounds: &[Across], rate: fn(&Across) -> f64| rounds.iter().map(rate).fold(0.0, f64::max);

    let mib = |rate: f64| rate / f64::from(1 << 20);
    println!(
        "holdfast bench: identity ({size_mib} MiB file, best of {ROUNDS}, two cells alike \
         but for TLS)"
    );
    println!("{:<44} {:>14} {:>8}  target", "figure", "value", "ratio");
    let figures: [(&str, Rate); 2] = [
        ("write+close through mount", |a| a.write_close),
        ("cold read through mount", |a| a.cold_read),
    ];
    for (name, rate) in figures {
        let (tls, plaintext) = (best(&with, rate), best(&without, rate));
        println!(
            "{:<44} {:>9.0} MiB/s",
            format!("{name}, plaintext"),
            mib(plaintext)
        );
        println!(
            "{:<44} {:>9.0} MiB/s {:>8.2}  >= 0.85",
            format!("{name}, TLS / plaintext"),
            mib(tls),
            tls / plaintext
        );
    }
    Ok(())
}

/// Runs `work` with `PLAINTEXT_ENV=1` in this process's environment, which the cell's
/// processes inherit and this process's own clients read.
fn with_plaintext<T>(work: impl FnOnce() -> Result<T>) -> Result<T> {
    set_env(Some("1".into()))?;
    let outcome = work();
    set_env(None)?;
    outcome
}

/// Sets or removes `PLAINTEXT_ENV`, only while this process has one thread (waiting a
/// moment for ending threads): changing the environment while another thread may read
/// it is undefined behaviour.
fn set_env(value: Option<OsString>) -> Result<()> {
    let threads = || -> Result<usize> {
        Ok(std::fs::read_dir("/proc/self/task")
            .context("count this process's threads")?
            .count())
    };
    let mut waited = 0;
    while threads()? != 1 {
        if waited == 100 {
            bail!(
                "cannot switch {PLAINTEXT_ENV} with {} threads running",
                threads()?
            );
        }
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
    }
    // SAFETY: this process has no other thread (checked just above), so nothing reads
    // the environment meanwhile.
    unsafe {
        match value {
            Some(value) => std::env::set_var(PLAINTEXT_ENV, value),
            None => std::env::remove_var(PLAINTEXT_ENV),
        }
    }
    Ok(())
}
