//! A partition: the server's identity file and the volumes under one directory.
//! Invariant: a volume enters the map only once built (under `.creating`, then renamed)
//! and leaves it before its directory is renamed to `.removing` and deleted.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use proto::{ErrorCode, ServerId, VolumeId, VolumeInfo, VolumeName, VolumeSpace};
use tracing::{info, warn};
use uuid::Uuid;

use super::volume::Volume;
use super::{StorageError, io_error};
use crate::fence::Fence;

const SERVER_ID_FILE: &str = "server.id";
const VOLUME_PREFIX: &str = "vol.";
const CREATING_SUFFIX: &str = ".creating";
const REMOVING_SUFFIX: &str = ".removing";

/// The volumes of one partition directory.
#[derive(Debug)]
pub struct Partition {
    root: PathBuf,
    /// Checked before every change to the partition (see `crate::fence`).
    fence: Arc<Fence>,
    server_id: ServerId,
    volumes: RwLock<BTreeMap<VolumeId, Arc<Volume>>>,
}

impl Partition {
    /// Opens (creating if needed) the partition at `root`: reads or makes `server.id`,
    /// clears leftovers of interrupted creations and removals, opens every volume.
    pub fn open(root: &Path, fence: Arc<Fence>) -> Result<Partition, StorageError> {
        fence.check().map_err(io_error(root))?;
        std::fs::create_dir_all(root).map_err(io_error(root))?;
        let server_id = server_id_of(root)?;
        let mut volumes = BTreeMap::new();
        for entry in std::fs::read_dir(root).map_err(io_error(root))? {
            let entry = entry.map_err(io_error(root))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(rest) = name.strip_prefix(VOLUME_PREFIX) else {
                continue;
            };
            if rest.ends_with(CREATING_SUFFIX) || rest.ends_with(REMOVING_SUFFIX) {
                info!(path = %path.display(), "removing leftover of an interrupted volume operation");
                std::fs::remove_dir_all(&path).map_err(io_error(&path))?;
                continue;
            }
            let Ok(id) = rest.parse::<u64>() else {
                warn!(path = %path.display(), "ignoring a directory that is not a volume");
                continue;
            };
            let volume = Volume::open(&path, VolumeId(id), fence.clone())?;
            volumes.insert(VolumeId(id), Arc::new(volume));
        }
        info!(partition = %root.display(), server = %server_id, volumes = volumes.len(), "partition opened");
        Ok(Partition {
            root: root.to_owned(),
            fence,
            server_id,
            volumes: RwLock::new(volumes),
        })
    }

    pub fn server_id(&self) -> ServerId {
        self.server_id
    }

