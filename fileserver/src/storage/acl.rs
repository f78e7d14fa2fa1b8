//! Directories' access lists in a volume: reading the list that governs a vnode, and
//! replacing a directory's list.
//! Invariant: a file is governed by the list of the directory its record names as
//! parent (a directory by its own); a list replaced moves its directory's data version.

use proto::{AccessList, ErrorCode, Fid, FileKind, Timestamp, VnodeId, VnodeStatus};

use super::StorageError;
use super::tables::Reader;
use super::volume::Volume;

/// A vnode with the directory whose access list governs it.
#[derive(Clone, Debug)]
pub struct Governed {
    pub status: VnodeStatus,
    /// The vnode itself for a directory, its parent directory otherwise.
    pub dir: VnodeStatus,
    pub acl: AccessList,
}

impl Volume {
    /// `fid`'s status with its governing directory's status and list.
    pub fn governing(&self, fid: Fid) -> Result<Governed, StorageError> {
        self.read(|r| {
            let record = r.checked(fid)?;
            let status = record.status(self.id, fid.vnode);
            if record.kind == FileKind::Directory {
                let acl = stored_or_default(r, fid.vnode)?;
                return Ok(Governed {
                    dir: status.clone(),
                    status,
                    acl,
                });
            }
            // A record written before files followed their renames may name a directory
            // long gone: the volume's root governs it then.
            let parent = match r.vnode(record.parent) {
                Ok(parent) if parent.kind == FileKind::Directory => record.parent,
                Ok(_) | Err(StorageError::Refused(ErrorCode::Stale)) => VnodeId::ROOT,
                Err(e) => return Err(e),
            };
            let dir = r.vnode(parent)?.status(self.id, parent);
            Ok(Governed {
                status,
                dir,
                acl: stored_or_default(r, parent)?,
            })
        })
    }

    /// Replaces `dir`'s access list; the directory's data version and ctime move, so
    /// every holder's promise on it is broken by the caller.
    pub fn store_acl(&self, dir: Fid, acl: AccessList) -> Result<VnodeStatus, StorageError> {
        if acl.len() > proto::identity::ACL_ENTRIES_MAX {
            return Err(ErrorCode::InvalidArgument.into());
        }
        let id = self.id;
        self.write(move |tx| {
            let mut record = tx.directory(dir)?;
            record.data_version = record.data_version.next();
            record.ctime = Timestamp::now();
            tx.put_acl(dir.vnode, Some(acl));
            tx.put(dir.vnode, record.clone());
            Ok(record.status(id, dir.vnode))
        })
    }
}

fn stored_or_default(r: &Reader<'_>, dir: VnodeId) -> Result<AccessList, StorageError> {
    Ok(r.acl(dir)?.unwrap_or_else(AccessList::for_new_volume))
}
