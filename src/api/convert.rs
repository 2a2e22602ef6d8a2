//! Domain → wire for what the services answer: keys for display, events,
//! Authorize outcomes. Requests come in through `validate`.

use chrono::{DateTime, Utc};
use keygate_core::analytics::{Granularity, UsageBucket, UsageRange};
use keygate_core::decision::CredentialKind;
use keygate_core::event::Event;
use keygate_core::key::{KeyRecord, KeyState};
use keygate_core::organization::OrganizationLimit;
use keygate_core::token;
use keygate_proto::convert::{std_duration, timestamp};
use keygate_proto::v1 as pb;

use crate::service::Outcome;
use crate::service::authorize::Principal;

/// An ApiKey for display: no secret, no digest.
pub fn api_key(k: &KeyRecord, now: DateTime<Utc>) -> pb::ApiKey {
    let (revoked_at, revoked_reason) = match &k.state {
        KeyState::Revoked { at, reason } => (Some(timestamp(*at)), reason.clone()),
        _ => (None, String::new()),
    };
    pb::ApiKey {
        key_id: k.id.to_string(),
        name: k.name.clone(),
        organization_id: k.organization_id.as_deref().unwrap_or_default().to_owned(),
        tier: pb::KeyTier::from(k.tier).into(),
        mode: pb::Mode::from(k.mode).into(),
        prefix: k.prefix.clone(),
        masked_key: token::masked(&k.prefix),
        scopes: k.scopes.to_strings(),
        allowed_cidrs: k.allowed_cidrs.iter().map(ToString::to_string).collect(),
        rate_limit_per_minute: k.rate_limit_per_minute,
        unlimited: k.unlimited,
        status: pb::KeyStatus::from(k.status(now)).into(),
        created_at: Some(timestamp(k.created_at)),
        last_used_at: k.last_used_at.map(timestamp),
        expires_at: k.expires_at.map(timestamp),
        revoked_at,
        revoked_reason,
        rotated_at: k.rotated_at.map(timestamp),
        created_by: k.created_by.clone(),
        previous_secret_expires_at: k.live_previous_secret(now).map(|p| timestamp(p.expires_at)),
        previous_secret_last_used_at: k
            .previous_secret
            .as_ref()
            .and_then(|p| p.last_used_at)
            .map(timestamp),
        previous_secret_uses: k.previous_secret.as_ref().map_or(0, |p| p.uses),
    }
}

/// A KeyEvent for ListKeyEvents; a SYSTEM key's event has an empty
/// organization.
pub fn key_event(e: &Event) -> pb::KeyEvent {
    pb::KeyEvent {
        sequence: e.sequence,
        kind: pb::key_event::Kind::from(e.kind).into(),
        key_id: e.key_id.to_string(),
        organization_id: e.organization_id.clone().unwrap_or_default(),
        actor: e.actor.clone(),
        at: Some(timestamp(e.at)),
        reason: e.reason.clone(),
        details: e.details.clone(),
    }
}

/// The AuthorizeResponse for an outcome: the HTTP status and message come
/// from the deny reason (200 and "OK" on allow); the key's identity is set
/// only once the token authenticated, the rate-limit fields only once the
/// request was counted.
pub fn authorize_response(o: Outcome) -> pb::AuthorizeResponse {
    let mut r = pb::AuthorizeResponse {
        decision: if o.deny.is_none() {
            pb::Decision::Allow
        } else {
            pb::Decision::Deny
        }
        .into(),
        reason: o
            .deny
            .map_or(pb::DenyReason::Unspecified, pb::DenyReason::from)
            .into(),
        http_status: o.deny.map_or(200, |d| u32::from(d.http_status())),
        message: o.deny.map_or("OK", |d| d.message()).to_owned(),
        required_scope: o.required_scope.unwrap_or_default(),
        ..Default::default()
    };
    match o.principal {
        Some(Principal::Key(k)) => {
            r.organization_id = k.organization_id.as_deref().unwrap_or_default().to_owned();
            r.key_id = k.id.to_string();
            r.scopes = k.scopes.to_strings();
            r.mode = pb::Mode::from(k.mode).into();
            r.tier = pb::KeyTier::from(k.tier).into();
            r.set_credential_kind(CredentialKind::ApiKey.into());
        }
        Some(Principal::Jwt(jwt)) => {
            let id = &jwt.identity;
            r.organization_id = id.organization_id.clone().unwrap_or_default();
            r.scopes = id.scopes.to_strings();
            r.tier = pb::KeyTier::from(id.tier()).into();
            r.subject = id.subject.clone();
            r.set_credential_kind(CredentialKind::Jwt.into());
        }
        None => {}
    }
    if let Some(rate) = o.rate {
        r.rate_limit = rate.limit;
        r.rate_limit_remaining = rate.remaining;
        r.rate_limit_reset = Some(std_duration(rate.reset));
        r.retry_after = rate.retry_after.map(std_duration);
    }
    if let Some(by) = o.limited_by {
        r.set_limited_by(by.into());
    }
    r.organization_rate_limit = o.organization_rate_limit.map_or(0, |n| n.get());
    r
}

/// OrganizationLimits for an organization; `None` (never set) is a limit
/// of 0 with no time or author.
pub fn organization_limits(
    organization_id: &str,
    limit: Option<&OrganizationLimit>,
) -> pb::OrganizationLimits {
    pb::OrganizationLimits {
        organization_id: organization_id.to_owned(),
        rate_limit_per_minute: limit.and_then(|l| l.per_minute).map_or(0, |n| n.get()),
        updated_at: limit.map(|l| timestamp(l.updated_at)),
        updated_by: limit.map(|l| l.updated_by.clone()).unwrap_or_default(),
    }
}

/// GetKeyUsageResponse for the buckets read over `range`.
pub fn key_usage(range: &UsageRange, buckets: &[UsageBucket]) -> pb::GetKeyUsageResponse {
    pb::GetKeyUsageResponse {
        buckets: buckets
            .iter()
            .map(|b| pb::UsageBucket {
                key_id: b.key_id.to_string(),
                start: Some(timestamp(b.start)),
                allowed: b.allowed(),
                denied: b
                    .denied()
                    .into_iter()
                    .map(|(reason, calls)| pb::DenyCount {
                        reason: pb::DenyReason::from(reason).into(),
                        calls,
                    })
                    .collect(),
            })
            .collect(),
        start: Some(timestamp(range.start)),
        end: Some(timestamp(range.end)),
        granularity: match range.granularity {
            Granularity::Minute => pb::UsageGranularity::Minute,
            Granularity::Hour => pb::UsageGranularity::Hour,
        }
        .into(),
    }
}
