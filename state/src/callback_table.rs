//! The callback promise table: which client holds a promise on which fid, until when.
//! Invariant: never more than `promise_count_max` promises; a (fid, client) pair holds at
//! most one promise; `by_fid` and `by_expiry` always describe the same set of promises.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use proto::Fid;

use crate::client_table::ClientKey;
use crate::time::Millis;

/// How many expired promises one `expire` call removes at most, so that a sweep never
/// holds the server's lock for long.
pub const EXPIRE_BATCH_MAX: usize = 1024;

/// Limits and lifetimes of a callback table.
#[derive(Clone, Debug)]
pub struct CallbackTableConfig {
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Holder {
    client: ClientKey,
    expiry: Millis,
}

/// The table of callback promises of one server.
#[derive(Debug)]
pub struct CallbackTable {
    config: CallbackTableConfig,
    by_fid: HashMap<Fid, Vec<Holder>>,
    /// Every promise ordered by expiry: the front is what `expire` and eviction take.
    by_expiry: BTreeSet<(Millis, Fid, ClientKey)>,
}

impl CallbackTable {
    pub fn new(config: CallbackTableConfig) -> CallbackTable {
        assert!(config.promise_count_max > 0, "a callback table needs room");
        CallbackTable {
            config,
            by_fid: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_expiry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_expiry.is_empty()
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
        let lifetime = self.lifetime();
        let expiry = now.saturating_add(lifetime);
        if let Some(holders) = self.by_fid.get_mut(&fid)
            && let Some(holder) = holders.iter_mut().find(|h| h.client == client)
        {
            self.by_expiry.remove(&(holder.expiry, fid, client));
            holder.expiry = expiry;
            self.by_expiry.insert((expiry, fid, client));
            return Grant {
                lifetime,
                evicted: None,
            };
        }
        let mut evicted = None;
        if self.len() >= self.config.promise_count_max
            && let Some((old_expiry, old_fid, old_client)) = self.by_expiry.pop_first()
        {
            self.remove_from_fid(old_fid, old_client);
            if old_expiry > now {
                evicted = Some((old_fid, old_client));
            }
        }
        self.by_fid
            .entry(fid)
            .or_default()
            .push(Holder { client, expiry });
        self.by_expiry.insert((expiry, fid, client));
        debug_assert!(self.len() <= self.config.promise_count_max);
        Grant { lifetime, evicted }
    }

    /// Removes every promise on `fid` except `except`'s, returning the clients that held
    /// one: they must be sent a break.
    pub fn break_fid(&mut self, fid: Fid, except: Option<ClientKey>) -> Vec<ClientKey> {
        let Some(holders) = self.by_fid.remove(&fid) else {
            return Vec::new();
        };
        let mut broken = Vec::with_capacity(holders.len());
        let mut kept = Vec::new();
        for holder in holders {
            if Some(holder.client) == except {
                kept.push(holder);
            } else {
                self.by_expiry.remove(&(holder.expiry, fid, holder.client));
                broken.push(holder.client);
            }
        }
        if !kept.is_empty() {
            self.by_fid.insert(fid, kept);
        }
        broken.sort_unstable();
        broken
    }

    /// The client dropped these promises (cache eviction).
    pub fn give_up(&mut self, client: ClientKey, fids: &[Fid]) {
        for &fid in fids {
            if let Some(expiry) = self.remove_from_fid(fid, client) {
                self.by_expiry.remove(&(expiry, fid, client));
            }
        }
    }

    /// Drops every promise of `client` (it restarted or was forgotten). Scans the
    /// table: this happens once per client restart, not per request.
    pub fn drop_client(&mut self, client: ClientKey) {
        self.by_fid.retain(|_, holders| {
            holders.retain(|h| h.client != client);
            !holders.is_empty()
        });
        self.by_expiry.retain(|&(_, _, c)| c != client);
    }

    /// Removes up to `EXPIRE_BATCH_MAX` promises that expired at or before `now`;
    /// returns how many. Call it periodically: each call is cheap.
    pub fn expire(&mut self, now: Millis) -> usize {
        let mut removed = 0;
        while removed < EXPIRE_BATCH_MAX {
            match self.by_expiry.first() {
                Some(&(expiry, fid, client)) if expiry <= now => {
                    self.by_expiry.pop_first();
                    self.remove_from_fid(fid, client);
                    removed += 1;
                }
                _ => break,
            }
        }
        removed
    }

    /// The clients holding a promise on `fid`, in key order.
    pub fn holders(&self, fid: Fid) -> Vec<ClientKey> {
        let mut clients: Vec<ClientKey> = self
            .by_fid
            .get(&fid)
            .map(|holders| holders.iter().map(|h| h.client).collect())
            .unwrap_or_default();
        clients.sort_unstable();
        clients
    }

    /// Removes the `by_fid` half of one promise, returning its expiry.
    fn remove_from_fid(&mut self, fid: Fid, client: ClientKey) -> Option<Millis> {
        let holders = self.by_fid.get_mut(&fid)?;
        let index = holders.iter().position(|h| h.client == client)?;
        let holder = holders.swap_remove(index);
        if holders.is_empty() {
            self.by_fid.remove(&fid);
        }
        Some(holder.expiry)
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
            }
        }
    }
}
