//! Tests of volume storage: namespace and data operations, quota, reopening, concurrent
//! writers sharing commits, and sequenced changes.
//! Invariant: each test works on a partition in its own temporary directory, so tests run
//! in parallel and leave nothing behind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{ErrorCode, Fid, FileKind, SetAttrs, VolumeId, VolumeName};

use super::data::INLINE_BYTES_MAX;
use super::{Outcome, Partition, StorageError, Volume};
use crate::fence::Fence;

fn refused(result: Result<impl std::fmt::Debug, StorageError>) -> ErrorCode {
    match result {
        Err(StorageError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The value of a change made without a sequence key, which is always applied.
trait Unsequenced<T> {
    fn applied(self) -> Result<T, StorageError>;
}

impl<T> Unsequenced<T> for Result<Outcome<T>, StorageError> {
    fn applied(self) -> Result<T, StorageError> {
        self.map(|outcome| match outcome {
            Outcome::Applied(value) => value,
            Outcome::Replayed(answer) => panic!("a change without a key was replayed: {answer:?}"),
        })
    }
}

fn setup() -> (tempfile::TempDir, Partition, VolumeId) {
    let dir = tempfile::tempdir().unwrap();
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    let id = VolumeId(536870913);
    partition
        .create_volume(id, VolumeName::parse("root.cell").unwrap(), 0)
        .unwrap();
    (dir, partition, id)
}

#[test]
fn new_volume_has_root_directory() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = volume.fetch_status(Fid::root(id)).unwrap();
    assert_eq!(root.kind, FileKind::Directory);
    assert_eq!(root.mode, 0o755);
    assert_eq!(root.link_count, 2);
    assert_eq!(
        refused(partition.volume(VolumeId(9))),
        ErrorCode::NoSuchVolume
    );
    assert_eq!(
        refused(partition.create_volume(VolumeId(2), VolumeName::parse("root.cell").unwrap(), 0)),
        ErrorCode::VolumeExists
    );
}

#[test]
fn create_lookup_store_fetch_and_dv_bumps_by_one() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let dv0 = volume.fetch_status(root).unwrap().data_version;
    let created = volume
        .create(None, root, "a", 0o644, 1, 2, true)
        .applied()
        .unwrap();
    assert!(created.created);
    assert_eq!(created.dir.data_version.0, dv0.0 + 1);
    assert_eq!(
        refused(volume.create(None, root, "a", 0o644, 1, 2, true)),
        ErrorCode::Exists
    );
    let again = volume
        .create(None, root, "a", 0o600, 0, 0, false)
        .applied()
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.status.fid, created.status.fid);
    assert_eq!(again.dir.data_version.0, dv0.0 + 1);

    let fid = created.status.fid;
    let stored = volume.store_data(fid, 0, b"hello world", None).unwrap();
    assert_eq!(stored.data_version.0, created.status.data_version.0 + 1);
    assert_eq!(stored.size, 11);
    let (status, data) = volume.fetch_data(fid, 6, 100).unwrap();
    assert_eq!(data, b"world");
    assert_eq!(status.data_version, stored.data_version);
    let stored = volume.store_data(fid, 0, b"HI", Some(0)).unwrap();
    assert_eq!(stored.size, 2);
    assert_eq!(volume.fetch_data(fid, 0, 100).unwrap().1, b"HI");

    let (found, dir) = volume.lookup(root, "a").unwrap();
    assert_eq!(found.fid, fid);
    assert_eq!(dir.data_version.0, dv0.0 + 1);
    assert_eq!(refused(volume.lookup(root, "b")), ErrorCode::NoSuchEntry);
    assert_eq!(
        refused(volume.lookup(root, &"n".repeat(256))),
        ErrorCode::NameTooLong
    );
}

#[test]
fn set_attr_truncates_and_extends() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let fid = volume
        .create(None, Fid::root(id), "f", 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid;
    volume.store_data(fid, 0, b"abcdef", None).unwrap();
    let before = volume.fetch_status(fid).unwrap();
    let mode_only = volume
        .set_attr(
            fid,
            &SetAttrs {
                mode: Some(0o600),
                ..SetAttrs::default()
            },
        )
        .unwrap();
    assert_eq!(mode_only.data_version, before.data_version);
    assert_eq!(mode_only.mode, 0o600);
    let truncated = volume
        .set_attr(
            fid,
            &SetAttrs {
                size: Some(3),
                ..SetAttrs::default()
            },
        )
        .unwrap();
    assert_eq!(truncated.data_version.0, before.data_version.0 + 1);
    let extended = volume
        .set_attr(
            fid,
            &SetAttrs {
                size: Some(5),
                ..SetAttrs::default()
            },
        )
        .unwrap();
    assert_eq!(extended.size, 5);
    assert_eq!(volume.fetch_data(fid, 0, 10).unwrap().1, b"abc\0\0");
}

