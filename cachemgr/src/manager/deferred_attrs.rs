//! Attributes set on a file whose create or fill waits for its close (`deferred`): kept
//! with its bytes and sent with them, so `tar x`'s fchmod and futimens cost no request.
//! Invariant: an attribute is kept here only if the server will take it with the bytes:
//! set by the file's creator and passed by the server's own rules (`check_set_attrs`)
//! with the caller's cached rights; any other goes to the server at once, as before.

use proto::access;
use proto::{Rights, SetAttrs, Timestamp};

use super::deferred::is_provisional;
use super::{AttrOut, FsResult, Manager};
use crate::inode::Ino;
use crate::tokens;

impl Manager {
    /// Sets `attrs` on `ino` while its create or fill waits for its close, answering
    /// its attributes; `None`, with nothing changed, when they must go to the server
    /// (`setattr`): the file is not deferred, another user asks, the change needs the
    /// bytes on the server (times on a file not yet made, a size past the limit, a
    /// chown that changes or clears anything) or the rules refuse it.
    pub async fn setattr_deferred(&self, ino: Ino, attrs: &SetAttrs) -> FsResult<Option<AttrOut>> {
        let Some(fid) = self.fid(ino).ok().filter(|fid| is_provisional(*fid)) else {
            return Ok(None);
        };
        // No create, fill or write of it meanwhile.
        let _file = self.file_lock(fid).write().await;
        let Some((creator, dir, made)) = self.deferred.lock().owner(fid) else {
            return Ok(None);
        };
        if creator != tokens::current_caller() {
            return Ok(None);
        }
        let mut kept = attrs.clone();
        if made {
            // The server checks the fill as this `SetAttr`: check it so here first.
            let caller = self.caller_identity()?;
            let rights = self
                .rights
                .get(caller.id, dir)
                .map_or(Rights::NONE, |cached| cached.rights);
            let Some(status) = self.deferred.lock().status(fid) else {
                return Ok(None);
            };
            match access::check_set_attrs(&caller, rights, &status, attrs) {
                Ok(applied) => kept = applied,
                Err(_) => return Ok(None),
            }
        }
        if !self.deferred.lock().set_attrs(fid, &kept, Timestamp::now()) {
            return Ok(None);
        }
        Ok(self.deferred_attr(ino))
    }
}
