//! The Authorize decision as pure functions over a key record, the request and
//! the time: no I/O, no clock reads, no allocation on the allow path.

use std::net::IpAddr;

use chrono::{DateTime, Utc};

use super::key::{KeyRecord, KeyState};
use super::policy::RouteTable;
use super::scope::{Scope, ScopeSet};
use super::token::{Credential, ParsedToken, SecretDigest};

/// What kind of credential a request presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// A keygate API key.
    ApiKey,
    /// A JWT access token from a trusted issuer.
    Jwt,
}

/// Why a request is denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// No credential was presented (or only a blank one).
    MissingToken,
    /// The credential is malformed, unknown, carries the wrong secret or
    /// prefix, or names a key that is disabled or revoked: deliberately one
    /// reason, so a caller learns nothing about which.
    InvalidToken,
    /// The key, or the rotated-out secret that was presented, has expired.
    ExpiredToken,
    /// The key lacks a scope the request needs.
    InsufficientScope,
    /// The caller's address is not in the key's allow-list, or is unknown
    /// while the key has one.
    IpNotAllowed,
    /// The key is over its rate limit (requests per minute, on this replica).
    RateLimited,
    /// The request named a route that no policy entry matches (or whose path
    /// is ambiguous, so it matches none on purpose).
    RouteNotFound,
}

impl DenyReason {
    /// Every reason, for the tests that check each transport maps them alike.
    pub const ALL: [DenyReason; 7] = [
        Self::MissingToken,
        Self::InvalidToken,
        Self::ExpiredToken,
        Self::InsufficientScope,
        Self::IpNotAllowed,
        Self::RateLimited,
        Self::RouteNotFound,
    ];

    /// The HTTP status a gateway should answer with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::MissingToken | Self::InvalidToken | Self::ExpiredToken => 401,
            Self::InsufficientScope | Self::IpNotAllowed | Self::RouteNotFound => 403,
            Self::RateLimited => 429,
        }
    }

    /// The machine-readable code, as in the seeds' error bodies.
    pub fn code(self) -> &'static str {
        match self {
            Self::MissingToken => "MISSING_TOKEN",
            Self::InvalidToken => "INVALID_TOKEN",
            Self::ExpiredToken => "EXPIRED_TOKEN",
            Self::InsufficientScope => "INSUFFICIENT_SCOPE",
            Self::IpNotAllowed => "IP_NOT_ALLOWED",
            Self::RateLimited => "RATE_LIMITED",
            Self::RouteNotFound => "ROUTE_NOT_FOUND",
        }
    }

    /// A message safe to show the API client: it reveals nothing about the key.
    pub fn message(self) -> &'static str {
        match self {
            Self::MissingToken => "Missing API key.",
            Self::InvalidToken => "Invalid or missing API key.",
            Self::ExpiredToken => "API key has expired.",
            Self::InsufficientScope => "API key does not have permission for this action.",
            Self::IpNotAllowed => "Requests from this IP address are not allowed for this API key.",
            Self::RateLimited => "Rate limit exceeded.",
            Self::RouteNotFound => "No access policy covers this route.",
        }
    }
}

/// What the request needs: explicit scopes, or whatever the route policy says.
#[derive(Debug, Clone, Copy)]
pub enum Requirement<'a> {
    /// Every one of these scopes (an empty list needs none).
    Scopes(&'a [Scope]),
    /// Whatever scope the route policy names for this route ("METHOD /path").
    Route(&'a str),
}

/// The outcome for an authenticated key. `required_scope` is the scope the
/// route needed (on allow) or the one the key lacks (on deny).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// The key may make the request.
    Allow {
        /// The scope the route needed; `None` when explicit scopes were asked for.
        required_scope: Option<&'a Scope>,
    },
    /// The key may not make the request.
    Deny {
        /// Why not.
        reason: DenyReason,
        /// The scope the key lacks, for [`DenyReason::InsufficientScope`];
        /// otherwise `None`.
        required_scope: Option<&'a Scope>,
    },
}

