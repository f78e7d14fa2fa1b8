//! The `holdfast fs` commands as the manager answers them: examine, whereis, flush,
//! checkservers, mkmount and lsmount.
//! Invariant: `examine` fetches a status only when none is cached, so a broken callback
//! shows as broken rather than renewed.

use std::ffi::OsStr;
use std::time::{Duration, Instant, SystemTime};

use proto::{ErrorCode, Fid, FileKind, ProtoError, Request, Response, VolumeName};

use super::namespace::entry_name;
use super::{FsError, FsResult, Manager, rpc_error};
use crate::control::{ExamineInfo, ServerState};
use crate::inode::Ino;
use crate::invalidate::Invalidation;
use crate::server_pool::CallbackSink;

/// How long `fs checkservers` waits for each server's connect and ping.
const PING_TIMEOUT_MAX: Duration = Duration::from_secs(2);

impl Manager {
    /// What this cache manager holds for `ino`; fetches the status only when none is
    /// cached, so a broken callback is reported as such rather than renewed.
    pub async fn examine(&self, ino: Ino) -> FsResult<ExamineInfo> {
        let fid = self.resolved_fid(ino).await?;
        self.examine_fid(fid).await
    }

    /// `examine` for the entry `name` of directory `dir`, resolved through the cached
    /// listing (a mount point shows the volume root it leads to).
    pub async fn examine_entry(&self, dir: Ino, name: &str) -> FsResult<ExamineInfo> {
        let name = entry_name(OsStr::new(name))?;
        let dir = self.fid(dir)?;
        self.create_deferred_named(dir, &name).await?;
        let entry = self.dir_entry(dir, &name).await?.ok_or(FsError::ENOENT)?;
        let fid = if entry.kind == FileKind::MountPoint {
            self.mount_target(entry.fid).await?
        } else {
            entry.fid
        };
        self.examine_fid(fid).await
    }

    async fn examine_fid(&self, fid: Fid) -> FsResult<ExamineInfo> {
        if self.state.lock().statuses.get(fid).is_none() {
            self.fetch_status(fid).await?;
        }
        let volume = self
            .volumes
            .by_id(&self.vldb, fid.volume)
            .await
            .map_err(|e| rpc_error(&e))?;
        let rights = match self.caller_identity() {
            Ok(caller) => self.rights_on(&caller, fid).await.ok(),
            Err(_) => None,
        };
        let state = self.state.lock();
        let entry = state.statuses.get(fid).ok_or(FsError::EIO)?;
        let now = Instant::now();
        let callback_until = entry
            .callback_until
            .filter(|until| *until > now)
            .map(|until| (SystemTime::now() + (until - now)).into());
        Ok(ExamineInfo {
            fid,
            volume: volume.name.to_string(),
            kind: entry.status.kind,
            size: entry.size(),
            data_version: entry.status.data_version,
            callback_until,
            data_cached: self.chunks.has_fid(fid),
            rights,
        })
    }

    pub async fn whereis(&self, ino: Ino) -> FsResult<(String, Vec<String>)> {
        let fid = self.fid(ino)?;
        let volume = self
            .volumes
            .by_id(&self.vldb, fid.volume)
            .await
            .map_err(|e| rpc_error(&e))?;
        Ok((volume.name.to_string(), volume.addresses.clone()))
    }

    /// Drops the cached data and status of one file (after storing its writes).
    pub async fn flush_cached(&self, ino: Ino) -> FsResult<()> {
        let fid = self.resolved_fid(ino).await?;
        let _file = self.file_lock(fid).write().await;
        self.write_back_durably(fid).await?;
        self.chunks.drop_fid(fid);
        self.read_ahead.lock().forget(fid);
        let removed = self.state.lock().statuses.remove(fid);
        if removed.is_some() {
            self.invalidator.push(Invalidation::Inode(ino));
        }
        Ok(())
    }

    /// Probes every fileserver this mount has used, all at once, each within a short
    /// timeout: a dead one costs that timeout, not one per server.
    pub async fn check_servers(&self) -> Vec<ServerState> {
        let timeout = self.pool.rpc_timeout().min(PING_TIMEOUT_MAX);
        let mut probes = tokio::task::JoinSet::new();
        for (index, (server, addresses)) in self.volumes.servers().into_iter().enumerate() {
            let pool = self.pool.clone();
            probes.spawn(async move {
                let up = pool.probe(server, &addresses, timeout).await;
                (index, ServerState { addresses, up })
            });
        }
        let mut states: Vec<(usize, ServerState)> = probes.join_all().await;
        states.sort_by_key(|(index, _)| *index);
        states.into_iter().map(|(_, state)| state).collect()
    }

    pub async fn make_mount(&self, dir_ino: Ino, name: &str, volume: &str) -> Result<(), String> {
        let errno_text = |e: FsError| e.to_string();
        let name = entry_name(OsStr::new(name)).map_err(errno_text)?;
        let volume = VolumeName::parse(volume).map_err(|e| e.to_string())?;
        match self.volumes.by_name(&self.vldb, &volume).await {
            Ok(_) => {}
            Err(ProtoError::Remote(ErrorCode::NoSuchVolume)) => {
                return Err(format!("volume {volume} does not exist in the VLDB"));
            }
            Err(e) => return Err(format!("cannot look volume {volume} up in the VLDB: {e}")),
        }
        let dir = self.fid(dir_ino).map_err(errno_text)?;
        let sent_at = Instant::now();
        let request = Request::MakeMountPoint {
            dir,
            name: name.clone(),
            volume,
        };
        let response = self.call(dir.volume, request).await.map_err(errno_text)?;
        match response {
            Response::Entry { .. } => {
                self.absorb_entry(response, &name, sent_at)
                    .map_err(errno_text)?;
            }
            _ => {
                // Unknown shape: forget what we knew of the directory.
                self.break_callbacks(&[dir]);
            }
        }
        Ok(())
    }

    /// `Some(content)` when `name` in the directory is a mount point.
    pub async fn list_mount(&self, dir_ino: Ino, name: &str) -> FsResult<Option<String>> {
        let name = entry_name(OsStr::new(name))?;
        let dir = self.fid(dir_ino)?;
        let entry = self.dir_entry(dir, &name).await?.ok_or(FsError::ENOENT)?;
        if entry.kind != FileKind::MountPoint {
            return Ok(None);
        }
        let content = self.content(entry.fid).await?;
        Ok(Some(String::from_utf8_lossy(&content).into_owned()))
    }
}
