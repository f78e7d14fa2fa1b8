//! The POSIX rules tools rely on, through real mounts, as tables of cases: special files
//! (FIFOs, sockets, device nodes) as entries, which change moves which timestamps, and
//! the link count of an open file whose last name was removed. Run as root; a second
//! mount checks that every change reaches another workstation.

use std::ffi::CString;
use std::fs::{File, FileType, Metadata, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use harness::{TestCell, require_fuse, sh, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn mknod(path: &Path, mode: u32, rdev: u64) -> std::io::Result<()> {
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::mknod(c_path(path).as_ptr(), mode, rdev) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn stat(path: &Path) -> Metadata {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
}

fn gone(path: &Path) -> bool {
    matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// The type of `name` as a listing of `dir` gives it (`d_type`).
fn listed_type(dir: &Path, name: &str) -> FileType {
    std::fs::read_dir(dir)
        .unwrap()
        .map(Result::unwrap)
        .find(|e| e.file_name() == name)
        .unwrap_or_else(|| panic!("{name} not listed in {}", dir.display()))
        .file_type()
        .unwrap()
}

/// Two mounts of one cell: `a` makes the changes, `b` is another workstation.
struct Mounts {
    cell: TestCell,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
}

fn two_mounts() -> Mounts {
    require_fuse().unwrap();
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    Mounts { cell, a, b }
}

/// One kind of special file: how `mknod` makes it and how `stat` must show it.
struct Special {
    name: &'static str,
    /// `S_IF*` type bits and permission bits (0o640: no umask bit matters).
    mode: u32,
    rdev: u64,
    is: fn(&FileType) -> bool,
}

fn specials() -> [Special; 5] {
    [
        Special {
            name: "fifo",
            mode: libc::S_IFIFO | 0o640,
            rdev: 0,
            is: FileType::is_fifo,
        },
        Special {
            name: "socket",
            mode: libc::S_IFSOCK | 0o640,
            rdev: 0,
            is: FileType::is_socket,
        },
        Special {
            name: "chardev",
            mode: libc::S_IFCHR | 0o640,
            rdev: libc::makedev(1, 3),
            is: FileType::is_char_device,
        },
        Special {
            name: "blockdev",
            mode: libc::S_IFBLK | 0o640,
            // A minor above 255 takes the encoding's split minor bits.
            rdev: libc::makedev(259, 65_537),
            is: FileType::is_block_device,
        },
        // `mknod` of a regular file makes an empty file, as `create` does.
        Special {
            name: "regular",
            mode: libc::S_IFREG | 0o640,
            rdev: 0,
            is: FileType::is_file,
        },
    ]
}

/// What the entry at `path` differs in from `kind` with `links` links, if anything.
fn special_differs(kind: &Special, path: &Path, links: u64) -> Option<String> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| e.to_string())
        .ok()?;
    let name = path.file_name()?.to_str()?;
    let listed = listed_type(path.parent()?, name);
    let seen = (meta.mode(), meta.rdev(), meta.nlink(), meta.len());
    let expected = (kind.mode, kind.rdev, links, 0);
    if !(kind.is)(&meta.file_type()) || !(kind.is)(&listed) || seen != expected {
        return Some(format!(
            "{:?} listed as {listed:?}, mode {:o} rdev {:#x} links {} size {}; expected \
             mode {:o} rdev {:#x} links {links} size 0",
            meta.file_type(),
            seen.0,
            seen.1,
            seen.2,
            seen.3,
            kind.mode,
            kind.rdev
        ));
    }
    None
}

/// How long another workstation's kernel may take to be told of a change: a break is
/// acknowledged before the kernel's caches are invalidated, off the break's path
/// (`cachemgr::invalidate`), and a lost invalidation lasts at most the kernel TTL (1 s).
/// A hang guard: a stale status in the cache manager itself would outlast it.
const OTHER_MOUNT_SEES_IT: Duration = Duration::from_secs(5);

/// Asserts `seen` holds for `path`: at once on the mount that made the change, and
/// within `OTHER_MOUNT_SEES_IT` on the other one.
fn assert_seen(
    path: &Path,
    changed_here: bool,
    what: &str,
    seen: impl Fn(&Path) -> Option<String>,
) {
    if !changed_here {
        wait_until(OTHER_MOUNT_SEES_IT, || seen(path).is_none());
    }
    if let Some(difference) = seen(path) {
        panic!("{what} at {}: {difference}", path.display());
    }
}

fn check_special(kind: &Special, path: &Path, links: u64, changed_here: bool) {
    assert_seen(path, changed_here, kind.name, |path| {
        special_differs(kind, path, links)
    });
}

fn check_gone(path: &Path, changed_here: bool, what: &str) {
    assert_seen(path, changed_here, what, |path| {
        (!gone(path)).then(|| "still there".to_owned())
    });
}

#[test]
fn special_files_are_made_stat_link_rename_and_unlink_like_any_entry() {
    let m = two_mounts();
    std::fs::create_dir(m.a.join("s")).unwrap();
    for kind in specials() {
        let at = |mount: &Path, name: &str| mount.join(name);
        let first = format!("s/{}", kind.name);
        // Every name of a file stays in its one directory, as in AFS (docs/access.md).
        let second = format!("s/{}-link", kind.name);
        let moved = format!("s/{}-moved", kind.name);

        mknod(&at(&m.a, &first), kind.mode, kind.rdev).unwrap();
        for (mount, here) in [(&m.a, true), (&m.b, false)] {
            check_special(&kind, &at(mount, &first), 1, here);
        }
        assert_eq!(
            mknod(&at(&m.b, &first), kind.mode, kind.rdev)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST),
            "{}: made twice",
            kind.name
        );

        std::fs::hard_link(at(&m.a, &first), at(&m.a, &second)).unwrap();
        for (mount, here) in [(&m.a, true), (&m.b, false)] {
            check_special(&kind, &at(mount, &first), 2, here);
            check_special(&kind, &at(mount, &second), 2, here);
        }

        std::fs::rename(at(&m.a, &first), at(&m.a, &moved)).unwrap();
        for (mount, here) in [(&m.a, true), (&m.b, false)] {
            check_gone(&at(mount, &first), here, "renamed away");
            check_special(&kind, &at(mount, &moved), 2, here);
        }

        // The other workstation removes one name; the first sees one link left.
        std::fs::remove_file(at(&m.b, &second)).unwrap();
        for (mount, here) in [(&m.b, true), (&m.a, false)] {
            check_gone(&at(mount, &second), here, "unlinked");
            check_special(&kind, &at(mount, &moved), 1, here);
        }

        std::fs::remove_file(at(&m.a, &moved)).unwrap();
        for (mount, here) in [(&m.a, true), (&m.b, false)] {
            check_gone(&at(mount, &moved), here, "unlinked");
        }
    }
    assert_eq!(std::fs::read_dir(m.b.join("s")).unwrap().count(), 0);
    drop(m.cell);
}

#[test]
fn a_socket_bound_and_a_fifo_opened_in_the_mount_pass_bytes_locally() {
    let m = two_mounts();
    // `bind` makes the socket's entry through the mount; the kernel connects to it.
    let socket = m.a.join("sock");
    let listener = UnixListener::bind(&socket).unwrap();
    assert!(stat(&m.b.join("sock")).file_type().is_socket());
    let mut client = UnixStream::connect(&socket).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"through the socket").unwrap();
    drop(client);
    let mut got = String::new();
    server.read_to_string(&mut got).unwrap();
    assert_eq!(got, "through the socket");
    drop((server, listener));
    std::fs::remove_file(&socket).unwrap();
    check_gone(&m.b.join("sock"), false, "unlinked");

    // A FIFO made with mkfifo, opened by a reader and a writer on one machine.
    sh(&m.a, "mkfifo pipe").unwrap();
    assert!(stat(&m.b.join("pipe")).file_type().is_fifo());
    let pipe = m.a.join("pipe");
    let reader = std::thread::spawn({
        let pipe = pipe.clone();
        move || {
            let mut got = Vec::new();
            File::open(pipe).unwrap().read_to_end(&mut got).unwrap();
            got
        }
    });
    let mut writer = OpenOptions::new().write(true).open(&pipe).unwrap();
    writer.write_all(b"through the fifo").unwrap();
    drop(writer);
    assert_eq!(reader.join().unwrap(), b"through the fifo");
    // Nothing was stored: a FIFO has no data on the server.
    assert_eq!(stat(&m.b.join("pipe")).len(), 0);
    drop(m.cell);
}

