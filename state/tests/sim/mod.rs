//! The pair simulation's parts; `pair_sim.rs` holds the tests and the overview.

pub mod checker;
pub mod client;
pub mod disk;
pub mod member;
pub mod message;
pub mod rng;
pub mod world;
