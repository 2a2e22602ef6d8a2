//! PostgreSQL specifics: production, many replicas on one database.

use std::time::Duration;

use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

use super::write::WriteTx;
use super::{Changes, StoreError};

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
pub(super) async fn serialize_writers(tx: &mut WriteTx) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITE_LOCK)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// An arbitrary, fixed advisory-lock key for "usage flushes", apart from
/// [`WRITE_LOCK`] so that flushes never wait for admin writes.
const USAGE_LOCK: i64 = 0x006b_6775_7361_6765;

/// Makes usage flushes from every replica take turns until commit: each
/// locks many rows, and two doing so at once could deadlock.
pub(super) async fn serialize_usage_flushes(tx: &mut WriteTx) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(USAGE_LOCK)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// The channel every replica LISTENs on; a notification is only a wake-up,
/// replicas read the events themselves by sequence.
const EVENTS_CHANNEL: &str = "keygate_events";

pub(super) async fn notify_event(tx: &mut WriteTx) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(EVENTS_CHANNEL)
        .execute(tx.conn())
        .await?;
    Ok(())
}

/// LISTENs for new events and wakes `changes`; reconnects forever. After
/// every (re)connect it wakes too, so the follower catches up on whatever
/// happened while the connection was down.
pub(super) async fn listen(url: &str, changes: &Changes, shutdown: CancellationToken) {
    let url = with_application_name(url, "keygate-listener");
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let connected = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen(EVENTS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match connected.await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for events; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        changes.set_listening();
        changes.wake();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => changes.wake(),
                    // The connection dropped; the next try_recv reconnects.
                    // Notifications sent meanwhile are lost, so catch up.
                    Ok(None) => changes.wake(),
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener failed; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}

fn with_application_name(url: &str, name: &str) -> String {
    if url.contains("application_name=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&application_name={name}")
    } else {
        format!("{url}?application_name={name}")
    }
}
