//! `fileserver::inspect` on a partition a real fileserver wrote: a client with a callback
//! and a lock, read while the server runs and after it stopped; and its clear errors on
//! a directory without state and on a damaged journal.

use std::path::Path;
use std::time::Duration;

use fileserver::Config;
use fileserver::inspect::{InspectError, inspect, render_text};
use proto::rpc::{self, Connection, Limits};
use proto::{
    CellConfig, ClientId, Fid, Hello, InstanceNonce, LockKind, PROTOCOL_VERSION_MAX,
    PROTOCOL_VERSION_MIN, PeerKind, Request, Response, VolumeId, VolumeName,
};
use state::{JournalError, JournalMode};
use tokio::net::TcpListener;
use tokio::sync::watch;

const CELL: &str = "test.cell";
const TIMEOUT: Duration = Duration::from_secs(10);
const VOLUME: VolumeId = VolumeId(100);

fn hello(peer: PeerKind) -> Hello {
    Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION_MAX,
        cell: CELL.into(),
        peer,
    }
}

async fn connect(address: &str, peer: PeerKind) -> Connection {
    let (connection, _, mut incoming) = rpc::connect(address, hello(peer), &Limits::default())
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(request) = incoming.recv().await {
            let (_, replier) = request.into_parts();
            replier.reply(Ok(Response::Ok)).await;
        }
    });
    connection
}

/// Runs a fileserver on `partition` until `stop` turns true, after a client took a
/// callback on a new file and a lock on it. Returns the client, the file and the server.
async fn populate(
    partition: &Path,
) -> (
    ClientId,
    Fid,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let cell = CellConfig {
        name: CELL.into(),
        vlservers: vec!["127.0.0.1:1".into()],
    };
    let mut config = Config::new(partition.to_owned(), cell, vec![address.clone()]);
    config.journal_mode = JournalMode::Sync;
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(async move {
        fileserver::run(config, listener, shutdown).await.unwrap();
    });

    let admin = connect(&address, PeerKind::Admin).await;
    let request = Request::CreateVolume {
        id: VOLUME,
        name: VolumeName::parse("root.cell").unwrap(),
        quota_bytes: 0,
    };
    let created = admin.call(request, TIMEOUT).await.unwrap();
    assert!(matches!(created, Response::Volume(_)), "{created:?}");

    let id = ClientId::random();
    let peer = PeerKind::CacheManager {
        client: id,
        instance: InstanceNonce(7),
    };
    let client = connect(&address, peer).await;
    let create = Request::Create {
        dir: Fid::root(VOLUME),
        name: "locked".into(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        exclusive: true,
    };
    let file = match client.call(create, TIMEOUT).await.unwrap() {
        Response::Status { status, .. } | Response::Entry { status, .. } => status.fid,
        other => panic!("expected a status, got {other:?}"),
    };
    let fetched = client
        .call(Request::FetchStatus { fid: file }, TIMEOUT)
        .await
        .unwrap();
    assert!(
        matches!(
            fetched,
            Response::Status {
                callback: Some(_),
                ..
            }
        ),
        "{fetched:?}"
    );
    let lock = Request::SetLock {
        fid: file,
        owner: 42,
        start: 10,
        end: 20,
        kind: LockKind::Exclusive,
        wait: false,
        pid: 4242,
    };
    assert_eq!(client.call(lock, TIMEOUT).await.unwrap(), Response::Ok);
    (id, file, stop, task)
}

fn check_report(partition: &Path, id: ClientId, file: Fid) -> String {
    let report = inspect(partition).unwrap();
    assert_eq!(report.counts.clients, 1, "{report:?}");
    assert_eq!(report.counts.locks, 1, "{report:?}");
    assert!(report.counts.callback_promises >= 1, "{report:?}");
    assert!(report.journal.last.0 >= 3, "{report:?}");
    assert!(report.journal.segment_count >= 1);
    assert_eq!(report.orphan_callback_count, 0);
    let client = &report.clients[0];
    assert_eq!(client.client, id);
    assert_eq!(client.instance, InstanceNonce(7));
    assert_eq!(client.locks.len(), 1);
    let lock = &client.locks[0];
    assert_eq!(
        (
            lock.fid, lock.owner, lock.start, lock.end, lock.kind, lock.pid
        ),
        (file, 42, 10, 20, LockKind::Exclusive, 4242)
    );
    assert!(client.callback_fids.contains(&file), "{report:?}");
    assert_eq!(client.callback_count, client.callback_fids.len());

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["counts"]["locks"], 1);
    assert_eq!(json["clients"][0]["client"], id.to_string());
    assert_eq!(json["clients"][0]["locks"][0]["pid"], 4242);
    let text = render_text(&report);
    assert!(text.contains(&format!("client {id} instance 7")), "{text}");
    assert!(text.contains("[10, 20) exclusive pid 4242"), "{text}");
    assert!(text.contains("1 client(s)"), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reports_a_live_and_a_stopped_partition() {
    let dir = tempfile::tempdir().unwrap();
    let (id, file, stop, task) = populate(dir.path()).await;

    // Live: the server holds the journal's directory lock; inspect needs none.
    let live = check_report(dir.path(), id, file);
    let files_before: Vec<_> = std::fs::read_dir(dir.path().join("state"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    stop.send(true).unwrap();
    task.await.unwrap();

    let stopped = check_report(dir.path(), id, file);
    assert_eq!(live.lines().count(), stopped.lines().count());
    // Inspecting left the files as they were (the server removed none either).
    for name in files_before {
        assert!(dir.path().join("state").join(name).exists());
    }
}

#[test]
fn a_directory_without_state_is_not_a_partition() {
    let dir = tempfile::tempdir().unwrap();
    let err = inspect(dir.path()).unwrap_err();
    assert!(matches!(err, InspectError::NoState { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "{} has no fileserver state (no state/ directory); is it a partition?",
            dir.path().display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, stop, task) = populate(dir.path()).await;
    stop.send(true).unwrap();
    task.await.unwrap();

    let state_dir = dir.path().join("state");
    let segment = std::fs::read_dir(&state_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "journal"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    // The first record's payload: header 32 bytes, record header 16.
    bytes[32 + 16] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();

    let err = inspect(dir.path()).unwrap_err();
    match &err {
        InspectError::Journal(JournalError::Corrupt { path, offset, .. }) => {
            assert_eq!(path, &segment);
            assert_eq!(*offset, 32);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(err.to_string().contains(&segment.display().to_string()));
    // Read-only: the damage is still there for a person to look at.
    assert_eq!(std::fs::read(&segment).unwrap(), bytes);
}