/// A time as `stat` shows it.
type Time = (i64, i64);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Times {
    mtime: Time,
    ctime: Time,
}

fn times(path: &Path) -> Times {
    let meta = stat(path);
    Times {
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    }
}

/// What a change must do to a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Moves {
    Advances,
    Stays,
    /// Becomes the time `utimensat` gave (`GIVEN`).
    Given,
}
use Moves::{Advances, Given, Stays};

fn check(case: &str, what: &str, before: Time, after: Time, expected: Moves) {
    match expected {
        Advances => assert!(
            after > before,
            "{case}: {what} did not advance: {before:?} -> {after:?}"
        ),
        Stays => assert_eq!(after, before, "{case}: {what} moved"),
        Given => assert_eq!(
            after,
            (GIVEN.tv_sec, GIVEN.tv_nsec),
            "{case}: {what} not as given"
        ),
    }
}

/// `utimensat` with each time given, `UTIME_NOW` or `UTIME_OMIT`.
fn utimensat(path: &Path, atime: libc::timespec, mtime: libc::timespec) {
    let times = [atime, mtime];
    // SAFETY: a valid path and two timespecs.
    let done = unsafe { libc::utimensat(libc::AT_FDCWD, c_path(path).as_ptr(), times.as_ptr(), 0) };
    assert_eq!(done, 0, "utimensat: {}", std::io::Error::last_os_error());
}

