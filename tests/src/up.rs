//! `holdfast up` as a test's child process on a temporary DIR: its children found by parent
//! PID and named by their ready files, its output and its children's logs under the tripwire.
//! Invariant: on drop `up` and every child of it are stopped by PID and nothing is left
//! mounted on DIR/mnt; only then are the logs checked for undeclared ERROR lines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::tripwire::{self, Tripwire};
use crate::{is_mounted, require_fuse, run_bounded, wait_until};

/// How long `up` may take to bring the whole cell up, or to stop it.
const UP_LIMIT: Duration = Duration::from_secs(90);
/// The cell name `up` is given: the one the harness's own clients (`pair::call`) greet.
const CELL: &str = crate::pair::CELL;

/// One cell directory and the `holdfast up` runs on it, one at a time.
pub struct Up {
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// The running `up`, if any.
    child: Option<Child>,
    /// How many runs were started: run N writes its output to `up-N.out`.
    runs: usize,
    tripwire: Tripwire,
}

/// A process `up` started, as the harness finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpChild {
    pub pid: libc::pid_t,
    /// The name `up` runs it under (`vlserver-2`, `fileserver-a`, `mount`): the stem of
    /// its `--ready-file`, and of its log in DIR/logs.
    pub name: String,
}

impl Up {
    /// A fresh cell directory; nothing runs yet.
    pub fn new(bin: &str) -> Result<Up> {
        require_fuse()?;
        let dir = tempfile::Builder::new().prefix("holdfast-up").tempdir()?;
        let tripwire = Tripwire::default();
        // As for a `TestCell` mount: `up` stops its mount with a request in flight.
        tripwire.expect_while_stopping(MOUNT, crate::FUSE_REPLY_TO_AN_ENDED_REQUEST);
        Ok(Up {
            bin: PathBuf::from(bin),
            dir,
            child: None,
            runs: 0,
            tripwire,
        })
    }

