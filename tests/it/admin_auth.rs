//! Who may call KeyAdmin, and organization isolation.

use keygate::pb::keygate::v1 as pb;
use tonic::{Code, Request};

use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

async fn admin_calls_need_a_valid_credential_and_the_right_scope(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut admin = s.admin().await;
    let err = admin
        .list_keys(Request::new(pb::ListKeysRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("MISSING_TOKEN"), "{}", err.message());

    let err = admin
        .list_keys(as_key("kg_live_nope", pb::ListKeysRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("INVALID_TOKEN") && !err.message().contains("kg_live_nope"),
        "{}",
        err.message()
    );

    let (_, reader) = s.org_key("org_a", &["api_key:read"]).await;
    admin
        .list_keys(as_key(&reader, pb::ListKeysRequest::default()))
        .await
        .expect("api_key:read may list");
    let req = pb::CreateKeyRequest {
        name: "x".into(),
        ..Default::default()
    };
    let err = admin.create_key(as_key(&reader, req)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("INSUFFICIENT_SCOPE") && err.message().contains("api_key:create"),
        "{}",
        err.message()
    );

    // x-api-key works as well as Authorization: Bearer.
    let mut req = Request::new(pb::ListKeysRequest::default());
    req.metadata_mut()
        .insert("x-api-key", reader.parse().unwrap());
    admin.list_keys(req).await.expect("x-api-key");
}

async fn admin_keys_obey_their_ip_allow_list(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, fenced) = s
        .create_key(pb::CreateKeyRequest {
            name: "vpn only".into(),
            organization_id: "org_a".into(),
            scopes: vec!["api_key:read".into()],
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            ..Default::default()
        })
        .await;
    let err = s
        .admin()
        .await
        .list_keys(as_key(&fenced, pb::ListKeysRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("IP_NOT_ALLOWED"),
        "{}",
        err.message()
    );
}

async fn another_organizations_keys_are_not_found(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, org_a_admin) = s.org_key("org_a", &["api_key:*"]).await;
    let (b_key, b_token) = s.org_key("org_b", &["checkout:create"]).await;
    let mut admin = s.admin().await;
    let id = || b_key.key_id.clone();
    let results = [
        admin
            .get_key(as_key(&org_a_admin, pb::GetKeyRequest { key_id: id() }))
            .await
            .map(drop),
        admin
            .rotate_key(as_key(
                &org_a_admin,
                pb::RotateKeyRequest {
                    key_id: id(),
                    grace_period: None,
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        admin
            .revoke_key(as_key(
                &org_a_admin,
                pb::RevokeKeyRequest {
                    key_id: id(),
                    reason: String::new(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        admin
            .disable_key(as_key(
                &org_a_admin,
                pb::DisableKeyRequest {
                    key_id: id(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        admin
            .enable_key(as_key(&org_a_admin, pb::EnableKeyRequest { key_id: id() }))
            .await
            .map(drop),
        admin
            .delete_key(as_key(
                &org_a_admin,
                pb::DeleteKeyRequest {
                    key_id: id(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        admin
            .list_keys(as_key(
                &org_a_admin,
                pb::ListKeysRequest {
                    organization_id: "org_b".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
        admin
            .create_key(as_key(
                &org_a_admin,
                pb::CreateKeyRequest {
                    name: "x".into(),
                    organization_id: "org_b".into(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
    ];
    for r in results {
        assert_eq!(r.unwrap_err().code(), Code::NotFound);
    }
    // Untouched: org B's key still works.
    assert_eq!(
        s.authorize(&b_token, "POST /v1/checkouts", "")
            .await
            .decision(),
        pb::Decision::Allow
    );

    // Listing shows only org A's keys, never SYSTEM keys.
    let listed = admin
        .list_keys(as_key(&org_a_admin, pb::ListKeysRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.keys.len(), 1);
    assert!(listed.keys.iter().all(|k| k.organization_id == "org_a"));
    // A SYSTEM key sees every organization and itself.
    let all = admin
        .list_keys(as_key(&s.admin_token, pb::ListKeysRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.keys.len(), 3);
    let only_b = admin
        .list_keys(as_key(
            &s.admin_token,
            pb::ListKeysRequest {
                organization_id: "org_b".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        only_b
            .keys
            .iter()
            .map(|k| k.key_id.as_str())
            .collect::<Vec<_>>(),
        vec![b_key.key_id.as_str()]
    );
}

async fn organization_keys_cannot_escalate(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, org_admin) = s.org_key("org_a", &["api_key:create", "links:read"]).await;
    let mut admin = s.admin().await;
    let create = |scopes: &[&str], tier: pb::KeyTier| pb::CreateKeyRequest {
        name: "child".into(),
        tier: tier as i32,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let err = admin
        .create_key(as_key(
            &org_admin,
            create(&["links:write"], pb::KeyTier::Organization),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("links:write"), "{}", err.message());
    let err = admin
        .create_key(as_key(&org_admin, create(&[], pb::KeyTier::System)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Within its own scopes it may, and the child lands in its organization.
    let child = admin
        .create_key(as_key(
            &org_admin,
            create(&["links:read"], pb::KeyTier::Organization),
        ))
        .await
        .unwrap()
        .into_inner();
    let child_key = child.key.unwrap();
    assert_eq!(child_key.organization_id, "org_a");
    assert_eq!(child_key.mode(), pb::Mode::Test, "mode defaults to TEST");
    assert!(child.token.starts_with("kg_test_"));
}

on_both_backends!(
    admin_calls_need_a_valid_credential_and_the_right_scope,
    admin_keys_obey_their_ip_allow_list,
    another_organizations_keys_are_not_found,
    organization_keys_cannot_escalate,
);
