//! Whether the thread behind a waiting FUSE request has a signal that should end the wait:
//! our stand-in for `FUSE_INTERRUPT`, which fuser 0.18 answers `ENOSYS` by itself.
//! Invariant: only a signal the thread neither blocks nor ignores, and that it either
//! catches or dies of, counts; a thread whose status cannot be read is never interrupted.
//!
//! Why polling: after fuser's first `ENOSYS` the kernel sets `no_interrupt` on the
//! connection and waits for every later answer killable-only, with the signal left pending
//! on the waiting thread. `/proc/<tid>/status` shows it (`SigPnd`, `ShdPnd`), with the
//! thread's mask (`SigBlk`) and its process's dispositions (`SigIgn`, `SigCgt`). The kernel
//! fills the request's `pid` with the caller's thread id, and that thread cannot exit
//! before we answer, so the id names the right thread for as long as we poll it. Limits: a
//! signal sent to the whole process may be taken by another of its threads, and the waiter
//! is still told `EINTR` (as POSIX allows); a stop signal with its default action does
//! not end the wait (it takes effect once the lock is granted); a caller in another PID
//! namespace than the mount's (`pid` 0) cannot be watched.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tracing::debug;

/// How often one waiter's thread is looked at while few wait.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Waiters polled at the full pace; beyond, each is polled less often, so the mount reads
/// at most about this many status files per `POLL_EVERY` however many wait.
const POLLED_AT_FULL_PACE: usize = 64;

/// Signals whose default action is to do nothing (`SIGCHLD`, `SIGCONT`, `SIGURG`,
/// `SIGWINCH`) or to stop the process (`SIGSTOP`, `SIGTSTP`, `SIGTTIN`, `SIGTTOU`): left
/// at their default, they end no system call.
const DEFAULT_HARMLESS: [libc::c_int; 8] = [
    libc::SIGCHLD,
    libc::SIGCONT,
    libc::SIGURG,
    libc::SIGWINCH,
    libc::SIGSTOP,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

fn bit(signal: libc::c_int) -> u64 {
    1u64 << (signal - 1)
}

/// The lowest signal in a `/proc/<tid>/status` text that would end a wait of that thread,
/// if any: pending for it or its process, not blocked, not ignored, and caught or fatal.
pub fn interrupting_signal(status: &str) -> Option<libc::c_int> {
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        u64::from_str_radix(line[name.len()..].trim(), 16).ok()
    };
    let pending = field("SigPnd:")? | field("ShdPnd:")?;
    let (blocked, ignored, caught) = (field("SigBlk:")?, field("SigIgn:")?, field("SigCgt:")?);
    let harmless = DEFAULT_HARMLESS.iter().fold(0, |mask, &s| mask | bit(s));
    let ending = pending & !blocked & !ignored & (caught | !harmless);
    (ending != 0).then(|| ending.trailing_zeros() as libc::c_int + 1)
}

/// Completes once thread `tid` has a signal that ends its wait (`interrupting_signal`);
/// never, if its status cannot be read. `waiting` counts the waiters polling now: with
/// more than `POLLED_AT_FULL_PACE` of them each polls less often.
pub async fn interrupted(tid: u32, waiting: Arc<AtomicUsize>) {
    if tid == 0 {
        debug!("a lock waiter outside the mount's PID namespace cannot be interrupted");
        return std::future::pending().await;
    }
    let path = format!("/proc/{tid}/status");
    loop {
        let slower = 1 + waiting.load(Ordering::Relaxed) / POLLED_AT_FULL_PACE;
        tokio::time::sleep(POLL_EVERY * u32::try_from(slower).unwrap_or(u32::MAX)).await;
        // procfs is in memory: reading it does not block the runtime.
        match std::fs::read_to_string(&path) {
            Ok(status) => {
                if let Some(signal) = interrupting_signal(&status) {
                    debug!(tid, signal, "lock waiter interrupted by a signal");
                    return;
                }
            }
            Err(e) => {
                debug!(tid, error = %e, "cannot watch a lock waiter for signals");
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pending: u64, shared: u64, blocked: u64, ignored: u64, caught: u64) -> String {
        format!(
            "Name:\tflock\nState:\tS (sleeping)\nSigQ:\t1/1000\nSigPnd:\t{pending:016x}\n\
             ShdPnd:\t{shared:016x}\nSigBlk:\t{blocked:016x}\nSigIgn:\t{ignored:016x}\n\
             SigCgt:\t{caught:016x}\nCapInh:\t0000000000000000\n"
        )
    }

    #[test]
    fn a_caught_or_fatal_signal_ends_the_wait() {
        let usr1 = bit(libc::SIGUSR1);
        // Caught, pending for the process or the thread.
        assert_eq!(
            interrupting_signal(&status(0, usr1, 0, 0, usr1)),
            Some(libc::SIGUSR1)
        );
        assert_eq!(
            interrupting_signal(&status(usr1, 0, 0, 0, usr1)),
            Some(libc::SIGUSR1)
        );
        // Left at its default action, SIGTERM kills: it ends the wait too, as SIGKILL.
        let term = bit(libc::SIGTERM);
        assert_eq!(
            interrupting_signal(&status(0, term, 0, 0, 0)),
            Some(libc::SIGTERM)
        );
        let kill = bit(libc::SIGKILL);
        assert_eq!(
            interrupting_signal(&status(kill, 0, 0, 0, 0)),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn blocked_ignored_and_harmless_signals_do_not() {
        let usr1 = bit(libc::SIGUSR1);
        assert_eq!(interrupting_signal(&status(0, 0, 0, 0, usr1)), None);
        assert_eq!(interrupting_signal(&status(usr1, 0, usr1, 0, usr1)), None);
        assert_eq!(interrupting_signal(&status(0, usr1, 0, usr1, 0)), None);
        // A stop signal or SIGCHLD at its default action ends nothing; caught, it does.
        let (stop, child) = (bit(libc::SIGTSTP), bit(libc::SIGCHLD));
        assert_eq!(interrupting_signal(&status(stop | child, 0, 0, 0, 0)), None);
        assert_eq!(
            interrupting_signal(&status(0, child, 0, 0, child)),
            Some(libc::SIGCHLD)
        );
        // A status without the fields (not Linux's) interrupts nothing.
        assert_eq!(interrupting_signal("Name:\tx\n"), None);
    }

    #[test]
    fn this_threads_own_status_reads_as_not_interrupted() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let text = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap();
        assert_eq!(interrupting_signal(&text), None);
    }
}
