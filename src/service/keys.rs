//! The key lifecycle: create, read, list, rotate, revoke, disable, enable, delete.
//!
//! Every change is a read-modify-write guarded by the record's version and
//! retried on a conflict, so concurrent changes to one key never lose an update
//! and never leave two current secrets.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use ipnet::IpNet;
use keygate_core::clock::Clock;
use keygate_core::event::{self, Actor, EventKind, NewEvent};
use keygate_core::grant;
use keygate_core::key::{KeyChanges, KeyRecord, KeyState, Mode, Tier};
use keygate_core::limits::Allowance;
use keygate_core::page::PageTokens;
use keygate_core::scope::{Scope, ScopeSet};
use keygate_core::token::{self, Brand, NewToken};
use uuid::Uuid;

use super::caller::Caller;
use super::page::{last_of_page, page_size};
use super::replicas::Replicas;
use super::usage::UsageTracker;
use crate::cache::KeyCache;
use crate::error::Error;
use crate::store::{AdminStore, KeyQuery};

/// How often a change is retried when another change to the same key wins.
const MAX_ATTEMPTS: usize = 8;

/// A validated CreateKey request.
#[derive(Debug, Clone)]
pub struct NewKeySpec {
    /// A label for people, trimmed and not empty.
    pub name: String,
    /// The organization an ORGANIZATION key acts in; `None`: the caller's
    /// own. Always `None` for a SYSTEM key.
    pub organization_id: Option<String>,
    /// ORGANIZATION or SYSTEM; only a SYSTEM caller may create a SYSTEM key.
    pub tier: Tier,
    /// Live or test traffic; also part of the token.
    pub mode: Mode,
    /// What the key may do; every scope must be held by the caller.
    pub scopes: ScopeSet,
    /// Where the key may be used from, canonical networks; empty: the
    /// caller's own allow-list (any address when the caller has none).
    pub allowed_cidrs: Vec<IpNet>,
    /// Requests per minute; 0: the server default.
    pub rate_limit_per_minute: u32,
    /// Never counted against a rate limit; only a SYSTEM caller may ask.
    pub unlimited: bool,
    /// When the key stops working, in the future; `None`: the caller's own
    /// expiry (never when the caller has none).
    pub expires_at: Option<DateTime<Utc>>,
}

/// A validated ListKeys request.
#[derive(Debug, Clone, Default)]
pub struct ListSpec {
    /// Only this organization's keys; `None`: everything the caller may see
    /// ([`Caller::organization_filter`]).
    pub organization_id: Option<String>,
    /// Whether revoked keys are listed too.
    pub include_revoked: bool,
    /// Only keys of this mode; `None`: both.
    pub mode: Option<Mode>,
    /// Keys per page; 0 means the default of 100.
    pub page_size: u32,
    /// Where to continue, as returned with the previous page; `None` starts
    /// at the oldest key. Only valid with the same filters.
    pub page_token: Option<String>,
}

pub(super) struct Scopes {
    create: Scope,
    pub(super) read: Scope,
    update: Scope,
    delete: Scope,
}

/// Keys whose last-used times one transaction of the usage flush writes.
const USAGE_FLUSH_CHUNK: usize = 500;

/// The admin API's key lifecycle over the store. Every call checks the
/// caller's scope (`api_key:create`, `:read`, `:update`, `:delete`) and
/// organization (another organization's key is NOT_FOUND) and never lets a
/// caller grant more than it holds; reads come from the store, never the
/// cache, and every write invalidates this replica's cache before it
/// returns.
pub struct KeyService {
    /// Uses not yet written, shown on what GetKey and ListKeys return.
    pub(super) usage: Arc<UsageTracker>,
    /// Confirms writes whose caller asked to wait for every live replica.
    replicas: Arc<Replicas>,
    pub(super) store: Arc<dyn AdminStore>,
    cache: Arc<KeyCache>,
    pub(super) clock: Arc<dyn Clock>,
    brand: Brand,
    pub(super) pages: PageTokens,
    pub(super) scopes: Scopes,
    /// What a key's rate limit of 0 means, to compare limits with the caller's.
    default_rate_limit: Allowance,
}

