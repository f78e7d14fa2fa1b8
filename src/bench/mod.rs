//! `holdfast bench`: the mount, state, pair, vldb, faults and identity suites of figures,
//! each printed with its target where the design sets one.
//! Invariant: whatever a suite starts (processes, mounts, a temporary directory) is
//! stopped or removed when the suite ends, whether it measured or failed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cell::{LocalCell, Servers};

mod faults;
mod identity;
mod identity_access;
mod mount;
mod pair;
mod tree;
mod vldb;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Directory for the bench cell (default: a fresh temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the file for the throughput figures, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Number of 4 KiB files for the create figures.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Files in the source tree of the mount suite's `tar x` and `git status` figures.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    tree_files: u64,
    /// Which figures: `mount` (the data path through FUSE mounts: reads, writes,
    /// creates, `tar x` and `git status`, each against a local baseline), `state` (locks,
    /// callback journaling, recovery, snapshots), `pair` (failover of a fileserver
    /// pair), `vldb` (the three-replica VLDB: leader kills, creates, lookups), `faults`
    /// (dead and stopped servers, floods, memory, large busy directories), `identity`
    /// (what mutual TLS, access checks and tokens cost) or `all`.
    #[arg(long, default_value = "all", value_parser = ["all", "mount", "state", "pair", "vldb", "faults", "identity"])]
    suite: String,
    /// Failovers measured for the median time to the first write.
    #[arg(long, default_value_t = 5)]
    failovers: usize,
    /// Connected clients holding callbacks in the takeover figure.
    #[arg(long, default_value_t = 1_000)]
    takeover_clients: usize,
    /// Seconds each lock and FetchStatus figure is measured for.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Callback promises in the recovered state (with a tenth as many locks and a
    /// hundredth as many clients).
    #[arg(long, default_value_t = 1_000_000)]
    recovery_callbacks: usize,
    /// Only this figure of the faults suite (`cached`, `stopped`, `floods`, `memory`,
    /// `bigdir`) or of the identity suite (`tls`, `access`); default: all of the suite's.
    #[arg(long, value_parser = figure_names())]
    figure: Option<String>,
}

const BLOCK_BYTES: usize = 1 << 20;

pub fn run(args: BenchArgs) -> Result<()> {
    let all = args.suite == "all";
    if all || args.suite == "mount" {
        mount::run(&args)?;
    }
    if all || args.suite == "state" {
        run_state(&args)?;
    }
    if all || args.suite == "pair" {
        pair::run(&bench_dir(&args)?, args.failovers, args.takeover_clients)?;
    }
    if all || args.suite == "vldb" {
        vldb::run(&bench_dir(&args)?, args.seconds)?;
    }
    if all || args.suite == "faults" {
        faults::run(&bench_dir(&args)?, args.figure.as_deref())?;
    }
    if all || args.suite == "identity" {
        identity::run(
            &bench_dir(&args)?,
            args.size_mib,
            args.files,
            args.figure.as_deref(),
        )?;
    }
    Ok(())
}

/// `--figure`: a figure of the faults or of the identity suite.
fn figure_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(faults::FIGURES.into_iter().chain(identity::FIGURES))
}

/// The directory a suite's cell lives in: `--dir`, or a fresh temporary one.
fn bench_dir(args: &BenchArgs) -> Result<BenchDir> {
    match &args.dir {
        Some(dir) => Ok(BenchDir::Given(dir.clone())),
        None => tempfile::Builder::new()
            .prefix("holdfast-bench")
            .tempdir()
            .map(BenchDir::Temporary)
            .context("create a temporary directory"),
    }
}

/// Where a bench cell lives; a temporary one is removed when dropped.
enum BenchDir {
    Given(PathBuf),
    Temporary(tempfile::TempDir),
}

impl BenchDir {
    fn path(&self) -> &Path {
        match self {
            BenchDir::Given(dir) => dir,
            BenchDir::Temporary(dir) => dir.path(),
        }
    }
}

/// Lock, callback-journaling, recovery and snapshot figures, measured against an
/// in-process fileserver over loopback connections.
fn run_state(args: &BenchArgs) -> Result<()> {
    use state::JournalMode;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let duration = std::time::Duration::from_secs(args.seconds.max(1));
    println!("holdfast bench: state ({}s per figure)", duration.as_secs());
    println!("{:<52} {:>12}  target", "figure", "value");
    let modes = [
        ("sync", JournalMode::Sync),
        ("group", JournalMode::Group),
        ("none", JournalMode::None),
    ];
    for (name, mode) in modes {
        let rate = runtime
            .block_on(fileserver::bench::lock_pairs_per_second(mode, 64, duration))
            .with_context(|| format!("measure lock pairs in {name} mode"))?;
        let target = if name == "sync" { ">= 20000/s" } else { "" };
        println!(
            "{:<52} {:>10.0}/s  {target}",
            format!("lock+unlock pairs, 64 owners, {name}"),
            rate
        );
    }
    let journaled = runtime
        .block_on(fileserver::bench::fetch_status_per_second(
            JournalMode::Sync,
            duration,
        ))
        .context("measure FetchStatus with journaling")?;
    let unjournaled = runtime
        .block_on(fileserver::bench::fetch_status_per_second(
            JournalMode::None,
            duration,
        ))
        .context("measure FetchStatus without journaling")?;
    println!(
        "{:<52} {:>10.0}/s",
        "FetchStatus, callbacks journaled (sync)", journaled
    );
    println!(
        "{:<52} {:>10.0}/s",
        "FetchStatus, not journaled (none)", unjournaled
    );
    println!(
        "{:<52} {:>12.2}  >= 0.8",
        "  ratio journaled / not journaled",
        journaled / unjournaled
    );
    let callbacks = args.recovery_callbacks;
    let figures = fileserver::bench::recovery(callbacks, callbacks / 10, callbacks / 100)
        .context("measure recovery")?;
    println!(
        "{:<52} {:>10.0}ms  <= 1000ms",
        format!(
            "recovery of {} callbacks, {} locks, {} clients",
            figures.callbacks, figures.locks, figures.clients
        ),
        figures.recovery.as_secs_f64() * 1000.0
    );
    println!(
        "{:<52} {:>10.1}ms  <= 10ms",
        "longest request pause while snapshotting it",
        figures.snapshot_pause_max.as_secs_f64() * 1000.0
    );
    println!(
        "{:<52} {:>10.0}ms",
        "snapshot write (in the background)",
        figures.snapshot_write.as_secs_f64() * 1000.0
    );
    println!(
        "{:<52} {:>11.0}B  <= 64B",
        "resident bytes per callback promise, callbacks alone", figures.callback_bytes_per_promise
    );
    println!(
        "{:<52} {:>11.0}B",
        "  per promise, with the locks (whole state)", figures.state_bytes_per_promise
    );
    Ok(())
}

