//! Golden bytes of the journal's disk formats: the segment, record and snapshot framing,
//! every `StateRecord` kind, and a snapshot payload with every part filled.
//! Invariant: a reordered variant or a changed field fails here before it turns a journal
//! on a server's disk into garbage (the bytes predate the lock newtypes, which kept them).

use std::collections::BTreeSet;

use proto::{
    ByteRange, ClientId, Epoch, Fid, InstanceNonce, LockKind, LockOwnerId, Uniquifier, VnodeId,
    VolumeId,
};
use state::journaled::{
    CallbackModel, ClientEntry, LockEntry, Owed, Promises, StateRecord, StateSnapshot,
};
use state::{ClientKey, Lock, LockOwner};
use uuid::Uuid;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fid(vnode: u64) -> Fid {
    Fid {
        volume: VolumeId(536870912),
        vnode: VnodeId(vnode),
        unique: Uniquifier(1),
    }
}

const KEY: ClientKey = ClientKey(3);
const EXPIRY_MS: u64 = 1_765_000_000_000;

fn client() -> ClientId {
    ClientId(Uuid::from_u128(0x0011_2233_4455_6677_8899_aabb_ccdd_eeff))
}

fn owner() -> LockOwner {
    LockOwner {
        client: KEY,
        owner: LockOwnerId(9),
    }
}

fn range(start: u64, end: u64) -> ByteRange {
    ByteRange::new(start, end).unwrap()
}

/// Each record kind and the exact bytes of its payload. The bytes were taken from the
/// build that wrote bare integers where the newtypes are now: the newtypes kept them.
fn records() -> Vec<(&'static str, StateRecord, &'static str)> {
    vec![
        (
            "client_admitted",
            StateRecord::ClientAdmitted {
                key: KEY,
                client: client(),
                instance: InstanceNonce(42),
            },
            "00031000112233445566778899aabbccddeeff2a",
        ),
        (
            "lock_granted",
            StateRecord::LockGranted {
                fid: fid(5),
                lock: Lock {
                    owner: owner(),
                    range: range(10, ByteRange::EOF),
                    kind: LockKind::Exclusive,
                },
                pid: 4242,
            },
            "018080808002050103090affffffffffffffffff01019221",
        ),
        (
            "lock_released",
            StateRecord::LockReleased {
                fid: fid(5),
                owner: owner(),
                range: range(10, 20),
            },
            "028080808002050103090a14",
        ),
        (
            "client_released",
            StateRecord::ClientReleased { key: KEY },
            "0303",
        ),
        (
            "callback_granted",
            StateRecord::CallbackGranted {
                fid: fid(5),
                client: KEY,
                expiry_ms: EXPIRY_MS,
            },
            "04808080800205010380e4ca91af33",
        ),
        (
            "callbacks_given_up",
            StateRecord::CallbacksGivenUp {
                client: KEY,
                fids: vec![fid(5), fid(6)],
            },
            "0503028080808002050180808080020601",
        ),
        (
            "client_callbacks_dropped",
            StateRecord::ClientCallbacksDropped { client: KEY },
            "0603",
        ),
        (
            "breaks_sent",
            StateRecord::BreaksSent {
                client: KEY,
                fids: vec![fid(5)],
            },
            "07030180808080020501",
        ),
        (
            "breaks_acked",
            StateRecord::BreaksAcked {
                client: KEY,
                fids: vec![fid(5)],
            },
            "08030180808080020501",
        ),
        ("reset_sent", StateRecord::ResetSent { client: KEY }, "0903"),
        (
            "reset_acked",
            StateRecord::ResetAcked { client: KEY },
            "0a03",
        ),
        (
            "delayed_queued",
            StateRecord::DelayedQueued {
                client: KEY,
                fids: vec![fid(5)],
            },
            "0b030180808080020501",
        ),
        (
            "delayed_reset",
            StateRecord::DelayedReset { client: KEY },
            "0c03",
        ),
        (
            "delayed_taken",
            StateRecord::DelayedTaken { client: KEY },
            "0d03",
        ),
        (
            "handover",
            StateRecord::Handover { epoch: Epoch(7) },
            "0e07",
        ),
    ]
}

