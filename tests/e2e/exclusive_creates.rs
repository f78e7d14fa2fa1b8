//! Files made by an exclusive create, as `tar x`, `cp` and lock files make them: the
//! create is decided by the server before the open returns (`EEXIST` anywhere else
//! meanwhile), while the bytes and the mode and times set before the close reach the
//! server in one request at the close, durable there: another mount, and a fileserver
//! killed with SIGKILL, see the file exactly as it was closed.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use harness::TestCell;
use harness::crash::{close, kill_9_and_restart};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(37) ^ seed)
        .collect()
}

/// The fileserver's request counts by kind, from `vos counters`.
fn requests(cell: &TestCell) -> BTreeMap<String, u64> {
    let output = cell.holdfast(&["vos", "counters"]).unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.strip_prefix("request ")?.split_whitespace();
            let kind = words.next()?.to_owned();
            Some((kind, words.next()?.parse().ok()?))
        })
        .collect()
}

/// How many requests of `kind` the server answered between two counts.
fn made(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, kind: &str) -> u64 {
    after.get(kind).copied().unwrap_or(0) - before.get(kind).copied().unwrap_or(0)
}

/// `futimens(fd, [UTIME_OMIT, mtime])`, as `tar x` sets a file's time.
fn set_mtime(file: &std::fs::File, secs: i64) {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    // SAFETY: a valid descriptor and two timespecs.
    let done = unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) };
    assert_eq!(done, 0, "{}", std::io::Error::last_os_error());
}

/// `fchown` to the owner the file has: what `tar x` run by root does for files of its
/// own user.
fn chown_to_itself(file: &std::fs::File) {
    let meta = file.metadata().unwrap();
    // SAFETY: a valid descriptor.
    let done = unsafe { libc::fchown(file.as_raw_fd(), meta.uid(), meta.gid()) };
    assert_eq!(done, 0, "{}", std::io::Error::last_os_error());
}

/// What `tar x` does for one file: exclusive create, write, set times, owner and mode,
/// close (which must succeed).
fn extract_like_tar(path: &Path, data: &[u8], mtime: i64, mode: u32) {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.write_all(data).unwrap();
    set_mtime(&file, mtime);
    chown_to_itself(&file);
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .unwrap();
    close(file).unwrap();
}

const OLD: i64 = 978_307_200; // 2001-01-01

#[test]
fn a_tar_like_file_is_one_request_at_its_close_with_its_mode_and_times() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::create_dir(a.join("t")).unwrap();
    let files = 6;
    let before = requests(&cell);
    for i in 0..files {
        let data = pattern(1000 + i * 700, i as u8);
        extract_like_tar(&a.join(format!("t/f{i}")), &data, OLD + i as i64, 0o640);
    }
    let after = requests(&cell);
    // Each file: its exclusive create, then one fill; no store or fsync of its own.
    assert_eq!(made(&before, &after, "Create"), files as u64, "{after:?}");
    assert_eq!(
        made(&before, &after, "StoreNewFile"),
        files as u64,
        "{after:?}"
    );
    for kind in ["StoreDataBulk", "StoreDataIf", "Fsync", "CreateWithData"] {
        assert_eq!(made(&before, &after, kind), 0, "{kind}: {after:?}");
    }
    // Its times, owner and mode ride on the fill at the close: without that, every
    // file would cost three SetAttrs. (On a loaded machine a file is now and then
    // filled before them, by something here that needed it on the server first; its
    // attributes then go as SetAttrs. Why is an open question, see the notes.)
    let set_attrs = made(&before, &after, "SetAttr");
    assert!(set_attrs < 3 * files as u64 / 2, "{after:?}");
    for i in 0..files {
        let path = b.join(format!("t/f{i}"));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640, "f{i}");
        assert_eq!(
            meta.mtime(),
            OLD + i as i64,
            "f{i}: the time set after the bytes"
        );
        assert!(std::fs::read(&path).unwrap() == pattern(1000 + i * 700, i as u8));
    }
    // Acknowledged at the close: a SIGKILL of the fileserver keeps all of it, as a
    // mount that never saw these files finds.
    kill_9_and_restart(&mut cell).unwrap();
    let c = cell.mount("ws-c", &[]).unwrap();
    for i in 0..files {
        let path = c.join(format!("t/f{i}"));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.mtime()),
            (0o640, OLD + i as i64)
        );
        assert!(std::fs::read(&path).unwrap() == pattern(1000 + i * 700, i as u8));
    }
}

