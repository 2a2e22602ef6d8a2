//! Key usage, as written to the store in batches.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// One key's usage to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The key that was used.
    pub key_id: Uuid,
    /// Its latest use in the batch; the store keeps the later of this and
    /// what it has.
    pub last_used_at: DateTime<Utc>,
    /// Uses of the previous secret since the rotation at `rotated_at`.
    pub previous: Option<PreviousUsage>,
}

/// Uses of a key's rotated-out secret, tied to the rotation they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousUsage {
    /// The rotation the uses were made under: the store counts them only if
    /// the key's `rotated_at` is still this (a later rotation discards them).
    pub rotated_at: DateTime<Utc>,
    /// How many times the previous secret authenticated in the batch.
    pub uses: u64,
    /// Its latest use in the batch.
    pub last_used_at: DateTime<Utc>,
}
