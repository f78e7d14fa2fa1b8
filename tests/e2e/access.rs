//! Access lists and POSIX permissions through real mounts: unprivileged local users with
//! and without tokens, lists changed on one mount seen on another, the POSIX rules, and
//! refused tokens.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use harness::TestCell;
use harness::identity::{self, as_user, control_socket};
use proto::PrincipalId;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const CELL: &str = "e2e.test";
/// Local users without tokens of their own.
const NOBODY: u32 = 4242;
const ALICE: u32 = 5001;
const BOB: u32 = 5002;

/// A cell with one mount `ws`, reachable by every local user (the test directory is
/// 0700 otherwise), whose root `system:anyuser` may look up.
fn cell_with_mount(mounts: &[&str]) -> (TestCell, Vec<std::path::PathBuf>) {
    let mut cell = TestCell::start(BIN).unwrap();
    std::fs::set_permissions(cell.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnts: Vec<_> = mounts.iter().map(|m| cell.mount(m, &[]).unwrap()).collect();
    fs(&cell, &["setacl", &path(&mnts[0]), "system:anyuser", "l"]);
    (cell, mnts)
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `holdfast fs ARGS` as root (the administrator's token), which must succeed.
fn fs(cell: &TestCell, args: &[&str]) -> String {
    let mut all = vec!["fs"];
    all.extend_from_slice(args);
    let out = cell.holdfast(&all).unwrap();
    assert!(
        out.status.success(),
        "holdfast {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` as `uid` in `dir`; true if it succeeded. Its stderr is returned too.
fn run_as(uid: u32, dir: &Path, script: &str) -> (bool, String) {
    let out = as_user(uid, dir, script).unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn allowed(uid: u32, dir: &Path, script: &str) {
    let (ok, stderr) = run_as(uid, dir, script);
    assert!(ok, "uid {uid}: `{script}` was refused: {stderr}");
}

fn refused(uid: u32, dir: &Path, script: &str, why: &str) {
    let (ok, stderr) = run_as(uid, dir, script);
    assert!(!ok, "uid {uid}: `{script}` was allowed");
    assert!(stderr.contains(why), "uid {uid}: `{script}`: {stderr}");
}

const EACCES: &str = "Permission denied";
const EPERM: &str = "Operation not permitted";

fn give(cell: &TestCell, mount: &str, uid: u32, user: &str, id: i32) {
    let token = identity::user_token(CELL, user, id, &[]);
    cachemgr::control::give_token_for(&control_socket(cell.dir.path(), mount), uid, &token)
        .unwrap();
}

#[test]
fn without_a_token_a_user_reads_where_anyuser_may_and_nowhere_else() {
    let (cell, mnts) = cell_with_mount(&["ws"]);
    let mnt = &mnts[0];
    harness::sh(
        mnt,
        "mkdir open closed && echo hello > open/f && echo secret > closed/f && chmod 644 open/f closed/f",
    )
    .unwrap();
    fs(
        &cell,
        &["setacl", &path(&mnt.join("open")), "system:anyuser", "rl"],
    );
    fs(
        &cell,
        &[
            "setacl",
            &path(&mnt.join("closed")),
            "system:anyuser",
            "none",
        ],
    );
    let listed = fs(&cell, &["listacl", &path(&mnt.join("open"))]);
    assert!(listed.contains("system:anyuser rl\n"), "{listed}");
    assert!(
        listed.contains("system:administrators rlidwka\n"),
        "{listed}"
    );

    allowed(NOBODY, mnt, "cat open/f && ls open");
    refused(NOBODY, mnt, "cat closed/f", EACCES);
    refused(NOBODY, mnt, "ls closed", EACCES);
    refused(NOBODY, mnt, "echo x > open/new", EACCES);
    refused(NOBODY, mnt, "rm open/f", EACCES);
    // What the server refuses is refused also when the data is cached (root read it).
    harness::sh(mnt, "cat closed/f").unwrap();
    refused(NOBODY, mnt, "cat closed/f", EACCES);
    let examined = String::from_utf8_lossy(
        &as_user(NOBODY, mnt, &format!("{BIN} fs examine open/f"))
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(examined.contains("Your rights: rl"), "{examined}");
}

#[test]
fn a_token_granted_rlidwk_writes_there_until_it_is_dropped() {
    let (cell, mnts) = cell_with_mount(&["ws"]);
    let mnt = &mnts[0];
    harness::sh(mnt, "mkdir shared").unwrap();
    fs(
        &cell,
        &[
            "setacl",
            &path(&mnt.join("shared")),
            &ALICE.to_string(),
            "rlidwk",
        ],
    );
    refused(ALICE, mnt, "echo a > shared/a", EACCES);
    give(&cell, "ws", ALICE, "alice", ALICE as i32);
    let tokens = cachemgr::control::list_tokens(&control_socket(cell.dir.path(), "ws")).unwrap();
    assert!(
        tokens.iter().any(|t| t.uid == ALICE && t.user == "alice"),
        "{tokens:?}"
    );
    allowed(
        ALICE,
        mnt,
        "echo a > shared/a && cat shared/a && mkdir shared/d && rm shared/a",
    );
    // Owned by alice's id, as the server decided.
    let meta = std::fs::metadata(mnt.join("shared/d")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), ALICE);
    // No one else holds her rights.
    refused(BOB, mnt, "echo b > shared/b", EACCES);
    let socket = control_socket(cell.dir.path(), "ws");
    assert!(cachemgr::control::drop_token_for(&socket, ALICE).unwrap());
    refused(ALICE, mnt, "echo c > shared/c", EACCES);
}

#[test]
fn a_changed_list_reaches_the_other_mount_at_once() {
    let (cell, mnts) = cell_with_mount(&["ws-a", "ws-b"]);
    let (a, b) = (&mnts[0], &mnts[1]);
    harness::sh(a, "mkdir d && echo x > d/f").unwrap();
    fs(
        &cell,
        &["setacl", &path(&a.join("d")), "system:anyuser", "rl"],
    );
    // B caches the rights of anyone on d, and the file.
    allowed(NOBODY, b, "cat d/f");
    fs(
        &cell,
        &["setacl", &path(&a.join("d")), "system:anyuser", "none"],
    );
    refused(NOBODY, b, "cat d/f", EACCES);
    fs(
        &cell,
        &["setacl", &path(&a.join("d")), "system:anyuser", "rl"],
    );
    allowed(NOBODY, b, "cat d/f");
    // Negative rights win.
    fs(
        &cell,
        &[
            "setacl",
            "--negative",
            &path(&a.join("d")),
            "system:anyuser",
            "r",
        ],
    );
    refused(NOBODY, b, "cat d/f", EACCES);
    allowed(NOBODY, b, "ls d");
    // A new directory takes its parent's list.
    harness::sh(a, "mkdir d/sub && echo y > d/sub/g").unwrap();
    let listed = fs(&cell, &["listacl", &path(&a.join("d/sub"))]);
    assert!(
        listed.contains("Negative rights:\n  system:anyuser r\n"),
        "{listed}"
    );
}

#[test]
fn posix_rules_hold_for_two_users_and_root() {
    let (cell, mnts) = cell_with_mount(&["ws"]);
    let mnt = &mnts[0];
    harness::sh(mnt, "mkdir -m 1777 tmp && mkdir -m 777 pub").unwrap();
    for dir in ["tmp", "pub"] {
        fs(
            &cell,
            &["setacl", &path(&mnt.join(dir)), "system:authuser", "rlidwk"],
        );
    }
    give(&cell, "ws", ALICE, "alice", ALICE as i32);
    give(&cell, "ws", BOB, "bob", BOB as i32);
    allowed(ALICE, mnt, "echo a > pub/private && chmod 600 pub/private");
    allowed(ALICE, mnt, "echo a > pub/shared && chmod 666 pub/shared");
    allowed(ALICE, mnt, "echo a > tmp/alices && chmod 666 tmp/alices");
    // (user, script, expected: None = allowed, Some(error))
    let cases: &[(u32, &str, Option<&str>)] = &[
        (BOB, "cat pub/private", Some(EACCES)),
        (ALICE, "cat pub/private", None),
        (0, "cat pub/private", None),
        (BOB, "echo b >> pub/shared", None),
        (BOB, "chmod 777 pub/shared", Some(EPERM)),
        (BOB, &format!("chown {BOB} pub/shared"), Some(EPERM)),
        (ALICE, &format!("chown {BOB} pub/shared"), Some(EPERM)),
        (ALICE, "chmod 644 pub/shared", None),
        (BOB, "echo b >> pub/shared", Some(EACCES)),
        (0, &format!("chown {BOB} pub/shared"), None),
        (BOB, "chmod 600 pub/shared", None),
        (ALICE, "cat pub/shared", Some(EACCES)),
        // Sticky: only the entry's owner (or the directory's, or root) removes it.
        (BOB, "rm -f tmp/alices", Some(EPERM)),
        (BOB, "mv tmp/alices tmp/bobs", Some(EPERM)),
        (BOB, "echo b >> tmp/alices", None),
        (ALICE, "rm tmp/alices", None),
        // Not sticky: whoever may delete there removes it.
        (BOB, "rm -f pub/private", None),
    ];
    for (uid, script, expected) in cases {
        match expected {
            None if *uid == 0 => {
                harness::sh(mnt, script).unwrap();
            }
            None => allowed(*uid, mnt, script),
            Some(why) => refused(*uid, mnt, script, why),
        }
    }
    // Set-user-id and set-group-id (with group execute) go on a write by someone else,
    // and on a chown.
    allowed(ALICE, mnt, "echo a > pub/tool && chmod 6777 pub/tool");
    allowed(BOB, mnt, "echo b >> pub/tool");
    let mode = std::fs::metadata(mnt.join("pub/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o777, "{mode:o}");
    allowed(ALICE, mnt, "chmod 6755 pub/tool");
    harness::sh(mnt, &format!("chown {BOB} pub/tool")).unwrap();
    let mode = std::fs::metadata(mnt.join("pub/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "{mode:o}");
}

#[test]
fn forged_tampered_and_expired_tokens_are_refused() {
    let (cell, mnts) = cell_with_mount(&["ws"]);
    let mnt = &mnts[0];
    harness::sh(mnt, "mkdir d && echo x > d/f").unwrap();
    fs(
        &cell,
        &["setacl", &path(&mnt.join("d")), "system:authuser", "rl"],
    );
    let socket = control_socket(cell.dir.path(), "ws");
    // Signed by a key of no cell.
    let forged = proto::TokenKey::from_secret([9; 32]).seal(proto::TokenBody {
        cell: CELL.into(),
        user: "mallory".into(),
        id: PrincipalId(6001),
        groups: vec![PrincipalId::ADMINISTRATORS],
        issued: proto::Timestamp::now(),
        expiry: proto::Timestamp {
            secs: proto::Timestamp::now().secs + 3600,
            nanos: 0,
        },
        key_id: 0,
    });
    cachemgr::control::give_token_for(&socket, 6001, &forged).unwrap();
    refused(6001, mnt, "cat d/f", EACCES);
    // The cell's key, one letter of the user's name changed after sealing.
    let mut tampered = identity::user_token(CELL, "trudy", 6002, &[]);
    let at = tampered.0.windows(5).position(|w| w == b"trudy").unwrap();
    tampered.0[at] = b'T';
    cachemgr::control::give_token_for(&socket, 6002, &tampered).unwrap();
    refused(6002, mnt, "cat d/f", EACCES);
    // Expired a second ago.
    let expired = identity::token(CELL, "eve", 6003, &[], Duration::ZERO);
    cachemgr::control::give_token_for(&socket, 6003, &expired).unwrap();
    refused(6003, mnt, "cat d/f", EACCES);
    // The server said why, naming the user, at WARN (no ERROR for the tripwire).
    let log = cell.log("fileserver");
    assert!(
        log.contains("WARN") && log.contains("refused a token") && log.contains("mallory"),
        "{log}"
    );
    // A user with a valid token still reads.
    give(&cell, "ws", 6004, "val", 6004);
    allowed(6004, mnt, "cat d/f");
}

/// The whole path a user takes: an administrator makes the user in the protection
/// database and grants it a directory by name; the user, as an unprivileged local uid,
/// runs `holdfast login` (which hands the token to the mount over its control socket)
/// and writes there; after `holdfast unlog` it cannot.
#[test]
fn login_gives_the_mount_the_users_token_and_unlog_takes_it_back() {
    let (cell, mnts) = cell_with_mount(&["ws"]);
    let mnt = &mnts[0];
    let dir = cell.dir.path();
    let password = dir.join("carol.password");
    std::fs::write(&password, "carol's long secret\n").unwrap();
    std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    let made = cell
        .holdfast(&[
            "pts",
            "createuser",
            "carol",
            "--password-file",
            &path(&password),
        ])
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    harness::sh(mnt, "mkdir project").unwrap();
    fs(
        &cell,
        &["setacl", &path(&mnt.join("project")), "carol", "write"],
    );
    let listed = fs(&cell, &["listacl", &path(&mnt.join("project"))]);
    assert!(listed.contains("  carol rlidwk\n"), "{listed}");

    const CAROL: u32 = 5003;
    let tokens = format!("/tmp/holdfast-e2e-tokens-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&tokens);
    let env = format!(
        "HOLDFAST_CELL={} HOLDFAST_TOKEN_DIR={tokens}",
        path(&cell.cell_file)
    );
    refused(CAROL, mnt, "touch project/before", EACCES);
    allowed(
        CAROL,
        mnt,
        &format!(
            "{env} {BIN} login carol --password-file {}",
            path(&password)
        ),
    );
    allowed(CAROL, mnt, "touch project/after && ls -l project/after");
    let meta = std::fs::metadata(mnt.join("project/after")).unwrap();
    let carol_id = std::os::unix::fs::MetadataExt::uid(&meta);
    assert!(carol_id > 0 && carol_id != PrincipalId::ANONYMOUS.as_posix_id());
    let (ok, listing) = {
        let out = as_user(CAROL, mnt, &format!("{env} {BIN} tokens")).unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(ok && listing.contains("carol"), "{listing}");
    allowed(CAROL, mnt, &format!("{env} {BIN} unlog"));
    refused(CAROL, mnt, "touch project/gone", EACCES);
    let _ = std::fs::remove_dir_all(&tokens);
}
