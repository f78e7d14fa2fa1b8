//! The `holdfast fs` control protocol on a mount's unix socket, and its client side:
//! find the mount holding a path, ask its cache manager, render AFS-like text.
//! Invariant: a frame is a little-endian `u32` length and a postcard body of at most
//! `CONTROL_FRAME_BYTES_MAX`, and enum variants are only appended.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::histogram::Figures;
use proto::{
    AccessList, DataVersion, Fid, FileKind, Password, PrincipalId, Rights, SealedToken, Timestamp,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::CacheError;
use crate::inode::Ino;
use crate::mountinfo;

/// Largest control frame body.
pub const CONTROL_FRAME_BYTES_MAX: usize = 1 << 20;
/// How long an `fs` command waits for the cache manager (which may itself wait for a
/// fileserver up to its RPC timeout).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    Examine {
        ino: Ino,
    },
    Whereis {
        ino: Ino,
    },
    Flush {
        ino: Ino,
    },
    CheckServers,
    MkMount {
        dir: Ino,
        name: String,
        volume: String,
    },
    LsMount {
        dir: Ino,
        name: String,
    },
    /// Examines the entry `name` of directory `dir` as cached, without revalidating it.
    ExamineEntry {
        dir: Ino,
        name: String,
    },
    /// Keeps `token` for the caller's uid (from the socket's peer credentials); root may
    /// name another `uid`. Answered `TokenSet`.
    SetToken {
        token: SealedToken,
        uid: Option<u32>,
    },
    /// The tokens held: the caller's own, every uid's for root. Answered `Tokens`.
    ListTokens,
    /// Drops the caller's token (root: `uid`'s). Answered `TokenDropped`.
    DropToken {
        uid: Option<u32>,
    },
    /// A directory's access list, fetched for the caller. Answered `Acl`.
    GetAcl {
        dir: Ino,
    },
    /// Replaces a directory's access list for the caller. Answered `AclSet`.
    SetAcl {
        dir: Ino,
        acl: AccessList,
    },
    /// Asks the VLDB of `cell` (this mount's) for `user`'s token with `password`, through
    /// the cache manager's own connection (a local user holds no host certificate), and
    /// keeps it for the caller's uid. Answered `Token`.
    Login {
        cell: String,
        user: String,
        password: Password,
        lifetime_secs: Option<u64>,
    },
    /// The mount's figures: the data path's counters and each FUSE operation's latency.
    /// Answered `Figures`.
    Figures,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    Examine(ExamineInfo),
    Whereis {
        volume: String,
        addresses: Vec<String>,
    },
    Flushed,
    Servers(Vec<ServerState>),
    MountMade,
    /// The mount point's content (`#volume.`), or `None` when the name is no mount point.
    LsMount {
        content: Option<String>,
    },
    Error(String),
    TokenSet,
    Tokens(Vec<TokenInfo>),
    TokenDropped {
        held: bool,
    },
    Acl(AccessList),
    AclSet,
    /// The token a `Login` got, now kept for the caller.
    Token(SealedToken),
    Figures(Figures),
}

/// A token a local uid holds, as `holdfast tokens` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub uid: u32,
    pub user: String,
    pub id: PrincipalId,
    pub cell: String,
    pub expiry: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExamineInfo {
    pub fid: Fid,
    pub volume: String,
    pub kind: FileKind,
    pub size: u64,
    pub data_version: DataVersion,
    /// Wall-clock end of the callback promise, when one is held.
    pub callback_until: Option<Timestamp>,
    pub data_cached: bool,
    /// The asker's rights on the directory governing the file, if they could be had.
    pub rights: Option<Rights>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerState {
    pub addresses: Vec<String>,
    pub up: bool,
}

/// Errors of the control framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("control frame of {0} bytes is too large")]
    TooLarge(usize),
    #[error("undecodable control message: {0}")]
    Decode(#[from] postcard::Error),
}

pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = postcard::to_stdvec(message)?;
    if body.len() > CONTROL_FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(body.len() + 4);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Checks a frame header, returning the body length.
pub fn body_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > CONTROL_FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(postcard::from_bytes(body)?)
}

fn read_frame<T: DeserializeOwned>(stream: &mut UnixStream) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header)?;
    let mut body = vec![0u8; body_len(header)?];
    stream.read_exact(&mut body)?;
    decode(&body)
}

