//! Crash images of the metadata log with redb crash-simulated under it (`MemDisk`): a
//! scripted run of creates, stores, renames, removes and checkpoints on two volumes,
//! cut after each write in turn, also mixed with state records and snapshots in the one
//! log; and replay over the last checkpoint against the live tables for random runs.
//! Invariant: every image reopens to the namespace as it stood after the last answered
//! change or after the one in flight, never anything else.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use proto::{ClientId, Epoch, ErrorCode, Fid, FileKind, InstanceNonce, VolumeId, VolumeName};
use state::ClientKey;
use state::journaled::{ClientEntry, StateRecord, StateSnapshot};
use uuid::Uuid;

use super::mem_disk::{Kept, MemDisk};
use super::metadata_log::{BLOCK_BYTES, LogConfig, Lsn};
use super::{Outcome, Partition, PartitionConfig, SequenceKey, StorageError};
use crate::fence::Fence;
use crate::test_rng::Rng;

const VOLUMES: [VolumeId; 2] = [VolumeId(536_870_913), VolumeId(536_870_916)];
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

#[derive(Clone, Debug)]
enum Op {
    Create {
        volume: u8,
        name: u8,
        sequenced: bool,
    },
    MakeDir {
        volume: u8,
        name: u8,
    },
    Store {
        volume: u8,
        name: u8,
        len: u16,
        byte: u8,
    },
    Rename {
        volume: u8,
        from: u8,
        to: u8,
        sequenced: bool,
    },
    Remove {
        volume: u8,
        name: u8,
        directory: bool,
    },
    Checkpoint,
}

/// What a volume's root holds: each name with its bytes, or `None` for a directory.
type Namespace = BTreeMap<String, Option<Vec<u8>>>;
type State = Vec<Namespace>;

/// Small segments, so that runs start, fill and recycle several; checkpoints only
/// where the script puts them.
fn config() -> PartitionConfig {
    PartitionConfig {
        log: LogConfig {
            segment_bytes: 4 * BLOCK_BYTES,
        },
        checkpoint_period: None,
    }
}

fn open(root: &Path, disk: &MemDisk) -> Result<Partition, StorageError> {
    Partition::open_with(
        root,
        Arc::new(Fence::open()),
        Arc::new(disk.clone()),
        config(),
    )
}

fn setup(root: &Path) -> (MemDisk, Partition) {
    let disk = MemDisk::new();
    let partition = open(root, &disk).unwrap();
    for (i, id) in VOLUMES.iter().enumerate() {
        partition
            .create_volume(*id, VolumeName::parse(&format!("vol{i}")).unwrap(), 0)
            .unwrap();
    }
    (disk, partition)
}

fn key(seq: u64) -> SequenceKey {
    SequenceKey {
        client: ClientId(Uuid::from_u128(7)),
        instance: InstanceNonce(1),
        seq,
    }
}

