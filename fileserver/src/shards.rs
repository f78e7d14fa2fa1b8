//! How the per-fid state tables (callback promises, locks) are split: by a hash of the
//! fid into a fixed number of shards, each behind its own lock.
//! Invariant: a fid always falls in the same shard, so every change of one fid's state is
//! made, and journaled, under one lock.

use proto::Fid;

/// Shards per table, each behind its own lock, so that requests on different fids rarely
/// wait for one another: a power of two, so that a fid's shard is bits of its hash. Enough
/// that two cores rarely meet on one; each shard is a table of its own, so the count
/// costs a little fixed memory per shard.
pub const SHARDS: usize = 16;

/// Bits of a shard number.
pub const SHARD_BITS: u32 = SHARDS.trailing_zeros();

/// The shard that holds `fid`'s state: a fixed hash of every field of the fid, so the
/// same fid always lands in the same shard.
pub fn shard_of(fid: Fid) -> usize {
    let mixed = (fid.volume.0.rotate_left(32) ^ fid.vnode.0 ^ u64::from(fid.unique.0))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> (u64::BITS - SHARD_BITS)) as usize
}

#[cfg(test)]
mod tests {
    use proto::{Uniquifier, VnodeId, VolumeId};

    use super::*;

    /// Fids that differ only in the vnode (one directory's files) or only in the volume
    /// spread evenly over the shards, so no shard holds most of a server's state.
    #[test]
    fn fids_spread_over_the_shards() {
        let per_shard = 1000;
        let fids = (per_shard * SHARDS) as u64;
        let spreads = [
            (0..fids)
                .map(|vnode| Fid {
                    volume: VolumeId(536_870_913),
                    vnode: VnodeId(vnode),
                    unique: Uniquifier(1),
                })
                .collect::<Vec<_>>(),
            (0..fids)
                .map(|volume| Fid {
                    volume: VolumeId(volume),
                    vnode: VnodeId(1),
                    unique: Uniquifier(1),
                })
                .collect(),
        ];
        for fids in spreads {
            let mut counts = [0; SHARDS];
            for fid in fids {
                counts[shard_of(fid)] += 1;
            }
            assert!(
                counts
                    .iter()
                    .all(|&count| count > per_shard * 8 / 10 && count < per_shard * 12 / 10),
                "uneven shards: {counts:?}"
            );
        }
    }
}
