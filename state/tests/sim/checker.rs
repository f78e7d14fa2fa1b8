//! The invariants of the pair simulation, checked as the run goes and at its end: one
//! active per epoch, no acknowledged write lost, no lock granted twice (see `Checker`).

use std::collections::{BTreeMap, HashMap};

use proto::LockKind;

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
#[derive(Default)]
pub struct Checker {
    /// Epoch -> the member the VLDB granted it to.
    granted: BTreeMap<u64, usize>,
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