#[test]
fn rename_over_target_and_refusals() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let a = new_file(&volume, root, "a");
    let b = new_file(&volume, root, "b");
    let (d, _) = volume
        .make_dir(None, root, "d", 0o755, 0, 0)
        .applied()
        .unwrap();
    let (sub, _) = volume
        .make_dir(None, d.fid, "sub", 0o755, 0, 0)
        .applied()
        .unwrap();
    let dv = volume.fetch_status(root).unwrap().data_version;

    // File over file within one directory: the directory's DV goes up once.
    let renamed = volume.rename(None, root, "a", root, "b").applied().unwrap();
    assert_eq!(renamed.from_dir.data_version.0, dv.0 + 1);
    assert_eq!(renamed.to_dir.data_version.0, dv.0 + 1);
    assert_eq!(renamed.moved.fid, a);
    assert_eq!(
        renamed.replaced.as_ref().map(|r| (r.fid, r.link_count)),
        Some((b, 0))
    );
    assert_eq!(refused(volume.fetch_status(b)), ErrorCode::Stale);
    assert_eq!(volume.lookup(root, "b").unwrap().0.fid, a);

    // Kind mismatches, non-empty target, own subtree.
    assert_eq!(
        refused(volume.rename(None, root, "b", root, "d")),
        ErrorCode::IsDirectory
    );
    assert_eq!(
        refused(volume.rename(None, d.fid, "sub", root, "b")),
        ErrorCode::NotDirectory
    );
    let (e, _) = volume
        .make_dir(None, root, "e", 0o755, 0, 0)
        .applied()
        .unwrap();
    assert_eq!(
        refused(volume.rename(None, root, "e", root, "d")),
        ErrorCode::NotEmpty
    );
    assert_eq!(
        refused(volume.rename(None, root, "d", sub.fid, "x")),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refused(volume.rename(None, root, "d", d.fid, "x")),
        ErrorCode::InvalidArgument
    );

    // Directory over an empty directory, across directories: link counts follow.
    let root_before = volume.fetch_status(root).unwrap();
    let renamed = volume
        .rename(None, d.fid, "sub", root, "e")
        .applied()
        .unwrap();
    assert_eq!(renamed.replaced.map(|r| r.fid), Some(e.fid));
    assert_eq!(renamed.from_dir.link_count, 2);
    assert_eq!(renamed.to_dir.link_count, root_before.link_count);
    assert_eq!(
        renamed.to_dir.data_version.0,
        root_before.data_version.0 + 1
    );
    assert_eq!(volume.lookup(root, "e").unwrap().0.fid, sub.fid);
}

#[test]
fn rmdir_non_empty_and_kind_checks() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let (d, _) = volume
        .make_dir(None, root, "d", 0o755, 0, 0)
        .applied()
        .unwrap();
    volume
        .create(None, d.fid, "f", 0o644, 0, 0, true)
        .applied()
        .unwrap();
    assert_eq!(
        refused(volume.remove(None, root, "d", true)),
        ErrorCode::NotEmpty
    );
    assert_eq!(
        refused(volume.remove(None, root, "d", false)),
        ErrorCode::IsDirectory
    );
    assert_eq!(
        refused(volume.remove(None, d.fid, "f", true)),
        ErrorCode::NotDirectory
    );
    volume.remove(None, d.fid, "f", false).applied().unwrap();
    let removed = volume.remove(None, root, "d", true).applied().unwrap();
    assert_eq!(removed.dir.link_count, 2);
    assert_eq!(refused(volume.fetch_status(d.fid)), ErrorCode::Stale);
}

#[test]
fn hard_links_count_and_free_data_with_the_last_link() {
    let (dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let fid = new_file(&volume, root, "f");
    volume.store_data(fid, 0, b"data", None).unwrap();
    let (linked, _) = volume.link(None, root, "g", fid).applied().unwrap();
    assert_eq!(linked.link_count, 2);
    assert_eq!(
        refused(volume.link(None, root, "h", root)),
        ErrorCode::PermissionDenied
    );
    let removed = volume.remove(None, root, "f", false).applied().unwrap();
    assert_eq!(removed.target.link_count, 1);
    assert_eq!(volume.fetch_data(fid, 0, 10).unwrap().1, b"data");
    assert_eq!(volume.header().unwrap().bytes_used, 4);
    let removed = volume.remove(None, root, "g", false).applied().unwrap();
    assert_eq!(removed.target.link_count, 0);
    assert_eq!(refused(volume.fetch_status(fid)), ErrorCode::Stale);
    assert_eq!(volume.header().unwrap().bytes_used, 0);
    let data_file = dir
        .path()
        .join(format!("vol.{id}"))
        .join("data")
        .join(fid.vnode.0.to_string());
    assert!(!data_file.exists());
}

#[test]
fn symlinks_and_mount_points_serve_their_content() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let (link, _) = volume
        .symlink(None, root, "l", "../target", 0, 0)
        .applied()
        .unwrap();
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(
        volume.fetch_data(link.fid, 0, 4096).unwrap().1,
        b"../target"
    );
    let (mount, _) = volume
        .make_mount_point(None, root, "m", &VolumeName::parse("user.a").unwrap())
        .applied()
        .unwrap();
    assert_eq!(mount.kind, FileKind::MountPoint);
    assert_eq!(
        volume.fetch_data(mount.fid, 0, 4096).unwrap().1,
        b"#user.a."
    );
    assert_eq!(
        refused(volume.store_data(link.fid, 0, b"x", None)),
        ErrorCode::InvalidArgument
    );
}

