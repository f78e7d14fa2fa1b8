//! `holdfast up`: a whole local cell in one command (three VLDB replicas, a fileserver
//! pair, `root.cell` and a mount at DIR/mnt), supervised until SIGINT or SIGTERM.
//! Invariant: a child that dies is started again after a backoff and nothing else stops
//! for it; however `up` ends, everything it started is unmounted and stopped.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use crate::cell::{LocalCell, MEMBERS, RESTART_WAIT_MAX, Servers};
use crate::guard::Guard;
use crate::process::{Backoff, log_tail};

/// The mount's process name.
const MOUNT: &str = "mount";
/// How often the children are looked at (and a signal noticed).
const POLL_EVERY: Duration = Duration::from_millis(50);
/// The first wait before a dead child is started again; it doubles while the child keeps
/// dying soon after its start, up to `RESTART_DELAY_MAX`.
const RESTART_DELAY_FIRST: Duration = Duration::from_millis(100);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(10);
/// A child that ran this long before it died starts again after `RESTART_DELAY_FIRST`.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long a child started again may take to be ready before it counts as failed.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How often the administrator's token (25 hours) is renewed on the mount and in the
/// user's token file.
const TOKEN_RENEW_EVERY: Duration = Duration::from_secs(3600);

pub fn run(dir: &Path, cell_name: &str, ready_file: Option<&Path>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let mut shutdown = runtime.block_on(async { crate::process::shutdown_on_signals() })?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("resolve {}", dir.display()))?;
    let _lock = lock_dir(&dir)?;
    let mountpoint = dir.join("mnt");
    // Declared before the cell, so dropped after it: the guard goes once the mount has.
    let guard = Guard::establish(&mountpoint)?;
    let mut cell = LocalCell::start(&dir, cell_name, Servers::Pair, &runtime)?;
    let cache = cell.layout.dir.join("cache");
    cell.mount(MOUNT, &mountpoint, &cache, &["--over-guard"])?;
    cell.renew_admin_tokens()?;
    let mut tokens_renewed = Instant::now();
    print_banner(&cell, &mountpoint);
    crate::process::write_ready_file(ready_file, &mountpoint.to_string_lossy())?;

    let mut supervisor = Supervisor::new(&cell);
    loop {
        let stop = runtime.block_on(async {
            tokio::time::timeout(POLL_EVERY, shutdown.wait_for(|stop| *stop))
                .await
                .is_ok()
        });
        if stop {
            println!("Stopping the cell...");
            drop(cell);
            drop(guard);
            println!("Stopped; the data stays in {}.", dir.display());
            return Ok(());
        }
        supervisor.poll(&mut cell, &guard, &runtime);
        if tokens_renewed.elapsed() >= TOKEN_RENEW_EVERY {
            match cell.renew_admin_tokens() {
                Ok(()) => tokens_renewed = Instant::now(),
                Err(e) => say(&format!("cannot renew the administrator's token: {e:#}")),
            }
        }
    }
}

/// One `up` per directory: a second would take the first one's ports and mount point.
/// The lock is held while the returned file is open.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("up.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: a valid fd, owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        bail!(
            "another `holdfast up` is running on {} (pid {}); stop it first",
            dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// Where a child is in its life, as the supervisor sees it.
enum Phase {
    Running,
    /// Dead since `since`; to be started again at `restart_at`.
    Down {
        since: Instant,
        restart_at: Instant,
    },
    /// Started again at `since`, not ready yet.
    Starting {
        since: Instant,
    },
}

struct Watched {
    name: String,
    backoff: Backoff,
    phase: Phase,
}

/// Starts again every child of the cell that dies, each after its own backoff. A pair
/// member waits for its partner to take over first (or `RESTART_WAIT_MAX`), so that it
/// rejoins as the passive; the mount's dead FUSE mount is detached at once, which leaves
/// the guard in its place until the new cache manager mounts over it.
struct Supervisor {
    watched: Vec<Watched>,
}

