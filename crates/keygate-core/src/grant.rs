//! What a key may hand out: no key can make, change, rotate or re-enable a key
//! with more power than its own, and no key can widen itself.
//!
//! Power is more than scopes (checked by [`ScopeSet::first_missing`]): a TEST
//! key reaches only test traffic, an allow-list fences where a key can be
//! used from, an expiry bounds how long, and a rate limit how much. A caller
//! bound by any of these could otherwise shed it by minting a key without
//! it. The rules, applied to the target key as it will be after the change:
//!
//! - **mode**: a TEST caller makes and changes TEST keys only;
//! - **allow-list**: a caller with an allow-list makes keys with a non-empty
//!   allow-list inside its own (CIDR containment; IPv4-mapped IPv6 counts as
//!   IPv4);
//! - **expiry**: a caller that expires makes keys that expire no later;
//! - **rate limit**: an ORGANIZATION caller makes keys limited to at most
//!   its own limit (a SYSTEM key's limit throttles only its own calls: SYSTEM
//!   operators set customers' limits). An unlimited key, and a key without a
//!   limit of its own under an unlimited server default, count as an
//!   infinite limit: above every limited caller, so such a caller can neither
//!   make one nor rotate, update or re-enable one;
//! - **unlimited**: only a SYSTEM caller makes a key unlimited, at creation
//!   or by an update ([`may_make_unlimited`]): a platform's capacity is not
//!   an organization's to give away. A key that already is one may keep the
//!   flag through a change the rules above allow (an unlimited key renaming
//!   itself).
//!
//! A key updating itself is the same check with its own stored record as the
//! caller, so it may narrow itself but never widen itself.
//!
//! [`ScopeSet::first_missing`]: super::scope::ScopeSet::first_missing

use std::fmt;

use chrono::{DateTime, Utc};
use ipnet::IpNet;

use super::cidr;
use super::key::{KeyRecord, Mode, Tier};
use super::limits::Allowance;

/// A restriction of the caller that the target key would exceed. The
/// message names the field and both sides, for PERMISSION_DENIED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exceeds {
    /// A TEST caller asked for a LIVE key.
    #[error("mode: a TEST key can create or change only TEST keys")]
    Mode,
    /// The caller has an allow-list and the target would have none.
    #[error("allowed_cidrs: must not be empty: the caller is limited to {caller}")]
    NoAllowList {
        /// The caller's allow-list.
        caller: Cidrs,
    },
    /// One of the target's networks is not inside the caller's allow-list.
    #[error("allowed_cidrs: {cidr} is outside the caller's allow-list {caller}")]
    OutsideAllowList {
        /// The first such network.
        cidr: IpNet,
        /// The caller's allow-list.
        caller: Cidrs,
    },
    /// The caller expires and the target would not.
    #[error("expires_at: must be set: the caller expires at {caller}")]
    NoExpiry {
        /// When the caller expires.
        caller: Timestamp,
    },
    /// The target would expire after the caller.
    #[error("expires_at: {asked} is later than the caller's expiry {caller}")]
    LaterExpiry {
        /// The target's expiry.
        asked: Timestamp,
        /// The caller's expiry.
        caller: Timestamp,
    },
    /// An ORGANIZATION caller asked for a higher rate limit than its own.
    #[error("rate_limit_per_minute: {asked} is above the caller's own limit of {caller}")]
    RateLimit {
        /// The target's allowance, with 0 read as the default.
        asked: Allowance,
        /// The caller's allowance, with 0 read as the default.
        caller: Allowance,
    },
    /// The target is an unlimited key and the caller, an ORGANIZATION key,
    /// is limited.
    #[error("unlimited: the key is unlimited, above the caller's own limit of {caller}")]
    UnlimitedTarget {
        /// The caller's allowance.
        caller: Allowance,
    },
    /// A caller other than a SYSTEM key asked to make a key unlimited.
    #[error("unlimited: only a SYSTEM key can make a key unlimited")]
    Unlimited,
}

