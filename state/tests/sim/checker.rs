//! The invariants of the pair simulation, checked as the run goes and at its end: one
//! active per epoch, no acknowledged write lost, no lock granted twice, and for the
//! replicated VLDB one leader per term and one state per log index (see `Checker`).

use std::collections::{BTreeMap, HashMap};
use std::ops::AddAssign;

use proto::LockKind;
use state::{Millis, PairLease};

use crate::sim::disk::Slot;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub epochs: u64,
    pub takeovers: u64,
    /// Actives that found their lease gone at a fence check and demoted themselves.
    pub fences: u64,
    pub acks: u64,
    pub writes_acked: u64,
    pub locks_granted: u64,
    /// Renewals the VLDB answered with success.
    pub renewals: u64,
    /// Elections won (replicated VLDB).
    pub leaders: u64,
    /// Calls a leader turned away because it had not yet applied its predecessors'
    /// entries.
    pub unready: u64,
    /// Entries a follower dropped because a new leader's log disagreed: a stale leader's
    /// proposals that never committed.
    pub truncated: u64,
    pub replica_restarts: u64,
}

impl AddAssign for Stats {
    fn add_assign(&mut self, run: Stats) {
        self.epochs += run.epochs;
        self.takeovers += run.takeovers;
        self.fences += run.fences;
        self.acks += run.acks;
        self.writes_acked += run.writes_acked;
        self.locks_granted += run.locks_granted;
        self.renewals += run.renewals;
        self.leaders += run.leaders;
        self.unready += run.unready;
        self.truncated += run.truncated;
        self.replica_restarts += run.replica_restarts;
    }
}

/// The invariants, checked as the run goes and at its end:
/// 1. one active per epoch: the VLDB grants each epoch once, in increasing order; no
///    instant has two members inside their acting windows; and acknowledgements, in
///    time order, never go back to an older epoch (an old active acking after the new
///    one did).
/// 2. no acknowledged write lost: every write a client saw acknowledged is on the shared
///    disk exactly once, at every takeover and at the end.
/// 3. no lock granted twice: replaying the history of grants and releases, whoever
///    recorded them, no two owners ever hold conflicting locks on one slot.
/// 4. the replicated VLDB is one state machine: at most one leader per term, and every
///    replica that applies log index i reaches the same durable pair state there.
#[derive(Default)]
pub struct Checker {
    /// Epoch -> the member the VLDB granted it to.
    granted: BTreeMap<u64, usize>,
    /// Term -> the replica elected in it.
    leaders: BTreeMap<u64, usize>,
    /// Log index -> the entry's term and the pair's durable state once it is applied
    /// (expiry zeroed: it is each replica's own).
    states: BTreeMap<u64, (u64, PairLease)>,
    /// The acknowledgement of the newest epoch so far: (time, member, epoch).
    newest_ack: Option<(u64, usize, u64)>,
    /// Writes clients saw acknowledged: (client, seq) -> value.
    acked_writes: BTreeMap<(u32, u64), u64>,
    /// The lock history replayed: slot -> owner client -> kind.
    held: HashMap<Slot, BTreeMap<u32, LockKind>>,
    pub stats: Stats,
}

impl Checker {
    pub fn vldb_granted(&mut self, epoch: u64, member: usize) -> Result<(), String> {
        if let Some(before) = self.granted.get(&epoch) {
            return Err(format!(
                "the VLDB granted epoch {epoch} twice: to m{before} and to m{member}"
            ));
        }
        if let Some((&newest, _)) = self.granted.last_key_value()
            && newest > epoch
        {
            return Err(format!(
                "the VLDB granted epoch {epoch} after epoch {newest}"
            ));
        }
        self.granted.insert(epoch, member);
        self.stats.epochs += 1;
        Ok(())
    }

    /// A replica of the replicated VLDB told `member` it holds `epoch`. Unlike the single
    /// VLDB's, these answers may arrive out of epoch order (a deposed leader learns of
    /// its commit late); the log's order is `applied`'s to check.
    pub fn vldb_told(&mut self, epoch: u64, member: usize) -> Result<(), String> {
        match self.granted.insert(epoch, member) {
            Some(before) if before != member => Err(format!(
                "the VLDB granted epoch {epoch} twice: to m{before} and to m{member}"
            )),
            Some(_) => Err(format!(
                "the VLDB told m{member} twice it holds epoch {epoch}"
            )),
            None => {
                self.stats.epochs += 1;
                Ok(())
            }
        }
    }

