//! The revocation feed: Watch, replay, heartbeats, replicas and the
//! gateway-side CachedAuthorizer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_client::{CachedAuthorizer, ClientSettings};
use keygate_proto::v1 as pb;
use keygate_proto::v1::revocation_event::Kind;
use keygate_proto::v1::revocation_feed_client::RevocationFeedClient;
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::Channel;

use crate::harness::{Backend, TestServer, as_key};
use crate::on_both_backends;

pub async fn watch(url: &str, token: &str, after: i64) -> Streaming<pb::RevocationEvent> {
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut feed = RevocationFeedClient::new(channel);
    feed.watch(as_key(
        token,
        pb::WatchRequest {
            after_sequence: after,
        },
    ))
    .await
    .unwrap()
    .into_inner()
}

/// The next message that is not a heartbeat.
pub async fn next_change(stream: &mut Streaming<pb::RevocationEvent>) -> pb::RevocationEvent {
    // One deadline for the whole wait: heartbeats must not keep it going.
    let wait = async {
        loop {
            let msg = stream
                .message()
                .await
                .expect("stream open")
                .expect("stream not ended");
            if msg.kind() != Kind::Heartbeat {
                return msg;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("a change within 10s")
}

/// The next heartbeat, skipping nothing else: fails if a change comes first.
pub async fn next_heartbeat(stream: &mut Streaming<pb::RevocationEvent>) -> pb::RevocationEvent {
    let msg = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        msg.kind(),
        Kind::Heartbeat,
        "expected only a heartbeat, got {msg:?}"
    );
    msg
}

pub async fn revoke(s: &TestServer, key_id: &str) {
    let req = pb::RevokeKeyRequest {
        key_id: key_id.into(),
        reason: "test".into(),
        ..Default::default()
    };
    s.admin()
        .await
        .revoke_key(as_key(&s.admin_token, req))
        .await
        .unwrap();
}

async fn watch_carries_every_kind_of_invalidation_in_order(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut stream = watch(&s.url(), &s.admin_token, 0).await;
    let (a, _) = s.org_key("org_a", &[]).await;
    let (b, _) = s.org_key("org_a", &[]).await;
    let (c, _) = s.org_key("org_a", &[]).await;
    let (d, _) = s.org_key("org_a", &[]).await;
    let mut admin = s.admin().await;
    let t = &s.admin_token;
    admin
        .revoke_key(as_key(
            t,
            pb::RevokeKeyRequest {
                key_id: a.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    admin
        .disable_key(as_key(
            t,
            pb::DisableKeyRequest {
                key_id: b.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    admin
        .enable_key(as_key(
            t,
            pb::EnableKeyRequest {
                key_id: b.key_id.clone(),
            },
        ))
        .await
        .unwrap();
    admin
        .rotate_key(as_key(
            t,
            pb::RotateKeyRequest {
                key_id: c.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    admin
        .delete_key(as_key(
            t,
            pb::DeleteKeyRequest {
                key_id: d.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut last = 0;
    for _ in 0..4 {
        let e = next_change(&mut stream).await;
        assert!(e.sequence > last, "increasing sequences");
        last = e.sequence;
        assert_eq!(e.organization_id, "org_a");
        assert!(e.at.is_some());
        seen.push((e.kind(), e.key_id));
    }
    assert_eq!(
        seen,
        vec![
            (Kind::Revoked, a.key_id),
            (Kind::Disabled, b.key_id),
            (Kind::Rotated, c.key_id),
            (Kind::Deleted, d.key_id),
        ],
        "creations and enables are not invalidations"
    );
    let beat = next_heartbeat(&mut stream).await;
    assert!(beat.sequence >= last, "a heartbeat carries the position");
}

async fn a_hundred_subscribers_each_get_every_revocation_once_in_order(backend: Backend) {
    // One key for all hundred, so above the default of 16 streams per key.
    let Some(s) = TestServer::start_with(backend, |settings| {
        settings.limits.watch_streams_per_key = 100;
    })
    .await
    else {
        return;
    };
    let keys: Vec<_> =
        futures_util::future::join_all((0..3).map(|_| s.org_key("org_a", &[]))).await;
    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(watch(&s.url(), &s.admin_token, 0).await);
    }
    for (key, _) in &keys {
        revoke(&s, &key.key_id).await;
    }
    let expected: Vec<_> = keys.iter().map(|(k, _)| k.key_id.clone()).collect();
    let results = futures_util::future::join_all(streams.into_iter().map(|mut stream| {
        let expected = expected.clone();
        async move {
            let mut got = Vec::new();
            for _ in 0..expected.len() {
                let e = next_change(&mut stream).await;
                assert_eq!(e.kind(), Kind::Revoked);
                got.push(e.key_id);
            }
            // Nothing else: the next message is a heartbeat, no duplicate.
            next_heartbeat(&mut stream).await;
            got
        }
    }))
    .await;
    for got in results {
        assert_eq!(got, expected);
    }
}

async fn a_subscriber_resumes_exactly_after_its_last_sequence(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(s.org_key("org_a", &[]).await.0.key_id);
    }
    let mut first = watch(&s.url(), &s.admin_token, 0).await;
    revoke(&s, &keys[0]).await;
    let e = next_change(&mut first).await;
    assert_eq!(e.key_id, keys[0]);
    drop(first);

    for key in &keys[1..4] {
        revoke(&s, key).await;
    }
    let mut resumed = watch(&s.url(), &s.admin_token, e.sequence).await;
    for key in &keys[1..4] {
        let missed = next_change(&mut resumed).await;
        assert_eq!((missed.kind(), &missed.key_id), (Kind::Revoked, key));
    }
    revoke(&s, &keys[4]).await;
    assert_eq!(
        next_change(&mut resumed).await.key_id,
        keys[4],
        "then live events"
    );
}

async fn unknown_positions_get_reset_and_quiet_streams_get_heartbeats(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    s.org_key("org_a", &[]).await;
    let head = keygate::store::EventLog::head_sequence(&*s.store)
        .await
        .unwrap();
    let mut quiet = watch(&s.url(), &s.admin_token, 0).await;
    assert_eq!(next_heartbeat(&mut quiet).await.sequence, head);
    let mut future = watch(&s.url(), &s.admin_token, head + 100).await;
    let reset = next_change(&mut future).await;
    assert_eq!((reset.kind(), reset.sequence), (Kind::Reset, head));
}

async fn organization_keys_watch_only_their_organization(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, watcher) = s.org_key("org_a", &["revocation:read"]).await;
    let (_, no_scope) = s.org_key("org_a", &["api_key:read"]).await;
    let (theirs, _) = s.org_key("org_b", &[]).await;
    let (ours, _) = s.org_key("org_a", &[]).await;
    let channel = Channel::from_shared(s.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = RevocationFeedClient::new(channel)
        .watch(as_key(&no_scope, pb::WatchRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let mut stream = watch(&s.url(), &watcher, 0).await;
    revoke(&s, &theirs.key_id).await;
    revoke(&s, &ours.key_id).await;
    let e = next_change(&mut stream).await;
    assert_eq!(e.key_id, ours.key_id, "org_b's revocation is not shown");
}

async fn the_cached_authorizer_drops_a_revoked_key_within_500ms(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    // A long TTL: only the feed can drop the entry in time.
    let gateway = cached_authorizer(&s, &s.admin_token, Duration::from_secs(300)).await;
    let ask = || pb::AuthorizeRequest {
        token: token.clone(),
        route: "POST /v1/checkouts".into(),
        ..Default::default()
    };
    assert_eq!(
        gateway.authorize(ask()).await.unwrap().decision(),
        pb::Decision::Allow
    );
    assert_eq!(
        gateway.authorize(ask()).await.unwrap().decision(),
        pb::Decision::Allow
    );

    revoke(&s, &key.key_id).await;
    let revoked_at = Instant::now();
    loop {
        if gateway.authorize(ask()).await.unwrap().decision() == pb::Decision::Deny {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_millis(500),
            "still allowed 500 ms after revocation"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A gateway following the feed as org_a caches only org_a's keys: it would
/// never hear of org_b's revocations.
async fn the_cached_authorizer_caches_only_keys_its_feed_covers(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, feed_token) = s.org_key("org_a", &["revocation:read"]).await;
    let (ours, our_token) = s.org_key("org_a", &["checkout:create"]).await;
    let (theirs, their_token) = s.org_key("org_b", &["checkout:create"]).await;
    let gateway = cached_authorizer(&s, &feed_token, Duration::from_secs(300)).await;
    let ask = |token: &str| pb::AuthorizeRequest {
        token: token.into(),
        route: "POST /v1/checkouts".into(),
        ..Default::default()
    };
    for token in [&our_token, &their_token] {
        let r = gateway.authorize(ask(token)).await.unwrap();
        assert_eq!(r.decision(), pb::Decision::Allow);
    }
    revoke(&s, &theirs.key_id).await;
    let r = gateway.authorize(ask(&their_token)).await.unwrap();
    assert_eq!(
        r.decision(),
        pb::Decision::Deny,
        "org_b's key was answered from a cache its feed cannot invalidate"
    );
    revoke(&s, &ours.key_id).await;
    crate::harness::eventually(Duration::from_secs(5), "org_a's revocation", || async {
        (gateway.authorize(ask(&our_token)).await.unwrap().decision() == pb::Decision::Deny)
            .then_some(())
    })
    .await;
}

/// Cached answers count against the key's rate limit like keygate's own.
async fn the_cached_authorizer_honours_rate_limits(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = crate::limits::limited_key(&s, 3).await;
    let gateway = cached_authorizer(&s, &s.admin_token, Duration::from_secs(300)).await;
    let mut answers = Vec::new();
    for _ in 0..5 {
        let r = gateway
            .authorize(pb::AuthorizeRequest {
                token: token.clone(),
                route: "POST /v1/checkouts".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        answers.push((r.decision(), r.http_status, r.rate_limit_remaining));
    }
    use pb::Decision::{Allow, Deny};
    assert_eq!(
        answers,
        [
            (Allow, 200, 2),
            (Allow, 200, 1),
            (Allow, 200, 0),
            (Deny, 429, 0),
            (Deny, 429, 0)
        ]
    );
}

pub async fn cached_authorizer(
    s: &TestServer,
    feed_token: &str,
    ttl: Duration,
) -> CachedAuthorizer {
    let channel = Channel::from_shared(s.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let settings = ClientSettings {
        ttl,
        ..Default::default()
    };
    let gateway = CachedAuthorizer::new(channel, feed_token.to_owned(), settings).unwrap();
    crate::harness::eventually(
        Duration::from_secs(10),
        "the feed to be followed",
        || async { gateway.feed_alive().then_some(()) },
    )
    .await;
    gateway
}

async fn keygate_watch_prints_events(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s.org_key("org_a", &[]).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["watch", "--server", &s.url()])
        .env("KEYGATE_TOKEN", &s.admin_token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    // The CLI subscribes asynchronously: revoke until its line shows up.
    let revoker = {
        let id = key.key_id.clone();
        let url = s.url();
        let token = s.admin_token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
            let req = pb::RevokeKeyRequest {
                key_id: id,
                reason: "cli".into(),
                ..Default::default()
            };
            keygate_proto::v1::key_admin_client::KeyAdminClient::new(channel)
                .revoke_key(as_key(&token, req))
                .await
                .unwrap();
        })
    };
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    revoker.await.unwrap();
    assert!(
        line.contains("REVOKED") && line.contains(&key.key_id) && line.contains("org=org_a"),
        "{line}"
    );
}

/// A store read that started before an invalidation must not put the old
/// record back into the cache afterwards.
async fn a_read_racing_an_invalidation_never_resurrects_the_old_record(backend: Backend) {
    use keygate::cache::{CacheSettings, Freshness, KeyCache};
    use keygate::store::{KeyReader, StoreError};

    /// The real store, with a pause after the read and before the answer.
    struct PausedRead {
        store: Arc<keygate::store::SqlStore>,
        read_done: tokio::sync::Notify,
        release: tokio::sync::Notify,
    }
    #[async_trait::async_trait]
    impl KeyReader for PausedRead {
        async fn get_key(
            &self,
            id: uuid::Uuid,
        ) -> Result<Option<keygate_core::key::KeyRecord>, StoreError> {
            let found = self.store.get_key(id).await?;
            self.read_done.notify_one();
            self.release.notified().await;
            Ok(found)
        }
    }

    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s.org_key("org_a", &[]).await;
    let id = uuid::Uuid::parse_str(&key.key_id).unwrap();
    let reader = Arc::new(PausedRead {
        store: s.store.clone(),
        read_done: Default::default(),
        release: Default::default(),
    });
    let cache = Arc::new(KeyCache::new(
        reader.clone(),
        CacheSettings::default(),
        Arc::new(Freshness::new(Duration::from_secs(60))),
        s.cache.key_ids().clone(),
    ));
    let pending = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(id).await }
    });
    reader.read_done.notified().await;
    // The old (active) record is in flight; now the key is revoked.
    revoke(&s, &key.key_id).await;
    cache.invalidate(id);
    reader.release.notify_one();
    let raced = pending.await.unwrap().unwrap().unwrap();
    assert!(
        matches!(raced.state, keygate_core::key::KeyState::Active),
        "the racing read saw the old row"
    );

    // The next read must come from the store, not the stale answer.
    let next = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(id).await }
    });
    reader.read_done.notified().await;
    reader.release.notify_one();
    let fresh = next.await.unwrap().unwrap().unwrap();
    assert!(matches!(
        fresh.state,
        keygate_core::key::KeyState::Revoked { .. }
    ));
}

async fn the_end_of_a_grace_period_is_announced_once_as_expired_secret(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, old) = s.org_key("org_a", &["checkout:create"]).await;
    let mut stream = watch(&s.url(), &s.admin_token, 0).await;
    let req = pb::RotateKeyRequest {
        key_id: key.key_id.clone(),
        grace_period: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        ..Default::default()
    };
    s.admin()
        .await
        .rotate_key(as_key(&s.admin_token, req))
        .await
        .unwrap();
    assert_eq!(next_change(&mut stream).await.kind(), Kind::Rotated);
    s.advance(chrono::Duration::seconds(60));
    let expired = next_change(&mut stream).await;
    assert_eq!(
        (expired.kind(), expired.key_id),
        (Kind::ExpiredSecret, key.key_id.clone())
    );
    assert_eq!(
        s.authorize(&old, "POST /v1/checkouts", "").await.reason(),
        pb::DenyReason::ExpiredToken
    );
    next_heartbeat(&mut stream).await;
    let events = keygate::store::EventLog::events_after(&*s.store, 0, 100)
        .await
        .unwrap();
    let announced = events
        .iter()
        .filter(|e| e.kind == keygate_core::event::EventKind::SecretExpired);
    assert_eq!(
        announced.map(|e| e.actor.as_str()).collect::<Vec<_>>(),
        vec!["keygate"]
    );
}

on_both_backends!(
    long_silent_replicas_are_forgotten,
    the_cached_authorizer_caches_only_keys_its_feed_covers,
    the_cached_authorizer_honours_rate_limits,
    the_end_of_a_grace_period_is_announced_once_as_expired_secret,
    watch_carries_every_kind_of_invalidation_in_order,
    a_hundred_subscribers_each_get_every_revocation_once_in_order,
    a_subscriber_resumes_exactly_after_its_last_sequence,
    unknown_positions_get_reset_and_quiet_streams_get_heartbeats,
    organization_keys_watch_only_their_organization,
    the_cached_authorizer_drops_a_revoked_key_within_500ms,
    keygate_watch_prints_events,
    a_read_racing_an_invalidation_never_resurrects_the_old_record,
    an_event_applied_while_a_watch_starts_is_delivered,
    a_revocation_right_after_watch_returns_is_delivered,
);

/// The race itself, made certain: an event applied after the subscription
/// was taken but before the session starts is delivered, not skipped while
/// heartbeats claim it was sent.
async fn an_event_applied_while_a_watch_starts_is_delivered(backend: Backend) {
    use keygate::feed::FeedItem;
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s.org_key("org_a", &[]).await;
    s.settle().await;
    let subscription = s.feed.subscribe();
    revoke(&s, &key.key_id).await;
    s.settle().await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(s.feed.clone().watch(0, subscription, tx, shutdown.clone()));
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    match first {
        FeedItem::Event(e) => assert_eq!(e.key_id.to_string(), key.key_id),
        other => panic!("the revocation was skipped; first came {other:?}"),
    }
    shutdown.cancel();
}

/// What a gateway sees: a revocation made as soon as Watch (after 0)
/// returned is on the stream, round after round.
async fn a_revocation_right_after_watch_returns_is_delivered(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    for round in 0..30 {
        let (key, _) = s.org_key("org_a", &[]).await;
        let mut stream = watch(&s.url(), &s.admin_token, 0).await;
        revoke(&s, &key.key_id).await;
        let e = next_change(&mut stream).await;
        assert_eq!(
            (e.kind(), e.key_id.as_str()),
            (Kind::Revoked, key.key_id.as_str()),
            "round {round}"
        );
    }
}

/// A position older than the replica replays (--feed-max-replay) starts
/// with RESET: the subscriber must drop everything it cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_too_old_to_replay_starts_with_reset() {
    let Some(a) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    // Events 2..=5 (1 is the bootstrap): two keys, each created and revoked.
    for _ in 0..2 {
        let (key, _) = a.org_key("org_a", &[]).await;
        revoke(&a, &key.key_id).await;
    }
    let b =
        crate::replicas::Replica::start(&a.database_url, "replica-b", &["--feed-max-replay", "2"])
            .await;
    let mut stream = watch(&b.url(), &a.admin_token, 1).await;
    let first = next_change(&mut stream).await;
    assert_eq!(first.kind(), Kind::Reset, "{first:?}");
    assert_eq!(first.sequence, 5, "RESET carries the head to resume after");
    // Within reach, it replays instead: event 5 is the second revocation.
    let mut stream = watch(&b.url(), &a.admin_token, 3).await;
    let first = next_change(&mut stream).await;
    assert_eq!((first.kind(), first.sequence), (Kind::Revoked, 5));
}

/// Every start is a new replica: those silent for over an hour are
/// forgotten, recently silent ones stay listed as not live.
async fn long_silent_replicas_are_forgotten(backend: Backend) {
    use sqlx::Connection;
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&s.database_url).await.unwrap();
    let now = chrono::Utc::now().timestamp_micros();
    for (name, ago_minutes) in [("gone-replica", 120), ("recent-replica", 10)] {
        sqlx::query(
            "INSERT INTO replicas (replica_id, name, applied_sequence, heartbeat_at) VALUES ($1, $2, 0, $3)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(name)
        .bind(now - ago_minutes * 60_000_000)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let mut feed = RevocationFeedClient::new(
        Channel::from_shared(s.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let listed =
        crate::harness::eventually(Duration::from_secs(15), "the old replica to go", || {
            let mut feed = feed.clone();
            let token = s.admin_token.clone();
            async move {
                let r = feed
                    .list_replicas(as_key(&token, pb::ListReplicasRequest {}))
                    .await
                    .ok()?
                    .into_inner();
                (!r.replicas.iter().any(|r| r.name == "gone-replica")).then_some(r)
            }
        })
        .await;
    let recent = listed.replicas.iter().find(|r| r.name == "recent-replica");
    assert!(recent.is_some_and(|r| !r.live), "{listed:?}");
    let _ = &mut feed;
}
