//! The journal's contract on the happy path and against damage: round trips, sequence
//! continuity across reopen, segment rolls, snapshots, torn tails and corruption.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::Epoch;
use state::journal::segment::{RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use state::journal::{Damage, JournalSpan, MemVfs, Vfs, inspect, inspect_with};
use state::{Journal, JournalConfig, JournalError, JournalMode, Lsn, Recovered};

fn config(mode: JournalMode) -> JournalConfig {
    JournalConfig {
        mode,
        epoch: Epoch(3),
        ..JournalConfig::default()
    }
}

fn payload(i: u64) -> Vec<u8> {
    format!("record {i} ")
        .repeat(1 + (i % 4) as usize)
        .into_bytes()
}

fn open_mem(vfs: &MemVfs, config: JournalConfig) -> Result<(Journal, Recovered), JournalError> {
    Journal::open_with(Arc::new(vfs.clone()), Path::new("/j"), config)
}

fn lsns(recovered: &Recovered) -> Vec<u64> {
    recovered.records.iter().map(|(lsn, _)| lsn.0).collect()
}

fn segment_files(vfs: &dyn Vfs, dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = vfs
        .list(dir)
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".journal"))
        .map(|n| dir.join(n))
        .collect();
    names.sort();
    names
}

#[test]
fn round_trip_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, recovered) = Journal::open(dir.path(), config(JournalMode::Sync)).unwrap();
    assert_eq!(recovered, Recovered::default());
    for i in 1..=20 {
        assert_eq!(journal.append(&payload(i)).unwrap(), Lsn(i));
    }
    journal.close().unwrap();
    let (_journal, recovered) = Journal::open(dir.path(), config(JournalMode::Sync)).unwrap();
    let expected: Vec<(Lsn, Vec<u8>)> = (1..=20).map(|i| (Lsn(i), payload(i))).collect();
    assert_eq!(recovered.records, expected);
    assert!(recovered.snapshot.is_none());
}

#[test]
fn reopen_continues_sequence_numbers() {
    let vfs = MemVfs::new();
    for round in 0..4u64 {
        let (journal, recovered) = open_mem(&vfs, config(JournalMode::Sync)).unwrap();
        assert_eq!(lsns(&recovered), (1..=round * 3).collect::<Vec<_>>());
        for i in 1..=3 {
            assert_eq!(journal.append(&payload(i)).unwrap(), Lsn(round * 3 + i));
        }
    }
}

#[test]
fn second_open_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_journal, _) = Journal::open(dir.path(), config(JournalMode::Sync)).unwrap();
    let err = Journal::open(dir.path(), config(JournalMode::Sync))
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            JournalError::Io {
                op: "lock directory",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn segments_roll_at_the_size_limit() {
    let vfs = MemVfs::new();
    let small = JournalConfig {
        segment_bytes_max: 200,
        ..config(JournalMode::Sync)
    };
    let (journal, _) = open_mem(&vfs, small.clone()).unwrap();
    for i in 1..=30 {
        journal.append(&payload(i)).unwrap();
    }
    let span = journal.span();
    assert!(span.segment_count > 5, "{span:?}");
    assert_eq!(
        (span.first, span.last, span.durable),
        (Lsn(1), Lsn(30), Lsn(30))
    );
    // Records here are far smaller than the limit, so no segment passes it.
    for path in segment_files(&vfs, Path::new("/j")) {
        let len = vfs.read(&path).unwrap().len();
        assert!((SEGMENT_HEADER_BYTES..=200).contains(&len), "{len}");
    }
    drop(journal);
    let (_journal, recovered) = open_mem(&vfs, small).unwrap();
    assert_eq!(lsns(&recovered), (1..=30).collect::<Vec<_>>());
    assert_eq!(recovered.records[29].1, payload(30));
}

#[test]
fn snapshot_removes_covered_segments_and_recovery_replays_later_records() {
    let dir = tempfile::tempdir().unwrap();
    let small = JournalConfig {
        segment_bytes_max: 256,
        ..config(JournalMode::Sync)
    };
    let (journal, _) = Journal::open(dir.path(), small.clone()).unwrap();
    for i in 1..=40 {
        journal.append(&payload(i)).unwrap();
    }
    let before = journal.span();
    journal.write_snapshot(Lsn(25), b"state as of 25").unwrap();
    let after = journal.span();
    assert_eq!(after.snapshot, Some(Lsn(25)));
    assert!(after.segment_count < before.segment_count);
    // The first remaining segment still holds record 26: nothing after the snapshot is lost.
    assert!(after.first <= Lsn(26), "{after:?}");
    for i in 41..=45 {
        journal.append(&payload(i)).unwrap();
    }
    journal.write_snapshot(Lsn(30), b"state as of 30").unwrap();
    journal.close().unwrap();

    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("snapshot"))
        .collect();
    assert_eq!(
        names,
        vec!["snapshot-00000000000000000030.snap".to_string()]
    );

    let (journal, recovered) = Journal::open(dir.path(), small).unwrap();
    let snapshot = recovered.snapshot.as_ref().unwrap();
    assert_eq!((snapshot.lsn, snapshot.epoch), (Lsn(30), Epoch(3)));
    assert_eq!(snapshot.payload, b"state as of 30");
    assert_eq!(lsns(&recovered), (31..=45).collect::<Vec<_>>());
    assert_eq!(journal.append(b"next").unwrap(), Lsn(46));
}

