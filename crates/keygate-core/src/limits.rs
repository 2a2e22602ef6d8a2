//! Rate limits on a rolling 60-second window, on the injected clock's
//! monotonic reading: per key, and per whatever else is counted the same
//! way (an organization's shared limit).
//!
//! A subject limited to L per minute is allowed at most L requests in any
//! 60 s: each allowed request counts for 60 s from the end of the second it
//! was made in (so between 60 and 61 s), there is no fixed minute boundary
//! to burst across, and a subject idle for a minute has exactly L again,
//! never 2L − 1. State is per replica and kept only for subjects counted in
//! the last few minutes, so memory stays bounded (a window is 61 counters).

use std::fmt;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use uuid::Uuid;

use crate::clock::Clock;

/// How long an allowed request counts against its key.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Seconds in [`WINDOW`]; a request made in second `s` (the interval
/// `(s − 1, s]`) counts until `s + WINDOW_SECS`.
const WINDOW_SECS: u64 = WINDOW.as_secs();

/// Counters a window needs: at time t the seconds `floor(t) − 59 ..= ceil(t)`
/// still count, 61 of them when t is not a whole second.
const SLOTS: usize = WINDOW_SECS as usize + 1;

/// The answer for one request that passed every other check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// The key's allowance, in requests per minute (its own, or the default).
    pub limit: u32,
    /// Requests the key may still make in the current window after this
    /// one; 0 when refused.
    pub remaining: u32,
    /// Until every request counted now has left the window (the full
    /// allowance is back).
    pub reset: Duration,
    /// Set when the request is over the limit: until the oldest counted
    /// request leaves the window, in whole seconds, never 0.
    pub retry_after: Option<Duration>,
}

/// Requests per minute for a key whose own limit is 0, unless the server is
/// told otherwise (`--default-rate-limit`).
pub const DEFAULT_RATE_LIMIT: NonZeroU32 = NonZeroU32::new(100).expect("100 is not 0");

/// How much a key may do: a number of requests per rolling minute, or no
/// limit at all. Ordered by power: every limit is below `Unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Allowance {
    /// At most this many requests in any 60 s.
    PerMinute(NonZeroU32),
    /// Never counted.
    Unlimited,
}

impl Allowance {
    /// The server's default when nothing says otherwise: [`DEFAULT_RATE_LIMIT`].
    pub const DEFAULT: Allowance = Allowance::PerMinute(DEFAULT_RATE_LIMIT);

    /// Reads a `--default-rate-limit` value: `off` (unlimited) or a number
    /// of requests per minute above 0.
    pub fn parse_setting(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Allowance::Unlimited);
        }
        s.parse::<NonZeroU32>()
            .map(Allowance::PerMinute)
            .map_err(|_| {
                format!("{s:?} is neither a number of requests per minute above 0 nor off")
            })
    }

    /// The value [`parse_setting`](Self::parse_setting) reads back: `off`
    /// or the number.
    pub fn setting_text(self) -> String {
        match self {
            Allowance::PerMinute(n) => n.to_string(),
            Allowance::Unlimited => "off".to_owned(),
        }
    }
}

/// `100 per minute` or `unlimited`, for messages.
impl fmt::Display for Allowance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allowance::PerMinute(n) => write!(f, "{n} per minute"),
            Allowance::Unlimited => f.write_str("unlimited"),
        }
    }
}

/// Which limit a rate decision is about: a request is allowed only within
/// both its key's own limit and its organization's shared one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitedBy {
    /// The key's own limit (or the server default).
    Key,
    /// The limit shared by every key of the key's organization.
    Organization,
}

impl LimitedBy {
    /// `KEY` or `ORGANIZATION`, as the wire and error bodies spell it.
    pub fn code(self) -> &'static str {
        match self {
            LimitedBy::Key => "KEY",
            LimitedBy::Organization => "ORGANIZATION",
        }
    }
}

