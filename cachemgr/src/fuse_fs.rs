//! The FUSE face of the cache manager: each kernel request decoded, run on the manager
//! and answered; the one place where the core's types become fuser's.
//! Invariant: every request gets exactly one reply; only blocking lock requests wait
//! without bound, capped below the thread count so that they never stall the mount.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use proto::{ByteRange, LockKind, LockOwnerId, SetAttrs, Timestamp};
use tracing::{debug, warn};

use crate::chunk_index::CHUNK_BYTES;
use crate::inode::Ino;
use crate::invalidate::KernelNotifier;
use crate::manager::{Attr, AttrOut, FsError, FsResult, LockRequest, Manager, NodeKind};

/// Block size `statfs` reports.
const STATFS_BLOCK_BYTES: u64 = 4096;

/// The kernel's "to end of file" (`OFFSET_MAX`), the inclusive end of a whole-file lock.
const KERNEL_OFFSET_MAX: u64 = i64::MAX as u64;

/// The I/O size `stat` suggests (`st_blksize`).
const IO_BLOCK_BYTES: u32 = 64 * 1024;

/// The `fuser::Filesystem` over a `Manager`: it turns the core's `Attr`, `NodeKind`,
/// `FsError` and `Ino` into fuser's types. A request other than a blocking lock waits no
/// longer than the RPCs under it, each of which has a deadline.
pub struct HoldfastFs {
    manager: Arc<Manager>,
    /// Blocking lock requests waiting now. Each holds a FUSE thread, so they are capped
    /// below the thread count: waiters alone must never stall the mount.
    lock_waiters: AtomicUsize,
    lock_waiters_max: usize,
}

impl HoldfastFs {
    /// `threads` is the number of FUSE threads serving the session.
    pub fn new(manager: Arc<Manager>, threads: usize) -> HoldfastFs {
        HoldfastFs {
            manager,
            lock_waiters: AtomicUsize::new(0),
            lock_waiters_max: threads.saturating_sub(1).max(1),
        }
    }

    /// Runs a request on the manager, blocking this fuser thread on the async runtime.
    fn run<T>(&self, future: impl std::future::Future<Output = FsResult<T>>) -> FsResult<T> {
        self.manager.block_on(future)
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
        rdev: 0,
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
        debug!(capabilities = ?config.capabilities(), "kernel FUSE capabilities");
        Ok(())
    }

    fn getlk(
        &self,
        _req: &Request,
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
        let future = self
            .manager
            .getlk(ino(i), LockOwnerId(lock_owner.0), range, kind);
        match self.run(future) {
            Ok(Some(holder)) => reply.locked(
                holder.range.start(),
                kernel_lock_end(holder.range.end()),
                kernel_lock_type(holder.kind),
                holder.pid,
            ),
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
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
        let blocking = sleep && kind.is_some();
        if blocking && self.lock_waiters.fetch_add(1, Ordering::SeqCst) >= self.lock_waiters_max {
            self.lock_waiters.fetch_sub(1, Ordering::SeqCst);
            warn!("too many blocking lock requests waiting at once; refusing one");
            reply.error(Errno::from_i32(libc::ENOLCK));
            return;
        }
        let result = self.run(self.manager.setlk(ino(i), request, blocking));
        if blocking {
            self.lock_waiters.fetch_sub(1, Ordering::SeqCst);
        }
        reply_empty(reply, result);
    }

    /// fuser's `batch_forget` calls this once per inode (its `ForgetOne` is private).
    fn forget(&self, _req: &Request, i: INodeNo, nlookup: u64) {
        self.manager.forget(ino(i), nlookup);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.run(self.manager.lookup(ino(parent), name)));
    }

    fn getattr(&self, _req: &Request, i: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        debug!(ino = i.0, "getattr");
        reply_attr(reply, self.run(self.manager.getattr(ino(i))));
    }

    fn setattr(
        &self,
        _req: &Request,
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
        reply_attr(reply, self.run(self.manager.setattr(ino(i), attrs)));
    }

    fn readlink(&self, _req: &Request, i: INodeNo, reply: ReplyData) {
        match self.run(self.manager.readlink(ino(i))) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            // Only regular files live in Holdfast.
            reply.error(Errno::EPERM);
            return;
        }
        let future =
            self.manager
                .create(ino(parent), name, mode & !umask, req.uid(), req.gid(), true);
        reply_entry(reply, self.run(future));
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
        let future = self
            .manager
            .mkdir(ino(parent), name, mode & !umask, req.uid(), req.gid());
        reply_entry(reply, self.run(future));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.run(self.manager.remove(ino(parent), name, false)),
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(
            reply,
            self.run(self.manager.remove(ino(parent), name, true)),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let future = self
            .manager
            .symlink(ino(parent), link_name, target, req.uid(), req.gid());
        reply_entry(reply, self.run(future));
    }

    fn rename(
        &self,
        _req: &Request,
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
        let future = self
            .manager
            .rename(ino(parent), name, ino(new_parent), new_name);
        reply_empty(reply, self.run(future));
    }

    fn link(
        &self,
        _req: &Request,
        i: INodeNo,
        new_parent: INodeNo,
        new_name: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(
            reply,
            self.run(self.manager.link(ino(i), ino(new_parent), new_name)),
        );
    }

    fn open(&self, _req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        debug!(ino = i.0, "open");
        match self.run(self.manager.open(ino(i))) {
            Ok(true) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Ok(false) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        debug!(ino = i.0, offset, size, "read");
        match self.run(self.manager.read(ino(i), offset, size)) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.run(self.manager.write(ino(i), offset, data)) {
            Ok(written) => reply.written(written),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // A close drops the POSIX locks of the closing owner; the kernel does not track
        // them when the filesystem does, so it is up to us.
        let stored = self.run(self.manager.flush(ino(i)));
        let released = self.run(
            self.manager
                .release_owner(ino(i), LockOwnerId(lock_owner.0)),
        );
        reply_empty(reply, stored.and(released));
    }

    fn release(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let stored = self.run(self.manager.flush(ino(i)));
        // Set only when the file carried `flock` locks: the last close ends them.
        let released = match lock_owner {
            Some(owner) => self.run(self.manager.release_owner(ino(i), LockOwnerId(owner.0))),
            None => Ok(()),
        };
        reply_empty(reply, stored.and(released));
    }

    fn fsync(
        &self,
        _req: &Request,
        i: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.run(self.manager.flush(ino(i))));
    }

    fn opendir(&self, _req: &Request, i: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.run(self.manager.opendir(ino(i))) {
            Ok(handle) => reply.opened(FileHandle(handle), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        i: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let snapshot = match self.run(self.manager.readdir(ino(i), fh.0, offset)) {
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
    }

    fn releasedir(
        &self,
        _req: &Request,
        _i: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
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

    fn statfs(&self, _req: &Request, i: INodeNo, reply: ReplyStatfs) {
        match self.run(self.manager.statfs(ino(i))) {
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
    }

    fn access(&self, _req: &Request, i: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission bits are checked by the kernel (default_permissions); this only
        // confirms the file still exists.
        reply_empty(reply, self.run(self.manager.getattr(ino(i))).map(|_| ()));
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
        let future = self.manager.create(
            ino(parent),
            name,
            mode & !umask,
            req.uid(),
            req.gid(),
            exclusive,
        );
        match self.run(future) {
            Ok(out) => {
                debug!(ino = out.attr.ino.0, "created");
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
