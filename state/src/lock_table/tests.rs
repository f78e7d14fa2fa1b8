//! Lock table rules, each fed as events and checked by the exact effects it emits.

use proto::{LockOwnerId, Uniquifier, VnodeId, VolumeId};

use super::*;
use LockKind::{Exclusive, Shared};

fn fid(n: u64) -> Fid {
    Fid {
        volume: VolumeId(7),
        vnode: VnodeId(n),
        unique: Uniquifier(1),
    }
}

fn owner(client: u32, owner: u64) -> LockOwner {
    LockOwner {
        client: ClientKey(client),
        owner: LockOwnerId(owner),
    }
}

fn range(start: u64, end: u64) -> ByteRange {
    ByteRange::new(start, end).unwrap()
}

const A: LockOwner = LockOwner {
    client: ClientKey(0),
    owner: LockOwnerId(1),
};
const B: LockOwner = LockOwner {
    client: ClientKey(1),
    owner: LockOwnerId(1),
};
const C: LockOwner = LockOwner {
    client: ClientKey(2),
    owner: LockOwnerId(1),
};
const EOF: u64 = ByteRange::EOF;

fn table() -> LockTable {
    LockTable::new(LockTableConfig::default())
}

/// The locks on `fid`, sorted by owner and range.
fn held(t: &LockTable, f: Fid) -> Vec<(LockOwner, u64, u64, LockKind)> {
    let mut locks: Vec<_> = t
        .iter()
        .filter(|(at, _)| *at == f)
        .map(|(_, l)| (l.owner, l.range.start(), l.range.end(), l.kind))
        .collect();
    locks.sort_unstable_by_key(|&(o, s, e, _)| (o, s, e));
    locks
}

fn granted(wait: WaitId, f: Fid, owner: LockOwner, r: ByteRange, kind: LockKind) -> Effect {
    Effect::Granted {
        wait,
        fid: f,
        owner,
        range: r,
        kind,
    }
}

fn lock(t: &mut LockTable, o: LockOwner, s: u64, e: u64, k: LockKind, wait: bool) -> LockReply {
    t.lock(fid(1), o, range(s, e), k, wait)
}

fn ok(outcome: LockOutcome) -> LockReply {
    LockReply {
        outcome,
        effects: Vec::new(),
    }
}

#[test]
fn shared_locks_coexist_exclusive_conflicts_and_names_the_holder() {
    let mut t = table();
    assert_eq!(
        lock(&mut t, A, 0, 10, Shared, false),
        ok(LockOutcome::Granted)
    );
    assert_eq!(
        lock(&mut t, B, 5, 15, Shared, false),
        ok(LockOutcome::Granted)
    );
    let holder = Lock {
        owner: A,
        range: range(0, 10),
        kind: Shared,
    };
    assert_eq!(
        lock(&mut t, C, 0, 1, Exclusive, false),
        ok(LockOutcome::Conflict { holder })
    );
    assert_eq!(t.test(fid(1), C, range(0, 1), Exclusive), Some(holder));
    assert_eq!(t.test(fid(1), C, range(0, 1), Shared), None);
    assert_eq!(t.test(fid(1), A, range(0, 5), Exclusive), None);
    assert_eq!(t.test(fid(2), C, range(0, 5), Exclusive), None);
    // Disjoint ranges never conflict.
    assert_eq!(
        lock(&mut t, C, 15, EOF, Exclusive, false),
        ok(LockOutcome::Granted)
    );
    assert_eq!(t.len(), 3);
    assert_eq!(t.waiter_count(), 0);
}

#[test]
fn same_owner_lock_splits_its_own_range() {
    let mut t = table();
    lock(&mut t, A, 0, 100, Shared, false);
    assert_eq!(
        lock(&mut t, A, 40, 60, Exclusive, false),
        ok(LockOutcome::Granted)
    );
    assert_eq!(
        held(&t, fid(1)),
        vec![
            (A, 0, 40, Shared),
            (A, 40, 60, Exclusive),
            (A, 60, 100, Shared)
        ]
    );
    assert_eq!(t.len(), 3);
    // Locking the middle back to shared merges the three pieces into one.
    lock(&mut t, A, 40, 60, Shared, false);
    assert_eq!(held(&t, fid(1)), vec![(A, 0, 100, Shared)]);
    assert_eq!(t.len(), 1);
}