    pub fn leader_elected(&mut self, term: u64, replica: usize) -> Result<(), String> {
        if let Some(before) = self.leaders.insert(term, replica) {
            return Err(format!("r{before} and r{replica} both lead term {term}"));
        }
        self.stats.leaders += 1;
        Ok(())
    }

    /// `replica` applied log index `index`, of term `term`, and its pair is now `pair`.
    pub fn applied(
        &mut self,
        replica: usize,
        index: u64,
        term: u64,
        pair: &PairLease,
    ) -> Result<(), String> {
        let mut durable = pair.clone();
        durable.expires = Millis(0);
        match self.states.get(&index) {
            None => {
                self.states.insert(index, (term, durable));
                Ok(())
            }
            Some((first_term, first)) if (*first_term, first) == (term, &durable) => Ok(()),
            Some((first_term, first)) => Err(format!(
                "r{replica} applied index {index} (term {term}) to {durable:?}; another \
                 replica applied it (term {first_term}) to {first:?}"
            )),
        }
    }

    /// `member` answers a client as the active of `epoch`, at `now`.
    pub fn ack(&mut self, now: u64, member: usize, epoch: u64) -> Result<(), String> {
        if self.granted.get(&epoch) != Some(&member) {
            return Err(format!(
                "m{member} acknowledged in epoch {epoch}, which the VLDB granted to {:?}",
                self.granted.get(&epoch)
            ));
        }
        if let Some((at, by, newest)) = self.newest_ack
            && epoch < newest
        {
            return Err(format!(
                "m{member} acknowledged at {now} ms in epoch {epoch}, after m{by} had \
                 acknowledged at {at} ms in epoch {newest}: two actives at once"
            ));
        }
        self.newest_ack = Some((now, member, epoch));
        self.stats.acks += 1;
        Ok(())
    }

    /// At most one member may be inside its acting window: `acting` lists, per member
    /// that believes it may act, its epoch.
    pub fn windows(&self, acting: &[(usize, u64)]) -> Result<(), String> {
        match acting {
            [] | [_] => Ok(()),
            [(a, ea), (b, eb), ..] => Err(format!(
                "m{a} (epoch {ea}) and m{b} (epoch {eb}) both hold a valid lease"
            )),
        }
    }

    pub fn write_acked(&mut self, client: u32, seq: u64, value: u64) {
        self.acked_writes.insert((client, seq), value);
        self.stats.writes_acked += 1;
    }

    /// The disk holds `writes` (in order): each acknowledged write exactly once, and no
    /// (client, seq) applied twice.
    pub fn disk_writes(&self, writes: &[(u32, u64, u64)], when: &str) -> Result<(), String> {
        let mut seen: HashMap<(u32, u64), u64> = HashMap::new();
        for &(client, seq, value) in writes {
            if seen.insert((client, seq), value).is_some() {
                return Err(format!(
                    "{when}: write (client {client}, seq {seq}) is on the disk twice"
                ));
            }
        }
        for (&(client, seq), &value) in &self.acked_writes {
            match seen.get(&(client, seq)) {
                Some(&found) if found == value => {}
                Some(&found) => {
                    return Err(format!(
                        "{when}: acknowledged write (client {client}, seq {seq}) holds \
                         {found}, not {value}"
                    ));
                }
                None => {
                    return Err(format!(
                        "{when}: acknowledged write (client {client}, seq {seq}) is lost"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn takeover(
        &mut self,
        member: usize,
        epoch: u64,
        writes: &[(u32, u64, u64)],
    ) -> Result<(), String> {
        self.stats.takeovers += 1;
        self.disk_writes(writes, &format!("m{member} taking over in epoch {epoch}"))
    }

    /// A member recorded a grant of `slot` to `client`.
    pub fn lock_granted(
        &mut self,
        now: u64,
        member: usize,
        slot: Slot,
        client: u32,
        kind: LockKind,
    ) -> Result<(), String> {
        let holders = self.held.entry(slot).or_default();
        let conflicting = holders.iter().find(|&(&other, &held)| {
            other != client && (held == LockKind::Exclusive || kind == LockKind::Exclusive)
        });
        if let Some((other, held)) = conflicting {
            return Err(format!(
                "m{member} granted {slot:?} {kind:?} to client {client} at {now} ms while \
                 client {other} held it {held:?}"
            ));
        }
        holders.insert(client, kind);
        self.stats.locks_granted += 1;
        Ok(())
    }

    /// A member recorded that `client` no longer holds `slot` (unlock or grace drop).
    pub fn lock_released(&mut self, slot: Slot, client: u32) {
        if let Some(holders) = self.held.get_mut(&slot) {
            holders.remove(&client);
        }
    }
}
