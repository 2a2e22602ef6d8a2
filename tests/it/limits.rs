//! Rate limits: per key, rolling, 429 with Retry-After, changed at once.

use chrono::Duration;
use keygate_proto::v1 as pb;
use tonic::Code;

use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

const ROUTE: &str = "POST /v1/checkouts";

/// An org_a key with checkout:create, limited to `per_minute`.
pub async fn limited_key(s: &TestServer, per_minute: u32) -> (pb::ApiKey, String) {
    s.create_key(pb::CreateKeyRequest {
        name: "limited".into(),
        organization_id: "org_a".into(),
        scopes: vec!["checkout:create".into()],
        rate_limit_per_minute: per_minute,
        ..Default::default()
    })
    .await
}

async fn five_per_minute_then_429_until_the_window_has_passed(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = limited_key(&s, 5).await;
    for remaining in (0..5).rev() {
        let r = s.authorize(&token, ROUTE, "").await;
        assert_eq!(r.decision(), pb::Decision::Allow);
        assert_eq!((r.rate_limit, r.rate_limit_remaining), (5, remaining));
        assert!(r.rate_limit_reset.is_some());
    }
    let r = s.authorize(&token, ROUTE, "").await;
    assert_eq!(
        (r.decision(), r.reason(), r.http_status),
        (pb::Decision::Deny, pb::DenyReason::RateLimited, 429)
    );
    // Every request was made at 0 s: they leave the window at 60 s.
    let retry = r.retry_after.unwrap();
    assert_eq!((retry.seconds, retry.nanos), (60, 0), "{retry:?}");
    assert_eq!((r.rate_limit, r.rate_limit_remaining), (5, 0));
    assert!(!r.key_id.is_empty(), "a 429 still names the key");

    // A rolling 60 s window: nothing comes back before the minute is over…
    s.advance(Duration::seconds(59));
    let r = s.authorize(&token, ROUTE, "").await;
    assert_eq!(r.reason(), pb::DenyReason::RateLimited);
    assert_eq!(r.retry_after.map(|d| d.seconds), Some(1));
    // …and then exactly the limit, not a burst on top of a refill.
    s.advance(Duration::seconds(1));
    for remaining in (0..5).rev() {
        let r = s.authorize(&token, ROUTE, "").await;
        assert_eq!(r.decision(), pb::Decision::Allow);
        assert_eq!(r.rate_limit_remaining, remaining);
    }
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.reason(),
        pb::DenyReason::RateLimited
    );
}

async fn two_hundred_concurrent_calls_on_a_limit_of_100_allow_exactly_100(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = limited_key(&s, 100).await;
    let client = s.authorizer().await;
    let calls = (0..200).map(|_| {
        let mut client = client.clone();
        let req = pb::AuthorizeRequest {
            token: token.clone(),
            route: ROUTE.into(),
            ..Default::default()
        };
        tokio::spawn(async move { client.authorize(req).await.unwrap().into_inner() })
    });
    let mut allowed = 0;
    let mut limited = 0;
    for call in calls.collect::<Vec<_>>() {
        match call.await.unwrap().reason() {
            pb::DenyReason::Unspecified => allowed += 1,
            pb::DenyReason::RateLimited => limited += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((allowed, limited), (100, 100));
}

async fn update_key_changes_limits_and_scopes_at_once(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = limited_key(&s, 2).await;
    for _ in 0..2 {
        assert_eq!(
            s.authorize(&token, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.reason(),
        pb::DenyReason::RateLimited
    );
    let mut admin = s.admin().await;
    let update = |mask: &[&str], r: pb::UpdateKeyRequest| pb::UpdateKeyRequest {
        key_id: key.key_id.clone(),
        update_mask: Some(prost_types::FieldMask {
            paths: mask.iter().map(|p| p.to_string()).collect(),
        }),
        ..r
    };
    let raised = admin
        .update_key(as_key(
            &s.admin_token,
            update(
                &["rate_limit_per_minute"],
                pb::UpdateKeyRequest {
                    rate_limit_per_minute: 10,
                    ..Default::default()
                },
            ),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raised.rate_limit_per_minute, 10);
    let r = s.authorize(&token, ROUTE, "").await;
    assert_eq!(
        (r.decision(), r.rate_limit),
        (pb::Decision::Allow, 10),
        "the new limit applies at once"
    );

    // Narrowing scopes takes effect on the very next request.
    let narrowed = admin
        .update_key(as_key(
            &s.admin_token,
            update(
                &["scopes", "name"],
                pb::UpdateKeyRequest {
                    scopes: vec!["links:read".into()],
                    name: "reader".into(),
                    ..Default::default()
                },
            ),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (narrowed.name.as_str(), narrowed.scopes.clone()),
        ("reader", vec!["links:read".to_string()])
    );
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.reason(),
        pb::DenyReason::InsufficientScope
    );

    // Bad updates name the field and change nothing.
    for (mask, req, field) in [
        (&[][..], pb::UpdateKeyRequest::default(), "update_mask"),
        (
            &["color"][..],
            pb::UpdateKeyRequest::default(),
            "update_mask",
        ),
        (
            &["scopes"][..],
            pb::UpdateKeyRequest {
                scopes: vec!["links:view".into()],
                ..Default::default()
            },
            "scopes",
        ),
        (&["name"][..], pb::UpdateKeyRequest::default(), "name"),
    ] {
        let err = admin
            .update_key(as_key(&s.admin_token, update(mask, req)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{}",
            err.message()
        );
    }
    let got = admin
        .get_key(as_key(
            &s.admin_token,
            pb::GetKeyRequest {
                key_id: key.key_id.clone(),
            },
        ))
        .await
        .unwrap();
    assert_eq!(got.into_inner().name, "reader");

    // An organization key cannot raise scopes above its own.
    let (_, org_admin) = s.org_key("org_a", &["api_key:update", "links:read"]).await;
    let err = admin
        .update_key(as_key(
            &org_admin,
            update(
                &["scopes"],
                pb::UpdateKeyRequest {
                    scopes: vec!["links:write".into()],
                    ..Default::default()
                },
            ),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// An NTP step back of an hour: a key at its limit waits no longer than it
/// did, and its allowance comes back as time passes.
async fn a_wall_clock_stepped_back_an_hour_limits_no_further(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = limited_key(&s, 5).await;
    for _ in 0..5 {
        assert_eq!(
            s.authorize(&token, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
    let before = s.authorize(&token, ROUTE, "").await;
    assert_eq!(before.reason(), pb::DenyReason::RateLimited);
    s.clock.step_wall(-Duration::hours(1));
    let after = s.authorize(&token, ROUTE, "").await;
    assert_eq!(after.reason(), pb::DenyReason::RateLimited);
    assert_eq!(
        after.retry_after, before.retry_after,
        "no longer than before"
    );
    // At 60 s every request made at 0 s has left the window: the whole
    // allowance is back, and no more than it.
    s.advance(Duration::seconds(60));
    for _ in 0..5 {
        assert_eq!(
            s.authorize(&token, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.reason(),
        pb::DenyReason::RateLimited
    );
}

on_both_backends!(
    a_wall_clock_stepped_back_an_hour_limits_no_further,
    five_per_minute_then_429_until_the_window_has_passed,
    two_hundred_concurrent_calls_on_a_limit_of_100_allow_exactly_100,
    update_key_changes_limits_and_scopes_at_once,
);