#[test]
fn same_owner_adjacent_and_overlapping_locks_merge() {
    let mut t = table();
    lock(&mut t, A, 0, 10, Exclusive, false);
    lock(&mut t, A, 20, 30, Exclusive, false);
    lock(&mut t, A, 10, 20, Exclusive, false);
    assert_eq!(held(&t, fid(1)), vec![(A, 0, 30, Exclusive)]);
    lock(&mut t, A, 25, EOF, Exclusive, false);
    assert_eq!(held(&t, fid(1)), vec![(A, 0, EOF, Exclusive)]);
    // A different kind next to it stays separate.
    let mut t = table();
    lock(&mut t, A, 0, 10, Shared, false);
    lock(&mut t, A, 10, 20, Exclusive, false);
    assert_eq!(
        held(&t, fid(1)),
        vec![(A, 0, 10, Shared), (A, 10, 20, Exclusive)]
    );
}

#[test]
fn upgrade_and_downgrade_in_place() {
    let mut t = table();
    lock(&mut t, A, 0, 10, Shared, false);
    assert_eq!(
        lock(&mut t, A, 0, 10, Exclusive, false),
        ok(LockOutcome::Granted)
    );
    assert_eq!(held(&t, fid(1)), vec![(A, 0, 10, Exclusive)]);
    // B waits for a shared lock; A's downgrade grants it.
    let LockOutcome::Queued(wait) = lock(&mut t, B, 0, 10, Shared, true).outcome else {
        panic!("B must queue behind A's exclusive lock");
    };
    assert_eq!(
        lock(&mut t, A, 0, 10, Shared, false),
        LockReply {
            outcome: LockOutcome::Granted,
            effects: vec![granted(wait, fid(1), B, range(0, 10), Shared)],
        }
    );
    assert_eq!(
        held(&t, fid(1)),
        vec![(A, 0, 10, Shared), (B, 0, 10, Shared)]
    );
    // An upgrade blocked by another shared holder is refused, not granted.
    assert_eq!(
        lock(&mut t, A, 0, 10, Exclusive, false).outcome,
        LockOutcome::Conflict {
            holder: Lock {
                owner: B,
                range: range(0, 10),
                kind: Shared
            }
        }
    );
}

#[test]
fn unlock_of_a_sub_range_splits_and_wakes_the_waiter_there() {
    let mut t = table();
    lock(&mut t, A, 0, EOF, Exclusive, false);
    let LockOutcome::Queued(wait) = lock(&mut t, B, 40, 50, Exclusive, true).outcome else {
        panic!("B must queue");
    };
    assert_eq!(
        t.unlock(fid(1), A, range(30, 60)),
        Ok(vec![granted(wait, fid(1), B, range(40, 50), Exclusive)])
    );
    assert_eq!(
        held(&t, fid(1)),
        vec![
            (A, 0, 30, Exclusive),
            (A, 60, EOF, Exclusive),
            (B, 40, 50, Exclusive)
        ]
    );
    assert_eq!(t.len(), 3);
    assert_eq!(t.waiter_count(), 0);
    // Unlocking what is not held changes nothing.
    assert_eq!(t.unlock(fid(1), C, range(0, EOF)), Ok(vec![]));
    assert_eq!(t.unlock(fid(9), A, range(0, EOF)), Ok(vec![]));
    assert_eq!(t.unlock(fid(1), A, range(0, EOF)), Ok(vec![]));
    assert_eq!(held(&t, fid(1)), vec![(B, 40, 50, Exclusive)]);
}

