//! Replicas under load: one is SIGKILLed and restarted, one is cut off
//! from the database.

use std::time::Duration;

use keygate_proto::v1 as pb;
use tokio::time::Instant;
use tonic::Code;

use super::ledger::Ledger;
use super::load::{Call, Load, ORG, Report, Target};
use super::{
    MARGIN, RATE_LIMIT, READ_WAIT, STALENESS, STORE_TIMEOUT, all_succeeding, assert_bounded_waits,
    assert_never_wrong, assert_recovered, make_keys, ms, print_figures, unavailable, within,
};
use crate::harness::{Backend, TestServer, as_key, eventually};
use crate::replicas::{Proxy, Replica, authorize, postgres_addr, via};

/// A replica (its own process) is SIGKILLed under load and started again on
/// the same port, while another replica goes on writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_and_restarted_under_load() {
    let Some(a) = TestServer::start_with(Backend::Postgres, |settings| {
        settings.default_rate_limit =
            keygate_core::limits::Allowance::PerMinute(RATE_LIMIT.try_into().unwrap());
    })
    .await
    else {
        return;
    };
    let rate_limit = RATE_LIMIT.to_string();
    let mut b = Replica::start(
        &a.database_url,
        "replica-b",
        &[
            "--default-rate-limit",
            &rate_limit,
            "--usage-flush-interval",
            "2s",
        ],
    )
    .await;
    let target = Target {
        url: b.url(),
        admin_url: b.url(),
        admin_token: a.admin_token.clone(),
    };
    let keys = make_keys(&target, 4, 100).await;
    let (flushed, flushed_token) = a.org_key(ORG, &["checkout:create"]).await;
    let (unflushed, unflushed_token) = a.org_key(ORG, &["checkout:create"]).await;
    let after = Ledger::read(&a.database_url).await.head();
    let load = Load::start(&target, &keys, 3, after).await;
    all_succeeding(
        &load,
        load.started,
        Duration::from_secs(10),
        "the load to run",
    )
    .await;

    // A use B has flushed, then one it has not when it dies.
    let mut on_b = b.authorizer().await;
    assert_eq!(
        authorize(&mut on_b, &flushed_token)
            .await
            .unwrap()
            .decision(),
        pb::Decision::Allow
    );
    eventually(Duration::from_secs(10), "B to flush usage", || {
        let url = a.database_url.clone();
        let id = flushed.key_id.clone();
        async move { Ledger::read(&url).await.keys[&id].last_used_at.map(|_| ()) }
    })
    .await;
    // The next flush is 2 s away.
    assert_eq!(
        authorize(&mut on_b, &unflushed_token)
            .await
            .unwrap()
            .decision(),
        pb::Decision::Allow
    );
    let killing = Instant::now();
    b.kill();
    let killed_at = Instant::now();

    // While B is down, A goes on: B's subscribers must get these too.
    let (made_meanwhile, made_meanwhile_token) = a.org_key(ORG, &["checkout:create"]).await;
    crate::feed::revoke(&a, &keys.cold[keys.cold.len() - 1].0).await;
    tokio::time::sleep_until(killed_at + Duration::from_secs(1)).await;
    let restarting = Instant::now();
    b.restart().await;
    let restarted = Instant::now();
    let recovered = all_succeeding(&load, restarted, Duration::from_secs(20), "B to recover").await;
    tokio::time::sleep_until(recovered + Duration::from_secs(1)).await;

    let (ledger, report) = load.conclude(&a.database_url).await;
    assert!(b.is_running(), "B is still running");
    print_figures(
        "replica killed",
        &report,
        &format!(
            "B down {} ms, serving again {} ms after its start, recovered {} ms after",
            ms(restarting - killed_at),
            ms(restarted - restarting),
            ms(recovered - restarted)
        ),
    );
    assert_bounded_waits(&report);
    // Calls in flight when B died, or sent on its connection before the
    // client noticed, may fail any way the transport reports (CANCELLED,
    // UNKNOWN); every other call is answered rightly.
    let noticed = killed_at + Duration::from_millis(200);
    let settled = Report {
        samples: report
            .calls(|s| s.started + s.took < killing || s.started >= noticed)
            .into_iter()
            .cloned()
            .collect(),
        subscribers: Vec::new(),
        created: Vec::new(),
    };
    assert_never_wrong(&settled);
    assert_recovered(&report, recovered);
    // No lost key, no lost event: every answered write is in the store,
    // and keys made by either replica work on the restarted B.
    ledger.assert_whole();
    ledger.assert_nothing_lost(&report);
    let mut on_b = b.authorizer().await;
    for token in [&made_meanwhile_token, &keys.cached[0]].into_iter().chain(
        report
            .created
            .iter()
            .filter(|c| ledger.keys[&c.key_id].status == "active")
            .map(|c| &c.token)
            .take(5),
    ) {
        assert_eq!(
            authorize(&mut on_b, token).await.unwrap().decision(),
            pb::Decision::Allow
        );
    }
    assert!(ledger.keys.contains_key(&made_meanwhile.key_id));
    // Subscribers reconnected with their last sequence and caught up.
    ledger.assert_watched(&report.subscribers, after);
    for s in &report.subscribers {
        assert!(s.reconnects >= 1, "{s:?}");
        assert!(s.resumed_after.iter().all(|&p| p >= after), "{s:?}");
    }
    // What died with B: its usage since its last flush, and nothing else.
    assert!(ledger.keys[&flushed.key_id].last_used_at.is_some());
    assert_eq!(
        ledger.keys[&unflushed.key_id].last_used_at, None,
        "the use after B's last flush is lost with it"
    );
}

