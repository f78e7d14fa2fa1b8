//! Write-back planning, each case fed as events and checked by the exact effects it
//! emits.
//! Invariant: each dirty chunk goes in exactly one store, at most a window's bytes of
//! them fly at once, and the `Fsync` comes only after every store's answer, never after
//! a failure.

use super::*;

const FULL: u64 = CHUNK_BYTES;
const PER_STORE: usize = (STORE_BYTES_MAX / CHUNK_BYTES) as usize;

fn v(n: u64) -> DataVersion {
    DataVersion(n)
}

fn store(chunks: Range<usize>, offset: u64, bytes: u64) -> Store {
    Store {
        chunks,
        offset,
        bytes,
    }
}

fn clean(chunks: Range<usize>, version: u64) -> Effect<&'static str> {
    Effect::MarkClean {
        chunks,
        version: v(version),
    }
}

fn absorb(changes: u64, reply: &'static str) -> Effect<&'static str> {
    Effect::Absorb { changes, reply }
}

/// `count` whole chunks from index 0.
fn whole(count: u64) -> Vec<(u64, u64)> {
    (0..count).map(|index| (index, FULL)).collect()
}

fn plan(dirty: &[(u64, u64)], then: Then) -> StorePlan<&'static str> {
    StorePlan::new(dirty, then)
}

const SYNC: Then = Then::Sync { unsynced: false };

/// Every store a plan asks for, each sent at once and answered oldest first.
fn stores_of(dirty: &[(u64, u64)]) -> Vec<Store> {
    let mut p = plan(dirty, SYNC);
    let (mut asked, mut flying) = (Vec::new(), VecDeque::new());
    let mut effects = p.start();
    loop {
        let mut next = Vec::new();
        for effect in effects {
            if let Effect::Store(s) = effect {
                asked.push(s.clone());
                flying.push_back(s);
                next.extend(p.sent());
            }
        }
        if next.is_empty() {
            let Some(s) = flying.pop_front() else {
                return asked;
            };
            next = p.stored(&s, v(1), "");
        }
        effects = next;
    }
}

#[test]
fn a_store_carries_two_chunks_at_most_and_four_whole_stores_fill_the_window() {
    assert_eq!(STORE_BYTES_MAX, 2 * CHUNK_BYTES);
    assert_eq!(STORE_WINDOW_BYTES, 4 * STORE_BYTES_MAX);
    assert_eq!(STORES_IN_FLIGHT_MAX, 8);
}

#[test]
fn stores_carry_adjacent_whole_chunks_up_to_the_limit() {
    // A long run of full chunks is cut at the limit; its last store may end short.
    let long: Vec<(u64, u64)> = (0..PER_STORE as u64 * 2 + 1)
        .map(|i| (i, if i == PER_STORE as u64 * 2 { 10 } else { FULL }))
        .collect();
    assert_eq!(
        store_runs(&long),
        [
            0..PER_STORE,
            PER_STORE..2 * PER_STORE,
            2 * PER_STORE..2 * PER_STORE + 1
        ]
    );
    // A gap between chunks, or a short chunk before the next one, ends a run.
    assert_eq!(
        store_runs(&[(0, FULL), (1, 100), (2, FULL), (4, FULL), (5, FULL)]),
        [0..2, 2..3, 3..5]
    );
    assert_eq!(store_runs(&[(7, 5)]), vec![Range { start: 0, end: 1 }]);
    assert!(store_runs(&[]).is_empty());
}

#[test]
fn a_store_is_the_file_range_its_chunks_hold() {
    // Chunks 0-2 whole and 3 short; a gap; 5 short; 6-8 whole.
    let dirty = [
        (0, FULL),
        (1, FULL),
        (2, FULL),
        (3, 100),
        (5, 100),
        (6, FULL),
        (7, FULL),
        (8, FULL),
    ];
    assert_eq!(
        stores_of(&dirty),
        [
            store(0..2, 0, 2 * FULL),
            store(2..4, 2 * FULL, FULL + 100),
            store(4..5, 5 * FULL, 100),
            store(5..7, 6 * FULL, 2 * FULL),
            store(7..8, 8 * FULL, FULL),
        ]
    );
}

/// The `n`th whole store (of two chunks) of a plan of whole chunks.
fn nth(n: usize) -> Store {
    store(2 * n..2 * n + 2, 2 * n as u64 * FULL, 2 * FULL)
}

#[test]
fn a_window_of_stores_flies_the_next_starts_as_one_lands_and_one_fsync_follows_them_all() {
    let mut p = plan(&whole(12), SYNC);
    assert_eq!(p.start(), [Effect::Store(nth(0))]);
    for n in 1..4 {
        assert_eq!(
            p.sent(),
            [Effect::Store(nth(n))],
            "store {n} joins the window"
        );
    }
    assert_eq!(p.sent(), [], "the window is full: the fifth waits");
    // Answers come back in any order; each frees room for the next store.
    assert_eq!(
        p.stored(&nth(2), v(2), "2"),
        [clean(4..6, 2), Effect::Store(nth(4))]
    );
    assert_eq!(p.sent(), []);
    assert_eq!(
        p.stored(&nth(0), v(3), "0"),
        [clean(0..2, 3), Effect::Store(nth(5))]
    );
    assert_eq!(p.sent(), [], "nothing is left to start");
    for (n, version) in [(5, 4), (1, 6), (4, 5)] {
        assert_eq!(
            p.stored(&nth(n), v(version), "any"),
            [clean(2 * n..2 * n + 2, version)]
        );
    }
    // The highest version is the file after them all; the sync follows the last answer.
    assert_eq!(
        p.stored(&nth(3), v(7), "3"),
        [
            clean(6..8, 7),
            absorb(6, "3"),
            Effect::AllStored,
            Effect::Fsync
        ]
    );
}

