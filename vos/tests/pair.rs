//! `holdfast pair` logic against a real vlserver and fileserver doubles that answer
//! `MemberState` and `PairSwitchover`, all on loopback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::rpc::{self, Connection};
use proto::server::{ServerLimits, serve};
use proto::tls::authority::CellAuthority;
use proto::{
    CellConfig, Epoch, ErrorCode, GraceState, Hello, HelloReply, MemberRole, MemberState, PairName,
    PeerClass, PeerKind, Request, Response, ServerId, Transport, VldbClient,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use vos::{MemberStatus, Vos, VosError, format_pair_status, format_switchover};

const CELL: &str = "example.test";
const TIMEOUT: Duration = Duration::from_secs(5);
const LEASE: Duration = Duration::from_secs(30);

/// What every member double says of itself, by address: shared so that a switchover
/// handled by one member changes what the other reports.
type Roles = Arc<Mutex<HashMap<String, MemberState>>>;

/// A pair member double. On `PairSwitchover` it does what a real active does as seen
/// from the VLDB: releases the lease to its partner, and the partner acquires it.
struct FakeMember {
    address: String,
    partner: String,
    pair: PairName,
    roles: Roles,
    vldb: VldbClient,
    /// False: answer a switchover without handing anything over.
    hands_over: bool,
}

impl FakeMember {
    async fn switch_over(&self) -> Result<Response, ErrorCode> {
        if !self.hands_over {
            return Ok(Response::Ok);
        }
        let fail = |e: proto::ProtoError| ErrorCode::Internal(e.to_string());
        let epoch = self.roles.lock().unwrap()[&self.address].epoch;
        self.vldb
            .release_pair(&self.pair, &self.address, epoch, Some(&self.partner))
            .await
            .map_err(fail)?;
        let (epoch, _) = self
            .vldb
            .acquire_pair(&self.pair, &self.partner, epoch, LEASE)
            .await
            .map_err(fail)?;
        let mut roles = self.roles.lock().unwrap();
        for (address, role) in [
            (&self.address, MemberRole::Passive),
            (&self.partner, MemberRole::Active),
        ] {
            if let Some(state) = roles.get_mut(address) {
                state.role = role;
                state.epoch = epoch;
            }
        }
        Ok(Response::Ok)
    }
}

impl proto::server::Service for FakeMember {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        Ok(HelloReply {
            version: rpc::negotiate(hello, CELL)?,
            server: None,
        })
    }

    async fn handle(
        self: Arc<Self>,
        _connection: Connection,
        _hello: Arc<Hello>,
        _caller: Arc<proto::Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        match request {
            Request::MemberState => {
                let roles = self.roles.lock().unwrap();
                Ok(Response::MemberState(roles[&self.address].clone()))
            }
            Request::PairSwitchover => self.switch_over().await,
            _ => Err(ErrorCode::Unsupported),
        }
    }
}

