//! Namespace changes (create, with its bytes or not, fill a new file, make a directory, a special file, a
//! symlink or a mount point, link, remove, rename), answered from their record when
//! retried with the same sequence.
//! Invariant: a change is applied at most once per sequence, breaks the other holders'
//! promises on what it changed before it answers, and a replay breaks and grants nothing.

use std::sync::Arc;

use proto::{
    DataVersion, ErrorCode, Fid, FileKind, Response, SetAttrs, VnodeStatus, VolumeId, VolumeName,
};

use super::{Caller, FileService, blocking};
use crate::storage::{Ahead, Answer, Outcome, StorageError, Volume};

/// The mode and owner a new entry gets.
#[derive(Clone, Copy, Debug)]
pub(super) struct Perms {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl FileService {
    /// Applies a namespace change on `volume` (off the async threads), then `then` on
    /// what it changed. A retry of a change already applied (its reply lost, or its server
    /// failed over) is answered with what its record kept instead.
    async fn change<T, Then, Reply>(
        self: &Arc<Self>,
        volume: VolumeId,
        change: impl FnOnce(&Volume) -> Result<Outcome<T>, StorageError> + Send + 'static,
        then: Then,
    ) -> Result<Response, ErrorCode>
    where
        T: Send + 'static,
        Then: FnOnce(T) -> Reply,
        Reply: Future<Output = Response>,
    {
        let volume = self.volume(volume)?;
        match blocking(move || change(&volume)).await? {
            Outcome::Applied(applied) => Ok(then(applied).await),
            Outcome::Replayed(answer) => *answer,
        }
    }

    /// The reply to a change that made an entry in a directory: the holders of `changed`
    /// are broken, and the caller gets a promise on the entry.
    async fn made(
        self: &Arc<Self>,
        caller: Caller,
        changed: Vec<Fid>,
        status: VnodeStatus,
        dir: VnodeStatus,
    ) -> Response {
        if !changed.is_empty() {
            self.callbacks.break_callbacks(&changed, caller.key).await;
        }
        let callback = self.grant(caller, status.fid).await;
        Response::Entry {
            status,
            callback,
            dir,
        }
    }

    /// The caller's promise on the file a create makes, journaled in the create's own
    /// transaction (`Ahead`), so that the create and the promise are made
    /// durable by one flush; `made` then grants the same promise, already journaled.
    fn grant_ahead(self: &Arc<Self>, caller: Caller) -> Option<Ahead> {
        let client = caller.key?;
        let callbacks = self.callbacks.clone();
        Some(Box::new(move |fid| callbacks.grant_ahead(client, fid)))
    }

    pub(super) async fn create(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
        perms: Perms,
        exclusive: bool,
    ) -> Result<Response, ErrorCode> {
        let Perms { mode, uid, gid } = perms;
        let (sequence, ahead) = (caller.sequence, self.grant_ahead(caller));
        self.change(
            dir.volume,
            move |volume| {
                volume.create_logging_ahead(sequence, dir, &name, mode, uid, gid, exclusive, ahead)
            },
            |created| {
                // A create that found the file there changed nothing.
                let changed = if created.created {
                    vec![dir]
                } else {
                    Vec::new()
                };
                self.made(caller, changed, created.status, created.dir)
            },
        )
        .await
    }

    /// A file made with its bytes (`CreateWithData`): one durable transaction, then
    /// the directory's other holders broken and a promise on the file, as `create`.
    pub(super) async fn create_with_data(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
        perms: Perms,
        data: Vec<u8>,
    ) -> Result<Response, ErrorCode> {
        let Perms { mode, uid, gid } = perms;
        let (sequence, ahead) = (caller.sequence, self.grant_ahead(caller));
        self.change(
            dir.volume,
            move |volume| {
                volume.create_with_data_logging_ahead(
                    sequence, dir, &name, mode, uid, gid, data, ahead,
                )
            },
            |(status, dir_status)| self.made(caller, vec![dir], status, dir_status),
        )
        .await
    }

