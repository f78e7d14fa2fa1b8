//! `Vos`: the volume administration operations, each a short conversation with the VLDB
//! and the fileserver holding the volume.
//! Invariant: an entry leaves the VLDB only once its fileservers dropped the volume, and
//! one whose volume was not created is removed again (a failed undo is logged at WARN).

use std::time::Duration;

use proto::histogram::Figures;
use proto::{
    CellConfig, ErrorCode, PROTOCOL_VERSION_DATA_PATH, PeerKind, ProtoError, Request, Response,
    ServerEntry, ServerId, Transport, VldbClient, VolumeEntry, VolumeId, VolumeInfo, VolumeName,
    VolumeRef, VolumeSite, VolumeType,
};
use tracing::{info, warn};

use crate::error::VosError;
use crate::fileserver::Fileserver;

const BYTES_PER_MIB: u64 = 1 << 20;

/// Administers the volumes of one cell.
pub struct Vos {
    pub(crate) cell: CellConfig,
    pub(crate) transport: Transport,
    pub(crate) timeout: Duration,
    pub(crate) vldb: VldbClient,
    /// The token VLDB and fileserver calls carry.
    pub(crate) token: Option<proto::SealedToken>,
}

impl Vos {
    /// `timeout` bounds each connection attempt and each call; `transport` is this
    /// host's (its host certificate).
    pub fn new(cell: CellConfig, transport: Transport, timeout: Duration) -> Vos {
        let vldb = VldbClient::new(cell.clone(), transport.clone(), PeerKind::Admin, timeout);
        Vos {
            cell,
            transport,
            timeout,
            vldb,
            token: None,
        }
    }

    /// Makes every VLDB call for the holder of `token` (`holdfast login`'s, or a
    /// `--localauth` one): changes to the cell need an administrator's.
    pub fn with_token(self, token: Option<proto::SealedToken>) -> Vos {
        Vos {
            vldb: self.vldb.with_token(token.clone()),
            token,
            ..self
        }
    }

    /// An administrative connection to `server`, carrying this tool's token.
    pub(crate) async fn fileserver(
        &self,
        server: &ServerEntry,
        timeout: Duration,
    ) -> Result<Fileserver, VosError> {
        let fileserver = Fileserver::connect(&self.cell, &self.transport, server, timeout).await?;
        Ok(fileserver.with_token(self.token.clone()))
    }

