//! Authorize: the decision a gateway sees for every kind of token and request.

use chrono::Duration;
use keygate_core::key::Mode;
use keygate_core::token::{Brand, ParsedToken, generate};
use keygate_proto::v1 as pb;
use tonic::Code;

use crate::harness::{Backend, TestServer};
use crate::on_both_backends;

fn assert_deny(r: &pb::AuthorizeResponse, reason: pb::DenyReason, status: u32) {
    assert_eq!(r.decision(), pb::Decision::Deny, "{r:?}");
    assert_eq!(r.reason(), reason, "{r:?}");
    assert_eq!(r.http_status, status, "{r:?}");
    assert!(!r.message.is_empty());
}

async fn allows_a_key_on_a_route_it_holds_the_scope_for(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s
        .org_key("org_a", &["checkout:create", "transaction:read"])
        .await;
    let r = s
        .authorize(&token, "POST /v1/checkouts", "203.0.113.9")
        .await;
    assert_eq!(r.decision(), pb::Decision::Allow);
    assert_eq!(r.reason(), pb::DenyReason::Unspecified);
    assert_eq!(r.http_status, 200);
    assert_eq!(r.organization_id, "org_a");
    assert_eq!(r.key_id, key.key_id);
    assert_eq!(r.scopes, vec!["checkout:create", "transaction:read"]);
    assert_eq!(r.required_scope, "checkout:create");
    assert_eq!(r.mode(), pb::Mode::Live);
    assert_eq!(r.tier(), pb::KeyTier::Organization);

    let bearer = s
        .authorize(
            &format!("Bearer {token}"),
            "GET /v1/transactions/tx_1?expand=all",
            "",
        )
        .await;
    assert_eq!(bearer.decision(), pb::Decision::Allow);
    assert_eq!(bearer.required_scope, "transaction:read");
}

async fn denies_missing_malformed_and_unknown_tokens(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    let route = "POST /v1/checkouts";
    for missing in ["", "Bearer ", "   "] {
        let r = s.authorize(missing, route, "").await;
        assert_deny(&r, pb::DenyReason::MissingToken, 401);
        assert!(r.key_id.is_empty() && r.organization_id.is_empty());
    }
    // A typo in the last character breaks the checksum.
    let mut typo = token.clone();
    let last = typo.pop().unwrap();
    typo.push(if last == 'a' { 'b' } else { 'a' });
    // Well-formed, right id, wrong secret.
    let id = uuid::Uuid::parse_str(&key.key_id).unwrap();
    let forged = generate(&Brand::default(), Mode::Live, id).unwrap().token;
    // Well-formed, unknown id.
    let unknown = generate(&Brand::default(), Mode::Live, uuid::Uuid::new_v4())
        .unwrap()
        .token;
    // The right secret presented as a test-mode token.
    let wrong_mode = token.replacen("_live_", "_test_", 1);
    let huge = format!("{token}{}", "x".repeat(1100));
    for bad in [
        typo.as_str(),
        &forged,
        &unknown,
        &wrong_mode,
        "op_8ae87c48.aae2b54e89c755d768a9",
        &huge,
    ] {
        let r = s.authorize(bad, route, "").await;
        assert_deny(&r, pb::DenyReason::InvalidToken, 401);
        assert!(
            r.key_id.is_empty(),
            "no identity for an unauthenticated token"
        );
    }
}

async fn denies_missing_scope_and_unknown_route_with_403(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["transaction:read"]).await;
    let r = s.authorize(&token, "POST /v1/checkouts", "").await;
    assert_deny(&r, pb::DenyReason::InsufficientScope, 403);
    assert_eq!(r.required_scope, "checkout:create");
    assert_eq!(
        r.key_id, key.key_id,
        "an authenticated deny still names the key"
    );

    let r = s.authorize(&token, "DELETE /v1/everything", "").await;
    assert_deny(&r, pb::DenyReason::RouteNotFound, 403);
    let r = s
        .authorize(&token, "GET /v1/transactions/../admin", "")
        .await;
    assert_deny(&r, pb::DenyReason::RouteNotFound, 403);

    // gRPC full method names match `/pkg.Service/*`.
    let (_, refunder) = s.org_key("org_a", &["transaction:update"]).await;
    let r = s
        .authorize(&refunder, "/payments.v1.Refunds/Create", "")
        .await;
    assert_eq!(r.decision(), pb::Decision::Allow);
}

