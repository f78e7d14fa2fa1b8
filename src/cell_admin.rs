//! The local cell's administration for `up` and bench cells: the `admin` user (id 1) in
//! system:administrators with its password kept in DIR/admin.password, root.cell's first
//! access list, and the administrator's token for the invoking user.
//! Invariant: the admin's password is written (0600) before the user is made with it,
//! and an access list an administrator changed later is never reset.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::rpc::{self, Limits};
use proto::{
    AccessList, CellConfig, ErrorCode, Fid, Hello, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
    Password, PeerKind, PrincipalId, ProtoError, Request, Response, Rights, SealedToken, Transport,
    VldbClient, VolumeId,
};

/// The administrator `up` makes, as AFS sites call theirs.
pub const ADMIN_USER: &str = "admin";
/// The administrator's id: the first a protection database gives.
pub const ADMIN_ID: PrincipalId = PrincipalId(1);
/// Where `up` keeps the administrator's password, in its directory.
pub const ADMIN_PASSWORD_FILE: &str = "admin.password";

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Makes the `admin` user in system:administrators unless the protection database has
/// it; returns the password file when it was made now.
pub async fn ensure_admin_user(
    cell: &CellConfig,
    transport: &Transport,
    localauth: SealedToken,
    dir: &Path,
) -> Result<Option<PathBuf>> {
    let vldb = VldbClient::new(
        cell.clone(),
        transport.clone(),
        PeerKind::Admin,
        CALL_TIMEOUT,
    )
    .with_token(Some(localauth));
    let password_file = dir.join(ADMIN_PASSWORD_FILE);
    let password = match std::fs::read_to_string(&password_file) {
        Ok(password) => password.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let password = random_password()?;
            write_private(&password_file, &format!("{password}\n"))?;
            password
        }
        Err(e) => {
            return Err(e).with_context(|| format!("read {}", password_file.display()));
        }
    };
    let create = Request::PtsCreateUser {
        name: ADMIN_USER.into(),
        id: Some(ADMIN_ID),
        password: Some(Password(password)),
    };
    match vldb.call(create).await {
        Ok(_) => {}
        Err(ProtoError::Remote(ErrorCode::PrincipalExists { .. })) => return Ok(None),
        Err(e) => return Err(e).context("create the admin user"),
    }
    let join = Request::PtsAddUser {
        user: ADMIN_USER.into(),
        group: "system:administrators".into(),
    };
    vldb.call(join)
        .await
        .context("add the admin user to system:administrators")?;
    Ok(Some(password_file))
}

/// root.cell's first access list: administrators may do everything, anyone may read.
pub fn root_cell_acl() -> AccessList {
    let mut acl = AccessList::for_new_volume();
    acl.set(
        PrincipalId::ANYUSER,
        Rights::READ.union(Rights::LOOKUP),
        false,
    );
    acl
}

/// Sets the access list of `volume`'s root directory on the fileserver at `address`.
pub async fn set_root_acl(
    cell: &CellConfig,
    transport: &Transport,
    address: &str,
    volume: VolumeId,
    admin: &SealedToken,
    acl: AccessList,
) -> Result<()> {
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: cell.name.clone(),
        peer: PeerKind::Admin,
    };
    let (connection, _, _incoming) = rpc::connect(address, hello, &Limits::default(), transport)
        .await
        .with_context(|| format!("connect to the fileserver at {address}"))?;
    let request = Request::StoreAcl {
        dir: Fid::root(volume),
        acl,
    };
    let answer = connection
        .try_call_as(Some(admin), &request, CALL_TIMEOUT)
        .await
        .unwrap_or(Err(ProtoError::Closed));
    connection.close();
    match answer {
        Ok(Response::Status { .. }) => Ok(()),
        Ok(other) => bail!("the fileserver answered {} to StoreAcl", other.kind_name()),
        Err(e) => Err(e).context("set root.cell's access list"),
    }
}

/// Sixteen random bytes as hex.
fn random_password() -> Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .with_context(|| format!("write {}", path.display()))
}
