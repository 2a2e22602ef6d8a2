//! The store's SQL, shared by both dialects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keygate_core::event::{Event, NewEvent};
use keygate_core::key::KeyRecord;
use keygate_core::usage::UsageRecord;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};
use tokio_util::sync::CancellationToken;
use tracing::instrument;
use uuid::Uuid;

use super::row::{
    INSERT_KEY, KEY_COLUMN_LIST, UPDATE_KEY, bind_key, key_from_row, micros, replica_from_row,
};
use super::url::{redact, without_ignored_secrets};
use super::write::WriteTx;
use super::{
    Changes, EventLog, EventQuery, KeyQuery, KeyReader, KeyStore, ReplicaRegistry, ReplicaStatus,
    StoreError, StoreSettings, UsageStore, postgres, sqlite,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// A PostgreSQL or SQLite store.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    /// A few connections of the revocation feed's own (see [`SqlStore::follower`]).
    feed_pool: AnyPool,
    dialect: Dialect,
    url: String,
    /// Key reads (`get_key`) issued through this store and its follower handle.
    key_reads: Arc<AtomicU64>,
    /// Reads of the event log (`events_after`), likewise.
    log_reads: Arc<AtomicU64>,
    /// Shared with the follower handle: a write on either wakes the follower.
    changes: Changes,
    /// Longest one call may take ([`StoreSettings::timeout`]).
    timeout: Duration,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("dialect", &self.dialect)
            .field("url", &redact(&self.url))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl SqlStore {
    /// Connects to `sqlite://…` (created when missing) or `postgres://…` and
    /// applies the embedded migrations, with the default [`StoreSettings`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, StoreSettings::default()).await
    }

    /// [`SqlStore::connect`] with these settings.
    pub async fn connect_with(url: &str, settings: StoreSettings) -> Result<Self, StoreError> {
        let store = Self::pool_for(url, sqlite::connect_url(url), settings).await?;
        match store.dialect {
            Dialect::Sqlite => {
                sqlite::prepare(&store.pool).await?;
                sqlite::migrator().run(&store.pool).await?;
            }
            Dialect::Postgres => postgres::migrator().run(&store.pool).await?,
        }
        store.backfill_event_hashes().await?;
        Ok(store)
    }

    /// Opens an existing store as it is, for `keygate audit verify`: no
    /// migrations, no hash backfill, and a SQLite file is opened read-only
    /// (a mistyped path is an error, not a new empty database).
    pub async fn open_existing(url: &str) -> Result<Self, StoreError> {
        Self::pool_for(url, sqlite::read_only_url(url), StoreSettings::default()).await
    }

    async fn pool_for(
        url: &str,
        sqlite_url: String,
        settings: StoreSettings,
    ) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let (dialect, url) = if sqlite::handles(url) {
            (Dialect::Sqlite, sqlite_url)
        } else if postgres::handles(url) {
            (Dialect::Postgres, without_ignored_secrets(url))
        } else {
            return Err(StoreError::UnsupportedUrl(redact(url)));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(match dialect {
                Dialect::Postgres => 16,
                Dialect::Sqlite => 8,
            })
            // Opening (migrations included) may wait for a database that is
            // still starting; every later call is bound by `settings.timeout`.
            .acquire_timeout(OPEN_TIMEOUT)
            .connect(&url)
            .await?;
        let feed_pool = if sqlite::in_memory(&url) {
            // A second pool would open a second, empty database.
            pool.clone()
        } else {
            // Lazy: opened on the feed's first read, after migrations have run.
            AnyPoolOptions::new()
                .max_connections(FEED_CONNECTIONS)
                .acquire_timeout(OPEN_TIMEOUT)
                .connect_lazy(&url)?
        };
        Ok(Self {
            pool,
            feed_pool,
            dialect,
            url,
            key_reads: Arc::default(),
            log_reads: Arc::default(),
            changes: Changes::default(),
            timeout: settings.timeout,
        })
    }

    /// The same store over the revocation feed's own connections
    /// (`FEED_CONNECTIONS`), so following the log and recording heartbeats
    /// never wait behind a flood of Authorize cache misses on the main pool.
    pub fn follower(&self) -> SqlStore {
        SqlStore {
            pool: self.feed_pool.clone(),
            ..self.clone()
        }
    }

    /// How many key reads (`get_key`) this store has issued since it was
    /// opened, follower handle included.
    pub fn key_reads(&self) -> u64 {
        self.key_reads.load(Ordering::Relaxed)
    }

    /// How many reads of the event log (`events_after`) this store and its
    /// follower handle have issued since it was opened.
    pub fn log_reads(&self) -> u64 {
        self.log_reads.load(Ordering::Relaxed)
    }

    /// Closes every connection; later calls fail as if the database were down.
    pub async fn close(&self) {
        self.pool.close().await;
        self.feed_pool.close().await;
    }

    pub(super) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(super) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Longest one call may take ([`StoreSettings::timeout`]).
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Wakes [`EventLog::changes`] for other replicas' writes until
    /// `shutdown`: on PostgreSQL, LISTENs on its own connection (reconnecting
    /// forever, waking after each reconnect to catch up on what it missed).
    /// On SQLite, one node writes the file, and its own writes wake it
    /// already: returns at once.
    pub async fn listen_for_changes(&self, shutdown: CancellationToken) {
        if self.dialect == Dialect::Postgres {
            postgres::listen(&self.url, &self.changes, shutdown).await;
        }
    }

    /// Waits at most `within` until [`Self::listen_for_changes`] hears other
    /// replicas' writes (at once on SQLite, where there are none); whether
    /// it does. Until then they reach this replica only at the feed's poll.
    pub async fn wait_listening(&self, within: Duration) -> bool {
        self.dialect != Dialect::Postgres || self.changes.wait_listening(within).await
    }

    /// A 32-byte secret shared by every replica, created on first use.
    #[instrument(name = "keystore.shared_secret", skip(self), err)]
    pub async fn shared_secret(&self, name: &str) -> Result<[u8; 32], StoreError> {
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh).map_err(|e| StoreError::Corrupt {
            id: name.into(),
            why: e.to_string(),
        })?;
        // Whichever replica inserts first wins; everyone reads the winner.
        sqlx::query("INSERT INTO keygate_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(fresh.to_vec())
            .execute(&self.pool)
            .await?;
        let value: Vec<u8> = sqlx::query("SELECT value FROM keygate_settings WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        value.try_into().map_err(|_| StoreError::Corrupt {
            id: name.into(),
            why: "setting is not 32 bytes".into(),
        })
    }

    /// Answers when the store is reachable.
    pub async fn ping(&self) -> Result<(), StoreError> {
        within(self.timeout, async {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    /// Times a store call, counts its failures, and gives up on it after the
    /// store timeout.
    pub(super) async fn observe<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.observe_for(operation, self.timeout, call).await
    }

    /// [`SqlStore::observe`] with a budget of its own, for a call that runs
    /// several statements each entitled to the store timeout.
    pub(super) async fn observe_for<T>(
        &self,
        operation: &'static str,
        budget: Duration,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = within(budget, call).await;
        crate::telemetry::store_query(operation, started.elapsed(), result.is_ok());
        result
    }

    /// Commits a write that appended an event, then wakes the follower.
    async fn commit_event(&self, tx: WriteTx) -> Result<(), StoreError> {
        tx.commit().await?;
        self.changes.wake();
        Ok(())
    }

    async fn begin_write(&self) -> Result<WriteTx, StoreError> {
        if self.dialect == Dialect::Postgres {
            let mut tx = WriteTx::begin(&self.pool).await?;
            postgres::serialize_writers(&mut tx).await?;
            return Ok(tx);
        }
        // SQLite opens a file it cannot write read-only, and such a
        // connection stays read-only after the file is writable again: a
        // write that reached one would be refused long after recovery. A
        // write that changes nothing finds it out (READONLY) and takes the
        // database's single write lock otherwise (waiting up to the busy
        // timeout); a read-only connection is closed (WriteTx's drop) and
        // the next one tried, a bounded number of times.
        let mut attempts = 0;
        loop {
            let mut tx = WriteTx::begin(&self.pool).await?;
            match sqlx::raw_sql("UPDATE api_keys SET id = id WHERE 0")
                .execute(tx.conn())
                .await
            {
                Ok(_) => return Ok(tx),
                Err(sqlx::Error::Database(db))
                    if attempts < READ_ONLY_RETRIES
                        && db
                            .code()
                            .and_then(|c| c.parse::<i32>().ok())
                            .is_some_and(|c| c & 0xff == SQLITE_READONLY) =>
                {
                    attempts += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// SQLite's result code for a write on a connection that opened its file
/// read-only.
const SQLITE_READONLY: i32 = 8;

/// Connections tried before a write gives up on finding a writable one
/// (more than the pool holds).
const READ_ONLY_RETRIES: u32 = 32;

/// One key by id; binds: the id.
static SELECT_KEY: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {} FROM api_keys WHERE id = $1", *KEY_COLUMN_LIST));

/// One statement for every filter combination: an absent filter binds NULL.
/// Binds: organization, mode, include revoked (0/1), after (created_at, id), limit.
static LIST_KEYS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM api_keys \
         WHERE ($1 IS NULL OR organization_id = $1) \
           AND ($2 IS NULL OR mode = $2) \
           AND ($3 = 1 OR status <> 'revoked') \
           AND ($4 IS NULL OR created_at > $4 OR (created_at = $4 AND id > $5)) \
         ORDER BY created_at, id LIMIT $6",
        *KEY_COLUMN_LIST
    )
});

/// Binds: now, limit.
static UNANNOUNCED_SECRET_EXPIRIES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM api_keys WHERE previous_secret_announced = 0 \
         AND previous_secret_expires_at <= $1 ORDER BY previous_secret_expires_at LIMIT $2",
        *KEY_COLUMN_LIST
    )
});

