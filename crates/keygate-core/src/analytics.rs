//! Usage analytics: how many Authorize calls each key made, allowed and
//! denied by reason, in per-minute and per-hour buckets.
//!
//! Replicas count in memory and add their counts to the store's buckets, so
//! a bucket holds the sum over every replica. Only an outcome that happened
//! has a row: a key without traffic has none.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::decision::DenyReason;

/// How wide a usage bucket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One minute; kept for `--usage-minute-retention` (48 hours by default).
    Minute,
    /// One hour; kept for `--usage-hour-retention` (90 days by default).
    Hour,
}

impl Granularity {
    /// Both, finest first.
    pub const ALL: [Granularity; 2] = [Granularity::Minute, Granularity::Hour];

    /// The bucket width.
    pub fn width(self) -> Duration {
        match self {
            Granularity::Minute => Duration::minutes(1),
            Granularity::Hour => Duration::hours(1),
        }
    }

    /// How the store names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
        }
    }

    /// The start of the bucket `t` falls in (buckets are aligned on the
    /// unix epoch, so on whole minutes and hours of UTC).
    pub fn bucket_start(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let width = self.width().num_seconds();
        let start = t.timestamp().div_euclid(width) * width;
        DateTime::from_timestamp(start, 0).unwrap_or(t)
    }
}

/// What happened to one counted call: `None` allowed, `Some` denied.
pub type Outcome = Option<DenyReason>;

/// How many outcomes there are: ALLOW and every deny reason.
pub const OUTCOMES: usize = DenyReason::ALL.len() + 1;

/// The outcome's slot in a `[_; OUTCOMES]` array: 0 is ALLOW, then the
/// deny reasons in [`DenyReason::ALL`] order.
pub fn outcome_index(outcome: Outcome) -> usize {
    match outcome {
        None => 0,
        Some(reason) => {
            1 + DenyReason::ALL
                .iter()
                .position(|r| *r == reason)
                .unwrap_or(0)
        }
    }
}

/// The outcome in slot `index` (see [`outcome_index`]); `None` past the end.
pub fn outcome_at(index: usize) -> Option<Outcome> {
    match index {
        0 => Some(None),
        i => DenyReason::ALL.get(i - 1).map(|r| Some(*r)),
    }
}

/// `ALLOW`, or the deny reason's code (`INSUFFICIENT_SCOPE`, …): how the
/// store and people name an outcome.
pub fn outcome_code(outcome: Outcome) -> &'static str {
    outcome.map_or("ALLOW", DenyReason::code)
}

/// The outcome [`outcome_code`] names; `None` for an unknown code.
pub fn parse_outcome(code: &str) -> Option<Outcome> {
    if code == "ALLOW" {
        return Some(None);
    }
    DenyReason::ALL
        .into_iter()
        .find(|r| r.code() == code)
        .map(Some)
}

/// Calls to add to one bucket of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCount {
    /// The key the calls named.
    pub key_id: Uuid,
    /// The key's organization (`None`: a SYSTEM key), to find an
    /// organization's usage without its keys.
    pub organization_id: Option<String>,
    /// The bucket's width.
    pub granularity: Granularity,
    /// The bucket's start ([`Granularity::bucket_start`]).
    pub start: DateTime<Utc>,
    /// What happened to the calls.
    pub outcome: Outcome,
    /// How many; never 0.
    pub count: u64,
}

/// The per-hour counts that per-minute `counts` add up to: one entry per
/// (key, hour, outcome), so a batch never names a row twice, in that order.
/// Sorted references folded in place rather than a map: a flush of 100,000
/// keys' minutes built a 15 MB map here.
pub fn hourly(counts: &[UsageCount]) -> Vec<UsageCount> {
    let mut sorted: Vec<(Uuid, DateTime<Utc>, usize, &UsageCount)> = counts
        .iter()
        .map(|c| {
            (
                c.key_id,
                Granularity::Hour.bucket_start(c.start),
                outcome_index(c.outcome),
                c,
            )
        })
        .collect();
    sorted.sort_unstable_by_key(|&(key, start, outcome, _)| (key, start, outcome));
    let mut out: Vec<UsageCount> = Vec::new();
    for (key, start, outcome, c) in sorted {
        match out.last_mut() {
            Some(h) if (h.key_id, h.start, outcome_index(h.outcome)) == (key, start, outcome) => {
                h.count += c.count;
            }
            _ => out.push(UsageCount {
                granularity: Granularity::Hour,
                start,
                ..c.clone()
            }),
        }
    }
    out
}