#[test]
fn short_stores_fly_by_count_and_long_ones_by_bytes() {
    // Scattered short chunks: as many stores as the count allows, far below the bytes.
    let scattered: Vec<(u64, u64)> = (0..20).map(|i| (2 * i, 100)).collect();
    let mut p = plan(&scattered, Then::Return);
    let mut flying = p.start().len();
    loop {
        let more = p.sent();
        if more.is_empty() {
            break;
        }
        flying += more.len();
    }
    assert_eq!(flying, STORES_IN_FLIGHT_MAX);
    // A store that does not fit the room left waits, even though a smaller one would:
    // stores start in file order.
    let mut p = plan(&[(0, 10), (2, FULL), (3, FULL), (5, FULL)], Then::Return);
    let mut asked = vec![p.start()];
    asked.extend(std::iter::from_fn(|| {
        Some(p.sent()).filter(|e| !e.is_empty())
    }));
    assert_eq!(
        asked.concat(),
        [
            Effect::Store(store(0..1, 0, 10)),
            Effect::Store(store(1..3, 2 * FULL, 2 * FULL)),
            Effect::Store(store(3..4, 5 * FULL, FULL)),
        ],
        "10 bytes, 2 MiB and 1 MiB fit in the window together"
    );
}

#[test]
fn a_write_back_that_need_not_sync_ends_with_its_stores() {
    let mut p = plan(&[(4, 10)], Then::Return);
    let only = store(0..1, 4 * FULL, 10);
    assert_eq!(p.start(), [Effect::Store(only.clone())]);
    assert_eq!(p.sent(), []);
    assert_eq!(
        p.stored(&only, v(7), "only"),
        [
            clean(0..1, 7),
            absorb(1, "only"),
            Effect::AllStored,
            Effect::Done(Ok(()))
        ]
    );
}

#[test]
fn with_nothing_dirty_only_an_earlier_unsynced_store_is_synced() {
    for (then, end) in [
        (Then::Sync { unsynced: true }, Effect::Fsync),
        (Then::Sync { unsynced: false }, Effect::Done(Ok(()))),
        (Then::Return, Effect::Done(Ok(()))),
    ] {
        let mut p = plan(&[], then);
        assert!(p.is_empty());
        assert_eq!(p.start(), [end], "{then:?}");
    }
}

#[test]
fn a_refused_store_stops_new_ones_and_the_end_waits_for_those_in_flight() {
    let mut p = plan(&whole(6), SYNC);
    let second = store(2..4, 2 * FULL, 2 * FULL);
    p.start();
    p.sent();
    p.sent();
    assert_eq!(p.sent(), []);
    let no_space = FsError::from_errno(libc::ENOSPC);
    assert_eq!(
        p.failed(&nth(0), no_space),
        [],
        "the others are still in flight"
    );
    assert_eq!(p.stored(&nth(2), v(2), "third"), [clean(4..6, 2)]);
    // What was stored is absorbed; no Fsync follows a failure.
    assert_eq!(
        p.stored(&second, v(3), "second"),
        [
            clean(2..4, 3),
            absorb(2, "second"),
            Effect::Done(Err(no_space))
        ]
    );
}

#[test]
fn the_first_failure_is_the_one_returned() {
    let mut p = plan(&whole(4), Then::Sync { unsynced: true });
    p.start();
    p.sent();
    assert_eq!(p.sent(), []);
    let no_space = FsError::from_errno(libc::ENOSPC);
    assert_eq!(p.failed(&nth(0), no_space), []);
    assert_eq!(
        p.failed(&nth(1), FsError::ETIMEDOUT),
        [Effect::Done(Err(no_space))]
    );
}

#[test]
fn chunks_that_cannot_be_read_are_not_sent_and_end_the_write_back() {
    // The first store's chunks cannot be read: nothing was sent, nothing is absorbed.
    let mut p = plan(&whole(6), SYNC);
    p.start();
    assert_eq!(
        p.not_sent(&nth(0), FsError::EIO),
        [Effect::Done(Err(FsError::EIO))]
    );
    // The second's: the first, already sent, is awaited; the third never starts.
    let mut p = plan(&whole(6), SYNC);
    let first = store(0..2, 0, 2 * FULL);
    p.start();
    p.sent();
    assert_eq!(p.not_sent(&nth(1), FsError::EIO), []);
    assert_eq!(
        p.stored(&first, v(2), "first"),
        [
            clean(0..2, 2),
            absorb(1, "first"),
            Effect::Done(Err(FsError::EIO))
        ]
    );
}

#[test]
fn equal_versions_keep_the_first_answer() {
    let mut p = plan(&whole(4), Then::Return);
    let (first, second) = (store(0..2, 0, 2 * FULL), store(2..4, 2 * FULL, 2 * FULL));
    p.start();
    p.sent();
    p.sent();
    p.stored(&first, v(5), "first");
    assert_eq!(
        p.stored(&second, v(5), "second"),
        [
            clean(2..4, 5),
            absorb(2, "first"),
            Effect::AllStored,
            Effect::Done(Ok(()))
        ]
    );
}
