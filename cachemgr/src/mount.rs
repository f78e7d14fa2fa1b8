//! Mounting: checks the mount point, starts the manager, the control socket and the FUSE
//! session, and at shutdown stores pending writes and unmounts.
//! Invariant: once mounted, `run` returns `Ok` only when the mount is gone or lazily
//! detached (files inside still open), so a clean return leaves no stale mount behind.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fuser::MountOption;
use proto::{Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, PeerKind, VldbClient};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::Config;
use crate::error::CacheError;
use crate::fuse_fs::HoldfastFs;
use crate::identity::{load_or_create_client_id, new_instance_nonce};
use crate::invalidate::Invalidator;
use crate::manager::{Manager, ManagerSettings};
use crate::mountinfo;
use crate::server_pool::ServerPool;

/// FUSE threads: they only read requests and hand them to the runtime as tasks.
const FUSE_THREADS: usize = 2;
/// The runtime's threads, which run the requests (their local disk I/O included) and
/// the connections.
const RUNTIME_THREADS: usize = 4;
/// Longest wait for pending writes at unmount.
const WRITE_BACK_DEADLINE: Duration = Duration::from_secs(30);
/// The kernel's readahead for files read through the mount, in KiB: a sequential reader
/// is sent whole chunks (`max_read` allows one per request) several ahead, as the
/// manager fetches them ahead too. The kernel starts every FUSE mount at 128 KiB, which
/// `max_readahead` can only lower: without this a chunk takes eight requests.
const READ_AHEAD_KIB: u64 = 4 * crate::chunk_index::CHUNK_BYTES / 1024;

/// Name of the control socket inside the cache directory.
pub const CONTROL_SOCKET: &str = "control.sock";