/// One bucket of one key, as GetKeyUsage returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    /// The key.
    pub key_id: Uuid,
    /// The bucket's start.
    pub start: DateTime<Utc>,
    /// Calls per outcome, indexed by [`outcome_index`].
    pub counts: [u64; OUTCOMES],
}

impl UsageBucket {
    /// Allowed calls.
    pub fn allowed(&self) -> u64 {
        self.counts[0]
    }

    /// Denied calls per reason, only the reasons that happened, in
    /// [`DenyReason::ALL`] order.
    pub fn denied(&self) -> Vec<(DenyReason, u64)> {
        DenyReason::ALL
            .into_iter()
            .zip(&self.counts[1..])
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (r, *n))
            .collect()
    }

    /// Every call, allowed or denied.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Groups stored rows (key, bucket start, outcome, count) into buckets, in
/// (key, start) order.
pub fn buckets(
    rows: impl IntoIterator<Item = (Uuid, DateTime<Utc>, Outcome, u64)>,
) -> Vec<UsageBucket> {
    let mut by: std::collections::BTreeMap<(Uuid, DateTime<Utc>), [u64; OUTCOMES]> =
        std::collections::BTreeMap::new();
    for (key_id, start, outcome, count) in rows {
        by.entry((key_id, start)).or_insert([0; OUTCOMES])[outcome_index(outcome)] += count;
    }
    by.into_iter()
        .map(|((key_id, start), counts)| UsageBucket {
            key_id,
            start,
            counts,
        })
        .collect()
}

/// Most bucket widths one GetKeyUsage range may span: 48 hours of minutes,
/// 120 days of hours.
pub const MAX_BUCKETS: i64 = 2880;

/// A time range of whole buckets, `start` inclusive, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRange {
    /// The first bucket's start.
    pub start: DateTime<Utc>,
    /// The end of the last bucket.
    pub end: DateTime<Utc>,
    /// The bucket width.
    pub granularity: Granularity,
}

/// Why a usage range is refused, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct RangeError {
    /// `start` or `end`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl UsageRange {
    /// The buckets from the one `start` falls in up to the one `end` falls
    /// in (a partial last bucket is included). `end` must be after `start`,
    /// and at most [`MAX_BUCKETS`] bucket widths after it (so the aligned
    /// range spans at most one bucket more).
    pub fn new(
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        granularity: Granularity,
    ) -> Result<Self, RangeError> {
        if end <= start {
            return Err(RangeError {
                field: "end",
                reason: "must be after start".into(),
            });
        }
        let widest = granularity.width() * i32::try_from(MAX_BUCKETS).unwrap_or(i32::MAX);
        if end - start > widest {
            return Err(RangeError {
                field: "end",
                reason: format!(
                    "must be at most {} hours after start for {} buckets ({MAX_BUCKETS} buckets)",
                    widest.num_hours(),
                    granularity.as_str()
                ),
            });
        }
        let first = granularity.bucket_start(start);
        let mut last = granularity.bucket_start(end);
        if last < end {
            last += granularity.width();
        }
        Ok(Self {
            start: first,
            end: last,
            granularity,
        })
    }

    /// How many buckets the range spans.
    pub fn len(&self) -> usize {
        usize::try_from(
            (self.end - self.start).num_seconds() / self.granularity.width().num_seconds(),
        )
        .unwrap_or(0)
    }

    /// Whether the range spans no bucket (never, for a range from [`Self::new`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every bucket start in the range, in order.
    pub fn starts(&self) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        (0..self.len())
            .map(|i| self.start + self.granularity.width() * i32::try_from(i).unwrap_or(0))
    }
}

