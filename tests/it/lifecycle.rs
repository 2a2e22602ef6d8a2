//! The key lifecycle over KeyAdmin, and what Authorize sees after each change.

use chrono::Duration;
use keygate::store::EventLog;
use keygate_core::event::EventKind;
use keygate_proto::v1 as pb;
use tonic::Code;

use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

const ROUTE: &str = "POST /v1/checkouts";

fn grace(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

async fn kinds_for(s: &TestServer, key_id: &str) -> Vec<(EventKind, String, String)> {
    let events = s.store.events_after(0, 1000).await.unwrap();
    events
        .into_iter()
        .filter(|e| e.key_id.to_string() == key_id)
        .map(|e| (e.kind, e.actor, e.reason))
        .collect()
}

async fn rotation_without_grace_kills_the_old_secret_at_once(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, old) = s.org_key("org_a", &["checkout:create"]).await;
    assert_eq!(
        s.authorize(&old, ROUTE, "").await.decision(),
        pb::Decision::Allow,
        "warm the cache"
    );
    let req = pb::RotateKeyRequest {
        key_id: key.key_id.clone(),
        grace_period: None,
        ..Default::default()
    };
    let resp = s
        .admin()
        .await
        .rotate_key(as_key(&s.admin_token, req))
        .await
        .unwrap()
        .into_inner();
    let rotated = resp.key.unwrap();
    assert_eq!(rotated.key_id, key.key_id, "same key id");
    assert_eq!(rotated.prefix, key.prefix);
    assert!(rotated.rotated_at.is_some());
    assert_ne!(resp.token, old);
    assert_eq!(
        s.authorize(&old, ROUTE, "").await.reason(),
        pb::DenyReason::ExpiredToken
    );
    assert_eq!(s.authorize(&old, ROUTE, "").await.http_status, 401);
    assert_eq!(
        s.authorize(&resp.token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
}

async fn rotation_with_grace_lets_both_secrets_work_until_it_ends(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, old) = s.org_key("org_a", &["checkout:create"]).await;
    let req = pb::RotateKeyRequest {
        key_id: key.key_id.clone(),
        grace_period: grace(3600),
        ..Default::default()
    };
    let resp = s
        .admin()
        .await
        .rotate_key(as_key(&s.admin_token, req))
        .await
        .unwrap()
        .into_inner();
    let ends = resp.previous_secret_expires_at.unwrap();
    assert_eq!(ends.seconds, crate::harness::epoch().timestamp() + 3600);
    assert_eq!(
        resp.key.as_ref().unwrap().previous_secret_expires_at,
        Some(ends)
    );
    s.advance(Duration::minutes(59));
    assert_eq!(
        s.authorize(&old, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    assert_eq!(
        s.authorize(&resp.token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    s.advance(Duration::minutes(1));
    assert_eq!(
        s.authorize(&old, ROUTE, "").await.reason(),
        pb::DenyReason::ExpiredToken
    );
    assert_eq!(
        s.authorize(&resp.token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    let got = s
        .admin()
        .await
        .get_key(as_key(
            &s.admin_token,
            pb::GetKeyRequest { key_id: key.key_id },
        ))
        .await;
    assert_eq!(
        got.unwrap().into_inner().previous_secret_expires_at,
        None,
        "grace period is over"
    );
}

async fn revocation_is_immediate_final_and_audited(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow,
        "warm the cache"
    );
    let mut admin = s.admin().await;
    let req = pb::RevokeKeyRequest {
        key_id: key.key_id.clone(),
        reason: "leaked in a public repo".into(),
        ..Default::default()
    };
    let revoked = admin
        .revoke_key(as_key(&s.admin_token, req))
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(revoked.status(), pb::KeyStatus::Revoked);
    assert!(revoked.revoked_at.is_some());
    assert_eq!(revoked.revoked_reason, "leaked in a public repo");
    let r = s.authorize(&token, ROUTE, "").await;
    assert_eq!(
        (r.reason(), r.http_status),
        (pb::DenyReason::InvalidToken, 401)
    );

    let id = || key.key_id.clone();
    let err = admin
        .enable_key(as_key(
            &s.admin_token,
            pb::EnableKeyRequest { key_id: id() },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = admin
        .rotate_key(as_key(
            &s.admin_token,
            pb::RotateKeyRequest {
                key_id: id(),
                grace_period: None,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = admin
        .revoke_key(as_key(
            &s.admin_token,
            pb::RevokeKeyRequest {
                key_id: id(),
                reason: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("revoked"), "{}", err.message());

    let events = kinds_for(&s, &key.key_id).await;
    let admin_id = events[0].1.clone();
    assert_eq!(
        events,
        vec![
            (EventKind::Created, admin_id.clone(), String::new()),
            (
                EventKind::Revoked,
                admin_id,
                "leaked in a public repo".into()
            ),
        ],
        "failed attempts leave no events"
    );
}

async fn disable_and_enable_are_reversible(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    let mut admin = s.admin().await;
    let id = || key.key_id.clone();
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    let k = admin
        .disable_key(as_key(
            &s.admin_token,
            pb::DisableKeyRequest {
                key_id: id(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        k.into_inner().key.unwrap().status(),
        pb::KeyStatus::Disabled
    );
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.reason(),
        pb::DenyReason::InvalidToken
    );
    let err = admin
        .disable_key(as_key(
            &s.admin_token,
            pb::DisableKeyRequest {
                key_id: id(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let k = admin
        .enable_key(as_key(
            &s.admin_token,
            pb::EnableKeyRequest { key_id: id() },
        ))
        .await
        .unwrap();
    assert_eq!(k.into_inner().status(), pb::KeyStatus::Active);
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    let kinds: Vec<_> = kinds_for(&s, &key.key_id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        kinds,
        vec![EventKind::Created, EventKind::Disabled, EventKind::Enabled]
    );
}

async fn deleted_keys_are_gone_but_their_events_stay(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    let mut admin = s.admin().await;
    admin
        .delete_key(as_key(
            &s.admin_token,
            pb::DeleteKeyRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.reason(),
        pb::DenyReason::InvalidToken
    );
    let err = admin
        .get_key(as_key(
            &s.admin_token,
            pb::GetKeyRequest {
                key_id: key.key_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = admin
        .delete_key(as_key(
            &s.admin_token,
            pb::DeleteKeyRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(err.unwrap_err().code(), Code::NotFound);
    let kinds: Vec<_> = kinds_for(&s, &key.key_id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(kinds, vec![EventKind::Created, EventKind::Deleted]);
}

async fn event_sequences_increase_without_gaps(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s.org_key("org_a", &[]).await;
    let mut admin = s.admin().await;
    admin
        .disable_key(as_key(
            &s.admin_token,
            pb::DisableKeyRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    s.org_key("org_b", &[]).await;
    let events = s.store.events_after(0, 1000).await.unwrap();
    let seqs: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    assert_eq!(events[0].actor, "bootstrap");
    assert_eq!(s.store.events_after(2, 1).await.unwrap()[0].sequence, 3);
}

async fn secrets_are_returned_once_and_stored_nowhere(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    let secret = &token[key.prefix.len()..token.len() - 6];
    assert_eq!(secret.len(), 43);
    let mut admin = s.admin().await;
    let rotated = admin
        .rotate_key(as_key(
            &s.admin_token,
            pb::RotateKeyRequest {
                key_id: key.key_id.clone(),
                grace_period: grace(60),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let new_secret = &rotated.token[key.prefix.len()..rotated.token.len() - 6];
    let got = admin
        .get_key(as_key(
            &s.admin_token,
            pb::GetKeyRequest {
                key_id: key.key_id.clone(),
            },
        ))
        .await
        .unwrap();
    let listed = admin
        .list_keys(as_key(&s.admin_token, pb::ListKeysRequest::default()))
        .await
        .unwrap();
    for shown in [
        format!("{:?}", got.into_inner()),
        format!("{:?}", listed.into_inner()),
        format!("{:?}", rotated.key),
    ] {
        assert!(
            !shown.contains(secret) && !shown.contains(new_secret),
            "a secret leaked into a response"
        );
    }
    let dump = crate::harness::dump_database(&s).await;
    assert!(
        dump.contains(&key.key_id),
        "the dump does hold the key's row"
    );
    for needle in [secret, new_secret, token.as_str(), rotated.token.as_str()] {
        assert!(!dump.contains(needle), "a secret is stored in the database");
    }
}

on_both_backends!(
    rotation_without_grace_kills_the_old_secret_at_once,
    rotation_with_grace_lets_both_secrets_work_until_it_ends,
    revocation_is_immediate_final_and_audited,
    disable_and_enable_are_reversible,
    deleted_keys_are_gone_but_their_events_stay,
    event_sequences_increase_without_gaps,
    secrets_are_returned_once_and_stored_nowhere,
);
