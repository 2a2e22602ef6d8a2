//! Whether a follower of the event log may trust what it remembers.
//!
//! A keygate replica and a gateway's `CachedAuthorizer` both keep answers in
//! memory that are right only as long as they hear every change. Both use
//! [`Contact`] for "when did I last hear from the log, and is that recent
//! enough", and [`Epoch`] for "did anything change while I was asking".

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Clock;

/// When the log was last heard from, and how long that stays good. A
/// follower out of touch for longer than `max_silence` cannot know what
/// changed meanwhile, so it must not answer from memory. Time is the
/// clock's monotonic reading, so a wall-clock step changes nothing.
pub struct Contact {
    clock: Arc<dyn Clock>,
    /// Monotonic milliseconds of the latest contact, plus one; 0 = never.
    last: AtomicU64,
    max_silence: Duration,
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contact")
            .field("fresh", &self.is_fresh())
            .field("max_silence", &self.max_silence)
            .finish()
    }
}

fn mark(at: Duration) -> u64 {
    u64::try_from(at.as_millis()).unwrap_or(u64::MAX - 1) + 1
}

impl Contact {
    /// In touch as of now: a replica has just read the log when it starts.
    pub fn in_touch(max_silence: Duration, clock: Arc<dyn Clock>) -> Self {
        let contact = Self::out_of_touch(max_silence, clock);
        contact.heard_at(contact.now());
        contact
    }

    /// Not in touch until the log is first heard from.
    pub fn out_of_touch(max_silence: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            last: AtomicU64::new(0),
            max_silence,
        }
    }

    /// The clock's monotonic reading, to pass to [`Contact::heard_at`] later
    /// (a read of the log is in touch as of when it began).
    pub fn now(&self) -> Duration {
        self.clock.monotonic()
    }

    /// The log was heard from as it was at `at` (a [`Contact::now`] reading).
    /// Never moves back.
    pub fn heard_at(&self, at: Duration) {
        self.last.fetch_max(mark(at), Ordering::AcqRel);
    }

    /// The log was heard from just now.
    pub fn heard_now(&self) {
        self.heard_at(self.now());
    }

    /// Out of touch from now until the log is heard from again (a stream
    /// that broke: what arrives next may come after a gap).
    pub fn lost(&self) {
        self.last.store(0, Ordering::Release);
    }

    /// Whether the last contact is at most `max_silence` ago.
    pub fn is_fresh(&self) -> bool {
        let last = self.last.load(Ordering::Acquire);
        last != 0
            && u128::from(mark(self.now()).saturating_sub(last)) <= self.max_silence.as_millis()
    }

    /// Longest silence after which memory is no longer trusted.
    pub fn max_silence(&self) -> Duration {
        self.max_silence
    }
}

/// A counter of invalidations. An answer fetched while one happened may
/// predate the change, so it is served but not remembered:
/// `let seen = epoch.current(); …fetch…; if epoch.unchanged_since(seen) { keep }`.
#[derive(Debug, Default)]
pub struct Epoch(AtomicU64);

/// A reading of an [`Epoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochMark(u64);

impl Epoch {
    /// The current reading, taken before a fetch.
    pub fn current(&self) -> EpochMark {
        EpochMark(self.0.load(Ordering::SeqCst))
    }

    /// Something changed: answers fetched across this are not kept.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether nothing changed since `mark` was taken.
    pub fn unchanged_since(&self, mark: EpochMark) -> bool {
        self.current() == mark
    }
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;
    use crate::clock::ManualClock;

    fn clock() -> Arc<ManualClock> {
        Arc::new(ManualClock::new(DateTime::UNIX_EPOCH))
    }

    #[test]
    fn contact_starts_as_told_and_can_be_lost() {
        let fresh = Contact::in_touch(Duration::from_secs(60), clock());
        assert!(fresh.is_fresh());
        fresh.lost();
        assert!(!fresh.is_fresh());
        fresh.heard_now();
        assert!(fresh.is_fresh());

        let never = Contact::out_of_touch(Duration::from_secs(60), clock());
        assert!(!never.is_fresh());
        never.heard_now();
        assert!(never.is_fresh());
    }

    #[test]
    fn contact_goes_stale_after_max_silence_and_never_moves_back() {
        let clock = clock();
        let contact = Contact::in_touch(Duration::from_secs(10), clock.clone());
        let began = contact.now();
        clock.advance(chrono::Duration::seconds(10));
        assert!(contact.is_fresh(), "exactly max_silence is still fresh");
        clock.advance(chrono::Duration::milliseconds(1));
        assert!(!contact.is_fresh());
        // A read that began before the silence still counts as of its start.
        contact.heard_at(began + Duration::from_secs(5));
        assert!(contact.is_fresh());
        contact.heard_at(began);
        clock.advance(chrono::Duration::seconds(4));
        assert!(
            contact.is_fresh(),
            "an older contact does not move the mark back"
        );
        clock.advance(chrono::Duration::seconds(2));
        assert!(!contact.is_fresh());
    }

    #[test]
    fn epochs_tell_whether_anything_changed() {
        let epoch = Epoch::default();
        let seen = epoch.current();
        assert!(epoch.unchanged_since(seen));
        epoch.bump();
        assert!(!epoch.unchanged_since(seen));
    }
}
