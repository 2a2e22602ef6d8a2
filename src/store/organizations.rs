//! Organizations' shared rate limits, one row per organization that ever had
//! one, the same SQL on both dialects.

use std::num::NonZeroU32;

use async_trait::async_trait;
use keygate_core::organization::OrganizationLimit;
use sqlx::Row;
use sqlx::any::AnyRow;
use tracing::instrument;

use super::row::{micros, time};
use super::{OrganizationLimitStore, SqlStore, StoreError};

fn limit_from_row(row: &AnyRow) -> Result<OrganizationLimit, StoreError> {
    let organization_id: String = row.try_get("organization_id")?;
    let corrupt = |why: String| StoreError::Corrupt {
        id: format!("organization {organization_id}"),
        why,
    };
    let get = |e: sqlx::Error| corrupt(e.to_string());
    let per_minute: i64 = row.try_get("rate_limit_per_minute").map_err(get)?;
    let per_minute = u32::try_from(per_minute).map_err(|e| corrupt(e.to_string()))?;
    Ok(OrganizationLimit {
        per_minute: NonZeroU32::new(per_minute),
        updated_at: time(row.try_get("updated_at").map_err(get)?).map_err(corrupt)?,
        updated_by: row.try_get("updated_by").map_err(get)?,
        organization_id,
    })
}

#[async_trait]
impl OrganizationLimitStore for SqlStore {
    #[instrument(name = "keystore.set_organization_limit", skip_all, fields(organization_id = %limit.organization_id), err)]
    async fn set_organization_limit(&self, limit: &OrganizationLimit) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO organization_limits (organization_id, rate_limit_per_minute, updated_at, updated_by) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (organization_id) DO UPDATE SET \
             rate_limit_per_minute = $2, updated_at = $3, updated_by = $4",
        )
        .bind(limit.organization_id.as_str())
        .bind(i64::from(limit.per_minute.map_or(0, NonZeroU32::get)))
        .bind(micros(limit.updated_at))
        .bind(limit.updated_by.as_str())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    #[instrument(name = "keystore.organization_limit", skip(self), err)]
    async fn organization_limit(
        &self,
        organization_id: &str,
    ) -> Result<Option<OrganizationLimit>, StoreError> {
        let row = sqlx::query(
            "SELECT organization_id, rate_limit_per_minute, updated_at, updated_by \
             FROM organization_limits WHERE organization_id = $1",
        )
        .bind(organization_id)
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(limit_from_row).transpose()
    }

    #[instrument(name = "keystore.organization_limits", skip(self), err)]
    async fn organization_limits(&self) -> Result<Vec<OrganizationLimit>, StoreError> {
        let rows = sqlx::query(
            "SELECT organization_id, rate_limit_per_minute, updated_at, updated_by \
             FROM organization_limits WHERE rate_limit_per_minute > 0 ORDER BY organization_id",
        )
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(limit_from_row).collect()
    }
}
