//! Finding the holdfast mount that holds a path, and its control socket, from
//! `/proc/self/mountinfo`.
//! Invariant: a path belongs to the mount with the longest mount point that is a prefix
//! of it by whole components; of two on one point, the later, which hides the earlier.

use std::path::{Path, PathBuf};

/// The source prefix every holdfast mount carries (its FSName): `holdfast:<socket path>`
/// names the mount's control socket.
pub const SOURCE_PREFIX: &str = "holdfast:";

/// One line of mountinfo, the fields we use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn is_holdfast(&self) -> bool {
        self.fs_type == "fuse.holdfast" || self.source.starts_with(SOURCE_PREFIX)
    }

    /// The control socket named in the source, for a holdfast mount.
    pub fn control_socket(&self) -> Option<PathBuf> {
        self.source.strip_prefix(SOURCE_PREFIX).map(PathBuf::from)
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && let Ok(value) = u8::from_str_radix(digits, 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let mut rest = after.split(' ');
            let fs_type = rest.next()?;
            let source = rest.next()?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: unescape(fs_type),
                source: unescape(source),
            })
        })
        .collect()
}

/// The mount holding `path` (already canonical): the longest mount point prefix. Later
/// lines win ties, as the later mount hides the earlier one.
pub fn mount_of<'a>(mounts: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<&MountEntry> = None;
    for mount in mounts {
        if path.starts_with(&mount.mount_point)
            && best.is_none_or(|b| {
                mount.mount_point.as_os_str().len() >= b.mount_point.as_os_str().len()
            })
        {
            best = Some(mount);
        }
    }
    best
}

pub fn read() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// True when `path` is exactly a mount point in this mount namespace (any filesystem).
pub fn is_mount_point(path: &Path) -> bool {
    read().is_ok_and(|mounts| mounts.iter().any(|m| m.mount_point == path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /tmp rw shared:2 - tmpfs tmpfs rw
61 40 0:52 / /tmp/hf/mnt rw,nosuid,nodev,relatime - fuse holdfast:/tmp/hf/cache/control.sock rw,user_id=0,group_id=0
62 40 0:53 / /tmp/my\\040mnt rw - fuse.holdfast holdfast:/tmp/c\\040d/control.sock rw
";

    #[test]
    fn finds_the_longest_prefix_mount() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 4);
        let found = mount_of(&mounts, Path::new("/tmp/hf/mnt/a/b")).unwrap();
        assert!(found.is_holdfast());
        assert_eq!(
            found.control_socket().unwrap(),
            PathBuf::from("/tmp/hf/cache/control.sock")
        );
        let root = mount_of(&mounts, Path::new("/tmp/hf/mnt")).unwrap();
        assert_eq!(root.mount_point, PathBuf::from("/tmp/hf/mnt"));
        let outside = mount_of(&mounts, Path::new("/tmp/hf/mntx")).unwrap();
        assert!(
            !outside.is_holdfast(),
            "path components, not string prefixes"
        );
    }

    #[test]
    fn unescapes_spaces() {
        let mounts = parse(SAMPLE);
        let found = mount_of(&mounts, Path::new("/tmp/my mnt/file")).unwrap();
        assert_eq!(found.fs_type, "fuse.holdfast");
        assert_eq!(
            found.control_socket().unwrap(),
            PathBuf::from("/tmp/c d/control.sock")
        );
    }
}