impl KeyService {
    /// The key service over `store`; page tokens are signed with `page_key`
    /// (shared by every replica), writes are confirmed through `replicas`.
    pub fn new(
        store: Arc<dyn AdminStore>,
        cache: Arc<KeyCache>,
        clock: Arc<dyn Clock>,
        brand: Brand,
        page_key: [u8; 32],
        replicas: Arc<Replicas>,
        usage: Arc<UsageTracker>,
    ) -> Self {
        let scope = |s| Scope::parse(s).expect("built-in scope parses");
        Self {
            replicas,
            usage,
            store,
            cache,
            clock,
            brand,
            pages: PageTokens::new(page_key),
            scopes: Scopes {
                create: scope("api_key:create"),
                read: scope("api_key:read"),
                update: scope("api_key:update"),
                delete: scope("api_key:delete"),
            },
            default_rate_limit: Allowance::DEFAULT,
        }
    }

    /// Sets what a rate limit of 0 means (the server's `--default-rate-limit`).
    pub fn with_default_rate_limit(mut self, default: Allowance) -> Self {
        self.default_rate_limit = default;
        self
    }

    /// The service clock's time, for showing a key's status as of now.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Creates a key; the token in the answer is the only copy of its secret.
    pub async fn create(
        &self,
        caller: &Caller,
        spec: NewKeySpec,
    ) -> Result<(KeyRecord, String), Error> {
        caller.require(&self.scopes.create)?;
        let organization_id = match spec.tier {
            Tier::System if !caller.is_system() => {
                return Err(Error::InsufficientScope(
                    "only a SYSTEM key can create a SYSTEM key".into(),
                ));
            }
            Tier::System => None,
            Tier::Organization => {
                let org = spec
                    .organization_id
                    .or_else(|| caller.key().organization_id.as_deref().map(str::to_owned))
                    .ok_or_else(|| {
                        Error::invalid("organization_id", "is required for ORGANIZATION keys")
                    })?;
                if !caller.can_see(Some(&org)) {
                    return Err(Error::NotFound("organization"));
                }
                Some(org)
            }
        };
        let now = self.clock.now();
        if spec.expires_at.is_some_and(|at| at <= now) {
            return Err(Error::invalid("expires_at", "must be in the future"));
        }
        let id = self.new_id()?;
        let NewToken {
            token,
            prefix,
            digest,
        } = self.new_token(spec.mode, id)?;
        let mut key = KeyRecord {
            id,
            name: spec.name,
            organization_id: organization_id.map(Arc::from),
            tier: spec.tier,
            mode: spec.mode,
            prefix,
            secret_digest: digest,
            previous_secret: None,
            scopes: spec.scopes,
            allowed_cidrs: spec.allowed_cidrs,
            rate_limit_per_minute: spec.rate_limit_per_minute,
            unlimited: spec.unlimited,
            state: KeyState::Active,
            created_at: now,
            last_used_at: None,
            expires_at: spec.expires_at,
            rotated_at: None,
            created_by: caller.actor().to_string(),
            version: 1,
        };
        grant::inherit(caller.key(), &mut key);
        caller.require_within(None, &key, self.default_rate_limit)?;
        self.store
            .insert_key(
                &key,
                &event(EventKind::Created, &key, caller, now, String::new()),
            )
            .await?;
        // Into this replica's key-id index before the token is returned, so
        // its first use here is never refused; and the id may sit in the
        // negative cache if someone guessed it first.
        self.cache.apply(EventKind::Created, id);
        tracing::info!(key_id = %id, organization_id = ?key.organization_id, actor = %caller.actor(), "key created");
        Ok((key, token))
    }

    /// The key as stored, with uses not yet written shown; needs
    /// `api_key:read`; NOT_FOUND when there is none the caller may see.
    pub async fn get(&self, caller: &Caller, id: Uuid) -> Result<KeyRecord, Error> {
        caller.require(&self.scopes.read)?;
        let mut key = self.load_visible(caller, id).await?;
        self.usage.overlay(&mut key);
        Ok(key)
    }

