//! Stores are all or nothing: a failure injected at each step of a store (the write of
//! its bytes, part way or at once; the sync of a new data file; the batch's commit)
//! leaves the file's size, data version and bytes as they were; conditional stores
//! refuse to land after a newer change and never refuse their own write-back.
//! Invariant: each test arms its faults on its own thread and on its own partition.

use std::path::PathBuf;
use std::sync::Arc;

use proto::{
    ClientId, DataVersion, ErrorCode, Fid, InstanceNonce, Response, SetAttrs, VnodeStatus,
    VolumeId, VolumeName, WriteBackId,
};

use super::data::INLINE_BYTES_MAX;
use super::data_files::faults as file_faults;
use super::transaction::faults as batch_faults;
use super::{Outcome, Partition, SequenceKey, StorageError, StoreCondition, Volume};
use crate::fence::Fence;

struct Setup {
    dir: tempfile::TempDir,
    volume: Arc<Volume>,
    fid: Fid,
}

/// A volume with one empty file.
fn setup() -> Setup {
    file_faults::clear();
    let dir = tempfile::tempdir().unwrap();
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    let id = VolumeId(536_870_913);
    partition
        .create_volume(id, VolumeName::parse("root.cell").unwrap(), 0)
        .unwrap();
    let volume = partition.volume(id).unwrap();
    let fid = match volume
        .create(None, Fid::root(id), "f", 0o644, 0, 0, true)
        .unwrap()
    {
        Outcome::Applied(created) => created.status.fid,
        Outcome::Replayed(answer) => panic!("replayed {answer:?}"),
    };
    Setup { dir, volume, fid }
}

impl Setup {
    fn data_file(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("vol.{}", self.fid.volume))
            .join("data")
            .join(self.fid.vnode.0.to_string())
    }

    fn data_file_length(&self) -> Option<u64> {
        std::fs::metadata(self.data_file()).ok().map(|m| m.len())
    }

    /// The file's status and whole content as a fetch gives them.
    fn file(&self) -> (VnodeStatus, Vec<u8>) {
        let status = self.volume.fetch_status(self.fid).unwrap();
        let mut content = Vec::new();
        while (content.len() as u64) < status.size {
            let (_, data) = self
                .volume
                .fetch_data(self.fid, content.len() as u64, 1 << 20)
                .unwrap();
            assert!(!data.is_empty());
            content.extend_from_slice(&data);
        }
        (status, content)
    }

    fn store(&self, offset: u64, data: &[u8]) -> Result<VnodeStatus, StorageError> {
        self.volume.store_data(self.fid, offset, data, None)
    }

    fn store_if(
        &self,
        offset: u64,
        data: &[u8],
        condition: StoreCondition,
    ) -> Result<Outcome<VnodeStatus>, StorageError> {
        self.volume.store_data_if(self.fid, offset, data, condition)
    }

    /// Asserts that the file is exactly `before` (status and bytes) and that its data
    /// file holds no byte past the size.
    fn assert_unchanged(&self, before: &(VnodeStatus, Vec<u8>)) {
        let now = self.file();
        assert_eq!(now.0.size, before.0.size, "size");
        assert_eq!(now.0.data_version, before.0.data_version, "data version");
        assert!(now.1 == before.1, "bytes");
        if let Some(length) = self.data_file_length() {
            assert!(length <= before.0.size, "data file of {length} bytes");
        }
    }
}

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length).map(|n| (n % 251) as u8 ^ seed).collect()
}

fn no_space(result: Result<impl std::fmt::Debug, StorageError>) {
    match result {
        Err(e) => assert_eq!(e.code(), ErrorCode::NoSpace, "{e}"),
        Ok(value) => panic!("expected ENOSPC, got {value:?}"),
    }
}

fn outdated(result: Result<Outcome<VnodeStatus>, StorageError>) -> DataVersion {
    match result {
        Err(StorageError::Refused(ErrorCode::StoreOutdated { current })) => current,
        other => panic!("expected StoreOutdated, got {other:?}"),
    }
}

fn applied(result: Result<Outcome<VnodeStatus>, StorageError>) -> VnodeStatus {
    match result {
        Ok(Outcome::Applied(status)) => status,
        other => panic!("expected an applied store, got {other:?}"),
    }
}

const CLIENT: ClientId = ClientId(uuid::Uuid::from_u128(0xc1));
const OTHER: ClientId = ClientId(uuid::Uuid::from_u128(0xc2));

fn condition(client: ClientId, seq: u64, base: DataVersion, write_back: u64) -> StoreCondition {
    StoreCondition {
        base,
        write_back: WriteBackId(write_back),
        sequence: SequenceKey {
            client,
            instance: InstanceNonce(1),
            seq,
        },
    }
}

const BIG: usize = 3 * INLINE_BYTES_MAX as usize;