/// Requests per second slot: two bytes a slot until one second holds more
/// than `u16::MAX`, then four (boxed, so a window stays half the size for
/// the keys that never get there: every key used in the last minute has a
/// window, and at 100,000 keys the windows were the largest thing in memory
/// after the cached records).
#[derive(Debug, Clone)]
enum Counts {
    Narrow([u16; SLOTS]),
    Wide(Box<[u32; SLOTS]>),
}

impl Counts {
    fn get(&self, slot: usize) -> u32 {
        match self {
            Counts::Narrow(c) => u32::from(c[slot]),
            Counts::Wide(c) => c[slot],
        }
    }

    fn set(&mut self, slot: usize, n: u32) {
        match self {
            Counts::Narrow(c) => match u16::try_from(n) {
                Ok(n) => c[slot] = n,
                Err(_) => {
                    let mut wide = Box::new([0u32; SLOTS]);
                    for (w, n) in wide.iter_mut().zip(c.iter()) {
                        *w = u32::from(*n);
                    }
                    wide[slot] = n;
                    *self = Counts::Wide(wide);
                }
            },
            Counts::Wide(c) => c[slot] = n,
        }
    }
}

/// The requests one key made in the last minute, per second.
#[derive(Debug, Clone)]
pub struct Window {
    /// Requests counted in second `s`, at `s % SLOTS`.
    counts: Counts,
    /// The latest second counted so far; slots of older seconds that left
    /// the window are zeroed when time passes them.
    newest: u64,
    /// The sum of `counts`.
    total: u64,
}

impl Default for Window {
    fn default() -> Self {
        Self::new()
    }
}

/// The second a request at `now` counts in: `ceil(now)`, so one at exactly
/// 0 s leaves the window at exactly 60 s.
fn second_of(now: Duration) -> u64 {
    now.as_secs() + u64::from(now.subsec_nanos() > 0)
}

/// Where second `second` is counted in a window's ring.
fn slot_of(second: u64) -> usize {
    (second % SLOTS as u64) as usize
}

/// Whole seconds until `at`, at least 1.
fn whole_seconds_until(at: Duration, now: Duration) -> Duration {
    let wait = at.saturating_sub(now);
    Duration::from_secs(second_of(wait)).max(Duration::from_secs(1))
}

impl Window {
    /// An empty window: the full allowance.
    pub fn new() -> Self {
        Self {
            counts: Counts::Narrow([0; SLOTS]),
            newest: 0,
            total: 0,
        }
    }

    /// Forgets the seconds that have left the window by `now` (those `s`
    /// with `s + 60 ≤ now`).
    fn slide(&mut self, now: Duration) {
        let current = second_of(now);
        if current > self.newest {
            // Every second after `newest` up to `current` starts empty; the
            // slots they reuse held seconds that have left the window.
            let steps = (current - self.newest).min(SLOTS as u64);
            for s in (current + 1 - steps)..=current {
                self.clear(s);
            }
            self.newest = current;
        }
        // At a whole second the ring's oldest second, `now − 60`, has just
        // left the window too (it counts for `(now − 60, now]` no longer).
        if now.subsec_nanos() == 0 && self.newest == current && current >= WINDOW_SECS {
            self.clear(current - WINDOW_SECS);
        }
    }

    fn clear(&mut self, second: u64) {
        let slot = slot_of(second);
        self.total -= u64::from(self.counts.get(slot));
        self.counts.set(slot, 0);
    }

    /// Adds `n` to second `second`'s count (saturating: a count past
    /// `u32::MAX` a second is beyond any allowance anyway).
    fn bump(&mut self, second: u64, n: u32) {
        let slot = slot_of(second);
        let before = self.counts.get(slot);
        let after = before.saturating_add(n);
        self.counts.set(slot, after);
        self.total += u64::from(after - before);
    }

    fn has(&self, second: u64) -> bool {
        self.counts.get(slot_of(second)) > 0
    }

