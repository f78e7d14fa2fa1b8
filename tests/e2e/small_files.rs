//! Small files created with their bytes at close: a new file written through one mount
//! appears on another once it is closed, whole; an exclusive create, a listing, a rename
//! or growth past the limit create it on the server first; a name made elsewhere
//! meanwhile gets these bytes, never loses them.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};

use harness::TestCell;
use harness::crash::close;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn a_new_small_file_shows_elsewhere_once_closed_and_whole() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    let data = pattern(5000, 1);
    // A create is deferred under the directory's callback and the caller's cached
    // rights: a listing through A holds both.
    assert_eq!(std::fs::read_dir(&a).unwrap().count(), 0);
    let mut file = std::fs::File::create(a.join("f")).unwrap();
    file.write_all(&data[..3000]).unwrap();
    file.write_all(&data[3000..]).unwrap();
    // Here it is all there: its size, and its bytes to another open of this mount.
    assert_eq!(std::fs::metadata(a.join("f")).unwrap().len(), 5000);
    // Before its close B sees no file (its create is deferred), or, where A could not
    // defer it, an empty one, or, where something on A needed the file on the server
    // before the close (which creates it with what was written), all 5000 bytes
    // written so far: never a part of them.
    match std::fs::metadata(b.join("f")) {
        Ok(seen) => assert!(
            [0, 5000].contains(&seen.len()),
            "B sees {} bytes of a file not yet closed",
            seen.len()
        ),
        Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{e}"),
    }
    close(file).unwrap();
    assert!(std::fs::read(b.join("f")).unwrap() == data);
    assert!(std::fs::read(a.join("f")).unwrap() == data);
    // Created empty and closed: there too.
    close(std::fs::File::create(a.join("empty")).unwrap()).unwrap();
    assert_eq!(std::fs::read(b.join("empty")).unwrap(), b"");
    // Deferral really happens: more small files, and the server made at least one of
    // them (of all these) with its bytes in one request.
    for i in 0..8 {
        std::fs::write(a.join(format!("more{i}")), pattern(100, i)).unwrap();
    }
    let output = cell.holdfast(&["vos", "counters"]).unwrap();
    let counters = String::from_utf8_lossy(&output.stdout);
    let with_data = counters.lines().find_map(|line| {
        let rest = line.strip_prefix("request CreateWithData ")?;
        rest.split_whitespace().next()?.parse::<u64>().ok()
    });
    assert!(
        with_data.is_some_and(|n| n >= 1),
        "no create was deferred to its close:\n{counters}"
    );
}

#[test]
fn an_exclusive_create_is_on_the_server_when_open_returns() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(a.join("x"))
        .unwrap();
    assert_eq!(std::fs::metadata(b.join("x")).unwrap().len(), 0);
    let exclusive_again = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(b.join("x"));
    assert_eq!(
        exclusive_again.map_err(|e| e.kind()).err(),
        Some(ErrorKind::AlreadyExists)
    );
    file.write_all(b"mine").unwrap();
    close(file).unwrap();
    assert_eq!(std::fs::read(b.join("x")).unwrap(), b"mine");
}

#[test]
fn a_file_growing_past_the_limit_is_stored_whole() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    let data = pattern(300 * 1024 + 17, 2);
    let mut file = std::fs::File::create(a.join("big")).unwrap();
    for piece in data.chunks(4096) {
        file.write_all(piece).unwrap();
    }
    close(file).unwrap();
    assert!(std::fs::read(b.join("big")).unwrap() == data);
}

