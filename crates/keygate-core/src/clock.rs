//! Time, injected, so expiry and grace periods are tested without sleeping.
//!
//! Two readings: the wall clock (`now`), for times that are stored or shown,
//! and a monotonic one (`monotonic`), for intervals such as rate limits, which
//! must not move when the wall clock is stepped (NTP, a VM resumed).

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use chrono::{DateTime, Duration, SubsecRound, Utc};

/// Where the domain reads the time; [`SystemClock`] in production,
/// [`ManualClock`] in tests.
pub trait Clock: Send + Sync + 'static {
    /// The wall-clock time; may jump back or forward when the system clock is set.
    fn now(&self) -> DateTime<Utc>;

    /// Time since an arbitrary fixed start (the same for the clock's whole
    /// life); never goes backwards, and does not follow wall-clock steps.
    fn monotonic(&self) -> std::time::Duration;
}

/// The real clock, to the microsecond: the precision the store keeps, so a
/// time reads back exactly as it was written.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now().trunc_subsecs(6)
    }

    fn monotonic(&self) -> std::time::Duration {
        // One start for the process, so every SystemClock agrees.
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<ManualTime>);

#[derive(Debug)]
struct ManualTime {
    wall: DateTime<Utc>,
    monotonic: std::time::Duration,
}

impl ManualClock {
    /// Wall time `start`; the monotonic reading starts at 0.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self(Mutex::new(ManualTime {
            wall: start,
            monotonic: std::time::Duration::ZERO,
        }))
    }

    /// Time passes: both readings move forward by `by` (a negative `by`
    /// moves the wall clock back, like [`ManualClock::step_wall`]).
    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.wall += by;
        if let Ok(elapsed) = by.to_std() {
            t.monotonic += elapsed;
        }
    }

    /// The wall clock is set (an NTP step, an operator): only `now` moves,
    /// forward or back; no time passes.
    pub fn step_wall(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.wall += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).wall
    }

    fn monotonic(&self) -> std::time::Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).monotonic
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wall_step_leaves_the_monotonic_reading_alone() {
        let start = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let clock = ManualClock::new(start);
        clock.advance(Duration::seconds(5));
        clock.step_wall(-Duration::hours(1));
        assert_eq!(
            clock.now(),
            start + Duration::seconds(5) - Duration::hours(1)
        );
        assert_eq!(clock.monotonic(), std::time::Duration::from_secs(5));
        clock.advance(-Duration::seconds(3));
        assert_eq!(
            clock.monotonic(),
            std::time::Duration::from_secs(5),
            "never back"
        );
    }

    #[test]
    fn the_system_clock_is_monotonic() {
        let (a, b) = (SystemClock.monotonic(), SystemClock.monotonic());
        assert!(b >= a);
    }
}
