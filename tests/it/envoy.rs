//! keygate as Envoy's ext_authz service, through a real Envoy: what a client
//! and the upstream see.

use std::path::Path;
use std::time::Duration;

use keygate_proto::v1 as pb;

use crate::gateway::{Gateway, envoy_bin};
use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;
use crate::replicas::{Proxy, Replica, postgres_addr, via};

on_both_backends!(
    a_valid_key_reaches_the_upstream_with_its_identity_and_without_its_secret,
    refused_requests_get_the_seeds_json_errors,
    a_revoked_key_is_refused_on_the_very_next_request,
    over_the_limit_is_429_with_retry_after,
    an_organization_limit_is_429_naming_it_and_unlimited_keys_get_no_headers,
    the_identity_is_dynamic_metadata_when_asked_for,
    a_refused_request_logs_no_forged_identity,
);

async fn start(backend: Backend) -> Option<(TestServer, Gateway)> {
    let server = TestServer::start(backend).await?;
    let gateway = Gateway::start(server.addr).await?;
    Some((server, gateway))
}

async fn a_valid_key_reaches_the_upstream_with_its_identity_and_without_its_secret(
    backend: Backend,
) {
    let Some((server, gateway)) = start(backend).await else {
        return;
    };
    let (key, token) = server
        .org_key("org_a", &["checkout:create", "transaction:read"])
        .await;
    let bearer = format!("Bearer {token}");

    let reply = gateway
        .send(
            "POST",
            "/v1/checkouts?amount=100",
            &[
                ("authorization", &bearer),
                // A client's own identity headers must never get through.
                ("x-keygate-organization-id", "org_victim"),
                ("x-keygate-scopes", "*:*"),
                ("x-keygate-tier", "system"),
                ("x-keygate-admin", "true"),
            ],
        )
        .await;
    let echo = reply.echo();
    assert_eq!(
        (echo.method.as_str(), echo.path.as_str()),
        ("POST", "/v1/checkouts?amount=100")
    );
    assert_eq!(echo.all("x-keygate-organization-id"), ["org_a"]);
    assert_eq!(echo.header("x-keygate-key-id"), Some(key.key_id.as_str()));
    assert_eq!(
        echo.all("x-keygate-scopes"),
        ["checkout:create,transaction:read"]
    );
    assert_eq!(echo.header("x-keygate-mode"), Some("live"));
    assert_eq!(echo.all("x-keygate-tier"), ["organization"]);
    assert_eq!(echo.header("x-keygate-admin"), None);
    assert_eq!(
        echo.header("authorization"),
        None,
        "the secret went upstream"
    );
    assert!(
        !reply.body.contains(&token[token.len() - 20..]),
        "the secret went upstream: {}",
        reply.body
    );
    // The client sees its rate-limit budget.
    assert_eq!(reply.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("99"));
    assert!(reply.header("x-ratelimit-reset").is_some());

    // x-api-key (CertoPay's header) works like Bearer, and is hidden too.
    let echo = gateway
        .send("GET", "/v1/transactions/tx_1", &[("x-api-key", &token)])
        .await
        .echo();
    assert_eq!(echo.header("x-keygate-key-id"), Some(key.key_id.as_str()));
    assert_eq!(echo.header("x-api-key"), None);

    // A SYSTEM key has no organization: a forged one is removed, not kept.
    let (system, system_token) = server
        .create_key(pb::CreateKeyRequest {
            name: "platform".into(),
            tier: pb::KeyTier::System as i32,
            mode: pb::Mode::Test as i32,
            scopes: vec!["checkout:*".into()],
            ..Default::default()
        })
        .await;
    let echo = gateway
        .send(
            "POST",
            "/v1/checkouts",
            &[
                ("x-api-key", &system_token),
                ("x-keygate-organization-id", "org_victim"),
            ],
        )
        .await
        .echo();
    assert_eq!(echo.header("x-keygate-organization-id"), None);
    assert_eq!(
        echo.header("x-keygate-key-id"),
        Some(system.key_id.as_str())
    );
    assert_eq!(echo.header("x-keygate-tier"), Some("system"));
    assert_eq!(echo.header("x-keygate-mode"), Some("test"));

    // Envoy's access log reads the identity from the headers; no dynamic
    // metadata unless asked for.
    let line = format!(
        "200 key={} org=org_a mode=live metadata: key=- org=- scopes=-",
        key.key_id
    );
    crate::harness::eventually(Duration::from_secs(10), "the access log", || async {
        gateway.access_log().contains(&line).then_some(())
    })
    .await;
}