#[test]
fn snapshot_position_is_checked() {
    let vfs = MemVfs::new();
    let (journal, _) = open_mem(&vfs, config(JournalMode::Sync)).unwrap();
    journal.append(b"a").unwrap();
    journal.append(b"b").unwrap();
    let beyond = journal.write_snapshot(Lsn(3), b"x").unwrap_err();
    assert!(
        matches!(beyond, JournalError::SnapshotPosition { .. }),
        "{beyond}"
    );
    journal.write_snapshot(Lsn(2), b"x").unwrap();
    let behind = journal.write_snapshot(Lsn(1), b"x").unwrap_err();
    assert!(
        matches!(behind, JournalError::SnapshotPosition { .. }),
        "{behind}"
    );
}

#[test]
fn snapshot_beyond_the_durable_records_still_recovers_and_continues() {
    // Group mode with a long delay: records 1..=5 are written but not synced when the
    // snapshot covering them is taken; a crash then loses them from the segment.
    let vfs = MemVfs::new();
    let slow = JournalConfig {
        group_delay: Duration::from_secs(3600),
        ..config(JournalMode::Group)
    };
    let (journal, _) = open_mem(&vfs, slow.clone()).unwrap();
    for i in 1..=5 {
        journal.append(&payload(i)).unwrap();
    }
    journal.write_snapshot(Lsn(5), b"five").unwrap();
    let image = vfs.crash_image(&mut |_, _| 0);
    drop(journal);
    let (journal, recovered) = open_mem(&image, slow.clone()).unwrap();
    assert_eq!(recovered.snapshot.unwrap().lsn, Lsn(5));
    assert!(recovered.records.is_empty());
    assert_eq!(journal.append_durable(b"six").unwrap(), Lsn(6));
    journal.close().unwrap();
    let (_journal, recovered) = open_mem(&image, slow).unwrap();
    assert_eq!(recovered.records, vec![(Lsn(6), b"six".to_vec())]);
}

/// A closed journal with one segment of `count` records, and that segment's path.
fn one_segment(count: u64) -> (MemVfs, PathBuf) {
    let vfs = MemVfs::new();
    let (journal, _) = open_mem(&vfs, config(JournalMode::Sync)).unwrap();
    for i in 1..=count {
        journal.append(&payload(i)).unwrap();
    }
    journal.close().unwrap();
    let segments = segment_files(&vfs, Path::new("/j"));
    assert_eq!(segments.len(), 1);
    (vfs, segments[0].clone())
}