#[test]
fn waiters_are_granted_in_fifo_order() {
    let mut t = table();
    lock(&mut t, A, 0, 10, Exclusive, false);
    let q = |reply: LockReply| match reply.outcome {
        LockOutcome::Queued(wait) => wait,
        other => panic!("expected to queue, got {other:?}"),
    };
    let b = q(lock(&mut t, B, 0, 10, Exclusive, true));
    let c = q(lock(&mut t, C, 0, 10, Exclusive, true));
    assert_eq!(t.waiter_count(), 2);
    assert_eq!(
        t.unlock(fid(1), A, range(0, 10)),
        Ok(vec![granted(b, fid(1), B, range(0, 10), Exclusive)])
    );
    assert_eq!(
        t.unlock(fid(1), B, range(0, 10)),
        Ok(vec![granted(c, fid(1), C, range(0, 10), Exclusive)])
    );
}

#[test]
fn release_wakes_every_compatible_shared_waiter_at_once() {
    let mut t = table();
    lock(&mut t, A, 0, 10, Exclusive, false);
    let b = lock(&mut t, B, 0, 10, Shared, true).outcome;
    let c = lock(&mut t, C, 5, 6, Shared, true).outcome;
    let (LockOutcome::Queued(b), LockOutcome::Queued(c)) = (b, c) else {
        panic!("both must queue");
    };
    assert_eq!(
        t.unlock(fid(1), A, range(0, 10)),
        Ok(vec![
            granted(b, fid(1), B, range(0, 10), Shared),
            granted(c, fid(1), C, range(5, 6), Shared),
        ])
    );
}

#[test]
fn shared_requests_do_not_overtake_a_queued_exclusive_one() {
    let mut t = table();
    lock(&mut t, A, 0, 10, Shared, false);
    let LockOutcome::Queued(b) = lock(&mut t, B, 0, 10, Exclusive, true).outcome else {
        panic!("B must queue behind A's shared lock");
    };
    let queued_b = Lock {
        owner: B,
        range: range(0, 10),
        kind: Exclusive,
    };
    // A new shared request from C would starve B: it is refused, naming B's request.
    assert_eq!(
        lock(&mut t, C, 0, 10, Shared, false),
        ok(LockOutcome::Conflict { holder: queued_b })
    );
    assert_eq!(t.test(fid(1), C, range(0, 10), Shared), Some(queued_b));
    let LockOutcome::Queued(c) = lock(&mut t, C, 0, 10, Shared, true).outcome else {
        panic!("C must queue behind B");
    };
    // C's request does not overlap B's at byte 20: it goes through.
    assert_eq!(
        lock(&mut t, C, 20, 30, Shared, false),
        ok(LockOutcome::Granted)
    );
    // A leaves: B first, and C only after B.
    assert_eq!(
        t.unlock(fid(1), A, range(0, 10)),
        Ok(vec![granted(b, fid(1), B, range(0, 10), Exclusive)])
    );
    assert_eq!(
        t.unlock(fid(1), B, range(0, 10)),
        Ok(vec![granted(c, fid(1), C, range(0, 10), Shared)])
    );
}

#[test]
fn an_upgrade_is_not_held_back_by_a_waiter_blocked_on_the_upgrader() {
    let mut t = table();
    lock(&mut t, A, 0, 10, Shared, false);
    let LockOutcome::Queued(b) = lock(&mut t, B, 0, 10, Exclusive, true).outcome else {
        panic!("B must queue");
    };
    // B waits on A; holding A back behind B would deadlock them.
    assert_eq!(
        lock(&mut t, A, 0, 10, Exclusive, false),
        ok(LockOutcome::Granted)
    );
    assert_eq!(
        t.unlock(fid(1), A, range(0, 10)),
        Ok(vec![granted(b, fid(1), B, range(0, 10), Exclusive)])
    );
}

