//! Messages: the handshake, the frame envelope, and every request and response of the
//! fileserver, VLDB and callback (server-to-client) services.
//! Invariant: enum variants are only appended, never reordered or removed, since postcard
//! encodes a variant by its index; `tests/golden.rs` pins the bytes of each message.

use serde::{Deserialize, Serialize};

use crate::bulk::Bulk;
use crate::error::ErrorCode;
pub use crate::time::Timestamp;

use crate::identity::{AccessList, PrincipalId, Rights, SealedToken};
use crate::ids::{
    ClientId, DataVersion, Epoch, Fid, InstanceNonce, LockOwnerId, RequestId, ServerId, VolumeId,
    WaitId, WriteBackId,
};
use crate::lock::{ByteRange, LockKind};
use crate::name::{PairName, VolumeName};

/// The protocol versions this build speaks. Version 2 adds `Frame::Goodbye` and
/// `Request::StoreDataIf` (with `ErrorCode::StoreOutdated`); version 3 adds identity
/// (tokens on requests, users and groups, access lists) and special files; version 4
/// the data path (bulk data carried raw, small files created with their bytes, latency
/// figures). Nothing new is ever sent on a connection that negotiated an older version
/// (`Connection::version`).
pub const PROTOCOL_VERSION_MIN: u16 = 1;
pub const PROTOCOL_VERSION_MAX: u16 = 4;

/// The first version with `Frame::Goodbye` and `Request::StoreDataIf`.
pub const PROTOCOL_VERSION_GOODBYE_AND_CONDITIONAL_STORES: u16 = 2;

/// The first version with identity (tokens, users and groups, access lists) and special
/// files (FIFOs, sockets, device nodes).
pub const PROTOCOL_VERSION_IDENTITY: u16 = 3;

/// The first version of the faster data path: bulk data carried raw after a small
/// header, a small file created together with its bytes, and latency histograms.
pub const PROTOCOL_VERSION_DATA_PATH: u16 = 4;

/// The first frame on every connection, sent by the connecting side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    /// The cell the connecting side believes it talks to.
    pub cell: String,
    pub peer: PeerKind,
}

/// Who is connecting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerKind {
    /// A cache manager: it holds callbacks, and the server may call it back.
    CacheManager {
        client: ClientId,
        instance: InstanceNonce,
    },
    /// An administrative tool (`vos`, `fs`, tests).
    Admin,
    /// A fileserver talking to the VLDB or to its partner.
    FileServer { server: ServerId },
    /// A VLDB replica talking to another (Raft messages).
    VldbReplica { id: u64 },
}

/// The accepting side's answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The version both sides speak from now on.
    pub version: u16,
    /// The answering fileserver's identity, if it is one.
    pub server: Option<ServerId>,
}

/// The envelope of every frame on a connection. Both sides may send requests: the
/// direction of a response is implied by the id space of the side that sent the request.
// Messages are short-lived values built once per call; boxing variants would only
// complicate every construction site.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    Hello(Hello),
    HelloReply(Result<HelloReply, ErrorCode>),
    Request {
        id: RequestId,
        body: Request,
    },
    Response {
        id: RequestId,
        body: Result<Response, ErrorCode>,
    },
    /// The sender takes no new request on this connection: it answers those already
    /// sent to it, then closes. A server says it to a connection it closes for being idle
    /// or to make room; the peer sends nothing new and opens another connection.
    Goodbye,
    /// A request made for the holder of `token` (version 3): the server verifies the
    /// token, once per connection, and acts for its user. A plain `Request` acts for
    /// `system:anyuser`, or for the server whose certificate the peer showed.
    AuthRequest {
        id: RequestId,
        token: SealedToken,
        body: Request,
    },
}

/// What kind of object a vnode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    /// A mount point: its data is the volume name it shows (`#name.` as in AFS).
    MountPoint,

    // ---- special files, appended in protocol version 3 ----
    // No data: the kernel of the machine that opens one serves it (a pipe, a socket's
    // rendezvous, a device of that machine); the server only keeps the entry.
    /// A named pipe (`mkfifo`).
    Fifo,
    /// A UNIX domain socket's name (`bind`).
    Socket,
    /// A character device node; `rdev` is the device number as Linux encodes it
    /// (`makedev`).
    CharDevice {
        rdev: u64,
    },
    /// A block device node; `rdev` as for `CharDevice`.
    BlockDevice {
        rdev: u64,
    },
}

/// A vnode's status, as returned by every call that fetches or changes one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnodeStatus {
    pub fid: Fid,
    pub kind: FileKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub link_count: u32,
    pub size: u64,
    pub data_version: DataVersion,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

/// A callback promise as the server grants it: valid for `lifetime_ms` from when the
/// client sent the request (the client measures from its own send time, so it errs early).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackGrant {
    pub lifetime_ms: u64,
}

