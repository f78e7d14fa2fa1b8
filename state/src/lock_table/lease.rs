//! Client leases: a client's locks live only while it keeps talking to the server.
//! Invariant: `expiry` and `by_expiry` always hold the same leases, one per client, and a
//! renewal never shortens a lease.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::client_table::ClientKey;
use crate::time::Millis;

/// The lease a client gets when the configuration says nothing.
pub const LEASE_DEFAULT: Duration = Duration::from_secs(30);

/// How many lapsed leases one `expired` call returns at most, so that a sweep never
/// holds the server's lock for long.
pub const LEASE_EXPIRE_BATCH_MAX: usize = 1024;

/// The leases of the clients of one server. Any RPC or an explicit renew pushes a
/// client's expiry one lease ahead; a client whose lease lapses loses its locks (the
/// server calls `LockTable::release_client`). Bounded by the client table the keys come
/// from.
#[derive(Debug)]
pub struct Leases {
    lease: Duration,
    expiry: HashMap<ClientKey, Millis>,
    /// Every lease ordered by expiry: the front is what `expired` takes.
    by_expiry: BTreeSet<(Millis, ClientKey)>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases::new(LEASE_DEFAULT)
    }
}

impl Leases {
    pub fn new(lease: Duration) -> Leases {
        Leases {
            lease,
            expiry: HashMap::new(),
            by_expiry: BTreeSet::new(),
        }
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Starts or renews `client`'s lease at `now`; returns its new expiry. An older
    /// `now` than the last renewal never shortens a lease.
    pub fn touch(&mut self, client: ClientKey, now: Millis) -> Millis {
        let expiry = now.saturating_add(self.lease);
        if let Some(old) = self.expiry.get_mut(&client) {
            if *old >= expiry {
                return *old;
            }
            self.by_expiry.remove(&(*old, client));
            *old = expiry;
        } else {
            self.expiry.insert(client, expiry);
        }
        self.by_expiry.insert((expiry, client));
        expiry
    }

    /// When `client`'s lease lapses, if it holds one.
    pub fn expiry(&self, client: ClientKey) -> Option<Millis> {
        self.expiry.get(&client).copied()
    }

    /// Forgets `client`'s lease (it left cleanly or was removed).
    pub fn remove(&mut self, client: ClientKey) {
        if let Some(expiry) = self.expiry.remove(&client) {
            self.by_expiry.remove(&(expiry, client));
        }
    }

    /// Removes and returns up to `LEASE_EXPIRE_BATCH_MAX` clients whose lease lapsed at
    /// or before `now`, soonest first. Call it periodically: each call is cheap.
    pub fn expired(&mut self, now: Millis) -> Vec<ClientKey> {
        let mut lapsed = Vec::new();
        while lapsed.len() < LEASE_EXPIRE_BATCH_MAX {
            match self.by_expiry.first() {
                Some(&(expiry, client)) if expiry <= now => {
                    self.by_expiry.pop_first();
                    self.expiry.remove(&client);
                    lapsed.push(client);
                }
                _ => break,
            }
        }
        lapsed
    }

    pub fn len(&self) -> usize {
        self.expiry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.expiry.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ClientKey = ClientKey(0);
    const B: ClientKey = ClientKey(1);

    #[test]
    fn touch_renews_and_expired_returns_lapsed_clients_in_order() {
        let mut leases = Leases::default();
        assert_eq!(leases.touch(A, Millis(0)), Millis(30_000));
        assert_eq!(leases.touch(B, Millis(1_000)), Millis(31_000));
        assert_eq!(leases.touch(A, Millis(10_000)), Millis(40_000));
        assert_eq!(leases.expired(Millis(30_999)), Vec::<ClientKey>::new());
        assert_eq!(leases.expired(Millis(31_000)), vec![B]);
        assert_eq!(leases.expired(Millis(100_000)), vec![A]);
        assert!(leases.is_empty());
    }

    #[test]
    fn a_late_touch_never_shortens_a_lease() {
        let mut leases = Leases::new(Duration::from_secs(10));
        leases.touch(A, Millis(5_000));
        assert_eq!(leases.touch(A, Millis(1_000)), Millis(15_000));
        assert_eq!(leases.expiry(A), Some(Millis(15_000)));
        assert_eq!(leases.expired(Millis(14_999)), Vec::<ClientKey>::new());
        assert_eq!(leases.len(), 1);
    }

    #[test]
    fn removed_leases_do_not_expire() {
        let mut leases = Leases::default();
        leases.touch(A, Millis(0));
        leases.remove(A);
        assert_eq!(leases.expired(Millis(u64::MAX)), Vec::<ClientKey>::new());
    }

    #[test]
    fn expired_is_incremental() {
        let mut leases = Leases::new(Duration::from_secs(1));
        for client in 0..2000 {
            leases.touch(ClientKey(client), Millis(0));
        }
        assert_eq!(leases.expired(Millis(1_000)).len(), LEASE_EXPIRE_BATCH_MAX);
        assert_eq!(
            leases.expired(Millis(1_000)).len(),
            2000 - LEASE_EXPIRE_BATCH_MAX
        );
        assert!(leases.is_empty());
    }
}
