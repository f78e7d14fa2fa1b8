//! Mutual TLS between real processes: `holdfast cell issue` gives a new host credentials
//! that a mount uses; a host with another cell's CA is refused at the handshake by the
//! VLDB and the fileserver (one WARN line per address per minute, a clear error for the
//! tool, never a hang) while the cell's own hosts carry on; `cell init` never overwrites.

use std::path::Path;
use std::time::{Duration, Instant};

use harness::TestCell;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// What a server logs about a peer refused at the handshake.
const REFUSED: &str = "refused a connection at the TLS handshake";

/// A cell file for another host of the same cell, naming its own credentials directory.
fn cell_file_for(cell: &TestCell, name: &str, credentials: &Path) -> std::path::PathBuf {
    let vlservers = std::fs::read_to_string(&cell.cell_file)
        .unwrap()
        .lines()
        .find(|line| line.starts_with("vlservers"))
        .unwrap()
        .to_owned();
    let path = cell.dir.path().join(format!("{name}.toml"));
    let text = format!(
        "name = \"e2e.test\"\n{vlservers}\ncredentials = {:?}\n",
        credentials.display().to_string()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_new_host_issued_a_certificate_mounts_the_cell() {
    let mut cell = TestCell::start(BIN).unwrap();
    let issued = cell.dir.path().join("ws2-credentials");
    let out = cell
        .holdfast(&[
            "cell",
            "issue",
            "--kind",
            "host",
            "--name",
            "ws2",
            "--out",
            &issued.to_string_lossy(),
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in ["ca.pem", "host.pem", "host.key"] {
        assert!(issued.join(file).exists(), "{file} missing");
    }
    assert!(!issued.join("ca.key").exists());
    let ws2 = cell_file_for(&cell, "ws2", &issued);

    let first = cell.mount("m1", &[]).unwrap();
    std::fs::write(first.join("from-m1"), b"written on the first host\n").unwrap();
    let second = cell
        .mount_with_cell_file("m2", &ws2, Duration::from_secs(2), &[])
        .unwrap();
    assert_eq!(
        std::fs::read(second.join("from-m1")).unwrap(),
        b"written on the first host\n"
    );
}

#[test]
fn a_host_of_another_cells_ca_is_refused_at_the_handshake_and_logged_once() {
    let mut cell = TestCell::start(BIN).unwrap();
    let mounted = cell.mount("m1", &[]).unwrap();
    // Another CA, with a cell file that names this cell's VLDB.
    let other = cell.dir.path().join("other");
    let vl_address = cell.vl_address.clone();
    let out = cell
        .holdfast(&[
            "cell",
            "init",
            "--dir",
            &other.to_string_lossy(),
            "--name",
            "e2e.test",
            "--vlservers",
            &vl_address,
        ])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stranger = other.join("cell.toml").to_string_lossy().into_owned();

    for _ in 0..3 {
        let started = Instant::now();
        let out = cell
            .holdfast(&["--cell", &stranger, "vos", "listvldb", "--timeout", "3"])
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        // The stranger finds the server's certificate is not of its CA, and says so.
        assert!(stderr.contains("TLS"), "{stderr}");
        assert!(stderr.contains("did not issue"), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(20), "{stderr}");
    }
    let refusals: Vec<String> = cell
        .log("vlserver")
        .lines()
        .filter(|line| line.contains(" WARN ") && line.contains(REFUSED))
        .map(str::to_owned)
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].contains("peer=127.0.0.1:"), "{refusals:?}");

    // The cell's own hosts carry on meanwhile.
    std::fs::write(mounted.join("after"), b"still served\n").unwrap();
    let out = cell.holdfast(&["vos", "listvldb"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same stranger asking the fileserver directly: refused there too.
    let fs_address = cell.fs_address.clone();
    let out = cell
        .holdfast(&[
            "--cell",
            &stranger,
            "vos",
            "listvol",
            "--server",
            &fs_address,
            "--timeout",
            "3",
        ])
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn cell_init_never_overwrites_a_cell() {
    let cell = TestCell::start(BIN).unwrap();
    let dir = cell.dir.path().join("fresh");
    let dir_arg = dir.to_string_lossy().into_owned();
    let init = || {
        cell.holdfast(&[
            "cell",
            "init",
            "--dir",
            &dir_arg,
            "--name",
            "fresh.test",
            "--vlservers",
            "127.0.0.1:7003",
        ])
        .unwrap()
    };
    let out = init();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ca = std::fs::read(dir.join("credentials/ca.pem")).unwrap();
    let out = init();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("exists already"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    // Without the cell file, the CA itself is refused.
    std::fs::remove_file(dir.join("cell.toml")).unwrap();
    let out = init();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ca.pem exists already"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.join("credentials/ca.pem")).unwrap(), ca);
}
