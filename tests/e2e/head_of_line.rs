//! Nobody waits behind somebody else's dead server; blocking lock waits hold no thread,
//! any number wait at once, and a signal ends one (`EINTR`), withdrawing it on the server.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use harness::stalls::blocked_in_flock;
use harness::{TestCell, flock, flock_n_succeeds, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// The reader mount's RPC timeout.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Parallel uncached reads: eight times the four FUSE threads a mount used to have.
const READERS: usize = 32;
/// Room for a busy machine, and for the short try a call to a server marked silent
/// still gets. A `read(2)` of an uncached page sends the kernel's readahead and then the
/// page again, one after the other: the first waits out the timeout and marks the server
/// silent, the second fails at once. Under `RPC_TIMEOUT + MARGIN` (3 s) there is no room
/// for two deadlines (4 s), let alone queueing behind each other's on four threads
/// (`2 * READERS / 4` deadlines: 32 s), the behaviour this test rules out.
const MARGIN: Duration = Duration::from_secs(1);
/// Hang guard for waits on blocked processes.
const LIMIT: Duration = Duration::from_secs(20);

fn this_tid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn this_pid() -> libc::pid_t {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

#[test]
fn parallel_reads_of_a_stopped_server_each_fail_at_their_own_deadlines() {
    let mut cell = TestCell::start(BIN).unwrap();
    let writer = cell.mount("ws-w", &[]).unwrap();
    let reader = cell.mount_with_timeout("ws-r", RPC_TIMEOUT, &[]).unwrap();
    for i in 0..READERS {
        std::fs::write(writer.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    std::fs::write(writer.join("cached"), b"cached bytes\n").unwrap();

    // The reader holds the listing, every status, and the data of `cached` only, under
    // callbacks.
    let names: Vec<String> = std::fs::read_dir(&reader)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), READERS + 1, "{names:?}");
    for i in 0..READERS {
        std::fs::metadata(reader.join(format!("f{i}"))).unwrap();
    }
    assert_eq!(
        std::fs::read(reader.join("cached")).unwrap(),
        b"cached bytes\n"
    );

    cell.signal("fileserver", libc::SIGSTOP).unwrap();
    let start = Arc::new(Barrier::new(READERS + 1));
    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            let (path, start) = (reader.join(format!("f{i}")), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let began = Instant::now();
                let outcome = std::fs::read(&path);
                (outcome, began.elapsed())
            })
        })
        .collect();
    start.wait();
    // While every reader waits for the stopped server, cached data still answers.
    assert_eq!(
        std::fs::read(reader.join("cached")).unwrap(),
        b"cached bytes\n"
    );
    let finished: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let worst = finished.iter().map(|(_, took)| *took).max().unwrap();
    for (i, (outcome, took)) in finished.iter().enumerate() {
        assert!(
            outcome.is_err(),
            "f{i} was read from a stopped server: {outcome:?}"
        );
        assert!(
            *took <= RPC_TIMEOUT + MARGIN,
            "f{i} failed after {took:?}, not within its own deadline of {RPC_TIMEOUT:?} \
             (worst of {READERS}: {worst:?})"
        );
    }

    // The server the reads gave up on is the one `checkservers` lists down.
    let down = cell.checkservers(&reader).unwrap();
    assert!(down.contains("is down"), "{down}");
    assert!(!down.contains("All servers are running."), "{down}");

    // Back: every file reads as written, through a new connection, and the server is
    // listed up again.
    cell.signal("fileserver", libc::SIGCONT).unwrap();
    for i in 0..READERS {
        let path = reader.join(format!("f{i}"));
        assert!(
            wait_until(LIMIT, || std::fs::read(&path).is_ok()),
            "f{i} unreadable after SIGCONT"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("file {i}\n")
        );
    }
    let up = cell.checkservers(&reader).unwrap();
    assert!(up.contains("All servers are running."), "{up}");
}

