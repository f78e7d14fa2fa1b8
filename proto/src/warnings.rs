//! `PeerWarnings`: WARN lines about what a server did to a peer's connections (refused,
//! evicted, closed as malformed or stalled), at most one per peer address and kind per
//! interval, each counting the lines suppressed since the one before.
//! Invariant: the table of remembered peers stays within `PEERS_MAX` entries plus one
//! shared entry per kind, so a flood from many addresses cannot grow it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;
use tracing::warn;

/// Peers remembered at once; beyond it, all others share one line per kind.
const PEERS_MAX: usize = 1024;

/// What a line is about.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Warning {
    /// A newcomer turned away: every connection at the cap was busy.
    Refused,
    /// A connection closed to make room.
    Evicted,
    /// A peer broke the protocol, or its hello was refused or never came.
    Malformed,
    /// A peer stalled inside a frame or stopped reading.
    Stalled,
    /// The listener could not accept (out of file descriptors, say).
    Accept,
    /// A request came with a token that did not verify (forged, expired, another cell).
    Token,
    /// A peer refused at the TLS handshake: no certificate of the cell's CA, or not the
    /// class its hello claimed.
    Certificate,
}

#[derive(Debug)]
struct Slot {
    logged_at: Instant,
    suppressed: u64,
}

/// The rate limiter.
#[derive(Debug)]
pub struct PeerWarnings {
    interval: Duration,
    slots: Mutex<HashMap<(IpAddr, Warning), Slot>>,
}

impl PeerWarnings {
    pub fn new(interval: Duration) -> PeerWarnings {
        PeerWarnings {
            interval,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Logs `what` about `peer` at WARN unless a line of this kind about this address
    /// went out within the interval; returns whether it did.
    pub fn warn(&self, peer: Option<SocketAddr>, kind: Warning, what: &str) -> bool {
        let Some(suppressed) = self.admit(peer.map(|p| p.ip()), kind) else {
            return false;
        };
        match (peer, suppressed) {
            (Some(peer), 0) => warn!(%peer, "{what}"),
            (Some(peer), suppressed) => warn!(%peer, suppressed, "{what}"),
            (None, 0) => warn!("{what}"),
            (None, suppressed) => warn!(suppressed, "{what}"),
        }
        true
    }

    /// `Some(lines suppressed since the last)` if a line may go out now.
    fn admit(&self, ip: Option<IpAddr>, kind: Warning) -> Option<u64> {
        let now = Instant::now();
        let mut slots = self.slots.lock();
        let mut key = (ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), kind);
        if !slots.contains_key(&key) && slots.len() >= PEERS_MAX {
            slots.retain(|_, slot| now.duration_since(slot.logged_at) < self.interval);
            if slots.len() >= PEERS_MAX {
                key.0 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
            }
        }
        match slots.get_mut(&key) {
            Some(slot) if now.duration_since(slot.logged_at) < self.interval => {
                slot.suppressed += 1;
                None
            }
            Some(slot) => {
                slot.logged_at = now;
                Some(std::mem::take(&mut slot.suppressed))
            }
            None => {
                slots.insert(
                    key,
                    Slot {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(last: u8) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, last], 4000)))
    }

    #[tokio::test]
    async fn one_line_per_peer_and_kind_per_interval_with_the_suppressed_count() {
        let warnings = PeerWarnings::new(Duration::from_millis(200));
        assert_eq!(
            warnings.admit(peer(1).map(|p| p.ip()), Warning::Evicted),
            Some(0)
        );
        assert_eq!(
            warnings.admit(peer(1).map(|p| p.ip()), Warning::Evicted),
            None
        );
        assert_eq!(
            warnings.admit(peer(1).map(|p| p.ip()), Warning::Evicted),
            None
        );
        // Another kind, another peer: their own lines.
        assert_eq!(
            warnings.admit(peer(1).map(|p| p.ip()), Warning::Stalled),
            Some(0)
        );
        assert_eq!(
            warnings.admit(peer(2).map(|p| p.ip()), Warning::Evicted),
            Some(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            warnings.admit(peer(1).map(|p| p.ip()), Warning::Evicted),
            Some(2)
        );
    }

    #[tokio::test]
    async fn many_peers_share_one_line_once_the_table_is_full() {
        let warnings = PeerWarnings::new(Duration::from_secs(600));
        for i in 0..PEERS_MAX as u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(warnings.admit(Some(ip), Warning::Malformed).is_some());
        }
        let one_more = IpAddr::from(std::net::Ipv4Addr::new(11, 0, 0, 1));
        assert_eq!(warnings.admit(Some(one_more), Warning::Malformed), Some(0));
        let another = IpAddr::from(std::net::Ipv4Addr::new(11, 0, 0, 2));
        assert_eq!(warnings.admit(Some(another), Warning::Malformed), None);
        assert!(warnings.slots.lock().len() <= PEERS_MAX + 1);
    }
}
