//! Where the Authorize path counts requests: this replica's own windows, or
//! windows shared with every replica through Redis.

use std::num::NonZeroU32;
use std::sync::Arc;

use keygate_core::clock::Clock;
use keygate_core::limits::{RateDecision, RateLimits};
use uuid::Uuid;

use super::shared_limits::SharedLimits;

/// The rate limiter of one replica.
pub enum Limiter {
    /// Each replica counts its own requests (no `--rate-limit-store`).
    Local(RateLimits),
    /// Counts shared through Redis, with `default` for keys whose limit is 0.
    Shared {
        /// The shared windows.
        shared: Arc<SharedLimits>,
        /// Requests per minute for keys whose own limit is 0.
        default: NonZeroU32,
    },
}

impl Limiter {
    /// Per-replica windows; `default` applies to keys whose own limit is 0.
    pub fn local(default: NonZeroU32, clock: Arc<dyn Clock>) -> Self {
        Limiter::Local(RateLimits::new(default, clock))
    }

    /// Counts one request of `key_id` against `per_minute` (0: the default).
    pub async fn check_key(&self, key_id: Uuid, per_minute: u32) -> RateDecision {
        match self {
            Limiter::Local(limits) => limits.check(key_id, per_minute),
            Limiter::Shared { shared, default } => {
                let limit = NonZeroU32::new(per_minute).unwrap_or(*default).get();
                // "k:" and the hyphenated id, on the stack: no allocation per request.
                let mut buf = [0u8; 2 + uuid::fmt::Hyphenated::LENGTH];
                buf[..2].copy_from_slice(b"k:");
                key_id.hyphenated().encode_lower(&mut buf[2..]);
                let name = std::str::from_utf8(&buf).unwrap_or("k:");
                shared.check(name, limit).await
            }
        }
    }
}
