//! `holdfast vldb`: the VLDB's replicas as each describes itself, and membership changes
//! sent to the leader.
//! Invariant: `status` asks every replica on its own connection and follows no leader;
//! `add` and `remove` go to the leader, and a change is never sent twice from here.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use proto::{
    CellConfig, ErrorCode, PeerKind, ProtoError, VldbClient, VldbMember, VldbMemberStatus, VldbRole,
};
use serde::Serialize;

#[derive(Subcommand)]
pub enum VldbCommand {
    /// Show each VLDB replica's id, role, term, log and applied index, and its leader.
    ///
    /// Asks every address of the cell file, and every further member a replica names,
    /// each on its own connection and at the same time. A replica that does not answer
    /// gets a row saying why. The last line names the leader. Exits 0 when at least one
    /// replica answered.
    Status {
        /// Print a JSON array, one object per replica, for tools.
        #[arg(long)]
        json: bool,
    },
    /// Add replica ID, serving at ADDR, to the VLDB's group.
    ///
    /// Adds the replica as a learner, waits for it to catch up, then makes it a voter.
    /// Start it first, with an empty --data: `holdfast vlserver --id ID --listen ADDR
    /// --peers` listing the group's replicas and itself (so that it waits to be
    /// contacted rather than bootstrap a group of its own). A large log takes
    /// time to copy: raise --timeout for it. If the timeout passes first, the change may
    /// still complete; `holdfast vldb status` tells.
    Add {
        /// The new replica's id, unused in the group.
        id: u64,
        /// Where it serves (HOST:PORT), as the other replicas should reach it.
        address: String,
    },
    /// Remove replica ID from the VLDB's group.
    ///
    /// Removes a voter by joint consensus; removing the leader makes another one lead.
    /// Stop the replica's `holdfast vlserver` afterwards.
    Remove {
        /// The id of the replica to remove.
        id: u64,
    },
}

/// Runs one `holdfast vldb` subcommand; `timeout` bounds each call to the VLDB.
pub fn run(
    cell_path: Option<&Path>,
    command: VldbCommand,
    timeout: Duration,
    auth: &crate::tokens::AuthFlags,
) -> Result<()> {
    crate::process::init_tracing("warn");
    let cell = CellConfig::locate(cell_path).context("find the cell")?;
    let token = crate::tokens::for_command(cell_path, &cell, auth)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let transport = proto::Transport::for_cell(&cell, proto::PeerClass::Host)?;
    let client = Arc::new(
        VldbClient::new(cell.clone(), transport, PeerKind::Admin, timeout).with_token(token),
    );
    runtime.block_on(async {
        match command {
            VldbCommand::Status { json } => {
                let report = StatusReport::new(ask_every_replica(&client, &cell).await);
                if json {
                    let text =
                        serde_json::to_string_pretty(&report.rows).context("encode the status")?;
                    println!("{text}");
                } else {
                    print!("{}", report.render_text());
                }
                if report.answered().next().is_none() {
                    return Err(anyhow!(
                        "no VLDB replica gave its status ({} asked); is `holdfast vlserver` \
                         running, with --id and --peers?",
                        report.rows.len()
                    ))
                    .context("vldb status");
                }
                Ok(())
            }
            VldbCommand::Add { id, address } => {
                check_address(&address).with_context(|| format!("add replica {id}"))?;
                client
                    .add_member(id, &address)
                    .await
                    .map_err(|e| explain(e, &cell, timeout))
                    .with_context(|| format!("add replica {id} at {address}"))?;
                println!("replica {id} at {address} added: it is a voter now");
                print_members(&client).await;
                Ok(())
            }
            VldbCommand::Remove { id } => {
                client
                    .remove_member(id)
                    .await
                    .map_err(|e| explain(e, &cell, timeout))
                    .with_context(|| format!("remove replica {id}"))?;
                println!("replica {id} removed from the voters");
                print_members(&client).await;
                Ok(())
            }
        }
    })
}

/// What one address said when asked for its status: the status, or why there is none.
#[derive(Clone, Debug)]
pub struct ReplicaAnswer {
    pub address: String,
    pub status: Result<VldbMemberStatus, NoStatus>,
}

