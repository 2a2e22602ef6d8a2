//! Wire requests → service commands, with the validation of every incoming
//! field: a bad field is INVALID_ARGUMENT naming it, before anything runs.
//! The bounds themselves are the domain's (`keygate_core::bounds`).

use chrono::{DateTime, Duration, Utc};
use ipnet::IpNet;
use keygate_core::analytics::{Granularity, UsageRange};
use keygate_core::bounds::{
    self, MAX_CIDRS, MAX_GRACE, MAX_NAME_CHARS, MAX_ORGANIZATION_RATE_LIMIT, MAX_RATE_LIMIT,
    MAX_REASON_CHARS, MAX_SCOPES,
};
use keygate_core::key::{self, KeyChanges, Mode, Tier};
use keygate_core::scope::ScopeSet;
use keygate_proto::v1 as pb;
use uuid::Uuid;

use crate::error::Error;
use crate::service::analytics::{UsageSpec, UsageTarget};
use crate::service::audit::EventListSpec;
use crate::service::{ListSpec, NewKeySpec};

const MAX_PAGE_SIZE: u32 = 1000;
/// The longest a KeyAdmin call may wait for replicas to confirm a change.
pub const MAX_REPLICA_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn from_timestamp(field: &'static str, t: &prost_types::Timestamp) -> Result<DateTime<Utc>, Error> {
    keygate_proto::convert::from_timestamp(t)
        .ok_or_else(|| Error::invalid(field, "is not a valid timestamp"))
}

/// The fields UpdateKey can change, in the order `*` names them.
const UPDATABLE: [&str; 6] = [
    "name",
    "scopes",
    "allowed_cidrs",
    "rate_limit_per_minute",
    "unlimited",
    "expires_at",
];

/// The changes an UpdateKey asks for, as AIP-134 has it: the fields its
/// update_mask names (`*`: every field, unset ones cleared), or without a
/// mask every field the request sets (a non-empty name, scope list or
/// allow-list, a non-zero limit, unlimited true, an expiry). Clearing a
/// field needs the mask.
pub fn key_changes(mut r: pb::UpdateKeyRequest) -> Result<KeyChanges, Error> {
    let named = r.update_mask.take().map(|m| m.paths).unwrap_or_default();
    let paths: Vec<&str> = if named.iter().any(|p| p == "*") {
        UPDATABLE.to_vec()
    } else if named.is_empty() {
        let set = [
            !r.name.trim().is_empty(),
            !r.scopes.is_empty(),
            !r.allowed_cidrs.is_empty(),
            r.rate_limit_per_minute != 0,
            r.unlimited,
            r.expires_at.is_some(),
        ];
        UPDATABLE
            .iter()
            .zip(set)
            .filter_map(|(path, set)| set.then_some(*path))
            .collect()
    } else {
        named.iter().map(String::as_str).collect()
    };
    if paths.is_empty() {
        return Err(Error::invalid(
            "update_mask",
            "nothing to update: set a field (name, scopes, allowed_cidrs, rate_limit_per_minute, unlimited, expires_at), or name it in update_mask to clear it",
        ));
    }
    let mut changes = KeyChanges::default();
    for path in paths {
        match path {
            "name" => changes.name = Some(text("name", &r.name, MAX_NAME_CHARS, true)?),
            "scopes" => changes.scopes = Some(scope_set(&r.scopes)?),
            "allowed_cidrs" => changes.allowed_cidrs = Some(cidrs(&r.allowed_cidrs)?),
            "rate_limit_per_minute" => {
                changes.rate_limit_per_minute = Some(rate_limit(r.rate_limit_per_minute)?)
            }
            "unlimited" => changes.unlimited = Some(r.unlimited),
            "expires_at" => {
                changes.expires_at = Some(
                    r.expires_at
                        .as_ref()
                        .map(|t| from_timestamp("expires_at", t))
                        .transpose()?,
                )
            }
            other => {
                let shown = crate::service::authorize::truncate(other, 64);
                return Err(Error::invalid(
                    "update_mask",
                    format!("unknown field {shown:?}"),
                ));
            }
        }
    }
    Ok(changes)
}

/// A ListKeyEvents request as a spec: empty organization, key id and page
/// token mean none; `page_size` at most 1000 (0: the default).
pub fn event_list_spec(r: pb::ListKeyEventsRequest) -> Result<EventListSpec, Error> {
    if r.page_size > MAX_PAGE_SIZE {
        return Err(Error::invalid(
            "page_size",
            format!("must be at most {MAX_PAGE_SIZE}"),
        ));
    }
    let key_id = if r.key_id.trim().is_empty() {
        None
    } else {
        Some(key_id("key_id", &r.key_id)?)
    };
    Ok(EventListSpec {
        organization_id: organization(&r.organization_id)?,
        key_id,
        page_size: r.page_size,
        page_token: Some(r.page_token).filter(|t| !t.is_empty()),
    })
}

