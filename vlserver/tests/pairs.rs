//! The pair table of `Store` on a temporary directory, driven with an explicit clock:
//! joining, the lease compare-and-set, renewal, release, reopening, the server entry.

use std::time::Duration;

use proto::{Epoch, ErrorCode, PairName, ServerId, Timestamp};
use state::Millis;
use vlserver::{Store, StoreLimits, VldbError};

const LEASE: Duration = Duration::from_secs(2);
const A: &str = "127.0.0.1:4001";
const B: &str = "127.0.0.1:4002";

fn refused(result: Result<impl std::fmt::Debug, VldbError>) -> ErrorCode {
    match result {
        Err(VldbError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open(&dir.path().join("vldb.redb"), StoreLimits::default()).unwrap()
}

fn p1() -> PairName {
    PairName::parse("p1").unwrap()
}

/// A pair `p1` with members A then B, nobody active yet.
fn joined(store: &Store) -> ServerId {
    let server = ServerId::random();
    store.join_pair(&p1(), server, A, Timestamp::now()).unwrap();
    store.join_pair(&p1(), server, B, Timestamp::now()).unwrap();
    server
}

fn addresses_of(store: &Store, server: ServerId) -> Vec<String> {
    let servers = store.servers().unwrap();
    let entry = servers.iter().find(|s| s.server == server).unwrap();
    entry.addresses.clone()
}

#[test]
fn the_epoch_moves_by_compare_and_set_after_expiry_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    joined(&store);

    assert_eq!(
        store
            .acquire_pair(&p1(), A, Epoch(0), LEASE, Millis(0))
            .unwrap(),
        Epoch(1)
    );
    assert_eq!(
        refused(store.acquire_pair(&p1(), B, Epoch(1), LEASE, Millis(1_999))),
        ErrorCode::LeaseHeld {
            epoch: Epoch(1),
            active: Some(A.into()),
            lease_left_ms: 1,
        }
    );
    // A stale epoch is refused even once the lease has expired.
    assert!(matches!(
        refused(store.acquire_pair(&p1(), B, Epoch(0), LEASE, Millis(5_000))),
        ErrorCode::LeaseHeld {
            epoch: Epoch(1),
            ..
        }
    ));
    assert_eq!(
        store
            .acquire_pair(&p1(), B, Epoch(1), LEASE, Millis(2_000))
            .unwrap(),
        Epoch(2)
    );
    let entry = store.pair(&p1(), Millis(2_500)).unwrap();
    assert_eq!(entry.active.as_deref(), Some(B));
    assert_eq!(entry.epoch, Epoch(2));
    assert_eq!(entry.lease_left_ms, 1_500);
    assert_eq!(entry.members, [A, B]);
}

#[test]
fn a_renewal_extends_a_live_lease_and_is_refused_after_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    joined(&store);
    store
        .acquire_pair(&p1(), A, Epoch(0), LEASE, Millis(0))
        .unwrap();

    assert_eq!(
        store
            .renew_pair(&p1(), A, Epoch(1), LEASE, Millis(1_500))
            .unwrap(),
        Epoch(1)
    );
    assert_eq!(store.pair(&p1(), Millis(3_000)).unwrap().lease_left_ms, 500);
    // The partner is still held off by the renewed lease.
    assert!(matches!(
        refused(store.acquire_pair(&p1(), B, Epoch(1), LEASE, Millis(3_000))),
        ErrorCode::LeaseHeld { .. }
    ));
    assert_eq!(
        refused(store.renew_pair(&p1(), A, Epoch(1), LEASE, Millis(3_500))),
        ErrorCode::LeaseLost { epoch: Epoch(1) }
    );
    assert_eq!(
        refused(store.renew_pair(&p1(), B, Epoch(1), LEASE, Millis(3_500))),
        ErrorCode::LeaseLost { epoch: Epoch(1) }
    );
    assert_eq!(
        refused(store.renew_pair(&p1(), A, Epoch(1), Duration::from_secs(3_600), Millis(100))),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn a_release_hands_the_lease_to_the_successor_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    joined(&store);
    store
        .acquire_pair(&p1(), A, Epoch(0), LEASE, Millis(0))
        .unwrap();

    assert_eq!(
        refused(store.release_pair(&p1(), A, Epoch(1), Some("127.0.0.1:9"), Millis(100))),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refused(store.release_pair(&p1(), B, Epoch(1), Some(A), Millis(100))),
        ErrorCode::LeaseLost { epoch: Epoch(1) }
    );
    store
        .release_pair(&p1(), A, Epoch(1), Some(B), Millis(100))
        .unwrap();
    let entry = store.pair(&p1(), Millis(100)).unwrap();
    assert_eq!(
        (entry.successor.as_deref(), entry.lease_left_ms),
        (Some(B), 0)
    );
    // The released holder cannot renew; the successor takes over without waiting.
    assert_eq!(
        refused(store.renew_pair(&p1(), A, Epoch(1), LEASE, Millis(101))),
        ErrorCode::LeaseLost { epoch: Epoch(1) }
    );
    assert_eq!(
        store
            .acquire_pair(&p1(), B, Epoch(1), LEASE, Millis(101))
            .unwrap(),
        Epoch(2)
    );
    assert_eq!(store.pair(&p1(), Millis(101)).unwrap().successor, None);
}

#[test]
fn the_epoch_survives_a_reopen_and_the_holder_keeps_one_whole_lease() {
    let dir = tempfile::tempdir().unwrap();
    let server = {
        let store = open(&dir);
        let server = joined(&store);
        store
            .acquire_pair(&p1(), A, Epoch(0), LEASE, Millis(0))
            .unwrap();
        // A longer renewal is what the restarted VLDB must honour.
        store
            .renew_pair(&p1(), A, Epoch(1), Duration::from_secs(5), Millis(1_000))
            .unwrap();
        server
    };

    let store = open(&dir);
    // The reopened VLDB's clock starts again: its first touch starts a whole lease.
    let entry = store.pair(&p1(), Millis(10)).unwrap();
    assert_eq!(entry.server, server);
    assert_eq!(entry.epoch, Epoch(1));
    assert_eq!(entry.active.as_deref(), Some(A));
    assert_eq!(entry.lease_left_ms, 5_000);
    assert!(matches!(
        refused(store.acquire_pair(&p1(), B, Epoch(1), LEASE, Millis(5_009))),
        ErrorCode::LeaseHeld { .. }
    ));
    assert_eq!(
        store
            .acquire_pair(&p1(), B, Epoch(1), LEASE, Millis(5_010))
            .unwrap(),
        Epoch(2)
    );
    drop(store);

    let store = open(&dir);
    let entry = store.pair(&p1(), Millis(0)).unwrap();
    assert_eq!((entry.epoch, entry.active.as_deref()), (Epoch(2), Some(B)));
    assert_eq!(addresses_of(&store, server), [B, A]);
}

#[test]
fn the_server_entry_lists_the_members_active_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir);
    let server = joined(&store);
    assert_eq!(addresses_of(&store, server), [A, B]);

    store
        .acquire_pair(&p1(), B, Epoch(0), LEASE, Millis(0))
        .unwrap();
    assert_eq!(addresses_of(&store, server), [B, A]);

    // A member registering the pair's server id with its own address changes nothing.
    store
        .register_server(server, vec![A.into()], Timestamp::now())
        .unwrap();
    assert_eq!(addresses_of(&store, server), [B, A]);

    // A lone server registering a member's address takes it, until the pair's next
    // change of active takes it back.
    let other = ServerId::random();
    store
        .register_server(
            other,
            vec![A.into(), "127.0.0.1:5000".into()],
            Timestamp::now(),
        )
        .unwrap();
    assert_eq!(addresses_of(&store, server), [B]);
    store
        .acquire_pair(&p1(), A, Epoch(1), LEASE, Millis(2_000))
        .unwrap();
    assert_eq!(addresses_of(&store, server), [A, B]);
    assert_eq!(addresses_of(&store, other), ["127.0.0.1:5000"]);
}

