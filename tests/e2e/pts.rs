//! Users, groups and tokens through the command line against a real three-replica VLDB
//! started with the cell's token key: `pts` as `--localauth`, `login` with right and
//! wrong passwords, `tokens` and `unlog`, and who may change the cell.
//! Invariant: only an administrator's token (or `--localauth`) changes the cell; a
//! refusal is one line on stderr and a non-zero exit.

use std::path::Path;
use std::process::Output;

use harness::TestCell;
use proto::{PrincipalId, SealedToken, Timestamp, TokenKey};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
const CELL: &str = harness::pair::CELL;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The command succeeded; returns its standard output.
fn ok(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// The command failed with one line on stderr; returns it.
fn refused(output: Output, what: &str) -> String {
    assert!(
        !output.status.success(),
        "{what} succeeded: {}",
        text(&output.stdout)
    );
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: not one line: {stderr}");
    assert!(lines[0].starts_with("holdfast: "), "{what}: {stderr}");
    lines[0].to_owned()
}

fn write_password(dir: &Path, name: &str, password: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{password}\n")).unwrap();
    path.to_string_lossy().into_owned()
}

const NEEDS_ADMIN: &str = "needs a member of system:administrators";

#[test]
fn users_groups_tokens_and_administrators() {
    let mut cell = TestCell::start_keyed_vldb(BIN).unwrap();
    cell.start_fileserver().unwrap();
    let dir = cell.dir.path().to_owned();
    let root = cell.token_dir("root").unwrap();
    let alice_dir = cell.token_dir("alice").unwrap();
    let admin_dir = cell.token_dir("admin").unwrap();
    let nobody = cell.token_dir("nobody").unwrap();
    let run = |tokens: &Path, args: &[&str]| cell.holdfast_with_tokens(tokens, args).unwrap();
    let alice_pw = write_password(&dir, "alice.pw", "correct horse");
    let admin_pw = write_password(&dir, "admin.pw", "battery staple");
    let wrong_pw = write_password(&dir, "wrong.pw", "correct hearse");

    // The protection database, as root on a server host (`--localauth`, the key found
    // beside the cell file).
    let created = ok(
        run(
            &root,
            &[
                "pts",
                "--localauth",
                "createuser",
                "alice",
                "--password-file",
                &alice_pw,
            ],
        ),
        "createuser alice",
    );
    assert_eq!(created, "User alice has id 1\n");
    let created = ok(
        run(
            &root,
            &[
                "pts",
                "--localauth",
                "createuser",
                "admin",
                "--id",
                "500",
                "--password-file",
                &admin_pw,
            ],
        ),
        "createuser admin",
    );
    assert_eq!(created, "User admin has id 500\n");
    let created = ok(
        run(&root, &["pts", "--localauth", "creategroup", "staff"]),
        "creategroup staff",
    );
    assert_eq!(created, "Group staff has id -205\n");
    for (user, group) in [("alice", "staff"), ("admin", "system:administrators")] {
        ok(
            run(&root, &["pts", "--localauth", "adduser", user, group]),
            "adduser",
        );
    }
    let line = refused(
        run(&root, &["pts", "--localauth", "adduser", "alice", "staff"]),
        "adduser twice",
    );
    assert!(line.contains("already a member of staff"), "{line}");
    let line = refused(
        run(&root, &["pts", "--localauth", "createuser", "Alice!"]),
        "createuser with a bad name",
    );
    assert!(line.contains("bad user name"), "{line}");
    let line = refused(
        run(&root, &["pts", "--localauth", "createuser", "alice"]),
        "createuser twice",
    );
    assert!(line.contains("alice already exists"), "{line}");
    let line = refused(
        run(&root, &["pts", "membership", "carol"]),
        "membership of nobody",
    );
    assert!(line.contains("no user or group named \"carol\""), "{line}");

    // Lookups are open to all, no token needed.
    let groups = ok(run(&nobody, &["pts", "membership", "alice"]), "membership");
    assert_eq!(groups, "Groups alice is a member of:\n  staff\n");
    let members = ok(run(&nobody, &["pts", "membership", "staff"]), "membership");
    assert_eq!(members, "Members of staff:\n  alice\n");
    let list = ok(run(&nobody, &["pts", "listentries"]), "listentries");
    for (name, id) in [
        ("system:anyuser", "-101"),
        ("system:administrators", "-204"),
        ("staff", "-205"),
        ("alice", "1"),
        ("admin", "500"),
    ] {
        assert!(
            list.lines()
                .any(|l| l.split_whitespace().take(2).eq([name, id])),
            "{name} {id} missing from:\n{list}"
        );
    }

    // A login with the right password: a token the cell's key verifies, with the
    // user's id and groups, kept 0600 in the user's token directory.
    let said = ok(
        run(
            &alice_dir,
            &["login", "alice", "--password-file", &alice_pw],
        ),
        "login alice",
    );
    assert!(
        said.starts_with(&format!(
            "Token for alice (id 1) in cell {CELL}, valid until "
        )),
        "{said}"
    );
    let token_file = alice_dir.join(format!("token.{CELL}"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let token = SealedToken(std::fs::read(&token_file).unwrap());
    let key = TokenKey::load(&cell.token_key_path()).unwrap();
    let body = key.verifier(CELL).verify(&token, Timestamp::now()).unwrap();
    assert_eq!(
        (body.user.as_str(), body.id, body.groups.as_slice()),
        ("alice", PrincipalId(1), [PrincipalId(-205)].as_slice())
    );
    let lifetime = body.expiry.secs - body.issued.secs;
    assert!(
        (24 * 3600..=25 * 3600).contains(&lifetime),
        "lifetime {lifetime} s"
    );
    let listed = ok(run(&alice_dir, &["tokens"]), "tokens");
    assert!(
        listed.starts_with(&format!("User alice (id 1) in cell {CELL}: expires ")),
        "{listed}"
    );

    // A wrong password and an unknown user get the same answer, and no token.
    for user in ["alice", "mallory"] {
        let line = refused(
            run(&nobody, &["login", user, "--password-file", &wrong_pw]),
            "login with a wrong password",
        );
        assert_eq!(line, "holdfast: unknown user or wrong password");
    }
    assert!(std::fs::read_dir(&nobody).unwrap().next().is_none());

    // Neither a user's token nor no token changes the cell.
    for (tokens, who) in [(&alice_dir, "alice"), (&nobody, "nobody")] {
        let line = refused(
            run(tokens, &["vos", "create", "vol.a"]),
            &format!("vos create as {who}"),
        );
        assert!(line.contains(NEEDS_ADMIN), "{who}: {line}");
        let line = refused(
            run(tokens, &["pts", "createuser", "bob"]),
            &format!("pts createuser as {who}"),
        );
        assert!(line.contains(NEEDS_ADMIN), "{who}: {line}");
    }
    // A user may set its own password, and no one else's.
    let new_pw = write_password(&dir, "alice.new", "tr0ub4dor");
    ok(
        run(
            &alice_dir,
            &["pts", "setpassword", "alice", "--password-file", &new_pw],
        ),
        "alice sets her own password",
    );
    let line = refused(
        run(
            &alice_dir,
            &["pts", "setpassword", "admin", "--password-file", &new_pw],
        ),
        "alice sets admin's password",
    );
    assert!(line.contains(NEEDS_ADMIN), "{line}");
    refused(
        run(&nobody, &["login", "alice", "--password-file", &alice_pw]),
        "login with the old password",
    );

    // An administrator's token does.
    ok(
        run(
            &admin_dir,
            &["login", "admin", "--password-file", &admin_pw],
        ),
        "login admin",
    );
    let created = ok(run(&admin_dir, &["vos", "create", "vol.a"]), "vos create");
    assert!(created.contains("created as vol.a"), "{created}");
    ok(
        run(&admin_dir, &["pts", "createuser", "bob"]),
        "pts createuser as admin",
    );
    ok(
        run(&admin_dir, &["pts", "removeuser", "alice", "staff"]),
        "removeuser",
    );
    let groups = ok(run(&nobody, &["pts", "membership", "alice"]), "membership");
    assert_eq!(groups, "alice has no memberships\n");

    // `unlog` drops the token: the administrator is nobody again.
    let said = ok(run(&admin_dir, &["unlog"]), "unlog");
    assert_eq!(said, format!("Token for cell {CELL} dropped\n"));
    assert_eq!(
        ok(run(&admin_dir, &["tokens"]), "tokens"),
        "No tokens: run `holdfast login USER`\n"
    );
    let line = refused(
        run(&admin_dir, &["vos", "remove", "vol.a"]),
        "vos remove after unlog",
    );
    assert!(line.contains(NEEDS_ADMIN), "{line}");
    // Refused before its fileserver was asked: the volume is still there.
    let listed = ok(run(&nobody, &["vos", "listvol"]), "vos listvol");
    assert!(listed.contains("vol.a"), "{listed}");
    ok(
        run(&root, &["vos", "--localauth", "remove", "vol.a"]),
        "vos remove --localauth",
    );
}