#[test]
fn cancelled_waiter_unblocks_those_behind_it() {
    let mut t = table();
    lock(&mut t, A, 0, 10, Shared, false);
    let LockOutcome::Queued(b) = lock(&mut t, B, 0, 10, Exclusive, true).outcome else {
        panic!("B must queue");
    };
    let LockOutcome::Queued(c) = lock(&mut t, C, 0, 10, Shared, true).outcome else {
        panic!("C must queue behind B");
    };
    assert_eq!(
        t.cancel_wait(b),
        vec![granted(c, fid(1), C, range(0, 10), Shared)]
    );
    assert_eq!(t.cancel_wait(b), vec![]);
    assert_eq!(t.cancel_wait(c), vec![]);
    assert_eq!(t.waiter_count(), 0);
}

#[test]
fn lease_lapse_releases_locks_and_waits_and_wakes_others_in_fid_order() {
    let mut t = table();
    let a2 = owner(0, 2); // a second lock owner on A's client
    t.lock(fid(2), A, range(0, EOF), Exclusive, false);
    t.lock(fid(1), a2, range(0, 10), Exclusive, false);
    let LockOutcome::Queued(b2) = t.lock(fid(2), B, range(0, 1), Shared, true).outcome else {
        panic!("B must queue on fid 2");
    };
    let LockOutcome::Queued(b1) = t.lock(fid(1), B, range(0, 10), Exclusive, true).outcome else {
        panic!("B must queue on fid 1");
    };
    // C holds nothing on fid 3, but A waits there: that wait goes too.
    t.lock(fid(3), C, range(0, 1), Exclusive, false);
    t.lock(fid(3), A, range(0, 1), Exclusive, true);
    assert_eq!(t.waiter_count(), 3);
    assert_eq!(
        t.release_client(ClientKey(0)),
        vec![
            granted(b1, fid(1), B, range(0, 10), Exclusive),
            granted(b2, fid(2), B, range(0, 1), Shared),
        ]
    );
    assert_eq!(t.locks_of(ClientKey(0)), vec![]);
    assert_eq!(t.waiter_count(), 0);
    assert_eq!(t.len(), 3);
    assert_eq!(
        t.locks_of(ClientKey(1)),
        vec![
            (
                fid(1),
                Lock {
                    owner: B,
                    range: range(0, 10),
                    kind: Exclusive
                }
            ),
            (
                fid(2),
                Lock {
                    owner: B,
                    range: range(0, 1),
                    kind: Shared
                }
            ),
        ]
    );
    assert_eq!(t.release_client(ClientKey(0)), vec![]);
}

#[test]
fn bounded_locks_and_waiters() {
    let mut t = LockTable::new(LockTableConfig {
        lock_count_max: 3,
        lock_count_per_fid_max: 2,
        waiter_count_max: 2,
        waiter_count_per_fid_max: 1,
    });
    assert_eq!(
        lock(&mut t, A, 0, 100, Shared, false).outcome,
        LockOutcome::Granted
    );
    // Splitting A's lock in three would make 3 locks on fid 1.
    assert_eq!(
        lock(&mut t, A, 40, 60, Exclusive, false).outcome,
        LockOutcome::TooMany
    );
    assert_eq!(t.unlock(fid(1), A, range(40, 60)), Ok(vec![]));
    assert_eq!(t.len(), 2);
    // Now fid 1 is full: splitting further fails, whole-range unlock cannot.
    assert_eq!(t.unlock(fid(1), A, range(10, 20)), Err(TooManyLocks));
    assert_eq!(
        lock(&mut t, B, 200, 300, Shared, false).outcome,
        LockOutcome::TooMany
    );
    assert_eq!(
        t.lock(fid(2), B, range(0, 1), Exclusive, false).outcome,
        LockOutcome::Granted
    );
    assert_eq!(
        t.lock(fid(3), B, range(0, 1), Exclusive, false).outcome,
        LockOutcome::TooMany
    );
    // Waiters: one per fid.
    assert!(matches!(
        t.lock(fid(2), C, range(0, 1), Shared, true).outcome,
        LockOutcome::Queued(_)
    ));
    assert_eq!(
        t.lock(fid(2), A, range(0, 1), Shared, true).outcome,
        LockOutcome::TooMany
    );
    assert_eq!(t.len(), 3);
    assert_eq!(t.waiter_count(), 1);
    assert_eq!(t.unlock(fid(1), A, range(0, EOF)), Ok(vec![]));
    assert_eq!(t.len(), 1);
}