/// Runs `op` (the `index`th); `Err` only for server trouble (a refusal is an answer).
fn apply(partition: &Partition, op: &Op, index: usize) -> Result<(), StorageError> {
    let volume_of = |v: u8| partition.volume(VOLUMES[usize::from(v)]);
    let root = |v: u8| Fid::root(VOLUMES[usize::from(v)]);
    let sequence = |sequenced: bool| sequenced.then(|| key(index as u64 + 1));
    let result = match op {
        Op::Create {
            volume,
            name,
            sequenced,
        } => volume_of(*volume)?
            .create(
                sequence(*sequenced),
                root(*volume),
                NAMES[usize::from(*name)],
                0o644,
                0,
                0,
                true,
            )
            .map(drop),
        Op::MakeDir { volume, name } => volume_of(*volume)?
            .make_dir(None, root(*volume), NAMES[usize::from(*name)], 0o755, 0, 0)
            .map(drop),
        Op::Store {
            volume,
            name,
            len,
            byte,
        } => {
            let volume = volume_of(*volume)?;
            match volume.lookup(Fid::root(volume.id()), NAMES[usize::from(*name)]) {
                Ok((status, _)) if status.kind == FileKind::File => volume
                    .store_data(status.fid, 0, &vec![*byte; usize::from(*len)], Some(0))
                    .map(drop),
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Op::Rename {
            volume,
            from,
            to,
            sequenced,
        } => volume_of(*volume)?
            .rename(
                sequence(*sequenced),
                root(*volume),
                NAMES[usize::from(*from)],
                root(*volume),
                NAMES[usize::from(*to)],
            )
            .map(drop),
        Op::Remove {
            volume,
            name,
            directory,
        } => volume_of(*volume)?
            .remove(None, root(*volume), NAMES[usize::from(*name)], *directory)
            .map(|outcome| match outcome {
                Outcome::Applied(_) | Outcome::Replayed(_) => (),
            }),
        Op::Checkpoint => partition.checkpoint(),
    };
    match result {
        Err(StorageError::Refused(_)) => Ok(()),
        other => other,
    }
}

fn state(partition: &Partition) -> State {
    VOLUMES
        .iter()
        .map(|id| {
            let volume = partition.volume(*id).unwrap();
            let (_, entries, more) = volume
                .read_dir(Fid::root(*id), None, 1000, 1 << 20)
                .unwrap();
            assert!(!more);
            entries
                .into_iter()
                .map(|entry| {
                    let content = (entry.kind == FileKind::File)
                        .then(|| volume.fetch_data(entry.fid, 0, 1 << 20).unwrap().1);
                    (entry.name, content)
                })
                .collect()
        })
        .collect()
}

fn script(seed: u64, count: usize) -> Vec<Op> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let volume = rng.small(2);
            let name = rng.small(4);
            match rng.small(12) {
                0..=2 => Op::Create {
                    volume,
                    name,
                    sequenced: rng.small(2) == 0,
                },
                3..=5 => Op::Store {
                    volume,
                    name,
                    // Mostly small; some past a block, so frames span several.
                    len: if rng.small(4) == 0 {
                        6000
                    } else {
                        u16::from(rng.small(200))
                    },
                    byte: rng.small(255) + 1,
                },
                6 => Op::MakeDir { volume, name },
                7 | 8 => Op::Rename {
                    volume,
                    from: name,
                    to: rng.small(4),
                    sequenced: rng.small(2) == 0,
                },
                9 | 10 => Op::Remove {
                    volume,
                    name,
                    directory: rng.small(3) == 0,
                },
                _ => Op::Checkpoint,
            }
        })
        .collect()
}

/// The states after each op of a run without a crash (`states[i]`: after `i` ops), and
/// how many mutations the run made after the setup.
fn reference(ops: &[Op]) -> (Vec<State>, u64) {
    let root = tempfile::tempdir().unwrap();
    let (disk, partition) = setup(root.path());
    let start = disk.mutations();
    let mut states = vec![state(&partition)];
    for (i, op) in ops.iter().enumerate() {
        apply(&partition, op, i).unwrap();
        states.push(state(&partition));
    }
    let mutations = disk.mutations() - start;
    (states, mutations)
}

#[derive(Clone, Copy, Debug)]
enum Image {
    /// Every unsynced write lost.
    Lost,
    /// Every unsynced write kept.
    Kept,
    /// The log's last unsynced write torn in half, the databases' unsynced writes lost.
    TornLog,
}

/// The disk as each kind of power cut would leave it now.
fn images(disk: &MemDisk) -> Vec<(Image, MemDisk)> {
    [Image::Lost, Image::Kept, Image::TornLog]
        .into_iter()
        .map(|mode| (mode, image(disk, mode)))
        .collect()
}

fn image(disk: &MemDisk, mode: Image) -> MemDisk {
    disk.crash_image(&mut |path, changes| {
        let log = path.components().any(|c| c.as_os_str() == "log");
        match mode {
            Image::Lost => Kept::default(),
            Image::Kept => Kept {
                changes,
                torn_bytes: 0,
            },
            Image::TornLog if log && changes > 0 => Kept {
                changes: changes - 1,
                torn_bytes: 2048,
            },
            Image::TornLog => Kept::default(),
        }
    })
}

