//! Support for tests of stalled servers and callers blocked in the kernel: a second
//! fileserver, and what system call a thread is blocked in.
//! Invariant: what is started here is stopped and unmounted on drop like the rest of the
//! cell.

use anyhow::Result;

use crate::TestCell;

impl TestCell {
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
