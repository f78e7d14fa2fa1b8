//! The kernel's references to inodes: every entry reply counted as a lookup, `forget`
//! honoured, and what the status table evicts given back (callbacks to their servers,
//! freed memory to the system).
//! Invariant: a lookup is counted under the same lock as the number it hands out, before
//! the reply leaves, so a `forget` never finds fewer lookups than the kernel was given.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proto::{Fid, Request, VolumeId};
use tracing::{debug, info};

use super::{Attr, AttrOut, FsError, FsResult, KERNEL_TTL_MAX, Manager};
use crate::inode::{Forgotten, Ino};

/// Evicted callbacks collected before they are given up in one request per volume.
const GIVE_UP_BATCH: usize = 64;
/// Entries dropped before freed memory is handed back to the system.
const DROPS_PER_MEMORY_RETURN: usize = 4096;
/// How long after a burst of drops the memory is handed back, so a burst costs one pass.
const MEMORY_RETURN_DELAY: Duration = Duration::from_secs(1);

/// Hands freed heap back to the system after many entries were dropped: the allocator
/// keeps freed pages otherwise, and the mount would never shrink.
#[derive(Debug, Default)]
pub(super) struct MemoryReturn {
    dropped: AtomicUsize,
    scheduled: AtomicBool,
}

impl Manager {
    /// The attributes of `fid` for an entry reply (lookup, create, mkdir, symlink,
    /// link): the kernel's lookup count of its number goes up by one.
    pub(super) fn entry_attr(&self, fid: Fid) -> FsResult<AttrOut> {
        let mut state = self.state.lock();
        if state.statuses.get(fid).is_none() {
            return Err(FsError::EIO);
        }
        let (ino, first) = state.inodes.lookup(fid);
        if first {
            state.statuses.pin(fid);
        }
        let entry = state
            .statuses
            .get(fid)
            .unwrap_or_else(|| unreachable!("checked above, under the same lock"));
        Ok(AttrOut {
            attr: Attr::new(ino, &entry.status, entry.size()),
            ttl: entry.kernel_ttl(Instant::now(), KERNEL_TTL_MAX),
        })
    }

    /// The kernel dropped `count` lookups of `ino`: at zero the number goes, and its
    /// status becomes an ordinary cache entry, evicted once the budget needs the room.
    pub(super) fn forget_lookups(&self, ino: Ino, count: u64) {
        let evicted = {
            let mut state = self.state.lock();
            let Forgotten::Dropped(fid) = state.inodes.forget(ino, count) else {
                return;
            };
            state.statuses.unpin(fid);
            state.statuses.take_evicted_batch(GIVE_UP_BATCH)
        };
        self.give_up_evicted(evicted);
        self.note_dropped(1);
    }

    /// Gives up, detached and as a courtesy, the callbacks of evicted statuses.
    pub(super) fn give_up_evicted(&self, fids: Vec<Fid>) {
        if fids.is_empty() {
            return;
        }
        self.note_dropped(fids.len());
        let mut by_volume: HashMap<VolumeId, Vec<Fid>> = HashMap::new();
        for fid in fids {
            by_volume.entry(fid.volume).or_default().push(fid);
        }
        for (volume, fids) in by_volume {
            let Some(location) = self.volumes.cached(volume) else {
                continue;
            };
            let pool = self.pool.clone();
            self.runtime.spawn(async move {
                if let Err(e) = pool
                    .call(&location, Request::GiveUpCallbacks { fids })
                    .await
                {
                    debug!(error = %e, "giving up evicted callbacks failed");
                }
            });
        }
    }