/// A directory entry as listed by `ReadDir`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub fid: Fid,
    pub kind: FileKind,
}

/// Attributes to change in `SetAttr`; `None` leaves one as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttrs {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

/// A volume's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VolumeType {
    ReadWrite,
    ReadOnly,
    Backup,
}

/// A volume as its fileserver sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: VolumeName,
    pub kind: VolumeType,
    /// Bytes of file data stored in the volume.
    pub bytes_used: u64,
    /// Quota in bytes; 0 means no quota.
    pub quota_bytes: u64,
    pub file_count: u64,
    pub created: Timestamp,
}

/// A fileserver as the VLDB records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    pub server: ServerId,
    pub addresses: Vec<String>,
    pub registered: Timestamp,
}

/// Where a volume lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSite {
    pub server: ServerId,
    pub kind: VolumeType,
}

/// A VLDB entry: a RW volume, its replica and backup ids, and its sites.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEntry {
    pub name: VolumeName,
    pub rw_id: VolumeId,
    pub ro_id: Option<VolumeId>,
    pub backup_id: Option<VolumeId>,
    pub sites: Vec<VolumeSite>,
}

/// Names a volume by name or by id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeRef {
    Name(VolumeName),
    Id(VolumeId),
}

/// Space figures for `statfs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpace {
    pub bytes_used: u64,
    /// The quota, or the partition's size when the volume has none.
    pub bytes_total: u64,
    pub bytes_free: u64,
    pub file_count: u64,
}

