//! The journaled view of the callback state: the promises a restart must honour, the
//! breaks clients are owed, and the breaks in flight.
//! Invariant: a journaled promise never lapses before the live one it stands for, and a
//! break sent but never acknowledged comes out of replay owed, so a crash loses none.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock};

use proto::Fid;
use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::record::StateRecord;
use crate::callback_table::CallbackCapture;
use crate::client_table::ClientKey;

/// The granularity journaled expiries are rounded up to: a client that keeps fetching one
/// fid writes one record per step, not one per fetch.
pub const EXPIRY_STEP_MS: u64 = 5 * 60 * 1000;

/// The expiry journaled for a promise lapsing at `wall_ms` (wall clock): rounded up to
/// the step, so that renewals within a step need no record.
pub fn journaled_expiry_ms(wall_ms: u64) -> u64 {
    wall_ms
        .div_ceil(EXPIRY_STEP_MS)
        .saturating_mul(EXPIRY_STEP_MS)
}

/// One journaled promise: (fid, client key) and its journaled expiry.
pub type PromiseEntry = ((Fid, ClientKey), u64);

/// The journaled promises. Encoded as a sequence of `PromiseEntry` (the same bytes as the
/// map earlier versions wrote). Either a list (decoded, or replayed: records are gathered
/// in `changes` and merged by `settle`, so a large snapshot is not rehashed), or a
/// capture of the live table (a snapshot on its way to the journal), turned into journal
/// form only when encoded, off the server's locks.
#[derive(Clone, Default)]
pub struct Promises {
    listed: Vec<PromiseEntry>,
    captured: Option<Arc<Captured>>,
    /// Replayed changes not merged into `listed` yet: `None` removes.
    changes: HashMap<(Fid, ClientKey), Option<u64>>,
    /// Clients whose promises in `listed` were all dropped by a replayed record.
    dropped: HashSet<ClientKey>,
}

/// A capture of the live table with what turns its monotonic expiries into wall clock.
struct Captured {
    table: CallbackCapture,
    /// Wall-clock milliseconds at the table's time origin.
    wall_origin_ms: u64,
    /// The capture in list form, made only if something reads it as a list.
    listed: OnceLock<Vec<PromiseEntry>>,
}

impl Captured {
    fn entries(&self) -> impl Iterator<Item = PromiseEntry> + '_ {
        self.table.iter().map(|(fid, client, expiry)| {
            let wall_ms = self.wall_origin_ms.saturating_add(expiry.0);
            ((fid, client), journaled_expiry_ms(wall_ms))
        })
    }
}

impl Promises {
    /// The promises of a captured live table whose time origin is `wall_origin_ms`.
    pub fn captured(table: CallbackCapture, wall_origin_ms: u64) -> Promises {
        Promises {
            captured: Some(Arc::new(Captured {
                table,
                wall_origin_ms,
                listed: OnceLock::new(),
            })),
            ..Promises::default()
        }
    }

