//! The fileserver's RPC service: maps each request onto the partition's volumes, the
//! callback machinery and the lock service (every request of a cache manager renews its
//! lock lease).
//! Invariant: a changing request replies only after the change is durable (except the
//! bytes a store writes into a data file, durable once an `Fsync` of the file answers)
//! and every other holder of a callback on a changed vnode acknowledged its break or
//! was marked unreachable; the caller keeps (or gets) its own promise and the new status.
//! Boundary: storage errors become wire `ErrorCode`s here; internal errors are logged
//! here, once.

use std::sync::Arc;

use proto::rpc::Connection;
use proto::server::Service;
use proto::{
    CallbackGrant, DataVersion, ErrorCode, Fid, Hello, HelloReply, PeerKind, Request, Response,
    VolumeId,
};
use state::{Admission, ClientKey};
use tracing::{Instrument, debug, debug_span, error, info};

use crate::callbacks::Callbacks;
use crate::locks::{self, Locks, SetLockReply};
use crate::sessions::Sessions;
use crate::stats::Stats;
use crate::storage::{Answer, Outcome, Partition, SequenceKey, StorageError, Volume};

/// Most entries one `ReadDir` returns.
pub const READDIR_COUNT_MAX: usize = 2048;
/// Most bytes of names one `ReadDir` returns, well under the frame limit.
const READDIR_BYTES_MAX: usize = 1 << 20;
/// Most fids one `ReclaimCallbacks` names; a client with more sends several.
const RECLAIM_FIDS_MAX: usize = 8192;

/// The service `proto::server::serve` runs.
pub struct FileService {
    pub(crate) partition: Arc<Partition>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) callbacks: Arc<Callbacks>,
    pub(crate) locks: Arc<Locks>,
    pub(crate) cell: String,
    pub(crate) stats: Arc<Stats>,
}