#[test]
fn many_blocking_flock_waiters_on_one_mount_are_granted_in_turn() {
    const WAITERS: usize = 8;
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::write(a.join("queue"), b"").unwrap();
    let held = std::fs::File::open(a.join("queue")).unwrap();
    flock(&held, libc::LOCK_EX).unwrap();

    let holding = Arc::new(AtomicBool::new(false));
    let granted = Arc::new(AtomicUsize::new(0));
    let (tids, waiting) = mpsc::channel();
    let (outcomes, done) = mpsc::channel();
    for _ in 0..WAITERS {
        let path = b.join("queue");
        let (holding, granted) = (holding.clone(), granted.clone());
        let (tids, outcomes) = (tids.clone(), outcomes.clone());
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            tids.send(this_tid()).unwrap();
            let outcome = flock(&file, libc::LOCK_EX).and_then(|()| {
                let alone = !holding.swap(true, Ordering::SeqCst);
                granted.fetch_add(1, Ordering::SeqCst);
                holding.store(false, Ordering::SeqCst);
                flock(&file, libc::LOCK_UN).map(|()| alone)
            });
            let _ = outcomes.send(outcome);
        });
    }
    let tids: Vec<libc::pid_t> = waiting.iter().take(WAITERS).collect();
    // All of them wait at once, each in its own flock(2): none was refused.
    assert!(
        wait_until(LIMIT, || tids
            .iter()
            .all(|&tid| blocked_in_flock(this_pid(), tid))),
        "not all {WAITERS} waiters blocked in flock"
    );
    assert_eq!(granted.load(Ordering::SeqCst), 0);

    drop(held);
    for _ in 0..WAITERS {
        let alone = done
            .recv_timeout(LIMIT)
            .expect("a waiter was never granted the lock")
            .unwrap();
        assert!(alone, "two owners held one exclusive flock at once");
    }
    assert_eq!(granted.load(Ordering::SeqCst), WAITERS);
    assert!(flock_n_succeeds(&a.join("queue")));
}

/// Set by the test's SIGUSR1 handler.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Handles SIGUSR1 in this process, without `SA_RESTART`.
fn handle_sigusr1() {
    // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigusr1 as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
}

#[test]
fn a_signal_ends_a_blocked_flock_with_eintr_and_withdraws_its_wait() {
    handle_sigusr1();
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::write(a.join("held"), b"").unwrap();
    let held = std::fs::File::open(a.join("held")).unwrap();
    flock(&held, libc::LOCK_EX).unwrap();

    // A thread of this process blocks in flock on B, and is sent a handled signal.
    let (tid_tx, tid_rx) = mpsc::channel();
    let (outcome_tx, outcome_rx) = mpsc::channel();
    let path = b.join("held");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        tid_tx.send(this_tid()).unwrap();
        let _ = outcome_tx.send(flock(&file, libc::LOCK_EX));
    });
    let tid = tid_rx.recv().unwrap();
    assert!(wait_until(LIMIT, || blocked_in_flock(this_pid(), tid)));
    // SAFETY: signalling a thread of this process, whose handler is installed.
    let sent = unsafe { libc::syscall(libc::SYS_tgkill, this_pid(), tid, libc::SIGUSR1) };
    assert_eq!(sent, 0);
    // Bounded: a wait the signal cannot end would otherwise hang the test (the cell's
    // unmount on drop then ends it).
    let outcome = outcome_rx
        .recv_timeout(LIMIT)
        .expect("the signal did not end the blocked flock");
    assert_eq!(
        outcome.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::EINTR)),
        "{outcome:?}"
    );
    assert!(SIGNALLED.load(Ordering::SeqCst));

    // Its wait is gone from the server: once A lets go, the lock is free at once.
    flock(&held, libc::LOCK_UN).unwrap();
    assert!(
        flock_n_succeeds(&a.join("held")),
        "the interrupted waiter's request was granted after all"
    );

    // A process killed while it waits leaves nothing behind either.
    flock(&held, libc::LOCK_EX).unwrap();
    let mut child = KilledOnDrop(blocked_flock_tool(&b.join("held")));
    let pid = child.0.id() as libc::pid_t;
    assert!(wait_until(LIMIT, || blocked_in_flock(pid, pid)));
    child.0.kill().unwrap();
    // It dies while A still holds the lock: its wait did not pin it in the kernel.
    assert!(
        wait_until(LIMIT, || child.0.try_wait().unwrap().is_some()),
        "a killed flock waiter did not die while the lock was held"
    );
    flock(&held, libc::LOCK_UN).unwrap();
    assert!(
        flock_n_succeeds(&a.join("held")),
        "the killed waiter's request was granted after all"
    );
}

