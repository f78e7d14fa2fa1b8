//! `Logins`: passwords hashed with argon2id and checked against them, and tokens sealed
//! with the cell's key for users who gave the right one.
//! Invariant: no more than `HASHES_AT_ONCE` hashes run at once, a failed login is
//! answered no sooner than `FAILURE_DELAY` after it came, whether the user exists or
//! not, and the WARN lines about failures are at most one per `WARN_INTERVAL`.

use std::sync::OnceLock;
use std::time::Duration;

use argon2::password_hash::SaltString;
use argon2::password_hash::rand_core::OsRng;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use parking_lot::Mutex;
use proto::{ErrorCode, PrincipalId, SealedToken, Timestamp, TokenBody, TokenKey};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::warn;

use crate::error::VldbError;
use crate::pts::Credentials;

/// Hashes computed at once: each takes argon2's memory (19 MiB) and a core for tens of
/// milliseconds, so a flood of logins waits here instead of exhausting the machine.
const HASHES_AT_ONCE: usize = 2;
/// How long after it came a failed login is answered: a guesser gets a few tries a
/// second per connection, and cannot tell an unknown user from a wrong password.
pub const FAILURE_DELAY: Duration = Duration::from_millis(500);
/// At most one WARN line about failed logins per this interval, counting those left out.
const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// The shortest lifetime a token may be asked for.
const LIFETIME_MIN: Duration = Duration::from_secs(60);

/// The VLDB's logins: its token key, and the bounds on the work a peer can ask of it.
pub struct Logins {
    /// None: a VLDB started without `--token-key`, which issues no token (and, for now,
    /// lets anyone change the cell).
    key: Option<TokenKey>,
    cell: String,
    lifetime_max: Duration,
    hashing: Semaphore,
    /// A hash of nothing in particular, checked for an unknown user so that it costs
    /// what a known one does.
    dummy: OnceLock<String>,
    warnings: Mutex<FailureWarnings>,
}

#[derive(Default)]
struct FailureWarnings {
    logged_at: Option<Instant>,
    suppressed: u64,
}

impl Logins {
    pub fn new(key: Option<TokenKey>, cell: String, lifetime_max: Duration) -> Logins {
        Logins {
            key,
            cell,
            lifetime_max,
            hashing: Semaphore::new(HASHES_AT_ONCE),
            dummy: OnceLock::new(),
            warnings: Mutex::new(FailureWarnings::default()),
        }
    }

    /// The verifier for the tokens this VLDB issues, if it has a key.
    pub fn verifier(&self) -> Option<proto::TokenVerifier> {
        self.key.as_ref().map(|key| key.verifier(&self.cell))
    }