impl Service for FileService {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        let version = proto::rpc::negotiate(hello, &self.cell)?;
        Ok(HelloReply {
            version,
            server: Some(self.partition.server_id()),
        })
    }

    fn connected(&self, connection: &Connection, hello: &Hello) {
        if let PeerKind::CacheManager { client, instance } = &hello.peer
            && let Some(admission) = self.callbacks.connected(connection, *client, *instance)
        {
            let key = admission.key();
            self.locks.admitted(key, *client, *instance);
            self.locks.touch(key);
            if let Admission::New(_) | Admission::Restarted(_) = admission {
                // A new instance knows nothing of the locks an old one held.
                let released = self.locks.release_client(key);
                if released > 0 {
                    info!(%client, released, "client restarted: its locks are released");
                }
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        hello: Arc<Hello>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        let caller = match &hello.peer {
            PeerKind::CacheManager { client, .. } => {
                let key = self.sessions.wait_ready(&connection, *client).await;
                if let Some(key) = key {
                    self.locks.touch(key);
                }
                key
            }
            PeerKind::Admin | PeerKind::FileServer { .. } => None,
        };
        let (sequence, request) = unwrap_sequenced(&hello.peer, request)?;
        let span = debug_span!("request", peer = %connection.peer_addr());
        async move {
            debug!(?request, ?sequence, "request");
            let answer = self.dispatch(caller, sequence, request).await;
            if let Err(code) = &answer {
                debug!(%code, "refused");
            }
            answer
        }
        .instrument(span)
        .await
    }

    fn disconnected(&self, connection: &Connection, hello: &Hello) {
        if let PeerKind::CacheManager { client, .. } = &hello.peer {
            self.sessions.disconnected(connection, *client);
        }
    }
}

impl FileService {
    async fn dispatch(
        self: &Arc<Self>,
        caller: Option<ClientKey>,
        sequence: Option<SequenceKey>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::FetchStatus { fid } => {
                // Promise first, then read: a change after the read breaks this promise.
                let callback = self.grant(caller, fid).await;
                let volume = self.volume(fid.volume)?;
                let status = blocking(move || volume.fetch_status(fid)).await?;
                Ok(Response::Status { status, callback })
            }
            Request::FetchData {
                fid,
                offset,
                length,
            } => {
                let callback = self.grant(caller, fid).await;
                let volume = self.volume(fid.volume)?;
                let (status, data) =
                    blocking(move || volume.fetch_data(fid, offset, length)).await?;
                self.stats.record_fetch_data(data.len());
                Ok(Response::Data {
                    status,
                    callback,
                    data,
                })
            }
            Request::StoreData {
                fid,
                offset,
                data,
                truncate_to,
            } => {
                let volume = self.volume(fid.volume)?;
                let status =
                    blocking(move || volume.store_data(fid, offset, &data, truncate_to)).await?;
                self.callbacks.break_callbacks(&[fid], caller).await;
                let callback = self.grant(caller, fid).await;
                Ok(Response::Status { status, callback })
            }
            Request::Fsync { fid } => {
                // Stores into a data file are acknowledged written but not synced; a
                // cache manager sends this once after a file's stores, before close()
                // returns, so they share one data sync.
                let volume = self.volume(fid.volume)?;
                let status = blocking(move || volume.fsync(fid)).await?;
                Ok(Response::Status {
                    status,
                    callback: None,
                })
            }
            Request::SetAttr { fid, attrs } => {
                let volume = self.volume(fid.volume)?;
                let status = blocking(move || volume.set_attr(fid, &attrs)).await?;
                self.callbacks.break_callbacks(&[fid], caller).await;
                let callback = self.grant(caller, fid).await;
                Ok(Response::Status { status, callback })
            }
            Request::Lookup { dir, name } => {
                let volume = self.volume(dir.volume)?;
                let (status, dir) = blocking(move || volume.lookup(dir, &name)).await?;
                let callback = self.grant(caller, status.fid).await;
                Ok(Response::Entry {
                    status,
                    callback,
                    dir,
                })
            }
            Request::ReadDir {
                dir,
                after,
                count_max,
            } => {
                let callback = self.grant(caller, dir).await;
                let volume = self.volume(dir.volume)?;
                let count = (count_max as usize).clamp(1, READDIR_COUNT_MAX);
                let (dir, entries, more) = blocking(move || {
                    volume.read_dir(dir, after.as_deref(), count, READDIR_BYTES_MAX)
                })
                .await?;
                Ok(Response::DirPage {
                    dir,
                    callback,
                    entries,
                    more,
                })
            }
            Request::Create {
                dir,
                name,
                mode,
                uid,
                gid,
                exclusive,
            } => {
                let volume = self.volume(dir.volume)?;
                let created = match blocking(move || {
                    volume.create_in(sequence, dir, &name, mode, uid, gid, exclusive)
                })
                .await?
                {
                    Outcome::Applied(created) => created,
                    Outcome::Replayed(answer) => return *answer,
                };
                if created.created {
                    self.callbacks.break_callbacks(&[dir], caller).await;
                }
                Ok(self.entry(caller, created.status, created.dir).await)
            }
            Request::MakeDir {
                dir,
                name,
                mode,
                uid,
                gid,
            } => {
                let volume = self.volume(dir.volume)?;
                let (status, dir_status) =
                    match blocking(move || volume.make_dir_in(sequence, dir, &name, mode, uid, gid)).await? {
                        Outcome::Applied(made) => made,
                        Outcome::Replayed(answer) => return *answer,
                    };
                self.callbacks.break_callbacks(&[dir], caller).await;
                Ok(self.entry(caller, status, dir_status).await)
            }
            Request::Symlink {
                dir,
                name,
                target,
                uid,
                gid,
            } => {
                let volume = self.volume(dir.volume)?;
                let (status, dir_status) =
                    match blocking(move || volume.symlink_in(sequence, dir, &name, &target, uid, gid)).await? {
                        Outcome::Applied(made) => made,
                        Outcome::Replayed(answer) => return *answer,
                    };
                self.callbacks.break_callbacks(&[dir], caller).await;
                Ok(self.entry(caller, status, dir_status).await)
            }
            Request::MakeMountPoint { dir, name, volume } => {
                let store = self.volume(dir.volume)?;
                let (status, dir_status) =
                    match blocking(move || store.make_mount_point_in(sequence, dir, &name, &volume)).await? {
                        Outcome::Applied(made) => made,
                        Outcome::Replayed(answer) => return *answer,
                    };
                self.callbacks.break_callbacks(&[dir], caller).await;
                Ok(self.entry(caller, status, dir_status).await)
            }
            Request::Link { dir, name, target } => {
                if dir.volume != target.volume {
                    return Err(ErrorCode::CrossVolume);
                }
                let volume = self.volume(dir.volume)?;
                let (status, dir_status) =
                    match blocking(move || volume.link_in(sequence, dir, &name, target)).await? {
                        Outcome::Applied(made) => made,
                        Outcome::Replayed(answer) => return *answer,
                    };
                self.callbacks.break_callbacks(&[dir, target], caller).await;
                Ok(self.entry(caller, status, dir_status).await)
            }
            Request::Remove { dir, name } => self.remove(caller, sequence, dir, name, false).await,
            Request::RemoveDir { dir, name } => {
                self.remove(caller, sequence, dir, name, true).await
            }
            Request::Rename {
                from_dir,
                from_name,
                to_dir,
                to_name,
            } => {
                if from_dir.volume != to_dir.volume {
                    return Err(ErrorCode::CrossVolume);
                }
                let volume = self.volume(from_dir.volume)?;
                let renamed = match blocking(move || {
                    volume.rename_in(sequence, from_dir, &from_name, to_dir, &to_name)
                })
                .await?
                {
                    Outcome::Applied(renamed) => renamed,
                    Outcome::Replayed(answer) => return *answer,
                };
                let mut changed = vec![from_dir];
                if to_dir != from_dir {
                    changed.push(to_dir);
                }
                if let Some(replaced) = &renamed.replaced {
                    changed.push(replaced.fid);
                }
                self.callbacks.break_callbacks(&changed, caller).await;
                // Renames grant no promise: the answer is what the record keeps.
                Ok(renamed.answer())
            }
            Request::GiveUpCallbacks { fids } => {
                if let Some(client) = caller {
                    self.callbacks.give_up(client, &fids);
                }
                Ok(Response::Ok)
            }
            Request::SetLock {
                fid,
                owner,
                range,
                kind,
                wait,
                pid,
            } => {
                let client = caller.ok_or(ErrorCode::Unsupported)?;
                let range = locks::checked(range)?;
                match self
                    .locks
                    .set(client, fid, owner, range, kind, wait, pid)
                    .await?
                {
                    SetLockReply::Granted => Ok(Response::Ok),
                    SetLockReply::Queued(wait) => Ok(Response::LockQueued { wait }),
                }
            }
            Request::ReleaseLock { fid, owner, range } => {
                let client = caller.ok_or(ErrorCode::Unsupported)?;
                self.locks
                    .release(client, fid, owner, locks::checked(range)?)
                    .await?;
                Ok(Response::Ok)
            }
            Request::TestLock {
                fid,
                owner,
                range,
                kind,
            } => {
                let client = caller.ok_or(ErrorCode::Unsupported)?;
                let range = locks::checked(range)?;
                let holder = self.locks.test(client, fid, owner, range, kind);
                Ok(Response::LockTest { holder })
            }
            Request::CancelLockWait { wait } => {
                let client = caller.ok_or(ErrorCode::Unsupported)?;
                self.locks.cancel(client, wait);
                Ok(Response::Ok)
            }
            // `handle` renewed the lease already, as for every request.
            Request::RenewLease => {
                caller.ok_or(ErrorCode::Unsupported)?;
                Ok(Response::Ok)
            }
            Request::ReclaimLock {
                fid,
                owner,
                range,
                kind,
                pid,
            } => {
                let client = caller.ok_or(ErrorCode::Unsupported)?;
                let range = locks::checked(range)?;
                self.locks.reclaim(client, fid, owner, range, kind, pid)?;
                Ok(Response::Ok)
            }
            Request::ReclaimDone => {
                let client = caller.ok_or(ErrorCode::Unsupported)?;
                self.locks.reclaim_done(client);
                Ok(Response::Ok)
            }
            Request::ReclaimCallbacks { fids } => self.reclaim_callbacks(caller, fids).await,
            Request::VolumeSpace { volume } => {
                let partition = self.partition.clone();
                let space = blocking(move || partition.space(volume)).await?;
                Ok(Response::VolumeSpace(space))
            }
            Request::CreateVolume {
                id,
                name,
                quota_bytes,
            } => {
                let partition = self.partition.clone();
                let info = blocking(move || partition.create_volume(id, name, quota_bytes)).await?;
                Ok(Response::Volume(info))
            }
            Request::RemoveVolume { id } => {
                let partition = self.partition.clone();
                blocking(move || partition.remove_volume(id)).await?;
                Ok(Response::Ok)
            }
            Request::ListVolumes => {
                let partition = self.partition.clone();
                let infos = blocking(move || {
                    partition
                        .volumes()
                        .iter()
                        .map(|v| v.info())
                        .collect::<Result<Vec<_>, _>>()
                })
                .await?;
                Ok(Response::Volumes(infos))
            }
            Request::ExamineVolume { id } => {
                let volume = self.volume(id)?;
                let info = blocking(move || volume.info()).await?;
                Ok(Response::Volume(info))
            }
            Request::ServerCounters => Ok(Response::Counters(self.stats.counters())),
            Request::BreakCallbacks { .. }
            | Request::ResetCallbacks
            | Request::VlRegisterServer { .. }
            | Request::VlListServers
            | Request::VlCreateEntry { .. }
            | Request::VlRemoveEntry { .. }
            | Request::VlGetEntry { .. }
            | Request::VlListEntries
            | Request::VlJoinPair { .. }
            | Request::VlAcquirePair { .. }
            | Request::VlRenewPair { .. }
            | Request::VlReleasePair { .. }
            | Request::VlGetPair { .. }
            // Pair requests are the member's (`pair::service`); a single server has none.
            | Request::PairSwitchover
            | Request::MemberState
            // Unwrapped in `handle`; a nested one is refused there.
            | Request::Sequenced { .. }
            | Request::LockGranted { .. } => Err(ErrorCode::Unsupported),
        }
    }

    async fn remove(
        self: &Arc<Self>,
        caller: Option<ClientKey>,
        sequence: Option<SequenceKey>,
        dir: Fid,
        name: String,
        directory: bool,
    ) -> Result<Response, ErrorCode> {
        let volume = self.volume(dir.volume)?;
        let removed =
            match blocking(move || volume.remove_in(sequence, dir, &name, directory)).await? {
                Outcome::Applied(removed) => removed,
                Outcome::Replayed(answer) => return *answer,
            };
        // The removed vnode's link count changed: its holders are broken too.
        self.callbacks
            .break_callbacks(&[dir, removed.target.fid], caller)
            .await;
        Ok(removed.answer())
    }

    /// Re-grants the promises a client held before a restart whose data version is
    /// unchanged, and names the rest (changed, gone, or on a missing volume) as broken.
    async fn reclaim_callbacks(
        self: &Arc<Self>,
        caller: Option<ClientKey>,
        fids: Vec<(Fid, DataVersion)>,
    ) -> Result<Response, ErrorCode> {
        let client = caller.ok_or(ErrorCode::Unsupported)?;
        if fids.len() > RECLAIM_FIDS_MAX {
            return Err(ErrorCode::TooLarge);
        }
        let partition = self.partition.clone();
        // A promise first, then the read, as in `FetchStatus`: a change after the read
        // breaks the promise, a change before it shows as a new data version.
        let mut callback = None;
        for &(fid, _) in &fids {
            callback = self.grant(caller, fid).await;
        }
        let unchanged = blocking(move || {
            Ok(fids
                .into_iter()
                .map(|(fid, version)| {
                    let same = partition
                        .volume(fid.volume)
                        .and_then(|volume| volume.fetch_status(fid))
                        .is_ok_and(|status| status.data_version == version);
                    (fid, same)
                })
                .collect::<Vec<_>>())
        })
        .await?;
        let broken: Vec<Fid> = unchanged
            .iter()
            .filter(|(_, same)| !same)
            .map(|(fid, _)| *fid)
            .collect();
        self.callbacks.give_up(client, &broken);
        Ok(Response::CallbacksReclaimed {
            broken,
            callback: callback.unwrap_or(CallbackGrant { lifetime_ms: 0 }),
        })
    }

    fn volume(&self, id: VolumeId) -> Result<Arc<Volume>, ErrorCode> {
        self.partition.volume(id).map_err(|e| e.code())
    }

    async fn grant(self: &Arc<Self>, caller: Option<ClientKey>, fid: Fid) -> Option<CallbackGrant> {
        match caller {
            Some(client) => self.callbacks.grant(client, fid).await,
            None => None,
        }
    }

    /// The reply to a call that made or found an entry; the caller gets a promise on it.
    async fn entry(
        self: &Arc<Self>,
        caller: Option<ClientKey>,
        status: proto::VnodeStatus,
        dir: proto::VnodeStatus,
    ) -> Response {
        let callback = self.grant(caller, status.fid).await;
        Response::Entry {
            status,
            callback,
            dir,
        }
    }
}

