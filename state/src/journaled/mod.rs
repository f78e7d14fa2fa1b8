//! The callback, lock and client state as the journal holds it: record kinds, snapshot
//! payload, the journal's view of promises and owed breaks, and replay.
//! Invariant: pure; a snapshot and the records after it rebuild one state, the same
//! whether replayed from the start or from any snapshot taken between them.

mod callback_model;
mod record;
mod replay;
mod state_snapshot;

pub use callback_model::{
    CallbackModel, EXPIRY_STEP_MS, Owed, PromiseEntry, Promises, journaled_expiry_ms,
};
pub use record::{ClientEntry, LockEntry, StateRecord};
pub use replay::{Replay, ReplayError, replay};
pub use state_snapshot::StateSnapshot;