    /// Changes a key's settings. New scopes must all be held by the caller.
    pub async fn update(
        &self,
        caller: &Caller,
        id: Uuid,
        changes: KeyChanges,
    ) -> Result<(KeyRecord, i64), Error> {
        caller.require(&self.scopes.update)?;
        if let Some(scopes) = &changes.scopes
            && let Some(missing) = caller.key().scopes.first_missing(scopes.iter())
        {
            return Err(Error::InsufficientScope(format!(
                "cannot grant {missing}, which the calling key does not hold"
            )));
        }
        let now = self.clock.now();
        if changes.expires_at.flatten().is_some_and(|at| at <= now) {
            return Err(Error::invalid("expires_at", "must be in the future"));
        }
        let described = changes.describe();
        self.change(caller, id, EventKind::Updated, |key, _| {
            caller.require_covers(key, "update")?;
            let before = key.clone();
            key.update(&changes)?;
            caller.require_within(Some(&before), key, self.default_rate_limit)?;
            Ok(described.clone())
        })
        .await
    }

    /// Ends a rotation's grace period now; goes out on the feed as EXPIRED_SECRET.
    pub async fn expire_previous_secret(
        &self,
        caller: &Caller,
        id: Uuid,
    ) -> Result<(KeyRecord, i64), Error> {
        caller.require(&self.scopes.update)?;
        self.change(caller, id, EventKind::SecretExpired, |key, now| {
            key.expire_previous_secret(now)?;
            Ok(String::new())
        })
        .await
    }

    /// Writes the uses recorded since the last flush; on failure keeps them
    /// for the next one.
    /// Analytics counts go with it (see [`Self::flush_usage_counts`]).
    /// Returns how many keys' last-used times were written.
    pub async fn flush_usage(&self) -> Result<usize, Error> {
        let mut records = self.usage.drain();
        let n = records.len();
        // One transaction a chunk, not one for the whole flush: each holds
        // the row locks of its keys, and an admin write of one of them (and
        // every write queued behind it on the event log's lock) waits for
        // that transaction. On a slow database a flush of thousands of keys
        // in one transaction outlasted the store timeout of those writes.
        // Chunks that committed stay written; the one that failed and those
        // after it are restored for the next flush.
        records.sort_unstable_by_key(|r| r.key_id);
        let mut written = Ok(());
        let mut done = 0;
        for chunk in records.chunks(USAGE_FLUSH_CHUNK) {
            written = self.store.record_usage(chunk).await;
            if written.is_err() {
                break;
            }
            done += chunk.len();
        }
        if written.is_err() {
            self.usage.restore(records.split_off(done));
        }
        let counted = self.flush_usage_counts().await;
        written?;
        counted?;
        Ok(n)
    }

    /// One page of keys, and the token of the next page when there is one.
    pub async fn list(
        &self,
        caller: &Caller,
        spec: ListSpec,
    ) -> Result<(Vec<KeyRecord>, Option<String>), Error> {
        caller.require(&self.scopes.read)?;
        let organization_id = caller.organization_filter(spec.organization_id)?;
        let filter = format!(
            "{organization_id:?}|{:?}|{}",
            spec.mode, spec.include_revoked
        );
        let after = spec
            .page_token
            .map(|t| self.pages.decode(&t, &filter))
            .transpose()?;
        let limit = page_size(spec.page_size);
        let query = KeyQuery {
            organization_id,
            mode: spec.mode,
            include_revoked: spec.include_revoked,
            after,
            limit: limit + 1,
        };
        let mut keys = self.store.list_keys(&query).await?;
        for key in &mut keys {
            self.usage.overlay(key);
        }
        let next = last_of_page(&mut keys, limit)
            .map(|k| self.pages.encode((k.created_at, k.id), &filter));
        Ok((keys, next))
    }

    /// New secret, same key id; the old secret works for `grace` more.
    pub async fn rotate(
        &self,
        caller: &Caller,
        id: Uuid,
        grace: Duration,
        wait: Option<std::time::Duration>,
    ) -> Result<(KeyRecord, String, u32), Error> {
        caller.require(&self.scopes.update)?;
        let mut token = None;
        let (key, seq) = self
            .change(caller, id, EventKind::Rotated, |key, now| {
                caller.require_covers(key, "rotate")?;
                caller.require_within(Some(key), key, self.default_rate_limit)?;
                let fresh = match &token {
                    Some(t) => t,
                    None => token.insert(self.new_token(key.mode, key.id)?),
                };
                key.rotate(fresh.digest, grace, now)?;
                Ok(String::new())
            })
            .await?;
        let token = token.ok_or_else(|| Error::Internal("rotation produced no token".into()))?;
        let confirmed = self.confirmed(wait, seq).await?;
        Ok((key, token.token, confirmed))
    }

