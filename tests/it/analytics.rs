//! Usage analytics: Authorize outcomes per key in per-minute and per-hour
//! buckets, written by the usage flush, summed over replicas, read with
//! GetKeyUsage and `keygate keys usage`, swept after their retention.

use chrono::{DateTime, Duration, Utc};
use keygate_core::analytics::UsageRetention;
use keygate_core::clock::Clock;
use keygate_proto::convert::timestamp;
use keygate_proto::v1 as pb;
use tonic::Code;

use crate::harness::{Backend, TestServer, as_key, execute_sql};
use crate::on_both_backends;

const ALLOWED: &str = "POST /v1/checkouts";
/// Needs transaction:read, which the test keys lack.
const FORBIDDEN: &str = "GET /v1/transactions/42";

on_both_backends!(
    five_allows_and_three_insufficient_scope_show_after_a_flush,
    a_failed_flush_loses_no_count_and_counts_none_twice,
    two_replicas_counts_add_up,
    a_replica_with_analytics_off_counts_nothing_and_reads_the_others,
    usage_is_isolated_by_organization_and_needs_read,
    bad_usage_requests_name_the_field,
    refused_credentials_of_existing_keys_count_and_unknown_ids_do_not,
    old_buckets_are_swept_after_their_retention,
);

fn request(
    key_id: &str,
    org: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    granularity: pb::UsageGranularity,
) -> pb::GetKeyUsageRequest {
    pb::GetKeyUsageRequest {
        key_id: key_id.into(),
        organization_id: org.into(),
        start: Some(timestamp(start)),
        end: Some(timestamp(end)),
        granularity: granularity.into(),
    }
}

/// The end of a range that takes in calls made at the test clock's `now`: a
/// range's end is exclusive, and the clock has not moved since the calls.
fn just_after(now: DateTime<Utc>) -> DateTime<Utc> {
    now + Duration::seconds(1)
}

/// The last hour of `key_id`'s usage, asked as `token`.
async fn usage(
    s: &TestServer,
    token: &str,
    key_id: &str,
    granularity: pb::UsageGranularity,
) -> Result<pb::GetKeyUsageResponse, tonic::Status> {
    let now = s.clock.now();
    let req = request(
        key_id,
        "",
        now - Duration::hours(1),
        just_after(now),
        granularity,
    );
    s.admin()
        .await
        .get_key_usage(as_key(token, req))
        .await
        .map(|r| r.into_inner())
}

/// (allowed, [(reason, calls)]) summed over every bucket.
fn totals(r: &pb::GetKeyUsageResponse) -> (u64, Vec<(pb::DenyReason, u64)>) {
    let allowed = r.buckets.iter().map(|b| b.allowed).sum();
    let mut denied: Vec<(pb::DenyReason, u64)> = Vec::new();
    for d in r.buckets.iter().flat_map(|b| &b.denied) {
        match denied.iter_mut().find(|(r, _)| *r == d.reason()) {
            Some(entry) => entry.1 += d.calls,
            None => denied.push((d.reason(), d.calls)),
        }
    }
    (allowed, denied)
}

async fn calls(s: &TestServer, token: &str, allowed: usize, forbidden: usize) {
    for _ in 0..allowed {
        assert_eq!(
            s.authorize(token, ALLOWED, "").await.decision(),
            pb::Decision::Allow
        );
    }
    for _ in 0..forbidden {
        let r = s.authorize(token, FORBIDDEN, "").await;
        assert_eq!(r.reason(), pb::DenyReason::InsufficientScope);
    }
}

