//! Holdfast's callback bookkeeping, pure (sans-IO): the callback promise table, the
//! delayed-break queues of unreachable clients and the table of known clients.
//! Nothing here reads a clock, sleeps, spawns or does I/O: time comes in as a `Millis`
//! value and decisions come out as return values the server acts on.

pub mod callback_table;
pub mod client_table;
pub mod delayed_breaks;
pub mod time;

pub use callback_table::{CallbackTable, CallbackTableConfig, Grant};
pub use client_table::{Admission, ClientKey, ClientTable, ClientTableFull};
pub use delayed_breaks::{DelayedBreaks, Pending};
pub use time::Millis;
