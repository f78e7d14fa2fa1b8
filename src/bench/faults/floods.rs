//! The faults suite's figure: 10,000 idle established connections plus 200 stalled
//! inside a 4 MiB frame, against the fileserver and against the VLDB replica a new client
//! asks first, each with its default limits: peak resident memory against the 512 MiB
//! budget, a new mount's first `ls` during the flood, and memory once the flood is gone.
//! Invariant: the flood and the cell are gone when `run` returns, measured or failed.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::flood::{Flood, Stall};
use proto::resources::{PeakResident, resident_bytes};

use crate::cell::{LocalCell, Servers, replica_name};

const IDLE: usize = 10_000;
const STALLED: usize = 200;
const FRAME_BYTES: usize = proto::frame::FRAME_BYTES_MAX_DEFAULT;
/// Connections set up at once by the flood.
const PARALLEL: usize = 256;
const BUDGET_BYTES: u64 = 512 << 20;
/// How long memory may take to settle once the flood is gone (the servers look every
/// 2 s whether a flood has passed).
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// The flood's own sockets, the cell's, and room to spare.
const OPEN_FILES_WANTED: u64 = (IDLE + STALLED) as u64 + 2048;

pub fn run(dir: &Path) -> Result<()> {
    let open_files = proto::resources::raise_open_files_limit().context("raise ulimit -n")?;
    if open_files < OPEN_FILES_WANTED {
        println!(
            "{:<64} {:>10}",
            format!("floods: skipped, `ulimit -Hn` is {open_files}, needs {OPEN_FILES_WANTED}"),
            "-"
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let mut cell = LocalCell::start(dir, "floods.holdfast", Servers::Single, &runtime)?;
    // A mount in use throughout: its files must stay readable during each flood.
    let warm = dir.join("mnt-warm");
    cell.mount("mount-warm", &warm, &dir.join("cache-warm"), &[])?;
    std::fs::write(warm.join("before"), b"written before the floods\n")?;
    let fileserver = Target {
        name: "fileserver",
        address: cell.fs_address.clone(),
    };
    let vldb = Target {
        name: "VLDB",
        address: cell.cell.vlservers[0].clone(),
    };
    for (index, (target, process)) in [
        (fileserver, "fileserver".to_owned()),
        (vldb, replica_name(1)),
    ]
    .into_iter()
    .enumerate()
    {
        let pid = cell
            .pid(&process)
            .with_context(|| format!("no {process} process"))?;
        flood_one(&mut cell, &runtime, dir, index, &target, pid, &warm)?;
    }
    cell.check_children()
}

struct Target {
    name: &'static str,
    address: String,
}

fn flood_one(
    cell: &mut LocalCell,
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    index: usize,
    target: &Target,
    pid: u32,
    warm: &Path,
) -> Result<()> {
    let baseline = settled_rss(pid)?;
    let peak = PeakResident::watch(pid);
    let cell_name = cell.cell.name.clone();
    let mut flood = Flood::new(cell.transport.clone());
    let opened =
        runtime.block_on(flood.open(&target.address, &cell_name, IDLE, Stall::Idle, PARALLEL));
    let stall = Stall::InsideFrame {
        declared: FRAME_BYTES,
        sent: FRAME_BYTES - 1,
    };
    let stalled =
        runtime.block_on(flood.open(&target.address, &cell_name, STALLED, stall, PARALLEL));
    let held = flood.open_now();

    let fresh = dir.join(format!("mnt-fresh-{index}"));
    let measured = (|| -> Result<(Duration, Duration)> {
        let mounting = Instant::now();
        cell.mount(
            &format!("mount-fresh-{index}"),
            &fresh,
            &dir.join(format!("cache-fresh-{index}")),
            &[],
        )?;
        let mounted = mounting.elapsed();
        let started = Instant::now();
        let listed = std::fs::read_dir(&fresh)
            .with_context(|| format!("ls {}", fresh.display()))?
            .count();
        let took = started.elapsed();
        if listed == 0 {
            bail!("the new mount's ls of {} listed nothing", fresh.display());
        }
        std::fs::read(warm.join("before")).context("read through the mount in use")?;
        Ok((mounted, took))
    })();
    runtime.block_on(flood.close());
    let peak_bytes = peak.stop();
    let (mounted, first_ls) = measured?;
    let after = settle_towards(pid, baseline)?;

    let label = |what: &str| format!("floods: {}: {what}", target.name);
    println!(
        "{:<64} {:>7.1}MiB  <= 512MiB",
        label(&format!(
            "peak RSS, {IDLE} idle + {STALLED} stalled in a frame"
        )),
        mib(peak_bytes)
    );
    println!(
        "{:<64} {:>10}",
        format!(
            "  (welcomed {} + {}; turned away {}; still open at the end {held})",
            opened.established,
            stalled.established,
            opened.turned_away + stalled.turned_away
        ),
        ""
    );
    println!(
        "{:<64} {:>8.0}ms  <= 1000ms",
        label("a new mount's first ls during the flood"),
        first_ls.as_secs_f64() * 1000.0
    );
    println!(
        "{:<64} {:>10}",
        format!(
            "  (the mount process was up and mounted in {:.0}ms)",
            mounted.as_secs_f64() * 1000.0
        ),
        ""
    );
    let change = (after as f64 / baseline as f64 - 1.0) * 100.0;
    println!(
        "{:<64} {:>+8.1} %  within 10 % (baseline {:.1}MiB, after {:.1}MiB)",
        label("RSS once the flood is gone vs baseline"),
        change,
        mib(baseline),
        mib(after)
    );
    if peak_bytes > BUDGET_BYTES {
        eprintln!(
            "bench floods: the {} went over its memory budget",
            target.name
        );
    }
    Ok(())
}

/// The RSS once two readings 1 s apart agree within 1 %.
fn settled_rss(pid: u32) -> Result<u64> {
    let mut last = rss(pid)?;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        let now = rss(pid)?;
        if now.abs_diff(last) * 100 <= last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// Waits (up to `SETTLE_LIMIT`) for the RSS to come within 10 % of `baseline`; returns
/// the last reading.
fn settle_towards(pid: u32, baseline: u64) -> Result<u64> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        let now = rss(pid)?;
        if now * 10 <= baseline * 11 || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rss(pid: u32) -> Result<u64> {
    resident_bytes(pid).with_context(|| format!("read the RSS of process {pid}"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}
