//! Volume and fileserver pair administration for a Holdfast cell: the logic behind
//! `holdfast vos` and `holdfast pair`.
//! Invariant: a `Vos` method returns values, never text; the `format_*` functions or the
//! binary render them, and only the binary prints.

mod admin;
mod error;
mod fileserver;
mod format;
mod pair;

pub use admin::Vos;
pub use error::VosError;
pub use format::{
    format_entry, format_examine, format_figures, format_listvldb, format_listvol,
    format_pair_status, format_switchover,
};
pub use pair::{MemberReport, MemberStatus, PairReport, SwitchoverReport};
