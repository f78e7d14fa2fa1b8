//! The history file (`--history`): a line per acknowledged change of a volume or a lock
//! and per role change, for failover tests to compare the members of a pair.
//! Invariant: a change's line is written after its request's last fence check and before
//! its reply leaves, as one `O_APPEND` write, so lines of two members interleave whole.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use proto::{Epoch, Request};
use tracing::warn;

use crate::error::FileServerError;

/// An open history file, opened `O_APPEND` so that the lines of two members writing one
/// file interleave whole.
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

    /// Appends the line `<unix micros> <epoch> <member address> <what>`, `what` a request
    /// kind or a role change (`active`, `fenced`, `released`), in one write. A failure is
    /// logged, not returned: the history is evidence for tests, not part of the service.
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
