//! Key storage: one trait, one SQL implementation, two dialects.
//!
//! PostgreSQL (production, many replicas) and SQLite (the embedded default)
//! run the same SQL through sqlx's `Any` driver; what differs between them,
//! connection set-up, migrations and how event sequences are serialised, lives
//! in `postgres.rs` and `sqlite.rs`.

mod analytics;
mod changes;
mod events;
mod organizations;
mod postgres;
mod row;
mod sql;
mod sqlite;
#[cfg(test)]
mod testsuite;
mod url;
mod write;

use async_trait::async_trait;
pub use changes::Changes;
use chrono::{DateTime, Utc};
use keygate_core::analytics::{Granularity, Outcome, UsageCount};
use keygate_core::event::{Event, NewEvent};
use keygate_core::key::{KeyRecord, Mode};
use keygate_core::organization::OrganizationLimit;
use keygate_core::usage::UsageRecord;
pub use sql::SqlStore;
pub use url::redact as sql_redact;
use uuid::Uuid;

/// How long one store call may take by default: see [`StoreSettings::timeout`].
pub const DEFAULT_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// How the store talks to its database once it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSettings {
    /// Longest one store call may take, waiting for a connection included;
    /// past it the call fails with [`StoreError::TimedOut`] (UNAVAILABLE), so
    /// no caller waits longer than this on a database that is down or cut
    /// off. A write that times out is rolled back unless its commit had
    /// already reached the database (then it stands, as after any lost
    /// connection). Opening the store (connecting, migrations) is not bound
    /// by it.
    pub timeout: std::time::Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_STORE_TIMEOUT,
        }
    }
}

/// How long a silent replica stays in ListReplicas (shown as not live)
/// before it is forgotten.
pub const REPLICA_RETENTION: chrono::Duration = chrono::Duration::hours(1);

/// The one read the Authorize path needs.
#[async_trait]
pub trait KeyReader: Send + Sync + 'static {
    /// The key with this id, or `None` when there is none.
    async fn get_key(&self, id: Uuid) -> Result<Option<KeyRecord>, StoreError>;
}

/// Keys, for the admin API and the key-id index. Every write appends its
/// event in the same transaction, returns the event's sequence, and wakes
/// this replica's follower ([`EventLog::changes`]) once committed.
#[async_trait]
pub trait KeyStore: KeyReader {
    /// Stores a new key; [`StoreError::Conflict`] when its id exists.
    async fn insert_key(&self, key: &KeyRecord, event: &NewEvent) -> Result<i64, StoreError>;

    /// Stores `key` (with `version + 1`) if the stored version is still
    /// `key.version`, returning it and the event's sequence; `Ok(None)` when
    /// another change got there first.
    async fn update_key(
        &self,
        key: &KeyRecord,
        event: &NewEvent,
    ) -> Result<Option<(KeyRecord, i64)>, StoreError>;

    /// Deletes the key if its stored version is still `version`, returning the
    /// event's sequence; `Ok(None)` otherwise.
    async fn delete_key(
        &self,
        id: Uuid,
        version: i64,
        event: &NewEvent,
    ) -> Result<Option<i64>, StoreError>;

    /// Up to `limit` key ids above `after` (all when `None`), in id order:
    /// pages of every existing key id, for the key-id index.
    async fn key_ids_after(&self, after: Option<Uuid>, limit: u32)
    -> Result<Vec<Uuid>, StoreError>;

    /// Keys in (created_at, id) order.
    async fn list_keys(&self, query: &KeyQuery) -> Result<Vec<KeyRecord>, StoreError>;

    /// Keys whose previous secret's grace period ended by `now` without the
    /// feed having announced it yet, oldest first.
    async fn unannounced_secret_expiries(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<KeyRecord>, StoreError>;
}

/// The event log: what the follower applies, Watch replays and ListKeyEvents
/// shows, and the wake-ups that say it grew.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Up to `limit` events with a sequence above `after`, in sequence order.
    async fn events_after(&self, after: i64, limit: u32) -> Result<Vec<Event>, StoreError>;

    /// The highest event sequence, 0 when the log is empty.
    async fn head_sequence(&self) -> Result<i64, StoreError>;

    /// Events newest first, filtered.
    async fn list_events(&self, query: &EventQuery) -> Result<Vec<Event>, StoreError>;

