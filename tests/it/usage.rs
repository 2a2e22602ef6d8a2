//! Usage: last-used times without a store write per request, and how the
//! previous secret is still used during a rotation.

use chrono::Duration;
use keygate_core::clock::Clock;
use keygate_proto::v1 as pb;
use keygate_proto::v1::revocation_event::Kind;
use tonic::Code;

use crate::feed::{next_change, watch};
use crate::harness::{Backend, TestServer, as_key, execute_sql};
use crate::on_both_backends;

const ROUTE: &str = "POST /v1/checkouts";

async fn get(s: &TestServer, key_id: &str) -> pb::ApiKey {
    let req = pb::GetKeyRequest {
        key_id: key_id.into(),
    };
    s.admin()
        .await
        .get_key(as_key(&s.admin_token, req))
        .await
        .unwrap()
        .into_inner()
}

async fn last_used_shows_at_once_is_written_in_batches_and_survives_a_restart(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    assert_eq!(get(&s, &key.key_id).await.last_used_at, None);
    s.advance(Duration::seconds(30));
    let used_at = s.clock.now();
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    // Not written yet, but shown.
    let stored = keygate::store::KeyReader::get_key(&*s.store, key.key_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.last_used_at, None, "no store write per Authorize");
    assert_eq!(
        get(&s, &key.key_id).await.last_used_at.unwrap().seconds,
        used_at.timestamp()
    );
    // Listing shows it too.
    let listed = s
        .admin()
        .await
        .list_keys(as_key(&s.admin_token, pb::ListKeysRequest::default()))
        .await
        .unwrap();
    let row = listed
        .into_inner()
        .keys
        .into_iter()
        .find(|k| k.key_id == key.key_id)
        .unwrap();
    assert_eq!(row.last_used_at.unwrap().seconds, used_at.timestamp());

    // A graceful stop writes it; the next server reads it back.
    let s = s.restart().await;
    assert_eq!(
        get(&s, &key.key_id).await.last_used_at.unwrap().seconds,
        used_at.timestamp()
    );
    s.advance(Duration::seconds(30));
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    assert!(s.keys.flush_usage().await.unwrap() >= 1);
    let stored = keygate::store::KeyReader::get_key(&*s.store, key.key_id.parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.last_used_at, Some(s.clock.now()));
}

async fn a_warm_authorize_touches_no_store_even_while_tracking_usage(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (_, token) = s.org_key("org_a", &["checkout:create"]).await;
    s.settle().await;
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    s.store.close().await;
    for _ in 0..50 {
        let r = s.authorize(&token, ROUTE, "").await;
        assert!(r.decision() == pb::Decision::Allow || r.reason() == pb::DenyReason::RateLimited);
    }
}