    /// Revokes the key for good; with `wait`, returns once every live
    /// replica applied it (how many did), or DEADLINE_EXCEEDED naming the
    /// laggards (the revocation is in force either way).
    pub async fn revoke(
        &self,
        caller: &Caller,
        id: Uuid,
        reason: String,
        wait: Option<std::time::Duration>,
    ) -> Result<(KeyRecord, u32), Error> {
        caller.require(&self.scopes.update)?;
        let (key, seq) = self
            .change(caller, id, EventKind::Revoked, |key, now| {
                key.revoke(reason.clone(), now)?;
                Ok(reason.clone())
            })
            .await?;
        Ok((key, self.confirmed(wait, seq).await?))
    }

    /// Disables the key until enabled again; `wait` as for [`Self::revoke`].
    pub async fn disable(
        &self,
        caller: &Caller,
        id: Uuid,
        wait: Option<std::time::Duration>,
    ) -> Result<(KeyRecord, u32), Error> {
        caller.require(&self.scopes.update)?;
        let (key, seq) = self
            .change(caller, id, EventKind::Disabled, |key, _| {
                Ok(key.disable().map(|()| String::new())?)
            })
            .await?;
        Ok((key, self.confirmed(wait, seq).await?))
    }

    /// With `wait`, how many live replicas applied `sequence` (or
    /// [`Error::ReplicasLagging`] naming the laggards); 0 without.
    async fn confirmed(
        &self,
        wait: Option<std::time::Duration>,
        sequence: i64,
    ) -> Result<u32, Error> {
        match wait {
            Some(timeout) => self.replicas.confirm(sequence, timeout).await,
            None => Ok(0),
        }
    }

    /// Makes a disabled key active again, returning it and the event's
    /// sequence. Restores power, so the caller must hold every scope of the
    /// key and the key must be within the caller's restrictions;
    /// FAILED_PRECONDITION when the key is not disabled or is revoked.
    pub async fn enable(&self, caller: &Caller, id: Uuid) -> Result<(KeyRecord, i64), Error> {
        caller.require(&self.scopes.update)?;
        self.change(caller, id, EventKind::Enabled, |key, _| {
            caller.require_covers(key, "enable")?;
            // Enabling changes no setting: the key as stored is `before`.
            caller.require_within(Some(key), key, self.default_rate_limit)?;
            Ok(key.enable().map(|()| String::new())?)
        })
        .await
    }

    /// Announces every previous secret whose grace period has ended: one
    /// SecretExpired event each, so the feed tells gateways the old secret is
    /// dead. Replicas may race to do it; the version check lets one win.
    pub async fn announce_expired_secrets(&self) -> Result<usize, Error> {
        let now = self.clock.now();
        let mut announced = 0;
        for mut key in self.store.unannounced_secret_expiries(now, 100).await? {
            let Some(previous) = key.previous_secret.as_mut() else {
                continue;
            };
            previous.announced = true;
            let ev = NewEvent {
                kind: EventKind::SecretExpired,
                key_id: key.id,
                organization_id: key.organization_id.as_deref().map(str::to_owned),
                actor: Actor::Keygate,
                at: now,
                reason: String::new(),
                details: String::new(),
            };
            if self.store.update_key(&key, &ev).await?.is_some() {
                self.cache.invalidate(key.id);
                announced += 1;
            }
        }
        Ok(announced)
    }

