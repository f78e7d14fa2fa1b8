//! The guard under `up`'s mount: an empty read-only tmpfs on DIR/mnt with the FUSE mount
//! stacked on top, so that a path there never reaches the bare directory on local disk.
//! Invariant: while a `Guard` lives, DIR/mnt shows the live mount, a dead one (ENOTCONN) or
//! the guard (EROFS), never the directory; dropped, it removes our mounts there, guard last.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cachemgr::mountinfo::{self, MountEntry};

/// The source name the guard is mounted under, by which an earlier run's guard is known.
const GUARD_SOURCE: &str = "holdfast-guard";
/// Most mounts taken off one mount point before giving up (a guard and a dead mount or
/// two from crashed runs is the most expected).
const LAYERS_MAX: usize = 8;

/// The guard on one mount point.
///
/// Why a guard rather than a check: a process that had a file open in a mount whose cache
/// manager died, and opens it again (`open(O_CREAT|O_APPEND)` after an error), must not
/// succeed on the directory underneath, and nothing `up` could check before that open
/// would close the window. With the guard, the dead mount is detached and the next open
/// finds the guard: it fails with EROFS until the new cache manager mounts over it.
pub struct Guard {
    mountpoint: PathBuf,
}

impl Guard {
    /// Puts the guard on `mountpoint` (canonical; created if missing, and which must be
    /// empty), first taking off what a crashed earlier run left there: a dead mount is
    /// detached, a guard is kept.
    pub fn establish(mountpoint: &Path) -> Result<Guard> {
        // Not `create_dir_all`: a dead mount there answers ENOTCONN to its stat.
        match std::fs::create_dir(mountpoint) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("create {}", mountpoint.display())),
        }
        let guard = Guard {
            mountpoint: mountpoint.to_owned(),
        };
        if top_mount(mountpoint).is_some_and(|top| top.is_holdfast()) {
            println!(
                "{} is still mounted from an earlier run; detaching it.",
                mountpoint.display()
            );
        }
        guard.expose()?;
        Ok(guard)
    }

    /// Makes the guard the top of the mount point again: detaches a (dead) holdfast mount
    /// stacked on it, and mounts the guard again if someone took it off. For the moment
    /// the mount's cache manager died, and before a new one mounts.
    pub fn expose(&self) -> Result<()> {
        for _ in 0..LAYERS_MAX {
            match top_mount(&self.mountpoint) {
                Some(top) if top.is_holdfast() => {
                    cachemgr::mount::detach(&self.mountpoint).with_context(|| {
                        format!("detach the dead mount on {}", self.mountpoint.display())
                    })?;
                }
                Some(top) if is_guard(&top) => return Ok(()),
                Some(top) => bail!(
                    "{} has a {} mounted on it that `holdfast up` did not make; unmount it \
                     (umount {}) or give `up` another --dir",
                    self.mountpoint.display(),
                    top.fs_type,
                    self.mountpoint.display()
                ),
                None => {
                    cachemgr::mount::check_mount_point(&self.mountpoint, false)?;
                    return mount_guard(&self.mountpoint);
                }
            }
        }
        bail!(
            "{} still has mounts stacked on it after {LAYERS_MAX} were taken off; unmount \
             them (umount -l {}) and try again",
            self.mountpoint.display(),
            self.mountpoint.display()
        )
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for _ in 0..LAYERS_MAX {
            match top_mount(&self.mountpoint) {
                Some(top) if top.is_holdfast() || is_guard(&top) => {
                    if let Err(error) = cachemgr::mount::detach(&self.mountpoint) {
                        tracing::warn!(mountpoint = %self.mountpoint.display(), %error, "cannot unmount");
                        return;
                    }
                }
                _ => return,
            }
        }
    }
}

fn is_guard(mount: &MountEntry) -> bool {
    mount.fs_type == "tmpfs" && mount.source == GUARD_SOURCE
}

/// The mount a path at `mountpoint` (canonical) reaches: the last one listed there.
fn top_mount(mountpoint: &Path) -> Option<MountEntry> {
    mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .rfind(|m| m.mount_point == mountpoint)
}

fn mount_guard(mountpoint: &Path) -> Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_bytes())?;
    let source = CString::new(GUARD_SOURCE)?;
    // Mode 0755 so that every user's create fails with EROFS, not some with EACCES.
    let options = c"size=4k,mode=0755";
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        bail!(
            "mount the read-only guard on {}: {} (`holdfast up` mounts, so it runs as root)",
            mountpoint.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
