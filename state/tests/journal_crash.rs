//! Crash images: a workload of appends, segment rolls and snapshots on a `MemVfs` whose
//! power is cut after mutation k, for every k; recovery from what the disk would hold
//! must return every acknowledged record and nothing that was never appended.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::Epoch;
use state::journal::MemVfs;
use state::{Journal, JournalConfig, JournalMode, Lsn, Recovered};

const RECORDS: u64 = 30;
const SNAPSHOT_EVERY: u64 = 8;

fn config(mode: JournalMode) -> JournalConfig {
    JournalConfig {
        mode,
        segment_bytes_max: 180,
        // Long enough that the flusher never runs: the crash points stay deterministic.
        group_delay: Duration::from_secs(3600),
        epoch: Epoch(1),
    }
}

/// The payload of record `lsn`: deterministic, so recovery can be checked against it.
fn payload(lsn: u64) -> Vec<u8> {
    format!("r{lsn}:")
        .repeat(1 + (lsn % 5) as usize)
        .into_bytes()
}

fn snapshot_payload(upto: u64) -> Vec<u8> {
    let records: Vec<Vec<u8>> = (1..=upto).map(payload).collect();
    postcard::to_stdvec(&records).unwrap()
}

/// Runs the workload until it ends or the power is cut; returns the last lsn the journal
/// acknowledged as durable: every append in `sync` mode, every third one (appended with
/// `append_durable`, as a lock would be) in `group` mode, only snapshots in `none` mode.
fn workload(vfs: &MemVfs, mode: JournalMode) -> Lsn {
    let Ok((journal, _)) = Journal::open_with(Arc::new(vfs.clone()), Path::new("/j"), config(mode))
    else {
        return Lsn(0);
    };
    let mut acknowledged = Lsn(0);
    for expected in 1..=RECORDS {
        let durable = expected % 3 == 0;
        let result = if durable {
            journal.append_durable(&payload(expected))
        } else {
            journal.append(&payload(expected))
        };
        match result {
            Ok(lsn) => {
                assert_eq!(lsn, Lsn(expected));
                if mode == JournalMode::Sync || (mode == JournalMode::Group && durable) {
                    acknowledged = lsn;
                }
            }
            Err(_) => return acknowledged,
        }
        if expected % SNAPSHOT_EVERY == 0 {
            match journal.write_snapshot(Lsn(expected), &snapshot_payload(expected)) {
                Ok(()) => acknowledged = Lsn(expected),
                Err(_) => return acknowledged,
            }
        }
    }
    acknowledged
}

/// Rebuilds the record list from a recovery and checks it holds no invented record.
fn replay(recovered: &Recovered) -> Vec<Vec<u8>> {
    let mut state: Vec<Vec<u8>> = match &recovered.snapshot {
        Some(snapshot) => {
            let records: Vec<Vec<u8>> = postcard::from_bytes(&snapshot.payload).unwrap();
            assert_eq!(
                records.len() as u64,
                snapshot.lsn.0,
                "snapshot covers its lsn"
            );
            records
        }
        None => Vec::new(),
    };
    for (lsn, bytes) in &recovered.records {
        assert_eq!(
            lsn.0,
            state.len() as u64 + 1,
            "records follow the snapshot without gaps"
        );
        state.push(bytes.clone());
    }
    for (index, bytes) in state.iter().enumerate() {
        assert_eq!(
            *bytes,
            payload(index as u64 + 1),
            "record {} is not what was appended",
            index + 1
        );
    }
    state
}

fn check_crash_at(mode: JournalMode, k: u64, keep: &mut dyn FnMut(&Path, usize) -> usize) {
    let vfs = MemVfs::new();
    vfs.crash_after(k);
    let acknowledged = workload(&vfs, mode);
    let image = vfs.crash_image(keep);
    let (journal, recovered) =
        Journal::open_with(Arc::new(image.clone()), Path::new("/j"), config(mode)).unwrap_or_else(
            |e| panic!("{mode:?}, crash after {k} mutations: recovery failed: {e}"),
        );
    let state = replay(&recovered);
    assert!(
        state.len() as u64 >= acknowledged.0,
        "{mode:?}, crash after {k} mutations: {} recovered, {acknowledged} acknowledged",
        state.len()
    );
    // The recovered journal goes on where the state ends, and survives a clean reopen.
    let next = journal.append(&payload(state.len() as u64 + 1)).unwrap();
    assert_eq!(next.0, state.len() as u64 + 1);
    journal.flush().unwrap();
    journal.close().unwrap();
    let (_journal, again) =
        Journal::open_with(Arc::new(image), Path::new("/j"), config(mode)).unwrap();
    assert_eq!(replay(&again).len() as u64, next.0);
}

const MODES: [JournalMode; 3] = [JournalMode::Sync, JournalMode::Group, JournalMode::None];

fn total_mutations(mode: JournalMode) -> u64 {
    let vfs = MemVfs::new();
    let acknowledged = workload(&vfs, mode);
    assert!(
        acknowledged >= Lsn(RECORDS - RECORDS % SNAPSHOT_EVERY),
        "{mode:?}: {acknowledged}"
    );
    vfs.mutations()
}

#[test]
fn crash_at_every_mutation_losing_unsynced_bytes() {
    for mode in MODES {
        for k in 0..=total_mutations(mode) {
            check_crash_at(mode, k, &mut |_, _| 0);
        }
    }
}

#[test]
fn crash_at_every_mutation_keeping_unsynced_bytes() {
    for mode in MODES {
        for k in 0..=total_mutations(mode) {
            check_crash_at(mode, k, &mut |_, unsynced| unsynced);
        }
    }
}

#[test]
fn crash_at_every_mutation_keeping_part_of_the_unsynced_bytes() {
    for mode in MODES {
        let total = total_mutations(mode);
        assert!(
            total > 50,
            "the workload rolls segments and takes snapshots: {total}"
        );
        for k in 0..=total {
            for fraction in [1, 2, 3] {
                check_crash_at(mode, k, &mut |_, unsynced| unsynced * fraction / 4);
            }
            // An unsynced tail cut one byte short.
            check_crash_at(mode, k, &mut |_, unsynced| unsynced.saturating_sub(1));
        }
    }
}
