//! Organizations' shared rate limits: set and read by SYSTEM keys, and kept
//! in every replica's memory so that Authorize never reads the store for
//! them.
//!
//! Each replica loads every limit at start and again every feed poll
//! interval (`server::refresh_organization_limits`); the replica that sets
//! one applies it at once. Changes are not events: the event log, the
//! revocation feed and the audit chain are about keys (every event names
//! one), so a limit's row keeps who last set it and when, and each change is
//! logged.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock};

use keygate_core::clock::Clock;
use keygate_core::organization::OrganizationLimit;
use keygate_core::scope::Scope;

use super::caller::Caller;
use crate::error::Error;
use crate::store::{OrganizationLimitStore, StoreError};

/// Every organization's limit in force, as this replica last read or set it.
pub struct OrganizationLimits {
    store: Arc<dyn OrganizationLimitStore>,
    in_force: RwLock<Arc<HashMap<Arc<str>, NonZeroU32>>>,
    /// Held around a refresh's read and swap and around a set's write and
    /// apply, so a refresh that read the table before a set on this replica
    /// cannot put the old limit back after it.
    writing: tokio::sync::Mutex<()>,
}

impl OrganizationLimits {
    /// Reads every limit from `store`.
    pub async fn load(store: Arc<dyn OrganizationLimitStore>) -> Result<Self, StoreError> {
        let limits = Self {
            store,
            in_force: RwLock::default(),
            writing: tokio::sync::Mutex::new(()),
        };
        limits.refresh().await?;
        Ok(limits)
    }

    /// The organization's limit in force, and its id to count it under;
    /// `None` when it has none. Memory only: for the Authorize path.
    pub fn get(&self, organization_id: &str) -> Option<(Arc<str>, NonZeroU32)> {
        let in_force = self.in_force.read().unwrap_or_else(PoisonError::into_inner);
        in_force
            .get_key_value(organization_id)
            .map(|(id, limit)| (id.clone(), *limit))
    }

    /// Reads every limit from the store again (other replicas' changes),
    /// returning how many are in force; on failure the ones in memory stay.
    pub async fn refresh(&self) -> Result<usize, StoreError> {
        let _writing = self.writing.lock().await;
        let read: HashMap<Arc<str>, NonZeroU32> = self
            .store
            .organization_limits()
            .await?
            .into_iter()
            .filter_map(|l| l.per_minute.map(|n| (Arc::from(l.organization_id), n)))
            .collect();
        let count = read.len();
        *self
            .in_force
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(read);
        Ok(count)
    }

    /// Stores `limit` and applies it on this replica at once.
    async fn set(&self, limit: &OrganizationLimit) -> Result<(), StoreError> {
        let _writing = self.writing.lock().await;
        self.store.set_organization_limit(limit).await?;
        let mut in_force = self
            .in_force
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = HashMap::clone(&in_force);
        match limit.per_minute {
            Some(n) => next.insert(Arc::from(limit.organization_id.as_str()), n),
            None => next.remove(limit.organization_id.as_str()),
        };
        *in_force = Arc::new(next);
        Ok(())
    }
}

/// SetOrganizationLimits and GetOrganizationLimits: SYSTEM keys only, with
/// `api_key:update` to set and `api_key:read` to read (a limit governs the
/// organization's keys). Reads come from the store: never stale.
pub struct OrganizationService {
    limits: Arc<OrganizationLimits>,
    clock: Arc<dyn Clock>,
    read: Scope,
    update: Scope,
}

impl OrganizationService {
    /// Over `limits`, which Authorize reads too; changes are dated by `clock`.
    pub fn new(limits: Arc<OrganizationLimits>, clock: Arc<dyn Clock>) -> Self {
        let scope = |s| Scope::parse(s).expect("built-in scope parses");
        Self {
            limits,
            clock,
            read: scope("api_key:read"),
            update: scope("api_key:update"),
        }
    }

    /// Sets the organization's limit (`None`: clears it), in force on this
    /// replica when it returns; PERMISSION_DENIED for anything but a SYSTEM
    /// key with `api_key:update`.
    pub async fn set(
        &self,
        caller: &Caller,
        organization_id: String,
        per_minute: Option<NonZeroU32>,
    ) -> Result<OrganizationLimit, Error> {
        require_system(caller, "set")?;
        caller.require(&self.update)?;
        let limit = OrganizationLimit {
            organization_id,
            per_minute,
            updated_at: self.clock.now(),
            updated_by: caller.actor().to_string(),
        };
        self.limits.set(&limit).await?;
        tracing::info!(
            organization_id = %limit.organization_id,
            rate_limit_per_minute = limit.per_minute.map_or(0, NonZeroU32::get),
            actor = %caller.actor(),
            "organization limit set"
        );
        Ok(limit)
    }

    /// The organization's limit as last set or cleared, `None` when it never
    /// was; PERMISSION_DENIED for anything but a SYSTEM key with `api_key:read`.
    pub async fn get(
        &self,
        caller: &Caller,
        organization_id: &str,
    ) -> Result<Option<OrganizationLimit>, Error> {
        require_system(caller, "read")?;
        caller.require(&self.read)?;
        Ok(self
            .limits
            .store
            .organization_limit(organization_id)
            .await?)
    }
}

fn require_system(caller: &Caller, action: &str) -> Result<(), Error> {
    if caller.is_system() {
        Ok(())
    } else {
        Err(Error::InsufficientScope(format!(
            "only a SYSTEM key can {action} organization limits"
        )))
    }
}