#[test]
fn a_listing_or_a_rename_of_a_deferred_file_creates_it_first() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::create_dir(a.join("d")).unwrap();
    let data = pattern(9000, 3);
    let mut file = std::fs::File::create(a.join("d/f")).unwrap();
    file.write_all(&data[..4000]).unwrap();
    let names: Vec<_> = std::fs::read_dir(a.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["f"]);
    // Listed here, so made on the server, with what was written so far.
    assert_eq!(std::fs::read(b.join("d/f")).unwrap(), &data[..4000]);
    file.write_all(&data[4000..]).unwrap();
    let mut other = std::fs::File::create(a.join("d/g")).unwrap();
    other.write_all(b"renamed while open").unwrap();
    std::fs::rename(a.join("d/g"), a.join("d/h")).unwrap();
    other.write_all(b", then closed").unwrap();
    close(other).unwrap();
    close(file).unwrap();
    assert!(std::fs::read(b.join("d/f")).unwrap() == data);
    assert_eq!(
        std::fs::read(b.join("d/h")).unwrap(),
        b"renamed while open, then closed"
    );
    assert!(!b.join("d/g").exists());
    // A deferred file read back through its own descriptor, then removed while open.
    let mut both = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(a.join("d/r"))
        .unwrap();
    both.write_all(b"read me back").unwrap();
    let mut back = String::new();
    std::fs::File::open(a.join("d/r"))
        .unwrap()
        .read_to_string(&mut back)
        .unwrap();
    assert_eq!(back, "read me back");
    std::fs::remove_file(a.join("d/r")).unwrap();
    close(both).unwrap();
    assert!(!b.join("d/r").exists());
}

#[test]
fn a_name_made_elsewhere_before_the_close_gets_these_bytes() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    assert_eq!(std::fs::read_dir(&a).unwrap().count(), 0);
    let mut deferred = std::fs::File::create(a.join("n")).unwrap();
    deferred.write_all(b"written through A, longer").unwrap();
    // B makes the name exclusively. When A's create is still deferred the name is not
    // on the server and B's create succeeds; if A's create reached the server first
    // (A had no callback on the directory to defer under), B's is refused as it must be.
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(b.join("n"))
    {
        Ok(mut made) => {
            made.write_all(b"B").unwrap();
            close(made).unwrap();
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}"),
    }
    // A's create was not exclusive: it opens B's file and writes there, as if B's
    // create had come first; nothing A wrote is lost.
    close(deferred).unwrap();
    assert_eq!(
        std::fs::read(b.join("n")).unwrap(),
        b"written through A, longer"
    );
}

/// The fileserver's count of `kind` requests, from `vos counters`.
fn requests_of(cell: &TestCell, kind: &str) -> u64 {
    let output = cell.holdfast(&["vos", "counters"]).unwrap();
    let counters = String::from_utf8_lossy(&output.stdout);
    counters
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(&format!("request {kind} "))?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .unwrap_or(0)
}

#[test]
fn creates_closed_side_by_side_keep_their_directory_listed() {
    let mut cell = TestCell::start(BIN).unwrap();
    let a = cell.mount("ws-a", &[]).unwrap();
    let b = cell.mount("ws-b", &[]).unwrap();
    std::fs::create_dir(a.join("d")).unwrap();
    assert_eq!(std::fs::read_dir(a.join("d")).unwrap().count(), 0);
    let listed = requests_of(&cell, "ReadDir");
    // Eight writers closing files at once: their creates are answered out of order, and
    // each answer still reaches the cached listing, which no lookup fetches again.
    let (threads, each) = (8, 40);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let dir = a.join("d");
            scope.spawn(move || {
                for i in 0..each {
                    let name = format!("t{t}-{i}");
                    std::fs::write(dir.join(&name), name.as_bytes()).unwrap();
                }
            });
        }
    });
    let names = std::fs::read_dir(a.join("d")).unwrap().count();
    assert_eq!(names, threads * each);
    assert_eq!(
        requests_of(&cell, "ReadDir"),
        listed,
        "the directory was listed again"
    );
    assert_eq!(
        std::fs::read_dir(b.join("d")).unwrap().count(),
        threads * each
    );
    assert_eq!(std::fs::read(b.join("d/t7-39")).unwrap(), b"t7-39");
}
