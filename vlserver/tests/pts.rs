//! The protection database in the VLDB's tables: names, ids, members, limits, deletion,
//! and that replaying the same commands, or installing a snapshot, gives the same tables.

mod common;

use proto::{ErrorCode, PrincipalId, PtsEntry};
use vlserver::{Applied, Command, Outcome, Store, StoreLimits, VldbError};

fn open(dir: &tempfile::TempDir, name: &str, limits: StoreLimits) -> Store {
    Store::open(&dir.path().join(name), limits).unwrap()
}

fn apply(store: &Store, command: Command) -> Result<Applied, VldbError> {
    store.apply_alone(&command)
}

fn code(result: Result<Applied, VldbError>) -> ErrorCode {
    match result {
        Err(VldbError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn user(name: &str, id: Option<i32>) -> Command {
    Command::PtsCreateUser {
        name: name.into(),
        id: id.map(PrincipalId),
        password: Some(format!("$argon2id$hash-of-{name}")),
    }
}

fn group(name: &str, id: Option<i32>) -> Command {
    Command::PtsCreateGroup {
        name: name.into(),
        id: id.map(PrincipalId),
    }
}

fn add(user: &str, group: &str) -> Command {
    Command::PtsAddUser {
        user: user.into(),
        group: group.into(),
    }
}

fn created(result: Result<Applied, VldbError>) -> PtsEntry {
    match result.unwrap() {
        Applied::PtsEntry(entry) => entry,
        other => panic!("expected an entry, got {other:?}"),
    }
}

fn names(entries: Vec<PtsEntry>) -> Vec<String> {
    entries.into_iter().map(|e| e.name).collect()
}

#[test]
fn ids_are_allocated_upward_for_users_and_downward_for_groups_and_never_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "vldb.redb", StoreLimits::default());
    assert_eq!(
        created(apply(&store, user("alice", None))).id,
        PrincipalId(1)
    );
    assert_eq!(
        created(apply(&store, group("staff", None))).id,
        PrincipalId(-205)
    );
    // A given id moves the counter past it; a deleted id is not allocated again.
    assert_eq!(
        created(apply(&store, user("bob", Some(32765)))).id,
        PrincipalId(32765)
    );
    assert_eq!(
        created(apply(&store, user("carol", None))).id,
        PrincipalId(32767),
        "32766 is anonymous's"
    );
    apply(
        &store,
        Command::PtsDelete {
            name: "carol".into(),
        },
    )
    .unwrap();
    assert_eq!(
        created(apply(&store, user("dave", None))).id,
        PrincipalId(32768)
    );
    assert_eq!(
        created(apply(&store, group("alice:friends", Some(-300)))).id,
        PrincipalId(-300)
    );
    assert_eq!(
        created(apply(&store, group("ops", None))).id,
        PrincipalId(-301)
    );
    // Reopened, the counters stand.
    drop(store);
    let store = open(&dir, "vldb.redb", StoreLimits::default());
    assert_eq!(
        created(apply(&store, user("erin", None))).id,
        PrincipalId(32769)
    );
    assert_eq!(
        created(apply(&store, group("dev", None))).id,
        PrincipalId(-302)
    );
}

#[test]
fn bad_names_ids_duplicates_and_missing_entries_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "vldb.redb", StoreLimits::default());
    apply(&store, user("alice", None)).unwrap();
    apply(&store, group("staff", None)).unwrap();
    let reason = |code: ErrorCode| match code {
        ErrorCode::PtsRefused { reason } => reason,
        other => panic!("expected PtsRefused, got {other:?}"),
    };
    for bad in ["", "Alice", "a b", "a:b", &"x".repeat(65)] {
        assert!(reason(code(apply(&store, user(bad, None)))).contains("bad user name"));
    }
    for bad in ["", "a::b", ":b", "a:", "Staff"] {
        assert!(reason(code(apply(&store, group(bad, None)))).contains("bad group name"));
    }
    assert!(reason(code(apply(&store, group("system:mine", None)))).contains("built-in"));
    assert!(
        reason(code(apply(&store, user("bob", Some(32766))))).contains("anonymous"),
        "anonymous's id"
    );
    assert!(reason(code(apply(&store, user("bob", Some(0))))).contains("not allowed"));
    assert!(reason(code(apply(&store, group("g", Some(-204))))).contains("-205 or lower"));
    assert!(reason(code(apply(&store, group("g", Some(5))))).contains("-205 or lower"));
    assert_eq!(
        code(apply(&store, user("alice", None))),
        ErrorCode::PrincipalExists {
            name: "alice".into()
        }
    );
    assert_eq!(
        code(apply(&store, user("bob", Some(1)))),
        ErrorCode::PrincipalExists {
            name: "user id 1".into()
        }
    );
    assert!(reason(code(apply(&store, group("system:anyuser", None)))).contains("built-in"));
    assert_eq!(
        code(apply(&store, group("nobody:friends", None))),
        ErrorCode::NoSuchPrincipal {
            name: "nobody".into()
        }
    );
    assert_eq!(
        code(apply(&store, add("alice", "nosuch"))),
        ErrorCode::NoSuchPrincipal {
            name: "nosuch".into()
        }
    );
    assert!(reason(code(apply(&store, add("staff", "staff")))).contains("is a group"));
    assert!(reason(code(apply(&store, add("alice", "alice")))).contains("is a user"));
    assert!(reason(code(apply(&store, add("alice", "system:anyuser")))).contains("implicit"));
    assert!(
        reason(code(apply(
            &store,
            Command::PtsDelete {
                name: "system:administrators".into()
            }
        )))
        .contains("built in")
    );
    assert!(
        reason(code(apply(
            &store,
            Command::PtsRemoveUser {
                user: "alice".into(),
                group: "staff".into()
            }
        )))
        .contains("not a member")
    );
    // Nothing refused left a trace.
    assert_eq!(
        names(store.pts_entries().unwrap()),
        [
            "system:anyuser",
            "system:authuser",
            "system:administrators",
            "staff",
            "alice"
        ]
    );
}

