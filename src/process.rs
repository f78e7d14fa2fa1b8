//! Process plumbing shared by the subcommands: logging, readiness files, signals, and
//! child processes.
//! Invariant: a child started here is stopped by its PID (SIGTERM, then SIGKILL) when its
//! `Supervised` drops, and a readiness file appears whole or not at all.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Logs to stderr at `default_level`, or as `RUST_LOG` says.
pub fn init_tracing(default_level: &str) {
    // openraft narrates every election and logs an unreachable peer at ERROR, which is
    // routine while a replica is down; the VLDB logs the role changes and failures that
    // matter itself. RUST_LOG=info,openraft=info brings openraft's own lines back.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},openraft=off")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colors only for a person at a terminal, never in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Writes `contents` to `path` atomically (temp file, rename), if a path was given.
pub fn write_ready_file(path: Option<&Path>, contents: &str) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, contents).with_context(|| format!("write {}", temp.display()))?;
    std::fs::rename(&temp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

/// A `watch` that turns true on the first SIGINT or SIGTERM (inside a tokio runtime).
pub fn shutdown_on_signals() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("signal received; shutting down");
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Like `shutdown_on_signals`, without a runtime: blocks SIGINT and SIGTERM in this
/// thread (and so in every thread started after it) and waits for them in a thread.
pub fn shutdown_on_signals_blocking() -> Result<watch::Receiver<bool>> {
    let set = signal_set(&[libc::SIGINT, libc::SIGTERM]);
    // SAFETY: `set` is a valid, initialized signal set; a null old-set is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        bail!("block SIGINT/SIGTERM: error {rc}");
    }
    let (tx, rx) = watch::channel(false);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` is valid and `signal` is a valid out-pointer.
            unsafe { libc::sigwait(&set, &mut signal) };
            tracing::info!(signal, "signal received; shutting down");
            let _ = tx.send(true);
        })
        .context("start the signal thread")?;
    Ok(rx)
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset initializes the zeroed set; sigaddset takes valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// A child process of ours, stopped by its PID when dropped: SIGTERM, then SIGKILL
/// after a grace period. It keeps how it was started, so that it can be started again
/// the same way (same address, same directories).
pub struct Supervised {
    pub name: String,
    child: Child,
    args: Vec<String>,
    log: PathBuf,
    started: Instant,
}

impl Supervised {
    /// Starts this same executable with `args`, logging to `log` (appended).
    pub fn spawn_self(name: &str, args: &[String], log: &Path) -> Result<Supervised> {
        Ok(Supervised {
            name: name.to_owned(),
            child: spawn_self_child(name, args, log)?,
            args: args.to_vec(),
            log: log.to_owned(),
            started: Instant::now(),
        })
    }

    /// Starts the child again with the arguments it was first started with; the old
    /// process must have exited (`exited` said so).
    pub fn respawn(&mut self) -> Result<()> {
        debug_assert!(
            self.exited().is_some(),
            "respawn of a running {}",
            self.name
        );
        self.child = spawn_self_child(&self.name, &self.args, &self.log)?;
        self.started = Instant::now();
        Ok(())
    }

    /// How long the current process has been running (or ran, once it exited).
    pub fn ran_for(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the child (a fault for benchmarks: SIGKILL, SIGSTOP).
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        // SAFETY: signalling our own child by its PID.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, signal) } != 0 {
            anyhow::bail!(
                "signal the {} ({}): {}",
                self.name,
                self.pid(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// The exit status if the child has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Idempotent.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(name = %self.name, pid = self.pid(), "did not stop in time; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

fn spawn_self_child(name: &str, args: &[String], log: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("find the holdfast executable")?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open log {}", log.display()))?;
    let mut command = Command::new(exe);
    // Its own process group: a Ctrl-C at the terminal reaches only the supervisor,
    // which then stops its children in order (mount first, servers last).
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("start the {name}"))
}

/// How long to wait before starting a child again that exited: `first` for a child that
/// had run stably for `stable_after`, doubling with each exit that follows soon after a
/// start (a child that cannot stay up), never more than `max`. Pure: it is told how long
/// the child ran and answers a delay.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    stable_after: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration, stable_after: Duration) -> Backoff {
        Backoff {
            first,
            max,
            stable_after,
            next: first,
        }
    }

    /// The delay before the next start of a child that ran for `ran_for` before it
    /// exited (or failed to start).
    pub fn after_exit(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.stable_after {
            self.next = self.first;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// Waits until `path` exists and returns its contents, failing early if `child` exits.
pub fn await_ready_file(
    path: &Path,
    child: &mut Supervised,
    timeout: Duration,
    log: &Path,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(contents) = std::fs::read_to_string(path) {
            return Ok(contents.trim().to_owned());
        }
        if let Some(status) = child.exited() {
            bail!(
                "the {} exited ({status}) before it was ready; its last log lines:\n{}",
                child.name,
                log_tail(log, 10)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the {} was not ready within {timeout:?}; see {}",
                child.name,
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_while_a_child_cannot_stay_up_and_resets_once_it_ran_stably() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS, 5000 * MS);
        let delays: Vec<Duration> = (0..6).map(|_| backoff.after_exit(10 * MS)).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1000, 1000].map(|ms| ms * MS).to_vec()
        );
        assert_eq!(backoff.after_exit(5000 * MS), 100 * MS);
        assert_eq!(backoff.after_exit(4999 * MS), 200 * MS);
    }
}
