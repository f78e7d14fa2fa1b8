//! Two workstations (mounts with separate caches) stay coherent through callbacks: what
//! one closes, the other sees on its next open, learned from a callback break and not
//! by polling.

use std::time::Duration;

use harness::{TestCell, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn examine(cell: &TestCell, path: &std::path::Path) -> String {
    let out = cell
        .holdfast(&["fs", "examine", &path.to_string_lossy()])
        .unwrap();
    assert!(
        out.status.success(),
        "fs examine failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn close_on_one_mount_is_seen_on_the_next_open_of_the_other() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();

    std::fs::write(a.join("note.txt"), b"first version\n").unwrap();
    assert_eq!(
        std::fs::read(b.join("note.txt")).unwrap(),
        b"first version\n"
    );

    // B holds a callback on the file it just read.
    let before = examine(&cell, &b.join("note.txt"));
    assert!(before.contains("callback held"), "{before}");

    std::fs::write(a.join("note.txt"), b"second, longer version\n").unwrap();
    // A's close returned only after B acknowledged the break: no waiting needed.
    let after = examine(&cell, &b.join("note.txt"));
    assert!(after.contains("no callback"), "{after}");
    assert_eq!(
        std::fs::read(b.join("note.txt")).unwrap(),
        b"second, longer version\n"
    );

    // New entries made on A appear in B's cached directory listing too.
    std::fs::create_dir(a.join("docs")).unwrap();
    std::fs::write(a.join("docs/readme"), b"hello").unwrap();
    assert_eq!(std::fs::read(b.join("docs/readme")).unwrap(), b"hello");
    std::fs::remove_file(a.join("docs/readme")).unwrap();
    assert!(!b.join("docs/readme").exists());
}

#[test]
fn a_cached_file_is_served_with_the_fileserver_stopped() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::write(a.join("cached.txt"), b"served from cache\n").unwrap();
    assert_eq!(
        std::fs::read(b.join("cached.txt")).unwrap(),
        b"served from cache\n"
    );

    // With the fileserver frozen, B can still stat, list and read what it holds a
    // callback on: no network is touched while the promise holds.
    cell.signal("fileserver", libc::SIGSTOP).unwrap();
    let result = std::panic::catch_unwind(|| {
        assert_eq!(
            std::fs::read(b.join("cached.txt")).unwrap(),
            b"served from cache\n"
        );
        assert_eq!(std::fs::metadata(b.join("cached.txt")).unwrap().len(), 18);
        let names: Vec<String> = std::fs::read_dir(&b)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"cached.txt".to_owned()), "{names:?}");
    });
    cell.signal("fileserver", libc::SIGCONT).unwrap();
    result.unwrap();

    // And the mount keeps working once the server runs again.
    std::fs::write(a.join("cached.txt"), b"changed\n").unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read(b.join("cached.txt")).ok().as_deref() == Some(b"changed\n")
    }));
}
