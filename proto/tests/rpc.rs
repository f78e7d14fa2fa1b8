//! The duplex connection over real loopback sockets: handshake verdicts, many calls in
//! flight, server-initiated requests, timeouts and closed connections.

use std::sync::Arc;
use std::time::Duration;

use proto::Identity;
use proto::message::*;
use proto::rpc::{self, Connection, Limits};
use proto::server::{ServerLimits, Service, serve};
use proto::tls::authority::test_transport;
use proto::*;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

const CELL: &str = "test.cell";

/// This test's clients: a host certificate of the tests' CA.
fn host() -> Transport {
    test_transport(PeerClass::Host).unwrap()
}

fn hello(cell: &str) -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: cell.into(),
        peer: PeerKind::Admin,
    }
}

/// Answers Ping; on FetchStatus calls the client back with BreakCallbacks first, and
/// answers only after the client acknowledged; never answers ListVolumes.
struct Echo {
    callbacks: mpsc::Sender<Result<Response, String>>,
}

impl Service for Echo {
    fn hello(&self, hello: &Hello) -> Result<HelloReply, ErrorCode> {
        Ok(HelloReply {
            version: rpc::negotiate(hello, CELL)?,
            server: None,
        })
    }

    async fn handle(
        self: Arc<Self>,
        connection: Connection,
        _hello: Arc<Hello>,
        _caller: Arc<Identity>,
        request: Request,
    ) -> Result<Response, ErrorCode> {
        match request {
            Request::Ping => Ok(Response::Pong),
            Request::FetchStatus { fid } => {
                let answer = connection
                    .call(
                        Request::BreakCallbacks { fids: vec![fid] },
                        Duration::from_secs(5),
                    )
                    .await
                    .map_err(|e| e.to_string());
                let _ = self.callbacks.send(answer).await;
                Err(ErrorCode::NoSuchEntry)
            }
            Request::ListVolumes => std::future::pending().await,
            _ => Err(ErrorCode::Unsupported),
        }
    }
}

async fn start() -> (
    String,
    watch::Sender<bool>,
    mpsc::Receiver<Result<Response, String>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (callbacks, callbacks_rx) = mpsc::channel(8);
    tokio::spawn(serve(
        listener,
        Arc::new(Echo { callbacks }),
        ServerLimits {
            shutdown_deadline: Duration::from_millis(200),
            ..ServerLimits::default()
        },
        test_transport(PeerClass::Server).unwrap(),
        stop_rx,
    ));
    (address, stop_tx, callbacks_rx)
}

#[tokio::test]
async fn many_calls_in_flight_on_one_connection() {
    let (address, _stop, _) = start().await;
    let (connection, reply, _incoming) =
        rpc::connect(&address, hello(CELL), &Limits::default(), &host())
            .await
            .unwrap();
    assert_eq!(reply.version, PROTOCOL_VERSION_MAX);
    let calls = (0..200).map(|_| {
        let connection = connection.clone();
        tokio::spawn(async move { connection.call(Request::Ping, Duration::from_secs(5)).await })
    });
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap(), Response::Pong);
    }
}

#[tokio::test]
async fn wrong_cell_is_refused_at_hello() {
    let (address, _stop, _) = start().await;
    let err = rpc::connect(&address, hello("other.cell"), &Limits::default(), &host())
        .await
        .unwrap_err();
    assert_eq!(
        err.remote(),
        Some(&ErrorCode::WrongCell {
            expected: CELL.into()
        })
    );
}

#[tokio::test]
async fn server_calls_the_client_back_before_answering() {
    let (address, _stop, mut callbacks) = start().await;
    let (connection, _, mut incoming) =
        rpc::connect(&address, hello(CELL), &Limits::default(), &host())
            .await
            .unwrap();
    let fid = Fid::root(VolumeId(7));
    let call = tokio::spawn({
        let connection = connection.clone();
        async move {
            connection
                .call(Request::FetchStatus { fid }, Duration::from_secs(5))
                .await
        }
    });
    let pushed = incoming.recv().await.unwrap();
    let (body, _token, replier) = pushed.into_parts();
    assert_eq!(body, Request::BreakCallbacks { fids: vec![fid] });
    // The original call cannot have been answered yet: the server waits for our ack.
    assert!(!call.is_finished());
    replier.reply(Ok(Response::Ok)).await;
    assert_eq!(callbacks.recv().await.unwrap(), Ok(Response::Ok));
    let answer = call.await.unwrap().unwrap_err();
    assert_eq!(answer.remote(), Some(&ErrorCode::NoSuchEntry));
}

#[tokio::test]
async fn a_call_times_out_and_the_connection_stays_usable() {
    let (address, _stop, _) = start().await;
    let (connection, _, _incoming) =
        rpc::connect(&address, hello(CELL), &Limits::default(), &host())
            .await
            .unwrap();
    let err = connection
        .call(Request::ListVolumes, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(err, ProtoError::Timeout(_)), "{err}");
    assert_eq!(
        connection
            .call(Request::Ping, Duration::from_secs(5))
            .await
            .unwrap(),
        Response::Pong
    );
}

#[tokio::test]
async fn pending_calls_fail_when_the_server_stops() {
    let (address, stop, _) = start().await;
    let (connection, _, _incoming) =
        rpc::connect(&address, hello(CELL), &Limits::default(), &host())
            .await
            .unwrap();
    let call = tokio::spawn({
        let connection = connection.clone();
        async move {
            connection
                .call(Request::ListVolumes, Duration::from_secs(30))
                .await
        }
    });
    // Make sure the request reached the server before stopping it.
    assert_eq!(
        connection
            .call(Request::Ping, Duration::from_secs(5))
            .await
            .unwrap(),
        Response::Pong
    );
    stop.send(true).unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(err.is_transport(), "{err}");
    connection.closed().await;
}

#[tokio::test]
async fn unreachable_address_fails_fast() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = rpc::connect(&address, hello(CELL), &Limits::default(), &host())
        .await
        .unwrap_err();
    assert!(err.is_transport(), "{err}");
}

/// A peer that speaks only version 1 (a build from before `Goodbye` and `StoreDataIf`)
/// agrees on 1, is never sent a version-2 request, and a goodbye to it only closes.
#[tokio::test]
async fn a_version_one_peer_gets_nothing_from_version_two() {
    let (address, _stop, _) = start().await;
    let old = Hello {
        version_min: 1,
        version_max: 1,
        ..hello(CELL)
    };
    let (connection, reply, _incoming) = rpc::connect(&address, old, &Limits::default(), &host())
        .await
        .unwrap();
    assert_eq!((reply.version, connection.version()), (1, 1));
    assert_eq!(
        connection
            .call(Request::Ping, Duration::from_secs(5))
            .await
            .unwrap(),
        Response::Pong
    );
    let store = Request::Sequenced {
        seq: 1,
        request: Box::new(Request::StoreDataIf {
            fid: Fid::root(VolumeId(1)),
            offset: 0,
            data: b"x".to_vec(),
            base: DataVersion(1),
            write_back: WriteBackId(1),
        }),
    };
    let err = connection
        .call(store, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProtoError::PeerTooOld { peer: 1, needed: 2 }),
        "{err}"
    );
    assert!(connection.goodbye());
    assert!(connection.is_closed());
}