/// Sends one request to the cache manager listening on `socket`.
pub fn request(socket: &Path, request: &ControlRequest) -> Result<ControlResponse, CacheError> {
    let failed = |message: String| CacheError::Control {
        socket: socket.to_owned(),
        message,
    };
    let mut stream = UnixStream::connect(socket).map_err(|e| failed(e.to_string()))?;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(|e| failed(e.to_string()))?;
    let frame = encode(request).map_err(|e| failed(e.to_string()))?;
    stream
        .write_all(&frame)
        .map_err(|e| failed(e.to_string()))?;
    read_frame(&mut stream).map_err(|e| failed(e.to_string()))
}

/// Formats a wall-clock time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: Timestamp) -> String {
    let days = t.secs.div_euclid(86_400);
    let secs_of_day = t.secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        t.nanos / 1_000_000
    )
}

/// The path with symlinks resolved up to (not including) its last component, so that a
/// symlink itself is examined and a mount point's root counts as inside its mount.
fn resolve(path: &Path) -> Result<PathBuf, CacheError> {
    let io = |source| CacheError::Path {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    if !meta.file_type().is_symlink() {
        return std::fs::canonicalize(path).map_err(io);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| CacheError::NotInMount {
        path: path.to_owned(),
    })?;
    Ok(std::fs::canonicalize(parent).map_err(io)?.join(name))
}

/// The control socket of the holdfast mount holding `path`.
fn socket_for(path: &Path) -> Result<PathBuf, CacheError> {
    let resolved = resolve(path)?;
    let mounts = mountinfo::read().map_err(|source| CacheError::Path {
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    mountinfo::mount_of(&mounts, &resolved)
        .filter(|m| m.is_holdfast())
        .and_then(|m| m.control_socket())
        .ok_or_else(|| CacheError::NotInMount {
            path: path.to_owned(),
        })
}

fn ino_of(path: &Path) -> Result<Ino, CacheError> {
    std::fs::symlink_metadata(path)
        .map(|m| Ino(m.ino()))
        .map_err(|source| CacheError::Path {
            path: path.to_owned(),
            source,
        })
}

/// The parent directory and final name of a path that may not exist yet.
fn split_parent(path: &Path) -> Result<(PathBuf, String), CacheError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CacheError::Refused(format!("{} has no final name", path.display())))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_owned()))
}

fn refused(path: &Path, message: String) -> CacheError {
    CacheError::Refused(format!("{}: {message}", path.display()))
}

fn kind_name(kind: FileKind) -> &'static str {
    match kind {
        FileKind::File => "file",
        FileKind::Directory => "directory",
        FileKind::Symlink => "symlink",
        FileKind::MountPoint => "mount point",
        FileKind::Fifo => "fifo",
        FileKind::Socket => "socket",
        FileKind::CharDevice { .. } => "character device",
        FileKind::BlockDevice { .. } => "block device",
    }
}

/// `fs examine PATH`.
///
/// The path's own inode is not looked up through the kernel: a `stat` would revalidate a
/// broken callback and so report a fresh one. The cache manager resolves the final name
/// in its parent directory and reports what it holds for it as it is.
pub fn fs_examine(path: &Path) -> Result<String, CacheError> {
    let (parent, name) = split_parent(path)?;
    // Resolve only the parent through the kernel: canonicalizing or stating the path
    // itself would revalidate it.
    let (socket, message) = match socket_for(&parent) {
        Ok(socket) if name != ".." && name != "." => (
            socket,
            ControlRequest::ExamineEntry {
                dir: ino_of(&parent)?,
                name,
            },
        ),
        _ => (
            socket_for(path)?,
            ControlRequest::Examine { ino: ino_of(path)? },
        ),
    };
    let text = match request(&socket, &message)? {
        ControlResponse::Examine(info) => render_examine(path, &info),
        ControlResponse::Error(message) => return Err(refused(path, message)),
        other => return Err(unexpected_reply(&socket, &other)),
    };
    // The mount's data path in one line; a cache manager older than `Figures` has none.
    match request(&socket, &ControlRequest::Figures) {
        Ok(ControlResponse::Figures(figures)) => Ok(text + &render_mount_summary(&figures)),
        _ => Ok(text),
    }
}

/// `fs examine`'s line about the mount as a whole.
pub fn render_mount_summary(figures: &Figures) -> String {
    let counters: Vec<String> = figures
        .counters
        .iter()
        .map(|(name, value)| format!("{name} {value}"))
        .collect();
    format!(
        "Mount: {} (latencies: holdfast fs counters)\n",
        counters.join(", ")
    )
}

