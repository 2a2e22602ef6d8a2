//! Rows ↔ key records. Times are unix microseconds; lists are space-separated.

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

/// A query on the `Any` driver.
pub type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

use super::{ReplicaStatus, StoreError};
use crate::domain::event::{Event, EventKind};
use crate::domain::key::{KeyRecord, KeyState, Mode, PreviousSecret, Tier};
use crate::domain::scope::ScopeSet;
use crate::domain::token::SecretDigest;

pub const KEY_COLUMNS: &str = "id, name, organization_id, tier, mode, prefix, secret_digest, \
    previous_secret_digest, previous_secret_expires_at, scopes, allowed_cidrs, rate_limit_per_minute, \
    status, created_at, last_used_at, expires_at, revoked_at, revoked_reason, rotated_at, created_by, version, \
    previous_secret_announced, previous_secret_last_used_at, previous_secret_uses";

/// How `update_key` writes each column: most take the record's value, but
/// usage columns are also written by usage flushes, which a stale record
/// must not undo.
pub fn key_assignment(column: &str, placeholder: usize) -> String {
    let p = format!("${placeholder}");
    match column {
        // Never backwards.
        "last_used_at" => format!(
            "last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < {p} THEN {p} ELSE last_used_at END"
        ),
        // Kept unless this change is a rotation, which starts them over.
        "previous_secret_last_used_at" | "previous_secret_uses" => {
            let rotated_at = KEY_COLUMNS
                .split(", ")
                .position(|c| c == "rotated_at")
                .map_or(0, |i| i + 1);
            format!("{column} = CASE WHEN rotated_at = ${rotated_at} THEN {column} ELSE {p} END")
        }
        _ => format!("{column} = {p}"),
    }
}

/// `$1, $2, …` for every key column.
pub fn key_placeholders() -> String {
    (1..=KEY_COLUMNS.split(", ").count())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(us: i64) -> Result<DateTime<Utc>, String> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| format!("time {us} out of range"))
}

fn opt_time(us: Option<i64>) -> Result<Option<DateTime<Utc>>, String> {
    us.map(time).transpose()
}

fn digest(bytes: Vec<u8>) -> Result<SecretDigest, String> {
    bytes
        .try_into()
        .map(SecretDigest)
        .map_err(|_| "digest is not 32 bytes".to_owned())
}

pub fn join<T: ToString>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn key_from_row(row: &AnyRow) -> Result<KeyRecord, StoreError> {
    let id: String = row.try_get("id")?;
    decode(row, &id).map_err(|why| StoreError::Corrupt { id, why })
}

fn decode(row: &AnyRow, id: &str) -> Result<KeyRecord, String> {
    let get_err = |e: sqlx::Error| e.to_string();
    let text = |col: &str| row.try_get::<String, _>(col).map_err(get_err);
    let opt_i64 = |col: &str| row.try_get::<Option<i64>, _>(col).map_err(get_err);
    let status = text("status")?;
    let state = match status.as_str() {
        "active" => KeyState::Active,
        "disabled" => KeyState::Disabled,
        "revoked" => KeyState::Revoked {
            at: time(opt_i64("revoked_at")?.ok_or("revoked key without revoked_at")?)?,
            reason: row
                .try_get::<Option<String>, _>("revoked_reason")
                .map_err(get_err)?
                .unwrap_or_default(),
        },
        other => return Err(format!("unknown status {other:?}")),
    };
    let previous_secret = match row
        .try_get::<Option<Vec<u8>>, _>("previous_secret_digest")
        .map_err(get_err)?
    {
        Some(d) => Some(PreviousSecret {
            digest: digest(d)?,
            expires_at: time(
                opt_i64("previous_secret_expires_at")?.ok_or("previous secret without expiry")?,
            )?,
            last_used_at: opt_time(opt_i64("previous_secret_last_used_at")?)?,
            uses: u64::try_from(
                row.try_get::<i64, _>("previous_secret_uses")
                    .map_err(get_err)?,
            )
            .map_err(|e| e.to_string())?,
            announced: row
                .try_get::<i64, _>("previous_secret_announced")
                .map_err(get_err)?
                != 0,
        }),
        None => None,
    };
    let scopes_text = text("scopes")?;
    let scopes: Vec<&str> = scopes_text.split_whitespace().collect();
    let cidrs = text("allowed_cidrs")?
        .split_whitespace()
        .map(|c| {
            let net: ipnet::IpNet = c.parse().map_err(|_| format!("bad cidr {c:?}"))?;
            // Entries stored before mapped networks were normalised start
            // matching; one that cannot be (a short mapped prefix) keeps
            // what it matched before.
            Ok::<_, String>(crate::domain::cidr::normalize(net).unwrap_or(net))
        })
        .collect::<Result<_, _>>()?;
    let rate: i64 = row.try_get("rate_limit_per_minute").map_err(get_err)?;
    Ok(KeyRecord {
        id: Uuid::parse_str(id).map_err(|e| e.to_string())?,
        name: text("name")?,
        organization_id: row.try_get("organization_id").map_err(get_err)?,
        tier: Tier::parse(&text("tier")?).ok_or("unknown tier")?,
        mode: Mode::parse(&text("mode")?).ok_or("unknown mode")?,
        prefix: text("prefix")?,
        secret_digest: digest(row.try_get("secret_digest").map_err(get_err)?)?,
        previous_secret,
        scopes: ScopeSet::parse(&scopes).map_err(|e| e.to_string())?,
        allowed_cidrs: cidrs,
        rate_limit_per_minute: u32::try_from(rate).map_err(|e| e.to_string())?,
        state,
        created_at: time(row.try_get("created_at").map_err(get_err)?)?,
        last_used_at: opt_time(opt_i64("last_used_at")?)?,
        expires_at: opt_time(opt_i64("expires_at")?)?,
        rotated_at: opt_time(opt_i64("rotated_at")?)?,
        created_by: text("created_by")?,
        version: row.try_get("version").map_err(get_err)?,
    })
}

