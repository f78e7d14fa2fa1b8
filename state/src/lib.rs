//! Holdfast's callback and lock bookkeeping: the pure tables, the pair lease, their
//! journaled form, and the journal that makes that form durable.
//! Invariant: only `journal` does I/O, through `Vfs`; the rest reads no clock, sleeps,
//! spawns or touches a file (time comes in as `Millis`, decisions leave as values).

pub mod callback_table;
pub mod client_table;
pub mod delayed_breaks;
pub mod grace;
pub mod journal;
pub mod journaled;
pub mod lock_table;
pub mod pair_lease;
pub mod time;

pub use callback_table::{CallbackCapture, CallbackTable, CallbackTableConfig, Grant};
pub use client_table::{Admission, ClientKey, ClientTable, ClientTableFull};
pub use delayed_breaks::{DelayedBreaks, Pending};
pub use grace::{Grace, GraceCheck, GraceConfig, GraceEnd, GraceError, GraceStatus};
pub use journal::{Journal, JournalConfig, JournalError, JournalMode, Lsn, Recovered};
pub use lock_table::{
    Effect, Leases, Lock, LockOutcome, LockOwner, LockReply, LockTable, LockTableConfig,
    TooManyLocks,
};
pub use pair_lease::{LeaseRefusal, MemberLease, PairLease};
pub use time::Millis;
