//! The tokens command-line tools act with: the per-user token files that `holdfast login`
//! writes, `tokens` lists and `unlog` removes, and the administrator token that
//! `--localauth` signs with the cell's key.
//! Invariant: a token file is read or written only inside a directory that is the
//! user's own, not a symlink, and closed to others (0700), and is itself written 0600
//! whole (temp file, then rename).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::identity::TOKEN_BYTES_MAX;
use proto::{CellConfig, SealedToken, Timestamp, TokenBody, TokenKey};

/// Names the directory of token files instead of `/tmp/holdfast-<uid>`.
pub const TOKEN_DIR_ENV: &str = "HOLDFAST_TOKEN_DIR";
/// How long a `--localauth` token lives: one command's worth, with room for a long
/// `vldb add`.
const LOCALAUTH_LIFETIME: Duration = Duration::from_secs(3600);

/// `--localauth` and `--token-key`: flags of every command that changes the cell.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AuthFlags {
    /// Act as an administrator by signing a token with the cell's key, as root on a
    /// server host does (user `localauth`, id 0, in system:administrators). Reading the
    /// key file is the check: it is the cell's secret, mode 0600.
    #[arg(long, global = true)]
    pub localauth: bool,
    /// The cell's token key file for --localauth (default: `credentials/token.key`
    /// beside the cell file).
    #[arg(long, global = true, value_name = "FILE", requires = "localauth")]
    pub token_key: Option<PathBuf>,
}

/// The token a command sends to the VLDB: a `--localauth` one, else the user's stored
/// token for the cell while it is unexpired, else none (`system:anyuser`).
pub fn for_command(
    cell_path: Option<&Path>,
    cell: &CellConfig,
    auth: &AuthFlags,
) -> Result<Option<SealedToken>> {
    if auth.localauth {
        let key_file = match &auth.token_key {
            Some(path) => path.clone(),
            None => default_key_file(cell_path)?,
        };
        let key = TokenKey::load(&key_file).with_context(|| {
            format!(
                "--localauth needs the cell's token key (run as root on a server host, or \
                 pass --token-key FILE); {} cannot be used",
                key_file.display()
            )
        })?;
        return Ok(Some(
            key.seal(vlserver::localauth_body(&cell.name, LOCALAUTH_LIFETIME)),
        ));
    }
    let Some(token) = read(&cell.name)? else {
        return Ok(None);
    };
    match token.unverified_body() {
        Ok(body) if body.expiry > Timestamp::now() => Ok(Some(token)),
        Ok(body) => {
            tracing::warn!(
                "your token for {} as {} expired at {}: acting as system:anyuser; run \
                 `holdfast login` again",
                cell.name,
                body.user,
                local_time(body.expiry)
            );
            Ok(None)
        }
        Err(_) => bail!(
            "your token file for {} is not a token: run `holdfast unlog`, then `holdfast login`",
            cell.name
        ),
    }
}

/// `credentials/token.key` beside the cell file.
fn default_key_file(cell_path: Option<&Path>) -> Result<PathBuf> {
    let cell_file = match cell_path {
        Some(path) => path.to_owned(),
        None => std::env::var_os(proto::cell::CELL_ENV)
            .map(PathBuf::from)
            .context("--localauth: no cell file to find the key beside; pass --token-key FILE")?,
    };
    let dir = cell_file.parent().unwrap_or(Path::new("."));
    Ok(dir.join("credentials").join("token.key"))
}

/// The directory of this user's token files, created 0700 if missing, refused if it is
/// a symlink, not the user's, or open to others.
fn dir() -> Result<PathBuf> {
    Ok(dir_if(true)?.unwrap_or_default())
}

/// `dir`, or `None` when it does not exist and `create` is false.
fn dir_if(create: bool) -> Result<Option<PathBuf>> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let dir = match std::env::var_os(TOKEN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(format!("/tmp/holdfast-{uid}")),
    };
    if create {
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("create the token directory {}", dir.display()));
            }
        }
    }
    let meta = match std::fs::symlink_metadata(&dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("read the token directory {}", dir.display()));
        }
    };
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        bail!(
            "the token directory {} is not a directory of yours closed to others (it must be \
             owned by uid {uid}, mode 0700, not a symlink): remove it, or set {TOKEN_DIR_ENV}",
            dir.display()
        );
    }
    Ok(Some(dir))
}

/// The file holding the token for `cell` in `dir`.
fn file_for(dir: &Path, cell: &str) -> PathBuf {
    let safe: String = cell
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("token.{safe}"))
}

/// The stored token for `cell`, if any.
pub fn read(cell: &str) -> Result<Option<SealedToken>> {
    match dir_if(false)? {
        Some(dir) => read_file(&file_for(&dir, cell)),
        None => Ok(None),
    }
}

fn read_file(path: &Path) -> Result<Option<SealedToken>> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.len() <= TOKEN_BYTES_MAX => Ok(Some(SealedToken(bytes))),
        Ok(_) => bail!(
            "the token file {} is too large to be a token: run `holdfast unlog`",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read the token file {}", path.display())),
    }
}

