//! `holdfast login`: a password, from a file, the terminal (without echo) or standard
//! input, turned into a token by the VLDB; and the passwords `pts` sends.
//! Invariant: a password read from the terminal is read with echo off, and the
//! terminal's settings are put back before the read returns, also on failure.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::{
    CellConfig, ErrorCode, Password, PeerKind, ProtoError, Request, Response, SealedToken,
    VldbClient,
};

/// Asks the VLDB of `cell` for a token for `user` with `password`, living `lifetime`
/// (the VLDB's maximum, 25 hours by default, if none). The token is returned, for the
/// caller to store or hand to a cache manager.
pub async fn login(
    cell: &CellConfig,
    user: &str,
    password: Password,
    lifetime: Option<Duration>,
    timeout: Duration,
) -> Result<SealedToken> {
    // Through a mount of the cell on this host, first: its cache manager holds the
    // host's certificate (an ordinary user may not read it) and keeps the token for the
    // caller's uid.
    let lifetime_secs = lifetime.map(|l| l.as_secs());
    let mut refused = None;
    for (mount_point, socket) in crate::tokens::mounts() {
        match cachemgr::control::login(&socket, &cell.name, user, password.clone(), lifetime_secs) {
            Ok(token) => return Ok(token),
            Err(cachemgr::CacheError::Refused(message)) if message.starts_with("this mount") => {}
            // Asked the next mount all the same: one of another cell that bears the same
            // name (two test cells on one host) refuses a user only this cell knows.
            Err(cachemgr::CacheError::Refused(message)) => {
                refused.get_or_insert(message);
            }
            Err(e) => tracing::debug!(mount = %mount_point.display(), error = %e,
                "cannot log in through this mount"),
        }
    }
    if let Some(message) = refused {
        bail!("{message}");
    }
    let transport = proto::Transport::for_cell(cell, proto::PeerClass::Host).context(
        "no mount of the cell on this host to log in through, and this host's certificate \
         cannot be used",
    )?;
    let client = VldbClient::new(cell.clone(), transport, PeerKind::Admin, timeout);
    let request = Request::Login {
        user: user.to_owned(),
        password,
        lifetime_secs,
    };
    match client.call(request).await {
        Ok(Response::Token(token)) => Ok(token),
        Ok(other) => Err(proto::vldb_client::unexpected(&other).into()),
        Err(ProtoError::Remote(ErrorCode::PermissionDenied)) => {
            bail!("unknown user or wrong password")
        }
        Err(e) => Err(vldb_error(cell, e)),
    }
}

/// A VLDB failure as one line: what the VLDB said, or that it could not be reached.
pub fn vldb_error(cell: &CellConfig, error: ProtoError) -> anyhow::Error {
    match error {
        ProtoError::Remote(code) => anyhow::anyhow!("{code}"),
        other => anyhow::anyhow!(
            "cannot reach the VLDB at {}: {other}; is `holdfast vlserver` running?",
            cell.vlservers.join(", ")
        ),
    }
}

/// A password: the first line of `file`, else typed at the terminal without echo (twice
/// when `confirm`), else the first line of standard input.
pub fn read_password(file: Option<&Path>, prompt: &str, confirm: bool) -> Result<Password> {
    let password = match file {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("read the password file {}", file.display()))?;
            first_line(&text).to_owned()
        }
        None if std::io::stdin().is_terminal() => {
            let first = read_without_echo(prompt)?;
            if confirm && read_without_echo("Again: ")? != first {
                bail!("the two passwords differ: nothing was changed");
            }
            first
        }
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("read the password from standard input")?;
            first_line(&line).to_owned()
        }
    };
    if password.is_empty() {
        bail!("the password is empty: give one (a file with --password-file, or type it)");
    }
    Ok(Password(password))
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

/// Reads one line from the terminal on standard input with echo turned off.
fn read_without_echo(prompt: &str) -> Result<String> {
    let mut stderr = std::io::stderr();
    let _ = write!(stderr, "{prompt}");
    let _ = stderr.flush();
    // SAFETY: tcgetattr fills the termios we own; fd 0 is a terminal (checked).
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error()).context("read the terminal's settings");
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: as above, with settings derived from the terminal's own.
    if unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) } != 0 {
        return Err(std::io::Error::last_os_error()).context("turn the terminal's echo off");
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    // SAFETY: restoring the settings read above.
    unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
    read.context("read the password from the terminal")?;
    Ok(first_line(&line).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_gives_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        assert_eq!(read_password(Some(&file), "", false).unwrap().0, "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_password(Some(&file), "", false).is_err());
    }
}
