//! `Admission`: a server's table of open connections, with a cap on them all and one per
//! peer address; a newcomer over a cap takes the place of the connection least worth
//! keeping (slow to say hello, then never used, then silent longest).
//! Invariant: the table never holds more than its caps, and a connection with a request
//! or call in flight is never evicted: the newcomer is refused instead.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::activity::{Activity, Eviction, Stage};

/// A connection still in its handshake this long is slow to say hello; until then it is
/// the newest of all, and evicted last.
const HELLO_GRACE: Duration = Duration::from_secs(1);

/// The connection caps.
#[derive(Debug)]
pub struct Admission {
    connections_max: usize,
    per_peer_max: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    seated: HashMap<u64, Entry>,
    per_peer: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Entry {
    peer: IpAddr,
    activity: Arc<Activity>,
}

/// What became of a newcomer.
#[derive(Debug)]
pub enum Admit {
    /// Seated; holds its place until dropped.
    Seated(Seat),
    /// Over a cap with nobody that could make room: every connection there is busy.
    Refused(Eviction),
}

/// One connection's place in the table.
#[derive(Debug)]
pub struct Seat {
    admission: Arc<Admission>,
    id: u64,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.admission.table.lock().remove(self.id);
    }
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.seated.remove(&id)?;
        if let Some(count) = self.per_peer.get_mut(&entry.peer) {
            *count -= 1;
            if *count == 0 {
                self.per_peer.remove(&entry.peer);
            }
        }
        Some(entry)
    }

    /// The connection least worth keeping among those `candidate` accepts, if any has
    /// nothing in flight: one slow to say hello first, then one never used, then one in
    /// use, each the one silent longest first; one that connected just now goes last.
    fn least_worth_keeping(&self, candidate: impl Fn(&Entry) -> bool) -> Option<u64> {
        let now = Instant::now();
        self.seated
            .iter()
            .filter(|(_, entry)| candidate(entry) && entry.activity.in_flight() == 0)
            .min_by_key(|(_, entry)| {
                let silent = entry.activity.silent_for(now);
                let rank = match entry.activity.stage() {
                    Stage::Handshake if silent >= HELLO_GRACE => 0,
                    Stage::Established => 1,
                    Stage::Served => 2,
                    Stage::Handshake => 3,
                };
                (rank, std::cmp::Reverse(silent))
            })
            .map(|(id, _)| *id)
    }
}

impl Admission {
    pub fn new(connections_max: usize, per_peer_max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            connections_max: connections_max.max(1),
            per_peer_max: per_peer_max.max(1),
            table: Mutex::new(Table::default()),
        })
    }

    /// Connections seated now.
    pub fn len(&self) -> usize {
        self.table.lock().seated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gives back the table's spare room after a flood.
    pub fn shrink(&self) {
        let mut table = self.table.lock();
        table.seated.shrink_to_fit();
        table.per_peer.shrink_to_fit();
    }

    /// Seats a connection from `peer`, evicting one over a cap if needed (its
    /// `Activity` learns why and closes it).
    pub fn admit(self: &Arc<Self>, peer: SocketAddr, activity: Arc<Activity>) -> Admit {
        let ip = peer.ip();
        let mut table = self.table.lock();
        let from_peer = table.per_peer.get(&ip).copied().unwrap_or(0);
        let need = if from_peer >= self.per_peer_max {
            Some(Eviction::PeerFull)
        } else if table.seated.len() >= self.connections_max {
            Some(Eviction::ConnectionsFull)
        } else {
            None
        };
        if let Some(why) = need {
            let victim = match why {
                Eviction::PeerFull => table.least_worth_keeping(|entry| entry.peer == ip),
                _ => table.least_worth_keeping(|_| true),
            };
            let Some(victim) = victim.and_then(|id| table.remove(id)) else {
                return Admit::Refused(why);
            };
            victim.activity.evict(why);
        }
        table.next_id += 1;
        let id = table.next_id;
        table.seated.insert(id, Entry { peer: ip, activity });
        *table.per_peer.entry(ip).or_insert(0) += 1;
        Admit::Seated(Seat {
            admission: self.clone(),
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], port))
    }

    fn seat(admission: &Arc<Admission>, from: SocketAddr) -> (Seat, Arc<Activity>) {
        let activity = Arc::new(Activity::new());
        match admission.admit(from, activity.clone()) {
            Admit::Seated(seat) => (seat, activity),
            Admit::Refused(why) => panic!("refused: {why}"),
        }
    }

    #[tokio::test]
    async fn a_newcomer_over_the_peer_cap_evicts_that_peers_longest_silent() {
        let admission = Admission::new(100, 2);
        let (_old_seat, old) = seat(&admission, peer(1, 1));
        old.reached(Stage::Served);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_new_seat, new) = seat(&admission, peer(1, 2));
        new.reached(Stage::Served);
        let (_other_seat, other) = seat(&admission, peer(2, 1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_third_seat, third) = seat(&admission, peer(1, 3));
        assert_eq!(old.eviction(), Some(Eviction::PeerFull));
        assert!(!new.is_evicted() && !other.is_evicted() && !third.is_evicted());
        assert_eq!(admission.len(), 3);
    }

    #[tokio::test]
    async fn slow_hellos_go_first_and_fresh_connections_last() {
        let admission = Admission::new(3, 100);
        let (_slow_seat, slow) = seat(&admission, peer(1, 1));
        tokio::time::sleep(HELLO_GRACE).await;
        let (_served_seat, served) = seat(&admission, peer(2, 1));
        served.reached(Stage::Served);
        let (_fresh_seat, fresh) = seat(&admission, peer(3, 1));
        let (_seat, _) = seat(&admission, peer(4, 1));
        assert_eq!(slow.eviction(), Some(Eviction::ConnectionsFull));
        // Next: the one in use, silent longer than one still saying hello.
        let (_seat, _) = seat(&admission, peer(5, 1));
        assert_eq!(served.eviction(), Some(Eviction::ConnectionsFull));
        assert!(!fresh.is_evicted());
    }

    #[tokio::test]
    async fn a_busy_connection_is_never_evicted_and_the_newcomer_is_refused() {
        let admission = Admission::new(1, 1);
        let (_seat, busy) = seat(&admission, peer(1, 1));
        let _call = busy.begin();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = admission.admit(peer(1, 2), Arc::new(Activity::new()));
        assert!(matches!(refused, Admit::Refused(Eviction::PeerFull)));
        assert!(!busy.is_evicted());
        assert_eq!(admission.len(), 1);
    }

    #[test]
    fn a_dropped_seat_frees_its_place() {
        let admission = Admission::new(1, 1);
        let (first, _) = seat(&admission, peer(1, 1));
        drop(first);
        assert!(admission.is_empty());
        let (_second, activity) = seat(&admission, peer(1, 2));
        assert!(!activity.is_evicted());
    }
}