/// A refused request's access log names no identity the client made up:
/// the identity headers it logs are keygate's, or none.
async fn a_refused_request_logs_no_forged_identity(backend: Backend) {
    let Some((server, gateway)) = start(backend).await else {
        return;
    };
    let (victim, _) = server.org_key("org_victim", &["checkout:create"]).await;
    let reply = gateway
        .send(
            "POST",
            "/v1/checkouts",
            &[
                ("x-api-key", "kg_live_not_a_real_key_at_all"),
                ("x-keygate-key-id", &victim.key_id),
                ("x-keygate-organization-id", "org_victim"),
            ],
        )
        .await;
    assert_eq!(reply.status, 401);
    crate::harness::eventually(Duration::from_secs(10), "the access log", || async {
        let log = gateway.access_log();
        log.lines()
            .find(|l| l.starts_with("401 "))
            .map(|l| l.to_owned())
    })
    .await;
    let log = gateway.access_log();
    assert!(!log.contains(&victim.key_id), "{log}");
    assert!(!log.contains("org_victim"), "{log}");
}

/// With `--ext-authz-dynamic-metadata`, Envoy also gets the identity as
/// dynamic metadata, for RBAC rules and access logs that read it there.
async fn the_identity_is_dynamic_metadata_when_asked_for(backend: Backend) {
    let Some(server) =
        TestServer::start_with(backend, |s| s.ext_authz.dynamic_metadata = true).await
    else {
        return;
    };
    let Some(gateway) = Gateway::start(server.addr).await else {
        return;
    };
    let (key, token) = server
        .org_key("org_a", &["checkout:create", "transaction:read"])
        .await;
    let echo = gateway
        .send("POST", "/v1/checkouts", &[("x-api-key", &token)])
        .await
        .echo();
    assert_eq!(echo.header("x-keygate-key-id"), Some(key.key_id.as_str()));
    let line = format!(
        "200 key={id} org=org_a mode=live metadata: key={id} org=org_a \
         scopes=[\"checkout:create\",\"transaction:read\"]",
        id = key.key_id
    );
    crate::harness::eventually(Duration::from_secs(10), "the access log", || async {
        gateway.access_log().contains(&line).then_some(())
    })
    .await;
}

async fn refused_requests_get_the_seeds_json_errors(backend: Backend) {
    let Some((server, gateway)) = start(backend).await else {
        return;
    };
    let (_, reader) = server.org_key("org_a", &["transaction:read"]).await;
    let (_, elsewhere) = server
        .create_key(pb::CreateKeyRequest {
            name: "office only".into(),
            organization_id: "org_a".into(),
            mode: pb::Mode::Live as i32,
            scopes: vec!["checkout:create".into()],
            allowed_cidrs: vec!["203.0.113.0/24".into()],
            ..Default::default()
        })
        .await;
    let cases: [Case<'_>; 6] = [
        ("no key", vec![], 401, "MISSING_TOKEN"),
        (
            "a made-up key",
            vec![(
                "authorization",
                "Bearer kg_live_not_a_real_key_at_all".into(),
            )],
            401,
            "INVALID_TOKEN",
        ),
        (
            "a key with one character changed",
            vec![("x-api-key", flip_last(&reader))],
            401,
            "INVALID_TOKEN",
        ),
        (
            "a key without the route's scope",
            vec![("authorization", format!("Bearer {reader}"))],
            403,
            "INSUFFICIENT_SCOPE",
        ),
        (
            "a key used outside its IP allow-list",
            vec![("x-api-key", elsewhere.clone())],
            403,
            "IP_NOT_ALLOWED",
        ),
        (
            // Envoy trusts no X-Forwarded-For hop here: a client can't claim an address.
            "a key used outside its IP allow-list, claiming an allowed address",
            vec![
                ("x-api-key", elsewhere.clone()),
                ("x-forwarded-for", "203.0.113.7".into()),
            ],
            403,
            "IP_NOT_ALLOWED",
        ),
    ];
    for (what, headers, status, code) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = gateway.send("POST", "/v1/checkouts", &headers).await;
        assert_eq!(reply.status, status, "{what}: {reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        let body = reply.json();
        assert_eq!(body["error"], true, "{what}");
        assert_eq!(body["code"], code, "{what}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        assert_eq!(
            reply.header("www-authenticate"),
            (status == 401).then_some("Bearer"),
            "{what}"
        );
        assert!(
            !reply.body.contains(&reader[8..]),
            "{what}: echoes a secret"
        );
    }
    let reply = gateway
        .send(
            "POST",
            "/v1/checkouts",
            &[("authorization", &format!("Bearer {reader}"))],
        )
        .await;
    assert_eq!(reply.json()["required_scope"], "checkout:create");
    // A route the policy does not cover is refused, whatever the key.
    let reply = gateway
        .send("DELETE", "/v1/everything", &[("x-api-key", &reader)])
        .await;
    assert_eq!(
        (reply.status, reply.json()["code"].as_str()),
        (403, Some("ROUTE_NOT_FOUND"))
    );
}