    /// Wake-ups for "the log may have grown": this replica's own writes at
    /// once, and on PostgreSQL every replica's (see
    /// [`SqlStore::listen_for_changes`]). Only a hint: readers still poll.
    fn changes(&self) -> Changes;
}

/// Last-used times and previous-secret counts, flushed in batches.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// Writes a batch of usage: last-used times only move forward, and
    /// previous-secret counts only add to the rotation they belong to.
    async fn record_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError>;
}

/// Usage analytics: per-key call counts by outcome, in per-minute and
/// per-hour buckets that every replica adds to.
#[async_trait]
pub trait UsageAnalytics: Send + Sync + 'static {
    /// Adds each count to its bucket's row (creating it at the count): the
    /// rows hold the sum over every flush of every replica. All or nothing.
    /// A batch must not name one (granularity, key, start, outcome) twice.
    async fn add_usage_counts(&self, counts: &[UsageCount]) -> Result<(), StoreError>;

    /// Up to `query.limit` stored rows in range, in (key, start) order.
    async fn usage_rows(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;

    /// Deletes up to `limit` rows of `granularity` older than `before`,
    /// returning how many went: one bounded batch of a retention sweep.
    async fn sweep_usage(
        &self,
        granularity: Granularity,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError>;
}

/// A stored usage row: key, bucket start, outcome, calls.
pub type UsageRow = (Uuid, DateTime<Utc>, Outcome, u64);

/// Which usage rows to read.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// The bucket width.
    pub granularity: Granularity,
    /// Buckets starting at or after this…
    pub start: DateTime<Utc>,
    /// …and before this.
    pub end: DateTime<Utc>,
    /// Only this key's rows.
    pub key_id: Option<Uuid>,
    /// Only rows of this organization's keys.
    pub organization_id: Option<String>,
    /// At most this many rows.
    pub limit: u32,
}

/// Organizations' shared rate limits: written by SetOrganizationLimits, read
/// whole by every replica into memory (Authorize never reads them here).
#[async_trait]
pub trait OrganizationLimitStore: Send + Sync + 'static {
    /// Records `limit` as the organization's, replacing what it had; a
    /// `per_minute` of `None` clears it (the row stays, saying who cleared it).
    async fn set_organization_limit(&self, limit: &OrganizationLimit) -> Result<(), StoreError>;

    /// The organization's limit as last set or cleared; `None` when it never was.
    async fn organization_limit(
        &self,
        organization_id: &str,
    ) -> Result<Option<OrganizationLimit>, StoreError>;

    /// Every organization with a limit in force, by organization id.
    async fn organization_limits(&self) -> Result<Vec<OrganizationLimit>, StoreError>;
}

/// Where each replica says how far it has applied the log.
#[async_trait]
pub trait ReplicaRegistry: Send + Sync + 'static {
    /// Records a replica's position in the event log and its heartbeat, and
    /// forgets replicas silent for longer than [`REPLICA_RETENTION`] (every
    /// start is a new replica, so the table would otherwise only grow).
    async fn record_replica(&self, replica: &ReplicaStatus) -> Result<(), StoreError>;

    /// Every replica that has recorded itself, by name.
    async fn list_replicas(&self) -> Result<Vec<ReplicaStatus>, StoreError>;
}

/// Everything the key service reads and writes: keys, the event log, usage
/// and its analytics.
pub trait AdminStore: KeyStore + EventLog + UsageStore + UsageAnalytics {}

impl<T: KeyStore + EventLog + UsageStore + UsageAnalytics> AdminStore for T {}

/// A replica's row in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Chosen afresh at every start: a restarted server is a new replica.
    pub replica_id: Uuid,
    /// The replica's configured name (e.g. host:port), for people; not unique.
    pub name: String,
    /// The highest event sequence the replica has applied to its cache.
    pub applied_sequence: i64,
    /// When the replica last recorded itself, by its own wall clock.
    pub heartbeat_at: DateTime<Utc>,
}

/// Which events to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// `None`: every organization's events and SYSTEM keys' events.
    pub organization_id: Option<String>,
    /// Only this key's events; `None`: every key's.
    pub key_id: Option<Uuid>,
    /// Only events with a lower sequence.
    pub before: Option<i64>,
    /// At most this many events (0 lists none).
    pub limit: u32,
}

