//! Key records in memory in front of the store, so a warm Authorize does no I/O.
//!
//! Known keys stay for the TTL; unknown ids are remembered briefly (negative
//! cache). Before either, the key-id index (`crate::index`) refuses ids that
//! are no key without any store read. What does go to the store is bounded:
//! concurrent misses for one id share one read, and at most
//! `CacheSettings::store_reads` reads run at once; a miss that cannot get a
//! slot in time fails with `StoreError::Busy` (UNAVAILABLE), while cached keys
//! never wait for one.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use keygate_core::clock::SystemClock;
use keygate_core::event::EventKind;
use keygate_core::freshness::Contact;
use keygate_core::intern::Interner;
use keygate_core::key::{KeyRecord, KeyState};
use keygate_core::key_id::KeyIds;
use keygate_core::scope::Scope;
use moka::sync::Cache;
use tokio::sync::{Notify, OnceCell, Semaphore, watch};
use uuid::Uuid;

use crate::index::KeyIndex;
use crate::store::{KeyReader, StoreError};
use crate::telemetry::CacheMetrics;

/// Sizes and lifetimes of the cache, and the bound on its store reads.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Most memory for cached records and remembered unknown ids, in bytes
    /// as estimated by [`record_weight`]; 1/8 of it goes to unknown ids.
    pub max_bytes: u64,
    /// Longest a known key stays cached (events invalidate it sooner).
    pub ttl: Duration,
    /// Longest an id the store did not have is remembered as unknown.
    pub negative_ttl: Duration,
    /// Most store reads the Authorize path runs at once (kept below the
    /// store's pool, so admin calls always find a connection).
    pub store_reads: u32,
    /// How long a miss waits for one of those reads before it fails with
    /// `StoreError::Busy`.
    pub store_read_wait: Duration,
}

/// The default byte budget: 128 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 128 * 1024 * 1024;

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_BYTES,
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            store_reads: 8,
            store_read_wait: Duration::from_millis(100),
        }
    }
}

/// Longest a lookup for an id the index lacks waits for the feed's next
/// read of the log before it is refused anyway.
const INDEX_CATCH_UP: Duration = Duration::from_millis(500);

/// What one remembered unknown id costs: the id, moka's bookkeeping.
const UNKNOWN_WEIGHT: u32 = 96;

/// What moka and the `Arc` spend per entry besides the record: key, hashes,
/// timestamps, the deque nodes and the reference counts.
const ENTRY_OVERHEAD: usize = 160;

