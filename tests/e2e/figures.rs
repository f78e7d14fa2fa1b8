//! Where time goes, as an admin and a user see it: `holdfast vos counters` shows the
//! fileserver's latency by request kind and the log's slots, `holdfast fs counters` a
//! mount's latency by FUSE operation and its data path's counters, `fs examine` a line
//! of those counters; and `holdfast bench --suite mount` prints every goal of the data
//! path with its baseline, run small.

use std::process::Command;
use std::time::Duration;

use harness::{TestCell, run_bounded};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// `holdfast ARGS` for `cell`, which must succeed; its standard output.
fn holdfast(cell: &TestCell, args: &[&str]) -> String {
    let out = cell.holdfast(args).unwrap();
    assert!(
        out.status.success(),
        "holdfast {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The count column of histogram row `name` (a name of one or more words), if shown.
fn histogram_count(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The value of counter `name` on its `name value` line.
fn counter(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == name).then_some(())?;
        words.next()?.parse().ok()
    })
}

#[test]
fn vos_counters_and_fs_counters_show_where_time_goes() {
    let mut cell = TestCell::start(BIN).unwrap();
    let mnt = cell.mount("ws", &[]).unwrap();
    let files = 5;
    for i in 0..files {
        std::fs::write(mnt.join(format!("f{i}")), vec![b'x'; 10_000]).unwrap();
    }
    for i in 0..files {
        assert_eq!(
            std::fs::read(mnt.join(format!("f{i}"))).unwrap().len(),
            10_000
        );
    }

    // The fileserver: one latency row per request kind it answered, the counters as
    // before.
    let server = holdfast(&cell, &["vos", "counters"]);
    // A small file written and closed is made by one `CreateWithData`.
    let creates = histogram_count(&server, "request Create ").unwrap_or(0)
        + histogram_count(&server, "request CreateWithData ").unwrap_or(0);
    assert!(creates >= files, "{creates} creates counted\n{server}");
    assert!(
        histogram_count(&server, "request FetchStatus ").is_some_and(|n| n >= 1),
        "{server}"
    );
    assert!(counter(&server, "fetch_data_calls").is_some(), "{server}");
    assert!(server.contains("p99"), "{server}");

    // The mount: one latency row per FUSE operation, and the data path's counters.
    let mount_text = holdfast(&cell, &["fs", "counters", &mnt.to_string_lossy()]);
    for name in [
        "cache_hits",
        "cache_misses",
        "passthrough_opens",
        "passthrough_fallbacks",
    ] {
        assert!(counter(&mount_text, name).is_some(), "{name}\n{mount_text}");
    }
    let fuse_creates = histogram_count(&mount_text, "fuse create ")
        .unwrap_or_else(|| panic!("no fuse create row in\n{mount_text}"));
    assert!(fuse_creates >= files, "{mount_text}");
    let reads = histogram_count(&mount_text, "fuse read ").unwrap_or(0);
    let opens = histogram_count(&mount_text, "fuse open ").unwrap_or(0);
    assert!(reads + opens >= 1, "{mount_text}");

    // `fs examine` ends with the mount's counters.
    let examined = holdfast(&cell, &["fs", "examine", &mnt.join("f0").to_string_lossy()]);
    assert!(examined.contains("Mount: cache_hits "), "{examined}");

    // A path outside any mount is one clear line.
    let out = cell.holdfast(&["fs", "counters", "/"]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn bench_mount_prints_every_goal_with_its_baseline_and_target() {
    harness::require_fuse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(BIN);
    command.args([
        "bench",
        "--suite",
        "mount",
        "--size-mib",
        "4",
        "--files",
        "40",
        "--tree-files",
        "60",
        "--dir",
        &dir.path().to_string_lossy(),
    ]);
    let out = run_bounded(command, Duration::from_secs(600)).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Each goal: its row with a ratio to the baseline measured in this run, and the
    // issue's target ("-" where it gives none).
    for (row, target) in [
        ("cached re-read / local page-cached read", ">= 0.95"),
        ("cold read / loopback TCP", ">= 0.5"),
        ("write+close / local write+fdatasync", ">= 0.8"),
        ("4 KiB creates, 1 thread / local", ">= 1.0"),
        ("4 KiB creates, 8 threads / 1 thread", ">= 4"),
        ("tar x of 60 files / local", "-"),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?} in\n{stdout}"));
        let ratio: f64 = line[row.len()..]
            .split_whitespace()
            .rev()
            .nth(target.split_whitespace().count())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no ratio in {line:?}"));
        assert!(ratio.is_finite() && ratio > 0.0, "{line}");
        assert!(line.trim_end().ends_with(target), "{line}");
    }
    // git status is measured, or skipped with its reason.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("git status, cached / local")),
        "{stdout}"
    );
    // The counters after the run, from both sides.
    assert!(stdout.contains("passthrough_opens"), "{stdout}");
    assert!(stdout.contains("request Create"), "{stdout}");
    // Nothing left mounted under the bench directory.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*dir.path().to_string_lossy()), "{mounts}");
}
