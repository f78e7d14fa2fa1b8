//! The journaled view of the callback state: which promises a restart must honour (with
//! their expiry rounded up to a coarse step, as wall-clock milliseconds), which breaks
//! clients are owed, and which breaks were in flight. The live server applies every
//! callback record it journals to one of these, and replay applies the same records, so
//! the two agree by construction; a snapshot is a copy of it.
//! Invariant: a promise is in `promises` until a record removes it (or it is pruned past
//! its expiry), and its expiry is never earlier than the in-memory one; a break that was
//! sent but not acknowledged is in `inflight_*` until acknowledged or queued, and
//! `finish_replay` turns what is still in flight into owed breaks, so a crash mid-break
//! never loses one.

use std::collections::{BTreeSet, HashMap};

use proto::Fid;
use serde::{Deserialize, Serialize};

use crate::state_journal::StateRecord;

/// The granularity journaled expiries are rounded up to: a client that keeps fetching one
/// fid writes one record per step, not one per fetch.
pub const EXPIRY_STEP_MS: u64 = 5 * 60 * 1000;

/// Breaks owed to one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owed {
    Reset,
    Fids(BTreeSet<Fid>),
}

/// The callback state as the journal knows it. Client keys are those of the process that
/// wrote it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackModel {
    /// (fid, client key) -> expiry, wall-clock ms since the Unix epoch.
    pub promises: HashMap<(Fid, u32), u64>,
    pub owed: HashMap<u32, Owed>,
    pub inflight_fids: HashMap<u32, BTreeSet<Fid>>,
    pub inflight_reset: BTreeSet<u32>,
    /// Owed fids per client beyond which the queue collapses into a reset, as in
    /// `DelayedBreaks`; 0 means unbounded (replay: the live queue bounds it again).
    #[serde(skip)]
    pub fids_max: usize,
}

impl CallbackModel {
    pub fn new(fids_max: usize) -> CallbackModel {
        CallbackModel {
            fids_max,
            ..CallbackModel::default()
        }
    }

    /// The expiry to journal for a promise that lapses at `expiry_ms`, or `None` when the
    /// journaled promise already covers it (the common case: no record needed).
    pub fn journal_expiry(&self, fid: Fid, client: u32, expiry_ms: u64) -> Option<u64> {
        if self
            .promises
            .get(&(fid, client))
            .is_some_and(|&journaled| journaled >= expiry_ms)
        {
            return None;
        }
        Some(
            expiry_ms
                .div_ceil(EXPIRY_STEP_MS)
                .saturating_mul(EXPIRY_STEP_MS),
        )
    }

    /// Applies one record; records about locks and clients leave it unchanged.
    pub fn apply(&mut self, record: &StateRecord) {
        match record {
            StateRecord::CallbackGranted {
                fid,
                client,
                expiry_ms,
            } => {
                self.promises.insert((*fid, *client), *expiry_ms);
            }
            StateRecord::CallbacksGivenUp { client, fids } => {
                for fid in fids {
                    self.promises.remove(&(*fid, *client));
                }
            }
            StateRecord::ClientCallbacksDropped { client } => {
                self.promises.retain(|(_, holder), _| holder != client);
            }
            StateRecord::BreaksSent { client, fids } => {
                for fid in fids {
                    self.promises.remove(&(*fid, *client));
                }
                self.inflight_fids
                    .entry(*client)
                    .or_default()
                    .extend(fids.iter().copied());
            }
            StateRecord::BreaksAcked { client, fids } => {
                self.forget_inflight(*client, fids);
                // The client dropped these callbacks: nothing is owed for them any more.
                if let Some(Owed::Fids(owed)) = self.owed.get_mut(client) {
                    for fid in fids {
                        owed.remove(fid);
                    }
                    if owed.is_empty() {
                        self.owed.remove(client);
                    }
                }
            }
            StateRecord::ResetSent { client } => {
                self.inflight_reset.insert(*client);
            }
            StateRecord::ResetAcked { client } => {
                self.inflight_reset.remove(client);
            }
            StateRecord::DelayedQueued { client, fids } => {
                self.forget_inflight(*client, fids);
                self.push(*client, fids.iter().copied());
            }
            StateRecord::DelayedReset { client } => {
                self.inflight_reset.remove(client);
                self.owed.insert(*client, Owed::Reset);
            }
            StateRecord::DelayedTaken { client } => match self.owed.remove(client) {
                Some(Owed::Reset) => {
                    self.inflight_reset.insert(*client);
                }
                Some(Owed::Fids(fids)) => {
                    self.inflight_fids.entry(*client).or_default().extend(fids);
                }
                None => {}
            },
            StateRecord::ClientAdmitted { .. }
            | StateRecord::LockGranted { .. }
            | StateRecord::LockReleased { .. }
            | StateRecord::ClientReleased { .. } => {}
        }
    }

