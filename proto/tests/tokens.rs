//! Tokens on requests over real loopback sockets: a server acts for a verified token's
//! user, for `system:anyuser` without one, and refuses forged, tampered, expired and
//! foreign tokens with `BadToken`, serving the connection's other requests meanwhile.

use std::sync::Arc;
use std::time::Duration;

use proto::message::*;
use proto::rpc::{self, Connection, Limits};
use proto::server::{ServerLimits, Service, serve};
use proto::*;
use tokio::net::TcpListener;
use tokio::sync::watch;

const CELL: &str = "test.cell";

/// Answers `Counters` with whom it acted for: the user's name and id.
struct WhoAmI {
    verifier: TokenVerifier,
}

impl Service for WhoAmI {
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
        caller: Arc<Identity>,
        _request: Request,
    ) -> Result<Response, ErrorCode> {
        Ok(Response::Counters(vec![(
            caller.name().to_owned(),
            caller.id.0 as u64,
        )]))
    }

    fn token_verifier(&self) -> Option<&TokenVerifier> {
        Some(&self.verifier)
    }
}

fn body(user: &str, expiry: Timestamp) -> TokenBody {
    TokenBody {
        cell: CELL.into(),
        user: user.into(),
        id: PrincipalId(1001),
        groups: Vec::new(),
        issued: Timestamp::now(),
        expiry,
        key_id: 0,
    }
}

fn in_an_hour() -> Timestamp {
    Timestamp::from(std::time::SystemTime::now() + Duration::from_secs(3600))
}

async fn connect(key: &TokenKey) -> (Connection, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop, stop_rx) = watch::channel(false);
    let service = Arc::new(WhoAmI {
        verifier: key.verifier(CELL),
    });
    let server = proto::tls::authority::test_transport(PeerClass::Server).unwrap();
    tokio::spawn(serve(
        listener,
        service,
        ServerLimits::default(),
        server,
        stop_rx,
    ));
    let hello = Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: CELL.into(),
        peer: PeerKind::Admin,
    };
    let host = proto::tls::authority::test_transport(PeerClass::Host).unwrap();
    let (connection, _, _incoming) = rpc::connect(&address, hello, &Limits::default(), &host)
        .await
        .unwrap();
    (connection, stop)
}

async fn whoami(connection: &Connection, token: Option<&SealedToken>) -> Result<String, ErrorCode> {
    let answer = connection
        .try_call_as(token, &Request::Ping, Duration::from_secs(5))
        .await
        .expect("sent");
    match answer {
        Ok(Response::Counters(who)) => Ok(format!("{}={}", who[0].0, who[0].1 as i32)),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(ProtoError::Remote(code)) => Err(code),
        Err(e) => panic!("call failed: {e}"),
    }
}

#[tokio::test]
async fn a_request_acts_for_its_tokens_user_or_for_anyuser() {
    let key = TokenKey::from_secret([3; 32]);
    let (connection, _stop) = connect(&key).await;
    let token = key.seal(body("alice", in_an_hour()));
    assert_eq!(
        whoami(&connection, Some(&token)).await.unwrap(),
        "alice=1001"
    );
    assert_eq!(
        whoami(&connection, Some(&token)).await.unwrap(),
        "alice=1001"
    );
    assert_eq!(
        whoami(&connection, None).await.unwrap(),
        format!("system:anyuser={}", PrincipalId::ANONYMOUS.0)
    );
}

#[tokio::test]
async fn forged_tampered_expired_and_foreign_tokens_are_refused() {
    let key = TokenKey::from_secret([3; 32]);
    let (connection, _stop) = connect(&key).await;
    let forged = TokenKey::from_secret([4; 32]).seal(body("mallory", in_an_hour()));
    let mut tampered = key.seal(body("alice", in_an_hour()));
    let at = tampered.0.iter().position(|&b| b == b'a').unwrap();
    tampered.0[at] = b'b';
    let expired = key.seal(body("bob", Timestamp::now()));
    let mut foreign_body = body("carol", in_an_hour());
    foreign_body.cell = "other.cell".into();
    let foreign = key.seal(foreign_body);
    for (name, token) in [
        ("forged", forged),
        ("tampered", tampered),
        ("expired", expired),
        ("foreign", foreign),
    ] {
        match whoami(&connection, Some(&token)).await {
            Err(ErrorCode::BadToken { reason }) => assert!(!reason.is_empty(), "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    // The connection still serves.
    assert!(whoami(&connection, None).await.is_ok());
}
