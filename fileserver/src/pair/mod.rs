//! Fileserver pairs: two members share one partition and contend for a lease in the VLDB;
//! the holder serves, the other answers `NotActive` and waits to take over.
//! Invariant: a member acts on the partition only while its fence is open, and its fence
//! closes before the VLDB can grant the partner the next epoch.

mod member;
mod service;

pub use member::run;
pub use service::MemberService;
