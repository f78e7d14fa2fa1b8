//! `holdfast bench --suite mount`: every goal of the data path, each as a ratio to its
//! baseline measured in the same run on the same machine and disk, with its target;
//! then the mounts' and the fileserver's figures of where the time went.
//! Invariant: every figure keeps its durability: a mount's file counts once its close
//! returned (which syncs it on the server), a local baseline's once it was fsynced.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use super::tree::{self, Tree};
use super::{
    BenchArgs, MountedCell, Sync, bench_dir, create_files, loopback_tcp_rate, mount_runtime,
    read_file, write_file,
};

/// Threads of the parallel create figure.
const CREATE_THREADS: usize = 8;
/// Reads of a cached file timed, locally and through the mount alike; the median counts.
const CACHED_READS: usize = 3;

/// A figure's row: its name, its value shown with its unit, the ratio to its baseline
/// (higher is faster) and its target ("-" where the issue sets none).
fn row(name: &str, value: String, ratio: f64, target: &str) {
    println!("{name:<48} {value:>16} {ratio:>8.2}  {target}");
}

fn baseline(name: &str, value: String) {
    println!("{:<48} {value:>16}", format!("{name} (baseline)"));
}

fn mib(rate: f64) -> String {
    format!("{:.0} MiB/s", rate / f64::from(1 << 20))
}

fn per_second(rate: f64) -> String {
    format!("{rate:.0} /s")
}

