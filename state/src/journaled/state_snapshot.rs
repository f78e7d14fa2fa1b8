//! The whole journaled state at one journal position: what a snapshot holds and what
//! replay rebuilds.
//! Invariant: its encoding is the snapshot payload and never changes (`clean_handover` is
//! not part of it); `tests/golden.rs` pins its bytes.

use serde::{Deserialize, Serialize};

use super::callback_model::CallbackModel;
use super::record::{ClientEntry, LockEntry};

/// The whole journaled state at one position.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub clients: Vec<ClientEntry>,
    pub locks: Vec<LockEntry>,
    pub callbacks: CallbackModel,
    /// Set by replay when the journal ends with a `Handover` record. Not part of the
    /// snapshot payload (skipped, so the encoding is unchanged).
    #[serde(skip)]
    pub clean_handover: bool,
}
