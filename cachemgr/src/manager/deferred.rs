//! Creates deferred to their close: a new small file lives here, bytes and all, under a
//! provisional fid until one `CreateWithData` makes it on the server with its bytes; or,
//! made already by an exclusive create (which the server must decide before the open
//! returns), until one `StoreNewFile` fills it with its bytes and attributes.
//! Invariant: a deferred file's bytes and attributes set here are known to no server
//! and to no cache but this table and the inode table (the file itself, if made, is
//! empty there at its `base`); whatever needs its real fid creates or fills it first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use proto::{
    CREATE_DATA_BYTES_MAX, DataVersion, ErrorCode, Fid, FileKind, ProtoError, Request, Response,
    ServerId, SetAttrs, Timestamp, Uniquifier, VnodeId, VnodeStatus,
};
use tracing::{debug, warn};

use super::fs_error::unexpected;
use super::{Attr, AttrOut, FsError, FsResult, Manager, rpc_error};
use crate::chunk_index::ChunkKey;
use crate::inode::Ino;
use crate::tokens::{self, LocalUid};

/// Deferred files at once; a create beyond goes to the server at once.
const DEFERRED_FILES_MAX: usize = 4096;
/// Bytes deferred files hold at once; a write beyond creates its file at once.
const DEFERRED_BYTES_MAX: usize = 64 << 20;
/// Provisional fids have vnode numbers from here up: a server counts its vnodes from 1
/// and never gets near.
const PROVISIONAL_VNODE_MIN: u64 = 1 << 63;

/// True for a fid this client made up for a deferred create.
pub(super) fn is_provisional(fid: Fid) -> bool {
    fid.vnode.0 >= PROVISIONAL_VNODE_MIN
}

/// One deferred file: what its `Create` would have said, and what was written.
#[derive(Debug)]
struct DeferredFile {
    dir: Fid,
    name: String,
    mode: u32,
    uid: u32,
    gid: u32,
    data: Vec<u8>,
    mtime: Timestamp,
    ctime: Timestamp,
    /// Whose token creates it: the creator's, whoever closes it.
    caller: Option<LocalUid>,
    /// The kernel's opens of it, handed to the real fid's status once it is created.
    opens: u32,
    /// Set once created on the server while its inode number could not take the real
    /// fid (the name was made elsewhere meanwhile and this mount knew that file already):
    /// the number stays provisional and stands for this fid.
    created: Option<Fid>,
    /// A file an exclusive create made on the server: its fid and data version there,
    /// empty. Its close fills it (`StoreNewFile`) rather than creating it.
    made: Option<(Fid, DataVersion)>,
    /// Times set since the create (a made file's only), sent with its bytes; a write
    /// after them moves the mtime on.
    atime: Option<Timestamp>,
    set_mtime: Option<Timestamp>,
    /// Whether the mode was set since the create (a made file's, sent with its bytes).
    mode_set: bool,
}

/// The deferred files of a mount, by provisional fid and by (directory, name).
#[derive(Debug, Default)]
pub(super) struct DeferredCreates {
    files: HashMap<Fid, DeferredFile>,
    names: HashMap<(Fid, String), Fid>,
    bytes: usize,
    next: u64,
    /// Servers that do not speak `CreateWithData` (an older protocol): no deferral there.
    refused_by: Vec<ServerId>,
}

/// Where a write to a deferred file went.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    Kept,
    /// Past `CREATE_DATA_BYTES_MAX`, or over the mount's bound: create the file first.
    TooBig,
}

