//! Every bad input gets INVALID_ARGUMENT naming the field, and changes nothing.

use chrono::Duration;
use keygate::store::EventLog;
use keygate_core::clock::Clock;
use keygate_proto::v1 as pb;
use tonic::Code;

use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

fn ts(t: chrono::DateTime<chrono::Utc>) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    })
}

async fn bad_create_requests_name_the_field_and_create_nothing(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let before = s.store.events_after(0, 1000).await.unwrap().len();
    let base = || pb::CreateKeyRequest {
        name: "backend".into(),
        organization_id: "org_a".into(),
        scopes: vec!["links:read".into()],
        ..Default::default()
    };
    let past = s.clock.now() - Duration::seconds(1);
    let cases: Vec<(&str, pb::CreateKeyRequest)> = vec![
        (
            "name",
            pb::CreateKeyRequest {
                name: String::new(),
                ..base()
            },
        ),
        (
            "name",
            pb::CreateKeyRequest {
                name: "n".repeat(201),
                ..base()
            },
        ),
        (
            "name",
            pb::CreateKeyRequest {
                name: "bell\u{7}".into(),
                ..base()
            },
        ),
        (
            "scopes",
            pb::CreateKeyRequest {
                scopes: vec!["links:read".into(), "links:view".into()],
                ..base()
            },
        ),
        (
            "scopes",
            pb::CreateKeyRequest {
                scopes: vec!["Links:read".into()],
                ..base()
            },
        ),
        (
            "allowed_cidrs",
            pb::CreateKeyRequest {
                allowed_cidrs: vec!["10.0.0.0/40".into()],
                ..base()
            },
        ),
        (
            "allowed_cidrs",
            pb::CreateKeyRequest {
                allowed_cidrs: vec!["intranet".into()],
                ..base()
            },
        ),
        ("tier", pb::CreateKeyRequest { tier: 42, ..base() }),
        ("mode", pb::CreateKeyRequest { mode: -1, ..base() }),
        (
            "organization_id",
            pb::CreateKeyRequest {
                organization_id: String::new(),
                ..base()
            },
        ),
        (
            "organization_id",
            pb::CreateKeyRequest {
                tier: pb::KeyTier::System as i32,
                ..base()
            },
        ),
        (
            "expires_at",
            pb::CreateKeyRequest {
                expires_at: ts(past),
                ..base()
            },
        ),
        (
            "rate_limit_per_minute",
            pb::CreateKeyRequest {
                rate_limit_per_minute: 2_000_000,
                ..base()
            },
        ),
    ];
    let mut admin = s.admin().await;
    for (field, req) in cases {
        let err = admin
            .create_key(as_key(&s.admin_token, req))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "expected {field}, got {}",
            err.message()
        );
    }
    assert_eq!(
        s.store.events_after(0, 1000).await.unwrap().len(),
        before,
        "nothing was written"
    );
    let listed = admin
        .list_keys(as_key(&s.admin_token, pb::ListKeysRequest::default()))
        .await
        .unwrap();
    assert_eq!(listed.into_inner().keys.len(), 1, "only the bootstrap key");
}

async fn bad_lifecycle_requests_name_the_field_and_change_nothing(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    let mut admin = s.admin().await;
    let eight_days = Some(prost_types::Duration {
        seconds: 8 * 86_400,
        nanos: 0,
    });
    let err = admin
        .rotate_key(as_key(
            &s.admin_token,
            pb::RotateKeyRequest {
                key_id: key.key_id.clone(),
                grace_period: eight_days,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("grace_period:"),
        "{}",
        err.message()
    );
    let err = admin
        .revoke_key(as_key(
            &s.admin_token,
            pb::RevokeKeyRequest {
                key_id: "not-a-uuid".into(),
                reason: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("key_id:"), "{}", err.message());
    let err = admin
        .revoke_key(as_key(
            &s.admin_token,
            pb::RevokeKeyRequest {
                key_id: key.key_id.clone(),
                reason: "r".repeat(501),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("reason:"), "{}", err.message());
    let err = admin
        .list_keys(as_key(
            &s.admin_token,
            pb::ListKeysRequest {
                page_size: 1001,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("page_size:"), "{}", err.message());
    let err = admin
        .get_key(as_key(
            &s.admin_token,
            pb::GetKeyRequest {
                key_id: uuid::Uuid::new_v4().to_string(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let r = s.authorize(&token, "POST /v1/checkouts", "").await;
    assert_eq!(r.decision(), pb::Decision::Allow, "the key is untouched");
    let got = admin
        .get_key(as_key(
            &s.admin_token,
            pb::GetKeyRequest { key_id: key.key_id },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rotated_at, None);
    assert_eq!(got.status(), pb::KeyStatus::Active);
}

/// AIP-134: without an update_mask, UpdateKey changes every field the
/// request sets and nothing else; `*` changes every field, clearing the
/// unset ones; a request that sets nothing and names nothing is refused.
async fn update_without_a_mask_changes_what_the_request_sets(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s
        .create_key(pb::CreateKeyRequest {
            name: "backend".into(),
            organization_id: "org_a".into(),
            scopes: vec!["links:read".into(), "links:write".into()],
            allowed_cidrs: vec!["10.0.0.0/8".into()],
            rate_limit_per_minute: 50,
            ..Default::default()
        })
        .await;
    let mut admin = s.admin().await;
    let update = |r: pb::UpdateKeyRequest| {
        as_key(
            &s.admin_token,
            pb::UpdateKeyRequest {
                key_id: key.key_id.clone(),
                ..r
            },
        )
    };
    let updated = admin
        .update_key(update(pb::UpdateKeyRequest {
            name: "backend (eu)".into(),
            rate_limit_per_minute: 70,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.name, "backend (eu)");
    assert_eq!(updated.rate_limit_per_minute, 70);
    assert_eq!(updated.scopes, key.scopes, "scopes were not set: unchanged");
    assert_eq!(updated.allowed_cidrs, vec!["10.0.0.0/8"]);

    let err = admin
        .update_key(update(pb::UpdateKeyRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("update_mask: nothing to update"),
        "{}",
        err.message()
    );

    let replaced = admin
        .update_key(update(pb::UpdateKeyRequest {
            name: "replaced".into(),
            scopes: vec!["links:read".into()],
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["*".into()],
            }),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replaced.name, "replaced");
    assert_eq!(replaced.scopes, vec!["links:read"]);
    assert!(replaced.allowed_cidrs.is_empty(), "* clears what is unset");
    assert_eq!(replaced.rate_limit_per_minute, 0);
    assert_eq!(replaced.expires_at, None);
}

on_both_backends!(
    bad_create_requests_name_the_field_and_create_nothing,
    bad_lifecycle_requests_name_the_field_and_change_nothing,
    update_without_a_mask_changes_what_the_request_sets,
);
