//! Delayed breaks: the breaks owed to clients that could not be reached, delivered when
//! they come back.
//! Invariant: a client's queue holds at most `fids_max` distinct fids; beyond that it
//! collapses into one `Reset` (the client then revalidates everything by DV).

use std::collections::{BTreeSet, HashMap};

use proto::Fid;

use crate::client_table::ClientKey;

/// Default bound on one client's queue.
pub const FIDS_PER_CLIENT_MAX_DEFAULT: usize = 10_000;

/// What a returning client must be told before it is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Drop every callback from this server.
    Reset,
    /// Break these callbacks, in fid order.
    Fids(Vec<Fid>),
}

#[derive(Debug)]
enum Queue {
    Fids(BTreeSet<Fid>),
    Reset,
}

/// Per-client bounded queues of owed breaks.
#[derive(Debug)]
pub struct DelayedBreaks {
    queues: HashMap<ClientKey, Queue>,
    fids_max: usize,
}

impl DelayedBreaks {
    pub fn new(fids_max: usize) -> DelayedBreaks {
        DelayedBreaks {
            queues: HashMap::new(),
            fids_max,
        }
    }

    /// Owes `client` breaks on `fids`; overflow turns the queue into a reset.
    pub fn push(&mut self, client: ClientKey, fids: impl IntoIterator<Item = Fid>) {
        let queue = self
            .queues
            .entry(client)
            .or_insert_with(|| Queue::Fids(BTreeSet::new()));
        if let Queue::Fids(set) = queue {
            set.extend(fids);
            if set.len() > self.fids_max {
                *queue = Queue::Reset;
            }
        }
    }

    /// Owes `client` a reset, replacing any queued fids.
    pub fn push_reset(&mut self, client: ClientKey) {
        self.queues.insert(client, Queue::Reset);
    }

    /// Takes what `client` is owed, leaving it owed nothing.
    pub fn take(&mut self, client: ClientKey) -> Option<Pending> {
        match self.queues.remove(&client)? {
            Queue::Reset => Some(Pending::Reset),
            Queue::Fids(set) if set.is_empty() => None,
            Queue::Fids(set) => Some(Pending::Fids(set.into_iter().collect())),
        }
    }

    /// Number of clients owed something.
    pub fn client_count(&self) -> usize {
        self.queues.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{Uniquifier, VnodeId, VolumeId};

    fn fid(n: u64) -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: VnodeId(n),
            unique: Uniquifier(1),
        }
    }

    #[test]
    fn queues_dedupe_and_take_empties() {
        let mut delayed = DelayedBreaks::new(10);
        delayed.push(ClientKey(3), [fid(2), fid(1)]);
        delayed.push(ClientKey(3), [fid(2)]);
        assert_eq!(
            delayed.take(ClientKey(3)),
            Some(Pending::Fids(vec![fid(1), fid(2)]))
        );
        assert_eq!(delayed.take(ClientKey(3)), None);
        assert_eq!(delayed.take(ClientKey(4)), None);
    }

    #[test]
    fn overflow_becomes_reset_and_stays_reset() {
        let mut delayed = DelayedBreaks::new(3);
        delayed.push(ClientKey(1), (0..3).map(fid));
        delayed.push(ClientKey(1), [fid(3)]);
        delayed.push(ClientKey(1), [fid(4)]);
        assert_eq!(delayed.client_count(), 1);
        assert_eq!(delayed.take(ClientKey(1)), Some(Pending::Reset));
        delayed.push(ClientKey(1), [fid(9)]);
        delayed.push_reset(ClientKey(1));
        assert_eq!(delayed.take(ClientKey(1)), Some(Pending::Reset));
    }
}
