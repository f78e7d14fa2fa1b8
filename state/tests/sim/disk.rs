//! The pair's shared disk: the real `state::Journal` on one `MemVfs` both members open,
//! holding acknowledged writes, lock grants and releases, and answered (client, seq).
//! Invariant: a record is appended and synced before the reply it justifies is sent;
//! replay applies records in journal order to a fresh `LockTable`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::{ByteRange, Epoch, Fid, LockKind, LockOwnerId, Uniquifier, VnodeId, VolumeId};
use state::journal::{MemVfs, Vfs, inspect_with};
use state::{
    ClientKey, Journal, JournalConfig, JournalMode, LockOutcome, LockOwner, LockTable,
    LockTableConfig, Recovered,
};

pub const JOURNAL_DIR: &str = "/partition/journal";
/// Small segments: the in-memory file system copies a whole file at each sync.
const SEGMENT_BYTES_MAX: u64 = 4096;

/// One lockable region: `index` picks a 5-byte range on file `file`. Ranges never touch,
/// so the lock table never merges two of them and a reclaim names exactly what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub file: u64,
    pub index: u64,
}

impl Slot {
    pub fn fid(self) -> Fid {
        Fid {
            volume: VolumeId(1),
            vnode: VnodeId(2 + self.file),
            unique: Uniquifier(1),
        }
    }

    /// The slot a lock of the table covers, if it is one.
    pub fn of(fid: Fid, range: ByteRange) -> Option<Slot> {
        let slot = Slot {
            file: fid.vnode.0.checked_sub(2)?,
            index: range.start() / 10,
        };
        (slot.fid() == fid && slot.range() == range).then_some(slot)
    }

    pub fn range(self) -> ByteRange {
        let start = self.index * 10;
        ByteRange::new(start, start + 5).expect("a slot is five bytes long")
    }
}

pub fn owner(client: u32) -> LockOwner {
    LockOwner {
        client: ClientKey(client),
        owner: LockOwnerId(1),
    }
}

/// What a sequenced request did, as recorded: a retry is answered from this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Written,
    Granted,
    Unlocked,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Write {
        client: u32,
        seq: u64,
        value: u64,
    },
    Lock {
        client: u32,
        seq: u64,
        slot: Slot,
        kind: LockKind,
    },
    Unlock {
        client: u32,
        seq: u64,
        slot: Slot,
    },
    /// Grace ended with this lock unreclaimed: it is gone.
    Drop {
        client: u32,
        slot: Slot,
    },
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let (tag, words): (u8, Vec<u64>) = match *self {
            Record::Write { client, seq, value } => (1, vec![client.into(), seq, value]),
            Record::Lock {
                client,
                seq,
                slot,
                kind,
            } => {
                let kind = u64::from(kind == LockKind::Exclusive);
                (2, vec![client.into(), seq, slot.file, slot.index, kind])
            }
            Record::Unlock { client, seq, slot } => {
                (3, vec![client.into(), seq, slot.file, slot.index])
            }
            Record::Drop { client, slot } => (4, vec![client.into(), slot.file, slot.index]),
        };
        let mut bytes = vec![tag];
        for word in words {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, String> {
        let (&tag, rest) = bytes.split_first().ok_or("empty record")?;
        let words: Vec<u64> = rest
            .chunks(8)
            .map(|chunk| chunk.try_into().map(u64::from_le_bytes))
            .collect::<Result<_, _>>()
            .map_err(|_| format!("record of {} bytes is not whole words", bytes.len()))?;
        let client = |word: u64| u32::try_from(word).map_err(|_| format!("client {word}"));
        let kind = |word: u64| match word {
            0 => Ok(LockKind::Shared),
            1 => Ok(LockKind::Exclusive),
            other => Err(format!("lock kind {other}")),
        };
        match (tag, words.as_slice()) {
            (1, &[c, seq, value]) => Ok(Record::Write {
                client: client(c)?,
                seq,
                value,
            }),
            (2, &[c, seq, file, index, k]) => Ok(Record::Lock {
                client: client(c)?,
                seq,
                slot: Slot { file, index },
                kind: kind(k)?,
            }),
            (3, &[c, seq, file, index]) => Ok(Record::Unlock {
                client: client(c)?,
                seq,
                slot: Slot { file, index },
            }),
            (4, &[c, file, index]) => Ok(Record::Drop {
                client: client(c)?,
                slot: Slot { file, index },
            }),
            _ => Err(format!("bad record: tag {tag}, {} words", words.len())),
        }
    }
}