async fn previous_secret_usage_is_visible_and_expire_previous_secret_kills_it(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, old) = s.org_key("org_a", &["checkout:create"]).await;
    let mut stream = watch(&s.url(), &s.admin_token, 0).await;
    let mut admin = s.admin().await;
    let rotate = pb::RotateKeyRequest {
        key_id: key.key_id.clone(),
        grace_period: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        ..Default::default()
    };
    let new = admin
        .rotate_key(as_key(&s.admin_token, rotate))
        .await
        .unwrap()
        .into_inner()
        .token;
    assert_eq!(next_change(&mut stream).await.kind(), Kind::Rotated);
    s.advance(Duration::minutes(5));
    for _ in 0..3 {
        assert_eq!(
            s.authorize(&old, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
    assert_eq!(
        s.authorize(&new, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    let seen = get(&s, &key.key_id).await;
    assert_eq!(
        seen.previous_secret_uses, 3,
        "only the old secret's uses count"
    );
    assert_eq!(
        seen.previous_secret_last_used_at.unwrap().seconds,
        s.clock.now().timestamp()
    );
    s.keys.flush_usage().await.unwrap();
    assert_eq!(
        get(&s, &key.key_id).await.previous_secret_uses,
        3,
        "the same after writing"
    );

    let expired = admin
        .expire_previous_secret(as_key(
            &s.admin_token,
            pb::ExpirePreviousSecretRequest {
                key_id: key.key_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(expired.previous_secret_expires_at, None);
    assert_eq!(
        s.authorize(&old, ROUTE, "").await.reason(),
        pb::DenyReason::ExpiredToken,
        "dead at once"
    );
    assert_eq!(
        s.authorize(&new, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    let e = next_change(&mut stream).await;
    assert_eq!(
        (e.kind(), e.key_id),
        (Kind::ExpiredSecret, key.key_id.clone())
    );
    let err = admin
        .expire_previous_secret(as_key(
            &s.admin_token,
            pb::ExpirePreviousSecretRequest {
                key_id: key.key_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // The grace period's natural end is not announced a second time.
    s.advance(Duration::hours(2));
    assert_eq!(
        crate::feed::next_heartbeat(&mut stream).await.kind(),
        Kind::Heartbeat
    );
}

/// Two replicas flushing usage for the same keys at once, in opposite
/// orders, round after round: no deadlock, no error, and every count and
/// time lands. Made-up key ids pad each flush past one batch of 500.
async fn concurrent_usage_flushes_from_two_replicas_neither_deadlock_nor_lose_counts(
    backend: Backend,
) {
    use keygate::store::{KeyReader, SqlStore, UsageStore};
    use keygate_core::usage::{PreviousUsage, UsageRecord};
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let other = SqlStore::connect(&s.database_url).await.unwrap();
    let mut admin = s.admin().await;
    let mut keys = Vec::new();
    for _ in 0..30 {
        let (key, _) = s.org_key("org_a", &["checkout:create"]).await;
        let rotate = pb::RotateKeyRequest {
            key_id: key.key_id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        };
        admin
            .rotate_key(as_key(&s.admin_token, rotate))
            .await
            .unwrap();
        let id: uuid::Uuid = key.key_id.parse().unwrap();
        let stored = s.store.get_key(id).await.unwrap().unwrap();
        keys.push((id, stored.rotated_at.unwrap()));
    }
    let padding: Vec<uuid::Uuid> = (0..1100).map(|_| uuid::Uuid::new_v4()).collect();
    let flush = |at: chrono::DateTime<chrono::Utc>, uses: u64, descending: bool| {
        let mut records: Vec<UsageRecord> = keys
            .iter()
            .map(|&(key_id, rotated_at)| UsageRecord {
                key_id,
                last_used_at: at,
                previous: Some(PreviousUsage {
                    rotated_at,
                    uses,
                    last_used_at: at,
                }),
            })
            .chain(padding.iter().map(|&key_id| UsageRecord {
                key_id,
                last_used_at: at,
                previous: None,
            }))
            .collect();
        records.sort_by_key(|r| r.key_id);
        if descending {
            records.reverse();
        }
        records
    };
    let rounds = 20;
    let start = s.clock.now() + Duration::minutes(1);
    let mut last = start;
    for round in 0..rounds {
        let a_at = start + Duration::seconds(round);
        last = a_at + Duration::milliseconds(500);
        let (a, b) = (flush(a_at, 1, false), flush(last, 2, true));
        let (a, b) = tokio::join!(s.store.record_usage(&a), other.record_usage(&b));
        a.unwrap();
        b.unwrap();
    }
    for (id, _) in &keys {
        let stored = keygate::store::KeyReader::get_key(&*s.store, *id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.last_used_at, Some(last), "{id}");
        let previous = stored.previous_secret.unwrap();
        assert_eq!(previous.uses, 3 * rounds as u64, "{id}");
        assert_eq!(previous.last_used_at, Some(last), "{id}");
    }
    // Time only moves forward: an older flush changes nothing.
    other.record_usage(&flush(start, 0, false)).await.unwrap();
    let stored = s.store.get_key(keys[0].0).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(last));
}

/// `n` keys stored with ids keygate made, with their tokens.
async fn stored_keys(s: &TestServer, n: usize) -> Vec<(uuid::Uuid, String)> {
    let ids = s.cache.key_ids().clone();
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        let id = ids.mint().unwrap();
        keys.push((id, s.store_key_with_id(id).await));
    }
    keys
}

/// One Authorize with each key, every one allowed.
async fn use_each(s: &TestServer, keys: &[(uuid::Uuid, String)]) {
    for (_, token) in keys {
        assert_eq!(
            s.authorize(token, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
}

/// A flush of more keys than one of its transactions holds (500) writes
/// every key's last-used time. The chunks are the service's, the same on
/// both stores; SQLite only, because 600 single inserts on the shared
/// PostgreSQL meet its checkpoint stalls (other tests dropping databases)
/// often enough to make the setup, not the flush, time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_of_more_keys_than_one_transaction_holds_writes_them_all() {
    let Some(s) = TestServer::start(Backend::Sqlite).await else {
        return;
    };
    let keys = stored_keys(&s, 600).await;
    use_each(&s, &keys).await;
    // The server's own flush may have written some already.
    s.keys.flush_usage().await.unwrap();
    for (id, _) in &keys {
        let stored = keygate::store::KeyReader::get_key(&*s.store, *id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.last_used_at, Some(s.clock.now()), "{id}");
    }
}

/// A flush whose second transaction fails keeps what the first wrote and
/// keeps the failed chunk's uses for the next flush: no key loses its last
/// use. SQLite only, as above; the trigger refuses the last key's write,
/// which the key-id order puts in the second chunk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_failing_after_its_first_transaction_keeps_those_writes_and_retries_the_rest() {
    let Some(s) = TestServer::start_with(Backend::Sqlite, |settings| {
        // Only the test's own flushes run.
        settings.usage_flush_interval = std::time::Duration::from_secs(3600);
    })
    .await
    else {
        return;
    };
    let keys = stored_keys(&s, 600).await;
    // Uses from the set-up are written first: the flush below holds these
    // 600 keys and nothing else, so its chunks are the sorted ids.
    s.keys.flush_usage().await.unwrap();
    use_each(&s, &keys).await;
    let mut sorted: Vec<uuid::Uuid> = keys.iter().map(|(id, _)| *id).collect();
    sorted.sort_unstable();
    let refused = sorted[sorted.len() - 1];
    execute_sql(
        &s,
        &format!(
            "CREATE TRIGGER refuse_usage BEFORE UPDATE OF last_used_at ON api_keys \
             WHEN NEW.id = '{refused}' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ),
    )
    .await;
    let last_used = |id: uuid::Uuid| {
        let store = s.store.clone();
        async move {
            keygate::store::KeyReader::get_key(&*store, id)
                .await
                .unwrap()
                .unwrap()
                .last_used_at
        }
    };
    assert!(s.keys.flush_usage().await.is_err());
    let (first, second) = sorted.split_at(500);
    for id in first {
        assert_eq!(
            last_used(*id).await,
            Some(s.clock.now()),
            "{id}: first chunk"
        );
    }
    for id in second {
        assert_eq!(last_used(*id).await, None, "{id}: the failed chunk");
    }
    execute_sql(&s, "DROP TRIGGER refuse_usage").await;
    s.keys.flush_usage().await.unwrap();
    for id in &sorted {
        assert_eq!(last_used(*id).await, Some(s.clock.now()), "{id}");
    }
}

on_both_backends!(
    concurrent_usage_flushes_from_two_replicas_neither_deadlock_nor_lose_counts,
    last_used_shows_at_once_is_written_in_batches_and_survives_a_restart,
    a_warm_authorize_touches_no_store_even_while_tracking_usage,
    previous_secret_usage_is_visible_and_expire_previous_secret_kills_it,
);
