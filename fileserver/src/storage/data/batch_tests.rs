//! A write-back's batch of stores as the server sees it from a window of stores in
//! flight: landing out of order, concurrently, failing part way through, or cut by a
//! crash between one store's write and its commit. Each store stays all or nothing, so
//! every version the file passes through is whole: the bytes of the stores applied so
//! far and zeros (or the old bytes) elsewhere.
//! Invariant: each test runs on its own partition and arms its faults on its own thread.

use std::path::Path;
use std::sync::{Arc, Barrier};

use proto::{
    ClientId, DataVersion, ErrorCode, Fid, InstanceNonce, VnodeStatus, VolumeId, VolumeName,
    WriteBackId,
};

use crate::fence::Fence;
use crate::storage::data_files::faults as file_faults;
use crate::storage::transaction::faults as batch_faults;
use crate::storage::{Outcome, Partition, SequenceKey, StorageError, StoreCondition, Volume};

const VOLUME: VolumeId = VolumeId(536_870_915);
const CLIENT: ClientId = ClientId(uuid::Uuid::from_u128(0xba7c));
/// One store of the batch: past the inline limit, so the file lives in a data file.
const STORE_BYTES: usize = 200_000;

fn open(dir: &Path) -> Arc<Volume> {
    let partition = Partition::open(dir, Arc::new(Fence::open())).unwrap();
    partition.volume(VOLUME).unwrap()
}

/// A partition in `dir` with one empty file.
fn setup(dir: &Path) -> (Arc<Volume>, Fid) {
    file_faults::clear();
    let partition = Partition::open(dir, Arc::new(Fence::open())).unwrap();
    partition
        .create_volume(VOLUME, VolumeName::parse("batch").unwrap(), 0)
        .unwrap();
    let volume = partition.volume(VOLUME).unwrap();
    let created = volume
        .create(None, Fid::root(VOLUME), "f", 0o644, 0, 0, true)
        .unwrap();
    let Outcome::Applied(created) = created else {
        panic!("a new file was answered from a record");
    };
    (volume, created.status.fid)
}

/// Store `n` of the batch: its offset and bytes.
fn piece(n: usize) -> (u64, Vec<u8>) {
    let offset = (n * STORE_BYTES) as u64;
    let data = (0..STORE_BYTES)
        .map(|i| (i % 251) as u8 ^ (n as u8 + 1))
        .collect();
    (offset, data)
}

/// Store `n` of write-back 1, which started from `base`.
fn condition(n: usize, base: DataVersion) -> StoreCondition {
    StoreCondition {
        base,
        write_back: WriteBackId(1),
        sequence: SequenceKey {
            client: CLIENT,
            instance: InstanceNonce(1),
            seq: n as u64 + 1,
        },
    }
}

fn store(
    volume: &Volume,
    fid: Fid,
    n: usize,
    base: DataVersion,
) -> Result<Outcome<VnodeStatus>, StorageError> {
    let (offset, data) = piece(n);
    volume.store_data_if(fid, offset, &data, condition(n, base))
}

fn applied(result: Result<Outcome<VnodeStatus>, StorageError>) -> VnodeStatus {
    match result {
        Ok(Outcome::Applied(status)) => status,
        other => panic!("expected an applied store, got {other:?}"),
    }
}

/// The file's status and whole content as fetches give them.
fn content(volume: &Volume, fid: Fid) -> (VnodeStatus, Vec<u8>) {
    let status = volume.fetch_status(fid).unwrap();
    let mut bytes = Vec::new();
    while (bytes.len() as u64) < status.size {
        let (_, data) = volume.fetch_data(fid, bytes.len() as u64, 1 << 20).unwrap();
        assert!(!data.is_empty());
        bytes.extend_from_slice(&data);
    }
    (status, bytes)
}

/// Asserts the file is exactly the stores `applied` of the batch over an empty file:
/// their bytes, zeros between them, the size their furthest end, one version each.
fn assert_whole(volume: &Volume, fid: Fid, base: DataVersion, applied: &[usize]) {
    let size = applied
        .iter()
        .map(|&n| (n + 1) * STORE_BYTES)
        .max()
        .unwrap_or(0);
    let mut expected = vec![0u8; size];
    for &n in applied {
        let (offset, data) = piece(n);
        expected[offset as usize..offset as usize + STORE_BYTES].copy_from_slice(&data);
    }
    let (status, bytes) = content(volume, fid);
    assert_eq!(status.size, size as u64, "size after stores {applied:?}");
    assert_eq!(
        status.data_version.0,
        base.0 + applied.len() as u64,
        "one version per store applied: {applied:?}"
    );
    assert!(bytes == expected, "the bytes of exactly stores {applied:?}");
}

#[test]
fn a_batch_landing_out_of_order_passes_only_through_whole_versions() {
    let dir = tempfile::tempdir().unwrap();
    let (volume, fid) = setup(dir.path());
    let base = volume.fetch_status(fid).unwrap().data_version;
    let mut landed = Vec::new();
    // The last store first (it extends the file past a hole), the first last.
    for n in [3, 5, 0, 4, 1, 2] {
        let status = applied(store(&volume, fid, n, base));
        landed.push(n);
        assert_eq!(status.data_version.0, base.0 + landed.len() as u64);
        assert_whole(&volume, fid, base, &landed);
    }
    let synced = volume.fsync(fid).unwrap();
    assert_eq!(synced.data_version.0, base.0 + 6);
}

