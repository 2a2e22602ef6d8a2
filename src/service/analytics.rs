//! Usage analytics: Authorize outcomes counted per key and minute in
//! memory, added to the store's buckets by the usage flush, read back by
//! GetKeyUsage, and swept when older than their retention.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use keygate_core::analytics::{
    self, Granularity, OUTCOMES, Outcome, UsageBucket, UsageCount, UsageRange, UsageRetention,
    outcome_at, outcome_index,
};
use keygate_core::key::KeyRecord;
use uuid::Uuid;

use super::caller::Caller;
use super::keys::KeyService;
use crate::error::Error;
use crate::store::UsageQuery;

/// Most (key, minute) slots held between two flushes; calls of a new slot
/// beyond it are not counted (and a warning says so), so a store that stays
/// down cannot make the counts grow without bound.
const MAX_SLOTS: usize = 200_000;

/// Most rows one GetKeyUsage reads: a key's 2880 buckets with every outcome
/// fit many times over; an organization with more must ask key by key.
const MAX_ROWS: u32 = 50_000;

/// Rows one sweep statement deletes, and statements per granularity per round.
const SWEEP_BATCH: u32 = 1000;
const SWEEP_BATCHES_PER_ROUND: usize = 100;

/// One key's calls in one minute, by outcome. Four-byte counts: one
/// replica cannot answer 2^32 calls of one key in a minute (71 million a
/// second); counts added in bulk (restored after a failed flush) saturate.
#[derive(Debug)]
struct Slot {
    /// The key record's own (the cache shares one per organization).
    organization_id: Option<Arc<str>>,
    calls: [AtomicU32; OUTCOMES],
}

impl Slot {
    fn add(&self, i: usize, n: u64) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let _ = self.calls[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
            Some(c.saturating_add(n))
        });
    }
}

/// Outcomes not yet added to the store, per (key, minute since the epoch).
/// Counting a call is a read lock on one shard of the map and an atomic
/// increment; only a key's first call in a minute inserts.
#[derive(Debug, Default)]
pub struct UsageCounts {
    /// Off (`--usage-analytics off`): nothing is counted.
    off: bool,
    pending: DashMap<(Uuid, i64), Slot>,
    slots: AtomicUsize,
    dropped: AtomicU64,
}

impl UsageCounts {
    /// Counts when `on`; otherwise every call of [`count`](Self::count) is
    /// a no-op (what scenario 10 of the benchmarks compares against).
    pub fn new(on: bool) -> Self {
        Self {
            off: !on,
            ..Self::default()
        }
    }

    /// Counts one call of `key` with this outcome at `now`. No I/O, no lock
    /// held across an await.
    pub fn count(&self, key: &KeyRecord, outcome: Outcome, now: DateTime<Utc>) {
        if self.off {
            return;
        }
        let slot = (key.id, now.timestamp().div_euclid(60));
        let i = outcome_index(outcome);
        if let Some(s) = self.pending.get(&slot) {
            // No saturation check on the hot path: see `Slot`.
            s.calls[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.add(slot, key.organization_id.as_ref(), i, 1);
    }

    fn add(&self, slot: (Uuid, i64), organization_id: Option<&Arc<str>>, i: usize, n: u64) {
        if self.slots.load(Ordering::Relaxed) >= MAX_SLOTS && !self.pending.contains_key(&slot) {
            if self.dropped.fetch_add(n, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    slots = MAX_SLOTS,
                    "usage analytics: too many keys' counts waiting for the store; not counting new ones until a flush succeeds"
                );
            }
            return;
        }
        self.pending
            .entry(slot)
            .or_insert_with(|| {
                self.slots.fetch_add(1, Ordering::Relaxed);
                Slot {
                    organization_id: organization_id.cloned(),
                    calls: Default::default(),
                }
            })
            .add(i, n);
    }

    /// Takes every per-minute count so far, to write.
    pub fn drain(&self) -> Vec<UsageCount> {
        let slots: Vec<(Uuid, i64)> = self.pending.iter().map(|e| *e.key()).collect();
        let mut out = Vec::new();
        for slot in slots {
            let Some(((key_id, minute), s)) = self.pending.remove(&slot) else {
                continue;
            };
            self.slots.fetch_sub(1, Ordering::Relaxed);
            let Some(start) = DateTime::from_timestamp(minute * 60, 0) else {
                continue;
            };
            for (i, calls) in s.calls.into_iter().enumerate() {
                let count = u64::from(calls.into_inner());
                if let (true, Some(outcome)) = (count > 0, outcome_at(i)) {
                    out.push(UsageCount {
                        key_id,
                        organization_id: s.organization_id.as_deref().map(str::to_owned),
                        granularity: Granularity::Minute,
                        start,
                        outcome,
                        count,
                    });
                }
            }
        }
        self.dropped.store(0, Ordering::Relaxed);
        out
    }

    /// Puts per-minute counts back after a failed write, so nothing is lost.
    pub fn restore(&self, counts: Vec<UsageCount>) {
        for c in counts {
            let minute = c.start.timestamp().div_euclid(60);
            let organization_id = c.organization_id.map(Arc::<str>::from);
            self.add(
                (c.key_id, minute),
                organization_id.as_ref(),
                outcome_index(c.outcome),
                c.count,
            );
        }
    }

    /// Whether nothing is waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// What GetKeyUsage asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageTarget {
    /// One key.
    Key(Uuid),
    /// Every key of an organization (each key's buckets apart).
    Organization(String),
}

/// A validated GetKeyUsage request.
#[derive(Debug, Clone)]
pub struct UsageSpec {
    /// Whose calls.
    pub target: UsageTarget,
    /// Which buckets.
    pub range: UsageRange,
}

impl KeyService {
    /// The stored buckets with calls in `spec`'s range, in (key, start)
    /// order. Needs `api_key:read`; a key or organization the caller may
    /// not see is NOT_FOUND. Counts reach the store with each replica's
    /// usage flush.
    pub async fn usage(&self, caller: &Caller, spec: UsageSpec) -> Result<Vec<UsageBucket>, Error> {
        caller.require(&self.scopes.read)?;
        let (key_id, organization_id, field) = match spec.target {
            UsageTarget::Key(id) => {
                self.load_visible(caller, id).await?;
                (Some(id), None, "key_id")
            }
            UsageTarget::Organization(org) => (
                None,
                caller.organization_filter(Some(org))?,
                "organization_id",
            ),
        };
        let rows = self
            .store
            .usage_rows(&UsageQuery {
                granularity: spec.range.granularity,
                start: spec.range.start,
                end: spec.range.end,
                key_id,
                organization_id,
                limit: MAX_ROWS + 1,
            })
            .await?;
        if rows.len() > MAX_ROWS as usize {
            return Err(Error::invalid(
                field,
                format!(
                    "has more than {MAX_ROWS} usage rows in this range: narrow start..end, use HOUR, or ask for one key_id"
                ),
            ));
        }
        Ok(analytics::buckets(rows))
    }