    /// A file its client created filled with its bytes and attributes at its close
    /// (`StoreNewFile`): one durable transaction, then the file's other holders broken
    /// and the caller's promise renewed, as a store.
    pub(super) async fn store_new_file(
        self: &Arc<Self>,
        caller: Caller,
        fid: Fid,
        base: DataVersion,
        data: Vec<u8>,
        attrs: SetAttrs,
    ) -> Result<Response, ErrorCode> {
        let sequence = caller.sequence;
        self.change(
            fid.volume,
            move |volume| volume.store_new_file(sequence, fid, base, data, attrs),
            |status| async move {
                self.callbacks.break_callbacks(&[fid], caller.key).await;
                let callback = self.grant(caller, fid).await;
                Response::Status { status, callback }
            },
        )
        .await
    }

    pub(super) async fn make_dir(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
        perms: Perms,
    ) -> Result<Response, ErrorCode> {
        let Perms { mode, uid, gid } = perms;
        let sequence = caller.sequence;
        self.change(
            dir.volume,
            move |volume| volume.make_dir(sequence, dir, &name, mode, uid, gid),
            |(status, dir_status)| self.made(caller, vec![dir], status, dir_status),
        )
        .await
    }

    pub(super) async fn make_node(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
        kind: FileKind,
        perms: Perms,
    ) -> Result<Response, ErrorCode> {
        let Perms { mode, uid, gid } = perms;
        let sequence = caller.sequence;
        self.change(
            dir.volume,
            move |volume| volume.make_node(sequence, dir, &name, kind, mode, uid, gid),
            |(status, dir_status)| self.made(caller, vec![dir], status, dir_status),
        )
        .await
    }

    pub(super) async fn symlink(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
        target: String,
        uid: u32,
        gid: u32,
    ) -> Result<Response, ErrorCode> {
        let sequence = caller.sequence;
        self.change(
            dir.volume,
            move |volume| volume.symlink(sequence, dir, &name, &target, uid, gid),
            |(status, dir_status)| self.made(caller, vec![dir], status, dir_status),
        )
        .await
    }

    pub(super) async fn make_mount_point(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
        target: VolumeName,
    ) -> Result<Response, ErrorCode> {
        let sequence = caller.sequence;
        self.change(
            dir.volume,
            move |volume| volume.make_mount_point(sequence, dir, &name, &target),
            |(status, dir_status)| self.made(caller, vec![dir], status, dir_status),
        )
        .await
    }

    pub(super) async fn link(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
        target: Fid,
    ) -> Result<Response, ErrorCode> {
        if dir.volume != target.volume {
            return Err(ErrorCode::CrossVolume);
        }
        let sequence = caller.sequence;
        self.change(
            dir.volume,
            move |volume| volume.link(sequence, dir, &name, target),
            // The target's link count changed: its holders are broken too.
            |(status, dir_status)| self.made(caller, vec![dir, target], status, dir_status),
        )
        .await
    }

    pub(super) async fn remove(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
        directory: bool,
    ) -> Result<Response, ErrorCode> {
        let sequence = caller.sequence;
        self.change(
            dir.volume,
            move |volume| volume.remove(sequence, dir, &name, directory),
            |removed| async move {
                // The removed vnode's link count changed: its holders are broken too.
                self.callbacks
                    .break_callbacks(&[dir, removed.target.fid], caller.key)
                    .await;
                removed.answer()
            },
        )
        .await
    }

    pub(super) async fn rename(
        self: &Arc<Self>,
        caller: Caller,
        (from_dir, from_name): (Fid, String),
        (to_dir, to_name): (Fid, String),
    ) -> Result<Response, ErrorCode> {
        if from_dir.volume != to_dir.volume {
            return Err(ErrorCode::CrossVolume);
        }
        let sequence = caller.sequence;
        self.change(
            from_dir.volume,
            move |volume| volume.rename(sequence, from_dir, &from_name, to_dir, &to_name),
            |renamed| async move {
                // The moved vnode's ctime changed (and a directory's parent): its
                // holders are broken too.
                let mut changed = vec![from_dir, renamed.moved.fid];
                if to_dir != from_dir {
                    changed.push(to_dir);
                }
                if let Some(replaced) = &renamed.replaced {
                    changed.push(replaced.fid);
                }
                self.callbacks.break_callbacks(&changed, caller.key).await;
                // Renames grant no promise: the answer is what the record keeps.
                renamed.answer()
            },
        )
        .await
    }
}