#[test]
fn stores_of_a_batch_in_flight_together_all_land_and_one_sync_covers_them() {
    let dir = tempfile::tempdir().unwrap();
    let (volume, fid) = setup(dir.path());
    let first = volume.fetch_status(fid).unwrap().data_version;
    // The file's first write-back makes it 8 stores long: the next one rewrites it in
    // place, its stores sharing the file (disjoint ranges) from eight threads at once.
    for n in 0..8 {
        applied(store(&volume, fid, n, first));
    }
    let base = volume.fetch_status(fid).unwrap().data_version;
    let start = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .rev()
        .map(|n| {
            let (volume, start) = (volume.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let (offset, data) = piece(n);
                let data: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
                let condition = StoreCondition {
                    write_back: WriteBackId(2),
                    sequence: SequenceKey {
                        seq: 100 + n as u64,
                        ..condition(n, base).sequence
                    },
                    base,
                };
                applied(volume.store_data_if(fid, offset, &data, condition))
            })
        })
        .collect();
    let versions: Vec<u64> = threads
        .into_iter()
        .map(|t| t.join().unwrap().data_version.0)
        .collect();
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (base.0 + 1..=base.0 + 8).collect::<Vec<_>>(),
        "one version each"
    );
    // Concurrent syncs of the batch all answer the file after every store.
    let syncs: Vec<_> = (0..4)
        .map(|_| {
            let volume = volume.clone();
            std::thread::spawn(move || volume.fsync(fid).unwrap())
        })
        .collect();
    for sync in syncs {
        assert_eq!(sync.join().unwrap().data_version.0, base.0 + 8);
    }
    let (_, bytes) = content(&volume, fid);
    for n in 0..8 {
        let (offset, data) = piece(n);
        let stored = &bytes[offset as usize..offset as usize + STORE_BYTES];
        assert!(
            stored.iter().zip(&data).all(|(s, d)| *s == d ^ 0xff),
            "store {n}"
        );
    }
}

#[test]
fn a_store_failing_mid_batch_changes_nothing_and_its_retry_completes_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (volume, fid) = setup(dir.path());
    let base = volume.fetch_status(fid).unwrap().data_version;
    applied(store(&volume, fid, 2, base));
    applied(store(&volume, fid, 0, base));
    // Store 1 (inside the size) fails part way through its write: the disk filled.
    file_faults::fail_writes_after(50_000);
    let failed = store(&volume, fid, 1, base).unwrap_err();
    file_faults::clear();
    assert_eq!(failed.code(), ErrorCode::NoSpace, "{failed}");
    assert_whole(&volume, fid, base, &[2, 0]);
    // Store 3 (extending) fails at its commit: its bytes are taken back.
    batch_faults::fail_next_batch();
    assert!(store(&volume, fid, 3, base).is_err());
    assert_whole(&volume, fid, base, &[2, 0]);
    // The rest of the batch lands, and the failed stores' retries (the same sequenced
    // requests: nothing was recorded for them) complete it.
    applied(store(&volume, fid, 4, base));
    applied(store(&volume, fid, 1, base));
    applied(store(&volume, fid, 3, base));
    assert_whole(&volume, fid, base, &[2, 0, 4, 1, 3]);
    volume.fsync(fid).unwrap();
}

#[test]
fn a_crash_mid_batch_leaves_the_stores_committed_and_the_batch_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (volume, fid) = setup(dir.path());
    let base = volume.fetch_status(fid).unwrap().data_version;
    applied(store(&volume, fid, 1, base));
    applied(store(&volume, fid, 0, base));
    // Store 2 wrote its bytes past the size, then the server died before its commit.
    {
        use std::os::unix::fs::FileExt;
        let path = dir
            .path()
            .join(format!("vol.{VOLUME}"))
            .join("data")
            .join(fid.vnode.0.to_string());
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let (offset, data) = piece(2);
        file.write_all_at(&data, offset).unwrap();
    }
    drop(volume);
    let volume = open(dir.path());
    assert_whole(&volume, fid, base, &[1, 0]);
    // A retry of a store answered before the crash is answered from its record.
    match store(&volume, fid, 1, base).unwrap() {
        Outcome::Replayed(_) => {}
        Outcome::Applied(status) => panic!("store 1 applied twice: {status:?}"),
    }
    assert_whole(&volume, fid, base, &[1, 0]);
    // Store 3 lands past a gap, where store 2's unacknowledged bytes read as zeros.
    applied(store(&volume, fid, 3, base));
    assert_whole(&volume, fid, base, &[1, 0, 3]);
    // Store 2's retry, then the sync, complete the batch.
    applied(store(&volume, fid, 2, base));
    assert_whole(&volume, fid, base, &[1, 0, 3, 2]);
    volume.fsync(fid).unwrap();
}