impl DeferredCreates {
    /// A new deferred file `name` in `dir`, or `None` when the table is full or the name
    /// is deferred already.
    #[allow(clippy::too_many_arguments)]
    fn defer(
        &mut self,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        caller: Option<LocalUid>,
        now: Timestamp,
    ) -> Option<Fid> {
        let key = (dir, name.to_owned());
        if self.files.len() >= DEFERRED_FILES_MAX || self.names.contains_key(&key) {
            return None;
        }
        self.next += 1;
        let fid = Fid {
            volume: dir.volume,
            vnode: VnodeId(PROVISIONAL_VNODE_MIN + self.next),
            unique: Uniquifier(1),
        };
        self.names.insert(key, fid);
        let file = DeferredFile {
            dir,
            name: name.to_owned(),
            mode,
            uid,
            gid,
            data: Vec::new(),
            mtime: now,
            ctime: now,
            caller,
            opens: 0,
            created: None,
            made: None,
            atime: None,
            set_mtime: None,
            mode_set: false,
        };
        self.files.insert(fid, file);
        Some(fid)
    }

    /// A new deferred file for `made`, which an exclusive create made on the server as
    /// `status` shows it; `None` when the table is full or the name is deferred already.
    fn defer_made(
        &mut self,
        dir: Fid,
        name: &str,
        status: &VnodeStatus,
        caller: Option<LocalUid>,
    ) -> Option<Fid> {
        let fid = self.defer(
            dir,
            name,
            status.mode,
            status.uid,
            status.gid,
            caller,
            status.mtime,
        )?;
        if let Some(file) = self.files.get_mut(&fid) {
            file.made = Some((status.fid, status.data_version));
            file.ctime = status.ctime;
        }
        Some(fid)
    }

    /// Whether deferred files may take `more` files (made ones included).
    fn has_room(&self) -> bool {
        self.files.len() < DEFERRED_FILES_MAX
    }

    /// The deferred file `name` of `dir`, not created yet.
    fn named(&self, dir: Fid, name: &str) -> Option<Fid> {
        self.names.get(&(dir, name.to_owned())).copied()
    }

    /// The deferred files of `dir` not created yet.
    fn in_dir(&self, dir: Fid) -> Vec<Fid> {
        self.names
            .iter()
            .filter(|((d, _), _)| *d == dir)
            .map(|(_, fid)| *fid)
            .collect()
    }

    fn all(&self) -> Vec<Fid> {
        self.names.values().copied().collect()
    }

    /// The real fid a provisional one stands for once created (see `created`).
    fn created(&self, fid: Fid) -> Option<Fid> {
        self.files.get(&fid).and_then(|f| f.created)
    }

    fn write(&mut self, fid: Fid, offset: u64, data: &[u8], now: Timestamp) -> Option<Written> {
        let file = self.files.get_mut(&fid).filter(|f| f.created.is_none())?;
        let end = offset.checked_add(data.len() as u64)?;
        let grows = (end as usize).saturating_sub(file.data.len());
        if end > u64::from(CREATE_DATA_BYTES_MAX) || self.bytes + grows > DEFERRED_BYTES_MAX {
            return Some(Written::TooBig);
        }
        let (offset, end) = (offset as usize, end as usize);
        if file.data.len() < end {
            file.data.resize(end, 0);
        }
        file.data[offset..end].copy_from_slice(data);
        file.mtime = now;
        file.ctime = now;
        file.set_mtime = None;
        self.bytes += grows;
        Some(Written::Kept)
    }