/// `fs counters PATH`: the figures of the mount holding `path`.
pub fn fs_counters(path: &Path) -> Result<String, CacheError> {
    let socket = socket_for(path)?;
    match request(&socket, &ControlRequest::Figures)? {
        ControlResponse::Figures(figures) => Ok(figures.render()),
        ControlResponse::Error(message) => Err(refused(path, message)),
        other => Err(unexpected_reply(&socket, &other)),
    }
}

pub fn render_examine(path: &Path, info: &ExamineInfo) -> String {
    let callback = match info.callback_until {
        Some(until) => format!("callback held until {}", rfc3339(until)),
        None => "no callback".to_owned(),
    };
    let rights = match info.rights {
        Some(rights) => format!("Your rights: {rights}\n"),
        None => String::new(),
    };
    format!(
        "File {} (fid {}) data version {}, size {}\n\
         {} in volume {}, data {}\n\
         {callback}\n{rights}",
        path.display(),
        info.fid,
        info.data_version,
        info.size,
        kind_name(info.kind),
        info.volume,
        if info.data_cached {
            "cached"
        } else {
            "not cached"
        },
    )
}

/// `fs whereis PATH`.
pub fn fs_whereis(path: &Path) -> Result<String, CacheError> {
    let socket = socket_for(path)?;
    let ino = ino_of(path)?;
    match request(&socket, &ControlRequest::Whereis { ino })? {
        ControlResponse::Whereis { volume, addresses } => Ok(format!(
            "File {} is in volume {volume} on host {}\n",
            path.display(),
            addresses.join(" ")
        )),
        ControlResponse::Error(message) => Err(refused(path, message)),
        other => Err(unexpected_reply(&socket, &other)),
    }
}

/// `fs flush PATH`.
pub fn fs_flush(path: &Path) -> Result<String, CacheError> {
    let socket = socket_for(path)?;
    let ino = ino_of(path)?;
    match request(&socket, &ControlRequest::Flush { ino })? {
        ControlResponse::Flushed => Ok(format!("Flushed {} from the cache\n", path.display())),
        ControlResponse::Error(message) => Err(refused(path, message)),
        other => Err(unexpected_reply(&socket, &other)),
    }
}

/// `fs checkservers`: the servers of the mount holding `path`, or of the first holdfast
/// mount found.
pub fn fs_checkservers(path: Option<&Path>) -> Result<String, CacheError> {
    let socket = match path {
        Some(path) => socket_for(path)?,
        None => {
            let mounts = mountinfo::read().map_err(|source| CacheError::Path {
                path: PathBuf::from("/proc/self/mountinfo"),
                source,
            })?;
            mounts
                .iter()
                .filter(|m| m.is_holdfast())
                .find_map(|m| m.control_socket())
                .ok_or(CacheError::NoMount)?
        }
    };
    match request(&socket, &ControlRequest::CheckServers)? {
        ControlResponse::Servers(servers) => Ok(render_servers(&servers)),
        ControlResponse::Error(message) => Err(CacheError::Refused(message)),
        other => Err(unexpected_reply(&socket, &other)),
    }
}

pub fn render_servers(servers: &[ServerState]) -> String {
    let down: Vec<String> = servers
        .iter()
        .filter(|s| !s.up)
        .map(|s| s.addresses.join(","))
        .collect();
    let mut text = String::new();
    for server in servers {
        text.push_str(&format!(
            "{} is {}\n",
            server.addresses.join(","),
            if server.up { "up" } else { "down" }
        ));
    }
    if down.is_empty() {
        text.push_str("All servers are running.\n");
    } else {
        text.push_str(&format!(
            "These servers unavailable due to network or server problems: {}.\n",
            down.join(" ")
        ));
    }
    text
}

/// `fs mkmount DIR VOLUME`: makes `DIR` a mount point for `VOLUME`.
pub fn fs_mkmount(dir: &Path, volume: &str) -> Result<String, CacheError> {
    let (parent, name) = split_parent(dir)?;
    let socket = socket_for(&parent)?;
    let parent_ino = std::fs::metadata(&parent)
        .map(|m| Ino(m.ino()))
        .map_err(|source| CacheError::Path {
            path: parent.clone(),
            source,
        })?;
    let request_body = ControlRequest::MkMount {
        dir: parent_ino,
        name,
        volume: volume.to_owned(),
    };
    match request(&socket, &request_body)? {
        ControlResponse::MountMade => Ok(format!(
            "Created mount point {} for volume {volume}\n",
            dir.display()
        )),
        ControlResponse::Error(message) => Err(refused(dir, message)),
        other => Err(unexpected_reply(&socket, &other)),
    }
}

