//! SQLite specifics: the embedded default, one node.

use sqlx::AnyPool;
use sqlx::migrate::Migrator;

use super::StoreError;

static MIGRATOR: Migrator = sqlx::migrate!("src/store/migrations/sqlite");

pub(super) fn migrator() -> &'static Migrator {
    &MIGRATOR
}

pub(super) fn handles(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// An in-memory database lives in its connections: every pool has its own.
pub(super) fn in_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// Creates the database file when missing, as `keygate serve` promises.
pub(super) fn connect_url(url: &str) -> String {
    with_mode(url, "rwc")
}

/// Opens the file only if it exists, and never writes to it.
pub(super) fn read_only_url(url: &str) -> String {
    with_mode(url, "ro")
}

fn with_mode(url: &str, mode: &str) -> String {
    if url.contains("mode=") || url.contains(":memory:") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode={mode}")
    } else {
        format!("{url}?mode={mode}")
    }
}

/// WAL lets Authorize's reads go on while an admin change is written; the
/// setting is stored in the file, so once is enough.
pub(super) async fn prepare(pool: &AnyPool) -> Result<(), StoreError> {
    sqlx::query("PRAGMA journal_mode = WAL")
        .execute(pool)
        .await?;
    Ok(())
}
