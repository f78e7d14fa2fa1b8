//! Who may use a mount (`holdfast mount --access`): every user of the workstation, as
//! AFS mounts are, or only the user who mounted it.
//! Invariant: `auto` asks for every user only where FUSE permits it to this process
//! (root, or `user_allow_other` in /etc/fuse.conf), so an ordinary user can mount.

use fuser::SessionACL;
use tracing::info;

/// The FUSE configuration that lets other users' mounts be shared.
const FUSE_CONF: &str = "/etc/fuse.conf";

/// `--access`: who may use the mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MountAccess {
    /// Every user where FUSE permits it (`allow_other`), else only the mounting user.
    #[default]
    Auto,
    /// Every user of the workstation (`allow_other`; a non-root user needs
    /// `user_allow_other` in /etc/fuse.conf).
    All,
    /// Only the user who mounted it (and nobody else, root included).
    Owner,
}

impl std::str::FromStr for MountAccess {
    type Err = String;

    fn from_str(text: &str) -> Result<MountAccess, String> {
        match text {
            "auto" => Ok(MountAccess::Auto),
            "all" => Ok(MountAccess::All),
            "owner" => Ok(MountAccess::Owner),
            other => Err(format!(
                "{other:?} is not a mount access; use auto, all or owner"
            )),
        }
    }
}

impl MountAccess {
    /// The FUSE session's access rule; `auto` decides here and says so when it falls
    /// back to the owner.
    pub fn acl(self) -> SessionACL {
        match self {
            MountAccess::All => SessionACL::All,
            MountAccess::Owner => SessionACL::Owner,
            MountAccess::Auto if others_permitted() => SessionACL::All,
            MountAccess::Auto => {
                info!(
                    "this mount serves only its owner: other users need root or user_allow_other in {FUSE_CONF} (--access all)"
                );
                SessionACL::Owner
            }
        }
    }
}

/// Whether FUSE lets this process open its mount to other users.
fn others_permitted() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    std::fs::read_to_string(FUSE_CONF)
        .is_ok_and(|text| text.lines().any(|line| line.trim() == "user_allow_other"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_bad_ones_say_what_to_use() {
        assert_eq!("owner".parse(), Ok(MountAccess::Owner));
        assert_eq!("all".parse(), Ok(MountAccess::All));
        assert_eq!("auto".parse(), Ok(MountAccess::Auto));
        let error = "everyone".parse::<MountAccess>().unwrap_err();
        assert!(error.contains("use auto, all or owner"), "{error}");
    }
}
