//! The FUSE face of the cache manager: each kernel request decoded, handed to the
//! manager's runtime as a task that answers it; the one place where the core's types
//! become fuser's.
//! Invariant: every request gets exactly one reply, from its task (or fuser's `EIO` if the
//! task dies); no request holds a FUSE thread while it waits for a server or a lock.

mod signals;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use proto::access::FileAccess;
use proto::{ByteRange, FileKind, LockKind, LockOwnerId, SetAttrs, Timestamp};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::chunk_index::CHUNK_BYTES;
use crate::inode::Ino;
use crate::invalidate::KernelNotifier;
use crate::manager::{Attr, AttrOut, FsError, FsResult, LockRequest, Manager, NodeKind, Opened};
use crate::passthrough::{BindingId, PassthroughMode};
use crate::tokens::{self, LocalUid};

/// Block size `statfs` reports.
const STATFS_BLOCK_BYTES: u64 = 4096;

/// The kernel's "to end of file" (`OFFSET_MAX`), the inclusive end of a whole-file lock.
const KERNEL_OFFSET_MAX: u64 = i64::MAX as u64;

/// The I/O size `stat` suggests (`st_blksize`).
const IO_BLOCK_BYTES: u32 = 64 * 1024;

/// What the requests in flight may hold at once (their tasks, names, write payloads and
/// read buffers). A request beyond it waits on the FUSE thread that read it, so the
/// kernel queues the rest: memory stays bounded, and since every task in flight ends
/// within its RPC deadlines, the wait is short. Blocking lock waits are not counted
/// (they may wait forever); `LOCK_WAITS_MAX` bounds them.
const IN_FLIGHT_BYTES_MAX: usize = 128 << 20;
/// Background requests the kernel may have in flight (see `init`): each asks for at most
/// one chunk, so together they hold at most half of `IN_FLIGHT_BYTES_MAX`.
const MAX_BACKGROUND: u16 = 64;
/// What a request in flight costs besides the bytes it carries or asks for.
const REQUEST_OVERHEAD_BYTES: usize = 4 << 10;
/// Blocking lock requests waiting at once (`ENOLCK` beyond). Each is a thread blocked in
/// the kernel and a small task here; a fileserver bounds its queue far below this.
pub const LOCK_WAITS_MAX: usize = 16_384;

/// The `fuser::Filesystem` over a `Manager`: it turns the core's `Attr`, `NodeKind`,
/// `FsError` and `Ino` into fuser's types. Each request runs as a task on the manager's
/// runtime, so a request waiting for a stopped server (each RPC has its deadline) or for
/// a lock (without bound, until granted or interrupted) holds no FUSE thread, and the
/// next request is read at once. `init`, `forget` and `destroy` stay on the FUSE thread:
/// they are quick, and the kernel expects them in order.
pub struct HoldfastFs {
    manager: Arc<Manager>,
    runtime: tokio::runtime::Handle,
    /// Bytes of `IN_FLIGHT_BYTES_MAX` not held by a request in flight.
    in_flight: Arc<Semaphore>,
    /// Blocking lock requests waiting now.
    lock_waiters: Arc<AtomicUsize>,
    /// What `--passthrough` asked for; `init` decides what the kernel and this process
    /// allow.
    passthrough: PassthroughMode,
    /// The kernel's backing id of each inode bound for passthrough opens, by the binding
    /// it serves; dropped (closed in the kernel) when that binding's last open is
    /// released. Bounded by the inodes with passthrough opens.
    backings: Arc<Mutex<Backings>>,
}

/// Per inode, the binding its kernel backing id serves and that id.
type Backings = HashMap<Ino, (BindingId, Arc<BackingId>)>;

/// The handle of an open through the mount. A passthrough open's handle carries its
/// binding (odd handles), so its release can end that binding.
const NORMAL_HANDLE: FileHandle = FileHandle(0);

fn passthrough_handle(binding: BindingId) -> FileHandle {
    FileHandle((binding.0 << 1) | 1)
}

