//! Where Authorize counts requests: one small interface, so a counter shared
//! by every replica can take the place of this replica's own without the
//! Authorize path changing.

use std::num::NonZeroU32;
use std::sync::Arc;

use keygate_core::clock::Clock;
use keygate_core::limits::{RateDecision, RateLimits};
use uuid::Uuid;

use super::shared_limits::SharedLimits;

/// What a rate limit is counted for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// One key, by id.
    Key(Uuid),
    /// Every key of one organization together, by organization id.
    Organization(Arc<str>),
}

/// Counts requests against allowances on a rolling 60-second window: this
/// replica's own windows, or windows shared with every replica through Redis
/// (`--rate-limit-store`).
///
/// Called on the Authorize hot path (per request at most two checks and one
/// uncount). Neither waits on I/O, except that a shared check at its
/// replica's share of a window waits for one background sync (at most
/// `shared_limits::SYNC_WAIT`).
pub enum Limiter {
    /// Each replica counts its own requests.
    Local(Arc<LocalLimiter>),
    /// Counts shared through Redis.
    Shared(Arc<SharedLimits>),
}

impl Limiter {
    /// Counts one request against `subject`'s allowance of `per_minute` if
    /// it is within it, and says what the client may be told either way
    /// (`retry_after` set: refused, and nothing was counted). A changed
    /// `per_minute` applies at once to what is already counted.
    pub async fn check(&self, subject: &Subject, per_minute: NonZeroU32) -> RateDecision {
        match self {
            Limiter::Local(local) => local.windows.check(subject, per_minute),
            Limiter::Shared(shared) => shared.check(subject, per_minute.get()).await,
        }
    }

    /// Takes back one request that [`check`](Self::check) allowed for
    /// `subject` a moment ago, because a later check refused the request:
    /// only what is allowed counts.
    pub fn uncount(&self, subject: &Subject) {
        match self {
            Limiter::Local(local) => local.windows.uncount(subject),
            Limiter::Shared(shared) => shared.uncount(subject),
        }
    }
}

/// Every subject's window in this replica's memory: with several replicas,
/// each allows a subject its full allowance.
pub struct LocalLimiter {
    windows: RateLimits<Subject>,
}

impl LocalLimiter {
    /// Windows on `clock`'s monotonic reading.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            windows: RateLimits::new(clock),
        }
    }

    /// Drops the windows with nothing left in them (see [`RateLimits::sweep`]).
    pub fn sweep(&self) {
        self.windows.sweep();
    }

    /// Subjects with a window in memory.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no subject has a window in memory.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}