#[test]
fn torn_tail_is_truncated_at_every_byte_offset() {
    let (vfs, segment) = one_segment(3);
    let whole = vfs.read(&segment).unwrap();
    let last_start = whole.len() - RECORD_HEADER_BYTES - payload(3).len();
    for cut in last_start..=whole.len() {
        let image = vfs.crash_image(&mut |_, _| 0);
        image.overwrite(&segment, whole[..cut].to_vec()).unwrap();
        let (journal, recovered) = open_mem(&image, config(JournalMode::Sync)).unwrap();
        let expected = if cut == whole.len() { 3 } else { 2 };
        assert_eq!(
            lsns(&recovered),
            (1..=expected).collect::<Vec<_>>(),
            "cut at {cut}"
        );
        assert_eq!(
            image.read(&segment).unwrap().len(),
            if cut == whole.len() { cut } else { last_start }
        );
        // The journal goes on from the recovered position, and says so on the next open.
        assert_eq!(journal.append(b"after").unwrap(), Lsn(expected + 1));
        drop(journal);
        let (_journal, again) = open_mem(&image, config(JournalMode::Sync)).unwrap();
        assert_eq!(again.records.len() as u64, expected + 1, "cut at {cut}");
    }
}

#[test]
fn torn_record_followed_by_zeros_is_truncated() {
    let (vfs, segment) = one_segment(3);
    let mut bytes = vfs.read(&segment).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    bytes.extend_from_slice(&[0u8; 4096]);
    vfs.overwrite(&segment, bytes).unwrap();
    let (_journal, recovered) = open_mem(&vfs, config(JournalMode::Sync)).unwrap();
    assert_eq!(lsns(&recovered), vec![1, 2]);
}

#[test]
fn corrupt_record_in_the_middle_names_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), config(JournalMode::Sync)).unwrap();
    for i in 1..=3 {
        journal.append(&payload(i)).unwrap();
    }
    journal.close().unwrap();
    let segment = segment_files(&state::journal::OsVfs, dir.path())[0].clone();
    let mut bytes = std::fs::read(&segment).unwrap();
    let second = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + payload(1).len();
    bytes[second + RECORD_HEADER_BYTES + 2] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();
    match Journal::open(dir.path(), config(JournalMode::Sync)) {
        Err(JournalError::Corrupt {
            path,
            offset,
            reason,
        }) => {
            assert_eq!(path, segment);
            assert_eq!(offset, second as u64);
            assert_eq!(reason, Damage::Checksum);
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
    }
    // Nothing was repaired: the damaged file is as it was.
    assert_eq!(std::fs::read(&segment).unwrap(), bytes);
}

