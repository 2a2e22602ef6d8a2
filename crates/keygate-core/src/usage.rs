//! Key usage, as written to the store in batches.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One key's usage to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    pub key_id: Uuid,
    pub last_used_at: DateTime<Utc>,
    /// Uses of the previous secret since the rotation at `rotated_at`.
    pub previous: Option<PreviousUsage>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousUsage {
    pub rotated_at: DateTime<Utc>,
    pub uses: u64,
    pub last_used_at: DateTime<Utc>,
}
