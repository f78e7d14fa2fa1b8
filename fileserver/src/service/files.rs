//! Files and directories read and written in place: status, data, attributes, lookups and
//! listings; a read gives the caller a promise, a write breaks everyone else's. A fetch's
//! bytes are read into the buffer its reply is sent from, and a store's are written from
//! the received frame's buffer (`Bulk`): neither is copied in user space on the way.
//! Invariant: a fetch or listing takes its promise before it reads, so a change after the
//! read breaks it, and a write answers only after the other holders' breaks.

use std::sync::Arc;

use proto::{Bulk, DataVersion, ErrorCode, Fid, Response, SetAttrs, WriteBackId};

use super::{Caller, FileService, blocking};
use crate::storage::{Outcome, StoreCondition};

/// Most entries one `ReadDir` returns.
const READDIR_COUNT_MAX: usize = 2048;
/// Most bytes of names one `ReadDir` returns, well under the frame limit.
const READDIR_BYTES_MAX: usize = 1 << 20;

impl FileService {
    pub(super) async fn fetch_status(
        self: &Arc<Self>,
        caller: Caller,
        fid: Fid,
    ) -> Result<Response, ErrorCode> {
        let callback = self.grant(caller, fid).await;
        let volume = self.volume(fid.volume)?;
        let status = blocking(move || volume.fetch_status(fid)).await?;
        Ok(Response::Status { status, callback })
    }

    pub(super) async fn fetch_data(
        self: &Arc<Self>,
        caller: Caller,
        fid: Fid,
        offset: u64,
        length: u32,
    ) -> Result<Response, ErrorCode> {
        let callback = self.grant(caller, fid).await;
        let volume = self.volume(fid.volume)?;
        let (status, data) = blocking(move || volume.fetch_data(fid, offset, length)).await?;
        self.stats.record_fetch_data(data.len());
        // The buffer the data file was read into is the reply's raw tail, as it is (the
        // connection sends it as `Data`, a copy, to a peer older than version 4). TLS
        // encrypts in user space, so the bytes cannot go from the file to the socket in
        // the kernel (no `sendfile`): one read into this buffer is the least.
        Ok(Response::DataBulk {
            status,
            callback,
            // Back to the data path's pool once sent.
            data: Bulk::new(proto::buffer_pool::into_bytes(data)),
        })
    }

    pub(super) async fn store_data(
        self: &Arc<Self>,
        caller: Caller,
        fid: Fid,
        offset: u64,
        data: Vec<u8>,
        truncate_to: Option<u64>,
    ) -> Result<Response, ErrorCode> {
        let volume = self.volume(fid.volume)?;
        let status = blocking(move || volume.store_data(fid, offset, &data, truncate_to)).await?;
        self.callbacks.break_callbacks(&[fid], caller.key).await;
        let callback = self.grant(caller, fid).await;
        Ok(Response::Status { status, callback })
    }

    /// A store with a precondition (`StoreDataIf`, `StoreDataBulk`); only a cache
    /// manager's sequenced request carries the client instance it names. A retry of an
    /// applied store is answered from its record, the other holders' promises broken
    /// again (harmless: one broken since was re-granted at an unchanged version at most).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store_data_if(
        self: &Arc<Self>,
        caller: Caller,
        fid: Fid,
        offset: u64,
        data: Bulk,
        base: DataVersion,
        write_back: WriteBackId,
    ) -> Result<Response, ErrorCode> {
        let sequence = caller.sequence.ok_or(ErrorCode::InvalidArgument)?;
        let condition = StoreCondition {
            base,
            write_back,
            sequence,
        };
        let volume = self.volume(fid.volume)?;
        let outcome =
            blocking(move || volume.store_data_if(fid, offset, data.bytes(), condition)).await?;
        self.callbacks.break_callbacks(&[fid], caller.key).await;
        let callback = self.grant(caller, fid).await;
        match outcome {
            Outcome::Applied(status) => Ok(Response::Status { status, callback }),
            Outcome::Replayed(answer) => match *answer {
                Ok(Response::Status { status, .. }) => Ok(Response::Status { status, callback }),
                other => other,
            },
        }
    }

    /// Stores into a data file are acknowledged written but not synced; a cache manager
    /// sends this once after a file's stores, before `close()` returns, so they share one
    /// data sync, which concurrent `Fsync`s of the file share too.
    pub(super) async fn fsync(self: &Arc<Self>, fid: Fid) -> Result<Response, ErrorCode> {
        let volume = self.volume(fid.volume)?;
        let status = blocking(move || volume.fsync(fid)).await?;
        Ok(Response::Status {
            status,
            callback: None,
        })
    }

    pub(super) async fn set_attr(
        self: &Arc<Self>,
        caller: Caller,
        fid: Fid,
        attrs: SetAttrs,
    ) -> Result<Response, ErrorCode> {
        let volume = self.volume(fid.volume)?;
        let status = blocking(move || volume.set_attr(fid, &attrs)).await?;
        self.callbacks.break_callbacks(&[fid], caller.key).await;
        let callback = self.grant(caller, fid).await;
        Ok(Response::Status { status, callback })
    }

    /// The promise is on the entry found, so it is taken after the read: unlike a fetch,
    /// a change between the read and the grant does not break it.
    pub(super) async fn lookup(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        name: String,
    ) -> Result<Response, ErrorCode> {
        let volume = self.volume(dir.volume)?;
        let (status, dir) = blocking(move || volume.lookup(dir, &name)).await?;
        let callback = self.grant(caller, status.fid).await;
        Ok(Response::Entry {
            status,
            callback,
            dir,
        })
    }

    pub(super) async fn read_dir(
        self: &Arc<Self>,
        caller: Caller,
        dir: Fid,
        after: Option<String>,
        count_max: u32,
    ) -> Result<Response, ErrorCode> {
        let callback = self.grant(caller, dir).await;
        let volume = self.volume(dir.volume)?;
        let count = (count_max as usize).clamp(1, READDIR_COUNT_MAX);
        let (dir, entries, more) =
            blocking(move || volume.read_dir(dir, after.as_deref(), count, READDIR_BYTES_MAX))
                .await?;
        Ok(Response::DirPage {
            dir,
            callback,
            entries,
            more,
        })
    }
}