/// Checks the presented secret and the key's state. The secret is checked
/// first, so a caller without it learns nothing about the key.
pub fn authenticate(
    key: &KeyRecord,
    token: &ParsedToken<'_>,
    now: DateTime<Utc>,
) -> Result<SecretUsed, DenyReason> {
    // The prefix carries brand and mode: a live token must not pass for a test key.
    if token.prefix != key.prefix {
        return Err(DenyReason::InvalidToken);
    }
    authenticate_digest(key, &token.digest(), now)
}

/// `authenticate` for a credential a session kept: whether the token it was
/// opened with would still authenticate now.
pub fn reauthenticate(
    key: &KeyRecord,
    credential: &Credential,
    now: DateTime<Utc>,
) -> Result<SecretUsed, DenyReason> {
    if credential.key_id != key.id || credential.prefix != key.prefix {
        return Err(DenyReason::InvalidToken);
    }
    authenticate_digest(key, &credential.digest, now)
}

fn authenticate_digest(
    key: &KeyRecord,
    presented: &SecretDigest,
    now: DateTime<Utc>,
) -> Result<SecretUsed, DenyReason> {
    let used = if key.secret_digest.matches(presented) {
        SecretUsed::Current
    } else {
        match &key.previous_secret {
            Some(prev) if prev.digest.matches(presented) => {
                if prev.expires_at <= now {
                    return Err(DenyReason::ExpiredToken);
                }
                SecretUsed::Previous
            }
            _ => return Err(DenyReason::InvalidToken),
        }
    };
    if !matches!(key.state, KeyState::Active) {
        return Err(DenyReason::InvalidToken);
    }
    if key.expires_at.is_some_and(|at| at <= now) {
        return Err(DenyReason::ExpiredToken);
    }
    Ok(used)
}

/// Which of a key's secrets a token carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretUsed {
    /// The key's current secret.
    Current,
    /// The rotated-out secret, inside its grace period.
    Previous,
}

/// Whether `ip` may use `key`. A key with an allow-list denies an unknown
/// address; an IPv4-mapped IPv6 address matches its IPv4 CIDR.
pub fn ip_allowed(key: &KeyRecord, ip: Option<IpAddr>) -> bool {
    if key.allowed_cidrs.is_empty() {
        return true;
    }
    let Some(ip) = ip.map(|ip| ip.to_canonical()) else {
        return false;
    };
    key.allowed_cidrs.iter().any(|net| net.contains(&ip))
}

/// The decision for an authenticated key: IP allow-list, then route, then scope.
pub fn authorize<'a>(
    key: &KeyRecord,
    ip: Option<IpAddr>,
    requirement: Requirement<'a>,
    policy: &'a RouteTable,
) -> Verdict<'a> {
    if !ip_allowed(key, ip) {
        return Verdict::Deny {
            reason: DenyReason::IpNotAllowed,
            required_scope: None,
        };
    }
    permit(&key.scopes, CredentialKind::ApiKey, requirement, policy)
}