    /// After the last record: breaks still in flight were never acknowledged, so their
    /// clients are owed them.
    pub fn finish_replay(&mut self) {
        for client in std::mem::take(&mut self.inflight_reset) {
            self.owed.insert(client, Owed::Reset);
        }
        for (client, fids) in std::mem::take(&mut self.inflight_fids) {
            self.push(client, fids);
        }
    }

    /// Drops promises that lapsed before `now_ms` (bounds the model between snapshots).
    pub fn prune(&mut self, now_ms: u64) {
        self.promises.retain(|_, expiry| *expiry > now_ms);
    }

    fn push(&mut self, client: u32, fids: impl IntoIterator<Item = Fid>) {
        let queue = self
            .owed
            .entry(client)
            .or_insert_with(|| Owed::Fids(BTreeSet::new()));
        if let Owed::Fids(set) = queue {
            set.extend(fids);
            if self.fids_max > 0 && set.len() > self.fids_max {
                *queue = Owed::Reset;
            }
        }
    }

    fn forget_inflight(&mut self, client: u32, fids: &[Fid]) {
        if let Some(inflight) = self.inflight_fids.get_mut(&client) {
            for fid in fids {
                inflight.remove(fid);
            }
            if inflight.is_empty() {
                self.inflight_fids.remove(&client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    fn fid(vnode: u64) -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: VnodeId(vnode),
            unique: Uniquifier(1),
        }
    }

    #[test]
    fn expiries_round_up_and_covered_grants_need_no_record() {
        let mut model = CallbackModel::new(10);
        let expiry = model.journal_expiry(fid(1), 0, 1).unwrap();
        assert_eq!(expiry, EXPIRY_STEP_MS);
        model.apply(&StateRecord::CallbackGranted {
            fid: fid(1),
            client: 0,
            expiry_ms: expiry,
        });
        assert_eq!(model.journal_expiry(fid(1), 0, EXPIRY_STEP_MS), None);
        assert_eq!(
            model.journal_expiry(fid(1), 0, EXPIRY_STEP_MS + 1),
            Some(2 * EXPIRY_STEP_MS)
        );
        assert!(model.journal_expiry(fid(1), 1, 5).is_some());
    }

    #[test]
    fn an_unacknowledged_break_is_owed_after_replay() {
        let mut model = CallbackModel::new(0);
        for client in [0, 1] {
            model.apply(&StateRecord::CallbackGranted {
                fid: fid(1),
                client,
                expiry_ms: 10,
            });
        }
        for client in [0, 1] {
            model.apply(&StateRecord::BreaksSent {
                client,
                fids: vec![fid(1)],
            });
        }
        model.apply(&StateRecord::BreaksAcked {
            client: 0,
            fids: vec![fid(1)],
        });
        model.apply(&StateRecord::ResetSent { client: 2 });
        model.finish_replay();
        assert!(model.promises.is_empty());
        assert_eq!(model.owed.get(&0), None);
        assert_eq!(
            model.owed.get(&1),
            Some(&Owed::Fids(BTreeSet::from([fid(1)])))
        );
        assert_eq!(model.owed.get(&2), Some(&Owed::Reset));
    }

    #[test]
    fn taken_breaks_stay_owed_until_acknowledged_and_overflow_resets() {
        let mut model = CallbackModel::new(2);
        model.apply(&StateRecord::DelayedQueued {
            client: 0,
            fids: vec![fid(1), fid(2)],
        });
        model.apply(&StateRecord::DelayedTaken { client: 0 });
        assert!(model.owed.is_empty());
        model.apply(&StateRecord::BreaksAcked {
            client: 0,
            fids: vec![fid(1), fid(2)],
        });
        let mut replayed = model.clone();
        replayed.finish_replay();
        assert!(replayed.owed.is_empty());
        model.apply(&StateRecord::DelayedQueued {
            client: 0,
            fids: vec![fid(1), fid(2), fid(3)],
        });
        assert_eq!(model.owed.get(&0), Some(&Owed::Reset));
    }
}
