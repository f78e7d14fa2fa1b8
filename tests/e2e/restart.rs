//! A fileserver killed with `kill -9` and started again keeps its clients' caches warm:
//! cached files are not fetched again, and a file changed meanwhile is never served stale.

use std::time::Duration;

use harness::{TestCell, wait_until};

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
