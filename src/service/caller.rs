//! Who is calling an admin RPC, and what that key may do.

use std::sync::Arc;

use keygate_core::event::Actor;
use keygate_core::grant;
use keygate_core::key::{KeyRecord, Tier};
use keygate_core::limits::Allowance;
use keygate_core::scope::Scope;

use crate::error::Error;
use crate::jwt::VerifiedJwt;

/// An authenticated admin caller: a key, or a JWT acting as a key with its
/// claims' organization and scopes (see `JwtIdentity::as_caller_key`), so
/// every rule below holds for both alike.
#[derive(Debug, Clone)]
pub struct Caller {
    key: Arc<KeyRecord>,
    actor: Actor,
    jwt: Option<Arc<VerifiedJwt>>,
}

impl Caller {
    /// The caller whose credential authenticated as `key`; authentication
    /// is the transport's job, done before this.
    pub fn new(key: Arc<KeyRecord>) -> Self {
        Self {
            actor: Actor::Key(key.id),
            key,
            jwt: None,
        }
    }

    /// The caller a verified JWT speaks for.
    pub fn from_jwt(jwt: Arc<VerifiedJwt>) -> Self {
        Self {
            key: jwt.key.clone(),
            actor: jwt.identity.actor(),
            jwt: Some(jwt),
        }
    }

    /// The calling key's record (for a JWT, the key it acts as; never stored).
    pub fn key(&self) -> &KeyRecord {
        &self.key
    }

    /// Who the audit trail names: the key's id, or `jwt:<iss>#<sub>`.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    /// The JWT the caller presented, when it presented one.
    pub fn jwt(&self) -> Option<&Arc<VerifiedJwt>> {
        self.jwt.as_ref()
    }

    /// Whether the calling key is a SYSTEM key, which sees every
    /// organization.
    pub fn is_system(&self) -> bool {
        self.key.tier == Tier::System
    }

    /// Fails with PERMISSION_DENIED naming the scope the caller lacks.
    pub fn require(&self, scope: &Scope) -> Result<(), Error> {
        if self.key.scopes.grants(scope) {
            Ok(())
        } else {
            Err(Error::InsufficientScope(format!("this call needs {scope}")))
        }
    }

    /// Fails with PERMISSION_DENIED unless the caller holds every scope of
    /// `target`. Rotating a key hands out its secret, and updating or
    /// re-enabling one restores its power: a weaker key doing that to a
    /// stronger one would be an escalation. Taking power away (revoke,
    /// disable, delete) needs no such check, so any admin can stop a leak.
    pub fn require_covers(&self, target: &KeyRecord, action: &str) -> Result<(), Error> {
        match self.key.scopes.first_missing(target.scopes.iter()) {
            None => Ok(()),
            Some(missing) => Err(Error::InsufficientScope(format!(
                "cannot {action} a key holding {missing}, which the calling key does not hold"
            ))),
        }
    }

    /// Fails with PERMISSION_DENIED unless `target`, as it will be after a
    /// create, update, rotate or enable, has no more power than the caller:
    /// every scope held by the caller, unlimited only if it was already or
    /// the caller is a SYSTEM key, and within its mode, allow-list, expiry
    /// and rate limit (see [`grant`]). `before` is the target as stored
    /// (`None` for a new key): when a key changes itself, its stored record
    /// is the caller, so it may narrow itself but never widen itself.
    pub fn require_within(
        &self,
        before: Option<&KeyRecord>,
        target: &KeyRecord,
        default_rate_limit: Allowance,
    ) -> Result<(), Error> {
        let grantor = match before {
            Some(own) if own.id == self.key.id => own,
            _ => &self.key,
        };
        if let Some(missing) = grantor.scopes.first_missing(target.scopes.iter()) {
            return Err(Error::InsufficientScope(format!(
                "cannot grant {missing}, which the calling key does not hold"
            )));
        }
        grant::may_make_unlimited(&self.key, before, target)?;
        Ok(grant::within(grantor, target, default_rate_limit)?)
    }

    /// The organization a listing is limited to: what was asked for, if the
    /// caller may see it (NOT_FOUND otherwise); when nothing was asked, every
    /// organization for a SYSTEM key and its own for an ORGANIZATION key.
    pub fn organization_filter(&self, asked: Option<String>) -> Result<Option<String>, Error> {
        match asked {
            Some(org) if !self.can_see(Some(&org)) => Err(Error::NotFound("organization")),
            Some(org) => Ok(Some(org)),
            None if self.is_system() => Ok(None),
            None => Ok(self.key.organization_id.as_deref().map(str::to_owned)),
        }
    }

    /// Whether the caller may see a key of this organization (`None`: a SYSTEM key).
    pub fn can_see(&self, organization_id: Option<&str>) -> bool {
        self.is_system()
            || (organization_id.is_some() && organization_id == self.key.organization_id.as_deref())
    }
}
