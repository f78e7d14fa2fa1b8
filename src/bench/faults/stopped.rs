//! The faults suite's figure: uncached and cached reads with the fileserver stopped
//! (SIGSTOP): how long each of 16 parallel uncached reads takes to fail, and how long a
//! cached read issued meanwhile takes to answer.
//! Invariant: the fileserver is continued (SIGCONT) before the cell stops, whether the
//! figure was measured or failed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cell::LocalCell;

/// Parallel uncached reads of a stopped server.
const READERS: usize = 16;
/// The reader mount's `--timeout`.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the readers may take to be seen blocked in `read(2)`.
const BLOCKED_WITHIN: Duration = Duration::from_secs(10);

pub fn run(dir: &Path) -> Result<()> {
    let mut cell = super::single_server_cell(dir)?;
    let writer = dir.join("writer");
    let reader = dir.join("reader");
    cell.mount("writer", &writer, &dir.join("writer.cache"), &[])?;
    let timeout = RPC_TIMEOUT.as_secs().to_string();
    cell.mount(
        "reader",
        &reader,
        &dir.join("reader.cache"),
        &["--timeout", &timeout],
    )?;

    // A run on an old directory finds the files there already: fresh names each run.
    let run = std::process::id();
    let files: Vec<String> = (0..READERS).map(|i| format!("stopped.{run}.{i}")).collect();
    for name in &files {
        std::fs::write(writer.join(name), vec![7u8; 4096])
            .with_context(|| format!("write {name}"))?;
    }
    let cached = format!("stopped.{run}.cached");
    std::fs::write(writer.join(&cached), vec![9u8; 4096]).context("write the cached file")?;
    // The reader holds every status, and the data of `cached` only, under callbacks.
    for name in &files {
        std::fs::metadata(reader.join(name)).with_context(|| format!("stat {name}"))?;
    }
    std::fs::read(reader.join(&cached)).context("read the cached file")?;

    let stopped = Stopped::new(&cell, "fileserver")?;
    let (uncached, cached_read) = reads_while_stopped(&reader, &files, &reader.join(&cached))?;
    drop(stopped);

    let failed = uncached.iter().filter(|(ok, _)| !ok).count();
    let worst = uncached
        .iter()
        .map(|(_, took)| *took)
        .max()
        .unwrap_or_default();
    println!(
        "{:<64} {:>9.2}s  <= {:.0}s",
        format!("fileserver stopped: worst of {READERS} parallel uncached reads ({failed} failed)"),
        worst.as_secs_f64(),
        (RPC_TIMEOUT + Duration::from_secs(1)).as_secs_f64()
    );
    match cached_read {
        Ok(took) => println!(
            "{:<64} {:>8.1}ms  <= 10ms",
            "  a cached read issued meanwhile",
            took.as_secs_f64() * 1000.0
        ),
        Err(e) => println!(
            "{:<64} {:>10}  <= 10ms",
            format!("  a cached read issued meanwhile failed: {e}"),
            "failed"
        ),
    }
    Ok(())
}

/// Each uncached read (whether it succeeded, how long it took), and the cached read.
type Outcome = (Vec<(bool, Duration)>, std::io::Result<Duration>);

/// Reads `files` in parallel (each: whether it succeeded, how long it took) and, once
/// every reader is blocked in `read(2)`, reads `cached` (how long it took).
fn reads_while_stopped(reader: &Path, files: &[String], cached: &Path) -> Result<Outcome> {
    let start = Arc::new(Barrier::new(files.len() + 1));
    let (tids, blocked) = mpsc::channel();
    let threads: Vec<_> = files
        .iter()
        .map(|name| {
            let path: PathBuf = reader.join(name);
            let (start, tids) = (start.clone(), tids.clone());
            std::thread::spawn(move || {
                let file = std::fs::File::open(&path);
                // SAFETY: gettid has no preconditions.
                let _ = tids.send(unsafe { libc::gettid() });
                start.wait();
                let began = Instant::now();
                let read = file.and_then(|mut f| {
                    use std::io::Read;
                    let mut buffer = Vec::new();
                    f.read_to_end(&mut buffer)
                });
                (read.is_ok(), began.elapsed())
            })
        })
        .collect();
    let tids: Vec<libc::pid_t> = blocked.iter().take(files.len()).collect();
    start.wait();
    let deadline = Instant::now() + BLOCKED_WITHIN;
    while !tids.iter().all(|&tid| in_read(tid)) {
        if Instant::now() > deadline {
            bail!("the readers were not all blocked in read(2) within {BLOCKED_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let began = Instant::now();
    let cached_read = std::fs::read(cached).map(|_| began.elapsed());
    let uncached = threads
        .into_iter()
        .map(|t| t.join().map_err(|_| anyhow::anyhow!("a reader panicked")))
        .collect::<Result<Vec<_>>>()?;
    Ok((uncached, cached_read))
}

/// Whether thread `tid` of this process is blocked in `read(2)`.
fn in_read(tid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).is_ok_and(|text| {
        text.split_whitespace().next().and_then(|n| n.parse().ok()) == Some(libc::SYS_read)
    })
}

/// A child stopped with SIGSTOP, continued when dropped.
struct Stopped<'a> {
    cell: &'a LocalCell,
    name: &'a str,
}

impl<'a> Stopped<'a> {
    fn new(cell: &'a LocalCell, name: &'a str) -> Result<Stopped<'a>> {
        cell.signal(name, libc::SIGSTOP)?;
        Ok(Stopped { cell, name })
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let _ = self.cell.signal(self.name, libc::SIGCONT);
    }
}