/// Why an address gave no status.
#[derive(Clone, Debug)]
pub enum NoStatus {
    /// Nothing answered: the cause.
    Unreachable(String),
    /// The replica answered with an error (a vlserver that is not replicated answers
    /// `Unsupported`).
    Refused(String),
}

impl From<ProtoError> for NoStatus {
    fn from(error: ProtoError) -> NoStatus {
        match error {
            ProtoError::Remote(code) => NoStatus::Refused(code.to_string()),
            other => NoStatus::Unreachable(other.to_string()),
        }
    }
}

/// Asks the cell's addresses, then the further members the answers name, until no
/// address is left unasked. Each round asks its addresses at once.
async fn ask_every_replica(client: &Arc<VldbClient>, cell: &CellConfig) -> Vec<ReplicaAnswer> {
    let mut answers: Vec<ReplicaAnswer> = Vec::new();
    let mut asked: Vec<String> = Vec::new();
    let mut round: Vec<String> = Vec::new();
    for address in &cell.vlservers {
        if !round.contains(address) {
            round.push(address.clone());
        }
    }
    while !round.is_empty() {
        let calls: Vec<_> = round
            .iter()
            .map(|address| {
                let (client, address) = (client.clone(), address.clone());
                tokio::spawn(async move { client.replica_status(&address).await })
            })
            .collect();
        let mut answered = Vec::with_capacity(round.len());
        for (address, call) in round.iter().zip(calls) {
            let status = match call.await {
                Ok(status) => status.map_err(NoStatus::from),
                // Only a bug panics there; its row says so rather than the command abort.
                Err(e) => Err(NoStatus::Unreachable(e.to_string())),
            };
            answered.push(ReplicaAnswer {
                address: address.clone(),
                status,
            });
        }
        asked.append(&mut round);
        for answer in answered {
            if let Ok(status) = &answer.status {
                for member in &status.members {
                    if !asked.contains(&member.address) && !round.contains(&member.address) {
                        round.push(member.address.clone());
                    }
                }
            }
            answers.push(answer);
        }
    }
    answers
}

/// One row of `holdfast vldb status`, as text and as a JSON object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusRow {
    /// The address asked.
    pub address: String,
    pub id: Option<u64>,
    pub role: Option<&'static str>,
    pub term: Option<u64>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub leader_id: Option<u64>,
    pub leader_address: Option<String>,
    /// Why nothing answered at this address.
    pub unreachable: Option<String>,
    /// The error the replica answered instead of its status.
    pub refused: Option<String>,
}

/// Every replica's row, and the leader they point to.
#[derive(Debug)]
pub struct StatusReport {
    pub rows: Vec<StatusRow>,
}

impl StatusReport {
    /// One row per answer, except a second answer from a replica id already shown (one
    /// replica named by two spellings of its address).
    pub fn new(answers: Vec<ReplicaAnswer>) -> StatusReport {
        let mut rows: Vec<StatusRow> = Vec::new();
        for answer in answers {
            let row = match answer.status {
                Ok(status) => {
                    if rows.iter().any(|row| row.id == Some(status.id)) {
                        continue;
                    }
                    let (leader_id, leader_address) = status.leader.unzip();
                    StatusRow {
                        address: answer.address,
                        id: Some(status.id),
                        role: Some(role_label(status.role)),
                        term: Some(status.term),
                        last_log_index: status.last_log_index,
                        applied_index: status.applied_index,
                        leader_id,
                        leader_address,
                        unreachable: None,
                        refused: None,
                    }
                }
                Err(no_status) => {
                    let (unreachable, refused) = match no_status {
                        NoStatus::Unreachable(cause) => (Some(cause), None),
                        NoStatus::Refused(code) => (None, Some(code)),
                    };
                    StatusRow {
                        address: answer.address,
                        id: None,
                        role: None,
                        term: None,
                        last_log_index: None,
                        applied_index: None,
                        leader_id: None,
                        leader_address: None,
                        unreachable,
                        refused,
                    }
                }
            };
            rows.push(row);
        }
        StatusReport { rows }
    }

    /// The rows of the replicas that gave their status.
    fn answered(&self) -> impl Iterator<Item = &StatusRow> {
        self.rows.iter().filter(|r| r.id.is_some())
    }

