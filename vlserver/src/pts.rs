//! The protection database, as AFS's ptserver keeps it, in the VLDB's tables: users and
//! groups by name and id, group members, and the id counters; the built-in groups.
//! Invariant: `pts_members` and `pts_groups` hold the same (group, member) pairs, and
//! every id in them names an entry; an allocated id is never allocated again.

use proto::{ErrorCode, PrincipalId, PtsEntry};
use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::error::VldbError;
use crate::limits::StoreLimits;
use crate::tables::{
    META, META_PTS_NEXT_GROUP_ID, META_PTS_NEXT_USER_ID, PTS_ENTRIES, PTS_ENTRIES_NAME, PTS_GROUPS,
    PTS_MEMBERS, PTS_NAMES, decode, encode,
};

/// The most bytes a user or group name has (an `owner:name` group's, both parts and the
/// colon).
pub const PRINCIPAL_NAME_BYTES_MAX: usize = 64;
/// The first user id allocated.
pub const USER_ID_FIRST: i32 = 1;
/// The first group id allocated (downwards); -1 to -204 are the system's.
pub const GROUP_ID_FIRST: i32 = -205;
/// The most bytes of a password.
pub const PASSWORD_BYTES_MAX: usize = 1024;

/// The built-in groups: their names and ids. Only `system:administrators` has stored
/// members; the other two hold everyone (with a token, for `system:authuser`).
pub const BUILT_IN_GROUPS: [(&str, PrincipalId); 3] = [
    ("system:anyuser", PrincipalId::ANYUSER),
    ("system:authuser", PrincipalId::AUTHUSER),
    ("system:administrators", PrincipalId::ADMINISTRATORS),
];

/// A user's or group's row in `pts_entries` (keyed by its id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PtsRecord {
    pub name: String,
    pub owner: PrincipalId,
    /// A user's password as an argon2id PHC string; none for a group, or a user that
    /// has none yet (it cannot log in).
    pub password: Option<String>,
}

/// What `login` needs of a user: its id, its password's hash and its groups.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub id: PrincipalId,
    pub password: Option<String>,
    pub groups: Vec<PrincipalId>,
}

fn refused(reason: impl Into<String>) -> VldbError {
    VldbError::Refused(ErrorCode::PtsRefused {
        reason: reason.into(),
    })
}

fn no_such(name: &str) -> VldbError {
    VldbError::Refused(ErrorCode::NoSuchPrincipal {
        name: name.to_owned(),
    })
}

fn exists(name: impl Into<String>) -> VldbError {
    VldbError::Refused(ErrorCode::PrincipalExists { name: name.into() })
}