#[test]
fn an_exclusive_create_is_decided_at_the_open_and_filled_at_the_close() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    let exclusive = |path: &Path| OpenOptions::new().write(true).create_new(true).open(path);
    let mut lock = exclusive(&a.join("index.lock")).unwrap();
    lock.write_all(b"new index").unwrap();
    // Taken: on this mount and the other, before and after the bytes are there.
    for mount in [&a, &b] {
        let again = exclusive(&mount.join("index.lock")).map_err(|e| e.kind());
        assert_eq!(again.err(), Some(ErrorKind::AlreadyExists));
    }
    // Here it shows its bytes at once. Elsewhere it is empty until the close, or shows
    // those bytes if something here needed the file on the server first (the fill is
    // a close's, or an earlier need's: the request counts of the tar-like test pin
    // that it is one request); never anything else.
    let elsewhere = std::fs::metadata(b.join("index.lock")).unwrap().len();
    assert!([0, 9].contains(&elsewhere), "B sees {elsewhere} bytes");
    assert_eq!(std::fs::metadata(a.join("index.lock")).unwrap().len(), 9);
    lock.write_all(b", whole").unwrap();
    // A second open here needs the file on the server: it is filled first.
    assert_eq!(
        std::fs::read(a.join("index.lock")).unwrap(),
        b"new index, whole"
    );
    close(lock).unwrap();
    assert_eq!(
        std::fs::read(b.join("index.lock")).unwrap(),
        b"new index, whole"
    );
    std::fs::rename(a.join("index.lock"), a.join("index")).unwrap();
    assert_eq!(std::fs::read(b.join("index")).unwrap(), b"new index, whole");
    assert!(!b.join("index.lock").exists());
    // Gone: the name is free again for an exclusive create.
    close(exclusive(&b.join("index.lock")).unwrap()).unwrap();
    assert_eq!(std::fs::metadata(a.join("index.lock")).unwrap().len(), 0);
}

#[test]
fn a_write_after_a_time_was_set_moves_the_time_on() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(a.join("w"))
        .unwrap();
    file.write_all(b"first").unwrap();
    set_mtime(&file, OLD);
    assert_eq!(std::fs::metadata(a.join("w")).unwrap().mtime(), OLD);
    file.write_all(b", then more").unwrap();
    close(file).unwrap();
    let meta = std::fs::metadata(b.join("w")).unwrap();
    assert!(
        meta.mtime() > OLD + 3600,
        "a write after futimens sets the mtime"
    );
    assert_eq!(std::fs::read(b.join("w")).unwrap(), b"first, then more");
    // A file too big to wait for its close: the time set after its writes holds too.
    let big = pattern(300 * 1024, 9);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(a.join("big"))
        .unwrap();
    file.write_all(&big).unwrap();
    set_mtime(&file, OLD);
    close(file).unwrap();
    assert_eq!(std::fs::metadata(b.join("big")).unwrap().mtime(), OLD);
    assert!(std::fs::read(b.join("big")).unwrap() == big);
}

#[test]
fn tar_x_keeps_every_file_s_bytes_mode_and_time() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    let source = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    for i in 0..12u32 {
        let path = source.path().join(format!("d{}/f{i}", i % 3));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, pattern(200 + i as usize * 900, i as u8)).unwrap();
        let mode = [0o644, 0o600, 0o755][i as usize % 3];
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        set_mtime(&file, OLD + i64::from(i) * 60);
        expected.push((format!("d{}/f{i}", i % 3), mode, OLD + i64::from(i) * 60));
    }
    let tarball = source.path().join("../exclusive-creates.tar");
    let packed = Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(source.path())
        .args(["d0", "d1", "d2"])
        .status()
        .unwrap();
    assert!(packed.success());
    let before = requests(&cell);
    let extracted = Command::new("tar")
        .arg("-xf")
        .arg(&tarball)
        .arg("-C")
        .arg(&a)
        .output()
        .unwrap();
    std::fs::remove_file(&tarball).unwrap();
    assert!(extracted.status.success(), "{extracted:?}");
    let after = requests(&cell);
    for (name, mode, mtime) in &expected {
        let meta = std::fs::metadata(b.join(name)).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.mtime()),
            (*mode, *mtime),
            "{name}"
        );
        assert!(
            std::fs::read(b.join(name)).unwrap()
                == std::fs::read(source.path().join(name)).unwrap()
        );
    }
    // The files' attributes went with their bytes: what SetAttrs remain are the three
    // directories' (their times, owner and mode, set once tar is done with them).
    assert_eq!(made(&before, &after, "StoreNewFile"), expected.len() as u64);
    assert!(made(&before, &after, "SetAttr") <= 3 * 3, "{after:?}");
    assert_eq!(made(&before, &after, "StoreDataBulk"), 0, "{after:?}");
}
