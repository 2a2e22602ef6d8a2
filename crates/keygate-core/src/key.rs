//! The key record and its lifecycle rules.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use ipnet::IpNet;
use uuid::Uuid;

use super::limits::Allowance;
use super::scope::ScopeSet;
use super::token::SecretDigest;

/// Whether a key works on live traffic (real funds) or test traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Live traffic; tokens read `<brand>_live_…`.
    Live,
    /// Test traffic; tokens read `<brand>_test_…`.
    Test,
}

impl Mode {
    /// `live` or `test`: the name in tokens, the store and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::Test => "test",
        }
    }

    /// The mode whose [`as_str`](Self::as_str) is `s`; `None` for any other text.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Mode::Live),
            "test" => Some(Mode::Test),
            _ => None,
        }
    }
}

/// ORGANIZATION keys act inside one organization; SYSTEM keys on all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Bound to its `organization_id`.
    Organization,
    /// Bound to no organization; may act on every one.
    System,
}

impl Tier {
    /// `organization` or `system`: the name in the store and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Organization => "organization",
            Tier::System => "system",
        }
    }

    /// The tier whose [`as_str`](Self::as_str) is `s`; `None` for any other text.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "organization" => Some(Tier::Organization),
            "system" => Some(Tier::System),
            _ => None,
        }
    }
}

/// The stored state; `Expired` is not stored but derived from `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// Works (unless expired).
    Active,
    /// Refused until enabled again.
    Disabled,
    /// Refused for good.
    Revoked {
        /// When it was revoked.
        at: DateTime<Utc>,
        /// Why, as the revoker put it (may be empty).
        reason: String,
    },
}

impl KeyState {
    /// `active`, `disabled` or `revoked`: the name in the store.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Disabled => "disabled",
            KeyState::Revoked { .. } => "revoked",
        }
    }
}

/// What an operator sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    /// Active and not expired: the key works.
    Active,
    /// Disabled (whether or not it has also expired).
    Disabled,
    /// Revoked (whether or not it has also expired).
    Revoked,
    /// Active, but its `expires_at` has passed.
    Expired,
}

/// A rotated-out secret that keeps working until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousSecret {
    /// The digest of the rotated-out secret.
    pub digest: SecretDigest,
    /// The end of its grace period: from then on it is refused as expired.
    pub expires_at: DateTime<Utc>,
    /// Whether the revocation feed has said this secret is dead (a rotation
    /// without grace says so itself).
    pub announced: bool,
    /// When it was last used since the rotation, and how often: so an
    /// operator sees when every client has moved to the new secret.
    pub last_used_at: Option<DateTime<Utc>>,
    /// How many times it authenticated since the rotation.
    pub uses: u64,
}

/// Longest organization id, in bytes (every allowed character is one byte).
pub const MAX_ORGANIZATION_ID_BYTES: usize = 128;

/// An organization id: 1–128 characters of letters, digits, `_`, `-`, `.` and `:`.
pub fn is_valid_organization_id(id: &str) -> bool {
    (1..=MAX_ORGANIZATION_ID_BYTES).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_-.:".contains(&c))
}

/// Longest grace period a rotation may give the previous secret.
pub const MAX_GRACE: Duration = Duration::days(7);