async fn five_allows_and_three_insufficient_scope_show_after_a_flush(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    calls(&s, &token, 5, 3).await;
    // Nothing is written per request: the store has no rows yet.
    let before = usage(
        &s,
        &s.admin_token,
        &key.key_id,
        pb::UsageGranularity::Minute,
    )
    .await
    .unwrap();
    assert!(before.buckets.is_empty(), "{before:?}");

    s.keys.flush_usage().await.unwrap();
    for granularity in [pb::UsageGranularity::Minute, pb::UsageGranularity::Hour] {
        let r = usage(&s, &s.admin_token, &key.key_id, granularity)
            .await
            .unwrap();
        assert_eq!(r.buckets.len(), 1, "{granularity:?}: {r:?}");
        let b = &r.buckets[0];
        assert_eq!(b.key_id, key.key_id);
        assert_eq!(b.allowed, 5);
        assert_eq!(b.denied.len(), 1);
        assert_eq!(b.denied[0].reason(), pb::DenyReason::InsufficientScope);
        assert_eq!(b.denied[0].calls, 3);
        assert_eq!(r.granularity(), granularity);
    }
    // The minute bucket is the one the calls fell in.
    let r = usage(
        &s,
        &s.admin_token,
        &key.key_id,
        pb::UsageGranularity::Minute,
    )
    .await
    .unwrap();
    let now = s.clock.now().timestamp();
    assert_eq!(r.buckets[0].start.unwrap().seconds, now - now % 60);

    // The CLI shows the same, a row per bucket with a bar (its range ends
    // at the real time, which the test clock has not passed yet).
    let (ok, out, err) = crate::cli::keys(
        &s,
        &["usage", &key.key_id, "--since", "24h", "--by", "hour"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("START (UTC)") && out.contains("ALLOW"),
        "{out}"
    );
    assert!(out.contains("INSUFFICIENT_SCOPE=3"), "{out}");
    assert!(out.contains('█'), "{out}");
    assert!(!out.contains(&token), "no token in the output");
    let (ok, out, _) = crate::cli::keys(&s, &["--json", "usage", &key.key_id]).await;
    assert!(ok);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{out}");
    assert_eq!(rows[0]["allowed"], 5);
    assert_eq!(rows[0]["denied"]["INSUFFICIENT_SCOPE"], 3);

    // A later minute is a bucket of its own; the hour bucket adds up.
    s.advance(Duration::minutes(1));
    calls(&s, &token, 2, 0).await;
    s.keys.flush_usage().await.unwrap();
    let minutes = usage(
        &s,
        &s.admin_token,
        &key.key_id,
        pb::UsageGranularity::Minute,
    )
    .await
    .unwrap();
    assert_eq!(minutes.buckets.len(), 2);
    assert_eq!(minutes.buckets[1].allowed, 2);
    let hours = usage(&s, &s.admin_token, &key.key_id, pb::UsageGranularity::Hour)
        .await
        .unwrap();
    let hour_total: u64 = hours.buckets.iter().map(|b| b.allowed).sum();
    assert_eq!(hour_total, 7);
}

async fn a_failed_flush_loses_no_count_and_counts_none_twice(backend: Backend) {
    // Only the test's own flushes run.
    let Some(s) = TestServer::start_with(backend, |settings| {
        settings.usage_flush_interval = std::time::Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    calls(&s, &token, 5, 3).await;
    // The buckets' table is away: the write fails and the counts go back.
    execute_sql(&s, "ALTER TABLE key_usage RENAME TO key_usage_away").await;
    assert!(s.keys.flush_usage().await.is_err());
    execute_sql(&s, "ALTER TABLE key_usage_away RENAME TO key_usage").await;
    calls(&s, &token, 1, 0).await;
    s.keys.flush_usage().await.unwrap();
    for granularity in [pb::UsageGranularity::Minute, pb::UsageGranularity::Hour] {
        let r = usage(&s, &s.admin_token, &key.key_id, granularity)
            .await
            .unwrap();
        let (allowed, denied) = totals(&r);
        assert_eq!(allowed, 6, "{granularity:?}: {r:?}");
        assert_eq!(
            denied,
            [(pb::DenyReason::InsufficientScope, 3)],
            "{granularity:?}"
        );
    }
    // Nothing is left to write twice.
    let rows = count_rows(&s).await;
    s.keys.flush_usage().await.unwrap();
    assert_eq!(count_rows(&s).await, rows);
}

async fn two_replicas_counts_add_up(backend: Backend) {
    let Some(a) = TestServer::start(backend).await else {
        return;
    };
    let b = a.join(|_| {}).await;
    let (key, token) = a.org_key("org_a", &["checkout:create"]).await;
    b.settle().await;
    calls(&a, &token, 2, 1).await;
    calls(&b, &token, 3, 2).await;
    a.keys.flush_usage().await.unwrap();
    b.keys.flush_usage().await.unwrap();
    for granularity in [pb::UsageGranularity::Minute, pb::UsageGranularity::Hour] {
        let r = usage(&a, &a.admin_token, &key.key_id, granularity)
            .await
            .unwrap();
        assert_eq!(r.buckets.len(), 1, "{r:?}");
        assert_eq!(
            totals(&r),
            (5, vec![(pb::DenyReason::InsufficientScope, 3)]),
            "{granularity:?}"
        );
    }
    // Either replica answers the same.
    let r = usage(
        &b,
        &b.admin_token,
        &key.key_id,
        pb::UsageGranularity::Minute,
    )
    .await
    .unwrap();
    assert_eq!(totals(&r).0, 5);
}

/// `--usage-analytics off` on one replica: its calls count nowhere, the
/// other replica's still do, and either reads them back. Last-used times are
/// not analytics: they are still written.
async fn a_replica_with_analytics_off_counts_nothing_and_reads_the_others(backend: Backend) {
    let Some(a) = TestServer::start(backend).await else {
        return;
    };
    let b = a.join(|s| s.usage_analytics = false).await;
    let (key, token) = a.org_key("org_a", &["checkout:create"]).await;
    let (quiet, quiet_token) = a.org_key("org_a", &["checkout:create"]).await;
    b.settle().await;
    calls(&a, &token, 2, 1).await;
    calls(&b, &token, 3, 2).await;
    calls(&b, &quiet_token, 4, 0).await;
    a.keys.flush_usage().await.unwrap();
    b.keys.flush_usage().await.unwrap();
    for s in [&a, &b] {
        let r = usage(s, &s.admin_token, &key.key_id, pb::UsageGranularity::Minute)
            .await
            .unwrap();
        assert_eq!(
            totals(&r),
            (2, vec![(pb::DenyReason::InsufficientScope, 1)]),
            "only A counted"
        );
        let r = usage(s, &s.admin_token, &quiet.key_id, pb::UsageGranularity::Hour)
            .await
            .unwrap();
        assert!(r.buckets.is_empty(), "{r:?}");
    }
    let got = a.get_key(&quiet.key_id).await;
    assert!(got.last_used_at.is_some(), "B still records last use");
}

async fn usage_is_isolated_by_organization_and_needs_read(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (a_key, a_token) = s.org_key("org_a", &["checkout:create"]).await;
    let (b_key, b_token) = s.org_key("org_b", &["checkout:create"]).await;
    let (_, a_admin) = s.org_key("org_a", &["api_key:read"]).await;
    let (_, a_writer) = s.org_key("org_a", &["api_key:update"]).await;
    calls(&s, &a_token, 1, 0).await;
    calls(&s, &b_token, 4, 0).await;
    s.keys.flush_usage().await.unwrap();

    // Its own organization's key: yes; another's: NOT_FOUND, as if absent.
    let own = usage(&s, &a_admin, &a_key.key_id, pb::UsageGranularity::Minute)
        .await
        .unwrap();
    assert_eq!(totals(&own).0, 1);
    let other = usage(&s, &a_admin, &b_key.key_id, pb::UsageGranularity::Minute)
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    let missing = usage(
        &s,
        &a_admin,
        &uuid::Uuid::new_v4().to_string(),
        pb::UsageGranularity::Minute,
    )
    .await
    .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(missing.message(), other.message(), "no difference to learn");
    // Without api_key:read: PERMISSION_DENIED.
    let refused = usage(&s, &a_writer, &a_key.key_id, pb::UsageGranularity::Minute)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // By organization: its own keys only, each apart.
    let now = s.clock.now();
    let by_org = |token: String, org: &str| {
        let req = request(
            "",
            org,
            now - Duration::hours(1),
            just_after(now),
            pb::UsageGranularity::Minute,
        );
        let s = &s;
        async move { s.admin().await.get_key_usage(as_key(&token, req)).await }
    };
    let org_a = by_org(a_admin.clone(), "org_a").await.unwrap().into_inner();
    assert_eq!(org_a.buckets.len(), 1);
    assert_eq!(org_a.buckets[0].key_id, a_key.key_id);
    let err = by_org(a_admin.clone(), "org_b").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let org_b = by_org(s.admin_token.clone(), "org_b")
        .await
        .unwrap()
        .into_inner();
    assert_eq!(totals(&org_b).0, 4, "a SYSTEM key sees every organization");
}

async fn bad_usage_requests_name_the_field(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s.org_key("org_a", &["checkout:create"]).await;
    let now = s.clock.now();
    let hour = pb::UsageGranularity::Hour;
    let minute = pb::UsageGranularity::Minute;
    let cases = [
        (
            request("", "", now - Duration::hours(1), now, hour),
            "key_id",
        ),
        (
            request(&key.key_id, "org_a", now - Duration::hours(1), now, hour),
            "organization_id",
        ),
        (
            request("not-a-uuid", "", now - Duration::hours(1), now, hour),
            "key_id",
        ),
        (
            request(
                &key.key_id,
                "",
                now - Duration::hours(1),
                now,
                pb::UsageGranularity::Unspecified,
            ),
            "granularity",
        ),
        (
            request(&key.key_id, "", now, now - Duration::hours(1), hour),
            "end",
        ),
        (
            request(
                &key.key_id,
                "",
                now - Duration::hours(48) - Duration::seconds(1),
                now,
                minute,
            ),
            "end",
        ),
        (
            request(&key.key_id, "", now - Duration::days(121), now, hour),
            "end",
        ),
        (
            pb::GetKeyUsageRequest {
                start: None,
                ..request(&key.key_id, "", now, now, hour)
            },
            "start",
        ),
    ];
    for (req, field) in cases {
        let err = s
            .admin()
            .await
            .get_key_usage(as_key(&s.admin_token, req.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // 48 hours of minutes and 90 days of hours are within bounds.
    let ok = request(&key.key_id, "", now - Duration::hours(48), now, minute);
    s.admin()
        .await
        .get_key_usage(as_key(&s.admin_token, ok))
        .await
        .unwrap();
}

async fn refused_credentials_of_existing_keys_count_and_unknown_ids_do_not(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    calls(&s, &token, 1, 0).await;
    crate::feed::revoke(&s, &key.key_id).await;
    s.settle().await;
    for _ in 0..2 {
        let r = s.authorize(&token, ALLOWED, "").await;
        assert_eq!(r.reason(), pb::DenyReason::InvalidToken);
    }
    // A well-formed token naming no key, and no token at all.
    let unknown = keygate_core::token::generate(
        &keygate_core::token::Brand::default(),
        keygate_core::key::Mode::Live,
        uuid::Uuid::new_v4(),
    )
    .unwrap()
    .token;
    let r = s.authorize(&unknown, ALLOWED, "").await;
    assert_eq!(r.reason(), pb::DenyReason::InvalidToken);
    s.authorize("", ALLOWED, "").await;
    s.keys.flush_usage().await.unwrap();
    let r = usage(
        &s,
        &s.admin_token,
        &key.key_id,
        pb::UsageGranularity::Minute,
    )
    .await
    .unwrap();
    assert_eq!(totals(&r), (1, vec![(pb::DenyReason::InvalidToken, 2)]));
    let rows = count_rows(&s).await;
    assert_eq!(
        rows, 4,
        "one minute and one hour row per outcome of the one key"
    );
}

async fn count_rows(s: &TestServer) -> i64 {
    use sqlx::{Connection, Row};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&s.database_url).await.unwrap();
    sqlx::query("SELECT COUNT(*) FROM key_usage")
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .try_get(0)
        .unwrap()
}

async fn old_buckets_are_swept_after_their_retention(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    calls(&s, &token, 3, 0).await;
    s.keys.flush_usage().await.unwrap();
    let retention = UsageRetention::default();
    assert_eq!(s.keys.sweep_usage(retention).await.unwrap(), 0);
    // Past 48 hours the minute buckets go; the hour bucket stays 90 days.
    s.advance(Duration::hours(49));
    assert_eq!(s.keys.sweep_usage(retention).await.unwrap(), 1);
    let now = s.clock.now();
    let req = |granularity| {
        request(
            &key.key_id,
            "",
            now - Duration::hours(50),
            now - Duration::hours(2),
            granularity,
        )
    };
    let admin = || async { s.admin().await };
    let minutes = admin()
        .await
        .get_key_usage(as_key(&s.admin_token, req(pb::UsageGranularity::Hour)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(totals(&minutes).0, 3);
    s.advance(Duration::days(90));
    assert_eq!(s.keys.sweep_usage(retention).await.unwrap(), 1);
    assert_eq!(count_rows(&s).await, 0);
}
