//! Every store method, once, run on SQLite and on PostgreSQL (quickwit's
//! `metastore_test_suite!`): `store_test_suite!` instantiates each test per
//! backend.
//!
//! SQLite runs on a temporary file. PostgreSQL runs on a database created on
//! KEYGATE_TEST_POSTGRES_URL's server and dropped after; without that URL the
//! PostgreSQL tests say they skipped, or fail when KEYGATE_REQUIRE_POSTGRES=1.

use chrono::{DateTime, Utc};
use keygate_core::event::{Actor, EventKind, NewEvent};
use keygate_core::key::{KeyRecord, KeyState, Mode, PreviousSecret, Tier};
use keygate_core::scope::ScopeSet;
use keygate_core::token::SecretDigest;
use keygate_core::usage::{PreviousUsage, UsageRecord};
use sqlx::Connection;
use uuid::Uuid;

use super::sql::Dialect;
use super::{
    EventLog, EventQuery, KeyQuery, KeyReader, KeyStore, OrganizationLimitStore, ReplicaRegistry,
    ReplicaStatus, SqlStore, StoreError, UsageStore,
};

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Runs each listed `async fn name(store: &SqlStore)` once per backend, each
/// on a fresh, migrated database.
macro_rules! store_test_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Backend::Sqlite, |s| Box::pin(super::$name(s))).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Backend::Postgres, |s| Box::pin(super::$name(s))).await
                }
            )*
        }
    };
}

store_test_suite!(
    get_key_of_a_missing_id_is_none,
    insert_then_get_returns_every_field,
    insert_of_an_existing_id_conflicts_and_changes_nothing,
    update_stores_the_next_version_or_none_when_stale,
    update_keeps_usage_a_stale_record_does_not_know,
    delete_needs_the_current_version,
    list_keys_filters_and_pages,
    key_ids_after_pages_in_id_order,
    list_events_filters_newest_first,
    events_after_and_head_sequence_follow_the_log,
    another_replicas_writes_wake_this_one_once_it_listens,
    record_usage_moves_forward_and_counts_per_rotation,
    unannounced_secret_expiries_are_due_and_oldest_first,
    replicas_are_recorded_listed_and_forgotten,
    shared_secret_is_stable,
    ping_answers_until_closed,
    undecodable_rows_are_corrupt,
    unlimited_is_stored_updated_and_off_for_older_rows,
    organization_limits_are_set_replaced_cleared_and_listed,
);

mod analytics;

type TestFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

async fn run(backend: Backend, test: impl for<'a> FnOnce(&'a Fixture) -> TestFuture<'a>) {
    let Some(fixture) = Fixture::open(backend).await else {
        return;
    };
    test(&fixture).await;
    fixture.store.close().await;
}

/// A fresh store, and what to clean up after it.
struct Fixture {
    store: SqlStore,
    url: String,
    _dir: tempfile::TempDir,
    /// (server URL, database name) of a PostgreSQL database to drop.
    postgres: Option<(String, String)>,
}

impl Fixture {
    /// `None` when PostgreSQL is unavailable and that is allowed.
    async fn open(backend: Backend) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (url, postgres) = match backend {
            Backend::Sqlite => (
                format!("sqlite://{}", dir.path().join("keygate.db").display()),
                None,
            ),
            Backend::Postgres => {
                let Some(server) = std::env::var("KEYGATE_TEST_POSTGRES_URL")
                    .ok()
                    .filter(|u| !u.is_empty())
                else {
                    assert!(
                        std::env::var("KEYGATE_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                        "KEYGATE_REQUIRE_POSTGRES=1 but KEYGATE_TEST_POSTGRES_URL is not set"
                    );
                    eprintln!("skipped: PostgreSQL unavailable (set KEYGATE_TEST_POSTGRES_URL)");
                    return None;
                };
                let name = format!("keygate_store_{}", Uuid::new_v4().simple());
                let mut admin = sqlx::PgConnection::connect(&server)
                    .await
                    .expect("connect to postgres");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .expect("create test database");
                (with_database(&server, &name), Some((server, name)))
            }
        };
        let store = SqlStore::connect(&url).await.expect("open store");
        Some(Self {
            store,
            url,
            _dir: dir,
            postgres,
        })
    }