/// The memory a cached record takes, in bytes (an estimate from above of its
/// heap: the record, its strings, scopes and CIDRs, and the entry's overhead).
pub fn record_weight(key: &KeyRecord) -> u32 {
    /// Counts what a `Display` writes, without allocating it.
    struct Len(usize);
    impl std::fmt::Write for Len {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut scope_text = Len(0);
    for scope in key.scopes.iter() {
        let _ = write!(scope_text, "{scope}");
    }
    let reason = match &key.state {
        KeyState::Revoked { reason, .. } => reason.len(),
        KeyState::Active | KeyState::Disabled => 0,
    };
    let bytes = std::mem::size_of::<KeyRecord>()
        + ENTRY_OVERHEAD
        + key.name.len()
        + key.organization_id.as_deref().map_or(0, str::len)
        + key.prefix.len()
        + key.created_by.len()
        + reason
        + key.scopes.len() * std::mem::size_of::<keygate_core::scope::Scope>()
        + scope_text.0
        + key.allowed_cidrs.len() * std::mem::size_of::<ipnet::IpNet>();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Whether this replica is in touch with the event log (a [`Contact`]: a
/// replica out of touch for longer than `max_staleness` cannot know what was
/// revoked meanwhile, so it stops answering from memory).
///
/// It also numbers the feed's reads of the log, so a lookup can wait for a
/// read that began after it arrived (see [`Freshness::read_since_now`]).
#[derive(Debug)]
pub struct Freshness {
    contact: Contact,
    reads_begun: AtomicU64,
    /// The number of the latest read that succeeded.
    reads_done: watch::Sender<u64>,
    /// Lookups waiting for a read; the feed answers at its own pace.
    read_wanted: Notify,
}

/// One read of the log, as the feed begins it.
#[derive(Debug, Clone, Copy)]
pub struct LogRead {
    number: u64,
    /// The contact's monotonic reading when the read began.
    began: Duration,
}

impl Freshness {
    /// Starts fresh: a replica has just read the log when it starts. Time is
    /// the system's monotonic clock (staleness is about real silence, not
    /// the injected wall clock tests move).
    pub fn new(max_staleness: Duration) -> Self {
        Self {
            contact: Contact::in_touch(max_staleness, Arc::new(SystemClock)),
            reads_begun: AtomicU64::new(0),
            reads_done: watch::Sender::new(0),
            read_wanted: Notify::new(),
        }
    }

    /// The feed begins a read of the log.
    pub fn begin_read(&self) -> LogRead {
        LogRead {
            number: self.reads_begun.fetch_add(1, Ordering::SeqCst) + 1,
            began: self.contact.now(),
        }
    }

    /// The feed has applied everything `read` returned: in touch as of when
    /// it began.
    pub fn read_succeeded(&self, read: LogRead) {
        self.contact.heard_at(read.began);
        self.reads_done.send_if_modified(|done| {
            let newer = read.number > *done;
            *done = (*done).max(read.number);
            newer
        });
    }

    /// Resolves when some lookup wants a fresh read of the log.
    pub async fn read_wanted(&self) {
        self.read_wanted.notified().await;
    }

    /// Asks the feed for a read of the log and waits, at most `within`, until
    /// one that began after this call has been applied; false on timeout.
    /// Concurrent callers share reads, so a flood costs the store no more
    /// than the feed's own pace.
    pub async fn read_since_now(&self, within: Duration) -> bool {
        let wanted = self.reads_begun.load(Ordering::SeqCst) + 1;
        let mut done = self.reads_done.subscribe();
        self.read_wanted.notify_one();
        matches!(
            tokio::time::timeout(within, done.wait_for(|n| *n >= wanted)).await,
            Ok(Ok(_))
        )
    }

    /// The log was heard from as it was at `read`'s start, by other means
    /// than a numbered read (a replay at start-up). Never moves back.
    pub fn touch(&self, read: LogRead) {
        self.contact.heard_at(read.began);
    }

    /// Longest this replica may be out of touch before it bypasses the cache.
    pub fn max_staleness(&self) -> Duration {
        self.contact.max_silence()
    }

    /// Whether the replica heard from the log within `max_staleness`.
    pub fn is_fresh(&self) -> bool {
        self.contact.is_fresh()
    }
}

/// The outcome of one store read, shared by every miss that waited for it.
type Loaded = Result<Option<Arc<KeyRecord>>, Arc<StoreError>>;

/// One store read in flight; concurrent misses for its id wait for it.
#[derive(Default)]
struct Flight {
    outcome: OnceCell<Loaded>,
    /// Set by an invalidation of the id: what this read returns may predate
    /// the change, so it is served to those already waiting but not kept.
    invalidated: AtomicBool,
    /// Lookups waiting on this flight; changed only under the map's lock.
    waiters: AtomicUsize,
}

/// Key records in memory for the Authorize path: a warm lookup does no I/O,
/// a miss costs at most one bounded store read, and an id the key-id index
/// lacks costs none. Events invalidate entries at once ([`KeyCache::apply`]);
/// out of touch with the log, every lookup goes to the store.
pub struct KeyCache {
    metrics: CacheMetrics,
    store: Arc<dyn KeyReader>,
    freshness: Arc<Freshness>,
    index: Arc<KeyIndex>,
    /// Which ids a keygate of this cluster made: an id the index lacks and
    /// none made is refused without waiting for the log.
    key_ids: Arc<KeyIds>,
    known: Cache<Uuid, Arc<KeyRecord>>,
    unknown: Cache<Uuid, ()>,
    /// The read in flight for each id that has one. An invalidation marks
    /// the id's flight and removes it, so what it read is not kept and later
    /// misses start a new read instead of joining one that began before the
    /// change. Never locked across an await.
    flights: Mutex<HashMap<Uuid, Arc<Flight>>>,
    /// One scope set, and one organization id, per distinct value among
    /// the cached keys.
    scope_sets: Interner<[Scope]>,
    organizations: Interner<str>,
    /// Slots for store reads from the Authorize path.
    reads: Semaphore,
    read_wait: Duration,
}

impl KeyCache {
    /// An empty cache over `store`, trusted while `freshness` says this
    /// replica is in touch with the event log; `key_ids` tells the ids this
    /// cluster made from forged ones.
    pub fn new(
        store: Arc<dyn KeyReader>,
        settings: CacheSettings,
        freshness: Arc<Freshness>,
        key_ids: Arc<KeyIds>,
    ) -> Self {
        let unknown_bytes = settings.max_bytes / 8;
        Self {
            metrics: CacheMetrics::default(),
            store,
            freshness,
            index: Arc::new(KeyIndex::new()),
            key_ids,
            known: Cache::builder()
                .max_capacity(settings.max_bytes - unknown_bytes)
                .weigher(|_, key: &Arc<KeyRecord>| record_weight(key))
                .time_to_live(settings.ttl)
                .build(),
            unknown: Cache::builder()
                .max_capacity(unknown_bytes)
                .weigher(|_, ()| UNKNOWN_WEIGHT)
                .time_to_live(settings.negative_ttl)
                .build(),
            flights: Mutex::default(),
            scope_sets: Interner::default(),
            organizations: Interner::default(),
            reads: Semaphore::new(usize::try_from(settings.store_reads.max(1)).unwrap_or(1)),
            read_wait: settings.store_read_wait,
        }
    }

    /// What makes new key ids, so that this cache recognises them.
    pub fn key_ids(&self) -> &Arc<KeyIds> {
        &self.key_ids
    }

    /// The key-id index this cache consults (loaded by the server at start).
    pub fn index(&self) -> &Arc<KeyIndex> {
        &self.index
    }

    /// The key with this id: from memory when cached, `None` without a
    /// store read when the loaded key-id index has no such id, else from the
    /// store. While out of touch with the event log, from the store (neither
    /// the cache nor the index may have heard of a change), so an
    /// unreachable store fails closed instead of serving a revoked key; an
    /// id that is neither indexed nor made by this cluster is refused even
    /// then.
    pub async fn get(&self, id: Uuid) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let fresh = self.freshness.is_fresh();
        if fresh && let Some(key) = self.known.get(&id) {
            self.metrics.hits.increment(1);
            return Ok(Some(key));
        }
        // Every key made since ids were tagged has a tag, and every key made
        // before is in the loaded index (the index only misses keys created
        // after it was loaded, and those were minted): an id with neither is
        // forged, whatever the feed may not have read yet.
        if self.index.refuses(id) && !self.key_ids.minted(id) {
            self.metrics.refused.increment(1);
            return Ok(None);
        }
        if fresh {
            // A key made on another replica a moment ago may not have reached
            // this replica's feed yet: before refusing, wait for one read of
            // the log that began after this lookup (shared by every lookup
            // waiting, so ids of deleted keys, or a forger who guessed a tag,
            // cost no read of their own).
            // If that read does not come in time, the log is not readable
            // right now: ask the store rather than refuse a key that may
            // exist (the read cap bounds what that costs, and a store that is
            // down answers UNAVAILABLE, not "no such key").
            if self.unknown.contains_key(&id) {
                self.metrics.hits.increment(1);
                return Ok(None);
            }
            if self.index.refuses(id)
                && self.freshness.read_since_now(INDEX_CATCH_UP).await
                && self.index.refuses(id)
            {
                // Remembered like an id the store did not have, so a repeat
                // skips the wait (and still answers during a store outage).
                // A creation adds to the index before it invalidates, so one
                // racing this insert is seen by the check after it.
                self.unknown.insert(id, ());
                if !self.index.refuses(id) {
                    self.unknown.invalidate(&id);
                }
                self.metrics.refused.increment(1);
                return Ok(None);
            }
            self.metrics.misses.increment(1);
        }
        self.load(id, fresh).await
    }

    /// Reads `id` from the store, joining the read already in flight for it
    /// if there is one; `keep` says whether the result may be cached.
    async fn load(&self, id: Uuid, keep: bool) -> Result<Option<Arc<KeyRecord>>, StoreError> {
        let flight = {
            let mut flights = self.lock_flights();
            let flight = Arc::clone(flights.entry(id).or_default());
            flight.waiters.fetch_add(1, Ordering::Relaxed);
            flight
        };
        let leave = LeaveFlight {
            cache: self,
            id,
            flight: Arc::clone(&flight),
        };
        // If the lookup running the read is cancelled, the next waiter reads.
        let loaded = flight
            .outcome
            .get_or_init(|| self.read(id, keep, &flight))
            .await
            .clone();
        drop(leave);
        loaded.map_err(StoreError::Shared)
    }

    /// One store read for `flight`, within the cap on concurrent reads.
    async fn read(&self, id: Uuid, keep: bool, flight: &Flight) -> Loaded {
        // A lookup that missed the cache just before the previous flight for
        // this id kept its record, and reached the flights just after that
        // flight's last waiter left, starts this one: the record is there
        // now (a flight keeps it before anyone leaves), so no second read.
        if keep && let Some(key) = self.known.get(&id) {
            return Ok(Some(key));
        }
        let Ok(Ok(_slot)) = tokio::time::timeout(self.read_wait, self.reads.acquire()).await else {
            self.metrics.busy.increment(1);
            return Err(Arc::new(StoreError::Busy));
        };
        let loaded = self
            .store
            .get_key(id)
            .await
            .map_err(Arc::new)?
            .map(|mut key| {
                key.scopes = key.scopes.interned(&self.scope_sets);
                if let Some(org) = &key.organization_id {
                    key.organization_id = Some(self.organizations.intern(org));
                }
                Arc::new(key)
            });
        // An invalidation during the read may mean the row we read is stale:
        // serve it to the lookups already waiting, but do not keep it.
        if keep && !flight.invalidated.load(Ordering::SeqCst) {
            match &loaded {
                Some(key) => self.known.insert(id, Arc::clone(key)),
                None => self.unknown.insert(id, ()),
            }
            // An invalidation that marked the flight after the check above
            // may have run its removal before our insert: undo the insert.
            // One that marks it after this second check removes the entry
            // itself (it marks first, then removes).
            if flight.invalidated.load(Ordering::SeqCst) {
                self.known.invalidate(&id);
                self.unknown.invalidate(&id);
            }
        }
        Ok(loaded)
    }

    fn lock_flights(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Flight>>> {
        // The map holds no invariant a panic could break halfway.
        self.flights.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many records and unknown ids are in memory, and their weight in
    /// bytes (after moka's pending evictions have run).
    pub fn memory(&self) -> (u64, u64) {
        self.known.run_pending_tasks();
        self.unknown.run_pending_tasks();
        (
            self.known.entry_count() + self.unknown.entry_count(),
            self.known.weighted_size() + self.unknown.weighted_size(),
        )
    }

    /// Publishes how many records are in memory, and their weight in bytes.
    pub fn report_size(&self) {
        let (entries, bytes) = self.memory();
        self.metrics.entries.set(entries as f64);
        self.metrics.bytes.set(bytes as f64);
    }

    /// Forgets everything, as after a RESET.
    pub fn invalidate_all(&self) {
        for (_, flight) in self.lock_flights().drain() {
            flight.invalidated.store(true, Ordering::SeqCst);
        }
        self.known.invalidate_all();
        self.unknown.invalidate_all();
    }

    /// Forgets what is known about `id`, at once: the next lookup reads the
    /// store afresh, joins no read that started before this call, and no
    /// such read puts what it found back into the cache.
    pub fn invalidate(&self, id: Uuid) {
        // Mark before removing from the caches: see the double check in `read`.
        if let Some(flight) = self.lock_flights().remove(&id) {
            flight.invalidated.store(true, Ordering::SeqCst);
        }
        self.known.invalidate(&id);
        self.unknown.invalidate(&id);
    }

    /// Applies one event of the log: invalidates its key and keeps the
    /// key-id index current.
    pub fn apply(&self, kind: EventKind, id: Uuid) {
        self.index.apply(kind, id);
        self.invalidate(id);
    }
}

/// Leaves a flight however the lookup ends, and retires the flight from the
/// map once it has an outcome or nobody is left waiting for it.
struct LeaveFlight<'a> {
    cache: &'a KeyCache,
    id: Uuid,
    flight: Arc<Flight>,
}

impl Drop for LeaveFlight<'_> {
    fn drop(&mut self) {
        let mut flights = self.cache.lock_flights();
        // Under the lock, like every change to `waiters`, so the count is exact.
        let left = self.flight.waiters.fetch_sub(1, Ordering::Relaxed) - 1;
        let retire = flights.get(&self.id).is_some_and(|current| {
            Arc::ptr_eq(current, &self.flight) && (current.outcome.initialized() || left == 0)
        });
        if retire {
            flights.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use chrono::DateTime;
    use keygate_core::key::{Mode, Tier};
    use keygate_core::limits::RateLimits;
    use keygate_core::scope::ScopeSet;
    use keygate_core::token::{Brand, generate};

    use super::*;
    use crate::service::limits::Subject;

    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        pages * 4096
    }

    /// A key like the scale benchmark's bulk-loaded ones.
    fn record(n: usize) -> KeyRecord {
        let id = Uuid::new_v4();
        let t = generate(&Brand::default(), Mode::Live, id).unwrap();
        KeyRecord {
            id,
            name: "bulk".into(),
            organization_id: Some(format!("org_{}", n % 1000).into()),
            tier: Tier::Organization,
            mode: Mode::Live,
            prefix: t.prefix,
            secret_digest: t.digest,
            previous_secret: None,
            scopes: ScopeSet::parse(&["checkout:create", "checkout:read"]).unwrap(),
            allowed_cidrs: vec![],
            rate_limit_per_minute: 1_000_000,
            unlimited: false,
            state: KeyState::Active,
            created_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            last_used_at: None,
            expires_at: None,
            rotated_at: None,
            created_by: "bootstrap".into(),
            version: 1,
        }
    }

    /// What 100,000 cached records and their rate-limit windows really take
    /// against the cache's weight of them (quoted in BENCHMARKS.md). Run alone:
    /// `cargo test --release --lib cache::tests::memory -- --ignored --nocapture`.
    #[test]
    #[ignore = "measurement; prints what 100k cached keys take"]
    fn memory_of_100k_cached_keys() {
        const N: usize = 100_000;
        let records: Vec<KeyRecord> = (0..N).map(record).collect();
        let base = rss_bytes();
        let known: Cache<Uuid, Arc<KeyRecord>> = Cache::builder()
            .max_capacity(u64::MAX)
            .weigher(|_, key: &Arc<KeyRecord>| record_weight(key))
            .time_to_live(Duration::from_secs(60))
            .build();
        let ids: Vec<Uuid> = records.iter().map(|r| r.id).collect();
        for r in records {
            known.insert(r.id, Arc::new(r));
        }
        known.run_pending_tasks();
        let cached = rss_bytes();
        let limits: RateLimits<Subject> = RateLimits::new(Arc::new(SystemClock));
        let per_minute = NonZeroU32::new(1_000_000).unwrap();
        for id in &ids {
            limits.check(&Subject::Key(*id), per_minute);
        }
        let counted = rss_bytes();
        let mb = |b: u64| b as f64 / 1_048_576.0;
        println!(
            "100k keys: cache +{:.1} MiB resident (weighed {:.1} MiB: {:.0} B a record, {:.0} B weighed), \
             rate-limit windows +{:.1} MiB ({:.0} B a key)",
            mb(cached - base),
            mb(known.weighted_size()),
            (cached - base) as f64 / N as f64,
            known.weighted_size() as f64 / N as f64,
            mb(counted - cached),
            (counted - cached) as f64 / N as f64,
        );
        assert_eq!(known.entry_count(), N as u64);
    }
}
