//! "The event log may have grown": the store's wake-ups for its follower.
//!
//! A wake-up carries nothing: the follower reads the log by sequence, so a
//! lost or doubled wake-up costs a read, never an event. Local writes wake at
//! commit; on PostgreSQL a LISTEN connection (`postgres::listen`) wakes for
//! every replica's writes too, and after every reconnect.

use std::sync::Arc;

use tokio::sync::Notify;

/// A handle on the wake-ups; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Changes(Arc<Notify>);

impl Changes {
    /// Resolves at the next wake-up. One that came while nobody waited is
    /// kept for the next call, so a change between two waits is not missed.
    pub async fn changed(&self) {
        self.0.notified().await;
    }

    pub(super) fn wake(&self) {
        self.0.notify_one();
    }
}
