//! Rows ↔ key records. Times are unix microseconds; lists are space-separated.

use std::borrow::Cow;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

/// A query on the `Any` driver.
pub type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

use keygate_core::event::{Event, EventKind};
use keygate_core::key::{KeyRecord, KeyState, Mode, PreviousSecret, Tier};
use keygate_core::scope::ScopeSet;
use keygate_core::token::SecretDigest;

use super::{ReplicaStatus, StoreError};

/// A value bound to one statement parameter.
pub enum Value<'a> {
    Text(Option<Cow<'a, str>>),
    Int(Option<i64>),
    Bytes(Option<&'a [u8]>),
}

impl<'a> Value<'a> {
    fn text(s: impl Into<Cow<'a, str>>) -> Self {
        Value::Text(Some(s.into()))
    }

    fn bind<'q>(self, query: AnyQuery<'q>) -> AnyQuery<'q> {
        match self {
            Value::Text(v) => query.bind(v.as_deref()),
            Value::Int(v) => query.bind(v),
            Value::Bytes(v) => query.bind(v),
        }
    }
}

/// How `update_key` writes a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUpdate {
    /// The row's identity: matched, never written.
    Identity,
    /// Takes the record's value.
    Set,
    /// Takes the record's value only if it is later: usage flushes write it
    /// too, and a stale record must not move it backwards.
    Forward,
    /// Kept unless this change is a rotation (a new `rotated_at`), which
    /// starts it over: usage flushes add to it, and a stale record must not
    /// undo them.
    KeptUnlessRotated,
}

/// One column of `api_keys`: its name, how an update writes it, and the
/// record's value for it.
pub struct KeyColumn {
    pub name: &'static str,
    pub on_update: OnUpdate,
    pub value: for<'a> fn(&'a KeyRecord) -> Value<'a>,
}

const fn column(
    name: &'static str,
    on_update: OnUpdate,
    value: for<'a> fn(&'a KeyRecord) -> Value<'a>,
) -> KeyColumn {
    KeyColumn {
        name,
        on_update,
        value,
    }
}

fn revoked(key: &KeyRecord) -> Option<(&DateTime<Utc>, &str)> {
    match &key.state {
        KeyState::Revoked { at, reason } => Some((at, reason.as_str())),
        _ => None,
    }
}

/// Every column of `api_keys`, in the order of the statements' parameters
/// (`$1` is the first): the one definition the column list, the INSERT, the
/// UPDATE and the binds are all built from.
pub const KEY_COLUMNS: [KeyColumn; 25] = {
    use OnUpdate::*;
    [
        column("id", Identity, |k| Value::text(k.id.to_string())),
        column("name", Set, |k| Value::text(k.name.as_str())),
        column("organization_id", Set, |k| {
            Value::Text(k.organization_id.as_deref().map(Cow::Borrowed))
        }),
        column("tier", Set, |k| Value::text(k.tier.as_str())),
        column("mode", Set, |k| Value::text(k.mode.as_str())),
        column("prefix", Set, |k| Value::text(k.prefix.as_str())),
        column("secret_digest", Set, |k| {
            Value::Bytes(Some(k.secret_digest.0.as_slice()))
        }),
        column("previous_secret_digest", Set, |k| {
            Value::Bytes(k.previous_secret.as_ref().map(|p| p.digest.0.as_slice()))
        }),
        column("previous_secret_expires_at", Set, |k| {
            Value::Int(k.previous_secret.as_ref().map(|p| micros(p.expires_at)))
        }),
        column("scopes", Set, |k| {
            Value::text(join(k.scopes.iter().map(|s| s.as_str())))
        }),
        column("allowed_cidrs", Set, |k| {
            Value::text(join(&k.allowed_cidrs))
        }),
        column("rate_limit_per_minute", Set, |k| {
            Value::Int(Some(i64::from(k.rate_limit_per_minute)))
        }),
        column("status", Set, |k| Value::text(k.state.as_str())),
        column("created_at", Set, |k| {
            Value::Int(Some(micros(k.created_at)))
        }),
        column("last_used_at", Forward, |k| {
            Value::Int(k.last_used_at.map(micros))
        }),
        column("expires_at", Set, |k| Value::Int(k.expires_at.map(micros))),
        column("revoked_at", Set, |k| {
            Value::Int(revoked(k).map(|(at, _)| micros(*at)))
        }),
        column("revoked_reason", Set, |k| {
            Value::Text(revoked(k).map(|(_, reason)| Cow::Borrowed(reason)))
        }),
        column("rotated_at", Set, |k| Value::Int(k.rotated_at.map(micros))),
        column("created_by", Set, |k| Value::text(k.created_by.as_str())),
        column("version", Set, |k| Value::Int(Some(k.version))),
        column("previous_secret_announced", Set, |k| {
            Value::Int(Some(i64::from(
                k.previous_secret.as_ref().is_some_and(|p| p.announced),
            )))
        }),
        column("previous_secret_last_used_at", KeptUnlessRotated, |k| {
            Value::Int(
                k.previous_secret
                    .as_ref()
                    .and_then(|p| p.last_used_at)
                    .map(micros),
            )
        }),
        column("previous_secret_uses", KeptUnlessRotated, |k| {
            Value::Int(Some(
                k.previous_secret
                    .as_ref()
                    .map_or(0, |p| i64::try_from(p.uses).unwrap_or(i64::MAX)),
            ))
        }),
        column("unlimited", Set, |k| {
            Value::Int(Some(i64::from(k.unlimited)))
        }),
    ]
};

