//! The queue of blocked lock requests on one fid, oldest first, boxed so that a fid
//! nobody waits on pays one pointer for it.
//! Invariant: the box exists exactly while the queue holds a request.

use std::collections::VecDeque;

use super::{Lock, WaitId};

/// A blocked request and the id it is granted or cancelled by.
#[derive(Clone, Copy, Debug)]
pub(super) struct Waiter {
    pub wait: WaitId,
    pub lock: Lock,
}

/// Boxed: most fids have nobody waiting, and then the queue costs one pointer instead of
/// an empty `VecDeque`'s 32 bytes in every entry of the lock table.
#[derive(Debug, Default)]
pub(super) struct WaitQueue(
    #[allow(
        clippy::box_collection,
        reason = "the box is the point: 8 bytes per fid instead of 32"
    )]
    Option<Box<VecDeque<Waiter>>>,
);

impl WaitQueue {
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |queue| queue.len())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn get(&self, index: usize) -> Option<Waiter> {
        self.0.as_ref()?.get(index).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Waiter> + '_ {
        self.0.iter().flat_map(|queue| queue.iter())
    }

    pub fn push_back(&mut self, waiter: Waiter) {
        self.0.get_or_insert_default().push_back(waiter);
    }

    pub fn remove(&mut self, index: usize) -> Option<Waiter> {
        let removed = self.0.as_mut()?.remove(index);
        self.drop_if_empty();
        removed
    }

    pub fn retain(&mut self, keep: impl FnMut(&Waiter) -> bool) {
        if let Some(queue) = &mut self.0 {
            queue.retain(keep);
        }
        self.drop_if_empty();
    }

    fn drop_if_empty(&mut self) {
        if self.0.as_ref().is_some_and(|queue| queue.is_empty()) {
            self.0 = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client_table::ClientKey;
    use crate::lock_table::LockOwner;
    use proto::{ByteRange, LockKind, LockOwnerId};

    fn waiter(wait: u64) -> Waiter {
        Waiter {
            wait: WaitId(wait),
            lock: Lock {
                owner: LockOwner {
                    client: ClientKey(0),
                    owner: LockOwnerId(wait),
                },
                range: ByteRange::whole(),
                kind: LockKind::Exclusive,
            },
        }
    }

    #[test]
    fn an_emptied_queue_frees_its_box() {
        let mut queue = WaitQueue::default();
        assert!(queue.is_empty());
        queue.push_back(waiter(1));
        queue.push_back(waiter(2));
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.remove(0).map(|w| w.wait), Some(WaitId(1)));
        assert!(!queue.is_empty());
        assert_eq!(queue.get(0).map(|w| w.wait), Some(WaitId(2)));
        queue.retain(|w| w.wait != WaitId(2));
        assert!(queue.is_empty());
        assert_eq!(queue.len(), 0);
        assert_eq!(queue.remove(0).map(|w| w.wait), None);
        queue.push_back(waiter(3));
        assert_eq!(queue.remove(0).map(|w| w.wait), Some(WaitId(3)));
        assert!(queue.is_empty());
    }

    #[test]
    fn an_empty_queue_is_one_pointer() {
        assert_eq!(
            std::mem::size_of::<WaitQueue>(),
            std::mem::size_of::<usize>()
        );
    }
}
