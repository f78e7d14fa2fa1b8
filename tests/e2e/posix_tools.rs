//! Ordinary tools on a mount: copy, diff, tar, git, mv, ln -s, chmod, truncate, rm -rf,
//! a file larger than the cache, and a directory of 10,000 entries.

use harness::{TestCell, sh};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// Builds a small source tree with nested directories, a symlink and binary data.
fn make_tree(root: &std::path::Path) {
    for d in 0..5 {
        let dir = root.join(format!("dir{d}/sub"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..20 {
            let data: Vec<u8> = (0..(f * 517 + d * 31)).map(|i| (i * 7 + f) as u8).collect();
            std::fs::write(dir.join(format!("file{f}.bin")), data).unwrap();
        }
    }
    std::fs::write(root.join("README"), "a tree\n").unwrap();
    std::os::unix::fs::symlink("README", root.join("link-to-readme")).unwrap();
}

#[test]
fn copy_diff_tar_git_and_friends() {
    let mut cell = TestCell::start(BIN).unwrap();
    let mnt = cell.mount("ws", &[]).unwrap();
    let src = cell.dir.path().join("src-tree");
    make_tree(&src);
    let src = src.to_string_lossy().into_owned();

    sh(&mnt, &format!("cp -a {src} copy && diff -r {src} copy")).unwrap();
    sh(&mnt, "tar cf /tmp/holdfast-e2e-$$.tar copy && mkdir untar && tar xf /tmp/holdfast-e2e-$$.tar -C untar && rm /tmp/holdfast-e2e-$$.tar && diff -r copy untar/copy").unwrap();

    sh(&mnt, "mkdir repo && cd repo && git init -q && git config user.email t@e2e && git config user.name t \
              && echo one > a.txt && git add a.txt && git commit -qm first \
              && echo two >> a.txt && git commit -qam second").unwrap();
    let log = sh(&mnt.join("repo"), "git log --oneline | wc -l").unwrap();
    assert_eq!(log.trim(), "2");
    sh(&mnt.join("repo"), "git status --porcelain | wc -l | grep -qx 0 && git fsck --no-progress 2>&1 | grep -v ^dangling | wc -l | grep -qx 0").unwrap();

    sh(&mnt, "mkdir -p x/y z && echo moved > x/y/m && mv x/y/m z/m && test ! -e x/y/m && grep -qx moved z/m").unwrap();
    sh(&mnt, "mv z x/ && test -f x/z/m").unwrap();
    sh(
        &mnt,
        "echo target > t && ln -s t sl && test \"$(readlink sl)\" = t && grep -qx target sl",
    )
    .unwrap();
    sh(&mnt, "chmod 600 t && test \"$(stat -c %a t)\" = 600 && chmod 755 t && test \"$(stat -c %a t)\" = 755").unwrap();
    sh(&mnt, "printf 0123456789 > tr && truncate -s 4 tr && test \"$(cat tr)\" = 0123 && truncate -s 100 tr && test \"$(stat -c %s tr)\" = 100").unwrap();
    sh(
        &mnt,
        "echo x > h1 && ln h1 h2 && test \"$(stat -c %h h1)\" = 2 && rm h1 && grep -qx x h2",
    )
    .unwrap();
    sh(
        &mnt,
        "echo a > r1 && echo b > r2 && mv r1 r2 && grep -qx a r2 && test ! -e r1",
    )
    .unwrap();
    sh(&mnt, "rm -rf copy untar repo x && test ! -e copy").unwrap();
}

#[test]
fn a_file_larger_than_the_cache() {
    let mut cell = TestCell::start(BIN).unwrap();
    let mnt = cell.mount("ws", &["--cache-mib", "8"]).unwrap();
    let other = cell.mount("ws2", &["--cache-mib", "8"]).unwrap();
    let local = cell.dir.path().join("big.local");
    sh(
        cell.dir.path(),
        &format!("head -c 40000000 /dev/urandom > {}", local.display()),
    )
    .unwrap();
    sh(
        &mnt,
        &format!("cp {} big && cmp big {}", local.display(), local.display()),
    )
    .unwrap();
    sh(&other, &format!("cmp big {}", local.display())).unwrap();
}

#[test]
fn a_directory_of_ten_thousand_entries() {
    let mut cell = TestCell::start(BIN).unwrap();
    let mnt = cell.mount("ws", &[]).unwrap();
    let other = cell.mount("ws2", &[]).unwrap();
    sh(
        &mnt,
        "mkdir big && cd big && seq -f 'entry-%05g' 1 10000 | xargs touch",
    )
    .unwrap();
    for m in [&mnt, &other] {
        let count = sh(m, "ls big | wc -l").unwrap();
        assert_eq!(count.trim(), "10000");
        let listing = sh(m, "ls big | sort | sed -n '1p;10000p'").unwrap();
        assert_eq!(listing, "entry-00001\nentry-10000\n");
    }
}