async fn a_revoked_key_is_refused_on_the_very_next_request(backend: Backend) {
    let Some((server, gateway)) = start(backend).await else {
        return;
    };
    let (key, token) = server.org_key("org_a", &["checkout:create"]).await;
    let headers = [("x-api-key", token.as_str())];
    assert_eq!(
        gateway.send("POST", "/v1/checkouts", &headers).await.status,
        200
    );
    server
        .admin()
        .await
        .revoke_key(as_key(
            &server.admin_token,
            pb::RevokeKeyRequest {
                key_id: key.key_id.clone(),
                reason: "leaked".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let reply = gateway.send("POST", "/v1/checkouts", &headers).await;
    assert_eq!(
        (reply.status, reply.json()["code"].as_str()),
        (401, Some("INVALID_TOKEN"))
    );
}

async fn over_the_limit_is_429_with_retry_after(backend: Backend) {
    let Some((server, gateway)) = start(backend).await else {
        return;
    };
    let (_, token) = crate::limits::limited_key(&server, 2).await;
    let headers = [("x-api-key", token.as_str())];
    for remaining in ["1", "0"] {
        let reply = gateway.send("POST", "/v1/checkouts", &headers).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-ratelimit-remaining"), Some(remaining));
    }
    let reply = gateway.send("POST", "/v1/checkouts", &headers).await;
    assert_eq!(reply.status, 429, "{reply:?}");
    assert_eq!(reply.json()["code"], "RATE_LIMITED");
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(reply.header("x-ratelimit-limit"), Some("2"));
    assert_eq!(reply.header("x-ratelimit-remaining"), Some("0"));
    // The window rolls: after it, the key works again (the clock is injected).
    server.advance(chrono::Duration::seconds(61));
    assert_eq!(
        gateway.send("POST", "/v1/checkouts", &headers).await.status,
        200
    );
}

async fn an_organization_limit_is_429_naming_it_and_unlimited_keys_get_no_headers(
    backend: Backend,
) {
    let Some((server, gateway)) = start(backend).await else {
        return;
    };
    let (_, one) = server.org_key("org_a", &["checkout:create"]).await;
    let (_, two) = server.org_key("org_a", &["checkout:create"]).await;
    server
        .admin()
        .await
        .set_organization_limits(as_key(
            &server.admin_token,
            pb::SetOrganizationLimitsRequest {
                organization_id: "org_a".into(),
                rate_limit_per_minute: 2,
            },
        ))
        .await
        .unwrap();
    for (token, remaining) in [(&one, "1"), (&two, "0")] {
        let reply = gateway
            .send("POST", "/v1/checkouts", &[("x-api-key", token)])
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-ratelimit-limit"), Some("2"));
        assert_eq!(reply.header("x-ratelimit-remaining"), Some(remaining));
    }
    let reply = gateway
        .send("POST", "/v1/checkouts", &[("x-api-key", &one)])
        .await;
    assert_eq!(reply.status, 429, "{reply:?}");
    let body = reply.json();
    assert_eq!(
        (body["code"].as_str(), body["limited_by"].as_str()),
        (Some("RATE_LIMITED"), Some("ORGANIZATION"))
    );
    assert_eq!(reply.header("retry-after"), Some("60"));
    assert_eq!(reply.header("x-ratelimit-limit"), Some("2"));

    // A key's own limit says so too (in an organization without one).
    let (_, limited) = server
        .create_key(pb::CreateKeyRequest {
            name: "limited".into(),
            organization_id: "org_b".into(),
            scopes: vec!["checkout:create".into()],
            rate_limit_per_minute: 1,
            ..Default::default()
        })
        .await;
    let headers = [("x-api-key", limited.as_str())];
    assert_eq!(
        gateway.send("POST", "/v1/checkouts", &headers).await.status,
        200
    );
    let reply = gateway.send("POST", "/v1/checkouts", &headers).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.json()["limited_by"], "KEY");

    // An unlimited key (of the limited organization) is never counted: no
    // x-ratelimit headers, never a 429.
    let (_, unlimited) = server
        .create_key(pb::CreateKeyRequest {
            name: "internal".into(),
            organization_id: "org_a".into(),
            scopes: vec!["checkout:create".into()],
            unlimited: true,
            ..Default::default()
        })
        .await;
    for _ in 0..5 {
        let reply = gateway
            .send("POST", "/v1/checkouts", &[("x-api-key", &unlimited)])
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-ratelimit-limit"), None);
        assert_eq!(reply.header("x-ratelimit-remaining"), None);
    }
}

/// When keygate can't reach its store for a key it has not cached, Envoy
/// refuses the request (failure_mode_allow: false), never lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_fails_closed_when_keygate_cannot_reach_its_store() {
    let Some(a) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let proxy = Proxy::start(postgres_addr(&a.database_url)).await;
    let b = Replica::start(&via(&a.database_url, proxy.addr), "replica-b", &[]).await;
    let Some(gateway) = Gateway::start(format!("127.0.0.1:{}", b.port).parse().unwrap()).await
    else {
        return;
    };
    let (_, token) = a.org_key("org_a", &["checkout:create"]).await;
    proxy.cut();
    let reply = gateway
        .send("POST", "/v1/checkouts", &[("x-api-key", &token)])
        .await;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(!reply.body.contains("\"method\""), "reached the upstream");
}

/// Which headers carry the key, and whether they reach the upstream, are
/// the operator's choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_headers_and_stripping_are_configurable() {
    let Some(a) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let b = Replica::start(
        &a.database_url,
        "replica-b",
        &[
            "--ext-authz-credential-header",
            "X-Partner-Key",
            "--ext-authz-strip-credentials",
            "false",
        ],
    )
    .await;
    let Some(gateway) = Gateway::start(format!("127.0.0.1:{}", b.port).parse().unwrap()).await
    else {
        return;
    };
    let (key, token) = a.org_key("org_a", &["checkout:create"]).await;
    let bearer = format!("Bearer {token}");
    let reply = gateway
        .send("POST", "/v1/checkouts", &[("authorization", &bearer)])
        .await;
    assert_eq!(
        (reply.status, reply.json()["code"].as_str()),
        (401, Some("MISSING_TOKEN")),
        "only x-partner-key is read"
    );
    let echo = gateway
        .send("POST", "/v1/checkouts", &[("x-partner-key", &token)])
        .await
        .echo();
    assert_eq!(echo.header("x-keygate-key-id"), Some(key.key_id.as_str()));
    assert_eq!(echo.header("x-partner-key"), Some(token.as_str()));
}

