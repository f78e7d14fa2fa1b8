//! `VosError`: every way a `vos` or `pair` command can fail.
//! Invariant: each error is one line that says what was wrong and, where there is one,
//! what to do.

use proto::{Epoch, ErrorCode, ProtoError, ServerId};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum VosError {
    #[error("bad volume name '{name}': use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadName { name: String },
    #[error("bad volume name '{name}': a name of digits only would be read as a volume id")]
    NumericName { name: String },
    #[error("a quota of {quota_mib} MiB is too large")]
    QuotaTooLarge { quota_mib: u64 },
    #[error("volume '{name}' already exists")]
    Exists { name: String },
    #[error("no volume named '{volume}' in the VLDB")]
    NoSuchVolume { volume: String },
    #[error("cannot reach the VLDB at {addresses}: {source}; is `holdfast vlserver` running?")]
    VldbUnreachable {
        addresses: String,
        source: ProtoError,
    },
    #[error("the VLDB refused the request: {0}")]
    Vldb(ErrorCode),
    #[error("no fileserver is registered in the VLDB; start one with `holdfast fileserver`")]
    NoFileserver,
    #[error("no fileserver registered at {address}; registered: {registered}")]
    UnknownServer { address: String, registered: String },
    #[error("the cell has {count} fileservers; pass --server ADDR")]
    ServerRequired { count: usize },
    #[error("volume '{volume}' lives on fileserver {server}, for which the VLDB has no address")]
    SiteUnknown { volume: String, server: ServerId },
    #[error(
        "cannot reach the fileserver at {address}: {source}; is `holdfast fileserver` running?"
    )]
    FileserverUnreachable { address: String, source: ProtoError },
    #[error("the fileserver at {address} refused the request: {code}")]
    Fileserver { address: String, code: ErrorCode },
    #[error("bad pair name '{name}': use 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadPairName { name: String },
    #[error(
        "no pair named '{pair}' in the VLDB: check the name given to `holdfast fileserver --pair`"
    )]
    NoSuchPair { pair: String },
    #[error("pair '{pair}' has no active member (epoch {epoch}): nothing to switch over")]
    NoActive { pair: String, epoch: Epoch },
    #[error("pair '{pair}' has only one member, {member}: start its partner first")]
    NoPartner { pair: String, member: String },
    #[error(
        "the switchover of pair '{pair}' was answered but the VLDB still names {active} active \
         at epoch {epoch}; see `holdfast pair status {pair}`"
    )]
    SwitchoverUnconfirmed {
        pair: String,
        active: String,
        epoch: Epoch,
    },
}