/// An allow-list, shown comma-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidrs(pub Vec<IpNet>);

impl fmt::Display for Cidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// A time in RFC 3339, as grpcurl shows timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub DateTime<Utc>);

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
    }
}

/// Fails with the first restriction of `caller` that `target` exceeds.
/// `default_rate_limit` is what a limit of 0 means. Scopes and tier are
/// checked by the caller of this function (their messages name the scope),
/// the unlimited flag's change by [`may_make_unlimited`].
pub fn within(
    caller: &KeyRecord,
    target: &KeyRecord,
    default_rate_limit: Allowance,
) -> Result<(), Exceeds> {
    if caller.mode == Mode::Test && target.mode != Mode::Test {
        return Err(Exceeds::Mode);
    }
    if !caller.allowed_cidrs.is_empty() {
        let fence = || Cidrs(caller.allowed_cidrs.clone());
        if target.allowed_cidrs.is_empty() {
            return Err(Exceeds::NoAllowList { caller: fence() });
        }
        if let Some(cidr) = target
            .allowed_cidrs
            .iter()
            .find(|net| !inside(net, &caller.allowed_cidrs))
        {
            return Err(Exceeds::OutsideAllowList {
                cidr: *cidr,
                caller: fence(),
            });
        }
    }
    if let Some(limit) = caller.expires_at {
        match target.expires_at {
            None => {
                return Err(Exceeds::NoExpiry {
                    caller: Timestamp(limit),
                });
            }
            Some(at) if at > limit => {
                return Err(Exceeds::LaterExpiry {
                    asked: Timestamp(at),
                    caller: Timestamp(limit),
                });
            }
            Some(_) => {}
        }
    }
    if caller.tier == Tier::Organization {
        let (asked, own) = (
            target.allowance(default_rate_limit),
            caller.allowance(default_rate_limit),
        );
        if asked > own {
            return Err(if target.unlimited {
                Exceeds::UnlimitedTarget { caller: own }
            } else {
                Exceeds::RateLimit { asked, caller: own }
            });
        }
    }
    Ok(())
}

/// Fails unless `caller` may leave `target` unlimited: a SYSTEM caller
/// always; any other only when the key was unlimited already (`before`, the
/// key as stored; `None` for a key being created).
pub fn may_make_unlimited(
    caller: &KeyRecord,
    before: Option<&KeyRecord>,
    target: &KeyRecord,
) -> Result<(), Exceeds> {
    let made = target.unlimited && !before.is_some_and(|b| b.unlimited);
    if made && caller.tier != Tier::System {
        return Err(Exceeds::Unlimited);
    }
    Ok(())
}

/// Fills in what a new key leaves unset from the caller's own restrictions,
/// so a restricted caller's keys inherit them: its allow-list when none is
/// asked for, its expiry when none is asked for. Anything set explicitly is
/// left for [`within`] to judge.
pub fn inherit(caller: &KeyRecord, target: &mut KeyRecord) {
    if target.allowed_cidrs.is_empty() {
        target.allowed_cidrs.clone_from(&caller.allowed_cidrs);
    }
    if target.expires_at.is_none() {
        target.expires_at = caller.expires_at;
    }
}

