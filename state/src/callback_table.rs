//! The callback promise table: which client holds a promise on which fid, until when, in
//! a few words per promise.
//! Invariant: at most `promise_count_max` promises, one per (fid, client); each has a
//! wheel entry at its expiry, and a slot is in the index exactly while it has a holder.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use proto::Fid;

use crate::client_table::ClientKey;
use crate::time::Millis;

/// How many expired promises one `expire` call removes at most, so that a sweep never
/// holds the server's lock for long.
pub const EXPIRE_BATCH_MAX: usize = 1024;

/// A client key no client has: marks a free slot (keys are dense from 0 and bounded by
/// the client table, far below it).
const NO_CLIENT: u32 = u32::MAX;
/// An empty index bucket.
const NO_SLOT: u32 = u32::MAX;
/// Slot numbers are u32 and `NO_SLOT` is reserved.
const PROMISE_COUNT_LIMIT: usize = (u32::MAX - 1) as usize;
/// Stale wheel entries tolerated beyond the promise count before the wheel is rebuilt.
const WHEEL_SLACK: usize = 4096;

/// Limits and lifetimes of a callback table.
#[derive(Clone, Debug)]
pub struct CallbackTableConfig {
    /// Clamped to `u32::MAX - 1` (slot numbers are 32-bit).
    pub promise_count_max: usize,
    /// Lifetime of a promise while the table is below the pressure threshold.
    pub lifetime: Duration,
    /// Lifetime of a promise when the table is full.
    pub lifetime_min: Duration,
    /// Fill level, in percent of `promise_count_max`, above which lifetimes shrink
    /// linearly from `lifetime` down to `lifetime_min`.
    pub pressure_start_percent: u8,
}

impl Default for CallbackTableConfig {
    fn default() -> Self {
        CallbackTableConfig {
            promise_count_max: 1_000_000,
            lifetime: Duration::from_secs(3600),
            lifetime_min: Duration::from_secs(60),
            pressure_start_percent: 75,
        }
    }
}

/// The outcome of `grant`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub lifetime: Duration,
    /// An unexpired promise evicted to make room: its client is owed a break.
    pub evicted: Option<(Fid, ClientKey)>,
    /// When the promise now lapses (whole seconds, rounded up; a renewal never moves it
    /// earlier: the client may still count on what it was told before).
    pub expiry: Millis,
    /// When it lapsed before this grant, if it was a renewal.
    pub previous: Option<Millis>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Holder {
    client: u32,
    /// Seconds since the table's origin, rounded up.
    expiry: u32,
}

/// A free slot: no fid, no holder.
const FREE_SLOT: Slot = Slot {
    fid: Fid {
        volume: proto::VolumeId(0),
        vnode: proto::VnodeId(0),
        unique: proto::Uniquifier(0),
    },
    holder: Holder {
        client: NO_CLIENT,
        expiry: 0,
    },
};

/// One interned fid and its first holder (`client == NO_CLIENT`: the slot is free).
#[derive(Clone, Copy, Debug)]
struct Slot {
    fid: Fid,
    holder: Holder,
}

/// The table of callback promises of one server.
///
/// Memory is the design constraint (ten million promises must fit one server), so a
/// promise is a few words in flat vectors: each fid is interned once in a slot (its first
/// holder inline, further holders in `extra`), slots are found through `FidIndex`, an
/// open-addressing index of slot numbers, and expiry order is kept by `wheel`, one bucket
/// per second, whose entries are checked against the slot when popped: an entry left
/// behind by a renewal or removal is skipped, and the wheel is rebuilt once such entries
/// outnumber the promises by more than `WHEEL_SLACK`.
#[derive(Debug)]
pub struct CallbackTable {
    config: CallbackTableConfig,
    len: usize,
    slots: Vec<Slot>,
    /// Free slot numbers, reused before the vector grows.
    free: Vec<u32>,
    index: FidIndex,
    /// Holders of a fid beyond the one inline in its slot (shared files only).
    extra: HashMap<u32, Vec<Holder>>,
    /// Expiry second -> (slot, client) of the promises lapsing then; may hold stale
    /// entries, recognised by the slot no longer agreeing.
    wheel: BTreeMap<u32, Vec<(u32, u32)>>,
    wheel_len: usize,
}

