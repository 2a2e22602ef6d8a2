//! Forged tokens never reach the store: the key-id index refuses, from
//! memory, well-formed tokens whose key id is no key; concurrent misses for
//! one id share one read; a cap on store reads sheds a flood of uncached keys
//! as UNAVAILABLE while cached keys keep answering; and the feed keeps its
//! own connections however busy Authorize is.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use keygate::cache::{CacheSettings, Freshness, KeyCache};
use keygate::index::KeyIndex;
use keygate::store::{KeyReader, SqlStore, StoreError};
use keygate_core::key::{KeyRecord, KeyState, Mode};
use keygate_core::key_id::KeyIds;
use keygate_core::token::{Brand, generate};
use keygate_proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc};
use tonic::Code;
use uuid::Uuid;

use crate::feed::revoke;
use crate::harness::{Backend, TestServer, as_key, eventually};
use crate::on_both_backends;
use crate::replicas::Replica;

const ROUTE: &str = "POST /v1/checkouts";

/// A well-formed token (the server's brand and mode, a valid checksum) for a
/// random key id: what anyone can make, since the format is public.
fn forged() -> String {
    generate(&Brand::default(), Mode::Live, Uuid::new_v4())
        .unwrap()
        .token
}

async fn index_loaded(s: &TestServer) {
    let index = s.cache.index().clone();
    eventually(Duration::from_secs(10), "the key-id index to load", || {
        let index = index.clone();
        async move { index.is_loaded().then_some(()) }
    })
    .await;
}

/// Authorizes every token, 8 calls at a time.
async fn authorize_all(
    s: &TestServer,
    tokens: &[String],
) -> Vec<Result<pb::AuthorizeResponse, tonic::Status>> {
    authorize_in_parallel(s, tokens, 8).await
}

