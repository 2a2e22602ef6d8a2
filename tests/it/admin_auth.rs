//! Who may call KeyAdmin, and organization isolation.

use keygate_proto::v1 as pb;
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

/// Every KeyAdmin RPC needs its own scope: a key holding every other
/// api_key scope is refused with PERMISSION_DENIED naming the one it lacks,
/// and nothing changes.
async fn each_admin_rpc_needs_its_scope(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (target, target_token) = s.org_key("org_a", &["checkout:create"]).await;
    let all = [
        "api_key:create",
        "api_key:read",
        "api_key:update",
        "api_key:delete",
    ];
    let mut admin = s.admin().await;
    for needed in all {
        let others: Vec<&str> = all.iter().copied().filter(|s| *s != needed).collect();
        let (_, caller) = s.org_key("org_a", &others).await;
        let id = || target.key_id.clone();
        let calls: Vec<(&str, Result<(), tonic::Status>)> = match needed {
            "api_key:create" => vec![(
                "CreateKey",
                admin
                    .create_key(as_key(
                        &caller,
                        pb::CreateKeyRequest {
                            name: "x".into(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(drop),
            )],
            "api_key:read" => vec![
                (
                    "GetKey",
                    admin
                        .get_key(as_key(&caller, pb::GetKeyRequest { key_id: id() }))
                        .await
                        .map(drop),
                ),
                (
                    "ListKeys",
                    admin
                        .list_keys(as_key(&caller, pb::ListKeysRequest::default()))
                        .await
                        .map(drop),
                ),
                (
                    "ListKeyEvents",
                    admin
                        .list_key_events(as_key(&caller, pb::ListKeyEventsRequest::default()))
                        .await
                        .map(drop),
                ),
            ],
            "api_key:update" => vec![
                (
                    "RotateKey",
                    admin
                        .rotate_key(as_key(
                            &caller,
                            pb::RotateKeyRequest {
                                key_id: id(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(drop),
                ),
                (
                    "UpdateKey",
                    admin
                        .update_key(as_key(
                            &caller,
                            pb::UpdateKeyRequest {
                                key_id: id(),
                                name: "renamed".into(),
                                update_mask: Some(prost_types::FieldMask {
                                    paths: vec!["name".into()],
                                }),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(drop),
                ),
                (
                    "RevokeKey",
                    admin
                        .revoke_key(as_key(
                            &caller,
                            pb::RevokeKeyRequest {
                                key_id: id(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(drop),
                ),
                (
                    "DisableKey",
                    admin
                        .disable_key(as_key(
                            &caller,
                            pb::DisableKeyRequest {
                                key_id: id(),
                                ..Default::default()
                            },
                        ))
                        .await
                        .map(drop),
                ),
                (
                    "EnableKey",
                    admin
                        .enable_key(as_key(&caller, pb::EnableKeyRequest { key_id: id() }))
                        .await
                        .map(drop),
                ),
                (
                    "ExpirePreviousSecret",
                    admin
                        .expire_previous_secret(as_key(
                            &caller,
                            pb::ExpirePreviousSecretRequest { key_id: id() },
                        ))
                        .await
                        .map(drop),
                ),
            ],
            _ => vec![(
                "DeleteKey",
                admin
                    .delete_key(as_key(
                        &caller,
                        pb::DeleteKeyRequest {
                            key_id: id(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(drop),
            )],
        };
        for (rpc, result) in calls {
            let err = result.expect_err(rpc);
            assert_eq!(err.code(), Code::PermissionDenied, "{rpc}: {err:?}");
            assert!(
                err.message().contains(needed),
                "{rpc} names {needed}: {}",
                err.message()
            );
        }
    }
    // Nothing happened to the key.
    let r = s.authorize(&target_token, "POST /v1/checkouts", "").await;
    assert_eq!(r.decision(), pb::Decision::Allow);
    let key = s.get_key(&target.key_id).await;
    assert_eq!((key.name.as_str(), key.rotated_at), ("org_a key", None));
}

/// A key may not rotate (and so obtain the secret of), update or re-enable
/// a key holding scopes it lacks; it may still revoke or disable one.
async fn a_weaker_key_cannot_take_over_a_stronger_one(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, operator) = s
        .org_key("org_a", &["api_key:update", "checkout:create"])
        .await;
    let (strong, strong_token) = s.org_key("org_a", &["*:*"]).await;
    let (weak, _) = s.org_key("org_a", &["checkout:create"]).await;
    let mut admin = s.admin().await;
    let rotate = |key_id: &str, caller: &str| {
        as_key(
            caller,
            pb::RotateKeyRequest {
                key_id: key_id.into(),
                ..Default::default()
            },
        )
    };
    let err = admin
        .rotate_key(rotate(&strong.key_id, &operator))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("*:*"), "{}", err.message());
    let err = admin
        .update_key(as_key(
            &operator,
            pb::UpdateKeyRequest {
                key_id: strong.key_id.clone(),
                allowed_cidrs: vec!["0.0.0.0/0".into()],
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["allowed_cidrs".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The strong key is untouched: its secret still works.
    let r = s.authorize(&strong_token, "POST /v1/checkouts", "").await;
    assert_eq!(r.decision(), pb::Decision::Allow);
    assert_eq!(s.get_key(&strong.key_id).await.rotated_at, None);

    // Taking power away is allowed, giving it back is not.
    admin
        .disable_key(as_key(
            &operator,
            pb::DisableKeyRequest {
                key_id: strong.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("any admin may disable");
    let err = admin
        .enable_key(as_key(
            &operator,
            pb::EnableKeyRequest {
                key_id: strong.key_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Within its own scopes it may rotate.
    let rotated = admin
        .rotate_key(rotate(&weak.key_id, &operator))
        .await
        .expect("rotate a key it covers")
        .into_inner();
    assert!(!rotated.token.is_empty());

    // The same holds for SYSTEM keys: a narrow one can't rotate the bootstrap key.
    let (_, narrow_system) = s
        .create_key(pb::CreateKeyRequest {
            name: "rotation bot".into(),
            tier: pb::KeyTier::System as i32,
            scopes: vec!["api_key:update".into(), "api_key:read".into()],
            ..Default::default()
        })
        .await;
    let admin_id = s
        .admin()
        .await
        .list_keys(as_key(
            &s.admin_token,
            pb::ListKeysRequest {
                page_size: 1000,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .find(|k| k.name == "test admin")
        .unwrap()
        .key_id;
    let err = admin
        .rotate_key(rotate(&admin_id, &narrow_system))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

on_both_backends!(
    each_admin_rpc_needs_its_scope,
    a_weaker_key_cannot_take_over_a_stronger_one,
    admin_calls_need_a_valid_credential_and_the_right_scope,
    admin_keys_obey_their_ip_allow_list,
    another_organizations_keys_are_not_found,
    organization_keys_cannot_escalate,
);
