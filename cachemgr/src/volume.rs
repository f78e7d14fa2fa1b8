//! Where volumes live: VLDB lookups by name or id, resolved to the fileserver's id and
//! addresses, cached for the life of the mount.
//! Invariant: a cached location names one fileserver with at least one address.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use proto::{
    ErrorCode, ProtoError, ServerId, VldbClient, VolumeEntry, VolumeId, VolumeName, VolumeRef,
    VolumeType,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeLocation {
    pub id: VolumeId,
    pub name: VolumeName,
    pub server: ServerId,
    pub addresses: Vec<String>,
}

#[derive(Default)]
pub struct VolumeTable {
    by_id: Mutex<HashMap<VolumeId, Arc<VolumeLocation>>>,
    by_name: Mutex<HashMap<VolumeName, VolumeId>>,
}

impl VolumeTable {
    pub fn cached(&self, id: VolumeId) -> Option<Arc<VolumeLocation>> {
        self.by_id.lock().get(&id).cloned()
    }

    /// Every fileserver holding a volume this mount has used, with its addresses.
    pub fn servers(&self) -> Vec<(ServerId, Vec<String>)> {
        let mut servers: Vec<(ServerId, Vec<String>)> = Vec::new();
        for location in self.by_id.lock().values() {
            if !servers.iter().any(|(s, _)| *s == location.server) {
                servers.push((location.server, location.addresses.clone()));
            }
        }
        servers.sort_by(|a, b| a.1.cmp(&b.1));
        servers
    }

    /// The volumes known to live on `server`.
    pub fn volumes_on(&self, server: ServerId) -> Vec<VolumeId> {
        self.by_id
            .lock()
            .values()
            .filter(|l| l.server == server)
            .map(|l| l.id)
            .collect()
    }

    /// `server` moved to `addresses` (the VLDB says so): every volume on it follows.
    pub fn relocate(&self, server: ServerId, addresses: &[String]) {
        if addresses.is_empty() {
            return;
        }
        for location in self.by_id.lock().values_mut() {
            if location.server == server && location.addresses != addresses {
                *location = Arc::new(VolumeLocation {
                    addresses: addresses.to_vec(),
                    ..VolumeLocation::clone(location)
                });
            }
        }
    }

    pub async fn by_name(
        &self,
        vldb: &VldbClient,
        name: &VolumeName,
    ) -> Result<Arc<VolumeLocation>, ProtoError> {
        let known = self.by_name.lock().get(name).copied();
        if let Some(location) = known.and_then(|id| self.cached(id)) {
            return Ok(location);
        }
        let entry = vldb.get_entry(VolumeRef::Name(name.clone())).await?;
        self.remember(vldb, &entry, entry.rw_id).await
    }

    pub async fn by_id(
        &self,
        vldb: &VldbClient,
        id: VolumeId,
    ) -> Result<Arc<VolumeLocation>, ProtoError> {
        if let Some(location) = self.cached(id) {
            return Ok(location);
        }
        let entry = vldb.get_entry(VolumeRef::Id(id)).await?;
        self.remember(vldb, &entry, id).await
    }

    async fn remember(
        &self,
        vldb: &VldbClient,
        entry: &VolumeEntry,
        id: VolumeId,
    ) -> Result<Arc<VolumeLocation>, ProtoError> {
        let kind = if Some(id) == entry.ro_id {
            VolumeType::ReadOnly
        } else if Some(id) == entry.backup_id {
            VolumeType::Backup
        } else {
            VolumeType::ReadWrite
        };
        // A backup clone lives beside its RW volume.
        let site = entry
            .sites
            .iter()
            .find(|s| s.kind == kind)
            .or_else(|| entry.sites.iter().find(|s| s.kind == VolumeType::ReadWrite))
            .ok_or(ProtoError::Remote(ErrorCode::NoSuchVolume))?;
        let servers = vldb.list_servers().await?;
        let server = servers
            .into_iter()
            .find(|s| s.server == site.server && !s.addresses.is_empty())
            .ok_or(ProtoError::Remote(ErrorCode::NoSuchServer))?;
        let location = Arc::new(VolumeLocation {
            id,
            name: entry.name.clone(),
            server: server.server,
            addresses: server.addresses,
        });
        self.by_id.lock().insert(id, location.clone());
        if kind == VolumeType::ReadWrite {
            self.by_name.lock().insert(entry.name.clone(), id);
        }
        Ok(location)
    }
}
