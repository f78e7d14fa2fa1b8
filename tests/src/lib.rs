//! End-to-end test support: a cell of real `holdfast` processes on 127.0.0.1, with real
//! FUSE mounts.
//! Invariant: on drop every process is stopped by its PID and every mount unmounted, and
//! only then are the logs checked for undeclared ERROR lines.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proto::tls::authority;
use proto::{PeerClass, Transport};

pub mod crash;
pub mod flood;
pub mod identity;
pub mod pair;
pub mod pts;
pub mod rpc_client;
pub mod stalls;
pub mod tmpfs;
pub mod tripwire;
pub mod up;
pub mod vldb;

pub use pair::{PAIR, Proxy};
pub use rpc_client::ProtocolClient;
pub use tmpfs::Tmpfs;
pub use tripwire::ErrorLine;
pub use vldb::{VldbKind, VldbReplica, replica_name, vldb_status};

use tripwire::Tripwire;

/// How long a component may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What fuser logs at ERROR when it answers a request the kernel has already ended. A
/// mount stopped with a request in flight (the background release of a file just
/// closed, say) unmounts under it, so the harness expects it while stopping a mount.
pub(crate) const FUSE_REPLY_TO_AN_ENDED_REQUEST: &str =
    "Failed to send FUSE reply: No such file or directory";