/// A member's tables as rebuilt from the shared disk.
pub struct Replayed {
    pub table: LockTable,
    pub done: HashMap<(u32, u64), Outcome>,
    /// Every write on the disk: (client, seq, value), in journal order.
    pub writes: Vec<(u32, u64, u64)>,
}

/// Applies every record in order. A grant that conflicts with the table rebuilt so far
/// means two members granted at once: that is reported, not repaired.
pub fn replay(recovered: &Recovered) -> Result<Replayed, String> {
    if recovered.snapshot.is_some() {
        return Err("the simulation never writes snapshots".into());
    }
    let mut replayed = Replayed {
        table: LockTable::new(LockTableConfig::default()),
        done: HashMap::new(),
        writes: Vec::new(),
    };
    for (lsn, payload) in &recovered.records {
        let record = Record::decode(payload).map_err(|e| format!("record {lsn}: {e}"))?;
        replayed
            .apply(record)
            .map_err(|e| format!("record {lsn}: {e}"))?;
    }
    Ok(replayed)
}

impl Replayed {
    fn apply(&mut self, record: Record) -> Result<(), String> {
        match record {
            Record::Write { client, seq, value } => {
                self.writes.push((client, seq, value));
                self.done.insert((client, seq), Outcome::Written);
            }
            Record::Lock {
                client,
                seq,
                slot,
                kind,
            } => {
                let reply = self
                    .table
                    .lock(slot.fid(), owner(client), slot.range(), kind, false);
                if reply.outcome != LockOutcome::Granted {
                    return Err(format!(
                        "grant of {slot:?} to client {client} conflicts with the disk: {:?}",
                        reply.outcome
                    ));
                }
                self.done.insert((client, seq), Outcome::Granted);
            }
            Record::Unlock { client, seq, slot } => {
                self.unlock(client, slot)?;
                self.done.insert((client, seq), Outcome::Unlocked);
            }
            Record::Drop { client, slot } => self.unlock(client, slot)?,
        }
        Ok(())
    }

    fn unlock(&mut self, client: u32, slot: Slot) -> Result<(), String> {
        self.table
            .unlock(slot.fid(), owner(client), slot.range())
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

pub fn journal_config(epoch: u64) -> JournalConfig {
    JournalConfig {
        mode: JournalMode::Sync,
        segment_bytes_max: SEGMENT_BYTES_MAX,
        group_delay: Duration::from_millis(10),
        epoch: Epoch(epoch),
    }
}

/// Opens the shared journal for a member taking over in `epoch`.
pub fn open(vfs: &MemVfs, epoch: u64) -> Result<(Journal, Replayed), String> {
    let (journal, recovered) = Journal::open_with(
        Arc::new(vfs.clone()),
        Path::new(JOURNAL_DIR),
        journal_config(epoch),
    )
    .map_err(|e| format!("open shared journal: {e}"))?;
    let replayed = replay(&recovered)?;
    Ok((journal, replayed))
}

/// What the disk holds, read without changing it (the end-of-run check).
pub fn inspect(vfs: &MemVfs) -> Result<Replayed, String> {
    if vfs
        .list(Path::new(JOURNAL_DIR))
        .map_or(true, |names| names.is_empty())
    {
        return replay(&Recovered::default());
    }
    let (_, recovered) =
        inspect_with(vfs, Path::new(JOURNAL_DIR)).map_err(|e| format!("inspect journal: {e}"))?;
    replay(&recovered)
}