    pub fn volume(&self, id: VolumeId) -> Result<Arc<Volume>, StorageError> {
        self.volumes
            .read()
            .get(&id)
            .cloned()
            .ok_or(StorageError::Refused(ErrorCode::NoSuchVolume))
    }

    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().values().cloned().collect()
    }

    /// Creates an empty volume. Blocking: call from a blocking thread.
    pub fn create_volume(
        &self,
        id: VolumeId,
        name: VolumeName,
        quota_bytes: u64,
    ) -> Result<VolumeInfo, StorageError> {
        if self.volumes.read().contains_key(&id) {
            return Err(ErrorCode::VolumeExists.into());
        }
        for volume in self.volumes() {
            if volume.header()?.name == name {
                return Err(ErrorCode::VolumeExists.into());
            }
        }
        let final_dir = self.volume_dir(id);
        self.fence.check().map_err(io_error(&final_dir))?;
        let building = self
            .root
            .join(format!("{VOLUME_PREFIX}{id}{CREATING_SUFFIX}"));
        if building.exists() {
            std::fs::remove_dir_all(&building).map_err(io_error(&building))?;
        }
        std::fs::create_dir_all(&building).map_err(io_error(&building))?;
        drop(Volume::initialize(
            &building,
            id,
            name.clone(),
            quota_bytes,
            self.fence.clone(),
        )?);
        std::fs::rename(&building, &final_dir).map_err(io_error(&final_dir))?;
        sync_dir(&self.root)?;
        let volume = Arc::new(Volume::open(&final_dir, id, self.fence.clone())?);
        let info = volume.info()?;
        let mut volumes = self.volumes.write();
        if volumes.contains_key(&id) {
            // Two creations of one id raced; the loser's directory is the winner's now.
            return Err(ErrorCode::VolumeExists.into());
        }
        volumes.insert(id, volume);
        info!(volume = %id, %name, quota_bytes, "volume created");
        Ok(info)
    }

    /// Removes a volume and its data. Blocking.
    pub fn remove_volume(&self, id: VolumeId) -> Result<(), StorageError> {
        let volume = self
            .volumes
            .write()
            .remove(&id)
            .ok_or(StorageError::Refused(ErrorCode::NoSuchVolume))?;
        drop(volume);
        let dir = self.volume_dir(id);
        self.fence.check().map_err(io_error(&dir))?;
        let removing = self
            .root
            .join(format!("{VOLUME_PREFIX}{id}{REMOVING_SUFFIX}"));
        std::fs::rename(&dir, &removing).map_err(io_error(&dir))?;
        sync_dir(&self.root)?;
        std::fs::remove_dir_all(&removing).map_err(io_error(&removing))?;
        info!(volume = %id, "volume removed");
        Ok(())
    }

    /// Space figures for `statfs`: the quota if the volume has one, the partition's
    /// otherwise.
    pub fn space(&self, id: VolumeId) -> Result<VolumeSpace, StorageError> {
        let header = self.volume(id)?.header()?;
        let (partition_total, partition_free) = filesystem_space(&self.root)?;
        let (total, free) = if header.quota_bytes == 0 {
            (partition_total, partition_free)
        } else {
            let left = header.quota_bytes.saturating_sub(header.bytes_used);
            (header.quota_bytes, left.min(partition_free))
        };
        Ok(VolumeSpace {
            bytes_used: header.bytes_used,
            bytes_total: total,
            bytes_free: free,
            file_count: header.vnode_count,
        })
    }

    fn volume_dir(&self, id: VolumeId) -> PathBuf {
        self.root.join(format!("{VOLUME_PREFIX}{id}"))
    }
}

/// The server id of the partition at `root`, made (and the directory with it) on first
/// use. Both members of a pair may ask at once, before either holds the lease: the new
/// id is published with `link`, which fails if the file exists, so both read one id.
pub fn server_id_of(root: &Path) -> Result<ServerId, StorageError> {
    std::fs::create_dir_all(root).map_err(io_error(root))?;
    let path = root.join(SERVER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let uuid = Uuid::parse_str(text.trim()).map_err(|e| StorageError::Corrupt {
                path: path.clone(),
                detail: format!("not a UUID: {e}"),
            })?;
            return Ok(ServerId(uuid));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&path)(e)),
    }
    let id = ServerId::random();
    // Named by the new id: concurrent creators (even in one process) never share it.
    let temp = root.join(format!("{SERVER_ID_FILE}.{id}.tmp"));
    let mut file = std::fs::File::create(&temp).map_err(io_error(&temp))?;
    writeln!(file, "{id}").map_err(io_error(&temp))?;
    file.sync_all().map_err(io_error(&temp))?;
    let linked = std::fs::hard_link(&temp, &path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return server_id_of(root),
        Err(e) => return Err(io_error(&path)(e)),
    }
    sync_dir(root)?;
    info!(server = %id, "created a new server identity");
    Ok(id)
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// (total, available) bytes of the filesystem holding `path`.
fn filesystem_space(path: &Path) -> Result<(u64, u64), StorageError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        StorageError::Refused(ErrorCode::Internal("partition path contains NUL".into()))
    })?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to writable
    // memory of the right type; statvfs writes nothing else.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if result != 0 {
        return Err(io_error(path)(std::io::Error::last_os_error()));
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    let block = stat.f_frsize;
    Ok((
        stat.f_blocks.saturating_mul(block),
        stat.f_bavail.saturating_mul(block),
    ))
}
