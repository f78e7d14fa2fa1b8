//! Identity for test cells: the cell's token key, and tokens minted with it, so that
//! mounts act as an administrator and tests act as the users they name.
//! Invariant: every cell this process starts shares one random key (so a raw protocol
//! client can mint its own administrator token), written 0600 beside the cell file.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use proto::{CellConfig, PrincipalId, SealedToken, Timestamp, TokenBody, TokenKey};

/// How long the tokens minted here last: longer than any test.
const TEST_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// This process's token key secret, drawn once.
fn secret() -> [u8; 32] {
    static SECRET: OnceLock<[u8; 32]> = OnceLock::new();
    *SECRET.get_or_init(|| {
        use std::io::Read;
        let mut secret = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut secret))
            .expect("read /dev/urandom");
        secret
    })
}

/// The key every test cell of this process signs its tokens with.
pub fn token_key() -> TokenKey {
    TokenKey::from_secret(secret())
}

/// Where a fileserver looks for the cell's token key: beside the cell file.
pub fn token_key_path(cell_file: &Path) -> PathBuf {
    cell_file
        .parent()
        .unwrap_or(Path::new("."))
        .join("credentials")
        .join("token.key")
}

/// Writes this process's token key as the cell's, replacing the one `cell init` drew,
/// before any server of the cell starts.
pub fn install_token_key(credentials: &Path) -> Result<()> {
    let path = credentials.join(proto::tls::TOKEN_KEY_FILE);
    let temp = credentials.join("token.key.tmp");
    let _ = std::fs::remove_file(&temp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| file.write_all(&secret()))
        .and_then(|()| std::fs::rename(&temp, &path))
        .with_context(|| format!("write {}", path.display()))
}

/// Gives the command-line tools run for a cell an administrator's token: a token
/// directory (0700) beside the cell file holding the admin token, for
/// `HOLDFAST_TOKEN_DIR`.
pub fn admin_token_dir(cell_file: &Path, cell: &str) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = cell_file
        .parent()
        .unwrap_or(Path::new("."))
        .join("admin-tokens");
    let file = dir.join(format!("token.{cell}"));
    if file.exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .and_then(|mut out| out.write_all(&admin_token(cell).0))
        .with_context(|| format!("write {}", file.display()))?;
    Ok(dir)
}

/// A token of cell `cell` for `user` with id `id` in `groups`, valid from now for
/// `lifetime` (an expired one with a lifetime of zero).
pub fn token(
    cell: &str,
    user: &str,
    id: i32,
    groups: &[PrincipalId],
    lifetime: Duration,
) -> SealedToken {
    let now = Timestamp::now();
    token_key().seal(TokenBody {
        cell: cell.to_owned(),
        user: user.to_owned(),
        id: PrincipalId(id),
        groups: groups.to_vec(),
        issued: now,
        expiry: Timestamp {
            secs: now.secs + lifetime.as_secs() as i64,
            nanos: now.nanos,
        },
        key_id: 0,
    })
}

/// The cell's administrator: `admin`, id 1, in `system:administrators`.
pub fn admin_token(cell: &str) -> SealedToken {
    token(
        cell,
        "admin",
        1,
        &[PrincipalId::ADMINISTRATORS],
        TEST_TOKEN_LIFETIME,
    )
}

/// A user's token for tests: valid for the whole test.
pub fn user_token(cell: &str, user: &str, id: i32, groups: &[PrincipalId]) -> SealedToken {
    token(cell, user, id, groups, TEST_TOKEN_LIFETIME)
}

/// Gives root (uid 0) on the mount whose cache is `cache` the administrator's token,
/// so the tests' processes, which run as root, act as root does on a workstation
/// holding the admin token.
pub fn give_root_admin_token(cell_file: &Path, cache: &Path) -> Result<()> {
    let cell = CellConfig::load(cell_file).context("read the cell file")?;
    let socket = cache.join(cachemgr::mount::CONTROL_SOCKET);
    cachemgr::control::give_token_for(&socket, 0, &admin_token(&cell.name))
        .context("give root the administrator's token")
}

/// Runs `sh -c script` in `dir` as the local user `uid` (group `uid`, no others), as
/// an unprivileged process would: the caller is root.
pub fn as_user(uid: u32, dir: &Path, script: &str) -> Result<std::process::Output> {
    let mut command = std::process::Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .args(["sh", "-c", script])
        .current_dir(dir);
    crate::run_bounded(command, Duration::from_secs(60))
}

/// The control socket of the mount named `name` of a `TestCell` whose directory is
/// `cell_dir`.
pub fn control_socket(cell_dir: &Path, name: &str) -> PathBuf {
    cell_dir
        .join(format!("{name}.cache"))
        .join(cachemgr::mount::CONTROL_SOCKET)
}
