//! Rate limits shared by every replica through Redis, without a Redis round
//! trip per request.
//!
//! Each replica decides from its own copy of a subject's window: what Redis
//! said every replica had counted at the last sync, plus what this replica
//! allowed since. Allowed requests are pushed to Redis in the background
//! (one pipelined script call for every subject that changed: every
//! [`SYNC_INTERVAL`] for a subject at half its limit or more, every
//! [`LAZY_SYNC_INTERVAL`] for the others), and the reply replaces the copy
//! with everyone's counts. A
//! replica may allow at most `share` requests of a subject that Redis has not
//! seen yet; halfway there it asks for a sync at once, and at its share it
//! waits for one (at most [`SYNC_WAIT`]) before allowing more. The bound
//! below comes from the share alone, not from how often syncs run, so the
//! interval only trades the freshness of other replicas' counts for the
//! cost of syncing. So with R live replicas and a limit of L, every replica's
//! unseen requests together exceed what Redis knows by at most
//! `(R − 1) × share`: at most L × (1 + ε) are allowed in any window, with
//! `share = max(1, ⌊ε·L / (R − 1)⌋)` and ε = 5 % (or (R − 1)/L when L is
//! below 20 × (R − 1)). A request is refused only when the counts Redis
//! returned, plus this replica's own, reach L: a subject below its limit is
//! never refused.
//!
//! When Redis does not answer, nothing waits on it: each replica enforces
//! L / R on its own count (or refuses, with `StoreFailure::Deny`) until a
//! sync succeeds again, and says so once in the log and in
//! `keygate_rate_limit_store_up`.
//!
//! Windows are on the wall clock (seconds since the epoch, from the injected
//! clock), the one timeline every replica shares; replicas' clocks are
//! assumed to agree, as for the replica heartbeats.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use keygate_core::clock::Clock;
use keygate_core::limits::{RateDecision, Window};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::limits::Subject;
use super::replicas::Replicas;

/// How often a subject that is getting close is pushed to Redis: at half
/// its limit or more, or halfway to its share (that one also asks for a
/// sync at once).
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);

/// How often every other changed subject is. Each sync is a Lua script per
/// subject in Redis and its reply here; at 5 ms for every subject, 16 busy
/// keys cost scenario 8 an eighth of its throughput and doubled its p99 on
/// two cores (BENCHMARKS.md). Kong's cluster policy syncs every half second.
pub const LAZY_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// How often subjects with nothing left in their windows are forgotten.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Longest a request at its replica's share waits for a sync before it is
/// decided on the replica's own count instead.
pub const SYNC_WAIT: Duration = Duration::from_millis(100);

/// The accuracy target: a subject's replicas together overshoot its limit
/// by at most this many percent (or by R − 1 requests, if that is more).
pub const EPSILON_PERCENT: u32 = 5;

/// How long a Redis call may take before the store counts as down.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// How often the live replica count is read from the replica registry.
const REPLICA_REFRESH: Duration = Duration::from_secs(1);

