//! JWT credentials (issue 15): an identity provider's tokens as admin
//! credentials (CertoPay's management tokens) and as OAuth2 access tokens in
//! Authorize and Envoy's Check (Paymenter's third-party tokens). The tests
//! make their own RSA, EC and Ed25519 keys, serve the JWKS on loopback and
//! mint the tokens; time moves only by the server's manual clock.

use std::time::Duration;

use keygate::jwt::JwksSettings;
use keygate_core::clock::Clock;
use keygate_core::limits::Allowance;
use keygate_core::policy::Policy;
use keygate_proto::v1 as pb;
use serde_json::{Value, json};
use tonic::Code;

use crate::gateway::Gateway;
use crate::harness::{Backend, TestServer, as_key, eventually};
use crate::jwt_support::{JwksServer, SigningKey, hs256, unsigned};
use crate::on_both_backends;

on_both_backends!(
    an_admin_jwt_creates_keys_in_its_organization_and_is_audited,
    every_refusal_on_admin_and_authorize,
    forged_jwts_cost_no_store_read_and_at_most_one_fetch,
);

const ISS: &str = "https://idp.example/realms/payments";
const OPS: &str = "https://ops.example";

/// The test policy: the harness's routes, one for API keys only (CertoPay's
/// payment endpoint), one for JWTs only, and two issuers on one JWKS.
fn policy(jwks_url: &str) -> String {
    format!(
        r#"
[[route]]
route = "POST /v1/checkouts"
scope = "checkout:create"
[[route]]
route = "GET /v1/transactions/{{id}}"
scope = "transaction:read"
[[route]]
route = "POST /api/payment-gateway/process"
scope = "payment:create"
credentials = ["api_key"]
[[route]]
route = "GET /v1/profile"
scope = "profile:read"
credentials = ["jwt"]

[[jwt_issuer]]
issuer = "{ISS}"
audience = "keygate"
jwks_url = "{jwks_url}"
usage = "both"
organization_claim = "org_id"

[[jwt_issuer]]
issuer = "{OPS}"
audience = "keygate-admin"
jwks_url = "{jwks_url}"
usage = "admin"
system = true
algorithms = ["RS256", "ES256", "EdDSA"]
"#
    )
}

struct Idp {
    rsa: SigningKey,
    ec: SigningKey,
    ed: SigningKey,
    jwks: JwksServer,
}

async fn start_with(
    backend: Backend,
    up: bool,
    configure: impl Fn(&mut keygate::server::Settings),
) -> Option<(TestServer, Idp)> {
    let (rsa, ec, ed) = (
        SigningKey::rsa("rsa-1"),
        SigningKey::ec("ec-1"),
        SigningKey::ed25519("ed-1"),
    );
    let jwks = JwksServer::start(&[&rsa, &ec, &ed]).await;
    jwks.set_up(up);
    let text = policy(&jwks.url);
    let server = TestServer::start_with(backend, |s| {
        let Policy {
            routes,
            jwt_issuers,
        } = Policy::from_toml(&text).expect("jwt test policy");
        s.policy = routes;
        s.jwt_issuers = jwt_issuers;
        s.jwks = JwksSettings {
            tick: Duration::from_millis(20),
            fetch_timeout: Duration::from_secs(2),
            ..JwksSettings::default()
        };
        configure(s);
    })
    .await?;
    Some((server, Idp { rsa, ec, ed, jwks }))
}

async fn start(backend: Backend) -> Option<(TestServer, Idp)> {
    start_with(backend, true, |_| {}).await
}

/// Good claims for `sub` in `org` with `scope`, valid for 10 minutes from
/// the server's clock.
fn claims(s: &TestServer, sub: &str, org: &str, scope: &str) -> Value {
    let now = s.clock.now().timestamp();
    json!({"iss": ISS, "aud": "keygate", "sub": sub, "org_id": org, "scope": scope,
           "iat": now, "exp": now + 600, "jti": format!("{sub}-{now}")})
}

fn with(mut claims: Value, field: &str, value: Value) -> Value {
    claims[field] = value;
    claims
}

