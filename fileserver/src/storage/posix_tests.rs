//! Tests of the POSIX rules storage keeps: special files (FIFOs, sockets, device nodes)
//! as entries, and which change moves which timestamps.
//! Invariant: each test works on a partition in its own temporary directory.

use std::sync::Arc;

use proto::{ErrorCode, Fid, FileKind, SetAttrs, Timestamp, VnodeStatus, VolumeId, VolumeName};

use super::{Outcome, Partition, StorageError, Volume};
use crate::fence::Fence;

fn refused(result: Result<impl std::fmt::Debug, StorageError>) -> ErrorCode {
    match result {
        Err(StorageError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn applied<T>(result: Result<Outcome<T>, StorageError>) -> T {
    match result.unwrap() {
        Outcome::Applied(value) => value,
        Outcome::Replayed(answer) => panic!("a change without a key was replayed: {answer:?}"),
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

const SPECIAL: [FileKind; 4] = [
    FileKind::Fifo,
    FileKind::Socket,
    FileKind::CharDevice { rdev: 0x0501 },
    FileKind::BlockDevice { rdev: 0x0803 },
];

fn node(volume: &Volume, dir: Fid, name: &str, kind: FileKind) -> VnodeStatus {
    applied(volume.make_node(None, dir, name, kind, 0o640, 7, 8)).0
}

#[test]
fn special_files_are_entries_with_their_kind_mode_and_device() {
    let (dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let files_before = volume.info().unwrap().file_count;
    for (i, kind) in SPECIAL.into_iter().enumerate() {
        let name = format!("n{i}");
        let (status, dir_status) = applied(volume.make_node(None, root, &name, kind, 0o1640, 7, 8));
        assert_eq!(status.kind, kind);
        assert_eq!((status.mode, status.uid, status.gid), (0o1640, 7, 8));
        assert_eq!((status.size, status.link_count), (0, 1));
        assert_eq!(dir_status.size, i as u64 + 1);
        assert_eq!(volume.lookup(root, &name).unwrap().0, status);
        // No data to read or write: the kernel of the machine opening it serves it.
        assert_eq!(
            refused(volume.fetch_data(status.fid, 0, 10)),
            ErrorCode::InvalidArgument
        );
        assert_eq!(
            refused(volume.store_data(status.fid, 0, b"x", None)),
            ErrorCode::InvalidArgument
        );
        let truncate = SetAttrs {
            size: Some(0),
            ..SetAttrs::default()
        };
        assert_eq!(
            refused(volume.set_attr(status.fid, &truncate)),
            ErrorCode::InvalidArgument
        );
    }
    assert_eq!(volume.info().unwrap().file_count, files_before + 4);
    // Listings carry each kind whole, a device's number included.
    let (_, entries, _) = volume.read_dir(root, None, 100, 1 << 20).unwrap();
    let kinds: Vec<FileKind> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, SPECIAL);
    // Only special kinds: the others have their own requests.
    for kind in [FileKind::File, FileKind::Directory, FileKind::Symlink] {
        assert_eq!(
            refused(volume.make_node(None, root, "x", kind, 0o644, 0, 0)),
            ErrorCode::InvalidArgument
        );
    }
    assert_eq!(
        refused(volume.make_node(None, root, "n0", FileKind::Fifo, 0o644, 0, 0)),
        ErrorCode::Exists
    );

    // Linked, renamed and removed like any entry.
    let (linked, _) = applied(volume.link(
        None,
        root,
        "n2-link",
        volume.lookup(root, "n2").unwrap().0.fid,
    ));
    assert_eq!(linked.link_count, 2);
    assert_eq!(linked.kind, SPECIAL[2]);
    let sub = applied(volume.make_dir(None, root, "sub", 0o755, 0, 0))
        .0
        .fid;
    let renamed = applied(volume.rename(None, root, "n1", sub, "sock"));
    assert_eq!(renamed.moved.kind, FileKind::Socket);
    assert_eq!(volume.lookup(sub, "sock").unwrap().0.kind, FileKind::Socket);
    let removed = applied(volume.remove(None, root, "n2", false));
    assert_eq!(removed.target.link_count, 1);
    let removed = applied(volume.remove(None, root, "n2-link", false));
    assert_eq!(removed.target.link_count, 0);
    assert_eq!(
        refused(volume.fetch_status(removed.target.fid)),
        ErrorCode::Stale
    );
    assert_eq!(volume.info().unwrap().file_count, files_before + 4);
    assert_eq!(
        refused(volume.remove(None, root, "n0", true)),
        ErrorCode::NotDirectory
    );

    // The kinds survive a restart.
    drop(volume);
    drop(partition);
    let partition = Partition::open(dir.path(), Arc::new(Fence::open())).unwrap();
    let volume = partition.volume(id).unwrap();
    assert_eq!(volume.lookup(root, "n3").unwrap().0.kind, SPECIAL[3]);
    assert_eq!(volume.lookup(root, "n0").unwrap().0.kind, FileKind::Fifo);
    assert_eq!(volume.lookup(sub, "sock").unwrap().0.mode, 0o1640);
}

/// The times before and after one change, of the entry it changed and of each directory.
struct Times {
    entry: VnodeStatus,
    dirs: Vec<VnodeStatus>,
}

fn times(volume: &Volume, entry: Fid, dirs: &[Fid]) -> Times {
    Times {
        entry: volume.fetch_status(entry).unwrap(),
        dirs: dirs
            .iter()
            .map(|d| volume.fetch_status(*d).unwrap())
            .collect(),
    }
}

/// What a change must do to a time: move past its old value, or keep it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Moves {
    Advances,
    Stays,
}

fn check(what: &str, field: &str, before: Timestamp, after: Timestamp, expected: Moves) {
    match expected {
        Moves::Advances => assert!(after > before, "{what}: {field} did not advance"),
        Moves::Stays => assert_eq!(after, before, "{what}: {field} moved"),
    }
}

/// One change: what it changes, and how it must move the entry's mtime and ctime and
/// the directories' mtime and ctime.
struct Case<'a> {
    what: &'static str,
    change: &'a dyn Fn(Fid),
    entry: Fid,
    dirs: Vec<Fid>,
    moves: [Moves; 3],
}

impl<'a> Case<'a> {
    fn new(
        what: &'static str,
        change: &'a dyn Fn(Fid),
        entry: Fid,
        dirs: Vec<Fid>,
        moves: [Moves; 3],
    ) -> Case<'a> {
        Case {
            what,
            change,
            entry,
            dirs,
            moves,
        }
    }
}

#[test]
fn each_change_moves_the_times_posix_names() {
    use Moves::{Advances, Stays};
    let (_dir, partition, id) = setup();
    let volume = partition.volume(id).unwrap();
    let root = Fid::root(id);
    let a = applied(volume.make_dir(None, root, "a", 0o755, 0, 0)).0.fid;
    let b = applied(volume.make_dir(None, root, "b", 0o755, 0, 0)).0.fid;
    let file = applied(volume.create(None, a, "f", 0o644, 0, 0, true))
        .status
        .fid;
    let fifo = node(&volume, a, "p", FileKind::Fifo);
    let set = |attrs: SetAttrs| {
        let volume = volume.clone();
        move |fid: Fid| {
            volume.set_attr(fid, &attrs).unwrap();
        }
    };
    let chmod = set(SetAttrs {
        mode: Some(0o600),
        ..SetAttrs::default()
    });
    let chown = set(SetAttrs {
        uid: Some(5),
        gid: Some(6),
        ..SetAttrs::default()
    });
    let given = Timestamp {
        secs: 1_000_000,
        nanos: 7,
    };
    let atime_only = set(SetAttrs {
        atime: Some(given),
        ..SetAttrs::default()
    });
    let truncate = set(SetAttrs {
        size: Some(3),
        ..SetAttrs::default()
    });
    let write = |fid: Fid| {
        volume.store_data(fid, 0, b"bytes", None).unwrap();
    };
    let link = |fid: Fid| {
        applied(volume.link(None, b, "linked", fid));
    };
    let unlink_one_of_two = |_fid: Fid| {
        applied(volume.remove(None, b, "linked", false));
    };
    let rename_across = |_fid: Fid| {
        applied(volume.rename(None, a, "f", b, "f"));
    };
    let rename_back = |_fid: Fid| {
        applied(volume.rename(None, b, "f", a, "f"));
    };
    // How a change must move the entry's mtime and ctime and its directories' times:
    // an attribute change moves only the entry's ctime, a data change its mtime too,
    // a change of names its ctime and the directories'.
    let attrs = [Stays, Advances, Stays];
    let data = [Advances, Advances, Stays];
    let names = [Stays, Advances, Advances];
    let table = [
        Case::new("chmod", &chmod, file, vec![a], attrs),
        Case::new("chown", &chown, fifo.fid, vec![a], attrs),
        Case::new("atime only", &atime_only, file, vec![a], attrs),
        Case::new("truncate", &truncate, file, vec![a], data),
        Case::new("write", &write, file, vec![a], data),
        Case::new("link", &link, file, vec![b], names),
        Case::new("unlink one", &unlink_one_of_two, file, vec![b], names),
        Case::new("rename across", &rename_across, file, vec![a, b], names),
        Case::new("rename back", &rename_back, file, vec![b, a], names),
        Case::new("chmod of a FIFO", &chmod, fifo.fid, vec![a], attrs),
    ];
    for Case {
        what,
        change,
        entry,
        dirs,
        moves: [mtime, ctime, dir_times],
    } in table
    {
        let before = times(&volume, entry, &dirs);
        change(entry);
        let after = times(&volume, entry, &dirs);
        check(what, "mtime", before.entry.mtime, after.entry.mtime, mtime);
        check(what, "ctime", before.entry.ctime, after.entry.ctime, ctime);
        for (old, new) in before.dirs.iter().zip(&after.dirs) {
            check(what, "directory mtime", old.mtime, new.mtime, dir_times);
            check(what, "directory ctime", old.ctime, new.ctime, dir_times);
        }
    }
    assert_eq!(volume.fetch_status(file).unwrap().atime, given);

    // Explicit times are kept as given; ctime is still now.
    let before = volume.fetch_status(file).unwrap();
    let utimes = SetAttrs {
        atime: Some(given),
        mtime: Some(given),
        ..SetAttrs::default()
    };
    let after = volume.set_attr(file, &utimes).unwrap();
    assert_eq!((after.atime, after.mtime), (given, given));
    assert!(after.ctime > before.ctime);

    // Every entry a directory gains or loses moves its mtime and ctime.
    let dir_changes: [(&str, &dyn Fn()); 6] = [
        ("create", &|| {
            applied(volume.create(None, a, "c", 0o644, 0, 0, true));
        }),
        ("mkdir", &|| {
            applied(volume.make_dir(None, a, "d", 0o755, 0, 0));
        }),
        ("mknod", &|| {
            node(&volume, a, "s", FileKind::Socket);
        }),
        ("symlink", &|| {
            applied(volume.symlink(None, a, "l", "c", 0, 0));
        }),
        ("unlink", &|| {
            applied(volume.remove(None, a, "c", false));
        }),
        ("rmdir", &|| {
            applied(volume.remove(None, a, "d", true));
        }),
    ];
    for (what, change) in dir_changes {
        let before = volume.fetch_status(a).unwrap();
        change();
        let after = volume.fetch_status(a).unwrap();
        check(what, "directory mtime", before.mtime, after.mtime, Advances);
        check(what, "directory ctime", before.ctime, after.ctime, Advances);
    }
}
