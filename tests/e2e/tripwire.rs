//! The harness's tripwire, provoked for real: a fileserver that cannot open a data file logs
//! ERROR, which fails the test when its cell drops unless the test declared it.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use harness::{TestCell, is_mounted};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const STORAGE_FAILED: &str = "storage operation failed";

/// The one file under `partition/vol.*/data/`.
fn the_data_file(partition: &Path) -> PathBuf {
    let mut found = Vec::new();
    for volume in std::fs::read_dir(partition).unwrap() {
        let data = volume.unwrap().path().join("data");
        if let Ok(files) = std::fs::read_dir(&data) {
            found.extend(files.map(|f| f.unwrap().path()));
        }
    }
    assert_eq!(found.len(), 1, "data files: {found:?}");
    found.remove(0)
}

/// Writes a file too large to live inline, puts a directory where the fileserver keeps
/// its data, and reads it from a fresh mount: the fileserver fails the fetch and logs
/// "storage operation failed" at ERROR.
fn provoke_a_storage_error(cell: &mut TestCell) {
    let a = cell.mount("ws-a", &[]).unwrap();
    std::fs::write(a.join("big"), vec![7u8; 100_000]).unwrap();
    // Stopped, the fileserver holds no open handle on the data file.
    cell.stop("fileserver");
    let data_file = the_data_file(&cell.path_of("partition"));
    std::fs::remove_file(&data_file).unwrap();
    std::fs::create_dir(&data_file).unwrap();
    cell.start_fileserver().unwrap();

    let b = cell.mount("ws-b", &[]).unwrap();
    let err = std::fs::read(b.join("big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

#[test]
fn an_undeclared_error_line_fails_the_test_once_everything_is_stopped() {
    let mut cell = TestCell::start(BIN).unwrap();
    provoke_a_storage_error(&mut cell);
    let pids: Vec<libc::pid_t> = ["ws-b", "ws-a", "fileserver", "vlserver"]
        .iter()
        .map(|name| cell.pid(name).unwrap())
        .collect();
    let mounts = [cell.path_of("ws-a"), cell.path_of("ws-b")];
    let dir = cell.dir.path().to_owned();
    let log = cell.log_path("fileserver");

    let dropped = std::panic::catch_unwind(AssertUnwindSafe(move || drop(cell)));
    let payload = dropped.expect_err("the drop of a cell with an undeclared ERROR line panics");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains(&format!("fileserver ({}):", log.display()))
            && message.contains(STORAGE_FAILED),
        "{message}"
    );
    // Before it panicked, it stopped and unmounted everything, and kept the logs.
    for pid in pids {
        // SAFETY: signal 0 only checks that the PID exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "process {pid} outlived its cell");
    }
    for mountpoint in &mounts {
        assert!(
            !is_mounted(mountpoint),
            "{} is still mounted",
            mountpoint.display()
        );
    }
    assert!(log.exists(), "{} was not kept", log.display());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_declared_error_line_passes() {
    let mut cell = TestCell::start(BIN).unwrap();
    provoke_a_storage_error(&mut cell);
    let unexpected = cell.unexpected_errors();
    assert!(
        unexpected.iter().any(|e| e.process == "fileserver"
            && e.log.as_deref() == Some(cell.log_path("fileserver").as_path())
            && e.line.contains(STORAGE_FAILED)),
        "{unexpected:#?}"
    );

    cell.expect_error_from("fileserver", STORAGE_FAILED);
    assert_eq!(cell.unexpected_errors(), []);
    // Dropped here: no panic.
}