/// Every request of every Holdfast service. A server answers `Unsupported` to the
/// requests that are not its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness check; any server answers `Pong`.
    Ping,

    // ---- fileserver, called by cache managers ----
    /// Status of a vnode; grants a callback.
    FetchStatus {
        fid: Fid,
    },
    /// A byte range of a file, symlink or mount point; grants a callback.
    FetchData {
        fid: Fid,
        offset: u64,
        length: u32,
    },
    /// Writes a byte range; `truncate_to` first sets the length (for a store after a
    /// truncate). Increases the data version once. Breaks other holders' callbacks.
    StoreData {
        fid: Fid,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        truncate_to: Option<u64>,
    },
    SetAttr {
        fid: Fid,
        attrs: SetAttrs,
    },
    Lookup {
        dir: Fid,
        name: String,
    },
    /// Lists a directory in name order, starting after `after`.
    ReadDir {
        dir: Fid,
        after: Option<String>,
        count_max: u32,
    },
    Create {
        dir: Fid,
        name: String,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    },
    MakeDir {
        dir: Fid,
        name: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Remove {
        dir: Fid,
        name: String,
    },
    RemoveDir {
        dir: Fid,
        name: String,
    },
    Rename {
        from_dir: Fid,
        from_name: String,
        to_dir: Fid,
        to_name: String,
    },
    Symlink {
        dir: Fid,
        name: String,
        target: String,
        uid: u32,
        gid: u32,
    },
    Link {
        dir: Fid,
        name: String,
        target: Fid,
    },
    /// Creates a mount point for `volume` named `name` in `dir`.
    MakeMountPoint {
        dir: Fid,
        name: String,
        volume: VolumeName,
    },
    /// The client drops these callbacks (cache eviction).
    GiveUpCallbacks {
        fids: Vec<Fid>,
    },
    VolumeSpace {
        volume: VolumeId,
    },

    // ---- callback service, called by a fileserver on a cache manager ----
    /// Break these callbacks; the client answers `Ok` once it has dropped them.
    BreakCallbacks {
        fids: Vec<Fid>,
    },
    /// Drop every callback from this server and revalidate by data version.
    ResetCallbacks,

    // ---- fileserver administration (vos) ----
    CreateVolume {
        id: VolumeId,
        name: VolumeName,
        quota_bytes: u64,
    },
    RemoveVolume {
        id: VolumeId,
    },
    ListVolumes,
    ExamineVolume {
        id: VolumeId,
    },

    // ---- VLDB ----
    /// A fileserver announces itself; re-registering updates its addresses.
    VlRegisterServer {
        server: ServerId,
        addresses: Vec<String>,
    },
    VlListServers,
    /// Creates an entry for a new RW volume on `server`, allocating its id.
    VlCreateEntry {
        name: VolumeName,
        server: ServerId,
    },
    VlRemoveEntry {
        volume: VolumeRef,
    },
    VlGetEntry {
        volume: VolumeRef,
    },
    VlListEntries,

    // ---- fileserver, appended ----
    /// Makes every acknowledged `StoreData` of this file durable (fdatasync) before
    /// answering with its status. A cache manager sends it once after the stores of a
    /// close or fsync, so a large write-back shares one sync instead of one per store.
    Fsync {
        fid: Fid,
    },

    // ---- locks (fileserver), appended ----
    /// Takes an advisory byte-range lock on `range` (an empty one is `InvalidArgument`)
    /// for `owner` of the calling client. Answers `Ok` when granted, `LockQueued`
    /// when `wait` and it conflicts (the server later sends `LockGranted`), or
    /// `ErrorCode::WouldBlock` when it conflicts and `wait` is false.
    SetLock {
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
        kind: LockKind,
        wait: bool,
        /// The requesting process, reported to others by `TestLock`.
        pid: u32,
    },
    /// Releases `owner`'s locks within `range`.
    ReleaseLock {
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
    },
    /// Which lock, if any, would conflict with this one (F_GETLK).
    TestLock {
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
        kind: LockKind,
    },
    /// Withdraws a queued lock request.
    CancelLockWait {
        wait: WaitId,
    },
    /// Renews the caller's lease (any other request renews it too).
    RenewLease,
    /// Server to client: the queued request `wait` is now granted.
    LockGranted {
        wait: WaitId,
        fid: Fid,
    },

    // ---- reclaim after a fileserver restart or takeover, appended ----
    /// The callbacks a client believes it holds, with the data versions it cached. The
    /// server re-grants those whose DV is unchanged and reports the rest as broken.
    ReclaimCallbacks {
        fids: Vec<(Fid, DataVersion)>,
    },
    /// Reclaims a lock the client held before the restart; only its recorded owner can.
    ReclaimLock {
        fid: Fid,
        owner: LockOwnerId,
        range: ByteRange,
        kind: LockKind,
        pid: u32,
    },
    /// The client has reclaimed everything it held: grace may end early.
    ReclaimDone,

    // ---- administration, appended ----
    /// A server's counters (requests served, bytes, table sizes), for admins and tests.
    ServerCounters,

    // ---- fileserver pairs, appended ----
    /// A fileserver started with `--pair` joins `pair` as the member reachable at
    /// `member`, serving the partition whose server id is `server` (both members of a
    /// pair share the partition, hence the id). A pair has at most two members;
    /// joining again is a no-op.
    VlJoinPair {
        pair: PairName,
        server: ServerId,
        member: String,
    },
    /// Compare-and-set of the pair's lease: granted to `member` for `lease_ms` (measured
    /// on the VLDB's clock from when it handles the call) only if the pair is still at
    /// `epoch` and its lease has expired or was handed to `member`. The new epoch is
    /// `epoch + 1`, durable before the answer. Refused with `LeaseHeld`.
    VlAcquirePair {
        pair: PairName,
        member: String,
        epoch: Epoch,
        lease_ms: u64,
    },
    /// The active member renews its lease for `lease_ms` from now. Refused with
    /// `LeaseLost` once the lease has expired or the epoch moved on.
    VlRenewPair {
        pair: PairName,
        member: String,
        epoch: Epoch,
        lease_ms: u64,
    },
    /// The active member gives its lease up at once (planned switchover), naming the
    /// member that may take it without waiting.
    VlReleasePair {
        pair: PairName,
        member: String,
        epoch: Epoch,
        successor: Option<String>,
    },
    VlGetPair {
        pair: PairName,
    },
    /// Admin to the active member of a pair: hand the volumes and the callback and lock
    /// state over to the partner cleanly. Answered once the partner is active.
    PairSwitchover,
    /// Admin to any fileserver: its role, epoch and grace state.
    MemberState,
    /// A mutating request tagged with the client's sequence number. The server records
    /// the outcome with the change itself, so the same `seq` sent again (a retry after a
    /// failover) is answered from that record and never applied twice.
    Sequenced {
        seq: u64,
        request: Box<Request>,
    },

    // ---- VLDB replicas (Raft), appended ----
    /// Replica to replica: one Raft message (append entries, vote, snapshot chunk), in
    /// the VLDB's own encoding; `proto` carries it without looking inside.
    VlRaft {
        kind: RaftKind,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Any VLDB replica: its id, role, term, log and applied index, and whom it follows.
    VlStatus,
    /// To the leader: add replica `id` at `address`, as a learner that catches up first,
    /// then as a voter. Answered once the new membership is committed.
    VlAddMember {
        id: u64,
        address: String,
    },
    /// To the leader: remove replica `id` from the voters (joint consensus).
    VlRemoveMember {
        id: u64,
    },

    // ---- fileserver, appended ----
    /// `StoreData` with a precondition: applied only if the file is still at `base`, the
    /// version the client's write-back started from, or if every change since `base` was
    /// a store of this client instance's write-backs numbered up to `write_back` (its own
    /// pipelined stores, or an older write-back's that landed late). Otherwise refused
    /// with `StoreOutdated`, storing nothing: a store abandoned on a timeout cannot land
    /// after a newer truncate or store. `write_back` numbers the client's write-backs,
    /// increasing within its instance. Sent as `Sequenced`: a retry after a failover is
    /// answered from the record, never refused by its own first attempt. All or nothing:
    /// a store that fails leaves the file's size, data version and bytes as they were.
    StoreDataIf {
        fid: Fid,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        base: DataVersion,
        write_back: WriteBackId,
    },

    // ---- access lists (fileserver), version 3, appended ----
    /// A directory's access list (needs `l` on it); answered with `Acl`.
    FetchAcl {
        dir: Fid,
    },
    /// Replaces a directory's access list (needs `a` on it). Increases the directory's
    /// data version and breaks its callbacks, so every cached right for it is dropped.
    /// Answered with the directory's new `Status`.
    StoreAcl {
        dir: Fid,
        acl: AccessList,
    },
    /// The caller's rights on the directory that governs `fid` (a directory itself, a
    /// file's parent), for a cache manager to check cached opens without a call. Grants
    /// a callback on that directory, under which the rights stay valid; answered with
    /// `Rights`.
    FetchRights {
        fid: Fid,
    },

    // ---- the protection database (VLDB), version 3, appended ----
    /// Creates a user, with the id given or the next free one, and a password if given
    /// (administrators only). Answered with the new `PtsEntry`.
    PtsCreateUser {
        name: String,
        id: Option<PrincipalId>,
        password: Option<Password>,
    },
    /// Sets a user's password: the user itself (with its token) or an administrator.
    PtsSetPassword {
        user: String,
        password: Password,
    },
    /// Creates a group, `name` or `owner:name`, with the id given or the next free one
    /// (administrators only). Answered with the new `PtsEntry`.
    PtsCreateGroup {
        name: String,
        id: Option<PrincipalId>,
    },
    /// Adds a user to a group (administrators only).
    PtsAddUser {
        user: String,
        group: String,
    },
    /// Removes a user from a group (administrators only).
    PtsRemoveUser {
        user: String,
        group: String,
    },
    /// Deletes a user or a group, and every membership it had (administrators only).
    PtsDelete {
        name: String,
    },
    /// A user's groups, or a group's members: answered with `PtsEntries`.
    PtsMembership {
        name: String,
    },
    /// Every user and group, built-in groups included: answered with `PtsEntries`.
    PtsListEntries,
    /// A token for `user` if `password` is its password, signed by the cell's key, with
    /// the user's groups and a lifetime of at most the VLDB's maximum (25 h unless
    /// configured). Answered with `Token`; a wrong password and an unknown user get the
    /// same `PermissionDenied`, after the same delay.
    Login {
        user: String,
        password: Password,
        lifetime_secs: Option<u64>,
    },

    // ---- fileserver, appended in protocol version 3 ----
    /// Makes a special file (`kind` a FIFO, socket or device node) named `name` in
    /// `dir`; answered as `MakeDir`. Any other kind is `InvalidArgument`: files,
    /// directories and links have their own requests.
    MakeNode {
        dir: Fid,
        name: String,
        kind: FileKind,
        mode: u32,
        uid: u32,
        gid: u32,
    },

    // ---- appended in protocol version 4 ----
    /// A fileserver's counters and latency histograms (by request kind, storage
    /// commits, the log's fsyncs and group sizes), answered with `Figures`.
    ServerFigures,
    /// `StoreDataIf` with its bytes carried raw after the message (`Bulk`): the same
    /// precondition, sequencing and all-or-nothing store. A cache manager sends it on a
    /// connection of version 4 or later; before that it goes as `StoreDataIf`
    /// (`Request::as_sent_to`).
    StoreDataBulk {
        fid: Fid,
        offset: u64,
        base: DataVersion,
        write_back: WriteBackId,
        data: Bulk,
    },
    /// Creates the file `name` in `dir` holding `data` (at most `CREATE_DATA_BYTES_MAX`
    /// bytes), entry and bytes in one durable transaction: a small file written and
    /// closed costs this one request instead of `Create`, `StoreDataIf` and `Fsync`.
    /// Checked and owned as `Create`; a name that exists is `Exists` and nothing
    /// changes, whatever it names. Answered as `Create`, with an `Entry`. Sequenced.
    CreateWithData {
        dir: Fid,
        name: String,
        mode: u32,
        uid: u32,
        gid: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Fills the file `fid`, which its sender created and has not written since, with
    /// `data` (at most `CREATE_DATA_BYTES_MAX` bytes, replacing any) and then `attrs`
    /// (`size` must be `None`), bytes and attributes in one durable transaction: a file
    /// made by an exclusive create (`tar x`, `cp`, lock files) and written, chmodded and
    /// timed before its close costs this one request at the close instead of
    /// `StoreDataIf`, `SetAttr`s and `Fsync`. Only while the file is at `base` and
    /// holds its bytes inline; else `StoreOutdated` (the sender stores the usual way).
    /// Checked as a store and a `SetAttr`; answered with a `Status`. Sequenced.
    StoreNewFile {
        fid: Fid,
        base: DataVersion,
        attrs: SetAttrs,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

/// Most bytes a `Request::CreateWithData` carries: a file up to this size is created
/// with its bytes when it is closed (the fileserver keeps such a file inline).
pub const CREATE_DATA_BYTES_MAX: u32 = 64 * 1024;

/// A password as it travels to the VLDB: a string whose `Debug` never shows it, so that
/// no request log line carries one.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Password(<{} bytes>)", self.0.len())
    }
}

/// A user or a group of the protection database, as `pts` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtsEntry {
    pub name: String,
    /// Positive for a user, negative for a group.
    pub id: PrincipalId,
    /// The group's owner (a user for `owner:name` groups); `system:administrators` for
    /// users, built-in groups and other groups.
    pub owner: PrincipalId,
}

/// Which Raft message a `Request::VlRaft` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl Request {
    /// True for the changes a retry would not reproduce (a second `Create` finds the
    /// file, a second `Rename` finds no source, a second `StoreDataIf` finds the version
    /// its first attempt made): the cache manager sends these as `Sequenced` so a retry
    /// after a failover is answered from the recorded outcome. A plain store or setattr
    /// sent twice leaves the same bytes and attributes, so they go as they are.
    /// The lowest protocol version that has this request.
    pub fn version_min(&self) -> u16 {
        match self {
            Request::StoreDataIf { .. } => PROTOCOL_VERSION_GOODBYE_AND_CONDITIONAL_STORES,
            Request::FetchAcl { .. } | Request::StoreAcl { .. } | Request::FetchRights { .. } => {
                PROTOCOL_VERSION_IDENTITY
            }
            Request::PtsCreateUser { .. }
            | Request::PtsSetPassword { .. }
            | Request::PtsCreateGroup { .. }
            | Request::PtsAddUser { .. }
            | Request::PtsRemoveUser { .. }
            | Request::PtsDelete { .. }
            | Request::PtsMembership { .. }
            | Request::PtsListEntries
            | Request::Login { .. } => PROTOCOL_VERSION_IDENTITY,
            Request::MakeNode { .. } => PROTOCOL_VERSION_IDENTITY,
            Request::ServerFigures => PROTOCOL_VERSION_DATA_PATH,
            Request::StoreDataBulk { .. } => PROTOCOL_VERSION_DATA_PATH,
            Request::CreateWithData { .. } => PROTOCOL_VERSION_DATA_PATH,
            Request::StoreNewFile { .. } => PROTOCOL_VERSION_DATA_PATH,
            Request::Sequenced { request, .. } => request.version_min(),
            _ => 1,
        }
    }

    pub fn needs_sequence(&self) -> bool {
        matches!(
            self,
            Request::Create { .. }
                | Request::MakeDir { .. }
                | Request::Remove { .. }
                | Request::RemoveDir { .. }
                | Request::Rename { .. }
                | Request::Symlink { .. }
                | Request::Link { .. }
                | Request::MakeMountPoint { .. }
                | Request::StoreDataIf { .. }
                | Request::MakeNode { .. }
                | Request::StoreDataBulk { .. }
                | Request::CreateWithData { .. }
                | Request::StoreNewFile { .. }
        )
    }

    /// True for the VLDB requests a client may send again after a transport failure,
    /// when it cannot know whether the first one reached the VLDB: reads, `Ping`,
    /// `VlStatus`, `VlRegisterServer` and `VlJoinPair` (applying them twice is applying
    /// them once) and `VlRenewPair` (a second renewal is harmless: the member measures
    /// its lease from its own send time). Every other request, a `VlCreateEntry` that
    /// would allocate a second volume or a `VlAcquirePair` whose second answer would be
    /// `LeaseHeld` by the caller itself, for instance, must go to the caller's own
    /// policy instead. A `NotLeader` answer is not such a failure: nothing was applied.
    pub fn safe_to_resend(&self) -> bool {
        matches!(
            self,
            Request::Ping
                | Request::VlStatus
                | Request::VlGetEntry { .. }
                | Request::VlListEntries
                | Request::VlListServers
                | Request::VlGetPair { .. }
                | Request::VlRegisterServer { .. }
                | Request::VlJoinPair { .. }
                | Request::VlRenewPair { .. }
                | Request::PtsMembership { .. }
                | Request::PtsListEntries
                | Request::Login { .. }
        )
    }

    /// True for every request that changes a volume's contents, including a sequenced one.
    pub fn changes_volume(&self) -> bool {
        match self {
            Request::StoreData { .. } | Request::SetAttr { .. } | Request::Fsync { .. } => true,
            Request::Sequenced { request, .. } => request.changes_volume(),
            other => other.needs_sequence(),
        }
    }
}