/// The key id in `field`, surrounding whitespace ignored; INVALID_ARGUMENT
/// when it is empty ("is required") or not a UUID.
pub fn key_id(field: &'static str, id: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(id.trim()).map_err(|_| {
        if id.trim().is_empty() {
            Error::invalid(field, "is required")
        } else {
            Error::invalid(field, "is not a UUID")
        }
    })
}

fn text(
    field: &'static str,
    value: &str,
    max_chars: usize,
    required: bool,
) -> Result<String, Error> {
    bounds::text(value, max_chars, required)
        .map(str::to_owned)
        .map_err(|why| Error::invalid(field, why))
}

fn organization(value: &str) -> Result<Option<String>, Error> {
    match value.trim() {
        "" => Ok(None),
        org if key::is_valid_organization_id(org) => Ok(Some(org.to_owned())),
        _ => Err(Error::invalid(
            "organization_id",
            "must be 1-128 letters, digits, '_', '-', '.' or ':'",
        )),
    }
}

/// The organization a SetOrganizationLimits or GetOrganizationLimits is
/// about: required, and an organization id.
pub fn organization_id(value: &str) -> Result<String, Error> {
    organization(value)?.ok_or_else(|| Error::invalid("organization_id", "is required"))
}

/// A SetOrganizationLimits request: the organization, and its limit
/// (`None`: 0, clear it), at most 100,000,000 per minute.
pub fn organization_limit(
    r: &pb::SetOrganizationLimitsRequest,
) -> Result<(String, Option<std::num::NonZeroU32>), Error> {
    let organization_id = organization_id(&r.organization_id)?;
    if r.rate_limit_per_minute > MAX_ORGANIZATION_RATE_LIMIT {
        return Err(Error::invalid(
            "rate_limit_per_minute",
            format!("must be at most {MAX_ORGANIZATION_RATE_LIMIT}"),
        ));
    }
    Ok((
        organization_id,
        std::num::NonZeroU32::new(r.rate_limit_per_minute),
    ))
}

fn enum_value<T: TryFrom<i32>>(field: &'static str, value: i32) -> Result<T, Error> {
    T::try_from(value).map_err(|_| Error::invalid(field, format!("unknown value {value}")))
}

fn mode_filter(value: i32) -> Result<Option<Mode>, Error> {
    Ok(Mode::try_from(enum_value::<pb::Mode>("mode", value)?).ok())
}

/// A CreateKey request as a spec: every field within the domain's bounds;
/// an unspecified tier is ORGANIZATION and an unspecified mode TEST; an
/// organization on a SYSTEM key is refused; a rate limit of 0 means the
/// default. Who may ask for `unlimited` is the service's to judge.
pub fn new_key(r: pb::CreateKeyRequest) -> Result<NewKeySpec, Error> {
    let name = text("name", &r.name, MAX_NAME_CHARS, true)?;
    let tier =
        Tier::try_from(enum_value::<pb::KeyTier>("tier", r.tier)?).unwrap_or(Tier::Organization);
    let organization_id = organization(&r.organization_id)?;
    if tier == Tier::System && organization_id.is_some() {
        return Err(Error::invalid(
            "organization_id",
            "must be empty for SYSTEM keys",
        ));
    }
    // Unspecified is TEST: a key reaches real funds only when asked to.
    let mode = mode_filter(r.mode)?.unwrap_or(Mode::Test);
    let scopes = scope_set(&r.scopes)?;
    let allowed_cidrs = cidrs(&r.allowed_cidrs)?;
    let rate_limit_per_minute = rate_limit(r.rate_limit_per_minute)?;
    let expires_at = r
        .expires_at
        .as_ref()
        .map(|t| from_timestamp("expires_at", t))
        .transpose()?;
    Ok(NewKeySpec {
        name,
        organization_id,
        tier,
        mode,
        scopes,
        allowed_cidrs,
        rate_limit_per_minute,
        unlimited: r.unlimited,
        expires_at,
    })
}

fn scope_set(scopes: &[String]) -> Result<ScopeSet, Error> {
    if scopes.len() > MAX_SCOPES {
        return Err(Error::invalid(
            "scopes",
            format!("at most {MAX_SCOPES} scopes"),
        ));
    }
    ScopeSet::parse(scopes).map_err(|e| Error::invalid("scopes", e.to_string()))
}

fn cidrs(values: &[String]) -> Result<Vec<IpNet>, Error> {
    if values.len() > MAX_CIDRS {
        return Err(Error::invalid(
            "allowed_cidrs",
            format!("at most {MAX_CIDRS} entries"),
        ));
    }
    values.iter().map(|c| cidr(c)).collect()
}

