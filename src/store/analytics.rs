//! Usage analytics buckets (`key_usage`), the same SQL on both dialects:
//! replicas add to rows with an upsert, readers group rows into buckets, and
//! a sweep deletes old rows a bounded batch at a time.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keygate_core::analytics::{Granularity, UsageCount, outcome_code, parse_outcome};
use sqlx::Row;
use tracing::instrument;
use uuid::Uuid;

use super::row::{micros, time};
use super::sql::Dialect;
use super::write::WriteTx;
use super::{SqlStore, StoreError, UsageAnalytics, UsageQuery, UsageRow, postgres};

/// Most rows one upsert statement writes (6 parameters each: far below
/// both dialects' parameter limits).
const ROWS_PER_STATEMENT: usize = 400;

/// One statement adding `rows` counts: a new row takes the count, an
/// existing one adds it (so replicas' flushes sum).
fn upsert_statement(rows: usize) -> String {
    let values = (0..rows)
        .map(|r| {
            let p = r * 6;
            format!(
                "(${}, ${}, ${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5,
                p + 6
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO key_usage (granularity, key_id, bucket_start, outcome, organization_id, calls) \
         VALUES {values} ON CONFLICT (granularity, key_id, bucket_start, outcome) \
         DO UPDATE SET calls = key_usage.calls + excluded.calls"
    )
}

#[async_trait]
impl UsageAnalytics for SqlStore {
    #[instrument(name = "keystore.add_usage_counts", skip_all, fields(rows = counts.len()), err)]
    async fn add_usage_counts(&self, counts: &[UsageCount]) -> Result<(), StoreError> {
        if counts.is_empty() {
            return Ok(());
        }
        let statements = counts.len().div_ceil(ROWS_PER_STATEMENT) + 1;
        let budget = self
            .timeout()
            .saturating_mul(u32::try_from(statements).unwrap_or(u32::MAX));
        self.observe_for("add_usage_counts", budget, async move {
            // Sorted, and on PostgreSQL one flush at a time across replicas
            // (the usage flushes' lock): upserts locking overlapping rows in
            // different orders would deadlock. One transaction: a failed
            // flush is restored and retried whole, never counted twice.
            let mut sorted: Vec<&UsageCount> = counts.iter().collect();
            sorted.sort_by_key(|c| {
                (
                    c.granularity.as_str(),
                    c.key_id,
                    c.start,
                    outcome_code(c.outcome),
                )
            });
            let mut tx = WriteTx::begin(self.pool()).await?;
            if self.dialect() == Dialect::Postgres {
                postgres::serialize_usage_flushes(&mut tx).await?;
            }
            for batch in sorted.chunks(ROWS_PER_STATEMENT) {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(upsert_statement(batch.len())));
                for c in batch {
                    query = query
                        .bind(c.granularity.as_str())
                        .bind(c.key_id.to_string())
                        .bind(micros(c.start))
                        .bind(outcome_code(c.outcome))
                        .bind(c.organization_id.as_deref())
                        .bind(i64::try_from(c.count).unwrap_or(i64::MAX));
                }
                query.execute(tx.conn()).await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    #[instrument(name = "keystore.usage_rows", skip(self), err)]
    async fn usage_rows(&self, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        self.observe("usage_rows", async move {
            let rows = sqlx::query(
                "SELECT key_id, bucket_start, outcome, calls FROM key_usage \
                 WHERE granularity = $1 AND bucket_start >= $2 AND bucket_start < $3 \
                   AND ($4 IS NULL OR key_id = $4) AND ($5 IS NULL OR organization_id = $5) \
                 ORDER BY key_id, bucket_start, outcome LIMIT $6",
            )
            .bind(q.granularity.as_str())
            .bind(micros(q.start))
            .bind(micros(q.end))
            .bind(q.key_id.map(|id| id.to_string()))
            .bind(q.organization_id.as_deref())
            .bind(i64::from(q.limit))
            .fetch_all(self.pool())
            .await?;
            rows.iter()
                .map(|row| {
                    let id: String = row.try_get(0)?;
                    let corrupt = |why: String| StoreError::Corrupt {
                        id: format!("usage of {id}"),
                        why,
                    };
                    let key_id = Uuid::parse_str(&id).map_err(|e| corrupt(e.to_string()))?;
                    let start = time(row.try_get(1)?).map_err(corrupt)?;
                    let code: String = row.try_get(2)?;
                    let outcome = parse_outcome(&code)
                        .ok_or_else(|| corrupt(format!("unknown outcome {code:?}")))?;
                    let calls: i64 = row.try_get(3)?;
                    let calls = u64::try_from(calls).map_err(|e| corrupt(e.to_string()))?;
                    Ok((key_id, start, outcome, calls))
                })
                .collect()
        })
        .await
    }

    #[instrument(name = "keystore.sweep_usage", skip(self), err)]
    async fn sweep_usage(
        &self,
        granularity: Granularity,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.observe("sweep_usage", async move {
            // Neither dialect bounds a DELETE by itself in the same way;
            // a bounded sub-select of primary keys does, on both.
            let done = sqlx::query(
                "DELETE FROM key_usage WHERE (granularity, key_id, bucket_start, outcome) IN \
                 (SELECT granularity, key_id, bucket_start, outcome FROM key_usage \
                  WHERE granularity = $1 AND bucket_start < $2 LIMIT $3)",
            )
            .bind(granularity.as_str())
            .bind(micros(before))
            .bind(i64::from(limit))
            .execute(self.pool())
            .await?;
            Ok(done.rows_affected())
        })
        .await
    }
}