/// `fs lsmount DIR`.
pub fn fs_lsmount(dir: &Path) -> Result<String, CacheError> {
    let (parent, name) = split_parent(dir)?;
    let socket = socket_for(&parent)?;
    let parent_ino = std::fs::metadata(&parent)
        .map(|m| Ino(m.ino()))
        .map_err(|source| CacheError::Path {
            path: parent.clone(),
            source,
        })?;
    let request_body = ControlRequest::LsMount {
        dir: parent_ino,
        name,
    };
    match request(&socket, &request_body)? {
        ControlResponse::LsMount {
            content: Some(content),
        } => Ok(format!(
            "'{}' is a mount point for volume '{content}'\n",
            dir.display()
        )),
        ControlResponse::LsMount { content: None } => Err(CacheError::Refused(format!(
            "'{}' is not a mount point",
            dir.display()
        ))),
        ControlResponse::Error(message) => Err(refused(dir, message)),
        other => Err(unexpected_reply(&socket, &other)),
    }
}

fn unexpected_reply(socket: &Path, response: &ControlResponse) -> CacheError {
    CacheError::Control {
        socket: socket.to_owned(),
        message: format!("unexpected reply {response:?}"),
    }
}

/// The control socket of the holdfast mount holding `path` (for `holdfast login`).
pub fn socket_of_mount(path: &Path) -> Result<PathBuf, CacheError> {
    socket_for(path)
}

/// Hands `token` to the cache manager on `socket` for the calling process's uid.
pub fn give_token(socket: &Path, token: &SealedToken) -> Result<(), CacheError> {
    set_token(socket, token, None)
}

/// Root only: hands `token` to the cache manager for the local `uid`.
pub fn give_token_for(socket: &Path, uid: u32, token: &SealedToken) -> Result<(), CacheError> {
    set_token(socket, token, Some(uid))
}

fn set_token(socket: &Path, token: &SealedToken, uid: Option<u32>) -> Result<(), CacheError> {
    let message = ControlRequest::SetToken {
        token: token.clone(),
        uid,
    };
    match request(socket, &message)? {
        ControlResponse::TokenSet => Ok(()),
        ControlResponse::Error(message) => Err(CacheError::Refused(message)),
        other => Err(unexpected_reply(socket, &other)),
    }
}

/// The tokens the cache manager on `socket` holds: the caller's, or every uid's for root.
pub fn list_tokens(socket: &Path) -> Result<Vec<TokenInfo>, CacheError> {
    match request(socket, &ControlRequest::ListTokens)? {
        ControlResponse::Tokens(tokens) => Ok(tokens),
        ControlResponse::Error(message) => Err(CacheError::Refused(message)),
        other => Err(unexpected_reply(socket, &other)),
    }
}

/// Drops the caller's token; true if it held one.
pub fn drop_token(socket: &Path) -> Result<bool, CacheError> {
    drop_token_of(socket, None)
}

/// Root only: drops the token of the local `uid`; true if it held one.
pub fn drop_token_for(socket: &Path, uid: u32) -> Result<bool, CacheError> {
    drop_token_of(socket, Some(uid))
}

fn drop_token_of(socket: &Path, uid: Option<u32>) -> Result<bool, CacheError> {
    match request(socket, &ControlRequest::DropToken { uid })? {
        ControlResponse::TokenDropped { held } => Ok(held),
        ControlResponse::Error(message) => Err(CacheError::Refused(message)),
        other => Err(unexpected_reply(socket, &other)),
    }
}

/// Logs in as `user` through the cache manager on `socket`, whose mount shows `cell`:
/// the token is kept there for the calling uid and returned.
pub fn login(
    socket: &Path,
    cell: &str,
    user: &str,
    password: Password,
    lifetime_secs: Option<u64>,
) -> Result<SealedToken, CacheError> {
    let message = ControlRequest::Login {
        cell: cell.to_owned(),
        user: user.to_owned(),
        password,
        lifetime_secs,
    };
    match request(socket, &message)? {
        ControlResponse::Token(token) => Ok(token),
        ControlResponse::Error(message) => Err(CacheError::Refused(message)),
        other => Err(unexpected_reply(socket, &other)),
    }
}

