//! The event log's SQL: appending with the audit chain, reading, listing,
//! and backfilling hashes for rows written before the chain existed.

use std::sync::LazyLock;

use keygate_core::audit::{GENESIS, chain_hash};
use keygate_core::event::{Event, NewEvent};
use sqlx::Row;

use super::row::{EVENT_COLUMN_LIST, INSERT_EVENT, bind_event, event_from_row};
use super::sql::{Dialect, SqlStore};
use super::write::WriteTx;
use super::{EventQuery, StoreError, postgres};

/// Binds: after (a sequence), limit.
static EVENTS_AFTER: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM key_events WHERE seq > $1 ORDER BY seq LIMIT $2",
        *EVENT_COLUMN_LIST
    )
});

/// One statement for every filter combination: an absent filter binds NULL.
/// Binds: organization, key id, before (a sequence), limit.
static LIST_EVENTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM key_events \
         WHERE ($1 IS NULL OR organization_id = $1) \
           AND ($2 IS NULL OR key_id = $2) \
           AND ($3 IS NULL OR seq < $3) \
         ORDER BY seq DESC LIMIT $4",
        *EVENT_COLUMN_LIST
    )
});

fn hash_of(bytes: Option<Vec<u8>>, sequence: i64) -> Result<Option<[u8; 32]>, StoreError> {
    bytes
        .map(|b| {
            b.try_into().map_err(|_| StoreError::Corrupt {
                id: format!("event {sequence}"),
                why: "hash is not 32 bytes".into(),
            })
        })
        .transpose()
}

impl SqlStore {
    /// Appends `event` after the log's last row, chaining its hash, and on
    /// PostgreSQL wakes every replica's listener (NOTIFY is delivered at
    /// commit, so nobody reads ahead of it). Callers hold the write turn.
    pub(super) async fn append_event(
        &self,
        tx: &mut WriteTx,
        event: &NewEvent,
    ) -> Result<i64, StoreError> {
        let last = sqlx::query("SELECT seq, hash FROM key_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(tx.conn())
            .await?;
        let (sequence, previous) = match last {
            None => (1, GENESIS),
            Some(row) => {
                let seq: i64 = row.try_get(0)?;
                // A damaged last row must not stop revocations: chain on
                // from the genesis value and leave the break for `keygate
                // audit verify` to name.
                let hash = match hash_of(row.try_get(1).ok().flatten(), seq) {
                    Ok(Some(hash)) => hash,
                    Ok(None) | Err(_) => {
                        tracing::error!(
                            event = seq,
                            "audit chain damaged: the last event has no valid hash; run keygate audit verify"
                        );
                        GENESIS
                    }
                };
                (seq + 1, hash)
            }
        };
        let mut stored = Event {
            sequence,
            kind: event.kind,
            key_id: event.key_id,
            organization_id: event.organization_id.clone(),
            actor: event.actor.to_string(),
            at: event.at,
            reason: event.reason.clone(),
            details: event.details.clone(),
            hash: None,
        };
        stored.hash = Some(chain_hash(&previous, &stored));
        bind_event(sqlx::query(INSERT_EVENT.as_str()), &stored)
            .execute(tx.conn())
            .await?;
        if self.dialect() == Dialect::Postgres {
            postgres::notify_event(tx).await?;
        }
        Ok(sequence)
    }

    pub(super) async fn select_events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(EVENTS_AFTER.as_str())
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    pub(super) async fn select_events(&self, q: &EventQuery) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(LIST_EVENTS.as_str())
            .bind(q.organization_id.as_deref())
            .bind(q.key_id.map(|id| id.to_string()))
            .bind(q.before)
            .bind(i64::from(q.limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Gives rows written before the audit chain existed their hashes. The
    /// result is deterministic, so replicas starting together agree. Only a
    /// prefix of the log can be such rows: a hash missing after a hashed row
    /// is damage, which `keygate audit verify` must see, not have papered over.
    ///
    /// It runs once per store: afterwards a marker in keygate_settings says
    /// the chain is sealed, and a missing hash anywhere is left for `verify`
    /// to report (else setting every hash to NULL and restarting keygate
    /// would launder an edit).
    pub(super) async fn backfill_event_hashes(&self) -> Result<(), StoreError> {
        let sealed = sqlx::query("SELECT 1 FROM keygate_settings WHERE name = $1")
            .bind(CHAIN_SEALED)
            .fetch_optional(self.pool())
            .await?
            .is_some();
        if sealed {
            return Ok(());
        }
        self.hash_unhashed_prefix().await?;
        sqlx::query(
            "INSERT INTO keygate_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(CHAIN_SEALED)
        .bind(vec![1u8])
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn hash_unhashed_prefix(&self) -> Result<(), StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT MAX(seq) FROM key_events WHERE hash IS NULL), \
                    (SELECT MIN(seq) FROM key_events WHERE hash IS NOT NULL)",
        )
        .fetch_one(self.pool())
        .await?;
        let (last_unhashed, first_hashed): (Option<i64>, Option<i64>) =
            (row.try_get(0)?, row.try_get(1)?);
        match (last_unhashed, first_hashed) {
            (None, _) => return Ok(()),
            (Some(unhashed), Some(hashed)) if unhashed > hashed => return Ok(()),
            _ => {}
        }
        let mut previous = GENESIS;
        let mut after = 0;
        loop {
            let batch = self.select_events_after(after, 1000).await?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            after = last.sequence;
            for mut event in batch {
                match event.hash {
                    Some(hash) => previous = hash,
                    None => {
                        let hash = chain_hash(&previous, &event);
                        event.hash = Some(hash);
                        sqlx::query(
                            "UPDATE key_events SET hash = $1 WHERE seq = $2 AND hash IS NULL",
                        )
                        .bind(hash.to_vec())
                        .bind(event.sequence)
                        .execute(self.pool())
                        .await?;
                        previous = hash;
                    }
                }
            }
        }
    }
}

/// keygate_settings row: the audit chain's one-time backfill is done.
const CHAIN_SEALED: &str = "audit_chain_sealed";