impl Supervisor {
    fn new(cell: &LocalCell) -> Supervisor {
        let watched = cell
            .child_names()
            .into_iter()
            .map(|name| Watched {
                name,
                backoff: Backoff::new(RESTART_DELAY_FIRST, RESTART_DELAY_MAX, STABLE_AFTER),
                phase: Phase::Running,
            })
            .collect();
        Supervisor { watched }
    }

    fn poll(&mut self, cell: &mut LocalCell, guard: &Guard, runtime: &tokio::runtime::Runtime) {
        for watched in &mut self.watched {
            let now = Instant::now();
            let next = match watched.phase {
                Phase::Running => watch_running(watched, cell, guard),
                Phase::Down { since, restart_at } => {
                    let is_member = MEMBERS.contains(&watched.name.as_str());
                    let may_start = now >= restart_at
                        && (!is_member
                            || since.elapsed() >= RESTART_WAIT_MAX
                            || cell.partner_active(&watched.name, runtime));
                    if may_start {
                        start_again(watched, cell, guard)
                    } else {
                        None
                    }
                }
                Phase::Starting { since } => watch_starting(watched, since, cell),
            };
            if let Some(phase) = next {
                watched.phase = phase;
            }
        }
    }
}

/// A running child that died goes down, with a line saying how and when it comes back.
fn watch_running(watched: &mut Watched, cell: &mut LocalCell, guard: &Guard) -> Option<Phase> {
    let child = cell.child_mut(&watched.name)?;
    let status = child.exited()?;
    let (pid, ran_for) = (child.pid(), child.ran_for());
    let delay = watched.backoff.after_exit(ran_for);
    let mut line = format!(
        "The {} (pid {pid}) died ({status}) after {}; starting it again in {}",
        watched.name,
        seconds(ran_for),
        seconds(delay)
    );
    if MEMBERS.contains(&watched.name.as_str()) {
        line.push_str(&format!(
            " (once its partner has taken over, or after {})",
            seconds(RESTART_WAIT_MAX)
        ));
    }
    if watched.name == MOUNT {
        match guard.expose() {
            Ok(()) => line.push_str(" (meanwhile the mount point fails with EROFS)"),
            Err(error) => line.push_str(&format!(" (its mount: {error:#})")),
        }
    }
    say(&format!("{line}."));
    let now = Instant::now();
    Some(Phase::Down {
        since: now,
        restart_at: now + delay,
    })
}

/// Starts a dead child again with the arguments it had; a failure to even spawn it
/// counts as a start that failed at once.
fn start_again(watched: &mut Watched, cell: &mut LocalCell, guard: &Guard) -> Option<Phase> {
    let ready = cell.layout.ready_file(&watched.name);
    let _ = std::fs::remove_file(&ready);
    let started = (|| {
        if watched.name == MOUNT {
            guard.expose()?;
        }
        cell.child_mut(&watched.name)
            .context("no such child")?
            .respawn()
    })();
    match started {
        Ok(()) => Some(Phase::Starting {
            since: Instant::now(),
        }),
        Err(error) => Some(failed_start(watched, &format!("{error:#}"))),
    }
}

/// A child started again is running once its ready file appears; dying or taking too
/// long sends it down again, after a longer backoff.
fn watch_starting(watched: &mut Watched, since: Instant, cell: &mut LocalCell) -> Option<Phase> {
    let ready = cell.layout.ready_file(&watched.name).exists();
    let log = cell.layout.log(&watched.name);
    let child = cell.child_mut(&watched.name)?;
    if ready {
        say(&format!(
            "The {} is running again (pid {}).",
            watched.name,
            child.pid()
        ));
        if let Err(e) = cell.child_ready(&watched.name) {
            say(&format!("The {} has no token: {e:#}.", watched.name));
        }
        return Some(Phase::Running);
    }
    if let Some(status) = child.exited() {
        let why = format!("exited ({status}): {}", log_tail(&log, 1));
        return Some(failed_start(watched, &why));
    }
    if since.elapsed() > READY_LIMIT {
        child.stop(Duration::from_secs(5));
        let why = format!(
            "was not ready within {}; see {}",
            seconds(READY_LIMIT),
            log.display()
        );
        return Some(failed_start(watched, &why));
    }
    None
}