#[test]
fn quota_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    let id = VolumeId(7);
    partition
        .create_volume(id, VolumeName::parse("small").unwrap(), 10)
        .unwrap();
    let volume = partition.volume(id).unwrap();
    let fid = volume
        .create(None, Fid::root(id), "f", 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid;
    volume.store_data(fid, 0, b"0123456789", None).unwrap();
    assert_eq!(
        refused(volume.store_data(fid, 10, b"x", None)),
        ErrorCode::QuotaExceeded
    );
    let space = partition.space(id).unwrap();
    assert_eq!(
        (space.bytes_used, space.bytes_total, space.bytes_free),
        (10, 10, 0)
    );
}

#[test]
fn readdir_of_10000_entries_in_pages() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let started = Instant::now();
    for n in 0..10_000 {
        volume
            .create(None, root, &format!("f{n:05}"), 0o644, 0, 0, true)
            .applied()
            .unwrap();
    }
    eprintln!("10000 creates took {:?}", started.elapsed());
    let mut names = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (dir, entries, more) = volume
            .read_dir(root, after.as_deref(), 2048, 1 << 20)
            .unwrap();
        assert_eq!(dir.size, 10_000);
        assert!(entries.len() <= 2048);
        after = entries.last().map(|e| e.name.clone());
        names.extend(entries.into_iter().map(|e| e.name));
        if !more {
            break;
        }
    }
    let expected: Vec<String> = (0..10_000).map(|n| format!("f{n:05}")).collect();
    assert_eq!(names, expected);
}

#[test]
fn reopen_keeps_data_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let id = VolumeId(42);
    let (server, fid) = {
        let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
        partition
            .create_volume(id, VolumeName::parse("keep").unwrap(), 0)
            .unwrap();
        let volume = partition.volume(id).unwrap();
        let fid = volume
            .create(None, Fid::root(id), "f", 0o644, 0, 0, true)
            .applied()
            .unwrap()
            .status
            .fid;
        volume.store_data(fid, 0, b"persist", None).unwrap();
        (partition.server_id(), fid)
    };
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    assert_eq!(partition.server_id(), server);
    let volume = partition.volume(id).unwrap();
    assert_eq!(volume.fetch_data(fid, 0, 100).unwrap().1, b"persist");
    // Vnode numbers are never reused: a new file after reopen gets a fresh one.
    let next = volume
        .create(None, Fid::root(id), "g", 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid;
    assert!(next.vnode > fid.vnode);
    partition.remove_volume(id).unwrap();
    assert!(
        Partition::open(dir.path(), Arc::new(Fence::open()))
            .unwrap()
            .volumes()
            .is_empty()
    );
}

/// Creates an empty regular file (mode 0644, owner 0) in `dir` and returns its fid.
fn new_file(volume: &Volume, dir: Fid, name: &str) -> Fid {
    volume
        .create(None, dir, name, 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid
}

fn data_file(dir: &tempfile::TempDir, fid: Fid) -> std::path::PathBuf {
    dir.path()
        .join(format!("vol.{}", fid.volume))
        .join("data")
        .join(fid.vnode.0.to_string())
}

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length)
        .map(|n| (n % 251) as u8 ^ seed)
        .collect::<Vec<u8>>()
}

fn truncate_to(size: u64) -> SetAttrs {
    SetAttrs {
        size: Some(size),
        ..SetAttrs::default()
    }
}

