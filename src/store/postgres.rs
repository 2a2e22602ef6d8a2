//! PostgreSQL specifics: production, many replicas on one database.

use sqlx::migrate::Migrator;

use super::StoreError;

static MIGRATOR: Migrator = sqlx::migrate!("src/store/migrations/postgres");

pub(super) fn migrator() -> &'static Migrator {
    &MIGRATOR
}

pub(super) fn handles(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// An arbitrary, fixed advisory-lock key for "writes to the key store".
const WRITE_LOCK: i64 = 0x006b_6579_6761_7465;

/// Makes writers take turns until commit, so event sequences are assigned in
/// commit order with no gaps (a plain SEQUENCE can commit 5 before 4).
/// Writes are admin changes: rare enough that one lane costs nothing.
pub(super) async fn serialize_writers(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITE_LOCK)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// An arbitrary, fixed advisory-lock key for "usage flushes", apart from
/// [`WRITE_LOCK`] so that flushes never wait for admin writes.
const USAGE_LOCK: i64 = 0x006b_6775_7361_6765;

/// Makes usage flushes from every replica take turns until commit: each
/// locks many rows, and two doing so at once could deadlock.
pub(super) async fn serialize_usage_flushes(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(USAGE_LOCK)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The channel every replica LISTENs on; a notification is only a wake-up,
/// replicas read the events themselves by sequence.
pub const EVENTS_CHANNEL: &str = "keygate_events";

pub(super) async fn notify_event(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(EVENTS_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