/// Splits a `Sequenced` request into its key and the request it carries. Only a cache
/// manager has a sequence (its client and instance make the key), and only a namespace
/// change is sequenced (so never a `Sequenced` inside another).
fn unwrap_sequenced(
    peer: &PeerKind,
    request: Request,
) -> Result<(Option<SequenceKey>, Request), ErrorCode> {
    let Request::Sequenced { seq, request } = request else {
        return Ok((None, request));
    };
    let PeerKind::CacheManager { client, instance } = peer else {
        return Err(ErrorCode::Unsupported);
    };
    if !request.needs_sequence() {
        return Err(ErrorCode::InvalidArgument);
    }
    let key = SequenceKey {
        client: *client,
        instance: *instance,
        seq,
    };
    Ok((Some(key), *request))
}

/// Runs a storage operation on a blocking thread and maps its error for the wire.
/// Refusals are normal answers; anything else is server trouble and logged here.
async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, ErrorCode> {
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            if e.is_fenced() {
                // Expected while a pair member loses its lease; the member answers
                // `NotActive` in place of this.
                debug!(error = %e, "storage write fenced");
            } else if !e.is_refusal() {
                error!(error = %e, "storage operation failed");
            }
            Err(e.code())
        }
        Err(e) => {
            error!(error = %e, "storage task failed");
            Err(ErrorCode::Internal("storage task failed".into()))
        }
    }
}
