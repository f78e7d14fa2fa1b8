//! A fileserver killed with `kill -9` and started again keeps its clients' caches warm:
//! cached files are not fetched again, and a file changed meanwhile is never served stale.
//! A fileserver whose state journal fails (a full disk) stops at once with a clear error,
//! and starts again with what was durable once there is room.

use std::time::Duration;

use harness::{TestCell, Tmpfs, flock, flock_n_succeeds, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const FILES: usize = 1000;

fn fetch_data_calls(cell: &TestCell) -> u64 {
    let out = cell.holdfast(&["vos", "counters"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("fetch_data_calls"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no fetch_data_calls in {text}"))
}

#[test]
fn cached_files_stay_warm_across_kill_9_and_restart() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::create_dir(a.join("many")).unwrap();
    for i in 0..FILES {
        std::fs::write(a.join(format!("many/f{i:04}")), format!("file {i}\n")).unwrap();
    }
    // B caches every file.
    for i in 0..FILES {
        let text = std::fs::read_to_string(b.join(format!("many/f{i:04}"))).unwrap();
        assert_eq!(text, format!("file {i}\n"));
    }

    cell.signal("fileserver", libc::SIGKILL).unwrap();
    cell.stop("fileserver");
    cell.start_fileserver().unwrap();

    // A changes one file while B has not yet come back.
    std::fs::write(a.join("many/f0007"), b"changed while B was away\n").unwrap();
    let before = fetch_data_calls(&cell);

    // B re-reads everything: the changed file is fetched, and only that one.
    assert!(wait_until(Duration::from_secs(20), || {
        std::fs::read(b.join("many/f0007")).ok().as_deref() == Some(b"changed while B was away\n")
    }));
    for i in 0..FILES {
        if i == 7 {
            continue;
        }
        let text = std::fs::read_to_string(b.join(format!("many/f{i:04}"))).unwrap();
        assert_eq!(text, format!("file {i}\n"));
    }
    let fetched = fetch_data_calls(&cell) - before;
    eprintln!("files fetched again after the restart: {fetched}");
    assert!(
        fetched <= 1,
        "B fetched {fetched} files again after the restart"
    );
}

#[test]
fn a_full_state_disk_stops_the_fileserver_and_a_restart_recovers() {
    let mut cell = TestCell::start_vldb(BIN).unwrap();
    // The metadata log, which holds the state journal's records, lives on a 2 MiB disk
    // of its own (room for a segment and the next one at the restart); the volumes do
    // not.
    let state_disk = Tmpfs::mount(&cell.path_of("partition").join("log"), 2 << 20).unwrap();
    cell.start_fileserver().unwrap();
    cell.create_root_volume().unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    std::fs::write(a.join("kept"), b"written before the disk filled\n").unwrap();
    let locked = a.join("locked");
    std::fs::write(&locked, b"lock me\n").unwrap();
    let file = std::fs::File::open(&locked).unwrap();
    let filler = state_disk.fill().unwrap();
    // What the full disk provokes, at ERROR, once: the log's write fails, and the
    // fileserver stops journaling and serving.
    cell.expect_error_from("fileserver", "metadata log failed");

    // Lock and unlock until a record finds no room: that request fails...
    let refused = (0..10_000).find_map(|_| {
        flock(&file, libc::LOCK_EX)
            .and_then(|()| flock(&file, libc::LOCK_UN))
            .err()
    });
    let refused = refused.expect("a full state disk must fail a lock request");
    eprintln!("lock request refused: {refused}");
    drop(file);
    // ...and the fileserver stops, saying why and what to do.
    let status = cell
        .await_exit("fileserver", Duration::from_secs(30))
        .expect("the fileserver stops once its state journal failed");
    assert!(!status.success(), "{status}");
    let log = cell.log("fileserver");
    assert!(
        log.contains("metadata log failed") && log.contains("start it again"),
        "{log}"
    );

    // With room again it starts from what was durable, and serves locks again.
    std::fs::remove_file(filler).unwrap();
    cell.start_fileserver_with(&["--grace-secs", "2"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || flock_n_succeeds(&locked)),
        "the lock is not granted after the restart:\n{}",
        cell.log("fileserver")
    );
    assert_eq!(
        std::fs::read(a.join("kept")).unwrap(),
        b"written before the disk filled\n"
    );
    // The cell goes first, so the fileserver stops before its state disk goes; its
    // directory can only be removed once that disk is unmounted.
    let dir = cell.dir.path().to_owned();
    drop(cell);
    drop(state_disk);
    let _ = std::fs::remove_dir_all(dir);
}
