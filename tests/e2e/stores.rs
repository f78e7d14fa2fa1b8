//! Stores are all or nothing: a store on a full partition fails whole (the writer's
//! fsync and close say ENOSPC, no other workstation sees a torn file) and is stored
//! once space is free; a late store after a truncate is refused by data version.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::fd::IntoRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use harness::{ProtocolClient, TestCell, Tmpfs, wait_until};
use proto::{DataVersion, ErrorCode, ProtoError, Request, Response, SetAttrs, WriteBackId};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

/// The partition's tmpfs: room for the volume's database, the state journal and the
/// first version of the file, not for the second.
const PARTITION_BYTES: u64 = 64 << 20;
/// Left free once the partition is filled: enough for metadata commits and journal
/// records, far from enough for the new version.
const RESERVE_BYTES: u64 = 256 << 10;
const OLD_BYTES: usize = 512 << 10;
/// One write-back of two whole chunks: one store.
const NEW_BYTES: usize = 2 << 20;

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length).map(|n| (n % 251) as u8 ^ seed).collect()
}

/// `close(2)` of `file`, with its error: dropping a `File` would ignore it.
fn close(file: std::fs::File) -> std::io::Result<()> {
    // SAFETY: the descriptor is ours alone, taken out of the `File`.
    let rc = unsafe { libc::close(file.into_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Which version `path` holds, or a description of what it holds instead.
fn version_of(path: &Path, old: &[u8], new: &[u8]) -> Result<&'static str, String> {
    let content = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    if content == old {
        Ok("old")
    } else if content == new {
        Ok("new")
    } else {
        let differs = |other: &[u8]| {
            let at = |i: &usize| content.get(*i) != other.get(*i);
            let length = content.len().max(other.len());
            let first = (0..length).find(at);
            let last = (0..length).rev().find(at);
            (first, last)
        };
        Err(format!(
            "a torn file: {} bytes, unlike the old version at {:?}, the new at {:?}",
            content.len(),
            differs(old),
            differs(new)
        ))
    }
}

/// Fills `tmpfs` and frees `RESERVE_BYTES` of it again; returns the filler's path.
fn fill_leaving_reserve(tmpfs: &Tmpfs) -> PathBuf {
    let filler = tmpfs.fill().unwrap();
    let file = OpenOptions::new().write(true).open(&filler).unwrap();
    let length = file.metadata().unwrap().len();
    file.set_len(length.saturating_sub(RESERVE_BYTES)).unwrap();
    filler
}

#[test]
fn a_store_on_a_full_partition_fails_whole_and_is_stored_once_space_is_free() {
    harness::require_fuse().unwrap();
    let mut cell = TestCell::start_vldb(BIN).unwrap();
    let tmpfs = Tmpfs::mount(&cell.dir.path().join("partition"), PARTITION_BYTES).unwrap();
    cell.start_fileserver().unwrap();
    cell.create_root_volume().unwrap();
    // A store that cannot write its bytes is server trouble a person must look at.
    cell.expect_error_from("fileserver", "No space left on device");
    let writer = cell.mount("ws-a", &[]).unwrap();
    let reader = cell.mount("ws-b", &[]).unwrap();
    let (old, new) = (pattern(OLD_BYTES, 1), pattern(NEW_BYTES, 2));
    std::fs::write(writer.join("f.bin"), &old).unwrap();
    assert_eq!(version_of(&reader.join("f.bin"), &old, &new), Ok("old"));

    // Another workstation reads the file all through the failure: only ever the old
    // version whole. (Not across the successful store below: a read that spans a
    // change is not one version on any filesystem.)
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, reads) = (Arc::clone(&stop), Arc::clone(&reads));
        let (path, old, new) = (reader.join("f.bin"), old.clone(), new.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                version_of(&path, &old, &new)?;
                reads.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), String>(())
        })
    };

    let filler = fill_leaving_reserve(&tmpfs);
    let mut file = OpenOptions::new()
        .write(true)
        .open(writer.join("f.bin"))
        .unwrap();
    file.write_all(&new).unwrap();
    let synced = file.sync_all();
    assert_eq!(
        synced.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOSPC)),
        "fsync on a full partition: {synced:?}"
    );
    let closed = close(file);
    assert_eq!(
        closed.as_ref().map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOSPC)),
        "close on a full partition: {closed:?}"
    );
    // The writer keeps what it wrote; the server keeps the old version whole, as a
    // workstation that never saw the file finds it.
    assert_eq!(
        std::fs::metadata(writer.join("f.bin")).unwrap().len(),
        NEW_BYTES as u64
    );
    let fresh = cell.mount("ws-c", &[]).unwrap();
    assert_eq!(version_of(&fresh.join("f.bin"), &old, &new), Ok("old"));
    assert_eq!(
        std::fs::metadata(fresh.join("f.bin")).unwrap().len(),
        OLD_BYTES as u64
    );

    assert!(wait_until(Duration::from_secs(10), || reads
        .load(Ordering::Relaxed)
        > 2));
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap().unwrap();
    assert_eq!(version_of(&reader.join("f.bin"), &old, &new), Ok("old"));

    // Space is freed: the next fsync (here of a new open, writing nothing) stores it.
    std::fs::remove_file(filler).unwrap();
    let file = OpenOptions::new()
        .write(true)
        .open(writer.join("f.bin"))
        .unwrap();
    file.sync_all().unwrap();
    close(file).unwrap();
    assert_eq!(version_of(&reader.join("f.bin"), &old, &new), Ok("new"));
    assert_eq!(version_of(&fresh.join("f.bin"), &old, &new), Ok("new"));
    drop(cell);
    drop(tmpfs);
}

