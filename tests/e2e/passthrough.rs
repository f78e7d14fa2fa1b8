//! A file changed on another workstation is never served stale, whether this workstation
//! reads it through the mount or the kernel reads its version file itself (passthrough):
//! the same bodies run with `--passthrough auto`, `--passthrough off`, and auto in a mount
//! without the capability the kernel wants (which falls back); the mount's own counters
//! show passthrough opens were made, or none.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use harness::TestCell;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// Over two chunks (1 MiB each), so a file spans several slots of its version file.
const FILE_BYTES: usize = (5 << 20) / 2;

fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

fn read_at(file: &File, offset: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset as u64).unwrap();
    buf
}

/// A cell with a writer (A) and a reader (B), B mounted with `--passthrough MODE`.
fn start(mode: &str) -> (TestCell, PathBuf, PathBuf) {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &["--passthrough", mode]).unwrap();
    (cell, a, b)
}

/// B reads `path` whole, twice: the first read caches it, the second may be a
/// passthrough open of what the first cached.
fn read_twice(path: &Path, expected: &[u8]) {
    for _ in 0..2 {
        assert!(
            std::fs::read(path).unwrap() == expected,
            "B reads what A wrote"
        );
    }
}

/// A break arrives while B holds the file open and reads it: that handle reads the old
/// or the new bytes (never anything else), and once B opens the file anew, the new open
/// and the old handle both read the new version.
fn break_during_an_open_read(a: &Path, b: &Path) {
    let (v1, v2) = (content(1, FILE_BYTES), content(2, FILE_BYTES));
    std::fs::write(a.join("data.bin"), &v1).unwrap();
    read_twice(&b.join("data.bin"), &v1);

    let held = File::open(b.join("data.bin")).unwrap();
    let first = 1 << 20;
    assert!(read_at(&held, 0, first) == v1[..first], "the open reads v1");

    // A's close returns once B acknowledged the break.
    std::fs::write(a.join("data.bin"), &v2).unwrap();
    let piece = (first, 64 << 10);
    let during = read_at(&held, piece.0, piece.1);
    let range = piece.0..piece.0 + piece.1;
    assert!(
        during == v1[range.clone()] || during == v2[range],
        "an open handle reads one version or the other, never other bytes"
    );

    let fresh = File::open(b.join("data.bin")).unwrap();
    assert!(
        read_at(&fresh, 0, FILE_BYTES) == v2,
        "a new open after the break reads the new version"
    );
    let rest = 2 << 20;
    assert!(
        read_at(&held, rest, FILE_BYTES - rest) == v2[rest..],
        "after the new open the old handle reads the new version too"
    );
    drop((held, fresh));
    read_twice(&b.join("data.bin"), &v2);
}

/// B cached the file (and read it through passthrough where on); A changes it, shorter;
/// B's next open reads exactly the new bytes.
fn new_open_after_a_break(a: &Path, b: &Path) {
    let v1 = content(3, FILE_BYTES);
    std::fs::write(a.join("notes.bin"), &v1).unwrap();
    read_twice(&b.join("notes.bin"), &v1);

    let v2 = content(4, FILE_BYTES / 3);
    std::fs::write(a.join("notes.bin"), &v2).unwrap();
    assert!(
        std::fs::read(b.join("notes.bin")).unwrap() == v2,
        "a new open after the break reads the new version, at its new length"
    );
    // Several changes in a row, each read at once on B.
    for seed in 5..8 {
        let next = content(seed, FILE_BYTES / 2 + usize::from(seed) * 4096);
        std::fs::write(a.join("notes.bin"), &next).unwrap();
        read_twice(&b.join("notes.bin"), &next);
    }
}

/// B's own writes: a write open waits out B's passthrough readers, and every later open
/// reads what B wrote.
fn own_writes_after_passthrough_reads(a: &Path, b: &Path) {
    let v1 = content(9, FILE_BYTES);
    std::fs::write(a.join("own.bin"), &v1).unwrap();
    read_twice(&b.join("own.bin"), &v1);
    let v2 = content(10, FILE_BYTES / 2);
    std::fs::write(b.join("own.bin"), &v2).unwrap();
    read_twice(&b.join("own.bin"), &v2);
    assert!(
        std::fs::read(a.join("own.bin")).unwrap() == v2,
        "A sees B's close"
    );
}

/// How many passthrough opens the mount at `mount` made, as `holdfast fs counters`
/// shows them.
fn passthrough_opens(cell: &TestCell, mount: &Path) -> u64 {
    let output = cell
        .holdfast(&["fs", "counters", &mount.to_string_lossy()])
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "fs counters: {output:?}");
    text.lines()
        .find_map(|line| line.strip_prefix("passthrough_opens"))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no passthrough_opens in\n{text}"))
}

fn run_all(mode: &str) -> u64 {
    let (cell, a, b) = start(mode);
    break_during_an_open_read(&a, &b);
    new_open_after_a_break(&a, &b);
    own_writes_after_passthrough_reads(&a, &b);
    passthrough_opens(&cell, &b)
}

#[test]
fn passthrough_auto_never_serves_stale_bytes() {
    let opens = run_all("auto");
    assert!(
        opens > 0,
        "passthrough never engaged on this kernel ({opens} opens)"
    );
}

/// The data path's counter `name` of the mount at `mountpoint` (as its own mount
/// namespace sees it), the mount being process `pid`'s, from `holdfast fs counters` run
/// inside that namespace.
fn counter_in_namespace(cell: &TestCell, pid: libc::pid_t, mountpoint: &Path, name: &str) -> u64 {
    let mut command = std::process::Command::new("nsenter");
    command
        .args([
            "--target",
            &pid.to_string(),
            "--mount",
            "--",
            BIN,
            "fs",
            "counters",
        ])
        .arg(mountpoint)
        .env("HOLDFAST_CELL", &cell.cell_file);
    let output = harness::run_bounded(command, std::time::Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "fs counters: {output:?}");
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// A mount whose process lacks CAP_SYS_ADMIN where the kernel checks it (here: root only
/// in a user namespace of its own) asks for passthrough, is refused its first backing
/// file, says so once, and serves everything through the mount, never stale.
#[test]
fn a_mount_without_the_capability_falls_back_and_never_serves_stale_bytes() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let (b, pid) = cell
        .mount_without_host_capability("ws-b", &["--passthrough", "auto", "--access", "owner"])
        .unwrap();
    break_during_an_open_read(&a, &b);
    new_open_after_a_break(&a, &b);
    own_writes_after_passthrough_reads(&a, &b);

    let mountpoint = Path::new("/").join(b.strip_prefix(format!("/proc/{pid}/root")).unwrap());
    assert_eq!(
        counter_in_namespace(&cell, pid, &mountpoint, "passthrough_opens"),
        0,
        "no passthrough open without the capability"
    );
    assert!(
        counter_in_namespace(&cell, pid, &mountpoint, "passthrough_fallbacks") > 0,
        "the refused backing file is counted as a fallback"
    );
    let log = cell.log("ws-b");
    assert_eq!(
        log.matches("passthrough off for this mount").count(),
        1,
        "one line says passthrough is off:\n{log}"
    );
}

#[test]
fn passthrough_off_never_serves_stale_bytes() {
    let opens = run_all("off");
    assert_eq!(opens, 0, "--passthrough off makes no passthrough open");
}
