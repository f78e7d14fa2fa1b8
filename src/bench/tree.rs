//! The source tree of the mount suite's `tar x` and `git status` figures: made the same
//! way every run (files of source-like sizes in nested directories), committed to git
//! when git is installed, packed once with the system `tar`, and timed extracted and
//! statused through the mount and on local disk alike.
//! Invariant: the tree depends only on its file count; the local baselines are made as
//! durable as the mount's close makes its files (the extraction ends with `syncfs`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Files per leaf directory, and leaf directories per top-level one: 10,000 files make
/// 400 leaves in 20 top-level directories, as a mid-sized source tree has.
const FILES_PER_DIR: usize = 25;
const DIRS_PER_TOP: usize = 20;
/// `git status` runs timed after the warm-up; the median counts.
const STATUS_RUNS: usize = 3;

/// A packed tree, ready to extract.
pub struct Tree {
    pub files: usize,
    /// The tarball, made by the system `tar` from the generated tree.
    pub tarball: PathBuf,
    /// Whether the tree is a git work tree with one commit (`None`), or why not.
    pub git_skipped: Option<String>,
}

/// Makes the tree of `files` files under `dir/tree-src`, commits it when git is there,
/// and packs it into `dir/tree.tar`.
pub fn make(dir: &Path, files: usize) -> Result<Tree> {
    let source = dir.join("tree-src");
    if source.exists() {
        std::fs::remove_dir_all(&source).with_context(|| format!("remove {}", source.display()))?;
    }
    write_tree(&source, files)?;
    let git_skipped = match git_version() {
        Err(reason) => Some(reason),
        Ok(_) => {
            git_commit(&source)?;
            None
        }
    };
    let tarball = dir.join("tree.tar");
    let mut tar = Command::new("tar");
    tar.arg("-cf").arg(&tarball).arg("-C").arg(&source).arg(".");
    run(tar, "tar -c the source tree")?;
    Ok(Tree {
        files,
        tarball,
        git_skipped,
    })
}

/// Writes `files` files of sizes between 128 B and 32 KiB (most a few KiB) with
/// text-like contents, from a fixed seed.
fn write_tree(root: &Path, files: usize) -> Result<()> {
    let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
    for i in 0..files {
        let leaf = i / FILES_PER_DIR;
        let dir = root
            .join(format!("top{:02}", leaf / DIRS_PER_TOP))
            .join(format!("dir{:02}", leaf % DIRS_PER_TOP));
        if i % FILES_PER_DIR == 0 {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let base = 128usize << (random.next() % 9);
        let size = base + (random.next() as usize % base);
        let contents = text(&mut random, size.min(32 << 10));
        let path = dir.join(format!("file{i:05}.c"));
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// `size` bytes of words and newlines.
fn text(random: &mut XorShift, size: usize) -> Vec<u8> {
    const WORDS: [&[u8]; 8] = [
        b"static ", b"int ", b"return ", b"struct ", b"buffer", b"(void)", b";\n", b"  ",
    ];
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        out.extend_from_slice(WORDS[(random.next() % 8) as usize]);
    }
    out.truncate(size);
    out
}

/// A small deterministic generator: the tree must not change between runs.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Extracts the tarball into `dest` (made empty first); the time it took. With `sync`,
/// the file system holding `dest` is synced before the clock stops, so that the files
/// are as durable as a mount's close makes them.
pub fn extract(tree: &Tree, dest: &Path, sync: bool) -> Result<Duration> {
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("remove {}", dest.display()))?;
    }
    std::fs::create_dir_all(dest).with_context(|| format!("create {}", dest.display()))?;
    let started = Instant::now();
    let mut tar = Command::new("tar");
    tar.arg("-xf").arg(&tree.tarball).arg("-C").arg(dest);
    run(tar, &format!("tar -x into {}", dest.display()))?;
    if sync {
        syncfs(dest)?;
    }
    Ok(started.elapsed())
}

/// `syncfs(2)` of the file system holding `path`.
fn syncfs(path: &Path) -> Result<()> {
    let dir = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: a valid open descriptor.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs {}", path.display()));
    }
    Ok(())
}

/// `git status` in the work tree `dir` once cached: one run to warm the caches (and
/// refresh the index an extraction left stale), then the median of `STATUS_RUNS`. Also
/// the number of changes it listed, which should be none.
pub fn git_status(dir: &Path) -> Result<(Duration, usize)> {
    git_status_once(dir)?;
    let mut times = Vec::with_capacity(STATUS_RUNS);
    let mut changes = 0;
    for _ in 0..STATUS_RUNS {
        let started = Instant::now();
        changes = git_status_once(dir)?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok((times[STATUS_RUNS / 2], changes))
}

fn git_status_once(dir: &Path) -> Result<usize> {
    let mut status = git(dir);
    status.args(["status", "--porcelain"]);
    let out = run(status, &format!("git status in {}", dir.display()))?;
    Ok(out.lines().count())
}

/// `git --version`, or why git cannot be used.
fn git_version() -> std::result::Result<String, String> {
    match Command::new("git").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(out) => Err(format!("`git --version` failed ({})", out.status)),
        Err(e) => Err(format!("git is not installed ({e})")),
    }
}

/// `git init`, add everything, commit, and pack the objects (so the tarball carries a
/// few pack files, not one loose object per file).
fn git_commit(dir: &Path) -> Result<()> {
    for args in [
        &["init", "-q"][..],
        &["add", "-A"],
        &["commit", "-q", "-m", "bench tree"],
        &["gc", "-q"],
    ] {
        let mut command = git(dir);
        command.args(args);
        run(command, &format!("git {}", args.join(" ")))?;
    }
    Ok(())
}

/// A git command in `dir` that reads no configuration of this host or user, so that the
/// figure is the same wherever it runs.
fn git(dir: &Path) -> Command {
    let mut command = Command::new("git");
    command
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .args([
            "-c",
            "safe.directory=*",
            "-c",
            "user.name=holdfast bench",
            "-c",
            "user.email=bench@holdfast.invalid",
            "-c",
            "init.defaultBranch=main",
        ]);
    command
}

/// Runs `command` to completion; its standard output, or an error with its stderr.
fn run(mut command: Command, what: &str) -> Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: start"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_is_the_same_every_time() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write_tree(a.path(), 60).unwrap();
        write_tree(b.path(), 60).unwrap();
        let listing = |root: &Path| {
            let mut files = Vec::new();
            let mut dirs = vec![root.to_owned()];
            while let Some(dir) = dirs.pop() {
                for entry in std::fs::read_dir(&dir).unwrap() {
                    let path = entry.unwrap().path();
                    if path.is_dir() {
                        dirs.push(path);
                    } else {
                        let bytes = std::fs::read(&path).unwrap();
                        files.push((path.strip_prefix(root).unwrap().to_owned(), bytes));
                    }
                }
            }
            files.sort();
            files
        };
        let (first, second) = (listing(a.path()), listing(b.path()));
        assert_eq!(first.len(), 60);
        assert_eq!(first, second);
        let sizes: Vec<usize> = first.iter().map(|(_, bytes)| bytes.len()).collect();
        assert!(
            sizes.iter().all(|&s| (128..=32 << 10).contains(&s)),
            "{sizes:?}"
        );
        assert!(sizes.iter().min() < sizes.iter().max());
    }
}