/// A copy of every promise, taken at memory speed (see `CallbackTable::capture`).
#[derive(Clone, Debug, Default)]
pub struct CallbackCapture {
    slots: Vec<Slot>,
    /// Holders beyond a slot's first, by index into `slots`.
    extra: Vec<(usize, Holder)>,
    len: usize,
}

impl CallbackCapture {
    /// An empty capture with room for `slots` slots (see `CallbackTable::capture_room`),
    /// its memory already written once: the page faults of a large copy happen here,
    /// before the caller takes its lock, and `capture_into` under the lock only copies.
    pub fn with_room(slots: usize) -> CallbackCapture {
        let mut prepared = Vec::new();
        prepared.resize(slots, FREE_SLOT);
        prepared.clear();
        CallbackCapture {
            slots: prepared,
            extra: Vec::new(),
            len: 0,
        }
    }

    /// How many promises `iter` yields.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every captured promise as (fid, client, expiry), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Fid, ClientKey, Millis)> + '_ {
        let inline = self
            .slots
            .iter()
            .filter(|slot| slot.holder.client != NO_CLIENT)
            .map(|slot| (slot.fid, slot.holder));
        let extra = self
            .extra
            .iter()
            .map(|&(slot, holder)| (self.slots[slot].fid, holder));
        inline
            .chain(extra)
            .map(|(fid, holder)| (fid, ClientKey(holder.client), to_millis(holder.expiry)))
    }
}

fn to_seconds(at: Millis) -> u32 {
    u32::try_from(at.0.div_ceil(1000)).unwrap_or(u32::MAX)
}

fn to_millis(seconds: u32) -> Millis {
    Millis(u64::from(seconds) * 1000)
}