    /// Runs raw SQL on the store's database, past every check keygate makes.
    async fn raw(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(self.store.pool())
            .await
            .expect("raw sql");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some((server, name)) = self.postgres.take() {
            // Drop runs outside async; a small runtime on its own thread drops the database.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(mut admin) = sqlx::PgConnection::connect(&server).await {
                        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                            .execute(&mut admin)
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// `server_url` with its database replaced by `name`.
fn with_database(server_url: &str, name: &str) -> String {
    let (base, query) = server_url
        .split_once('?')
        .map_or((server_url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

/// A whole second, so stored microseconds give back the same time.
fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("valid time")
}

/// An active LIVE key of `org` created at `at(created)`.
fn key(org: &str, created: i64) -> KeyRecord {
    KeyRecord {
        id: Uuid::new_v4(),
        name: format!("{org} key"),
        organization_id: Some(org.into()),
        tier: Tier::Organization,
        mode: Mode::Live,
        prefix: "kg_live_ab12".into(),
        secret_digest: SecretDigest([1; 32]),
        previous_secret: None,
        scopes: ScopeSet::parse(&["checkout:create"]).expect("scopes"),
        allowed_cidrs: vec![],
        rate_limit_per_minute: 0,
        unlimited: false,
        state: KeyState::Active,
        created_at: at(created),
        last_used_at: None,
        expires_at: None,
        rotated_at: None,
        created_by: "bootstrap".into(),
        version: 1,
    }
}

/// A key with a value in every column, each different from `key`'s.
fn full_key() -> KeyRecord {
    KeyRecord {
        name: "everything set".into(),
        mode: Mode::Test,
        prefix: "kg_test_cd34".into(),
        secret_digest: SecretDigest([2; 32]),
        previous_secret: Some(Box::new(PreviousSecret {
            digest: SecretDigest([3; 32]),
            expires_at: at(500),
            announced: true,
            last_used_at: Some(at(450)),
            uses: 42,
        })),
        scopes: ScopeSet::parse(&["checkout:create", "transaction:read"]).expect("scopes"),
        allowed_cidrs: vec![
            "10.0.0.0/8".parse().expect("cidr"),
            "2001:db8::/32".parse().expect("cidr"),
        ],
        rate_limit_per_minute: 600,
        unlimited: true,
        state: KeyState::Revoked {
            at: at(600),
            reason: "leaked in a log".into(),
        },
        last_used_at: Some(at(550)),
        expires_at: Some(at(900)),
        rotated_at: Some(at(400)),
        created_by: Uuid::new_v4().to_string(),
        version: 7,
        ..key("acme", 100)
    }
}

fn event(kind: EventKind, key: &KeyRecord, at_s: i64) -> NewEvent {
    NewEvent {
        kind,
        key_id: key.id,
        organization_id: key.organization_id.as_deref().map(str::to_owned),
        actor: Actor::Bootstrap,
        at: at(at_s),
        reason: String::new(),
        details: String::new(),
    }
}

async fn insert(store: &SqlStore, key: &KeyRecord) -> i64 {
    store
        .insert_key(key, &event(EventKind::Created, key, 0))
        .await
        .expect("insert key")
}

fn all_keys(limit: u32) -> KeyQuery {
    KeyQuery {
        include_revoked: true,
        limit,
        ..KeyQuery::default()
    }
}

fn ids(keys: &[KeyRecord]) -> Vec<Uuid> {
    keys.iter().map(|k| k.id).collect()
}

async fn get_key_of_a_missing_id_is_none(f: &Fixture) {
    assert_eq!(f.store.get_key(Uuid::new_v4()).await.expect("get"), None);
}

async fn insert_then_get_returns_every_field(f: &Fixture) {
    let full = full_key();
    let plain = key("acme", 1);
    insert(&f.store, &full).await;
    insert(&f.store, &plain).await;
    assert_eq!(f.store.get_key(full.id).await.expect("get"), Some(full));
    assert_eq!(f.store.get_key(plain.id).await.expect("get"), Some(plain));
}

async fn insert_of_an_existing_id_conflicts_and_changes_nothing(f: &Fixture) {
    let first = key("acme", 1);
    insert(&f.store, &first).await;
    let head = f.store.head_sequence().await.expect("head");
    let twin = KeyRecord {
        name: "twin".into(),
        ..first.clone()
    };
    let err = f
        .store
        .insert_key(&twin, &event(EventKind::Created, &twin, 1))
        .await
        .expect_err("duplicate id");
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    assert_eq!(f.store.get_key(first.id).await.expect("get"), Some(first));
    assert_eq!(f.store.head_sequence().await.expect("head"), head);
}

async fn update_stores_the_next_version_or_none_when_stale(f: &Fixture) {
    let stored = key("acme", 1);
    insert(&f.store, &stored).await;
    let changed = KeyRecord {
        name: "renamed".into(),
        state: KeyState::Disabled,
        ..stored.clone()
    };
    let (next, seq) = f
        .store
        .update_key(&changed, &event(EventKind::Updated, &changed, 2))
        .await
        .expect("update")
        .expect("current version");
    assert_eq!(next.version, stored.version + 1);
    assert_eq!(
        next,
        KeyRecord {
            version: 2,
            ..changed.clone()
        }
    );
    assert_eq!(seq, f.store.head_sequence().await.expect("head"));
    assert_eq!(
        f.store.get_key(stored.id).await.expect("get"),
        Some(next.clone())
    );

    // `changed` still carries version 1: someone else's change got there first.
    let stale = KeyRecord {
        name: "lost".into(),
        ..changed
    };
    let lost = f
        .store
        .update_key(&stale, &event(EventKind::Updated, &stale, 3))
        .await
        .expect("update");
    assert_eq!(lost, None);
    assert_eq!(f.store.get_key(stored.id).await.expect("get"), Some(next));
    assert_eq!(f.store.head_sequence().await.expect("head"), seq);
}

async fn update_keeps_usage_a_stale_record_does_not_know(f: &Fixture) {
    let mut stored = key("acme", 1);
    stored.rotated_at = Some(at(10));
    stored.previous_secret = Some(Box::new(PreviousSecret {
        digest: SecretDigest([9; 32]),
        expires_at: at(1000),
        announced: false,
        last_used_at: None,
        uses: 0,
    }));
    insert(&f.store, &stored).await;
    // A usage flush lands after the admin read the record.
    f.store
        .record_usage(&[UsageRecord {
            key_id: stored.id,
            last_used_at: at(50),
            previous: Some(PreviousUsage {
                rotated_at: at(10),
                uses: 5,
                last_used_at: at(40),
            }),
        }])
        .await
        .expect("usage");
    let renamed = KeyRecord {
        name: "renamed".into(),
        ..stored.clone()
    };
    f.store
        .update_key(&renamed, &event(EventKind::Updated, &renamed, 60))
        .await
        .expect("update")
        .expect("current version");
    let after_update = f.store.get_key(stored.id).await.expect("get").expect("key");
    assert_eq!(after_update.name, "renamed");
    assert_eq!(after_update.last_used_at, Some(at(50)));
    let previous = after_update.previous_secret.clone().expect("previous");
    assert_eq!((previous.uses, previous.last_used_at), (5, Some(at(40))));

    // A rotation starts the previous secret's usage over.
    let mut rotated = after_update.clone();
    rotated.rotated_at = Some(at(70));
    rotated.previous_secret = Some(Box::new(PreviousSecret {
        digest: SecretDigest([8; 32]),
        expires_at: at(2000),
        announced: false,
        last_used_at: None,
        uses: 0,
    }));
    f.store
        .update_key(&rotated, &event(EventKind::Rotated, &rotated, 70))
        .await
        .expect("update")
        .expect("current version");
    let after_rotation = f.store.get_key(stored.id).await.expect("get").expect("key");
    let previous = after_rotation.previous_secret.expect("previous");
    assert_eq!((previous.uses, previous.last_used_at), (0, None));
    assert_eq!(previous.digest, SecretDigest([8; 32]));
    assert_eq!(after_rotation.last_used_at, Some(at(50)));
}

async fn delete_needs_the_current_version(f: &Fixture) {
    let stored = key("acme", 1);
    insert(&f.store, &stored).await;
    let head = f.store.head_sequence().await.expect("head");
    let stale = f
        .store
        .delete_key(stored.id, 0, &event(EventKind::Deleted, &stored, 2))
        .await
        .expect("delete");
    assert_eq!(stale, None);
    assert_eq!(f.store.head_sequence().await.expect("head"), head);
    assert!(f.store.get_key(stored.id).await.expect("get").is_some());

    let seq = f
        .store
        .delete_key(stored.id, 1, &event(EventKind::Deleted, &stored, 3))
        .await
        .expect("delete");
    assert_eq!(seq, Some(head + 1));
    assert_eq!(f.store.get_key(stored.id).await.expect("get"), None);
}

async fn list_keys_filters_and_pages(f: &Fixture) {
    let a1 = key("acme", 1);
    let a2 = KeyRecord {
        mode: Mode::Test,
        ..key("acme", 2)
    };
    let a3 = KeyRecord {
        state: KeyState::Revoked {
            at: at(10),
            reason: "gone".into(),
        },
        ..key("acme", 3)
    };
    let b1 = key("globex", 1);
    let system = KeyRecord {
        organization_id: None,
        tier: Tier::System,
        ..key("x", 0)
    };
    // Inserted out of order: listing orders by (created_at, id).
    for k in [&a3, &b1, &a2, &system, &a1] {
        insert(&f.store, k).await;
    }
    let list = |q: KeyQuery| async move { ids(&f.store.list_keys(&q).await.expect("list")) };
    let mut first_second = [a1.clone(), b1.clone()];
    first_second.sort_by_key(|k| k.id);

    let everything = list(all_keys(100)).await;
    assert_eq!(
        everything,
        [
            system.id,
            first_second[0].id,
            first_second[1].id,
            a2.id,
            a3.id
        ]
    );
    assert_eq!(
        list(KeyQuery {
            limit: 100,
            ..KeyQuery::default()
        })
        .await,
        [system.id, first_second[0].id, first_second[1].id, a2.id],
        "revoked keys are left out unless asked for"
    );
    assert_eq!(
        list(KeyQuery {
            organization_id: Some("acme".into()),
            ..all_keys(100)
        })
        .await,
        [a1.id, a2.id, a3.id]
    );
    assert_eq!(
        list(KeyQuery {
            mode: Some(Mode::Test),
            ..all_keys(100)
        })
        .await,
        [a2.id]
    );

    // Pages of two, each after the last key of the one before.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = f
            .store
            .list_keys(&KeyQuery {
                after,
                ..all_keys(2)
            })
            .await
            .expect("list");
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.id));
        paged.extend(ids(&page));
    }
    assert_eq!(paged, everything);
}

async fn key_ids_after_pages_in_id_order(f: &Fixture) {
    let mut keys: Vec<KeyRecord> = (0..5).map(|i| key("acme", i)).collect();
    for k in &keys {
        insert(&f.store, k).await;
    }
    keys.sort_by_key(|k| k.id.to_string());
    let sorted = ids(&keys);
    assert_eq!(f.store.key_ids_after(None, 100).await.expect("ids"), sorted);
    assert_eq!(
        f.store.key_ids_after(None, 2).await.expect("ids"),
        sorted[..2]
    );
    assert_eq!(
        f.store
            .key_ids_after(Some(sorted[1]), 2)
            .await
            .expect("ids"),
        sorted[2..4]
    );
    assert_eq!(
        f.store
            .key_ids_after(Some(sorted[4]), 2)
            .await
            .expect("ids"),
        Vec::<Uuid>::new()
    );
}

async fn list_events_filters_newest_first(f: &Fixture) {
    let acme = key("acme", 1);
    let globex = key("globex", 2);
    let s1 = insert(&f.store, &acme).await;
    let s2 = insert(&f.store, &globex).await;
    let s3 = f
        .store
        .delete_key(acme.id, 1, &event(EventKind::Deleted, &acme, 3))
        .await
        .expect("delete")
        .expect("current version");
    let list = |q: EventQuery| async move {
        f.store
            .list_events(&q)
            .await
            .expect("events")
            .iter()
            .map(|e| e.sequence)
            .collect::<Vec<_>>()
    };
    let q = |limit| EventQuery {
        limit,
        ..EventQuery::default()
    };
    assert_eq!(list(q(100)).await, [s3, s2, s1]);
    assert_eq!(list(q(2)).await, [s3, s2]);
    assert_eq!(
        list(EventQuery {
            before: Some(s3),
            ..q(100)
        })
        .await,
        [s2, s1]
    );
    assert_eq!(
        list(EventQuery {
            organization_id: Some("acme".into()),
            ..q(100)
        })
        .await,
        [s3, s1]
    );
    assert_eq!(
        list(EventQuery {
            key_id: Some(globex.id),
            ..q(100)
        })
        .await,
        [s2]
    );
    let deleted = &f
        .store
        .list_events(&EventQuery {
            key_id: Some(acme.id),
            ..q(1)
        })
        .await
        .expect("events")[0];
    assert_eq!(
        (deleted.kind, deleted.key_id, deleted.at),
        (EventKind::Deleted, acme.id, at(3))
    );
    assert!(deleted.hash.is_some(), "every appended event is chained");
}

/// What start-up waits for before SERVING: on PostgreSQL, a LISTEN that
/// another replica's writes wake; on SQLite nothing (its writer is this node).
async fn another_replicas_writes_wake_this_one_once_it_listens(f: &Fixture) {
    use std::time::Duration;
    let postgres = f.store.dialect() == Dialect::Postgres;
    assert_eq!(
        f.store.wait_listening(Duration::from_millis(50)).await,
        !postgres,
        "before the listener runs, only SQLite counts as listening"
    );
    if !postgres {
        return;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let listening = {
        let (store, stop) = (f.store.clone(), stop.clone());
        tokio::spawn(async move { store.listen_for_changes(stop).await })
    };
    assert!(f.store.wait_listening(Duration::from_secs(10)).await);
    let changes = f.store.changes();
    // The listener wakes once on connecting (to catch up); take that one.
    tokio::time::timeout(Duration::from_secs(10), changes.changed())
        .await
        .expect("the wake-up after connecting");
    let other = SqlStore::connect(&f.url)
        .await
        .expect("another replica's store");
    insert(&other, &key("acme", 0)).await;
    tokio::time::timeout(Duration::from_secs(10), changes.changed())
        .await
        .expect("another replica's write wakes this one");
    other.close().await;
    stop.cancel();
    listening.await.expect("listener task");
}

async fn events_after_and_head_sequence_follow_the_log(f: &Fixture) {
    assert_eq!(f.store.head_sequence().await.expect("head"), 0);
    assert!(
        f.store
            .events_after(0, 10)
            .await
            .expect("events")
            .is_empty()
    );
    let mut sequences = Vec::new();
    for i in 0..3 {
        sequences.push(insert(&f.store, &key("acme", i)).await);
    }
    assert_eq!(sequences, [1, 2, 3]);
    assert_eq!(f.store.head_sequence().await.expect("head"), 3);
    let seqs = |events: Vec<keygate_core::event::Event>| {
        events.iter().map(|e| e.sequence).collect::<Vec<_>>()
    };
    assert_eq!(
        seqs(f.store.events_after(0, 10).await.expect("events")),
        [1, 2, 3]
    );
    assert_eq!(seqs(f.store.events_after(1, 1).await.expect("events")), [2]);
    assert!(
        f.store
            .events_after(3, 10)
            .await
            .expect("events")
            .is_empty()
    );
}

async fn record_usage_moves_forward_and_counts_per_rotation(f: &Fixture) {
    let mut rotated = key("acme", 1);
    rotated.rotated_at = Some(at(10));
    rotated.previous_secret = Some(Box::new(PreviousSecret {
        digest: SecretDigest([9; 32]),
        expires_at: at(1000),
        announced: false,
        last_used_at: None,
        uses: 0,
    }));
    let plain = key("acme", 2);
    insert(&f.store, &rotated).await;
    insert(&f.store, &plain).await;
    f.store.record_usage(&[]).await.expect("empty usage");
    let usage = |last: i64, previous: Option<(i64, u64, i64)>| UsageRecord {
        key_id: rotated.id,
        last_used_at: at(last),
        previous: previous.map(|(rot, uses, plast)| PreviousUsage {
            rotated_at: at(rot),
            uses,
            last_used_at: at(plast),
        }),
    };
    f.store
        .record_usage(&[
            usage(50, Some((10, 3, 45))),
            UsageRecord {
                key_id: plain.id,
                last_used_at: at(20),
                previous: None,
            },
        ])
        .await
        .expect("usage");
    // Older use, more uses of the same rotation, and uses of a rotation
    // that is no longer the key's.
    f.store
        .record_usage(&[usage(30, Some((10, 2, 35)))])
        .await
        .expect("usage");
    f.store
        .record_usage(&[usage(60, Some((5, 100, 58)))])
        .await
        .expect("usage");
    let stored = f
        .store
        .get_key(rotated.id)
        .await
        .expect("get")
        .expect("key");
    assert_eq!(stored.last_used_at, Some(at(60)));
    let previous = stored.previous_secret.expect("previous");
    assert_eq!((previous.uses, previous.last_used_at), (5, Some(at(45))));
    let plain = f.store.get_key(plain.id).await.expect("get").expect("key");
    assert_eq!(plain.last_used_at, Some(at(20)));
}

async fn unannounced_secret_expiries_are_due_and_oldest_first(f: &Fixture) {
    let with_previous = |created: i64, expires: i64, announced: bool| KeyRecord {
        rotated_at: Some(at(created)),
        previous_secret: Some(Box::new(PreviousSecret {
            digest: SecretDigest([4; 32]),
            expires_at: at(expires),
            announced,
            last_used_at: None,
            uses: 0,
        })),
        ..key("acme", created)
    };
    let later = with_previous(1, 200, false);
    let sooner = with_previous(2, 100, false);
    let announced = with_previous(3, 50, true);
    let not_yet = with_previous(4, 400, false);
    for k in [&later, &sooner, &announced, &not_yet, &key("acme", 5)] {
        insert(&f.store, k).await;
    }
    let due = |now: i64, limit: u32| async move {
        ids(&f
            .store
            .unannounced_secret_expiries(at(now), limit)
            .await
            .expect("expiries"))
    };
    assert_eq!(due(300, 10).await, [sooner.id, later.id]);
    assert_eq!(due(300, 1).await, [sooner.id]);
    assert_eq!(due(200, 10).await, [sooner.id, later.id], "due at expiry");
    assert_eq!(due(99, 10).await, Vec::<Uuid>::new());
}

async fn replicas_are_recorded_listed_and_forgotten(f: &Fixture) {
    assert!(f.store.list_replicas().await.expect("replicas").is_empty());
    let replica = |name: &str, seq: i64, heartbeat: i64| ReplicaStatus {
        replica_id: Uuid::new_v4(),
        name: name.into(),
        applied_sequence: seq,
        heartbeat_at: at(heartbeat),
    };
    let b = replica("b", 1, 0);
    let a = replica("a", 2, 10);
    f.store.record_replica(&b).await.expect("record");
    f.store.record_replica(&a).await.expect("record");
    assert_eq!(
        f.store.list_replicas().await.expect("replicas"),
        [a.clone(), b.clone()]
    );
    // The same replica again: its row moves on.
    let b_later = ReplicaStatus {
        applied_sequence: 5,
        heartbeat_at: at(20),
        ..b.clone()
    };
    f.store.record_replica(&b_later).await.expect("record");
    assert_eq!(
        f.store.list_replicas().await.expect("replicas"),
        [a.clone(), b_later.clone()]
    );
    // A heartbeat a retention period after `a`'s last one forgets `a`,
    // and keeps `b` whose last heartbeat is within it.
    let retention = super::REPLICA_RETENTION.num_seconds();
    let c = replica("c", 6, 10 + retention + 1);
    f.store.record_replica(&c).await.expect("record");
    assert_eq!(
        f.store.list_replicas().await.expect("replicas"),
        [b_later, c.clone()]
    );
}

async fn shared_secret_is_stable(f: &Fixture) {
    let first = f.store.shared_secret("page_token").await.expect("secret");
    assert_eq!(
        f.store.shared_secret("page_token").await.expect("secret"),
        first
    );
    assert_ne!(f.store.shared_secret("other").await.expect("secret"), first);
    // Another replica on the same database reads the same secret.
    let replica = SqlStore::connect(&f.url).await.expect("second store");
    assert_eq!(
        replica.shared_secret("page_token").await.expect("secret"),
        first
    );
    replica.close().await;
}

async fn ping_answers_until_closed(f: &Fixture) {
    f.store.ping().await.expect("ping");
    f.store.close().await;
    let err = f.store.ping().await.expect_err("closed store");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = f
        .store
        .get_key(Uuid::new_v4())
        .await
        .expect_err("closed store");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

async fn unlimited_is_stored_updated_and_off_for_older_rows(f: &Fixture) {
    let stored = key("acme", 1);
    insert(&f.store, &stored).await;
    let unlimited = KeyRecord {
        unlimited: true,
        ..stored.clone()
    };
    let (next, _) = f
        .store
        .update_key(&unlimited, &event(EventKind::Updated, &unlimited, 2))
        .await
        .expect("update")
        .expect("current version");
    assert!(next.unlimited);
    let got = f.store.get_key(stored.id).await.expect("get").expect("key");
    assert_eq!(got, next);

    // A row written before the column existed, i.e. without it, is counted:
    // copied here from the unlimited one with every column but `unlimited`.
    let older = Uuid::new_v4();
    let columns: Vec<&str> = super::row::KEY_COLUMNS
        .iter()
        .map(|c| c.name)
        .filter(|c| *c != "unlimited")
        .collect();
    let values: Vec<String> = columns
        .iter()
        .map(|c| match *c {
            "id" => format!("'{older}'"),
            other => other.to_owned(),
        })
        .collect();
    f.raw(&format!(
        "INSERT INTO api_keys ({}) SELECT {} FROM api_keys WHERE id = '{}'",
        columns.join(", "),
        values.join(", "),
        stored.id
    ))
    .await;
    let copy = f.store.get_key(older).await.expect("get").expect("copied");
    assert_eq!(
        copy,
        KeyRecord {
            id: older,
            unlimited: false,
            ..next
        }
    );

    // Anything but 0 or 1 is damage, not a guess.
    f.raw(&format!(
        "UPDATE api_keys SET unlimited = 2 WHERE id = '{older}'"
    ))
    .await;
    assert_corrupt(f.store.get_key(older).await);
}

async fn organization_limits_are_set_replaced_cleared_and_listed(f: &Fixture) {
    use keygate_core::organization::OrganizationLimit;
    let limit = |org: &str, n: u32, at_s: i64| OrganizationLimit {
        organization_id: org.into(),
        per_minute: std::num::NonZeroU32::new(n),
        updated_at: at(at_s),
        updated_by: format!("key of {org}"),
    };
    let store = &f.store;
    assert_eq!(store.organization_limit("acme").await.expect("get"), None);
    assert_eq!(store.organization_limits().await.expect("list"), vec![]);
    for l in [
        limit("zeta", 5, 1),
        limit("acme", 100, 2),
        limit("beta", 7, 3),
    ] {
        store.set_organization_limit(&l).await.expect("set");
    }
    // Replaced whole, and cleared: the row stays, saying who cleared it.
    store
        .set_organization_limit(&limit("acme", 600, 4))
        .await
        .expect("replace");
    store
        .set_organization_limit(&limit("beta", 0, 5))
        .await
        .expect("clear");
    assert_eq!(
        store.organization_limit("acme").await.expect("get"),
        Some(limit("acme", 600, 4))
    );
    assert_eq!(
        store.organization_limit("beta").await.expect("get"),
        Some(limit("beta", 0, 5))
    );
    assert_eq!(
        store.organization_limits().await.expect("list"),
        vec![limit("acme", 600, 4), limit("zeta", 5, 1)],
        "only the limits in force, by organization"
    );
    // The largest limit the API takes fits.
    store
        .set_organization_limit(&limit("big", 100_000_000, 6))
        .await
        .expect("set");
    assert_eq!(
        store.organization_limit("big").await.expect("get"),
        Some(limit("big", 100_000_000, 6))
    );
    // More than any limit keygate writes: damage, not a limit.
    f.raw(
        "UPDATE organization_limits SET rate_limit_per_minute = 1099511627776 \
         WHERE organization_id = 'zeta'",
    )
    .await;
    assert_corrupt(store.organization_limits().await);
}

fn assert_corrupt<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    assert!(
        matches!(result, Err(StoreError::Corrupt { .. })),
        "expected Corrupt, got {result:?}"
    );
}

async fn undecodable_rows_are_corrupt(f: &Fixture) {
    let frozen = key("acme", 1);
    let renamed = key("acme", 2);
    insert(&f.store, &frozen).await;
    insert(&f.store, &renamed).await;
    f.raw(&format!(
        "UPDATE api_keys SET status = 'frozen' WHERE id = '{}'",
        frozen.id
    ))
    .await;
    assert_corrupt(f.store.get_key(frozen.id).await);
    f.raw(&format!(
        "UPDATE api_keys SET id = 'not-a-uuid' WHERE id = '{}'",
        renamed.id
    ))
    .await;
    assert_corrupt(f.store.list_keys(&all_keys(100)).await);

    // Values of the wrong type: the column decoder itself refuses them.
    // PostgreSQL keeps types, so the column's type is changed first.
    let retype = |table: &str, column: &str| {
        format!("ALTER TABLE {table} ALTER COLUMN {column} TYPE TEXT USING {column}::TEXT")
    };
    f.store
        .record_replica(&ReplicaStatus {
            replica_id: Uuid::new_v4(),
            name: "r".into(),
            applied_sequence: 1,
            heartbeat_at: at(0),
        })
        .await
        .expect("record");
    if f.store.dialect() == Dialect::Postgres {
        f.raw(&retype("replicas", "applied_sequence")).await;
        f.raw(&retype("key_events", "at")).await;
    }
    f.raw("UPDATE replicas SET applied_sequence = 'many'").await;
    assert_corrupt(f.store.list_replicas().await);
    f.raw("UPDATE key_events SET at = 'noon'").await;
    assert_corrupt(f.store.events_after(0, 10).await);
}

#[test]
fn decode_errors_are_corrupt_and_connection_errors_unavailable() {
    let corrupt = [
        sqlx::Error::ColumnNotFound("id".into()),
        sqlx::Error::ColumnIndexOutOfBounds { index: 3, len: 1 },
        sqlx::Error::Decode("bad".into()),
        sqlx::Error::ColumnDecode {
            index: "\"at\"".into(),
            source: "mismatched types".into(),
        },
        sqlx::Error::TypeNotFound {
            type_name: "uuid".into(),
        },
    ];
    for e in corrupt {
        let e = StoreError::from(e);
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    }
    let unavailable = [
        sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed,
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        sqlx::Error::Protocol("unexpected message".into()),
    ];
    for e in unavailable {
        let e = StoreError::from(e);
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    }
}