/// Two clients at the protocol level against a real fileserver, so the order of
/// arrival is the test's: a store made from one version and sent after another
/// client's truncate is refused and changes nothing; a client's own stores from one
/// base are never refused by each other; a retried store is answered from its record.
#[test]
fn a_late_store_after_a_truncate_is_refused() {
    let cell = TestCell::start(BIN).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut late = ProtocolClient::connect(&cell.transport, &cell.fs_address, "e2e.test")
            .await
            .unwrap();
        let truncater = ProtocolClient::connect(&cell.transport, &cell.fs_address, "e2e.test")
            .await
            .unwrap();
        let volume = late.only_volume().await.unwrap();
        let fid = late.create(volume, "late.bin").await.unwrap();
        let status = |answer: Result<Response, ProtoError>| match answer {
            Ok(Response::Status { status, .. }) => status,
            other => panic!("expected a status, got {other:?}"),
        };
        let base = status(late.call(Request::FetchStatus { fid }).await).data_version;
        let store =
            |base: DataVersion, write_back: u64, offset: u64, data: &[u8]| Request::StoreDataIf {
                fid,
                offset,
                data: data.to_vec(),
                base,
                write_back: WriteBackId(write_back),
            };

        // Two stores of one write-back, from one base, sent together: both land.
        let (first, second) = (
            late.sequenced(store(base, 1, 0, &pattern(100_000, 1))),
            late.sequenced(store(base, 1, 100_000, &pattern(100_000, 2))),
        );
        let (a, b) = tokio::join!(late.call(first.clone()), late.call(second));
        let (a, b) = (status(a), status(b));
        let stored = a.data_version.max(b.data_version);
        assert_eq!(stored.0, base.0 + 2);

        // The writer makes its next store from that version, but it arrives late:
        // the other client truncates the file first.
        let made_late = late.sequenced(store(stored, 2, 0, &pattern(150_000, 3)));
        let truncate = Request::SetAttr {
            fid,
            attrs: SetAttrs {
                size: Some(10),
                ..SetAttrs::default()
            },
        };
        let truncated = status(truncater.call(truncate).await);
        assert_eq!(truncated.size, 10);
        match late.call(made_late).await {
            Err(ProtoError::Remote(ErrorCode::StoreOutdated { current })) => {
                assert_eq!(current, truncated.data_version)
            }
            other => panic!("the late store was not refused: {other:?}"),
        }
        let now = status(truncater.call(Request::FetchStatus { fid }).await);
        assert_eq!(
            (now.size, now.data_version),
            (10, truncated.data_version),
            "the refused store changed the file"
        );
        match truncater
            .call(Request::FetchData {
                fid,
                offset: 0,
                length: 1 << 20,
            })
            .await
        {
            Ok(fetched) => match fetched.into_fetched() {
                Ok(fetched) => assert!(fetched.data == pattern(100_000, 1)[..10]),
                Err(other) => panic!("fetch: {other:?}"),
            },
            other => panic!("fetch: {other:?}"),
        }

        // A retry of the first store (same sequence) is answered from its record, not
        // refused by the truncate and not applied again. (The two ran at once: either
        // may have made base + 1.)
        let retried = status(late.call(first).await);
        assert_eq!(retried.data_version, a.data_version);
        let now = status(truncater.call(Request::FetchStatus { fid }).await);
        assert_eq!(now.data_version, truncated.data_version);

        // A write-back from the version the writer learns now lands.
        let next = late.sequenced(store(now.data_version, 3, 10, b"tail"));
        assert_eq!(status(late.call(next).await).size, 14);
    });
}