    /// A window holding `counts` (second, requests), as another replica or
    /// a shared store counted them, seen at `now`: seconds that have left
    /// the window by then are dropped.
    pub fn from_counts(counts: impl IntoIterator<Item = (u64, u32)>, now: Duration) -> Self {
        let mut window = Self::new();
        window.slide(now);
        let newest = window.newest;
        for (second, n) in counts {
            if second <= newest && second + (SLOTS as u64) > newest {
                window.bump(second, n);
            }
        }
        window.slide(now);
        window
    }

    /// Counts `n` requests made at `now` without asking whether they fit
    /// (requests another replica already allowed).
    pub fn add(&mut self, now: Duration, n: u32) {
        self.slide(now);
        self.bump(self.newest, n);
    }

    /// The second a request at `now` counts in (see [`Window`]).
    pub fn second(now: Duration) -> u64 {
        second_of(now)
    }

    /// The oldest second still in the window at `now`.
    pub fn oldest_live_second(now: Duration) -> u64 {
        (now.as_secs() + 1).saturating_sub(WINDOW_SECS)
    }

    /// Requests counted in the window at `now`.
    pub fn count(&mut self, now: Duration) -> u64 {
        self.slide(now);
        self.total
    }

    /// When the oldest and the newest counted request leave the window, as
    /// monotonic readings; `None` when nothing is counted.
    fn exits(&self) -> Option<(Duration, Duration)> {
        if self.total == 0 {
            return None;
        }
        let oldest =
            (self.newest.saturating_sub(SLOTS as u64 - 1)..=self.newest).find(|&s| self.has(s))?;
        let newest = (oldest..=self.newest).rev().find(|&s| self.has(s))?;
        Some((
            Duration::from_secs(oldest + WINDOW_SECS),
            Duration::from_secs(newest + WINDOW_SECS),
        ))
    }

    /// Takes back the most recently counted request (one a later check
    /// refused after this window had counted it). Nothing when none is
    /// counted. When time passed into a new second in between, a request of
    /// the newest second may be taken back instead: the same count, its
    /// exit at most a second different.
    pub fn uncount(&mut self) {
        let newest = self.newest;
        if let Some(s) = (newest.saturating_sub(SLOTS as u64 - 1)..=newest)
            .rev()
            .find(|&s| self.has(s))
        {
            let slot = slot_of(s);
            self.counts.set(slot, self.counts.get(slot) - 1);
            self.total -= 1;
        }
    }

    /// Counts one request at `now` if fewer than `limit` are in the window,
    /// and says what the caller may tell the client either way.
    pub fn check(&mut self, limit: u32, now: Duration) -> RateDecision {
        self.slide(now);
        if self.total < u64::from(limit) {
            self.bump(self.newest, 1);
            let reset = self
                .exits()
                .map_or(Duration::ZERO, |(_, last)| last.saturating_sub(now));
            RateDecision {
                limit,
                remaining: limit - u32::try_from(self.total).unwrap_or(limit),
                reset,
                retry_after: None,
            }
        } else {
            let (first, last) = self.exits().unwrap_or((now + WINDOW, now + WINDOW));
            RateDecision {
                limit,
                remaining: 0,
                reset: last.saturating_sub(now),
                retry_after: Some(whole_seconds_until(first, now)),
            }
        }
    }
}

/// Every subject's rate-limit state on this replica (keys by id, or
/// whatever `K` names), created on a subject's first request and dropped by
/// [`sweep`](Self::sweep) once nothing it counted is in the window any more
/// (it then has its full allowance back, as it would with no state).
/// Replicas do not share it: each counts its own requests.
///
/// A window lives in the map itself, not behind an `Arc<Mutex<_>>` in a
/// cache: at 100,000 keys that kept about 630 bytes a key (the cache's
/// bookkeeping and the allocation), where the map kept about 380 with
/// four-byte slots (two-byte ones, `Counts`, take 120 fewer).
pub struct RateLimits<K = Uuid> {
    windows: DashMap<K, Window>,
    clock: Arc<dyn Clock>,
}