impl CallbackTable {
    pub fn new(mut config: CallbackTableConfig) -> CallbackTable {
        assert!(config.promise_count_max > 0, "a callback table needs room");
        config.promise_count_max = config.promise_count_max.min(PROMISE_COUNT_LIMIT);
        CallbackTable {
            config,
            len: 0,
            slots: Vec::new(),
            free: Vec::new(),
            index: FidIndex::default(),
            extra: HashMap::new(),
            wheel: BTreeMap::new(),
            wheel_len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes room for `additional` more promises on distinct fids at once (a restore),
    /// so that the vectors do not grow by doubling and overshoot.
    pub fn reserve(&mut self, additional: usize) {
        let additional = additional.min(self.config.promise_count_max);
        self.slots
            .reserve_exact(additional.saturating_sub(self.free.len()));
        self.index.reserve(&self.slots, self.len + additional);
    }

    /// The lifetime a promise granted now gets: full below the pressure threshold,
    /// then shrinking linearly to `lifetime_min` as the table fills.
    pub fn lifetime(&self) -> Duration {
        let max = self.config.promise_count_max as u128;
        let start = max * u128::from(self.config.pressure_start_percent.min(100)) / 100;
        let len = self.len() as u128;
        if len <= start || max <= start {
            return self.config.lifetime;
        }
        let full = self.config.lifetime.as_millis();
        let min = self.config.lifetime_min.as_millis().min(full);
        let over = (len - start).min(max - start);
        let millis = full - (full - min) * over / (max - start);
        Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
    }

    /// Grants (or renews) `client`'s promise on `fid`. When the table is full the
    /// soonest-expiring promise makes room; if it had not expired yet, its client is
    /// owed a break, returned in `evicted`.
    pub fn grant(&mut self, fid: Fid, client: ClientKey, now: Millis) -> Grant {
        debug_assert!(client.0 != NO_CLIENT, "client key out of range");
        let lifetime = self.lifetime();
        let expiry = to_seconds(now.saturating_add(lifetime));
        if let Some(slot) = self.index.get(&self.slots, fid)
            && let Some(old) = self.holder(slot, client.0)
        {
            if expiry > old.expiry {
                self.set_expiry(slot, client.0, expiry);
                self.wheel_push(expiry, slot, client.0);
            }
            return Grant {
                lifetime,
                evicted: None,
                expiry: to_millis(expiry.max(old.expiry)),
                previous: Some(to_millis(old.expiry)),
            };
        }
        let mut evicted = None;
        if self.len >= self.config.promise_count_max
            && let Some((slot, old)) = self.pop_due(u32::MAX)
        {
            let old_fid = self.slots[slot as usize].fid;
            self.remove_holder(slot, old.client);
            if to_millis(old.expiry) > now {
                evicted = Some((old_fid, ClientKey(old.client)));
            }
        }
        let slot = self.intern(fid);
        self.add_holder(
            slot,
            Holder {
                client: client.0,
                expiry,
            },
        );
        self.wheel_push(expiry, slot, client.0);
        debug_assert!(self.len <= self.config.promise_count_max);
        Grant {
            lifetime,
            evicted,
            expiry: to_millis(expiry),
            previous: None,
        }
    }

    /// Removes every promise on `fid` except `except`'s, returning the clients that held
    /// one: they must be sent a break.
    pub fn break_fid(&mut self, fid: Fid, except: Option<ClientKey>) -> Vec<ClientKey> {
        let Some(slot) = self.index.get(&self.slots, fid) else {
            return Vec::new();
        };
        let mut holders = vec![self.slots[slot as usize].holder];
        holders.extend(self.extra.remove(&slot).unwrap_or_default());
        let mut broken = Vec::with_capacity(holders.len());
        let mut kept = None;
        for holder in holders {
            if Some(ClientKey(holder.client)) == except {
                kept = Some(holder);
            } else {
                broken.push(ClientKey(holder.client));
            }
        }
        self.len -= broken.len();
        match kept {
            Some(holder) => self.slots[slot as usize].holder = holder,
            None => self.free_slot(slot),
        }
        broken.sort_unstable();
        broken
    }

    /// The client dropped these promises (cache eviction).
    pub fn give_up(&mut self, client: ClientKey, fids: &[Fid]) {
        for &fid in fids {
            if let Some(slot) = self.index.get(&self.slots, fid) {
                self.remove_holder(slot, client.0);
            }
        }
    }

    /// Drops every promise of `client` (it restarted or was forgotten). Scans the
    /// table: this happens once per client restart, not per request.
    pub fn drop_client(&mut self, client: ClientKey) {
        let mut removed = 0;
        self.extra.retain(|_, holders| {
            let before = holders.len();
            holders.retain(|h| h.client != client.0);
            removed += before - holders.len();
            !holders.is_empty()
        });
        self.len -= removed;
        for slot in 0..self.slots.len() {
            if self.slots[slot].holder.client == client.0 {
                // Slot numbers fit u32: the table never holds more than that many.
                self.remove_holder(slot as u32, client.0);
            }
        }
    }

    /// Removes up to `EXPIRE_BATCH_MAX` promises that expired at or before `now`;
    /// returns how many. Call it periodically: each call is cheap.
    pub fn expire(&mut self, now: Millis) -> usize {
        // A promise lapsing in second s is due once s * 1000 <= now.
        let due = u32::try_from(now.0 / 1000).unwrap_or(u32::MAX);
        let mut removed = 0;
        while removed < EXPIRE_BATCH_MAX {
            let Some((slot, holder)) = self.pop_due(due) else {
                break;
            };
            self.remove_holder(slot, holder.client);
            removed += 1;
        }
        removed
    }

    /// The clients holding a promise on `fid`, in key order.
    pub fn holders(&self, fid: Fid) -> Vec<ClientKey> {
        let Some(slot) = self.index.get(&self.slots, fid) else {
            return Vec::new();
        };
        let mut clients = vec![ClientKey(self.slots[slot as usize].holder.client)];
        if let Some(extra) = self.extra.get(&slot) {
            clients.extend(extra.iter().map(|h| ClientKey(h.client)));
        }
        clients.sort_unstable();
        clients
    }

    /// A copy of every promise, for a snapshot (see `capture_into`).
    pub fn capture(&self) -> CallbackCapture {
        let mut capture = CallbackCapture::default();
        self.capture_into(&mut capture);
        capture
    }

    /// The slots a capture copies: give `CallbackCapture::with_room` a little more (the
    /// table may grow before `capture_into` runs; then the copy allocates).
    pub fn capture_room(&self) -> usize {
        self.slots.len()
    }

    /// Adds a copy of every promise to `capture` (the tables of one server's shards
    /// share one): two flat copies (the slots by memcpy, the shared-file holders
    /// flattened), so the caller's lock is held briefly; walk it with
    /// `CallbackCapture::iter` after unlocking.
    pub fn capture_into(&self, capture: &mut CallbackCapture) {
        let base = capture.slots.len();
        capture.slots.extend_from_slice(&self.slots);
        capture.extra.reserve(self.len - self.index.len);
        for (&slot, holders) in &self.extra {
            let slot = base + slot as usize;
            capture
                .extra
                .extend(holders.iter().map(|&holder| (slot, holder)));
        }
        capture.len += self.len;
    }

    fn holder(&self, slot: u32, client: u32) -> Option<Holder> {
        let inline = self.slots[slot as usize].holder;
        if inline.client == client {
            return Some(inline);
        }
        self.extra
            .get(&slot)?
            .iter()
            .find(|h| h.client == client)
            .copied()
    }

    fn set_expiry(&mut self, slot: u32, client: u32, expiry: u32) {
        let inline = &mut self.slots[slot as usize].holder;
        if inline.client == client {
            inline.expiry = expiry;
        } else if let Some(holder) = self
            .extra
            .get_mut(&slot)
            .and_then(|extra| extra.iter_mut().find(|h| h.client == client))
        {
            holder.expiry = expiry;
        }
    }

    /// The slot of `fid`, taking a free one (with no holder yet) if it has none.
    fn intern(&mut self, fid: Fid) -> u32 {
        if let Some(slot) = self.index.get(&self.slots, fid) {
            return slot;
        }
        let vacant = Slot { fid, ..FREE_SLOT };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = vacant;
                slot
            }
            None => {
                self.slots.push(vacant);
                // At most `PROMISE_COUNT_LIMIT` slots: every slot in use has a holder.
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(&self.slots, slot);
        slot
    }

    fn add_holder(&mut self, slot: u32, holder: Holder) {
        let inline = &mut self.slots[slot as usize].holder;
        if inline.client == NO_CLIENT {
            *inline = holder;
        } else {
            self.extra.entry(slot).or_default().push(holder);
        }
        self.len += 1;
    }

    /// Removes `client`'s promise on the fid in `slot`, freeing the slot when it was the
    /// last. Its wheel entry goes stale.
    fn remove_holder(&mut self, slot: u32, client: u32) -> Option<Holder> {
        let inline = self.slots[slot as usize].holder;
        if inline.client == client {
            match self.extra.get_mut(&slot) {
                Some(extra) => {
                    // Another holder moves inline; the side list shrinks.
                    let next = extra.pop().unwrap_or(Holder {
                        client: NO_CLIENT,
                        expiry: 0,
                    });
                    if extra.is_empty() {
                        self.extra.remove(&slot);
                    }
                    self.slots[slot as usize].holder = next;
                    if next.client == NO_CLIENT {
                        self.free_slot(slot);
                    }
                }
                None => self.free_slot(slot),
            }
            self.len -= 1;
            return Some(inline);
        }
        let extra = self.extra.get_mut(&slot)?;
        let position = extra.iter().position(|h| h.client == client)?;
        let holder = extra.swap_remove(position);
        if extra.is_empty() {
            self.extra.remove(&slot);
        }
        self.len -= 1;
        Some(holder)
    }

    fn free_slot(&mut self, slot: u32) {
        self.index.remove(&self.slots, slot);
        self.slots[slot as usize].holder = Holder {
            client: NO_CLIENT,
            expiry: 0,
        };
        self.free.push(slot);
    }

    fn wheel_push(&mut self, expiry: u32, slot: u32, client: u32) {
        self.wheel.entry(expiry).or_default().push((slot, client));
        self.wheel_len += 1;
        if self.wheel_len > 2 * self.len + WHEEL_SLACK {
            self.rebuild_wheel();
        }
    }

    /// Drops the stale wheel entries: amortized over the renewals that made them.
    fn rebuild_wheel(&mut self) {
        let mut wheel: BTreeMap<u32, Vec<(u32, u32)>> = BTreeMap::new();
        for (slot, entry) in self.slots.iter().enumerate() {
            if entry.holder.client != NO_CLIENT {
                let at = wheel.entry(entry.holder.expiry).or_default();
                at.push((slot as u32, entry.holder.client));
            }
        }
        for (&slot, holders) in &self.extra {
            for holder in holders {
                wheel
                    .entry(holder.expiry)
                    .or_default()
                    .push((slot, holder.client));
            }
        }
        self.wheel = wheel;
        self.wheel_len = self.len;
    }

    /// Takes the wheel's soonest live promise if it lapses at or before second `due`,
    /// discarding the stale entries in front of it.
    fn pop_due(&mut self, due: u32) -> Option<(u32, Holder)> {
        loop {
            let mut bucket = self.wheel.first_entry()?;
            let second = *bucket.key();
            if second > due {
                return None;
            }
            let popped = bucket.get_mut().pop();
            if bucket.get().is_empty() {
                bucket.remove();
            }
            let Some((slot, client)) = popped else {
                continue;
            };
            self.wheel_len -= 1;
            if let Some(holder) = self.holder(slot, client)
                && holder.expiry == second
                && holder.client != NO_CLIENT
            {
                return Some((slot, holder));
            }
        }
    }
}

/// Fid -> slot number, by open addressing with linear probing over a power-of-two array
/// of slot numbers (4 bytes a bucket, at most three quarters full): the fids themselves
/// live only in the slots. The hash is a fixed mix (the tables draw no randomness):
/// promises are granted only on fids of existing vnodes, which the server assigns.
#[derive(Debug, Default)]
struct FidIndex {
    buckets: Vec<u32>,
    len: usize,
}

fn fid_hash(fid: Fid) -> u64 {
    let mut h = fid.volume.0 ^ fid.vnode.0.rotate_left(29) ^ (u64::from(fid.unique.0) << 17);
    h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl FidIndex {
    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    fn home(&self, fid: Fid) -> usize {
        fid_hash(fid) as usize & self.mask()
    }

    fn get(&self, slots: &[Slot], fid: Fid) -> Option<u32> {
        if self.buckets.is_empty() {
            return None;
        }
        let mut at = self.home(fid);
        loop {
            let slot = self.buckets[at];
            if slot == NO_SLOT {
                return None;
            }
            if slots[slot as usize].fid == fid {
                return Some(slot);
            }
            at = (at + 1) & self.mask();
        }
    }

    /// Indexes `slot` (whose fid is not indexed yet).
    fn insert(&mut self, slots: &[Slot], slot: u32) {
        self.reserve(slots, self.len + 1);
        self.place(slots[slot as usize].fid, slot);
        self.len += 1;
    }

    fn place(&mut self, fid: Fid, slot: u32) {
        let mut at = self.home(fid);
        while self.buckets[at] != NO_SLOT {
            at = (at + 1) & self.mask();
        }
        self.buckets[at] = slot;
    }

    /// Grows (rehashing) so that `count` entries stay within three quarters.
    fn reserve(&mut self, slots: &[Slot], count: usize) {
        if count * 4 <= self.buckets.len() * 3 {
            return;
        }
        let size = (count * 4 / 3 + 1).next_power_of_two().max(16);
        let old = std::mem::replace(&mut self.buckets, vec![NO_SLOT; size]);
        for slot in old.into_iter().filter(|&slot| slot != NO_SLOT) {
            self.place(slots[slot as usize].fid, slot);
        }
    }

    /// Unindexes `slot`, shifting back the entries probed past it so that every lookup
    /// still finds its entry before an empty bucket.
    fn remove(&mut self, slots: &[Slot], slot: u32) {
        let fid = slots[slot as usize].fid;
        let mask = self.mask();
        let mut hole = self.home(fid);
        while self.buckets[hole] != slot {
            if self.buckets[hole] == NO_SLOT {
                return;
            }
            hole = (hole + 1) & mask;
        }
        let mut next = (hole + 1) & mask;
        loop {
            let moved = self.buckets[next];
            if moved == NO_SLOT {
                break;
            }
            let home = self.home(slots[moved as usize].fid);
            // `moved` may fill the hole unless its home lies cyclically in (hole, next].
            let stays = if hole <= next {
                hole < home && home <= next
            } else {
                hole < home || home <= next
            };
            if !stays {
                self.buckets[hole] = moved;
                hole = next;
            }
            next = (next + 1) & mask;
        }
        self.buckets[hole] = NO_SLOT;
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proto::{Uniquifier, VnodeId, VolumeId};

    fn fid(n: u64) -> Fid {
        Fid {
            volume: VolumeId(7),
            vnode: VnodeId(n),
            unique: Uniquifier(1),
        }
    }

    fn table(max: usize) -> CallbackTable {
        CallbackTable::new(CallbackTableConfig {
            promise_count_max: max,
            lifetime: Duration::from_secs(3600),
            lifetime_min: Duration::from_secs(60),
            pressure_start_percent: 75,
        })
    }

    const A: ClientKey = ClientKey(0);
    const B: ClientKey = ClientKey(1);
    const C: ClientKey = ClientKey(2);

    #[test]
    fn break_returns_other_holders_and_keeps_the_changer() {
        let mut t = table(100);
        for client in [A, B, C] {
            t.grant(fid(1), client, Millis(0));
        }
        t.grant(fid(2), B, Millis(0));
        assert_eq!(t.break_fid(fid(1), Some(A)), vec![B, C]);
        assert_eq!(t.holders(fid(1)), vec![A]);
        assert_eq!(t.holders(fid(2)), vec![B]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.break_fid(fid(1), None), vec![A]);
        assert_eq!(t.break_fid(fid(1), None), Vec::<ClientKey>::new());
    }

    #[test]
    fn regrant_renews_without_growing() {
        let mut t = table(100);
        t.grant(fid(1), A, Millis(0));
        t.grant(fid(1), A, Millis(1000));
        assert_eq!(t.len(), 1);
        // The renewed expiry is 1 s later than the first one.
        assert_eq!(t.expire(Millis(3_600_000)), 0);
        assert_eq!(t.expire(Millis(3_601_000)), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn lifetime_shrinks_under_pressure() {
        let mut t = table(100);
        for n in 0..75 {
            assert_eq!(
                t.grant(fid(n), A, Millis(0)).lifetime,
                Duration::from_secs(3600)
            );
        }
        for n in 75..99 {
            t.grant(fid(n), A, Millis(0));
        }
        // 99 of 100: 24/25 of the way from 3600 s to 60 s.
        let lifetime = t.grant(fid(99), A, Millis(0)).lifetime;
        assert_eq!(
            lifetime,
            Duration::from_millis(3_600_000 - 3_540_000 * 24 / 25)
        );
        assert_eq!(
            t.grant(fid(100), A, Millis(0)).lifetime,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn full_table_evicts_expired_silently_then_soonest_with_a_break() {
        let mut t = table(2);
        t.grant(fid(1), A, Millis(0)); // expires at 3600 s
        t.grant(fid(2), B, Millis(1_000_000)); // expires at 4600 s
        // At 4000 s fid 1 has expired: evicting it owes nobody a break.
        let grant = t.grant(fid(3), C, Millis(4_000_000));
        assert_eq!(grant.evicted, None);
        assert_eq!(grant.lifetime, Duration::from_secs(60)); // full table: shortest
        assert_eq!(t.len(), 2);
        // fid 3 (C) now expires first and has not expired: C is owed a break.
        let grant = t.grant(fid(4), A, Millis(4_000_000));
        assert_eq!(grant.evicted, Some((fid(3), C)));
        assert_eq!(t.len(), 2);
        assert_eq!(t.holders(fid(3)), Vec::<ClientKey>::new());
        assert_eq!(t.holders(fid(2)), vec![B]);
    }

    #[test]
    fn give_up_and_drop_client() {
        let mut t = table(100);
        t.grant(fid(1), A, Millis(0));
        t.grant(fid(2), A, Millis(0));
        t.grant(fid(1), B, Millis(0));
        t.give_up(A, &[fid(1), fid(9)]);
        assert_eq!(t.holders(fid(1)), vec![B]);
        t.drop_client(A);
        assert_eq!(t.holders(fid(2)), Vec::<ClientKey>::new());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn expire_is_incremental() {
        let mut t = table(10_000);
        for n in 0..3000 {
            t.grant(fid(n), A, Millis(0));
        }
        let later = Millis(3_600_000);
        assert_eq!(t.expire(later), EXPIRE_BATCH_MAX);
        assert_eq!(t.expire(later), EXPIRE_BATCH_MAX);
        assert_eq!(t.expire(later), 3000 - 2 * EXPIRE_BATCH_MAX);
        assert!(t.is_empty());
    }

    #[test]
    fn index_survives_churn_and_capture_sees_every_promise() {
        let mut t = table(100_000);
        for n in 0..20_000 {
            t.grant(fid(n), A, Millis(0));
            if n % 3 == 0 {
                t.grant(fid(n), B, Millis(0));
            }
        }
        for n in (0..20_000).step_by(2) {
            t.break_fid(fid(n), None);
        }
        for n in 0..20_000 {
            let expected = match (n % 2, n % 3) {
                (0, _) => vec![],
                (_, 0) => vec![A, B],
                _ => vec![A],
            };
            assert_eq!(t.holders(fid(n)), expected, "fid {n}");
        }
        let capture = t.capture();
        assert_eq!(capture.len(), t.len());
        assert_eq!(capture.iter().count(), t.len());
        assert!(
            capture
                .iter()
                .all(|(_, _, expiry)| expiry == Millis(3_600_000))
        );
        // Freed slots are reused: the table does not grow for the same number of fids.
        for n in (0..20_000).step_by(2) {
            t.grant(fid(n + 1_000_000), C, Millis(0));
        }
        assert_eq!(t.holders(fid(1_000_000)), vec![C]);
        // 10,000 odd fids held by A, 3,333 of them by B too, and 10,000 new ones.
        assert_eq!(t.len(), 23_333);
    }

    #[test]
    fn renewals_never_move_expiry_earlier_and_stale_wheel_entries_are_skipped() {
        let mut t = table(10);
        let first = t.grant(fid(1), A, Millis(0));
        assert_eq!(first.expiry, Millis(3_600_000));
        assert_eq!(first.previous, None);
        for second in 1..10_000u64 {
            t.grant(fid(1), A, Millis(second * 1000));
        }
        assert_eq!(t.len(), 1);
        assert_eq!(t.expire(Millis(10_000_000)), 0);
        assert_eq!(t.expire(Millis(13_599_000)), 1);
        assert!(t.is_empty());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Grant(u64, u32, u64),
        Break(u64, Option<u32>),
        GiveUp(u32, u64),
        Drop(u32),
        Expire(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..20u64, 0..5u32, 0..10_000_000u64).prop_map(|(f, c, t)| Op::Grant(f, c, t)),
            2 => (0..20u64, proptest::option::of(0..5u32)).prop_map(|(f, c)| Op::Break(f, c)),
            1 => (0..5u32, 0..20u64).prop_map(|(c, f)| Op::GiveUp(c, f)),
            1 => (0..5u32).prop_map(Op::Drop),
            1 => (0..10_000_000u64).prop_map(Op::Expire),
        ]
    }

    proptest! {
        #[test]
        fn never_exceeds_max_and_break_returns_exactly_the_others(
            max in 1..30usize,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let mut t = table(max);
            for op in ops {
                match op {
                    Op::Grant(f, c, now) => {
                        t.grant(fid(f), ClientKey(c), Millis(now));
                        prop_assert!(t.holders(fid(f)).contains(&ClientKey(c)));
                    }
                    Op::Break(f, except) => {
                        let except = except.map(ClientKey);
                        let before = t.holders(fid(f));
                        let expected: Vec<ClientKey> =
                            before.iter().copied().filter(|&c| Some(c) != except).collect();
                        prop_assert_eq!(t.break_fid(fid(f), except), expected);
                        let after = t.holders(fid(f));
                        prop_assert!(after.iter().all(|&c| Some(c) == except));
                    }
                    Op::GiveUp(c, f) => {
                        t.give_up(ClientKey(c), &[fid(f)]);
                        prop_assert!(!t.holders(fid(f)).contains(&ClientKey(c)));
                    }
                    Op::Drop(c) => t.drop_client(ClientKey(c)),
                    Op::Expire(now) => {
                        t.expire(Millis(now));
                    }
                }
                prop_assert!(t.len() <= max);
                let counted: usize = (0..20).map(|f| t.holders(fid(f)).len()).sum();
                prop_assert_eq!(counted, t.len());
                let mut captured: Vec<(Fid, ClientKey)> =
                    t.capture().iter().map(|(f, c, _)| (f, c)).collect();
                captured.sort_unstable();
                let mut held: Vec<(Fid, ClientKey)> = (0..20)
                    .flat_map(|f| t.holders(fid(f)).into_iter().map(move |c| (fid(f), c)))
                    .collect();
                held.sort_unstable();
                prop_assert_eq!(captured, held);
            }
        }
    }
}