/// A snapshot payload with one of everything (one entry per map: a map's order is not
/// fixed).
fn snapshot() -> StateSnapshot {
    let mut callbacks = CallbackModel {
        promises: Promises::from(vec![((fid(5), KEY), EXPIRY_MS)]),
        ..CallbackModel::default()
    };
    callbacks
        .owed
        .insert(KEY, Owed::Fids(BTreeSet::from([fid(6)])));
    callbacks
        .inflight_fids
        .insert(KEY, BTreeSet::from([fid(7)]));
    callbacks.inflight_reset.insert(ClientKey(4));
    StateSnapshot {
        clients: vec![ClientEntry {
            key: KEY,
            client: client(),
            instance: InstanceNonce(42),
        }],
        locks: vec![LockEntry {
            fid: fid(5),
            lock: Lock {
                owner: owner(),
                range: range(0, 100),
                kind: LockKind::Shared,
            },
            pid: 77,
        }],
        callbacks,
        clean_handover: false,
    }
}

const SNAPSHOT_BYTES: &str = "01031000112233445566778899aabbccddeeff2a018080808002050103090064\
                              004d01808080800205010380e4ca91af33010301018080808002060101030180\
                              8080800207010104";

#[test]
fn every_record_kind_keeps_its_bytes() {
    let mut failures = Vec::new();
    for (name, record, expected) in records() {
        let bytes = postcard::to_allocvec(&record).unwrap();
        if hex(&bytes) != expected {
            failures.push(format!(
                "{name}: expected {expected}\n{name}:   actual {}",
                hex(&bytes)
            ));
        }
        let decoded: StateRecord = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, record, "{name}");
    }
    assert!(
        failures.is_empty(),
        "encoding changed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_record_kind_is_pinned() {
    // A new kind must get a golden case: the last one here is the last variant.
    let kinds = records().len();
    let beyond = [kinds as u8, 0];
    assert!(postcard::from_bytes::<StateRecord>(&beyond).is_err());
}

#[test]
fn the_snapshot_payload_keeps_its_bytes() {
    let expected: String = SNAPSHOT_BYTES.split_whitespace().collect();
    let snapshot = snapshot();
    let bytes = postcard::to_allocvec(&snapshot).unwrap();
    assert_eq!(hex(&bytes), expected);
    let decoded: StateSnapshot = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, snapshot);
}

#[test]
fn an_owed_reset_keeps_its_bytes() {
    assert_eq!(hex(&postcard::to_allocvec(&Owed::Reset).unwrap()), "00");
}

/// The journal's own framing, whatever the payload: a segment header, a record frame and a
/// snapshot file of two chunks.
#[test]
fn segment_record_and_snapshot_framing_keep_their_bytes() {
    use state::journal::segment::{SegmentHeader, encode_record};
    use state::journal::snapshot;

    let header = SegmentHeader {
        epoch: Epoch(7),
        first_lsn: state::Lsn(300),
    };
    // magic | version 1 | epoch 7 | first lsn 300 | crc
    assert_eq!(
        hex(&header.encode()),
        "48464a4f55524e4c0100000007000000000000002c01000000000000d4e95268"
    );
    let mut frame = Vec::new();
    encode_record(state::Lsn(300), b"abc", &mut frame);
    // len 3 | crc | lsn 300 | "abc"
    assert_eq!(hex(&frame), "030000008319e4272c01000000000000616263");
    let file = snapshot::encode(Epoch(7), state::Lsn(300), b"abcde", 3);
    // Header: magic | version 1 | chunk bytes 3 | epoch 7 | lsn 300 | payload bytes 5 | crc;
    // then chunks of len | crc | data: "abc", "de".
    assert_eq!(
        hex(&file),
        "4846534e41505354010000000300000007000000000000002c0100000000000005000000000000\
         00b3e62cd903000000352afefc61626302000000d1c9ea216465"
    );
}
