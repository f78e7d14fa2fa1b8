//! The history file (`--history`): one line per acknowledged request that changed a
//! volume or a lock, and one per role change, for failover tests to compare members.
//! Line: `<unix micros> <epoch> <member address> <what>`, `what` a request kind or
//! `active` / `fenced`.
//! Invariant: a request's line is written after the last fence check and before its
//! reply leaves, as one `write` on an `O_APPEND` file, so the lines of two members on
//! one file interleave whole and an acknowledged change always has its line.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use proto::{Epoch, Request};
use tracing::warn;

use crate::error::FileServerError;

/// An open history file.
#[derive(Debug)]
pub struct History {
    file: File,
}

impl History {
    pub fn open(path: &Path) -> Result<History, FileServerError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| FileServerError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(History { file })
    }

    /// Appends one line; a failure is logged, not returned: the history is evidence for
    /// tests, not part of the service.
    pub fn line(&self, epoch: Epoch, member: &str, what: &str) {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let line = format!("{micros} {epoch} {member} {what}\n");
        if let Err(e) = (&self.file).write_all(line.as_bytes()) {
            warn!(error = %e, "could not append to the history file");
        }
    }
}

/// Whether an acknowledged `request` goes into the history: volume and lock changes.
pub fn is_recorded(request: &Request) -> bool {
    request.changes_volume()
        || matches!(
            request,
            Request::SetLock { .. }
                | Request::ReleaseLock { .. }
                | Request::ReclaimLock { .. }
                | Request::CreateVolume { .. }
                | Request::RemoveVolume { .. }
        )
}

/// The request's variant name, as history lines name it.
pub fn kind(request: &Request) -> String {
    let request = match request {
        Request::Sequenced { request, .. } => request,
        other => other,
    };
    let debug = format!("{request:?}");
    debug
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_owned()
}