fn special_time(nanos: libc::c_long) -> libc::timespec {
    libc::timespec {
        tv_sec: 0,
        tv_nsec: nanos,
    }
}

const GIVEN: libc::timespec = libc::timespec {
    tv_sec: 1_000_000,
    tv_nsec: 7,
};

/// One change and the times it must move. Each case runs in its own directory, which
/// holds `a/` with the file `a/f` (10 bytes) and `b/`, and what `setup` adds.
struct TimeCase {
    what: &'static str,
    setup: &'static str,
    change: Change,
    /// The entry whose times are checked: its name before and after the change.
    entry: Option<(&'static str, &'static str)>,
    mtime: Moves,
    ctime: Moves,
    /// Directories whose mtime and ctime must advance; every other one must stay.
    dirs_changed: &'static [&'static str],
}

enum Change {
    Shell(&'static str),
    /// `utimensat` of `a/f` with these atime and mtime.
    Utimensat(libc::timespec, libc::timespec),
}

impl TimeCase {
    fn new(what: &'static str, change: Change) -> TimeCase {
        TimeCase {
            what,
            setup: "",
            change,
            entry: None,
            mtime: Stays,
            ctime: Stays,
            dirs_changed: &[],
        }
    }

    fn shell(what: &'static str, line: &'static str) -> TimeCase {
        TimeCase::new(what, Change::Shell(line))
    }

    fn utimensat(what: &'static str, atime: libc::timespec, mtime: libc::timespec) -> TimeCase {
        TimeCase::new(what, Change::Utimensat(atime, mtime)).entry("a/f")
    }

    fn setup(self, setup: &'static str) -> TimeCase {
        TimeCase { setup, ..self }
    }

    fn entry(self, path: &'static str) -> TimeCase {
        self.renamed(path, path)
    }

    fn renamed(self, from: &'static str, to: &'static str) -> TimeCase {
        TimeCase {
            entry: Some((from, to)),
            ..self
        }
    }

    /// The entry's mtime and ctime.
    fn times(self, mtime: Moves, ctime: Moves) -> TimeCase {
        TimeCase {
            mtime,
            ctime,
            ..self
        }
    }

    fn dirs(self, dirs_changed: &'static [&'static str]) -> TimeCase {
        TimeCase {
            dirs_changed,
            ..self
        }
    }
}

