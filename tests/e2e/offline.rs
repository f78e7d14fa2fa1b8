//! Cached files stay readable while their servers are unreachable: the only fileserver
//! killed, or a pair that fenced itself with no partner taking over. Reads, `stat`,
//! listings and `readlink` of what a mount holds under callbacks are answered from its
//! cache; what needs the server fails with `ETIMEDOUT` within its timeout; `fs
//! checkservers` names the servers that are down; once back, writes work and changes
//! made elsewhere are seen as the callback protocol promises.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::pair::read_history;
use harness::{PairOptions, TestCell, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// The harness mounts with `--timeout 2`.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// What a failing call may take beyond its timeout (a hang guard, not a speed check).
const MARGIN: Duration = Duration::from_secs(3);
const FILES: usize = 5;
/// How long a mount may take to come back to a restarted server by itself (its
/// reconnect backoff is at most 5 s), with room for a loaded machine.
const RECONNECT_LIMIT: Duration = Duration::from_secs(30);

fn content(i: usize) -> String {
    format!("file {i}: cached before the outage\n")
}

/// Writes the tree the tests read back: `docs/f0..f4`, `link -> docs/f0`, `shared`.
fn make_tree(mnt: &Path) {
    std::fs::create_dir(mnt.join("docs")).unwrap();
    for i in 0..FILES {
        std::fs::write(mnt.join(format!("docs/f{i}")), content(i)).unwrap();
    }
    std::os::unix::fs::symlink("docs/f0", mnt.join("link")).unwrap();
    std::fs::write(mnt.join("shared"), "v1").unwrap();
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Everything a workstation does with the tree, which caches it under callbacks.
fn read_tree(mnt: &Path) -> Vec<String> {
    for i in 0..FILES {
        let path = mnt.join(format!("docs/f{i}"));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), content(i));
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            content(i).len() as u64
        );
    }
    assert_eq!(
        std::fs::read_link(mnt.join("link")).unwrap(),
        PathBuf::from("docs/f0")
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("link")).unwrap(),
        content(0)
    );
    let docs = names(&mnt.join("docs"));
    assert!(
        (0..FILES).all(|i| docs.contains(&format!("f{i}"))),
        "{docs:?}"
    );
    names(mnt)
}

/// Each cached read, stat, listing and readlink answers, with no wait for the server:
/// each takes less than `waits_at_least`, the least a call to the server would take
/// before failing.
fn cached_reads_answer(mnt: &Path, root: &[String], waits_at_least: Duration) {
    let timed = |what: &str, began: Instant| {
        assert!(
            began.elapsed() < waits_at_least,
            "{what} waited for the server: {:?}",
            began.elapsed()
        );
    };
    for i in 0..FILES {
        let path = mnt.join(format!("docs/f{i}"));
        let began = Instant::now();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), content(i));
        timed("cat", began);
        let began = Instant::now();
        let meta = std::fs::metadata(&path).unwrap();
        timed("stat", began);
        assert_eq!(meta.len(), content(i).len() as u64);
    }
    let began = Instant::now();
    assert_eq!(names(mnt), root);
    timed("ls of the root", began);
    let began = Instant::now();
    assert_eq!(
        std::fs::read_link(mnt.join("link")).unwrap(),
        PathBuf::from("docs/f0")
    );
    timed("readlink", began);
}

/// Creates `path` holding one byte and closes it, with what the close answered: a
/// small file is created with its bytes there (`std::fs::write` would not tell).
fn create_and_close(path: &std::path::Path) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    std::io::Write::write_all(&mut file, b"x")?;
    harness::crash::close(file)
}

/// Runs `op`, which needs the server, and checks it fails with `ETIMEDOUT` within
/// `limit`.
fn fails_unreachable<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    op: impl FnOnce() -> std::io::Result<T>,
) {
    let began = Instant::now();
    let result = op();
    let took = began.elapsed();
    let err = result.expect_err(what);
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ETIMEDOUT),
        "{what}: {err} ({:?})",
        err.kind()
    );
    assert!(took < limit, "{what} took {took:?}");
}

