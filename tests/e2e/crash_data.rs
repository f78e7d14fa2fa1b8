//! A fileserver killed with `kill -9` in the middle of a workload through a mount, and
//! started again on its partition, keeps everything the workload was told was stored: a
//! `tar x` of a source tree, a program writing small files and closing each, and a log
//! appended with an `fsync` after each record. Read back through a mount that never saw
//! the writes, every acknowledged file and byte is there, and nothing is invented.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use harness::crash::{
    AppendAcks, TreeAcks, append_acknowledged, await_progress, check_append_log, check_tree,
    kill_9_and_restart, source_tree, write_tree, write_tree_acknowledged,
};
use harness::{TestCell, sh, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// Files in a tree: a few thousand, as a small source tree.
const TREE_FILES: usize = 2000;
/// Files written before the kill.
const FILES_BEFORE_KILL: usize = 400;
/// How long `tar` may take in all (a hang guard).
const TAR_LIMIT: Duration = Duration::from_secs(600);

/// Lines of `path` (a file another process appends to), 0 while it cannot be read.
fn lines_in(path: &Path) -> usize {
    std::fs::File::open(path).map_or(0, |f| BufReader::new(f).lines().count())
}

/// The archive members `tar` named in an error line (`tar: PATH: Cannot ...`), without
/// a leading `./`.
fn tar_errors(stderr: &str) -> BTreeSet<PathBuf> {
    stderr
        .lines()
        .filter_map(|line| line.strip_prefix("tar: "))
        .filter_map(|rest| rest.split_once(": ").map(|(path, _)| path))
        .map(|path| PathBuf::from(path.strip_prefix("./").unwrap_or(path)))
        .collect()
}

#[test]
fn tar_x_killed_by_kill_9_keeps_every_file_it_wrote_and_closed() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let tree = source_tree(TREE_FILES, 12);
    let source = cell.path_of("source");
    write_tree(&source, &tree).unwrap();
    let archive = cell.path_of("tree.tar");
    sh(
        cell.dir.path(),
        &format!("tar cf {} -C {} .", archive.display(), source.display()),
    )
    .unwrap();
    let dest = a.join("dest");
    std::fs::create_dir(&dest).unwrap();

    // `tar xv` names each member as it begins it; its errors name the member too.
    let (listed, errors) = (cell.path_of("tar.out"), cell.path_of("tar.err"));
    let mut tar = Command::new("tar")
        .arg("xvf")
        .arg(&archive)
        .arg("-C")
        .arg(&dest)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&listed).unwrap())
        .stderr(std::fs::File::create(&errors).unwrap())
        .spawn()
        .unwrap();
    let began = wait_until(TAR_LIMIT, || lines_in(&listed) >= FILES_BEFORE_KILL);
    let killed = began.then(|| kill_9_and_restart(&mut cell));
    let mut status = None;
    wait_until(TAR_LIMIT, || {
        status = tar.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = tar.kill();
        let _ = tar.wait();
        panic!("tar did not finish within {TAR_LIMIT:?}");
    }
    assert!(began, "tar did not get {FILES_BEFORE_KILL} files far");
    killed.unwrap().unwrap();

    // Acknowledged: every member tar began (listed) and named in no error, nor any of
    // its directories.
    let errors = tar_errors(&std::fs::read_to_string(&errors).unwrap());
    let begun: BTreeSet<PathBuf> = std::fs::read_to_string(&listed)
        .unwrap()
        .lines()
        .map(|l| PathBuf::from(l.strip_prefix("./").unwrap_or(l)))
        .collect();
    let acknowledged: BTreeSet<PathBuf> = tree
        .keys()
        .filter(|path| begun.contains(*path))
        .filter(|path| !path.ancestors().any(|p| errors.contains(p)))
        .cloned()
        .collect();
    eprintln!(
        "tar ({status:?}) began {} members, named {} in errors; {} files acknowledged",
        begun.len(),
        errors.len(),
        acknowledged.len()
    );
    assert!(
        acknowledged.len() >= FILES_BEFORE_KILL / 2,
        "too few files acknowledged to tell anything: {}",
        acknowledged.len()
    );

    // The server's files, through a mount that never saw them. A member tar named in an
    // error may be there empty: its create and its store are two requests.
    let b = cell.mount("ws-b", &[]).unwrap();
    let found = check_tree(&b.join("dest"), &tree, &acknowledged, true).unwrap();
    assert!(found >= acknowledged.len());
}

#[test]
fn small_files_closed_before_a_kill_9_are_all_there_with_their_bytes() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let tree = Arc::new(source_tree(TREE_FILES, 34));
    let acks = Arc::new(TreeAcks::default());
    let writer = {
        let (root, tree, acks) = (a.join("tree"), tree.clone(), acks.clone());
        std::thread::spawn(move || write_tree_acknowledged(&root, &tree, &acks))
    };
    let progressed = await_progress(&acks.tried, FILES_BEFORE_KILL);
    let acked_before_kill = acks.closed.lock().unwrap().len();
    let killed = progressed
        .as_ref()
        .ok()
        .map(|_| kill_9_and_restart(&mut cell));
    writer.join().unwrap();
    progressed.unwrap();
    killed.unwrap().unwrap();
    let acknowledged = acks.closed.lock().unwrap().clone();
    eprintln!(
        "{acked_before_kill} files closed before the kill, {} in all",
        acknowledged.len()
    );
    assert!(acked_before_kill >= FILES_BEFORE_KILL / 2);

    // A small file is created with its bytes in one request at its close: whatever is
    // on the server holds exactly what was written, never a part or nothing.
    let b = cell.mount("ws-b", &[]).unwrap();
    let found = check_tree(&b.join("tree"), &tree, &acknowledged, false).unwrap();
    assert!(found >= acknowledged.len());
}

#[test]
fn fsynced_appends_survive_a_kill_9_to_the_last_acknowledged_byte() {
    const RECORDS: usize = 800;
    const RECORD_BYTES: usize = 200;
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let acks = Arc::new(AppendAcks::default());
    let appender = {
        let (path, acks) = (a.join("app.log"), acks.clone());
        std::thread::spawn(move || append_acknowledged(&path, RECORDS, RECORD_BYTES, &acks))
    };
    let progressed = await_progress(&acks.appended, 150);
    let synced_before_kill = acks.synced_bytes.load(Ordering::SeqCst);
    let killed = progressed
        .as_ref()
        .ok()
        .map(|_| kill_9_and_restart(&mut cell));
    appender.join().unwrap();
    progressed.unwrap();
    killed.unwrap().unwrap();
    let synced = acks.synced_bytes.load(Ordering::SeqCst);
    eprintln!("{synced_before_kill} bytes synced before the kill, {synced} in all");
    assert!(synced_before_kill >= 150 * RECORD_BYTES);
    assert_eq!(
        synced,
        RECORDS * RECORD_BYTES,
        "the appender's fsyncs succeed again once the server is back"
    );

    let b = cell.mount("ws-b", &[]).unwrap();
    let bytes = std::fs::read(b.join("app.log")).unwrap();
    check_append_log(&bytes, synced, RECORD_BYTES).unwrap();
}
