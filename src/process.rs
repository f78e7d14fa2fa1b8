//! Process plumbing shared by the subcommands: logging, readiness files, signals, and
//! child processes.
//! Invariant: a child started here is stopped by its PID (SIGTERM, then SIGKILL) when its
//! `Supervised` drops, and a readiness file appears whole or not at all.

use std::path::Path;
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
/// after a grace period.
pub struct Supervised {
    pub name: String,
    child: Child,
}

impl Supervised {
    /// Starts this same executable with `args`, logging to `log` (appended).
    pub fn spawn_self(name: &str, args: &[String], log: &Path) -> Result<Supervised> {
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
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("start the {name}"))?;
        Ok(Supervised {
            name: name.to_owned(),
            child,
        })
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
