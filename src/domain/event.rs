//! The event log: one row per lifecycle change, with a gap-free, increasing sequence.

use chrono::{DateTime, Utc};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    /// Settings changed (name, scopes, allow-list, limit, expiry).
    Updated,
    Rotated,
    Revoked,
    Disabled,
    Enabled,
    Deleted,
    /// A rotation's grace period ended: the previous secret is dead.
    SecretExpired,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Rotated => "rotated",
            Self::Revoked => "revoked",
            Self::Disabled => "disabled",
            Self::Enabled => "enabled",
            Self::Deleted => "deleted",
            Self::SecretExpired => "secret_expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Created,
            Self::Updated,
            Self::Rotated,
            Self::Revoked,
            Self::Disabled,
            Self::Enabled,
            Self::Deleted,
            Self::SecretExpired,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// Who made a change: a key, or `keygate bootstrap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    Key(Uuid),
    Bootstrap,
    /// keygate itself, e.g. when a grace period runs out.
    Keygate,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Key(id) => write!(f, "{id}"),
            Actor::Bootstrap => f.write_str("bootstrap"),
            Actor::Keygate => f.write_str("keygate"),
        }
    }
}

/// An event to append with a change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: EventKind,
    pub key_id: Uuid,
    pub organization_id: Option<String>,
    pub actor: Actor,
    pub at: DateTime<Utc>,
    /// The revoke reason; empty otherwise.
    pub reason: String,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub sequence: i64,
    pub kind: EventKind,
    pub key_id: Uuid,
    pub organization_id: Option<String>,
    pub actor: String,
    pub at: DateTime<Utc>,
    pub reason: String,
    /// The audit chain hash (see `audit`); `None` only for a damaged row.
    pub hash: Option<[u8; 32]>,
}