fn rate_limit(per_minute: u32) -> Result<u32, Error> {
    if per_minute > MAX_RATE_LIMIT {
        return Err(Error::invalid(
            "rate_limit_per_minute",
            format!("must be at most {MAX_RATE_LIMIT}"),
        ));
    }
    Ok(per_minute)
}

/// A CIDR, or a single address meaning just that address, in the domain's
/// canonical form (an IPv4-mapped network as IPv4).
fn cidr(value: &str) -> Result<IpNet, Error> {
    let value = value.trim();
    let parsed = value
        .parse::<IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from));
    let net = parsed.map_err(|_| {
        let shown = crate::service::authorize::truncate(value, 64);
        Error::invalid(
            "allowed_cidrs",
            format!("{shown:?} is not a CIDR or IP address"),
        )
    })?;
    keygate_core::cidr::normalize(net).map_err(|why| Error::invalid("allowed_cidrs", why))
}

/// A ListKeys request as a spec: empty organization and page token mean
/// none, an unspecified mode means both; `page_size` at most 1000 (0: the
/// default).
pub fn list_spec(r: pb::ListKeysRequest) -> Result<ListSpec, Error> {
    if r.page_size > MAX_PAGE_SIZE {
        return Err(Error::invalid(
            "page_size",
            format!("must be at most {MAX_PAGE_SIZE}"),
        ));
    }
    Ok(ListSpec {
        organization_id: organization(&r.organization_id)?,
        include_revoked: r.include_revoked,
        mode: mode_filter(r.mode)?,
        page_size: r.page_size,
        page_token: Some(r.page_token).filter(|t| !t.is_empty()),
    })
}

/// How long a rotated key's previous secret keeps working: absent is 0
/// (it stops at once), at most 7 days.
pub fn grace_period(d: Option<&prost_types::Duration>) -> Result<Duration, Error> {
    let Some(d) = d else {
        return Ok(Duration::zero());
    };
    let bad = || Error::invalid("grace_period", "must be between 0 and 7 days");
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(bad());
    }
    let grace = Duration::try_seconds(d.seconds).ok_or_else(bad)?
        + Duration::nanoseconds(i64::from(d.nanos));
    if grace > MAX_GRACE {
        return Err(bad());
    }
    Ok(grace)
}

/// `None` when the caller does not wait; otherwise how long (default 5 s, at most 60 s).
pub fn replica_wait(
    wait: bool,
    timeout: Option<&prost_types::Duration>,
) -> Result<Option<std::time::Duration>, Error> {
    let bad = || Error::invalid("replica_wait_timeout", "must be between 0 and 60 seconds");
    let timeout = match timeout {
        None => std::time::Duration::ZERO,
        Some(d) if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 => return Err(bad()),
        Some(d) => std::time::Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs()),
    };
    if timeout > MAX_REPLICA_WAIT {
        return Err(bad());
    }
    Ok(wait.then(|| {
        if timeout.is_zero() {
            std::time::Duration::from_secs(5)
        } else {
            timeout
        }
    }))
}

/// A revocation reason, trimmed: may be empty, at most 500 characters, no
/// control characters.
pub fn revoke_reason(reason: &str) -> Result<String, Error> {
    text("reason", reason, MAX_REASON_CHARS, false)
}

