//! Holdfast's callback and lock bookkeeping, pure (sans-IO): the callback promise table,
//! the delayed-break queues of unreachable clients, the table of known clients, the
//! byte-range lock table with client leases, the grace period after a restart, and
//! the lease that makes one member of a fileserver pair active.
//! Nothing here reads a clock, sleeps, spawns or does I/O: time comes in as a `Millis`
//! value and decisions come out as return values the server acts on.

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
