//! `holdfast fs setacl`, `listacl`, `cleanacl` and `copyacl`: access lists read and
//! written through the mount's cache manager, for the caller's token.
//! Invariant: a principal is named as `resolve_principal` reads it, and printed as
//! `principal_name` writes it, so `listacl` output can be given back to `setacl`.

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use proto::{AccessList, AclEntry, PrincipalId, Rights};

/// The id a principal's name or number stands for. Names known here: the three
/// `system:` groups; a number is taken as it is. The protection database's users and
/// groups are looked up here once it exists (the one place to extend).
pub fn resolve_principal(name: &str) -> Result<PrincipalId> {
    match name {
        "system:anyuser" => return Ok(PrincipalId::ANYUSER),
        "system:authuser" => return Ok(PrincipalId::AUTHUSER),
        "system:administrators" => return Ok(PrincipalId::ADMINISTRATORS),
        _ => {}
    }
    match name.parse::<i32>() {
        Ok(0) => bail!("0 names no principal: use a user (positive) or group (negative) id"),
        Ok(id) => Ok(PrincipalId(id)),
        Err(_) => bail!(
            "{name:?} is not a principal known here: use system:anyuser, system:authuser, system:administrators or a numeric id"
        ),
    }
}

/// A principal's name, if it has one here (else its number).
fn principal_name(id: PrincipalId) -> Option<&'static str> {
    match id {
        PrincipalId::ANYUSER => Some("system:anyuser"),
        PrincipalId::AUTHUSER => Some("system:authuser"),
        PrincipalId::ADMINISTRATORS => Some("system:administrators"),
        _ => None,
    }
}

fn render_entry(entry: &AclEntry) -> String {
    let name =
        principal_name(entry.principal).map_or_else(|| entry.principal.to_string(), str::to_owned);
    format!("  {name} {}\n", entry.rights)
}

/// `fs setacl DIR PRINCIPAL RIGHTS [--negative]`: empty rights (`none`) remove the entry.
pub fn setacl(dir: &Path, principal: &str, rights: &str, negative: bool) -> Result<String> {
    let principal = resolve_principal(principal)?;
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
pub fn listacl(dir: &Path) -> Result<String> {
    let acl = cachemgr::control::get_acl(dir)?;
    let mut text = format!("Access list for {} is\n", dir.display());
    if !acl.positive.is_empty() {
        text.push_str("Normal rights:\n");
        acl.positive
            .iter()
            .for_each(|e| text.push_str(&render_entry(e)));
    }
    if !acl.negative.is_empty() {
        text.push_str("Negative rights:\n");
        acl.negative
            .iter()
            .for_each(|e| text.push_str(&render_entry(e)));
    }
    Ok(text)
}

/// `fs cleanacl DIR`: drops the entries of principals that no longer resolve. Without
/// the protection database here, that is every numeric id with no name.
pub fn cleanacl(dir: &Path) -> Result<String> {
    let acl = cachemgr::control::get_acl(dir)?;
    let named = |entry: &AclEntry| principal_name(entry.principal).is_some();
    let cleaned = AccessList {
        positive: acl.positive.iter().copied().filter(named).collect(),
        negative: acl.negative.iter().copied().filter(named).collect(),
    };
    let removed = acl.len() - cleaned.len();
    if removed == 0 {
        return Ok(format!("Access list for {} is fine.\n", dir.display()));
    }
    cachemgr::control::set_acl(dir, &cleaned)?;
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Access list for {} cleaned: {removed} entries of unknown principals removed",
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
        assert_eq!(
            resolve_principal("system:anyuser").unwrap(),
            PrincipalId::ANYUSER
        );
        assert_eq!(resolve_principal("1001").unwrap(), PrincipalId(1001));
        assert_eq!(resolve_principal("-300").unwrap(), PrincipalId(-300));
        assert!(resolve_principal("0").is_err());
        assert!(resolve_principal("alice").is_err());
        let entry = AclEntry {
            principal: PrincipalId::ADMINISTRATORS,
            rights: Rights::ALL,
        };
        assert_eq!(render_entry(&entry), "  system:administrators rlidwka\n");
    }
}