fn part_is_valid(part: &str) -> bool {
    !part.is_empty()
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Checks a user's name: 1 to 64 bytes of `a-z 0-9 . _ -`.
pub fn check_user_name(name: &str) -> Result<(), VldbError> {
    if name.len() > PRINCIPAL_NAME_BYTES_MAX || !part_is_valid(name) {
        return Err(refused(format!(
            "bad user name {name:?}: use 1 to {PRINCIPAL_NAME_BYTES_MAX} characters of a-z 0-9 . _ -"
        )));
    }
    Ok(())
}

/// Checks a new group's name: `name` or `owner:name`, each part of `a-z 0-9 . _ -`, at
/// most 64 bytes in all; `system:` belongs to the built-in groups. Returns the owner's
/// name for an `owner:name` group.
pub fn check_group_name(name: &str) -> Result<Option<&str>, VldbError> {
    let bad = || {
        refused(format!(
            "bad group name {name:?}: use NAME or OWNER:NAME, 1 to {PRINCIPAL_NAME_BYTES_MAX} \
             characters of a-z 0-9 . _ - in all"
        ))
    };
    if name.len() > PRINCIPAL_NAME_BYTES_MAX {
        return Err(bad());
    }
    match name.split_once(':') {
        None if part_is_valid(name) => Ok(None),
        Some(("system", _)) => Err(refused(format!(
            "{name:?}: only the built-in groups are named system:..."
        ))),
        Some((owner, rest)) if part_is_valid(owner) && part_is_valid(rest) => Ok(Some(owner)),
        _ => Err(bad()),
    }
}

/// Checks a password's length before it is hashed.
pub fn check_password(password: &str) -> Result<(), VldbError> {
    if password.is_empty() || password.len() > PASSWORD_BYTES_MAX {
        return Err(refused(format!(
            "a password has 1 to {PASSWORD_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

fn built_in(name: &str) -> Option<PrincipalId> {
    BUILT_IN_GROUPS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, id)| *id)
}

fn built_in_name(id: PrincipalId) -> Option<&'static str> {
    BUILT_IN_GROUPS
        .iter()
        .find(|(_, i)| *i == id)
        .map(|(n, _)| *n)
}

/// The id a name has, built-in groups included.
fn lookup(
    names: &impl ReadableTable<&'static str, i32>,
    name: &str,
) -> Result<Option<PrincipalId>, VldbError> {
    if let Some(id) = built_in(name) {
        return Ok(Some(id));
    }
    Ok(names.get(name)?.map(|v| PrincipalId(v.value())))
}

fn lookup_existing(
    names: &impl ReadableTable<&'static str, i32>,
    name: &str,
) -> Result<PrincipalId, VldbError> {
    lookup(names, name)?.ok_or_else(|| no_such(name))
}

/// The entry of `id`, built-in groups included.
fn entry_of(
    entries: &impl ReadableTable<i32, &'static [u8]>,
    id: PrincipalId,
) -> Result<PtsEntry, VldbError> {
    if let Some(name) = built_in_name(id) {
        return Ok(PtsEntry {
            name: name.to_owned(),
            id,
            owner: PrincipalId::ADMINISTRATORS,
        });
    }
    match entries.get(id.0)? {
        Some(bytes) => {
            let record: PtsRecord = decode(PTS_ENTRIES_NAME, id, bytes.value())?;
            Ok(PtsEntry {
                name: record.name,
                id,
                owner: record.owner,
            })
        }
        None => Err(VldbError::Corrupt {
            table: PTS_ENTRIES_NAME,
            key: id.to_string(),
            reason: "a membership or name names a missing entry".into(),
        }),
    }
}

/// The second of every (first, second) key whose first is `first`.
fn seconds_of(
    table: &impl ReadableTable<(i32, i32), ()>,
    first: PrincipalId,
) -> Result<Vec<PrincipalId>, VldbError> {
    let mut out = Vec::new();
    for row in table.range((first.0, i32::MIN)..=(first.0, i32::MAX))? {
        let (key, _) = row?;
        out.push(PrincipalId(key.value().1));
    }
    Ok(out)
}

fn counter(txn: &WriteTransaction, key: &str, default: u64) -> Result<u64, VldbError> {
    Ok(txn
        .open_table(META)?
        .get(key)?
        .map_or(default, |v| v.value()))
}

fn check_room(txn: &WriteTransaction, limits: &StoreLimits) -> Result<(), VldbError> {
    let count = txn.open_table(PTS_ENTRIES)?.len()?;
    if count >= limits.principals_max {
        return Err(refused(format!(
            "the protection database is full ({count} users and groups): delete some first"
        )));
    }
    Ok(())
}

/// The id a new user gets: `given`, if free and valid, else the counter's next; the
/// counter moves past either, skipping `PrincipalId::ANONYMOUS`.
fn user_id(txn: &WriteTransaction, given: Option<PrincipalId>) -> Result<PrincipalId, VldbError> {
    let next = counter(txn, META_PTS_NEXT_USER_ID, USER_ID_FIRST as u64)?;
    let id = match given {
        Some(id) if id.0 < USER_ID_FIRST || id == PrincipalId::ANONYMOUS => {
            return Err(refused(format!(
                "user id {id} is not allowed: use a positive id other than {} (anonymous)",
                PrincipalId::ANONYMOUS
            )));
        }
        Some(id) => id,
        None => {
            let mut next = next;
            if next == PrincipalId::ANONYMOUS.0 as u64 {
                next += 1;
            }
            let id = i32::try_from(next)
                .map_err(|_| refused("user ids are exhausted: give one with --id"))?;
            PrincipalId(id)
        }
    };
    if txn.open_table(PTS_ENTRIES)?.get(id.0)?.is_some() {
        return Err(exists(format!("user id {id}")));
    }
    let after = (id.0 as u64 + 1).max(next);
    txn.open_table(META)?.insert(META_PTS_NEXT_USER_ID, after)?;
    Ok(id)
}

/// The id a new group gets: `given` if free and valid, else the counter's next,
/// downwards from `GROUP_ID_FIRST`. The counter holds the magnitude.
fn group_id(txn: &WriteTransaction, given: Option<PrincipalId>) -> Result<PrincipalId, VldbError> {
    let next = counter(
        txn,
        META_PTS_NEXT_GROUP_ID,
        GROUP_ID_FIRST.unsigned_abs() as u64,
    )?;
    let id = match given {
        Some(id) if id.0 > GROUP_ID_FIRST => {
            return Err(refused(format!(
                "group id {id} is not allowed: group ids are {GROUP_ID_FIRST} or lower"
            )));
        }
        Some(id) => id,
        None => {
            let magnitude = i32::try_from(next)
                .map_err(|_| refused("group ids are exhausted: give one with --id"))?;
            PrincipalId(-magnitude)
        }
    };
    if txn.open_table(PTS_ENTRIES)?.get(id.0)?.is_some() {
        return Err(exists(format!("group id {id}")));
    }
    let after = (id.0.unsigned_abs() as u64 + 1).max(next);
    txn.open_table(META)?
        .insert(META_PTS_NEXT_GROUP_ID, after)?;
    Ok(id)
}

fn insert_entry(
    txn: &WriteTransaction,
    id: PrincipalId,
    record: &PtsRecord,
) -> Result<(), VldbError> {
    txn.open_table(PTS_ENTRIES)?
        .insert(id.0, encode(record)?.as_slice())?;
    txn.open_table(PTS_NAMES)?
        .insert(record.name.as_str(), id.0)?;
    Ok(())
}

/// Creates a user; `password` is already a PHC hash.
pub(crate) fn create_user(
    txn: &WriteTransaction,
    limits: &StoreLimits,
    name: &str,
    id: Option<PrincipalId>,
    password: Option<&str>,
) -> Result<PtsEntry, VldbError> {
    check_user_name(name)?;
    if lookup(&txn.open_table(PTS_NAMES)?, name)?.is_some() {
        return Err(exists(name));
    }
    check_room(txn, limits)?;
    let id = user_id(txn, id)?;
    let record = PtsRecord {
        name: name.to_owned(),
        owner: PrincipalId::ADMINISTRATORS,
        password: password.map(str::to_owned),
    };
    insert_entry(txn, id, &record)?;
    info!(user = name, %id, "user created");
    Ok(PtsEntry {
        name: record.name,
        id,
        owner: record.owner,
    })
}

/// Creates a group; an `owner:name` group is owned by the user `owner`.
pub(crate) fn create_group(
    txn: &WriteTransaction,
    limits: &StoreLimits,
    name: &str,
    id: Option<PrincipalId>,
) -> Result<PtsEntry, VldbError> {
    let owner_name = check_group_name(name)?;
    let names = txn.open_table(PTS_NAMES)?;
    if lookup(&names, name)?.is_some() {
        return Err(exists(name));
    }
    let owner = match owner_name {
        None => PrincipalId::ADMINISTRATORS,
        Some(owner_name) => {
            let owner = lookup_existing(&names, owner_name)?;
            if owner.is_group() {
                return Err(refused(format!(
                    "{name:?}: the owner {owner_name} is a group; OWNER:NAME needs a user"
                )));
            }
            owner
        }
    };
    drop(names);
    check_room(txn, limits)?;
    let id = group_id(txn, id)?;
    let record = PtsRecord {
        name: name.to_owned(),
        owner,
        password: None,
    };
    insert_entry(txn, id, &record)?;
    info!(group = name, %id, "group created");
    Ok(PtsEntry {
        name: record.name,
        id,
        owner,
    })
}

/// The id of the user `user`, refusing a group's name.
fn user_named(txn: &WriteTransaction, user: &str) -> Result<PrincipalId, VldbError> {
    let id = lookup_existing(&txn.open_table(PTS_NAMES)?, user)?;
    if id.is_group() {
        return Err(refused(format!("{user} is a group, not a user")));
    }
    Ok(id)
}

/// The id of the group `group` whose members are stored (every group but
/// `system:anyuser` and `system:authuser`).
fn group_named(txn: &WriteTransaction, group: &str) -> Result<PrincipalId, VldbError> {
    let id = lookup_existing(&txn.open_table(PTS_NAMES)?, group)?;
    if !id.is_group() {
        return Err(refused(format!("{group} is a user, not a group")));
    }
    if id == PrincipalId::ANYUSER || id == PrincipalId::AUTHUSER {
        return Err(refused(format!(
            "the members of {group} are implicit: nobody is added or removed"
        )));
    }
    Ok(id)
}

/// Sets a user's password (a PHC hash).
pub(crate) fn set_password(
    txn: &WriteTransaction,
    user: &str,
    password: &str,
) -> Result<(), VldbError> {
    let id = user_named(txn, user)?;
    let mut entries = txn.open_table(PTS_ENTRIES)?;
    let mut record: PtsRecord = match entries.get(id.0)? {
        Some(bytes) => decode(PTS_ENTRIES_NAME, id, bytes.value())?,
        None => return Err(no_such(user)),
    };
    record.password = Some(password.to_owned());
    entries.insert(id.0, encode(&record)?.as_slice())?;
    info!(user, "password changed");
    Ok(())
}

pub(crate) fn add_user(
    txn: &WriteTransaction,
    limits: &StoreLimits,
    user: &str,
    group: &str,
) -> Result<(), VldbError> {
    let user_id = user_named(txn, user)?;
    let group_id = group_named(txn, group)?;
    let mut members = txn.open_table(PTS_MEMBERS)?;
    if members.get((group_id.0, user_id.0))?.is_some() {
        return Err(refused(format!("{user} is already a member of {group}")));
    }
    let mut groups = txn.open_table(PTS_GROUPS)?;
    if seconds_of(&members, group_id)?.len() >= limits.members_per_group_max {
        return Err(refused(format!(
            "{group} has {} members, the most a group may have",
            limits.members_per_group_max
        )));
    }
    if seconds_of(&groups, user_id)?.len() >= limits.groups_per_user_max {
        return Err(refused(format!(
            "{user} is in {} groups, the most a user may be in (a token carries them all)",
            limits.groups_per_user_max
        )));
    }
    members.insert((group_id.0, user_id.0), ())?;
    groups.insert((user_id.0, group_id.0), ())?;
    info!(user, group, "member added");
    Ok(())
}

pub(crate) fn remove_user(
    txn: &WriteTransaction,
    user: &str,
    group: &str,
) -> Result<(), VldbError> {
    let user_id = user_named(txn, user)?;
    let group_id = group_named(txn, group)?;
    let mut members = txn.open_table(PTS_MEMBERS)?;
    if members.remove((group_id.0, user_id.0))?.is_none() {
        return Err(refused(format!("{user} is not a member of {group}")));
    }
    txn.open_table(PTS_GROUPS)?
        .remove((user_id.0, group_id.0))?;
    info!(user, group, "member removed");
    Ok(())
}

/// Deletes a user or a group with every membership it had. A user who owns groups is
/// kept until they are deleted.
pub(crate) fn delete(txn: &WriteTransaction, name: &str) -> Result<PtsEntry, VldbError> {
    if built_in(name).is_some() {
        return Err(refused(format!("{name} is built in and cannot be deleted")));
    }
    let mut names = txn.open_table(PTS_NAMES)?;
    let id = lookup_existing(&names, name)?;
    let mut entries = txn.open_table(PTS_ENTRIES)?;
    let entry = entry_of(&entries, id)?;
    if !id.is_group() {
        let mut owned = Vec::new();
        for row in entries.iter()? {
            let (key, bytes) = row?;
            let record: PtsRecord = decode(PTS_ENTRIES_NAME, key.value(), bytes.value())?;
            if record.owner == id {
                owned.push(record.name);
            }
        }
        if !owned.is_empty() {
            return Err(refused(format!(
                "{name} owns {}: delete those groups first",
                owned.join(", ")
            )));
        }
    }
    let mut members = txn.open_table(PTS_MEMBERS)?;
    let mut groups = txn.open_table(PTS_GROUPS)?;
    // A group's rows are (group, member) in `members`; a user's, (user, group) in
    // `groups`: remove them and their mirror images.
    let (own, mirror) = if id.is_group() {
        (&mut members, &mut groups)
    } else {
        (&mut groups, &mut members)
    };
    remove_pairs(own, mirror, id)?;
    entries.remove(id.0)?;
    names.remove(name)?;
    info!(name, %id, "user or group deleted");
    Ok(entry)
}

/// Removes every (id, other) row of `own` and its mirror (other, id) in `mirror`.
fn remove_pairs(
    own: &mut Table<(i32, i32), ()>,
    mirror: &mut Table<(i32, i32), ()>,
    id: PrincipalId,
) -> Result<(), VldbError> {
    for other in seconds_of(own, id)? {
        own.remove((id.0, other.0))?;
        mirror.remove((other.0, id.0))?;
    }
    Ok(())
}

/// Reads of the protection database, on a read transaction's tables.
pub(crate) struct PtsTables<E, N, M, G> {
    pub entries: E,
    pub names: N,
    pub members: M,
    pub groups: G,
}

impl<E, N, M, G> PtsTables<E, N, M, G>
where
    E: ReadableTable<i32, &'static [u8]>,
    N: ReadableTable<&'static str, i32>,
    M: ReadableTable<(i32, i32), ()>,
    G: ReadableTable<(i32, i32), ()>,
{
    /// A user's groups, or a group's members.
    pub fn membership(&self, name: &str) -> Result<Vec<PtsEntry>, VldbError> {
        let id = lookup_existing(&self.names, name)?;
        if id == PrincipalId::ANYUSER || id == PrincipalId::AUTHUSER {
            return Err(refused(format!(
                "the members of {name} are implicit: everyone{}",
                if id == PrincipalId::AUTHUSER {
                    " with a token"
                } else {
                    ""
                }
            )));
        }
        let ids = if id.is_group() {
            seconds_of(&self.members, id)?
        } else {
            seconds_of(&self.groups, id)?
        };
        ids.into_iter()
            .map(|id| entry_of(&self.entries, id))
            .collect()
    }

    /// Every entry, built-in groups first, then by id.
    pub fn list(&self) -> Result<Vec<PtsEntry>, VldbError> {
        let mut out: Vec<PtsEntry> = BUILT_IN_GROUPS
            .iter()
            .map(|(name, id)| PtsEntry {
                name: (*name).to_owned(),
                id: *id,
                owner: PrincipalId::ADMINISTRATORS,
            })
            .collect();
        for row in self.entries.iter()? {
            let (key, bytes) = row?;
            let record: PtsRecord = decode(PTS_ENTRIES_NAME, key.value(), bytes.value())?;
            out.push(PtsEntry {
                name: record.name,
                id: PrincipalId(key.value()),
                owner: record.owner,
            });
        }
        Ok(out)
    }

    /// What a login needs of `user`; `None` for a name that is no user.
    pub fn credentials(&self, user: &str) -> Result<Option<Credentials>, VldbError> {
        let Some(id) = self.names.get(user)?.map(|v| PrincipalId(v.value())) else {
            return Ok(None);
        };
        if id.is_group() {
            return Ok(None);
        }
        let record: PtsRecord = match self.entries.get(id.0)? {
            Some(bytes) => decode(PTS_ENTRIES_NAME, id, bytes.value())?,
            None => return Ok(None),
        };
        Ok(Some(Credentials {
            id,
            password: record.password,
            groups: seconds_of(&self.groups, id)?,
        }))
    }
}