#[test]
fn members_are_kept_both_ways_and_deletion_removes_every_membership() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir, "vldb.redb", StoreLimits::default());
    for command in [
        user("alice", None),
        user("bob", None),
        group("staff", None),
        group("alice:friends", None),
        add("alice", "staff"),
        add("bob", "staff"),
        add("bob", "alice:friends"),
        add("alice", "system:administrators"),
    ] {
        apply(&store, command).unwrap();
    }
    assert_eq!(
        names(store.pts_membership("staff").unwrap()),
        ["alice", "bob"]
    );
    assert_eq!(
        names(store.pts_membership("alice").unwrap()),
        ["staff", "system:administrators"]
    );
    assert_eq!(
        names(store.pts_membership("system:administrators").unwrap()),
        ["alice"]
    );
    let credentials = store.pts_credentials("bob").unwrap().unwrap();
    assert_eq!(credentials.id, PrincipalId(2));
    assert_eq!(credentials.groups, [PrincipalId(-206), PrincipalId(-205)]);
    assert_eq!(
        credentials.password.as_deref(),
        Some("$argon2id$hash-of-bob")
    );
    assert!(store.pts_credentials("staff").unwrap().is_none());
    assert!(store.pts_credentials("nobody").unwrap().is_none());
    assert!(matches!(
        store.pts_membership("system:anyuser"),
        Err(VldbError::Refused(ErrorCode::PtsRefused { .. }))
    ));

    // alice owns alice:friends: she stays until it is gone.
    let delete = |name: &str| {
        apply(
            &store,
            Command::PtsDelete {
                name: name.to_owned(),
            },
        )
    };
    assert!(matches!(
        code(delete("alice")),
        ErrorCode::PtsRefused { reason } if reason.contains("alice:friends")
    ));
    delete("alice:friends").unwrap();
    assert_eq!(names(store.pts_membership("bob").unwrap()), ["staff"]);
    delete("alice").unwrap();
    assert_eq!(names(store.pts_membership("staff").unwrap()), ["bob"]);
    assert!(
        store
            .pts_membership("system:administrators")
            .unwrap()
            .is_empty()
    );
    delete("staff").unwrap();
    assert!(store.pts_membership("bob").unwrap().is_empty());
    assert!(
        store
            .pts_credentials("bob")
            .unwrap()
            .unwrap()
            .groups
            .is_empty()
    );

    apply(
        &store,
        Command::PtsSetPassword {
            user: "bob".into(),
            password: "$argon2id$new".into(),
        },
    )
    .unwrap();
    let bob = store.pts_credentials("bob").unwrap().unwrap();
    assert_eq!(bob.password.as_deref(), Some("$argon2id$new"));
}

