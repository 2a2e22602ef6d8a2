//! Several keygate processes on one PostgreSQL database: a change made
//! through one reaches every other at once, survives lost notifications,
//! fails closed under partition, and can be confirmed.

use std::time::{Duration, Instant};

use keygate_proto::v1 as pb;
use keygate_proto::v1::revocation_event::Kind;
use tonic::Code;

use crate::feed::{next_change, watch};
use crate::harness::{Backend, TestServer, as_key, eventually};
use crate::replicas::{Proxy, Replica, authorize, postgres_addr, via};

/// Polls `token` on `client` until it is denied; fails after 500 ms.
async fn denied_within_500ms(
    client: &mut crate::harness::AuthorizerClient<tonic::transport::Channel>,
    token: &str,
    since: Instant,
) {
    loop {
        let r = authorize(client, token).await.unwrap();
        if r.decision() == pb::Decision::Deny {
            return;
        }
        assert!(
            since.elapsed() < Duration::from_millis(500),
            "still allowed 500 ms after the change"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn postgres_pair(b_extra: &[&str]) -> Option<(TestServer, Replica)> {
    let a = TestServer::start(Backend::Postgres).await?;
    let b = Replica::start(&a.database_url, "replica-b", b_extra).await;
    Some((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_a_is_denied_by_b_within_500ms() {
    let Some((a, b)) = postgres_pair(&[]).await else {
        return;
    };
    let (key, token) = a.org_key("org_a", &["checkout:create"]).await;
    let mut on_b = b.authorizer().await;
    assert_eq!(
        authorize(&mut on_b, &token).await.unwrap().decision(),
        pb::Decision::Allow,
        "now cached on B"
    );
    let mut stream = watch(&b.url(), &a.admin_token, 0).await;

    let req = pb::RevokeKeyRequest {
        key_id: key.key_id.clone(),
        reason: "leak".into(),
        ..Default::default()
    };
    a.admin()
        .await
        .revoke_key(as_key(&a.admin_token, req))
        .await
        .unwrap();
    denied_within_500ms(&mut on_b, &token, Instant::now()).await;
    let event = next_change(&mut stream).await;
    assert_eq!((event.kind(), event.key_id), (Kind::Revoked, key.key_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_delete_and_rotate_through_a_reach_b_within_500ms() {
    let Some((a, b)) = postgres_pair(&[]).await else {
        return;
    };
    let (disabled, disabled_token) = a.org_key("org_a", &["checkout:create"]).await;
    let (deleted, deleted_token) = a.org_key("org_a", &["checkout:create"]).await;
    let (rotated, old_token) = a.org_key("org_a", &["checkout:create"]).await;
    let mut on_b = b.authorizer().await;
    for t in [&disabled_token, &deleted_token, &old_token] {
        assert_eq!(
            authorize(&mut on_b, t).await.unwrap().decision(),
            pb::Decision::Allow
        );
    }
    let mut stream = watch(&b.url(), &a.admin_token, 0).await;
    let mut admin = a.admin().await;
    let t = &a.admin_token;

    let since = Instant::now();
    admin
        .disable_key(as_key(
            t,
            pb::DisableKeyRequest {
                key_id: disabled.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    denied_within_500ms(&mut on_b, &disabled_token, since).await;

    let since = Instant::now();
    admin
        .delete_key(as_key(
            t,
            pb::DeleteKeyRequest {
                key_id: deleted.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    denied_within_500ms(&mut on_b, &deleted_token, since).await;

    let since = Instant::now();
    let new_token = admin
        .rotate_key(as_key(
            t,
            pb::RotateKeyRequest {
                key_id: rotated.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    denied_within_500ms(&mut on_b, &old_token, since).await;
    assert_eq!(
        authorize(&mut on_b, &new_token).await.unwrap().decision(),
        pb::Decision::Allow
    );

    let kinds: Vec<_> = [
        next_change(&mut stream).await,
        next_change(&mut stream).await,
        next_change(&mut stream).await,
    ]
    .into_iter()
    .map(|e| (e.kind(), e.key_id))
    .collect();
    assert_eq!(
        kinds,
        vec![
            (Kind::Disabled, disabled.key_id),
            (Kind::Deleted, deleted.key_id),
            (Kind::Rotated, rotated.key_id)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_catches_up_after_its_notification_connection_is_killed() {
    // A slow poll: catching up must come from the listener reconnecting.
    let Some((a, b)) = postgres_pair(&["--feed-poll-interval", "30s"]).await else {
        return;
    };
    let (k1, t1) = a.org_key("org_a", &["checkout:create"]).await;
    let (k2, t2) = a.org_key("org_a", &["checkout:create"]).await;
    let mut on_b = b.authorizer().await;
    for t in [&t1, &t2] {
        assert_eq!(
            authorize(&mut on_b, t).await.unwrap().decision(),
            pb::Decision::Allow
        );
    }
    let mut stream = watch(&b.url(), &a.admin_token, 0).await;
    let db_name = a
        .database_url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let pg = sqlx::PgPool::connect(&a.database_url).await.unwrap();
    let listeners = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'keygate-listener'";
    let two_listeners = || {
        let (pg, db) = (pg.clone(), db_name.clone());
        async move {
            let n: i64 = sqlx::query_scalar(listeners)
                .bind(db)
                .fetch_one(&pg)
                .await
                .unwrap();
            (n >= 2).then_some(())
        }
    };
    // A (in-process) and B each LISTEN.
    eventually(Duration::from_secs(10), "both listeners", two_listeners).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'keygate-listener'",
    )
    .bind(&db_name)
    .fetch_all(&pg)
    .await
    .unwrap();
    assert!(killed.len() >= 2 && killed.iter().all(|k| *k));

    // Changes made while the listeners are down still reach B.
    for k in [&k1, &k2] {
        let req = pb::RevokeKeyRequest {
            key_id: k.key_id.clone(),
            ..Default::default()
        };
        a.admin()
            .await
            .revoke_key(as_key(&a.admin_token, req))
            .await
            .unwrap();
    }
    for t in [&t1, &t2] {
        eventually(Duration::from_secs(10), "B to deny the revoked key", || {
            let mut on_b = on_b.clone();
            async move {
                (authorize(&mut on_b, t).await.unwrap().decision() == pb::Decision::Deny)
                    .then_some(())
            }
        })
        .await;
    }
    assert_eq!(next_change(&mut stream).await.key_id, k1.key_id);
    assert_eq!(next_change(&mut stream).await.key_id, k2.key_id);
    eventually(
        Duration::from_secs(10),
        "the listeners to reconnect",
        two_listeners,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_stops_allowing_after_max_staleness_and_recovers() {
    let Some(a) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let proxy = Proxy::start(postgres_addr(&a.database_url)).await;
    let b = Replica::start(
        &via(&a.database_url, proxy.addr),
        "replica-b",
        &["--max-staleness", "1s"],
    )
    .await;
    let (_, token) = a.org_key("org_a", &["checkout:create"]).await;
    let mut on_b = b.authorizer().await;
    assert_eq!(
        authorize(&mut on_b, &token).await.unwrap().decision(),
        pb::Decision::Allow,
        "cached on B"
    );

    proxy.cut();
    let cut_at = Instant::now();
    // When, after the cut, the last call that was allowed had started.
    let last_allowed = std::sync::Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let status = eventually(Duration::from_secs(15), "B to stop allowing", || {
        let mut on_b = on_b.clone();
        let token = token.clone();
        let last_allowed = last_allowed.clone();
        async move {
            let started = cut_at.elapsed();
            match authorize(&mut on_b, &token).await {
                Ok(r) if r.decision() == pb::Decision::Allow => {
                    *last_allowed.lock().unwrap() = started;
                    None
                }
                other => Some(other),
            }
        }
    })
    .await;
    let last_allowed = *last_allowed.lock().unwrap();
    assert!(
        cut_at.elapsed() >= Duration::from_millis(900),
        "the cache serves until max-staleness"
    );
    // The README's bound: max-staleness (1 s) + one poll interval (200 ms),
    // with a second of slack for a busy machine.
    assert!(
        last_allowed < Duration::from_millis(2_200),
        "a call started {last_allowed:?} after the cut was still allowed"
    );
    assert_eq!(
        status.unwrap_err().code(),
        Code::Unavailable,
        "fails closed: an error, never an ALLOW"
    );

    proxy.restore();
    eventually(
        Duration::from_secs(30),
        "B to recover without a restart",
        || {
            let mut on_b = on_b.clone();
            let token = token.clone();
            async move {
                authorize(&mut on_b, &token)
                    .await
                    .ok()
                    .filter(|r| r.decision() == pb::Decision::Allow)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_replicas_confirms_and_names_a_frozen_replica() {
    let Some((a, b)) = postgres_pair(&[]).await else {
        return;
    };
    let (k1, _) = a.org_key("org_a", &[]).await;
    let (k2, t2) = a.org_key("org_a", &["checkout:create"]).await;
    // Both replicas have recorded themselves.
    let mut feed = b.feed().await;
    eventually(Duration::from_secs(10), "two live replicas", || {
        let mut feed = feed.clone();
        let t = a.admin_token.clone();
        async move {
            let r = feed
                .list_replicas(as_key(&t, pb::ListReplicasRequest {}))
                .await
                .ok()?
                .into_inner();
            (r.replicas.iter().filter(|r| r.live).count() == 2).then_some(())
        }
    })
    .await;

    let mut admin = a.admin().await;
    let wait = |key_id: &str, seconds: i64| pb::RevokeKeyRequest {
        key_id: key_id.into(),
        wait_for_replicas: true,
        replica_wait_timeout: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    };
    let confirmed = admin
        .revoke_key(as_key(&a.admin_token, wait(&k1.key_id, 5)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.confirmed_replicas, 2);

    b.signal("-STOP");
    let err = admin
        .revoke_key(as_key(&a.admin_token, wait(&k2.key_id, 1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(
        err.message().contains("replica-b") && err.message().contains("in force"),
        "{}",
        err.message()
    );
    // The revocation stands: A denies it, and B does once it runs again.
    assert_eq!(
        a.authorize(&t2, "POST /v1/checkouts", "").await.decision(),
        pb::Decision::Deny
    );
    b.signal("-CONT");
    let mut on_b = b.authorizer().await;
    eventually(Duration::from_secs(10), "B to deny after thawing", || {
        let mut on_b = on_b.clone();
        let t2 = t2.clone();
        async move {
            (authorize(&mut on_b, &t2).await.ok()?.decision() == pb::Decision::Deny).then_some(())
        }
    })
    .await;

    let listed = feed
        .list_replicas(as_key(&a.admin_token, pb::ListReplicasRequest {}))
        .await
        .unwrap()
        .into_inner();
    let named: Vec<_> = listed.replicas.iter().map(|r| r.name.as_str()).collect();
    assert!(named.contains(&"replica-b"), "{named:?}");
    assert!(listed.head_sequence >= 4);

    // The same through the CLI.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["replicas", "--server", &b.url()])
        .env("KEYGATE_TOKEN", &a.admin_token)
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("replica-b") && table.contains("head sequence"),
        "{table}"
    );
    let _ = &mut on_b;
}

/// Disable, Rotate and Delete wait for the replicas like Revoke, and a
/// confirmed change leaves every live replica at the head with no lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_rotate_and_delete_also_wait_for_replicas() {
    let Some((a, b)) = postgres_pair(&[]).await else {
        return;
    };
    let (k1, _) = a.org_key("org_a", &[]).await;
    let (k2, _) = a.org_key("org_a", &[]).await;
    let (k3, _) = a.org_key("org_a", &[]).await;
    let mut feed = b.feed().await;
    let replicas = |feed: pb::revocation_feed_client::RevocationFeedClient<_>| {
        let t = a.admin_token.clone();
        async move {
            let mut feed = feed;
            feed.list_replicas(as_key(&t, pb::ListReplicasRequest {}))
                .await
                .ok()
                .map(|r| r.into_inner())
        }
    };
    eventually(Duration::from_secs(10), "two live replicas", || {
        let r = replicas(feed.clone());
        async move { (r.await?.replicas.iter().filter(|r| r.live).count() == 2).then_some(()) }
    })
    .await;
    let timeout = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    let mut admin = a.admin().await;
    let disabled = admin
        .disable_key(as_key(
            &a.admin_token,
            pb::DisableKeyRequest {
                key_id: k1.key_id.clone(),
                wait_for_replicas: true,
                replica_wait_timeout: timeout(5),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(disabled.confirmed_replicas, 2);
    let rotated = admin
        .rotate_key(as_key(
            &a.admin_token,
            pb::RotateKeyRequest {
                key_id: k2.key_id.clone(),
                wait_for_replicas: true,
                replica_wait_timeout: timeout(5),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.confirmed_replicas, 2);
    let deleted = admin
        .delete_key(as_key(
            &a.admin_token,
            pb::DeleteKeyRequest {
                key_id: k3.key_id.clone(),
                wait_for_replicas: true,
                replica_wait_timeout: timeout(5),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.confirmed_replicas, 2);
    let listed = replicas(feed.clone()).await.unwrap();
    for r in listed.replicas.iter().filter(|r| r.live) {
        assert_eq!(
            (r.applied_sequence, r.lag),
            (listed.head_sequence, 0),
            "{r:?}"
        );
    }

    b.signal("-STOP");
    let err = admin
        .disable_key(as_key(
            &a.admin_token,
            pb::DisableKeyRequest {
                key_id: k2.key_id.clone(),
                wait_for_replicas: true,
                replica_wait_timeout: timeout(1),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(err.message().contains("replica-b"), "{}", err.message());
    b.signal("-CONT");
    let _ = &mut feed;
}

/// A replica cut off from the database keeps answering from its cache until
/// max-staleness, so confirmation must wait for it that long: it counts as
/// live until its last heartbeat is older than max-staleness plus one
/// heartbeat plus one poll interval, and by then it has failed closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_waits_for_a_cut_off_replica_until_it_has_failed_closed() {
    // 6 s of staleness; both replicas heartbeat every 500 ms and poll every
    // 200 ms, so B counts until its heartbeat is 6.7 s old. Under the old
    // rule (5 heartbeats) it stopped counting after 2.5 s.
    let Some(a) = TestServer::start_with(Backend::Postgres, |s| {
        s.max_staleness = Duration::from_secs(6);
        s.feed.replica_heartbeat = Duration::from_millis(500);
    })
    .await
    else {
        return;
    };
    let proxy = Proxy::start(postgres_addr(&a.database_url)).await;
    let b = Replica::start(
        &via(&a.database_url, proxy.addr),
        "replica-b",
        &["--max-staleness", "6s"],
    )
    .await;
    let (_, t1) = a.org_key("org_a", &["checkout:create"]).await;
    let (k2, t2) = a.org_key("org_a", &["checkout:create"]).await;
    let (k3, _) = a.org_key("org_a", &["checkout:create"]).await;
    let (k0, t0) = a.org_key("org_a", &["checkout:create"]).await;
    let mut on_b = b.authorizer().await;
    let feed = b.feed().await;
    let live = |feed: &pb::revocation_feed_client::RevocationFeedClient<_>| {
        let (mut feed, token) = (feed.clone(), a.admin_token.clone());
        async move {
            let r = feed
                .list_replicas(as_key(&token, pb::ListReplicasRequest {}))
                .await
                .ok()?
                .into_inner();
            Some(r.replicas.iter().filter(|r| r.live).count())
        }
    };
    eventually(Duration::from_secs(10), "two live replicas", || async {
        (live(&feed).await? == 2).then_some(())
    })
    .await;
    // From here on ask A, B's link is gone.
    let feed = pb::revocation_feed_client::RevocationFeedClient::connect(a.url())
        .await
        .unwrap();

    // B's staleness counts from its last read of the log, which under load
    // may lag: make one certain just before the cut, by revoking a key and
    // waiting until B denies it. That read also applied the keys'
    // creations: a key B read from the store before its feed applied the
    // key's creation leaves B's cache when the creation is applied (under
    // CI's load that was once after the cut, and B rightly asked the store),
    // so the keys are cached on B only after that read.
    let mut admin = a.admin().await;
    admin
        .revoke_key(as_key(
            &a.admin_token,
            pb::RevokeKeyRequest {
                key_id: k0.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "B to hear of a revocation", || {
        let (mut on_b, t0) = (on_b.clone(), t0.clone());
        async move {
            let r = authorize(&mut on_b, &t0).await.ok()?;
            (r.decision() == pb::Decision::Deny).then_some(())
        }
    })
    .await;
    for t in [&t1, &t2] {
        assert_eq!(
            authorize(&mut on_b, t).await.unwrap().decision(),
            pb::Decision::Allow,
            "cached on B"
        );
    }
    proxy.cut();
    let cut_at = tokio::time::Instant::now();
    let wait = |key_id: &str| pb::RevokeKeyRequest {
        key_id: key_id.into(),
        wait_for_replicas: true,
        replica_wait_timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 500_000_000,
        }),
        ..Default::default()
    };
    // Past the old 2.5 s window, well before B stops serving from its cache.
    tokio::time::sleep_until(cut_at + Duration::from_millis(2_700)).await;
    let err = admin
        .revoke_key(as_key(&a.admin_token, wait(&k2.key_id)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("replica-b"), "{}", err.message());
    // Which is the truth: B still allows the revoked key.
    assert_eq!(
        authorize(&mut on_b, &t2).await.unwrap().decision(),
        pb::Decision::Allow,
        "B cannot have heard of the revocation"
    );
    assert!(
        cut_at.elapsed() < Duration::from_millis(5_500),
        "too slow to check the window"
    );

    // Once B no longer counts, it has failed closed.
    eventually(
        Duration::from_secs(15),
        "B to stop counting as live",
        || async { (live(&feed).await? == 1).then_some(()) },
    )
    .await;
    assert!(
        cut_at.elapsed() >= Duration::from_secs(6),
        "{:?}",
        cut_at.elapsed()
    );
    let status = authorize(&mut on_b, &t1).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "failed closed: {status:?}"
    );
    let confirmed = admin
        .revoke_key(as_key(&a.admin_token, wait(&k3.key_id)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.confirmed_replicas, 1);
}