#[test]
fn a_write_failing_part_way_into_a_data_file_changes_nothing() {
    let s = setup();
    s.store(0, &pattern(BIG, 1)).unwrap();
    let before = s.file();
    // Rewrites the second half and extends by as much again; fails after a third.
    file_faults::fail_writes_after(BIG as u64 / 3);
    no_space(s.store(BIG as u64 / 2, &pattern(BIG, 2)));
    s.assert_unchanged(&before);
    assert_eq!(s.data_file_length(), Some(BIG as u64));
    // Once space is back, the same store is applied whole.
    file_faults::clear();
    let stored = s.store(BIG as u64 / 2, &pattern(BIG, 2)).unwrap();
    assert_eq!(stored.data_version, before.0.data_version.next());
    let (status, content) = s.file();
    assert_eq!(status.size, BIG as u64 * 3 / 2);
    assert!(content[..BIG / 2] == before.1[..BIG / 2]);
    assert!(content[BIG / 2..] == pattern(BIG, 2)[..]);
}

#[test]
fn a_write_failing_at_once_or_inside_the_size_changes_nothing() {
    let s = setup();
    s.store(0, &pattern(BIG, 1)).unwrap();
    let before = s.file();
    // An extension that cannot write its first byte.
    file_faults::fail_writes_after(0);
    no_space(s.store(BIG as u64, &pattern(1000, 3)));
    s.assert_unchanged(&before);
    // A rewrite inside the size (the shared-lock path), failing part way.
    file_faults::fail_writes_after(100);
    no_space(s.store(10, &pattern(5000, 4)));
    s.assert_unchanged(&before);
    assert_eq!(s.data_file_length(), Some(BIG as u64));
}

#[test]
fn a_failed_commit_puts_the_written_bytes_back() {
    let s = setup();
    s.store(0, &pattern(BIG, 1)).unwrap();
    let before = s.file();
    for (offset, length) in [(100, 5000), (BIG as u64 - 10, 70_000)] {
        // A rewrite inside the size, then an extension.
        batch_faults::fail_next_batch();
        let failed = s.store(offset, &pattern(length, 5));
        assert!(
            matches!(failed, Err(StorageError::BatchFailed { .. })),
            "{failed:?}"
        );
        s.assert_unchanged(&before);
    }
}

#[test]
fn a_move_to_a_data_file_whose_sync_or_commit_fails_stays_inline() {
    let s = setup();
    s.store(0, &pattern(1000, 1)).unwrap();
    let before = s.file();
    file_faults::fail_next_sync();
    let failed = s.store(500, &pattern(BIG, 2));
    assert!(failed.is_err(), "{failed:?}");
    s.assert_unchanged(&before);
    assert_eq!(s.data_file_length(), None, "the new data file is removed");

    file_faults::fail_writes_after(10_000);
    no_space(s.store(500, &pattern(BIG, 2)));
    s.assert_unchanged(&before);
    assert_eq!(s.data_file_length(), None);

    batch_faults::fail_next_batch();
    assert!(s.store(500, &pattern(BIG, 2)).is_err());
    s.assert_unchanged(&before);
    assert_eq!(s.data_file_length(), None);

    // And an inline store whose commit fails.
    batch_faults::fail_next_batch();
    assert!(s.store(10, b"abc").is_err());
    s.assert_unchanged(&before);
}

#[test]
fn bytes_a_crash_left_past_the_size_never_show_through_an_extension() {
    let s = setup();
    s.store(0, &pattern(BIG, 1)).unwrap();
    // What a crash between a store's write and its commit leaves behind.
    let garbage = pattern(10_000, 9);
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(s.data_file())
            .unwrap();
        file.write_all_at(&garbage, BIG as u64).unwrap();
    }
    // Extended by setattr: zeros, not the garbage.
    let extended = SetAttrs {
        size: Some(BIG as u64 + 5000),
        ..SetAttrs::default()
    };
    s.volume.set_attr(s.fid, &extended).unwrap();
    let (_, content) = s.file();
    assert!(content[BIG..].iter().all(|&b| b == 0));

    // Extended by a store past a gap: zeros in the gap.
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(s.data_file())
            .unwrap();
        file.write_all_at(&garbage, BIG as u64 + 5000).unwrap();
    }
    s.store(BIG as u64 + 20_000, b"end").unwrap();
    let (status, content) = s.file();
    assert_eq!(status.size, BIG as u64 + 20_003);
    assert!(content[BIG..BIG + 20_000].iter().all(|&b| b == 0));
    assert_eq!(&content[BIG + 20_000..], b"end");
}

#[test]
fn a_store_truncating_below_its_offset_zeroes_the_gap_and_cuts_the_rest() {
    let s = setup();
    s.store(0, &pattern(BIG, 1)).unwrap();
    let status = s
        .volume
        .store_data(s.fid, 2000, b"xyz", Some(1000))
        .unwrap();
    assert_eq!(status.size, 2003);
    let (_, content) = s.file();
    assert!(content[..1000] == pattern(BIG, 1)[..1000]);
    assert!(content[1000..2000].iter().all(|&b| b == 0));
    assert_eq!(&content[2000..], b"xyz");
    assert_eq!(s.data_file_length(), Some(2003));
    // The same store failing part way changes nothing, zeros included.
    s.store(0, &pattern(BIG, 2)).unwrap();
    let before = s.file();
    file_faults::fail_writes_after(500);
    no_space(s.volume.store_data(s.fid, 2000, b"xyz", Some(1000)));
    s.assert_unchanged(&before);
}

