//! Concurrent changes to one key never lose an update or leave two current secrets.

use keygate::store::EventLog;
use keygate_core::event::EventKind;
use keygate_proto::v1 as pb;
use tonic::Code;

use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

const N: usize = 12;

async fn concurrent_rotations_leave_exactly_one_current_secret(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, original) = s.org_key("org_a", &["checkout:create"]).await;
    let admin = s.admin().await;
    let mut tasks = Vec::new();
    for _ in 0..N {
        let mut admin = admin.clone();
        let req = as_key(
            &s.admin_token,
            pb::RotateKeyRequest {
                key_id: key.key_id.clone(),
                grace_period: None,
                ..Default::default()
            },
        );
        tasks.push(tokio::spawn(async move { admin.rotate_key(req).await }));
    }
    let mut tokens = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(resp) => tokens.push(resp.into_inner().token),
            Err(status) => assert_eq!(
                status.code(),
                Code::Aborted,
                "only a retryable conflict may fail: {status:?}"
            ),
        }
    }
    assert!(!tokens.is_empty());
    let mut working = 0;
    for token in tokens.iter().chain([&original]) {
        if s.authorize(token, "POST /v1/checkouts", "")
            .await
            .decision()
            == pb::Decision::Allow
        {
            working += 1;
        }
    }
    assert_eq!(working, 1, "exactly one current secret");
    let rotations = s
        .store
        .events_after(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventKind::Rotated);
    assert_eq!(
        rotations.count(),
        tokens.len(),
        "one event per successful rotation"
    );
}

async fn concurrent_revocations_record_one_revocation(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s.org_key("org_a", &[]).await;
    let admin = s.admin().await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut admin = admin.clone();
        let req = as_key(
            &s.admin_token,
            pb::RevokeKeyRequest {
                key_id: key.key_id.clone(),
                reason: format!("r{i}"),
                ..Default::default()
            },
        );
        tasks.push(tokio::spawn(async move { admin.revoke_key(req).await }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
        }
    }
    assert_eq!(ok, 1);
    let revocations = s
        .store
        .events_after(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == EventKind::Revoked);
    assert_eq!(revocations.count(), 1);
}

on_both_backends!(
    concurrent_rotations_leave_exactly_one_current_secret,
    concurrent_revocations_record_one_revocation
);
