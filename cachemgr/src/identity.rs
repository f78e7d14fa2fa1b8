//! The client's identity: a `ClientId` kept in the cache directory across restarts and a
//! fresh `InstanceNonce` per start, so a server tells a restart from a reconnect.
//! Invariant: an id file that does not parse is an error, never silently replaced (that
//! would orphan the old client's state on the servers).

use std::path::Path;

use proto::{ClientId, InstanceNonce};
use uuid::Uuid;

use crate::error::CacheError;

/// The client id's file in the cache directory: one UUID in text form.
const CLIENT_ID_FILE: &str = "client.id";

/// Reads the client id, creating it on first start.
pub fn load_or_create_client_id(cache_dir: &Path) -> Result<ClientId, CacheError> {
    let path = cache_dir.join(CLIENT_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Uuid::parse_str(text.trim())
            .map(ClientId)
            .map_err(|_| CacheError::ClientIdCorrupt { path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = ClientId::random();
            // Write then rename, so a crash never leaves a half-written id behind.
            let temp = cache_dir.join(format!("{CLIENT_ID_FILE}.tmp"));
            let io = |source| CacheError::CacheDir {
                path: path.clone(),
                source,
            };
            std::fs::write(&temp, format!("{}\n", id.0)).map_err(io)?;
            std::fs::rename(&temp, &path).map_err(io)?;
            Ok(id)
        }
        Err(source) => Err(CacheError::CacheDir { path, source }),
    }
}

/// A new nonce for this start: the low bits of a random UUID.
pub fn new_instance_nonce() -> InstanceNonce {
    InstanceNonce(Uuid::new_v4().as_u64_pair().0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_client_id(dir.path()).unwrap();
        let second = load_or_create_client_id(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_ne!(new_instance_nonce(), new_instance_nonce());
    }

    #[test]
    fn corrupt_client_id_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CLIENT_ID_FILE), "not a uuid").unwrap();
        let err = load_or_create_client_id(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}