    /// The cell's DIR (`up --dir`).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().join("cell")
    }

    /// How the test's own clients reach `up`'s cell: the host certificate `up` made in
    /// DIR/credentials the first time.
    pub fn transport(&self) -> Result<proto::Transport> {
        let credentials = self.dir().join(proto::cell::CREDENTIALS_DIR_DEFAULT);
        Ok(proto::Transport::from_dir(
            &credentials,
            proto::PeerClass::Host,
        )?)
    }

    /// DIR/mnt, the mount point.
    pub fn mountpoint(&self) -> PathBuf {
        self.dir().join("mnt")
    }

    /// Starts `holdfast up` and waits until it says the cell is up.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("up is running already");
        }
        self.runs += 1;
        let out_path = self.out_path(self.runs);
        let out = std::fs::File::create(&out_path)?;
        let ready = self.dir.path().join(format!("up-{}.ready", self.runs));
        // RUST_LOG is left as the test runner has it: unset, `up` and its children log
        // as they do for a person.
        let child = Command::new(&self.bin)
            .args(["up", "--cell-name", CELL, "--dir"])
            .arg(self.dir())
            // `up` keeps its user's token in the token directory: the test's own.
            .env("HOLDFAST_TOKEN_DIR", self.token_dir())
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start holdfast up")?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + UP_LIMIT;
        while !ready.exists() {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "holdfast up exited ({status}) before the cell was up:\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "holdfast up was not up within {UP_LIMIT:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Runs `holdfast up` to completion (one that is expected to refuse to start).
    pub fn run_to_completion(&self) -> Result<Output> {
        let mut command = Command::new(&self.bin);
        command
            .args(["up", "--cell-name", CELL, "--dir"])
            .arg(self.dir())
            .env("HOLDFAST_TOKEN_DIR", self.token_dir());
        run_bounded(command, UP_LIMIT)
    }

    /// Where `up` keeps the invoking user's token: inside the test's directory, never
    /// the real user's.
    fn token_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("tokens")
    }

    /// The PID of the running `up`.
    pub fn pid(&self) -> Result<libc::pid_t> {
        let child = self.child.as_ref().context("up is not running")?;
        Ok(child.id() as libc::pid_t)
    }

    /// True while the running `up` has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// What the latest run printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.out_path(self.runs)).unwrap_or_default()
    }

    /// The processes the running `up` started, by name.
    pub fn children(&self) -> Result<Vec<UpChild>> {
        children_of(self.pid()?)
    }

    /// The PID of the child running under `name`.
    pub fn child_pid(&self, name: &str) -> Result<libc::pid_t> {
        self.children()?
            .into_iter()
            .find(|c| c.name == name)
            .map(|c| c.pid)
            .with_context(|| format!("up runs no {name}"))
    }

    /// Sends `signal` to the child running under `name`; returns its PID.
    pub fn signal_child(&self, name: &str, signal: libc::c_int) -> Result<libc::pid_t> {
        let pid = self.child_pid(name)?;
        // SAFETY: signalling a process of ours (a child of our child) by PID.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("kill {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(pid)
    }

    /// Waits until `up` runs `name` again under a PID other than `old`, ready, and has
    /// said so.
    pub fn await_restarted(&self, name: &str, old: libc::pid_t, limit: Duration) -> Result<()> {
        let said = format!("The {name} is running again");
        let back = wait_until(limit, || {
            self.output().contains(&said)
                && self
                    .child_pid(name)
                    .is_ok_and(|pid| pid != old && self.is_ready(name))
        });
        if !back {
            bail!(
                "up did not start the {name} again within {limit:?}:\n{}",
                self.output()
            );
        }
        Ok(())
    }

    /// True when the child `name` wrote its ready file (`up` removes it before a restart).
    pub fn is_ready(&self, name: &str) -> bool {
        self.dir()
            .join("run")
            .join(format!("{name}.ready"))
            .exists()
    }

    /// The addresses `up` keeps in DIR: the VLDB replicas' (by id) and the members'.
    pub fn replica_addresses(&self) -> Result<Vec<(u64, String)>> {
        let text = std::fs::read_to_string(self.dir().join("vldb-replicas"))?;
        text.lines()
            .map(|line| {
                let (id, address) = line.split_once('=').context("ID=ADDR")?;
                Ok((id.parse()?, address.to_owned()))
            })
            .collect()
    }

    /// The pair members' (name, address), as `up` keeps them.
    pub fn member_addresses(&self) -> Result<Vec<(String, String)>> {
        let text = std::fs::read_to_string(self.dir().join("pair-members"))?;
        Ok(["fileserver-a", "fileserver-b"]
            .iter()
            .map(|n| (*n).to_owned())
            .zip(text.lines().map(str::to_owned))
            .collect())
    }

    /// Stops `up` with SIGTERM and waits for it; fails unless it exited cleanly, left no
    /// child running and nothing mounted on DIR/mnt.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let children = children_of(child.id() as libc::pid_t).unwrap_or_default();
        let mount_log = self.dir().join("logs").join(format!("{MOUNT}.log"));
        let from = file_len(&mount_log);
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let mut status = None;
        wait_until(UP_LIMIT, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            kill_all(&children);
            bail!("holdfast up did not stop within {UP_LIMIT:?} of SIGTERM");
        };
        self.tripwire.record_stop(MOUNT, from..file_len(&mount_log));
        let left: Vec<&UpChild> = children.iter().filter(|c| is_alive(c.pid)).collect();
        if !left.is_empty() {
            kill_all(&children);
            bail!("holdfast up exited but left {left:?} running");
        }
        if !status.success() {
            bail!("holdfast up exited with {status}:\n{}", self.output());
        }
        if is_mounted(&self.mountpoint()) {
            bail!(
                "{} is still mounted after up stopped",
                self.mountpoint().display()
            );
        }
        Ok(())
    }

    /// Declares that the process logging to DIR/logs/`process`.log (or `up` itself, as
    /// `up`) may log ERROR lines containing `pattern`.
    pub fn expect_error_from(&self, process: &str, pattern: &str) {
        self.tripwire.expect(Some(process), pattern);
    }

    /// Declares that the VLDB replicas may log that a peer is down (`PEER_DOWN`, at
    /// ERROR when RUST_LOG turns their Raft library's lines on): the test kills them.
    pub fn expect_peers_down(&self) {
        for id in 1..=crate::vldb::REPLICAS {
            for pattern in crate::vldb::PEER_DOWN {
                self.expect_error_from(&format!("vlserver-{id}"), pattern);
            }
        }
    }

    fn out_path(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("up-{run}.out"))
    }

    /// Every log: `up`'s own output per run, and its children's logs in DIR/logs.
    fn logs(&self) -> Vec<(String, PathBuf)> {
        let mut logs: Vec<(String, PathBuf)> = (1..=self.runs)
            .map(|run| ("up".to_owned(), self.out_path(run)))
            .collect();
        if let Ok(entries) = std::fs::read_dir(self.dir().join("logs")) {
            for entry in entries.flatten() {
                let path = entry.path();
                if let Some(stem) = path.file_stem() {
                    logs.push((stem.to_string_lossy().into_owned(), path));
                }
            }
        }
        logs
    }
}

/// The name `up` gives its mount (its log is DIR/logs/mount.log).
const MOUNT: &str = "mount";

/// A file's length, 0 if it cannot be read.
fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("while cleaning up: {error:#}");
        }
        // Whatever a failed stop left: dead mounts and the guard under them.
        let mountpoint = self.mountpoint();
        for _ in 0..8 {
            if !is_mounted(&mountpoint) {
                break;
            }
            let _ = cachemgr::mount::detach(&mountpoint);
        }
        let unexpected = self.tripwire.unexpected(&self.logs());
        tripwire::fire(&unexpected, &mut self.dir);
    }
}

/// The processes whose parent is `parent`, named by their `--ready-file`.
fn children_of(parent: libc::pid_t) -> Result<Vec<UpChild>> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").context("read /proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        // A process may end while it is read: skip it then.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command's `)`: state, then the parent's PID.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|field| field.parse::<libc::pid_t>().ok());
        if ppid != Some(parent) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let name = args
            .iter()
            .position(|a| a == "--ready-file")
            .and_then(|i| args.get(i + 1))
            .and_then(|ready| Path::new(ready).file_stem())
            .map(|stem| stem.to_string_lossy().into_owned());
        if let Some(name) = name {
            children.push(UpChild { pid, name });
        }
    }
    Ok(children)
}

fn is_alive(pid: libc::pid_t) -> bool {
    // A zombie still has /proc/PID but is gone for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn kill_all(children: &[UpChild]) {
    for child in children {
        // SAFETY: signalling a process `up` started, by PID.
        unsafe { libc::kill(child.pid, libc::SIGKILL) };
    }
}