/// One API key as stored. Holds digests only, never a secret.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    /// The key id; its token carries it, so the store is read by primary key.
    pub id: Uuid,
    /// A name for people; every way of making or renaming a key bounds it to
    /// [`MAX_NAME_CHARS`](crate::bounds::MAX_NAME_CHARS) characters.
    pub name: String,
    /// `None` exactly for SYSTEM keys. Shared: the key cache gives keys of
    /// one organization one copy.
    pub organization_id: Option<Arc<str>>,
    /// ORGANIZATION or SYSTEM.
    pub tier: Tier,
    /// Live or test traffic.
    pub mode: Mode,
    /// The start of the key's tokens, `<brand>_<mode>_<key id>`: a token with
    /// any other prefix is refused even with the right secret.
    pub prefix: String,
    /// The digest of the current secret.
    pub secret_digest: SecretDigest,
    /// The secret the last rotation replaced, while it is remembered. Boxed:
    /// most keys have none, and a cached record is 64 bytes smaller for it.
    pub previous_secret: Option<Box<PreviousSecret>>,
    /// What the key may do.
    pub scopes: ScopeSet,
    /// Where the key may be used from; empty means from anywhere.
    pub allowed_cidrs: Vec<IpNet>,
    /// 0 means the server default.
    pub rate_limit_per_minute: u32,
    /// Never counted against any rate limit (its own, its organization's);
    /// `rate_limit_per_minute` is then kept but not applied. Only a SYSTEM
    /// key may make a key unlimited (see `grant`).
    pub unlimited: bool,
    /// Active, disabled or revoked.
    pub state: KeyState,
    /// When the key was made.
    pub created_at: DateTime<Utc>,
    /// When it last authenticated, as last written to the store (usage is
    /// flushed periodically, so this may lag by the flush interval).
    pub last_used_at: Option<DateTime<Utc>>,
    /// When it stops working; `None` for never.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was last rotated; `None` if never.
    pub rotated_at: Option<DateTime<Utc>>,
    /// The creating key's id, or "bootstrap".
    pub created_by: String,
    /// Bumped by every stored change; writes compare it to detect a concurrent change.
    pub version: i64,
}

/// A lifecycle change that the key's state forbids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// The key is revoked: nothing about it may change any more.
    #[error("key is revoked; revocation is final")]
    Revoked,
    /// Disable on a key that is already disabled.
    #[error("key is already disabled")]
    AlreadyDisabled,
    /// Enable on a key that is not disabled.
    #[error("key is not disabled")]
    NotDisabled,
    /// Ending a grace period when none is running.
    #[error("key has no previous secret in a grace period")]
    NoPreviousSecret,
}

/// Changes to a key's settings; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyChanges {
    /// A new name.
    pub name: Option<String>,
    /// New scopes, replacing the old ones.
    pub scopes: Option<ScopeSet>,
    /// A new allow-list, replacing the old one (empty: from anywhere).
    pub allowed_cidrs: Option<Vec<IpNet>>,
    /// A new limit per minute (0: the server default).
    pub rate_limit_per_minute: Option<u32>,
    /// Whether the key is never counted from now on.
    pub unlimited: Option<bool>,
    /// `Some(None)` removes the expiry.
    pub expires_at: Option<Option<DateTime<Utc>>>,
}

impl KeyChanges {
    /// The changed fields, for the audit trail ("scopes, rate_limit_per_minute");
    /// `event::details` reads the same names to record their new values.
    pub fn describe(&self) -> String {
        [
            ("name", self.name.is_some()),
            ("scopes", self.scopes.is_some()),
            ("allowed_cidrs", self.allowed_cidrs.is_some()),
            (
                "rate_limit_per_minute",
                self.rate_limit_per_minute.is_some(),
            ),
            ("unlimited", self.unlimited.is_some()),
            ("expires_at", self.expires_at.is_some()),
        ]
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
    }
}