/// One replica's link to PostgreSQL goes silent (nothing forwarded, nothing
/// closed) under load, while the other replica revokes keys, with and
/// without waiting for the replicas; then the link heals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_replica_under_load() {
    // The replicas share max-staleness, heartbeat and poll interval, as the
    // README asks: A judges B's liveness by them.
    let Some(a) = TestServer::start_with(Backend::Postgres, |settings| {
        settings.default_rate_limit =
            keygate_core::limits::Allowance::PerMinute(RATE_LIMIT.try_into().unwrap());
        settings.max_staleness = STALENESS;
        settings.feed.replica_heartbeat = Duration::from_millis(500);
    })
    .await
    else {
        return;
    };
    let proxy = Proxy::start(postgres_addr(&a.database_url)).await;
    let rate_limit = RATE_LIMIT.to_string();
    let staleness = format!("{}s", STALENESS.as_secs());
    let b = Replica::start(
        &via(&a.database_url, proxy.addr),
        "replica-b",
        &[
            "--default-rate-limit",
            &rate_limit,
            "--max-staleness",
            &staleness,
        ],
    )
    .await;
    // Authorize and Watch on B; writes on A, which can still write.
    let target = Target {
        url: b.url(),
        admin_url: a.url(),
        admin_token: a.admin_token.clone(),
    };
    let keys = make_keys(&target, 4, 100).await;
    // Two more keys cached on B, to revoke during the partition.
    let (quiet, quiet_token) = a.org_key(ORG, &["checkout:create"]).await;
    let (confirmed, confirmed_token) = a.org_key(ORG, &["checkout:create"]).await;
    let mut on_b = b.authorizer().await;
    for token in [&quiet_token, &confirmed_token] {
        eventually(Duration::from_secs(10), "B to allow the key", || {
            let mut on_b = on_b.clone();
            async move {
                (authorize(&mut on_b, token).await.ok()?.decision() == pb::Decision::Allow)
                    .then_some(())
            }
        })
        .await;
    }
    let live_replicas = async || {
        let mut feed = pb::revocation_feed_client::RevocationFeedClient::connect(a.url())
            .await
            .ok()?;
        let r = feed
            .list_replicas(as_key(&a.admin_token, pb::ListReplicasRequest {}))
            .await
            .ok()?
            .into_inner();
        Some(r.replicas.iter().filter(|r| r.live).count())
    };
    eventually(Duration::from_secs(10), "two live replicas", || async {
        (live_replicas().await? == 2).then_some(())
    })
    .await;
    let after = Ledger::read(&a.database_url).await.head();
    let load = Load::start(&target, &keys, 3, after).await;
    all_succeeding(
        &load,
        load.started,
        Duration::from_secs(10),
        "the load to run",
    )
    .await;

    proxy.stall();
    let cut = Instant::now();
    let mut admin = a.admin().await;
    let wait = |key_id: &str| pb::RevokeKeyRequest {
        key_id: key_id.into(),
        reason: "leaked".into(),
        wait_for_replicas: true,
        replica_wait_timeout: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
    };
    // B is live but cannot hear of it: the revocation is in force, and
    // unconfirmed, naming B.
    tokio::time::sleep_until(cut + Duration::from_millis(300)).await;
    let unconfirmed = admin
        .revoke_key(as_key(&a.admin_token, wait(&quiet.key_id)))
        .await
        .unwrap_err();
    assert_eq!(
        unconfirmed.code(),
        Code::DeadlineExceeded,
        "{unconfirmed:?}"
    );
    assert!(
        unconfirmed.message().contains("replica-b"),
        "{unconfirmed:?}"
    );
    // B answers from its cache until max-staleness, then fails closed: the
    // revoked key is allowed there at most until then (plus one poll).
    let mut probes = Vec::new();
    let dropped = loop {
        let started = Instant::now();
        let answer = authorize(&mut on_b, &quiet_token).await;
        probes.push((started, started.elapsed(), answer.map(|r| r.decision())));
        if live_replicas().await == Some(1) {
            break Instant::now();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(15),
            "B never stopped counting as live"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Only a replica that has certainly failed closed stops counting: then
    // a confirmed revocation needs A alone, and B cannot allow the key.
    assert!(
        dropped - cut >= STALENESS,
        "B stopped counting {:?} after the cut",
        dropped - cut
    );
    let done = admin
        .revoke_key(as_key(&a.admin_token, wait(&confirmed.key_id)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.confirmed_replicas, 1);
    let status = authorize(&mut on_b, &confirmed_token).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "fails closed: {status:?}");

    proxy.resume();
    let healed = Instant::now();
    let recovered = all_succeeding(&load, healed, Duration::from_secs(20), "B to recover").await;
    tokio::time::sleep_until(recovered + Duration::from_secs(1)).await;
    for token in [&quiet_token, &confirmed_token] {
        let r = authorize(&mut on_b, token).await.unwrap();
        assert_eq!(
            r.decision(),
            pb::Decision::Deny,
            "B applied the revocations"
        );
    }
    eventually(
        Duration::from_secs(10),
        "B to count as live again",
        || async { (live_replicas().await? == 2).then_some(()) },
    )
    .await;

    let (ledger, report) = load.conclude(&a.database_url).await;
    let bound = STALENESS + Duration::from_millis(200);
    let last_allowed = probes
        .iter()
        .filter(|(_, _, d)| matches!(d, Ok(pb::Decision::Allow)))
        .map(|(started, _, _)| *started - cut)
        .max();
    eprintln!(
        "partition: why B's streams ended: {:?}",
        report.subscribers[0].ended
    );
    print_figures(
        "partition",
        &report,
        &format!(
            "the revoked key last allowed on B {last_allowed:?} after the cut (bound {bound:?}); \
             B stopped counting as live {} ms after the cut; recovered {} ms after the link healed",
            ms(dropped - cut),
            ms(recovered - healed)
        ),
    );
    for (started, took, decision) in &probes {
        let since = *started - cut;
        match decision {
            Ok(pb::Decision::Allow) => assert!(since < bound, "allowed {since:?} after the cut"),
            Ok(d) => panic!("B cannot have heard of the revocation: {d:?} {since:?}"),
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
        assert!(
            *took <= STORE_TIMEOUT + READ_WAIT + MARGIN,
            "a probe took {took:?}"
        );
    }
    assert!(
        probes
            .iter()
            .any(|(s, _, d)| matches!(d, Ok(pb::Decision::Allow)) && *s >= cut),
        "B answered from its cache during the partition"
    );
    assert_bounded_waits(&report);
    assert_never_wrong(&report);
    // B's cache: served until max-staleness, never after it (until healed).
    let stale = report.calls(|s| {
        matches!(s.call, Call::Cached | Call::Revoked)
            && within(s, cut + STALENESS + Duration::from_millis(50), healed)
    });
    assert!(!stale.is_empty());
    for s in &stale {
        assert!(
            unavailable(s),
            "a cached key on B past max-staleness: {s:?}"
        );
    }
    assert_recovered(&report, recovered);
    ledger.assert_whole();
    ledger.assert_nothing_lost(&report);
    ledger.assert_watched(&report.subscribers, after);
}