/// Cuts the power after `cut` mutations of the script, and checks every image.
fn crash_at(ops: &[Op], states: &[State], cut: u64) {
    let root = tempfile::tempdir().unwrap();
    let (disk, partition) = setup(root.path());
    disk.crash_after(cut);
    let mut answered = 0;
    for (i, op) in ops.iter().enumerate() {
        if apply(&partition, op, i).is_err() {
            break;
        }
        answered = i + 1;
    }
    let images = images(&disk);
    drop(partition);
    for (mode, image) in images {
        let context = format!("cut after {cut} mutations, {answered} ops answered, {mode:?} image");
        let reopened = open(root.path(), &image).unwrap_or_else(|e| panic!("{context}: {e}"));
        let recovered = state(&reopened);
        let in_flight = states.get(answered + 1);
        assert!(
            recovered == states[answered] || Some(&recovered) == in_flight,
            "{context}: recovered {recovered:?}\nafter the answered ops: {:?}\nwith the one in flight: {in_flight:?}",
            states[answered]
        );
        // The log goes on after recovery, and a second crash keeps what it took.
        let volume = reopened.volume(VOLUMES[0]).unwrap();
        volume
            .make_dir(None, Fid::root(VOLUMES[0]), "after", 0o755, 0, 0)
            .unwrap_or_else(|e| panic!("{context}: a change after recovery: {e}"));
        let again = image.crash_image(&mut |_, _| Kept::default());
        drop(volume);
        drop(reopened);
        let reopened = open(root.path(), &again).unwrap_or_else(|e| panic!("{context}: {e}"));
        assert!(
            state(&reopened)[0].contains_key("after"),
            "{context}: the change after recovery was lost"
        );
    }
}

#[test]
fn crash_images_keep_every_answered_change_and_invent_none() {
    for seed in [1, 2] {
        let ops = script(seed, 50);
        let (states, mutations) = reference(&ops);
        assert!(mutations > 40, "the script writes: {mutations}");
        for cut in 0..=mutations {
            crash_at(&ops, &states, cut);
        }
    }
}

#[test]
fn a_lost_acknowledged_record_is_caught_by_the_check() {
    // The check above must be able to fail: a log whose durable tail is dropped loses
    // answered changes, which reopening shows.
    let root = tempfile::tempdir().unwrap();
    let (disk, partition) = setup(root.path());
    let ops = [Op::Create {
        volume: 0,
        name: 0,
        sequenced: false,
    }];
    apply(&partition, &ops[0], 0).unwrap();
    let before = state(&partition);
    let image = disk.crash_image(&mut |_, _| Kept::default());
    drop(partition);
    let log_dir = root.path().join("log");
    for name in super::disk::Disk::list(&image, &log_dir).unwrap() {
        let path = log_dir.join(name);
        let mut bytes = image.read(&path).unwrap();
        if bytes.len() > BLOCK_BYTES as usize {
            bytes.truncate(BLOCK_BYTES as usize);
            image.overwrite(&path, bytes).unwrap();
        }
    }
    let reopened = open(root.path(), &image).unwrap();
    assert_ne!(
        state(&reopened),
        before,
        "the created file went with the log"
    );
}

#[test]
fn damage_before_a_later_flush_is_an_error_not_a_loss() {
    let root = tempfile::tempdir().unwrap();
    let (disk, partition) = setup(root.path());
    let volume = partition.volume(VOLUMES[0]).unwrap();
    for name in ["a", "b", "c"] {
        volume
            .make_dir(None, Fid::root(VOLUMES[0]), name, 0o755, 0, 0)
            .unwrap();
    }
    let image = disk.crash_image(&mut |_, _| Kept::default());
    drop(volume);
    drop(partition);
    let log_dir = root.path().join("log");
    let names = super::disk::Disk::list(&image, &log_dir).unwrap();
    let segment = names
        .iter()
        .map(|name| log_dir.join(name))
        .find(|path| image.read(path).unwrap().len() > 2 * BLOCK_BYTES as usize)
        .expect("a segment with two frames");
    let mut bytes = image.read(&segment).unwrap();
    bytes[BLOCK_BYTES as usize + 40] ^= 0xff;
    image.overwrite(&segment, bytes).unwrap();
    let refused = open(root.path(), &image).unwrap_err();
    assert!(
        matches!(refused, StorageError::Log(super::LogError::Corrupt { .. })),
        "{refused}"
    );
}

