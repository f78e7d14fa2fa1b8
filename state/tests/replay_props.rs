//! Replay properties: a snapshot taken at any position of a journal, plus the records
//! after it, replays to the state the whole journal replays to; a replayed state survives
//! its own encoding.

use proptest::prelude::*;
use proto::{
    ByteRange, ClientId, Epoch, Fid, InstanceNonce, LockKind, LockOwnerId, Uniquifier, VnodeId,
    VolumeId,
};
use state::journaled::{Replay, StateRecord, StateSnapshot};
use state::{ClientKey, Lock, LockOwner, Lsn};
use uuid::Uuid;

const CLIENTS: u32 = 3;

fn fid(file: u8) -> Fid {
    Fid {
        volume: VolumeId(1),
        vnode: VnodeId(u64::from(file) + 2),
        unique: Uniquifier(1),
    }
}

fn fids() -> impl Strategy<Value = Vec<Fid>> {
    proptest::collection::vec((0u8..6).prop_map(fid), 1..4)
}

fn key() -> impl Strategy<Value = ClientKey> {
    (0..CLIENTS).prop_map(ClientKey)
}

fn range() -> impl Strategy<Value = ByteRange> {
    (0u64..30, 1u64..12, any::<bool>()).prop_map(|(start, len, to_eof)| {
        let end = if to_eof { ByteRange::EOF } else { start + len };
        ByteRange::new(start, end).expect("never empty")
    })
}

fn owner() -> impl Strategy<Value = LockOwner> {
    (key(), 0u64..2).prop_map(|(client, owner)| LockOwner {
        client,
        owner: LockOwnerId(owner),
    })
}

fn record() -> impl Strategy<Value = StateRecord> {
    prop_oneof![
        1 => (key(), 1u64..3).prop_map(|(key, instance)| StateRecord::ClientAdmitted {
            key,
            client: ClientId(Uuid::from_u128(u128::from(key.0))),
            instance: InstanceNonce(instance),
        }),
        4 => (0u8..3, owner(), range(), any::<bool>(), 1u32..9).prop_map(
            |(file, owner, range, exclusive, pid)| StateRecord::LockGranted {
                fid: fid(file),
                lock: Lock {
                    owner,
                    range,
                    kind: if exclusive { LockKind::Exclusive } else { LockKind::Shared },
                },
                pid,
            }
        ),
        2 => (0u8..3, owner(), range()).prop_map(|(file, owner, range)| {
            StateRecord::LockReleased {
                fid: fid(file),
                owner,
                range,
            }
        }),
        1 => key().prop_map(|key| StateRecord::ClientReleased { key }),
        3 => (0u8..6, key(), 1u64..4).prop_map(|(file, client, step)| {
            StateRecord::CallbackGranted {
                fid: fid(file),
                client,
                expiry_ms: step * 300_000,
            }
        }),
        1 => (key(), fids()).prop_map(|(client, fids)| StateRecord::CallbacksGivenUp { client, fids }),
        1 => key().prop_map(|client| StateRecord::ClientCallbacksDropped { client }),
        2 => (key(), fids()).prop_map(|(client, fids)| StateRecord::BreaksSent { client, fids }),
        2 => (key(), fids()).prop_map(|(client, fids)| StateRecord::BreaksAcked { client, fids }),
        1 => key().prop_map(|client| StateRecord::ResetSent { client }),
        1 => key().prop_map(|client| StateRecord::ResetAcked { client }),
        1 => (key(), fids()).prop_map(|(client, fids)| StateRecord::DelayedQueued { client, fids }),
        1 => key().prop_map(|client| StateRecord::DelayedReset { client }),
        1 => key().prop_map(|client| StateRecord::DelayedTaken { client }),
        1 => (1u64..4).prop_map(|epoch| StateRecord::Handover {
            epoch: Epoch(epoch)
        }),
    ]
}

/// A journal: every client admitted first, then random records. Random but well formed
/// (every lock record names an admitted client and a non-empty range), as a live server
/// writes them.
fn journal() -> impl Strategy<Value = Vec<StateRecord>> {
    proptest::collection::vec(record(), 0..80).prop_map(|records| {
        let admitted = (0..CLIENTS).map(|key| StateRecord::ClientAdmitted {
            key: ClientKey(key),
            client: ClientId(Uuid::from_u128(u128::from(key))),
            instance: InstanceNonce(1),
        });
        admitted.chain(records).collect()
    })
}

fn apply(replay: &mut Replay, records: &[StateRecord], first: u64) {
    for (index, record) in records.iter().enumerate() {
        let lsn = Lsn(first + index as u64);
        replay
            .apply(lsn, record.clone())
            .expect("well-formed record");
    }
}

/// A snapshot goes to disk and back.
fn encoded(snapshot: &StateSnapshot) -> StateSnapshot {
    let bytes = postcard::to_allocvec(snapshot).unwrap();
    postcard::from_bytes(&bytes).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_snapshot_anywhere_plus_the_rest_replays_as_the_whole(
        records in journal(),
        cut in any::<proptest::sample::Index>(),
    ) {
        let cut = cut.index(records.len() + 1);
        let mut whole = Replay::default();
        apply(&mut whole, &records, 1);
        let mut whole = whole.finish();

        let mut head = Replay::default();
        apply(&mut head, &records[..cut], 1);
        let snapshot = encoded(&head.snapshot());
        let mut resumed = Replay::from_snapshot(snapshot);
        apply(&mut resumed, &records[cut..], 1 + cut as u64);
        let mut resumed = resumed.finish();

        if cut == records.len() {
            // A journal ends with its handover record, never with a snapshot: the
            // switchover snapshots first, then writes the record.
            whole.clean_handover = false;
            resumed.clean_handover = false;
        }
        prop_assert_eq!(resumed, whole);
    }

    #[test]
    fn a_replayed_state_survives_its_encoding(records in journal()) {
        let mut replay = Replay::default();
        apply(&mut replay, &records, 1);
        let mut state = replay.finish();
        state.clean_handover = false;
        prop_assert_eq!(encoded(&state), state);
    }
}
