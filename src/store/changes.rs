//! "The event log may have grown": the store's wake-ups for its follower.
//!
//! A wake-up carries nothing: the follower reads the log by sequence, so a
//! lost or doubled wake-up costs a read, never an event. Local writes wake at
//! commit; on PostgreSQL a LISTEN connection (`postgres::listen`) wakes for
//! every replica's writes too, and after every reconnect.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

/// A handle on the wake-ups; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Changes {
    wake: Arc<Notify>,
    /// Whether other replicas' writes wake this one (PostgreSQL's LISTEN
    /// has been set up once); local writes always do.
    listening: Arc<watch::Sender<bool>>,
}

impl Changes {
    /// Resolves at the next wake-up. One that came while nobody waited is
    /// kept for the next call, so a change between two waits is not missed.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// Other replicas' writes now wake this one too.
    pub(super) fn set_listening(&self) {
        self.listening.send_replace(true);
    }

    /// Waits at most `within` until other replicas' writes wake this one;
    /// whether they do.
    pub(super) async fn wait_listening(&self, within: Duration) -> bool {
        let mut listening = self.listening.subscribe();
        matches!(
            tokio::time::timeout(within, listening.wait_for(|on| *on)).await,
            Ok(Ok(_))
        )
    }
}
