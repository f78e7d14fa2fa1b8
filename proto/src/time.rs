//! Wall-clock time as the wire and the disk carry it: seconds and nanoseconds since the
//! Unix epoch, for file times and token expiries.
//! Invariant: `nanos` < 1e9, and a time before the epoch has negative `secs`.

use serde::{Deserialize, Serialize};

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp::from(std::time::SystemTime::now())
    }
}

impl From<std::time::SystemTime> for Timestamp {
    fn from(time: std::time::SystemTime) -> Timestamp {
        match time.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nanos: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                Timestamp {
                    secs: -(d.as_secs() as i64) - i64::from(d.subsec_nanos() > 0),
                    nanos: if d.subsec_nanos() > 0 {
                        1_000_000_000 - d.subsec_nanos()
                    } else {
                        0
                    },
                }
            }
        }
    }
}

impl From<Timestamp> for std::time::SystemTime {
    fn from(t: Timestamp) -> std::time::SystemTime {
        let base = std::time::UNIX_EPOCH;
        if t.secs >= 0 {
            base + std::time::Duration::new(t.secs as u64, t.nanos)
        } else {
            base - std::time::Duration::from_secs(t.secs.unsigned_abs())
                + std::time::Duration::from_nanos(u64::from(t.nanos))
        }
    }
}