/// How often a store that is down is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// Adds this replica's new requests to a subject's per-second counts, drops
/// seconds that have left the window, and returns every second still in it.
/// KEYS[1]: the subject's hash. ARGV[1]: the oldest second still in the
/// window; ARGV[2]: the hash's lifetime in seconds; then (second, count)
/// pairs to add.
const SYNC_SCRIPT: &str = r"
local key = KEYS[1]
local oldest = tonumber(ARGV[1])
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
end
local all = redis.call('HGETALL', key)
local live = {}
for i = 1, #all, 2 do
  if tonumber(all[i]) < oldest then
    redis.call('HDEL', key, all[i])
  else
    live[#live + 1] = all[i]
    live[#live + 1] = all[i + 1]
  end
end
if #live > 0 then
  redis.call('EXPIRE', key, ARGV[2])
end
return live
";

/// What a replica does while Redis does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreFailure {
    /// Enforce L / (live replicas) on this replica's own count.
    #[default]
    Local,
    /// Refuse every request that a limit applies to.
    Deny,
}

/// One limited subject (a key or an organization) as this replica tracks it.
#[derive(Default)]
struct Tracked {
    state: Mutex<State>,
    /// Woken after every sync attempt that included this subject.
    synced: Notify,
}

#[derive(Default)]
struct State {
    /// Everyone's counts as of the last sync, plus this replica's since.
    shared: Window,
    /// This replica's own allowed requests: the fallback's count.
    own: Window,
    /// Allowed here and not yet sent to Redis, per second (−1: a request
    /// taken back).
    unsent: Vec<(u64, i64)>,
    /// Sent, reply pending.
    in_flight: Vec<(u64, i64)>,
    /// The limit the subject was last checked against.
    limit: u32,
    /// When it was last sent to Redis; `None`: never.
    synced_at: Option<tokio::time::Instant>,
}

impl State {
    /// Whether the subject's next sync may not wait for
    /// [`LAZY_SYNC_INTERVAL`]: it is at half its limit or more, halfway to
    /// its `share` of unseen requests, or was never sent.
    fn due(&mut self, share: u32, now: Duration) -> bool {
        let close = self.shared.count(now) * 2 >= u64::from(self.limit)
            || u64::from(self.unseen()) * 2 >= u64::from(share);
        close
            || self
                .synced_at
                .is_none_or(|at| at.elapsed() >= LAZY_SYNC_INTERVAL)
    }

    /// Nothing counted in the window any more and nothing waiting for Redis:
    /// forgetting the subject loses nothing.
    fn idle(&mut self, now: Duration) -> bool {
        self.unsent.is_empty()
            && self.in_flight.is_empty()
            && self.own.count(now) == 0
            && self.shared.count(now) == 0
    }

    fn unseen(&self) -> u32 {
        let n: i64 = self
            .unsent
            .iter()
            .chain(&self.in_flight)
            .map(|(_, n)| *n)
            .sum();
        u32::try_from(n.max(0)).unwrap_or(u32::MAX)
    }

    /// Counts one allowed request for Redis; true when it is the first
    /// since the last sync began (the subject must be marked dirty).
    fn record(&mut self, second: u64) -> bool {
        let first = self.unsent.is_empty();
        match self.unsent.last_mut() {
            Some((s, n)) if *s == second => *n += 1,
            _ => self.unsent.push((second, 1)),
        }
        first
    }
}

/// Rate-limit windows shared through Redis (see the module docs).
pub struct SharedLimits {
    redis: ConnectionManager,
    script: redis::Script,
    clock: Arc<dyn Clock>,
    /// Every subject counted lately, swept every [`SWEEP_INTERVAL`]: only
    /// keys that authenticated (and their organizations) are counted, so it
    /// holds what real traffic used in the last minute or so. Keyed by the
    /// subject itself: a request hashes a key id, never builds the Redis
    /// name (only a sync does).
    subjects: DashMap<Subject, Arc<Tracked>>,
    /// Subjects with requests Redis has not seen.
    dirty: Mutex<HashSet<Subject>>,
    sync_now: Notify,
    up: AtomicBool,
    /// Decisions made on this replica's own count because a sync did not
    /// answer in time while Redis was up (slow, not down).
    slow_fallbacks: AtomicU64,
    /// Live replicas, at least 1.
    replicas: AtomicU32,
    failure: StoreFailure,
}

/// The Redis URL could not be used.
#[derive(Debug, thiserror::Error)]
#[error("--rate-limit-store: {0}")]
pub struct BadStoreUrl(String);

impl SharedLimits {
    /// Limits shared through the Redis at `url` (`redis://` or `rediss://`).
    /// Connects in the background: a Redis that is down at start only means
    /// local limits until it answers. Must be called inside a tokio runtime.
    pub fn new(
        url: &str,
        failure: StoreFailure,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BadStoreUrl> {
        let client = redis::Client::open(url).map_err(|e| BadStoreUrl(redact_error(&e)))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| BadStoreUrl(redact_error(&e)))?;
        metrics::gauge!("keygate_rate_limit_store_up").set(0.0);
        Ok(Self {
            redis,
            script: redis::Script::new(SYNC_SCRIPT),
            clock,
            subjects: DashMap::new(),
            dirty: Mutex::default(),
            sync_now: Notify::new(),
            up: AtomicBool::new(false),
            slow_fallbacks: AtomicU64::new(0),
            replicas: AtomicU32::new(1),
            failure,
        })
    }

    /// Whether the last exchange with Redis succeeded.
    pub fn store_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// How many requests were decided on this replica's own count because
    /// Redis was slower than [`SYNC_WAIT`] (while up). The accuracy bound
    /// holds for the others; these may add up to L / R per replica.
    pub fn slow_fallbacks(&self) -> u64 {
        self.slow_fallbacks.load(Ordering::Relaxed)
    }

    /// Live replicas as last read from the registry (at least 1): what the
    /// share and the fallback divide by.
    pub fn live_replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed)
    }

    fn now(&self) -> Duration {
        let ms = self.clock.now().timestamp_millis();
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }

    fn share(&self, limit: u32) -> u32 {
        let others = self.replicas.load(Ordering::Relaxed).saturating_sub(1);
        if others == 0 {
            return limit;
        }
        (u64::from(limit) * u64::from(EPSILON_PERCENT) / 100 / u64::from(others))
            .clamp(1, u64::from(limit)) as u32
    }

    fn subject(&self, subject: &Subject) -> Arc<Tracked> {
        // A shard's read lock for a subject already known; its write lock
        // (and the subject's clone) only for a new one.
        if let Some(tracked) = self.subjects.get(subject) {
            return Arc::clone(&tracked);
        }
        Arc::clone(&self.subjects.entry(subject.clone()).or_default())
    }

    /// Counts one request of `subject` against `limit` per minute, shared
    /// with every replica (see the module docs for when it waits).
    pub async fn check(&self, name: &Subject, limit: u32) -> RateDecision {
        let subject = self.subject(name);
        let mut waited = false;
        loop {
            let now = self.now();
            let share = self.share(limit);
            {
                let mut state = subject.state.lock().unwrap_or_else(PoisonError::into_inner);
                state.limit = limit;
                if !self.store_up() || waited {
                    if self.store_up() {
                        self.slow_fallbacks.fetch_add(1, Ordering::Relaxed);
                        // Slow, not down: what this replica knows of the
                        // others still counts.
                        if state.shared.count(now) >= u64::from(limit) {
                            return state.shared.check(limit, now);
                        }
                    }
                    return self.fallback(name, &mut state, limit, now);
                }
                let unseen = state.unseen();
                if unseen < share || state.shared.count(now) >= u64::from(limit) {
                    let decision = state.shared.check(limit, now);
                    if decision.retry_after.is_none() {
                        state.own.add(now, 1);
                        // The dirty set's lock is taken once per subject
                        // per sync, not per request.
                        if state.record(Window::second(now)) {
                            self.mark_dirty(name);
                        }
                        // Halfway to the share: sync now, so the request at
                        // the share rarely has to wait for one.
                        if unseen + 1 == (share / 2).max(1) {
                            self.sync_now.notify_one();
                        }
                    }
                    return decision;
                }
            }
            // At this replica's share: wait for Redis to hear of it (and of
            // the others), then decide on the fresh counts.
            let synced = subject.synced.notified();
            tokio::pin!(synced);
            synced.as_mut().enable();
            self.mark_dirty(name);
            self.sync_now.notify_one();
            let answered = tokio::time::timeout(SYNC_WAIT, synced).await.is_ok();
            if !answered || !self.store_up() {
                waited = true;
            } else {
                // One fresh look only: a subject still at its share after a
                // sync has others racing it; decide on the local count.
                waited = subject
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .unseen()
                    >= share;
            }
        }
    }

    /// Takes back one request `check` allowed a moment ago (a later limit
    /// refused the request). If Redis has seen it already, the correction
    /// is a count of −1 at the same second.
    pub fn uncount(&self, name: &Subject) {
        let Some(subject) = self.subjects.get(name).map(|t| Arc::clone(&t)) else {
            return;
        };
        let now = self.now();
        let mut state = subject.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.shared.uncount();
        state.own.uncount();
        let second = Window::second(now);
        let first = state.unsent.is_empty();
        match state.unsent.iter_mut().rev().find(|(s, _)| *s == second) {
            Some((_, n)) => *n -= 1,
            None => state.unsent.push((second, -1)),
        }
        state.unsent.retain(|(_, n)| *n != 0);
        drop(state);
        if first {
            self.mark_dirty(name);
        }
    }

    /// The decision without Redis: L / (live replicas) on this replica's
    /// own count, or a refusal. Allowed requests are still kept for Redis.
    fn fallback(
        &self,
        name: &Subject,
        state: &mut State,
        limit: u32,
        now: Duration,
    ) -> RateDecision {
        if self.failure == StoreFailure::Deny && !self.store_up() {
            return RateDecision {
                limit,
                remaining: 0,
                reset: Duration::from_secs(1),
                retry_after: Some(Duration::from_secs(1)),
            };
        }
        let replicas = self.replicas.load(Ordering::Relaxed).max(1);
        let local = (limit / replicas).max(1);
        let mut decision = state.own.check(local, now);
        if decision.retry_after.is_none() {
            state.shared.add(now, 1);
            if state.record(Window::second(now)) {
                self.mark_dirty(name);
            }
        }
        decision.limit = limit;
        decision
    }

    fn mark_dirty(&self, name: &Subject) {
        let mut dirty = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        if !dirty.contains(name) {
            dirty.insert(name.clone());
        }
    }

    /// Forgets the subjects with nothing left to count or send. One in use
    /// (its `Tracked` held by a check) stays: what the check counts must
    /// reach the map's entry, not an orphan.
    fn sweep(&self) {
        let now = self.now();
        self.subjects.retain(|_, tracked| {
            Arc::strong_count(tracked) > 1
                || !tracked
                    .state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .idle(now)
        });
    }

    /// Subjects this replica tracks (counted in the last minute or so).
    pub fn len(&self) -> usize {
        self.subjects.len()
    }

    /// Whether this replica tracks no subject.
    pub fn is_empty(&self) -> bool {
        self.subjects.is_empty()
    }

    /// Pushes counts to Redis until `shutdown`, and keeps the live replica
    /// count current from `replicas`.
    pub async fn run(self: Arc<Self>, replicas: Arc<Replicas>, shutdown: CancellationToken) {
        let counter = {
            let this = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { this.count_replicas(replicas, shutdown).await })
        };
        let mut probed = tokio::time::Instant::now() - PROBE_INTERVAL;
        let mut swept = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.sync_now.notified() => {}
                () = tokio::time::sleep(SYNC_INTERVAL) => {}
            }
            if swept.elapsed() >= SWEEP_INTERVAL {
                swept = tokio::time::Instant::now();
                self.sweep();
            }
            let names = self.due();
            if names.is_empty() {
                if !self.store_up() && probed.elapsed() >= PROBE_INTERVAL {
                    probed = tokio::time::Instant::now();
                    let mut redis = self.redis.clone();
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut redis).await;
                    self.set_up(pong.is_ok(), pong.err());
                }
                continue;
            }
            self.sync(&names).await;
        }
        counter.abort();
    }

    /// Takes the dirty subjects whose sync is due (see [`State::due`]), and
    /// leaves the others dirty. While Redis is down every one is due: the
    /// sync that succeeds first must carry every count.
    fn due(&self) -> Vec<Subject> {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner));
        if !self.store_up() {
            return dirty.into_iter().collect();
        }
        let now = self.now();
        let (due, later): (Vec<Subject>, Vec<Subject>) = dirty.into_iter().partition(|name| {
            let tracked = self.subject(name);
            let mut state = tracked.state.lock().unwrap_or_else(PoisonError::into_inner);
            let share = self.share(state.limit);
            state.due(share, now)
        });
        if !later.is_empty() {
            self.dirty
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(later);
        }
        due
    }

    /// One pipelined round trip for `names`.
    async fn sync(&self, names: &[Subject]) {
        let now = self.now();
        let oldest = Window::oldest_live_second(now);
        let mut pipe = redis::pipe();
        let mut subjects = Vec::with_capacity(names.len());
        for name in names {
            let subject = self.subject(name);
            {
                let mut state = subject.state.lock().unwrap_or_else(PoisonError::into_inner);
                let unsent = std::mem::take(&mut state.unsent);
                state.in_flight.extend(unsent);
                state.synced_at = Some(tokio::time::Instant::now());
                state.in_flight.retain(|(second, _)| *second >= oldest);
                let cmd = pipe
                    .cmd("EVALSHA")
                    .arg(self.script.get_hash())
                    .arg(1)
                    .arg(format!("keygate:rl:{}", SubjectName::of(name).as_str()))
                    .arg(oldest)
                    .arg(keygate_core::limits::WINDOW.as_secs() + 2);
                for (second, n) in &state.in_flight {
                    cmd.arg(*second).arg(*n);
                }
            }
            subjects.push(subject);
        }
        let mut redis = self.redis.clone();
        let mut reply: redis::RedisResult<Vec<Vec<(u64, u32)>>> =
            pipe.query_async(&mut redis).await;
        if reply
            .as_ref()
            .is_err_and(|e| e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // A Redis that restarted (or a first sync): load the script once.
            let loaded: redis::RedisResult<String> = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SYNC_SCRIPT)
                .query_async(&mut redis)
                .await;
            reply = match loaded {
                Ok(_) => pipe.query_async(&mut redis).await,
                Err(e) => Err(e),
            };
        }
        let ok = reply.is_ok();
        match reply {
            Ok(counts) => {
                let now = self.now();
                for (subject, counts) in subjects.iter().zip(counts) {
                    let mut state = subject.state.lock().unwrap_or_else(PoisonError::into_inner);
                    state.in_flight.clear();
                    let unsent: Vec<(u64, u32)> = state
                        .unsent
                        .iter()
                        .filter_map(|(s, n)| u32::try_from(*n).ok().map(|n| (*s, n)))
                        .collect();
                    state.shared = Window::from_counts(counts.into_iter().chain(unsent), now);
                }
                self.set_up(true, None);
            }
            Err(e) => {
                for (name, subject) in names.iter().zip(&subjects) {
                    let mut state = subject.state.lock().unwrap_or_else(PoisonError::into_inner);
                    let in_flight = std::mem::take(&mut state.in_flight);
                    state.unsent.splice(0..0, in_flight);
                    // Counts that left the window meanwhile are not resent.
                    let resend = !state.unsent.is_empty();
                    drop(state);
                    if resend {
                        self.mark_dirty(name);
                    }
                }
                self.set_up(false, Some(e));
            }
        }
        debug_assert!(ok || !self.store_up());
        for subject in &subjects {
            subject.synced.notify_waiters();
        }
    }

    fn set_up(&self, up: bool, error: Option<redis::RedisError>) {
        let was = self.up.swap(up, Ordering::AcqRel);
        metrics::gauge!("keygate_rate_limit_store_up").set(if up { 1.0 } else { 0.0 });
        match (was, up) {
            (false, true) => tracing::info!("rate-limit store answers: limits are shared again"),
            (true, false) => tracing::warn!(
                error = %error.as_ref().map(redact_error).unwrap_or_default(),
                "rate-limit store does not answer: enforcing each limit / live replicas locally"
            ),
            _ => {}
        }
    }

    async fn count_replicas(&self, replicas: Arc<Replicas>, shutdown: CancellationToken) {
        loop {
            if let Ok((views, _)) = replicas.list().await {
                let live = views.iter().filter(|r| r.live).count();
                self.replicas.store(
                    u32::try_from(live).unwrap_or(u32::MAX).max(1),
                    Ordering::Relaxed,
                );
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(REPLICA_REFRESH) => {}
            }
        }
    }
}

