//! Property tests: random sequences of appends, snapshots, flushes, clean reopens and
//! crashes recover exactly what the model says; the decoders survive arbitrary and
//! damaged bytes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proto::Epoch;
use state::journal::MemVfs;
use state::journal::segment::{self, SegmentHeader};
use state::journal::snapshot;
use state::{Journal, JournalConfig, JournalMode, Lsn, Recovered};

#[derive(Clone, Debug)]
enum Op {
    Append(Vec<u8>),
    AppendDurable(Vec<u8>),
    Flush,
    Snapshot,
    Reopen,
    /// Power loss keeping this many 1/8ths of each file's unsynced bytes.
    Crash(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Op::Append),
        2 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Op::AppendDurable),
        1 => Just(Op::Flush),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Reopen),
        2 => (0u8..=8).prop_map(Op::Crash),
    ]
}

fn mode() -> impl Strategy<Value = JournalMode> {
    prop_oneof![
        Just(JournalMode::Sync),
        Just(JournalMode::Group),
        Just(JournalMode::None)
    ]
}

fn open(vfs: &MemVfs, mode: JournalMode) -> (Journal, Recovered) {
    let config = JournalConfig {
        mode,
        segment_bytes_max: 160,
        group_delay: Duration::from_secs(3600),
        epoch: Epoch(9),
    };
    Journal::open_with(Arc::new(vfs.clone()), Path::new("/j"), config).unwrap()
}

fn replay(recovered: &Recovered) -> Vec<Vec<u8>> {
    let mut state: Vec<Vec<u8>> = recovered
        .snapshot
        .as_ref()
        .map(|s| postcard::from_bytes(&s.payload).unwrap())
        .unwrap_or_default();
    for (lsn, bytes) in &recovered.records {
        assert_eq!(lsn.0, state.len() as u64 + 1);
        state.push(bytes.clone());
    }
    state
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_operations_recover_the_acknowledged_records(
        mode in mode(),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        let mut vfs = MemVfs::new();
        let (mut journal, _) = open(&vfs, mode);
        // The model: every record appended and still expected, and how many are durable.
        let mut records: Vec<Vec<u8>> = Vec::new();
        let mut durable = 0usize;
        for op in ops {
            match op {
                Op::Append(bytes) => {
                    let lsn = journal.append(&bytes).unwrap();
                    records.push(bytes);
                    prop_assert_eq!(lsn, Lsn(records.len() as u64));
                    if mode == JournalMode::Sync {
                        durable = records.len();
                    }
                }
                Op::AppendDurable(bytes) => {
                    journal.append_durable(&bytes).unwrap();
                    records.push(bytes);
                    if mode != JournalMode::None {
                        durable = records.len();
                    }
                }
                Op::Flush => {
                    journal.flush().unwrap();
                    durable = records.len();
                }
                Op::Snapshot => {
                    let payload = postcard::to_stdvec(&records).unwrap();
                    journal.write_snapshot(Lsn(records.len() as u64), &payload).unwrap();
                    durable = records.len();
                }
                Op::Reopen => {
                    drop(journal);
                    let (next, recovered) = open(&vfs, mode);
                    journal = next;
                    prop_assert_eq!(replay(&recovered), records.clone());
                    // Opening syncs what it recovered.
                    durable = records.len();
                }
                Op::Crash(eighths) => {
                    let image = vfs.crash_image(&mut |_, unsynced| unsynced * usize::from(eighths) / 8);
                    drop(journal);
                    vfs = image;
                    let (next, recovered) = open(&vfs, mode);
                    journal = next;
                    let state = replay(&recovered);
                    prop_assert!(state.len() >= durable, "{} recovered, {} durable", state.len(), durable);
                    prop_assert_eq!(&state[..], &records[..state.len()]);
                    records.truncate(state.len());
                    durable = records.len();
                }
            }
        }
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(scan) = segment::scan_segment(&bytes) {
            for record in &scan.records {
                prop_assert!(record.payload.end <= bytes.len());
            }
        }
        let _ = snapshot::decode(&bytes);
    }

    #[test]
    fn damaged_segments_yield_only_records_that_were_written(
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..30), 1..8),
        flip_at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = SegmentHeader { epoch: Epoch(1), first_lsn: Lsn(1) }.encode().to_vec();
        for (i, p) in payloads.iter().enumerate() {
            segment::encode_record(Lsn(i as u64 + 1), p, &mut bytes);
        }
        let at = flip_at.index(bytes.len());
        bytes[at] ^= flip;
        let bytes = &bytes[..=cut.index(bytes.len())];
        if let Ok(scan) = segment::scan_segment(bytes) {
            for (i, record) in scan.records.iter().enumerate() {
                prop_assert_eq!(record.lsn, Lsn(i as u64 + 1));
                prop_assert_eq!(&bytes[record.payload.clone()], &payloads[i][..]);
            }
        }
    }

    #[test]
    fn damaged_snapshots_are_rejected_or_exact(
        payload in proptest::collection::vec(any::<u8>(), 0..300),
        chunk_bytes in 1u32..100,
        flip_at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut bytes = snapshot::encode(Epoch(2), Lsn(7), &payload, chunk_bytes);
        prop_assert_eq!(&snapshot::decode(&bytes).unwrap().1, &payload);
        let at = flip_at.index(bytes.len());
        bytes[at] ^= flip;
        prop_assert!(snapshot::decode(&bytes).is_err());
    }
}
