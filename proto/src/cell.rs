//! The cell file: TOML naming the cell, its VLDB servers and where this host's
//! credentials are, found through `--cell FILE` or `HOLDFAST_CELL`.
//! Invariant: a `CellConfig` that `load` returns has a name, at least one vlserver
//! address and its credentials directory resolved, and a file with a key it does not know
//! is refused, not half read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Environment variable naming the cell file when `--cell` is not given.
pub const CELL_ENV: &str = "HOLDFAST_CELL";
/// The credentials directory when the cell file names none: beside the cell file.
pub const CREDENTIALS_DIR_DEFAULT: &str = "credentials";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    /// The cell's name.
    pub name: String,
    /// VLDB addresses (`host:port`).
    pub vlservers: Vec<String>,
    /// This host's credentials directory (`proto::tls::credentials`); relative to the
    /// cell file's directory in the file, resolved by `load`. Default: `credentials`
    /// beside the cell file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum CellError {
    #[error("no cell file given: pass --cell FILE or set {CELL_ENV}")]
    NotGiven,
    #[error("cannot read cell file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cell file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl CellConfig {
    /// Reads and checks a cell file.
    pub fn load(path: &Path) -> Result<CellConfig, CellError> {
        let text = std::fs::read_to_string(path).map_err(|source| CellError::Read {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |message: String| CellError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut cell: CellConfig =
            toml::from_str(&text).map_err(|e| invalid(e.message().to_owned()))?;
        if cell.name.is_empty() {
            return Err(invalid("`name` is empty".into()));
        }
        if cell.vlservers.is_empty() {
            return Err(invalid("`vlservers` lists no address".into()));
        }
        let beside = path.parent().unwrap_or(Path::new("."));
        let credentials = cell
            .credentials
            .take()
            .unwrap_or_else(|| PathBuf::from(CREDENTIALS_DIR_DEFAULT));
        cell.credentials = Some(beside.join(credentials));
        Ok(cell)
    }

    /// Finds the cell file from an explicit path or the environment, and loads it.
    pub fn locate(explicit: Option<&Path>) -> Result<CellConfig, CellError> {
        match explicit {
            Some(path) => CellConfig::load(path),
            None => match std::env::var_os(CELL_ENV) {
                Some(path) => CellConfig::load(Path::new(&path)),
                None => Err(CellError::NotGiven),
            },
        }
    }

    /// This host's credentials directory: as `load` resolved it, or `credentials` (in
    /// the working directory) for a configuration that was not loaded from a file.
    pub fn credentials_dir(&self) -> PathBuf {
        self.credentials
            .clone()
            .unwrap_or_else(|| PathBuf::from(CREDENTIALS_DIR_DEFAULT))
    }

    /// Renders the cell file as an admin would write it.
    pub fn to_toml(&self) -> String {
        let addresses: Vec<String> = self.vlservers.iter().map(|a| format!("{a:?}")).collect();
        let mut text = format!(
            "name = {:?}                 # the cell's name\nvlservers = [{}]        # VLDB addresses\n",
            self.name,
            addresses.join(", ")
        );
        if let Some(credentials) = &self.credentials {
            text.push_str(&format!(
                "credentials = {:?}   # this host's certificates and keys\n",
                credentials.display().to_string()
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cell.toml");
        let mut cell = CellConfig {
            name: "example.test".into(),
            vlservers: vec!["127.0.0.1:7403".into()],
            credentials: None,
        };
        std::fs::write(&path, cell.to_toml()).unwrap();
        let loaded = CellConfig::load(&path).unwrap();
        assert_eq!(loaded.credentials_dir(), dir.path().join("credentials"));
        assert_eq!(
            CellConfig {
                credentials: None,
                ..loaded
            },
            cell
        );
        // A relative directory is relative to the cell file's, an absolute one is kept.
        cell.credentials = Some("keys".into());
        std::fs::write(&path, cell.to_toml()).unwrap();
        let loaded = CellConfig::load(&path).unwrap();
        assert_eq!(loaded.credentials_dir(), dir.path().join("keys"));
        cell.credentials = Some("/etc/holdfast/keys".into());
        std::fs::write(&path, cell.to_toml()).unwrap();
        let loaded = CellConfig::load(&path).unwrap();
        assert_eq!(loaded.credentials_dir(), Path::new("/etc/holdfast/keys"));

        std::fs::write(&path, "name = \"x\"\nvlservers = []\n").unwrap();
        let err = CellConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("lists no address"), "{err}");

        let err = CellConfig::load(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read cell file"), "{err}");
    }
}