/// Binds a key's columns, in `KEY_COLUMNS` order, to `$1…`.
pub fn bind_key<'q>(query: AnyQuery<'q>, key: &KeyRecord) -> AnyQuery<'q> {
    let (status, revoked_at, revoked_reason) = match &key.state {
        KeyState::Revoked { at, reason } => ("revoked", Some(micros(*at)), Some(reason.as_str())),
        other => (other.as_str(), None, None),
    };
    query
        .bind(key.id.to_string())
        .bind(key.name.as_str())
        .bind(key.organization_id.as_deref())
        .bind(key.tier.as_str())
        .bind(key.mode.as_str())
        .bind(key.prefix.as_str())
        .bind(key.secret_digest.0.to_vec())
        .bind(key.previous_secret.as_ref().map(|p| p.digest.0.to_vec()))
        .bind(key.previous_secret.as_ref().map(|p| micros(p.expires_at)))
        .bind(join(key.scopes.iter().map(|s| s.as_str())))
        .bind(join(&key.allowed_cidrs))
        .bind(i64::from(key.rate_limit_per_minute))
        .bind(status)
        .bind(micros(key.created_at))
        .bind(key.last_used_at.map(micros))
        .bind(key.expires_at.map(micros))
        .bind(revoked_at)
        .bind(revoked_reason)
        .bind(key.rotated_at.map(micros))
        .bind(key.created_by.as_str())
        .bind(key.version)
        .bind(i64::from(
            key.previous_secret.as_ref().is_some_and(|p| p.announced),
        ))
        .bind(
            key.previous_secret
                .as_ref()
                .and_then(|p| p.last_used_at)
                .map(micros),
        )
        .bind(
            key.previous_secret
                .as_ref()
                .map_or(0, |p| i64::try_from(p.uses).unwrap_or(i64::MAX)),
        )
}

pub const EVENT_COLUMNS: &str =
    "seq, kind, key_id, organization_id, actor, at, reason, hash, details";

/// Binds an event's columns, in `EVENT_COLUMNS` order, to `$1..$9`.
pub fn bind_event<'q>(query: AnyQuery<'q>, event: &Event) -> AnyQuery<'q> {
    query
        .bind(event.sequence)
        .bind(event.kind.as_str())
        .bind(event.key_id.to_string())
        .bind(event.organization_id.as_deref())
        .bind(event.actor.as_str())
        .bind(micros(event.at))
        .bind(event.reason.as_str())
        .bind(event.hash.map(|h| h.to_vec()))
        .bind(event.details.as_str())
}

pub fn event_from_row(row: &AnyRow) -> Result<Event, StoreError> {
    let sequence: i64 = row.try_get("seq")?;
    let corrupt = |why: String| StoreError::Corrupt {
        id: format!("event {sequence}"),
        why,
    };
    let kind: String = row.try_get("kind")?;
    let key_id: String = row.try_get("key_id")?;
    Ok(Event {
        sequence,
        kind: EventKind::parse(&kind).ok_or_else(|| corrupt(format!("unknown kind {kind:?}")))?,
        key_id: Uuid::parse_str(&key_id).map_err(|e| corrupt(e.to_string()))?,
        organization_id: row.try_get("organization_id")?,
        actor: row.try_get("actor")?,
        at: time(row.try_get("at")?).map_err(corrupt)?,
        reason: row.try_get("reason")?,
        details: row.try_get("details")?,
        hash: match row.try_get::<Option<Vec<u8>>, _>("hash")? {
            Some(bytes) => Some(
                bytes
                    .try_into()
                    .map_err(|_| corrupt("hash is not 32 bytes".into()))?,
            ),
            None => None,
        },
    })
}

pub fn replica_from_row(row: &AnyRow) -> Result<ReplicaStatus, StoreError> {
    let id: String = row.try_get("replica_id")?;
    let corrupt = |why: String| StoreError::Corrupt {
        id: format!("replica {id}"),
        why,
    };
    Ok(ReplicaStatus {
        replica_id: Uuid::parse_str(&id).map_err(|e| corrupt(e.to_string()))?,
        name: row.try_get("name")?,
        applied_sequence: row.try_get("applied_sequence")?,
        heartbeat_at: time(row.try_get("heartbeat_at")?).map_err(corrupt)?,
    })
}
