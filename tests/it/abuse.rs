//! Bounded abuse: what one request, one connection, one key or one caller can
//! make a server hold, and that each bound refuses with a code and a message
//! naming it while whatever is just under it works.

use std::time::Duration;

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, attribute_context};
use keygate::server::Settings;
use keygate_core::clock::Clock;
use keygate_proto::v1 as pb;
use keygate_proto::v1::revocation_event::Kind;
use keygate_proto::v1::revocation_feed_client::RevocationFeedClient;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::harness::{Backend, TestServer, as_key, epoch, eventually};
use crate::on_both_backends;

on_both_backends!(
    authorize_refuses_each_field_over_its_bound_and_takes_one_just_under,
    seventeenth_watch_of_one_key_is_refused_and_others_are_not,
    a_watch_ends_within_a_heartbeat_when_its_credential_stops_authenticating,
    a_watch_replays_100000_events_exactly_once_in_order,
);

async fn channel(s: &TestServer) -> Channel {
    Channel::from_shared(s.url())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn authorize_request(
    token: &str,
    route: &str,
    ip: &str,
    scopes: &[String],
) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        token: token.into(),
        route: route.into(),
        ip: ip.into(),
        required_scopes: scopes.to_vec(),
    }
}

async fn authorize(
    s: &TestServer,
    req: pb::AuthorizeRequest,
) -> Result<pb::AuthorizeResponse, Status> {
    s.authorizer()
        .await
        .authorize(req)
        .await
        .map(|r| r.into_inner())
}

fn assert_refused(result: Result<pb::AuthorizeResponse, Status>, code: Code, needles: &[&str]) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{:?} should name {needle:?}",
            status.message()
        );
    }
}

async fn authorize_refuses_each_field_over_its_bound_and_takes_one_just_under(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = s.org_key("org_a", &["transaction:read"]).await;
    let allowed = |r: Result<pb::AuthorizeResponse, Status>| {
        let r = r.expect("answered");
        assert_eq!(r.decision(), pb::Decision::Allow, "{r:?}");
    };

    // required_scopes: 32 entries pass, 33 do not.
    let scopes = vec!["transaction:read".to_owned(); 32];
    allowed(authorize(&s, authorize_request(&token, "", "", &scopes)).await);
    let scopes = vec!["transaction:read".to_owned(); 33];
    assert_refused(
        authorize(&s, authorize_request(&token, "", "", &scopes)).await,
        Code::InvalidArgument,
        &["required_scopes", "at most 32 entries"],
    );

    // Each entry at most 128 bytes (the grammar allows 100: that still works).
    let longest = format!("{}:read", "t".repeat(95));
    assert_eq!(longest.len(), 100);
    let r = authorize(&s, authorize_request(&token, "", "", &[longest])).await;
    assert_eq!(
        r.unwrap().decision(),
        pb::Decision::Deny,
        "answered, denied on scope"
    );
    let too_long = format!("{}:read", "t".repeat(124));
    assert_refused(
        authorize(&s, authorize_request(&token, "", "", &[too_long])).await,
        Code::InvalidArgument,
        &["required_scopes", "entry 0", "128 bytes"],
    );

    // route: 2048 bytes pass, 2049 do not.
    let route = format!("GET /v1/transactions/{}", "x".repeat(2048 - 21));
    assert_eq!(route.len(), 2048);
    allowed(authorize(&s, authorize_request(&token, &route, "", &[])).await);
    assert_refused(
        authorize(&s, authorize_request(&token, &format!("{route}x"), "", &[])).await,
        Code::InvalidArgument,
        &["route", "2048 bytes"],
    );

    // ip: 64 bytes pass (the longest address, padded), 65 do not.
    let ip = format!("{:>64}", "0000:0000:0000:0000:0000:ffff:255.255.255.255");
    assert_eq!(ip.len(), 64);
    allowed(authorize(&s, authorize_request(&token, &route, &ip, &[])).await);
    assert_refused(
        authorize(
            &s,
            authorize_request(&token, &route, &format!(" {ip}"), &[]),
        )
        .await,
        Code::InvalidArgument,
        &["ip", "64 bytes"],
    );
}

// ---------------------------------------------------------------- Envoy Check

