//! `Command`: a change to the VLDB as the Raft log carries it, and `Applied`, what
//! applying it answers.
//! Invariant: a command holds every nondeterministic input (timestamps, the seq a
//! leader's check saw), so every replica applies it to the same durable result.

use proto::{
    Epoch, ErrorCode, PairName, PrincipalId, PtsEntry, ServerEntry, ServerId, Timestamp,
    VolumeEntry,
};
use proto::{VolumeName, VolumeRef};
use serde::{Deserialize, Serialize};

/// One change to the VLDB's tables. Appended only: the log holds these in postcard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    RegisterServer {
        server: ServerId,
        addresses: Vec<String>,
        registered: Timestamp,
    },
    CreateEntry {
        name: VolumeName,
        server: ServerId,
    },
    RemoveEntry {
        volume: VolumeRef,
    },
    JoinPair {
        pair: PairName,
        server: ServerId,
        member: String,
        registered: Timestamp,
    },
    /// Decided by the leader's `PairLease::check_acquire`, which saw `seq`.
    AcquirePair {
        pair: PairName,
        member: String,
        epoch: Epoch,
        seq: u64,
        lease_ms: u64,
    },
    RenewPair {
        pair: PairName,
        member: String,
        epoch: Epoch,
        lease_ms: u64,
    },
    ReleasePair {
        pair: PairName,
        member: String,
        epoch: Epoch,
        successor: Option<String>,
    },
    /// A new user; `password` is the argon2id PHC string the leader made (the log never
    /// carries a password).
    PtsCreateUser {
        name: String,
        id: Option<PrincipalId>,
        password: Option<String>,
    },
    /// A user's new password, as a PHC string the leader made.
    PtsSetPassword {
        user: String,
        password: String,
    },
    PtsCreateGroup {
        name: String,
        id: Option<PrincipalId>,
    },
    PtsAddUser {
        user: String,
        group: String,
    },
    PtsRemoveUser {
        user: String,
        group: String,
    },
    PtsDelete {
        name: String,
    },
}

/// What applying a command answers: the same on every replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// Membership and blank entries, joins and releases.
    Done,
    Server(ServerEntry),
    VolumeEntry(VolumeEntry),
    Epoch(Epoch),
    /// A user or group created or deleted.
    PtsEntry(PtsEntry),
}

/// The state machine's answer to one log entry: a refusal is an answer too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome(pub Result<Applied, ErrorCode>);