fn time_cases() -> Vec<TimeCase> {
    let now = special_time(libc::UTIME_NOW);
    let omit = special_time(libc::UTIME_OMIT);
    let shell = TimeCase::shell;
    vec![
        // Attributes: the entry's ctime only.
        shell("chmod", "chmod 600 a/f")
            .entry("a/f")
            .times(Stays, Advances),
        shell("chown", "chown 5:6 a/f")
            .entry("a/f")
            .times(Stays, Advances),
        shell("chmod of a FIFO", "chmod 600 a/p")
            .setup("mkfifo a/p")
            .entry("a/p")
            .times(Stays, Advances),
        shell("chown of a device", "chown 7 a/c")
            .setup("mknod a/c c 1 3")
            .entry("a/c")
            .times(Stays, Advances),
        // Data: the entry's mtime and ctime; a read moves neither.
        shell("write", "printf more >> a/f")
            .entry("a/f")
            .times(Advances, Advances),
        shell("truncate", "truncate -s 4 a/f")
            .entry("a/f")
            .times(Advances, Advances),
        shell("read", "cat a/f > /dev/null").entry("a/f"),
        // utimensat: ctime always, unless both times are omitted (then nothing changes).
        TimeCase::utimensat("utimensat now, now", now, now).times(Advances, Advances),
        TimeCase::utimensat("utimensat atime now, mtime omitted", now, omit).times(Stays, Advances),
        TimeCase::utimensat("utimensat atime omitted, mtime given", omit, GIVEN)
            .times(Given, Advances),
        TimeCase::utimensat("utimensat both omitted", omit, omit),
        // Names: the entry's ctime, and the mtime and ctime of each directory changed.
        shell("link", "ln a/f a/l")
            .entry("a/f")
            .times(Stays, Advances)
            .dirs(&["a"]),
        shell("unlink of one of two names", "rm a/l")
            .setup("ln a/f a/l")
            .entry("a/f")
            .times(Stays, Advances)
            .dirs(&["a"]),
        shell("rename within a directory", "mv a/f a/g")
            .renamed("a/f", "a/g")
            .times(Stays, Advances)
            .dirs(&["a"]),
        shell("rename to another directory", "mv a/f b/g")
            .renamed("a/f", "b/g")
            .times(Stays, Advances)
            .dirs(&["a", "b"]),
        shell("rename of a FIFO over a file", "mv b/p a/f")
            .setup("mkfifo b/p")
            .renamed("b/p", "a/f")
            .times(Stays, Advances)
            .dirs(&["a", "b"]),
        shell("rename of a directory", "mv a/d b/d")
            .setup("mkdir a/d")
            .renamed("a/d", "b/d")
            .times(Stays, Advances)
            .dirs(&["a", "b"]),
        shell("create", "touch a/n").dirs(&["a"]),
        shell("mkdir", "mkdir a/n").dirs(&["a"]),
        shell("mkfifo", "mkfifo a/n").dirs(&["a"]),
        shell("mknod", "mknod a/n b 8 1").dirs(&["a"]),
        shell("symlink", "ln -s f a/n").dirs(&["a"]),
        shell("unlink", "rm a/f").dirs(&["a"]),
        shell("rmdir", "rmdir b/e").setup("mkdir b/e").dirs(&["b"]),
    ]
}