    /// `fileserver` at one address.
    pub(crate) async fn fileserver_at(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<Fileserver, VosError> {
        let fileserver =
            Fileserver::connect_to(&self.cell, &self.transport, address, timeout).await?;
        Ok(fileserver.with_token(self.token.clone()))
    }

    /// The registered fileservers, ordered by address.
    pub async fn servers(&self) -> Result<Vec<ServerEntry>, VosError> {
        let mut servers = self
            .vldb
            .list_servers()
            .await
            .map_err(|e| self.vldb_error(e))?;
        servers.sort_by(|a, b| a.addresses.cmp(&b.addresses));
        Ok(servers)
    }

    /// Creates a RW volume: a VLDB entry first (which allocates the id), then the volume
    /// on the chosen fileserver. `server` must be one of a registered fileserver's
    /// addresses; without it the cell must have exactly one fileserver.
    pub async fn create(
        &self,
        name: &str,
        server: Option<&str>,
        quota_mib: u64,
    ) -> Result<VolumeEntry, VosError> {
        let volume_name = parse_name(name)?;
        let quota_bytes = quota_mib
            .checked_mul(BYTES_PER_MIB)
            .ok_or(VosError::QuotaTooLarge { quota_mib })?;
        let servers = self.servers().await?;
        let target = pick_server(&servers, server)?;
        let entry = match self
            .vldb
            .create_entry(volume_name.clone(), target.server)
            .await
        {
            Ok(entry) => entry,
            Err(ProtoError::Remote(ErrorCode::VolumeExists)) => {
                return Err(VosError::Exists { name: name.into() });
            }
            Err(e) => return Err(self.vldb_error(e)),
        };
        let request = Request::CreateVolume {
            id: entry.rw_id,
            name: volume_name,
            quota_bytes,
        };
        let created = match self.fileserver(target, self.timeout).await {
            Ok(fileserver) => match fileserver.call(request).await {
                Ok(Response::Ok | Response::Volume(_)) => Ok(fileserver.address().to_owned()),
                Ok(other) => Err(fileserver.unexpected(&other)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match created {
            Ok(address) => {
                info!(volume = %entry.name, id = %entry.rw_id, %address, "volume created");
                Ok(entry)
            }
            Err(e) => {
                // Leave no VLDB entry pointing at a volume that does not exist.
                if let Err(undo) = self.vldb.remove_entry(VolumeRef::Id(entry.rw_id)).await {
                    warn!(volume = %entry.name, id = %entry.rw_id, error = %undo,
                        "could not remove the VLDB entry of the volume the fileserver did not create; \
                         remove it with `holdfast vos remove`");
                }
                Err(e)
            }
        }
    }

    /// Removes a volume (by name or numeric id) from its fileservers, then from the VLDB.
    pub async fn remove(&self, volume: &str) -> Result<(), VosError> {
        let entry = self.entry(volume).await?;
        self.check_may_change().await?;
        let servers = self.servers().await?;
        for site in &entry.sites {
            let Some(id) = site_volume_id(&entry, site) else {
                continue;
            };
            let server = site_server(&entry, site, &servers)?;
            let fileserver = self.fileserver(server, self.timeout).await?;
            match fileserver.call(Request::RemoveVolume { id }).await {
                Ok(Response::Ok | Response::Volume(_)) => {}
                Ok(other) => return Err(fileserver.unexpected(&other)),
                // Already gone there: the VLDB entry is all that is left.
                Err(VosError::Fileserver {
                    code: ErrorCode::NoSuchVolume,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        match self.vldb.remove_entry(VolumeRef::Id(entry.rw_id)).await {
            Ok(()) | Err(ProtoError::Remote(ErrorCode::NoSuchVolume)) => {}
            Err(e) => return Err(self.vldb_error(e)),
        }
        info!(volume = %entry.name, id = %entry.rw_id, "volume removed");
        Ok(())
    }

    /// Asks the VLDB whether this caller may change the cell, before a change that
    /// starts at a fileserver: removing the entry of volume id 0, which no volume has,
    /// is refused (`AdministratorRequired`) to a caller who may not, and changes nothing
    /// for one who may.
    async fn check_may_change(&self) -> Result<(), VosError> {
        match self.vldb.remove_entry(VolumeRef::Id(VolumeId(0))).await {
            Ok(()) | Err(ProtoError::Remote(ErrorCode::NoSuchVolume)) => Ok(()),
            Err(e) => Err(self.vldb_error(e)),
        }
    }

    /// A volume's VLDB entry and, when its RW fileserver answers, the volume's status
    /// there. An unreachable fileserver is a warning, not an error: the entry still shows.
    pub async fn examine(
        &self,
        volume: &str,
    ) -> Result<(VolumeEntry, Option<VolumeInfo>), VosError> {
        let entry = self.entry(volume).await?;
        let servers = self.servers().await?;
        let info = match self.examine_rw(&entry, &servers).await {
            Ok(info) => info,
            Err(e) => {
                warn!(volume = %entry.name, "cannot examine the volume on its fileserver: {e}");
                None
            }
        };
        Ok((entry, info))
    }

    /// Every VLDB entry, sorted by name.
    pub async fn listvldb(&self) -> Result<Vec<VolumeEntry>, VosError> {
        self.vldb
            .list_entries()
            .await
            .map_err(|e| self.vldb_error(e))
    }

    /// The volumes on one fileserver (`server` = one of its addresses), or on every
    /// registered fileserver; each list sorted by name.
    pub async fn listvol(
        &self,
        server: Option<&str>,
    ) -> Result<Vec<(ServerEntry, Vec<VolumeInfo>)>, VosError> {
        let servers = self.servers().await?;
        let targets: Vec<&ServerEntry> = match server {
            Some(address) => vec![find_server(&servers, address)?],
            None if servers.is_empty() => return Err(VosError::NoFileserver),
            None => servers.iter().collect(),
        };
        let mut out = Vec::with_capacity(targets.len());
        for target in targets {
            let fileserver = self.fileserver(target, self.timeout).await?;
            let mut volumes = match fileserver.call(Request::ListVolumes).await? {
                Response::Volumes(volumes) => volumes,
                other => return Err(fileserver.unexpected(&other)),
            };
            volumes.sort_by(|a, b| a.name.cmp(&b.name));
            out.push((target.clone(), volumes));
        }
        Ok(out)
    }

    /// A fileserver's counters and histograms (`--server`, or the only fileserver of the
    /// cell). A server older than protocol version 4 has counters only.
    pub async fn server_figures(
        &self,
        server: Option<&str>,
    ) -> Result<(ServerEntry, Figures), VosError> {
        let servers = self.servers().await?;
        let target = match server {
            Some(address) => find_server(&servers, address)?,
            None => match servers.as_slice() {
                [] => return Err(VosError::NoFileserver),
                [only] => only,
                _ => {
                    return Err(VosError::ServerRequired {
                        count: servers.len(),
                    });
                }
            },
        };
        let fileserver = self.fileserver(target, self.timeout).await?;
        if fileserver.version() < PROTOCOL_VERSION_DATA_PATH {
            return match fileserver.call(Request::ServerCounters).await? {
                Response::Counters(counters) => Ok((
                    target.clone(),
                    Figures {
                        counters,
                        histograms: Vec::new(),
                    },
                )),
                other => Err(fileserver.unexpected(&other)),
            };
        }
        match fileserver.call(Request::ServerFigures).await? {
            Response::Figures(figures) => Ok((target.clone(), figures)),
            other => Err(fileserver.unexpected(&other)),
        }
    }

    async fn entry(&self, volume: &str) -> Result<VolumeEntry, VosError> {
        match self.vldb.get_entry(parse_ref(volume)?).await {
            Ok(entry) => Ok(entry),
            Err(ProtoError::Remote(ErrorCode::NoSuchVolume)) => Err(VosError::NoSuchVolume {
                volume: volume.into(),
            }),
            Err(e) => Err(self.vldb_error(e)),
        }
    }

    async fn examine_rw(
        &self,
        entry: &VolumeEntry,
        servers: &[ServerEntry],
    ) -> Result<Option<VolumeInfo>, VosError> {
        let Some(site) = entry.sites.iter().find(|s| s.kind == VolumeType::ReadWrite) else {
            return Ok(None);
        };
        let server = site_server(entry, site, servers)?;
        let fileserver = self.fileserver(server, self.timeout).await?;
        match fileserver
            .call(Request::ExamineVolume { id: entry.rw_id })
            .await?
        {
            Response::Volume(info) => Ok(Some(info)),
            other => Err(fileserver.unexpected(&other)),
        }
    }

    pub(crate) fn vldb_error(&self, e: ProtoError) -> VosError {
        match e {
            ProtoError::Remote(code) => VosError::Vldb(code),
            source => VosError::VldbUnreachable {
                addresses: self.cell.vlservers.join(", "),
                source,
            },
        }
    }
}

fn parse_name(name: &str) -> Result<VolumeName, VosError> {
    let parsed = VolumeName::parse(name).map_err(|_| VosError::BadName { name: name.into() })?;
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VosError::NumericName { name: name.into() });
    }
    Ok(parsed)
}

/// A volume named on the command line: digits only are an id, as in AFS.
fn parse_ref(volume: &str) -> Result<VolumeRef, VosError> {
    if !volume.is_empty() && volume.bytes().all(|b| b.is_ascii_digit()) {
        return match volume.parse::<u64>() {
            Ok(id) => Ok(VolumeRef::Id(VolumeId(id))),
            Err(_) => Err(VosError::NoSuchVolume {
                volume: volume.into(),
            }),
        };
    }
    VolumeName::parse(volume)
        .map(VolumeRef::Name)
        .map_err(|_| VosError::BadName {
            name: volume.into(),
        })
}

fn pick_server<'a>(
    servers: &'a [ServerEntry],
    address: Option<&str>,
) -> Result<&'a ServerEntry, VosError> {
    match (address, servers) {
        (Some(address), _) => find_server(servers, address),
        (None, []) => Err(VosError::NoFileserver),
        (None, [only]) => Ok(only),
        (None, many) => Err(VosError::ServerRequired { count: many.len() }),
    }
}

fn find_server<'a>(servers: &'a [ServerEntry], address: &str) -> Result<&'a ServerEntry, VosError> {
    if servers.is_empty() {
        return Err(VosError::NoFileserver);
    }
    servers
        .iter()
        .find(|s| s.addresses.iter().any(|a| a == address))
        .ok_or_else(|| VosError::UnknownServer {
            address: address.into(),
            registered: servers
                .iter()
                .flat_map(|s| s.addresses.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The id of the volume a site holds: each site kind has its own id in the entry.
fn site_volume_id(entry: &VolumeEntry, site: &VolumeSite) -> Option<VolumeId> {
    match site.kind {
        VolumeType::ReadWrite => Some(entry.rw_id),
        VolumeType::ReadOnly => entry.ro_id,
        VolumeType::Backup => entry.backup_id,
    }
}

fn site_server<'a>(
    entry: &VolumeEntry,
    site: &VolumeSite,
    servers: &'a [ServerEntry],
) -> Result<&'a ServerEntry, VosError> {
    servers
        .iter()
        .find(|s| s.server == site.server && !s.addresses.is_empty())
        .ok_or(VosError::SiteUnknown {
            volume: entry.name.to_string(),
            server: site.server,
        })
}

/// Names a server for people: its addresses, or its id when it has none.
pub(crate) fn server_label(server: ServerId, servers: &[ServerEntry]) -> String {
    match servers.iter().find(|s| s.server == server) {
        Some(entry) if !entry.addresses.is_empty() => entry.addresses.join(", "),
        _ => format!("{server} (no registered address)"),
    }
}