#[test]
fn inline_data_moves_to_a_data_file_when_it_grows_past_the_threshold() {
    let (dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let fid = volume
        .create(None, Fid::root(id), "f", 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid;
    let max = INLINE_BYTES_MAX as usize;
    let mut expected = pattern(max - 4096, 1);
    let small = volume.store_data(fid, 0, &expected, None).unwrap();
    assert!(!data_file(&dir, fid).exists());
    // Exactly at the threshold stays inline.
    let tail = pattern(4096, 2);
    let full = volume
        .store_data(fid, (max - 4096) as u64, &tail, None)
        .unwrap();
    expected.extend_from_slice(&tail);
    assert_eq!(full.size, INLINE_BYTES_MAX);
    assert!(!data_file(&dir, fid).exists());
    // One byte past it: the whole content moves, with one DV bump.
    let grown = volume
        .store_data(fid, INLINE_BYTES_MAX - 100, &pattern(200, 3), None)
        .unwrap();
    expected.truncate(max - 100);
    expected.extend_from_slice(&pattern(200, 3));
    assert_eq!(grown.data_version.0, full.data_version.0 + 1);
    assert_eq!(full.data_version.0, small.data_version.0 + 1);
    assert_eq!(grown.size, expected.len() as u64);
    assert!(data_file(&dir, fid).exists());
    let (status, data) = volume
        .fetch_data(fid, INLINE_BYTES_MAX - 1000, 2000)
        .unwrap();
    assert_eq!(status.data_version, grown.data_version);
    assert_eq!(data, expected[max - 1000..].to_vec());
    assert_eq!(volume.fetch_data(fid, 0, 1 << 20).unwrap().1, expected);
    assert_eq!(volume.header().unwrap().bytes_used, expected.len() as u64);
}

#[test]
fn truncation_keeps_a_data_file_except_to_zero() {
    let (dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let fid = volume
        .create(None, Fid::root(id), "f", 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid;
    let big = pattern(100_000, 4);
    volume.store_data(fid, 0, &big, None).unwrap();
    assert!(data_file(&dir, fid).exists());

    // Below the threshold, the data stays in its file (documented choice).
    let cut = volume.set_attr(fid, &truncate_to(1000)).unwrap();
    assert_eq!(cut.size, 1000);
    assert!(data_file(&dir, fid).exists());
    assert_eq!(
        volume.fetch_data(fid, 0, 4096).unwrap().1,
        big[..1000].to_vec()
    );

    // To zero: back inline, the data file goes.
    let emptied = volume.set_attr(fid, &truncate_to(0)).unwrap();
    assert_eq!(emptied.data_version.0, cut.data_version.0 + 1);
    assert!(!data_file(&dir, fid).exists());
    volume.store_data(fid, 0, b"small again", None).unwrap();
    assert!(!data_file(&dir, fid).exists());
    assert_eq!(volume.fetch_data(fid, 0, 100).unwrap().1, b"small again");

    // Extending an inline file past the threshold moves it; the new bytes are zeros.
    let extended = volume.set_attr(fid, &truncate_to(70_000)).unwrap();
    assert_eq!(extended.size, 70_000);
    assert!(data_file(&dir, fid).exists());
    let (_, data) = volume.fetch_data(fid, 0, 100_000).unwrap();
    assert_eq!(&data[..11], b"small again");
    assert!(data[11..].iter().all(|&b| b == 0));
    assert_eq!(data.len(), 70_000);

    // A store that truncates to zero first (an O_TRUNC rewrite) also comes back inline.
    let rewritten = volume.store_data(fid, 0, b"rewritten", Some(0)).unwrap();
    assert_eq!(rewritten.size, 9);
    assert!(!data_file(&dir, fid).exists());
    assert_eq!(volume.fetch_data(fid, 0, 100).unwrap().1, b"rewritten");
    assert_eq!(volume.header().unwrap().bytes_used, 9);

    // An inline file cut short and extended again reads zeros in between.
    volume.set_attr(fid, &truncate_to(3)).unwrap();
    volume.store_data(fid, 6, b"xy", None).unwrap();
    assert_eq!(volume.fetch_data(fid, 0, 100).unwrap().1, b"rew\0\0\0xy");
}

#[test]
fn reopen_keeps_inline_and_file_data_and_unlink_frees_both() {
    let dir = tempfile::tempdir().unwrap();
    let id = VolumeId(43);
    let small = pattern(4096, 5);
    let large = pattern(300_000, 6);
    let (small_fid, large_fid) = {
        let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
        partition
            .create_volume(id, VolumeName::parse("forms").unwrap(), 0)
            .unwrap();
        let volume = partition.volume(id).unwrap();
        let root = Fid::root(id);
        let small_fid = new_file(&volume, root, "s");
        let large_fid = new_file(&volume, root, "l");
        volume.store_data(small_fid, 0, &small, None).unwrap();
        volume
            .store_data(large_fid, 0, &large[..1000], None)
            .unwrap();
        volume
            .store_data(large_fid, 1000, &large[1000..], None)
            .unwrap();
        (small_fid, large_fid)
    };
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    let volume = partition.volume(id).unwrap();
    assert_eq!(volume.fetch_data(small_fid, 0, 1 << 20).unwrap().1, small);
    assert_eq!(
        volume.fetch_data(large_fid, 60_000, 10_000).unwrap().1,
        large[60_000..70_000].to_vec()
    );
    assert_eq!(volume.fetch_data(large_fid, 0, 1 << 20).unwrap().1, large);
    // Reads past the end are short, at the end empty.
    assert_eq!(
        volume.fetch_data(small_fid, 4000, 1000).unwrap().1,
        small[4000..].to_vec()
    );
    assert!(volume.fetch_data(small_fid, 5000, 10).unwrap().1.is_empty());
    assert_eq!(volume.header().unwrap().bytes_used, 304_096);

    let root = Fid::root(id);
    volume.remove(None, root, "s", false).applied().unwrap();
    volume.remove(None, root, "l", false).applied().unwrap();
    assert_eq!(volume.header().unwrap().bytes_used, 0);
    assert!(!data_file(&dir, large_fid).exists());
    assert_eq!(
        refused(volume.fetch_data(small_fid, 0, 10)),
        ErrorCode::Stale
    );
}

#[test]
fn quota_counts_inline_and_file_data_alike() {
    let dir = tempfile::tempdir().unwrap();
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    let id = VolumeId(8);
    partition
        .create_volume(id, VolumeName::parse("quota").unwrap(), 100_000)
        .unwrap();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let a = new_file(&volume, root, "a");
    let b = new_file(&volume, root, "b");
    volume.store_data(a, 0, &pattern(60_000, 7), None).unwrap();
    let before = volume.fetch_status(b).unwrap();
    assert_eq!(
        refused(volume.store_data(b, 0, &pattern(70_000, 8), None)),
        ErrorCode::QuotaExceeded
    );
    // The refused move to a data file left the record as it was.
    assert_eq!(volume.fetch_status(b).unwrap(), before);
    assert!(volume.fetch_data(b, 0, 10).unwrap().1.is_empty());
    volume.store_data(b, 0, &pattern(40_000, 8), None).unwrap();
    assert_eq!(volume.header().unwrap().bytes_used, 100_000);
}

/// Concurrent writers to one volume: every request is answered with its own result and
/// the batches it shared commits with leave the same state as running them one by one.
#[test]
fn concurrent_writers_share_commits_and_keep_every_change() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let dv0 = volume.fetch_status(root).unwrap().data_version;
    std::thread::scope(|scope| {
        for worker in 0..8 {
            let volume = &volume;
            scope.spawn(move || {
                for n in 0..25 {
                    let name = format!("w{worker}-{n}");
                    let fid = new_file(volume, root, &name);
                    let stored = volume.store_data(fid, 0, name.as_bytes(), None).unwrap();
                    assert_eq!(stored.size, name.len() as u64);
                    // A duplicate exclusive create is refused, also when batched.
                    assert_eq!(
                        refused(volume.create(None, root, &name, 0o644, 0, 0, true)),
                        ErrorCode::Exists
                    );
                }
            });
        }
    });
    let root_status = volume.fetch_status(root).unwrap();
    assert_eq!(root_status.size, 200);
    assert_eq!(root_status.data_version.0, dv0.0 + 200);
    for worker in 0..8 {
        for n in 0..25 {
            let name = format!("w{worker}-{n}");
            let (status, _) = volume.lookup(root, &name).unwrap();
            assert_eq!(
                volume.fetch_data(status.fid, 0, 100).unwrap().1,
                name.as_bytes()
            );
        }
    }
}

/// Per-operation latency of the create + store pair a FUSE `cp` makes, for small
/// (inline) and large (data file) files, one after another and from 8 threads, printed
/// for the record (run with `--nocapture`). Not a timed assertion.
#[test]
fn create_and_store_latency() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let sequential = |label: &str, size: usize, count: u32| {
        let data = vec![7u8; size];
        let (mut create, mut store) = (Duration::ZERO, Duration::ZERO);
        for n in 0..count {
            let started = Instant::now();
            let fid = volume
                .create(None, root, &format!("{label}{n}"), 0o644, 0, 0, true)
                .applied()
                .unwrap()
                .status
                .fid;
            let created = Instant::now();
            volume.store_data(fid, 0, &data, None).unwrap();
            create += created - started;
            store += created.elapsed();
        }
        let per_file = (create + store) / count;
        eprintln!(
            "{label}: create {:?} + store {:?} = {per_file:?} per file ({:.0} files/s)",
            create / count,
            store / count,
            1.0 / per_file.as_secs_f64()
        );
    };
    sequential("inline 4 KiB", 4096, 200);
    sequential("data file 128 KiB", 128 * 1024, 50);

    let count_per_thread = 100;
    let started = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..8 {
            let volume = &volume;
            scope.spawn(move || {
                let data = vec![7u8; 4096];
                for n in 0..count_per_thread {
                    let fid = volume
                        .create(None, root, &format!("t{worker}-{n}"), 0o644, 0, 0, true)
                        .applied()
                        .unwrap()
                        .status
                        .fid;
                    volume.store_data(fid, 0, &data, None).unwrap();
                }
            });
        }
    });
    let elapsed = started.elapsed();
    eprintln!(
        "8 threads, inline 4 KiB: {:.0} files/s",
        f64::from(8 * count_per_thread) / elapsed.as_secs_f64()
    );

    let fid = volume.lookup(root, "data file 128 KiB0").unwrap().0.fid;
    let data = vec![9u8; 4096];
    let count = 100;
    let started = Instant::now();
    for n in 0..count {
        volume.store_data(fid, n * 4096, &data, None).unwrap();
    }
    eprintln!(
        "4 KiB store into a data file: {:?} per store",
        started.elapsed() / count as u32
    );
}

