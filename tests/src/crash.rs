//! Crash workloads: a fileserver killed with `kill -9` and restarted on its partition
//! while a writer runs through a mount, what the writer was told was stored (its
//! acknowledgements), and the check of the server against them.
//! Invariant: a check reads through a mount that never saw the writes, so what it finds
//! is the server's, never a cache's; and an acknowledgement is recorded only after the
//! call that made the data durable (`close`, `fsync`) returned success.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{TestCell, wait_until};

/// How long a test waits for a writer to get far enough before the kill.
const PROGRESS_WAIT: Duration = Duration::from_secs(120);

/// A source tree made up for a test: relative path to content, deterministic in `seed`.
pub type Tree = BTreeMap<PathBuf, Vec<u8>>;

/// `files` small files (100 B to 12 KiB, text-like) in `files / 100 + 1` directories
/// of one or two levels, as a source tree is.
pub fn source_tree(files: usize, seed: u64) -> Tree {
    let mut tree = Tree::new();
    let mut state = seed | 1;
    let mut next = move || {
        // xorshift64: no crate needed for deterministic bytes.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let dirs = files / 100 + 1;
    for i in 0..files {
        let dir = i % dirs;
        let path = if dir % 3 == 2 {
            PathBuf::from(format!("src{:02}/sub/f{i:05}.c", dir - 1))
        } else {
            PathBuf::from(format!("src{dir:02}/f{i:05}.c"))
        };
        let len = 100 + (next() % 12_000) as usize;
        let mut content = format!("/* {} */\n", path.display()).into_bytes();
        while content.len() < len {
            let word = next();
            content.push(b'a' + (word % 26) as u8);
            if word % 11 == 0 {
                content.push(b'\n');
            }
        }
        content.truncate(len);
        tree.insert(path, content);
    }
    tree
}

/// Writes `tree` under `root` on local disk.
pub fn write_tree(root: &Path, tree: &Tree) -> Result<()> {
    for (path, content) in tree {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("mkdir {}", parent.display()))?;
        }
        std::fs::write(&path, content).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Kills the fileserver with SIGKILL, reaps it, and starts it again on the same
/// partition and address.
pub fn kill_9_and_restart(cell: &mut TestCell) -> Result<()> {
    cell.signal("fileserver", libc::SIGKILL)?;
    cell.stop("fileserver");
    cell.start_fileserver()
}

/// Waits until `count` reaches `at_least` (a writer's progress), or fails.
pub fn await_progress(count: &AtomicUsize, at_least: usize) -> Result<()> {
    if !wait_until(PROGRESS_WAIT, || count.load(Ordering::SeqCst) >= at_least) {
        bail!(
            "the writer got to {} of {at_least} within {PROGRESS_WAIT:?}",
            count.load(Ordering::SeqCst)
        );
    }
    Ok(())
}

/// What a tree writer was told: the files whose `close` succeeded, and how many it
/// tried (so far).
#[derive(Debug, Default)]
pub struct TreeAcks {
    pub closed: std::sync::Mutex<BTreeSet<PathBuf>>,
    pub tried: AtomicUsize,
}

/// Writes every file of `tree` under `root` (a mount) as a program does: create (not
/// exclusive), one write, close; creates directories as needed. A file is acknowledged
/// once its `close` returned success; a failure is noted and the writer goes on, as
/// `tar` does.
pub fn write_tree_acknowledged(root: &Path, tree: &Tree, acks: &Arc<TreeAcks>) {
    for (path, content) in tree {
        let full = root.join(path);
        let written = (|| -> std::io::Result<()> {
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut file = std::fs::File::create(&full)?;
            file.write_all(content)?;
            // Close and see its answer: `drop` would swallow it.
            close(file)
        })();
        if written.is_ok() {
            acks.closed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(path.clone());
        }
        acks.tried.fetch_add(1, Ordering::SeqCst);
    }
}

/// Closes `file` and returns what `close(2)` answered.
pub fn close(file: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just taken out of a `File`, which no longer closes it.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Checks the tree under `root` (a mount that never saw the writes) against what was
/// acknowledged: every acknowledged file is there with its exact bytes; any other file
/// there holds its exact bytes or, when `empty_allowed` (a create and its store are
/// apart), nothing; and every name there belongs to `tree`. Returns how many files
/// were found.
pub fn check_tree(
    root: &Path,
    tree: &Tree,
    acknowledged: &BTreeSet<PathBuf>,
    empty_allowed: bool,
) -> Result<usize> {
    let mut found = 0;
    for (path, content) in tree {
        match std::fs::read(root.join(path)) {
            Ok(bytes) => {
                found += 1;
                let exact = bytes == *content;
                let empty_unacknowledged =
                    empty_allowed && bytes.is_empty() && !acknowledged.contains(path);
                if !(exact || empty_unacknowledged) {
                    bail!(
                        "{} holds {} bytes that are not what was written ({} bytes{})",
                        path.display(),
                        bytes.len(),
                        content.len(),
                        if acknowledged.contains(path) {
                            ", acknowledged"
                        } else {
                            ""
                        }
                    );
                }
            }
            Err(e) if acknowledged.contains(path) => {
                bail!("{} was acknowledged but reads as: {e}", path.display())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("{}: {e}", path.display()),
        }
    }
    let dirs: BTreeSet<PathBuf> = tree
        .keys()
        .flat_map(|p| p.ancestors().skip(1).map(Path::to_path_buf))
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(root.join(&dir))
            .with_context(|| format!("list {}", root.join(&dir).display()))?;
        for entry in entries {
            let relative = dir.join(entry?.file_name());
            if dirs.contains(&relative) {
                pending.push(relative);
            } else if !tree.contains_key(&relative) {
                bail!("{} is there but was never written", relative.display());
            }
        }
    }
    Ok(found)
}

/// What an appender was told: the file's length at its last successful `fsync`, and
/// how many records it appended.
#[derive(Debug, Default)]
pub struct AppendAcks {
    pub synced_bytes: AtomicUsize,
    pub appended: AtomicUsize,
}

/// Record `index` of an append log: its own number and a fixed filler, so every byte
/// of the file says where it belongs.
pub fn append_record(index: usize, record_bytes: usize) -> Vec<u8> {
    let mut record = format!("record {index:08} ").into_bytes();
    while record.len() < record_bytes - 1 {
        record.push(b'a' + (index % 26) as u8);
    }
    record.push(b'\n');
    record
}

/// Appends `records` records of `record_bytes` to `path` (opened once, `O_APPEND`),
/// `fsync` after each; the length at a successful `fsync` is acknowledged. A failed
/// `fsync` or write (the server is down) is tried again for a while, as a careful log
/// writer does: the data stays unstored in the mount meanwhile.
pub fn append_acknowledged(path: &Path, records: usize, record_bytes: usize, acks: &AppendAcks) {
    let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let mut written = 0;
    for index in 0..records {
        let record = append_record(index, record_bytes);
        // A write lands in the mount's cache whole or not at all.
        if !wait_until(PROGRESS_WAIT, || file.write_all(&record).is_ok()) {
            break;
        }
        written += record.len();
        if wait_until(PROGRESS_WAIT, || file.sync_all().is_ok()) {
            acks.synced_bytes.store(written, Ordering::SeqCst);
        }
        acks.appended.fetch_add(1, Ordering::SeqCst);
    }
    let _ = close(file);
}

/// Checks an append log read from the server against its acknowledgement: at least
/// `synced` bytes, every one of them (and any beyond) the records in order.
pub fn check_append_log(bytes: &[u8], synced: usize, record_bytes: usize) -> Result<()> {
    if bytes.len() < synced {
        bail!(
            "the log holds {} bytes, but {synced} were acknowledged by fsync",
            bytes.len()
        );
    }
    for (index, chunk) in bytes.chunks(record_bytes).enumerate() {
        let expected = append_record(index, record_bytes);
        if chunk != &expected[..chunk.len()] {
            bail!(
                "record {index} (at byte {}) is not what was appended{}",
                index * record_bytes,
                if index * record_bytes < synced {
                    ", though acknowledged"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_tree_is_deterministic_and_small() {
        let tree = source_tree(300, 7);
        assert_eq!(tree, source_tree(300, 7));
        assert_eq!(tree.len(), 300);
        assert!(tree.values().all(|c| (100..12_100).contains(&c.len())));
        assert!(tree.keys().any(|p| p.components().count() == 3));
    }

    #[test]
    fn an_append_log_check_catches_a_short_or_wrong_file() {
        let log: Vec<u8> = (0..10).flat_map(|i| append_record(i, 50)).collect();
        check_append_log(&log, 500, 50).unwrap();
        check_append_log(&log[..320], 300, 50).unwrap();
        assert!(check_append_log(&log[..299], 300, 50).is_err());
        let mut wrong = log.clone();
        wrong[120] ^= 1;
        assert!(check_append_log(&wrong, 100, 50).is_err());
    }

    #[test]
    fn a_tree_check_catches_a_lost_or_wrong_or_invented_file() {
        let dir = tempfile::tempdir().unwrap();
        let tree = source_tree(30, 3);
        write_tree(dir.path(), &tree).unwrap();
        let all: BTreeSet<PathBuf> = tree.keys().cloned().collect();
        assert_eq!(check_tree(dir.path(), &tree, &all, false).unwrap(), 30);
        let (first, _) = tree.iter().next().unwrap();
        std::fs::write(dir.path().join(first), b"").unwrap();
        assert!(check_tree(dir.path(), &tree, &all, true).is_err());
        let mut unacked = all.clone();
        unacked.remove(first);
        check_tree(dir.path(), &tree, &unacked, true).unwrap();
        assert!(check_tree(dir.path(), &tree, &unacked, false).is_err());
        std::fs::remove_file(dir.path().join(first)).unwrap();
        assert!(check_tree(dir.path(), &tree, &all, false).is_err());
        check_tree(dir.path(), &tree, &unacked, false).unwrap();
        std::fs::write(dir.path().join("src00/invented.c"), b"x").unwrap();
        assert!(check_tree(dir.path(), &tree, &unacked, false).is_err());
    }
}
