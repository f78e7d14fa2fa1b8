//! `holdfast fs setacl`, `listacl`, `cleanacl` and `copyacl`: access lists read and
//! written through the mount's cache manager, for the caller's token.
//! Invariant: a principal is printed by the name `Principals::resolve` reads back, so
//! `listacl` output can be given back to `setacl`.

use std::fmt::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::{
    AccessList, AclEntry, CellConfig, PeerKind, PrincipalId, PtsEntry, Request, Response, Rights,
    VldbClient,
};

/// The protection database's users and groups, read once per command to turn names into
/// ids and back; `None` fields stand for a command run without a cell file (only the
/// `system:` groups and numeric ids are known then).
pub struct Principals {
    entries: Option<Vec<PtsEntry>>,
}

impl Principals {
    /// Reads every principal from the VLDB of `cell`, or knows none without a cell.
    pub fn load(cell: Option<&CellConfig>) -> Result<Principals> {
        let Some(cell) = cell else {
            return Ok(Principals { entries: None });
        };
        let transport = proto::Transport::for_cell(cell, proto::PeerClass::Host)?;
        let client = VldbClient::new(
            cell.clone(),
            transport,
            PeerKind::Admin,
            Duration::from_secs(10),
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the async runtime")?;
        match runtime.block_on(client.call(Request::PtsListEntries)) {
            Ok(Response::PtsEntries(entries)) => Ok(Principals {
                entries: Some(entries),
            }),
            Ok(other) => bail!("the VLDB answered {} to a listing", other.kind_name()),
            Err(e) => Err(e).context("list the protection database's users and groups"),
        }
    }

    /// The id a principal's name or number stands for.
    pub fn resolve(&self, name: &str) -> Result<PrincipalId> {
        if let Some(id) = system_id(name) {
            return Ok(id);
        }
        if let Ok(id) = name.parse::<i32>() {
            if id == 0 {
                bail!("0 names no principal: use a user (positive) or group (negative) id");
            }
            return Ok(PrincipalId(id));
        }
        match &self.entries {
            Some(entries) => entries
                .iter()
                .find(|entry| entry.name == name)
                .map(|entry| entry.id)
                .with_context(|| {
                    format!("no user or group is named {name:?}: see `holdfast pts listentries`")
                }),
            None => bail!(
                "{name:?} cannot be looked up without the cell: pass --cell FILE or set \
                 HOLDFAST_CELL (or use a numeric id)"
            ),
        }
    }

    /// A principal's name, if it has one (else `None`: print its number).
    fn name_of(&self, id: PrincipalId) -> Option<String> {
        if let Some(name) = system_name(id) {
            return Some(name.to_owned());
        }
        let entries = self.entries.as_ref()?;
        entries
            .iter()
            .find(|entry| entry.id == id)
            .map(|entry| entry.name.clone())
    }

    /// True when `id` names a user or group that exists (unknowable without the cell).
    fn exists(&self, id: PrincipalId) -> Option<bool> {
        if system_name(id).is_some() {
            return Some(true);
        }
        let entries = self.entries.as_ref()?;
        Some(entries.iter().any(|entry| entry.id == id))
    }

    fn render_entry(&self, entry: &AclEntry) -> String {
        let name = self
            .name_of(entry.principal)
            .unwrap_or_else(|| entry.principal.to_string());
        format!("  {name} {}\n", entry.rights)
    }
}

fn system_id(name: &str) -> Option<PrincipalId> {
    match name {
        "system:anyuser" => Some(PrincipalId::ANYUSER),
        "system:authuser" => Some(PrincipalId::AUTHUSER),
        "system:administrators" => Some(PrincipalId::ADMINISTRATORS),
        _ => None,
    }
}

fn system_name(id: PrincipalId) -> Option<&'static str> {
    match id {
        PrincipalId::ANYUSER => Some("system:anyuser"),
        PrincipalId::AUTHUSER => Some("system:authuser"),
        PrincipalId::ADMINISTRATORS => Some("system:administrators"),
        _ => None,
    }
}

