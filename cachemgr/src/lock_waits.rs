//! Blocking lock requests queued on fileservers (`LockQueued { wait }`), each waiting for
//! the server's `LockGranted { wait }` push on the same connection.
//! Invariant: a pushed grant is acknowledged only when a request of this client can claim
//! it, never for a wait its waiter withdrew, and a wait ends (`Lost`) with its connection,
//! even before its waiter registers.

use std::collections::HashMap;

use parking_lot::Mutex;
use proto::{ServerId, WaitId};
use tokio::sync::oneshot;
use tracing::warn;

/// Grants kept for requests whose `LockQueued` answer has not arrived yet.
const EARLY_GRANTS_MAX: usize = 1024;

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEnd {
    /// The server granted the lock.
    Granted,
    /// The connection that carried the request ended: ask again.
    Lost,
}

enum Slot {
    Waiting(oneshot::Sender<WaitEnd>),
    GrantedEarly,
    /// The waiter was interrupted and is withdrawing the request from the server: a grant
    /// pushed meanwhile is refused (the server then releases it). Kept across a lost
    /// connection, since the server may push on the next one; removed by `withdrawn`.
    Withdrawing,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<(ServerId, WaitId), Slot>,
    /// Blocking `SetLock` requests in flight per server.
    asking: HashMap<ServerId, usize>,
    /// Connections lost per server, so a waiter can tell whether its connection ended
    /// before it registered. One entry per server this client talks to.
    losses: HashMap<ServerId, u64>,
}

#[derive(Default)]
pub struct LockWaits {
    inner: Mutex<Inner>,
}

/// A blocking `SetLock` in flight; dropping it ends the claim on early grants.
pub struct Asking<'a> {
    waits: &'a LockWaits,
    server: ServerId,
    /// The server's loss count when the request went out.
    losses: u64,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut inner = self.waits.inner.lock();
        let left = match inner.asking.get_mut(&self.server) {
            Some(count) => {
                *count = count.saturating_sub(1);
                *count
            }
            None => 0,
        };
        if left == 0 {
            inner.asking.remove(&self.server);
            // Nobody can claim these any more (their request failed on this side).
            let before = inner.slots.len();
            inner
                .slots
                .retain(|(s, _), slot| *s != self.server || !matches!(slot, Slot::GrantedEarly));
            let orphans = before - inner.slots.len();
            if orphans > 0 {
                warn!(server = %self.server, orphans, "lock grants arrived for requests given up; the lease will end them");
            }
        }
    }
}

