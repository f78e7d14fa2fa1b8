//! The journal's record kinds: each change of the callback, lock and client state as the
//! fileserver journals it, and the client and lock entries of a snapshot.
//! Invariant: a kind's bytes never change and new kinds are only appended (postcard
//! writes the variant index, then the fields); `tests/golden.rs` pins every kind.

use proto::{ByteRange, ClientId, Epoch, Fid, InstanceNonce};
use serde::{Deserialize, Serialize};

use crate::client_table::ClientKey;
use crate::lock_table::{Lock, LockOwner};

/// One change of the journaled state. Keys are the writing process's `ClientKey`s, named
/// by the latest `ClientAdmitted` record (or snapshot entry) for that key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StateRecord {
    ClientAdmitted {
        key: ClientKey,
        client: ClientId,
        instance: InstanceNonce,
    },
    /// `lock` of `fid` was granted to its owner (POSIX replace-and-merge semantics),
    /// taken by process `pid`.
    LockGranted {
        fid: Fid,
        lock: Lock,
        pid: u32,
    },
    /// `owner` unlocked `range` of `fid`.
    LockReleased {
        fid: Fid,
        owner: LockOwner,
        range: ByteRange,
    },
    /// Every lock of the client is gone (lease lapsed or restart).
    ClientReleased {
        key: ClientKey,
    },
    /// `client` holds a promise on `fid` until `expiry_ms` (wall clock, rounded up).
    CallbackGranted {
        fid: Fid,
        client: ClientKey,
        expiry_ms: u64,
    },
    /// The client dropped these promises.
    CallbacksGivenUp {
        client: ClientKey,
        fids: Vec<Fid>,
    },
    /// Every promise of the client is void (it is new or restarted and gets a reset).
    ClientCallbacksDropped {
        client: ClientKey,
    },
    /// These promises were broken; the break is in flight until acknowledged or queued.
    BreaksSent {
        client: ClientKey,
        fids: Vec<Fid>,
    },
    BreaksAcked {
        client: ClientKey,
        fids: Vec<Fid>,
    },
    /// A reset is in flight to the client.
    ResetSent {
        client: ClientKey,
    },
    ResetAcked {
        client: ClientKey,
    },
    /// The client was unreachable: these breaks wait for it to return.
    DelayedQueued {
        client: ClientKey,
        fids: Vec<Fid>,
    },
    /// The client is owed a reset instead of single breaks.
    DelayedReset {
        client: ClientKey,
    },
    /// What the client was owed is being delivered (in flight until acknowledged).
    DelayedTaken {
        client: ClientKey,
    },
    /// A planned switchover: the pair member of `epoch` stopped admitting requests,
    /// finished those in flight and snapshotted just before this record. A journal that
    /// ends here is complete and every lock in it still has its owner, so the partner
    /// takes over without grace.
    Handover {
        epoch: Epoch,
    },
}

/// A known client as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientEntry {
    pub key: ClientKey,
    pub client: ClientId,
    pub instance: InstanceNonce,
}

/// A granted lock as a snapshot holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockEntry {
    pub fid: Fid,
    pub lock: Lock,
    pub pid: u32,
}