/// Every response. `Err(ErrorCode)` travels beside it in `Frame::Response`.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Ok,
    Pong,
    Status {
        status: VnodeStatus,
        callback: Option<CallbackGrant>,
    },
    Data {
        status: VnodeStatus,
        callback: Option<CallbackGrant>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The result of a lookup or of a call that made an entry: the entry's status and
    /// the directory's status after the call.
    Entry {
        status: VnodeStatus,
        callback: Option<CallbackGrant>,
        dir: VnodeStatus,
    },
    /// The result of remove/rmdir: the directory's new status and the removed vnode's
    /// new status: `link_count` 0 when that was its last name (from protocol version 3;
    /// an older peer gets `None` then, see `Response::for_version`).
    Removed {
        dir: VnodeStatus,
        target: Option<VnodeStatus>,
    },
    Renamed {
        from_dir: VnodeStatus,
        to_dir: VnodeStatus,
        /// The moved vnode's status.
        moved: VnodeStatus,
        /// The replaced target's status, `link_count` 0 when that was its last name
        /// (from protocol version 3; to an older peer only while it still has links).
        replaced: Option<VnodeStatus>,
    },
    DirPage {
        dir: VnodeStatus,
        callback: Option<CallbackGrant>,
        entries: Vec<DirEntry>,
        /// True when the listing continues after the last entry.
        more: bool,
    },
    VolumeSpace(VolumeSpace),
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    Server(ServerEntry),
    Servers(Vec<ServerEntry>),
    VolumeEntry(VolumeEntry),
    VolumeEntries(Vec<VolumeEntry>),
    /// A blocking lock request is queued; `LockGranted { wait }` follows.
    LockQueued {
        wait: WaitId,
    },
    /// The answer to `TestLock`.
    LockTest {
        holder: Option<LockHolder>,
    },
    /// The answer to `ReclaimCallbacks`: `broken` lists the fids whose data changed (or
    /// that the server no longer knows); the others are re-granted with `callback`.
    CallbacksReclaimed {
        broken: Vec<Fid>,
        callback: CallbackGrant,
    },
    /// Named counters, in a stable order.
    Counters(Vec<(String, u64)>),
    Pair(PairEntry),
    /// A pair lease granted or renewed: valid for `lease_ms` from when the member sent
    /// the call (the member measures from its own send time, so it errs early).
    PairLease {
        epoch: Epoch,
        lease_ms: u64,
    },
    MemberState(MemberState),
    /// The answer to a `VlRaft`, in the VLDB's own encoding.
    VlRaft(#[serde(with = "serde_bytes")] Vec<u8>),
    VlStatus(VldbMemberStatus),
    /// A directory's access list.
    Acl(AccessList),
    /// The caller's rights on a directory and the directory's status with the callback
    /// that keeps them valid.
    Rights {
        rights: Rights,
        dir: VnodeStatus,
        callback: Option<CallbackGrant>,
    },
    /// A user or group just created.
    PtsEntry(PtsEntry),
    /// Users and groups: a membership, or every entry.
    PtsEntries(Vec<PtsEntry>),
    /// The token a `Login` obtained.
    Token(SealedToken),
    /// The answer to `ServerFigures` (protocol version 4).
    Figures(crate::histogram::Figures),
    /// `Data` with its bytes carried raw after the message (`Bulk`): a fileserver's
    /// answer to `FetchData` on a connection of version 4 or later; before that it goes
    /// as `Data` (`Response::as_sent_to`). `Response::into_fetched` takes either.
    DataBulk {
        status: VnodeStatus,
        callback: Option<CallbackGrant>,
        data: Bulk,
    },
}

/// One VLDB replica as it describes itself (`VlStatus`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VldbMemberStatus {
    pub id: u64,
    /// The address it serves on, as the membership records it.
    pub address: String,
    pub role: VldbRole,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The leader it knows of, with its address.
    pub leader: Option<(u64, String)>,
    /// Every replica in the membership: id, address, and whether it votes.
    pub members: Vec<VldbMember>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VldbMember {
    pub id: u64,
    pub address: String,
    pub voter: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VldbRole {
    Leader,
    Follower,
    Candidate,
    Learner,
    /// Stopped: its disk failed, or it was shut down.
    Shutdown,
}

/// A fileserver pair as the VLDB records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairEntry {
    pub name: PairName,
    /// The server id both members serve under (the shared partition's).
    pub server: ServerId,
    /// The members' addresses, in the order they joined.
    pub members: Vec<String>,
    /// The member holding the lease of `epoch`, if any.
    pub active: Option<String>,
    pub epoch: Epoch,
    /// How long the active's lease still runs on the VLDB's clock; 0 when expired.
    pub lease_left_ms: u64,
    /// The member an ongoing switchover hands the lease to.
    pub successor: Option<String>,
}

/// What a fileserver says about itself (`MemberState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// The address it serves on.
    pub member: String,
    pub pair: Option<PairName>,
    pub role: MemberRole,
    pub epoch: Epoch,
    /// Present while a grace period runs.
    pub grace: Option<GraceState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberRole {
    /// A fileserver that is not part of a pair.
    Single,
    Active,
    Passive,
}

/// A running grace period, as `MemberState` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraceState {
    pub remaining_ms: u64,
    /// Clients the recovered state names, and how many of them said `ReclaimDone`.
    pub clients_recovered: u64,
    pub clients_reclaimed: u64,
    /// Recovered locks not reclaimed yet.
    pub locks_unreclaimed: u64,
}