/// The config the README explains is one Envoy accepts.
#[test]
fn the_example_envoy_config_is_valid() {
    let Some(envoy) = envoy_bin() else {
        return;
    };
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy/envoy.yaml");
    let out = std::process::Command::new(envoy)
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&config)
        .output()
        .expect("run envoy --mode validate");
    assert!(
        out.status.success(),
        "envoy rejects {}:\n{}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a client sends, and the status and code it must get back.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, u16, &'a str);

/// The same token with its last character changed: the checksum catches it.
fn flip_last(token: &str) -> String {
    let mut t = token.to_owned();
    let last = t.pop().unwrap();
    t.push(if last == 'A' { 'B' } else { 'A' });
    t
}

/// Two replicas sharing their limits through Redis, each behind its own
/// Envoy: the key's limit holds across both, and the 429 carries the shared
/// window's headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limits_hold_through_two_envoys() {
    let redis = crate::shared_limits::Redis::start();
    let Some(servers) = crate::shared_limits::replicas(&redis, 2).await else {
        return;
    };
    let (Some(one), Some(two)) = (
        Gateway::start(servers[0].addr).await,
        Gateway::start(servers[1].addr).await,
    ) else {
        return;
    };
    let (_, token) = crate::limits::limited_key(&servers[0], 4).await;
    servers[0].settle().await;
    let headers = [("x-api-key", token.as_str())];
    let mut allowed = 0;
    let mut refused = None;
    for i in 0..10 {
        let gateway = if i % 2 == 0 { &one } else { &two };
        let reply = gateway.send("POST", "/v1/checkouts", &headers).await;
        match reply.status {
            200 => allowed += 1,
            429 => refused = Some(reply),
            other => panic!("unexpected {other}: {reply:?}"),
        }
    }
    // share = 1 for a limit of 4 on two replicas: at most one over.
    assert!(
        (4..=5).contains(&allowed),
        "{allowed} of 10 allowed through two Envoys"
    );
    let refused = refused.expect("a 429");
    assert_eq!(refused.json()["code"], "RATE_LIMITED");
    assert_eq!(refused.header("x-ratelimit-limit"), Some("4"));
    assert_eq!(refused.header("x-ratelimit-remaining"), Some("0"));
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=61).contains(&retry), "retry-after {retry}");
}
