//! The cache manager's side of the control socket: one task per `fs` connection, each
//! request frame answered from the manager.
//! Invariant: at most `CONNECTIONS_MAX` connections are served at once, each holding one
//! frame at a time, and a failed request is answered with `ControlResponse::Error` text.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info};

use crate::control::{ControlRequest, ControlResponse, TokenInfo, body_len, decode, encode};
use crate::manager::Manager;
use crate::tokens::{self, Held, LocalUid};

/// `fs` connections served at once; the next accept waits for a free one, so a client
/// can make the server hold at most this many frames.
const CONNECTIONS_MAX: usize = 64;

pub async fn serve(
    listener: UnixListener,
    manager: Arc<Manager>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "control accept failed");
                continue;
            }
        };
        let manager = manager.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &manager).await {
                debug!(error = %e, "control connection failed");
            }
            drop(permit);
        });
    }
}

/// Answers one request per frame until the client closes. A frame too large to take
/// ends the connection rather than get an answer.
async fn handle(mut stream: UnixStream, manager: &Manager) -> std::io::Result<()> {
    // Who is asking: a token given here is theirs, and calls made here carry theirs.
    let peer = stream.peer_cred()?.uid();
    loop {
        let mut header = [0u8; 4];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = body_len(header).map_err(std::io::Error::other)?;
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        let response = match decode::<ControlRequest>(&body) {
            Ok(request) => tokens::acting_for(LocalUid(peer), answer(manager, request, peer)).await,
            Err(e) => ControlResponse::Error(format!("bad control request: {e}")),
        };
        let frame = encode(&response).map_err(std::io::Error::other)?;
        stream.write_all(&frame).await?;
    }
}

/// Root may act on another uid's token; anyone else only on their own.
fn token_owner(peer: u32, uid: Option<u32>) -> Result<LocalUid, ControlResponse> {
    match uid {
        None => Ok(LocalUid(peer)),
        Some(uid) if uid == peer || peer == 0 => Ok(LocalUid(uid)),
        Some(uid) => Err(ControlResponse::Error(format!(
            "only root may set or drop the token of uid {uid}"
        ))),
    }
}

fn token_info(uid: LocalUid, held: &Held) -> TokenInfo {
    TokenInfo {
        uid: uid.0,
        user: held.body.user.clone(),
        id: held.body.id,
        cell: held.body.cell.clone(),
        expiry: held.body.expiry,
    }
}

async fn answer(manager: &Manager, request: ControlRequest, peer: u32) -> ControlResponse {
    debug!(?request, peer, "control request");
    match request {
        ControlRequest::SetToken { token, uid } => {
            let owner = match token_owner(peer, uid) {
                Ok(owner) => owner,
                Err(refusal) => return refusal,
            };
            if let Ok(body) = token.unverified_body()
                && body.cell != manager.cell_name()
            {
                return ControlResponse::Error(format!(
                    "the token is for cell {}, and this mount shows cell {}",
                    body.cell,
                    manager.cell_name()
                ));
            }
            match manager.tokens().set(owner, token) {
                Ok(()) => {
                    manager.tokens_changed();
                    info!(uid = owner.0, "token set");
                    ControlResponse::TokenSet
                }
                Err(e) => ControlResponse::Error(e.to_string()),
            }
        }
        ControlRequest::ListTokens => {
            let mut held = manager.tokens().all();
            if peer != 0 {
                held.retain(|(uid, _)| uid.0 == peer);
            }
            ControlResponse::Tokens(held.iter().map(|(uid, h)| token_info(*uid, h)).collect())
        }
        ControlRequest::DropToken { uid } => match token_owner(peer, uid) {
            Ok(owner) => {
                let held = manager.tokens().remove(owner);
                manager.tokens_changed();
                ControlResponse::TokenDropped { held }
            }
            Err(refusal) => refusal,
        },
        ControlRequest::Login {
            cell,
            user,
            password,
            lifetime_secs,
        } => {
            if cell != manager.cell_name() {
                return ControlResponse::Error(format!(
                    "this mount shows cell {}, not {cell}",
                    manager.cell_name()
                ));
            }
            let token = match manager.login(&user, password, lifetime_secs).await {
                Ok(token) => token,
                Err(message) => return ControlResponse::Error(message),
            };
            match manager.tokens().set(LocalUid(peer), token.clone()) {
                Ok(()) => {
                    manager.tokens_changed();
                    info!(uid = peer, %user, "logged in");
                    ControlResponse::Token(token)
                }
                Err(e) => ControlResponse::Error(e.to_string()),
            }
        }
        ControlRequest::GetAcl { dir } => match manager.fetch_acl(dir).await {
            Ok(acl) => ControlResponse::Acl(acl),
            Err(e) => ControlResponse::Error(e.to_string()),
        },
        ControlRequest::SetAcl { dir, acl } => match manager.store_acl(dir, acl).await {
            Ok(()) => ControlResponse::AclSet,
            Err(e) => ControlResponse::Error(e.to_string()),
        },
        ControlRequest::Examine { ino } => match manager.examine(ino).await {
            Ok(info) => ControlResponse::Examine(info),
            Err(e) => ControlResponse::Error(e.to_string()),
        },
        ControlRequest::ExamineEntry { dir, name } => {
            match manager.examine_entry(dir, &name).await {
                Ok(info) => ControlResponse::Examine(info),
                Err(e) => ControlResponse::Error(e.to_string()),
            }
        }
        ControlRequest::Whereis { ino } => match manager.whereis(ino).await {
            Ok((volume, addresses)) => ControlResponse::Whereis { volume, addresses },
            Err(e) => ControlResponse::Error(e.to_string()),
        },
        ControlRequest::Flush { ino } => match manager.flush_cached(ino).await {
            Ok(()) => ControlResponse::Flushed,
            Err(e) => ControlResponse::Error(e.to_string()),
        },
        ControlRequest::CheckServers => ControlResponse::Servers(manager.check_servers().await),
        ControlRequest::MkMount { dir, name, volume } => {
            match manager.make_mount(dir, &name, &volume).await {
                Ok(()) => ControlResponse::MountMade,
                Err(message) => ControlResponse::Error(message),
            }
        }
        ControlRequest::LsMount { dir, name } => match manager.list_mount(dir, &name).await {
            Ok(content) => ControlResponse::LsMount { content },
            Err(e) => ControlResponse::Error(e.to_string()),
        },
        ControlRequest::Figures => ControlResponse::Figures(manager.figures().figures()),
    }
}
