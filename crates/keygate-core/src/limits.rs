//! Per-key rate limits: GCRA (governor) with each key's own allowance per
//! minute, on the injected clock's monotonic reading.
//!
//! A key limited to L per minute may burst L requests and then gets one more
//! every 60/L seconds: there is no fixed window, so no 2× burst at a minute
//! boundary. State is per replica and kept only for keys used in the last
//! few minutes, so memory stays bounded.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use moka::sync::Cache;
use uuid::Uuid;

use crate::clock::Clock;

/// The domain clock as governor sees it: its monotonic reading, so a wall
/// clock stepped back does not push every key's next allowance into the
/// future (nor a step forward hand out full allowances).
#[derive(Clone)]
struct GovernorClock(Arc<dyn Clock>);

impl governor::clock::Clock for GovernorClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.0.monotonic()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, GovernorClock, StateInformationMiddleware>;

struct KeyLimiter {
    per_minute: u32,
    limiter: Limiter,
}

/// The answer for one request that passed every other check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// The key's allowance, in requests per minute (its own, or the default).
    pub limit: u32,
    /// Requests the key may still make at once after this one; 0 when refused.
    pub remaining: u32,
    /// Until the full allowance is back.
    pub reset: Duration,
    /// Set when the request is over the limit: whole seconds, never 0.
    pub retry_after: Option<Duration>,
}

/// Requests per minute for a key whose own limit is 0, unless the server is
/// told otherwise (`--default-rate-limit`).
pub const DEFAULT_RATE_LIMIT: NonZeroU32 = NonZeroU32::new(100).expect("100 is not 0");

/// Every key's rate-limit state on this replica, created on a key's first
/// request and dropped once it has been idle long enough to have its full
/// allowance back. Replicas do not share it: each counts its own requests.
pub struct RateLimits {
    keys: Cache<Uuid, Arc<KeyLimiter>>,
    clock: GovernorClock,
    default_per_minute: NonZeroU32,
}

impl RateLimits {
    /// `default_per_minute` applies to keys whose own limit is 0.
    pub fn new(default_per_minute: NonZeroU32, clock: Arc<dyn Clock>) -> Self {
        Self {
            // A key idle for longer than a full window has a full allowance
            // again, so its state can go.
            keys: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_idle(Duration::from_secs(120))
                .build(),
            clock: GovernorClock(clock),
            default_per_minute,
        }
    }

    /// Counts one request against `key_id`'s allowance of `per_minute` (0:
    /// the default). A changed limit takes effect at once.
    pub fn check(&self, key_id: Uuid, per_minute: u32) -> RateDecision {
        let limit = NonZeroU32::new(per_minute).unwrap_or(self.default_per_minute);
        let entry = match self.keys.get(&key_id) {
            Some(entry) if entry.per_minute == limit.get() => entry,
            // First use, or a changed limit: exactly one limiter wins, even
            // when many first requests arrive at once (moka runs one `init`
            // per key and hands the others its result).
            _ => self
                .keys
                .entry(key_id)
                .or_insert_with_if(
                    || {
                        Arc::new(KeyLimiter {
                            per_minute: limit.get(),
                            limiter: RateLimiter::direct_with_clock(
                                Quota::per_minute(limit),
                                self.clock.clone(),
                            )
                            .with_middleware::<StateInformationMiddleware>(),
                        })
                    },
                    |existing| existing.per_minute != limit.get(),
                )
                .into_value(),
        };
        let interval = Quota::per_minute(limit).replenish_interval();
        match entry.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                RateDecision {
                    limit: limit.get(),
                    remaining,
                    reset: interval * (limit.get() - remaining),
                    retry_after: None,
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(&self.clock));
                let retry_after =
                    Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                        .max(Duration::from_secs(1));
                RateDecision {
                    limit: limit.get(),
                    remaining: 0,
                    reset: interval * limit.get(),
                    retry_after: Some(retry_after),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Duration as ChronoDuration};

    use super::*;
    use crate::clock::ManualClock;

    fn limits(clock: &Arc<ManualClock>) -> RateLimits {
        RateLimits::new(NonZeroU32::new(100).unwrap(), clock.clone())
    }

    #[test]
    fn five_per_minute_then_429_then_refills_as_time_passes() {
        let clock = Arc::new(ManualClock::new(
            DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        ));
        let l = limits(&clock);
        let key = Uuid::new_v4();
        for i in (0..5).rev() {
            let d = l.check(key, 5);
            assert_eq!((d.retry_after, d.remaining, d.limit), (None, i, 5));
        }
        let denied = l.check(key, 5);
        let retry = denied.retry_after.unwrap();
        assert!((1..=60).contains(&retry.as_secs()), "{retry:?}");
        assert_eq!(retry.subsec_nanos(), 0, "whole seconds");
        clock.advance(ChronoDuration::seconds(12));
        assert_eq!(
            l.check(key, 5).retry_after,
            None,
            "one allowance back after 60/5 s"
        );
        assert!(l.check(key, 5).retry_after.is_some());
    }

    #[test]
    fn concurrent_first_requests_share_one_allowance() {
        let clock = Arc::new(ManualClock::new(
            DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        ));
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
                        (0..10)
                            .filter(|_| l.check(key, 20).retry_after.is_none())
                            .count()
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
        let clock = Arc::new(ManualClock::new(
            DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        ));
        let l = limits(&clock);
        let key = Uuid::new_v4();
        for _ in 0..5 {
            assert_eq!(l.check(key, 5).retry_after, None);
        }
        let before = l.check(key, 5).retry_after.unwrap();
        clock.step_wall(-ChronoDuration::hours(1));
        let after = l.check(key, 5).retry_after.unwrap();
        assert_eq!(after, before, "the step changes nothing");
        clock.advance(ChronoDuration::seconds(12));
        assert_eq!(
            l.check(key, 5).retry_after,
            None,
            "allowances still come back"
        );
        assert!(
            l.check(key, 5).retry_after.is_some(),
            "and the limit still holds"
        );
        // Forward too: a step is not time passing, so no allowance comes back.
        clock.step_wall(ChronoDuration::hours(1));
        assert!(l.check(key, 5).retry_after.is_some());
    }

    #[test]
    fn zero_means_the_default_and_changes_apply_at_once() {
        let clock = Arc::new(ManualClock::new(
            DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
        ));
        let l = limits(&clock);
        let key = Uuid::new_v4();
        assert_eq!(l.check(key, 0).limit, 100);
        assert_eq!(l.check(key, 2).limit, 2);
        l.check(key, 2);
        assert!(l.check(key, 2).retry_after.is_some());
    }
}