    /// Writes a SYSTEM key with `*:*` straight into the store, for the very
    /// first key (`keygate bootstrap`).
    pub async fn bootstrap(&self, name: String, mode: Mode) -> Result<(KeyRecord, String), Error> {
        let now = self.clock.now();
        let id = self.new_id()?;
        let NewToken {
            token,
            prefix,
            digest,
        } = self.new_token(mode, id)?;
        let scopes = ScopeSet::parse(&["*:*"]).map_err(|e| Error::Internal(e.to_string()))?;
        let key = KeyRecord {
            id,
            name,
            organization_id: None,
            tier: Tier::System,
            mode,
            prefix,
            secret_digest: digest,
            previous_secret: None,
            scopes,
            allowed_cidrs: Vec::new(),
            rate_limit_per_minute: 0,
            unlimited: false,
            state: KeyState::Active,
            created_at: now,
            last_used_at: None,
            expires_at: None,
            rotated_at: None,
            created_by: Actor::Bootstrap.to_string(),
            version: 1,
        };
        let ev = NewEvent {
            kind: EventKind::Created,
            key_id: id,
            organization_id: None,
            actor: Actor::Bootstrap,
            at: now,
            reason: String::new(),
            details: event::details(EventKind::Created, &key, ""),
        };
        self.store.insert_key(&key, &ev).await?;
        self.cache.apply(EventKind::Created, id);
        tracing::info!(key_id = %id, "bootstrap key created");
        Ok((key, token))
    }

    /// Removes the key for good; its events stay in the log. `wait` as for
    /// [`Self::revoke`]; returns how many replicas confirmed.
    pub async fn delete(
        &self,
        caller: &Caller,
        id: Uuid,
        wait: Option<std::time::Duration>,
    ) -> Result<u32, Error> {
        caller.require(&self.scopes.delete)?;
        for _ in 0..MAX_ATTEMPTS {
            let key = self.load_visible(caller, id).await?;
            let now = self.clock.now();
            let ev = event(EventKind::Deleted, &key, caller, now, String::new());
            if let Some(seq) = self.store.delete_key(id, key.version, &ev).await? {
                self.cache.apply(EventKind::Deleted, id);
                tracing::info!(key_id = %id, actor = %caller.actor(), "key deleted");
                return self.confirmed(wait, seq).await;
            }
        }
        Err(Error::Aborted("the key kept changing concurrently; retry"))
    }

    /// Applies `apply` to the stored key and writes it back with its event,
    /// retrying from a fresh read when a concurrent change wins. `apply`
    /// returns the event's reason.
    async fn change(
        &self,
        caller: &Caller,
        id: Uuid,
        kind: EventKind,
        mut apply: impl FnMut(&mut KeyRecord, DateTime<Utc>) -> Result<String, Error>,
    ) -> Result<(KeyRecord, i64), Error> {
        for _ in 0..MAX_ATTEMPTS {
            let mut key = self.load_visible(caller, id).await?;
            let now = self.clock.now();
            let reason = apply(&mut key, now)?;
            let ev = event(kind, &key, caller, now, reason);
            if let Some(stored) = self.store.update_key(&key, &ev).await? {
                self.cache.invalidate(id);
                tracing::info!(key_id = %id, actor = %caller.actor(), event = kind.as_str(), "key changed");
                return Ok(stored);
            }
        }
        Err(Error::Aborted("the key kept changing concurrently; retry"))
    }

    /// Reads from the store, not the cache: admin answers are never stale.
    pub(super) async fn load_visible(&self, caller: &Caller, id: Uuid) -> Result<KeyRecord, Error> {
        match self.store.get_key(id).await? {
            Some(key) if caller.can_see(key.organization_id.as_deref()) => Ok(key),
            _ => Err(Error::NotFound("key")),
        }
    }

    /// A tagged id, so every replica of the cluster tells it from a forged one.
    fn new_id(&self) -> Result<Uuid, Error> {
        self.cache
            .key_ids()
            .mint()
            .map_err(|e| Error::Internal(format!("OS random source failed: {e}")))
    }

    fn new_token(&self, mode: Mode, id: Uuid) -> Result<NewToken, Error> {
        token::generate(&self.brand, mode, id)
            .map_err(|e| Error::Internal(format!("OS random source failed: {e}")))
    }
}

fn event(
    kind: EventKind,
    key: &KeyRecord,
    caller: &Caller,
    at: DateTime<Utc>,
    reason: String,
) -> NewEvent {
    NewEvent {
        kind,
        key_id: key.id,
        organization_id: key.organization_id.as_deref().map(str::to_owned),
        actor: caller.actor().clone(),
        at,
        // An update's reason names the changed fields; `key` is the key
        // after the change.
        details: event::details(kind, key, &reason),
        reason,
    }
}