#[test]
fn bad_sequence_number_is_corrupt() {
    let (vfs, segment) = one_segment(2);
    let mut bytes = vfs.read(&segment).unwrap();
    state::journal::segment::encode_record(Lsn(7), b"stray", &mut bytes);
    vfs.overwrite(&segment, bytes).unwrap();
    let err = open_mem(&vfs, config(JournalMode::Sync)).err().unwrap();
    assert!(
        matches!(
            &err,
            JournalError::Corrupt {
                reason: Damage::Sequence {
                    expected: Lsn(3),
                    found: Lsn(7)
                },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn torn_tail_of_an_earlier_segment_is_corrupt() {
    let vfs = MemVfs::new();
    let small = JournalConfig {
        segment_bytes_max: 150,
        ..config(JournalMode::Sync)
    };
    let (journal, _) = open_mem(&vfs, small.clone()).unwrap();
    for i in 1..=10 {
        journal.append(&payload(i)).unwrap();
    }
    journal.close().unwrap();
    let first = segment_files(&vfs, Path::new("/j"))[0].clone();
    let bytes = vfs.read(&first).unwrap();
    vfs.overwrite(&first, bytes[..bytes.len() - 1].to_vec())
        .unwrap();
    let err = open_mem(&vfs, small).err().unwrap();
    match err {
        JournalError::Corrupt { path, reason, .. } => {
            assert_eq!(path, first);
            assert_eq!(reason, Damage::Incomplete);
        }
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn missing_segment_is_a_sequence_gap() {
    let vfs = MemVfs::new();
    let small = JournalConfig {
        segment_bytes_max: 150,
        ..config(JournalMode::Sync)
    };
    let (journal, _) = open_mem(&vfs, small.clone()).unwrap();
    for i in 1..=10 {
        journal.append(&payload(i)).unwrap();
    }
    journal.close().unwrap();
    let segments = segment_files(&vfs, Path::new("/j"));
    vfs.remove(&segments[1]).unwrap();
    let err = open_mem(&vfs, small).err().unwrap();
    assert!(
        matches!(&err, JournalError::Corrupt { path, offset: 0, reason: Damage::Sequence { .. } } if *path == segments[2]),
        "{err}"
    );
}

#[test]
fn interrupted_segment_creation_is_removed() {
    let (vfs, _) = one_segment(2);
    let stray = Path::new("/j/segment-00000000000000000003.journal");
    vfs.create(stray).unwrap().write_all(b"HFJOUR").unwrap();
    vfs.sync_dir(Path::new("/j")).unwrap();
    let (journal, recovered) = open_mem(&vfs, config(JournalMode::Sync)).unwrap();
    assert_eq!(lsns(&recovered), vec![1, 2]);
    assert_eq!(journal.append(b"c").unwrap(), Lsn(3));
}

#[test]
fn inspect_reports_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), config(JournalMode::Sync)).unwrap();
    for i in 1..=4 {
        journal.append(&payload(i)).unwrap();
    }
    journal.write_snapshot(Lsn(2), b"two").unwrap();
    journal.close().unwrap();
    let listing = |p: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let files = listing(dir.path());
    let (span, recovered) = inspect(dir.path()).unwrap();
    assert_eq!(listing(dir.path()), files);
    assert_eq!(
        span,
        JournalSpan {
            snapshot: Some(Lsn(2)),
            first: Lsn(1),
            last: Lsn(4),
            durable: Lsn(4),
            segment_count: 1,
            segment_bytes: span.segment_bytes,
        }
    );
    assert_eq!(lsns(&recovered), vec![3, 4]);
    let vfs = MemVfs::new();
    assert_eq!(
        inspect_with(&vfs, Path::new("/empty")).unwrap().1,
        Recovered::default()
    );
}

#[test]
fn group_mode_syncs_within_the_delay_and_on_demand() {
    let vfs = MemVfs::new();
    let group = JournalConfig {
        group_delay: Duration::from_millis(5),
        ..config(JournalMode::Group)
    };
    let (journal, _) = open_mem(&vfs, group).unwrap();
    let lsn = journal.append(b"callback").unwrap();
    // Durable without anyone asking, within the delay (generous deadline for a loaded host).
    let deadline = Instant::now() + Duration::from_secs(10);
    while journal.span().durable < lsn {
        assert!(Instant::now() < deadline, "group commit did not sync");
        std::thread::sleep(Duration::from_millis(1));
    }
    let lock = journal.append_durable(b"lock").unwrap();
    assert!(journal.span().durable >= lock);
    journal.append(b"x").unwrap();
    assert_eq!(journal.flush().unwrap(), Lsn(3));
    assert_eq!(journal.span().durable, Lsn(3));
}

#[test]
fn none_mode_never_syncs_records() {
    let vfs = MemVfs::new();
    let (journal, _) = open_mem(&vfs, config(JournalMode::None)).unwrap();
    for i in 1..=10 {
        journal.append_durable(&payload(i)).unwrap();
    }
    assert_eq!(journal.stats().syncs, 0);
    // A power loss now loses the records but leaves a readable journal.
    let image = vfs.crash_image(&mut |_, _| 0);
    let (_journal, recovered) = open_mem(&image, config(JournalMode::None)).unwrap();
    assert!(recovered.records.is_empty());
}

#[test]
fn failed_sync_poisons_the_journal() {
    let vfs = MemVfs::new();
    let (journal, _) = open_mem(&vfs, config(JournalMode::Sync)).unwrap();
    journal.append(b"one").unwrap();
    vfs.crash_after(1); // the next write succeeds, its sync fails
    assert!(matches!(
        journal.append(b"two"),
        Err(JournalError::Io { .. })
    ));
    assert!(matches!(
        journal.append(b"three"),
        Err(JournalError::Poisoned(_))
    ));
    assert!(matches!(journal.flush(), Err(JournalError::Poisoned(_))));
}

#[test]
fn oversized_record_is_refused() {
    let vfs = MemVfs::new();
    let (journal, _) = open_mem(&vfs, config(JournalMode::Sync)).unwrap();
    let big = vec![0u8; state::journal::segment::RECORD_BYTES_MAX + 1];
    assert!(matches!(
        journal.append(&big),
        Err(JournalError::RecordTooLarge { .. })
    ));
    assert_eq!(journal.append(b"small").unwrap(), Lsn(1));
}
