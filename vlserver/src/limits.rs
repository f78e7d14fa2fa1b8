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
    /// Users and groups together (the built-in groups aside). Keeps a full
    /// `PtsListEntries` reply (at most about 80 bytes an entry) within the 4 MiB frame
    /// limit until listing is paged.
    pub principals_max: u64,
    /// Members of one group.
    pub members_per_group_max: usize,
    /// Groups one user is in: a token carries them all, so at most
    /// `proto::identity::TOKEN_GROUPS_MAX`.
    pub groups_per_user_max: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            servers_max: 10_000,
            addresses_per_server_max: 16,
            address_bytes_max: 256,
            volumes_max: 32_768,
            pairs_max: 4_096,
            principals_max: 40_000,
            members_per_group_max: 5_000,
            groups_per_user_max: 200,
        }
    }
}
