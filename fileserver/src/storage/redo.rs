//! A metadata log record's payload: one storage batch of one volume, as the physical
//! writes it made to the volume's tables, in order.
//! Invariant: `Writer::apply` of a record writes exactly the bytes the live batch wrote,
//! so applying it to the tables as they were before the batch gives them as after it.

use proto::VolumeId;
use serde::{Deserialize, Serialize};

/// A directory entry's value as the `entries` table stores it: (vnode, uniquifier,
/// kind code).
pub type EntryValue = (u64, u32, u8);

/// Format version of `Redo`.
pub const REDO_FORMAT: u16 = 1;

/// One write to a volume's tables, with its value encoded as the table stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The volume header.
    Header(Vec<u8>),
    /// A vnode record; `None` deletes it.
    Vnode { vnode: u64, record: Option<Vec<u8>> },
    /// A directory entry; `None` removes it.
    Entry {
        dir: u64,
        name: String,
        value: Option<EntryValue>,
    },
    /// An inline file's bytes; empty removes the row.
    FileData { vnode: u64, content: Vec<u8> },
    /// A directory's access list; `None` removes the row.
    Acl { dir: u64, record: Option<Vec<u8>> },
    /// A sequenced request's recorded answer; then the client's rows outside the window
    /// of this key are removed (see `Writer::apply`).
    Outcome {
        client: u128,
        instance: u64,
        seq: u64,
        record: Vec<u8>,
    },
}

/// A record: the changes of one batch of one volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redo {
    pub format: u16,
    pub volume: VolumeId,
    pub changes: Vec<Change>,
}

impl Redo {
    pub fn new(volume: VolumeId, changes: Vec<Change>) -> Redo {
        Redo {
            format: REDO_FORMAT,
            volume,
            changes,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, String> {
        postcard::to_allocvec(self).map_err(|e| format!("encode a metadata log record: {e}"))
    }

    pub fn decode(bytes: &[u8]) -> Result<Redo, String> {
        let redo: Redo = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        if redo.format != REDO_FORMAT {
            return Err(format!("record format {}", redo.format));
        }
        Ok(redo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redo_golden_bytes() {
        let redo = Redo::new(
            VolumeId(7),
            vec![
                Change::Header(vec![1, 2]),
                Change::Vnode {
                    vnode: 3,
                    record: None,
                },
                Change::Entry {
                    dir: 1,
                    name: "a".into(),
                    value: Some((3, 1, 0)),
                },
                Change::FileData {
                    vnode: 3,
                    content: vec![9],
                },
                Change::Acl {
                    dir: 1,
                    record: Some(vec![4]),
                },
                Change::Outcome {
                    client: 2,
                    instance: 1,
                    seq: 5,
                    record: vec![],
                },
            ],
        );
        let bytes = redo.encode().unwrap();
        #[rustfmt::skip]
        let golden = [
            1, 7, 6, // format, volume, six changes
            0, 2, 1, 2, // header [1, 2]
            1, 3, 0, // vnode 3 deleted
            2, 1, 1, b'a', 1, 3, 1, 0, // entry (1, "a") -> (3, 1, 0)
            3, 3, 1, 9, // file data of 3: [9]
            4, 1, 1, 1, 4, // acl of 1: [4]
            5, 2, 1, 5, 0, // outcome (2, 1, 5): []
        ];
        assert_eq!(bytes, golden);
        assert_eq!(Redo::decode(&bytes), Ok(redo));
    }
}
