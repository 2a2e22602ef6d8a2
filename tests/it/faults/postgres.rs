//! PostgreSQL under load: the server stops and starts, kills keygate's
//! connections, or turns read-only.

use std::time::Duration;

use tokio::time::Instant;

use super::cluster::Cluster;
use super::ledger::Ledger;
use super::load::{Call, Load, Outcome, Target};
use super::{
    RATE_LIMIT, STALENESS, all_succeeding, assert_bounded_waits, assert_never_wrong,
    assert_recovered, make_keys, ms, print_figures, unavailable, within,
};
use crate::harness::{Backend, TestServer, eventually};

/// A connection to the server `s` runs on (not to its database), and the
/// name of that database: only its connections are touched, other tests
/// share the server.
async fn server_of(s: &TestServer) -> (sqlx::PgPool, String) {
    let database = s
        .database_url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let server =
        std::env::var("KEYGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| s.database_url.clone());
    (sqlx::PgPool::connect(&server).await.unwrap(), database)
}

/// Terminates every connection to `database` but the caller's own; returns
/// for each whether it went, and its application name.
async fn terminate(server: &sqlx::PgPool, database: &str) -> Vec<(bool, String)> {
    sqlx::query_as(
        "SELECT pg_terminate_backend(pid), application_name FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_all(server)
    .await
    .unwrap()
}

/// PostgreSQL stops (fast shutdown) for longer than max-staleness and starts
/// again, while keygate is under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_load() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let url = cluster.create_database("keygate").await;
    let s = TestServer::start_on_database(url.clone(), |settings| {
        settings.max_staleness = STALENESS;
        settings.default_rate_limit =
            keygate_core::limits::Allowance::PerMinute(RATE_LIMIT.try_into().unwrap());
    })
    .await;
    let target = Target {
        url: s.url(),
        admin_url: s.url(),
        admin_token: s.admin_token.clone(),
    };
    let keys = make_keys(&target, 4, 100).await;
    let after = Ledger::read(&url).await.head();
    let load = Load::start(&target, &keys, 3, after).await;
    all_succeeding(
        &load,
        load.started,
        Duration::from_secs(10),
        "the load to run",
    )
    .await;

    let down_at = Instant::now();
    cluster.down();
    let stopped = Instant::now();
    // Long enough to see the cache go stale and fail closed.
    tokio::time::sleep_until(stopped + STALENESS + Duration::from_millis(1500)).await;
    let up_at = Instant::now();
    cluster.up();
    let started = Instant::now();
    let recovered = all_succeeding(&load, started, Duration::from_secs(20), "full recovery").await;
    tokio::time::sleep_until(recovered + Duration::from_secs(1)).await;

    let (ledger, report) = load.conclude(&url).await;
    assert!(s.is_serving(), "the server is still running");
    print_figures(
        "postgres stopped",
        &report,
        &format!(
            "down {} ms; recovered {} ms after PostgreSQL was back",
            ms(up_at - down_at),
            ms(recovered - started)
        ),
    );
    assert_bounded_waits(&report);
    assert_never_wrong(&report);
    // Uncached keys fail closed while the store is down.
    let outage = report.calls(|s| s.call.is_uncached() && within(s, stopped, up_at));
    assert!(!outage.is_empty());
    for s in &outage {
        assert!(
            unavailable(s),
            "an uncached key while the store is down: {s:?}"
        );
    }
    // Cached keys: answered from memory within max-staleness of the last
    // read of the log, which began before the stop ...
    let fresh = report.calls(|s| {
        s.call == Call::Cached && within(s, stopped, down_at + STALENESS - Duration::from_secs(1))
    });
    assert!(!fresh.is_empty());
    for s in &fresh {
        assert_eq!(
            s.outcome,
            Outcome::Allow,
            "a cached key within max-staleness: {s:?}"
        );
    }
    // ... and never after it: then they fail closed.
    let stale = report.calls(|s| {
        matches!(s.call, Call::Cached | Call::Revoked)
            && within(s, stopped + STALENESS + Duration::from_millis(50), up_at)
    });
    assert!(!stale.is_empty());
    for s in &stale {
        assert!(unavailable(s), "a cached key past max-staleness: {s:?}");
    }
    // Admin writes fail with UNAVAILABLE while the store is down.
    let writes = report.calls(|s| s.call.is_admin() && within(s, stopped, up_at));
    assert!(!writes.is_empty());
    for s in &writes {
        assert!(
            unavailable(s),
            "an admin write while the store is down: {s:?}"
        );
    }
    assert_recovered(&report, recovered);
    ledger.assert_whole();
    let applied_anyway = ledger.assert_nothing_lost(&report);
    assert_eq!(applied_anyway, 0, "nothing reached a stopped server");
    ledger.assert_watched(&report.subscribers, after);
}

/// Every connection keygate holds to its database (pool, feed, LISTEN) is
/// terminated by the server, again and again, while keygate is under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_under_load() {
    let Some(s) = TestServer::start_with(Backend::Postgres, |settings| {
        settings.default_rate_limit =
            keygate_core::limits::Allowance::PerMinute(RATE_LIMIT.try_into().unwrap());
    })
    .await
    else {
        return;
    };
    let target = Target {
        url: s.url(),
        admin_url: s.url(),
        admin_token: s.admin_token.clone(),
    };
    let keys = make_keys(&target, 4, 100).await;
    let after = Ledger::read(&s.database_url).await.head();
    let load = Load::start(&target, &keys, 3, after).await;
    all_succeeding(
        &load,
        load.started,
        Duration::from_secs(10),
        "the load to run",
    )
    .await;

    // Only this test's database: other tests share the server.
    let (killer, database) = server_of(&s).await;
    let first_kill = Instant::now();
    let mut killed = 0;
    let mut listeners_killed = 0;
    for _ in 0..8 {
        let rows = terminate(&killer, &database).await;
        killed += rows.iter().filter(|(done, _)| *done).count();
        listeners_killed += rows
            .iter()
            .filter(|(_, app)| app == "keygate-listener")
            .count();
        // Between kills, keygate reconnects and the load goes on.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let last_kill = Instant::now();
    killer.close().await;
    let recovered =
        all_succeeding(&load, last_kill, Duration::from_secs(20), "full recovery").await;
    tokio::time::sleep_until(recovered + Duration::from_secs(1)).await;

    let (ledger, report) = load.conclude(&s.database_url).await;
    assert!(s.is_serving(), "the server is still running");
    let applied_anyway = ledger.assert_nothing_lost(&report);
    print_figures(
        "connections killed",
        &report,
        &format!(
            "{killed} connections killed in 8 rounds over {} ms ({listeners_killed} LISTEN); \
             recovered {} ms after the last kill; {applied_anyway} failed creates were committed",
            ms(last_kill - first_kill),
            ms(recovered - last_kill)
        ),
    );
    assert!(killed >= 8 && listeners_killed >= 1, "{killed} killed");
    assert_bounded_waits(&report);
    assert_never_wrong(&report);
    // The cache is never stale for long: cached keys never notice.
    let cached = report.calls(|s| matches!(s.call, Call::Cached | Call::Revoked));
    for s in &cached {
        assert!(
            matches!(s.outcome, Outcome::Allow | Outcome::Deny(_)),
            "a cached key while connections are killed: {s:?}"
        );
    }
    assert_recovered(&report, recovered);
    ledger.assert_whole();
    ledger.assert_watched(&report.subscribers, after);
}

/// The database turns read-only under load (as a standby is, or with
/// default_transaction_read_only), then writable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_only_under_load() {
    let Some(s) = TestServer::start_with(Backend::Postgres, |settings| {
        settings.default_rate_limit =
            keygate_core::limits::Allowance::PerMinute(RATE_LIMIT.try_into().unwrap());
    })
    .await
    else {
        return;
    };
    let target = Target {
        url: s.url(),
        admin_url: s.url(),
        admin_token: s.admin_token.clone(),
    };
    let keys = make_keys(&target, 4, 100).await;
    let after = Ledger::read(&s.database_url).await.head();
    let load = Load::start(&target, &keys, 3, after).await;
    all_succeeding(
        &load,
        load.started,
        Duration::from_secs(10),
        "the load to run",
    )
    .await;

    let (server, database) = server_of(&s).await;
    let set =
        |on: bool| format!("ALTER DATABASE {database} SET default_transaction_read_only = {on}");
    // Sessions read the setting when they start: end the ones keygate has.
    sqlx::raw_sql(sqlx::AssertSqlSafe(set(true)))
        .execute(&server)
        .await
        .unwrap();
    terminate(&server, &database).await;
    let read_only = Instant::now();
    let refused = |s: &super::load::Sample| {
        matches!(&s.outcome, Outcome::Failed(tonic::Code::FailedPrecondition, m)
            if m == "key store cannot write: the database is read-only")
    };
    // Until every connection keygate writes on has been opened read-only.
    eventually(
        Duration::from_secs(10),
        "a write refused as read-only",
        || {
            let hit = load
                .samples()
                .iter()
                .any(|s| s.started >= read_only && refused(s));
            async move { hit.then_some(()) }
        },
    )
    .await;
    let first_refused = Instant::now();
    tokio::time::sleep_until(first_refused + Duration::from_secs(1)).await;
    let switching_back = Instant::now();
    sqlx::raw_sql(sqlx::AssertSqlSafe(set(false)))
        .execute(&server)
        .await
        .unwrap();
    terminate(&server, &database).await;
    let writable = Instant::now();
    server.close().await;
    let recovered = all_succeeding(&load, writable, Duration::from_secs(20), "writes again").await;
    tokio::time::sleep_until(recovered + Duration::from_secs(1)).await;

    let (ledger, report) = load.conclude(&s.database_url).await;
    assert!(s.is_serving(), "the server is still running");
    print_figures(
        "postgres read-only",
        &report,
        &format!(
            "first write refused {} ms after the switch; recovered {} ms after writable again",
            ms(first_refused - read_only),
            ms(recovered - writable)
        ),
    );
    assert_bounded_waits(&report);
    // Refused writes say why; everything else as under any fault.
    let others = super::load::Report {
        samples: report
            .samples
            .iter()
            .filter(|s| !refused(s))
            .cloned()
            .collect(),
        subscribers: Vec::new(),
        created: Vec::new(),
    };
    assert_never_wrong(&others);
    let writes = report.calls(|s| s.call.is_admin() && within(s, first_refused, switching_back));
    assert!(!writes.is_empty());
    for s in &writes {
        assert!(refused(s), "an admin write on a read-only database: {s:?}");
    }
    // Reads go on: every Authorize while read-only is answered (the
    // switch itself kills connections, so calls right then may fail).
    let reads = report.calls(|s| !s.call.is_admin() && within(s, first_refused, switching_back));
    assert!(reads.iter().any(|s| s.call.is_uncached()));
    for s in &reads {
        assert!(
            matches!(s.outcome, Outcome::Allow | Outcome::Deny(_)),
            "an Authorize on a read-only database: {s:?}"
        );
    }
    assert_recovered(&report, recovered);
    ledger.assert_whole();
    ledger.assert_nothing_lost(&report);
    ledger.assert_watched(&report.subscribers, after);
}