/// Throughput of 256 sequential 1 MiB stores into one file and 256 1 MiB fetches of it,
/// printed for the record (run with `--nocapture`). Not a timed assertion.
#[test]
fn sequential_1mib_store_and_fetch_throughput() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let fid = volume
        .create(None, Fid::root(id), "big", 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid;
    let chunk: u32 = 1 << 20;
    let count: u32 = 256;
    let data = pattern(chunk as usize, 5);
    let mib = f64::from(count);
    let started = Instant::now();
    for n in 0..count {
        volume
            .store_data(fid, u64::from(n) * u64::from(chunk), &data, None)
            .unwrap();
    }
    let stored = started.elapsed();
    volume.fsync(fid).unwrap();
    let synced = started.elapsed();
    eprintln!(
        "256 x 1 MiB store: {:.0} MiB/s ({:?} per store); with the final fsync {:.0} MiB/s",
        mib / stored.as_secs_f64(),
        stored / count,
        mib / synced.as_secs_f64()
    );
    let started = Instant::now();
    for n in 0..count {
        let (_, fetched) = volume
            .fetch_data(fid, u64::from(n) * u64::from(chunk), chunk)
            .unwrap();
        assert_eq!(fetched.len(), chunk as usize);
    }
    let fetched = started.elapsed();
    eprintln!(
        "256 x 1 MiB fetch: {:.0} MiB/s ({:?} per fetch)",
        mib / fetched.as_secs_f64(),
        fetched / count
    );
}