#[test]
fn a_create_costs_one_log_sync() {
    let root = tempfile::tempdir().unwrap();
    let (disk, partition) = setup(root.path());
    let volume = partition.volume(VOLUMES[0]).unwrap();
    let syncs = disk.syncs();
    for i in 0..20 {
        volume
            .create(
                None,
                Fid::root(VOLUMES[0]),
                &format!("f{i}"),
                0o644,
                0,
                0,
                true,
            )
            .unwrap();
    }
    let per_create = (disk.syncs() - syncs) as f64 / 20.0;
    // One frame each, plus a new segment now and then (these segments are small).
    assert!(per_create < 1.5, "{per_create} syncs per create");
    let figures = partition.log_figures();
    assert_eq!(figures.records, 20);
    assert_eq!(
        refused_code(volume.create(None, Fid::root(VOLUMES[0]), "f0", 0o644, 0, 0, true)),
        ErrorCode::Exists
    );
}

fn refused_code<T: std::fmt::Debug>(result: Result<T, StorageError>) -> ErrorCode {
    match result {
        Err(StorageError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let volume = 0u8..2;
    let name = 0u8..4;
    prop_oneof![
        (volume.clone(), name.clone(), any::<bool>()).prop_map(|(volume, name, sequenced)| {
            Op::Create {
                volume,
                name,
                sequenced,
            }
        }),
        (volume.clone(), name.clone()).prop_map(|(volume, name)| Op::MakeDir { volume, name }),
        (volume.clone(), name.clone(), 0u16..7000, 1u8..255).prop_map(
            |(volume, name, len, byte)| Op::Store {
                volume,
                name,
                len,
                byte
            }
        ),
        (volume.clone(), name.clone(), 0u8..4, any::<bool>()).prop_map(
            |(volume, from, to, sequenced)| Op::Rename {
                volume,
                from,
                to,
                sequenced
            }
        ),
        (volume, name, any::<bool>()).prop_map(|(volume, name, directory)| Op::Remove {
            volume,
            name,
            directory
        }),
        Just(Op::Checkpoint),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Replaying the log over the last checkpoint gives the live tables, row for row.
    #[test]
    fn replay_over_the_last_checkpoint_equals_the_live_tables(
        ops in proptest::collection::vec(op_strategy(), 1..40)
    ) {
        let root = tempfile::tempdir().unwrap();
        let (disk, partition) = setup(root.path());
        for (i, op) in ops.iter().enumerate() {
            apply(&partition, op, i).unwrap();
        }
        let live: Vec<Vec<String>> = VOLUMES
            .iter()
            .map(|id| partition.volume(*id).unwrap().dump())
            .collect();
        // Power cut now: redb keeps its last checkpoint, the log every answered change.
        let image = disk.crash_image(&mut |_, _| Kept::default());
        drop(partition);
        let reopened = open(root.path(), &image).unwrap();
        let replayed: Vec<Vec<String>> = VOLUMES
            .iter()
            .map(|id| reopened.volume(*id).unwrap().dump())
            .collect();
        prop_assert_eq!(live, replayed);
    }
}

/// A step of a run that mixes storage batches and state records in the one log.
#[derive(Clone, Debug)]
enum Mixed {
    Storage(Op),
    /// A state record (a client admitted under a key of its own), waited for durable.
    Admit(u32),
    /// A state snapshot of every client admitted so far, at the log's position.
    StateSnapshot,
}

/// The storage script with a state record after every third op and a state snapshot
/// after every tenth: the log's segments hold both kinds, and checkpoints (in the
/// script) release segments while the state's hold keeps its records.
fn mixed_script(seed: u64, count: usize) -> Vec<Mixed> {
    let mut mixed = Vec::new();
    for (i, op) in script(seed, count).into_iter().enumerate() {
        mixed.push(Mixed::Storage(op));
        if i % 3 == 1 {
            mixed.push(Mixed::Admit(i as u32));
        }
        if i % 10 == 7 {
            mixed.push(Mixed::StateSnapshot);
        }
    }
    mixed
}

fn admitted(key: u32) -> ClientEntry {
    ClientEntry {
        key: ClientKey(key),
        client: ClientId(Uuid::from_u128(u128::from(key) + 100)),
        instance: InstanceNonce(1),
    }
}

/// Runs `step`; `Err` for server trouble (the log failed).
fn apply_mixed(
    partition: &Partition,
    clients: &mut Vec<ClientEntry>,
    step: &Mixed,
    index: usize,
) -> Result<(), String> {
    let log = partition.log();
    match step {
        Mixed::Storage(op) => apply(partition, op, index).map_err(|e| e.to_string()),
        Mixed::Admit(key) => {
            let entry = admitted(*key);
            let record = StateRecord::ClientAdmitted {
                key: entry.key,
                client: entry.client,
                instance: entry.instance,
            };
            let (done, durable) = tokio::sync::oneshot::channel();
            log.append_state(&postcard::to_allocvec(&record).unwrap(), Some(done))
                .map_err(|e| e.to_string())?;
            clients.push(entry);
            match durable.blocking_recv() {
                Ok(true) => Ok(()),
                _ => Err("the state record is not durable".into()),
            }
        }
        Mixed::StateSnapshot => {
            let at = Lsn(log.next_lsn().0 - 1);
            let snapshot = StateSnapshot {
                clients: clients.clone(),
                ..StateSnapshot::default()
            };
            let payload = postcard::to_allocvec(&snapshot).unwrap();
            log.write_state_snapshot(Epoch(1), at, &payload)
                .map_err(|e| e.to_string())
        }
    }
}

/// The namespaces of the volumes and the keys of the clients the state side recovers
/// (the snapshot, then the state records after it), of a partition just opened.
fn mixed_state(partition: &Partition) -> (State, BTreeSet<u32>) {
    let recovery = partition
        .take_state_recovery()
        .expect("the state recovery, once");
    let recovered = state::journal::Recovered {
        snapshot: recovery
            .snapshot
            .map(|s| state::journal::RecoveredSnapshot {
                lsn: s.lsn,
                epoch: s.epoch,
                payload: s.payload,
            }),
        records: recovery
            .records
            .into_iter()
            .map(|r| (r.lsn, r.body))
            .collect(),
    };
    let (replayed, _) = state::journaled::replay(&recovered).expect("the state replays");
    let keys = replayed.clients.iter().map(|c| c.key.0).collect();
    (state(partition), keys)
}

/// The state after each step of a run without a crash, from a reopening of its image
/// after each step; and how many mutations the run made after the setup.
fn mixed_reference(steps: &[Mixed]) -> (Vec<(State, BTreeSet<u32>)>, u64) {
    let root = tempfile::tempdir().unwrap();
    let (disk, partition) = setup(root.path());
    let start = disk.mutations();
    let mut clients = Vec::new();
    let mut states = vec![(state(&partition), BTreeSet::new())];
    for (i, step) in steps.iter().enumerate() {
        apply_mixed(&partition, &mut clients, step, i).unwrap();
        let keys = clients.iter().map(|c| c.key.0).collect();
        states.push((state(&partition), keys));
    }
    let mutations = disk.mutations() - start;
    // A clean close and reopen gives the last state, both kinds.
    drop(partition);
    let reopened = open(root.path(), &disk).unwrap();
    assert_eq!(&mixed_state(&reopened), states.last().unwrap());
    (states, mutations)
}

#[test]
fn crash_images_of_a_log_mixing_storage_and_state_records_keep_both() {
    for seed in [3, 4] {
        let steps = mixed_script(seed, 40);
        let (states, mutations) = mixed_reference(&steps);
        for cut in 0..=mutations {
            let root = tempfile::tempdir().unwrap();
            let (disk, partition) = setup(root.path());
            disk.crash_after(cut);
            let mut clients = Vec::new();
            let mut answered = 0;
            for (i, step) in steps.iter().enumerate() {
                if apply_mixed(&partition, &mut clients, step, i).is_err() {
                    break;
                }
                answered = i + 1;
            }
            let images = images(&disk);
            drop(partition);
            for (mode, image) in images {
                let context = format!(
                    "seed {seed}, cut after {cut} mutations, {answered} steps answered, {mode:?} image"
                );
                let reopened =
                    open(root.path(), &image).unwrap_or_else(|e| panic!("{context}: {e}"));
                let recovered = mixed_state(&reopened);
                let in_flight = states.get(answered + 1);
                assert!(
                    recovered == states[answered] || Some(&recovered) == in_flight,
                    "{context}: recovered {recovered:?}\nafter the answered steps: {:?}\nwith the one in flight: {in_flight:?}",
                    states[answered]
                );
            }
        }
    }
}