    /// An argon2id PHC string of `password` with a new random salt.
    pub async fn hash(&self, password: String) -> Result<String, ErrorCode> {
        crate::pts::check_password(&password).map_err(|e| e.code())?;
        let _permit = self.hashing.acquire().await.map_err(|_| shutting_down())?;
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| VldbError::Task(e.to_string()).code())?
            .map_err(|e| e.code())
    }

    /// A token for `user` if `password` is its password (`credentials` as the tables
    /// had them, `None` for no such user), valid for `lifetime` capped at the maximum.
    /// Any failure is `PermissionDenied`, answered `FAILURE_DELAY` after `started`.
    pub async fn login(
        &self,
        user: &str,
        password: String,
        credentials: Option<Credentials>,
        lifetime: Option<Duration>,
        peer: std::net::SocketAddr,
        started: Instant,
    ) -> Result<SealedToken, ErrorCode> {
        let Some(key) = &self.key else {
            return Err(ErrorCode::PtsRefused {
                reason: "this VLDB issues no tokens: start every vlserver with --token-key FILE \
                         (the cell's token.key)"
                    .into(),
            });
        };
        if credentials
            .as_ref()
            .is_some_and(|c| c.groups.len() > proto::identity::TOKEN_GROUPS_MAX)
        {
            return Err(ErrorCode::PtsRefused {
                reason: format!(
                    "{user} is in more groups than a token carries ({}): remove some",
                    proto::identity::TOKEN_GROUPS_MAX
                ),
            });
        }
        let lifetime = lifetime.unwrap_or(self.lifetime_max);
        if lifetime < LIFETIME_MIN {
            return Err(ErrorCode::PtsRefused {
                reason: format!("a token lives at least {} seconds", LIFETIME_MIN.as_secs()),
            });
        }
        let lifetime = lifetime.min(self.lifetime_max);
        let stored = credentials.as_ref().and_then(|c| c.password.clone());
        let dummy = match &stored {
            Some(_) => None,
            None => Some(self.dummy_hash().await?),
        };
        let against = stored.or(dummy).unwrap_or_default();
        // A password no user can have is checked as a wrong one, at the same cost.
        let password = if crate::pts::check_password(&password).is_ok() {
            password
        } else {
            String::new()
        };
        let right = {
            let _permit = self.hashing.acquire().await.map_err(|_| shutting_down())?;
            tokio::task::spawn_blocking(move || verify_password(&against, &password))
                .await
                .unwrap_or(false)
        };
        let credentials = match credentials {
            Some(credentials) if right && credentials.password.is_some() => credentials,
            _ => {
                self.warn_failure(user, peer);
                tokio::time::sleep_until(started + FAILURE_DELAY).await;
                return Err(ErrorCode::PermissionDenied);
            }
        };
        let issued = Timestamp::now();
        let expiry = Timestamp {
            secs: issued
                .secs
                .saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
            nanos: issued.nanos,
        };
        Ok(key.seal(TokenBody {
            cell: self.cell.clone(),
            user: user.to_owned(),
            id: credentials.id,
            groups: credentials.groups,
            issued,
            expiry,
            key_id: 0,
        }))
    }

    async fn dummy_hash(&self) -> Result<String, ErrorCode> {
        if let Some(hash) = self.dummy.get() {
            return Ok(hash.clone());
        }
        let hash = self.hash("no such user".to_owned()).await?;
        // Two first failures may both get here: either hash serves.
        Ok(self.dummy.get_or_init(|| hash).clone())
    }

    fn warn_failure(&self, user: &str, peer: std::net::SocketAddr) {
        let now = Instant::now();
        let mut warnings = self.warnings.lock();
        let due = warnings
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL);
        if !due {
            warnings.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut warnings.suppressed);
        warnings.logged_at = Some(now);
        drop(warnings);
        let user: String = user
            .chars()
            .take(crate::pts::PRINCIPAL_NAME_BYTES_MAX)
            .collect();
        warn!(user, %peer, suppressed, "login refused: unknown user or wrong password");
    }
}

fn shutting_down() -> ErrorCode {
    ErrorCode::Internal("the VLDB is shutting down".into())
}

fn hash_password(password: &str) -> Result<String, VldbError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| VldbError::Task(format!("cannot hash a password: {e}")))
}

/// Whether `password` matches the PHC string `hash` (argon2 compares in constant time).
fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// The identity `--localauth` signs for itself: `localauth`, id 0 (no user of the
/// protection database has it), in `system:administrators`.
pub fn localauth_body(cell: &str, lifetime: Duration) -> TokenBody {
    let issued = Timestamp::now();
    TokenBody {
        cell: cell.to_owned(),
        user: LOCALAUTH_USER.to_owned(),
        id: LOCALAUTH_ID,
        groups: vec![PrincipalId::ADMINISTRATORS],
        issued,
        expiry: Timestamp {
            secs: issued
                .secs
                .saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
            nanos: issued.nanos,
        },
        key_id: 0,
    }
}

/// The user name of a `--localauth` token.
pub const LOCALAUTH_USER: &str = "localauth";
/// The id of a `--localauth` token: 0, which the protection database never allocates.
pub const LOCALAUTH_ID: PrincipalId = PrincipalId(0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_is_an_argon2id_phc_string_that_verifies_only_its_password() {
        let hash = hash_password("secret").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
        assert!(verify_password(&hash, "secret"));
        assert!(!verify_password(&hash, "secreT"));
        assert!(!verify_password("not a hash", "secret"));
        assert_ne!(
            hash,
            hash_password("secret").unwrap(),
            "a new salt each time"
        );
    }
}
