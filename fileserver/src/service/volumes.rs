//! Volume administration on this server's partition: space, create, remove, list and
//! examine, for `vos` and the cache managers' `fs` commands.
//! Invariant: each runs off the async threads and changes the partition durably before
//! it answers.

use proto::{ErrorCode, Response, VolumeId, VolumeName};

use super::{FileService, blocking};

impl FileService {
    pub(super) async fn volume_space(&self, volume: VolumeId) -> Result<Response, ErrorCode> {
        let partition = self.partition.clone();
        let space = blocking(move || partition.space(volume)).await?;
        Ok(Response::VolumeSpace(space))
    }

    pub(super) async fn create_volume(
        &self,
        id: VolumeId,
        name: VolumeName,
        quota_bytes: u64,
    ) -> Result<Response, ErrorCode> {
        let partition = self.partition.clone();
        let info = blocking(move || partition.create_volume(id, name, quota_bytes)).await?;
        Ok(Response::Volume(info))
    }

    pub(super) async fn remove_volume(&self, id: VolumeId) -> Result<Response, ErrorCode> {
        let partition = self.partition.clone();
        blocking(move || partition.remove_volume(id)).await?;
        Ok(Response::Ok)
    }

    pub(super) async fn list_volumes(&self) -> Result<Response, ErrorCode> {
        let partition = self.partition.clone();
        let infos = blocking(move || {
            partition
                .volumes()
                .iter()
                .map(|volume| volume.info())
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        Ok(Response::Volumes(infos))
    }

    pub(super) async fn examine_volume(&self, id: VolumeId) -> Result<Response, ErrorCode> {
        let volume = self.volume(id)?;
        let info = blocking(move || volume.info()).await?;
        Ok(Response::Volume(info))
    }
}