    pub fn len(&self) -> usize {
        self.debug_assert_settled();
        match &self.captured {
            Some(captured) => captured.table.len(),
            None => self.listed.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every promise, in no particular order.
    pub fn entries(&self) -> &[PromiseEntry] {
        self.debug_assert_settled();
        match &self.captured {
            Some(captured) => captured.listed.get_or_init(|| captured.entries().collect()),
            None => &self.listed,
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &(Fid, ClientKey)> {
        self.entries().iter().map(|(key, _)| key)
    }

    pub fn insert(&mut self, fid: Fid, client: ClientKey, expiry_ms: u64) {
        self.make_listed();
        self.changes.insert((fid, client), Some(expiry_ms));
    }

    pub fn remove(&mut self, fid: Fid, client: ClientKey) {
        self.make_listed();
        self.changes.insert((fid, client), None);
    }

    pub fn drop_client(&mut self, client: ClientKey) {
        self.make_listed();
        self.changes.retain(|(_, holder), _| *holder != client);
        self.dropped.insert(client);
    }

    /// Merges the gathered changes into the list: one pass, after the last record.
    pub fn settle(&mut self) {
        self.make_listed();
        if self.changes.is_empty() && self.dropped.is_empty() {
            return;
        }
        let changes = std::mem::take(&mut self.changes);
        let dropped = std::mem::take(&mut self.dropped);
        self.listed
            .retain(|(key, _)| !dropped.contains(&key.1) && !changes.contains_key(key));
        self.listed.extend(
            changes
                .into_iter()
                .filter_map(|(key, expiry)| expiry.map(|expiry| (key, expiry))),
        );
    }

    fn make_listed(&mut self) {
        if let Some(captured) = self.captured.take() {
            self.listed = match captured.listed.get() {
                Some(listed) => listed.clone(),
                None => captured.entries().collect(),
            };
        }
    }

    fn debug_assert_settled(&self) {
        debug_assert!(
            self.changes.is_empty() && self.dropped.is_empty(),
            "journaled promises read before replay settled them"
        );
    }
}

impl From<Vec<PromiseEntry>> for Promises {
    fn from(listed: Vec<PromiseEntry>) -> Promises {
        Promises {
            listed,
            ..Promises::default()
        }
    }
}

impl Serialize for Promises {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.debug_assert_settled();
        match &self.captured {
            Some(captured) => {
                let mut seq = serializer.serialize_seq(Some(captured.table.len()))?;
                for entry in captured.entries() {
                    seq.serialize_element(&entry)?;
                }
                seq.end()
            }
            None => self.listed.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Promises {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Promises, D::Error> {
        deserializer.deserialize_seq(PromisesVisitor)
    }
}

/// Most entries reserved up front from a length read off the disk; a larger (corrupt or
/// huge) count grows as it decodes instead.
const PRESIZE_ENTRIES_MAX: usize = 1 << 24;

/// Decodes the list in one allocation of the announced length, so that recovering a
/// large snapshot does not leave a trail of freed, half-size copies in the allocator.
struct PromisesVisitor;

impl<'de> Visitor<'de> for PromisesVisitor {
    type Value = Promises;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence of callback promises")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Promises, A::Error> {
        let presize = seq.size_hint().unwrap_or(0).min(PRESIZE_ENTRIES_MAX);
        let mut listed = Vec::with_capacity(presize);
        while let Some(entry) = seq.next_element::<PromiseEntry>()? {
            listed.push(entry);
        }
        Ok(Promises::from(listed))
    }
}

/// Compares as sets (order is not kept); materializes both, so for tests and checks.
impl PartialEq for Promises {
    fn eq(&self, other: &Promises) -> bool {
        let mut mine = self.entries().to_vec();
        let mut theirs = other.entries().to_vec();
        mine.sort_unstable();
        theirs.sort_unstable();
        mine == theirs
    }
}

impl Eq for Promises {}

impl fmt::Debug for Promises {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Promises")
            .field("count", &self.len())
            .finish()
    }
}

/// Breaks owed to one client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owed {
    Reset,
    Fids(BTreeSet<Fid>),
}

/// The callback state as the journal knows it. Client keys are those of the process that
/// wrote it.
///
/// The live server keeps no second copy of the promises: they live only in its
/// `CallbackTable`, a grant is journaled when its rounded expiry moves, and a snapshot
/// captures the table (see `Promises`). The owed and in-flight breaks are small and kept
/// here, live and in replay alike.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackModel {
    /// (fid, client key) -> expiry, wall-clock ms since the Unix epoch, rounded up to
    /// `EXPIRY_STEP_MS` and so never earlier than the live expiry. A promise stays until
    /// a record removes it or a snapshot of the live table no longer holds it; one that
    /// lapsed meanwhile is left for the restart to skip. Empty in the live server's
    /// copy: the live promises are its `CallbackTable`.
    pub promises: Promises,
    pub owed: HashMap<ClientKey, Owed>,
    /// Breaks sent and not yet acknowledged or queued as delayed. `finish_replay` turns
    /// what is still here into owed breaks, so a crash in the middle of a break never
    /// loses it.
    pub inflight_fids: HashMap<ClientKey, BTreeSet<Fid>>,
    /// Resets sent and not yet acknowledged; owed after a crash, as `inflight_fids`.
    pub inflight_reset: BTreeSet<ClientKey>,
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

    /// Applies one record in replay; records about locks and clients leave it unchanged.
    pub fn apply(&mut self, record: &StateRecord) {
        match record {
            StateRecord::CallbackGranted {
                fid,
                client,
                expiry_ms,
            } => self.promises.insert(*fid, *client, *expiry_ms),
            StateRecord::CallbacksGivenUp { client, fids }
            | StateRecord::BreaksSent { client, fids } => {
                for fid in fids {
                    self.promises.remove(*fid, *client);
                }
            }
            StateRecord::ClientCallbacksDropped { client } => self.promises.drop_client(*client),
            _ => {}
        }
        self.apply_breaks(record);
    }

    /// Applies what one record says about owed and in-flight breaks: all the live server
    /// keeps here (its promises are its table).
    pub fn apply_breaks(&mut self, record: &StateRecord) {
        match record {
            StateRecord::BreaksSent { client, fids } => {
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
            | StateRecord::Handover { .. }
            | StateRecord::ClientReleased { .. }
            | StateRecord::CallbackGranted { .. }
            | StateRecord::CallbacksGivenUp { .. }
            | StateRecord::ClientCallbacksDropped { .. } => {}
        }
    }

    /// After the last record: breaks still in flight were never acknowledged, so their
    /// clients are owed them.
    pub fn finish_replay(&mut self) {
        self.promises.settle();
        for client in std::mem::take(&mut self.inflight_reset) {
            self.owed.insert(client, Owed::Reset);
        }
        for (client, fids) in std::mem::take(&mut self.inflight_fids) {
            self.push(client, fids);
        }
    }

    /// Owes `client` `fids` too; past `fids_max` (if set) its queue becomes a reset, as
    /// `DelayedBreaks` does.
    pub fn push(&mut self, client: ClientKey, fids: impl IntoIterator<Item = Fid>) {
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

    fn forget_inflight(&mut self, client: ClientKey, fids: &[Fid]) {
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
    use crate::time::Millis;
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
    fn expiries_round_up_to_the_step() {
        assert_eq!(journaled_expiry_ms(1), EXPIRY_STEP_MS);
        assert_eq!(journaled_expiry_ms(EXPIRY_STEP_MS), EXPIRY_STEP_MS);
        assert_eq!(journaled_expiry_ms(EXPIRY_STEP_MS + 1), 2 * EXPIRY_STEP_MS);
    }

    #[test]
    fn replayed_changes_settle_over_the_snapshot_list() {
        let mut model = CallbackModel::new(0);
        model.promises = Promises::from(vec![
            ((fid(1), ClientKey(0)), 10),
            ((fid(2), ClientKey(0)), 10),
            ((fid(1), ClientKey(1)), 10),
            ((fid(3), ClientKey(2)), 10),
        ]);
        let records = [
            StateRecord::CallbackGranted {
                fid: fid(1),
                client: ClientKey(0),
                expiry_ms: 20,
            },
            StateRecord::ClientCallbacksDropped {
                client: ClientKey(1),
            },
            StateRecord::CallbackGranted {
                fid: fid(4),
                client: ClientKey(1),
                expiry_ms: 30,
            },
            StateRecord::CallbacksGivenUp {
                client: ClientKey(0),
                fids: vec![fid(2)],
            },
            StateRecord::BreaksSent {
                client: ClientKey(2),
                fids: vec![fid(3)],
            },
        ];
        for record in &records {
            model.apply(record);
        }
        model.finish_replay();
        let expected = Promises::from(vec![
            ((fid(1), ClientKey(0)), 20),
            ((fid(4), ClientKey(1)), 30),
        ]);
        assert_eq!(model.promises, expected);
    }

    #[test]
    fn promises_encode_as_the_map_did() {
        let listed = vec![((fid(1), ClientKey(3)), 7u64)];
        let map: HashMap<(Fid, ClientKey), u64> = listed.iter().copied().collect();
        let promises = Promises::from(listed);
        let bytes = postcard::to_allocvec(&promises).unwrap();
        assert_eq!(bytes, postcard::to_allocvec(&map).unwrap());
        let decoded: Promises = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, promises);
    }

    #[test]
    fn a_captured_table_encodes_in_journal_form() {
        let mut table = crate::CallbackTable::new(crate::CallbackTableConfig::default());
        table.grant(fid(1), ClientKey(4), Millis(1));
        let promises = Promises::captured(table.capture(), 1000);
        let bytes = postcard::to_allocvec(&promises).unwrap();
        let decoded: Promises = postcard::from_bytes(&bytes).unwrap();
        let expiry = journaled_expiry_ms(1000 + 3_600_000 + 1000);
        assert_eq!(decoded.entries(), &[((fid(1), ClientKey(4)), expiry)]);
        assert_eq!(decoded, promises);
    }

    #[test]
    fn an_unacknowledged_break_is_owed_after_replay() {
        let mut model = CallbackModel::new(0);
        for client in [ClientKey(0), ClientKey(1)] {
            model.apply(&StateRecord::CallbackGranted {
                fid: fid(1),
                client,
                expiry_ms: 10,
            });
        }
        for client in [ClientKey(0), ClientKey(1)] {
            model.apply(&StateRecord::BreaksSent {
                client,
                fids: vec![fid(1)],
            });
        }
        model.apply(&StateRecord::BreaksAcked {
            client: ClientKey(0),
            fids: vec![fid(1)],
        });
        model.apply(&StateRecord::ResetSent {
            client: ClientKey(2),
        });
        model.finish_replay();
        assert!(model.promises.entries().is_empty());
        assert_eq!(model.owed.get(&ClientKey(0)), None);
        assert_eq!(
            model.owed.get(&ClientKey(1)),
            Some(&Owed::Fids(BTreeSet::from([fid(1)])))
        );
        assert_eq!(model.owed.get(&ClientKey(2)), Some(&Owed::Reset));
    }

    #[test]
    fn taken_breaks_stay_owed_until_acknowledged_and_overflow_resets() {
        let mut model = CallbackModel::new(2);
        model.apply(&StateRecord::DelayedQueued {
            client: ClientKey(0),
            fids: vec![fid(1), fid(2)],
        });
        model.apply(&StateRecord::DelayedTaken {
            client: ClientKey(0),
        });
        assert!(model.owed.is_empty());
        model.apply(&StateRecord::BreaksAcked {
            client: ClientKey(0),
            fids: vec![fid(1), fid(2)],
        });
        let mut replayed = model.clone();
        replayed.finish_replay();
        assert!(replayed.owed.is_empty());
        model.apply(&StateRecord::DelayedQueued {
            client: ClientKey(0),
            fids: vec![fid(1), fid(2), fid(3)],
        });
        assert_eq!(model.owed.get(&ClientKey(0)), Some(&Owed::Reset));
    }
}