/// How long usage buckets are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRetention {
    /// Per-minute buckets older than this are swept.
    pub minutes: std::time::Duration,
    /// Per-hour buckets older than this are swept.
    pub hours: std::time::Duration,
}

impl Default for UsageRetention {
    fn default() -> Self {
        Self {
            minutes: std::time::Duration::from_secs(48 * 3600),
            hours: std::time::Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl UsageRetention {
    /// How long buckets of `granularity` are kept.
    pub fn of(&self, granularity: Granularity) -> std::time::Duration {
        match granularity {
            Granularity::Minute => self.minutes,
            Granularity::Hour => self.hours,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn buckets_align_on_minutes_and_hours() {
        let t = at("2026-03-01T10:17:42.5Z");
        assert_eq!(
            Granularity::Minute.bucket_start(t),
            at("2026-03-01T10:17:00Z")
        );
        assert_eq!(
            Granularity::Hour.bucket_start(t),
            at("2026-03-01T10:00:00Z")
        );
    }

    #[test]
    fn every_outcome_has_a_slot_and_a_code() {
        for i in 0..OUTCOMES {
            let o = outcome_at(i).unwrap();
            assert_eq!(outcome_index(o), i);
            assert_eq!(parse_outcome(outcome_code(o)), Some(o));
        }
        assert_eq!(outcome_at(OUTCOMES), None);
        assert_eq!(parse_outcome("NOPE"), None);
    }

    #[test]
    fn minutes_add_up_to_hours() {
        let key = Uuid::new_v4();
        let minute = |m: &str, outcome, count| UsageCount {
            key_id: key,
            organization_id: Some("org".into()),
            granularity: Granularity::Minute,
            start: at(m),
            outcome,
            count,
        };
        let hours = hourly(&[
            minute("2026-03-01T10:01:00Z", None, 5),
            minute("2026-03-01T10:59:00Z", None, 2),
            minute(
                "2026-03-01T10:59:00Z",
                Some(DenyReason::InsufficientScope),
                3,
            ),
            minute("2026-03-01T11:00:00Z", None, 1),
        ]);
        let got: Vec<_> = hours
            .iter()
            .map(|h| (h.start, h.outcome, h.count))
            .collect();
        assert_eq!(
            got,
            [
                (at("2026-03-01T10:00:00Z"), None, 7),
                (
                    at("2026-03-01T10:00:00Z"),
                    Some(DenyReason::InsufficientScope),
                    3
                ),
                (at("2026-03-01T11:00:00Z"), None, 1),
            ]
        );
        assert!(hours.iter().all(|h| h.granularity == Granularity::Hour));
    }

    #[test]
    fn rows_group_into_buckets() {
        let key = Uuid::new_v4();
        let t = at("2026-03-01T10:00:00Z");
        let b = buckets([
            (key, t, None, 5),
            (key, t, Some(DenyReason::InsufficientScope), 3),
        ]);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].allowed(), 5);
        assert_eq!(b[0].denied(), [(DenyReason::InsufficientScope, 3)]);
        assert_eq!(b[0].total(), 8);
    }

    #[test]
    fn ranges_are_whole_bounded_buckets() {
        let r = UsageRange::new(
            at("2026-03-01T10:17:42Z"),
            at("2026-03-01T10:20:01Z"),
            Granularity::Minute,
        )
        .unwrap();
        assert_eq!(r.start, at("2026-03-01T10:17:00Z"));
        assert_eq!(r.end, at("2026-03-01T10:21:00Z"));
        assert_eq!(r.len(), 4);
        assert_eq!(r.starts().last(), Some(at("2026-03-01T10:20:00Z")));
        let start = at("2026-03-01T00:00:00Z");
        assert!(UsageRange::new(start, start + Duration::hours(48), Granularity::Minute).is_ok());
        let e =
            UsageRange::new(start, start + Duration::hours(49), Granularity::Minute).unwrap_err();
        assert_eq!(e.field, "end");
        assert!(UsageRange::new(start, start + Duration::days(90), Granularity::Hour).is_ok());
        assert_eq!(
            UsageRange::new(start, start, Granularity::Hour)
                .unwrap_err()
                .field,
            "end"
        );
    }
}