#[test]
fn a_late_store_after_a_truncate_is_refused() {
    let s = setup();
    s.store(0, &pattern(1000, 1)).unwrap();
    let base = s.file().0.data_version;
    let truncated = s
        .volume
        .set_attr(
            s.fid,
            &SetAttrs {
                size: Some(0),
                ..SetAttrs::default()
            },
        )
        .unwrap();
    let before = s.file();
    let current = outdated(s.store_if(0, &pattern(1000, 1), condition(CLIENT, 1, base, 1)));
    assert_eq!(current, truncated.data_version);
    s.assert_unchanged(&before);
    // Into a data file as well, on both lock paths.
    s.store(0, &pattern(BIG, 1)).unwrap();
    let base = s.file().0.data_version;
    s.store(0, &pattern(BIG, 2)).unwrap();
    let before = s.file();
    outdated(s.store_if(0, &pattern(100, 3), condition(CLIENT, 2, base, 2)));
    outdated(s.store_if(BIG as u64, &pattern(100, 3), condition(CLIENT, 3, base, 2)));
    s.assert_unchanged(&before);
}

#[test]
fn a_write_back_s_own_stores_never_refuse_each_other_but_another_s_do() {
    let s = setup();
    s.store(0, &pattern(BIG, 1)).unwrap();
    let base = s.file().0.data_version;
    // Two stores of write-back 5, both from `base`, land in either order.
    let second = applied(s.store_if(100, b"bb", condition(CLIENT, 11, base, 5)));
    let first = applied(s.store_if(0, b"aa", condition(CLIENT, 10, base, 5)));
    assert_eq!(first.data_version.0, base.0 + 2);
    assert_eq!(second.data_version.0, base.0 + 1);
    // The same client's older write-back (4) cannot land after the newer one...
    outdated(s.store_if(200, b"cc", condition(CLIENT, 9, base, 4)));
    // ...nor another client's store from the same base.
    outdated(s.store_if(300, b"dd", condition(OTHER, 1, base, 5)));
    // A newer write-back of the same client, from the base it last knew, follows.
    applied(s.store_if(400, b"ee", condition(CLIENT, 12, base, 6)));
    let (status, content) = s.file();
    assert_eq!(status.data_version.0, base.0 + 3);
    assert_eq!(&content[..2], b"aa");
    assert_eq!(&content[100..102], b"bb");
    assert_ne!(&content[200..202], b"cc");
    assert_eq!(&content[400..402], b"ee");
}

#[test]
fn a_retried_conditional_store_is_answered_from_its_record_and_applied_once() {
    let s = setup();
    s.store(0, &pattern(BIG, 1)).unwrap();
    let base = s.file().0.data_version;
    let first = applied(s.store_if(0, b"one", condition(CLIENT, 20, base, 7)));
    // The retry of the same sequence while the file is at its version...
    match s
        .store_if(0, b"one", condition(CLIENT, 20, base, 7))
        .unwrap()
    {
        Outcome::Replayed(answer) => match *answer {
            Ok(Response::Status { status, .. }) => assert_eq!(status, first),
            other => panic!("{other:?}"),
        },
        Outcome::Applied(status) => panic!("applied twice: {status:?}"),
    }
    // ...and after a truncate moved it on: still the record, never `StoreOutdated`.
    s.volume
        .set_attr(
            s.fid,
            &SetAttrs {
                size: Some(10),
                ..SetAttrs::default()
            },
        )
        .unwrap();
    let before = s.file();
    match s
        .store_if(0, b"one", condition(CLIENT, 20, base, 7))
        .unwrap()
    {
        Outcome::Replayed(answer) => assert!(matches!(*answer, Ok(Response::Status { .. }))),
        Outcome::Applied(status) => panic!("applied twice: {status:?}"),
    }
    s.assert_unchanged(&before);
}

#[test]
fn a_conditional_store_that_fails_leaves_no_record_and_its_retry_applies() {
    let s = setup();
    s.store(0, &pattern(BIG, 1)).unwrap();
    let before = s.file();
    let base = before.0.data_version;
    file_faults::fail_writes_after(1000);
    no_space(s.store_if(BIG as u64, &pattern(BIG, 2), condition(CLIENT, 30, base, 8)));
    s.assert_unchanged(&before);
    file_faults::clear();
    let stored = applied(s.store_if(BIG as u64, &pattern(BIG, 2), condition(CLIENT, 30, base, 8)));
    assert_eq!(stored.data_version, base.next());
    assert_eq!(stored.size, 2 * BIG as u64);
}