    /// Writes the per-minute counts taken since the last flush, and the
    /// per-hour counts they add up to, in one transaction; on failure keeps
    /// them for the next flush. Returns how many rows were added to.
    pub(super) async fn flush_usage_counts(&self) -> Result<usize, Error> {
        let minutes = self.usage.counts.drain();
        if minutes.is_empty() {
            return Ok(0);
        }
        // The minutes move into the write (no second copy of them): a
        // failed one puts them back from there.
        let mut all = analytics::hourly(&minutes);
        all.extend(minutes);
        if let Err(e) = self.store.add_usage_counts(&all).await {
            self.usage.counts.restore(
                all.into_iter()
                    .filter(|c| c.granularity == Granularity::Minute)
                    .collect(),
            );
            return Err(e.into());
        }
        Ok(all.len())
    }

    /// Deletes buckets older than their retention, in bounded batches (at
    /// most [`SWEEP_BATCHES_PER_ROUND`] per granularity; the next round
    /// goes on). Returns how many rows went.
    pub async fn sweep_usage(&self, retention: UsageRetention) -> Result<u64, Error> {
        let now = self.clock.now();
        let mut swept = 0;
        for granularity in Granularity::ALL {
            let keep = chrono::Duration::from_std(retention.of(granularity))
                .unwrap_or(chrono::Duration::MAX);
            let Some(before) = now.checked_sub_signed(keep) else {
                continue;
            };
            for _ in 0..SWEEP_BATCHES_PER_ROUND {
                let n = self
                    .store
                    .sweep_usage(granularity, before, SWEEP_BATCH)
                    .await?;
                swept += n;
                if n < u64::from(SWEEP_BATCH) {
                    break;
                }
            }
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(n: u64) -> UsageCount {
        UsageCount {
            key_id: Uuid::from_u128(7),
            organization_id: Some("org_a".into()),
            granularity: Granularity::Minute,
            start: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            outcome: None,
            count: n,
        }
    }

    #[test]
    fn restored_counts_add_up_and_saturate_at_four_bytes() {
        let counts = UsageCounts::new(true);
        counts.restore(vec![count(5), count(7)]);
        let drained = counts.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].count, 12);
        assert_eq!(drained[0].organization_id.as_deref(), Some("org_a"));
        assert!(counts.is_empty());
        // Beyond what one minute of one key can hold: kept at the most, not wrapped.
        counts.restore(vec![count(u64::from(u32::MAX) - 1), count(10)]);
        assert_eq!(counts.drain()[0].count, u64::from(u32::MAX));
        counts.restore(vec![count(u64::MAX)]);
        assert_eq!(counts.drain()[0].count, u64::from(u32::MAX));
    }
}
