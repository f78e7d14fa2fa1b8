//! Callback promises a cache manager gives up (cache eviction) or reclaims after this
//! server restarted or took over.
//! Invariant: a reclaimed promise is granted before the data version is compared, so a
//! change after the comparison breaks it and a change before it shows as broken.

use std::sync::Arc;

use proto::{CallbackGrant, DataVersion, ErrorCode, Fid, Response};

use super::{Caller, FileService, blocking};

/// Most fids one `ReclaimCallbacks` names; a client with more sends several.
const RECLAIM_FIDS_MAX: usize = 8192;

impl FileService {
    pub(super) fn give_up(&self, caller: Caller, fids: &[Fid]) -> Response {
        if let Some(client) = caller.key {
            self.callbacks.give_up(client, fids);
        }
        Response::Ok
    }

    /// Re-grants the promises a client held before a restart whose data version is
    /// unchanged, and names the rest (changed, gone, or on a missing volume) as broken.
    pub(super) async fn reclaim_callbacks(
        self: &Arc<Self>,
        caller: Caller,
        fids: Vec<(Fid, DataVersion)>,
    ) -> Result<Response, ErrorCode> {
        let client = caller.client()?;
        if fids.len() > RECLAIM_FIDS_MAX {
            return Err(ErrorCode::TooLarge);
        }
        let partition = self.partition.clone();
        let mut callback = None;
        for &(fid, _) in &fids {
            callback = self.grant(caller, fid).await;
        }
        let unchanged = blocking(move || {
            Ok(fids
                .into_iter()
                .map(|(fid, version)| {
                    let same = partition
                        .volume(fid.volume)
                        .and_then(|volume| volume.fetch_status(fid))
                        .is_ok_and(|status| status.data_version == version);
                    (fid, same)
                })
                .collect::<Vec<_>>())
        })
        .await?;
        let broken: Vec<Fid> = unchanged
            .iter()
            .filter(|(_, same)| !same)
            .map(|(fid, _)| *fid)
            .collect();
        self.callbacks.give_up(client, &broken);
        Ok(Response::CallbacksReclaimed {
            broken,
            callback: callback.unwrap_or(CallbackGrant { lifetime_ms: 0 }),
        })
    }
}