/// Stores into a data file are not synced one by one; `fsync` makes them durable, and
/// a reopened volume serves them with the DV of the last store.
#[test]
fn fsync_after_stores_makes_data_durable() {
    let dir = tempfile::tempdir().unwrap();
    let id = VolumeId(7);
    let chunk = 256 * 1024;
    let (fid, last, small) = {
        let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
        partition
            .create_volume(id, VolumeName::parse("sync").unwrap(), 0)
            .unwrap();
        let volume = partition.volume(id).unwrap();
        let root = Fid::root(id);
        let fid = new_file(&volume, root, "f");
        let mut last = None;
        for n in 0..4u8 {
            let offset = u64::from(n) * chunk as u64;
            last = Some(
                volume
                    .store_data(fid, offset, &pattern(chunk, n), None)
                    .unwrap(),
            );
        }
        let synced = volume.fsync(fid).unwrap();
        assert_eq!(Some(synced.clone()), last);
        // Inline data is durable with its commit; its fsync only answers the status.
        let small = new_file(&volume, root, "s");
        let stored = volume.store_data(small, 0, b"inline", None).unwrap();
        assert_eq!(volume.fsync(small).unwrap(), stored);
        assert_eq!(
            refused(volume.fsync(Fid {
                unique: proto::Uniquifier(9),
                ..fid
            })),
            ErrorCode::Stale
        );
        (fid, synced, small)
    };
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    let volume = partition.volume(id).unwrap();
    assert_eq!(volume.fetch_status(fid).unwrap(), last);
    for n in 0..4u8 {
        let offset = u64::from(n) * chunk as u64;
        let (status, data) = volume.fetch_data(fid, offset, chunk as u32).unwrap();
        assert_eq!(status.data_version, last.data_version);
        assert_eq!(data, pattern(chunk, n));
    }
    assert_eq!(volume.fetch_data(small, 0, 100).unwrap().1, b"inline");
}