#[test]
fn a_waiter_that_would_overflow_stays_queued_until_its_fid_frees_room() {
    let mut t = LockTable::new(LockTableConfig {
        lock_count_max: 2,
        ..LockTableConfig::default()
    });
    t.lock(fid(1), A, range(0, 10), Exclusive, false);
    t.lock(fid(2), C, range(0, 10), Exclusive, false);
    let LockOutcome::Queued(b) = t.lock(fid(1), B, range(0, 10), Shared, true).outcome else {
        panic!("B must queue");
    };
    // A downgrades: B no longer conflicts, but the table is full, so B keeps waiting.
    assert_eq!(
        lock(&mut t, A, 0, 10, Shared, false),
        ok(LockOutcome::Granted)
    );
    assert_eq!(t.waiter_count(), 1);
    // Room freed on another fid is used at fid 1's next change, not before.
    assert_eq!(t.unlock(fid(2), C, range(0, 10)), Ok(vec![]));
    assert_eq!(
        t.unlock(fid(1), A, range(0, 10)),
        Ok(vec![granted(b, fid(1), B, range(0, 10), Shared)])
    );
}

#[test]
fn a_grant_that_weakens_its_owner_wakes_a_waiter_passed_over_before_it() {
    let mut t = table();
    let a2 = owner(0, 2);
    lock(&mut t, B, 0, 4, Exclusive, false);
    let q = |reply: LockReply| match reply.outcome {
        LockOutcome::Queued(wait) => wait,
        other => panic!("expected to queue, got {other:?}"),
    };
    let first = q(lock(&mut t, a2, 3, 4, Exclusive, true));
    let c = q(lock(&mut t, C, 0, 4, Shared, true));
    let second = q(lock(&mut t, a2, 0, 4, Shared, true));
    // B goes: a2's exclusive byte 3 holds C back, but a2's next grant (shared over
    // [0, 4)) replaces it, and C is granted in the same release.
    assert_eq!(
        t.release_client(B.client),
        vec![
            granted(first, fid(1), a2, range(3, 4), Exclusive),
            granted(second, fid(1), a2, range(0, 4), Shared),
            granted(c, fid(1), C, range(0, 4), Shared),
        ]
    );
}

#[test]
fn a_fid_with_one_lock_and_no_waiter_allocates_nothing() {
    // The entry itself: one inline lock (40 bytes), its length, the queue's pointer.
    assert!(std::mem::size_of::<FileLocks>() <= 56);
    let mut t = table();
    let inline = |t: &LockTable| {
        let file = &t.files[&fid(1)];
        !file.granted.spilled() && file.waiters.is_empty()
    };
    lock(&mut t, A, 0, 10, Shared, false);
    assert!(inline(&t));
    // A second lock spills to the heap; back to one, it moves inline again.
    lock(&mut t, B, 0, 10, Shared, false);
    assert!(t.files[&fid(1)].granted.spilled());
    assert_eq!(t.unlock(fid(1), B, range(0, 10)), Ok(vec![]));
    assert!(inline(&t));
    // A waiter boxes the queue; once it is granted, the box goes.
    let wait = match lock(&mut t, C, 0, 10, Exclusive, true).outcome {
        LockOutcome::Queued(wait) => wait,
        other => panic!("expected to queue, got {other:?}"),
    };
    assert!(!t.files[&fid(1)].waiters.is_empty());
    assert_eq!(
        t.release_client(A.client),
        vec![granted(wait, fid(1), C, range(0, 10), Exclusive)]
    );
    assert!(inline(&t));
    assert_eq!(held(&t, fid(1)), vec![(C, 0, 10, Exclusive)]);
}
