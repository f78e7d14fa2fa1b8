//! Volume store tests on a temporary directory.

use std::time::Instant;

use proto::{ErrorCode, Fid, FileKind, SetAttrs, VolumeId, VolumeName};

use super::{Partition, StorageError};

fn refused(result: Result<impl std::fmt::Debug, StorageError>) -> ErrorCode {
    match result {
        Err(StorageError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn setup() -> (tempfile::TempDir, Partition, VolumeId) {
    let dir = tempfile::tempdir().unwrap();
    let partition = Partition::open(dir.path()).unwrap();
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
    let created = volume.create(root, "a", 0o644, 1, 2, true).unwrap();
    assert!(created.created);
    assert_eq!(created.dir.data_version.0, dv0.0 + 1);
    assert_eq!(
        refused(volume.create(root, "a", 0o644, 1, 2, true)),
        ErrorCode::Exists
    );
    let again = volume.create(root, "a", 0o600, 0, 0, false).unwrap();
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
        .create(Fid::root(id), "f", 0o644, 0, 0, true)
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
    let a = volume
        .create(root, "a", 0o644, 0, 0, true)
        .unwrap()
        .status
        .fid;
    let b = volume
        .create(root, "b", 0o644, 0, 0, true)
        .unwrap()
        .status
        .fid;
    let (d, _) = volume.make_dir(root, "d", 0o755, 0, 0).unwrap();
    let (sub, _) = volume.make_dir(d.fid, "sub", 0o755, 0, 0).unwrap();
    let dv = volume.fetch_status(root).unwrap().data_version;

    // File over file within one directory: the directory's DV goes up once.
    let renamed = volume.rename(root, "a", root, "b").unwrap();
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
        refused(volume.rename(root, "b", root, "d")),
        ErrorCode::IsDirectory
    );
    assert_eq!(
        refused(volume.rename(d.fid, "sub", root, "b")),
        ErrorCode::NotDirectory
    );
    let (e, _) = volume.make_dir(root, "e", 0o755, 0, 0).unwrap();
    assert_eq!(
        refused(volume.rename(root, "e", root, "d")),
        ErrorCode::NotEmpty
    );
    assert_eq!(
        refused(volume.rename(root, "d", sub.fid, "x")),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refused(volume.rename(root, "d", d.fid, "x")),
        ErrorCode::InvalidArgument
    );

    // Directory over an empty directory, across directories: link counts follow.
    let root_before = volume.fetch_status(root).unwrap();
    let renamed = volume.rename(d.fid, "sub", root, "e").unwrap();
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
    let (d, _) = volume.make_dir(root, "d", 0o755, 0, 0).unwrap();
    volume.create(d.fid, "f", 0o644, 0, 0, true).unwrap();
    assert_eq!(refused(volume.remove(root, "d", true)), ErrorCode::NotEmpty);
    assert_eq!(
        refused(volume.remove(root, "d", false)),
        ErrorCode::IsDirectory
    );
    assert_eq!(
        refused(volume.remove(d.fid, "f", true)),
        ErrorCode::NotDirectory
    );
    volume.remove(d.fid, "f", false).unwrap();
    let removed = volume.remove(root, "d", true).unwrap();
    assert_eq!(removed.dir.link_count, 2);
    assert_eq!(refused(volume.fetch_status(d.fid)), ErrorCode::Stale);
}

#[test]
fn hard_links_count_and_free_data_with_the_last_link() {
    let (dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let fid = volume
        .create(root, "f", 0o644, 0, 0, true)
        .unwrap()
        .status
        .fid;
    volume.store_data(fid, 0, b"data", None).unwrap();
    let (linked, _) = volume.link(root, "g", fid).unwrap();
    assert_eq!(linked.link_count, 2);
    assert_eq!(
        refused(volume.link(root, "h", root)),
        ErrorCode::PermissionDenied
    );
    let removed = volume.remove(root, "f", false).unwrap();
    assert_eq!(removed.target.link_count, 1);
    assert_eq!(volume.fetch_data(fid, 0, 10).unwrap().1, b"data");
    assert_eq!(volume.header().unwrap().bytes_used, 4);
    let removed = volume.remove(root, "g", false).unwrap();
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
    let (link, _) = volume.symlink(root, "l", "../target", 0, 0).unwrap();
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(
        volume.fetch_data(link.fid, 0, 4096).unwrap().1,
        b"../target"
    );
    let (mount, _) = volume
        .make_mount_point(root, "m", &VolumeName::parse("user.a").unwrap())
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
    let partition = Partition::open(dir.path()).unwrap();
    let id = VolumeId(7);
    partition
        .create_volume(id, VolumeName::parse("small").unwrap(), 10)
        .unwrap();
    let volume = partition.volume(id).unwrap();
    let fid = volume
        .create(Fid::root(id), "f", 0o644, 0, 0, true)
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
            .create(root, &format!("f{n:05}"), 0o644, 0, 0, true)
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
        let partition = Partition::open(dir.path()).unwrap();
        partition
            .create_volume(id, VolumeName::parse("keep").unwrap(), 0)
            .unwrap();
        let volume = partition.volume(id).unwrap();
        let fid = volume
            .create(Fid::root(id), "f", 0o644, 0, 0, true)
            .unwrap()
            .status
            .fid;
        volume.store_data(fid, 0, b"persist", None).unwrap();
        (partition.server_id(), fid)
    };
    let partition = Partition::open(dir.path()).unwrap();
    assert_eq!(partition.server_id(), server);
    let volume = partition.volume(id).unwrap();
    assert_eq!(volume.fetch_data(fid, 0, 100).unwrap().1, b"persist");
    // Vnode numbers are never reused: a new file after reopen gets a fresh one.
    let next = volume
        .create(Fid::root(id), "g", 0o644, 0, 0, true)
        .unwrap()
        .status
        .fid;
    assert!(next.vnode > fid.vnode);
    partition.remove_volume(id).unwrap();
    assert!(Partition::open(dir.path()).unwrap().volumes().is_empty());
}

/// Per-operation latency of the create + 4 KiB store pair a FUSE `cp` makes, printed
/// for the record (run with `--nocapture`). Not a timed assertion.
#[test]
fn create_and_store_latency() {
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let data = vec![7u8; 4096];
    let count = 200;
    let started = Instant::now();
    for n in 0..count {
        let fid = volume
            .create(Fid::root(id), &format!("file{n}"), 0o644, 0, 0, true)
            .unwrap()
            .status
            .fid;
        volume.store_data(fid, 0, &data, None).unwrap();
    }
    let per_file = started.elapsed() / count;
    eprintln!(
        "create + 4 KiB store: {per_file:?} per file ({:.0} files/s)",
        1.0 / per_file.as_secs_f64()
    );
}
