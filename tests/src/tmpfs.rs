//! A small tmpfs of its own for one test, to put a server's disk in front of a full
//! disk.
//! Invariant: mounted by `mount`, unmounted (lazily) when dropped, also when a test
//! fails.

use std::ffi::CString;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// A tmpfs mounted at one directory. Dropping it unmounts it lazily (`MNT_DETACH`): a
/// process may still have files open on it.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` at `at`, creating the directory first.
    pub fn mount(at: &Path, bytes: u64) -> Result<Tmpfs> {
        std::fs::create_dir_all(at).with_context(|| format!("create {}", at.display()))?;
        let target = CString::new(at.as_os_str().as_bytes())?;
        let options = CString::new(format!("size={bytes}"))?;
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "mount a tmpfs at {}: {}",
                at.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Tmpfs(at.to_owned()))
    }

    /// Fills what is left of it with one file, which it returns.
    pub fn fill(&self) -> Result<PathBuf> {
        let path = self.0.join("filler");
        let mut filler =
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
        let chunk = [0u8; 4096];
        loop {
            match filler.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e).with_context(|| format!("fill {}", path.display())),
            }
        }
        Ok(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}