/// A Redis error without the URL's password (redis-rs errors can echo the
/// connection info).
fn redact_error(e: &redis::RedisError) -> String {
    let text = e.to_string();
    match text.find("://") {
        Some(_) => crate::store::sql_redact(&text),
        None => text,
    }
}

/// A subject's name in Redis and in this replica's map, `k:<key id>` or
/// `o:<organization id>`, built on the stack: no allocation per request.
struct SubjectName {
    bytes: [u8; 2 + keygate_core::key::MAX_ORGANIZATION_ID_BYTES],
    len: usize,
}

impl SubjectName {
    fn of(subject: &Subject) -> Self {
        let mut name = Self {
            bytes: [0; 2 + keygate_core::key::MAX_ORGANIZATION_ID_BYTES],
            len: 2,
        };
        match subject {
            Subject::Key(id) => {
                name.bytes[..2].copy_from_slice(b"k:");
                id.hyphenated().encode_lower(&mut name.bytes[2..]);
                name.len = 2 + uuid::fmt::Hyphenated::LENGTH;
            }
            Subject::Organization(org) => {
                name.bytes[..2].copy_from_slice(b"o:");
                // Organization ids are at most 128 bytes (validated on the
                // way in); a longer one is cut, never a panic.
                let org = &org.as_bytes()[..org.len().min(name.bytes.len() - 2)];
                name.bytes[2..2 + org.len()].copy_from_slice(org);
                name.len = 2 + org.len();
            }
        }
        name
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use keygate_core::clock::{ManualClock, SystemClock};

    use super::*;

    /// Nothing listens on port 1: every sync fails at once.
    fn unreachable(clock: Arc<ManualClock>) -> SharedLimits {
        SharedLimits::new("redis://127.0.0.1:1", StoreFailure::Local, clock).unwrap()
    }

    #[tokio::test]
    async fn the_sweep_forgets_only_subjects_with_nothing_left_to_count_or_send() {
        let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
        let limits = unreachable(clock.clone());
        let (a, b) = (
            Subject::Key(uuid::Uuid::new_v4()),
            Subject::Key(uuid::Uuid::new_v4()),
        );
        for subject in [&a, &b] {
            assert!(limits.check(subject, 10).await.retry_after.is_none());
        }
        // Counted a moment ago and not yet sent: kept.
        limits.sweep();
        assert_eq!(limits.len(), 2);

        // A minute later the counts have left the window; the failed sync
        // drops them instead of keeping them for Redis.
        clock.advance(chrono::Duration::seconds(61));
        let dirty: Vec<Subject> = std::mem::take(&mut *limits.dirty.lock().unwrap())
            .into_iter()
            .collect();
        assert_eq!(dirty.len(), 2);
        limits.sync(&dirty).await;
        assert!(!limits.store_up());
        assert!(limits.dirty.lock().unwrap().is_empty(), "nothing to resend");
        // One is in use by a check right now: kept, so what that check
        // counts reaches the map's entry and not an orphan.
        let held = limits.subject(&b);
        limits.sweep();
        assert_eq!(limits.len(), 1);
        assert!(limits.subjects.contains_key(&b) && !limits.subjects.contains_key(&a));
        drop(held);
        limits.sweep();
        assert!(limits.is_empty());

        // A forgotten subject starts over with its full allowance.
        assert_eq!(limits.check(&a, 10).await.remaining, 9);
    }

    #[tokio::test]
    async fn a_bad_store_url_never_shows_its_password() {
        let mut refused = 0;
        for url in [
            "redis://:hunter2secret@[::1",
            "rediss://user:hunter2secret@host:notaport",
            "redis+unknown://user:hunter2secret@host",
        ] {
            if let Err(e) = SharedLimits::new(url, StoreFailure::Local, Arc::new(SystemClock)) {
                refused += 1;
                assert!(!e.to_string().contains("hunter2secret"), "{e}");
            }
        }
        assert!(refused >= 2, "only {refused} bad URLs were refused");
    }
}
