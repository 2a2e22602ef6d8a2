//! Key records in memory in front of the store, so a warm Authorize does no I/O.
//!
//! Known keys stay for the TTL; unknown ids are remembered briefly (negative
//! cache) so a flood of made-up tokens does not become a flood of queries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use uuid::Uuid;

use crate::domain::key::KeyRecord;
use crate::store::{KeyReader, StoreError};
use crate::telemetry::CacheMetrics;

/// Sizes and lifetimes of the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub capacity: u64,
    pub ttl: Duration,
    pub negative_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            capacity: 100_000,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
        }
    }
}

/// Whether this replica is in touch with the event log. A replica out of
/// touch for longer than `max_staleness` cannot know what was revoked
/// meanwhile, so it stops answering from memory.
#[derive(Debug)]
pub struct Freshness {
    start: Instant,
    last_contact_ms: AtomicU64,
    max_staleness: Duration,
}

impl Freshness {
    /// Starts fresh: a replica has just read the log when it starts.
    pub fn new(max_staleness: Duration) -> Self {
        Self {
            start: Instant::now(),
            last_contact_ms: AtomicU64::new(0),
            max_staleness,
        }
    }

    /// Records a successful read of the event log.
    pub fn touch(&self) {
        self.last_contact_ms
            .store(self.elapsed_ms(), Ordering::Release);
    }

    pub fn is_fresh(&self) -> bool {
        let since = self
            .elapsed_ms()
            .saturating_sub(self.last_contact_ms.load(Ordering::Acquire));
        u128::from(since) <= self.max_staleness.as_millis()
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

pub struct KeyCache {
    metrics: CacheMetrics,
    store: Arc<dyn KeyReader>,
    freshness: Arc<Freshness>,
    known: Cache<Uuid, Arc<KeyRecord>>,
    unknown: Cache<Uuid, ()>,
    /// Bumped by every invalidation. A load that started before an
    /// invalidation must not put what it read back into the cache.
    epoch: AtomicU64,
}

impl KeyCache {
    pub fn new(
        store: Arc<dyn KeyReader>,
        settings: CacheSettings,
        freshness: Arc<Freshness>,
    ) -> Self {
        Self {
            metrics: CacheMetrics::default(),
            store,
            freshness,
            known: Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(settings.ttl)
                .build(),
            unknown: Cache::builder()
                .max_capacity(settings.capacity)
                .time_to_live(settings.negative_ttl)
                .build(),
            epoch: AtomicU64::new(0),
        }
    }

    /// The key with this id: from memory when cached, else from the store.
    /// While out of touch with the event log, always from the store, so an
    /// unreachable store fails closed instead of serving a revoked key.
    pub async fn get(&self, id: Uuid) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        if !self.freshness.is_fresh() {
            return Ok(self.store.get_key(id).await?.map(Arc::new));
        }
        if let Some(key) = self.known.get(&id) {
            self.metrics.hits.increment(1);
            return Ok(Some(key));
        }
        if self.unknown.contains_key(&id) {
            self.metrics.hits.increment(1);
            return Ok(None);
        }
        self.metrics.misses.increment(1);
        let epoch = self.epoch.load(Ordering::SeqCst);
        let loaded = self.store.get_key(id).await?.map(Arc::new);
        // An invalidation during the read may mean the row we read is stale:
        // serve it to this one caller, but do not keep it.
        if self.epoch.load(Ordering::SeqCst) == epoch {
            match &loaded {
                Some(key) => self.known.insert(id, Arc::clone(key)),
                None => self.unknown.insert(id, ()),
            }
            // An invalidation that bumped the epoch after the check above may
            // have run its removal before our insert: undo the insert. One
            // that bumps it after this second check removes the entry itself.
            if self.epoch.load(Ordering::SeqCst) != epoch {
                self.known.invalidate(&id);
                self.unknown.invalidate(&id);
            }
        }
        Ok(loaded)
    }

    /// Publishes how many records are in memory.
    pub fn report_size(&self) {
        self.metrics
            .entries
            .set((self.known.entry_count() + self.unknown.entry_count()) as f64);
    }

    /// Forgets everything, as after a RESET.
    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    /// Forgets what is known about `id`, at once.
    pub fn invalidate(&self, id: Uuid) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.known.invalidate(&id);
        self.unknown.invalidate(&id);
    }
}