/// A vlserver and a pair `p1` of members A and B. Everything stops on drop.
struct Cell {
    config: CellConfig,
    authority: Arc<CellAuthority>,
    a: String,
    b: String,
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Drop for Cell {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl Cell {
    fn vos(&self) -> Vos {
        Vos::new(
            self.config.clone(),
            self.transport(PeerClass::Host),
            TIMEOUT,
        )
    }

    fn transport(&self, class: PeerClass) -> Transport {
        self.authority.transport(class, "test").unwrap()
    }
}

fn pair_name() -> PairName {
    PairName::parse("p1").unwrap()
}

/// Starts the cell with A active (in grace, at epoch 1) and B passive; nothing listens
/// at B's address when `partner_alive` is false.
async fn start_cell(partner_alive: bool, hands_over: bool) -> Cell {
    let dir = tempfile::tempdir().unwrap();
    let vl_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, shutdown) = watch::channel(false);
    let config = CellConfig {
        name: CELL.into(),
        vlservers: vec![vl_listener.local_addr().unwrap().to_string()],
        credentials: None,
    };
    let authority = Arc::new(CellAuthority::generate(CELL).unwrap());
    let server_transport = authority.transport(PeerClass::Server, "server").unwrap();
    let vl_config =
        vlserver::Config::single(dir.path().to_owned(), CELL.into(), server_transport.clone());
    tokio::spawn(vlserver::run(vl_config, vl_listener, shutdown.clone()));

    let a_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = a_listener.local_addr().unwrap().to_string();
    let b = b_listener.local_addr().unwrap().to_string();

    let server = ServerId::random();
    let vldb = || {
        VldbClient::new(
            config.clone(),
            server_transport.clone(),
            PeerKind::FileServer { server },
            TIMEOUT,
        )
    };
    let setup = vldb();
    setup.join_pair(&pair_name(), server, &a).await.unwrap();
    setup.join_pair(&pair_name(), server, &b).await.unwrap();
    let (epoch, _) = setup
        .acquire_pair(&pair_name(), &a, Epoch(0), LEASE)
        .await
        .unwrap();

    let state = |address: &str, role, grace| MemberState {
        member: address.into(),
        pair: Some(pair_name()),
        role,
        epoch,
        grace,
    };
    let grace = GraceState {
        remaining_ms: 12_300,
        clients_recovered: 2,
        clients_reclaimed: 1,
        locks_unreclaimed: 1,
    };
    let roles: Roles = Arc::new(Mutex::new(HashMap::from([
        (a.clone(), state(&a, MemberRole::Active, Some(grace))),
        (b.clone(), state(&b, MemberRole::Passive, None)),
    ])));
    let mut members = vec![(a_listener, a.clone(), b.clone())];
    if partner_alive {
        members.push((b_listener, b.clone(), a.clone()));
    } else {
        drop(b_listener);
    }
    for (listener, address, partner) in members {
        let member = Arc::new(FakeMember {
            address,
            partner,
            pair: pair_name(),
            roles: roles.clone(),
            vldb: vldb(),
            hands_over,
        });
        tokio::spawn(serve(
            listener,
            member,
            ServerLimits::default(),
            server_transport.clone(),
            shutdown.clone(),
        ));
    }
    Cell {
        config,
        authority,
        a,
        b,
        stop,
        _dir: dir,
    }
}

#[tokio::test]
async fn status_shows_the_vldb_view_then_each_member_active_first() {
    let cell = start_cell(true, true).await;
    let report = cell.vos().pair_status("p1").await.unwrap();
    assert_eq!(report.pair.epoch, Epoch(1));
    assert_eq!(report.pair.active.as_deref(), Some(cell.a.as_str()));
    assert!(report.pair.lease_left_ms > 0 && report.pair.lease_left_ms <= 30_000);

    let text = format_pair_status(&report);
    let lines: Vec<&str> = text.lines().collect();
    let header = format!("pair p1: epoch 1, active {}, lease left ", cell.a);
    assert!(
        lines[0].starts_with(&header) && lines[0].ends_with(" ms"),
        "{text}"
    );
    assert_eq!(
        lines[1..],
        [
            format!(
                "  {}  active  grace: 12.3 s left, 1/2 clients reclaimed, 1 lock not reclaimed",
                cell.a
            ),
            format!("  {}  passive", cell.b),
        ],
        "{text}"
    );
}

#[tokio::test]
async fn status_reports_an_unreachable_member_without_failing() {
    let cell = start_cell(false, true).await;
    let report = cell.vos().pair_status("p1").await.unwrap();
    assert_eq!(report.members.len(), 2);
    assert!(matches!(
        report.members[0].status,
        MemberStatus::Answered(MemberState {
            role: MemberRole::Active,
            ..
        })
    ));
    assert_eq!(report.members[1].address, cell.b);
    assert!(
        matches!(report.members[1].status, MemberStatus::Unreachable(_)),
        "{:?}",
        report.members[1]
    );
    let text = format_pair_status(&report);
    assert!(
        text.contains(&format!("\n  {}  unreachable: ", cell.b)),
        "{text}"
    );
}

#[tokio::test]
async fn switchover_hands_the_pair_to_the_partner_and_says_so() {
    let cell = start_cell(true, true).await;
    let vos = cell.vos();
    let report = vos.pair_switchover("p1").await.unwrap();
    assert_eq!(
        (report.from.as_str(), report.to.as_str(), report.epoch),
        (cell.a.as_str(), cell.b.as_str(), Epoch(2))
    );
    let line = format_switchover(&report);
    let expected = format!(
        "pair p1: switched over from {} to {} (epoch 2) in ",
        cell.a, cell.b
    );
    assert!(
        line.starts_with(&expected) && line.ends_with(" ms\n"),
        "{line}"
    );

    // The members now say so too, the new active first.
    let status = vos.pair_status("p1").await.unwrap();
    let roles: Vec<(&str, Option<MemberRole>)> = status
        .members
        .iter()
        .map(|m| match &m.status {
            MemberStatus::Answered(state) => (m.address.as_str(), Some(state.role)),
            _ => (m.address.as_str(), None),
        })
        .collect();
    assert_eq!(
        roles,
        [
            (cell.b.as_str(), Some(MemberRole::Active)),
            (cell.a.as_str(), Some(MemberRole::Passive)),
        ]
    );
}

#[tokio::test]
async fn a_switchover_the_vldb_does_not_see_is_an_error() {
    let cell = start_cell(true, false).await;
    let error = cell.vos().pair_switchover("p1").await.unwrap_err();
    assert!(
        matches!(error, VosError::SwitchoverUnconfirmed { ref active, epoch: Epoch(1), .. }
            if *active == cell.a),
        "{error}"
    );
}

#[tokio::test]
async fn unknown_and_bad_pair_names_are_one_clear_line() {
    let cell = start_cell(true, true).await;
    let vos = cell.vos();
    let error = vos.pair_status("nope").await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "no pair named 'nope' in the VLDB: check the name given to `holdfast fileserver --pair`"
    );
    assert!(matches!(
        vos.pair_switchover("nope").await,
        Err(VosError::NoSuchPair { .. })
    ));
    assert!(matches!(
        vos.pair_status("a b").await,
        Err(VosError::BadPairName { .. })
    ));

    // A pair of one has nobody to hand over to.
    let server = ServerId::random();
    let vldb = VldbClient::new(
        cell.config.clone(),
        cell.transport(PeerClass::Host),
        PeerKind::Admin,
        TIMEOUT,
    );
    let solo = PairName::parse("solo").unwrap();
    vldb.join_pair(&solo, server, "127.0.0.1:1").await.unwrap();
    assert!(matches!(
        vos.pair_switchover("solo").await,
        Err(VosError::NoActive { .. })
    ));
    vldb.acquire_pair(&solo, "127.0.0.1:1", Epoch(0), LEASE)
        .await
        .unwrap();
    let error = vos.pair_switchover("solo").await.unwrap_err();
    assert!(matches!(error, VosError::NoPartner { .. }), "{error}");
}