#[test]
fn joining_is_refused_to_strangers_a_third_member_and_past_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        pairs_max: 1,
        ..StoreLimits::default()
    };
    let store = Store::open(&dir.path().join("vldb.redb"), limits).unwrap();
    let server = joined(&store);

    // Joining again is a no-op.
    store.join_pair(&p1(), server, A, Timestamp::now()).unwrap();
    assert_eq!(store.pair(&p1(), Millis(0)).unwrap().members, [A, B]);
    assert_eq!(
        refused(store.join_pair(&p1(), ServerId::random(), A, Timestamp::now())),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refused(store.join_pair(&p1(), server, "127.0.0.1:4003", Timestamp::now())),
        ErrorCode::PairFull {
            members: vec![A.into(), B.into()]
        }
    );
    let p2 = PairName::parse("p2").unwrap();
    assert_eq!(
        refused(store.join_pair(&p2, ServerId::random(), A, Timestamp::now())),
        ErrorCode::InvalidArgument
    );
    assert_eq!(refused(store.pair(&p2, Millis(0))), ErrorCode::NoSuchPair);
    assert_eq!(
        refused(store.acquire_pair(&p2, A, Epoch(0), LEASE, Millis(0))),
        ErrorCode::NoSuchPair
    );
    assert_eq!(
        refused(store.acquire_pair(&p1(), "127.0.0.1:4003", Epoch(0), LEASE, Millis(0))),
        ErrorCode::InvalidArgument
    );
}