    /// The last line: the leader (one that says it leads, in the highest term, else the
    /// one named by the replica of the highest term), or why there is none.
    pub fn leader_line(&self) -> String {
        let answered: Vec<&StatusRow> = self.answered().collect();
        if answered.is_empty() {
            return "no leader: no replica gave its status".into();
        }
        let leading = answered
            .iter()
            .filter(|r| r.role == Some(role_label(VldbRole::Leader)))
            .max_by_key(|r| r.term);
        if let Some(row) = leading {
            return format!(
                "leader: replica {} at {}, term {}",
                show(row.id),
                row.address,
                show(row.term)
            );
        }
        let named = answered
            .iter()
            .filter(|r| r.leader_id.is_some())
            .max_by_key(|r| r.term);
        match named {
            Some(row) => format!(
                "leader: replica {} at {}, term {} (named by replica {}; it did not answer)",
                show(row.leader_id),
                row.leader_address.as_deref().unwrap_or("?"),
                show(row.term),
                show(row.id)
            ),
            None => format!(
                "no leader: none of the {} replica(s) that answered knows one; an election may \
                 be under way, or too few voters are up to elect one",
                answered.len()
            ),
        }
    }

    /// A table, one row per replica, then the leader line.
    pub fn render_text(&self) -> String {
        const HEADER: [&str; 7] = ["ID", "ADDRESS", "ROLE", "TERM", "LOG", "APPLIED", "LEADER"];
        let mut lines: Vec<Vec<String>> = vec![HEADER.iter().map(|h| h.to_string()).collect()];
        for row in &self.rows {
            let mut cells = vec![show(row.id), row.address.clone()];
            match (&row.unreachable, &row.refused) {
                (Some(cause), _) => cells.push(format!("unreachable: {cause}")),
                (None, Some(code)) => cells.push(format!("refused: {code}")),
                (None, None) => {
                    let leader = match (row.leader_id, &row.leader_address) {
                        (Some(id), Some(address)) => format!("{id} {address}"),
                        _ => "none".into(),
                    };
                    cells.extend([
                        row.role.unwrap_or("-").to_owned(),
                        show(row.term),
                        show(row.last_log_index),
                        show(row.applied_index),
                        leader,
                    ]);
                }
            }
            lines.push(cells);
        }
        // A cause spans the columns after the address: it sets no width.
        let mut widths = [0usize; HEADER.len()];
        for cells in &lines {
            if cells.len() == HEADER.len() {
                for (width, cell) in widths.iter_mut().zip(cells) {
                    *width = (*width).max(cell.len());
                }
            } else {
                for (width, cell) in widths.iter_mut().zip(&cells[..2]) {
                    *width = (*width).max(cell.len());
                }
            }
        }
        let mut out = String::new();
        for cells in &lines {
            let last = cells.len() - 1;
            for (column, cell) in cells.iter().enumerate() {
                if column == last {
                    let _ = writeln!(out, "{cell}");
                } else {
                    let _ = write!(out, "{cell:<width$}  ", width = widths[column]);
                }
            }
        }
        out.push_str(&self.leader_line());
        out.push('\n');
        out
    }
}

fn role_label(role: VldbRole) -> &'static str {
    match role {
        VldbRole::Leader => "leader",
        VldbRole::Follower => "follower",
        VldbRole::Candidate => "candidate",
        VldbRole::Learner => "learner",
        VldbRole::Shutdown => "shutdown",
    }
}

fn show<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}

/// `HOST:PORT`, checked before anything is sent.
fn check_address(address: &str) -> Result<()> {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => bail!("ADDR {address:?} is not HOST:PORT"),
    }
}

/// A failed membership change, said in terms of what the admin can do about it.
fn explain(error: ProtoError, cell: &CellConfig, timeout: Duration) -> anyhow::Error {
    match &error {
        ProtoError::Remote(ErrorCode::NotLeader { leader: None }) => anyhow!(
            "no VLDB replica knows a leader: an election may be under way, or too few voters \
             are up to elect one; see `holdfast vldb status`"
        ),
        ProtoError::Remote(ErrorCode::NotLeader {
            leader: Some(leader),
        }) => anyhow!("the leader at {leader} did not take the change in time; try again"),
        ProtoError::Remote(ErrorCode::Unsupported) => {
            anyhow!("this VLDB does not change its membership (a vlserver without --id/--peers)")
        }
        ProtoError::Timeout(_) => anyhow!(
            "no answer within {timeout:?}; the change may still complete: see \
             `holdfast vldb status`, or raise --timeout"
        ),
        e if e.is_transport() => anyhow!(
            "cannot reach the VLDB at {}: {e}; is `holdfast vlserver` running?",
            cell.vlservers.join(", ")
        ),
        _ => anyhow::Error::new(error),
    }
}

