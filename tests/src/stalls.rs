//! Support for tests of stalled servers and callers blocked in the kernel: a mount with
//! its own RPC timeout, a second fileserver, and what system call a thread is blocked in.
//! Invariant: what is started here is stopped and unmounted on drop like the rest of the
//! cell.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::{FUSE_REPLY_TO_AN_ENDED_REQUEST, TestCell};

impl TestCell {
    /// `mount`, with calls to fileservers failing after `timeout` (`--timeout`) rather
    /// than the harness's usual 2 s.
    pub fn mount_with_timeout(
        &mut self,
        name: &str,
        timeout: Duration,
        extra: &[&str],
    ) -> Result<PathBuf> {
        let mountpoint = self.dir.path().join(name);
        std::fs::create_dir_all(&mountpoint)?;
        let cache = self.path(&format!("{name}.cache"));
        let cell_file = self.cell_file.to_string_lossy().into_owned();
        let target = mountpoint.to_string_lossy().into_owned();
        let timeout = format!("{}", timeout.as_secs_f64());
        let mut args = vec![
            "mount",
            "--cell",
            &cell_file,
            "--cache",
            &cache,
            "--timeout",
            &timeout,
        ];
        args.extend_from_slice(extra);
        args.push(&target);
        self.mounts.push(mountpoint.clone());
        self.tripwire
            .expect_while_stopping(name, FUSE_REPLY_TO_AN_ENDED_REQUEST);
        self.spawn_ready(name, &args)?;
        Ok(mountpoint)
    }

    /// Starts another fileserver, `name`, on a partition of its own; returns its address
    /// (for `vos create --server`).
    pub fn start_other_fileserver(&mut self, name: &str) -> Result<String> {
        let partition = self.path(&format!("{name}.partition"));
        let cell_file = self.cell_file.to_string_lossy().into_owned();
        let args = [
            "fileserver",
            "--cell",
            &cell_file,
            "--partition",
            &partition,
            "--listen",
            "127.0.0.1:0",
        ];
        self.spawn_ready(name, &args)
    }
}

/// The system call thread `tid` of process `pid` is blocked in, if it is in one
/// (`/proc/PID/task/TID/syscall`; a running thread reads as `running`).
pub fn blocked_in_syscall(pid: libc::pid_t, tid: libc::pid_t) -> Option<libc::c_long> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Whether thread `tid` of process `pid` is blocked in `flock(2)`.
pub fn blocked_in_flock(pid: libc::pid_t, tid: libc::pid_t) -> bool {
    blocked_in_syscall(pid, tid) == Some(libc::SYS_flock)
}
