//! Validated names: volume names, pair names and directory entry names.
//! Invariant: a `VolumeName` or `PairName` exists only if it passed `parse` (decoding
//! goes through it too); every side checks entry names with the one `check_entry_name`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// Longest volume name, in bytes.
pub const VOLUME_NAME_BYTES_MAX: usize = 64;
/// Longest directory entry name, in bytes (as in POSIX `NAME_MAX`).
pub const ENTRY_NAME_BYTES_MAX: usize = 255;

/// A volume's name, checked against the cell's naming rules: 1 to
/// `VOLUME_NAME_BYTES_MAX` bytes of `[A-Za-z0-9._-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

impl VolumeName {
    pub fn parse(name: &str) -> Result<VolumeName, ErrorCode> {
        let valid_chars = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if name.is_empty() || name.len() > VOLUME_NAME_BYTES_MAX || !valid_chars {
            return Err(ErrorCode::BadVolumeName);
        }
        Ok(VolumeName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VolumeName {
    type Error = ErrorCode;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        VolumeName::parse(&value)
    }
}

impl From<VolumeName> for String {
    fn from(value: VolumeName) -> String {
        value.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A fileserver pair's name: the same rules as a volume name (1 to 64 bytes of
/// `[A-Za-z0-9._-]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PairName(String);

impl PairName {
    pub fn parse(name: &str) -> Result<PairName, ErrorCode> {
        VolumeName::parse(name)
            .map(|valid| PairName(valid.0))
            .map_err(|_| ErrorCode::BadPairName)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PairName {
    type Error = ErrorCode;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        PairName::parse(&value)
    }
}

impl From<PairName> for String {
    fn from(value: PairName) -> String {
        value.0
    }
}

impl fmt::Display for PairName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a directory entry name as the fileserver and the cache manager both must: 1 to
/// `ENTRY_NAME_BYTES_MAX` bytes, no `/` or NUL, neither `.` nor `..`.
pub fn check_entry_name(name: &str) -> Result<(), ErrorCode> {
    if name.len() > ENTRY_NAME_BYTES_MAX {
        return Err(ErrorCode::NameTooLong);
    }
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(ErrorCode::InvalidArgument);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        assert!(VolumeName::parse("root.cell").is_ok());
        assert!(VolumeName::parse("user_a-1").is_ok());
        assert_eq!(VolumeName::parse(""), Err(ErrorCode::BadVolumeName));
        assert_eq!(VolumeName::parse("a b"), Err(ErrorCode::BadVolumeName));
        assert_eq!(
            VolumeName::parse(&"x".repeat(65)),
            Err(ErrorCode::BadVolumeName)
        );
        assert!(VolumeName::parse(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn entry_names() {
        assert!(check_entry_name("file.txt").is_ok());
        assert_eq!(
            check_entry_name(&"n".repeat(256)),
            Err(ErrorCode::NameTooLong)
        );
        assert!(check_entry_name(&"n".repeat(255)).is_ok());
        assert_eq!(check_entry_name("a/b"), Err(ErrorCode::InvalidArgument));
        assert_eq!(check_entry_name(".."), Err(ErrorCode::InvalidArgument));
    }
}
