//! Organization limits: one allowance shared by every key of an
//! organization, set by SYSTEM keys, in force at once on the replica that
//! sets it and within a poll interval on the others.

use std::time::Duration;

use keygate_proto::v1 as pb;
use pb::authorize_response::LimitedBy;
use serde_json::Value;
use tonic::Code;

use crate::harness::{Backend, TestServer, as_key, eventually};
use crate::on_both_backends;
use crate::replicas::Replica;

const ROUTE: &str = "POST /v1/checkouts";

on_both_backends!(
    an_organization_limit_is_shared_by_its_keys_and_no_one_else,
    only_allowed_requests_count_against_either_limit,
    clearing_with_zero_lifts_the_limit,
    only_system_keys_set_or_read_organization_limits,
    the_cli_sets_and_shows_organization_limits,
    a_cached_authorizer_leaves_organization_limits_to_keygate,
);

pub async fn set(s: &TestServer, org: &str, per_minute: u32) -> pb::OrganizationLimits {
    s.admin()
        .await
        .set_organization_limits(as_key(
            &s.admin_token,
            pb::SetOrganizationLimitsRequest {
                organization_id: org.into(),
                rate_limit_per_minute: per_minute,
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn get(s: &TestServer, org: &str) -> pb::OrganizationLimits {
    s.admin()
        .await
        .get_organization_limits(as_key(
            &s.admin_token,
            pb::GetOrganizationLimitsRequest {
                organization_id: org.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// A key of `org` with checkout:create and its own limit (0: the default).
async fn key(s: &TestServer, org: &str, per_minute: u32) -> String {
    s.create_key(pb::CreateKeyRequest {
        name: format!("{org} key"),
        organization_id: org.into(),
        scopes: vec!["checkout:create".into()],
        rate_limit_per_minute: per_minute,
        ..Default::default()
    })
    .await
    .1
}

/// (decision, limited_by, rate_limit, remaining) of one Authorize.
async fn call(s: &TestServer, token: &str) -> (pb::Decision, LimitedBy, u32, u32) {
    let r = s.authorize(token, ROUTE, "").await;
    (
        r.decision(),
        r.limited_by(),
        r.rate_limit,
        r.rate_limit_remaining,
    )
}

async fn an_organization_limit_is_shared_by_its_keys_and_no_one_else(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (one, two, other) = (
        key(&s, "org_a", 0).await,
        key(&s, "org_a", 0).await,
        key(&s, "org_b", 0).await,
    );
    let shown = set(&s, "org_a", 5).await;
    assert_eq!(
        (shown.organization_id.as_str(), shown.rate_limit_per_minute),
        ("org_a", 5)
    );
    // In force on this replica as soon as the call returned: two keys share
    // five, and the headers tell of the organization's (fewer remain of it
    // than of each key's 100).
    use pb::Decision::{Allow, Deny};
    for (token, remaining) in [(&one, 4), (&two, 3), (&one, 2), (&two, 1), (&two, 0)] {
        assert_eq!(
            call(&s, token).await,
            (Allow, LimitedBy::Organization, 5, remaining)
        );
    }
    for token in [&one, &two] {
        let r = s.authorize(token, ROUTE, "").await;
        assert_eq!(
            (r.decision(), r.reason(), r.http_status, r.limited_by()),
            (
                Deny,
                pb::DenyReason::RateLimited,
                429,
                LimitedBy::Organization
            )
        );
        assert_eq!((r.rate_limit, r.rate_limit_remaining), (5, 0));
        assert_eq!(r.retry_after.map(|d| d.seconds), Some(60));
        assert_eq!(r.organization_rate_limit, 5);
    }
    // The other organization has only its keys' own limits.
    for remaining in (80..100).rev() {
        let r = s.authorize(&other, ROUTE, "").await;
        assert_eq!(
            (
                r.decision(),
                r.limited_by(),
                r.rate_limit,
                r.rate_limit_remaining
            ),
            (Allow, LimitedBy::Key, 100, remaining)
        );
        assert_eq!(r.organization_rate_limit, 0);
    }
    // So do SYSTEM keys, which belong to no organization; and an unlimited
    // key of the organization is never counted, for it either.
    let system = s.authorize(&s.admin_token, ROUTE, "").await;
    assert_eq!(system.decision(), Allow);
    let (_, unlimited) = s
        .create_key(pb::CreateKeyRequest {
            name: "internal".into(),
            organization_id: "org_a".into(),
            scopes: vec!["checkout:create".into()],
            unlimited: true,
            ..Default::default()
        })
        .await;
    for _ in 0..20 {
        let r = s.authorize(&unlimited, ROUTE, "").await;
        assert_eq!((r.decision(), r.rate_limit), (Allow, 0));
        assert_eq!(
            (r.limited_by(), r.organization_rate_limit),
            (LimitedBy::Unspecified, 0)
        );
    }

    // The organization's window rolls like a key's.
    s.advance(chrono::Duration::seconds(60));
    assert_eq!(call(&s, &one).await, (Allow, LimitedBy::Organization, 5, 4));
}

async fn only_allowed_requests_count_against_either_limit(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    use pb::Decision::{Allow, Deny};
    let tight = key(&s, "org_a", 2).await;
    let loose = key(&s, "org_a", 0).await;
    set(&s, "org_a", 4).await;
    // The key's own limit runs out first, so its headers are the key's.
    assert_eq!(call(&s, &tight).await, (Allow, LimitedBy::Key, 2, 1));
    assert_eq!(call(&s, &tight).await, (Allow, LimitedBy::Key, 2, 0));
    // Refused by its own limit: not counted for the organization.
    for _ in 0..5 {
        assert_eq!(call(&s, &tight).await, (Deny, LimitedBy::Key, 2, 0));
    }
    assert_eq!(
        call(&s, &loose).await,
        (Allow, LimitedBy::Organization, 4, 1)
    );
    assert_eq!(
        call(&s, &loose).await,
        (Allow, LimitedBy::Organization, 4, 0)
    );
    // Refused by the organization: not counted for the key either, so when
    // the organization's limit is lifted the key has all it had.
    for _ in 0..5 {
        assert_eq!(
            call(&s, &loose).await,
            (Deny, LimitedBy::Organization, 4, 0)
        );
    }
    set(&s, "org_a", 0).await;
    assert_eq!(call(&s, &loose).await, (Allow, LimitedBy::Key, 100, 97));
}

async fn clearing_with_zero_lifts_the_limit(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let token = key(&s, "org_a", 0).await;
    let never = get(&s, "org_a").await;
    assert_eq!(
        (
            never.rate_limit_per_minute,
            never.updated_at,
            never.updated_by.as_str()
        ),
        (0, None, "")
    );
    set(&s, "org_a", 2).await;
    let admin_id = admin_key_id(&s);
    let shown = get(&s, "org_a").await;
    assert_eq!(
        (shown.rate_limit_per_minute, shown.updated_by.as_str()),
        (2, admin_id.as_str())
    );
    assert!(shown.updated_at.is_some());
    for _ in 0..2 {
        assert_eq!(
            s.authorize(&token, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.limited_by(),
        LimitedBy::Organization
    );

    let cleared = set(&s, "org_a", 0).await;
    assert_eq!(cleared.rate_limit_per_minute, 0);
    let r = s.authorize(&token, ROUTE, "").await;
    assert_eq!(
        (
            r.decision(),
            r.limited_by(),
            r.rate_limit,
            r.organization_rate_limit
        ),
        (pb::Decision::Allow, LimitedBy::Key, 100, 0)
    );
    let shown = get(&s, "org_a").await;
    assert_eq!(
        (shown.rate_limit_per_minute, shown.updated_by.as_str()),
        (0, admin_id.as_str()),
        "who cleared it is kept"
    );
    // Clearing one that was never set is no error either.
    assert_eq!(set(&s, "org_never", 0).await.rate_limit_per_minute, 0);
    // Cleared stays cleared across a restart…
    let s = s.restart().await;
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.limited_by(),
        LimitedBy::Key
    );
    // …and a limit stays in force: every replica loads them at start.
    set(&s, "org_a", 1).await;
    let s = s.restart().await;
    assert_eq!(
        call(&s, &token).await.1,
        LimitedBy::Organization,
        "loaded at start"
    );
}

async fn only_system_keys_set_or_read_organization_limits(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut admin = s.admin().await;
    let (_, org_admin) = s.org_key("org_a", &["api_key:*"]).await;
    set(&s, "org_a", 50).await;
    let before = get(&s, "org_a").await;
    for org in ["org_a", "org_b"] {
        let err = admin
            .set_organization_limits(as_key(
                &org_admin,
                pb::SetOrganizationLimitsRequest {
                    organization_id: org.into(),
                    rate_limit_per_minute: 1_000,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
        assert!(err.message().contains("SYSTEM"), "{}", err.message());
        let err = admin
            .get_organization_limits(as_key(
                &org_admin,
                pb::GetOrganizationLimitsRequest {
                    organization_id: org.into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    }
    assert_eq!(get(&s, "org_a").await, before, "nothing changed");

    // A SYSTEM key needs api_key:update to set and api_key:read to read.
    let (_, reader) = s
        .create_key(pb::CreateKeyRequest {
            name: "system reader".into(),
            tier: pb::KeyTier::System as i32,
            scopes: vec!["api_key:read".into()],
            ..Default::default()
        })
        .await;
    let read = admin
        .get_organization_limits(as_key(
            &reader,
            pb::GetOrganizationLimitsRequest {
                organization_id: "org_a".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.rate_limit_per_minute, 50);
    let err = admin
        .set_organization_limits(as_key(
            &reader,
            pb::SetOrganizationLimitsRequest {
                organization_id: "org_a".into(),
                rate_limit_per_minute: 1,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("api_key:update"),
        "{}",
        err.message()
    );

    // Bad fields are named.
    for (org, limit, field) in [
        ("", 5, "organization_id"),
        ("not an org!", 5, "organization_id"),
        ("org_a", 100_000_001, "rate_limit_per_minute"),
    ] {
        let err = admin
            .set_organization_limits(as_key(
                &s.admin_token,
                pb::SetOrganizationLimitsRequest {
                    organization_id: org.into(),
                    rate_limit_per_minute: limit,
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(&format!("{field}: ")),
            "{}",
            err.message()
        );
    }
    assert_eq!(get(&s, "org_a").await, before, "nothing changed");
}

async fn the_cli_sets_and_shows_organization_limits(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let out = orgs(&s, &["limits", "get", "org_a"]).await;
    assert_eq!(out.trim(), "org_a: rate limit none");
    let out = orgs(&s, &["limits", "set", "org_a", "--rate-limit", "250"]).await;
    assert!(out.starts_with("org_a: rate limit 250/min (set "), "{out}");
    let out = orgs(&s, &["--json", "limits", "get", "org_a"]).await;
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["rate_limit_per_minute"], 250);
    assert_eq!(shown["updated_by"], admin_key_id(&s).as_str());
    let out = orgs(&s, &["limits", "set", "org_a", "--rate-limit", "0"]).await;
    assert!(out.starts_with("org_a: rate limit none"), "{out}");
}

/// A gateway's CachedAuthorizer does not reuse answers of a key whose
/// organization has a shared limit: keygate counts every request.
async fn a_cached_authorizer_leaves_organization_limits_to_keygate(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let tokens = [key(&s, "org_a", 0).await, key(&s, "org_a", 0).await];
    set(&s, "org_a", 3).await;
    let gateway =
        crate::feed::cached_authorizer(&s, &s.admin_token, Duration::from_secs(300)).await;
    // Two keys taking turns: counted per key on the gateway, they would get
    // three each.
    let mut answers = Vec::new();
    for i in 0..6 {
        let r = gateway
            .authorize(pb::AuthorizeRequest {
                token: tokens[i % 2].clone(),
                route: ROUTE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        answers.push((r.decision(), r.limited_by(), r.rate_limit_remaining));
    }
    use pb::Decision::{Allow, Deny};
    let org = LimitedBy::Organization;
    assert_eq!(
        answers,
        [
            (Allow, org, 2),
            (Allow, org, 1),
            (Allow, org, 0),
            (Deny, org, 0),
            (Deny, org, 0),
            (Deny, org, 0)
        ]
    );
}

/// `keygate orgs ARGS` as the bootstrap admin; its stdout, once it succeeded.
async fn orgs(s: &TestServer, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .arg("orgs")
        .args(["--server", &s.url()])
        .args(args)
        .env("KEYGATE_TOKEN", &s.admin_token)
        .env_remove("KEYGATE_JSON")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn admin_key_id(s: &TestServer) -> String {
    keygate_core::token::ParsedToken::parse(&s.admin_token)
        .unwrap()
        .key_id
        .to_string()
}

/// Another replica (its own process, on the same PostgreSQL database)
/// applies a limit set here within its poll interval (200 ms here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_replicas_apply_a_limit_within_their_poll_interval() {
    let Some(a) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let b = Replica::start(&a.database_url, "replica-b", &[]).await;
    let token = key(&a, "org_a", 0).await;
    let on_b = b.authorizer().await;
    let authorize_on_b = || {
        let mut client = on_b.clone();
        let token = token.clone();
        async move {
            client
                .authorize(pb::AuthorizeRequest {
                    token,
                    route: ROUTE.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    assert_eq!(authorize_on_b().await.organization_rate_limit, 0);
    set(&a, "org_a", 3).await;
    let applied = eventually(Duration::from_secs(5), "replica b to apply it", || {
        let call = authorize_on_b();
        async move {
            let r = call.await;
            (r.organization_rate_limit == 3).then_some(r)
        }
    })
    .await;
    assert_eq!(applied.limited_by(), LimitedBy::Organization);
    // Each replica counts its own requests (until the limiter is shared):
    // b refuses once its own three in this window are used.
    let mut answers = Vec::new();
    for _ in 0..4 {
        let r = authorize_on_b().await;
        answers.push((r.reason(), r.limited_by()));
    }
    assert!(
        answers.contains(&(pb::DenyReason::RateLimited, LimitedBy::Organization)),
        "replica b enforces the limit: {answers:?}"
    );
    set(&a, "org_a", 0).await;
    eventually(Duration::from_secs(5), "replica b to clear it", || {
        let call = authorize_on_b();
        async move { (call.await.decision() == pb::Decision::Allow).then_some(()) }
    })
    .await;
}
