//! The Authorize path: parse, look up (cache first), decide.

use std::net::IpAddr;
use std::sync::Arc;

use keygate_core::bounds;
use keygate_core::clock::Clock;
use keygate_core::decision::{self, CredentialKind, DenyReason, Requirement, Verdict};
use keygate_core::key::KeyRecord;
use keygate_core::limits::{Allowance, LimitedBy, RateDecision};
use keygate_core::policy::RouteTable;
use keygate_core::scope::Scope;
use keygate_core::token::{self, Credential, ParsedToken, TokenError};

use super::limits::{Limiter, Subject};
use super::organizations::OrganizationLimits;
use super::usage::UsageTracker;
use crate::cache::KeyCache;
use crate::error::Error;
use crate::jwt::{self, Refused, Use, VerifiedJwt, Verifier};

/// One Authorize call, as received.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizeInput<'a> {
    /// The presented API key, with or without a leading `Bearer `; empty
    /// is a MISSING_TOKEN deny.
    pub token: &'a str,
    /// `"POST /v1/checkouts"` or a gRPC full method, looked up in the route
    /// policy; may be empty only when `required_scopes` are given.
    pub route: &'a str,
    /// The end client's IPv4 or IPv6 address, checked against the key's
    /// allow-list; empty means unknown.
    pub ip: &'a str,
    /// When not empty, used instead of the route policy: every scope is
    /// required.
    pub required_scopes: &'a [String],
}

/// Who an authenticated credential speaks for.
#[derive(Debug, Clone)]
pub enum Principal {
    /// A keygate API key.
    Key(Arc<KeyRecord>),
    /// A JWT access token from a trusted issuer.
    Jwt(Arc<VerifiedJwt>),
}

impl Principal {
    /// The key whose limits count the request: the key itself, or for a
    /// JWT the key its subject acts as (the server default, per issuer and
    /// `sub`, and the organization's limit).
    fn limited_as(&self) -> &KeyRecord {
        match self {
            Principal::Key(key) => key,
            Principal::Jwt(jwt) => &jwt.key,
        }
    }
}

/// The decision. `principal` is set once the token is authenticated, also on a deny.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Why the request is refused; `None` is an allow.
    pub deny: Option<DenyReason>,
    /// The authenticated key or JWT; `None` when the credential itself was refused.
    pub principal: Option<Principal>,
    /// On an allow (and on RATE_LIMITED), the scope the route required,
    /// `None` when `required_scopes` were given; on INSUFFICIENT_SCOPE, the
    /// scope the key lacks; on any other deny, `None`.
    pub required_scope: Option<String>,
    /// The rate-limit state that binds the request, when it got as far as
    /// counting and a limit applies: on RATE_LIMITED the limit that refused
    /// it, on an allow whichever of the key's and its organization's has
    /// fewer requests left. `None` for a key nothing limits (unlimited).
    pub rate: Option<RateDecision>,
    /// Whose limit `rate` is; `None` exactly when `rate` is.
    pub limited_by: Option<LimitedBy>,
    /// The key's organization's shared limit, when one applies to it
    /// (whether or not it is the binding one).
    pub organization_rate_limit: Option<std::num::NonZeroU32>,
}

impl Outcome {
    fn deny(reason: DenyReason) -> Self {
        Self {
            deny: Some(reason),
            principal: None,
            required_scope: None,
            rate: None,
            limited_by: None,
            organization_rate_limit: None,
        }
    }
}

/// What counting a request against its limits found.
#[derive(Debug, Clone, Copy)]
struct Counted {
    rate: RateDecision,
    by: LimitedBy,
    organization_limit: Option<std::num::NonZeroU32>,
}

impl Counted {
    fn refused(&self) -> bool {
        self.rate.retry_after.is_some()
    }
}

/// The Authorize decision for this replica: keys through the cache, routes
/// through the policy, rate limits (the key's and its organization's)
/// counted by a [`Limiter`], and uses recorded for the next usage flush.
/// Shared by Authorize, Check, and the authentication of admin and Watch
/// callers.
pub struct Authorizer {
    keys: Arc<KeyCache>,
    jwt: Arc<Verifier>,
    policy: Arc<RouteTable>,
    clock: Arc<dyn Clock>,
    limiter: Limiter,
    default_rate_limit: Allowance,
    organizations: Arc<OrganizationLimits>,
    usage: Arc<UsageTracker>,
}

