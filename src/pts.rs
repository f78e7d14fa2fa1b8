//! `holdfast pts`: users and groups in the VLDB's protection database, as AFS's `pts`.
//! Invariant: each subcommand is one VLDB request, and prints only once it was answered.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use proto::{PrincipalId, PtsEntry, Request, Response, VldbClient};

use crate::login::{read_password, vldb_error};

#[derive(Subcommand)]
pub enum PtsCommand {
    /// Create a user (administrators only): NAME of a-z 0-9 . _ -, at most 64 characters.
    Createuser {
        name: String,
        /// The user's id (positive; default: the next free one).
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        id: Option<i32>,
        /// Give the user the password on this file's first line (without it the user
        /// cannot log in until `pts setpassword`).
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Set a user's password: your own (with your token) or, as an administrator, anyone's.
    ///
    /// The password is the first line of --password-file, else typed at the terminal
    /// (twice, without echo), else the first line of standard input.
    Setpassword {
        user: String,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Create a group (administrators only): NAME, or OWNER:NAME for one owned by a user.
    Creategroup {
        name: String,
        /// The group's id (-205 or lower; default: the next free one).
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        id: Option<i32>,
    },
    /// Add USER to GROUP (administrators only).
    Adduser { user: String, group: String },
    /// Remove USER from GROUP (administrators only).
    Removeuser { user: String, group: String },
    /// Delete a user or a group, with its memberships (administrators only).
    Delete { name: String },
    /// List the groups a user is in, or a group's members.
    Membership { name: String },
    /// List every user and group, the built-in groups first.
    Listentries,
}

/// Runs one `pts` subcommand with `client` (which carries the caller's token); returns
/// what to print.
pub async fn run(client: &VldbClient, command: PtsCommand) -> Result<String> {
    let (what, request) = match command {
        PtsCommand::Createuser {
            name,
            id,
            password_file,
        } => {
            let password = password_file
                .map(|file| read_password(Some(&file), "", false))
                .transpose()?;
            let request = Request::PtsCreateUser {
                name: name.clone(),
                id: id.map(PrincipalId),
                password,
            };
            (format!("createuser {name}"), request)
        }
        PtsCommand::Setpassword {
            user,
            password_file,
        } => {
            let prompt = format!("New password for {user}: ");
            let password = read_password(password_file.as_deref(), &prompt, true)?;
            let request = Request::PtsSetPassword {
                user: user.clone(),
                password,
            };
            (format!("setpassword {user}"), request)
        }
        PtsCommand::Creategroup { name, id } => {
            let request = Request::PtsCreateGroup {
                name: name.clone(),
                id: id.map(PrincipalId),
            };
            (format!("creategroup {name}"), request)
        }
        PtsCommand::Adduser { user, group } => (
            format!("adduser {user} {group}"),
            Request::PtsAddUser { user, group },
        ),
        PtsCommand::Removeuser { user, group } => (
            format!("removeuser {user} {group}"),
            Request::PtsRemoveUser { user, group },
        ),
        PtsCommand::Delete { name } => (format!("delete {name}"), Request::PtsDelete { name }),
        PtsCommand::Membership { name } => (
            format!("membership {name}"),
            Request::PtsMembership { name },
        ),
        PtsCommand::Listentries => ("listentries".to_owned(), Request::PtsListEntries),
    };
    let header = match &request {
        Request::PtsMembership { name } => Some(name.clone()),
        _ => None,
    };
    let response = client
        .call(request)
        .await
        .map_err(|e| vldb_error(client.cell(), e).context(format!("pts {what}")))?;
    Ok(match response {
        Response::PtsEntry(entry) => {
            let kind = if entry.id.is_group() { "Group" } else { "User" };
            format!("{kind} {} has id {}\n", entry.name, entry.id)
        }
        Response::PtsEntries(entries) => match header {
            Some(name) => render_membership(&name, &entries),
            None => render_entries(&entries),
        },
        _ => String::new(),
    })
}

fn render_membership(name: &str, entries: &[PtsEntry]) -> String {
    let mut text = String::new();
    for entry in entries {
        text.push_str(&format!("  {}\n", entry.name));
    }
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    // A user's groups are groups; a group's members are users.
    let of_a_group = entries.first().is_some_and(|e| !e.id.is_group());
    let header = if of_a_group {
        format!("Members of {name}:\n")
    } else {
        format!("Groups {name} is a member of:\n")
    };
    if names.is_empty() {
        return format!("{name} has no memberships\n");
    }
    header + &text
}

fn render_entries(entries: &[PtsEntry]) -> String {
    let name_of = |id: PrincipalId| {
        entries
            .iter()
            .find(|e| e.id == id)
            .map_or_else(|| id.to_string(), |e| e.name.clone())
    };
    let mut text = format!("{:<40} {:>11}  {}\n", "Name", "ID", "Owner");
    for entry in entries {
        text.push_str(&format!(
            "{:<40} {:>11}  {}\n",
            entry.name,
            entry.id.0,
            name_of(entry.owner)
        ));
    }
    text
}
