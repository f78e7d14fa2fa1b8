//! The fileserver's RPC service: admits cache managers, renews their lock lease on every
//! request, and sends each request to the family that handles it.
//! Invariant: a volume change replies only once its metadata is durable and every other
//! holder of a promise on what it changed answered its break or was marked unreachable.

mod access;
mod files;
mod locking;
mod namespace;
mod promises;
mod volumes;

use std::sync::Arc;
use std::time::Instant;

use proto::Identity;
use proto::rpc::Connection;
use proto::server::Service;
use proto::{
    CallbackGrant, ErrorCode, Fid, Hello, HelloReply, PeerKind, Request, Response, VolumeId,
};
use state::{Admission, ClientKey};
use tracing::{Instrument, debug, debug_span, error, info};

use crate::callbacks::Callbacks;
use crate::locks::Locks;
use crate::sessions::Sessions;
use crate::stats::Stats;
use crate::storage::{Partition, SequenceKey, StorageError, Volume};
use locking::LockRequest;
use namespace::Perms;

/// The service `proto::server::serve` runs.
pub struct FileService {
    pub(crate) partition: Arc<Partition>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) callbacks: Arc<Callbacks>,
    pub(crate) locks: Arc<Locks>,
    pub(crate) cell: String,
    pub(crate) stats: Arc<Stats>,
    /// False only for the bench figure that measures what the checks cost.
    pub(crate) access_checks: bool,
}

/// Who sent a request: a cache manager's key (`None` for an admin or a fileserver), and
/// the sequence of a namespace change it tagged for replay.
#[derive(Clone, Copy, Debug)]
struct Caller {
    key: Option<ClientKey>,
    sequence: Option<SequenceKey>,
}

impl Caller {
    /// The cache manager asking; lock and reclaim requests come from no one else.
    fn client(self) -> Result<ClientKey, ErrorCode> {
        self.key.ok_or(ErrorCode::Unsupported)
    }
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
        identity: Arc<Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        // Where time goes: decode to reply, by the kind of request a `Sequenced` carries.
        let started = Instant::now();
        let key = match &hello.peer {
            PeerKind::CacheManager { client, .. } => {
                let key = self.sessions.wait_ready(&connection, *client).await;
                if let Some(key) = key {
                    self.locks.touch(key);
                }
                key
            }
            PeerKind::Admin | PeerKind::FileServer { .. } | PeerKind::VldbReplica { .. } => None,
        };
        let (sequence, request) = unwrap_sequenced(&hello.peer, request)?;
        let caller = Caller { key, sequence };
        let kind = request.kind_name();
        let stats = self.stats.clone();
        let span = debug_span!("request", peer = %connection.peer_addr());
        let answer = async move {
            debug!(?request, ?sequence, user = identity.name(), "request");
            // Special files and unlinked statuses shown as an older peer understands.
            let version = connection.version();
            let answer = self
                .checked(&identity, caller, request)
                .await
                .map(|response| response.for_version(version));
            if let Err(code) = &answer {
                debug!(%code, "refused");
            }
            answer
        }
        .instrument(span)
        .await;
        stats.record_request(kind, started.elapsed());
        answer
    }

    fn disconnected(&self, connection: &Connection, hello: &Hello) {
        if let PeerKind::CacheManager { client, .. } = &hello.peer {
            self.sessions.disconnected(connection, *client);
        }
    }
}

impl FileService {
    /// Runs `request` for `identity` once `authorize` passed it; the access-list
    /// requests answer for the identity themselves.
    async fn checked(
        self: &Arc<Self>,
        identity: &Identity,
        caller: Caller,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        let (request, after) = match request {
            Request::FetchAcl { dir } => return self.fetch_acl(identity, dir).await,
            Request::StoreAcl { dir, acl } => {
                return self.store_acl(identity, caller, dir, acl).await;
            }
            Request::FetchRights { fid } => return self.fetch_rights(identity, caller, fid).await,
            // Volumes are the cell's: made and removed by administrators (`vos`), or by
            // a server of the cell.
            Request::CreateVolume { .. } | Request::RemoveVolume { .. }
                if !identity.may_administer_cell() =>
            {
                return Err(ErrorCode::AdministratorRequired);
            }
            request if self.access_checks => self.authorize(identity, request).await?,
            request => (request, access::After::default()),
        };
        let answer = self.dispatch(caller, request).await;
        self.after(caller, after, answer).await
    }