/// A child process, killed by its PID and reaped when the test ends, also on failure.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        // Not `wait`: a child stuck in the mount dies only once the cell unmounts it.
        wait_until(LIMIT, || self.0.try_wait().ok().flatten().is_some());
    }
}

/// `flock PATH sleep 600`, blocked behind a held lock: what a user's script would run.
fn blocked_flock_tool(path: &Path) -> std::process::Child {
    Command::new("flock")
        .arg(PathBuf::from(path))
        .args(["sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_stopped_server_slows_no_other_volume() {
    // Long enough that reads of the other volume finish well inside it.
    const STALL_TIMEOUT: Duration = Duration::from_secs(5);
    const FILES: usize = 8;
    let mut cell = TestCell::start(BIN).unwrap();
    let other = cell.start_other_fileserver("fileserver-2").unwrap();
    // The second fileserver registers with the VLDB in the background.
    assert!(wait_until(LIMIT, || cell
        .holdfast(&["vos", "create", "other.vol", "--server", &other])
        .unwrap()
        .status
        .success()));
    let writer = cell.mount("ws-w", &[]).unwrap();
    let reader = cell.mount_with_timeout("ws-r", STALL_TIMEOUT, &[]).unwrap();
    let made = cell
        .holdfast(&[
            "fs",
            "mkmount",
            &writer.join("other").to_string_lossy(),
            "other.vol",
        ])
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    for i in 0..FILES {
        std::fs::write(writer.join(format!("f{i}")), format!("root {i}\n")).unwrap();
        std::fs::write(writer.join(format!("other/g{i}")), format!("other {i}\n")).unwrap();
    }
    // The reader knows every file's status, in both volumes, and no file's data.
    for i in 0..FILES {
        std::fs::metadata(reader.join(format!("f{i}"))).unwrap();
        std::fs::metadata(reader.join(format!("other/g{i}"))).unwrap();
    }

    cell.signal("fileserver", libc::SIGSTOP).unwrap();
    let stalled_done = Arc::new(AtomicUsize::new(0));
    let (tids, blocked) = mpsc::channel();
    for i in 0..FILES {
        let path = reader.join(format!("f{i}"));
        let (tids, done) = (tids.clone(), stalled_done.clone());
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path);
            tids.send(this_tid()).unwrap();
            let _ = file.and_then(|mut f| {
                use std::io::Read;
                f.read_to_end(&mut Vec::new())
            });
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    let tids: Vec<libc::pid_t> = blocked.iter().take(FILES).collect();
    assert!(wait_until(LIMIT, || tids.iter().all(
        |&tid| harness::stalls::blocked_in_syscall(this_pid(), tid) == Some(libc::SYS_read)
    )));
    // Uncached reads of the other volume's server answer while every read of the
    // stopped one still waits.
    for i in 0..FILES {
        assert_eq!(
            std::fs::read_to_string(reader.join(format!("other/g{i}"))).unwrap(),
            format!("other {i}\n")
        );
    }
    assert_eq!(
        stalled_done.load(Ordering::SeqCst),
        0,
        "the other volume's reads waited for the stopped server's timeouts"
    );
    cell.signal("fileserver", libc::SIGCONT).unwrap();
    assert!(wait_until(LIMIT, || stalled_done.load(Ordering::SeqCst) == FILES));
}