    /// Applies `attrs` to the deferred file `fid` when they can wait for its close (see
    /// `Manager::setattr_deferred`): false, and nothing changed, when they cannot.
    pub(super) fn set_attrs(&mut self, fid: Fid, attrs: &SetAttrs, now: Timestamp) -> bool {
        let Some(file) = self.files.get_mut(&fid).filter(|f| f.created.is_none()) else {
            return false;
        };
        let times = attrs.atime.is_some() || attrs.mtime.is_some();
        // A provisional file's create carries no times; a made file's fill does.
        if times && file.made.is_none() {
            return false;
        }
        // A chown is kept only when it changes nothing (and so clears no privileges).
        let privileged = file.mode & 0o6000 != 0;
        let chown = attrs.uid.is_some() || attrs.gid.is_some();
        if attrs.uid.is_some_and(|uid| uid != file.uid)
            || attrs.gid.is_some_and(|gid| gid != file.gid)
            || (chown && privileged)
        {
            return false;
        }
        let grows = match attrs.size {
            Some(size) if size > u64::from(CREATE_DATA_BYTES_MAX) => return false,
            Some(size) => (size as usize).saturating_sub(file.data.len()),
            None => 0,
        };
        if self.bytes + grows > DEFERRED_BYTES_MAX {
            return false;
        }
        if let Some(size) = attrs.size {
            let before = file.data.len();
            file.data.resize(size as usize, 0);
            self.bytes = self.bytes + file.data.len() - before;
            file.mtime = now;
            file.set_mtime = None;
        }
        if let Some(mode) = attrs.mode {
            file.mode = mode & 0o7777;
            file.mode_set = true;
        }
        if let Some(atime) = attrs.atime {
            file.atime = Some(atime);
        }
        if let Some(mtime) = attrs.mtime {
            file.set_mtime = Some(mtime);
        }
        file.ctime = now;
        true
    }

    /// Whose token made the deferred file `fid`, its directory, and whether it is a
    /// made one; `None` when it is not deferred (any more).
    pub(super) fn owner(&self, fid: Fid) -> Option<(Option<LocalUid>, Fid, bool)> {
        let file = self.files.get(&fid).filter(|f| f.created.is_none())?;
        Some((file.caller, file.dir, file.made.is_some()))
    }

    fn read(&self, fid: Fid, offset: u64, size: u32) -> Option<Vec<u8>> {
        let file = self.files.get(&fid).filter(|f| f.created.is_none())?;
        let start = (offset.min(file.data.len() as u64)) as usize;
        let end = (start + size as usize).min(file.data.len());
        Some(file.data[start..end].to_vec())
    }

    /// The status a deferred file shows: what the server would make of its create.
    pub(super) fn status(&self, fid: Fid) -> Option<VnodeStatus> {
        let file = self.files.get(&fid).filter(|f| f.created.is_none())?;
        Some(VnodeStatus {
            fid,
            kind: FileKind::File,
            mode: file.mode,
            link_count: 1,
            size: file.data.len() as u64,
            data_version: DataVersion(0),
            uid: file.uid,
            gid: file.gid,
            atime: file.atime.unwrap_or(file.ctime),
            mtime: file.set_mtime.unwrap_or(file.mtime),
            ctime: file.ctime,
        })
    }

    /// The attributes a made file's fill sets after its bytes.
    fn fill_attrs(file: &DeferredFile) -> SetAttrs {
        SetAttrs {
            mode: file.mode_set.then_some(file.mode),
            atime: file.atime,
            mtime: file.set_mtime,
            ..SetAttrs::default()
        }
    }

    /// The request that creates `fid` with its bytes (or fills it, when made), and
    /// whose token sends it.
    fn request(&self, fid: Fid) -> Option<(Request, Option<LocalUid>)> {
        let file = self.files.get(&fid).filter(|f| f.created.is_none())?;
        if let Some((real, base)) = file.made {
            let request = Request::StoreNewFile {
                fid: real,
                base,
                attrs: Self::fill_attrs(file),
                data: file.data.clone(),
            };
            return Some((request, file.caller));
        }
        let request = Request::CreateWithData {
            dir: file.dir,
            name: file.name.clone(),
            mode: file.mode,
            uid: file.uid,
            gid: file.gid,
            data: file.data.clone(),
        };
        Some((request, file.caller))
    }

    /// `fid` is on the server as `real`: it leaves the table, or stays as an alias when
    /// its inode number could not take `real` (`aliased`). Returns its opens.
    fn finish(&mut self, fid: Fid, real: Fid, aliased: bool) -> u32 {
        let Some(file) = self.files.get_mut(&fid) else {
            return 0;
        };
        self.names.remove(&(file.dir, file.name.clone()));
        self.bytes -= file.data.len();
        let opens = file.opens;
        if aliased {
            file.data = Vec::new();
            file.created = Some(real);
        } else {
            self.files.remove(&fid);
        }
        opens
    }