    async fn dispatch(
        self: &Arc<Self>,
        caller: Caller,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        match request {
            Request::Ping => Ok(Response::Pong),

            // Files and directories read and written in place (`files`).
            Request::FetchStatus { fid } => self.fetch_status(caller, fid).await,
            Request::FetchData {
                fid,
                offset,
                length,
            } => self.fetch_data(caller, fid, offset, length).await,
            Request::StoreData {
                fid,
                offset,
                data,
                truncate_to,
            } => self.store_data(caller, fid, offset, data, truncate_to).await,
            Request::StoreDataIf {
                fid,
                offset,
                data,
                base,
                write_back,
            } => {
                self.store_data_if(caller, fid, offset, data.into(), base, write_back)
                    .await
            }
            Request::StoreDataBulk {
                fid,
                offset,
                base,
                write_back,
                data,
            } => {
                self.store_data_if(caller, fid, offset, data, base, write_back)
                    .await
            }
            Request::Fsync { fid } => self.fsync(fid).await,
            Request::SetAttr { fid, attrs } => self.set_attr(caller, fid, attrs).await,
            Request::Lookup { dir, name } => self.lookup(caller, dir, name).await,
            Request::ReadDir {
                dir,
                after,
                count_max,
            } => self.read_dir(caller, dir, after, count_max).await,

            // Namespace changes, answered from their record when retried (`namespace`).
            Request::Create {
                dir,
                name,
                mode,
                uid,
                gid,
                exclusive,
            } => {
                let perms = Perms { mode, uid, gid };
                self.create(caller, dir, name, perms, exclusive).await
            }
            Request::MakeDir {
                dir,
                name,
                mode,
                uid,
                gid,
            } => self.make_dir(caller, dir, name, Perms { mode, uid, gid }).await,
            Request::MakeNode {
                dir,
                name,
                kind,
                mode,
                uid,
                gid,
            } => {
                let perms = Perms { mode, uid, gid };
                self.make_node(caller, dir, name, kind, perms).await
            }
            Request::CreateWithData {
                dir,
                name,
                mode,
                uid,
                gid,
                data,
            } => {
                let perms = Perms { mode, uid, gid };
                self.create_with_data(caller, dir, name, perms, data).await
            }
            Request::StoreNewFile {
                fid,
                base,
                attrs,
                data,
            } => self.store_new_file(caller, fid, base, data, attrs).await,
            Request::Symlink {
                dir,
                name,
                target,
                uid,
                gid,
            } => self.symlink(caller, dir, name, target, uid, gid).await,
            Request::MakeMountPoint { dir, name, volume } => {
                self.make_mount_point(caller, dir, name, volume).await
            }
            Request::Link { dir, name, target } => self.link(caller, dir, name, target).await,
            Request::Remove { dir, name } => self.remove(caller, dir, name, false).await,
            Request::RemoveDir { dir, name } => self.remove(caller, dir, name, true).await,
            Request::Rename {
                from_dir,
                from_name,
                to_dir,
                to_name,
            } => {
                self.rename(caller, (from_dir, from_name), (to_dir, to_name))
                    .await
            }

            // Callback promises given up and reclaimed (`promises`).
            Request::GiveUpCallbacks { fids } => Ok(self.give_up(caller, &fids)),
            Request::ReclaimCallbacks { fids } => self.reclaim_callbacks(caller, fids).await,

            // Locks, the lease and lock reclaim (`locking`).
            Request::SetLock {
                fid,
                owner,
                range,
                kind,
                wait,
                pid,
            } => {
                let lock = LockRequest { fid, owner, range, kind, pid };
                self.set_lock(caller, lock, wait).await
            }
            Request::ReleaseLock { fid, owner, range } => {
                self.release_lock(caller, fid, owner, range).await
            }
            Request::TestLock {
                fid,
                owner,
                range,
                kind,
            } => self.test_lock(caller, fid, owner, range, kind),
            Request::CancelLockWait { wait } => self.cancel_lock_wait(caller, wait).await,
            // `handle` renewed the lease already, as for every request.
            Request::RenewLease => caller.client().map(|_| Response::Ok),
            Request::ReclaimLock {
                fid,
                owner,
                range,
                kind,
                pid,
            } => self.reclaim_lock(caller, LockRequest { fid, owner, range, kind, pid }),
            Request::ReclaimDone => self.reclaim_done(caller),

            // Volume administration and counters (`volumes`).
            Request::VolumeSpace { volume } => self.volume_space(volume).await,
            Request::CreateVolume {
                id,
                name,
                quota_bytes,
            } => self.create_volume(id, name, quota_bytes).await,
            Request::RemoveVolume { id } => self.remove_volume(id).await,
            Request::ListVolumes => self.list_volumes().await,
            Request::ExamineVolume { id } => self.examine_volume(id).await,
            Request::ServerCounters => Ok(Response::Counters(self.stats.counters())),
            Request::ServerFigures => Ok(Response::Figures(self.stats.figures())),

            // Answered by `checked`, which knows the caller's identity.
            Request::FetchAcl { .. } | Request::StoreAcl { .. } | Request::FetchRights { .. } => {
                Err(ErrorCode::Unsupported)
            }

            // Not a fileserver's to answer.
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
            | Request::VlRaft { .. }
            | Request::VlStatus
            | Request::VlAddMember { .. }
            | Request::VlRemoveMember { .. }
            // The protection database is the VLDB's.
            | Request::PtsCreateUser { .. }
            | Request::PtsSetPassword { .. }
            | Request::PtsCreateGroup { .. }
            | Request::PtsAddUser { .. }
            | Request::PtsRemoveUser { .. }
            | Request::PtsDelete { .. }
            | Request::PtsMembership { .. }
            | Request::PtsListEntries
            | Request::Login { .. }
            // Pair requests are the member's (`pair::service`); a single server has none.
            | Request::PairSwitchover
            | Request::MemberState
            // Unwrapped in `handle`; a nested one is refused there.
            | Request::Sequenced { .. }
            | Request::LockGranted { .. } => Err(ErrorCode::Unsupported),
        }
    }

    fn volume(&self, id: VolumeId) -> Result<Arc<Volume>, ErrorCode> {
        self.partition.volume(id).map_err(|e| e.code())
    }

    /// A promise on `fid` for a cache manager caller; none for anyone else.
    async fn grant(self: &Arc<Self>, caller: Caller, fid: Fid) -> Option<CallbackGrant> {
        match caller.key {
            Some(client) => self.callbacks.grant(client, fid).await,
            None => None,
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

/// Runs a storage operation on a blocking thread and maps its error for the wire: the
/// one place storage errors become `ErrorCode`s. Refusals are normal answers; anything
/// else is server trouble and logged here, once.
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
