//! The event log: one row per lifecycle change, with a gap-free, increasing sequence.

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use super::key::KeyRecord;

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was made (by the admin API or `keygate bootstrap`).
    Created,
    /// Settings changed (name, scopes, allow-list, limit, expiry).
    Updated,
    /// The key got a new secret; the old one may live on for a grace period.
    Rotated,
    /// The key stopped working for good.
    Revoked,
    /// The key stopped working until enabled again.
    Disabled,
    /// A disabled key works again.
    Enabled,
    /// The key's record is gone (its events stay).
    Deleted,
    /// A rotation's grace period ended: the previous secret is dead.
    SecretExpired,
}

impl EventKind {
    /// The kind's stored and displayed name (`created`, `secret_expired`, …);
    /// stable, since the store and the audit chain hold it.
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

    /// The kind whose [`as_str`](Self::as_str) is `s`; `None` for any other text.
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

/// Who made a change: a key, a JWT's subject, or `keygate bootstrap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The key whose token made the admin call.
    Key(Uuid),
    /// The subject of the JWT that made the admin call.
    Jwt {
        /// The token's `iss`.
        issuer: String,
        /// The token's `sub`.
        subject: String,
        /// The token's `jti`, when it has one.
        jti: Option<String>,
    },
    /// `keygate bootstrap`, writing straight into the store.
    Bootstrap,
    /// keygate itself, e.g. when a grace period runs out.
    Keygate,
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Actor::Key(id) => write!(f, "{id}"),
            Actor::Jwt {
                issuer,
                subject,
                jti: None,
            } => write!(f, "jwt:{issuer}#{subject}"),
            Actor::Jwt {
                issuer,
                subject,
                jti: Some(jti),
            } => write!(f, "jwt:{issuer}#{subject};jti={jti}"),
            Actor::Bootstrap => f.write_str("bootstrap"),
            Actor::Keygate => f.write_str("keygate"),
        }
    }
}

/// An event to append with a change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// What happened.
    pub kind: EventKind,
    /// The key it happened to.
    pub key_id: Uuid,
    /// That key's organization; `None` for a SYSTEM key.
    pub organization_id: Option<String>,
    /// Who made the change.
    pub actor: Actor,
    /// When, by the wall clock of the replica that made it.
    pub at: DateTime<Utc>,
    /// The revoke reason, or the fields an update changed; empty otherwise.
    pub reason: String,
    /// The key's settings the event leaves in force (see [`details`]).
    pub details: String,
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the log: 1 for the first event, one more for each after
    /// it, with no gaps.
    pub sequence: i64,
    /// What happened.
    pub kind: EventKind,
    /// The key it happened to.
    pub key_id: Uuid,
    /// That key's organization; `None` for a SYSTEM key.
    pub organization_id: Option<String>,
    /// Who made the change, as [`Actor`] displays it: a key id,
    /// `bootstrap` or `keygate`.
    pub actor: String,
    /// When the change was made.
    pub at: DateTime<Utc>,
    /// The revoke reason, or the fields an update changed; empty otherwise.
    pub reason: String,
    /// The settings the event left in force; empty for events that change
    /// none and for events written before details were recorded.
    pub details: String,
    /// The audit chain hash (see `audit`); `None` only for a damaged row.
    pub hash: Option<[u8; 32]>,
}

/// The settings an event records, as `field=value` pairs separated by
/// spaces, in a fixed order: every setting for a creation, and for an update
/// the fields named in `changed` (as `KeyChanges::describe` names them) with
/// their values after the change. Empty for every other kind. Never holds a
/// secret: only what GetKey shows.
///
/// `name="checkout backend" tier=organization mode=live
/// scopes=checkout:create,links:read allowed_cidrs=10.0.0.0/8
/// rate_limit_per_minute=50 unlimited=false expires_at=2027-01-01T00:00:00Z`; an empty
/// scope list is `none`, an empty allow-list `any`, a rate limit of 0
/// `default` and no expiry `never`.
pub fn details(kind: EventKind, key: &KeyRecord, changed: &str) -> String {
    let wanted = |field: &str| match kind {
        EventKind::Created => true,
        EventKind::Updated => changed.split(", ").any(|c| c == field),
        _ => false,
    };
    let list = |items: Vec<String>, empty: &str| {
        if items.is_empty() {
            empty.to_owned()
        } else {
            items.join(",")
        }
    };
    // Admin writes only: computing every value and keeping some is cheap.
    let settings = [
        ("name", format!("{:?}", key.name)),
        ("tier", key.tier.as_str().to_owned()),
        ("mode", key.mode.as_str().to_owned()),
        (
            "scopes",
            list(
                key.scopes.iter().map(|s| s.as_str().to_owned()).collect(),
                "none",
            ),
        ),
        (
            "allowed_cidrs",
            list(
                key.allowed_cidrs.iter().map(ToString::to_string).collect(),
                "any",
            ),
        ),
        (
            "rate_limit_per_minute",
            match key.rate_limit_per_minute {
                0 => "default".to_owned(),
                n => n.to_string(),
            },
        ),
        ("unlimited", key.unlimited.to_string()),
        (
            "expires_at",
            key.expires_at.map_or("never".to_owned(), |at| {
                at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            }),
        ),
    ];
    settings
        .iter()
        .filter(|(field, _)| wanted(field))
        .map(|(field, value)| format!("{field}={value}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyChanges;
    use crate::scope::ScopeSet;

    fn key() -> KeyRecord {
        let (mut key, _) = crate::key::fixtures::key_with(&[]);
        key.name = "checkout \"backend\"".into();
        key.scopes = ScopeSet::parse(&["checkout:create", "links:read"]).unwrap();
        key.allowed_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        key.rate_limit_per_minute = 50;
        key.expires_at = DateTime::from_timestamp(1_800_000_000, 0);
        key
    }

    #[test]
    fn a_creation_records_every_setting() {
        assert_eq!(
            details(EventKind::Created, &key(), ""),
            "name=\"checkout \\\"backend\\\"\" tier=organization mode=live \
             scopes=checkout:create,links:read allowed_cidrs=10.0.0.0/8 \
             rate_limit_per_minute=50 unlimited=false expires_at=2027-01-15T08:00:00Z"
        );
        let mut bare = key();
        bare.scopes = ScopeSet::parse::<&str>(&[]).unwrap();
        bare.allowed_cidrs.clear();
        bare.rate_limit_per_minute = 0;
        bare.expires_at = None;
        let d = details(EventKind::Created, &bare, "");
        assert!(
            d.ends_with(
                "scopes=none allowed_cidrs=any rate_limit_per_minute=default unlimited=false \
                 expires_at=never"
            ),
            "{d}"
        );
    }

    #[test]
    fn an_update_records_the_changed_fields_new_values() {
        let changes = KeyChanges {
            scopes: Some(ScopeSet::parse(&["links:read"]).unwrap()),
            expires_at: Some(None),
            ..Default::default()
        };
        let mut after = key();
        after.update(&changes).unwrap();
        assert_eq!(
            details(EventKind::Updated, &after, &changes.describe()),
            "scopes=links:read expires_at=never"
        );
        assert_eq!(details(EventKind::Revoked, &after, "leaked"), "");
    }
}