fn failed_start(watched: &mut Watched, why: &str) -> Phase {
    let delay = watched.backoff.after_exit(Duration::ZERO);
    say(&format!(
        "The {} did not start again ({why}); next try in {}.",
        watched.name,
        seconds(delay)
    ));
    let now = Instant::now();
    Phase::Down {
        since: now,
        restart_at: now + delay,
    }
}

/// Prints one line of what the supervisor did, stamped with the UTC time of day as the
/// children's logs are, so that the two can be read side by side.
fn say(line: &str) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (hours, minutes, secs) = (
        since_epoch / 3600 % 24,
        since_epoch / 60 % 60,
        since_epoch % 60,
    );
    println!("{hours:02}:{minutes:02}:{secs:02}Z {line}");
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// Who the invoking user acts as, and where the admin's password is.
fn admin_line(cell: &LocalCell) -> String {
    let password = cell.layout.dir.join(crate::cell_admin::ADMIN_PASSWORD_FILE);
    let made = if cell.admin_password_made.is_some() {
        ", made now"
    } else {
        ""
    };
    format!(
        "user {}, password in {}{made}",
        crate::cell_admin::ADMIN_USER,
        password.display()
    )
}

fn print_banner(cell: &LocalCell, mountpoint: &Path) {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("holdfast"));
    let second = cell.layout.dir.join("ws2");
    println!(
        "Holdfast cell '{name}' is up.\n\
         \x20 mount:       {mnt} (pid {mount_pid})\n\
         \x20 cell file:   {cellfile}\n\
         \x20 VLDB:        {vl}\n\
         \x20 fileservers: pair '{pair}', {members} (partition {partition})\n\
         \x20 logs:        {logs}\n\
         \n\
         A second workstation on this machine (its own cache, same cell):\n\
         \x20 mkdir -p {second}/mnt && {exe} mount --cell {cellfile} --cache {second}/cache {second}/mnt\n\
         You act as the cell's administrator ({admin}) here and on the mount; another user:\n\
         \x20 HOLDFAST_CELL={cellfile} {exe} pts createuser alice --password-file FILE\n\
         \x20 HOLDFAST_CELL={cellfile} {exe} fs setacl {mnt}/DIR alice write\n\
         \x20 (as alice) HOLDFAST_CELL={cellfile} {exe} login alice --password-file FILE\n\
         Administer volumes:  HOLDFAST_CELL={cellfile} {exe} vos listvldb\n\
         The pair:            HOLDFAST_CELL={cellfile} {exe} pair status {pair}\n\
         The VLDB group:      HOLDFAST_CELL={cellfile} {exe} vldb status\n\
         Every process here is started again if it dies (after 0.1 s, longer if it keeps dying).\n\
         Try a failover: kill -9 the active member's pid; the mount stalls\n\
         for a moment and carries on, and the killed member rejoins as passive.\n\
         Kill -9 any one VLDB replica (the leader too): nothing stops.\n\
         Kill -9 the mount: until it is back, files under {mnt} fail (EROFS), never\n\
         landing on local disk.\n\
         \n\
         Press Ctrl-C to unmount and stop the cell.",
        name = cell.cell.name,
        admin = admin_line(cell),
        mnt = mountpoint.display(),
        mount_pid = cell.pid(MOUNT).unwrap_or_default(),
        cellfile = cell.layout.cell_file.display(),
        vl = cell
            .replicas
            .iter()
            .map(|(id, address)| {
                let pid = cell
                    .pid(&crate::cell::replica_name(*id))
                    .unwrap_or_default();
                format!("replica {id} {address} pid {pid}")
            })
            .collect::<Vec<_>>()
            .join(", "),
        pair = crate::cell::PAIR,
        members = cell
            .members
            .iter()
            .map(|(name, address)| {
                let pid = cell.pid(name).unwrap_or_default();
                format!("{name} {address} pid {pid}")
            })
            .collect::<Vec<_>>()
            .join(", "),
        partition = cell.layout.partition.display(),
        logs = cell.layout.logs.display(),
        second = second.display(),
        exe = exe.display(),
    );
}
