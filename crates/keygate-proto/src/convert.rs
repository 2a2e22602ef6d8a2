//! Wire enums ↔ domain enums, timestamps and durations, and the one map from
//! a deny reason to its gRPC code.
//!
//! Domain → wire is `From`; wire → domain is `TryFrom` where the wire has an
//! `UNSPECIFIED` value the domain lacks, so the caller decides what it means.

use chrono::{DateTime, Utc};
use keygate_core::decision::{CredentialKind, DenyReason};
use keygate_core::event::EventKind;
use keygate_core::key::{KeyStatus, Mode, Tier};
use keygate_core::limits::LimitedBy;

use crate::v1 as pb;

impl From<Mode> for pb::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Live => pb::Mode::Live,
            Mode::Test => pb::Mode::Test,
        }
    }
}

/// A wire enum's `UNSPECIFIED`, which has no domain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unspecified")]
pub struct Unspecified;

impl TryFrom<pb::Mode> for Mode {
    type Error = Unspecified;

    fn try_from(m: pb::Mode) -> Result<Self, Unspecified> {
        match m {
            pb::Mode::Unspecified => Err(Unspecified),
            pb::Mode::Live => Ok(Mode::Live),
            pb::Mode::Test => Ok(Mode::Test),
        }
    }
}

impl From<CredentialKind> for pb::authorize_response::CredentialKind {
    fn from(k: CredentialKind) -> Self {
        match k {
            CredentialKind::ApiKey => Self::ApiKey,
            CredentialKind::Jwt => Self::Jwt,
        }
    }
}

impl From<Tier> for pb::KeyTier {
    fn from(t: Tier) -> Self {
        match t {
            Tier::Organization => pb::KeyTier::Organization,
            Tier::System => pb::KeyTier::System,
        }
    }
}

impl TryFrom<pb::KeyTier> for Tier {
    type Error = Unspecified;

    fn try_from(t: pb::KeyTier) -> Result<Self, Unspecified> {
        match t {
            pb::KeyTier::Unspecified => Err(Unspecified),
            pb::KeyTier::Organization => Ok(Tier::Organization),
            pb::KeyTier::System => Ok(Tier::System),
        }
    }
}

impl From<LimitedBy> for pb::authorize_response::LimitedBy {
    fn from(l: LimitedBy) -> Self {
        match l {
            LimitedBy::Key => Self::Key,
            LimitedBy::Organization => Self::Organization,
        }
    }
}

impl From<KeyStatus> for pb::KeyStatus {
    fn from(s: KeyStatus) -> Self {
        match s {
            KeyStatus::Active => pb::KeyStatus::Active,
            KeyStatus::Disabled => pb::KeyStatus::Disabled,
            KeyStatus::Revoked => pb::KeyStatus::Revoked,
            KeyStatus::Expired => pb::KeyStatus::Expired,
        }
    }
}

impl From<DenyReason> for pb::DenyReason {
    fn from(r: DenyReason) -> Self {
        match r {
            DenyReason::MissingToken => pb::DenyReason::MissingToken,
            DenyReason::InvalidToken => pb::DenyReason::InvalidToken,
            DenyReason::ExpiredToken => pb::DenyReason::ExpiredToken,
            DenyReason::InsufficientScope => pb::DenyReason::InsufficientScope,
            DenyReason::IpNotAllowed => pb::DenyReason::IpNotAllowed,
            DenyReason::RateLimited => pb::DenyReason::RateLimited,
            DenyReason::RouteNotFound => pb::DenyReason::RouteNotFound,
        }
    }
}

impl TryFrom<pb::DenyReason> for DenyReason {
    type Error = Unspecified;

    fn try_from(r: pb::DenyReason) -> Result<Self, Unspecified> {
        DenyReason::ALL
            .into_iter()
            .find(|d| pb::DenyReason::from(*d) == r)
            .ok_or(Unspecified)
    }
}

impl From<EventKind> for pb::key_event::Kind {
    fn from(k: EventKind) -> Self {
        use pb::key_event::Kind;
        match k {
            EventKind::Created => Kind::Created,
            EventKind::Updated => Kind::Updated,
            EventKind::Rotated => Kind::Rotated,
            EventKind::Revoked => Kind::Revoked,
            EventKind::Disabled => Kind::Disabled,
            EventKind::Enabled => Kind::Enabled,
            EventKind::Deleted => Kind::Deleted,
            EventKind::SecretExpired => Kind::SecretExpired,
        }
    }
}

/// The gRPC code for a deny reason, for every transport that answers one
/// with a status (admin calls refusing their caller, Watch, Envoy's Check,
/// the client's own answers): 401 reasons are UNAUTHENTICATED, 429 is
/// RESOURCE_EXHAUSTED, the rest PERMISSION_DENIED. Derived from the domain's
/// HTTP status, so the two can't disagree.
pub fn deny_code(reason: DenyReason) -> tonic::Code {
    match reason.http_status() {
        401 => tonic::Code::Unauthenticated,
        429 => tonic::Code::ResourceExhausted,
        _ => tonic::Code::PermissionDenied,
    }
}

/// A point in time on the wire.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

/// A wire timestamp as a point in time; `None` when the nanos are out of
/// range or the instant is beyond what chrono represents.
pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
}

/// A chrono duration on the wire.
pub fn duration(d: chrono::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.num_seconds(),
        nanos: d.subsec_nanos(),
    }
}

/// A std duration on the wire (saturating).
pub fn std_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_reasons_round_trip() {
        for reason in DenyReason::ALL {
            let wire = pb::DenyReason::from(reason);
            assert_eq!(DenyReason::try_from(wire), Ok(reason));
        }
        assert_eq!(
            DenyReason::try_from(pb::DenyReason::Unspecified),
            Err(Unspecified)
        );
    }

    #[test]
    fn timestamps_round_trip_and_reject_bad_nanos() {
        let t = DateTime::from_timestamp(1_700_000_000, 123).unwrap();
        assert_eq!(from_timestamp(&timestamp(t)), Some(t));
        let bad = prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        };
        assert_eq!(from_timestamp(&bad), None);
    }
}