impl LockWaits {
    /// Marks a blocking `SetLock` to `server` as in flight until the guard drops.
    pub fn asking(&self, server: ServerId) -> Asking<'_> {
        let mut inner = self.inner.lock();
        *inner.asking.entry(server).or_default() += 1;
        let losses = inner.losses.get(&server).copied().unwrap_or(0);
        Asking {
            waits: self,
            server,
            losses,
        }
    }

    /// Registers the waiter of a request `asking` sent and the server queued as `wait`;
    /// the receiver is already complete when the grant overtook the `LockQueued`
    /// answer (`Granted`) or the connection was lost since the request went out
    /// (`Lost`: the queued request may have died with it).
    pub fn wait_for(&self, asking: &Asking<'_>, wait: WaitId) -> oneshot::Receiver<WaitEnd> {
        let server = asking.server;
        let (tx, rx) = oneshot::channel();
        let mut inner = self.inner.lock();
        let lost = inner.losses.get(&server).copied().unwrap_or(0) != asking.losses;
        if let Some(Slot::GrantedEarly) = inner.slots.get(&(server, wait)) {
            inner.slots.remove(&(server, wait));
            let _ = tx.send(WaitEnd::Granted);
        } else if lost {
            let _ = tx.send(WaitEnd::Lost);
        } else {
            inner.slots.insert((server, wait), Slot::Waiting(tx));
        }
        rx
    }

    /// The server pushed `LockGranted { wait }`; returns whether to acknowledge it. A
    /// grant is claimable by a registered waiter, or by a blocking `SetLock` still in
    /// flight to that server, since the push may overtake its `LockQueued` answer: the
    /// grant is then kept for it (up to `EARLY_GRANTS_MAX`). Any other grant is refused,
    /// so the server releases the lock rather than leave it held by nobody.
    pub fn granted(&self, server: ServerId, wait: WaitId) -> bool {
        let mut inner = self.inner.lock();
        match inner.slots.remove(&(server, wait)) {
            Some(Slot::Waiting(tx)) => tx.send(WaitEnd::Granted).is_ok(),
            Some(Slot::GrantedEarly) => true,
            Some(Slot::Withdrawing) => {
                inner.slots.insert((server, wait), Slot::Withdrawing);
                false
            }
            None => {
                let claimable = inner.asking.get(&server).is_some_and(|&n| n > 0);
                if !claimable || inner.slots.len() >= EARLY_GRANTS_MAX {
                    return false;
                }
                inner.slots.insert((server, wait), Slot::GrantedEarly);
                true
            }
        }
    }

    /// The waiter of `wait` gave up without a grant.
    pub fn forget(&self, server: ServerId, wait: WaitId) {
        self.inner.lock().slots.remove(&(server, wait));
    }

    /// The waiter of `wait` was interrupted: from now on a grant for it is refused, until
    /// `withdrawn`. Returns `false` when the wait had already ended (granted, or its
    /// connection lost): its receiver says how.
    pub fn withdraw(&self, server: ServerId, wait: WaitId) -> bool {
        let mut inner = self.inner.lock();
        match inner.slots.get_mut(&(server, wait)) {
            Some(slot @ Slot::Waiting(_)) => {
                *slot = Slot::Withdrawing;
                true
            }
            _ => false,
        }
    }

    /// The server answered the withdrawal of `wait` (or could not be told): no grant for
    /// it is expected any more.
    pub fn withdrawn(&self, server: ServerId, wait: WaitId) {
        let mut inner = self.inner.lock();
        if let Some(Slot::Withdrawing) = inner.slots.get(&(server, wait)) {
            inner.slots.remove(&(server, wait));
        }
    }

    /// The connection to `server` ended: its queued requests died with it (a restarted
    /// server forgot them; a live one cannot deliver the grant and releases it).
    pub fn connection_lost(&self, server: ServerId) {
        let mut inner = self.inner.lock();
        *inner.losses.entry(server).or_default() += 1;
        inner.slots.retain(|(s, _), slot| {
            if *s != server || matches!(slot, Slot::Withdrawing) {
                return true;
            }
            if let Slot::Waiting(_) = slot
                && let Slot::Waiting(tx) = std::mem::replace(slot, Slot::GrantedEarly)
            {
                let _ = tx.send(WaitEnd::Lost);
            }
            false
        });
    }

    /// Whether any request waits on `server` (its lease must be kept alive).
    pub fn waiting_on(&self, server: ServerId) -> bool {
        let inner = self.inner.lock();
        inner.asking.contains_key(&server) || inner.slots.keys().any(|(s, _)| *s == server)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_reaches_its_waiter() {
        let waits = LockWaits::default();
        let server = ServerId::random();
        let mut rx = {
            let asking = waits.asking(server);
            waits.wait_for(&asking, WaitId(7))
        };
        assert!(waits.waiting_on(server));
        assert!(waits.granted(server, WaitId(7)));
        assert_eq!(rx.try_recv(), Ok(WaitEnd::Granted));
        assert!(!waits.waiting_on(server));
    }

    #[test]
    fn a_grant_overtaking_its_queued_answer_is_kept_for_it() {
        let waits = LockWaits::default();
        let server = ServerId::random();
        let asking = waits.asking(server);
        assert!(waits.granted(server, WaitId(3)));
        let mut rx = waits.wait_for(&asking, WaitId(3));
        drop(asking);
        assert_eq!(rx.try_recv(), Ok(WaitEnd::Granted));
    }

    #[test]
    fn an_unclaimable_grant_is_refused() {
        let waits = LockWaits::default();
        let server = ServerId::random();
        assert!(!waits.granted(server, WaitId(1)));
        let asking = waits.asking(server);
        assert!(waits.granted(server, WaitId(2)));
        drop(asking);
        // The request that could have claimed it is gone: the early grant went with it.
        assert!(!waits.waiting_on(server));
    }

    #[test]
    fn a_lost_connection_wakes_its_waiters_only() {
        let waits = LockWaits::default();
        let (one, two) = (ServerId::random(), ServerId::random());
        let (mut a, mut b) = {
            let x = waits.asking(one);
            let y = waits.asking(two);
            (waits.wait_for(&x, WaitId(1)), waits.wait_for(&y, WaitId(1)))
        };
        waits.connection_lost(one);
        assert_eq!(a.try_recv(), Ok(WaitEnd::Lost));
        assert!(b.try_recv().is_err());
        assert!(waits.waiting_on(two));
        assert!(!waits.waiting_on(one));
    }

    #[test]
    fn a_withdrawn_wait_refuses_its_grant_until_the_server_answered() {
        let waits = LockWaits::default();
        let server = ServerId::random();
        let mut rx = {
            let asking = waits.asking(server);
            waits.wait_for(&asking, WaitId(5))
        };
        assert!(waits.withdraw(server, WaitId(5)));
        // Even with another request in flight, which could claim an unknown grant.
        let other = waits.asking(server);
        waits.connection_lost(server);
        assert!(!waits.granted(server, WaitId(5)));
        assert!(!waits.granted(server, WaitId(5)));
        assert!(rx.try_recv().is_err(), "the waiter was told nothing");
        waits.withdrawn(server, WaitId(5));
        drop(other);
        assert!(!waits.waiting_on(server));
    }

    #[test]
    fn a_grant_that_beat_the_interrupt_is_the_waiters() {
        let waits = LockWaits::default();
        let server = ServerId::random();
        let mut rx = {
            let asking = waits.asking(server);
            waits.wait_for(&asking, WaitId(6))
        };
        assert!(waits.granted(server, WaitId(6)));
        assert!(!waits.withdraw(server, WaitId(6)));
        assert_eq!(rx.try_recv(), Ok(WaitEnd::Granted));
        waits.withdrawn(server, WaitId(6));
        assert!(!waits.waiting_on(server));
    }

    #[test]
    fn a_connection_lost_before_the_waiter_registers_still_ends_the_wait() {
        let waits = LockWaits::default();
        let server = ServerId::random();
        let asking = waits.asking(server);
        // The request was queued, then the connection died before `LockQueued` was read.
        waits.connection_lost(server);
        let mut rx = waits.wait_for(&asking, WaitId(4));
        drop(asking);
        assert_eq!(rx.try_recv(), Ok(WaitEnd::Lost));
        assert!(!waits.waiting_on(server));
    }
}
