//! When keys were last used, kept in memory and written in batches, so a
//! successful authentication costs no store write.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use keygate_core::decision::SecretUsed;
use keygate_core::key::KeyRecord;
use keygate_core::usage::{PreviousUsage, UsageRecord};
use uuid::Uuid;

/// Usage since the last flush, per key. Times are unix microseconds; 0 = none.
#[derive(Debug, Default)]
struct Pending {
    last_used_us: AtomicI64,
    previous_uses: AtomicU64,
    previous_last_used_us: AtomicI64,
    /// Which rotation the previous-secret counts belong to.
    rotated_at_us: AtomicI64,
}

/// Uses not yet written to the store, per key: recorded on the Authorize
/// path, drained by the periodic flush, restored when a flush fails.
#[derive(Debug, Default)]
pub struct UsageTracker {
    pending: DashMap<Uuid, Pending>,
    /// Calls per key, minute and outcome, for usage analytics.
    pub counts: super::analytics::UsageCounts,
}

fn time(us: i64) -> Option<DateTime<Utc>> {
    (us != 0)
        .then(|| DateTime::from_timestamp_micros(us))
        .flatten()
}

impl UsageTracker {
    /// Tracks last uses, and counts outcomes for analytics when `analytics`.
    pub fn new(analytics: bool) -> Self {
        Self {
            pending: DashMap::new(),
            counts: super::analytics::UsageCounts::new(analytics),
        }
    }

    /// Records a successful authentication. No I/O: a map entry and atomics.
    pub fn record(&self, key: &KeyRecord, used: SecretUsed, now: DateTime<Utc>) {
        let now_us = now.timestamp_micros();
        // A shard's read lock when the key already has an entry (the usual
        // case between flushes); its write lock only to make one.
        let entry = match self.pending.get(&key.id) {
            Some(entry) => entry,
            None => self.pending.entry(key.id).or_default().downgrade(),
        };
        entry.last_used_us.fetch_max(now_us, Ordering::Relaxed);
        if used == SecretUsed::Previous
            && let Some(rotated_at) = key.rotated_at
        {
            let rotated_us = rotated_at.timestamp_micros();
            // A newer rotation starts the count over.
            if entry.rotated_at_us.swap(rotated_us, Ordering::Relaxed) != rotated_us {
                entry.previous_uses.store(0, Ordering::Relaxed);
                entry.previous_last_used_us.store(0, Ordering::Relaxed);
            }
            entry.previous_uses.fetch_add(1, Ordering::Relaxed);
            entry
                .previous_last_used_us
                .fetch_max(now_us, Ordering::Relaxed);
        }
    }

    /// Takes everything recorded so far, to write.
    pub fn drain(&self) -> Vec<UsageRecord> {
        let ids: Vec<Uuid> = self.pending.iter().map(|e| *e.key()).collect();
        ids.into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .filter_map(|(key_id, p)| {
                let previous = time(p.rotated_at_us.into_inner()).and_then(|rotated_at| {
                    Some(PreviousUsage {
                        rotated_at,
                        uses: p.previous_uses.into_inner(),
                        last_used_at: time(p.previous_last_used_us.into_inner())?,
                    })
                });
                Some(UsageRecord {
                    key_id,
                    last_used_at: time(p.last_used_us.into_inner())?,
                    previous,
                })
            })
            .collect()
    }

    /// Puts records back after a failed write, so nothing is lost.
    pub fn restore(&self, records: Vec<UsageRecord>) {
        for r in records {
            let entry = self.pending.entry(r.key_id).or_default();
            entry
                .last_used_us
                .fetch_max(r.last_used_at.timestamp_micros(), Ordering::Relaxed);
            if let Some(p) = r.previous {
                let rotated_us = p.rotated_at.timestamp_micros();
                if entry.rotated_at_us.load(Ordering::Relaxed) == 0 {
                    entry.rotated_at_us.store(rotated_us, Ordering::Relaxed);
                }
                if entry.rotated_at_us.load(Ordering::Relaxed) == rotated_us {
                    entry.previous_uses.fetch_add(p.uses, Ordering::Relaxed);
                    entry
                        .previous_last_used_us
                        .fetch_max(p.last_used_at.timestamp_micros(), Ordering::Relaxed);
                }
            }
        }
    }

    /// Shows not-yet-written usage on a record read from the store.
    pub fn overlay(&self, key: &mut KeyRecord) {
        let Some(p) = self.pending.get(&key.id) else {
            return;
        };
        if let Some(t) = time(p.last_used_us.load(Ordering::Relaxed)) {
            key.last_used_at = Some(key.last_used_at.map_or(t, |stored| stored.max(t)));
        }
        let rotated_us = p.rotated_at_us.load(Ordering::Relaxed);
        if let (Some(previous), Some(rotated_at)) = (key.previous_secret.as_mut(), key.rotated_at)
            && rotated_us == rotated_at.timestamp_micros()
        {
            previous.uses += p.previous_uses.load(Ordering::Relaxed);
            if let Some(t) = time(p.previous_last_used_us.load(Ordering::Relaxed)) {
                previous.last_used_at =
                    Some(previous.last_used_at.map_or(t, |stored| stored.max(t)));
            }
        }
    }

    /// Whether nothing is waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.counts.is_empty()
    }
}
