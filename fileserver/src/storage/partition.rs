//! A partition: the server's identity file, the volumes under one directory, and the
//! metadata log their changes go through, replayed when the partition is opened.
//! Invariant: a volume enters the map only once built (under `.creating`, then renamed)
//! and leaves it before its directory is renamed to `.removing` and deleted; a
//! partition serves only once the log is replayed into every volume and checkpointed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};
use proto::{ErrorCode, ServerId, VolumeId, VolumeInfo, VolumeName, VolumeSpace};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::checkpoint;
use super::disk::{Disk, OsDisk};
use super::metadata_log::{LOG_DIR, LogConfig, LogFigures, Lsn, MetadataLog, StateRecovery};
use super::volume::{Tables, Volume};
use super::{StorageError, io_error};
use crate::fence::Fence;

const SERVER_ID_FILE: &str = "server.id";
const VOLUME_PREFIX: &str = "vol.";
const CREATING_SUFFIX: &str = ".creating";
const REMOVING_SUFFIX: &str = ".removing";
/// How often the volumes changed since the last checkpoint are made durable in redb.
pub const CHECKPOINT_PERIOD: Duration = Duration::from_millis(300);

/// How a partition keeps its metadata log.
#[derive(Clone, Copy, Debug)]
pub struct PartitionConfig {
    pub log: LogConfig,
    /// How often a checkpoint runs; `None`: only when asked (`Partition::checkpoint`)
    /// and at close, for tests that place them.
    pub checkpoint_period: Option<Duration>,
}

impl Default for PartitionConfig {
    fn default() -> PartitionConfig {
        PartitionConfig {
            log: LogConfig::default(),
            checkpoint_period: Some(CHECKPOINT_PERIOD),
        }
    }
}

type VolumeMap = RwLock<BTreeMap<VolumeId, Arc<Volume>>>;

/// The volumes of one partition directory.
#[derive(Debug)]
pub struct Partition {
    root: PathBuf,
    /// Checked before every change to the partition (see `crate::fence`).
    fence: Arc<Fence>,
    disk: Arc<dyn Disk>,
    server_id: ServerId,
    volumes: Arc<VolumeMap>,
    log: Arc<MetadataLog>,
    /// The state side's snapshot and records, until it takes them.
    state: Mutex<Option<StateRecovery>>,
    checkpointer: Option<Checkpointer>,
}

/// The thread that checkpoints the volumes every period.
#[derive(Debug)]
struct Checkpointer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: JoinHandle<()>,
}

impl Partition {
    /// Opens (creating if needed) the partition at `root` on the real file system.
    pub fn open(root: &Path, fence: Arc<Fence>) -> Result<Partition, StorageError> {
        let disk = Arc::new(OsDisk::new(fence.clone()));
        Partition::open_with(root, fence, disk, PartitionConfig::default())
    }

    /// Opens (creating if needed) the partition at `root` on `disk`: reads or makes
    /// `server.id`, clears leftovers of interrupted creations and removals, opens every
    /// volume, replays the metadata log into them and checkpoints them, then starts the
    /// log and the checkpointer.
    pub fn open_with(
        root: &Path,
        fence: Arc<Fence>,
        disk: Arc<dyn Disk>,
        config: PartitionConfig,
    ) -> Result<Partition, StorageError> {
        fence.check().map_err(io_error(root))?;
        disk.create_dir_all(root).map_err(io_error(root))?;
        let server_id = server_id_of(root)?;
        let log_dir = root.join(LOG_DIR);
        let recovery = MetadataLog::recover(disk.as_ref(), &log_dir)?;
        let mut found = BTreeMap::new();
        for name in disk.list(root).map_err(io_error(root))? {
            let path = root.join(&name);
            let Some(rest) = name.strip_prefix(VOLUME_PREFIX) else {
                continue;
            };
            if rest.ends_with(CREATING_SUFFIX) || rest.ends_with(REMOVING_SUFFIX) {
                info!(path = %path.display(), "removing leftover of an interrupted volume operation");
                disk.remove_dir_all(&path).map_err(io_error(&path))?;
                continue;
            }
            let Ok(id) = rest.parse::<u64>() else {
                warn!(path = %path.display(), "ignoring a directory that is not a volume");
                continue;
            };
            found.insert(
                VolumeId(id),
                (path.clone(), Tables::open(disk.as_ref(), &path)?),
            );
        }
        let tables: BTreeMap<VolumeId, &Tables> = found
            .iter()
            .map(|(id, (_, tables))| (*id, tables))
            .collect();
        let replayed = checkpoint::replay(&tables, &recovery, &log_dir)?;
        let state = StateRecovery::read(disk.as_ref(), &log_dir, &recovery)?;
        let state_snapshot = state.snapshot.as_ref().map_or(Lsn(0), |s| s.lsn);
        let floor = replayed
            .values()
            .copied()
            .max()
            .unwrap_or_default()
            .max(state_snapshot);
        let log = Arc::new(MetadataLog::start(
            disk.clone(),
            &log_dir,
            recovery,
            floor,
            config.log,
            fence.clone(),
        )?);
        let mut volumes = BTreeMap::new();
        for (id, (path, tables)) in found {
            let checkpointed = replayed.get(&id).copied().unwrap_or_default();
            let volume = Volume::open(&path, id, tables, fence.clone(), log.clone(), checkpointed)?;
            volumes.insert(id, Arc::new(volume));
        }
        // Every volume's tables hold everything logged before: only the state side's
        // records after its snapshot keep old segments.
        log.hold_state_from(state.needed_from());
        log.release_below(log.next_lsn())?;
        info!(partition = %root.display(), server = %server_id, volumes = volumes.len(), "partition opened");
        let volumes = Arc::new(RwLock::new(volumes));
        let checkpointer = match config.checkpoint_period {
            Some(period) => Some(Checkpointer::start(period, volumes.clone(), log.clone())?),
            None => None,
        };
        Ok(Partition {
            root: root.to_owned(),
            fence,
            disk,
            server_id,
            volumes,
            log,
            state: Mutex::new(Some(state)),
            checkpointer,
        })
    }