/// One process started by a test.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Stops the process (SIGTERM, then SIGKILL) and waits for it; returns the stretch of
    /// its log it wrote meanwhile, `None` if it had exited already.
    fn stop(&mut self) -> Option<Range<u64>> {
        let from = self.begin_stop()?;
        Some(self.finish_stop(from))
    }

    /// Sends SIGTERM (SIGCONT first: it may be stopped); returns how long its log was
    /// then, `None` if it had exited already.
    fn begin_stop(&mut self) -> Option<u64> {
        if self.child.try_wait().ok().flatten().is_some() {
            return None;
        }
        let from = log_len(&self.log);
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child by PID.
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, libc::SIGTERM);
        }
        Some(from)
    }

    /// Waits for it to exit after `begin_stop` (SIGKILL after 15 s); returns the stretch
    /// of its log from `from`.
    fn finish_stop(&mut self, from: u64) -> Range<u64> {
        self.terminate();
        from..log_len(&self.log)
    }

    fn terminate(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cell for one test: VLDB (one process, or a group of replicas), one fileserver or a
/// pair, `root.cell`, and any number of mounts.
///
/// Dropping it stops every process it started, unmounts every mount, and then fails the
/// test (a panic naming each process, its log file and the lines) if any of them logged
/// an ERROR line the test did not declare with `expect_error` or `expect_error_from`. The
/// cell's directory is kept then, so that the logs can be read.
pub struct TestCell {
    bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub cell_file: PathBuf,
    /// This test's own clients' transport: the host certificate of the cell's CA (made
    /// in DIR/credentials, beside the cell file).
    pub transport: Transport,
    /// The VLDB's address; the first replica's when the VLDB is a group.
    pub vl_address: String,
    /// The VLDB's replicas, when it is a group (`VldbKind::Replicated`...).
    pub replicas: Vec<VldbReplica>,
    pub fs_address: String,
    /// Pair members started by `start_pair`: (process name, address).
    pub members: Vec<(String, String)>,
    /// The proxy between member `fs-a` and the VLDB, when asked for.
    pub vldb_proxy: Option<Proxy>,
    /// The proxies in front of the replicas, for `VldbKind::ReplicatedBehindProxies`.
    replica_proxies: Option<vldb::ReplicaProxies>,
    procs: Vec<Proc>,
    mounts: Vec<PathBuf>,
    /// The name of every process started, once each: its log is `<name>.log`.
    logged: Vec<String>,
    tripwire: Tripwire,
}

/// How `TestCell::start_pair` sets the pair up.
#[derive(Clone, Debug, Default)]
pub struct PairOptions {
    /// Member `fs-a` reaches the VLDB through a `Proxy` that a test can cut.
    pub vldb_proxy_for_a: bool,
    /// More flags for both members (e.g. `--grace-secs`).
    pub member_flags: Vec<String>,
    /// What serves the VLDB.
    pub vldb: VldbKind,
}

impl TestCell {
    /// Starts a VLDB and a fileserver, and creates `root.cell`. `bin` is the `holdfast`
    /// executable (`env!("CARGO_BIN_EXE_holdfast")`).
    pub fn start(bin: &str) -> Result<TestCell> {
        let mut cell = TestCell::start_vldb(bin)?;
        cell.start_fileserver()?;
        cell.create_root_volume()?;
        Ok(cell)
    }

    /// Starts a VLDB and a pair of fileservers (`fs-a`, which becomes active first,
    /// and `fs-b`) on one partition, and creates `root.cell`. Each member writes its
    /// history to `<name>.history` in the cell's directory.
    pub fn start_pair(bin: &str, options: PairOptions) -> Result<TestCell> {
        let mut cell = TestCell::start_vldb_as(bin, options.vldb)?;
        if options.vldb_proxy_for_a {
            if options.vldb != VldbKind::Single {
                bail!("vldb_proxy_for_a needs a single VLDB");
            }
            let proxy = Proxy::start(&cell.vl_address)?;
            let cell_file = cell.dir.path().join("cell-via-proxy.toml");
            std::fs::write(
                &cell_file,
                format!(
                    "name = \"{}\"\nvlservers = [\"{}\"]\n",
                    pair::CELL,
                    proxy.address
                ),
            )?;
            cell.vldb_proxy = Some(proxy);
        }
        for name in ["fs-a", "fs-b"] {
            cell.start_member(name, &options)?;
            if name == "fs-a" {
                let address = cell.member_address("fs-a")?;
                if !wait_until(READY_TIMEOUT, || pair::is_active(&cell.transport, &address)) {
                    bail!("fs-a did not become active:\n{}", cell.log("fs-a"));
                }
            }
        }
        cell.create_root_volume()?;
        Ok(cell)
    }

    /// Starts (or restarts, on its old address) the pair member `name`.
    pub fn start_member(&mut self, name: &str, options: &PairOptions) -> Result<()> {
        let partition = self.path("partition");
        let cell_file = if name == "fs-a" && self.vldb_proxy.is_some() {
            self.path("cell-via-proxy.toml")
        } else {
            self.cell_file.to_string_lossy().into_owned()
        };
        let listen = self
            .member_address(name)
            .unwrap_or_else(|_| "127.0.0.1:0".to_owned());
        let history = self.history_path(name).to_string_lossy().into_owned();
        let mut args: Vec<&str> = vec![
            "fileserver",
            "--cell",
            &cell_file,
            "--partition",
            &partition,
            "--listen",
            &listen,
            "--pair",
            PAIR,
            "--history",
            &history,
        ];
        args.extend(options.member_flags.iter().map(String::as_str));
        let address = self.spawn_ready(name, &args)?;
        self.members.retain(|(n, _)| n != name);
        self.members.push((name.to_owned(), address));
        Ok(())
    }

    /// The address of pair member `name`.
    pub fn member_address(&self, name: &str) -> Result<String> {
        self.members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, address)| address.clone())
            .with_context(|| format!("no pair member named {name}"))
    }

    /// The name of the member that answers it is active.
    pub fn active_member(&self) -> Option<String> {
        self.members
            .iter()
            .find(|(_, address)| pair::is_active(&self.transport, address))
            .map(|(name, _)| name.clone())
    }

    /// Waits until `name` is the active member.
    pub fn await_active(&self, name: &str, limit: Duration) -> Result<()> {
        let address = self.member_address(name)?;
        if wait_until(limit, || pair::is_active(&self.transport, &address)) {
            Ok(())
        } else {
            bail!(
                "{name} did not become active within {limit:?}:\n{}",
                self.log(name)
            )
        }
    }

    /// Where member `name` writes its history.
    pub fn history_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.history"))
    }

    /// Starts a VLDB only: a test starts the fileserver (`start_fileserver`) once it has
    /// prepared the partition, then creates `root.cell` (`create_root_volume`).
    pub fn start_vldb(bin: &str) -> Result<TestCell> {
        TestCell::start_vldb_as(bin, VldbKind::Single)
    }

    /// `start_vldb` with the VLDB of `kind`: a group of replicas is whole (every replica
    /// follows one leader) when this returns.
    pub fn start_vldb_as(bin: &str, kind: VldbKind) -> Result<TestCell> {
        require_fuse()?;
        let dir = tempfile::Builder::new().prefix("holdfast-e2e").tempdir()?;
        let credentials = dir.path().join(proto::cell::CREDENTIALS_DIR_DEFAULT);
        authority::init(&credentials, pair::CELL, "localhost")
            .context("make the test cell's credentials")?;
        identity::install_token_key(&credentials)?;
        let mut cell = TestCell {
            bin: PathBuf::from(bin),
            cell_file: dir.path().join("cell.toml"),
            transport: Transport::from_dir(&credentials, PeerClass::Host)?,
            dir,
            vl_address: String::new(),
            replicas: Vec::new(),
            fs_address: String::new(),
            members: Vec::new(),
            vldb_proxy: None,
            replica_proxies: None,
            procs: Vec::new(),
            mounts: Vec::new(),
            logged: Vec::new(),
            tripwire: Tripwire::default(),
        };
        if kind != VldbKind::Single {
            cell.start_replicas(kind)?;
            cell.await_whole_group(READY_TIMEOUT)?;
            return Ok(cell);
        }
        let vldb = cell.path("vldb");
        let credentials = cell.credentials_arg();
        cell.vl_address = cell.spawn_ready(
            "vlserver",
            &[
                "vlserver",
                "--data",
                &vldb,
                "--listen",
                "127.0.0.1:0",
                "--cell-name",
                "e2e.test",
                "--credentials",
                &credentials,
            ],
        )?;
        std::fs::write(
            &cell.cell_file,
            format!(
                "name = \"e2e.test\"\nvlservers = [\"{}\"]\n",
                cell.vl_address
            ),
        )?;
        Ok(cell)
    }

    /// The cell's credentials directory (beside the cell file), as a flag's argument:
    /// a VLDB started with `--cell-name` is given it with `--credentials`.
    pub fn credentials_arg(&self) -> String {
        self.path(proto::cell::CREDENTIALS_DIR_DEFAULT)
    }

    /// Creates the volume `root.cell`, once a fileserver registered.
    pub fn create_root_volume(&self) -> Result<()> {
        // Fileservers register in the background; vos create needs one registered.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let out = self.holdfast(&["vos", "create", "root.cell"])?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "vos create root.cell kept failing: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts (or restarts) the fileserver on the cell's partition.
    pub fn start_fileserver(&mut self) -> Result<()> {
        self.start_fileserver_with(&[])
    }

    /// `start_fileserver` with more flags (e.g. `--grace-secs 3`).
    pub fn start_fileserver_with(&mut self, extra: &[&str]) -> Result<()> {
        let partition = self.path("partition");
        let cell_file = self.cell_file.to_string_lossy().into_owned();
        let listen = if self.fs_address.is_empty() {
            "127.0.0.1:0".to_owned()
        } else {
            self.fs_address.clone()
        };
        let mut args = vec![
            "fileserver",
            "--cell",
            &cell_file,
            "--partition",
            &partition,
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        self.fs_address = self.spawn_ready("fileserver", &args)?;
        Ok(())
    }

    /// Mounts the cell with its own cache; `extra` adds mount flags. Calls to
    /// fileservers fail after 2 s (`--timeout`).
    pub fn mount(&mut self, name: &str, extra: &[&str]) -> Result<PathBuf> {
        self.mount_with_timeout(name, Duration::from_secs(2), extra)
    }

    /// `mount`, with calls to fileservers failing after `timeout` (`--timeout`) rather
    /// than the harness's usual 2 s.
    pub fn mount_with_timeout(
        &mut self,
        name: &str,
        timeout: Duration,
        extra: &[&str],
    ) -> Result<PathBuf> {
        let cell_file = self.cell_file.clone();
        self.mount_with_cell_file(name, &cell_file, timeout, extra)
    }

    /// `mount_with_timeout` as a host whose cell file is `cell_file` (with credentials of
    /// its own, say).
    pub fn mount_with_cell_file(
        &mut self,
        name: &str,
        cell_file: &Path,
        timeout: Duration,
        extra: &[&str],
    ) -> Result<PathBuf> {
        let mountpoint = self.dir.path().join(name);
        std::fs::create_dir_all(&mountpoint)?;
        let cache = self.path(&format!("{name}.cache"));
        let cell_file = cell_file.to_string_lossy().into_owned();
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
        identity::give_root_admin_token(&self.cell_file, Path::new(&cache))?;
        Ok(mountpoint)
    }

    /// Mounts the cell as `mount` does, but from a cache manager in a user namespace of
    /// its own (root in it, mapped to root) with a mount namespace of its own: the
    /// process holds CAP_SYS_ADMIN only in that namespace, which mounts FUSE but, as for
    /// any mount without the capability in the host's namespace, never registers a
    /// passthrough backing file. Returns the mountpoint as this process reaches it
    /// (`/proc/PID/root/...`, the mount being invisible here) and the mount's PID. The
    /// mount ends with its namespace when the process is stopped.
    pub fn mount_without_host_capability(
        &mut self,
        name: &str,
        extra: &[&str],
    ) -> Result<(PathBuf, libc::pid_t)> {
        let mountpoint = self.dir.path().join(name);
        std::fs::create_dir_all(&mountpoint)?;
        let cache = self.path(&format!("{name}.cache"));
        let cell_file = self.cell_file.to_string_lossy().into_owned();
        let target = mountpoint.to_string_lossy().into_owned();
        let bin = self.bin.to_string_lossy().into_owned();
        let mut args = vec![
            "--user",
            "--map-root-user",
            "--mount",
            "--propagation",
            "private",
            "--",
            &bin,
            "mount",
            "--cell",
            &cell_file,
            "--cache",
            &cache,
            "--timeout",
            "2",
        ];
        args.extend_from_slice(extra);
        args.push(&target);
        self.tripwire
            .expect_while_stopping(name, FUSE_REPLY_TO_AN_ENDED_REQUEST);
        self.spawn_program_ready(name, Path::new("unshare"), &args)?;
        identity::give_root_admin_token(&self.cell_file, Path::new(&cache))?;
        let pid = self.pid(name)?;
        Ok((PathBuf::from(format!("/proc/{pid}/root{target}")), pid))
    }

    /// Runs `holdfast ARGS` with this cell's cell file, to completion. Its ERROR lines
    /// count for the check on drop, like those of the processes the cell started.
    pub fn holdfast(&self, args: &[&str]) -> Result<Output> {
        let mut command = Command::new(&self.bin);
        command.args(args).env("HOLDFAST_CELL", &self.cell_file);
        // The harness acts as the cell's administrator, as `up` makes its user; a test
        // that acts as someone else sets HOLDFAST_TOKEN_DIR itself.
        if std::env::var_os("HOLDFAST_TOKEN_DIR").is_none() {
            let tokens = identity::admin_token_dir(&self.cell_file, pair::CELL)?;
            command.env("HOLDFAST_TOKEN_DIR", tokens);
        }
        let output = run_bounded(command, Duration::from_secs(60))?;
        self.tripwire.record_command(
            &format!("holdfast {}", args.join(" ")),
            &String::from_utf8_lossy(&output.stderr),
        );
        Ok(output)
    }

    /// What `holdfast fs checkservers` prints for the mount at `mnt` (it exits 0 whether
    /// or not servers are down).
    pub fn checkservers(&self, mnt: &Path) -> Result<String> {
        let out = self.holdfast(&["fs", "checkservers", &mnt.to_string_lossy()])?;
        if !out.status.success() {
            bail!(
                "holdfast fs checkservers failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Declares that the test provokes ERROR lines containing `pattern`, from any process:
    /// the check on drop lets them pass.
    pub fn expect_error(&self, pattern: &str) {
        self.tripwire.expect(None, pattern);
    }

    /// Declares that the process started under `process` (its log is `<process>.log`)
    /// may log ERROR lines containing `pattern`.
    pub fn expect_error_from(&self, process: &str, pattern: &str) {
        self.tripwire.expect(Some(process), pattern);
    }

    /// The ERROR lines logged so far that no declaration covers, in every process's log
    /// (restarts included) and in the output of `holdfast` commands run to completion.
    pub fn unexpected_errors(&self) -> Vec<ErrorLine> {
        let logs: Vec<(String, PathBuf)> = self
            .logged
            .iter()
            .map(|name| (name.clone(), self.log_path(name)))
            .collect();
        self.tripwire.unexpected(&logs)
    }

    /// The PID of a process started under `name`.
    pub fn pid(&self, name: &str) -> Result<libc::pid_t> {
        self.procs
            .iter()
            .rev()
            .find(|p| p.name == name && p.child.id() != 0)
            .map(|p| p.child.id() as libc::pid_t)
            .with_context(|| format!("no process named {name}"))
    }

    /// Sends `signal` to the process started under `name`.
    pub fn signal(&self, name: &str, signal: libc::c_int) -> Result<()> {
        let pid = self.pid(name)?;
        // SAFETY: signalling our own child by PID.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!("kill {pid}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops the process started under `name` (SIGTERM, then SIGKILL) and forgets it.
    pub fn stop(&mut self, name: &str) {
        if let Some(index) = self.procs.iter().rposition(|p| p.name == name) {
            let proc = self.procs.remove(index);
            self.stop_proc(proc);
        }
    }

    /// Waits up to `limit` for the process started under `name` to exit by itself, and
    /// forgets it then; `None` if it still runs.
    pub fn await_exit(&mut self, name: &str, limit: Duration) -> Option<std::process::ExitStatus> {
        let index = self.procs.iter().rposition(|p| p.name == name)?;
        let mut status = None;
        wait_until(limit, || {
            status = self.procs[index].child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_some() {
            self.procs.remove(index);
        }
        status
    }

    /// The path of `name` in the cell's directory.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A log file of a process started under `name`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Where the process started under `name` logs (every start of it, appended).
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Stops `proc`, noting for the tripwire what it logged meanwhile.
    fn stop_proc(&self, mut proc: Proc) {
        if let Some(span) = proc.stop() {
            self.tripwire.record_stop(&proc.name, span);
        }
    }

    /// Stops `procs` together — SIGTERM to each, then waits for each — noting for the
    /// tripwire what each logged meanwhile.
    fn stop_procs_together(&self, mut procs: Vec<Proc>) {
        let started: Vec<Option<u64>> = procs.iter_mut().map(Proc::begin_stop).collect();
        for (proc, from) in procs.iter_mut().zip(started) {
            if let Some(from) = from {
                let span = proc.finish_stop(from);
                self.tripwire.record_stop(&proc.name, span);
            }
        }
    }

    fn path(&self, name: &str) -> String {
        self.path_of(name).to_string_lossy().into_owned()
    }

    fn spawn_ready(&mut self, name: &str, args: &[&str]) -> Result<String> {
        let bin = self.bin.clone();
        self.spawn_program_ready(name, &bin, args)
    }

    /// `spawn_ready` of `program` (which must exec the binary in its own process, as
    /// `unshare` without `--fork` does, so that the PID stopped is the server's).
    fn spawn_program_ready(&mut self, name: &str, program: &Path, args: &[&str]) -> Result<String> {
        let ready = self.dir.path().join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let log_path = self.log_path(name);
        if !self.logged.iter().any(|n| n == name) {
            self.logged.push(name.to_owned());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let child = Command::new(program)
            .args(args)
            .arg("--ready-file")
            .arg(&ready)
            // openraft's own lines stay off, as in the binary's default: it logs a slow
            // peer's AppendEntries timeout at ERROR, which the tripwire would take for ours.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,openraft=off".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log: log_path,
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(contents) = std::fs::read_to_string(&ready) {
                return Ok(contents.trim().to_owned());
            }
            let proc = self.procs.last_mut().context("just pushed")?;
            if let Some(status) = proc.child.try_wait()? {
                bail!(
                    "{name} exited ({status}) before it was ready:\n{}",
                    self.log(name)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} not ready within {READY_TIMEOUT:?}:\n{}",
                    self.log(name)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestCell {
    fn drop(&mut self) {
        // Mounts first (they flush to the servers), newest first; the VLDB's replicas
        // last and together, so that none of them sees the others go one by one.
        let replicas: Vec<String> = self.replicas.iter().map(|r| replica_name(r.id)).collect();
        let (replicas, others): (Vec<Proc>, Vec<Proc>) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|p| replicas.contains(&p.name));
        for proc in others.into_iter().rev() {
            self.stop_proc(proc);
        }
        self.stop_procs_together(replicas);
        for mountpoint in &self.mounts {
            if is_mounted(mountpoint) {
                let _ = cachemgr::mount::detach(mountpoint);
            }
        }
        // Last, with nothing left running or mounted: a panic here leaks nothing.
        let unexpected = self.unexpected_errors();
        tripwire::fire(&unexpected, &mut self.dir);
    }
}

/// The length of a log file, 0 if it cannot be read.
fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Fails with a clear message when this machine cannot run FUSE mounts.
pub fn require_fuse() -> Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: end-to-end tests need FUSE (run .ci/setup as root)");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("end-to-end tests mount filesystems and must run as root");
    }
    Ok(())
}

/// Runs a command to completion, killing it if it outlives `limit`.
pub fn run_bounded(mut command: Command, limit: Duration) -> Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn command")?;
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output()?;
            bail!(
                "command did not finish within {limit:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs a shell command line in `dir`; returns stdout, or fails with stderr.
pub fn sh(dir: &Path, script: &str) -> Result<String> {
    let mut command = Command::new("sh");
    command.arg("-c").arg(script).current_dir(dir);
    let output = run_bounded(command, Duration::from_secs(120))?;
    if !output.status.success() {
        bail!(
            "`{script}` failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `flock(2)` on an open file.
pub fn flock(file: &std::fs::File, operation: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// True when `flock -n PATH true` gets the lock (the tool a user would run).
pub fn flock_n_succeeds(path: &Path) -> bool {
    Command::new("flock")
        .args(["-n", &path.to_string_lossy(), "true"])
        .status()
        .is_ok_and(|status| status.success())
}

/// True when `path` is a mount point.
pub fn is_mounted(path: &Path) -> bool {
    cachemgr::mountinfo::is_mount_point(path)
}

/// Waits until `condition` holds, checking every 10 ms, for at most `limit`.
pub fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    condition()
}