/// Checks that `path` can take a mount; returns it canonical.
///
/// A mount point must be an empty directory with nothing mounted on it, except that with
/// `over_guard` it must carry exactly the guard `holdfast up` keeps there: an empty,
/// read-only tmpfs. The mount is stacked on that guard, so that when this cache manager
/// dies and its dead mount is detached, what an application then opens or creates under
/// the mount point fails with EROFS instead of landing on local disk. Any other mount
/// stays refused as busy.
pub fn check_mount_point(path: &Path, over_guard: bool) -> Result<PathBuf, CacheError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CacheError::MountPointMissing {
                path: path.to_owned(),
            });
        }
        Err(source) => {
            return Err(CacheError::Mount {
                path: path.to_owned(),
                source,
            });
        }
    };
    if !meta.is_dir() {
        return Err(CacheError::MountPointNotDirectory {
            path: path.to_owned(),
        });
    }
    let canonical = std::fs::canonicalize(path).map_err(|source| CacheError::Mount {
        path: path.to_owned(),
        source,
    })?;
    // The last entry on a mount point is the one on top, the one a path there reaches.
    let top = mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .rfind(|m| m.mount_point == canonical);
    let unguarded = |what: String| CacheError::MountPointUnguarded {
        path: path.to_owned(),
        what,
    };
    match (top, over_guard) {
        (None, false) => {}
        (Some(_), false) => {
            return Err(CacheError::MountPointBusy {
                path: path.to_owned(),
            });
        }
        (None, true) => return Err(unguarded("nothing is mounted there".into())),
        (Some(top), true) if top.fs_type != "tmpfs" => {
            return Err(unguarded(format!("a {} is mounted there", top.fs_type)));
        }
        (Some(_), true) if !is_read_only(&canonical) => {
            return Err(unguarded("the tmpfs there is writable".into()));
        }
        (Some(_), true) => {}
    }
    let entries = std::fs::read_dir(&canonical).map_err(|source| CacheError::Mount {
        path: path.to_owned(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    if !names.is_empty() {
        names.sort();
        let count = names.len();
        let mut shown = names
            .into_iter()
            .take(NAMES_SHOWN)
            .collect::<Vec<_>>()
            .join(", ");
        if count > NAMES_SHOWN {
            shown.push_str(", ...");
        }
        return Err(CacheError::MountPointNotEmpty {
            path: path.to_owned(),
            count,
            names: shown,
        });
    }
    Ok(canonical)
}

/// How many entries of a mount point that is not empty its error names.
const NAMES_SHOWN: usize = 3;

/// True when the filesystem at `path` is mounted read-only.
fn is_read_only(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statvfs is plain data; all zeroes is a valid value for it.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `stat` a valid out-pointer; both outlive the call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_flag & libc::ST_RDONLY != 0
}

/// Makes glibc's allocator hand memory back once the tables that held it shrink: few
/// arenas (each thread's arena otherwise keeps its own freed pages, pinned by a few live
/// objects), a fixed mmap threshold (large tables always get their own mapping, which
/// `free` unmaps, rather than landing in an arena once a first one was freed), and a
/// modest trim threshold (the top of the heap goes back after each large free).
#[cfg(target_env = "gnu")]
fn tune_allocator() {
    const ARENAS_MAX: libc::c_int = 2;
    const MMAP_THRESHOLD_BYTES: libc::c_int = 128 << 10;
    const TRIM_THRESHOLD_BYTES: libc::c_int = 1 << 20;
    // SAFETY: mallopt only changes the allocator's parameters, under its own locks.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS_MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
    }
}

#[cfg(not(target_env = "gnu"))]
fn tune_allocator() {}

/// Mounts the cell, calls `on_ready` once the mount is live, serves until `shutdown`
/// turns true, then stores pending writes and unmounts.
pub fn run(
    config: Config,
    shutdown: watch::Receiver<bool>,
    on_ready: impl FnOnce(),
) -> Result<(), CacheError> {
    tune_allocator();
    let mount_point = check_mount_point(&config.mountpoint, config.over_guard)?;
    let cache_io = |source| CacheError::CacheDir {
        path: config.cache_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&config.cache_dir).map_err(cache_io)?;
    let cache_dir = std::fs::canonicalize(&config.cache_dir).map_err(cache_io)?;
    let client = load_or_create_client_id(&cache_dir)?;
    let instance = new_instance_nonce();
    info!(%client, instance = %instance, cell = %config.cell.name, "cache manager starting");
    let peer = PeerKind::CacheManager { client, instance };
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: config.cell.name.clone(),
        peer: peer.clone(),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_THREADS)
        .thread_name("holdfast-cm")
        .enable_all()
        .build()
        .map_err(CacheError::Runtime)?;
    let invalidator = Invalidator::start().map_err(CacheError::Runtime)?;
    let vldb = VldbClient::new(
        config.cell.clone(),
        config.transport.clone(),
        peer,
        config.rpc_timeout,
    );
    let pool = ServerPool::new(
        hello,
        config.transport.clone(),
        config.rpc_timeout,
        config.failover_timeout,
    );
    let settings = ManagerSettings {
        root_volume: config.root_volume.clone(),
        chunk_dir: cache_dir.join("chunks"),
        cache_bytes_max: config.cache_bytes_max,
        lease_renew_interval: config.lease_renew_interval,
        table_budget: crate::status::TableBudget::from_status_entries(config.status_entries_max),
    };
    let manager = runtime.block_on(Manager::start(settings, vldb, pool, invalidator.clone()))?;

    let socket_path = cache_dir.join(CONTROL_SOCKET);
    let control = bind_control(&runtime, &socket_path)?;
    let control_task = runtime.spawn(crate::control_server::serve(
        control,
        manager.clone(),
        shutdown.clone(),
    ));

    let mut options = fuser::Config::default();
    options.mount_options = vec![
        MountOption::FSName(format!("holdfast:{}", socket_path.display())),
        MountOption::Subtype("holdfast".into()),
        MountOption::NoAtime,
    ];
    options.acl = config.access.acl();
    options.n_threads = Some(FUSE_THREADS);
    let session = fuser::Session::new(
        HoldfastFs::new(
            manager.clone(),
            runtime.handle().clone(),
            config.passthrough,
        ),
        &mount_point,
        &options,
    )
    .map_err(|source| CacheError::Mount {
        path: config.mountpoint.clone(),
        source,
    })?;
    invalidator.set_notifier(session.notifier());
    let background = session.spawn().map_err(|source| CacheError::Mount {
        path: config.mountpoint.clone(),
        source,
    })?;
    info!(mount_point = %mount_point.display(), "mounted");
    raise_read_ahead(&mount_point);
    on_ready();

    let mut shutdown = shutdown;
    runtime.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if background.guard.is_finished() {
                        warn!(mount_point = %mount_point.display(), "the mount went away (unmounted from outside?)");
                        break;
                    }
                }
            }
        }
    });

    info!("shutting down: storing pending writes");
    runtime.block_on(async {
        if tokio::time::timeout(WRITE_BACK_DEADLINE, manager.write_back_all())
            .await
            .is_err()
        {
            warn!("pending writes not stored within {WRITE_BACK_DEADLINE:?}; they are lost");
        }
    });
    let result = unmount(&mount_point, background);
    control_task.abort();
    let _ = std::fs::remove_file(&socket_path);
    runtime.shutdown_timeout(Duration::from_secs(1));
    if result.is_ok() {
        info!(mount_point = %mount_point.display(), "unmounted");
    }
    result
}