/// The index in [`KEY_COLUMNS`] of the column called `name`; a name that is
/// not there fails the build.
const fn key_column(name: &str) -> usize {
    let mut i = 0;
    while i < KEY_COLUMNS.len() {
        let candidate = KEY_COLUMNS[i].name.as_bytes();
        let wanted = name.as_bytes();
        if candidate.len() == wanted.len() {
            let mut j = 0;
            while j < wanted.len() && candidate[j] == wanted[j] {
                j += 1;
            }
            if j == wanted.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("no such key column")
}

/// `$n` of each column that statements refer to by name.
const ID_PARAM: usize = key_column("id") + 1;
const ROTATED_AT_PARAM: usize = key_column("rotated_at") + 1;
/// `$n` of the expected version in the UPDATE, after every column.
const EXPECTED_VERSION_PARAM: usize = KEY_COLUMNS.len() + 1;

/// `id, name, …`: every key column, for SELECTs.
pub static KEY_COLUMN_LIST: LazyLock<String> = LazyLock::new(|| {
    KEY_COLUMNS
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
});

/// Inserts a key; binds: [`bind_key`].
pub static INSERT_KEY: LazyLock<String> = LazyLock::new(|| {
    let placeholders = (1..=KEY_COLUMNS.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO api_keys ({}) VALUES ({placeholders})",
        *KEY_COLUMN_LIST
    )
});

/// Writes a key if its stored version is the expected one; binds:
/// [`bind_key`] with the new record, then the expected version.
pub static UPDATE_KEY: LazyLock<String> = LazyLock::new(|| {
    let assignments = KEY_COLUMNS
        .iter()
        .enumerate()
        .filter_map(|(i, c)| assignment(c, i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "UPDATE api_keys SET {assignments} WHERE id = ${ID_PARAM} AND version = ${EXPECTED_VERSION_PARAM}"
    )
});

/// How the UPDATE writes `column` from parameter `$p`; `None` for the identity.
fn assignment(column: &KeyColumn, p: usize) -> Option<String> {
    let name = column.name;
    Some(match column.on_update {
        OnUpdate::Identity => return None,
        OnUpdate::Set => format!("{name} = ${p}"),
        OnUpdate::Forward => {
            format!("{name} = CASE WHEN {name} IS NULL OR {name} < ${p} THEN ${p} ELSE {name} END")
        }
        OnUpdate::KeptUnlessRotated => {
            format!("{name} = CASE WHEN rotated_at = ${ROTATED_AT_PARAM} THEN {name} ELSE ${p} END")
        }
    })
}

pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub fn time(us: i64) -> Result<DateTime<Utc>, String> {
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
    let id: String = row.try_get("id").map_err(|e| StoreError::Corrupt {
        id: "(unreadable id)".into(),
        why: e.to_string(),
    })?;
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
        Some(d) => Some(Box::new(PreviousSecret {
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
        })),
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
            Ok::<_, String>(keygate_core::cidr::normalize(net).unwrap_or(net))
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
        unlimited: match row.try_get::<i64, _>("unlimited").map_err(get_err)? {
            0 => false,
            1 => true,
            other => return Err(format!("unlimited is {other}, not 0 or 1")),
        },
        state,
        created_at: time(row.try_get("created_at").map_err(get_err)?)?,
        last_used_at: opt_time(opt_i64("last_used_at")?)?,
        expires_at: opt_time(opt_i64("expires_at")?)?,
        rotated_at: opt_time(opt_i64("rotated_at")?)?,
        created_by: text("created_by")?,
        version: row.try_get("version").map_err(get_err)?,
    })
}

/// Binds every key column, in [`KEY_COLUMNS`] order, to `$1…`.
pub fn bind_key<'q>(query: AnyQuery<'q>, key: &KeyRecord) -> AnyQuery<'q> {
    KEY_COLUMNS
        .iter()
        .fold(query, |query, column| (column.value)(key).bind(query))
}