impl<K: Hash + Eq + Send + Sync + Clone + 'static> RateLimits<K> {
    /// Windows on `clock`'s monotonic reading.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            windows: DashMap::new(),
            clock,
        }
    }

    /// Counts one request against `subject`'s allowance of `per_minute` if
    /// it is within it. A changed limit applies at once to what is already
    /// counted: lowering it below the count refuses until enough requests
    /// have left the window.
    pub fn check(&self, subject: &K, per_minute: NonZeroU32) -> RateDecision {
        let now = self.clock.monotonic();
        // The shard's lock is held for a few additions; never across an
        // await. One window per subject even when many first requests
        // arrive at once: `entry` makes it under that lock.
        if let Some(mut window) = self.windows.get_mut(subject) {
            return window.check(per_minute.get(), now);
        }
        self.windows
            .entry(subject.clone())
            .or_default()
            .check(per_minute.get(), now)
    }

    /// Takes back one request [`check`](Self::check) allowed for `subject`
    /// just now, when a later check refused the request after all (see
    /// [`Window::uncount`]).
    pub fn uncount(&self, subject: &K) {
        if let Some(mut window) = self.windows.get_mut(subject) {
            window.uncount();
        }
    }

    /// Drops every window with nothing left in it, so memory holds only the
    /// subjects counted in the last minute or so. Call it about once a
    /// minute; each shard is locked in turn, never all at once.
    pub fn sweep(&self) {
        let now = self.clock.monotonic();
        self.windows.retain(|_, window| window.count(now) > 0);
    }

    /// Subjects with a window.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no subject has a window.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration as ChronoDuration};

    use super::*;
    use crate::clock::ManualClock;

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new(
            DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        ))
    }

    fn limits(clock: &Arc<ManualClock>) -> RateLimits {
        RateLimits::new(clock.clone())
    }

    /// `check` with a plain number, for short tests.
    trait Check {
        fn at(&self, key: Uuid, per_minute: u32) -> RateDecision;
    }

    impl Check for RateLimits {
        fn at(&self, key: Uuid, per_minute: u32) -> RateDecision {
            self.check(&key, NonZeroU32::new(per_minute).unwrap())
        }
    }

    fn allowed(d: RateDecision) -> bool {
        d.retry_after.is_none()
    }

    #[test]
    fn a_full_window_at_once_then_nothing_until_it_has_passed() {
        let clock = clock();
        let l = limits(&clock);
        let key = Uuid::new_v4();
        for i in (0..100).rev() {
            let d = l.at(key, 100);
            assert_eq!((d.retry_after, d.remaining, d.limit), (None, i, 100));
        }
        let denied = l.at(key, 100);
        assert_eq!(denied.retry_after, Some(Duration::from_secs(60)));
        assert_eq!(
            (denied.remaining, denied.reset),
            (0, Duration::from_secs(60))
        );

        clock.advance(ChronoDuration::seconds(59));
        let denied = l.at(key, 100);
        assert_eq!(denied.retry_after, Some(Duration::from_secs(1)));
        clock.advance(ChronoDuration::milliseconds(999));
        assert!(
            !allowed(l.at(key, 100)),
            "59.999 s: still within the window"
        );

        clock.advance(ChronoDuration::milliseconds(1));
        let d = l.at(key, 100);
        assert!(allowed(d), "at 60 s the first 100 have left the window");
        assert_eq!(d.remaining, 99, "exactly L again, not 2L - 1");
    }

    #[test]
    fn a_sweep_drops_only_windows_with_nothing_left_in_them() {
        let clock = clock();
        let l = limits(&clock);
        let (idle, busy) = (Uuid::new_v4(), Uuid::new_v4());
        for _ in 0..10 {
            l.at(idle, 10);
        }
        clock.advance(ChronoDuration::seconds(30));
        l.at(busy, 10);
        l.sweep();
        assert_eq!(l.len(), 2, "both still count requests");
        assert!(!allowed(l.at(idle, 10)), "idle is still at its limit");

        // 61 s after idle's requests they have left the window; busy's one
        // request has 29 s to go.
        clock.advance(ChronoDuration::seconds(31));
        l.sweep();
        assert_eq!(l.len(), 1, "only busy is kept");
        assert_eq!(l.at(busy, 10).remaining, 8, "busy kept its count");
        let fresh = l.at(idle, 10);
        assert_eq!(
            fresh.remaining, 9,
            "idle starts over with its full allowance"
        );
    }

    #[test]
    fn no_sixty_second_span_holds_more_than_the_limit() {
        // Requests every 100 ms for 5 minutes: count the allowed ones in
        // every 60 s span ending at an allowed request.
        let clock = clock();
        let l = limits(&clock);
        let key = Uuid::new_v4();
        let mut allowed_at = Vec::new();
        for tick in 0..3000u64 {
            if allowed(l.at(key, 10)) {
                allowed_at.push(tick * 100);
            }
            clock.advance(ChronoDuration::milliseconds(100));
        }
        for (i, end) in allowed_at.iter().enumerate() {
            let in_span = allowed_at[..=i]
                .iter()
                .filter(|t| **t + 60_000 > *end)
                .count();
            assert!(in_span <= 10, "{in_span} in the 60 s before {end} ms");
        }
        // And the window is not stingy: 10 per 60-61 s over 5 minutes.
        assert!(allowed_at.len() >= 10 * 4, "{}", allowed_at.len());
    }

    #[test]
    fn a_request_counts_until_sixty_seconds_after_its_second_ends() {
        let w = &mut Window::new();
        let at = |ms: u64| Duration::from_millis(ms);
        assert!(w.check(1, at(500)).retry_after.is_none());
        // Made in second (0, 1]: counts until 61 s.
        assert_eq!(
            w.check(1, at(60_500)).retry_after,
            Some(Duration::from_secs(1))
        );
        assert_eq!(w.count(at(60_999)), 1);
        assert_eq!(w.count(at(61_000)), 0);
        assert!(w.check(1, at(61_000)).retry_after.is_none());
        // A long idle gap forgets everything.
        assert_eq!(w.count(at(10_000_000)), 0);
    }

    #[test]
    fn counts_from_elsewhere_keep_their_seconds() {
        let now = Duration::from_millis(100_500);
        // Second 41 left at 101 s; 42 is the oldest still in.
        assert_eq!(Window::oldest_live_second(now), 41);
        let mut w = Window::from_counts([(40, 5), (41, 1), (42, 2), (101, 3), (500, 9)], now);
        assert_eq!(w.count(now), 6, "second 40 has left; 500 is not yet");
        w.add(now, 2);
        assert_eq!(w.count(now), 8);
        assert_eq!(w.count(Duration::from_secs(101)), 7, "41 leaves at 101 s");
        let d = w.check(7, Duration::from_secs(101));
        assert_eq!(
            d.retry_after,
            Some(Duration::from_secs(1)),
            "42 leaves at 102 s"
        );
    }

    #[test]
    fn a_second_past_two_bytes_of_requests_keeps_every_count() {
        let now = Duration::from_millis(100_500);
        let mut w = Window::from_counts([(80, 3)], now);
        w.add(now, u32::from(u16::MAX));
        assert_eq!(w.count(now), 3 + 65_535);
        w.add(now, 10);
        assert_eq!(w.count(now), 3 + 65_545, "the window widened, nothing lost");
        let d = w.check(1_000_000, now);
        assert_eq!(d.remaining, 1_000_000 - 65_549);
        w.uncount();
        assert_eq!(w.count(now), 3 + 65_545, "the last one taken back");
        // Second 80 leaves at 140 s, the busy second 101 at 161 s.
        assert_eq!(w.count(Duration::from_secs(140)), 65_545);
        assert_eq!(w.count(Duration::from_secs(161)), 0);
    }

    #[test]
    fn a_window_takes_half_the_bytes_of_four_byte_slots() {
        // Every key used within a minute holds one (see `Counts`).
        assert!(
            std::mem::size_of::<Window>() <= 144,
            "{} bytes",
            std::mem::size_of::<Window>()
        );
    }

    #[test]
    fn concurrent_first_requests_share_one_allowance() {
        let clock = clock();
        // Many rounds: the race is between the first requests of a new key.
        for _ in 0..50 {
            let l = Arc::new(limits(&clock));
            let key = Uuid::new_v4();
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let allowed: usize = (0..8)
                .map(|_| {
                    let (l, barrier) = (l.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        (0..10).filter(|_| allowed(l.at(key, 20))).count()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum();
            assert_eq!(allowed, 20);
        }
    }

    #[test]
    fn a_wall_clock_stepped_back_limits_no_further() {
        let clock = clock();
        let l = limits(&clock);
        let key = Uuid::new_v4();
        for _ in 0..5 {
            assert!(allowed(l.at(key, 5)));
        }
        let before = l.at(key, 5).retry_after.unwrap();
        clock.step_wall(-ChronoDuration::hours(1));
        let after = l.at(key, 5).retry_after.unwrap();
        assert_eq!(after, before, "the step changes nothing");
        clock.advance(ChronoDuration::seconds(60));
        assert!(allowed(l.at(key, 5)), "allowances still come back");
        // Forward too: a step is not time passing, so nothing leaves the window.
        for _ in 0..4 {
            assert!(allowed(l.at(key, 5)));
        }
        clock.step_wall(ChronoDuration::hours(1));
        assert!(!allowed(l.at(key, 5)));
    }

    #[test]
    fn changes_apply_at_once() {
        let clock = clock();
        let l = limits(&clock);
        let key = Uuid::new_v4();
        assert_eq!(l.at(key, 3).limit, 3);
        assert_eq!(l.at(key, 2).limit, 2);
        assert!(allowed(l.at(key, 3)));
        assert!(!allowed(l.at(key, 3)), "three counted under any limit");
        assert!(allowed(l.at(key, 4)), "a raised limit applies at once");
    }

    #[test]
    fn an_uncounted_request_gives_its_place_back() {
        let clock = clock();
        let l = limits(&clock);
        let key = Uuid::new_v4();
        assert!(allowed(l.at(key, 2)));
        assert!(allowed(l.at(key, 2)));
        l.uncount(&key);
        let d = l.at(key, 2);
        assert!(allowed(d), "the taken-back request no longer counts");
        assert!(!allowed(l.at(key, 2)));
        // Nothing to take back: nothing happens.
        let fresh = Uuid::new_v4();
        l.uncount(&fresh);
        assert_eq!(l.at(fresh, 1).remaining, 0);
    }

    #[test]
    fn windows_are_per_subject_of_any_key_type() {
        let clock = clock();
        let l: RateLimits<String> = RateLimits::new(clock.clone());
        let one = NonZeroU32::new(1).unwrap();
        assert!(allowed(l.check(&"org_a".to_owned(), one)));
        assert!(!allowed(l.check(&"org_a".to_owned(), one)));
        assert!(allowed(l.check(&"org_b".to_owned(), one)));
    }

    #[test]
    fn allowances_order_by_power_and_read_back() {
        let n = |n| Allowance::PerMinute(NonZeroU32::new(n).unwrap());
        assert!(n(1) < n(1_000_000));
        assert!(n(1_000_000) < Allowance::Unlimited);
        for a in [n(100), n(1), Allowance::Unlimited] {
            assert_eq!(Allowance::parse_setting(&a.setting_text()), Ok(a));
        }
        assert_eq!(Allowance::parse_setting("OFF"), Ok(Allowance::Unlimited));
        assert!(Allowance::parse_setting("0").is_err());
        assert!(Allowance::parse_setting("lots").is_err());
        assert_eq!(Allowance::DEFAULT.setting_text(), "100");
        assert_eq!(n(7).to_string(), "7 per minute");
        assert_eq!(Allowance::Unlimited.to_string(), "unlimited");
    }
}
