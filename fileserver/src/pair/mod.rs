//! Fileserver pairs: two members share one partition and contend for a lease in the
//! VLDB; the holder serves, the other answers `NotActive` and waits to take over.
//! `member` is the role machine (passive, active, fenced, switchover); `service` is
//! the RPC face every fileserver shows, single or paired.

mod member;
mod service;

pub use member::run;
pub use service::MemberService;