async fn authorize(s: &TestServer, token: &str, route: &str) -> pb::AuthorizeResponse {
    s.authorize(token, route, "").await
}

async fn list_keys(s: &TestServer, token: &str) -> Result<pb::ListKeysResponse, tonic::Status> {
    s.admin()
        .await
        .list_keys(as_key(token, pb::ListKeysRequest::default()))
        .await
        .map(|r| r.into_inner())
}

fn reason(r: &pb::AuthorizeResponse) -> pb::DenyReason {
    r.reason()
}

async fn an_admin_jwt_creates_keys_in_its_organization_and_is_audited(backend: Backend) {
    let Some((s, idp)) = start(backend).await else {
        return;
    };
    let (other, _) = s.org_key("org_b", &["checkout:create"]).await;
    let mut c = claims(
        &s,
        "alice",
        "org_a",
        "openid api_key:create api_key:read checkout:create",
    );
    c["jti"] = json!("j-1");
    let jwt = idp.rsa.mint(&c);
    let mut admin = s.admin().await;

    let created = admin
        .create_key(as_key(
            &jwt,
            pb::CreateKeyRequest {
                name: "checkout backend".into(),
                mode: pb::Mode::Live as i32,
                scopes: vec!["checkout:create".into()],
                ..Default::default()
            },
        ))
        .await
        .expect("a JWT with api_key:create creates a key")
        .into_inner();
    let key = created.key.unwrap();
    assert_eq!(key.organization_id, "org_a", "the claim's organization");
    assert_eq!(key.expires_at, None, "the JWT's exp is not inherited");
    let actor = format!("jwt:{ISS}#alice;jti=j-1");
    assert_eq!(key.created_by, actor);
    let allowed = authorize(&s, &created.token, "POST /v1/checkouts").await;
    assert_eq!(allowed.decision(), pb::Decision::Allow);

    // The audit trail names the JWT's subject.
    let events = admin
        .list_key_events(as_key(
            &jwt,
            pb::ListKeyEventsRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].actor, actor);
    assert_eq!(events[0].organization_id, "org_a");

    // Never more than the caller: no scope it lacks, no SYSTEM key.
    for (req, needle) in [
        (
            pb::CreateKeyRequest {
                name: "wider".into(),
                scopes: vec!["transaction:read".into()],
                ..Default::default()
            },
            "transaction:read",
        ),
        (
            pb::CreateKeyRequest {
                name: "platform".into(),
                tier: pb::KeyTier::System as i32,
                scopes: vec!["checkout:create".into()],
                ..Default::default()
            },
            "SYSTEM",
        ),
    ] {
        let err = admin.create_key(as_key(&jwt, req)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(err.message().contains(needle), "{err:?}");
    }

    // Organization isolation: org_b's key does not exist for it.
    let err = admin
        .get_key(as_key(
            &jwt,
            pb::GetKeyRequest {
                key_id: other.key_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let listed = list_keys(&s, &jwt).await.unwrap();
    assert!(listed.keys.iter().all(|k| k.organization_id == "org_a"));
    let err = admin
        .list_keys(as_key(
            &jwt,
            pb::ListKeysRequest {
                organization_id: "org_b".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // No api_key:* scope: PERMISSION_DENIED.
    let weak = idp
        .ec
        .mint(&claims(&s, "bob", "org_a", "checkout:create profile:read"));
    let err = list_keys(&s, &weak).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("api_key:read"), "{err:?}");

    // A system issuer's token without an organization is a SYSTEM caller;
    // that issuer is trusted for admin only, so Authorize refuses it.
    let now = s.clock.now().timestamp();
    let ops = idp
        .ed
        .mint(&json!({"iss": OPS, "aud": "keygate-admin", "sub": "oncall",
        "scope": "api_key:read revocation:read checkout:create", "iat": now, "exp": now + 300}));
    let all = list_keys(&s, &ops).await.unwrap();
    assert!(all.keys.iter().any(|k| k.key_id == other.key_id));
    let refused = authorize(&s, &ops, "POST /v1/checkouts").await;
    assert_eq!(reason(&refused), pb::DenyReason::InvalidToken);
    // ListReplicas takes a JWT too.
    let mut feed =
        keygate_proto::v1::revocation_feed_client::RevocationFeedClient::connect(s.url())
            .await
            .unwrap();
    feed.list_replicas(as_key(&ops, pb::ListReplicasRequest {}))
        .await
        .expect("ListReplicas with a JWT holding revocation:read");

    // `keygate keys` takes the JWT through KEYGATE_TOKEN as it takes a key.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["keys", "--server", &s.url(), "--json", "list"])
        .env("KEYGATE_TOKEN", &jwt)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains(&key.key_id) && !stdout.contains(&other.key_id));
}

/// Every refusal the issue lists, on an admin call and on Authorize.
async fn every_refusal_on_admin_and_authorize(backend: Backend) {
    let Some((s, idp)) = start(backend).await else {
        return;
    };
    let now = s.clock.now().timestamp();
    let good = claims(&s, "alice", "org_a", "api_key:read checkout:create");
    let public_pem = idp.rsa.public_pem.clone().unwrap();
    let cases: Vec<(&str, String, pb::DenyReason)> = vec![
        (
            "expired",
            idp.rsa.mint(&with(
                with(good.clone(), "iat", json!(now - 700)),
                "exp",
                json!(now - 100),
            )),
            pb::DenyReason::ExpiredToken,
        ),
        (
            "nbf in the future",
            idp.rsa.mint(&with(good.clone(), "nbf", json!(now + 120))),
            pb::DenyReason::InvalidToken,
        ),
        (
            "wrong iss",
            idp.rsa
                .mint(&with(good.clone(), "iss", json!("https://evil.example"))),
            pb::DenyReason::InvalidToken,
        ),
        (
            "wrong aud",
            idp.rsa
                .mint(&with(good.clone(), "aud", json!("someone-else"))),
            pb::DenyReason::InvalidToken,
        ),
        ("alg none", unsigned(&good), pb::DenyReason::InvalidToken),
        (
            "HS256 with the RSA public key as secret",
            hs256("rsa-1", public_pem.as_bytes(), &good),
            pb::DenyReason::InvalidToken,
        ),
        (
            "lifetime over the maximum",
            idp.rsa.mint(&with(good.clone(), "exp", json!(now + 3601))),
            pb::DenyReason::InvalidToken,
        ),
        (
            "signed by a key the JWKS does not hold, under its kid",
            SigningKey::ec("ec-1").mint(&good),
            pb::DenyReason::InvalidToken,
        ),
        (
            "garbage with three dots",
            "eyJhbGciOiJSUzI1NiJ9.Zm9v.YmFy.YmF6".into(),
            pb::DenyReason::InvalidToken,
        ),
        ("dots only", "...".into(), pb::DenyReason::InvalidToken),
    ];
    // The good token passes both, so each refusal below is the case's own.
    assert!(list_keys(&s, &idp.rsa.mint(&good)).await.is_ok());
    let ok = authorize(&s, &idp.rsa.mint(&good), "POST /v1/checkouts").await;
    assert_eq!(ok.decision(), pb::Decision::Allow, "{ok:?}");
    for (what, token, expected) in &cases {
        let err = list_keys(&s, token).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err:?}");
        assert!(
            err.message().contains(expected.as_str_name()),
            "{what}: {err:?}"
        );
        let r = authorize(&s, token, "POST /v1/checkouts").await;
        assert_eq!(r.decision(), pb::Decision::Deny, "{what}");
        assert_eq!(reason(&r), *expected, "{what}");
        assert_eq!(r.http_status, 401, "{what}");
        assert!(
            r.organization_id.is_empty() && r.subject.is_empty(),
            "{what}"
        );
    }

    // An unknown kid: the JWKS is fetched again once, then it is refused;
    // the next unknown kid within 30 s fetches nothing.
    let before = idp.jwks.hits();
    let unknown = idp.rsa.mint_as("rsa-unknown", &good);
    let err = list_keys(&s, &unknown).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(idp.jwks.hits(), before + 1, "refetched once");
    let r = authorize(&s, &unknown, "POST /v1/checkouts").await;
    assert_eq!(reason(&r), pb::DenyReason::InvalidToken);
    let other = idp.ec.mint_as("ec-unknown", &good);
    assert_eq!(
        reason(&authorize(&s, &other, "POST /v1/checkouts").await),
        pb::DenyReason::InvalidToken
    );
    assert_eq!(idp.jwks.hits(), before + 1, "at most once per 30 s");

    // 1 MiB: refused on both (admin: the metadata is over the HTTP/2
    // header limit; Authorize: the request is over --max-request-size).
    let huge = format!("eyJ{}.e30.sig", "A".repeat(1024 * 1024));
    assert!(list_keys(&s, &huge).await.is_err());
    let err = s
        .authorizer()
        .await
        .authorize(pb::AuthorizeRequest {
            token: huge,
            route: "POST /v1/checkouts".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    // Just over the JWT bound (8 KiB) but under the request bound: a DENY.
    let long = format!("eyJ{}.e30.sig", "A".repeat(9 * 1024));
    assert_eq!(
        reason(&authorize(&s, &long, "POST /v1/checkouts").await),
        pb::DenyReason::InvalidToken
    );
    assert!(s.is_serving());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_is_allowed_by_scope_with_its_subject_and_no_key_id() {
    let (s, idp) = start_with(Backend::Sqlite, true, |s| {
        s.default_rate_limit = Allowance::PerMinute(std::num::NonZeroU32::new(3).unwrap());
    })
    .await
    .unwrap();
    // Every algorithm the issuer accepts, with the scope as a string or an array.
    let scoped = claims(&s, "alice", "org_a", "checkout:create profile:read");
    for key in [&idp.rsa, &idp.ec, &idp.ed] {
        let token = key.mint(&with(scoped.clone(), "sub", json!(key.kid)));
        let r = authorize(&s, &format!("Bearer {token}"), "POST /v1/checkouts").await;
        assert_eq!(r.decision(), pb::Decision::Allow, "{}: {r:?}", key.kid);
        assert_eq!(r.organization_id, "org_a");
        assert_eq!(r.subject, key.kid);
        assert_eq!(
            r.credential_kind(),
            pb::authorize_response::CredentialKind::Jwt
        );
        assert_eq!(r.key_id, "");
        assert_eq!(r.scopes, ["checkout:create", "profile:read"]);
        assert_eq!(r.required_scope, "checkout:create");
    }
    let scp = with(scoped.clone(), "scope", json!(["transaction:read"]));
    let r = authorize(&s, &idp.ec.mint(&scp), "GET /v1/transactions/tx_1").await;
    assert_eq!(r.decision(), pb::Decision::Allow, "{r:?}");

    // Missing scope: 403, naming it.
    let token = idp.rsa.mint(&scoped);
    let r = authorize(&s, &token, "GET /v1/transactions/tx_1").await;
    assert_eq!(reason(&r), pb::DenyReason::InsufficientScope);
    assert_eq!(
        (r.http_status, r.required_scope.as_str()),
        (403, "transaction:read")
    );
    assert_eq!(r.subject, "alice");

    // A route for API keys only refuses the JWT (401), and one for JWTs only
    // refuses a key.
    let all = idp
        .ed
        .mint(&claims(&s, "carol", "org_a", "payment:create profile:read"));
    let r = authorize(&s, &all, "POST /api/payment-gateway/process").await;
    assert_eq!(
        (reason(&r), r.http_status),
        (pb::DenyReason::InvalidToken, 401)
    );
    let (_, api_key) = s
        .org_key("org_a", &["payment:create", "profile:read"])
        .await;
    let r = authorize(&s, &api_key, "POST /api/payment-gateway/process").await;
    assert_eq!(r.decision(), pb::Decision::Allow);
    assert_eq!(
        r.credential_kind(),
        pb::authorize_response::CredentialKind::ApiKey
    );
    let r = authorize(&s, &api_key, "GET /v1/profile").await;
    assert_eq!(
        (reason(&r), r.http_status),
        (pb::DenyReason::InvalidToken, 401)
    );
    let r = authorize(&s, &all, "GET /v1/profile").await;
    assert_eq!(r.decision(), pb::Decision::Allow);

    // Rate limits count per subject within the issuer, at the server default
    // (3 here), whatever token the subject presents.
    let dave = claims(&s, "dave", "org_a", "checkout:create");
    for i in 0..3 {
        let t = idp
            .rsa
            .mint(&with(dave.clone(), "jti", json!(format!("d-{i}"))));
        let r = authorize(&s, &t, "POST /v1/checkouts").await;
        assert_eq!(r.decision(), pb::Decision::Allow, "request {i}");
        assert_eq!(r.rate_limit, 3);
    }
    let t = idp.ec.mint(&with(dave.clone(), "jti", json!("d-9")));
    let r = authorize(&s, &t, "POST /v1/checkouts").await;
    assert_eq!(reason(&r), pb::DenyReason::RateLimited);
    let erin = idp
        .rsa
        .mint(&claims(&s, "erin", "org_a", "checkout:create"));
    let r = authorize(&s, &erin, "POST /v1/checkouts").await;
    assert_eq!(
        r.decision(),
        pb::Decision::Allow,
        "another subject has its own limit"
    );

    // A verified token is remembered, but never past its exp.
    s.advance(chrono::Duration::seconds(600 + 30));
    let r = authorize(&s, &erin, "POST /v1/checkouts").await;
    assert_eq!(reason(&r), pb::DenyReason::ExpiredToken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_at_the_issuer_is_picked_up_without_a_restart() {
    let (s, idp) = start(Backend::Sqlite).await.unwrap();
    let c = claims(&s, "alice", "org_a", "checkout:create api_key:read");
    let old = idp.ec.mint(&c);
    assert_eq!(
        authorize(&s, &old, "POST /v1/checkouts").await.decision(),
        pb::Decision::Allow
    );

    // A new kid appears: the first token naming it makes keygate fetch at once.
    let new = SigningKey::ed25519("ed-2");
    idp.jwks.set_keys(&[&idp.rsa, &idp.ec, &idp.ed, &new]);
    let token = new.mint(&c);
    assert_eq!(
        authorize(&s, &token, "POST /v1/checkouts").await.decision(),
        pb::Decision::Allow
    );
    assert!(list_keys(&s, &token).await.is_ok());

    // Another within 30 s waits for the background refresh (Cache-Control
    // says 60 s; nothing is fetched twice within 30 s for unknown kids).
    idp.jwks.set_cache_control("public, max-age=60");
    let newer = SigningKey::rsa("rsa-2");
    idp.jwks.set_keys(&[&idp.rsa, &idp.ed, &new, &newer]);
    let token = newer.mint(&c);
    assert_eq!(
        reason(&authorize(&s, &token, "POST /v1/checkouts").await),
        pb::DenyReason::InvalidToken
    );
    s.advance(chrono::Duration::seconds(301));
    let fresh = newer.mint(&claims(&s, "alice", "org_a", "checkout:create"));
    eventually(Duration::from_secs(10), "the refreshed JWKS", || async {
        (authorize(&s, &fresh, "POST /v1/checkouts").await.decision() == pb::Decision::Allow)
            .then_some(())
    })
    .await;

    // The EC key left the JWKS with that refresh: its token is refused now,
    // though it was verified (and remembered) before, and has not expired.
    let r = authorize(&s, &old, "POST /v1/checkouts").await;
    assert_eq!(reason(&r), pb::DenyReason::InvalidToken, "{r:?}");
    let err = list_keys(&s, &old).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Cache-Control's 60 s is honoured: the next refresh comes after 60 s,
    // not after the 5-minute default.
    let hits = idp.jwks.hits();
    s.advance(chrono::Duration::seconds(61));
    eventually(
        Duration::from_secs(10),
        "a refresh after max-age",
        || async { (idp.jwks.hits() > hits).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_down_at_start_or_later_refuses_and_recovers_without_a_restart() {
    let (s, idp) = start_with(Backend::Sqlite, false, |_| {}).await.unwrap();
    let token = |s: &TestServer| {
        idp.rsa
            .mint(&claims(s, "alice", "org_a", "api_key:read checkout:create"))
    };

    // Down at start: refused, never accepted unchecked.
    let t = token(&s);
    let err = list_keys(&s, &t).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(ISS), "{err:?}");
    let r = authorize(&s, &t, "POST /v1/checkouts").await;
    assert_eq!(
        (r.decision(), reason(&r)),
        (pb::Decision::Deny, pb::DenyReason::InvalidToken)
    );

    // Back up: the next retry (5 s on) loads the keys.
    idp.jwks.set_up(true);
    s.advance(chrono::Duration::seconds(6));
    eventually(
        Duration::from_secs(10),
        "the JWKS after recovery",
        || async { list_keys(&s, &t).await.ok() },
    )
    .await;
    assert_eq!(
        authorize(&s, &t, "POST /v1/checkouts").await.decision(),
        pb::Decision::Allow
    );

    // Down later: a refresh that fails keeps the keys a while (15 minutes
    // since the last good fetch), then refuses.
    idp.jwks.set_up(false);
    s.advance(chrono::Duration::seconds(301));
    let t = token(&s);
    assert!(
        list_keys(&s, &t).await.is_ok(),
        "a short outage is survived"
    );
    s.advance(chrono::Duration::seconds(600));
    let t = token(&s);
    eventually(Duration::from_secs(10), "keys too old to trust", || async {
        let err = list_keys(&s, &t).await.err()?;
        (err.code() == Code::Unavailable).then_some(())
    })
    .await;
    let r = authorize(&s, &t, "POST /v1/checkouts").await;
    assert_eq!(r.decision(), pb::Decision::Deny);

    // And recovers, again without a restart.
    idp.jwks.set_up(true);
    s.advance(chrono::Duration::seconds(6));
    let t = token(&s);
    eventually(Duration::from_secs(10), "recovery", || async {
        (authorize(&s, &t, "POST /v1/checkouts").await.decision() == pb::Decision::Allow)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_opened_with_a_jwt_ends_when_the_jwt_expires() {
    let (s, idp) = start(Backend::Sqlite).await.unwrap();
    let now = s.clock.now().timestamp();
    let ops = idp.ed.mint(
        &json!({"iss": OPS, "aud": "keygate-admin", "sub": "watcher",
        "scope": "revocation:read", "iat": now, "exp": now + 60}),
    );
    let mut stream = crate::feed::watch(&s.url(), &ops, 0).await;
    s.advance(chrono::Duration::seconds(91));
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the stream ends");
    let status = ended.expect("with an error");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("EXPIRED_TOKEN"), "{status:?}");
}

/// Through a real Envoy: a JWT access token reaches the upstream on a route
/// that accepts JWTs, with `x-keygate-subject`, and is a 401 on a route for
/// API keys only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_envoy_a_jwt_reaches_jwt_routes_only() {
    let Some((s, idp)) = start(Backend::Sqlite).await else {
        return;
    };
    let Some(gateway) = Gateway::start(s.addr).await else {
        return;
    };
    let token = idp.ec.mint(&claims(
        &s,
        "partner-app",
        "org_a",
        "checkout:create payment:create",
    ));
    let bearer = format!("Bearer {token}");
    let reply = gateway
        .send(
            "POST",
            "/v1/checkouts",
            &[
                ("authorization", &bearer),
                ("x-keygate-subject", "someone-else"),
                ("x-keygate-key-id", "forged"),
            ],
        )
        .await;
    let echo = reply.echo();
    assert_eq!(echo.all("x-keygate-subject"), ["partner-app"]);
    assert_eq!(echo.all("x-keygate-organization-id"), ["org_a"]);
    assert_eq!(echo.header("x-keygate-credential"), Some("jwt"));
    assert_eq!(echo.header("x-keygate-key-id"), None);
    assert_eq!(
        echo.header("authorization"),
        None,
        "the token went upstream"
    );

    let reply = gateway
        .send(
            "POST",
            "/api/payment-gateway/process",
            &[("authorization", &bearer)],
        )
        .await;
    assert_eq!(reply.status, 401, "{reply:?}");
    assert_eq!(reply.json()["code"], "INVALID_TOKEN", "{reply:?}");

    // The same route takes an API key.
    let (key, api_key) = s.org_key("org_a", &["payment:create"]).await;
    let echo = gateway
        .send(
            "POST",
            "/api/payment-gateway/process",
            &[("x-api-key", &api_key)],
        )
        .await
        .echo();
    assert_eq!(echo.header("x-keygate-key-id"), Some(key.key_id.as_str()));
    assert_eq!(echo.header("x-keygate-subject"), None);
}

/// The README's "JWT credentials" example, run as written: scripts/mint-jwt
/// as the identity provider, the real keygate binary, the real grpcurl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_jwt_example_works_as_written() {
    let Some(grpcurl) = crate::walkthrough::grpcurl() else {
        return;
    };
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let block = &readme[readme
        .find("<!-- jwt-example:begin -->")
        .expect("example start")
        ..readme
            .find("<!-- jwt-example:end -->")
            .expect("example end")];
    let body =
        &block[block.find("```bash\n").unwrap() + "```bash\n".len()..block.rfind("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_keygate"))
        .parent()
        .unwrap()
        .to_owned();
    let scripts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let path = std::env::join_paths(
        [bin_dir, scripts, grpcurl.parent().unwrap().to_owned()]
            .into_iter()
            .chain(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            )),
    )
    .unwrap();
    let port = crate::binary::free_port();
    let script = body.to_owned();
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || {
            std::process::Command::new("timeout")
                .args(["120", "bash", "-euo", "pipefail", "-c", &script])
                .current_dir(dir)
                .env("PATH", path)
                .env("ADDR", format!("127.0.0.1:{port}"))
                .env_remove("KEYGATE_DATABASE_URL")
                .env_remove("KEYGATE_TOKEN")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "example failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("\"actor\": \"jwt:https://idp.example.com/realms/payments#alice;jti="),
        "{stdout}"
    );
    let allow = stdout
        .find("\"decision\": \"ALLOW\"")
        .expect("the access token is allowed");
    assert!(stdout.contains("\"subject\": \"partner-app\""), "{stdout}");
    assert!(stdout.contains("\"credentialKind\": \"JWT\""), "{stdout}");
    let deny = stdout
        .find("\"reason\": \"INVALID_TOKEN\"")
        .expect("the payment route refuses it");
    assert!(allow < deny, "{stdout}");
}

/// A gateway's CachedAuthorizer never caches a JWT's answer: past `exp` the
/// very next call is EXPIRED_TOKEN, and every call is counted by keygate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_authorizer_never_caches_a_jwt_answer() {
    let (s, idp) = start(Backend::Sqlite).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(s.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = keygate_client::CachedAuthorizer::new(
        channel,
        s.admin_token.clone(),
        keygate_client::ClientSettings {
            ttl: Duration::from_secs(600),
            ..Default::default()
        },
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the client's feed", || async {
        client.feed_alive().then_some(())
    })
    .await;
    let token = idp
        .rsa
        .mint(&claims(&s, "alice", "org_a", "checkout:create"));
    let request = || pb::AuthorizeRequest {
        token: token.clone(),
        route: "POST /v1/checkouts".into(),
        ..Default::default()
    };
    for remaining in [99, 98] {
        let r = client.authorize(request()).await.unwrap();
        assert_eq!(r.decision(), pb::Decision::Allow);
        assert_eq!(r.rate_limit_remaining, remaining, "counted by keygate");
    }
    s.advance(chrono::Duration::seconds(600 + 30));
    let r = client.authorize(request()).await.unwrap();
    assert_eq!(r.reason(), pb::DenyReason::ExpiredToken);
}

/// A bad issuer stops `serve` with a message naming the issuer and the
/// field: a refused algorithm, plain HTTP off loopback.
#[tokio::test]
async fn a_bad_issuer_stops_serve_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    for (table, needle) in [
        (
            "algorithms = [\"RS256\", \"HS256\"]\njwks_url = \"https://idp.example/certs\"",
            "algorithms: \"HS256\" is never accepted",
        ),
        (
            "algorithms = [\"none\"]\njwks_url = \"https://idp.example/certs\"",
            "algorithms: \"none\" is never accepted",
        ),
        (
            "jwks_url = \"http://idp.example/certs\"",
            "jwks_url: \"http://idp.example/certs\" must use https://",
        ),
    ] {
        std::fs::write(
            &policy,
            format!("[[jwt_issuer]]\nissuer = \"https://idp.example\"\naudience = \"keygate\"\n{table}\n"),
        )
        .unwrap();
        let out = crate::binary::keygate(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--policy"])
            .arg(&policy)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("jwt_issuer #1 (\"https://idp.example\")") && stderr.contains(needle),
            "{stderr}"
        );
    }
}

/// The production path: a JWKS over HTTPS, trusted through the issuer's
/// own CA (`jwks_ca_file`); the same URL without that CA is not trusted
/// (the public roots do not know it), and its tokens are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_jwks_is_trusted_through_the_issuers_ca_only() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "test identity provider CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("idp-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let key = SigningKey::ec("ec-tls");
    let jwks = JwksServer::start_tls(&[&key], &leaf.pem(), &leaf_key.serialize_pem()).await;
    let text = format!(
        "[[route]]\nroute = \"POST /v1/checkouts\"\nscope = \"checkout:create\"\n\
         [[jwt_issuer]]\nissuer = \"{ISS}\"\naudience = \"keygate\"\njwks_url = \"{url}\"\njwks_ca_file = \"{ca}\"\n\
         [[jwt_issuer]]\nissuer = \"{OPS}\"\naudience = \"keygate\"\njwks_url = \"{url}\"\n",
        url = jwks.url,
        ca = ca_file.display(),
    );
    let s = TestServer::start_with(Backend::Sqlite, |s| {
        let policy = Policy::from_toml(&text).expect("https policy");
        s.policy = policy.routes;
        s.jwt_issuers = policy.jwt_issuers;
    })
    .await
    .unwrap();
    let token = key.mint(&claims(
        &s,
        "alice",
        "org_a",
        "checkout:create api_key:read",
    ));
    let r = authorize(&s, &token, "POST /v1/checkouts").await;
    assert_eq!(r.decision(), pb::Decision::Allow, "{r:?}");
    assert!(list_keys(&s, &token).await.is_ok());

    let untrusted = key.mint(&with(
        claims(&s, "mallory", "org_a", "checkout:create api_key:read"),
        "iss",
        json!(OPS),
    ));
    let err = list_keys(&s, &untrusted).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        reason(&authorize(&s, &untrusted, "POST /v1/checkouts").await),
        pb::DenyReason::InvalidToken
    );
    assert_eq!(
        jwks.hits(),
        1,
        "only the fetch through the issuer's CA got an answer"
    );
}

/// A flood of forged JWTs (a real kid with another key's signature, made-up
/// kids, garbage) never reaches the store, and costs the issuer one JWKS
/// fetch at most; a real token is allowed again and again with no store
/// read either.
async fn forged_jwts_cost_no_store_read_and_at_most_one_fetch(backend: Backend) {
    let Some((s, idp)) = start(backend).await else {
        return;
    };
    let c = claims(&s, "alice", "org_a", "checkout:create");
    let impostor = SigningKey::ec("ec-1");
    let mut tokens = Vec::new();
    for i in 0..100 {
        tokens.push(impostor.mint(&with(c.clone(), "jti", json!(i))));
        tokens.push(idp.ed.mint_as(&format!("kid-{i}"), &c));
        tokens.push(format!("eyJhbGciOiJFUzI1NiJ9.{i}.x"));
    }
    let (reads, hits) = (s.store.key_reads(), idp.jwks.hits());
    let mut client = s.authorizer().await;
    for token in &tokens {
        let r = client
            .authorize(pb::AuthorizeRequest {
                token: token.clone(),
                route: "POST /v1/checkouts".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reason(&r), pb::DenyReason::InvalidToken);
    }
    let real = idp.rsa.mint(&c);
    for _ in 0..50 {
        assert_eq!(
            authorize(&s, &real, "POST /v1/checkouts").await.decision(),
            pb::Decision::Allow
        );
    }
    assert_eq!(s.store.key_reads() - reads, 0, "JWTs never reach the store");
    assert!(
        idp.jwks.hits() - hits <= 1,
        "made-up kids cost one fetch at most"
    );
}
