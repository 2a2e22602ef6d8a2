//! What the store holds after a fault, read straight from the database, and
//! the checks that nothing was half applied or lost.

use std::collections::HashMap;

use sqlx::{Connection, Row};

use super::load::{Call, Outcome, Report, Subscriber};

/// One row of `api_keys`, as far as the checks need it.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub name: String,
    pub status: String,
    pub version: i64,
    pub last_used_at: Option<i64>,
}

/// One row of `key_events`.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub seq: i64,
    pub kind: String,
    pub key_id: String,
}

pub struct Ledger {
    pub keys: HashMap<String, KeyRow>,
    /// In sequence order.
    pub events: Vec<EventRow>,
}

impl Ledger {
    pub async fn read(database_url: &str) -> Self {
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(database_url).await.unwrap();
        let keys = sqlx::query("SELECT id, name, status, version, last_used_at FROM api_keys")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| {
                let row = KeyRow {
                    name: r.get(1),
                    status: r.get(2),
                    version: r.get(3),
                    last_used_at: r.get(4),
                };
                (r.get::<String, _>(0), row)
            })
            .collect();
        let events = sqlx::query("SELECT seq, kind, key_id FROM key_events ORDER BY seq")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| EventRow {
                seq: r.get(0),
                kind: r.get(1),
                key_id: r.get(2),
            })
            .collect();
        conn.close().await.unwrap();
        Self { keys, events }
    }

    pub fn head(&self) -> i64 {
        self.events.last().map_or(0, |e| e.seq)
    }

    /// Every change is whole: the log's sequences have no gap; each key row
    /// has exactly as many events as its version (every write bumps it and
    /// appends one event, in one transaction), the first a CREATED, and its
    /// status agrees with its last status event; a key without a row was
    /// deleted.
    pub fn assert_whole(&self) {
        for (i, e) in self.events.iter().enumerate() {
            assert_eq!(e.seq, i as i64 + 1, "a gap in the event log at {e:?}");
        }
        let mut by_key: HashMap<&str, Vec<&EventRow>> = HashMap::new();
        for e in &self.events {
            by_key.entry(e.key_id.as_str()).or_default().push(e);
        }
        for (id, row) in &self.keys {
            let events = by_key.get(id.as_str()).cloned().unwrap_or_default();
            assert_eq!(
                events.len() as i64,
                row.version,
                "key {id} ({row:?}) has version {} but {} events: {events:?}",
                row.version,
                events.len()
            );
            assert_eq!(events[0].kind, "created", "key {id}: {events:?}");
            let status_event = events
                .iter()
                .rev()
                .find(|e| matches!(e.kind.as_str(), "revoked" | "disabled" | "enabled"));
            let expected = match status_event.map(|e| e.kind.as_str()) {
                Some("revoked") => "revoked",
                Some("disabled") => "disabled",
                _ => "active",
            };
            assert_eq!(row.status, expected, "key {id}: {events:?}");
        }
        for (id, events) in &by_key {
            if !self.keys.contains_key(*id) {
                assert_eq!(
                    events.last().map(|e| e.kind.as_str()),
                    Some("deleted"),
                    "key {id} has events but no row: {events:?}"
                );
            }
        }
    }

    /// Every admin call that answered OK is in the store: created keys exist
    /// (by their unique name, which a rename changes), and renames and
    /// revocations have their event. A call that failed either left no trace
    /// or (its commit reached the database before the connection was lost)
    /// is there whole, which `assert_whole` checks. Returns how many failed
    /// calls were applied anyway.
    pub fn assert_nothing_lost(&self, report: &Report) -> usize {
        let mut applied_anyway = 0;
        let kinds_of = |key_id: &str| -> Vec<&str> {
            self.events
                .iter()
                .filter(|e| e.key_id == key_id)
                .map(|e| e.kind.as_str())
                .collect()
        };
        for created in &report.created {
            let row = self
                .keys
                .get(&created.key_id)
                .unwrap_or_else(|| panic!("created key {} is lost", created.name));
            assert!(
                row.name == created.name || row.name.ends_with("-renamed"),
                "{row:?}"
            );
        }
        for s in &report.samples {
            match (s.call, &s.outcome) {
                (Call::Update, Outcome::Done) => {
                    assert!(kinds_of(&s.key).contains(&"updated"), "{s:?} is lost")
                }
                (Call::Revoke, Outcome::Done) => {
                    assert!(kinds_of(&s.key).contains(&"revoked"), "{s:?} is lost");
                    assert_eq!(self.keys[&s.key].status, "revoked");
                }
                (Call::Create, Outcome::Failed(..))
                    if self.keys.values().any(|k| k.name == s.key) =>
                {
                    applied_anyway += 1;
                }
                _ => {}
            }
        }
        applied_anyway
    }

    /// What Watch streams carry after `after`: the log's invalidating events.
    pub fn watched_after(&self, after: i64) -> Vec<i64> {
        self.events
            .iter()
            .filter(|e| e.seq > after)
            .filter(|e| !matches!(e.kind.as_str(), "created" | "enabled"))
            .map(|e| e.seq)
            .collect()
    }

    /// Each subscriber got every invalidating event after `after` exactly
    /// once, in order, and was never told to reset.
    pub fn assert_watched(&self, subscribers: &[Subscriber], after: i64) {
        let expected = self.watched_after(after);
        for (i, s) in subscribers.iter().enumerate() {
            assert_eq!(s.resets, 0, "subscriber {i} was reset: {s:?}");
            assert_eq!(
                s.events, expected,
                "subscriber {i} (reconnected {} times, after {:?}) missed or repeated events",
                s.reconnects, s.resumed_after
            );
        }
    }
}
