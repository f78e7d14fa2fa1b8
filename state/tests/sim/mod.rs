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

/// The seeds a simulation test runs: the one in `HOLDFAST_SIM_SEED` (to replay a failure,
/// whose message names its seed), else the first `HOLDFAST_SIM_SEEDS` (default `default`).
pub fn seeds(default: u64) -> Vec<u64> {
    if let Ok(seed) = std::env::var("HOLDFAST_SIM_SEED") {
        let seed = seed.parse().expect("HOLDFAST_SIM_SEED must be a number");
        return vec![seed];
    }
    let count = std::env::var("HOLDFAST_SIM_SEEDS").map_or(default, |count| {
        count.parse().expect("HOLDFAST_SIM_SEEDS must be a number")
    });
    (0..count).collect()
}
