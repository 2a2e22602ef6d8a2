//! ListKeys: pages, filters and revoked keys kept for audit.

use std::collections::HashSet;

use keygate_proto::v1 as pb;
use tonic::Code;

use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

async fn pages_walk_every_key_once_in_creation_order(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(s.org_key("org_a", &[]).await.0.key_id);
        s.advance(chrono::Duration::seconds(1));
    }
    s.org_key("org_b", &[]).await;
    let mut admin = s.admin().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    for page in 0.. {
        let req = pb::ListKeysRequest {
            organization_id: "org_a".into(),
            page_size: 2,
            page_token: token,
            ..Default::default()
        };
        let resp = admin
            .list_keys(as_key(&s.admin_token, req))
            .await
            .unwrap()
            .into_inner();
        assert!(resp.keys.len() <= 2);
        seen.extend(resp.keys.into_iter().map(|k| k.key_id));
        token = resp.next_page_token;
        if token.is_empty() {
            assert_eq!(page, 2);
            break;
        }
    }
    assert_eq!(seen, created);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 5);
}

async fn page_tokens_are_tamper_evident_and_bound_to_the_query(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    for _ in 0..3 {
        s.org_key("org_a", &[]).await;
    }
    let mut admin = s.admin().await;
    let first = pb::ListKeysRequest {
        organization_id: "org_a".into(),
        page_size: 1,
        ..Default::default()
    };
    let token = admin
        .list_keys(as_key(&s.admin_token, first.clone()))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!token.is_empty());
    let mut tampered = token.clone().into_bytes();
    tampered[2] = if tampered[2] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (bad_token, org) in [
        (tampered.as_str(), "org_a"),
        ("garbage", "org_a"),
        (token.as_str(), "org_b"),
    ] {
        let req = pb::ListKeysRequest {
            organization_id: org.into(),
            page_size: 1,
            page_token: bad_token.into(),
            ..Default::default()
        };
        let err = admin
            .list_keys(as_key(&s.admin_token, req))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with("page_token:"),
            "{}",
            err.message()
        );
    }
}

async fn revoked_keys_are_listed_only_on_request_and_mode_filters(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (live, _) = s.org_key("org_a", &[]).await;
    let test = s
        .create_key(pb::CreateKeyRequest {
            name: "staging".into(),
            organization_id: "org_a".into(),
            mode: pb::Mode::Test as i32,
            ..Default::default()
        })
        .await
        .0;
    let mut admin = s.admin().await;
    admin
        .revoke_key(as_key(
            &s.admin_token,
            pb::RevokeKeyRequest {
                key_id: live.key_id.clone(),
                reason: "rotated out".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let list = |include_revoked: bool, mode: pb::Mode| pb::ListKeysRequest {
        organization_id: "org_a".into(),
        include_revoked,
        mode: mode as i32,
        ..Default::default()
    };
    let ids = |r: pb::ListKeysResponse| r.keys.into_iter().map(|k| k.key_id).collect::<Vec<_>>();
    let active = admin
        .list_keys(as_key(&s.admin_token, list(false, pb::Mode::Unspecified)))
        .await
        .unwrap();
    assert_eq!(ids(active.into_inner()), vec![test.key_id.clone()]);
    let all = admin
        .list_keys(as_key(&s.admin_token, list(true, pb::Mode::Unspecified)))
        .await
        .unwrap()
        .into_inner();
    let revoked = all
        .keys
        .iter()
        .find(|k| k.key_id == live.key_id)
        .expect("revoked key listed for audit");
    assert_eq!(revoked.status(), pb::KeyStatus::Revoked);
    assert!(revoked.revoked_at.is_some());
    assert_eq!(all.keys.len(), 2);
    let live_only = admin
        .list_keys(as_key(&s.admin_token, list(true, pb::Mode::Live)))
        .await
        .unwrap();
    assert_eq!(ids(live_only.into_inner()), vec![live.key_id.clone()]);
}

on_both_backends!(
    pages_walk_every_key_once_in_creation_order,
    page_tokens_are_tamper_evident_and_bound_to_the_query,
    revoked_keys_are_listed_only_on_request_and_mode_filters,
);