/// Whether every address of `net` lies in one of `fence`.
fn inside(net: &IpNet, fence: &[IpNet]) -> bool {
    // Stored entries are normalised already; this keeps the check right for
    // any that are not (a mapped prefix shorter than /96 stays IPv6).
    let canonical = |net: IpNet| cidr::normalize(net).unwrap_or(net);
    let net = canonical(*net);
    fence.iter().any(|outer| match (canonical(*outer), net) {
        (IpNet::V4(outer), IpNet::V4(inner)) => outer.contains(&inner),
        (IpNet::V6(outer), IpNet::V6(inner)) => outer.contains(&inner),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::key::fixtures::key_with;

    const D: Allowance = Allowance::DEFAULT;

    fn per_minute(n: u32) -> Allowance {
        Allowance::PerMinute(std::num::NonZeroU32::new(n).unwrap())
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn pair() -> (KeyRecord, KeyRecord) {
        let (caller, _) = key_with(&["api_key:*"]);
        let (target, _) = key_with(&[]);
        (caller, target)
    }

    #[test]
    fn an_unrestricted_live_caller_may_make_anything_within_its_limit() {
        let (caller, mut target) = pair();
        assert_eq!(within(&caller, &target, D), Ok(()));
        target.mode = Mode::Test;
        target.allowed_cidrs = nets(&["0.0.0.0/0"]);
        target.expires_at = Some(caller.created_at + Duration::days(3650));
        assert_eq!(within(&caller, &target, D), Ok(()));
    }

    #[test]
    fn a_test_caller_makes_only_test_keys() {
        let (mut caller, mut target) = pair();
        caller.mode = Mode::Test;
        assert_eq!(within(&caller, &target, D), Err(Exceeds::Mode));
        target.mode = Mode::Test;
        assert_eq!(within(&caller, &target, D), Ok(()));
    }

    #[test]
    fn allow_lists_nest() {
        let (mut caller, mut target) = pair();
        caller.allowed_cidrs = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(matches!(
            within(&caller, &target, D),
            Err(Exceeds::NoAllowList { .. })
        ));
        for ok in [
            &["10.0.0.0/8"][..],
            &["10.1.0.0/16", "10.2.3.4/32"],
            &["2001:db8:1::/48"],
            &["::ffff:10.1.0.0/112"],
        ] {
            target.allowed_cidrs = nets(ok);
            assert_eq!(within(&caller, &target, D), Ok(()), "{ok:?}");
        }
        for bad in [
            "0.0.0.0/0",
            "10.0.0.0/7",
            "11.0.0.0/8",
            "2001:db8::/31",
            "::/0",
            "::ffff:0.0.0.0/96",
        ] {
            target.allowed_cidrs = nets(&["10.0.0.0/16", bad]);
            let err = within(&caller, &target, D).unwrap_err();
            assert!(
                matches!(&err, Exceeds::OutsideAllowList { cidr, .. } if cidr.to_string() == bad),
                "{bad}: {err:?}"
            );
        }
        target.allowed_cidrs = nets(&["0.0.0.0/0"]);
        caller.allowed_cidrs = nets(&["10.0.0.0/8"]);
        assert_eq!(
            within(&caller, &target, D).unwrap_err().to_string(),
            "allowed_cidrs: 0.0.0.0/0 is outside the caller's allow-list 10.0.0.0/8"
        );
    }

    #[test]
    fn a_mapped_caller_fence_is_ipv4() {
        let (mut caller, mut target) = pair();
        caller.allowed_cidrs = nets(&["::ffff:127.0.0.0/104"]);
        target.allowed_cidrs = nets(&["127.0.0.1/32"]);
        assert_eq!(within(&caller, &target, D), Ok(()));
    }

    #[test]
    fn expiry_never_extends() {
        let (mut caller, mut target) = pair();
        let at = caller.created_at + Duration::hours(1);
        caller.expires_at = Some(at);
        assert!(matches!(
            within(&caller, &target, D),
            Err(Exceeds::NoExpiry { .. })
        ));
        target.expires_at = Some(at + Duration::seconds(1));
        assert!(matches!(
            within(&caller, &target, D),
            Err(Exceeds::LaterExpiry { .. })
        ));
        target.expires_at = Some(at);
        assert_eq!(within(&caller, &target, D), Ok(()));
    }

    #[test]
    fn organization_callers_cannot_raise_limits_system_callers_can() {
        let (mut caller, mut target) = pair();
        target.rate_limit_per_minute = 101;
        assert_eq!(
            within(&caller, &target, D),
            Err(Exceeds::RateLimit {
                asked: per_minute(101),
                caller: per_minute(100)
            })
        );
        target.rate_limit_per_minute = 0;
        assert_eq!(within(&caller, &target, D), Ok(()));
        caller.rate_limit_per_minute = 50;
        assert!(within(&caller, &target, D).is_err(), "0 means the default");
        caller.tier = Tier::System;
        caller.organization_id = None;
        target.rate_limit_per_minute = 1_000_000;
        assert_eq!(within(&caller, &target, D), Ok(()));
    }

    #[test]
    fn an_unlimited_key_is_above_every_limited_organization_caller() {
        let (mut caller, mut target) = pair();
        target.unlimited = true;
        assert_eq!(
            within(&caller, &target, D),
            Err(Exceeds::UnlimitedTarget { caller: D })
        );
        assert_eq!(
            within(&caller, &target, D).unwrap_err().to_string(),
            "unlimited: the key is unlimited, above the caller's own limit of 100 per minute"
        );
        caller.rate_limit_per_minute = 1_000_000;
        assert!(within(&caller, &target, D).is_err(), "any limit is below");
        // An unlimited caller is not exceeded by an unlimited key: an
        // unlimited key may rename itself.
        caller.unlimited = true;
        assert_eq!(within(&caller, &target, D), Ok(()));
        // SYSTEM callers set limits, their own or none.
        caller.unlimited = false;
        caller.tier = Tier::System;
        caller.organization_id = None;
        assert_eq!(within(&caller, &target, D), Ok(()));
    }

    #[test]
    fn an_unlimited_default_is_above_every_limited_organization_caller() {
        let (mut caller, target) = pair();
        let off = Allowance::Unlimited;
        assert_eq!(within(&caller, &target, off), Ok(()), "both unlimited");
        caller.rate_limit_per_minute = 50;
        assert_eq!(
            within(&caller, &target, off),
            Err(Exceeds::RateLimit {
                asked: Allowance::Unlimited,
                caller: per_minute(50)
            })
        );
        assert_eq!(
            within(&caller, &target, off).unwrap_err().to_string(),
            "rate_limit_per_minute: unlimited is above the caller's own limit of 50 per minute"
        );
    }

    #[test]
    fn only_system_callers_make_keys_unlimited() {
        let (mut caller, mut target) = pair();
        let before = target.clone();
        assert_eq!(may_make_unlimited(&caller, None, &target), Ok(()));
        target.unlimited = true;
        for before in [None, Some(&before)] {
            assert_eq!(
                may_make_unlimited(&caller, before, &target),
                Err(Exceeds::Unlimited)
            );
        }
        // Even an unlimited ORGANIZATION caller cannot hand it out.
        caller.unlimited = true;
        assert_eq!(
            may_make_unlimited(&caller, None, &target)
                .unwrap_err()
                .to_string(),
            "unlimited: only a SYSTEM key can make a key unlimited"
        );
        // Keeping the flag is not making it.
        assert_eq!(may_make_unlimited(&caller, Some(&target), &target), Ok(()));
        caller.tier = Tier::System;
        caller.organization_id = None;
        assert_eq!(may_make_unlimited(&caller, None, &target), Ok(()));
        assert_eq!(may_make_unlimited(&caller, Some(&before), &target), Ok(()));
    }

    #[test]
    fn new_keys_inherit_what_they_leave_unset() {
        let (mut caller, mut target) = pair();
        caller.allowed_cidrs = nets(&["10.0.0.0/8"]);
        caller.expires_at = Some(caller.created_at + Duration::hours(1));
        inherit(&caller, &mut target);
        assert_eq!(target.allowed_cidrs, caller.allowed_cidrs);
        assert_eq!(target.expires_at, caller.expires_at);
        assert_eq!(within(&caller, &target, D), Ok(()));
    }
}