/// A GetKeyUsage request: exactly one of key_id and organization_id, a
/// start and end, and a granularity.
pub fn usage_spec(r: &pb::GetKeyUsageRequest) -> Result<UsageSpec, Error> {
    let target = match (
        r.key_id.trim().is_empty(),
        r.organization_id.trim().is_empty(),
    ) {
        (false, true) => UsageTarget::Key(key_id("key_id", &r.key_id)?),
        (true, false) => UsageTarget::Organization(organization_id(&r.organization_id)?),
        (true, true) => {
            return Err(Error::invalid(
                "key_id",
                "one of key_id and organization_id is required",
            ));
        }
        (false, false) => {
            return Err(Error::invalid(
                "organization_id",
                "give key_id or organization_id, not both",
            ));
        }
    };
    let granularity = match pb::UsageGranularity::try_from(r.granularity) {
        Ok(pb::UsageGranularity::Minute) => Granularity::Minute,
        Ok(pb::UsageGranularity::Hour) => Granularity::Hour,
        _ => return Err(Error::invalid("granularity", "must be MINUTE or HOUR")),
    };
    let start = r
        .start
        .as_ref()
        .ok_or_else(|| Error::invalid("start", "is required"))
        .and_then(|t| from_timestamp("start", t))?;
    let end = r
        .end
        .as_ref()
        .ok_or_else(|| Error::invalid("end", "is required"))
        .and_then(|t| from_timestamp("end", t))?;
    let range =
        UsageRange::new(start, end, granularity).map_err(|e| Error::invalid(e.field, e.reason))?;
    Ok(UsageSpec { target, range })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(f: impl FnOnce(&mut pb::CreateKeyRequest)) -> Result<NewKeySpec, Error> {
        let mut r = pb::CreateKeyRequest {
            name: "backend".into(),
            organization_id: "org_1".into(),
            scopes: vec!["links:read".into()],
            ..Default::default()
        };
        f(&mut r);
        new_key(r)
    }

    fn field_of(e: Error) -> &'static str {
        match e {
            Error::InvalidArgument { field, .. } => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn create_validation_names_the_field() {
        let spec = create(|_| {}).unwrap();
        assert_eq!((spec.tier, spec.mode), (Tier::Organization, Mode::Test));
        type Edit = Box<dyn FnOnce(&mut pb::CreateKeyRequest)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("name", Box::new(|r| r.name = "  ".into())),
            ("name", Box::new(|r| r.name = "x".repeat(201))),
            ("name", Box::new(|r| r.name = "a\nb".into())),
            ("scopes", Box::new(|r| r.scopes = vec!["links:view".into()])),
            (
                "allowed_cidrs",
                Box::new(|r| r.allowed_cidrs = vec!["10.0.0.0/33".into()]),
            ),
            ("tier", Box::new(|r| r.tier = 9)),
            ("mode", Box::new(|r| r.mode = 9)),
            (
                "organization_id",
                Box::new(|r| r.organization_id = "bad org".into()),
            ),
            (
                "organization_id",
                Box::new(|r| r.tier = pb::KeyTier::System as i32),
            ),
            (
                "expires_at",
                Box::new(|r| {
                    r.expires_at = Some(prost_types::Timestamp {
                        seconds: 0,
                        nanos: -1,
                    })
                }),
            ),
        ];
        for (field, edit) in cases {
            assert_eq!(field_of(create(edit).unwrap_err()), field);
        }
    }

    #[test]
    fn unlimited_is_a_mask_path_and_set_without_a_mask_when_true() {
        let update = |unlimited: bool, paths: &[&str]| {
            key_changes(pb::UpdateKeyRequest {
                key_id: "k".into(),
                unlimited,
                update_mask: (!paths.is_empty()).then(|| prost_types::FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                }),
                ..Default::default()
            })
        };
        assert_eq!(update(true, &[]).unwrap().unlimited, Some(true));
        assert_eq!(
            field_of(update(false, &[]).unwrap_err()),
            "update_mask",
            "false is the unset value: nothing to update"
        );
        assert_eq!(
            update(false, &["unlimited"]).unwrap().unlimited,
            Some(false)
        );
        let star = key_changes(pb::UpdateKeyRequest {
            name: "all".into(),
            unlimited: false,
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["*".into()],
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(star.unlimited, Some(false), "* clears it");
        let named = update(true, &["name"]);
        assert_eq!(field_of(named.unwrap_err()), "name", "only the named path");
        assert!(create(|r| r.unlimited = true).unwrap().unlimited);
    }

    #[test]
    fn organization_limits_name_the_field() {
        let set = |org: &str, n: u32| {
            organization_limit(&pb::SetOrganizationLimitsRequest {
                organization_id: org.into(),
                rate_limit_per_minute: n,
            })
        };
        assert_eq!(set(" org_a ", 0).unwrap(), ("org_a".to_owned(), None));
        assert_eq!(
            set("org_a", 100_000_000).unwrap().1.map(|n| n.get()),
            Some(100_000_000)
        );
        assert_eq!(field_of(set("", 5).unwrap_err()), "organization_id");
        assert_eq!(field_of(set("bad org", 5).unwrap_err()), "organization_id");
        assert_eq!(
            field_of(set("org_a", 100_000_001).unwrap_err()),
            "rate_limit_per_minute"
        );
    }

    #[test]
    fn cidrs_accept_addresses_and_normalise() {
        assert_eq!(cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(cidr("2001:db8::1/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(
            cidr("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(cidr("::ffff:1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        assert_eq!(
            field_of(cidr("::ffff:10.0.0.0/95").unwrap_err()),
            "allowed_cidrs"
        );
    }

    #[test]
    fn grace_periods() {
        let d = |seconds| prost_types::Duration { seconds, nanos: 0 };
        assert_eq!(grace_period(None).unwrap(), Duration::zero());
        assert_eq!(
            grace_period(Some(&d(7 * 86_400))).unwrap(),
            Duration::days(7)
        );
        assert!(grace_period(Some(&d(7 * 86_400 + 1))).is_err());
        assert!(grace_period(Some(&d(-1))).is_err());
    }
}
