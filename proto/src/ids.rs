//! Domain identifiers: volumes, vnodes, fids, data versions, clients, servers, requests,
//! lock owners, lock waits and epochs.
//! Invariant: every id that crosses the wire is a newtype, never a bare integer, so two
//! kinds of id cannot be swapped in a signature.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_newtype!(
    /// A volume's numeric id, allocated by the VLDB.
    VolumeId(u64)
);
id_newtype!(
    /// A vnode number inside a volume. Vnode 1 is the volume's root directory.
    VnodeId(u64)
);
id_newtype!(
    /// Distinguishes successive uses of one vnode number.
    Uniquifier(u32)
);
id_newtype!(
    /// Per-vnode version, increased by every change to data or directory contents.
    DataVersion(u64)
);
id_newtype!(
    /// A client's instance nonce: new at every start of a cache manager.
    InstanceNonce(u64)
);
id_newtype!(
    /// Identifies one request on one connection, in the direction of its sender.
    RequestId(u64)
);
id_newtype!(
    /// A lock owner as its client names it: a process for POSIX `fcntl` locks, an open
    /// file description for `flock`. Only compared for equality.
    LockOwnerId(u64)
);
id_newtype!(
    /// A queued lock request, named by the server that queued it.
    WaitId(u64)
);
id_newtype!(
    /// One write-back of a client instance (the stores of one close or fsync of a file),
    /// numbered by the client in increasing order within its instance.
    WriteBackId(u64)
);

impl VnodeId {
    /// The root directory of every volume.
    pub const ROOT: VnodeId = VnodeId(1);
}

impl DataVersion {
    pub fn next(self) -> DataVersion {
        DataVersion(self.0 + 1)
    }
}

/// A file identifier: (volume, vnode, uniquifier).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fid {
    pub volume: VolumeId,
    pub vnode: VnodeId,
    pub unique: Uniquifier,
}

impl Fid {
    /// The fid of a volume's root directory.
    pub fn root(volume: VolumeId) -> Fid {
        Fid {
            volume,
            vnode: VnodeId::ROOT,
            unique: Uniquifier(1),
        }
    }
}

impl fmt::Display for Fid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.volume, self.vnode, self.unique)
    }
}

/// A cache manager's identity, kept in its cache directory across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClientId(pub Uuid);

/// A fileserver's identity, kept in its partition directory across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServerId(pub Uuid);

impl ClientId {
    pub fn random() -> ClientId {
        ClientId(Uuid::new_v4())
    }
}

impl ServerId {
    pub fn random() -> ServerId {
        ServerId(Uuid::new_v4())
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

id_newtype!(
    /// A pair's lease epoch: increases at every change of active member.
    Epoch(u64)
);
