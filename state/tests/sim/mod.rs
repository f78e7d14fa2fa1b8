//! The pair simulation's parts; `pair_sim.rs` and `vldb_sim.rs` hold the tests and the
//! overview.

pub mod checker;
pub mod client;
pub mod disk;
pub mod member;
pub mod message;
pub mod replica;
pub mod rng;
pub mod world;