/// `fs setacl DIR PRINCIPAL RIGHTS [--negative]`: empty rights (`none`) remove the entry.
pub fn setacl(
    principals: &Principals,
    dir: &Path,
    principal: &str,
    rights: &str,
    negative: bool,
) -> Result<String> {
    let principal = principals.resolve(principal)?;
    let rights = Rights::parse(rights)?;
    let mut acl = cachemgr::control::get_acl(dir)?;
    acl.set(principal, rights, negative);
    if acl.len() > proto::identity::ACL_ENTRIES_MAX {
        bail!(
            "an access list holds at most {} entries: remove one first",
            proto::identity::ACL_ENTRIES_MAX
        );
    }
    cachemgr::control::set_acl(dir, &acl)?;
    Ok(String::new())
}

/// `fs listacl DIR`, as AFS prints it.
pub fn listacl(principals: &Principals, dir: &Path) -> Result<String> {
    let acl = cachemgr::control::get_acl(dir)?;
    let mut text = format!("Access list for {} is\n", dir.display());
    if !acl.positive.is_empty() {
        text.push_str("Normal rights:\n");
        acl.positive
            .iter()
            .for_each(|e| text.push_str(&principals.render_entry(e)));
    }
    if !acl.negative.is_empty() {
        text.push_str("Negative rights:\n");
        acl.negative
            .iter()
            .for_each(|e| text.push_str(&principals.render_entry(e)));
    }
    Ok(text)
}

/// `fs cleanacl DIR`: drops the entries of users and groups that no longer exist.
pub fn cleanacl(principals: &Principals, dir: &Path) -> Result<String> {
    let acl = cachemgr::control::get_acl(dir)?;
    let mut unknowable = false;
    let mut exists = |entry: &AclEntry| {
        principals.exists(entry.principal).unwrap_or_else(|| {
            unknowable = true;
            true
        })
    };
    let cleaned = AccessList {
        positive: acl.positive.iter().copied().filter(&mut exists).collect(),
        negative: acl.negative.iter().copied().filter(&mut exists).collect(),
    };
    if unknowable {
        bail!(
            "which users and groups exist is the VLDB's to say: pass --cell FILE or set \
             HOLDFAST_CELL"
        );
    }
    let removed = acl.len() - cleaned.len();
    if removed == 0 {
        return Ok(format!("Access list for {} is fine.\n", dir.display()));
    }
    cachemgr::control::set_acl(dir, &cleaned)?;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Access list for {} cleaned: {removed} entries of users or groups that no longer \
         exist removed",
        dir.display()
    );
    Ok(text)
}

/// `fs copyacl FROM TO`: TO gets FROM's list.
pub fn copyacl(from: &Path, to: &Path) -> Result<String> {
    let acl = cachemgr::control::get_acl(from)
        .with_context(|| format!("read the access list of {}", from.display()))?;
    cachemgr::control::set_acl(to, &acl)
        .with_context(|| format!("write the access list of {}", to.display()))?;
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_resolve_by_name_or_number_and_print_back() {
        let known = Principals {
            entries: Some(vec![PtsEntry {
                name: "alice".into(),
                id: PrincipalId(1001),
                owner: PrincipalId::ADMINISTRATORS,
            }]),
        };
        let unknown = Principals { entries: None };
        for principals in [&known, &unknown] {
            assert_eq!(
                principals.resolve("system:anyuser").unwrap(),
                PrincipalId::ANYUSER
            );
            assert_eq!(principals.resolve("-300").unwrap(), PrincipalId(-300));
            assert!(principals.resolve("0").is_err());
        }
        assert_eq!(known.resolve("alice").unwrap(), PrincipalId(1001));
        assert!(known.resolve("bob").is_err());
        assert!(unknown.resolve("alice").is_err());
        let alice = AclEntry {
            principal: PrincipalId(1001),
            rights: Rights::parse("write").unwrap(),
        };
        assert_eq!(known.render_entry(&alice), "  alice rlidwk\n");
        assert_eq!(unknown.render_entry(&alice), "  1001 rlidwk\n");
        assert_eq!(known.exists(PrincipalId(1002)), Some(false));
        assert_eq!(unknown.exists(PrincipalId(1002)), None);
    }
}