/// The access list of directory `dir` (`fs listacl`).
pub fn get_acl(dir: &Path) -> Result<AccessList, CacheError> {
    let socket = socket_for(dir)?;
    let message = ControlRequest::GetAcl { dir: ino_of(dir)? };
    match request(&socket, &message)? {
        ControlResponse::Acl(acl) => Ok(acl),
        ControlResponse::Error(message) => Err(refused(dir, message)),
        other => Err(unexpected_reply(&socket, &other)),
    }
}

/// Replaces the access list of directory `dir` (`fs setacl`, `cleanacl`, `copyacl`).
pub fn set_acl(dir: &Path, acl: &AccessList) -> Result<(), CacheError> {
    let socket = socket_for(dir)?;
    let message = ControlRequest::SetAcl {
        dir: ino_of(dir)?,
        acl: acl.clone(),
    };
    match request(&socket, &message)? {
        ControlResponse::AclSet => Ok(()),
        ControlResponse::Error(message) => Err(refused(dir, message)),
        other => Err(unexpected_reply(&socket, &other)),
    }
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    #[test]
    fn frames_round_trip() {
        let requests = [
            ControlRequest::Examine { ino: Ino(7) },
            ControlRequest::MkMount {
                dir: Ino(1),
                name: "user".into(),
                volume: "user.a".into(),
            },
            ControlRequest::CheckServers,
        ];
        for request in requests {
            let frame = encode(&request).unwrap();
            let len = body_len(frame[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, frame.len() - 4);
            let back: ControlRequest = decode(&frame[4..]).unwrap();
            assert_eq!(back, request);
        }
        let response = ControlResponse::Servers(vec![ServerState {
            addresses: vec!["127.0.0.1:1".into()],
            up: false,
        }]);
        let frame = encode(&response).unwrap();
        assert_eq!(decode::<ControlResponse>(&frame[4..]).unwrap(), response);
        assert!(body_len(((CONTROL_FRAME_BYTES_MAX + 1) as u32).to_le_bytes()).is_err());
        assert!(decode::<ControlRequest>(&[0xff, 0xff]).is_err());
    }

    #[test]
    fn rfc3339_renders_utc() {
        let t = Timestamp {
            secs: 0,
            nanos: 5_000_000,
        };
        assert_eq!(rfc3339(t), "1970-01-01T00:00:00.005Z");
        let t = Timestamp {
            secs: 1_767_225_600 + 3661,
            nanos: 0,
        };
        assert_eq!(rfc3339(t), "2026-01-01T01:01:01.000Z");
        let t = Timestamp {
            secs: 951_782_400,
            nanos: 0,
        };
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn examine_text_says_callback_state() {
        let mut info = ExamineInfo {
            fid: Fid {
                volume: VolumeId(536870912),
                vnode: VnodeId(5),
                unique: Uniquifier(1),
            },
            volume: "root.cell".into(),
            kind: FileKind::File,
            size: 12,
            data_version: DataVersion(3),
            callback_until: Some(Timestamp {
                secs: 1_767_225_600,
                nanos: 0,
            }),
            data_cached: true,
            rights: Some(proto::Rights::parse("rl").unwrap()),
        };
        let text = render_examine(Path::new("/mnt/x"), &info);
        assert!(text.contains("Your rights: rl\n"), "{text}");
        assert!(text.starts_with("File /mnt/x (fid 536870912.5.1) data version 3, size 12\n"));
        assert!(
            text.contains("callback held until 2026-01-01T00:00:00.000Z"),
            "{text}"
        );
        info.callback_until = None;
        assert!(render_examine(Path::new("/mnt/x"), &info).contains("no callback"));
    }

    #[test]
    fn paths_outside_mounts_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = fs_examine(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not inside a holdfast mount"), "{err}");
    }

    #[test]
    fn servers_text_lists_down_ones() {
        let text = render_servers(&[
            ServerState {
                addresses: vec!["127.0.0.1:1".into()],
                up: true,
            },
            ServerState {
                addresses: vec!["127.0.0.1:2".into()],
                up: false,
            },
        ]);
        assert!(text.contains("127.0.0.1:2 is down"));
        assert!(text.contains("unavailable due to network or server problems: 127.0.0.1:2"));
    }
}
