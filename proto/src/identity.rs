//! Who a request speaks for: principals (users and groups), AFS access rights and lists,
//! and the cell's tokens, signed with ed25519 by the VLDB and verified by every server.
//! Invariant: a `TokenBody` leaves `TokenVerifier::verify` only from bytes whose signature
//! verifies under a key of this cell, for this cell, and whose expiry has not passed.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::time::Timestamp;

/// A user (positive) or a group (negative), as AFS's protection database numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PrincipalId(pub i32);

impl PrincipalId {
    /// Everyone, with or without a token.
    pub const ANYUSER: PrincipalId = PrincipalId(-101);
    /// Everyone with a valid token of this cell.
    pub const AUTHUSER: PrincipalId = PrincipalId(-102);
    /// The cell's administrators: implicit `l` and `a` on every directory, and the
    /// right to change the cell (`vos`, `pair`, `vldb`, `pts`).
    pub const ADMINISTRATORS: PrincipalId = PrincipalId(-204);
    /// The user id a request without a token acts as (the owner of what it creates).
    pub const ANONYMOUS: PrincipalId = PrincipalId(32766);

    pub fn is_group(self) -> bool {
        self.0 < 0
    }

    /// The POSIX uid or gid this principal owns files as.
    pub fn as_posix_id(self) -> u32 {
        self.0 as u32
    }
}

impl fmt::Display for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// AFS directory rights: `r`ead, `l`ookup, `i`nsert, `d`elete, `w`rite, loc`k`,
/// `a`dminister.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rights(pub u8);

