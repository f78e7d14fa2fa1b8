//! The fileserver's access checks over the wire: requests with and without tokens
//! against access lists and mode bits, on a real server.

mod common;

use common::{Server, TIMEOUT, VOLUME, admin, admin_token, call_as, token};
use proto::rpc::Connection;
use proto::{
    AccessList, ClientId, ErrorCode, Fid, InstanceNonce, PrincipalId, ProtoError, Request,
    Response, Rights, SetAttrs, VnodeStatus, VolumeName,
};

fn status(answer: Result<Response, ProtoError>) -> VnodeStatus {
    match answer {
        Ok(Response::Status { status, .. } | Response::Entry { status, .. }) => status,
        other => panic!("expected a status, got {other:?}"),
    }
}

fn refused(answer: Result<Response, ProtoError>) -> ErrorCode {
    match answer {
        Err(ProtoError::Remote(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn volume_without_anyone(address: &str) -> Connection {
    let admin = admin(address).await;
    let request = Request::CreateVolume {
        id: VOLUME,
        name: VolumeName::parse("root.cell").unwrap(),
        quota_bytes: 0,
    };
    admin.call(request, TIMEOUT).await.unwrap();
    common::connect(
        address,
        common::cache_manager(ClientId::random(), InstanceNonce(1)),
        |_| {},
    )
    .await
}

fn create(dir: Fid, name: &str, mode: u32) -> Request {
    Request::Create {
        dir,
        name: name.into(),
        mode,
        uid: 0,
        gid: 0,
        exclusive: true,
    }
}

#[tokio::test]
async fn a_new_volume_is_its_administrators_and_lists_open_it_to_others() {
    let server = Server::in_tempdir().await;
    let client = volume_without_anyone(&server.address).await;
    let root = Fid::root(VOLUME);
    let (admin, alice) = (admin_token(), token("alice", 1001, &[]));
    // Without a token, or as a user the list does not name: nothing.
    let anonymous = client.call(create(root, "f", 0o644), TIMEOUT).await;
    assert_eq!(refused(anonymous), ErrorCode::PermissionDenied);
    let answer = call_as(&client, &alice, Request::FetchStatus { fid: root }).await;
    assert_eq!(refused(answer), ErrorCode::PermissionDenied);
    match call_as(&client, &alice, Request::FetchRights { fid: root }).await {
        Ok(Response::Rights { rights, .. }) => assert_eq!(rights, Rights::NONE),
        other => panic!("{other:?}"),
    }
    // The administrator creates as the uid it asked for, and opens a directory.
    let dir = status(
        call_as(
            &client,
            &admin,
            Request::MakeDir {
                dir: root,
                name: "d".into(),
                mode: 0o777,
                uid: 0,
                gid: 0,
            },
        )
        .await,
    );
    assert_eq!(dir.uid, 0);
    let mut acl = AccessList::for_new_volume();
    acl.set(PrincipalId(1001), Rights::parse("rlidwk").unwrap(), false);
    let stored = call_as(
        &client,
        &alice,
        Request::StoreAcl {
            dir: dir.fid,
            acl: acl.clone(),
        },
    )
    .await;
    assert_eq!(refused(stored), ErrorCode::PermissionDenied);
    let stored = call_as(&client, &admin, Request::StoreAcl { dir: dir.fid, acl }).await;
    assert!(status(stored).data_version > dir.data_version);
    // Alice creates there as herself, whatever uid she asked for.
    let file = status(call_as(&client, &alice, create(dir.fid, "f", 0o600)).await);
    assert_eq!((file.uid, file.gid), (1001, dir.gid));
    // Special files are checked and owned alike.
    let fifo = |dir| Request::MakeNode {
        dir,
        name: "p".into(),
        kind: proto::FileKind::Fifo,
        mode: 0o644,
        uid: 0,
        gid: 0,
    };
    assert_eq!(
        refused(client.call(fifo(root), TIMEOUT).await),
        ErrorCode::PermissionDenied
    );
    let made = status(call_as(&client, &alice, fifo(dir.fid)).await);
    assert_eq!((made.uid, made.kind), (1001, proto::FileKind::Fifo));
    // Bob, with no entry, may not read it.
    let bob = token("bob", 1002, &[]);
    let read = Request::FetchData {
        fid: file.fid,
        offset: 0,
        length: 10,
    };
    assert_eq!(
        refused(call_as(&client, &bob, read.clone()).await),
        ErrorCode::PermissionDenied
    );
    assert!(call_as(&client, &alice, read.clone()).await.is_ok());
    // chmod by a non-owner: EPERM; a link into another directory: EXDEV.
    let chmod = Request::SetAttr {
        fid: file.fid,
        attrs: SetAttrs {
            mode: Some(0o644),
            ..SetAttrs::default()
        },
    };
    assert_eq!(
        refused(call_as(&client, &bob, chmod).await),
        ErrorCode::NotPermitted
    );
    let link = Request::Link {
        dir: root,
        name: "l".into(),
        target: file.fid,
    };
    assert_eq!(
        refused(call_as(&client, &admin, link).await),
        ErrorCode::CrossVolume
    );
    server.stop().await;
}
