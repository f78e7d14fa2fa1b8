//! Spare files: empty files created ahead of need in the chunk directory by a thread of
//! their own, so that a write's chunk file is put down by a rename, not a create.
//! Invariant: a pooled spare is empty and named `spare.N`, a name no chunk file has, and
//! no spare is created once the pool is dropped.

use std::fs::OpenOptions;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};
use tracing::{debug, warn};

/// What every spare's name starts with; no chunk file's name does.
pub const SPARE_PREFIX: &str = "spare.";

/// Spare files kept ready, at most: more than a burst of small writes takes between two
/// wake-ups of the filler.
const SPARES_MAX: usize = 64;

struct Pool {
    files: Vec<PathBuf>,
    /// Names are `spare.N` with N counting up, so a name is never reused.
    next_name: u64,
    /// Spares taken so far; a failed creation is retried only after the next take.
    takes: u64,
    closed: bool,
}

struct Shared {
    dir: PathBuf,
    pool: Mutex<Pool>,
    /// Signalled on a take and on close.
    wanted: Condvar,
    /// Signalled when a spare joins the pool.
    added: Condvar,
}

/// A pool of empty files in the chunk directory, kept full by the filler thread, because
/// creating a file waits on the filesystem's journal while anything else on that disk
/// syncs. Measured with the fileserver syncing on the same disk: ~570 µs to create and
/// write a 4 KiB file, ~30 µs to rename an existing one and write it.
pub struct SpareFiles {
    shared: Arc<Shared>,
    filler: Option<JoinHandle<()>>,
}

impl SpareFiles {
    /// Starts filling a pool of spares in `dir`, which must exist.
    pub fn start(dir: PathBuf) -> io::Result<SpareFiles> {
        let shared = Arc::new(Shared {
            dir,
            pool: Mutex::new(Pool {
                files: Vec::with_capacity(SPARES_MAX),
                next_name: 0,
                takes: 0,
                closed: false,
            }),
            wanted: Condvar::new(),
            added: Condvar::new(),
        });
        let filler = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("holdfast-spares".into())
                .spawn(move || shared.fill())?
        };
        Ok(SpareFiles {
            shared,
            filler: Some(filler),
        })
    }

    /// An empty file in the directory, now the caller's to rename, if one is ready.
    pub fn take(&self) -> Option<PathBuf> {
        let mut pool = self.shared.pool.lock();
        pool.takes += 1;
        let file = pool.files.pop();
        drop(pool);
        self.shared.wanted.notify_one();
        file
    }

    /// Waits until `count` spares are ready.
    #[cfg(test)]
    fn wait_ready(&self, count: usize) {
        let mut pool = self.shared.pool.lock();
        while pool.files.len() < count {
            self.shared.added.wait(&mut pool);
        }
    }
}

impl Drop for SpareFiles {
    /// Stops the filler, so that no spare appears in a directory that may be reused.
    fn drop(&mut self) {
        self.shared.pool.lock().closed = true;
        self.shared.wanted.notify_one();
        if let Some(filler) = self.filler.take()
            && filler.join().is_err()
        {
            warn!("spare file creator panicked");
        }
    }
}

impl Shared {
    /// The filler's loop: keeps the pool full until it closes.
    fn fill(&self) {
        // After a failed creation (a full disk, a vanished directory) the filler waits
        // for the next take rather than retrying at once.
        let mut failed_at_takes = None;
        loop {
            let (path, takes) = {
                let mut pool = self.pool.lock();
                while !pool.closed
                    && (pool.files.len() >= SPARES_MAX || failed_at_takes == Some(pool.takes))
                {
                    self.wanted.wait(&mut pool);
                }
                if pool.closed {
                    return;
                }
                pool.next_name += 1;
                (
                    self.dir.join(format!("{SPARE_PREFIX}{}", pool.next_name)),
                    pool.takes,
                )
            };
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => {
                    failed_at_takes = None;
                    self.pool.lock().files.push(path);
                    self.added.notify_all();
                }
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "cannot create a spare chunk file");
                    // Counted from before the attempt: a take during it means try again.
                    failed_at_takes = Some(takes);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spares_in(dir: &std::path::Path) -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("spare.")
            })
            .collect()
    }

    #[test]
    fn the_pool_fills_refills_after_a_take_and_stops_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spares = SpareFiles::start(dir.path().to_owned()).unwrap();
        spares.wait_ready(SPARES_MAX);
        assert_eq!(
            spares_in(dir.path()).len(),
            SPARES_MAX,
            "never more than the pool"
        );
        let taken = spares.take().unwrap();
        assert_eq!(
            std::fs::metadata(&taken).unwrap().len(),
            0,
            "a spare is empty"
        );
        std::fs::rename(&taken, dir.path().join("chunk")).unwrap();
        spares.wait_ready(SPARES_MAX);
        assert_eq!(spares_in(dir.path()).len(), SPARES_MAX);
        drop(spares);
        assert_eq!(
            spares_in(dir.path()).len(),
            SPARES_MAX,
            "nothing created once dropped"
        );
    }

    #[test]
    fn a_failed_creation_waits_for_the_next_take() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let spares = SpareFiles::start(gone.clone()).unwrap();
        // Every creation fails; each take allows one more attempt and finds nothing.
        for _ in 0..3 {
            assert_eq!(spares.take(), None);
        }
        std::fs::create_dir(&gone).unwrap();
        assert_eq!(spares.take(), None);
        spares.wait_ready(SPARES_MAX);
        assert!(spares.take().is_some());
    }
}