/// A lock as `TestLock` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub client: ClientId,
    pub owner: LockOwnerId,
    pub range: ByteRange,
    pub kind: LockKind,
    pub pid: u32,
}

impl Response {
    /// A short name for logs and "unexpected response" errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Response::Ok => "Ok",
            Response::Pong => "Pong",
            Response::Status { .. } => "Status",
            Response::Data { .. } => "Data",
            Response::Entry { .. } => "Entry",
            Response::Removed { .. } => "Removed",
            Response::Renamed { .. } => "Renamed",
            Response::DirPage { .. } => "DirPage",
            Response::VolumeSpace(_) => "VolumeSpace",
            Response::Volume(_) => "Volume",
            Response::Volumes(_) => "Volumes",
            Response::Server(_) => "Server",
            Response::Servers(_) => "Servers",
            Response::VolumeEntry(_) => "VolumeEntry",
            Response::VolumeEntries(_) => "VolumeEntries",
            Response::LockQueued { .. } => "LockQueued",
            Response::LockTest { .. } => "LockTest",
            Response::CallbacksReclaimed { .. } => "CallbacksReclaimed",
            Response::Counters(_) => "Counters",
            Response::Pair(_) => "Pair",
            Response::PairLease { .. } => "PairLease",
            Response::MemberState(_) => "MemberState",
            Response::VlRaft(_) => "VlRaft",
            Response::VlStatus(_) => "VlStatus",
            Response::Acl(_) => "Acl",
            Response::Rights { .. } => "Rights",
            Response::PtsEntry(_) => "PtsEntry",
            Response::PtsEntries(_) => "PtsEntries",
            Response::Token(_) => "Token",
            Response::Figures(_) => "Figures",
            Response::DataBulk { .. } => "DataBulk",
        }
    }
}