#[test]
fn cached_files_stay_readable_while_the_only_fileserver_is_dead() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    make_tree(&a);
    // A file `a` lists but never reads: it holds no status or data of it.
    std::fs::write(b.join("docs/unread"), "b's").unwrap();
    assert_eq!(std::fs::read_to_string(b.join("shared")).unwrap(), "v1");
    let root = read_tree(&a);
    assert_eq!(std::fs::read_to_string(a.join("shared")).unwrap(), "v1");
    assert!(
        cell.checkservers(&a)
            .unwrap()
            .contains("All servers are running.")
    );

    cell.signal("fileserver", libc::SIGKILL).unwrap();
    assert!(
        wait_until(RECONNECT_LIMIT, || cell
            .log("ws-a")
            .contains("fileserver connection lost")),
        "{}",
        cell.log("ws-a")
    );

    cached_reads_answer(&a, &root, RPC_TIMEOUT);
    assert_eq!(std::fs::read_to_string(a.join("shared")).unwrap(), "v1");
    let limit = RPC_TIMEOUT + MARGIN;
    fails_unreachable("an uncached read", limit, || {
        std::fs::read(a.join("docs/unread"))
    });
    fails_unreachable("a create", limit, || create_and_close(&a.join("new")));
    fails_unreachable("a truncating write", limit, || {
        std::fs::write(a.join("docs/f1"), "y")
    });
    let text = cell.checkservers(&a).unwrap();
    let down = format!("{} is down", cell.fs_address);
    assert!(text.contains(&down), "{text}");
    assert!(text.contains("unavailable"), "{text}");

    // Back on the same address, restoring its callbacks from its journal.
    cell.start_fileserver().unwrap();
    // Another workstation changes a file `a` holds a callback on, before `a` is back:
    // the break waits for `a` (or its reclaim finds the version moved), and `a` sees
    // the change once it has reconnected by itself.
    std::fs::write(b.join("shared"), "v2").unwrap();
    assert!(
        wait_until(RECONNECT_LIMIT, || std::fs::read_to_string(
            a.join("shared")
        )
        .is_ok_and(|text| text == "v2")),
        "{}",
        cell.log("ws-a")
    );
    assert!(
        cell.log("ws-a").contains("reclaimed after reconnecting"),
        "{}",
        cell.log("ws-a")
    );
    // Writes work again, and what one workstation closes the other sees at once.
    std::fs::write(a.join("after"), "written after the outage").unwrap();
    assert_eq!(
        std::fs::read_to_string(b.join("after")).unwrap(),
        "written after the outage"
    );
    std::fs::write(b.join("docs/f2"), "changed on b").unwrap();
    assert_eq!(
        std::fs::read_to_string(a.join("docs/f2")).unwrap(),
        "changed on b"
    );
    assert_eq!(
        std::fs::read_to_string(a.join("docs/unread")).unwrap(),
        "b's"
    );
    assert!(
        cell.checkservers(&a)
            .unwrap()
            .contains("All servers are running.")
    );
}

#[test]
fn cached_files_stay_readable_while_the_pair_is_fenced_with_no_takeover() {
    let mut cell = TestCell::start_pair(BIN, PairOptions::default()).unwrap();
    let failover = Duration::from_secs(4);
    let a = cell
        .mount(
            "ws",
            &["--failover-timeout", &failover.as_secs().to_string()],
        )
        .unwrap();
    make_tree(&a);
    let root = read_tree(&a);

    // The VLDB stops answering: the active cannot renew its lease and fences itself
    // (closing the mounts' connections); the passive cannot take the lease over, so
    // both members answer `NotActive`.
    cell.signal("vlserver", libc::SIGSTOP).unwrap();
    let history = cell.history_path("fs-a");
    let fenced = || {
        read_history(&history).is_ok_and(|events| events.iter().any(|event| event.what == "fenced"))
    };
    assert!(wait_until(RECONNECT_LIMIT, fenced), "{}", cell.log("fs-a"));
    assert!(
        wait_until(RECONNECT_LIMIT, || cell
            .log("ws")
            .contains("fileserver connection lost")),
        "{}",
        cell.log("ws")
    );

    cached_reads_answer(&a, &root, failover);
    let limit = failover + RPC_TIMEOUT + MARGIN;
    fails_unreachable("a create", limit, || create_and_close(&a.join("new")));
    let text = cell.checkservers(&a).unwrap();
    for (_, address) in &cell.members {
        assert!(text.contains(address.as_str()), "{text}");
    }
    assert!(text.contains("is down"), "{text}");

    // The VLDB answers again: a member takes the lease, and the mount carries on.
    cell.signal("vlserver", libc::SIGCONT).unwrap();
    let write = || match std::fs::write(a.join("after"), "after the fence") {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::TimedOut => false,
        Err(e) => panic!("write after the fence: {e}"),
    };
    assert!(wait_until(RECONNECT_LIMIT, write), "{}", cell.log("ws"));
    assert_eq!(
        std::fs::read_to_string(a.join("after")).unwrap(),
        "after the fence"
    );
    assert!(wait_until(RECONNECT_LIMIT, || cell
        .checkservers(&a)
        .unwrap()
        .contains("All servers are running.")));
}