/// Stores `token` as the user's token for `cell`, replacing any; returns the file.
pub fn store(cell: &str, token: &SealedToken) -> Result<PathBuf> {
    let dir = dir()?;
    let path = file_for(&dir, cell);
    let temp = dir.join(format!(".token.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(&token.0)?;
        file.sync_all()?;
        std::fs::rename(&temp, &path)
    };
    write().with_context(|| format!("write the token file {}", path.display()))?;
    Ok(path)
}

/// Removes the token for `cell`, or every token; returns the cells whose tokens were
/// removed.
pub fn remove(cell: Option<&str>) -> Result<Vec<String>> {
    let Some(dir) = dir_if(false)? else {
        return Ok(Vec::new());
    };
    let mut removed = Vec::new();
    for (file, body) in list_in(&dir)? {
        let name = body
            .as_ref()
            .map_or_else(|_| file.display().to_string(), |body| body.cell.clone());
        if cell.is_none_or(|cell| file == file_for(&dir, cell)) {
            std::fs::remove_file(&file)
                .with_context(|| format!("remove the token file {}", file.display()))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Every stored token: its file and what it says (or why it cannot be read).
pub fn list() -> Result<Vec<(PathBuf, Result<TokenBody, String>)>> {
    match dir_if(false)? {
        Some(dir) => list_in(&dir),
        None => Ok(Vec::new()),
    }
}

fn list_in(dir: &Path) -> Result<Vec<(PathBuf, Result<TokenBody, String>)>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("list the tokens in {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let is_token = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("token."));
        if !is_token {
            continue;
        }
        let body = match read_file(&path) {
            Ok(Some(token)) => token.unverified_body().map_err(|e| e.to_string()),
            Ok(None) => continue,
            Err(e) => Err(format!("{e:#}")),
        };
        out.push((path, body));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// `holdfast tokens`: one line per token.
pub fn render(tokens: &[(PathBuf, Result<TokenBody, String>)]) -> String {
    if tokens.is_empty() {
        return "No tokens: run `holdfast login USER`\n".to_owned();
    }
    let now = Timestamp::now();
    let mut text = String::new();
    for (path, body) in tokens {
        match body {
            Ok(body) => {
                let state = if body.expiry > now {
                    "expires"
                } else {
                    "EXPIRED"
                };
                text.push_str(&format!(
                    "User {} (id {}) in cell {}: {} {}\n",
                    body.user,
                    body.id,
                    body.cell,
                    state,
                    local_time(body.expiry)
                ));
            }
            Err(e) => text.push_str(&format!("{}: unreadable ({e})\n", path.display())),
        }
    }
    text
}

/// A time as local `YYYY-MM-DD HH:MM:SS`.
pub fn local_time(time: Timestamp) -> String {
    let secs = time.secs as libc::time_t;
    // SAFETY: localtime_r writes into the zeroed `tm` we own; a null return leaves it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return format!("{} (Unix seconds)", time.secs);
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The control sockets of this host's holdfast mounts, with their mount points.
pub fn mounts() -> Vec<(PathBuf, PathBuf)> {
    cachemgr::mountinfo::read()
        .unwrap_or_default()
        .into_iter()
        .filter(|mount| mount.is_holdfast())
        .filter_map(|mount| Some((mount.mount_point.clone(), mount.control_socket()?)))
        .collect()
}

/// Hands `token` to every mount of its cell on this host, for the calling uid, as
/// `aklog` gives the kernel's cache manager the user's token; returns the mount points
/// that took it. A mount of another cell refuses it and is skipped.
pub fn give_to_mounts(token: &SealedToken) -> Vec<PathBuf> {
    let mut given = Vec::new();
    for (mount_point, socket) in mounts() {
        match cachemgr::control::give_token(&socket, token) {
            Ok(()) => given.push(mount_point),
            Err(e) => tracing::debug!(mount = %mount_point.display(), error = %e,
                "the mount did not take the token"),
        }
    }
    given
}

/// Drops the calling uid's token from every mount on this host; returns the mount
/// points that held one.
pub fn drop_from_mounts() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(_, socket)| cachemgr::control::drop_token(socket).unwrap_or(false))
        .map(|(mount_point, _)| mount_point)
        .collect()
}

/// What each mount on this host holds for the calling uid, as lines for `tokens`.
pub fn render_mounts() -> String {
    let mut text = String::new();
    for (mount_point, socket) in mounts() {
        let Ok(held) = cachemgr::control::list_tokens(&socket) else {
            continue;
        };
        let me = caller_uid();
        for info in held.iter().filter(|info| info.uid == me) {
            text.push_str(&format!(
                "mount {}: token for {} in cell {}, valid until {}\n",
                mount_point.display(),
                info.user,
                info.cell,
                local_time(info.expiry)
            ));
        }
    }
    text
}

/// The calling process's real uid.
fn caller_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_name_makes_one_safe_file_name() {
        let dir = Path::new("/d");
        assert_eq!(file_for(dir, "e2e.test"), Path::new("/d/token.e2e.test"));
        assert_eq!(file_for(dir, "../x/y"), Path::new("/d/token..._x_y"));
    }
}
