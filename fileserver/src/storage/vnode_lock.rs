//! Per-vnode data locks of one volume: readers share a vnode, stores into a data file
//! share it when their ranges are disjoint, and any other data change has it alone.
//! Invariant: any two holders of a vnode are compatible, and a request also waits behind
//! every earlier conflicting one still waiting, so no kind of access starves another.

use std::collections::{HashMap, VecDeque};

use parking_lot::{Condvar, Mutex};
use proto::VnodeId;

/// What a holder does with a vnode's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Access {
    /// Reads the record and the data together, or syncs the data file.
    Read,
    /// Writes `start..end` of a data file after committing its DV bump.
    StoreRange { start: u64, end: u64 },
    /// Any other data change: inline data, a truncation, a size change, a move between
    /// inline and a data file.
    Exclusive,
}

impl Access {
    /// Whether two holders may share a vnode. Stores exclude fetches because a store
    /// commits its DV bump before writing its bytes, so a fetch in between would pair the
    /// new DV with old data; overlapping stores exclude each other because the later DV
    /// must carry the later bytes.
    fn compatible(self, other: Access) -> bool {
        match (self, other) {
            (Access::Read, Access::Read) => true,
            (
                Access::StoreRange { start, end },
                Access::StoreRange {
                    start: other_start,
                    end: other_end,
                },
            ) => end <= other_start || other_end <= start,
            _ => false,
        }
    }
}

/// The locks of one volume's vnodes.
pub(super) struct VnodeLocks {
    table: Mutex<Table>,
    changed: Condvar,
}

struct Table {
    /// vnode -> its requests in arrival order, each (ticket, access); granted ones are
    /// among them until released. A vnode is here only while someone holds or waits for
    /// it, so the table is bounded by the storage threads, which tokio's blocking pool
    /// bounds.
    queues: HashMap<u64, VecDeque<(u64, Access)>>,
    next_ticket: u64,
}

impl VnodeLocks {
    pub(super) fn new() -> VnodeLocks {
        VnodeLocks {
            table: Mutex::new(Table {
                queues: HashMap::new(),
                next_ticket: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Waits until `access` to `vnode` is granted; held until the guard drops.
    pub(super) fn lock(&self, vnode: VnodeId, access: Access) -> VnodeGuard<'_> {
        let mut table = self.table.lock();
        let ticket = table.next_ticket;
        table.next_ticket += 1;
        table
            .queues
            .entry(vnode.0)
            .or_default()
            .push_back((ticket, access));
        loop {
            let granted = table.queues.get(&vnode.0).is_some_and(|queue| {
                queue
                    .iter()
                    .take_while(|(earlier, _)| *earlier != ticket)
                    .all(|(_, earlier)| access.compatible(*earlier))
            });
            if granted {
                return VnodeGuard {
                    locks: self,
                    vnode,
                    ticket,
                };
            }
            self.changed.wait(&mut table);
        }
    }
}

/// A granted access; dropping it lets the requests behind it go.
pub(super) struct VnodeGuard<'a> {
    locks: &'a VnodeLocks,
    vnode: VnodeId,
    ticket: u64,
}

impl Drop for VnodeGuard<'_> {
    fn drop(&mut self) {
        let mut table = self.locks.table.lock();
        if let Some(queue) = table.queues.get_mut(&self.vnode.0) {
            queue.retain(|(ticket, _)| *ticket != self.ticket);
            if queue.is_empty() {
                table.queues.remove(&self.vnode.0);
            }
        }
        drop(table);
        self.locks.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{RecvTimeoutError, channel};
    use std::time::Duration;

    use super::*;

    fn range(start: u64, end: u64) -> Access {
        Access::StoreRange { start, end }
    }

    #[test]
    fn compatibility() {
        assert!(Access::Read.compatible(Access::Read));
        assert!(range(0, 10).compatible(range(10, 20)));
        assert!(range(10, 20).compatible(range(0, 10)));
        assert!(!range(0, 11).compatible(range(10, 20)));
        assert!(!range(0, 10).compatible(Access::Read));
        assert!(!Access::Read.compatible(Access::Exclusive));
        assert!(!Access::Exclusive.compatible(Access::Exclusive));
        assert!(!range(0, 10).compatible(Access::Exclusive));
    }

    #[test]
    fn disjoint_stores_and_reads_share_other_vnodes_and_the_table_empties() {
        let locks = VnodeLocks::new();
        let a = locks.lock(VnodeId(5), range(0, 10));
        let b = locks.lock(VnodeId(5), range(10, 20));
        let c = locks.lock(VnodeId(6), Access::Exclusive);
        let d = locks.lock(VnodeId(7), Access::Read);
        let e = locks.lock(VnodeId(7), Access::Read);
        drop((a, b, c, d, e));
        assert!(locks.table.lock().queues.is_empty());
    }

    /// A read waiting behind a store holds back a later disjoint store, so a stream of
    /// stores cannot starve it; it runs once the first store is done.
    #[test]
    fn a_waiting_read_goes_before_later_stores() {
        let locks = VnodeLocks::new();
        let first = locks.lock(VnodeId(1), range(0, 10));
        let (sender, receiver) = channel();
        std::thread::scope(|scope| {
            let reader = {
                let (locks, sender) = (&locks, sender.clone());
                scope.spawn(move || {
                    let _read = locks.lock(VnodeId(1), Access::Read);
                    sender.send("read").unwrap();
                })
            };
            // Wait until the read is queued, then queue a disjoint store behind it.
            while locks.table.lock().queues[&1].len() < 2 {
                std::thread::yield_now();
            }
            let store = {
                let (locks, sender) = (&locks, sender.clone());
                scope.spawn(move || {
                    let _store = locks.lock(VnodeId(1), range(20, 30));
                    sender.send("store").unwrap();
                })
            };
            while locks.table.lock().queues[&1].len() < 3 {
                std::thread::yield_now();
            }
            assert_eq!(
                receiver.recv_timeout(Duration::from_millis(50)),
                Err(RecvTimeoutError::Timeout)
            );
            drop(first);
            assert_eq!(receiver.recv().unwrap(), "read");
            assert_eq!(receiver.recv().unwrap(), "store");
            reader.join().unwrap();
            store.join().unwrap();
        });
    }
}