    fn opened(&mut self, fid: Fid, by: i32) {
        if let Some(file) = self.files.get_mut(&fid) {
            file.opens = file.opens.saturating_add_signed(by);
        }
    }
}

impl Manager {
    /// Defers the create of the file `name` in `dir` to its close when that is sound
    /// (docs/cache-manager.md, "Creates deferred to the close"): a non-exclusive
    /// create, in a directory whose callback holds, where the caller's cached rights
    /// allow inserting, on a server that speaks `CreateWithData`, the name absent from
    /// the directory's cached listing. Answers the entry (its lookup counted), or
    /// `None` to create it on the server now. No RPC.
    pub(super) fn defer_create(
        &self,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Option<AttrOut> {
        let caller = self.caller_identity().ok()?;
        let rights = self.rights.get(caller.id, dir)?;
        let server = self.volumes.cached(dir.volume)?.server;
        let now = Instant::now();
        {
            let state = self.state.lock();
            let entry = state.statuses.fresh(dir, now)?;
            if rights.dir != dir
                || entry.status.kind != FileKind::Directory
                || !rights.rights.contains(proto::Rights::INSERT)
                || entry
                    .fresh_listing(now)
                    .is_some_and(|l| l.get(name).is_some())
            {
                return None;
            }
        }
        // The inode is numbered under the same locks as the deferral: a listing of `dir`
        // may create the file on the server as soon as the deferral is seen, and that
        // moves the file's inode to the real fid only if it is numbered already.
        let mut state = self.state.lock();
        let mut deferred = self.deferred.lock();
        if deferred.refused_by.contains(&server) {
            return None;
        }
        let caller = tokens::current_caller();
        let fid = deferred.defer(dir, name, mode, uid, gid, caller, Timestamp::now())?;
        debug!(%dir, name, %fid, "create deferred to the close");
        let (ino, _) = state.inodes.lookup(fid);
        let status = deferred.status(fid)?;
        Some(deferred_attr(ino, &status))
    }

    /// An exclusive create of `name` in `dir`: made on the server now (only the server
    /// can decide it before the open returns), then deferred like a non-exclusive one,
    /// so the file's bytes and the attributes set before its close go to the server in
    /// one `StoreNewFile` at its close. `None`, with nothing sent, when it cannot be
    /// deferred (the table is full, the server too old for the fill): then it is made
    /// the usual way. Answers the entry, its lookup counted.
    pub(super) async fn create_made(
        &self,
        dir: Fid,
        name: &str,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> FsResult<Option<AttrOut>> {
        let server = self.volumes.cached(dir.volume).map(|l| l.server);
        {
            let deferred = self.deferred.lock();
            if !deferred.has_room() || server.is_some_and(|s| deferred.refused_by.contains(&s)) {
                return Ok(None);
            }
        }
        // A name deferred here is on the server first, so that this create finds it.
        self.create_deferred_named(dir, name).await?;
        let request = Request::Create {
            dir,
            name: name.to_owned(),
            mode,
            uid,
            gid,
            exclusive: true,
        };
        let sent_at = Instant::now();
        let response = self.call(dir.volume, request).await?;
        let real = self.absorb_entry_status(response, name, sent_at)?;
        let status = {
            let state = self.state.lock();
            state.statuses.get(real).map(|e| e.status.clone())
        };
        let status = status.ok_or(FsError::EIO)?;
        let caller = tokens::current_caller();
        // Numbered under the same locks as the deferral, as in `defer_create`.
        let mut state = self.state.lock();
        let mut deferred = self.deferred.lock();
        let Some(fid) = deferred.defer_made(dir, name, &status, caller) else {
            // Filled up meanwhile: the kernel has the file as made.
            drop((deferred, state));
            return self.created_entry(real).map(Some);
        };
        debug!(%dir, name, %real, %fid, "exclusive create made; its bytes deferred to the close");
        let (ino, _) = state.inodes.lookup(fid);
        let status = deferred.status(fid).ok_or(FsError::EIO)?;
        Ok(Some(deferred_attr(ino, &status)))
    }

    /// The fid `ino` names, once on the server: a deferred file is created first.
    pub(super) async fn resolved_fid(&self, ino: Ino) -> FsResult<Fid> {
        let fid = self.fid(ino)?;
        if !is_provisional(fid) {
            return Ok(fid);
        }
        // Boxed: creating it may write through `write`, which resolves again.
        if let Some(real) = Box::pin(self.create_deferred(fid)).await? {
            return Ok(real);
        }
        // Created meanwhile by another task: the number names the real fid now.
        Some(self.fid(ino)?)
            .filter(|fid| !is_provisional(*fid))
            .ok_or(FsError::ESTALE)
    }

    /// The entry of a deferred file `name` in `dir`, its lookup counted; `None` when no
    /// such file is deferred.
    pub(super) fn deferred_entry(&self, dir: Fid, name: &str) -> Option<AttrOut> {
        let fid = self.deferred.lock().named(dir, name)?;
        let mut state = self.state.lock();
        let status = self.deferred.lock().status(fid)?;
        let (ino, _) = state.inodes.lookup(fid);
        Some(deferred_attr(ino, &status))
    }

    /// The attributes of `ino` while it is deferred.
    pub(super) fn deferred_attr(&self, ino: Ino) -> Option<AttrOut> {
        let fid = self.fid(ino).ok().filter(|fid| is_provisional(*fid))?;
        let status = self.deferred.lock().status(fid)?;
        Some(deferred_attr(ino, &status))
    }

    /// Writes to `ino` while it is deferred; `None` when it is not (any more), and the
    /// write goes the usual way. A write past what one request may carry creates the
    /// file first.
    pub(super) async fn write_deferred(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
    ) -> FsResult<Option<u32>> {
        let Some(fid) = self.fid(ino).ok().filter(|fid| is_provisional(*fid)) else {
            return Ok(None);
        };
        let _file = self.file_lock(fid).write().await;
        let written = self
            .deferred
            .lock()
            .write(fid, offset, data, Timestamp::now());
        match written {
            Some(Written::Kept) => Ok(Some(data.len() as u32)),
            Some(Written::TooBig) => {
                self.create_deferred_locked(fid, true).await?;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    /// Reads `ino` while it is deferred; `None` when it is not.
    pub(super) fn read_deferred(&self, ino: Ino, offset: u64, size: u32) -> Option<Vec<u8>> {
        let fid = self.fid(ino).ok().filter(|fid| is_provisional(*fid))?;
        self.deferred.lock().read(fid, offset, size)
    }

    /// Counts an open (`by` 1) or a release (`by` -1) of a deferred file; false when
    /// `fid` is not one.
    pub(super) fn deferred_opened(&self, fid: Fid, by: i32) -> bool {
        if !is_provisional(fid) {
            return false;
        }
        self.deferred.lock().opened(fid, by);
        true
    }

    /// Creates the deferred file `name` of `dir` on the server, if there is one.
    pub(super) async fn create_deferred_named(&self, dir: Fid, name: &str) -> FsResult<()> {
        let fid = self.deferred.lock().named(dir, name);
        match fid {
            Some(fid) => self.create_deferred(fid).await.map(drop),
            None => Ok(()),
        }
    }

    /// Creates every deferred file of `dir` on the server (before it is listed).
    pub(super) async fn create_deferred_in(&self, dir: Fid) -> FsResult<()> {
        let fids = self.deferred.lock().in_dir(dir);
        for fid in fids {
            self.create_deferred(fid).await?;
        }
        Ok(())
    }

    /// Creates every deferred file on the server (at unmount).
    pub(super) async fn create_all_deferred(&self) {
        let fids = self.deferred.lock().all();
        for fid in fids {
            if let Err(e) = self.create_deferred(fid).await {
                warn!(%fid, error = %e, "could not create a file deferred to its close before unmounting; it is lost");
            }
        }
    }

    /// Creates the deferred file `fid` on the server; returns its real fid, or `None`
    /// when another task created it meanwhile.
    async fn create_deferred(&self, fid: Fid) -> FsResult<Option<Fid>> {
        let _file = self.file_lock(fid).write().await;
        self.create_deferred_locked(fid, false).await
    }

    /// `create_deferred` with the provisional fid's lock held alone, so no write to it
    /// runs meanwhile. One `CreateWithData` with every byte written; when the name was
    /// made elsewhere meanwhile (`Exists`), or the server is too old for that request, a
    /// non-exclusive `Create` opens or makes it and the bytes are written into it the
    /// usual way, as the open they came through would have done. A made file is
    /// filled instead (`fill_made`); `growing` when a write past the limit asks.
    async fn create_deferred_locked(&self, fid: Fid, growing: bool) -> FsResult<Option<Fid>> {
        let (request, caller) = {
            let deferred = self.deferred.lock();
            if let Some(real) = deferred.created(fid) {
                return Ok(Some(real));
            }
            match deferred.request(fid) {
                Some(request) => request,
                None => return Ok(None),
            }
        };
        if let Request::StoreNewFile {
            fid: real,
            base,
            attrs,
            data,
        } = request
        {
            let made = MadeFile {
                fid,
                real,
                base,
                caller,
            };
            return self.fill_made(made, attrs, data, growing).await.map(Some);
        }
        let Request::CreateWithData {
            dir,
            name,
            mode,
            uid,
            gid,
            data,
        } = request.clone()
        else {
            unreachable!("DeferredCreates::request makes a CreateWithData");
        };
        let location = self.location(dir.volume).await?;
        let sent_at = Instant::now();
        let answer = tokens::acting_as(caller, self.pool.call(&location, request)).await;
        let fallback = match answer {
            Ok(response @ Response::Entry { .. }) => {
                let real = self.absorb_entry_status(response, &name, sent_at)?;
                self.cache_created(real, data);
                self.bind_created(fid, real);
                return Ok(Some(real));
            }
            Ok(other) => return Err(unexpected(&other)),
            Err(ProtoError::PeerTooOld { .. }) => {
                debug!(server = %location.server, "server does not create files with their bytes; creates go to it at once");
                self.deferred.lock().refused_by.push(location.server);
                true
            }
            Err(ProtoError::Remote(ErrorCode::Exists)) => {
                debug!(%dir, name, "a deferred file's name was made elsewhere; writing into that file");
                true
            }
            Err(e) => return Err(rpc_error(&e)),
        };
        debug_assert!(fallback);
        let create = Request::Create {
            dir,
            name: name.clone(),
            mode,
            uid,
            gid,
            exclusive: false,
        };
        let sent_at = Instant::now();
        let response = tokens::acting_as(caller, self.call(dir.volume, create)).await?;
        let real = self.absorb_entry_status(response, &name, sent_at)?;
        let ino = self.bind_created(fid, real);
        if !data.is_empty() {
            let ino = ino.unwrap_or_else(|| self.state.lock().inodes.ino_for(real));
            // Boxed: `write` may come back here (through `write_deferred`).
            Box::pin(self.write(ino, 0, &data)).await?;
        }
        Ok(Some(real))
    }

    /// Fills the made file `made` with `data` and then `attrs` in one `StoreNewFile` and
    /// hands its inode number to the real fid. A file with nothing to send, or one
    /// `growing` past the limit with no attributes to send, needs no request now: its
    /// bytes are written the usual way. When the server cannot fill it (the file
    /// changed meanwhile, or the server is too old), its bytes are written and its
    /// attributes set the usual way, in that order.
    async fn fill_made(
        &self,
        made: MadeFile,
        attrs: SetAttrs,
        data: Vec<u8>,
        growing: bool,
    ) -> FsResult<Fid> {
        let MadeFile {
            fid,
            real,
            base,
            caller,
        } = made;
        let no_attrs = attrs == SetAttrs::default();
        if no_attrs && (data.is_empty() || growing) {
            return self.write_made_usual(fid, real, attrs, &data).await;
        }
        let location = self.location(real.volume).await?;
        let request = Request::StoreNewFile {
            fid: real,
            base,
            attrs: attrs.clone(),
            data: data.clone(),
        };
        let sent_at = Instant::now();
        match tokens::acting_as(caller, self.pool.call(&location, request)).await {
            Ok(Response::Status { status, callback }) => {
                self.absorb_own_data_change(base, 1, status, callback, sent_at);
                self.cache_created(real, data);
                self.bind_created(fid, real);
                Ok(real)
            }
            Ok(other) => Err(unexpected(&other)),
            Err(ProtoError::PeerTooOld { .. }) => {
                debug!(server = %location.server, "server does not fill new files; creates go to it at once");
                self.deferred.lock().refused_by.push(location.server);
                self.write_made_usual(fid, real, attrs, &data).await
            }
            Err(ProtoError::Remote(
                ErrorCode::StoreOutdated { .. } | ErrorCode::InvalidArgument,
            )) => {
                debug!(%real, "a made file changed before its close; writing it the usual way");
                self.write_made_usual(fid, real, attrs, &data).await
            }
            Err(e) => Err(rpc_error(&e)),
        }
    }

    /// Binds the made file `fid` to `real` and writes `data`, then sets `attrs`, the
    /// usual way (the writes stored at the close, or before the attributes that need
    /// them stored).
    async fn write_made_usual(
        &self,
        fid: Fid,
        real: Fid,
        attrs: SetAttrs,
        data: &[u8],
    ) -> FsResult<Fid> {
        let ino = self.bind_created(fid, real);
        let ino = ino.unwrap_or_else(|| self.state.lock().inodes.ino_for(real));
        if !data.is_empty() {
            // Boxed: `write` may come back here (through `write_deferred`).
            Box::pin(self.write(ino, 0, data)).await?;
        }
        if attrs != SetAttrs::default() {
            Box::pin(self.setattr(ino, attrs)).await?;
        }
        Ok(real)
    }

    /// Caches `data`, the bytes a create or fill just gave `real`, clean at the
    /// version that holds them: a reader here needs no fetch, and the kernel's pages
    /// stay valid.
    fn cache_created(&self, real: Fid, data: Vec<u8>) {
        let version = self
            .state
            .lock()
            .statuses
            .get(real)
            .map(|e| e.status.data_version);
        if let Some(version) = version.filter(|_| !data.is_empty()) {
            let key = ChunkKey {
                fid: real,
                index: 0,
            };
            let emptied = self
                .chunks
                .insert_fetched(key, version, bytes::Bytes::from(data));
            self.note_evicted(emptied);
        }
    }

    /// Hands the inode number of the deferred `fid` to `real`, its status its opens and
    /// the kernel's pages its version; the table forgets `fid`. Returns the number.
    fn bind_created(&self, fid: Fid, real: Fid) -> Option<Ino> {
        let mut state = self.state.lock();
        let ino = state.inodes.ino(fid);
        let bound = ino.is_some_and(|ino| state.inodes.rebind(ino, fid, real));
        let aliased = ino.is_some() && !bound;
        let opens = self.deferred.lock().finish(fid, real, aliased);
        for _ in 0..opens {
            state.statuses.opened(real);
        }
        if bound
            && let Some(ino) = ino
            && state.inodes.lookups(ino) > 0
        {
            state.statuses.pin(real);
        }
        if let Some(entry) = state.statuses.get_mut(real)
            && entry.kernel_version.is_none()
        {
            entry.kernel_version = Some(entry.status.data_version);
        }
        if aliased {
            warn!(%real, "a file created here was made elsewhere too and is known by two inode numbers until they are forgotten");
        }
        ino.filter(|_| bound)
    }
}

/// A made file's deferred fid, its real one, the version it was made at, and whose
/// token fills it.
struct MadeFile {
    fid: Fid,
    real: Fid,
    base: DataVersion,
    caller: Option<LocalUid>,
}

/// A deferred file's attributes: never cached by the kernel, since the server may decide
/// its owner otherwise once it is made.
fn deferred_attr(ino: Ino, status: &VnodeStatus) -> AttrOut {
    AttrOut {
        attr: Attr::new(ino, status, status.size),
        ttl: Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use proto::VolumeId;

    use super::*;

    fn dir() -> Fid {
        Fid::root(VolumeId(7))
    }

    #[test]
    fn a_deferred_file_is_named_once_and_holds_what_was_written() {
        let mut table = DeferredCreates::default();
        let now = Timestamp::now();
        let fid = table.defer(dir(), "f", 0o644, 1, 2, None, now).unwrap();
        assert!(is_provisional(fid));
        assert!(!is_provisional(dir()));
        assert_eq!(table.defer(dir(), "f", 0o644, 1, 2, None, now), None);
        assert_eq!(table.named(dir(), "f"), Some(fid));
        assert_eq!(table.in_dir(dir()), [fid]);
        assert_eq!(table.write(fid, 2, b"cd", now), Some(Written::Kept));
        assert_eq!(table.write(fid, 0, b"ab", now), Some(Written::Kept));
        assert_eq!(table.read(fid, 1, 10).unwrap(), b"bcd");
        assert_eq!(table.status(fid).unwrap().size, 4);
        assert_eq!(table.bytes, 4);
        let Some((Request::CreateWithData { data, name, .. }, None)) = table.request(fid) else {
            panic!("a deferred file is created with its bytes");
        };
        assert_eq!((data.as_slice(), name.as_str()), (&b"abcd"[..], "f"));
    }

    #[test]
    fn a_write_past_the_limit_asks_for_the_file_first() {
        let mut table = DeferredCreates::default();
        let now = Timestamp::now();
        let fid = table.defer(dir(), "f", 0o644, 1, 2, None, now).unwrap();
        let limit = u64::from(CREATE_DATA_BYTES_MAX);
        assert_eq!(table.write(fid, limit - 1, b"x", now), Some(Written::Kept));
        assert_eq!(table.write(fid, limit, b"x", now), Some(Written::TooBig));
        assert_eq!(table.write(fid, u64::MAX, b"xy", now), None);
        assert_eq!(table.status(fid).unwrap().size, limit);
    }

    #[test]
    fn a_created_file_leaves_the_table_or_stays_as_an_alias() {
        let mut table = DeferredCreates::default();
        let now = Timestamp::now();
        let a = table.defer(dir(), "a", 0o644, 1, 2, None, now).unwrap();
        let b = table.defer(dir(), "b", 0o644, 1, 2, None, now).unwrap();
        table.write(a, 0, b"12345", now);
        table.opened(a, 1);
        let real = Fid {
            volume: VolumeId(7),
            vnode: VnodeId(9),
            unique: Uniquifier(1),
        };
        assert_eq!(table.finish(a, real, false), 1);
        assert_eq!(table.named(dir(), "a"), None);
        assert_eq!(table.bytes, 0);
        assert!(!table.files.contains_key(&a));
        assert_eq!(table.finish(b, real, true), 0);
        assert_eq!(table.created(b), Some(real));
        assert_eq!(table.named(dir(), "b"), None);
        assert_eq!(table.status(b), None, "an alias is no deferred file");
        assert_eq!(table.write(b, 0, b"x", now), None);
    }
}