fn handle_binding(fh: FileHandle) -> Option<BindingId> {
    (fh.0 & 1 == 1).then_some(BindingId(fh.0 >> 1))
}

/// Whether this process may register backing files (`FUSE_DEV_IOC_BACKING_OPEN` needs
/// CAP_SYS_ADMIN in its effective set).
fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    text.lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// A blocking lock request counted in `lock_waiters` until dropped.
struct LockWaiter(Arc<AtomicUsize>);

impl Drop for LockWaiter {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HoldfastFs {
    /// `runtime` runs the requests: the manager's own.
    pub fn new(
        manager: Arc<Manager>,
        runtime: tokio::runtime::Handle,
        passthrough: PassthroughMode,
    ) -> HoldfastFs {
        HoldfastFs {
            manager,
            runtime,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT_BYTES_MAX)),
            lock_waiters: Arc::new(AtomicUsize::new(0)),
            passthrough,
            backings: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Asks the kernel for passthrough opens when `--passthrough auto` and both the
    /// kernel and this process allow them; says once which it is.
    fn init_passthrough(&self, config: &mut KernelConfig) {
        if self.passthrough == PassthroughMode::Off {
            info!("passthrough off (--passthrough off): cached files are read through the mount");
            return;
        }
        if !has_cap_sys_admin() {
            warn!(
                "passthrough off: this process lacks CAP_SYS_ADMIN; cached files are read through the mount"
            );
            return;
        }
        if config
            .add_capabilities(InitFlags::FUSE_PASSTHROUGH)
            .is_err()
        {
            warn!(
                "passthrough off: the kernel offers no FUSE passthrough (Linux 6.9 or later needed); cached files are read through the mount"
            );
            return;
        }
        // Backing files on a filesystem that is not itself stacked (the cache directory).
        if config.set_max_stack_depth(1).is_err() {
            warn!("passthrough off: the kernel refuses a stacking depth of 1");
            return;
        }
        self.manager.set_passthrough(true);
        info!(
            "passthrough on: wholly cached files are read by the kernel from the cache directory"
        );
    }

    /// Runs `request` on the runtime as a task that answers it. Its share of the
    /// in-flight budget (`bytes` it carries or asks for, plus the overhead) is taken here
    /// first, waiting on this FUSE thread while the budget is spent, and held until the
    /// task ends.
    fn spawn<F, Fut>(&self, operation: &'static str, req: &Request, bytes: usize, request: F)
    where
        F: FnOnce(Arc<Manager>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let timer = self.manager.figures().time_operation(operation);
        let cost = (REQUEST_OVERHEAD_BYTES + bytes).min(IN_FLIGHT_BYTES_MAX);
        // At most `IN_FLIGHT_BYTES_MAX`: fits a u32.
        let cost = cost as u32;
        let permit = match self.in_flight.clone().try_acquire_many_owned(cost) {
            Ok(permit) => permit,
            Err(_) => {
                debug!(cost, "requests in flight hold their whole budget; waiting");
                match self
                    .runtime
                    .block_on(self.in_flight.clone().acquire_many_owned(cost))
                {
                    Ok(permit) => permit,
                    // Never closed.
                    Err(_) => return,
                }
            }
        };
        let task = request(self.manager.clone());
        // Its server calls carry the token of the process that asked.
        let caller = LocalUid(req.uid());
        self.runtime.spawn(async move {
            tokens::acting_for(caller, task).await;
            drop(timer);
            drop(permit);
        });
    }

    /// Counts a new blocking lock waiter; `None` when `LOCK_WAITS_MAX` wait already.
    fn lock_waiter(&self) -> Option<LockWaiter> {
        let before = self.lock_waiters.fetch_add(1, Ordering::SeqCst);
        let waiter = LockWaiter(self.lock_waiters.clone());
        (before < LOCK_WAITS_MAX).then_some(waiter)
    }
}

fn ino(i: INodeNo) -> Ino {
    Ino(i.0)
}

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Directory => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino.0),
        size: attr.size,
        blocks: attr.size.div_ceil(512),
        atime: attr.atime,
        mtime: attr.mtime,
        ctime: attr.ctime,
        crtime: attr.ctime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: IO_BLOCK_BYTES,
        flags: 0,
    }
}

