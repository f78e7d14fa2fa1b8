//! `StoreLimits`: how much a peer can make the VLDB hold.
//! Invariant: each bound is checked before the write that would pass it, so a full table
//! refuses instead of growing.

/// How much a peer can make the VLDB hold.
#[derive(Clone, Debug)]
pub struct StoreLimits {
    pub servers_max: u64,
    pub addresses_per_server_max: usize,
    pub address_bytes_max: usize,
    /// Keeps a full `VlListEntries` reply within the 4 MiB frame limit (about 100 bytes
    /// per entry at most) until listing is paged.
    pub volumes_max: u64,
    /// Fileserver pairs; each holds two short addresses, so this bounds memory, not frames.
    pub pairs_max: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            servers_max: 10_000,
            addresses_per_server_max: 16,
            address_bytes_max: 256,
            volumes_max: 32_768,
            pairs_max: 4_096,
        }
    }
}