#[test]
fn limits_refuse_instead_of_growing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits {
        principals_max: 4,
        members_per_group_max: 2,
        groups_per_user_max: 1,
        ..StoreLimits::default()
    };
    let store = open(&dir, "vldb.redb", limits);
    for command in [
        user("a", None),
        user("b", None),
        user("c", None),
        group("g", None),
    ] {
        apply(&store, command).unwrap();
    }
    let full = |code: ErrorCode, what: &str| match code {
        ErrorCode::PtsRefused { reason } => assert!(reason.contains(what), "{reason}"),
        other => panic!("expected PtsRefused, got {other:?}"),
    };
    full(code(apply(&store, user("d", None))), "full");
    full(code(apply(&store, group("h", None))), "full");
    apply(&store, add("a", "g")).unwrap();
    apply(&store, add("b", "g")).unwrap();
    full(code(apply(&store, add("c", "g"))), "2 members");
    full(
        code(apply(&store, add("a", "system:administrators"))),
        "1 groups",
    );
}

/// The commands of a small protection database, with refusals among them.
fn history() -> Vec<Command> {
    vec![
        user("alice", None),
        user("bob", Some(77)),
        group("staff", None),
        group("alice:friends", None),
        add("alice", "staff"),
        add("bob", "staff"),
        add("bob", "staff"),
        add("bob", "alice:friends"),
        add("alice", "system:administrators"),
        Command::PtsRemoveUser {
            user: "alice".into(),
            group: "staff".into(),
        },
        user("Bad", None),
        Command::PtsDelete {
            name: "alice:friends".into(),
        },
        group("ops", None),
        add("alice", "ops"),
    ]
}

#[test]
fn replaying_the_log_makes_the_same_tables_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let a = open(&dir, "a.redb", StoreLimits::default());
    let b = open(&dir, "b.redb", StoreLimits::default());
    let mut answers = [Vec::new(), Vec::new()];
    for (index, command) in history().iter().enumerate() {
        let mark = (index as u64).to_le_bytes();
        for (store, answers) in [&a, &b].into_iter().zip(answers.iter_mut()) {
            let Outcome(outcome) = store
                .apply(command, &mark, state::Millis(index as u64))
                .unwrap();
            answers.push(outcome);
        }
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0].iter().filter(|o| o.is_err()).count(), 2);
    assert_eq!(a.image().unwrap(), b.image().unwrap());
}

#[test]
fn a_snapshot_carries_the_protection_database() {
    let dir = tempfile::tempdir().unwrap();
    let source = open(&dir, "source.redb", StoreLimits::default());
    for command in history() {
        let _ = apply(&source, command);
    }
    let (mark, image) = source.image().unwrap();
    let target = open(&dir, "target.redb", StoreLimits::default());
    apply(&target, user("stale", None)).unwrap();
    target
        .install_image(&image, &mark.unwrap_or_default(), b"snapshot", 9)
        .unwrap();
    assert_eq!(target.pts_entries().unwrap(), source.pts_entries().unwrap());
    assert_eq!(
        names(target.pts_membership("bob").unwrap()),
        names(source.pts_membership("bob").unwrap())
    );
    assert_eq!(target.image().unwrap().1, image);
    // The counters came along: the next ids are the source's.
    assert_eq!(
        created(apply(&target, user("next", None))),
        created(apply(&source, user("next", None)))
    );
}

#[test]
fn a_format_2_file_and_image_are_read_with_an_empty_protection_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vldb.redb");
    let store = Store::open(&path, StoreLimits::default()).unwrap();
    let (_, image) = store.image().unwrap();
    drop(store);
    common::as_format_2_file(&path);
    let store = Store::open(&path, StoreLimits::default()).unwrap();
    assert!(!store.taken_over());
    assert_eq!(store.pts_entries().unwrap().len(), 3, "the built-in groups");
    apply(&store, user("alice", None)).unwrap();
    // A format 2 image (without the protection database's fields) still installs, and
    // empties the protection database as the state it describes had none.
    let format_2_image = &image[..image.len() - 4];
    store
        .install_image(format_2_image, b"mark", b"snapshot", 3)
        .unwrap();
    assert_eq!(store.pts_entries().unwrap().len(), 3);
    assert!(matches!(
        store.install_image(&image[..image.len() - 2], b"mark", b"snapshot", 4),
        Err(VldbError::Corrupt { .. })
    ));
}