async fn required_scopes_replace_the_route_policy(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = s.org_key("org_a", &["links:write", "links:read"]).await;
    let mut client = s.authorizer().await;
    let ask = |scopes: &[&str]| pb::AuthorizeRequest {
        token: token.clone(),
        route: "GET /not/in/policy".into(),
        required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let r = client
        .authorize(ask(&["links:create", "links:read"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision(), pb::Decision::Allow, "write grants create");
    let r = client
        .authorize(ask(&["links:read", "links:execute"]))
        .await
        .unwrap()
        .into_inner();
    assert_deny(&r, pb::DenyReason::InsufficientScope, 403);
    assert_eq!(r.required_scope, "links:execute");

    let err = client.authorize(ask(&["links"])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("required_scopes") && err.message().contains("\"links\""),
        "{}",
        err.message()
    );
}

async fn enforces_ip_allow_lists(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = s
        .create_key(pb::CreateKeyRequest {
            name: "office only".into(),
            organization_id: "org_a".into(),
            scopes: vec!["checkout:create".into()],
            allowed_cidrs: vec!["198.51.100.0/24".into(), "2001:db8::/32".into()],
            ..Default::default()
        })
        .await;
    let route = "POST /v1/checkouts";
    for ok in ["198.51.100.7", "::ffff:198.51.100.7", "2001:db8::42"] {
        assert_eq!(
            s.authorize(&token, route, ok).await.decision(),
            pb::Decision::Allow,
            "{ok}"
        );
    }
    for denied in ["198.51.101.7", "2001:db9::1", ""] {
        assert_deny(
            &s.authorize(&token, route, denied).await,
            pb::DenyReason::IpNotAllowed,
            403,
        );
    }
}

/// 10.0.0.0/8 and 1.2.3.4 are allowed, in either notation; nothing else is.
async fn mapped_entries_allow(s: &TestServer, token: &str) {
    let route = "POST /v1/checkouts";
    for ip in ["10.1.2.3", "::ffff:10.1.2.3", "1.2.3.4", "::ffff:1.2.3.4"] {
        assert_eq!(
            s.authorize(token, route, ip).await.decision(),
            pb::Decision::Allow,
            "{ip}"
        );
    }
    assert_deny(
        &s.authorize(token, route, "11.0.0.1").await,
        pb::DenyReason::IpNotAllowed,
        403,
    );
}

/// Allow-list entries in IPv4-mapped form are IPv4 networks: normalised at
/// CreateKey and UpdateKey, and when read from rows stored before that.
async fn ipv4_mapped_allow_list_entries_match_their_ipv4_clients(backend: Backend) {
    use crate::harness::as_key;
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s
        .create_key(pb::CreateKeyRequest {
            name: "mapped".into(),
            organization_id: "org_a".into(),
            scopes: vec!["checkout:create".into()],
            allowed_cidrs: vec!["::ffff:10.0.0.0/104".into(), "::ffff:1.2.3.4".into()],
            ..Default::default()
        })
        .await;
    assert_eq!(key.allowed_cidrs, ["10.0.0.0/8", "1.2.3.4/32"]);
    mapped_entries_allow(&s, &token).await;

    let mut admin = s.admin().await;
    let update = |cidrs: &[&str]| pb::UpdateKeyRequest {
        key_id: key.key_id.clone(),
        allowed_cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["allowed_cidrs".into()],
        }),
        ..Default::default()
    };
    let updated = admin
        .update_key(as_key(&s.admin_token, update(&["::ffff:192.168.0.0/112"])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.allowed_cidrs, ["192.168.0.0/16"]);
    let err = admin
        .update_key(as_key(&s.admin_token, update(&["::ffff:10.0.0.0/95"])))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("allowed_cidrs"), "{}", err.message());
    assert_eq!(
        s.get_key(&key.key_id).await.allowed_cidrs,
        ["192.168.0.0/16"]
    );

    // A row written in mapped form before the fix matches once read.
    sqlx::any::install_default_drivers();
    let mut db = <sqlx::AnyConnection as sqlx::Connection>::connect(&s.database_url)
        .await
        .unwrap();
    sqlx::query("UPDATE api_keys SET allowed_cidrs = $1 WHERE id = $2")
        .bind("::ffff:10.0.0.0/104 ::ffff:1.2.3.4/128")
        .bind(&key.key_id)
        .execute(&mut db)
        .await
        .unwrap();
    drop(db);
    let s = s.restart().await;
    assert_eq!(
        s.get_key(&key.key_id).await.allowed_cidrs,
        ["10.0.0.0/8", "1.2.3.4/32"]
    );
    mapped_entries_allow(&s, &token).await;
}

async fn rejects_malformed_requests_as_invalid_argument(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = s.org_key("org_a", &["checkout:create"]).await;
    let mut client = s.authorizer().await;
    let req = |route: &str, ip: &str| pb::AuthorizeRequest {
        token: token.clone(),
        route: route.into(),
        ip: ip.into(),
        ..Default::default()
    };
    let err = client
        .authorize(req("POST /v1/checkouts", "10.0.0.300"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("ip:"), "{}", err.message());
    let err = client.authorize(req("", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("route:"), "{}", err.message());
}

async fn expired_keys_are_expired_token(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let expires = keygate_core::clock::Clock::now(&*s.clock) + Duration::hours(1);
    let (_, token) = s
        .create_key(pb::CreateKeyRequest {
            name: "short-lived".into(),
            organization_id: "org_a".into(),
            scopes: vec!["checkout:create".into()],
            expires_at: Some(prost_types::Timestamp {
                seconds: expires.timestamp(),
                nanos: 0,
            }),
            ..Default::default()
        })
        .await;
    let route = "POST /v1/checkouts";
    assert_eq!(
        s.authorize(&token, route, "").await.decision(),
        pb::Decision::Allow
    );
    s.advance(Duration::hours(1));
    assert_deny(
        &s.authorize(&token, route, "").await,
        pb::DenyReason::ExpiredToken,
        401,
    );
}

async fn a_warm_key_is_authorized_without_the_store(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = s.org_key("org_a", &["checkout:create"]).await;
    // A key that exists but is never used before the store goes.
    let (_, cold) = s.org_key("org_a", &["checkout:create"]).await;
    s.settle().await;
    let route = "POST /v1/checkouts";
    assert_eq!(
        s.authorize(&token, route, "").await.decision(),
        pb::Decision::Allow
    );
    let unknown = generate(&Brand::default(), Mode::Live, uuid::Uuid::new_v4())
        .unwrap()
        .token;
    assert_deny(
        &s.authorize(&unknown, route, "").await,
        pb::DenyReason::InvalidToken,
        401,
    );

    s.store.close().await;

    // Cached: the known key, the remembered unknown id, and anything that
    // fails the format or checksum check never needs the store.
    assert_eq!(
        s.authorize(&token, route, "").await.decision(),
        pb::Decision::Allow
    );
    assert_deny(
        &s.authorize(&unknown, route, "").await,
        pb::DenyReason::InvalidToken,
        401,
    );
    assert_deny(
        &s.authorize("kg_live_garbage", route, "").await,
        pb::DenyReason::InvalidToken,
        401,
    );
    assert_deny(
        &s.authorize(&"k".repeat(2000), route, "").await,
        pb::DenyReason::InvalidToken,
        401,
    );

    // A key that exists but is not cached needs the store, which is gone:
    // fail closed. (An id that is no key at all is refused from the key-id
    // index once it has loaded: see forged.rs.)
    assert!(ParsedToken::parse(&cold).is_ok());
    let req = pb::AuthorizeRequest {
        token: cold,
        route: route.into(),
        ..Default::default()
    };
    let err = s.authorizer().await.authorize(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        !err.message().contains("sqlite") && !err.message().contains("postgres"),
        "{}",
        err.message()
    );
}

on_both_backends!(
    allows_a_key_on_a_route_it_holds_the_scope_for,
    denies_missing_malformed_and_unknown_tokens,
    denies_missing_scope_and_unknown_route_with_403,
    required_scopes_replace_the_route_policy,
    enforces_ip_allow_lists,
    ipv4_mapped_allow_list_entries_match_their_ipv4_clients,
    rejects_malformed_requests_as_invalid_argument,
    expired_keys_are_expired_token,
    a_warm_key_is_authorized_without_the_store,
);
