//! Locks across workstations: a lock taken with `flock` or `fcntl` on one mount is seen
//! from another, survives a `kill -9` and restart of the fileserver, and a conflicting
//! request is refused during grace and granted once the holder releases.

use std::os::fd::AsRawFd;
use std::time::Duration;

use harness::{TestCell, flock, flock_n_succeeds, sh, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// F_GETLK on `file` for a whole-file write lock: the conflicting lock, if any.
fn getlk(file: &std::fs::File) -> Option<libc::flock> {
    // SAFETY: a zeroed flock is a valid initial value; fcntl fills it in.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as i16;
    lock.l_whence = libc::SEEK_SET as i16;
    // SAFETY: a valid fd and a valid pointer to a flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) };
    assert_eq!(rc, 0, "F_GETLK: {}", std::io::Error::last_os_error());
    (lock.l_type != libc::F_UNLCK as i16).then_some(lock)
}

#[test]
fn a_flock_on_one_mount_is_seen_from_the_other() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::write(a.join("locked"), b"data").unwrap();

    let held = std::fs::File::open(a.join("locked")).unwrap();
    flock(&held, libc::LOCK_EX | libc::LOCK_NB).unwrap();

    // `flock -n` on B fails while A holds it, and F_GETLK on B names a holder.
    let path = b.join("locked");
    let out = std::process::Command::new("flock")
        .args(["-n", &path.to_string_lossy(), "true"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "flock -n on B succeeded while A held the lock"
    );
    let other = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let holder = getlk(&other).expect("F_GETLK on B reports A's lock");
    assert_eq!(holder.l_type, libc::F_WRLCK as i16);

    // The lock is in the fileserver's journaled state, as `state inspect` shows.
    let partition = cell.dir.path().join("partition");
    let out = cell
        .holdfast(&["state", "inspect", &partition.to_string_lossy()])
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("1 lock(s)") && report.contains("exclusive"),
        "{report}"
    );

    // Released on A: B gets it.
    flock(&held, libc::LOCK_UN).unwrap();
    sh(&b, "flock -n locked true").unwrap();
}

#[test]
fn a_blocking_lock_waits_on_the_server_and_wakes_when_the_range_frees() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::write(a.join("queue"), b"").unwrap();
    let held = std::fs::File::open(a.join("queue")).unwrap();
    flock(&held, libc::LOCK_EX).unwrap();

    let path = b.join("queue");
    let waiter = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        flock(&file, libc::LOCK_EX).unwrap();
        std::time::Instant::now()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "B got the lock while A held it");
    let released = std::time::Instant::now();
    drop(held); // closing releases A's flock
    let granted = waiter.join().unwrap();
    assert!(granted >= released);
}

#[test]
fn a_lock_survives_kill_9_and_restart_of_the_fileserver() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::write(a.join("held"), b"x").unwrap();
    let held = std::fs::File::open(a.join("held")).unwrap();
    flock(&held, libc::LOCK_EX | libc::LOCK_NB).unwrap();

    cell.signal("fileserver", libc::SIGKILL).unwrap();
    cell.stop("fileserver");
    cell.start_fileserver().unwrap();

    // A's cache manager reconnects by itself and reclaims its lock; with every holder
    // reclaimed, grace ends early (the default grace is 30 s).
    assert!(
        wait_until(Duration::from_secs(20), || cell
            .log("fileserver")
            .contains("grace ended")),
        "{}",
        cell.log("fileserver")
    );
    let log = cell.log("fileserver");
    let ended = log
        .lines()
        .rev()
        .find(|l| l.contains("grace ended"))
        .unwrap();
    assert!(
        ended.contains("early") && ended.contains("reclaimed=1"),
        "{ended}"
    );

    // After grace, B's request still conflicts with A's lock: it survived the crash.
    let out = std::process::Command::new("flock")
        .args(["-n", &b.join("held").to_string_lossy(), "true"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "B got a lock A holds");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A still holds it: released on A, B gets it.
    flock(&held, libc::LOCK_UN).unwrap();
    assert!(wait_until(Duration::from_secs(20), || sh(
        &b,
        "flock -n held true"
    )
    .is_ok()));
}

#[test]
fn a_holder_that_never_returns_keeps_its_lock_for_the_whole_grace_then_loses_it() {
    const GRACE: Duration = Duration::from_secs(3);
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::write(a.join("orphan"), b"x").unwrap();
    let held = std::fs::File::open(a.join("orphan")).unwrap();
    flock(&held, libc::LOCK_EX | libc::LOCK_NB).unwrap();

    // The fileserver crashes and workstation A never comes back.
    cell.signal("fileserver", libc::SIGKILL).unwrap();
    cell.signal("ws-a", libc::SIGKILL).unwrap();
    cell.stop("fileserver");
    let restarted = std::time::Instant::now();
    cell.start_fileserver_with(&["--grace-secs", &GRACE.as_secs().to_string()])
        .unwrap();

    // During grace B cannot take A's recovered lock ...
    assert!(
        !flock_n_succeeds(&b.join("orphan")),
        "B took A's recovered lock during grace"
    );
    // ... grace runs its whole length, since A never reclaims ...
    assert!(
        wait_until(Duration::from_secs(20), || cell
            .log("fileserver")
            .contains("grace ended")),
        "{}",
        cell.log("fileserver")
    );
    let grace_seen = restarted.elapsed();
    let log = cell.log("fileserver");
    let ended = log.lines().rfind(|l| l.contains("grace ended")).unwrap();
    assert!(
        ended.contains("timeout") && ended.contains("dropped=1"),
        "{ended}"
    );
    assert!(
        grace_seen >= GRACE,
        "grace ended after {grace_seen:?}, before its {GRACE:?}"
    );
    // ... and then the lock is released: B gets it.
    assert!(
        flock_n_succeeds(&b.join("orphan")),
        "A's lock was not released when grace ended"
    );
    drop(held);
}