fn check_request(token: &str, path: &str, extra_headers: usize) -> CheckRequest {
    let mut headers = std::collections::HashMap::from([
        ("authorization".to_owned(), format!("Bearer {token}")),
        (":path".to_owned(), path.to_owned()),
        (":method".to_owned(), "GET".to_owned()),
    ]);
    // What a browser or an SDK might send: many headers, some of them long.
    let mut i = 0;
    while extra_headers > 0 && headers.values().map(String::len).sum::<usize>() < extra_headers {
        headers.insert(format!("x-extra-{i}"), "v".repeat(1000));
        i += 1;
    }
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: path.into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

async fn check(s: &TestServer, req: CheckRequest) -> Result<CheckResponse, Status> {
    AuthorizationClient::new(channel(s).await)
        .check(req)
        .await
        .map(|r| r.into_inner())
}

fn denied_status(response: &CheckResponse) -> Option<(i32, serde_json::Value)> {
    match &response.http_response {
        Some(HttpResponse::DeniedResponse(d)) => Some((
            d.status.as_ref().map_or(0, |s| s.code),
            serde_json::from_str(&d.body).unwrap(),
        )),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_check_answers_an_over_long_path_with_414_naming_the_route() {
    let Some(s) = TestServer::start(Backend::Sqlite).await else {
        return;
    };
    let (_, token) = s.org_key("org_a", &["transaction:read"]).await;
    // "GET " and the path: 2048 bytes is allowed, one more is the client's 414.
    let path = format!("/v1/transactions/{}", "x".repeat(2048 - 21));
    let ok = check(&s, check_request(&token, &format!("{path}?q=1"), 0))
        .await
        .unwrap();
    assert_eq!(ok.status.unwrap().code, 0, "allowed");
    let refused = check(&s, check_request(&token, &format!("{path}x"), 0))
        .await
        .expect("a deny for the client, not an error for Envoy's failure mode");
    let (status, body) = denied_status(&refused).expect("denied");
    assert_eq!(status, 414);
    assert_eq!(body["code"], "URI_TOO_LONG");
    assert!(
        body["message"].as_str().unwrap().contains("route")
            && body["message"].as_str().unwrap().contains("2048 bytes"),
        "{body}"
    );
}

// --------------------------------------------------------------- request size

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_size_limit_are_refused_and_real_envoy_requests_pass() {
    let Some(s) = TestServer::start(Backend::Sqlite).await else {
        return;
    };
    let (_, token) = s.org_key("org_a", &["transaction:read"]).await;
    // Just under 64 KiB reaches Authorize (and its route bound).
    let near = "x".repeat(60 * 1024);
    assert_refused(
        authorize(&s, authorize_request(&token, &near, "", &[])).await,
        Code::InvalidArgument,
        &["route"],
    );
    // Over it, the server does not even decode it.
    let over = "x".repeat(65 * 1024);
    assert_refused(
        authorize(&s, authorize_request(&token, &over, "", &[])).await,
        Code::OutOfRange,
        &["message length too large", "65536"],
    );

    // Envoy sends every header: 60 KiB of them (Envoy's own default limit) pass.
    let big = check_request(&token, "/v1/transactions/1", 60 * 1024);
    let ok = check(&s, big).await.expect("within the Check limit");
    assert_eq!(ok.status.unwrap().code, 0, "allowed");
    let huge = check_request(&token, "/v1/transactions/1", 300 * 1024);
    let status = check(&s, huge).await.expect_err("over the Check limit");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("262144"), "{status:?}");
}

// -------------------------------------------------- timeouts and concurrency

/// A unary call whose request never arrives: headers, then nothing.
async fn stalled_authorize(channel: Channel) -> Result<pb::AuthorizeResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<pb::AuthorizeRequest, pb::AuthorizeResponse>::default();
    let path = http::uri::PathAndQuery::from_static("/keygate.v1.Authorizer/Authorize");
    let never = futures_util::stream::pending::<pb::AuthorizeRequest>();
    grpc.client_streaming(tonic::Request::new(never), path, codec)
        .await
        .map(|r| r.into_inner())
}

async fn open_watch(
    channel: Channel,
    token: &str,
) -> Result<Streaming<pb::RevocationEvent>, Status> {
    RevocationFeedClient::new(channel)
        .watch(as_key(token, pb::WatchRequest { after_sequence: 0 }))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_unary_call_times_out_while_a_watch_lives_on() {
    let Some(s) = TestServer::start_with(Backend::Sqlite, |settings: &mut Settings| {
        settings.limits.request_timeout = Duration::from_millis(300);
    })
    .await
    else {
        return;
    };
    let mut watch = open_watch(channel(&s).await, &s.admin_token).await.unwrap();
    let stalled = tokio::time::timeout(
        Duration::from_secs(10),
        stalled_authorize(channel(&s).await),
    )
    .await
    .expect("the server answers a stalled call");
    let status = stalled.expect_err("timed out");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("300ms"), "{status:?}");
    // A call that does arrive is answered as ever.
    assert_eq!(
        s.authorize(&s.admin_token, "POST /v1/checkouts", "")
            .await
            .decision(),
        pb::Decision::Allow
    );
    // The Watch, open for longer than the timeout, still streams heartbeats.
    for _ in 0..3 {
        let msg = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .unwrap()
            .expect("stream still open")
            .expect("not ended");
        assert_eq!(msg.kind(), Kind::Heartbeat);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_global_limit_are_refused_and_open_watches_hold_no_permit() {
    let Some(s) = TestServer::start_with(Backend::Sqlite, |settings: &mut Settings| {
        settings.limits.max_concurrent_requests = 2;
        settings.limits.request_timeout = Duration::from_secs(60);
    })
    .await
    else {
        return;
    };
    // Open Watches outnumber the limit, yet take none of it once open.
    let mut watches = Vec::new();
    for _ in 0..3 {
        watches.push(open_watch(channel(&s).await, &s.admin_token).await.unwrap());
    }
    assert_eq!(
        s.authorize(&s.admin_token, "POST /v1/checkouts", "")
            .await
            .decision(),
        pb::Decision::Allow
    );
    // Two stalled calls, on two connections, take both permits. A probe
    // below holds a permit while it runs: a stalled call arriving then is
    // refused and ends, so it is started again until both hold theirs.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(tokio::spawn(stalled_authorize(channel(&s).await)));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        for call in &mut stalled {
            if call.is_finished() {
                *call = tokio::spawn(stalled_authorize(channel(&s).await));
            }
        }
        let probe = authorize(
            &s,
            authorize_request(&s.admin_token, "POST /v1/checkouts", "", &[]),
        )
        .await;
        if let Err(status) = probe {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the limit to be reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let [first, second] = <[_; 2]>::try_from(stalled).unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("2 calls in progress"),
        "{refused:?}"
    );
    // Health probes are never refused.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&s).await);
    health
        .check(tonic_health::pb::HealthCheckRequest { service: "".into() })
        .await
        .expect("health answers at the limit");
    // A call that ends gives its permit back.
    first.abort();
    eventually(Duration::from_secs(10), "a permit to come back", || async {
        authorize(
            &s,
            authorize_request(&s.admin_token, "POST /v1/checkouts", "", &[]),
        )
        .await
        .ok()
    })
    .await;
    second.abort();
    drop(watches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_gets_at_most_max_concurrent_streams() {
    let Some(s) = TestServer::start_with(Backend::Sqlite, |settings: &mut Settings| {
        settings.limits.max_concurrent_streams = 2;
    })
    .await
    else {
        return;
    };
    let shared = channel(&s).await;
    let first = open_watch(shared.clone(), &s.admin_token).await.unwrap();
    let _second = open_watch(shared.clone(), &s.admin_token).await.unwrap();
    // A third stream on the same connection waits for one to close...
    let third = tokio::spawn({
        let shared = shared.clone();
        let token = s.admin_token.clone();
        async move { open_watch(shared, &token).await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.is_finished(), "the connection's third stream waits");
    // ...while another connection is not held up.
    open_watch(channel(&s).await, &s.admin_token).await.unwrap();
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third stream opens once one closed")
        .unwrap()
        .unwrap();
}

// ------------------------------------------------------------------ Watch cap

async fn seventeenth_watch_of_one_key_is_refused_and_others_are_not(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, greedy) = s.org_key("org_a", &["revocation:read"]).await;
    let (_, other) = s.org_key("org_b", &["revocation:read"]).await;
    let shared = channel(&s).await;
    let mut open = Vec::new();
    for _ in 0..16 {
        open.push(
            open_watch(shared.clone(), &greedy)
                .await
                .expect("within the cap"),
        );
    }
    let refused = open_watch(channel(&s).await, &greedy)
        .await
        .expect_err("the 17th is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("16 Watch streams"),
        "{refused:?}"
    );
    // Another key is not affected.
    let mut others = open_watch(channel(&s).await, &other)
        .await
        .expect("another key");
    let beat = tokio::time::timeout(Duration::from_secs(5), others.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(beat.kind(), Kind::Heartbeat);
    // Closing one frees its slot.
    drop(open.pop());
    let reopened = eventually(Duration::from_secs(10), "a slot to be freed", || async {
        open_watch(channel(&s).await, &greedy).await.ok()
    })
    .await;
    drop(reopened);
}

// ------------------------------------------------------ Watch credential loss

/// Reads `stream` until it ends; the status it ended with, and how many
/// heartbeats came first.
async fn ending(stream: &mut Streaming<pb::RevocationEvent>) -> (Status, usize) {
    let mut heartbeats = 0;
    let wait = async {
        loop {
            match stream.message().await {
                Ok(Some(msg)) if msg.kind() == Kind::Heartbeat => heartbeats += 1,
                Ok(Some(msg)) => panic!("no event about its own key is handed out: {msg:?}"),
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(5), wait)
        .await
        .expect("the stream ends");
    (status, heartbeats)
}

async fn a_watch_ends_within_a_heartbeat_when_its_credential_stops_authenticating(
    backend: Backend,
) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut admin = s.admin().await;
    let admin_token = s.admin_token.clone();
    let mut bystander = open_watch(channel(&s).await, &admin_token).await.unwrap();
    let watcher = |org: &str| pb::CreateKeyRequest {
        name: format!("{org} watcher"),
        organization_id: org.into(),
        mode: pb::Mode::Live as i32,
        scopes: vec!["revocation:read".into()],
        ..Default::default()
    };
    let mut ended = Vec::new();

    // Revoked, disabled, deleted, rotated with no grace: each ends its stream.
    for change in ["revoke", "disable", "delete", "rotate"] {
        let (key, token) = s.create_key(watcher("org_w")).await;
        let mut stream = open_watch(channel(&s).await, &token).await.unwrap();
        let id = key.key_id.clone();
        match change {
            "revoke" => drop(
                admin
                    .revoke_key(as_key(
                        &admin_token,
                        pb::RevokeKeyRequest {
                            key_id: id.clone(),
                            reason: "leaked".into(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap(),
            ),
            "disable" => drop(
                admin
                    .disable_key(as_key(
                        &admin_token,
                        pb::DisableKeyRequest {
                            key_id: id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap(),
            ),
            "delete" => drop(
                admin
                    .delete_key(as_key(
                        &admin_token,
                        pb::DeleteKeyRequest {
                            key_id: id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap(),
            ),
            _ => drop(
                admin
                    .rotate_key(as_key(
                        &admin_token,
                        pb::RotateKeyRequest {
                            key_id: id.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .unwrap(),
            ),
        }
        let (status, heartbeats) = ending(&mut stream).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{change}: {status:?}");
        assert!(
            heartbeats <= 1,
            "{change}: ended only after {heartbeats} heartbeats"
        );
        ended.push(id);
    }

    // Rotated with a grace period: the old secret's stream lives through it...
    let (key, token) = s.create_key(watcher("org_w")).await;
    let mut graced = open_watch(channel(&s).await, &token).await.unwrap();
    admin
        .rotate_key(as_key(
            &admin_token,
            pb::RotateKeyRequest {
                key_id: key.key_id.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 600,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(5), graced.message())
            .await
            .unwrap()
            .expect("open through the grace period")
            .unwrap();
        match msg.kind() {
            Kind::Heartbeat => heartbeats += 1,
            Kind::Rotated => assert_eq!(msg.key_id, key.key_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    // ...and ends within a heartbeat of its end.
    s.advance(chrono::Duration::seconds(601));
    let (status, heartbeats) = ending(&mut graced).await;
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "grace end: {status:?}"
    );
    assert!(status.message().contains("EXPIRED_TOKEN"), "{status:?}");
    assert!(
        heartbeats <= 1,
        "grace end: ended only after {heartbeats} heartbeats"
    );

    // Expired: the key's own expiry, driven by the clock.
    let expires = s.clock.now() + chrono::Duration::hours(1);
    let (_, token) = s
        .create_key(pb::CreateKeyRequest {
            expires_at: Some(prost_types::Timestamp {
                seconds: expires.timestamp(),
                nanos: 0,
            }),
            ..watcher("org_w")
        })
        .await;
    let mut expiring = open_watch(channel(&s).await, &token).await.unwrap();
    // Open until it expires. The rotated key's grace has just ended, so its
    // EXPIRED_SECRET announcement may arrive first.
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), expiring.message())
            .await
            .unwrap()
            .expect("open until it expires")
            .unwrap();
        match msg.kind() {
            Kind::Heartbeat => break,
            Kind::ExpiredSecret => assert_eq!(msg.key_id, key.key_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    s.advance(chrono::Duration::hours(1));
    let (status, heartbeats) = ending(&mut expiring).await;
    assert_eq!(status.code(), Code::Unauthenticated, "expiry: {status:?}");
    assert!(status.message().contains("EXPIRED_TOKEN"), "{status:?}");
    assert!(
        heartbeats <= 1,
        "expiry: ended only after {heartbeats} heartbeats"
    );

    // The bystander saw every change and streams on.
    let mut seen = Vec::new();
    while seen.len() < ended.len() {
        let msg = tokio::time::timeout(Duration::from_secs(10), bystander.message())
            .await
            .unwrap()
            .expect("the bystander's stream stays open")
            .unwrap();
        if msg.kind() != Kind::Heartbeat
            && ended.contains(&msg.key_id)
            && !seen.contains(&msg.key_id)
        {
            seen.push(msg.key_id);
        }
    }
    let (victim, _) = s.org_key("org_v", &[]).await;
    crate::feed::revoke(&s, &victim.key_id).await;
    while crate::feed::next_change(&mut bystander).await.key_id != victim.key_id {}
}

// ---------------------------------------------------------------- big replay

const REPLAYED: i64 = 100_000;

async fn a_watch_replays_100000_events_exactly_once_in_order(backend: Backend) {
    use keygate::store::EventLog;
    use sqlx::Connection;
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    s.settle().await;
    let start = s.store.head_sequence().await.unwrap();
    // Rows as the log holds them (no audit hash: the follower does not check it).
    let at = epoch().timestamp_micros();
    let key_id = uuid::Uuid::new_v4();
    let sql = match backend {
        Backend::Postgres => format!(
            "INSERT INTO key_events (seq, kind, key_id, organization_id, actor, at, reason) \
             SELECT {start} + n, 'revoked', '{key_id}', NULL, 'test', {at}, '' \
             FROM generate_series(1, {REPLAYED}) AS n"
        ),
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {REPLAYED}) \
             INSERT INTO key_events (seq, kind, key_id, organization_id, actor, at, reason) \
             SELECT {start} + i, 'revoked', '{key_id}', NULL, 'test', {at}, '' FROM n"
        ),
    };
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&s.database_url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    s.settle().await;
    assert_eq!(s.feed.applied(), start + REPLAYED);

    // The oldest position still inside --feed-max-replay (100,000).
    let mut stream = open_watch_after(&s, start).await;
    let mut expected = start + 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while expected <= start + REPLAYED {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the replay finishes in time")
            .unwrap()
            .unwrap();
        if msg.kind() == Kind::Heartbeat {
            continue;
        }
        assert_eq!(msg.kind(), Kind::Revoked, "{msg:?}");
        assert_eq!(msg.sequence, expected, "every event once, in order");
        expected += 1;
    }
    // Then live events, after the replayed ones.
    let (victim, _) = s.org_key("org_v", &[]).await;
    crate::feed::revoke(&s, &victim.key_id).await;
    let live = crate::feed::next_change(&mut stream).await;
    assert_eq!(
        (live.sequence, live.key_id),
        (start + REPLAYED + 2, victim.key_id)
    );
}

async fn open_watch_after(s: &TestServer, after: i64) -> Streaming<pb::RevocationEvent> {
    RevocationFeedClient::new(channel(s).await)
        .watch(as_key(
            &s.admin_token,
            pb::WatchRequest {
                after_sequence: after,
            },
        ))
        .await
        .unwrap()
        .into_inner()
}
