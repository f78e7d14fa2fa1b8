//! `fileserver::inspect` on a partition a real fileserver wrote: a client with a callback
//! and a lock, read while the server runs and after it stopped; and its clear errors on
//! a directory without state and on a damaged metadata log (which holds the state
//! records).

mod common;

use std::path::Path;

use common::{Server, TIMEOUT, VOLUME, cache_manager, create_volume, status_of, wire_range};
use fileserver::inspect::{InspectError, inspect, render_text};
use fileserver::storage::LogError;
use proto::{ByteRange, ClientId, Fid, InstanceNonce, LockKind, LockOwnerId, Request, Response};
use state::JournalMode;

/// Starts a fileserver on `partition` and has a client take a callback on a new file and
/// a lock on it. Returns the client, the file and the running server.
async fn populate(partition: &Path) -> (ClientId, Fid, Server) {
    let server = Server::start(partition, |config| config.journal_mode = JournalMode::Sync).await;
    create_volume(&server.address).await;

    let id = ClientId::random();
    let peer = cache_manager(id, InstanceNonce(7));
    let client = common::connect(&server.address, peer, |_| {}).await;
    let create = Request::Create {
        dir: Fid::root(VOLUME),
        name: "locked".into(),
        mode: 0o644,
        uid: 0,
        gid: 0,
        exclusive: true,
    };
    let file = status_of(client.call(create, TIMEOUT).await.unwrap()).fid;
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
        owner: LockOwnerId(42),
        range: wire_range(10, 20),
        kind: LockKind::Exclusive,
        wait: false,
        pid: 4242,
    };
    assert_eq!(client.call(lock, TIMEOUT).await.unwrap(), Response::Ok);
    (id, file, server)
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
        (lock.fid, lock.owner, lock.range, lock.kind, lock.pid),
        (
            file,
            LockOwnerId(42),
            ByteRange::new(10, 20).unwrap(),
            LockKind::Exclusive,
            4242
        )
    );
    assert!(client.callback_fids.contains(&file), "{report:?}");
    assert_eq!(client.callback_count, client.callback_fids.len());

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["counts"]["locks"], 1);
    assert_eq!(json["clients"][0]["client"], id.to_string());
    let json_lock = &json["clients"][0]["locks"][0];
    assert_eq!(
        (&json_lock["owner"], &json_lock["start"], &json_lock["end"]),
        (&42.into(), &10.into(), &20.into()),
        "{json_lock}"
    );
    assert_eq!(json_lock["pid"], 4242);
    let text = render_text(&report);
    assert!(text.contains(&format!("client {id} instance 7")), "{text}");
    assert!(text.contains("[10, 20) exclusive pid 4242"), "{text}");
    assert!(text.contains("1 client(s)"), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reports_a_live_and_a_stopped_partition() {
    let dir = tempfile::tempdir().unwrap();
    let (id, file, server) = populate(dir.path()).await;

    // Live: the server is writing the log; inspect reads it as it stands.
    let live = check_report(dir.path(), id, file);
    let files_before: Vec<_> = std::fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    server.stop().await;

    let stopped = check_report(dir.path(), id, file);
    assert_eq!(live.lines().count(), stopped.lines().count());
    // Inspecting left the files as they were (the server removed none either).
    for name in files_before {
        assert!(dir.path().join("log").join(name).exists());
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
            "{} has no fileserver state (no log/ directory); is it a partition?",
            dir.path().display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, server) = populate(dir.path()).await;
    server.stop().await;

    let log_dir = dir.path().join("log");
    let segment = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("segment-")
        })
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    // The first record's payload: the segment's header block (4096 bytes), the frame
    // header 32, the record header 16. Later frames follow, so this is damage, not a
    // torn write.
    bytes[4096 + 32 + 16] ^= 0xff;
    std::fs::write(&segment, &bytes).unwrap();

    let err = inspect(dir.path()).unwrap_err();
    match &err {
        InspectError::Log(LogError::Corrupt { path, offset, .. }) => {
            assert_eq!(path, &segment);
            assert_eq!(*offset, 4096);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(err.to_string().contains(&segment.display().to_string()));
    // Read-only: the damage is still there for a person to look at.
    assert_eq!(std::fs::read(&segment).unwrap(), bytes);
}
