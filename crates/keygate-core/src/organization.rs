//! What keygate keeps about an organization besides its keys: a rate limit
//! shared by all of them.

use std::num::NonZeroU32;

use chrono::{DateTime, Utc};

/// An organization's shared limit, as a SYSTEM key last set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrganizationLimit {
    /// The organization, as its keys carry it ([`is_valid_organization_id`]).
    ///
    /// [`is_valid_organization_id`]: crate::key::is_valid_organization_id
    pub organization_id: String,
    /// Requests per rolling minute for every key of the organization
    /// together; `None`: no shared limit (cleared, or never set).
    pub per_minute: Option<NonZeroU32>,
    /// When it was last set, by the setting replica's wall clock.
    pub updated_at: DateTime<Utc>,
    /// The key id that set it.
    pub updated_by: String,
}