impl KeyRecord {
    /// What an operator sees at `now`: revoked and disabled win over expired.
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        match self.state {
            KeyState::Revoked { .. } => KeyStatus::Revoked,
            KeyState::Disabled => KeyStatus::Disabled,
            KeyState::Active if self.expires_at.is_some_and(|at| at <= now) => KeyStatus::Expired,
            KeyState::Active => KeyStatus::Active,
        }
    }

    /// How much the key may do on its own: unlimited when it is, else its
    /// own limit, else `default` (the server's, which may be unlimited too).
    pub fn allowance(&self, default: Allowance) -> Allowance {
        if self.unlimited {
            return Allowance::Unlimited;
        }
        std::num::NonZeroU32::new(self.rate_limit_per_minute).map_or(default, Allowance::PerMinute)
    }

    /// The previous secret, only while its grace period runs.
    pub fn live_previous_secret(&self, now: DateTime<Utc>) -> Option<&PreviousSecret> {
        self.previous_secret
            .as_deref()
            .filter(|p| p.expires_at > now)
    }

    /// Revokes the key for good, recording when and why. Fails only if it
    /// is already revoked.
    pub fn revoke(&mut self, reason: String, now: DateTime<Utc>) -> Result<(), LifecycleError> {
        if matches!(self.state, KeyState::Revoked { .. }) {
            return Err(LifecycleError::Revoked);
        }
        self.state = KeyState::Revoked { at: now, reason };
        Ok(())
    }

    /// Active → disabled. Fails on a revoked or already disabled key.
    pub fn disable(&mut self) -> Result<(), LifecycleError> {
        match self.state {
            KeyState::Revoked { .. } => Err(LifecycleError::Revoked),
            KeyState::Disabled => Err(LifecycleError::AlreadyDisabled),
            KeyState::Active => {
                self.state = KeyState::Disabled;
                Ok(())
            }
        }
    }

    /// Disabled → active. Fails on a revoked key or one that is not disabled.
    pub fn enable(&mut self) -> Result<(), LifecycleError> {
        match self.state {
            KeyState::Revoked { .. } => Err(LifecycleError::Revoked),
            KeyState::Active => Err(LifecycleError::NotDisabled),
            KeyState::Disabled => {
                self.state = KeyState::Active;
                Ok(())
            }
        }
    }

    /// Applies settings changes. A revoked key is final: nothing changes.
    pub fn update(&mut self, changes: &KeyChanges) -> Result<(), LifecycleError> {
        if matches!(self.state, KeyState::Revoked { .. }) {
            return Err(LifecycleError::Revoked);
        }
        let c = changes.clone();
        if let Some(name) = c.name {
            self.name = name;
        }
        if let Some(scopes) = c.scopes {
            self.scopes = scopes;
        }
        if let Some(cidrs) = c.allowed_cidrs {
            self.allowed_cidrs = cidrs;
        }
        if let Some(limit) = c.rate_limit_per_minute {
            self.rate_limit_per_minute = limit;
        }
        if let Some(unlimited) = c.unlimited {
            self.unlimited = unlimited;
        }
        if let Some(expires_at) = c.expires_at {
            self.expires_at = expires_at;
        }
        Ok(())
    }

    /// Ends the running grace period now (and counts as announced: the
    /// change itself goes out on the feed).
    pub fn expire_previous_secret(&mut self, now: DateTime<Utc>) -> Result<(), LifecycleError> {
        if matches!(self.state, KeyState::Revoked { .. }) {
            return Err(LifecycleError::Revoked);
        }
        let previous = self
            .previous_secret
            .as_mut()
            .filter(|p| p.expires_at > now)
            .ok_or(LifecycleError::NoPreviousSecret)?;
        previous.expires_at = now;
        previous.announced = true;
        Ok(())
    }

    /// Installs a new secret; the current one stays valid for `grace` (0 kills it
    /// at once). A secret still in an earlier grace period dies now: there is
    /// never more than one previous secret.
    pub fn rotate(
        &mut self,
        new_digest: SecretDigest,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<(), LifecycleError> {
        if matches!(self.state, KeyState::Revoked { .. }) {
            return Err(LifecycleError::Revoked);
        }
        self.previous_secret = Some(Box::new(PreviousSecret {
            digest: self.secret_digest,
            expires_at: now + grace,
            announced: grace.is_zero(),
            last_used_at: None,
            uses: 0,
        }));
        self.secret_digest = new_digest;
        self.rotated_at = Some(now);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::token::{Brand, generate};

    /// An active ORGANIZATION key of org_1 with the given scopes, and its token.
    pub fn key_with(scopes: &[&str]) -> (KeyRecord, String) {
        let id = Uuid::new_v4();
        let t = generate(&Brand::default(), Mode::Live, id).unwrap();
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let key = KeyRecord {
            id,
            name: "test".into(),
            organization_id: Some("org_1".into()),
            tier: Tier::Organization,
            mode: Mode::Live,
            prefix: t.prefix,
            secret_digest: t.digest,
            previous_secret: None,
            scopes: ScopeSet::parse(scopes).unwrap(),
            allowed_cidrs: vec![],
            rate_limit_per_minute: 0,
            unlimited: false,
            state: KeyState::Active,
            created_at: now,
            last_used_at: None,
            expires_at: None,
            rotated_at: None,
            created_by: "bootstrap".into(),
            version: 1,
        };
        (key, t.token)
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::key_with;
    use super::*;

    #[test]
    fn revocation_is_final() {
        let (mut k, _) = key_with(&[]);
        let now = k.created_at;
        k.revoke("leaked".into(), now).unwrap();
        assert_eq!(k.revoke("again".into(), now), Err(LifecycleError::Revoked));
        assert_eq!(k.enable(), Err(LifecycleError::Revoked));
        assert_eq!(k.disable(), Err(LifecycleError::Revoked));
        assert_eq!(
            k.rotate(SecretDigest([0; 32]), Duration::zero(), now),
            Err(LifecycleError::Revoked)
        );
        assert_eq!(k.status(now), KeyStatus::Revoked);
    }

    #[test]
    fn disable_enable_round_trip() {
        let (mut k, _) = key_with(&[]);
        k.disable().unwrap();
        assert_eq!(k.disable(), Err(LifecycleError::AlreadyDisabled));
        assert_eq!(k.status(k.created_at), KeyStatus::Disabled);
        k.enable().unwrap();
        assert_eq!(k.enable(), Err(LifecycleError::NotDisabled));
    }

    #[test]
    fn rotation_keeps_one_previous_secret() {
        let (mut k, _) = key_with(&[]);
        let now = k.created_at;
        let first = k.secret_digest;
        k.rotate(SecretDigest([1; 32]), Duration::hours(1), now)
            .unwrap();
        k.rotate(SecretDigest([2; 32]), Duration::hours(1), now)
            .unwrap();
        let prev = k.previous_secret.clone().unwrap();
        assert_eq!(prev.digest, SecretDigest([1; 32]));
        assert_ne!(prev.digest, first);
        assert!(k.live_previous_secret(now).is_some());
        assert!(k.live_previous_secret(now + Duration::hours(1)).is_none());
    }

    #[test]
    fn allowance_is_unlimited_then_own_then_the_default() {
        let (mut k, _) = key_with(&[]);
        let n = |n| Allowance::PerMinute(std::num::NonZeroU32::new(n).unwrap());
        assert_eq!(k.allowance(n(100)), n(100));
        assert_eq!(k.allowance(Allowance::Unlimited), Allowance::Unlimited);
        k.rate_limit_per_minute = 5;
        assert_eq!(k.allowance(Allowance::Unlimited), n(5));
        k.unlimited = true;
        assert_eq!(k.allowance(n(100)), Allowance::Unlimited);
        let changes = KeyChanges {
            unlimited: Some(false),
            ..Default::default()
        };
        assert_eq!(changes.describe(), "unlimited");
        k.update(&changes).unwrap();
        assert_eq!(k.allowance(n(100)), n(5));
    }

    #[test]
    fn expiry_is_derived() {
        let (mut k, _) = key_with(&[]);
        k.expires_at = Some(k.created_at + Duration::seconds(10));
        assert_eq!(k.status(k.created_at), KeyStatus::Active);
        assert_eq!(
            k.status(k.created_at + Duration::seconds(10)),
            KeyStatus::Expired
        );
    }
}