fn reply_entry(reply: ReplyEntry, result: FsResult<AttrOut>) {
    match result {
        Ok(out) => reply.entry(&out.ttl, &file_attr(&out.attr), Generation(0)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_attr(reply: ReplyAttr, result: FsResult<AttrOut>) {
    match result {
        Ok(out) => reply.attr(&out.ttl, &file_attr(&out.attr)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(reply: ReplyEmpty, result: FsResult<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// The mount's channel for kernel cache invalidations. fuser answers `Ok` when the
/// kernel had already forgotten the inode (`ENOENT`).
impl KernelNotifier for Notifier {
    fn invalidate_inode(&self, ino: Ino) -> std::io::Result<()> {
        self.inval_inode(INodeNo(ino.0), 0, 0)
    }

    fn invalidate_entry(&self, parent: Ino, name: &OsStr) -> std::io::Result<()> {
        self.inval_entry(INodeNo(parent.0), name)
    }
}

/// What an `open` with `flags` asks of the file.
fn open_access(flags: i32) -> Vec<FileAccess> {
    let mut wanted = match flags & libc::O_ACCMODE {
        libc::O_WRONLY => vec![FileAccess::Write],
        libc::O_RDWR => vec![FileAccess::Read, FileAccess::Write],
        _ => vec![FileAccess::Read],
    };
    if flags & libc::O_TRUNC != 0 && !wanted.contains(&FileAccess::Write) {
        wanted.push(FileAccess::Write);
    }
    wanted
}

/// A kernel lock range (inclusive end, `OFFSET_MAX` for to-EOF) in the server's terms
/// (exclusive end, `ByteRange::EOF` for to-EOF); an inverted one is `EINVAL`.
pub fn lock_range(start: u64, end_inclusive: u64) -> FsResult<ByteRange> {
    let end = if end_inclusive >= KERNEL_OFFSET_MAX {
        ByteRange::EOF
    } else {
        end_inclusive + 1
    };
    ByteRange::new(start, end).map_err(|_| FsError::EINVAL)
}

/// The inverse of `lock_range`, for `F_GETLK` answers.
pub fn kernel_lock_end(end_exclusive: u64) -> u64 {
    if end_exclusive == ByteRange::EOF {
        KERNEL_OFFSET_MAX
    } else {
        end_exclusive.saturating_sub(1)
    }
}

/// `F_RDLCK`/`F_WRLCK`/`F_UNLCK` to a lock kind (`None`: unlock).
pub fn lock_kind(typ: i32) -> FsResult<Option<LockKind>> {
    match typ {
        libc::F_RDLCK => Ok(Some(LockKind::Shared)),
        libc::F_WRLCK => Ok(Some(LockKind::Exclusive)),
        libc::F_UNLCK => Ok(None),
        _ => Err(FsError::EINVAL),
    }
}

pub fn kernel_lock_type(kind: LockKind) -> i32 {
    match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    }
}

fn timestamp(t: TimeOrNow) -> Timestamp {
    match t {
        TimeOrNow::SpecificTime(t) => t.into(),
        TimeOrNow::Now => Timestamp::now(),
    }
}

impl Filesystem for HoldfastFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large transfers: one FUSE request per chunk where the kernel allows it.
        if let Err(nearest) = config.set_max_write(CHUNK_BYTES as u32) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(CHUNK_BYTES as u32) {
            let _ = config.set_max_readahead(nearest);
        }
        // Reads through the page cache (readahead) and the release after a close are
        // background requests, which the kernel sends at most `max_background` at once
        // (it reports congestion at three quarters of that); every other request comes
        // from a thread blocked in its system call until answered. Raised from fuser's 16
        // so that parallel readers of a stopped server do not queue in the kernel behind
        // each other's timeouts; at most half the in-flight budget.
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            let _ = config.set_max_background(nearest);
        }
        // Without these the kernel keeps fcntl and flock locks to itself, invisible to
        // other clients.
        for flag in [InitFlags::FUSE_POSIX_LOCKS, InitFlags::FUSE_FLOCK_LOCKS] {
            if config.add_capabilities(flag).is_err() {
                warn!(
                    ?flag,
                    "kernel cannot forward these locks; they stay local to this machine"
                );
            }
        }
        self.init_passthrough(config);
        debug!(capabilities = ?config.capabilities(), "kernel FUSE capabilities");
        Ok(())
    }

    fn getlk(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let (kind, range) = match (lock_kind(typ), lock_range(start, end)) {
            (Ok(Some(kind)), Ok(range)) => (kind, range),
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        self.spawn("getlk", req, 0, move |m| async move {
            let found = m
                .getlk(ino(i), LockOwnerId(lock_owner.0), range, kind)
                .await;
            match found {
                Ok(Some(holder)) => reply.locked(
                    holder.range.start(),
                    kernel_lock_end(holder.range.end()),
                    kernel_lock_type(holder.kind),
                    holder.pid,
                ),
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let (kind, range) = match (lock_kind(typ), lock_range(start, end)) {
            (Ok(kind), Ok(range)) => (kind, range),
            (Err(e), _) | (_, Err(e)) => {
                reply.error(errno(e));
                return;
            }
        };
        let request = LockRequest {
            owner: LockOwnerId(lock_owner.0),
            range,
            kind,
            pid,
        };
        if !(sleep && kind.is_some()) {
            self.spawn("setlk", req, 0, move |m| async move {
                reply_empty(reply, m.setlk(ino(i), request, false).await);
            });
            return;
        }
        // A blocking request: outside the in-flight budget, since it may wait for ever;
        // ended early by a signal to the thread that asked (see `signals`).
        let Some(waiter) = self.lock_waiter() else {
            warn!("{LOCK_WAITS_MAX} blocking lock requests wait already; refusing one more");
            reply.error(Errno::from_i32(libc::ENOLCK));
            return;
        };
        let interrupted = signals::interrupted(req.pid(), self.lock_waiters.clone());
        let manager = self.manager.clone();
        let caller = LocalUid(req.uid());
        self.runtime.spawn(async move {
            let result = tokens::acting_for(
                caller,
                manager.setlk_interruptible(ino(i), request, interrupted),
            )
            .await;
            drop(waiter);
            reply_empty(reply, result);
        });
    }

    /// fuser's `batch_forget` calls this once per inode (its `ForgetOne` is private).
    /// On the FUSE thread: the kernel forgets only lookups it was answered, so no task in
    /// flight can still owe this inode a count.
    fn forget(&self, _req: &Request, i: INodeNo, nlookup: u64) {
        self.manager.forget(ino(i), nlookup);
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.spawn("lookup", req, name.len(), move |m| async move {
            let found = match m.check_lookup(ino(parent)).await {
                Ok(()) => m.lookup(ino(parent), &name).await,
                Err(e) => Err(e),
            };
            if let Ok(out) = &found {
                m.found_in(ino(parent), out.attr.ino, out.attr.kind);
            }
            reply_entry(reply, found);
        });
    }

    fn getattr(&self, req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        debug!(ino = i.0, "getattr");
        self.spawn("getattr", req, 0, move |m| async move {
            reply_attr(reply, m.getattr(ino(i)).await);
        });
    }

    fn setattr(
        &self,
        req: &Request,
        i: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let attrs = SetAttrs {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(timestamp),
            mtime: mtime.map(timestamp),
        };
        self.spawn("setattr", req, 0, move |m| async move {
            // Kept with the file's bytes when its create waits for its close.
            let set = match m.setattr_deferred(ino(i), &attrs).await {
                Ok(Some(out)) => Ok(out),
                Ok(None) => m.setattr(ino(i), attrs).await,
                Err(e) => Err(e),
            };
            reply_attr(reply, set);
        });
    }

    fn readlink(&self, req: &Request, i: INodeNo, reply: ReplyData) {
        self.spawn("readlink", req, 0, move |m| async move {
            match m.readlink(ino(i)).await {
                Ok(target) => reply.data(&target),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => None,
            libc::S_IFIFO => Some(FileKind::Fifo),
            libc::S_IFSOCK => Some(FileKind::Socket),
            libc::S_IFCHR => Some(FileKind::CharDevice {
                rdev: u64::from(rdev),
            }),
            libc::S_IFBLK => Some(FileKind::BlockDevice {
                rdev: u64::from(rdev),
            }),
            _ => {
                reply.error(Errno::EINVAL);
                return;
            }
        };
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        let mode = mode & !umask;
        self.spawn("mknod", req, name.len(), move |m| async move {
            let made = match kind {
                // A regular file, as `create` makes it.
                None => m.make_regular(ino(parent), &name, mode, uid, gid).await,
                Some(kind) => m.mknod(ino(parent), &name, kind, mode, uid, gid).await,
            };
            reply_entry(reply, made);
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.spawn("mkdir", req, name.len(), move |m| async move {
            let made = m.mkdir(ino(parent), &name, mode & !umask, uid, gid).await;
            reply_entry(reply, made);
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn("unlink", req, name.len(), move |m| async move {
            reply_empty(reply, m.remove(ino(parent), &name, false).await);
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.spawn("rmdir", req, name.len(), move |m| async move {
            reply_empty(reply, m.remove(ino(parent), &name, true).await);
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (name, target) = (link_name.to_owned(), target.to_owned());
        let (uid, gid) = (req.uid(), req.gid());
        let bytes = name.len() + target.as_os_str().len();
        self.spawn("symlink", req, bytes, move |m| async move {
            let made = m.symlink(ino(parent), &name, &target, uid, gid).await;
            reply_entry(reply, made);
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        let (name, new_name) = (name.to_owned(), new_name.to_owned());
        self.spawn(
            "rename",
            req,
            name.len() + new_name.len(),
            move |m| async move {
                let renamed = m
                    .rename(ino(parent), &name, ino(new_parent), &new_name)
                    .await;
                // What moved is governed by its new directory now.
                m.forget_rights(&[ino(parent), ino(new_parent)]);
                reply_empty(reply, renamed);
            },
        );
    }

    fn link(
        &self,
        req: &Request,
        i: INodeNo,
        new_parent: INodeNo,
        new_name: &OsStr,
        reply: ReplyEntry,
    ) {
        let new_name = new_name.to_owned();
        self.spawn("link", req, new_name.len(), move |m| async move {
            reply_entry(reply, m.link(ino(i), ino(new_parent), &new_name).await);
        });
    }

    fn open(&self, req: &Request, i: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        debug!(ino = i.0, "open");
        let backings = self.backings.clone();
        self.spawn("open", req, 0, move |m| async move {
            let wanted = open_access(flags.0);
            if let Err(e) = m.check_access(ino(i), &wanted).await {
                reply.error(errno(e));
                return;
            }
            let writes = wanted.contains(&FileAccess::Write);
            let opened = match m.open_file(ino(i), writes).await {
                Ok(opened) => opened,
                Err(e) => {
                    reply.error(errno(e));
                    return;
                }
            };
            m.opened(ino(i));
            match opened {
                Opened::Normal { keep_cache: true } => {
                    reply.opened(NORMAL_HANDLE, FopenFlags::FOPEN_KEEP_CACHE)
                }
                Opened::Normal { keep_cache: false } => {
                    reply.opened(NORMAL_HANDLE, FopenFlags::empty())
                }
                Opened::Passthrough { binding, backing } => {
                    let id = match backing {
                        // The binding's first open: the kernel takes the file now.
                        Some(file) => match reply.open_backing(&file) {
                            Ok(id) => {
                                let id = Arc::new(id);
                                backings.lock().insert(ino(i), (binding, id.clone()));
                                m.passthrough_ready(ino(i), binding);
                                Some(id)
                            }
                            Err(e) => {
                                debug!(ino = i.0, error = %e, "the kernel refused a backing file");
                                m.passthrough_refused(ino(i), binding, &e);
                                None
                            }
                        },
                        None => backings
                            .lock()
                            .get(&ino(i))
                            .filter(|(bound, _)| *bound == binding)
                            .map(|(_, id)| id.clone()),
                    };
                    match id {
                        Some(id) => reply.opened_passthrough(
                            passthrough_handle(binding),
                            FopenFlags::empty(),
                            &id,
                        ),
                        // Refused, so counted as a normal open: its pages are not known
                        // to be current.
                        None => reply.opened(NORMAL_HANDLE, FopenFlags::empty()),
                    }
                }
            }
        });
    }

    fn read(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        debug!(ino = i.0, offset, size, "read");
        self.spawn("read", req, size as usize, move |m| async move {
            match m.read(ino(i), offset, size).await {
                Ok(data) => {
                    reply.data(&data);
                    proto::buffer_pool::give_back(data);
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Copied out of fuser's buffer, which the next request reuses, into one of the
        // data path's reused buffers.
        let mut copy = proto::buffer_pool::take(data.len());
        copy.extend_from_slice(data);
        self.spawn("write", req, copy.len(), move |m| async move {
            match m.write(ino(i), offset, &copy).await {
                Ok(written) => reply.written(written),
                Err(e) => reply.error(errno(e)),
            }
            proto::buffer_pool::give_back(copy);
        });
    }

    fn flush(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // A close drops the POSIX locks of the closing owner; the kernel does not track
        // them when the filesystem does, so it is up to us.
        self.spawn("flush", req, 0, move |m| async move {
            let stored = m.flush(ino(i)).await;
            let released = m.release_owner(ino(i), LockOwnerId(lock_owner.0)).await;
            reply_empty(reply, stored.and(released));
        });
    }

    fn release(
        &self,
        req: &Request,
        i: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Counted at once: the kernel closed it, whatever its write-back does.
        self.manager.released(ino(i));
        match handle_binding(fh) {
            Some(binding) => {
                if self.manager.released_passthrough(ino(i), binding) {
                    let mut backings = self.backings.lock();
                    if backings.get(&ino(i)).is_some_and(|(b, _)| *b == binding) {
                        // Closes the kernel's backing id; the kernel dropped its own
                        // reference to the file with the last open.
                        backings.remove(&ino(i));
                    }
                }
            }
            None => self.manager.released_normal(ino(i)),
        }
        self.spawn("release", req, 0, move |m| async move {
            let stored = m.flush(ino(i)).await;
            // Set only when the file carried `flock` locks: the last close ends them.
            let released = match lock_owner {
                Some(owner) => m.release_owner(ino(i), LockOwnerId(owner.0)).await,
                None => Ok(()),
            };
            reply_empty(reply, stored.and(released));
        });
    }

    fn fsync(
        &self,
        req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn("fsync", req, 0, move |m| async move {
            reply_empty(reply, m.flush(ino(i)).await);
        });
    }

    fn opendir(&self, req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn("opendir", req, 0, move |m| async move {
            if let Err(e) = m.check_access(ino(i), &[FileAccess::Read]).await {
                reply.error(errno(e));
                return;
            }
            match m.opendir(ino(i)).await {
                Ok(handle) => reply.opened(FileHandle(handle), FopenFlags::empty()),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readdir(
        &self,
        req: &Request,
        i: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn("readdir", req, 0, move |m| async move {
            let snapshot = match m.readdir(ino(i), fh.0, offset).await {
                Ok(snapshot) => snapshot,
                Err(e) => {
                    reply.error(errno(e));
                    return;
                }
            };
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            for (index, (name, child, kind)) in snapshot.entries.iter().enumerate().skip(start) {
                // The offset of an entry is where the next read resumes.
                if reply.add(INodeNo(child.0), index as u64 + 1, file_type(*kind), name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        // Quick and local: answered on the FUSE thread.
        self.manager.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Directory changes are synchronous RPCs: nothing is pending.
        reply.ok();
    }

    fn statfs(&self, req: &Request, i: INodeNo, reply: ReplyStatfs) {
        self.spawn("statfs", req, 0, move |m| async move {
            match m.statfs(ino(i)).await {
                Ok(space) => {
                    let blocks = space.bytes_total / STATFS_BLOCK_BYTES;
                    let free = space.bytes_free / STATFS_BLOCK_BYTES;
                    reply.statfs(
                        blocks,
                        free,
                        free,
                        space.file_count + free,
                        free,
                        STATFS_BLOCK_BYTES as u32,
                        proto::name::ENTRY_NAME_BYTES_MAX as u32,
                        STATFS_BLOCK_BYTES as u32,
                    );
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn access(&self, req: &Request, i: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Not the kernel's to check (no `default_permissions`: it would judge local uids
        // by mode bits alone): the directory's access list and the mode bits, for the
        // caller's token, as the fileserver judges them. F_OK asks for existence only.
        let mut wanted = Vec::with_capacity(3);
        for (flag, access) in [
            (AccessFlags::R_OK, FileAccess::Read),
            (AccessFlags::W_OK, FileAccess::Write),
            (AccessFlags::X_OK, FileAccess::Execute),
        ] {
            if mask.contains(flag) {
                wanted.push(access);
            }
        }
        self.spawn("access", req, 0, move |m| async move {
            reply_empty(reply, m.check_access(ino(i), &wanted).await);
        });
    }

    // Extended attributes are not stored. ENOSYS makes the kernel stop asking (it would
    // otherwise ask for `security.capability` before every write).
    fn getxattr(&self, _req: &Request, _i: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _i: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let exclusive = flags & libc::O_EXCL != 0;
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.spawn("create", req, name.len(), move |m| async move {
            let created = m
                .create(ino(parent), &name, mode & !umask, uid, gid, exclusive)
                .await;
            match created {
                Ok(out) => {
                    debug!(ino = out.attr.ino.0, "created");
                    m.opened(out.attr.ino);
                    m.opened_normal(out.attr.ino);
                    reply.created(
                        &out.ttl,
                        &file_attr(&out.attr),
                        Generation(0),
                        FileHandle(0),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_ranges_become_exclusive_and_back() {
        // F_SETLK of bytes 10..=19 and of the whole file (l_len 0: OFFSET_MAX).
        assert_eq!(lock_range(10, 19), Ok(ByteRange::new(10, 20).unwrap()));
        assert_eq!(lock_range(0, KERNEL_OFFSET_MAX), Ok(ByteRange::whole()));
        assert_eq!(
            lock_range(5, u64::MAX),
            Ok(ByteRange::new(5, ByteRange::EOF).unwrap())
        );
        assert_eq!(lock_range(10, 9), Err(FsError::EINVAL));
        assert_eq!(kernel_lock_end(20), 19);
        assert_eq!(kernel_lock_end(u64::MAX), KERNEL_OFFSET_MAX);
    }

    #[test]
    fn lock_types_map_to_kinds() {
        assert_eq!(lock_kind(libc::F_RDLCK), Ok(Some(LockKind::Shared)));
        assert_eq!(lock_kind(libc::F_WRLCK), Ok(Some(LockKind::Exclusive)));
        assert_eq!(lock_kind(libc::F_UNLCK), Ok(None));
        assert_eq!(lock_kind(99), Err(FsError::EINVAL));
        assert_eq!(kernel_lock_type(LockKind::Shared), libc::F_RDLCK);
        assert_eq!(kernel_lock_type(LockKind::Exclusive), libc::F_WRLCK);
    }
}
