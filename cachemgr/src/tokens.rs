//! The tokens this workstation's users hold (`holdfast login`), by local uid, and whose
//! token the current FUSE request is made with.
//! Invariant: a token is handed in only over the control socket by the uid it is for
//! (or root), so a local user can act with no one else's token; a request made outside
//! a caller's scope acts for `system:anyuser`.

use std::collections::HashMap;

use parking_lot::Mutex;
use proto::{SealedToken, TokenBody};

/// The most local uids holding a token at once.
pub const TOKEN_HOLDERS_MAX: usize = 4096;

/// The local uid a FUSE request came from; set for the request's task by `fuse_fs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalUid(pub u32);

tokio::task_local! {
    /// The uid whose token the current task's server calls are made with.
    static CALLER: LocalUid;
}

/// Runs `future` as a request of `uid`: the server calls it makes carry `uid`'s token.
pub async fn acting_for<F: std::future::Future>(uid: LocalUid, future: F) -> F::Output {
    CALLER.scope(uid, future).await
}

/// Runs `future` as a request of `uid` if given, else outside any caller's scope: for
/// work spawned on a request's behalf (a fetch ahead), which keeps its caller's token.
pub async fn acting_as<F: std::future::Future>(uid: Option<LocalUid>, future: F) -> F::Output {
    match uid {
        Some(uid) => CALLER.scope(uid, future).await,
        None => future.await,
    }
}

/// The uid the current task acts for, if it runs for a FUSE request.
pub fn current_caller() -> Option<LocalUid> {
    CALLER.try_with(|uid| *uid).ok()
}

/// The tokens held on this workstation.
#[derive(Default)]
pub struct TokenStore {
    by_uid: Mutex<HashMap<LocalUid, Held>>,
}

/// One uid's token and what it says (read without verifying: the servers verify).
#[derive(Clone, Debug)]
pub struct Held {
    pub token: SealedToken,
    pub body: TokenBody,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenStoreError {
    #[error("the token is malformed: get a new one with `holdfast login`")]
    Malformed,
    #[error("this workstation holds tokens for {TOKEN_HOLDERS_MAX} users already")]
    Full,
}

impl TokenStore {
    /// Keeps `token` for `uid`, replacing the one it had.
    pub fn set(&self, uid: LocalUid, token: SealedToken) -> Result<(), TokenStoreError> {
        let body = token
            .unverified_body()
            .map_err(|_| TokenStoreError::Malformed)?;
        let mut by_uid = self.by_uid.lock();
        if by_uid.len() >= TOKEN_HOLDERS_MAX && !by_uid.contains_key(&uid) {
            return Err(TokenStoreError::Full);
        }
        by_uid.insert(uid, Held { token, body });
        Ok(())
    }

    /// Drops `uid`'s token; true if it had one.
    pub fn remove(&self, uid: LocalUid) -> bool {
        self.by_uid.lock().remove(&uid).is_some()
    }

    /// Every uid's token, by uid.
    pub fn all(&self) -> Vec<(LocalUid, Held)> {
        let mut all: Vec<_> = self
            .by_uid
            .lock()
            .iter()
            .map(|(uid, held)| (*uid, held.clone()))
            .collect();
        all.sort_by_key(|(uid, _)| uid.0);
        all
    }

    pub fn get(&self, uid: LocalUid) -> Option<Held> {
        self.by_uid.lock().get(&uid).cloned()
    }

    /// The token the current task's server calls carry, if its caller holds one.
    pub fn for_current_caller(&self) -> Option<SealedToken> {
        let uid = current_caller()?;
        self.by_uid.lock().get(&uid).map(|held| held.token.clone())
    }
}