/// The membership after a change, as the leader reports it; nothing when it does not
/// answer (the change itself is done).
async fn print_members(client: &VldbClient) {
    if let Ok(status) = client.status().await {
        println!("members: {}", members_text(&status.members));
    }
}

fn members_text(members: &[VldbMember]) -> String {
    let members: Vec<String> = members
        .iter()
        .map(|m| {
            let kind = if m.voter { "voter" } else { "learner" };
            format!("{} {} ({kind})", m.id, m.address)
        })
        .collect();
    members.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: u64, role: VldbRole, term: u64, leader: Option<u64>) -> VldbMemberStatus {
        VldbMemberStatus {
            id,
            address: format!("127.0.0.1:740{id}"),
            role,
            term,
            last_log_index: Some(42),
            applied_index: Some(41),
            leader: leader.map(|l| (l, format!("127.0.0.1:740{l}"))),
            members: Vec::new(),
        }
    }

    fn answer(id: u64, status: VldbMemberStatus) -> ReplicaAnswer {
        ReplicaAnswer {
            address: format!("127.0.0.1:740{id}"),
            status: Ok(status),
        }
    }

    fn unreachable(id: u64, cause: &str) -> ReplicaAnswer {
        ReplicaAnswer {
            address: format!("127.0.0.1:740{id}"),
            status: Err(NoStatus::Unreachable(cause.into())),
        }
    }

    #[test]
    fn text_shows_every_replica_and_the_leader() {
        let report = StatusReport::new(vec![
            answer(1, status(1, VldbRole::Leader, 3, Some(1))),
            answer(2, status(2, VldbRole::Follower, 3, Some(1))),
            unreachable(3, "i/o error: connection refused"),
            ReplicaAnswer {
                address: "127.0.0.1:7409".into(),
                status: Err(NoStatus::Refused(
                    "request not supported by this server".into(),
                )),
            },
        ]);
        assert_eq!(report.answered().count(), 2);
        assert_eq!(
            report.render_text(),
            "\
ID  ADDRESS         ROLE      TERM  LOG  APPLIED  LEADER
1   127.0.0.1:7401  leader    3     42   41       1 127.0.0.1:7401
2   127.0.0.1:7402  follower  3     42   41       1 127.0.0.1:7401
-   127.0.0.1:7403  unreachable: i/o error: connection refused
-   127.0.0.1:7409  refused: request not supported by this server
leader: replica 1 at 127.0.0.1:7401, term 3
"
        );
    }

    #[test]
    fn json_has_the_same_fields_with_nulls_for_an_unreachable_replica() {
        let report = StatusReport::new(vec![
            answer(2, status(2, VldbRole::Follower, 3, Some(1))),
            unreachable(3, "request timed out after 1s"),
        ]);
        let json = serde_json::to_value(&report.rows).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {
                    "address": "127.0.0.1:7402", "id": 2, "role": "follower", "term": 3,
                    "last_log_index": 42, "applied_index": 41, "leader_id": 1,
                    "leader_address": "127.0.0.1:7401", "unreachable": null, "refused": null
                },
                {
                    "address": "127.0.0.1:7403", "id": null, "role": null, "term": null,
                    "last_log_index": null, "applied_index": null, "leader_id": null,
                    "leader_address": null, "unreachable": "request timed out after 1s",
                    "refused": null
                }
            ])
        );
        assert_eq!(
            report.leader_line(),
            "leader: replica 1 at 127.0.0.1:7401, term 3 (named by replica 2; it did not answer)"
        );
    }

    #[test]
    fn no_leader_during_an_election_and_none_when_nobody_answers() {
        let electing = StatusReport::new(vec![
            answer(1, status(1, VldbRole::Candidate, 4, None)),
            answer(2, status(2, VldbRole::Follower, 3, None)),
        ]);
        assert!(
            electing
                .leader_line()
                .starts_with("no leader: none of the 2 replica(s) that answered knows one"),
            "{}",
            electing.leader_line()
        );

        let silent = StatusReport::new(vec![unreachable(1, "refused"), unreachable(2, "refused")]);
        assert_eq!(silent.answered().count(), 0);
        assert!(
            silent.render_text().ends_with(
                "-   127.0.0.1:7402  unreachable: refused\nno leader: no replica gave its status\n"
            ),
            "{}",
            silent.render_text()
        );
    }

    #[test]
    fn a_replica_asked_under_two_addresses_is_shown_once() {
        let mut again = answer(1, status(1, VldbRole::Leader, 3, Some(1)));
        again.address = "localhost:7401".into();
        let report = StatusReport::new(vec![
            answer(1, status(1, VldbRole::Leader, 3, Some(1))),
            again,
        ]);
        assert_eq!(report.rows.len(), 1);
    }

    /// Answers `VlStatus` with a fixed status, naming `members`.
    struct FakeReplica(VldbMemberStatus);

    impl proto::server::Service for FakeReplica {
        fn hello(&self, hello: &proto::Hello) -> Result<proto::HelloReply, ErrorCode> {
            Ok(proto::HelloReply {
                version: proto::rpc::negotiate(hello, "t.test")?,
                server: None,
            })
        }

        async fn handle(
            self: Arc<Self>,
            _connection: proto::rpc::Connection,
            _hello: Arc<proto::Hello>,
            _caller: Arc<proto::Identity>,
            request: proto::Request,
        ) -> Result<proto::Response, ErrorCode> {
            match request {
                proto::Request::VlStatus => Ok(proto::Response::VlStatus(self.0.clone())),
                _ => Err(ErrorCode::Unsupported),
            }
        }
    }

    #[tokio::test]
    async fn status_asks_the_members_a_replica_names_beyond_the_cell_file() {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut listeners = Vec::new();
        for _ in 0..2 {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addresses: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let members: Vec<VldbMember> = (0..2)
            .map(|i| VldbMember {
                id: i as u64 + 1,
                address: addresses[i].clone(),
                voter: true,
            })
            .collect();
        let authority = proto::tls::authority::CellAuthority::generate("t.test").unwrap();
        let mut servers = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let mut status = status(i as u64 + 1, VldbRole::Follower, 2, Some(1));
            status.address = addresses[i].clone();
            status.members = members.clone();
            servers.push(tokio::spawn(proto::server::serve(
                listener,
                Arc::new(FakeReplica(status)),
                proto::server::ServerLimits::default(),
                authority
                    .transport(proto::PeerClass::Server, "replica")
                    .unwrap(),
                stopped.clone(),
            )));
        }
        // The cell file lists the first replica only.
        let cell = CellConfig {
            name: "t.test".into(),
            vlservers: vec![addresses[0].clone()],
            credentials: None,
        };
        let client = Arc::new(VldbClient::new(
            cell.clone(),
            authority
                .transport(proto::PeerClass::Host, "admin")
                .unwrap(),
            PeerKind::Admin,
            Duration::from_secs(10),
        ));
        let answers = ask_every_replica(&client, &cell).await;
        let asked: Vec<&str> = answers.iter().map(|a| a.address.as_str()).collect();
        assert_eq!(asked, addresses);
        let report = StatusReport::new(answers);
        let ids: Vec<Option<u64>> = report.rows.iter().map(|r| r.id).collect();
        assert_eq!(ids, [Some(1), Some(2)], "{}", report.render_text());
        stop.send_replace(true);
        for server in servers {
            server.await.unwrap();
        }
    }

    #[test]
    fn addresses_must_be_host_and_port() {
        assert!(check_address("127.0.0.1:7404").is_ok());
        assert!(check_address("vl4.example.test:7403").is_ok());
        for bad in ["127.0.0.1", ":7403", "host:port", "host:70000"] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn members_line_names_voters_and_learners() {
        let members = [
            VldbMember {
                id: 1,
                address: "a:1".into(),
                voter: true,
            },
            VldbMember {
                id: 4,
                address: "d:4".into(),
                voter: false,
            },
        ];
        assert_eq!(members_text(&members), "1 a:1 (voter), 4 d:4 (learner)");
    }
}