/// Most keys one usage statement writes (5 parameters each: far below both
/// dialects' parameter limits).
const USAGE_BATCH: usize = 500;

/// One round trip for `keys` keys' usage, the same SQL on both dialects
/// (SQLite ≥ 3.33 has UPDATE … FROM). Per key: id, last_used_at, and the
/// previous secret's uses, last use and rotation (NULL without one). Last-used
/// times only move forward; previous-secret uses only count toward the
/// rotation they were made under (`rotated_at = NULL` is never true).
fn usage_statement(keys: usize) -> String {
    let values = (0..keys)
        .map(|k| {
            let p = k * 5;
            format!(
                "(${}, ${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "WITH v (id, t, uses, plast, rot) AS (VALUES {values}) \
         UPDATE api_keys SET \
         last_used_at = CASE WHEN api_keys.last_used_at IS NULL OR api_keys.last_used_at < v.t \
           THEN v.t ELSE api_keys.last_used_at END, \
         previous_secret_uses = CASE WHEN api_keys.rotated_at = v.rot \
           THEN api_keys.previous_secret_uses + v.uses ELSE api_keys.previous_secret_uses END, \
         previous_secret_last_used_at = CASE WHEN api_keys.rotated_at = v.rot \
           AND (api_keys.previous_secret_last_used_at IS NULL OR api_keys.previous_secret_last_used_at < v.plast) \
           THEN v.plast ELSE api_keys.previous_secret_last_used_at END \
         FROM v WHERE api_keys.id = v.id"
    )
}

/// Connections reserved for the revocation feed: one to follow the log and
/// record this replica's heartbeat, one spare for a read that overlaps it.
pub const FEED_CONNECTIONS: u32 = 2;

/// How long opening the store may wait for a connection: a database that is
/// still starting gets a few seconds, not the store timeout.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// `call`, or [`StoreError::TimedOut`] once `budget` has passed. Dropping the
/// call drops its connection and rolls back its open transaction, if any.
async fn within<T>(
    budget: Duration,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(budget, call)
        .await
        .unwrap_or(Err(StoreError::TimedOut(budget)))
}

#[async_trait]
impl KeyReader for SqlStore {
    #[instrument(name = "keystore.get", skip(self), err)]
    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError> {
        self.key_reads.fetch_add(1, Ordering::Relaxed);
        self.observe("get", async move {
            let row = sqlx::query(SELECT_KEY.as_str())
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
            row.as_ref().map(key_from_row).transpose()
        })
        .await
    }
}

#[async_trait]
impl KeyStore for SqlStore {
    #[instrument(name = "keystore.insert", skip_all, fields(key_id = %key.id), err)]
    async fn insert_key(&self, key: &KeyRecord, event: &NewEvent) -> Result<i64, StoreError> {
        self.observe("insert", async move {
            let mut tx = self.begin_write().await?;
            bind_key(sqlx::query(INSERT_KEY.as_str()), key)
                .execute(tx.conn())
                .await?;
            let seq = self.append_event(&mut tx, event).await?;
            self.commit_event(tx).await?;
            Ok(seq)
        })
        .await
    }

    #[instrument(name = "keystore.update", skip_all, fields(key_id = %key.id), err)]
    async fn update_key(
        &self,
        key: &KeyRecord,
        event: &NewEvent,
    ) -> Result<Option<(KeyRecord, i64)>, StoreError> {
        self.observe("update", async move {
            let mut tx = self.begin_write().await?;
            let mut next = key.clone();
            next.version += 1;
            let done = bind_key(sqlx::query(UPDATE_KEY.as_str()), &next)
                .bind(key.version)
                .execute(tx.conn())
                .await?;
            if done.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(None);
            }
            let seq = self.append_event(&mut tx, event).await?;
            self.commit_event(tx).await?;
            Ok(Some((next, seq)))
        })
        .await
    }

    #[instrument(name = "keystore.delete", skip(self, event), err)]
    async fn delete_key(
        &self,
        id: Uuid,
        version: i64,
        event: &NewEvent,
    ) -> Result<Option<i64>, StoreError> {
        self.observe("delete", async move {
            let mut tx = self.begin_write().await?;
            let done = sqlx::query("DELETE FROM api_keys WHERE id = $1 AND version = $2")
                .bind(id.to_string())
                .bind(version)
                .execute(tx.conn())
                .await?;
            if done.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(None);
            }
            let seq = self.append_event(&mut tx, event).await?;
            self.commit_event(tx).await?;
            Ok(Some(seq))
        })
        .await
    }

    #[instrument(name = "keystore.list", skip(self), err)]
    async fn list_keys(&self, q: &KeyQuery) -> Result<Vec<KeyRecord>, StoreError> {
        self.observe("list", async move {
            let (after_at, after_id) = match q.after {
                Some((at, id)) => (Some(micros(at)), id.to_string()),
                None => (None, String::new()),
            };
            let rows = sqlx::query(LIST_KEYS.as_str())
                .bind(q.organization_id.as_deref())
                .bind(q.mode.map(|m| m.as_str()))
                .bind(i64::from(q.include_revoked))
                .bind(after_at)
                .bind(after_id)
                .bind(i64::from(q.limit))
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(key_from_row).collect()
        })
        .await
    }

    #[instrument(name = "keystore.key_ids_after", skip(self), err)]
    async fn key_ids_after(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Uuid>, StoreError> {
        self.observe("key_ids_after", async move {
            // Text order is the primary key's order, so each page is an index range scan.
            let rows = sqlx::query("SELECT id FROM api_keys WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after.map(|id| id.to_string()).unwrap_or_default())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(|row| {
                    let id: String = row.try_get(0)?;
                    Uuid::parse_str(&id).map_err(|e| StoreError::Corrupt {
                        id,
                        why: e.to_string(),
                    })
                })
                .collect()
        })
        .await
    }

    async fn unannounced_secret_expiries(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        self.observe("unannounced_secret_expiries", async move {
            let rows = sqlx::query(UNANNOUNCED_SECRET_EXPIRIES.as_str())
                .bind(micros(now))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(key_from_row).collect()
        })
        .await
    }
}