/// Authorizes every token, `parallel` calls at a time.
async fn authorize_in_parallel(
    s: &TestServer,
    tokens: &[String],
    parallel: usize,
) -> Vec<Result<pb::AuthorizeResponse, tonic::Status>> {
    let client = s.authorizer().await;
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in tokens.chunks(tokens.len().div_ceil(parallel)) {
        let (mut client, chunk) = (client.clone(), chunk.to_vec());
        tasks.spawn(async move {
            let mut answers = Vec::new();
            for token in chunk {
                let req = pb::AuthorizeRequest {
                    token,
                    route: ROUTE.into(),
                    ..Default::default()
                };
                answers.push(client.authorize(req).await.map(|r| r.into_inner()));
            }
            answers
        });
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

fn assert_invalid_token(answers: &[Result<pb::AuthorizeResponse, tonic::Status>]) {
    for answer in answers {
        let r = answer.as_ref().unwrap();
        assert_eq!(
            (r.decision(), r.reason()),
            (pb::Decision::Deny, pb::DenyReason::InvalidToken),
            "{r:?}"
        );
    }
}

fn key_id(key: &pb::ApiKey) -> Uuid {
    Uuid::parse_str(&key.key_id).unwrap()
}

async fn two_thousand_forged_tokens_cost_no_store_read(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    index_loaded(&s).await;
    let tokens: Vec<String> = (0..2000).map(|_| forged()).collect();
    let before = s.store.key_reads();
    let answers = authorize_in_parallel(&s, &tokens, 100).await;
    assert_eq!(answers.len(), 2000);
    assert_invalid_token(&answers);
    assert_eq!(
        s.store.key_reads() - before,
        0,
        "forged tokens must not reach the store"
    );
}

/// Authorizes every token, 100 calls at a time, and checks each is refused
/// as INVALID_TOKEN; how many reads of the log that took, and how long.
async fn log_reads_to_refuse(s: &TestServer, tokens: &[String]) -> (u64, Duration) {
    let (before, started) = (s.store.log_reads(), std::time::Instant::now());
    let answers = authorize_in_parallel(s, tokens, 100).await;
    let (reads, elapsed) = (s.store.log_reads() - before, started.elapsed());
    assert_invalid_token(&answers);
    (reads, elapsed)
}

/// A token for an id this cluster's keygate never made is refused at once:
/// it waits for no read of the log, so a flood of them costs the store
/// nothing at all, not even the feed's reads (only its own polls).
async fn a_flood_of_forged_ids_waits_for_no_log_read(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    index_loaded(&s).await;
    let tokens: Vec<String> = (0..4000).map(|_| forged()).collect();
    let (reads, elapsed) = log_reads_to_refuse(&s, &tokens).await;
    // The feed's polls (every 200 ms here) and the read in flight at each
    // end; a read per lookup's wait would be one every 5 ms.
    let bound = elapsed.as_millis() / 200 + 3;
    assert!(
        u128::from(reads) <= bound,
        "{reads} log reads for 4,000 forged ids in {elapsed:?} (at most {bound})"
    );
}

/// Tokens for ids keygate made but the index lacks (a key created on another
/// replica a moment ago, a deleted key, or a forger who has the tag key) wait
/// for one more read of the log, and share it: the feed reads at most once
/// per 5 ms for all of them, so a flood costs the store a bounded number of
/// log reads however many tokens it sends.
async fn a_flood_of_unknown_minted_ids_shares_a_bounded_number_of_log_reads(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    index_loaded(&s).await;
    let ids = s.cache.key_ids().clone();
    let tokens: Vec<String> = (0..4000)
        .map(|_| {
            generate(&Brand::default(), Mode::Live, ids.mint().unwrap())
                .unwrap()
                .token
        })
        .collect();
    let (reads, elapsed) = log_reads_to_refuse(&s, &tokens).await;
    assert!(
        reads > 0,
        "an id keygate made waits for a read of the log before it is refused"
    );
    // One read per 5 ms, plus the polls and the read in flight at each end.
    let bound = elapsed.as_millis() / 5 + elapsed.as_millis() / 100 + 4;
    assert!(
        u128::from(reads) <= bound,
        "{reads} log reads for 4,000 unknown ids in {elapsed:?} (at most {bound})"
    );
}

/// Keys made before key ids were tagged (random UUIDv4 ids) keep working:
/// they are in the loaded index. One written while the replica runs (as a
/// replica of an older version would, during a rolling upgrade) works once
/// its CREATED event has been read.
async fn untagged_keys_of_older_versions_keep_working(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (before_start, token) = legacy_key(&s).await;
    let s = s.restart().await;
    index_loaded(&s).await;
    assert!(!s.cache.key_ids().minted(before_start));
    assert!(!s.cache.index().refuses(before_start));
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );

    let (while_running, token) = legacy_key(&s).await;
    eventually(
        Duration::from_secs(10),
        "the untagged key to be indexed",
        || {
            let index = s.cache.index().clone();
            async move { (!index.refuses(while_running)).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
}

/// Writes an active key with a random UUIDv4 id straight into the store, as
/// keygate did before ids were tagged; its id and token.
async fn legacy_key(s: &TestServer) -> (Uuid, String) {
    let id = Uuid::new_v4();
    (id, s.store_key_with_id(id).await)
}

async fn before_the_index_loads_forged_tokens_are_checked_in_the_store(backend: Backend) {
    let Some(s) = TestServer::start_with(backend, |s| s.load_key_index = false).await else {
        return;
    };
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(s.org_key("org_a", &["checkout:create"]).await.1);
    }
    let forged_before: Vec<String> = (0..20).map(|_| forged()).collect();
    let before = s.store.key_reads();
    assert_invalid_token(&authorize_all(&s, &forged_before).await);
    assert_eq!(
        s.store.key_reads() - before,
        20,
        "not loaded: each unknown id is read from the store, as without an index"
    );

    // Loading in pages of 2 reads every key: the bootstrap key and three more.
    let index = s.cache.index();
    assert!(!index.is_loaded());
    assert_eq!(index.load(&*s.store, 2).await.unwrap(), 4);
    assert!(index.is_loaded());
    let forged_after: Vec<String> = (0..20).map(|_| forged()).collect();
    let before = s.store.key_reads();
    assert_invalid_token(&authorize_all(&s, &forged_after).await);
    assert_eq!(s.store.key_reads() - before, 0);
    for token in &tokens {
        assert_eq!(
            s.authorize(token, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
}

/// The bulk load is what knows keys made before this replica started: after
/// a restart, every old key still works and forged tokens cost nothing.
async fn keys_made_before_a_restart_are_in_the_loaded_index(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut tokens = vec![s.admin_token.clone()];
    for _ in 0..3 {
        tokens.push(s.org_key("org_a", &["checkout:create"]).await.1);
    }
    let s = s.restart().await;
    index_loaded(&s).await;
    for token in &tokens[1..] {
        assert_eq!(
            s.authorize(token, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
    let before = s.store.key_reads();
    assert_invalid_token(&authorize_all(&s, &(0..50).map(|_| forged()).collect::<Vec<_>>()).await);
    assert_eq!(s.store.key_reads() - before, 0);
}

/// A key made on this replica works at once; once deleted, its id is
/// refused from memory.
async fn created_keys_work_at_once_and_deleted_ones_are_refused_from_memory(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    index_loaded(&s).await;
    let (key, token) = s.org_key("org_a", &["checkout:create"]).await;
    assert_eq!(
        s.authorize(&token, ROUTE, "").await.decision(),
        pb::Decision::Allow,
        "known to the index before CreateKey returned"
    );
    s.admin()
        .await
        .delete_key(as_key(
            &s.admin_token,
            pb::DeleteKeyRequest {
                key_id: key.key_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let before = s.store.key_reads();
    let r = s.authorize(&token, ROUTE, "").await;
    assert_eq!(
        (r.decision(), r.reason()),
        (pb::Decision::Deny, pb::DenyReason::InvalidToken)
    );
    assert_eq!(s.store.key_reads() - before, 0);
    assert!(s.cache.index().refuses(key_id(&key)));
}

/// A key made on another replica is known here once its CREATED event has
/// been applied by this replica's feed; used here before that, the lookup
/// waits for one more read of the log instead of refusing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_on_another_replica_works_once_its_event_arrives() {
    let Some(a) = TestServer::start(Backend::Postgres).await else {
        return;
    };
    let b = Replica::start(&a.database_url, "replica-b", &[]).await;
    index_loaded(&a).await;
    let created = b
        .admin()
        .await
        .create_key(as_key(
            &a.admin_token,
            pb::CreateKeyRequest {
                name: "made on b".into(),
                organization_id: "org_a".into(),
                mode: pb::Mode::Live as i32,
                scopes: vec!["checkout:create".into()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    a.settle().await;
    assert!(!a.cache.index().refuses(key_id(&created.key.unwrap())));
    let before = a.store.key_reads();
    assert_eq!(
        a.authorize(&created.token, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    assert_eq!(a.store.key_reads() - before, 1, "one read: the first miss");

    for _ in 0..5 {
        let created = b
            .admin()
            .await
            .create_key(as_key(
                &a.admin_token,
                pb::CreateKeyRequest {
                    name: "used on a at once".into(),
                    organization_id: "org_a".into(),
                    mode: pb::Mode::Live as i32,
                    scopes: vec!["checkout:create".into()],
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            a.authorize(&created.token, ROUTE, "").await.decision(),
            pb::Decision::Allow
        );
    }
}

/// The real store, counting reads and holding each one (after it has read)
/// until the test lets it go.
struct GatedReads {
    store: Arc<SqlStore>,
    reads: AtomicUsize,
    started: mpsc::UnboundedSender<Uuid>,
    gate: Semaphore,
}

#[async_trait::async_trait]
impl KeyReader for GatedReads {
    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let found = self.store.get_key(id).await?;
        let _ = self.started.send(id);
        self.gate.acquire().await.unwrap().forget();
        Ok(found)
    }
}

fn gated(s: &TestServer) -> (Arc<GatedReads>, mpsc::UnboundedReceiver<Uuid>) {
    let (started, reads_started) = mpsc::unbounded_channel();
    let reader = Arc::new(GatedReads {
        store: s.store.clone(),
        reads: AtomicUsize::new(0),
        started,
        gate: Semaphore::new(0),
    });
    (reader, reads_started)
}

/// A cache whose key-id index is never loaded, so every uncached id is read.
fn cache_over(reader: &Arc<GatedReads>, settings: CacheSettings) -> Arc<KeyCache> {
    Arc::new(KeyCache::new(
        reader.clone(),
        settings,
        Arc::new(Freshness::new(Duration::from_secs(60))),
        Arc::new(KeyIds::new([0; 32])),
    ))
}

type Lookup = Result<Option<Arc<KeyRecord>>, StoreError>;

/// Starts `cache.get(id)` on its own task and returns once the lookup has
/// begun (joined a read in flight, or started one), with its handle.
async fn begin_get(cache: &Arc<KeyCache>, id: Uuid) -> tokio::task::JoinHandle<Lookup> {
    let (begun, has_begun) = tokio::sync::oneshot::channel();
    let cache = cache.clone();
    let task = tokio::spawn(async move {
        let mut lookup = pin!(cache.get(id));
        let first = futures_util::poll!(lookup.as_mut());
        let _ = begun.send(());
        match first {
            Poll::Ready(found) => found,
            Poll::Pending => lookup.await,
        }
    });
    has_begun.await.unwrap();
    task
}

async fn concurrent_misses_for_one_id_share_one_read(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s.org_key("org_a", &[]).await;
    let (reader, mut reads_started) = gated(&s);
    let cache = cache_over(&reader, CacheSettings::default());
    let mut lookups = Vec::new();
    for _ in 0..20 {
        lookups.push(begin_get(&cache, key_id(&key)).await);
    }
    assert_eq!(reads_started.recv().await, Some(key_id(&key)));
    reader.gate.add_permits(20);
    for lookup in lookups {
        let found = lookup.await.unwrap().unwrap().unwrap();
        assert_eq!(found.id, key_id(&key));
    }
    assert_eq!(
        reader.reads.load(Ordering::SeqCst),
        1,
        "20 misses, one read"
    );
}

/// RevokeKey promises the very next Authorize on this replica sees it: a
/// lookup after an invalidation never joins a read that began before it.
async fn an_invalidation_detaches_the_read_in_flight(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (key, _) = s.org_key("org_a", &[]).await;
    let id = key_id(&key);
    let (reader, mut reads_started) = gated(&s);
    let cache = cache_over(&reader, CacheSettings::default());
    let before = begin_get(&cache, id).await;
    assert_eq!(reads_started.recv().await, Some(id));
    revoke(&s, &key.key_id).await;
    cache.invalidate(id);
    let after = begin_get(&cache, id).await;
    let second = tokio::time::timeout(Duration::from_secs(5), reads_started.recv()).await;
    assert_eq!(
        second.ok().flatten(),
        Some(id),
        "the lookup after the invalidation reads the store itself"
    );
    reader.gate.add_permits(2);
    let old = before.await.unwrap().unwrap().unwrap();
    assert_eq!(
        old.state,
        KeyState::Active,
        "the earlier read saw the old row"
    );
    let new = after.await.unwrap().unwrap().unwrap();
    assert!(matches!(new.state, KeyState::Revoked { .. }), "{new:?}");
    // And the old row was not kept: the next lookup is the revoked one.
    let next = cache.get(id).await.unwrap().unwrap();
    assert!(matches!(next.state, KeyState::Revoked { .. }));
}

async fn the_read_cap_sheds_uncached_keys_but_never_cached_ones(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (warm, _) = s.org_key("org_a", &[]).await;
    let (cold1, _) = s.org_key("org_a", &[]).await;
    let (cold2, _) = s.org_key("org_a", &[]).await;
    let (reader, mut reads_started) = gated(&s);
    let cache = cache_over(
        &reader,
        CacheSettings {
            store_reads: 1,
            store_read_wait: Duration::from_millis(20),
            ..CacheSettings::default()
        },
    );
    reader.gate.add_permits(1);
    assert!(cache.get(key_id(&warm)).await.unwrap().is_some());
    reads_started.recv().await;

    // cold1's read holds the only slot.
    let holding = begin_get(&cache, key_id(&cold1)).await;
    assert_eq!(reads_started.recv().await, Some(key_id(&cold1)));
    let shed = cache.get(key_id(&cold2)).await.unwrap_err();
    assert!(matches!(shed.root(), StoreError::Busy), "{shed:?}");
    let status: tonic::Status = keygate::error::Error::Store(shed).into();
    assert_eq!(
        (status.code(), status.message()),
        (Code::Unavailable, "key store busy")
    );
    assert!(
        cache.get(key_id(&warm)).await.unwrap().is_some(),
        "a cached key needs no slot"
    );

    reader.gate.add_permits(2);
    assert!(holding.await.unwrap().unwrap().is_some());
    assert!(cache.get(key_id(&cold2)).await.unwrap().is_some());
    assert_eq!(reader.reads.load(Ordering::SeqCst), 3);
}

/// Over gRPC, with one read slot and no wait: a flood of uncached keys gets
/// ALLOW or UNAVAILABLE ("key store busy"), never anything else, and the
/// cached key is allowed every time.
async fn a_flood_of_uncached_keys_never_disturbs_cached_ones(backend: Backend) {
    let Some(s) = TestServer::start_with(backend, |s| {
        s.cache.store_reads = 1;
        s.cache.store_read_wait = Duration::ZERO;
        s.default_rate_limit =
            keygate_core::limits::Allowance::PerMinute(std::num::NonZeroU32::new(10_000).unwrap());
    })
    .await
    else {
        return;
    };
    let (_, warm) = s.org_key("org_a", &["checkout:create"]).await;
    let mut cold = Vec::new();
    for _ in 0..60 {
        cold.push(s.org_key("org_a", &["checkout:create"]).await.1);
    }
    // Every CREATED event applied (each invalidates its id), then warm up.
    s.settle().await;
    assert_eq!(
        s.authorize(&warm, ROUTE, "").await.decision(),
        pb::Decision::Allow
    );
    let warm_calls = vec![warm; 200];
    let (flood, cached) = tokio::join!(authorize_all(&s, &cold), authorize_all(&s, &warm_calls));
    for answer in cached {
        assert_eq!(answer.unwrap().decision(), pb::Decision::Allow);
    }
    let mut allowed = 0;
    for answer in flood {
        match answer {
            Ok(r) => {
                assert_eq!(r.decision(), pb::Decision::Allow, "{r:?}");
                allowed += 1;
            }
            Err(status) => assert_eq!(
                (status.code(), status.message()),
                (Code::Unavailable, "key store busy")
            ),
        }
    }
    assert!(allowed > 0, "the one slot served some of the flood");
}

/// With every main-pool connection stuck in Authorize reads, the feed still
/// records this replica's heartbeat over its own connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_keeps_its_connections_while_authorize_reads_fill_the_pool() {
    let Some(a) = TestServer::start_with(Backend::Postgres, |s| {
        s.cache.store_reads = 64;
        s.cache.store_read_wait = Duration::from_secs(10);
        s.feed.replica_heartbeat = Duration::from_millis(100);
    })
    .await
    else {
        return;
    };
    index_loaded(&a).await;
    let mut cold = Vec::new();
    for _ in 0..20 {
        cold.push(a.org_key("org_a", &["checkout:create"]).await.1);
    }
    let pg = sqlx::PgPool::connect(&a.database_url).await.unwrap();
    let mut lock = pg.begin().await.unwrap();
    sqlx::query("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let stuck = {
        let tokens = cold.clone();
        let s = &a;
        async move { authorize_in_parallel(s, &tokens, tokens.len()).await }
    };
    let watcher = async {
        let db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pg)
            .await
            .unwrap();
        eventually(Duration::from_secs(10), "16 reads stuck on the lock", || {
            let (pg, db) = (pg.clone(), db.clone());
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                )
                .bind(db)
                .fetch_one(&pg)
                .await
                .unwrap();
                (n >= 16).then_some(())
            }
        })
        .await;
        let heartbeat = || async {
            sqlx::query_scalar::<_, i64>("SELECT heartbeat_at FROM replicas WHERE replica_id = $1")
                .bind(a.replicas.replica_id().to_string())
                .fetch_one(&pg)
                .await
                .unwrap()
        };
        let first = heartbeat().await;
        eventually(
            Duration::from_secs(3),
            "the heartbeat to move on",
            || async { (heartbeat().await > first).then_some(()) },
        )
        .await;
        lock.commit().await.unwrap();
    };
    let (answers, ()) = tokio::join!(stuck, watcher);
    for answer in answers {
        // Reads past the pool's 16 may time out waiting for a connection.
        if let Err(status) = answer {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
    }
}

/// The loaded index refuses exactly what is no key, page size aside.
async fn a_fresh_index_loads_every_key_in_pages(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let mut ids = vec![];
    for _ in 0..5 {
        ids.push(key_id(&s.org_key("org_a", &[]).await.0));
    }
    for page in [1, 3, 1000] {
        let index = KeyIndex::new();
        assert_eq!(index.load(&*s.store, page).await.unwrap(), 6, "page {page}");
        assert!(ids.iter().all(|id| !index.refuses(*id)));
        assert!(index.refuses(Uuid::new_v4()));
    }
}

on_both_backends!(
    two_thousand_forged_tokens_cost_no_store_read,
    a_flood_of_forged_ids_waits_for_no_log_read,
    a_flood_of_unknown_minted_ids_shares_a_bounded_number_of_log_reads,
    untagged_keys_of_older_versions_keep_working,
    before_the_index_loads_forged_tokens_are_checked_in_the_store,
    keys_made_before_a_restart_are_in_the_loaded_index,
    created_keys_work_at_once_and_deleted_ones_are_refused_from_memory,
    concurrent_misses_for_one_id_share_one_read,
    an_invalidation_detaches_the_read_in_flight,
    the_read_cap_sheds_uncached_keys_but_never_cached_ones,
    a_flood_of_uncached_keys_never_disturbs_cached_ones,
    a_fresh_index_loads_every_key_in_pages,
);