/// A write-back's stores in flight: threads store disjoint 64 KiB chunks of one data
/// file in scrambled order. Every chunk lands, the size is the furthest end, the DV
/// went up exactly once per store (each store saw its own DV), and the volume's byte
/// count equals the size. A fetch meanwhile never sees a chunk missing under a DV that
/// counts its store.
#[test]
fn concurrent_disjoint_stores_to_one_file_keep_contents_size_and_dv() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let fid = volume
        .create(None, Fid::root(id), "f", 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid;
    let chunk = 64 * 1024;
    // Past the inline limit first, so the stores below go into the data file.
    volume.store_data(fid, 0, &pattern(chunk, 0), None).unwrap();
    let first = volume
        .store_data(fid, chunk as u64, &pattern(chunk, 1), None)
        .unwrap();
    let (threads, per_thread) = (8u64, 12u64);
    let chunks = threads * per_thread;
    let dvs = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for worker in 0..threads {
            let (volume, dvs) = (&volume, &dvs);
            scope.spawn(move || {
                for n in 0..per_thread {
                    // Chunk 2.. interleaved across threads, highest offsets first.
                    let index = 2 + (per_thread - 1 - n) * threads + worker;
                    let stored = volume
                        .store_data(
                            fid,
                            index * chunk as u64,
                            &pattern(chunk, index as u8),
                            None,
                        )
                        .unwrap();
                    assert!(stored.size >= (index + 1) * chunk as u64);
                    dvs.lock().unwrap().push(stored.data_version.0);
                }
            });
        }
        scope.spawn(|| {
            for _ in 0..50 {
                let (status, data) = volume.fetch_data(fid, 0, chunk as u32).unwrap();
                assert_eq!(data, pattern(chunk, 0), "at DV {}", status.data_version);
            }
        });
    });
    let status = volume.fsync(fid).unwrap();
    let total = (2 + chunks) * chunk as u64;
    assert_eq!(status.size, total);
    assert_eq!(status.data_version.0, first.data_version.0 + chunks);
    let mut dvs = dvs.into_inner().unwrap();
    dvs.sort_unstable();
    let expected: Vec<u64> = (1..=chunks).map(|n| first.data_version.0 + n).collect();
    assert_eq!(dvs, expected);
    assert_eq!(volume.header().unwrap().bytes_used, total);
    for index in 0..2 + chunks {
        let (_, data) = volume
            .fetch_data(fid, index * chunk as u64, chunk as u32)
            .unwrap();
        assert_eq!(data, pattern(chunk, index as u8), "chunk {index}");
    }
}

/// Quota is checked in each concurrent store's own transaction: stores that fit are
/// applied, the rest refused without changing size, DV or the byte count.
#[test]
fn concurrent_stores_into_a_data_file_keep_quota_exact() {
    let dir = tempfile::tempdir().unwrap();
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    let id = VolumeId(8);
    let chunk = 64 * 1024u64;
    partition
        .create_volume(id, VolumeName::parse("q").unwrap(), 10 * chunk)
        .unwrap();
    let volume = partition.volume(id).unwrap();
    let fid = volume
        .create(None, Fid::root(id), "f", 0o644, 0, 0, true)
        .applied()
        .unwrap()
        .status
        .fid;
    let start = volume
        .store_data(fid, 0, &pattern(2 * chunk as usize, 0), None)
        .unwrap();
    // Sixteen one-chunk appends of chunks 2..18 from four threads: only those whose end
    // fits the quota of ten chunks can succeed.
    let outcomes = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for worker in 0..4u64 {
            let (volume, outcomes) = (&volume, &outcomes);
            scope.spawn(move || {
                for n in 0..4u64 {
                    let index = 2 + n * 4 + worker;
                    let data = pattern(chunk as usize, index as u8);
                    let outcome = volume.store_data(fid, index * chunk, &data, None);
                    outcomes
                        .lock()
                        .unwrap()
                        .push((index, outcome.map_err(|e| e.code())));
                }
            });
        }
    });
    // The size only grows to a store's end, so every end within the quota fits,
    // whatever the order, and every end beyond it is refused.
    for (index, outcome) in outcomes.into_inner().unwrap() {
        if index < 10 {
            assert!(outcome.is_ok(), "chunk {index}: {outcome:?}");
        } else {
            assert_eq!(outcome, Err(ErrorCode::QuotaExceeded), "chunk {index}");
        }
    }
    let status = volume.fetch_status(fid).unwrap();
    assert_eq!(status.data_version.0, start.data_version.0 + 8);
    assert_eq!(status.size, 10 * chunk);
    assert_eq!(volume.header().unwrap().bytes_used, status.size);
}