/// Which keys to list.
#[derive(Debug, Clone, Default)]
pub struct KeyQuery {
    /// `None`: every key, SYSTEM keys included.
    pub organization_id: Option<String>,
    /// Only keys of this mode; `None`: both.
    pub mode: Option<Mode>,
    /// Whether revoked keys are listed too.
    pub include_revoked: bool,
    /// Only keys after this (created_at, id).
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// At most this many keys (0 lists none).
    pub limit: u32,
}

/// Why a store call failed. How sqlx errors are sorted into these is
/// below (`From<sqlx::Error>`); the gRPC code each becomes is in
/// `crate::error` ([`Error::Store`](crate::error::Error::Store)).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused the statement
    /// (connections, the pool, I/O); retrying may help (UNAVAILABLE).
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The call did not finish within [`StoreSettings::timeout`].
    #[error("store did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// The database refuses to write (its disk is full, it or its file is
    /// read-only) while reads go on: the reason says which. Retrying cannot
    /// help until an operator has fixed it.
    #[error("key store cannot write: {0}")]
    CannotWrite(&'static str),
    /// An insert hit a unique constraint: a key with this id already
    /// exists (ALREADY_EXISTS).
    #[error("a key with this id already exists")]
    Conflict,
    /// A stored value does not decode into what keygate wrote; retrying
    /// cannot help (INTERNAL).
    #[error("stored key {id} is unreadable: {why}")]
    Corrupt {
        /// The row at fault: a key id, `event N`, a setting's name, or
        /// `(unknown row)` when sqlx does not say.
        id: String,
        /// What did not decode.
        why: String,
    },
    /// Applying the schema migrations failed, when opening a store or in
    /// `keygate migrate`; never met by a request.
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database URL is neither SQLite nor PostgreSQL, when opening a
    /// store; held with its passwords redacted ([`sql_redact`]).
    #[error("unsupported database url {0:?}: expected sqlite:// or postgres://")]
    UnsupportedUrl(String),
    /// Too many key reads in flight on the Authorize path (see
    /// `CacheSettings::store_reads`); load shed, not a fault (UNAVAILABLE).
    #[error("key store busy: too many key reads in flight")]
    Busy,
    /// Another request's read of the same key failed with this; shared
    /// because concurrent misses for one id wait for a single read.
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// The error itself, seen through any sharing.
    pub fn root(&self) -> &StoreError {
        match self {
            StoreError::Shared(inner) => inner.root(),
            other => other,
        }
    }
}

/// Classified by variant and error code, never by message text: a unique
/// violation is a [`StoreError::Conflict`]; a database that cannot write
/// (see [`write_refused`]) is [`StoreError::CannotWrite`]; a value that does
/// not decode into what keygate wrote (a wrong type, a missing column) is
/// [`StoreError::Corrupt`], since retrying cannot help; everything else
/// (connections, the pool, I/O, the database refusing a statement) is
/// [`StoreError::Unavailable`].
impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            if db.kind() == sqlx::error::ErrorKind::UniqueViolation {
                return StoreError::Conflict;
            }
            if let Some(why) = write_refused(db.as_ref()) {
                return StoreError::CannotWrite(why);
            }
        }
        match &e {
            sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. } => StoreError::Corrupt {
                id: "(unknown row)".into(),
                why: e.to_string(),
            },
            _ => StoreError::Unavailable(e),
        }
    }
}

/// Why the database refused a write, when that is what the error says: by
/// SQLite result code (SQLITE_FULL; SQLITE_READONLY; SQLITE_IOERR_WRITE,
/// _FSYNC and _TRUNCATE, what writing to a file on a file system remounted
/// read-only, or made immutable, gives) or PostgreSQL SQLSTATE (53100
/// disk_full, 25006 read_only_sql_transaction: a standby, or
/// default_transaction_read_only).
fn write_refused(db: &dyn sqlx::error::DatabaseError) -> Option<&'static str> {
    let code = db.code()?;
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        return match code.as_ref() {
            "53100" => Some(DISK_FULL),
            "25006" => Some("the database is read-only"),
            _ => None,
        };
    }
    db.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    let extended: i32 = code.parse().ok()?;
    match (extended & 0xff, extended) {
        (13, _) => Some(DISK_FULL),
        // A connection opened after the file turned read-only opens it
        // read-only (READONLY); one opened before fails to write (IOERR).
        (8, _) | (10, 778 | 1034 | 1546) => Some("its file is read-only or cannot be written"),
        _ => None,
    }
}

const DISK_FULL: &str = "the disk is full";