impl FileKind {
    /// True for the kinds protocol version 3 added: FIFOs, sockets and device nodes.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            FileKind::Fifo
                | FileKind::Socket
                | FileKind::CharDevice { .. }
                | FileKind::BlockDevice { .. }
        )
    }

    /// The kind as a peer speaking `version` can decode it: a special file, which
    /// versions before 3 lack, shows to them as a regular file (it has no data, and the
    /// server refuses stores to it), so an older client still lists, renames and
    /// removes it.
    pub fn for_version(self, version: u16) -> FileKind {
        if self.is_special() && version < PROTOCOL_VERSION_IDENTITY {
            FileKind::File
        } else {
            self
        }
    }
}

impl VnodeStatus {
    /// The status as a peer speaking `version` can decode it (`FileKind::for_version`).
    pub fn for_version(mut self, version: u16) -> VnodeStatus {
        self.kind = self.kind.for_version(version);
        self
    }
}

impl Response {
    /// This response as a peer speaking `version` can decode and understand it: special
    /// files shown as regular files, and before version 3 no status of a vnode whose last
    /// name a `Removed` or `Renamed` took away. A server passes every answer through
    /// this for the connection's version.
    pub fn for_version(self, version: u16) -> Response {
        if version >= PROTOCOL_VERSION_IDENTITY {
            return self;
        }
        let old = |s: VnodeStatus| s.for_version(version);
        let linked = |s: Option<VnodeStatus>| s.filter(|s| s.link_count > 0).map(old);
        match self {
            Response::Status { status, callback } => Response::Status {
                status: old(status),
                callback,
            },
            Response::Data {
                status,
                callback,
                data,
            } => Response::Data {
                status: old(status),
                callback,
                data,
            },
            Response::Entry {
                status,
                callback,
                dir,
            } => Response::Entry {
                status: old(status),
                callback,
                dir,
            },
            Response::Removed { dir, target } => Response::Removed {
                dir,
                target: linked(target),
            },
            Response::Renamed {
                from_dir,
                to_dir,
                moved,
                replaced,
            } => Response::Renamed {
                from_dir,
                to_dir,
                moved: old(moved),
                replaced: linked(replaced),
            },
            Response::DirPage {
                dir,
                callback,
                mut entries,
                more,
            } => {
                for entry in &mut entries {
                    entry.kind = entry.kind.for_version(version);
                }
                Response::DirPage {
                    dir,
                    callback,
                    entries,
                    more,
                }
            }
            other => other,
        }
    }
}

