//! What a server asks of its process: an open-files limit high enough for its connection
//! caps, and an allocator that gives freed memory back; and reading a process's resident
//! memory, for the tests and figures that check it.
//! Invariant: a failed request leaves the process as it was; the allocator is tuned once,
//! and the process runs itself again at most once.

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

/// Bytes from which an allocation is its own mapping, returned to the system when freed.
/// glibc raises this threshold on its own after a large block is freed (up to 32 MiB),
/// after which frame buffers come from the heap and stay resident once freed; setting it
/// keeps it fixed.
const MMAP_THRESHOLD_BYTES: i32 = 128 << 10;
/// Heaps glibc may keep for the runtime's threads (by default eight per core, each holding
/// its own freed memory).
const ARENAS_MAX: i32 = 2;

/// The glibc tunable that turns off its per-thread caches of freed blocks. Each thread
/// keeps up to seven freed blocks of every small size; after a flood of connections those
/// are scattered over the heap and pin pages that trimming could otherwise give back
/// (measured: a server's memory stayed 20 % over its baseline with them, 5 % without).
const NO_THREAD_CACHES: &str = "glibc.malloc.tcache_count=0";

/// Runs this same program again (same PID, same arguments) with glibc's per-thread caches
/// of freed blocks turned off, which only the environment at start can do; returns if it
/// does not: they are off already, `GLIBC_TUNABLES` sets them otherwise, this is not glibc,
/// or running again failed (then why). Call it first thing, before any thread starts.
pub fn restart_without_thread_caches() -> Option<String> {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return None;
    }
    let tunables = std::env::var_os("GLIBC_TUNABLES").unwrap_or_default();
    if tunables
        .to_string_lossy()
        .contains("glibc.malloc.tcache_count")
    {
        return None;
    }
    let mut tuned = tunables;
    if !tuned.is_empty() {
        tuned.push(":");
    }
    tuned.push(NO_THREAD_CACHES);
    let mut args = std::env::args_os();
    let program = args.next().unwrap_or_else(|| OsString::from("holdfast"));
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(program)
        .args(args)
        .env("GLIBC_TUNABLES", tuned)
        .exec();
    Some(format!(
        "cannot run again without malloc's thread caches: {error}"
    ))
}

/// Raises the soft limit on open files to the hard limit; returns the soft limit in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        limit = raised;
    }
    Ok(limit.rlim_cur)
}

/// Fixes the allocator's mapping threshold and caps its arenas, once per process, so
/// that frame buffers freed after a flood go back to the system.
pub fn tune_allocator() {
    static TUNED: Once = Once::new();
    TUNED.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator parameters; it is safe to call any time.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
            libc::mallopt(libc::M_ARENA_MAX, ARENAS_MAX);
        }
    });
}

/// Gives the allocator's free memory back to the system (blocking: it walks the heaps).
pub fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A process's resident memory in bytes (`VmRSS` of `/proc/PID/status`).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Samples a process's resident memory every 10 ms on a thread of its own, keeping the
/// peak, until `stop`.
pub struct PeakResident {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakResident {
    pub fn watch(pid: u32) -> PeakResident {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            let peak = peak.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(now) = resident_bytes(pid) {
                        peak.fetch_max(now, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        });
        PeakResident {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak seen.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.peak.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for PeakResident {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_ends_at_its_hard_limit() {
        let soft = raise_open_files_limit().unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!((soft, limit.rlim_cur), (limit.rlim_max, limit.rlim_max));
    }

    #[test]
    fn this_process_has_resident_memory() {
        let rss = resident_bytes(std::process::id()).unwrap();
        assert!(rss > 1 << 20, "{rss}");
    }
}