#[test]
fn changes_move_the_times_posix_names_on_both_mounts() {
    let m = two_mounts();
    for (i, case) in time_cases().into_iter().enumerate() {
        let root = format!("case{i}");
        sh(
            &m.a,
            &format!("mkdir -p {root}/a {root}/b && printf 0123456789 > {root}/a/f"),
        )
        .unwrap();
        if !case.setup.is_empty() {
            sh(&m.a.join(&root), case.setup).unwrap();
        }
        let dirs = ["a", "b"];
        let snapshot = |mount: &Path, entry: Option<&str>| {
            let entry = entry.map(|e| times(&mount.join(&root).join(e)));
            let dirs: Vec<Times> = dirs
                .iter()
                .map(|d| times(&mount.join(&root).join(d)))
                .collect();
            (entry, dirs)
        };
        // Both mounts hold every status before the change, so a stale one would show.
        let before = snapshot(&m.a, case.entry.map(|e| e.0));
        let b_before = || snapshot(&m.b, case.entry.map(|e| e.0));
        wait_until(OTHER_MOUNT_SEES_IT, || b_before() == before);
        assert_eq!(b_before(), before, "{}: mounts differ before", case.what);
        match case.change {
            Change::Shell(line) => {
                sh(&m.a.join(&root), line).unwrap();
            }
            Change::Utimensat(atime, mtime) => {
                utimensat(&m.a.join(&root).join("a/f"), atime, mtime)
            }
        }
        let after = snapshot(&m.a, case.entry.map(|e| e.1));
        let b_after = || snapshot(&m.b, case.entry.map(|e| e.1));
        wait_until(OTHER_MOUNT_SEES_IT, || b_after() == after);
        assert_eq!(
            b_after(),
            after,
            "{}: the other mount sees other times",
            case.what
        );
        if let (Some(old), Some(new)) = (before.0, after.0) {
            check(case.what, "mtime", old.mtime, new.mtime, case.mtime);
            check(case.what, "ctime", old.ctime, new.ctime, case.ctime);
        }
        for (dir, (old, new)) in dirs.iter().zip(before.1.iter().zip(&after.1)) {
            let moves = if case.dirs_changed.contains(dir) {
                Advances
            } else {
                Stays
            };
            check(
                case.what,
                &format!("mtime of {dir}"),
                old.mtime,
                new.mtime,
                moves,
            );
            check(
                case.what,
                &format!("ctime of {dir}"),
                old.ctime,
                new.ctime,
                moves,
            );
        }
    }

    // A write shows in `fstat` at once, before the close that stores it.
    sh(&m.a, "printf 0123456789 > open").unwrap();
    let before = times(&m.a.join("open"));
    let mut file = OpenOptions::new()
        .append(true)
        .open(m.a.join("open"))
        .unwrap();
    file.write_all(b"more").unwrap();
    let meta = file.metadata().unwrap();
    let written = Times {
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    };
    check(
        "write before close",
        "mtime",
        before.mtime,
        written.mtime,
        Advances,
    );
    check(
        "write before close",
        "ctime",
        before.ctime,
        written.ctime,
        Advances,
    );
    drop(file);
    // Once stored, both mounts show the server's times.
    let stored = times(&m.a.join("open"));
    let after_close = "close after write";
    check(after_close, "mtime", written.mtime, stored.mtime, Advances);
    wait_until(OTHER_MOUNT_SEES_IT, || times(&m.b.join("open")) == stored);
    assert_eq!(
        times(&m.b.join("open")),
        stored,
        "the other mount after close"
    );
    drop(m.cell);
}

#[test]
fn an_open_file_whose_last_name_is_removed_has_no_links() {
    let m = two_mounts();
    // One name of two removed: the other shows one link at once, on both mounts.
    sh(&m.a, "printf x > h1 && ln h1 h2").unwrap();
    let links = |n: u64| {
        move |path: &Path| {
            let seen = stat(path).nlink();
            (seen != n).then(|| format!("{seen} links, expected {n}"))
        }
    };
    for (mount, here) in [(&m.a, true), (&m.b, false)] {
        assert_seen(&mount.join("h1"), here, "linked", links(2));
    }
    std::fs::remove_file(m.a.join("h2")).unwrap();
    for (mount, here) in [(&m.a, true), (&m.b, false)] {
        assert_seen(&mount.join("h1"), here, "one name removed", links(1));
    }

    // The last name of an open file removed: fstat shows no links, and the open file
    // is still read and written.
    std::fs::write(m.a.join("open"), b"0123456789").unwrap();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.a.join("open"))
        .unwrap();
    assert_eq!(file.metadata().unwrap().nlink(), 1);
    std::fs::remove_file(m.a.join("open")).unwrap();
    check_gone(&m.b.join("open"), false, "unlinked");
    assert_eq!(file.metadata().unwrap().nlink(), 0);
    let mut got = [0; 10];
    file.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(&got, b"0123456789");
    file.write_all_at(b"AB", 0).unwrap();
    file.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(&got, b"AB23456789");
    let meta = file.metadata().unwrap();
    assert_eq!((meta.nlink(), meta.len()), (0, 10));

    // A hard-linked open file keeps its other name's count.
    sh(&m.a, "printf y > k1 && ln k1 k2").unwrap();
    let linked = File::open(m.a.join("k1")).unwrap();
    std::fs::remove_file(m.a.join("k1")).unwrap();
    assert_eq!(linked.metadata().unwrap().nlink(), 1);
    assert_seen(&m.b.join("k2"), false, "one name removed", links(1));
    // The other workstation removes the last name.
    std::fs::remove_file(m.b.join("k2")).unwrap();
    let fstat_links = || {
        linked
            .metadata()
            .map(|m| m.nlink())
            .map_err(|e| e.to_string())
    };
    wait_until(OTHER_MOUNT_SEES_IT, || fstat_links() == Ok(0));
    assert_eq!(fstat_links(), Ok(0));
    let mut got = String::new();
    (&linked).read_to_string(&mut got).unwrap();
    assert_eq!(got, "y");
    drop((file, linked));
    drop(m.cell);
}