/// Sets the mount's readahead to `READ_AHEAD_KIB` through its device's sysfs entry
/// (root only); without it reads still work, in smaller requests. The device is read from
/// the mount table, not by a `stat` through the mount, which the caller's rights on the
/// root directory could refuse.
fn raise_read_ahead(mount_point: &Path) {
    let device = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| mount_device(&text, mount_point));
    let Some(device) = device else {
        info!(mount_point = %mount_point.display(), "the mount is not in /proc/self/mountinfo; its reads go in 128 KiB requests");
        return;
    };
    let path = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, READ_AHEAD_KIB.to_string()) {
        info!(%path, error = %e, "cannot raise the mount's readahead; its reads go in 128 KiB requests");
    }
}

/// The `MAJOR:MINOR` of the last FUSE mount at `mount_point` in mountinfo `text`.
fn mount_device(text: &str, mount_point: &Path) -> Option<String> {
    text.lines()
        .filter(|line| {
            mountinfo::parse(line).first().is_some_and(|entry| {
                entry.mount_point == mount_point && entry.fs_type.starts_with("fuse")
            })
        })
        .filter_map(|line| line.split(' ').nth(2))
        .next_back()
        .map(str::to_owned)
}

fn bind_control(
    runtime: &tokio::runtime::Runtime,
    path: &Path,
) -> Result<tokio::net::UnixListener, CacheError> {
    let failed = |source| CacheError::ControlSocket {
        path: path.to_owned(),
        source,
    };
    // A socket left by a previous run that did not stop cleanly.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failed(e)),
    }
    let _guard = runtime.enter();
    let listener = tokio::net::UnixListener::bind(path).map_err(failed)?;
    // Every local user may hand in their own token (`holdfast login`); the server takes
    // the uid from the socket's peer credentials, never from the message.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(failed)?;
    Ok(listener)
}

fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Detaches the mount at `path` (`umount -l`): the kernel finishes once nothing inside
/// is in use. For supervisors cleaning up after a cache manager that died.
pub fn detach(path: &Path) -> std::io::Result<()> {
    umount2(path, libc::MNT_DETACH)
}

fn unmount(mount_point: &Path, background: fuser::BackgroundSession) -> Result<(), CacheError> {
    // fuser unmounts (unless someone already did) and joins the FUSE threads.
    let error = match background.umount_and_join() {
        Ok(()) => return Ok(()),
        Err(error) => error,
    };
    if error.raw_os_error() != Some(libc::EBUSY) {
        if !mountinfo::is_mount_point(mount_point) {
            return Ok(());
        }
        return Err(CacheError::Unmount {
            path: mount_point.to_owned(),
            source: error,
        });
    }
    // Files inside are still open: detach now; the kernel finishes when they close. The
    // FUSE threads were left running by fuser and end on their own then.
    warn!(mount_point = %mount_point.display(), "mount point busy (open files); detaching it");
    detach(mount_point).map_err(|source| CacheError::Unmount {
        path: mount_point.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_point_checks_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("x");
        let err = check_mount_point(&missing, false).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "mount point {} does not exist; create it first",
                missing.display()
            )
        );
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let err = check_mount_point(&file, false).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        assert!(check_mount_point(&empty, false).is_ok());
        let err = check_mount_point(&empty, true).unwrap_err().to_string();
        assert!(err.contains("has no guard under it"), "{err}");
        let err = check_mount_point(Path::new("/proc"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already mounted"), "{err}");
        let err = check_mount_point(Path::new("/proc"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a proc is mounted there"), "{err}");
    }

    #[test]
    fn a_mount_point_that_is_not_empty_is_named_with_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("appends.log"), b"x").unwrap();
        let err = check_mount_point(dir.path(), false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "mount point {} is not empty: it holds 1 entry (appends.log); move it out \
                 of the way and try again",
                dir.path().display()
            )
        );
        for name in ["d", "c", "b", "a"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let err = check_mount_point(dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("it holds 5 entries (a, appends.log, b, ...); move them out"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    #[test]
    fn the_mount_device_is_the_last_fuse_mount_at_the_mount_point() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/a\\040b ro shared:2 - tmpfs guard rw
41 40 0:52 / /mnt/a\\040b rw,nosuid shared:3 - fuse.holdfast holdfast:/c/old rw
42 41 0:53 / /mnt/a\\040b rw,nosuid shared:4 - fuse.holdfast holdfast:/c/new rw
43 22 0:54 / /mnt/other rw shared:5 - fuse.holdfast holdfast:/c/x rw
";
        assert_eq!(
            mount_device(text, Path::new("/mnt/a b")).as_deref(),
            Some("0:53")
        );
        assert_eq!(mount_device(text, Path::new("/mnt/none")), None);
        assert_eq!(mount_device(text, Path::new("/")), None, "not FUSE");
    }
}