impl Authorizer {
    /// `default_rate_limit` applies to keys whose own limit is 0 (it may be
    /// unlimited); `organizations` holds the organizations' shared limits;
    /// requests are counted by `limiter`; successful authentications are
    /// recorded in `usage`.
    pub fn new(
        keys: Arc<KeyCache>,
        policy: Arc<RouteTable>,
        clock: Arc<dyn Clock>,
        limiter: Limiter,
        default_rate_limit: Allowance,
        organizations: Arc<OrganizationLimits>,
        usage: Arc<UsageTracker>,
    ) -> Self {
        let jwt = Arc::new(Verifier::none(clock.clone()));
        Self {
            keys,
            jwt,
            policy,
            limiter,
            default_rate_limit,
            organizations,
            clock,
            usage,
        }
    }

    /// Also accept JWTs from `verifier`'s issuers.
    pub fn with_jwt(mut self, verifier: Arc<Verifier>) -> Self {
        self.jwt = verifier;
        self
    }

    /// The JWT verifier (its issuers and verified tokens).
    pub fn jwt(&self) -> &Arc<Verifier> {
        &self.jwt
    }

    /// Decides one request. A bad token is a deny, never an error; errors are
    /// for malformed requests and an unreachable store (fail closed).
    pub async fn authorize(&self, input: AuthorizeInput<'_>) -> Result<Outcome, Error> {
        bounds::check_authorize(input.route, input.ip, input.required_scopes)
            .map_err(|e| Error::invalid(e.field, e.reason))?;
        let ip = parse_ip(input.ip)?;
        let required: Vec<Scope> = input
            .required_scopes
            .iter()
            .map(|s| Scope::parse(s).map_err(|e| Error::invalid("required_scopes", e.to_string())))
            .collect::<Result<_, _>>()?;
        let requirement = if !required.is_empty() {
            Requirement::Scopes(&required)
        } else if input.route.trim().is_empty() {
            return Err(Error::invalid(
                "route",
                "must not be empty unless required_scopes are given",
            ));
        } else {
            Requirement::Route(input.route)
        };
        let principal = if jwt::looks_like_jwt(input.token) {
            match self
                .jwt
                .verify(token::strip_bearer(input.token).trim(), Use::Authorize)
                .await
            {
                Ok(jwt) => Principal::Jwt(jwt),
                Err(Refused::Denied(reason)) => return Ok(Outcome::deny(reason)),
                // Keys that cannot be had verify nothing: fail closed.
                Err(Refused::Unavailable(_)) => {
                    return Ok(Outcome::deny(DenyReason::InvalidToken));
                }
            }
        } else {
            match self.authenticate(input.token).await? {
                Ok(key) => Principal::Key(key),
                Err(reason) => {
                    self.count_refused(input.token, reason).await;
                    return Ok(Outcome::deny(reason));
                }
            }
        };
        let verdict = match &principal {
            Principal::Key(key) => decision::authorize(key, ip, requirement, &self.policy),
            Principal::Jwt(jwt) => decision::permit(
                &jwt.identity.scopes,
                CredentialKind::Jwt,
                requirement,
                &self.policy,
            ),
        };
        let (mut deny, required_scope) = match verdict {
            Verdict::Allow { required_scope } => (None, required_scope),
            Verdict::Deny {
                reason,
                required_scope,
            } => (Some(reason), required_scope),
        };
        // Only what would be allowed counts against the limits.
        let counted = if deny.is_none() {
            self.count(principal.limited_as()).await
        } else {
            None
        };
        if counted.is_some_and(|c| c.refused()) {
            deny = Some(DenyReason::RateLimited);
        }
        // Usage analytics are per key; a JWT's subject has no key to count under.
        if let Principal::Key(key) = &principal {
            self.usage.counts.count(key, deny, self.clock.now());
        }
        Ok(Outcome {
            deny,
            required_scope: required_scope.map(|s| s.as_str().to_owned()),
            // A route that takes no credential of this kind answers as if
            // there were none: a 401 that names no one.
            principal: (deny != Some(DenyReason::InvalidToken)).then_some(principal),
            rate: counted.map(|c| c.rate),
            limited_by: counted.map(|c| c.by),
            organization_rate_limit: counted.and_then(|c| c.organization_limit),
        })
    }