#[test]
fn outcomes_are_pruned_per_client_by_instance_and_window() {
    use super::{SEQ_WINDOW, SequenceKey};
    use proto::{ClientId, InstanceNonce};

    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let client = ClientId::random();
    let key = |instance: u64, seq: u64| {
        Some(SequenceKey {
            client,
            instance: InstanceNonce(instance),
            seq,
        })
    };
    let mkdir = |key, name: &str| volume.make_dir(key, root, name, 0o755, 0, 0).unwrap();
    assert!(matches!(mkdir(key(7, 1), "a"), Outcome::Applied(_)));
    assert!(matches!(mkdir(key(7, 1), "a"), Outcome::Replayed(answer) if answer.is_ok()));
    // A far later seq of the same instance drops seq 1: it is applied anew (and refused).
    assert!(matches!(
        mkdir(key(7, SEQ_WINDOW + 2), "b"),
        Outcome::Applied(_)
    ));
    let again = |key, name: &str| volume.make_dir(key, root, name, 0o755, 0, 0);
    assert_eq!(refused(again(key(7, 1), "a")), ErrorCode::Exists);
    // The refusal is recorded: the same key is answered from the record.
    assert!(matches!(
        mkdir(key(7, 1), "a"),
        Outcome::Replayed(answer) if *answer == Err(ErrorCode::Exists)
    ));
    // A new instance drops the old one's records, and the old one's drop the new one's.
    assert!(matches!(mkdir(key(3, 1), "c"), Outcome::Applied(_)));
    assert_eq!(
        refused(again(key(7, SEQ_WINDOW + 2), "b")),
        ErrorCode::Exists
    );
    assert_eq!(
        volume.outcome_count(),
        1,
        "only the newest instance's record"
    );
}

/// Each sequenced namespace change: applied once under its key, and a retry with the
/// key is answered from the record with the same answer, changing nothing.
#[test]
fn every_sequenced_namespace_change_is_applied_once_and_replayed_alike() {
    use super::{Answer, Created, SequenceKey};
    use proto::{ClientId, InstanceNonce, Response};

    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let client = ClientId::random();
    let mut seq = 0;
    let mut next_key = || {
        seq += 1;
        Some(SequenceKey {
            client,
            instance: InstanceNonce(1),
            seq,
        })
    };
    /// Applies a change under a new key, retries it under the same key, and checks the
    /// retry is replayed with the first answer while the root's status stays as it is.
    fn once<T: Answer + std::fmt::Debug>(
        volume: &Volume,
        root: Fid,
        key: Option<SequenceKey>,
        change: impl Fn(Option<SequenceKey>) -> Result<Outcome<T>, StorageError>,
    ) -> T {
        let Outcome::Applied(applied) = change(key).unwrap() else {
            panic!("a new key is applied");
        };
        let after = volume.fetch_status(root).unwrap();
        match change(key).unwrap() {
            Outcome::Replayed(answer) => assert_eq!(*answer, Ok(applied.answer())),
            Outcome::Applied(again) => panic!("a retried key was applied again: {again:?}"),
        }
        assert_eq!(volume.fetch_status(root).unwrap(), after);
        applied
    }

    let created = once(&volume, root, next_key(), |key| {
        volume.create(key, root, "f", 0o644, 0, 0, true)
    });
    assert!(created.created);
    let (dir, _) = once(&volume, root, next_key(), |key| {
        volume.make_dir(key, root, "d", 0o755, 0, 0)
    });
    assert_eq!(dir.kind, FileKind::Directory);
    let (link, _) = once(&volume, root, next_key(), |key| {
        volume.symlink(key, root, "l", "f", 0, 0)
    });
    assert_eq!(link.kind, FileKind::Symlink);
    let mount_name = VolumeName::parse("user.a").unwrap();
    let (mount, _) = once(&volume, root, next_key(), |key| {
        volume.make_mount_point(key, root, "m", &mount_name)
    });
    assert_eq!(mount.kind, FileKind::MountPoint);
    let (linked, _) = once(&volume, root, next_key(), |key| {
        volume.link(key, root, "g", created.status.fid)
    });
    assert_eq!(linked.link_count, 2);
    let renamed = once(&volume, root, next_key(), |key| {
        volume.rename(key, root, "g", dir.fid, "h")
    });
    assert_eq!(renamed.moved.fid, created.status.fid);
    let removed = once(&volume, root, next_key(), |key| {
        volume.remove(key, root, "f", false)
    });
    assert_eq!(removed.target.link_count, 1);
    assert!(matches!(
        removed.answer(),
        Response::Removed {
            target: Some(_),
            ..
        }
    ));
    // A refusal is recorded and replayed too; a change without a key always applies.
    let key = next_key();
    assert_eq!(
        refused(volume.remove(key, root, "f", false)),
        ErrorCode::NoSuchEntry
    );
    assert!(matches!(
        volume.remove(key, root, "f", false).unwrap(),
        Outcome::Replayed(answer) if *answer == Err(ErrorCode::NoSuchEntry)
    ));
    assert!(matches!(
        volume.create(None, root, "f", 0o644, 0, 0, true).unwrap(),
        Outcome::Applied(Created { created: true, .. })
    ));
    assert_eq!(volume.outcome_count(), 8);
}
