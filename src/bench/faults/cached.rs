//! The faults suite's figure: `cat` of files cached under unexpired callbacks, with the
//! volume's only fileserver killed: how many succeed, and how long each takes.
//! Invariant: every read is checked byte for byte, and reaches the cache manager (the
//! kernel's pages of each file are dropped first), not only the kernel's page cache.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const FILES: usize = 1_000;
const FILE_BYTES: usize = 4096;
/// How long the mount may take to notice the dead server's connection end.
const NOTICE_LIMIT: Duration = Duration::from_secs(10);

pub fn run(dir: &Path) -> Result<()> {
    let mut cell = super::single_server_cell(dir)?;
    let mountpoint = dir.join("mnt");
    cell.mount("mount", &mountpoint, &dir.join("cache"), &[])?;
    let files = mountpoint.join("cached");
    std::fs::create_dir_all(&files).with_context(|| format!("create {}", files.display()))?;
    for i in 0..FILES {
        let path = files.join(format!("f{i}"));
        std::fs::write(&path, content(i)).with_context(|| format!("write {}", path.display()))?;
    }
    // Read back once: every status, listing and chunk now cached under a callback.
    for i in 0..FILES {
        let path = files.join(format!("f{i}"));
        if std::fs::read(&path).with_context(|| format!("read {}", path.display()))? != content(i) {
            bail!("{} does not hold what was written", path.display());
        }
    }

    cell.signal("fileserver", libc::SIGKILL)?;
    let log = cell.layout.log("mount");
    let deadline = Instant::now() + NOTICE_LIMIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("fileserver connection lost")
    {
        if Instant::now() > deadline {
            bail!(
                "the mount did not notice the fileserver's death within {NOTICE_LIMIT:?}; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut succeeded = 0;
    let mut samples = Vec::with_capacity(FILES);
    for i in 0..FILES {
        let path = files.join(format!("f{i}"));
        drop_kernel_pages(&path);
        let began = Instant::now();
        let read = std::fs::read(&path);
        samples.push(began.elapsed());
        match read {
            Ok(bytes) if bytes == content(i) => succeeded += 1,
            Ok(_) => eprintln!("{}: wrong content", path.display()),
            Err(e) => eprintln!("{}: {e}", path.display()),
        }
    }
    samples.sort();
    let p99 = samples[samples.len() * 99 / 100];
    println!(
        "{:<64} {:>10}  {FILES}",
        format!("only fileserver killed: cat of {FILES} cached files, succeeded"),
        succeeded
    );
    println!(
        "{:<64} {:>8.2}ms  <= 10ms",
        "  p99 latency of one cat",
        p99.as_secs_f64() * 1000.0
    );
    Ok(())
}

fn content(i: usize) -> Vec<u8> {
    let line = format!("cached file {i}\n");
    line.bytes().cycle().take(FILE_BYTES).collect()
}

/// Drops the kernel's clean pages of `path`, so its next read asks the cache manager.
/// Best effort: a failure only leaves the read to the page cache.
fn drop_kernel_pages(path: &Path) {
    if let Ok(file) = std::fs::File::open(path) {
        // SAFETY: fadvise on a descriptor we own; it only drops clean cached pages.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}