    /// Counts, for usage analytics, a refused credential that names an
    /// existing key (a wrong secret, a revoked, disabled or expired key): a
    /// leaked key still being tried shows in its usage. Unknown key ids
    /// count nowhere, so guessed ids create nothing. Off the allow path;
    /// the key is in the cache, just read by `authenticate`.
    async fn count_refused(&self, token: &str, reason: DenyReason) {
        if reason == DenyReason::MissingToken {
            return;
        }
        let Ok(parsed) = ParsedToken::parse(token) else {
            return;
        };
        if let Ok(Some(key)) = self.keys.get(parsed.key_id).await {
            self.usage
                .counts
                .count(&key, Some(reason), self.clock.now());
        }
    }

    /// Counts a request that passed every other check against the key's
    /// allowance and its organization's: the one place Authorize asks the
    /// limiter. It is allowed only within both; the key is counted first,
    /// and taken back when the organization refuses, so only allowed
    /// requests count. `None` when no limit applies: an unlimited key is
    /// never counted (not for its organization either), nor is a key with
    /// no limit of its own under an unlimited default in an organization
    /// without one.
    async fn count(&self, key: &KeyRecord) -> Option<Counted> {
        if key.unlimited {
            return None;
        }
        let organization = key
            .organization_id
            .as_deref()
            .and_then(|org| self.organizations.get(org));
        let organization_limit = organization.as_ref().map(|(_, n)| *n);
        let subject = Subject::Key(key.id);
        let own = match key.allowance(self.default_rate_limit) {
            Allowance::Unlimited => None,
            Allowance::PerMinute(n) => Some(Counted {
                rate: self.limiter.check(&subject, n).await,
                by: LimitedBy::Key,
                organization_limit,
            }),
        };
        let Some((org, per_minute)) = organization else {
            return own;
        };
        if own.is_some_and(|c| c.refused()) {
            return own;
        }
        let shared = Counted {
            rate: self
                .limiter
                .check(&Subject::Organization(org), per_minute)
                .await,
            by: LimitedBy::Organization,
            organization_limit,
        };
        if shared.refused() {
            if own.is_some() {
                self.limiter.uncount(&subject);
            }
            return Some(shared);
        }
        // Both allow: the headers tell of the one the client runs into first.
        match own {
            Some(own) if own.rate.remaining <= shared.rate.remaining => Some(own),
            _ => Some(shared),
        }
    }

    /// Checks a presented credential: format, key, secret, state, expiry,
    /// and records the use. The outer error is the store failing; the inner
    /// one, the credential.
    pub async fn authenticate(
        &self,
        token: &str,
    ) -> Result<Result<Arc<KeyRecord>, DenyReason>, Error> {
        let parsed = match ParsedToken::parse(token) {
            Ok(parsed) => parsed,
            Err(TokenError::Missing) => return Ok(Err(DenyReason::MissingToken)),
            Err(TokenError::Malformed) => return Ok(Err(DenyReason::InvalidToken)),
        };
        let Some(key) = self.keys.get(parsed.key_id).await? else {
            return Ok(Err(DenyReason::InvalidToken));
        };
        let now = self.clock.now();
        Ok(decision::authenticate(&key, &parsed, now).map(|used| {
            self.usage.record(&key, used, now);
            key
        }))
    }

    /// Whether a credential kept by a long-lived session (a Watch) would
    /// still authenticate now: the key exists, is active and unexpired, and
    /// the kept secret is its current one or its previous one inside the
    /// grace period. Not a use: nothing is recorded.
    pub async fn reauthenticate(
        &self,
        credential: &Credential,
    ) -> Result<Result<Arc<KeyRecord>, DenyReason>, Error> {
        let Some(key) = self.keys.get(credential.key_id).await? else {
            return Ok(Err(DenyReason::InvalidToken));
        };
        Ok(decision::reauthenticate(&key, credential, self.clock.now()).map(|_| key))
    }
}

/// An empty string is "unknown"; anything else must be an IPv4 or IPv6 address.
pub fn parse_ip(ip: &str) -> Result<Option<IpAddr>, Error> {
    let ip = ip.trim();
    if ip.is_empty() {
        return Ok(None);
    }
    ip.parse().map(Some).map_err(|_| {
        Error::invalid(
            "ip",
            format!("{:?} is not an IPv4 or IPv6 address", truncate(ip, 64)),
        )
    })
}

/// At most `max` bytes of `s`, cut on a character boundary, for messages.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
