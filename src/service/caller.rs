//! Who is calling an admin RPC, and what that key may do.

use std::sync::Arc;

use crate::domain::key::{KeyRecord, Tier};
use crate::domain::scope::Scope;
use crate::error::Error;

/// An authenticated admin caller.
#[derive(Debug, Clone)]
pub struct Caller {
    key: Arc<KeyRecord>,
}

impl Caller {
    pub fn new(key: Arc<KeyRecord>) -> Self {
        Self { key }
    }

    pub fn key(&self) -> &KeyRecord {
        &self.key
    }

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

    /// Whether the caller may see a key of this organization (`None`: a SYSTEM key).
    pub fn can_see(&self, organization_id: Option<&str>) -> bool {
        self.is_system()
            || (organization_id.is_some() && organization_id == self.key.organization_id.as_deref())
    }
}