/// One column of `key_events`: its name and the event's value for it.
pub struct EventColumn {
    pub name: &'static str,
    pub value: for<'a> fn(&'a Event) -> Value<'a>,
}

/// Every column of `key_events`, in the order of the INSERT's parameters:
/// the one definition the column list, the INSERT and the binds come from.
pub const EVENT_COLUMNS: [EventColumn; 9] = {
    const fn column(name: &'static str, value: for<'a> fn(&'a Event) -> Value<'a>) -> EventColumn {
        EventColumn { name, value }
    }
    [
        column("seq", |e| Value::Int(Some(e.sequence))),
        column("kind", |e| Value::text(e.kind.as_str())),
        column("key_id", |e| Value::text(e.key_id.to_string())),
        column("organization_id", |e| {
            Value::Text(e.organization_id.as_deref().map(Cow::Borrowed))
        }),
        column("actor", |e| Value::text(e.actor.as_str())),
        column("at", |e| Value::Int(Some(micros(e.at)))),
        column("reason", |e| Value::text(e.reason.as_str())),
        column("hash", |e| {
            Value::Bytes(e.hash.as_ref().map(|h| h.as_slice()))
        }),
        column("details", |e| Value::text(e.details.as_str())),
    ]
};

/// `seq, kind, …`: every event column, for SELECTs.
pub static EVENT_COLUMN_LIST: LazyLock<String> = LazyLock::new(|| {
    EVENT_COLUMNS
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
});

/// Appends an event; binds: [`bind_event`].
pub static INSERT_EVENT: LazyLock<String> = LazyLock::new(|| {
    let placeholders = (1..=EVENT_COLUMNS.len())
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO key_events ({}) VALUES ({placeholders})",
        *EVENT_COLUMN_LIST
    )
});

/// Binds every event column, in [`EVENT_COLUMNS`] order, to `$1…`.
pub fn bind_event<'q>(query: AnyQuery<'q>, event: &Event) -> AnyQuery<'q> {
    EVENT_COLUMNS
        .iter()
        .fold(query, |query, column| (column.value)(event).bind(query))
}