/// The runtime a mount bench's cell is driven from.
fn mount_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// A local cell with one fileserver and two mounts, A and B, each with a cache of twice
/// the bench file's size: the mount figures write on one and read cold on the other.
struct MountedCell {
    cell: LocalCell,
    a: PathBuf,
    b: PathBuf,
}

/// Write+close through one mount, then the cold read of the same file through the other:
/// bytes per second each.
struct Across {
    write_close: f64,
    cold_read: f64,
}

impl MountedCell {
    /// Starts the cell in `dir` (keeping what an earlier start left there) and mounts it
    /// at DIR/mnt-a and DIR/mnt-b.
    fn start(dir: &Path, size_mib: u64, runtime: &tokio::runtime::Runtime) -> Result<MountedCell> {
        let mut cell = LocalCell::start(dir, "bench.holdfast", Servers::Single, runtime)?;
        let cache_mib = (size_mib * 2 + 64).to_string();
        let (a, b) = (dir.join("mnt-a"), dir.join("mnt-b"));
        cell.mount(
            "mount-a",
            &a,
            &dir.join("cache-a"),
            &["--cache-mib", &cache_mib],
        )?;
        cell.mount(
            "mount-b",
            &b,
            &dir.join("cache-b"),
            &["--cache-mib", &cache_mib],
        )?;
        Ok(MountedCell { cell, a, b })
    }

    /// Writes `name` (`size_bytes`) through mount A and closes it, then reads it through
    /// mount B, which has never seen it.
    fn write_then_cold_read(&self, name: &str, size_bytes: u64) -> Result<Across> {
        let write_close = write_file(&self.a.join(name), size_bytes, Sync::None)?;
        let cold_read = read_file(&self.b.join(name))?;
        Ok(Across {
            write_close,
            cold_read,
        })
    }
}

/// Bytes per second through one loopback TCP connection.
fn loopback_tcp_rate(total_bytes: u64) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind loopback")?;
    let address = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; BLOCK_BYTES];
        let mut received = 0u64;
        loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                return Ok(received);
            }
            received += n as u64;
        }
    });
    let mut stream = std::net::TcpStream::connect(address)?;
    let block = vec![0x5au8; BLOCK_BYTES];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total_bytes {
        stream.write_all(&block)?;
        sent += BLOCK_BYTES as u64;
    }
    drop(stream);
    let received = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    Ok(received as f64 / started.elapsed().as_secs_f64())
}

/// Whether a written file is synced before it is closed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// Closed as it is (through a mount, the close makes it durable on the server).
    None,
    /// `fdatasync`ed first, as `dd conv=fdatasync` does.
    Data,
}

/// Writes `size_bytes`, syncs as `sync` says and closes; bytes per second including the
/// sync and the close.
fn write_file(path: &Path, size_bytes: u64, sync: Sync) -> Result<f64> {
    let mut block = vec![0u8; BLOCK_BYTES];
    for (i, byte) in block.iter_mut().enumerate() {
        *byte = (i % 251) as u8;
    }
    let started = Instant::now();
    let mut file =
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut written = 0u64;
    while written < size_bytes {
        file.write_all(&block)
            .with_context(|| format!("write {}", path.display()))?;
        written += BLOCK_BYTES as u64;
    }
    if sync == Sync::Data {
        file.sync_data()
            .with_context(|| format!("fdatasync {}", path.display()))?;
    }
    drop(file);
    Ok(written as f64 / started.elapsed().as_secs_f64())
}

/// Reads the whole file; bytes per second.
fn read_file(path: &Path) -> Result<f64> {
    let started = Instant::now();
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut buffer = vec![0u8; BLOCK_BYTES];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Creates `count` files of 4 KiB (create, write, close each); files per second.
fn create_files(dir: &Path, count: usize) -> Result<f64> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let data = vec![7u8; 4096];
    let started = Instant::now();
    for i in 0..count {
        let path = dir.join(format!("f{i:05}"));
        std::fs::write(&path, &data).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64().max(1e-9))
}
