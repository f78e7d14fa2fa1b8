//! Bad input gets a clear error, never a hang: long names, existing volumes, a missing
//! mount point, and a fileserver that stops answering (and then comes back).

use std::time::{Duration, Instant};

use harness::TestCell;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

#[test]
fn a_256_byte_name_is_enametoolong() {
    let mut cell = TestCell::start(BIN).unwrap();
    let mnt = cell.mount("ws", &[]).unwrap();
    let err = std::fs::write(mnt.join("n".repeat(256)), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENAMETOOLONG), "{err}");
    std::fs::write(mnt.join("n".repeat(255)), b"x").unwrap();
}

#[test]
fn vos_create_of_an_existing_name_fails_with_one_clear_line() {
    let cell = TestCell::start(BIN).unwrap();
    let out = cell.holdfast(&["vos", "create", "root.cell"]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");

    let out = cell.holdfast(&["vos", "create", "bad name!"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad volume name"));
}

#[test]
fn mounting_on_a_missing_directory_fails_clearly() {
    let cell = TestCell::start(BIN).unwrap();
    let missing = cell.dir.path().join("no-such-dir");
    let cache = cell.dir.path().join("cache");
    let out = cell
        .holdfast(&[
            "mount",
            "--cache",
            &cache.to_string_lossy(),
            &missing.to_string_lossy(),
        ])
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn a_stopped_fileserver_times_out_and_the_mount_recovers() {
    let mut cell = TestCell::start(BIN).unwrap();
    let mnt = cell.mount("ws", &[]).unwrap();
    std::fs::write(mnt.join("before"), b"ok").unwrap();

    cell.signal("fileserver", libc::SIGSTOP).unwrap();
    let started = Instant::now();
    // A new file needs the server: it must fail after the 2 s timeout, not hang. A
    // small one is created with its bytes at its close, so the close fails (which
    // `std::fs::write` would not tell).
    let result = std::fs::File::create(mnt.join("during")).and_then(|mut file| {
        std::io::Write::write_all(&mut file, b"x")?;
        harness::crash::close(file)
    });
    let elapsed = started.elapsed();
    cell.signal("fileserver", libc::SIGCONT).unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(err.raw_os_error(), Some(libc::EIO) | Some(libc::ETIMEDOUT)),
        "{err}"
    );
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert!(
        cell.log("ws").contains("did not answer"),
        "{}",
        cell.log("ws")
    );

    // Back: the mount works again by itself.
    std::fs::write(mnt.join("after"), b"fine").unwrap();
    assert_eq!(std::fs::read(mnt.join("after")).unwrap(), b"fine");
}