    /// The partition's log, which the state side appends its records to.
    pub fn log(&self) -> &Arc<MetadataLog> {
        &self.log
    }

    /// The state side's snapshot and records as the log held them at open; once.
    pub fn take_state_recovery(&self) -> Option<StateRecovery> {
        self.state.lock().take()
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

    /// Records the metadata log's flushes (fsync latency, records per flush) and the
    /// checkpoints' commits in the server's `stats` from now on.
    pub fn observe(&self, stats: Arc<crate::stats::Stats>) {
        self.log.observe(stats);
    }

    /// What the metadata log's flusher did so far: flushes, records, segments.
    pub fn log_figures(&self) -> LogFigures {
        self.log.stats()
    }

    /// Makes every volume's applied changes durable in its tables and lets go of the
    /// log segments no volume needs any more. Blocking.
    pub fn checkpoint(&self) -> Result<(), StorageError> {
        checkpoint::checkpoint_all(&self.volumes, &self.log)
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
        let disk = self.disk.as_ref();
        if disk
            .list(&self.root)
            .map_err(io_error(&self.root))?
            .iter()
            .any(|n| building.file_name().is_some_and(|b| b == n.as_str()))
        {
            disk.remove_dir_all(&building)
                .map_err(io_error(&building))?;
        }
        disk.create_dir_all(&building)
            .map_err(io_error(&building))?;
        // Every record queued so far is older than the new volume, and durable before
        // the volume's tables say they include it.
        let applied = Lsn(self.log.next_lsn().0 - 1);
        self.log.wait_durable(applied)?;
        Volume::initialize(
            disk,
            &building,
            id,
            name.clone(),
            quota_bytes,
            &self.fence,
            applied,
        )?;
        // The database's and the data directory's names, before the volume's.
        disk.sync_dir(&building).map_err(io_error(&building))?;
        disk.rename(&building, &final_dir)
            .map_err(io_error(&final_dir))?;
        disk.sync_dir(&self.root).map_err(io_error(&self.root))?;
        let tables = Tables::open(disk, &final_dir)?;
        let volume = Arc::new(Volume::open(
            &final_dir,
            id,
            tables,
            self.fence.clone(),
            self.log.clone(),
            applied,
        )?);
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
        self.disk.rename(&dir, &removing).map_err(io_error(&dir))?;
        self.disk
            .sync_dir(&self.root)
            .map_err(io_error(&self.root))?;
        self.disk
            .remove_dir_all(&removing)
            .map_err(io_error(&removing))?;
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

impl Drop for Partition {
    /// A clean close: the checkpointer stops, and a last checkpoint leaves nothing for
    /// the next open to replay (skipped behind a closed fence, which would refuse it).
    /// The log stops with the last volume handle (a request may still hold one).
    fn drop(&mut self) {
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.stop();
        }
        if self.fence.is_open()
            && let Err(e) = self.checkpoint()
        {
            warn!(error = %e, "the checkpoint at close failed: the next open replays the log");
        }
    }
}

impl Checkpointer {
    fn start(
        period: Duration,
        volumes: Arc<VolumeMap>,
        log: Arc<MetadataLog>,
    ) -> Result<Checkpointer, StorageError> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("checkpointer".into())
            .spawn(move || {
                let (stopped, wake) = &*signal;
                let mut stopped = stopped.lock();
                while !*stopped {
                    wake.wait_for(&mut stopped, period);
                    if *stopped {
                        break;
                    }
                    drop(stopped);
                    if let Err(e) = checkpoint::checkpoint_all(&volumes, &log) {
                        if e.is_fenced() {
                            debug!(error = %e, "checkpoint skipped behind the fence");
                        } else {
                            warn!(error = %e, "checkpoint failed; the metadata log keeps the changes");
                        }
                    }
                    stopped = signal.0.lock();
                }
            })
            .map_err(|e| StorageError::Io {
                path: PathBuf::from("checkpointer thread"),
                source: e,
            })?;
        Ok(Checkpointer { stop, thread })
    }

    fn stop(self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        let _ = self.thread.join();
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
