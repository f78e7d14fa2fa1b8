//! Grace rules, each fed as events and checked by the exact answers.

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

fn a_lock() -> Lock {
    Lock {
        owner: A,
        range: range(0, 10),
        kind: Exclusive,
    }
}

fn b_lock() -> Lock {
    Lock {
        owner: B,
        range: range(0, 100),
        kind: Shared,
    }
}

fn config() -> GraceConfig {
    GraceConfig {
        length: Duration::from_secs(30),
        retry: Duration::from_secs(1),
    }
}

/// A's exclusive [0, 10) and B's shared [0, 100) on fid 1, recovered at time 0.
fn grace(complete: bool) -> Grace {
    Grace::new(
        config(),
        [(fid(1), a_lock()), (fid(1), b_lock())],
        complete,
        Millis(0),
    )
}

const WAIT: GraceCheck = GraceCheck::Wait {
    retry: Duration::from_secs(1),
};

#[test]
fn only_the_recorded_owner_reclaims_exactly_its_lock_once() {
    let mut g = grace(true);
    let stolen = Lock {
        owner: C,
        ..a_lock()
    };
    assert_eq!(g.reclaim(fid(1), stolen), Err(GraceError::NotRecovered));
    let narrower = Lock {
        range: range(0, 5),
        ..a_lock()
    };
    assert_eq!(g.reclaim(fid(1), narrower), Err(GraceError::NotRecovered));
    let weaker = Lock {
        kind: Shared,
        ..a_lock()
    };
    assert_eq!(g.reclaim(fid(1), weaker), Err(GraceError::NotRecovered));
    assert_eq!(g.reclaim(fid(2), a_lock()), Err(GraceError::NotRecovered));
    assert_eq!(g.reclaim(fid(1), a_lock()), Ok(()));
    assert_eq!(g.reclaim(fid(1), a_lock()), Err(GraceError::NotRecovered));
    assert_eq!(g.status().locks_reclaimed, 1);
}

#[test]
fn complete_state_new_lock_waits_only_if_it_conflicts_with_an_unreclaimed_lock() {
    let mut g = grace(true);
    let now = Millis(1_000);
    // Conflicts with A's exclusive lock.
    assert_eq!(g.check_new_lock(fid(1), C, range(5, 6), Shared, now), WAIT);
    // Conflicts with B's shared lock.
    assert_eq!(
        g.check_new_lock(fid(1), C, range(50, 60), Exclusive, now),
        WAIT
    );
    // Shares with B, misses A: granted at once.
    assert_eq!(
        g.check_new_lock(fid(1), C, range(50, 60), Shared, now),
        GraceCheck::Allow
    );
    assert_eq!(
        g.check_new_lock(fid(1), C, range(100, ByteRange::EOF), Exclusive, now),
        GraceCheck::Allow
    );
    assert_eq!(
        g.check_new_lock(fid(2), C, range(0, 10), Exclusive, now),
        GraceCheck::Allow
    );
    // B's own new lock overlapping its unreclaimed one waits for the reclaim.
    assert_eq!(
        g.check_new_lock(fid(1), B, range(50, 60), Shared, now),
        WAIT
    );
    // Once reclaimed, the lock is in the lock table and conflicts are its business.
    g.reclaim(fid(1), a_lock()).unwrap();
    assert_eq!(
        g.check_new_lock(fid(1), C, range(5, 6), Shared, now),
        GraceCheck::Allow
    );
}

#[test]
fn incomplete_state_every_new_lock_waits() {
    let g = grace(false);
    assert_eq!(
        g.check_new_lock(fid(2), C, range(0, 1), Shared, Millis(0)),
        WAIT
    );
    // The retry hint never points past the end of grace.
    assert_eq!(
        g.check_new_lock(fid(2), C, range(0, 1), Shared, Millis(29_700)),
        GraceCheck::Wait {
            retry: Duration::from_millis(300)
        }
    );
    assert_eq!(
        g.check_new_lock(fid(2), C, range(0, 1), Shared, Millis(40_000)),
        GraceCheck::Wait {
            retry: Duration::from_millis(1)
        }
    );
}

#[test]
fn ends_early_once_every_recovered_client_is_done() {
    let mut g = grace(true);
    g.reclaim(fid(1), a_lock()).unwrap();
    g.client_done(A.client);
    g.client_done(C.client); // not a recovered client: no effect
    assert_eq!(g.tick(Millis(5_000)), None);
    assert_eq!(g.status().clients_done, 1);
    // B says it is done without reclaiming: its lock is dropped at the early end.
    g.client_done(B.client);
    assert_eq!(
        g.tick(Millis(6_000)),
        Some(GraceEnd {
            early: true,
            reclaimed: 1,
            dropped: vec![(fid(1), b_lock())],
        })
    );
    assert_eq!(g.tick(Millis(60_000)), None);
    assert!(g.is_over());
    assert_eq!(
        g.check_new_lock(fid(1), C, range(0, 1), Exclusive, Millis(6_000)),
        GraceCheck::Allow
    );
    assert_eq!(g.reclaim(fid(1), b_lock()), Err(GraceError::Over));
}

#[test]
fn full_length_end_drops_unreclaimed_locks_in_order() {
    let c_lock = Lock {
        owner: C,
        range: range(7, 8),
        kind: Exclusive,
    };
    let mut g = Grace::new(
        config(),
        [(fid(3), c_lock), (fid(1), b_lock()), (fid(1), a_lock())],
        false,
        Millis(1_000),
    );
    g.reclaim(fid(1), b_lock()).unwrap();
    g.client_done(B.client);
    assert_eq!(g.tick(Millis(30_999)), None);
    assert_eq!(
        g.tick(Millis(31_000)),
        Some(GraceEnd {
            early: false,
            reclaimed: 1,
            dropped: vec![(fid(1), a_lock()), (fid(3), c_lock)],
        })
    );
    assert_eq!(
        g.status(),
        GraceStatus {
            over: true,
            complete: false,
            ends: Millis(31_000),
            locks_recovered: 3,
            locks_reclaimed: 1,
            clients_recovered: 3,
            clients_done: 1,
        }
    );
}

#[test]
fn nothing_recovered_ends_at_the_first_tick() {
    let mut g = Grace::new(config(), [], true, Millis(0));
    assert_eq!(
        g.tick(Millis(0)),
        Some(GraceEnd {
            early: true,
            reclaimed: 0,
            dropped: vec![],
        })
    );
}

#[test]
fn a_lock_recovered_twice_is_reclaimed_once() {
    let mut g = Grace::new(
        config(),
        [(fid(1), a_lock()), (fid(1), a_lock())],
        true,
        Millis(0),
    );
    assert_eq!(g.status().locks_recovered, 1);
    g.reclaim(fid(1), a_lock()).unwrap();
    g.client_done(A.client);
    assert_eq!(
        g.tick(Millis(1)),
        Some(GraceEnd {
            early: true,
            reclaimed: 1,
            dropped: vec![],
        })
    );
}