/// The decision for any authenticated credential holding `scopes`: the
/// route (which must accept this `kind` of credential; one that does not is
/// INVALID_TOKEN, a 401, as if the credential were not there), then the
/// scope.
pub fn permit<'a>(
    scopes: &ScopeSet,
    kind: CredentialKind,
    requirement: Requirement<'a>,
    policy: &'a RouteTable,
) -> Verdict<'a> {
    match requirement {
        Requirement::Scopes(needed) => match scopes.first_missing(needed) {
            None => Verdict::Allow {
                required_scope: None,
            },
            Some(missing) => Verdict::Deny {
                reason: DenyReason::InsufficientScope,
                required_scope: Some(missing),
            },
        },
        Requirement::Route(route) => match policy.rule(route) {
            None => Verdict::Deny {
                reason: DenyReason::RouteNotFound,
                required_scope: None,
            },
            Some(rule) if !rule.accepts(kind) => Verdict::Deny {
                reason: DenyReason::InvalidToken,
                required_scope: None,
            },
            Some(rule) if scopes.grants(&rule.scope) => Verdict::Allow {
                required_scope: Some(&rule.scope),
            },
            Some(rule) => Verdict::Deny {
                reason: DenyReason::InsufficientScope,
                required_scope: Some(&rule.scope),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::key::Mode;
    use crate::key::fixtures::key_with;
    use crate::token::{Brand, generate};

    const POLICY: &str = "[[route]]\nroute = \"POST /v1/checkouts\"\nscope = \"checkout:create\"\n";

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn current_secret_authenticates_and_others_do_not() {
        let (key, token) = key_with(&["checkout:create"]);
        let now = key.created_at;
        assert_eq!(
            authenticate(&key, &ParsedToken::parse(&token).unwrap(), now),
            Ok(SecretUsed::Current)
        );
        let other = generate(&Brand::default(), Mode::Live, key.id).unwrap();
        assert_eq!(
            authenticate(&key, &ParsedToken::parse(&other.token).unwrap(), now),
            Err(DenyReason::InvalidToken)
        );
        let test_mode = generate(&Brand::default(), Mode::Test, key.id).unwrap();
        assert_eq!(
            authenticate(&key, &ParsedToken::parse(&test_mode.token).unwrap(), now),
            Err(DenyReason::InvalidToken)
        );
    }

    #[test]
    fn state_and_expiry() {
        let (mut key, token) = key_with(&[]);
        let parsed = ParsedToken::parse(&token).unwrap();
        let now = key.created_at;
        key.expires_at = Some(now + Duration::seconds(1));
        assert_eq!(authenticate(&key, &parsed, now), Ok(SecretUsed::Current));
        assert_eq!(
            authenticate(&key, &parsed, now + Duration::seconds(1)),
            Err(DenyReason::ExpiredToken)
        );
        key.expires_at = None;
        key.disable().unwrap();
        assert_eq!(
            authenticate(&key, &parsed, now),
            Err(DenyReason::InvalidToken)
        );
        key.enable().unwrap();
        key.revoke("x".into(), now).unwrap();
        assert_eq!(
            authenticate(&key, &parsed, now),
            Err(DenyReason::InvalidToken)
        );
    }

    #[test]
    fn previous_secret_works_only_inside_its_grace_period() {
        let (mut key, old) = key_with(&[]);
        let now = key.created_at;
        let new = generate(&Brand::default(), Mode::Live, key.id).unwrap();
        key.rotate(new.digest, Duration::minutes(5), now).unwrap();
        let old = ParsedToken::parse(&old).unwrap();
        let new = ParsedToken::parse(&new.token).unwrap();
        assert_eq!(
            authenticate(&key, &old, now + Duration::minutes(4)),
            Ok(SecretUsed::Previous)
        );
        assert_eq!(
            authenticate(&key, &old, now + Duration::minutes(5)),
            Err(DenyReason::ExpiredToken)
        );
        assert_eq!(
            authenticate(&key, &new, now + Duration::days(30)),
            Ok(SecretUsed::Current)
        );
    }

    #[test]
    fn a_kept_credential_stops_authenticating_when_its_token_would() {
        let (mut key, token) = key_with(&[]);
        let now = key.created_at;
        let kept = ParsedToken::parse(&token).unwrap().credential();
        assert_eq!(reauthenticate(&key, &kept, now), Ok(SecretUsed::Current));
        let new = generate(&Brand::default(), Mode::Live, key.id).unwrap();
        key.rotate(new.digest, Duration::minutes(5), now).unwrap();
        assert_eq!(reauthenticate(&key, &kept, now), Ok(SecretUsed::Previous));
        assert_eq!(
            reauthenticate(&key, &kept, now + Duration::minutes(5)),
            Err(DenyReason::ExpiredToken)
        );
        let (other, _) = key_with(&[]);
        assert_eq!(
            reauthenticate(&other, &kept, now),
            Err(DenyReason::InvalidToken)
        );
    }

    #[test]
    fn ip_allow_list() {
        let (mut key, _) = key_with(&[]);
        assert!(ip_allowed(&key, None));
        key.allowed_cidrs = vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        assert!(ip_allowed(&key, ip("10.1.2.3")));
        assert!(ip_allowed(&key, ip("::ffff:10.1.2.3")));
        assert!(ip_allowed(&key, ip("2001:db8::1")));
        assert!(!ip_allowed(&key, ip("11.0.0.1")));
        assert!(!ip_allowed(&key, ip("::ffff:11.0.0.1")));
        assert!(!ip_allowed(&key, None));
    }

    #[test]
    fn route_and_scope_checks_in_order() {
        let policy = RouteTable::from_toml(POLICY).unwrap();
        let (mut key, _) = key_with(&["checkout:create"]);
        let route = Requirement::Route("POST /v1/checkouts");
        assert!(
            matches!(authorize(&key, None, route, &policy), Verdict::Allow { required_scope: Some(s) } if s.as_str() == "checkout:create")
        );
        assert!(matches!(
            authorize(&key, None, Requirement::Route("GET /nope"), &policy),
            Verdict::Deny {
                reason: DenyReason::RouteNotFound,
                ..
            }
        ));
        let needed = [
            Scope::parse("checkout:create").unwrap(),
            Scope::parse("invoice:read").unwrap(),
        ];
        assert!(matches!(
            authorize(&key, None, Requirement::Scopes(&needed), &policy),
            Verdict::Deny { reason: DenyReason::InsufficientScope, required_scope: Some(s) } if s.as_str() == "invoice:read"
        ));
        key.allowed_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(matches!(
            authorize(
                &key,
                ip("192.0.2.1"),
                Requirement::Route("GET /nope"),
                &policy
            ),
            Verdict::Deny {
                reason: DenyReason::IpNotAllowed,
                ..
            }
        ));
        key.scopes = Default::default();
        assert!(matches!(
            authorize(&key, ip("10.0.0.1"), route, &policy),
            Verdict::Deny {
                reason: DenyReason::InsufficientScope,
                required_scope: Some(_)
            }
        ));
    }

    #[test]
    fn a_route_refuses_a_credential_kind_it_does_not_accept() {
        let policy = RouteTable::from_toml(
            "[[route]]\nroute = \"POST /v1/payments\"\nscope = \"payment:create\"\ncredentials = [\"api_key\"]\n\
             [[route]]\nroute = \"GET /v1/profile\"\nscope = \"profile:read\"\ncredentials = [\"jwt\"]\n",
        )
        .unwrap();
        let scopes = ScopeSet::parse(&["*:*"]).unwrap();
        let pay = Requirement::Route("POST /v1/payments");
        let profile = Requirement::Route("GET /v1/profile");
        assert!(matches!(
            permit(&scopes, CredentialKind::ApiKey, pay, &policy),
            Verdict::Allow { .. }
        ));
        assert_eq!(
            permit(&scopes, CredentialKind::Jwt, pay, &policy),
            Verdict::Deny {
                reason: DenyReason::InvalidToken,
                required_scope: None
            }
        );
        assert!(matches!(
            permit(&scopes, CredentialKind::Jwt, profile, &policy),
            Verdict::Allow { .. }
        ));
        let (key, _) = key_with(&["*:*"]);
        assert!(matches!(
            authorize(&key, None, profile, &policy),
            Verdict::Deny {
                reason: DenyReason::InvalidToken,
                ..
            }
        ));
    }

    #[test]
    fn statuses() {
        assert_eq!(DenyReason::MissingToken.http_status(), 401);
        assert_eq!(DenyReason::IpNotAllowed.http_status(), 403);
        assert_eq!(DenyReason::RateLimited.http_status(), 429);
    }
}