#[async_trait]
impl EventLog for SqlStore {
    #[instrument(name = "keystore.events_after", skip(self), err)]
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.log_reads.fetch_add(1, Ordering::Relaxed);
        self.observe("events_after", async move {
            self.select_events_after(after, limit).await
        })
        .await
    }

    #[instrument(name = "keystore.list_events", skip(self), err)]
    async fn list_events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError> {
        self.observe("list_events", self.select_events(query)).await
    }

    async fn head_sequence(&self) -> Result<i64, StoreError> {
        self.observe("head_sequence", async move {
            let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM key_events")
                .fetch_one(&self.pool)
                .await?;
            Ok(row.try_get(0)?)
        })
        .await
    }

    fn changes(&self) -> Changes {
        self.changes.clone()
    }
}

#[async_trait]
impl UsageStore for SqlStore {
    #[instrument(name = "keystore.record_usage", skip_all, fields(keys = records.len()), err)]
    async fn record_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        // Every statement gets the store timeout: a large flush is many.
        let statements = records.len().div_ceil(USAGE_BATCH) + 1;
        let budget = self
            .timeout
            .saturating_mul(u32::try_from(statements).unwrap_or(u32::MAX));
        self.observe_for("record_usage", budget, async move {
            if records.is_empty() {
                return Ok(());
            }
            // Key-id order and, on PostgreSQL, one flush at a time across
            // replicas: two flushes locking overlapping rows in different
            // orders would deadlock. The order of the joined rows an
            // UPDATE … FROM locks is up to the planner, so sorting alone does
            // not guarantee the lock order; the advisory lock does, and the
            // sort keeps statements deterministic. One transaction for every
            // batch: a failed flush is restored and retried whole, and a
            // partly committed one would count previous-secret uses twice.
            let mut sorted: Vec<&UsageRecord> = records.iter().collect();
            sorted.sort_by_key(|r| r.key_id);
            let mut tx = WriteTx::begin(&self.pool).await?;
            if self.dialect == Dialect::Postgres {
                postgres::serialize_usage_flushes(&mut tx).await?;
            }
            for batch in sorted.chunks(USAGE_BATCH) {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(usage_statement(batch.len())));
                for r in batch {
                    let previous = r.previous.as_ref();
                    query = query
                        .bind(r.key_id.to_string())
                        .bind(micros(r.last_used_at))
                        .bind(previous.map(|p| i64::try_from(p.uses).unwrap_or(i64::MAX)))
                        .bind(previous.map(|p| micros(p.last_used_at)))
                        .bind(previous.map(|p| micros(p.rotated_at)));
                }
                query.execute(tx.conn()).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl ReplicaRegistry for SqlStore {
    async fn record_replica(&self, r: &ReplicaStatus) -> Result<(), StoreError> {
        self.observe("record_replica", async move {
            sqlx::query(
                "INSERT INTO replicas (replica_id, name, applied_sequence, heartbeat_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (replica_id) DO UPDATE SET name = $2, applied_sequence = $3, heartbeat_at = $4",
            )
            .bind(r.replica_id.to_string())
            .bind(r.name.as_str())
            .bind(r.applied_sequence)
            .bind(micros(r.heartbeat_at))
            .execute(&self.pool)
            .await?;
            sqlx::query("DELETE FROM replicas WHERE heartbeat_at < $1")
                .bind(micros(r.heartbeat_at - super::REPLICA_RETENTION))
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn list_replicas(&self) -> Result<Vec<ReplicaStatus>, StoreError> {
        self.observe("list_replicas", async move {
            let rows = sqlx::query("SELECT replica_id, name, applied_sequence, heartbeat_at FROM replicas ORDER BY name, replica_id")
                .fetch_all(&self.pool)
                .await?;
            rows.iter().map(replica_from_row).collect()
        })
        .await
    }
}