    /// Counts dropped entries; after enough, hands freed memory back once the burst of
    /// drops has ended (no drop for `MEMORY_RETURN_DELAY`), and says what the tables hold.
    fn note_dropped(&self, count: usize) {
        let memory = &self.memory_return;
        if memory.dropped.fetch_add(count, Ordering::Relaxed) + count < DROPS_PER_MEMORY_RETURN
            || memory.scheduled.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Some(this) = self.this.upgrade() else {
            return;
        };
        self.runtime.spawn(async move {
            let memory = &this.memory_return;
            loop {
                let seen = memory.dropped.load(Ordering::Relaxed);
                tokio::time::sleep(MEMORY_RETURN_DELAY).await;
                if memory.dropped.load(Ordering::Relaxed) == seen {
                    break;
                }
            }
            let dropped = memory.dropped.swap(0, Ordering::Relaxed);
            memory.scheduled.store(false, Ordering::Release);
            let _ = tokio::task::spawn_blocking(return_freed_memory).await;
            let (held, statuses, listed) = {
                let state = this.state.lock();
                let statuses = &state.statuses;
                (
                    state.inodes.held(),
                    statuses.len(),
                    statuses.listing_entries(),
                )
            };
            info!(
                dropped,
                inodes_held = held,
                statuses,
                statuses_max = statuses_max(&this),
                listed,
                "status cache shrank after the kernel forgot inodes"
            );
        });
    }
}

/// The most statuses the table keeps: its budget beyond those the kernel holds.
fn statuses_max(manager: &Manager) -> usize {
    let state = manager.state.lock();
    state.statuses.budget().status_entries_max + state.statuses.pinned()
}

#[cfg(target_env = "gnu")]
fn return_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn return_freed_memory() {}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId};

    use super::*;
    use crate::fake_cell::{FakeCell, VOLUME};
    use crate::manager::test_support::{WAIT_MAX, start_manager};
    use crate::status::{StatusTable, TableBudget};

    fn dir(vnode: u64) -> Fid {
        Fid {
            volume: VOLUME,
            vnode: VnodeId(vnode),
            unique: Uniquifier(1),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forgotten_inodes_leave_the_tables_within_the_budget() {
        let (cell, _stop) = FakeCell::start(Vec::new(), 0, 0).await;
        let cache = tempfile::tempdir().unwrap();
        let manager = start_manager(&cell, cache.path()).await;
        let budget = TableBudget::from_status_entries(GIVE_UP_BATCH);
        manager.state.lock().statuses = StatusTable::with_budget(budget);
        let fids: Vec<Fid> = (100..400).map(dir).collect();
        let mut inos = Vec::new();
        for fid in &fids {
            // What a lookup does: the status under a callback, then the entry reply.
            manager.fetch_status(*fid).await.unwrap();
            inos.push(manager.entry_attr(*fid).unwrap().attr.ino);
        }
        // Looked up twice: the kernel holds two lookups of the first.
        assert_eq!(manager.entry_attr(fids[0]).unwrap().attr.ino, inos[0]);
        {
            let state = manager.state.lock();
            assert_eq!(
                state.statuses.pinned(),
                fids.len(),
                "the kernel holds them all"
            );
            assert!(state.statuses.len() >= fids.len());
        }
        for ino in &inos {
            manager.forget(*ino, 1);
        }
        manager.forget(Ino::ROOT, 1);
        {
            let state = manager.state.lock();
            assert_eq!(
                state.inodes.fid(inos[0]),
                Some(fids[0]),
                "one lookup still held"
            );
            assert_eq!(state.inodes.fid(inos[1]), None);
            assert_eq!(state.inodes.held(), 2, "the root and the first");
            assert_eq!(state.statuses.pinned(), 1);
            assert!(
                state.statuses.len() <= budget.status_entries_max + 1,
                "unpinned statuses within the budget: {}",
                state.statuses.len()
            );
            assert!(state.statuses.get(fids[0]).is_some());
        }
        // The evicted entries' callbacks were given up.
        cell.wait_for(WAIT_MAX, |record| {
            record
                .requests
                .iter()
                .any(|(_, kind)| *kind == "GiveUpCallbacks")
        })
        .await;
        // The root survives any forget, and a forgotten file seen again gets a new number.
        assert!(manager.getattr(Ino::ROOT).await.is_ok());
        manager.fetch_status(fids[1]).await.unwrap();
        let again = manager.entry_attr(fids[1]).unwrap().attr.ino;
        assert!(again.0 > inos.last().unwrap().0, "numbers are never reused");
    }
}
