//! The audit trail: the event log, newest first, within what the caller may see.

use keygate_core::event::Event;
use uuid::Uuid;

use super::caller::Caller;
use super::keys::KeyService;
use super::page::{last_of_page, page_size};
use crate::error::Error;
use crate::store::EventQuery;

/// A validated ListKeyEvents request.
#[derive(Debug, Clone, Default)]
pub struct EventListSpec {
    /// Only this organization's events; `None`: everything the caller may
    /// see ([`Caller::organization_filter`]).
    pub organization_id: Option<String>,
    /// Only this key's events; `None`: every key's.
    pub key_id: Option<Uuid>,
    /// Events per page; 0 means the default of 100.
    pub page_size: u32,
    /// Where to continue, as returned with the previous page; `None` starts
    /// at the newest event. Only valid with the same filters.
    pub page_token: Option<String>,
}

impl KeyService {
    /// One page of events, newest first, and the next page's token.
    pub async fn list_events(
        &self,
        caller: &Caller,
        spec: EventListSpec,
    ) -> Result<(Vec<Event>, Option<String>), Error> {
        caller.require(&self.scopes.read)?;
        let organization_id = caller.organization_filter(spec.organization_id)?;
        let filter = format!("events|{organization_id:?}|{:?}", spec.key_id);
        let before = spec
            .page_token
            .map(|t| self.pages.decode_sequence(&t, &filter))
            .transpose()?;
        let limit = page_size(spec.page_size);
        let query = EventQuery {
            organization_id,
            key_id: spec.key_id,
            before,
            limit: limit + 1,
        };
        let mut events = self.store.list_events(&query).await?;
        let next = last_of_page(&mut events, limit)
            .map(|e| self.pages.encode_sequence(e.sequence, &filter));
        Ok((events, next))
    }
}