impl Request {
    /// The request's kind as its variant's name, for logs and figures (a `Sequenced`
    /// one is named by itself: callers name the request it carries).
    pub fn kind_name(&self) -> &'static str {
        match self {
            Request::Ping => "Ping",
            Request::FetchStatus { .. } => "FetchStatus",
            Request::FetchData { .. } => "FetchData",
            Request::StoreData { .. } => "StoreData",
            Request::SetAttr { .. } => "SetAttr",
            Request::Lookup { .. } => "Lookup",
            Request::ReadDir { .. } => "ReadDir",
            Request::Create { .. } => "Create",
            Request::MakeDir { .. } => "MakeDir",
            Request::Remove { .. } => "Remove",
            Request::RemoveDir { .. } => "RemoveDir",
            Request::Rename { .. } => "Rename",
            Request::Symlink { .. } => "Symlink",
            Request::Link { .. } => "Link",
            Request::MakeMountPoint { .. } => "MakeMountPoint",
            Request::GiveUpCallbacks { .. } => "GiveUpCallbacks",
            Request::VolumeSpace { .. } => "VolumeSpace",
            Request::BreakCallbacks { .. } => "BreakCallbacks",
            Request::ResetCallbacks => "ResetCallbacks",
            Request::CreateVolume { .. } => "CreateVolume",
            Request::RemoveVolume { .. } => "RemoveVolume",
            Request::ListVolumes => "ListVolumes",
            Request::ExamineVolume { .. } => "ExamineVolume",
            Request::VlRegisterServer { .. } => "VlRegisterServer",
            Request::VlListServers => "VlListServers",
            Request::VlCreateEntry { .. } => "VlCreateEntry",
            Request::VlRemoveEntry { .. } => "VlRemoveEntry",
            Request::VlGetEntry { .. } => "VlGetEntry",
            Request::VlListEntries => "VlListEntries",
            Request::Fsync { .. } => "Fsync",
            Request::SetLock { .. } => "SetLock",
            Request::ReleaseLock { .. } => "ReleaseLock",
            Request::TestLock { .. } => "TestLock",
            Request::CancelLockWait { .. } => "CancelLockWait",
            Request::RenewLease => "RenewLease",
            Request::LockGranted { .. } => "LockGranted",
            Request::ReclaimCallbacks { .. } => "ReclaimCallbacks",
            Request::ReclaimLock { .. } => "ReclaimLock",
            Request::ReclaimDone => "ReclaimDone",
            Request::ServerCounters => "ServerCounters",
            Request::VlJoinPair { .. } => "VlJoinPair",
            Request::VlAcquirePair { .. } => "VlAcquirePair",
            Request::VlRenewPair { .. } => "VlRenewPair",
            Request::VlReleasePair { .. } => "VlReleasePair",
            Request::VlGetPair { .. } => "VlGetPair",
            Request::PairSwitchover => "PairSwitchover",
            Request::MemberState => "MemberState",
            Request::Sequenced { .. } => "Sequenced",
            Request::VlRaft { .. } => "VlRaft",
            Request::VlStatus => "VlStatus",
            Request::VlAddMember { .. } => "VlAddMember",
            Request::VlRemoveMember { .. } => "VlRemoveMember",
            Request::StoreDataIf { .. } => "StoreDataIf",
            Request::FetchAcl { .. } => "FetchAcl",
            Request::StoreAcl { .. } => "StoreAcl",
            Request::FetchRights { .. } => "FetchRights",
            Request::PtsCreateUser { .. } => "PtsCreateUser",
            Request::PtsSetPassword { .. } => "PtsSetPassword",
            Request::PtsCreateGroup { .. } => "PtsCreateGroup",
            Request::PtsAddUser { .. } => "PtsAddUser",
            Request::PtsRemoveUser { .. } => "PtsRemoveUser",
            Request::PtsDelete { .. } => "PtsDelete",
            Request::PtsMembership { .. } => "PtsMembership",
            Request::PtsListEntries => "PtsListEntries",
            Request::Login { .. } => "Login",
            Request::MakeNode { .. } => "MakeNode",
            Request::ServerFigures => "ServerFigures",
            Request::StoreDataBulk { .. } => "StoreDataBulk",
            Request::CreateWithData { .. } => "CreateWithData",
            Request::StoreNewFile { .. } => "StoreNewFile",
        }
    }
}