fn millis(duration: std::time::Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

/// Runs the suite: a local cell with mounts A and B, the baselines beside it on the same
/// disk.
pub fn run(args: &BenchArgs) -> Result<()> {
    let bench_dir = bench_dir(args)?;
    let dir = bench_dir.path().join("mount");
    let size_bytes = args.size_mib * (1 << 20);
    let runtime = mount_runtime()?;
    let mut mounted = MountedCell::start(&dir, args.size_mib, &runtime)?;
    eprintln!("bench cell up in {}; measuring...", dir.display());

    // Streams: loopback TCP, a local write made durable, page-cached local reads.
    let tcp = loopback_tcp_rate(size_bytes * 2)?;
    let local_file = dir.join("local.bin");
    let local_write = write_file(&local_file, size_bytes, Sync::Data)?;
    let local_read = median_read(&local_file)?;
    // Through the mounts: write+close on A, the cold read on B, then B's cached re-read.
    let across = mounted.write_then_cold_read("bench.bin", size_bytes)?;
    let cached_read = median_read(&mounted.b.join("bench.bin"))?;

    // Small files: local create+write+fsync+close, then the mount's creates.
    let local_creates = create_files_synced(&dir.join("local-creates"), args.files)?;
    let creates = create_files(&mounted.a.join("creates"), args.files)?;
    let parallel_creates = create_files_parallel(&mounted.a.join("creates-parallel"), args.files)?;

    // A source tree: `tar x`, then `git status` once cached.
    eprintln!("making a tree of {} files...", args.tree_files);
    // At most a million (`--tree-files`): fits a usize.
    let tree = tree::make(&dir, args.tree_files as usize)?;
    let local_tar = tree::extract(&tree, &dir.join("tree-local"), true)?;
    let mount_tree = mounted.a.join("tree");
    let mount_tar = tree::extract(&tree, &mount_tree, false)?;
    let statuses = git_statuses(&tree, &dir.join("tree-local"), &mount_tree)?;
    mounted.cell.check_children()?;

    println!(
        "holdfast bench: mount ({} MiB file, {} files of 4 KiB, a tree of {} files)",
        args.size_mib, args.files, tree.files
    );
    println!("ratio: the mount's speed over its baseline, measured in this run");
    println!("{:<48} {:>16} {:>8}  target", "figure", "value", "ratio");
    baseline("loopback TCP", mib(tcp));
    baseline("local page-cached read", mib(local_read));
    baseline("local write+fdatasync", mib(local_write));
    baseline(
        "local 4 KiB create+write+fsync+close",
        per_second(local_creates),
    );
    let tar_rate = |elapsed: std::time::Duration| tree.files as f64 / elapsed.as_secs_f64();
    baseline(
        &format!("local tar x+syncfs of {} files", tree.files),
        per_second(tar_rate(local_tar)),
    );
    if let Ok((local, _)) = &statuses {
        baseline("local git status, cached", millis(*local));
    }
    row(
        "cached re-read / local page-cached read",
        mib(cached_read),
        cached_read / local_read,
        ">= 0.95",
    );
    row(
        "cold read / loopback TCP",
        mib(across.cold_read),
        across.cold_read / tcp,
        ">= 0.5",
    );
    row(
        "write+close / local write+fdatasync",
        mib(across.write_close),
        across.write_close / local_write,
        ">= 0.8",
    );
    row(
        "4 KiB creates, 1 thread / local",
        per_second(creates),
        creates / local_creates,
        ">= 1.0",
    );
    row(
        &format!("4 KiB creates, {CREATE_THREADS} threads / 1 thread"),
        per_second(parallel_creates),
        parallel_creates / creates,
        ">= 4",
    );
    row(
        &format!("tar x of {} files / local", tree.files),
        per_second(tar_rate(mount_tar)),
        local_tar.as_secs_f64() / mount_tar.as_secs_f64(),
        "-",
    );
    match &statuses {
        Ok((local, mount)) => row(
            "git status, cached / local",
            millis(*mount),
            local.as_secs_f64() / mount.as_secs_f64(),
            "-",
        ),
        Err(reason) => println!("{:<48} skipped: {reason}", "git status, cached / local"),
    }
    print_where_time_went(&mounted, &runtime);
    Ok(())
}

/// `git status` once cached on local disk and through the mount, or why it was not run.
fn git_statuses(
    tree: &Tree,
    local: &Path,
    mount: &Path,
) -> Result<std::result::Result<(std::time::Duration, std::time::Duration), String>> {
    if let Some(reason) = &tree.git_skipped {
        return Ok(Err(reason.clone()));
    }
    let (local_time, _) = tree::git_status(local)?;
    let (mount_time, changes) = tree::git_status(mount)?;
    if changes > 0 {
        eprintln!(
            "note: git status through the mount listed {changes} changes in a tree \
             extracted unchanged"
        );
    }
    Ok(Ok((local_time, mount_time)))
}

/// The figures each mount and the fileserver kept of the run; a figure that cannot be
/// had is said so, and the suite goes on.
fn print_where_time_went(mounted: &MountedCell, runtime: &tokio::runtime::Runtime) {
    for (name, mount) in [("A", &mounted.a), ("B", &mounted.b)] {
        println!();
        match cachemgr::fs_counters(mount) {
            Ok(text) => print!("mount {name} (holdfast fs counters):\n{text}"),
            Err(e) => println!("mount {name}: no figures: {e}"),
        }
    }
    println!();
    let cell = &mounted.cell;
    let figures = cell.admin_token().and_then(|token| {
        let vos = vos::Vos::new(
            cell.cell.clone(),
            cell.transport.clone(),
            std::time::Duration::from_secs(10),
        )
        .with_token(Some(token));
        runtime
            .block_on(vos.server_figures(None))
            .context("ask the fileserver")
    });
    match figures {
        Ok((server, figures)) => print!(
            "fileserver (holdfast vos counters):\n{}",
            vos::format_figures(&server, &figures)
        ),
        Err(e) => println!("fileserver: no figures: {e:#}"),
    }
}

/// Median bytes per second of `CACHED_READS` reads of a file already cached.
fn median_read(path: &Path) -> Result<f64> {
    read_file(path)?; // warm: the first read may still fetch or fill the page cache
    let mut rates = Vec::with_capacity(CACHED_READS);
    for _ in 0..CACHED_READS {
        rates.push(read_file(path)?);
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[CACHED_READS / 2])
}

/// Creates `count` files of 4 KiB, each created, written, fsynced and closed; files per
/// second.
fn create_files_synced(dir: &Path, count: usize) -> Result<f64> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let data = vec![7u8; 4096];
    let started = Instant::now();
    for i in 0..count {
        let path = dir.join(format!("f{i:05}"));
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        file.write_all(&data)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("write and fsync {}", path.display()))?;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

/// Creates `count` files of 4 KiB in one directory from `CREATE_THREADS` threads at
/// once (create, write, close each); files per second.
fn create_files_parallel(dir: &Path, count: usize) -> Result<f64> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let data = vec![7u8; 4096];
    let per_thread = count.div_ceil(CREATE_THREADS);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CREATE_THREADS)
            .map(|thread| {
                let data = &data;
                scope.spawn(move || -> Result<usize> {
                    for i in 0..per_thread {
                        let path = dir.join(format!("t{thread}-f{i:05}"));
                        std::fs::write(&path, data)
                            .with_context(|| format!("write {}", path.display()))?;
                    }
                    Ok(per_thread)
                })
            })
            .collect();
        let mut made = 0;
        for thread in threads {
            made += thread
                .join()
                .map_err(|_| anyhow::anyhow!("a create thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(made)
    })
    .map(|made| made as f64 / started.elapsed().as_secs_f64().max(1e-9))
}