pub fn event_from_row(row: &AnyRow) -> Result<Event, StoreError> {
    let sequence: i64 = row.try_get("seq")?;
    let corrupt = |why: String| StoreError::Corrupt {
        id: format!("event {sequence}"),
        why,
    };
    // The row is already read: a column that will not decode is damage.
    let get = |e: sqlx::Error| corrupt(e.to_string());
    let kind: String = row.try_get("kind").map_err(get)?;
    let key_id: String = row.try_get("key_id").map_err(get)?;
    Ok(Event {
        sequence,
        kind: EventKind::parse(&kind).ok_or_else(|| corrupt(format!("unknown kind {kind:?}")))?,
        key_id: Uuid::parse_str(&key_id).map_err(|e| corrupt(e.to_string()))?,
        organization_id: row.try_get("organization_id").map_err(get)?,
        actor: row.try_get("actor").map_err(get)?,
        at: time(row.try_get("at").map_err(get)?).map_err(corrupt)?,
        reason: row.try_get("reason").map_err(get)?,
        details: row.try_get("details").map_err(get)?,
        hash: match row.try_get::<Option<Vec<u8>>, _>("hash").map_err(get)? {
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
    let get = |e: sqlx::Error| corrupt(e.to_string());
    Ok(ReplicaStatus {
        replica_id: Uuid::parse_str(&id).map_err(|e| corrupt(e.to_string()))?,
        name: row.try_get("name").map_err(get)?,
        applied_sequence: row.try_get("applied_sequence").map_err(get)?,
        heartbeat_at: time(row.try_get("heartbeat_at").map_err(get)?).map_err(corrupt)?,
    })
}

#[cfg(test)]
mod tests {
    use sqlx::{Arguments, Execute};

    use super::*;

    /// How many parameters `query` has bound.
    fn bound(mut query: AnyQuery<'_>) -> usize {
        query
            .take_arguments()
            .expect("arguments encode")
            .map_or(0, |a| a.len())
    }

    /// The highest `$n` in `sql`.
    fn highest_placeholder(sql: &str) -> usize {
        sql.split('$')
            .skip(1)
            .filter_map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .max()
            .unwrap_or(0)
    }

    fn sample_key() -> KeyRecord {
        let at = DateTime::from_timestamp(1_700_000_000, 0).expect("valid time");
        KeyRecord {
            id: Uuid::new_v4(),
            name: "ci".into(),
            organization_id: Some("acme".into()),
            tier: Tier::Organization,
            mode: Mode::Live,
            prefix: "kg_live_abc".into(),
            secret_digest: SecretDigest([7; 32]),
            previous_secret: None,
            scopes: ScopeSet::parse(&["checkout:create"]).expect("valid scopes"),
            allowed_cidrs: vec![],
            rate_limit_per_minute: 0,
            unlimited: false,
            state: KeyState::Active,
            created_at: at,
            last_used_at: None,
            expires_at: None,
            rotated_at: None,
            created_by: "bootstrap".into(),
            version: 1,
        }
    }

    #[test]
    fn insert_binds_every_placeholder() {
        let binds = bound(bind_key(sqlx::query(INSERT_KEY.as_str()), &sample_key()));
        assert_eq!(binds, KEY_COLUMNS.len());
        assert_eq!(highest_placeholder(&INSERT_KEY), binds);
        assert!(INSERT_KEY.starts_with(
            "INSERT INTO api_keys (id, name, organization_id, tier, mode, prefix, secret_digest, "
        ));
        assert!(INSERT_KEY.ends_with(
            "previous_secret_last_used_at, previous_secret_uses, unlimited) VALUES ($1, $2, $3, $4, \
             $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, \
             $23, $24, $25)"
        ));
    }

    #[test]
    fn update_is_written_out_and_binds_every_placeholder() {
        assert_eq!(
            UPDATE_KEY.as_str(),
            "UPDATE api_keys SET name = $2, organization_id = $3, tier = $4, mode = $5, \
             prefix = $6, secret_digest = $7, previous_secret_digest = $8, \
             previous_secret_expires_at = $9, scopes = $10, allowed_cidrs = $11, \
             rate_limit_per_minute = $12, status = $13, created_at = $14, \
             last_used_at = CASE WHEN last_used_at IS NULL OR last_used_at < $15 THEN $15 ELSE last_used_at END, \
             expires_at = $16, revoked_at = $17, revoked_reason = $18, rotated_at = $19, \
             created_by = $20, version = $21, previous_secret_announced = $22, \
             previous_secret_last_used_at = CASE WHEN rotated_at = $19 THEN previous_secret_last_used_at ELSE $23 END, \
             previous_secret_uses = CASE WHEN rotated_at = $19 THEN previous_secret_uses ELSE $24 END, \
             unlimited = $25 \
             WHERE id = $1 AND version = $26"
        );
        // update_key binds the new record, then the expected version.
        let binds = bound(bind_key(sqlx::query(UPDATE_KEY.as_str()), &sample_key()).bind(1i64));
        assert_eq!(highest_placeholder(&UPDATE_KEY), binds);
    }

    #[test]
    fn insert_event_binds_every_placeholder() {
        let event = Event {
            sequence: 1,
            kind: EventKind::Created,
            key_id: Uuid::new_v4(),
            organization_id: None,
            actor: "bootstrap".into(),
            at: DateTime::from_timestamp(1_700_000_000, 0).expect("valid time"),
            reason: String::new(),
            details: String::new(),
            hash: Some([0; 32]),
        };
        assert_eq!(
            INSERT_EVENT.as_str(),
            "INSERT INTO key_events (seq, kind, key_id, organization_id, actor, at, reason, hash, \
             details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        );
        let binds = bound(bind_event(sqlx::query(INSERT_EVENT.as_str()), &event));
        assert_eq!(highest_placeholder(&INSERT_EVENT), binds);
    }

    #[test]
    fn column_names_are_unique() {
        let mut names: Vec<&str> = KEY_COLUMNS.iter().map(|c| c.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KEY_COLUMNS.len());
        assert_eq!(KEY_COLUMNS[ID_PARAM - 1].on_update, OnUpdate::Identity);
    }
}