impl Rights {
    pub const READ: Rights = Rights(1);
    pub const LOOKUP: Rights = Rights(2);
    pub const INSERT: Rights = Rights(4);
    pub const DELETE: Rights = Rights(8);
    pub const WRITE: Rights = Rights(16);
    pub const LOCK: Rights = Rights(32);
    pub const ADMINISTER: Rights = Rights(64);
    pub const NONE: Rights = Rights(0);
    pub const ALL: Rights = Rights(127);
    /// The letters in their canonical order, with their bits.
    const LETTERS: [(char, Rights); 7] = [
        ('r', Rights::READ),
        ('l', Rights::LOOKUP),
        ('i', Rights::INSERT),
        ('d', Rights::DELETE),
        ('w', Rights::WRITE),
        ('k', Rights::LOCK),
        ('a', Rights::ADMINISTER),
    ];

    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    pub fn minus(self, other: Rights) -> Rights {
        Rights(self.0 & !other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Parses `rlidwka` letters in any order, or the AFS words `read` (rl), `write`
    /// (rlidwk), `all` (rlidwka) and `none`.
    pub fn parse(text: &str) -> Result<Rights, RightsError> {
        match text {
            "read" => return Ok(Rights::READ.union(Rights::LOOKUP)),
            "write" => return Ok(Rights(Rights::ALL.0 & !Rights::ADMINISTER.0)),
            "all" => return Ok(Rights::ALL),
            "none" => return Ok(Rights::NONE),
            _ => {}
        }
        let mut rights = Rights::NONE;
        for c in text.chars() {
            let Some((_, bit)) = Rights::LETTERS.iter().find(|(letter, _)| *letter == c) else {
                return Err(RightsError {
                    text: text.to_owned(),
                });
            };
            rights = rights.union(*bit);
        }
        Ok(rights)
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (letter, bit) in Rights::LETTERS {
            if self.contains(bit) {
                write!(f, "{letter}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("{text:?} is not a set of rights: use letters of rlidwka, or read, write, all or none")]
pub struct RightsError {
    pub text: String,
}

/// One entry of an access list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclEntry {
    pub principal: PrincipalId,
    pub rights: Rights,
}

/// A directory's access list: rights granted, and rights taken away (negative entries
/// win over positive ones, as in AFS).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessList {
    pub positive: Vec<AclEntry>,
    pub negative: Vec<AclEntry>,
}

/// The most entries an access list holds, positive and negative together (AFS: 20 each).
pub const ACL_ENTRIES_MAX: usize = 64;

impl AccessList {
    /// The rights of a caller whose current protection set is `cps` (its own id, its
    /// groups, `system:authuser` with a token and always `system:anyuser`).
    pub fn rights_for(&self, cps: &[PrincipalId]) -> Rights {
        let sum = |entries: &[AclEntry]| {
            entries
                .iter()
                .filter(|entry| cps.contains(&entry.principal))
                .fold(Rights::NONE, |rights, entry| rights.union(entry.rights))
        };
        let mut rights = sum(&self.positive).minus(sum(&self.negative));
        if cps.contains(&PrincipalId::ADMINISTRATORS) {
            rights = rights.union(Rights::LOOKUP).union(Rights::ADMINISTER);
        }
        rights
    }

    /// Sets `principal`'s positive or negative rights; empty rights remove the entry.
    pub fn set(&mut self, principal: PrincipalId, rights: Rights, negative: bool) {
        let entries = if negative {
            &mut self.negative
        } else {
            &mut self.positive
        };
        entries.retain(|entry| entry.principal != principal);
        if !rights.is_empty() {
            entries.push(AclEntry { principal, rights });
            entries.sort_by_key(|entry| entry.principal);
        }
    }

    pub fn len(&self) -> usize {
        self.positive.len() + self.negative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The list for a new volume's root: administrators may do everything.
    pub fn for_new_volume() -> AccessList {
        AccessList {
            positive: vec![AclEntry {
                principal: PrincipalId::ADMINISTRATORS,
                rights: Rights::ALL,
            }],
            negative: Vec::new(),
        }
    }
}

/// What a token says: who, which groups, until when, and which key signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBody {
    /// The cell that issued it; a token of another cell is refused.
    pub cell: String,
    pub user: String,
    pub id: PrincipalId,
    /// The groups the user was in when the token was issued (a membership change
    /// reaches servers with the next token, as AFS's CPS does with the next login).
    pub groups: Vec<PrincipalId>,
    pub issued: Timestamp,
    pub expiry: Timestamp,
    pub key_id: u32,
}

/// The most groups a token carries.
pub const TOKEN_GROUPS_MAX: usize = 256;
/// The most bytes a sealed token may have (its body and signature).
pub const TOKEN_BYTES_MAX: usize = 2048;
/// How long a token lasts unless asked otherwise: 25 hours, as AFS's default.
pub const TOKEN_LIFETIME_DEFAULT: std::time::Duration = std::time::Duration::from_secs(25 * 3600);

/// A token as it travels: the postcard bytes of its `TokenBody`, then a 64-byte ed25519
/// signature over them.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SealedToken(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Debug for SealedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedToken({} bytes)", self.0.len())
    }
}

const SIGNATURE_BYTES: usize = 64;

impl SealedToken {
    /// The body, read without checking the signature: for a holder showing its own
    /// tokens (`holdfast tokens`), never for a decision.
    pub fn unverified_body(&self) -> Result<TokenBody, TokenError> {
        let (body, _) = self.split()?;
        postcard::from_bytes(body).map_err(|_| TokenError::Malformed)
    }

    fn split(&self) -> Result<(&[u8], &[u8]), TokenError> {
        if self.0.len() > TOKEN_BYTES_MAX || self.0.len() <= SIGNATURE_BYTES {
            return Err(TokenError::Malformed);
        }
        Ok(self.0.split_at(self.0.len() - SIGNATURE_BYTES))
    }
}

/// Why a token was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token is for cell {cell:?}, not this one")]
    WrongCell { cell: String },
    #[error("the token of {user} was signed by key {key_id}, which this server does not know")]
    UnknownKey { user: String, key_id: u32 },
    #[error("the token's signature does not verify (forged or tampered with)")]
    BadSignature,
    #[error("the token of {user} expired at {expiry} (Unix seconds): run `holdfast login` again")]
    Expired { user: String, expiry: i64 },
    #[error("the token key file {path} is not valid: {reason}")]
    KeyFile { path: String, reason: String },
}

/// The cell's token-signing key (held by the VLDB replicas and, for `--localauth`, by
/// root on server hosts).
pub struct TokenKey {
    key: SigningKey,
}

impl TokenKey {
    pub fn from_secret(secret: [u8; 32]) -> TokenKey {
        TokenKey {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// Reads a key file: the 32 secret bytes, raw or as 64 hex digits.
    pub fn load(path: &Path) -> Result<TokenKey, TokenError> {
        let bad = |reason: String| TokenError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let secret: [u8; 32] = match bytes.len() {
            32 => bytes.try_into().map_err(|_| bad("not 32 bytes".into()))?,
            _ => {
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| bad("neither 32 raw bytes nor 64 hex digits".into()))?
                    .trim();
                decode_hex_32(text)
                    .ok_or_else(|| bad("neither 32 raw bytes nor 64 hex digits".into()))?
            }
        };
        Ok(TokenKey::from_secret(secret))
    }

    /// The key's id: the first four bytes of its public key.
    pub fn key_id(&self) -> u32 {
        key_id(&self.key.verifying_key())
    }

    /// The verifier for tokens this key signs.
    pub fn verifier(&self, cell: &str) -> TokenVerifier {
        TokenVerifier::new(cell, vec![self.key.verifying_key()])
    }

    /// Signs `body` (its `key_id` is set to this key's).
    pub fn seal(&self, mut body: TokenBody) -> SealedToken {
        body.key_id = self.key_id();
        let mut bytes = postcard::to_allocvec(&body).expect("a token body always encodes");
        let signature = self.key.sign(&bytes);
        bytes.extend_from_slice(&signature.to_bytes());
        SealedToken(bytes)
    }
}

fn key_id(key: &VerifyingKey) -> u32 {
    let bytes = key.to_bytes();
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn decode_hex_32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Checks tokens with the cell's public keys, no call to the VLDB: what every server
/// holds.
#[derive(Clone)]
pub struct TokenVerifier {
    cell: String,
    keys: Arc<Vec<VerifyingKey>>,
}

impl TokenVerifier {
    pub fn new(cell: &str, keys: Vec<VerifyingKey>) -> TokenVerifier {
        TokenVerifier {
            cell: cell.to_owned(),
            keys: Arc::new(keys),
        }
    }

    /// The verifier for the key in a token key file.
    pub fn load(cell: &str, key_file: &Path) -> Result<TokenVerifier, TokenError> {
        Ok(TokenKey::load(key_file)?.verifier(cell))
    }

    /// The token's body if it is this cell's, signed by one of its keys and unexpired
    /// at `now`.
    pub fn verify(&self, token: &SealedToken, now: Timestamp) -> Result<TokenBody, TokenError> {
        let (body_bytes, signature) = token.split()?;
        let body: TokenBody =
            postcard::from_bytes(body_bytes).map_err(|_| TokenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|key| key_id(key) == body.key_id)
            .ok_or_else(|| TokenError::UnknownKey {
                user: body.user.clone(),
                key_id: body.key_id,
            })?;
        let signature = Signature::from_slice(signature).map_err(|_| TokenError::BadSignature)?;
        key.verify_strict(body_bytes, &signature)
            .map_err(|_| TokenError::BadSignature)?;
        if body.cell != self.cell {
            return Err(TokenError::WrongCell { cell: body.cell });
        }
        if body.groups.len() > TOKEN_GROUPS_MAX {
            return Err(TokenError::Malformed);
        }
        if body.expiry <= now {
            return Err(TokenError::Expired {
                user: body.user,
                expiry: body.expiry.secs,
            });
        }
        Ok(body)
    }
}

/// Whom a server acts for on one request: the token's user, or nobody in particular.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The token's user; `None` acts as `PrincipalId::ANONYMOUS`.
    pub user: Option<String>,
    pub id: PrincipalId,
    /// The current protection set: the id, its groups, `system:authuser` (with a token)
    /// and `system:anyuser`.
    pub cps: Vec<PrincipalId>,
    /// The peer showed a server certificate of this cell (server-to-server calls).
    pub server: bool,
}

impl Identity {
    /// A request without a token.
    pub fn anonymous() -> Identity {
        Identity {
            user: None,
            id: PrincipalId::ANONYMOUS,
            cps: vec![PrincipalId::ANYUSER],
            server: false,
        }
    }

    /// The identity a verified token gives.
    pub fn from_token(body: &TokenBody) -> Identity {
        let mut cps = Vec::with_capacity(body.groups.len() + 3);
        cps.push(body.id);
        cps.extend(body.groups.iter().copied().filter(|g| g.is_group()));
        cps.push(PrincipalId::AUTHUSER);
        cps.push(PrincipalId::ANYUSER);
        cps.sort();
        cps.dedup();
        Identity {
            user: Some(body.user.clone()),
            id: body.id,
            cps,
            server: false,
        }
    }

    pub fn is_administrator(&self) -> bool {
        self.cps.contains(&PrincipalId::ADMINISTRATORS)
    }

    /// Administrators and servers may change the cell.
    pub fn may_administer_cell(&self) -> bool {
        self.server || self.is_administrator()
    }

    /// The name for a log line.
    pub fn name(&self) -> &str {
        self.user.as_deref().unwrap_or("system:anyuser")
    }
}

/// The most tokens one connection's cache keeps verified.
const VERIFIED_PER_CONNECTION_MAX: usize = 64;

/// Tokens one connection has shown and had verified, so a token is checked once per
/// connection, not once per request; a token is looked up by all of its bytes and its
/// expiry is checked on every use.
#[derive(Default)]
pub struct VerifiedTokens {
    verified: Mutex<HashMap<SealedToken, (Arc<Identity>, Timestamp)>>,
}

impl VerifiedTokens {
    /// The identity `token` gives, verifying it the first time this connection shows it.
    pub fn identity(
        &self,
        verifier: &TokenVerifier,
        token: &SealedToken,
        now: Timestamp,
    ) -> Result<Arc<Identity>, TokenError> {
        if let Some((identity, expiry)) = self.verified.lock().get(token)
            && *expiry > now
        {
            return Ok(identity.clone());
        }
        let body = verifier.verify(token, now)?;
        let identity = Arc::new(Identity::from_token(&body));
        let mut verified = self.verified.lock();
        if verified.len() >= VERIFIED_PER_CONNECTION_MAX {
            verified.clear();
        }
        verified.insert(token.clone(), (identity.clone(), body.expiry));
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(expiry_secs: i64) -> TokenBody {
        TokenBody {
            cell: "test.cell".into(),
            user: "alice".into(),
            id: PrincipalId(1001),
            groups: vec![PrincipalId(-300)],
            issued: Timestamp { secs: 0, nanos: 0 },
            expiry: Timestamp {
                secs: expiry_secs,
                nanos: 0,
            },
            key_id: 0,
        }
    }

    const NOW: Timestamp = Timestamp {
        secs: 1000,
        nanos: 0,
    };

    #[test]
    fn a_sealed_token_verifies_and_gives_its_user_and_groups() {
        let key = TokenKey::from_secret([7; 32]);
        let token = key.seal(body(2000));
        let verified = key.verifier("test.cell").verify(&token, NOW).unwrap();
        assert_eq!(verified.user, "alice");
        assert_eq!(verified.key_id, key.key_id());
        let identity = Identity::from_token(&verified);
        assert_eq!(
            identity.cps,
            vec![
                PrincipalId(-300),
                PrincipalId::AUTHUSER,
                PrincipalId::ANYUSER,
                PrincipalId(1001)
            ]
        );
    }

    #[test]
    fn forged_tampered_expired_and_foreign_tokens_are_refused() {
        let key = TokenKey::from_secret([7; 32]);
        let verifier = key.verifier("test.cell");
        let other = TokenKey::from_secret([8; 32]);
        assert!(matches!(
            verifier.verify(&other.seal(body(2000)), NOW),
            Err(TokenError::UnknownKey { .. })
        ));
        // Another key that claims this key's id.
        let mut forged = other.seal(body(2000));
        let mut claimed = body(2000);
        claimed.key_id = key.key_id();
        let claimed_bytes = postcard::to_allocvec(&claimed).unwrap();
        let signature = forged.0.split_off(forged.0.len() - 64);
        let forged = SealedToken([claimed_bytes, signature].concat());
        assert_eq!(verifier.verify(&forged, NOW), Err(TokenError::BadSignature));
        let mut tampered = key.seal(body(2000));
        // The user's name is the body's second field: change one of its letters.
        let at = tampered.0.iter().position(|&b| b == b'a').unwrap();
        tampered.0[at] = b'b';
        assert!(verifier.verify(&tampered, NOW).is_err());
        assert!(matches!(
            verifier.verify(&key.seal(body(1000)), NOW),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            key.verifier("other.cell")
                .verify(&key.seal(body(2000)), NOW),
            Err(TokenError::WrongCell { .. })
        ));
        assert_eq!(
            verifier.verify(&SealedToken(vec![1, 2, 3]), NOW),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn a_connection_verifies_a_token_once_and_rechecks_its_expiry() {
        let key = TokenKey::from_secret([7; 32]);
        let verifier = key.verifier("test.cell");
        let tokens = VerifiedTokens::default();
        let token = key.seal(body(2000));
        let first = tokens.identity(&verifier, &token, NOW).unwrap();
        let again = tokens.identity(&verifier, &token, NOW).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let later = Timestamp {
            secs: 2000,
            nanos: 0,
        };
        assert!(matches!(
            tokens.identity(&verifier, &token, later),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn negative_entries_win_and_administrators_always_look_up_and_administer() {
        let mut acl = AccessList::default();
        acl.set(PrincipalId::ANYUSER, Rights::parse("rl").unwrap(), false);
        acl.set(PrincipalId(1001), Rights::parse("write").unwrap(), false);
        acl.set(PrincipalId(-300), Rights::parse("d").unwrap(), true);
        let alice = [PrincipalId(1001), PrincipalId(-300), PrincipalId::ANYUSER];
        assert_eq!(acl.rights_for(&alice).to_string(), "rliwk");
        assert_eq!(acl.rights_for(&[PrincipalId::ANYUSER]).to_string(), "rl");
        let admin = [PrincipalId::ADMINISTRATORS, PrincipalId::ANYUSER];
        assert_eq!(acl.rights_for(&admin).to_string(), "rla");
        acl.set(PrincipalId(1001), Rights::NONE, false);
        assert_eq!(acl.len(), 2);
        assert!(Rights::parse("rx").is_err());
        assert_eq!(Rights::parse("all").unwrap(), Rights::ALL);
    }

    #[test]
    fn a_key_file_holds_raw_bytes_or_hex() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [9u8; 32]).unwrap();
        let hex = dir.path().join("hex");
        std::fs::write(&hex, format!("{}\n", "09".repeat(32))).unwrap();
        let a = TokenKey::load(&raw).unwrap();
        let b = TokenKey::load(&hex).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "short").unwrap();
        assert!(matches!(
            TokenKey::load(&bad),
            Err(TokenError::KeyFile { .. })
        ));
    }
}
